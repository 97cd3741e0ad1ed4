#!/usr/bin/env bash
# Set up a Debian 12 machine for fixedram: QEMU 10 from bookworm-backports, the
# toolchain for the test guest, QEMU 7.2 unpacked into a cache (for interop
# tests), and the Python package with its dependencies in .venv.
#
#   bash scripts/setup.sh          # system packages + .venv with the package
#   bash scripts/setup.sh --dev    # also the test and lint dependencies, and libvirt
#   bash scripts/setup.sh --libvirt  # the package and libvirt (virsh, libvirtd, the QEMU driver)
#                                    # with its Python binding (the [libvirt] extra)
#   bash scripts/setup.sh --bench  # also the benchmarks' charts and profiler (the [bench] extra)
#
# Idempotent: what is already present is left alone.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
dev=0
libvirt=0
bench=0
for a in "$@"; do
  case "$a" in
    --dev) dev=1; libvirt=1 ;;
    --libvirt) libvirt=1 ;;
    --bench) bench=1 ;;
    *) echo "setup.sh: unknown option $a" >&2; exit 2 ;;
  esac
done

sudo_() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

qemu_major() {
  command -v qemu-system-x86_64 >/dev/null 2>&1 || { echo 0; return; }
  qemu-system-x86_64 --version | sed -n 's/^QEMU emulator version \([0-9]*\)\..*/\1/p'
}

apt_updated=0
apt_update() { [ "$apt_updated" = 1 ] || { sudo_ apt-get update -qq; apt_updated=1; }; }

need_pkgs=()
command -v gcc >/dev/null 2>&1 || need_pkgs+=(gcc)
command -v ld >/dev/null 2>&1 || need_pkgs+=(binutils)
command -v lz4 >/dev/null 2>&1 || need_pkgs+=(lz4)  # Debian's cloud kernel is LZ4-compressed
python3 -c 'import venv, ensurepip' >/dev/null 2>&1 || need_pkgs+=(python3-venv)
if [ ${#need_pkgs[@]} -gt 0 ]; then
  apt_update
  sudo_ env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_pkgs[@]}"
fi

if [ "$(qemu_major)" -lt 10 ]; then
  codename=$(. /etc/os-release && echo "${VERSION_CODENAME:-bookworm}")
  if ! grep -rqs "${codename}-backports" /etc/apt/sources.list /etc/apt/sources.list.d/; then
    echo "deb http://deb.debian.org/debian ${codename}-backports main" |
      sudo_ tee /etc/apt/sources.list.d/fixedram-backports.list >/dev/null
    apt_updated=0
  fi
  apt_update
  sudo_ env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq -t "${codename}-backports" qemu-system-x86
fi
echo "setup: $(qemu-system-x86_64 --version | head -1)"

# libvirt 11 from bookworm-backports (virsh save --image-format sparse needs >= 10.x): only
# the libvirt packages are taken from backports (pkg/release), so their dependencies, systemd
# among them, come from the stable release. No network, storage or firewall driver and no
# service is started: the tests and bench run a private libvirtd (fixedram/testing/libvirt.py),
# and /etc/libvirt is left as the package ships it.
if [ "$libvirt" = 1 ] && ! { command -v virsh >/dev/null 2>&1 && [ -x /usr/sbin/libvirtd ] &&
    virsh --version | grep -q '^1[1-9]\.'; }; then
  codename=$(. /etc/os-release && echo "${VERSION_CODENAME:-bookworm}")
  apt_update
  rc_made=0
  if [ ! -e /usr/sbin/policy-rc.d ]; then  # no daemon started by the packages' scripts
    printf '#!/bin/sh\nexit 101\n' | sudo_ tee /usr/sbin/policy-rc.d >/dev/null
    sudo_ chmod 755 /usr/sbin/policy-rc.d
    rc_made=1
  fi
  sudo_ env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    "libvirt-daemon/${codename}-backports" "libvirt-daemon-driver-qemu/${codename}-backports" \
    "libvirt-clients/${codename}-backports"
  [ "$rc_made" = 0 ] || sudo_ rm -f /usr/sbin/policy-rc.d
fi
if [ "$libvirt" = 1 ]; then
  # lzop: libvirt's lzop save format is read through the lzop tool, as libvirt writes it.
  # libvirt-python (the [libvirt] extra) is built by pip against the installed libvirt:
  # its headers (libvirt-dev of the same release, hence backports), pkg-config, gcc and
  # Python's own headers.
  lv_pkgs=()
  command -v lzop >/dev/null 2>&1 || lv_pkgs+=(lzop)
  command -v pkg-config >/dev/null 2>&1 || lv_pkgs+=(pkg-config)
  if ! pkg-config --exists libvirt-qemu 2>/dev/null; then
    lv_pkgs+=("libvirt-dev/$(. /etc/os-release && echo "${VERSION_CODENAME:-bookworm}")-backports")
  fi
  python3 -c 'import sysconfig, os, sys
sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))' ||
    lv_pkgs+=(python3-dev)
  if [ ${#lv_pkgs[@]} -gt 0 ]; then
    apt_update
    sudo_ env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
      "${lv_pkgs[@]}"
  fi
  echo "setup: libvirt $(virsh --version)"
fi

# QEMU 7.2 (Debian bookworm), unpacked, not installed: interop tests use it.
cache=${FIXEDRAM_CACHE:-$here/.cache}
q72="$cache/qemu-7.2"
if [ ! -x "$q72/usr/bin/qemu-system-x86_64" ]; then
  apt_update
  tmp=$(mktemp -d)
  chmod 755 "$tmp"  # apt's _apt user must be able to write there (else an "unsandboxed" warning)
  (cd "$tmp" && apt-get download -qq qemu-system-x86/bookworm qemu-system-common/bookworm)
  mkdir -p "$q72"
  for deb in "$tmp"/*.deb; do dpkg -x "$deb" "$q72"; done
  rm -rf "$tmp"
fi
# Unpacked, not installed: its modules (accel-tcg-i386.so) sit under $q72/usr/lib and its
# firmware comes from the system's /usr/share/{seabios,qemu} and /usr/lib/ipxe/qemu (NIC
# option ROMs); fixedram.testing.vm.find_qemu("7.2") passes QEMU_MODULE_DIR and -L for them.
QEMU_MODULE_DIR="$q72/usr/lib/x86_64-linux-gnu/qemu" "$q72/usr/bin/qemu-system-x86_64" --version |
  head -1 | sed 's/^/setup: /'
echo "setup: QEMU 7.2 in $q72"

# The Linux test guest (fixedram/testing/guest/linux.py) is built at test time from Debian's cloud
# kernel and busybox-static: download the two packages (not installed) into $cache/debs.
debs="$cache/debs"
if ! ls "$debs"/linux-image-*-cloud-amd64_*_amd64.deb >/dev/null 2>&1 ||
   ! ls "$debs"/busybox-static_*_amd64.deb >/dev/null 2>&1; then
  apt_update
  command -v dpkg-deb >/dev/null 2>&1 || { echo "setup: dpkg-deb is needed" >&2; exit 1; }
  # the meta package names the current ABI's image: linux-image-<abi>-cloud-amd64
  kpkg=$(apt-cache depends linux-image-cloud-amd64 | sed -n 's/^ *Depends: \(linux-image-[0-9].*-cloud-amd64\)$/\1/p' | head -1)
  [ -n "$kpkg" ] || { echo "setup: cannot resolve linux-image-cloud-amd64" >&2; exit 1; }
  tmp=$(mktemp -d)
  chmod 755 "$tmp"
  (cd "$tmp" && apt-get download -qq "$kpkg" busybox-static)
  mkdir -p "$debs"
  mv "$tmp"/*.deb "$debs"/
  rm -rf "$tmp"
fi
[ -e /usr/lib/x86_64-linux-gnu/libc.a ] || {
  apt_update; sudo_ env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libc6-dev; }
echo "setup: Linux guest packages in $debs"

cd "$here"
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
extras=()
[ "$dev" = 1 ] && extras+=(dev)
[ "$libvirt" = 1 ] && extras+=(libvirt)
[ "$bench" = 1 ] && extras+=(bench)
spec=.
[ ${#extras[@]} -gt 0 ] && spec=".[$(IFS=,; echo "${extras[*]}")]"
# The editable install puts the checkout on sys.path with a plain path entry (setuptools'
# compat mode): the default mode installs an import hook that costs every Python start in
# .venv about 30 ms (docs/resident-server.md). Where the build backend has no compat mode,
# the default editable install.
.venv/bin/python -m pip install -q -e "$spec" --config-settings editable_mode=compat \
  2>/dev/null || .venv/bin/python -m pip install -q -e "$spec"
echo "setup: done (.venv)"
