"""The Linux test guest: Debian's cloud kernel, a busybox initramfs and the ``lxguest`` workload.

Built at test time from Debian packages that ``scripts/setup.sh`` downloads into
``<cache>/debs`` (``linux-image-*-cloud-amd64`` and ``busybox-static``), and cached in
``<cache>/linux-guest-<hash>/`` (``vmlinux``, ``initrd``) where the hash covers the packages
and the sources next to this file:

* ``vmlinux``: the kernel decompressed out of the package's ``vmlinuz``; QEMU boots this ELF
  through its PVH entry point, seconds faster under TCG than the bzImage.
* ``initrd``: an uncompressed newc cpio (made with busybox ``cpio``) holding busybox,
  ``/init`` (``init.sh``), the virtio drivers (:data:`MODULES`, loaded by ``/init``) and
  ``/lxguest``, ``linux.c`` built with ``gcc -static``.

The guest's kernel command line takes ``console=ttyS0`` plus the workload's parameters
(``data=``, ``mib=``, ``rate=``, ``hb=``, ``touch=``; see ``linux.c``): :func:`linux_append`.
Its heartbeat ``HB <n> gen=<g> cur=<c> err=<e> KiBps=<k> data=<digest>`` is what
:func:`fixedram.testing.vm.parse_heartbeats` reads.

**The touch workload** (``touch=N``): the guest fills N MiB at start and reads all of it
whenever it gets a ``t`` on its second serial port, then prints
``TOUCH <k> pages=<n> bad=<b> ms=<ms>``. The port is a QEMU socket chardev,
:data:`COMMAND_PORT_ARGS` (same on source and destination: ``{guest}`` is each QEMU's name,
the path is relative to its working directory); :func:`send_touch` sends the command and
:func:`parse_touches` reads the answers. A benchmark sends it right after a restore starts
the guest: the answer's arrival is when the workload has resumed.
"""

from __future__ import annotations

import hashlib
import lzma
import re
import shutil
import subprocess
import tempfile
import time
import zlib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import NamedTuple

from fixedram.errors import VMError

__all__ = ["LinuxGuest", "build_linux_guest", "find_debs", "linux_append", "COMMAND_PORT_ARGS",
           "send_touch", "parse_touches", "Touch"]

_SOURCES = ("linux.c", "init.sh")
#: Kernel modules put in the initramfs, in load order (init.sh loads them): the drivers of
#: the virtio devices the tests attach (Debian's cloud kernel builds them as modules).
MODULES = ("virtio_ring", "virtio", "virtio_pci_legacy_dev", "virtio_pci_modern_dev",
           "virtio_pci", "virtio_blk", "failover", "net_failover", "virtio_net",
           "virtio_balloon", "virtio-rng")
_SETUP_HINT = "bash scripts/setup.sh downloads them"


@dataclass(frozen=True)
class LinuxGuest:
    """The built guest: ``-kernel vmlinux -initrd initrd``."""

    kernel: Path
    initrd: Path


def linux_append(*, data: int = 16, mib: int = 16, rate: int = 4, hb: int = 1000,
                 touch: int = 0, extra: str = "") -> str:
    """The kernel command line for the guest: serial console, quiet, no reboot on panic.
    ``touch`` (MiB) turns on the touch workload (it needs :data:`COMMAND_PORT_ARGS`)."""
    words = ["console=ttyS0", "quiet", "panic=-1", "tsc=reliable", f"data={data}", f"mib={mib}",
             f"rate={rate}", f"hb={hb}", *([f"touch={touch}"] if touch else [])]
    return " ".join([*words, extra]).strip()


#: QEMU arguments of the touch workload's command port (the guest's ttyS1): a unix socket
#: ``<name>.cmd`` in the QEMU's working directory that :func:`send_touch` connects to.
COMMAND_PORT_ARGS = ("-chardev", "socket,id=lxcmd,path={guest}.cmd,server=on,wait=off",
                     "-device", "isa-serial,chardev=lxcmd")


class Touch(NamedTuple):
    """One ``TOUCH`` line: the k-th touch of ``pages`` pages, ``bad`` of them wrong."""

    k: int
    pages: int
    bad: int
    ms: int


_TOUCH = re.compile(rb"^TOUCH (\d+) pages=(\d+) bad=(\d+) ms=(\d+)\r?$", re.M)


def parse_touches(serial: bytes) -> list[Touch]:
    """Every complete ``TOUCH`` line of the serial output."""
    return [Touch(*map(int, m.groups())) for m in _TOUCH.finditer(serial)]


def send_touch(pid: int, name: str, timeout: float = 10.0) -> None:
    """Ask the guest ``name`` (QEMU process ``pid``, started with :data:`COMMAND_PORT_ARGS`)
    to read its touch region. The socket is reached through ``/proc/<pid>/cwd``: a short
    path, whatever the QEMU's working directory."""
    import socket

    deadline = time.monotonic() + timeout
    while True:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(f"/proc/{pid}/cwd/{name}.cmd")
            s.sendall(b"t")
            return
        except OSError as e:
            if time.monotonic() > deadline:
                raise VMError(f"cannot reach the command port of guest {name}: {e}") from e
            time.sleep(0.05)
        finally:
            s.close()


def _cache_dirs() -> list[Path]:
    from fixedram.testing.vm import cache_roots

    return cache_roots()


def find_debs() -> tuple[Path, Path]:
    """The kernel and busybox packages in ``<cache>/debs`` (newest kernel first)."""
    tried = []
    for root in _cache_dirs():
        d = root / "debs"
        tried.append(str(d))
        kernels = sorted(d.glob("linux-image-*-cloud-amd64_*_amd64.deb"), reverse=True)
        busybox = sorted(d.glob("busybox-static_*_amd64.deb"), reverse=True)
        if kernels and busybox:
            return kernels[0], busybox[0]
    raise VMError("the Linux test guest needs linux-image-*-cloud-amd64 and busybox-static "
                  f".deb files in <cache>/debs ({_SETUP_HINT}); looked in " + ", ".join(tried))


def _extract(deb: Path, member_glob: str, dest: Path) -> Path:
    """Extract the first member matching ``member_glob`` from ``deb`` to ``dest``."""
    try:
        tar = subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(deb)], stdout=subprocess.PIPE)
    except OSError as e:
        raise VMError(f"cannot run dpkg-deb: {e}") from e
    assert tar.stdout is not None
    with open(dest, "wb") as out:
        r = subprocess.run(["tar", "-xO", "--occurrence=1", "--wildcards", member_glob],
                           stdin=tar.stdout, stdout=out, stderr=subprocess.PIPE, check=False)
    tar.stdout.close()
    tar.kill()
    tar.wait()
    if r.returncode != 0 or dest.stat().st_size == 0:
        raise VMError(f"cannot extract {member_glob} from {deb}: {r.stderr.decode().strip()}")
    return dest


def _vmlinux(vmlinuz: Path, dest: Path) -> None:
    """Decompress a bzImage's payload: the ELF that QEMU boots through PVH.

    The payload's place comes from the setup header (``setup_sects``, ``payload_offset``,
    ``payload_length``); Debian compresses it with XZ or LZ4 depending on the release
    (XZ and gzip are read with Python, LZ4 and zstd with their command-line tools).
    """
    raw = vmlinuz.read_bytes()
    if len(raw) < 0x250 or raw[0x202:0x206] != b"HdrS":
        raise VMError(f"{vmlinuz} is not a bzImage")
    setup = (raw[0x1F1] or 4) + 1
    off = setup * 512 + int.from_bytes(raw[0x248:0x24C], "little")
    length = int.from_bytes(raw[0x24C:0x250], "little")
    payload = raw[off : off + length]
    if payload.startswith(b"\xfd7zXZ\x00"):
        elf = lzma.LZMADecompressor().decompress(payload)
    elif payload.startswith(b"\x1f\x8b"):
        elf = zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(payload)
    else:
        tool = {b"\x02\x21\x4c\x18": ["lz4", "-dc"], b"\x28\xb5\x2f\xfd": ["zstd", "-dcq"]}
        argv = tool.get(payload[:4])
        if argv is None:
            raise VMError(f"{vmlinuz}: unknown kernel compression (magic {payload[:4].hex()})")
        try:
            # the last block is followed by the uncompressed size: lz4 warns, the data is whole
            r = subprocess.run(argv, input=payload, capture_output=True, check=False)
        except OSError as e:
            raise VMError(f"cannot run {argv[0]} to unpack the kernel: {e}") from e
        elf = r.stdout
    if elf[:4] != b"\x7fELF":
        raise VMError(f"{vmlinuz}: the decompressed payload is not an ELF kernel")
    dest.write_bytes(elf)


def _modules(deb: Path, dest: Path) -> None:
    """Extract :data:`MODULES` from the kernel package into ``dest`` (flat, ``<name>.ko``)."""
    dest.mkdir(parents=True)
    tar = subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(deb)], stdout=subprocess.PIPE)
    assert tar.stdout is not None
    r = subprocess.run(["tar", "-x", "-C", str(dest), "--wildcards", "--no-anchored",
                        "--transform", "s,.*/,,", *(f"*/{m}.ko" for m in MODULES)],
                       stdin=tar.stdout, stderr=subprocess.PIPE, check=False)
    tar.stdout.close()
    tar.wait()
    missing = [m for m in MODULES if not (dest / f"{m}.ko").is_file()]
    if r.returncode != 0 or missing:
        raise VMError(f"cannot extract kernel modules {missing} from {deb}: "
                      f"{r.stderr.decode().strip()}")


def build_linux_guest(cache_dir: Path | None = None) -> LinuxGuest:
    """Build (or find already built) the Linux test guest and return its two files.

    Raises :class:`VMError` if the packages are missing (``scripts/setup.sh``), or gcc,
    dpkg-deb or tar fail. Concurrent builders are safe: the result is renamed into place.
    """
    kdeb, bdeb = find_debs()
    pkg = resources.files(__package__)
    h = hashlib.sha256()
    for name in _SOURCES:
        h.update(name.encode() + b"\0" + (pkg / name).read_bytes() + b"\0")
    h.update(kdeb.name.encode() + b"\0" + bdeb.name.encode())
    cache = Path(cache_dir) if cache_dir is not None else kdeb.parent.parent
    out = cache / f"linux-guest-{h.hexdigest()[:16]}"
    guest = LinuxGuest(kernel=out / "vmlinux", initrd=out / "initrd")
    if guest.kernel.is_file() and guest.initrd.is_file():
        return guest
    if shutil.which("gcc") is None:
        raise VMError("cannot build the Linux test guest: gcc not found (scripts/setup.sh)")
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache, prefix=".build-linux-") as tmp:
        t = Path(tmp)
        _vmlinux(_extract(kdeb, "./boot/vmlinuz-*", t / "vmlinuz"), t / "vmlinux")
        root = t / "root"
        for d in ("bin", "dev", "proc", "sys", "data"):
            (root / d).mkdir(parents=True)
        busybox = _extract(bdeb, "./bin/busybox", root / "bin" / "busybox")
        busybox.chmod(0o755)
        _modules(kdeb, root / "lib" / "modules")
        (root / "linux.c").write_bytes((pkg / "linux.c").read_bytes())
        r = subprocess.run(["gcc", "-static", "-O2", "-Wall", "-o", str(root / "lxguest"),
                            str(root / "linux.c")], capture_output=True, text=True, check=False)
        if r.returncode != 0:
            raise VMError(f"building the Linux guest's workload failed: {r.stderr.strip()} "
                          "(libc6-dev provides the static libc)")
        (root / "linux.c").unlink()
        init = root / "init"
        init.write_bytes((pkg / "init.sh").read_bytes())
        init.chmod(0o755)
        names = sorted(str(p.relative_to(root)) for p in root.rglob("*"))
        with open(t / "initrd", "wb") as cpio:
            r2 = subprocess.run([str(busybox), "cpio", "-o", "-H", "newc"], cwd=root,
                                input="\n".join([".", *names]).encode() + b"\n", stdout=cpio,
                                stderr=subprocess.PIPE, check=False)
        if r2.returncode != 0:
            raise VMError(f"making the Linux guest's initramfs failed: {r2.stderr.decode()}")
        stage = t / "out"
        stage.mkdir()
        (t / "vmlinux").rename(stage / "vmlinux")
        (t / "initrd").rename(stage / "initrd")
        try:
            stage.rename(out)
        except OSError:
            if not guest.kernel.is_file():
                raise
    return guest
