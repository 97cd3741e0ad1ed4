"""A private libvirt daemon for tests and benchmarks: configuration, state and sockets in one
directory, nothing of the host's libvirt touched.

``libvirtd`` running as root reads ``/etc/libvirt`` and keeps its state under ``/var/lib``,
``/run`` and ``/var/log``. :class:`Libvirtd` starts it in a private mount namespace
(``unshare -m``) in which those four directories are bind mounts of directories under
``workdir``: its ``qemu.conf`` (QEMU as root, no security driver, no cgroups, no
namespaces, guest consoles written straight to files so that no ``virtlogd`` is needed)
and ``libvirtd.conf`` (unix sockets in ``workdir/run``, no authentication, no TCP) are the
test's own. Clients connect with ``qemu:///system?socket=<workdir>/run/libvirt-sock``
(:attr:`Libvirtd.uri`). Stopping destroys every domain the daemon still runs, then the daemon.

libvirtd daemonizes QEMU, so a QEMU that exits is reaped by whatever adopts it. On a host
that is the init system, at once; in a container or sandbox whose first process reaps its
orphans only now and then, libvirt's stop of a domain (``virsh destroy``, the end of
``virsh save``) would wait for that reaping, since it polls until the process is gone. The
daemon therefore runs under a small child-subreaper (:data:`_REAPER`) that adopts and
reaps its QEMUs at once, as a host's init does.

:func:`domain_xml` writes the XML of a TCG domain running the bare test guest (or the Linux
test guest) with its serial console in a file.
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from xml.sax.saxutils import quoteattr

from fixedram.errors import VMError

__all__ = ["Libvirtd", "domain_xml", "emulator_script"]

_BINDS = (("etc", "/etc/libvirt"), ("lib", "/var/lib/libvirt"), ("log", "/var/log/libvirt"),
          ("cache", "/var/cache/libvirt"), ("run", "/run/libvirt"))

_QEMU_CONF = """\
user = "root"
group = "root"
security_driver = "none"
dynamic_ownership = 0
remember_owner = 0
cgroup_controllers = [ ]
stdio_handler = "file"
namespaces = [ ]
"""


#: Runs ``argv`` as a child subreaper (``prctl(PR_SET_CHILD_SUBREAPER)``): QEMUs libvirtd
#: orphans are reaped as soon as they exit; SIGTERM goes on to the daemon; exits with it.
_REAPER = """
import ctypes, os, signal, subprocess, sys
ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)
d = subprocess.Popen(sys.argv[1:])
signal.signal(signal.SIGTERM, lambda *_: d.send_signal(signal.SIGTERM))
while True:
    try:
        pid, st = os.waitpid(-1, 0)
    except ChildProcessError:
        break
    except InterruptedError:
        continue
    if pid == d.pid:
        d.returncode = os.waitstatus_to_exitcode(st)
        break
sys.exit(d.returncode or 0)
"""


class Libvirtd:
    """A private ``libvirtd`` (see the module doc); a context manager."""

    def __init__(self, workdir: str | os.PathLike[str]) -> None:
        self.workdir = Path(workdir).resolve()
        self.sock = self.workdir / "run" / "libvirt-sock"
        self.uri = f"qemu:///system?socket={self.sock}"
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30.0) -> Libvirtd:
        """Start the daemon; wait until virsh answers. :class:`VMError` if it cannot run."""
        daemon = "/usr/sbin/libvirtd"
        for need in ("virsh", "unshare"):
            if shutil.which(need) is None:
                raise VMError(f"{need} is not installed (scripts/setup.sh --libvirt)")
        if not os.access(daemon, os.X_OK):
            raise VMError(f"{daemon} is not installed (scripts/setup.sh --libvirt)")
        if os.geteuid() != 0:
            raise VMError("a private libvirtd for the tests needs root (mount namespace)")
        for sub, _ in _BINDS:
            (self.workdir / sub).mkdir(parents=True, exist_ok=True)
        etc = self.workdir / "etc"
        (etc / "qemu.conf").write_text(_QEMU_CONF)
        (etc / "libvirtd.conf").write_text(
            f'unix_sock_dir = "{self.workdir / "run"}"\n'
            'auth_unix_rw = "none"\nauth_unix_ro = "none"\n'
            'listen_tcp = 0\nlisten_tls = 0\n'
            f'log_outputs = "3:file:{self.workdir / "libvirtd.log"}"\n')
        mounts = "; ".join(f"mkdir -p {dst} && mount --bind {self.workdir / src} {dst}"
                           for src, dst in _BINDS)
        script = (f"set -e; {mounts}; exec {shlex.quote(sys.executable)} -c "
                  f"{shlex.quote(_REAPER)} {daemon} --config /etc/libvirt/libvirtd.conf "
                  f"--pid-file {self.workdir / 'libvirtd.pid'}")
        err = open(self.workdir / "libvirtd.err", "wb")  # noqa: SIM115 - the daemon's stderr
        try:
            self._proc = subprocess.Popen(
                ["unshare", "-m", "--propagation", "private", "sh", "-c", script],
                stdin=subprocess.DEVNULL, stdout=err, stderr=err, start_new_session=True)
        finally:
            err.close()
        deadline = time.monotonic() + timeout
        while True:
            r = subprocess.run(["virsh", "-q", "-c", self.uri, "version"], capture_output=True,
                               check=False)
            if r.returncode == 0:
                return self
            if self._proc.poll() is not None or time.monotonic() > deadline:
                tail = (self.workdir / "libvirtd.err").read_text(errors="replace")[-400:]
                self.stop()
                raise VMError(f"private libvirtd did not start: {tail.strip()!r}")
            time.sleep(0.1)

    def virsh(self, *args: str, check: bool = True) -> str:
        """``virsh ARGS`` on this daemon; its stdout (VMError on failure if ``check``)."""
        r = subprocess.run(["virsh", "-q", "-c", self.uri, *args], capture_output=True,
                           text=True, check=False)
        if check and r.returncode != 0:
            raise VMError(f"virsh {' '.join(args)}: {r.stderr.strip()}")
        return r.stdout

    def stop(self) -> None:
        """Destroy the domains still running, then stop the daemon."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            for name in self.virsh("list", "--name", check=False).split():
                self.virsh("destroy", name, check=False)
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:  # the reaper, libvirtd and its QEMUs
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)

    def __enter__(self) -> Libvirtd:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def domain_xml(name: str, kernel: str | os.PathLike[str], serial: str | os.PathLike[str], *,
               mem_mib: int = 128, cmdline: str = "", initrd: str | os.PathLike[str] | None = None,
               machine: str = "q35", vcpus: int = 1, emulator: str | None = None) -> str:
    """A TCG domain booting ``kernel`` (the bare or the Linux test guest) with its serial
    console appended to the file ``serial``; no disk, NIC, graphics or balloon.
    ``emulator``: the QEMU binary (default: ``qemu-system-x86_64`` on ``PATH``)."""
    if emulator is None:
        emulator = shutil.which("qemu-system-x86_64") or "/usr/bin/qemu-system-x86_64"
    init = f"<initrd>{Path(initrd).resolve()}</initrd>" if initrd is not None else ""
    return f"""<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>{mem_mib}</memory>
  <vcpu>{vcpus}</vcpu>
  <os><type arch='x86_64' machine='{machine}'>hvm</type>
    <kernel>{Path(kernel).resolve()}</kernel>{init}
    <cmdline>{cmdline}</cmdline></os>
  <devices>
    <emulator>{emulator}</emulator>
    <serial type='file'><source path={quoteattr(str(Path(serial).resolve()))} append='on'/>
      <target port='0'/></serial>
    <memballoon model='none'/>
  </devices>
</domain>
"""


def emulator_script(path: str | os.PathLike[str], version: str) -> Path:
    """An executable script at ``path`` that runs the QEMU ``version`` found by
    :func:`fixedram.testing.vm.find_qemu` with the environment and ``-L`` options it needs
    (an unpacked QEMU 7.2): a domain's ``<emulator>`` for it, since libvirt runs its
    emulator with a clean environment and a command line of its own."""
    from fixedram.testing.vm import find_qemu

    q = find_qemu(version)
    env = " ".join(f"{k}={shlex.quote(v)}" for k, v in q.env.items())
    p = Path(path).resolve()
    p.write_text(f"#!/bin/sh\nexec env {env} {shlex.quote(str(q.path))} "
                 f"{shlex.join(q.extra_args)} \"$@\"\n")
    p.chmod(0o755)
    return p
