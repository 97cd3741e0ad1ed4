"""Run real QEMU guests: locate QEMU, start and drive a VM over QMP, save and restore it.

This is the harness shared by the test-suite and ``fixedram demo``. Everything here is
synchronous; QMP goes through :class:`fixedram.qmp.client.QMP` (QEMU's ``qemu.qmp`` on a
private loop thread), so callers may use it from plain code or from inside their own loop.
Failures raise :class:`fixedram.errors.VMError` with QEMU's own message (stderr tail) where
there is one.

Typical use::

    qemu = find_qemu("10")
    with Guest(qemu, workdir, append="mib=32 rate=32") as src:
        src.wait_heartbeat(gen_at_least=1)
        info = qemu_save(src, workdir / "state.bin", mode="mapped-ram")
        src.pmemsave(workdir / "src.mem")
    with qemu_restore(src, workdir / "state.bin", mode="mapped-ram") as dst:
        dst.pmemsave(workdir / "dst.mem")
        dst.cont()
        dst.wait_heartbeat(gen_at_least=info_gen + 2)
"""

from __future__ import annotations

import atexit
import contextlib
import os
import re
import shlex
import shutil
import signal
import subprocess
import tempfile
import time
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NamedTuple

from fixedram.errors import QMPCommandError, VMError
from fixedram.qmp.client import QMP

__all__ = [
    "DEFAULT_MAX_BANDWIDTH",
    "Guest",
    "Heartbeat",
    "QemuBinary",
    "RamBlock",
    "cache_roots",
    "choose_accel",
    "find_qemu",
    "kvm_runs_guest",
    "parse_heartbeats",
    "parse_info_ramblock",
    "parse_mem_size",
    "qemu_restore",
    "qemu_save",
]

DEFAULT_MAX_BANDWIDTH = 1 << 40  # 1 TiB/s: QEMU's 128 MiB/s default also throttles file:
_REPO_ROOT = Path(__file__).resolve().parents[2]
_SETUP_HINT = "scripts/setup.sh installs it"


# ---------------------------------------------------------------------------------------------
# Locating QEMU
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class QemuBinary:
    """A QEMU system emulator and what it needs to run.

    ``extra_args`` go right after the binary on every command line (firmware search paths for an
    unpacked, not installed QEMU); ``env`` is added to the environment (``QEMU_MODULE_DIR``).
    """

    path: Path
    version: tuple[int, int, int]
    extra_args: tuple[str, ...] = ()
    env: Mapping[str, str] = field(default_factory=dict)

    @property
    def version_str(self) -> str:
        """``"10.0.2"``."""
        return ".".join(map(str, self.version))

    def argv(self, *args: str) -> list[str]:
        """The full command line: binary, ``extra_args``, then ``args``."""
        return [str(self.path), *self.extra_args, *args]

    def environ(self) -> dict[str, str]:
        """``os.environ`` plus :attr:`env`."""
        e = dict(os.environ)
        e.update(self.env)
        return e


_qemu_cache: dict[str, QemuBinary] = {}
_VERSION_RE = re.compile(r"QEMU emulator version (\d+)\.(\d+)\.(\d+)")


def _probe_version(path: Path, env: Mapping[str, str]) -> tuple[int, int, int] | None:
    try:
        r = subprocess.run(
            [str(path), "--version"],
            capture_output=True,
            text=True,
            timeout=20,
            env={**os.environ, **env},
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    m = _VERSION_RE.search(r.stdout)
    return (int(m[1]), int(m[2]), int(m[3])) if m else None


def _matches(version: tuple[int, int, int], want: str) -> bool:
    parts = [int(p) for p in want.split(".") if p]
    return list(version[: len(parts)]) == parts


def cache_roots() -> list[Path]:
    """Where downloaded and built test artefacts are looked for, in order: ``$FIXEDRAM_CACHE``,
    the repository's ``.cache``, ``~/.cache/fixedram``."""
    roots = []
    if os.environ.get("FIXEDRAM_CACHE"):
        roots.append(Path(os.environ["FIXEDRAM_CACHE"]))
    roots.append(_REPO_ROOT / ".cache")
    roots.append(Path.home() / ".cache" / "fixedram")
    return roots


def find_qemu(version: str = "10") -> QemuBinary:
    """Find a ``qemu-system-x86_64`` whose version starts with ``version`` (``"10"``, ``"7.2"``).

    Looked for, in order: ``$FIXEDRAM_QEMU_<version with _ for .>`` (e.g. ``FIXEDRAM_QEMU_7_2``),
    ``qemu-system-x86_64`` on ``PATH``, and a Debian package unpacked by ``scripts/setup.sh`` in
    ``<cache>/qemu-<version>/usr/bin`` where ``<cache>`` is ``$FIXEDRAM_CACHE``, the repository's
    ``.cache`` or ``~/.cache/fixedram``. An unpacked QEMU gets ``-L /usr/share/seabios -L
    /usr/share/qemu -L /usr/lib/ipxe/qemu`` (the last holds the NICs' option ROMs, which
    QEMU's default devices need) and ``QEMU_MODULE_DIR``. Results are cached per process.

    Raises :class:`VMError` naming what is missing.
    """
    if version in _qemu_cache:
        return _qemu_cache[version]
    tried: list[str] = []
    candidates: list[tuple[Path, bool]] = []
    env_var = "FIXEDRAM_QEMU_" + version.replace(".", "_")
    if os.environ.get(env_var):
        candidates.append((Path(os.environ[env_var]), False))
    on_path = shutil.which("qemu-system-x86_64")
    if on_path:
        candidates.append((Path(on_path), False))
    for root in cache_roots():
        candidates.append((root / f"qemu-{version}" / "usr" / "bin" / "qemu-system-x86_64", True))

    for path, unpacked in candidates:
        if not (path.is_file() and os.access(path, os.X_OK)):
            tried.append(f"{path} (absent)")
            continue
        env: dict[str, str] = {}
        extra: tuple[str, ...] = ()
        prefix = path.parent.parent  # .../usr
        moddir = prefix / "lib" / "x86_64-linux-gnu" / "qemu"
        if unpacked or not str(path).startswith("/usr/"):
            if moddir.is_dir():
                env["QEMU_MODULE_DIR"] = str(moddir)
            extra = tuple(
                a
                for d in ("/usr/share/seabios", "/usr/share/qemu", "/usr/lib/ipxe/qemu")
                if Path(d).is_dir()
                for a in ("-L", d)
            )
        v = _probe_version(path, env)
        if v is None:
            tried.append(f"{path} (does not run)")
            continue
        if not _matches(v, version):
            tried.append(f"{path} (is {'.'.join(map(str, v))})")
            continue
        q = QemuBinary(path=path, version=v, extra_args=extra, env=env)
        _qemu_cache[version] = q
        return q
    raise VMError(
        f"QEMU {version} (qemu-system-x86_64) not found; {_SETUP_HINT}. Tried: " + "; ".join(tried)
    )


# ---------------------------------------------------------------------------------------------
# Choosing the accelerator
# ---------------------------------------------------------------------------------------------

_accel_cache: dict[Path, str] = {}


def choose_accel(qemu: QemuBinary, *, probe_seconds: float = 3.0) -> Literal["kvm", "tcg"]:
    """Return ``"kvm"`` if the test guest really runs under KVM with ``qemu``, else ``"tcg"``.

    ``$FIXEDRAM_ACCEL`` (``kvm`` or ``tcg``) overrides. Otherwise, without a usable
    ``/dev/kvm``, or when ``/dev/kvm`` is kvm-pvm (``/sys/module/kvm_pvm`` exists: it opens
    but our guest crashes or crawls there), the answer is ``tcg``. Else the bare guest is booted
    under ``-accel kvm`` for up to ``probe_seconds`` and KVM is chosen only if heartbeat
    ``HB 2`` appears. Cached per binary for the life of the process.
    """
    env = os.environ.get("FIXEDRAM_ACCEL", "").strip().lower()
    if env:
        if env not in ("kvm", "tcg"):
            raise VMError(f"FIXEDRAM_ACCEL must be kvm or tcg, not {env!r}")
        return env  # type: ignore[return-value]
    if qemu.path in _accel_cache:
        return _accel_cache[qemu.path]  # type: ignore[return-value]
    accel: Literal["kvm", "tcg"] = "tcg"
    if Path("/sys/module/kvm_pvm").exists():
        pass  # kvm-pvm: /dev/kvm works only for PVM-aware guests; ours crashes there
    elif os.access("/dev/kvm", os.R_OK | os.W_OK) and kvm_runs_guest(qemu, probe_seconds):
        accel = "kvm"
    _accel_cache[qemu.path] = accel
    return accel


def kvm_runs_guest(qemu: QemuBinary, seconds: float = 3.0) -> bool:
    """Boot the bare guest under ``-accel kvm`` for up to ``seconds``; True if ``HB 2`` shows.

    This is the probe behind :func:`choose_accel` (it always runs it, ignoring caches and
    ``$FIXEDRAM_ACCEL``). QEMU is stopped before returning.
    """
    from fixedram.testing.guest import build_guest

    kernel = build_guest()
    with tempfile.TemporaryDirectory(prefix="fixedram-probe-") as tmp:
        log = Path(tmp) / "probe.log"
        argv = qemu.argv(
            *("-accel", "kvm", "-M", "q35", "-m", "64M", "-smp", "1"),
            *("-nodefaults", "-no-user-config", "-display", "none"),
            *("-kernel", str(kernel), "-append", "mib=8 hb=100"),
            *("-serial", f"file:{log}"),
        )
        try:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                env=qemu.environ(),
                start_new_session=True,
            )
        except OSError as e:
            raise VMError(f"cannot run {argv[0]}: {e}") from e
        try:
            deadline = time.monotonic() + seconds
            while time.monotonic() < deadline and proc.poll() is None:
                if log.exists() and re.search(rb"^HB 2 ", log.read_bytes(), re.M):
                    return True
                time.sleep(0.05)
            return log.exists() and re.search(rb"^HB 2 ", log.read_bytes(), re.M) is not None
        finally:
            _terminate(proc)


def _terminate(proc: subprocess.Popen[Any], grace: float = 5.0) -> None:
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        proc.wait()


# ---------------------------------------------------------------------------------------------
# Small parsers
# ---------------------------------------------------------------------------------------------


class Heartbeat(NamedTuple):
    """One ``HB <n> gen=<g> cur=<page> err=<e> KiBps=<k>`` line of the guest; the Linux guest
    adds ``data=<digest>`` (its known data's digest as it just computed it)."""

    n: int
    gen: int
    cur: int
    err: int
    kibps: int
    data: str = ""


_HB_RE = re.compile(
    rb"^HB (\d+) gen=(\d+) cur=(\d+) err=(\d+) KiBps=(\d+)(?: data=([0-9a-f]+))?\r?$", re.M)


def parse_heartbeats(text: bytes | str) -> list[Heartbeat]:
    """All complete heartbeat lines in serial output (a line cut off at the end is ignored)."""
    data = text.encode() if isinstance(text, str) else text
    end = data.rfind(b"\n")
    data = data[: end + 1] if end >= 0 else b""
    return [Heartbeat(int(m[1]), int(m[2]), int(m[3]), int(m[4]), int(m[5]),
                      (m[6] or b"").decode()) for m in _HB_RE.finditer(data)]


class RamBlock(NamedTuple):
    """One line of HMP ``info ramblock``; lengths and offset in bytes."""

    name: str
    used_length: int
    max_length: int
    offset: int
    page_size: int


_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_mem_size(text: str) -> int:
    """Parse a size as ``-m`` takes it: ``"128M"``, ``"2G"``, ``"4 KiB"``; a bare number is MiB."""
    s = text.strip().replace(" ", "")
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([KMGTkmgt]?)(?:i?[Bb])?", s)
    if not m:
        raise ValueError(f"bad size {text!r}")
    unit = m[2].lower() or "m"
    return int(float(m[1]) * _UNITS[unit])


def parse_info_ramblock(text: str) -> list[RamBlock]:
    """Parse the output of HMP ``info ramblock`` (QEMU 7.2 and 10 print the same columns)::

    Block Name    PSize              Offset               Used              Total
        pc.ram    4 KiB  0x0000000000000000 0x0000000008000000 0x0000000008000000
    """
    blocks = []
    for line in text.splitlines():
        m = re.match(
            r"\s*(\S+)\s+(\d+(?:\.\d+)?\s*[KMG]iB)\s+0x([0-9a-fA-F]+)\s+0x([0-9a-fA-F]+)"
            r"\s+0x([0-9a-fA-F]+)",
            line,
        )
        if not m:
            continue
        page = re.fullmatch(r"(\d+)\s*([KMG])iB", m[2].strip())
        psize = int(page[1]) * _UNITS[page[2].lower()] if page else 4096
        blocks.append(
            RamBlock(
                name=m[1],
                used_length=int(m[4], 16),
                max_length=int(m[5], 16),
                offset=int(m[3], 16),
                page_size=psize,
            )
        )
    return blocks


# ---------------------------------------------------------------------------------------------
# The private event loop for QMP
# ---------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------
# Guest
# ---------------------------------------------------------------------------------------------

_live_guests: weakref.WeakSet[Guest] = weakref.WeakSet()


@atexit.register
def _kill_leftovers() -> None:
    for g in list(_live_guests):
        with contextlib.suppress(Exception):
            g.kill()


MigrationMode = Literal["legacy", "mapped-ram"]


class Guest:
    """A QEMU process running the bare test guest (or another ``-kernel``), driven over QMP.

    The command line is the one from ``docs/test-guest.md``::

        <qemu> -M <machine> -accel <accel> -m <mem> -smp <smp> [-nodefaults] -no-user-config
               -display none -kernel <kernel> -append <append> [-initrd <initrd>]
               -serial file:<workdir>/<name>.log -qmp unix:<workdir>/<name>.qmp,server=on,wait=off
               [-incoming defer -S] [-S] <extra_args>

    Use :meth:`like` to start a destination with exactly the same VM arguments. The guest is
    started by :meth:`start` (or on entering the ``with`` block) and shut down by :meth:`quit`
    or :meth:`close` (QMP ``quit``, SIGKILL if that does not work). QEMU runs with ``workdir``
    as its working directory; its stderr goes to ``<workdir>/<name>.err``.

    ``kernel`` defaults to the bare guest from :func:`fixedram.testing.guest.build_guest`; ``accel``
    defaults to :func:`choose_accel`. ``defaults=True`` leaves out ``-nodefaults``: QEMU then
    adds its default devices (a NIC with user networking, VGA, ...); ``initrd`` is passed as
    ``-initrd`` (the Linux guest of :mod:`fixedram.testing.guest.linux`). Devices and memory
    backends go in ``extra_args``, which :meth:`like` copies; ``{guest}`` in them becomes the
    guest's name, so that each QEMU gets its own file (``mem-path=/x/{guest}.ram``).
    ``control=True`` adds a second QMP monitor at :attr:`control_path` for ``fixedram`` to
    use while the harness keeps its own.
    """

    def __init__(
        self,
        qemu: QemuBinary,
        workdir: str | os.PathLike[str],
        *,
        name: str = "src",
        append: str = "mib=32 rate=0 hb=100",
        mem: str = "128M",
        machine: str = "q35",
        accel: str | None = None,
        kernel: str | os.PathLike[str] | None = None,
        incoming: bool = False,
        paused: bool = False,
        extra_args: Sequence[str] = (),
        qmp_timeout: float = 60.0,
        smp: int = 1,
        defaults: bool = False,
        initrd: str | os.PathLike[str] | None = None,
        control: bool = False,
    ) -> None:
        self.qemu = qemu
        self.workdir = Path(workdir).resolve()
        self.name = name
        self.append = append
        self.mem = mem
        self.machine = machine
        self.accel = accel
        self.kernel = Path(kernel).resolve() if kernel is not None else None
        self.incoming = incoming
        self.paused = paused
        self.extra_args = tuple(extra_args)
        self.qmp_timeout = qmp_timeout
        self.smp = smp
        self.defaults = defaults
        self.initrd = Path(initrd).resolve() if initrd is not None else None
        self.control = control
        self.control_path: Path | None = None
        self.log_path = self.workdir / f"{name}.log"
        self.err_path = self.workdir / f"{name}.err"
        self.qmp_path = self.workdir / f"{name}.qmp"
        self._sockdir: str | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._qmp: QMP | None = None
        self._errfile: Any = None
        self.argv: list[str] = []

    # -- construction ------------------------------------------------------------------------

    @classmethod
    def like(
        cls,
        other: Guest,
        *,
        name: str = "dst",
        workdir: str | os.PathLike[str] | None = None,
        incoming: bool = True,
        paused: bool = False,
        qemu: QemuBinary | None = None,
    ) -> Guest:
        """A new (not started) guest with ``other``'s VM arguments: a migration destination.

        ``qemu`` may name a different binary (e.g. a QEMU 10 destination for a 7.2 source; then
        pass a versioned machine type on both sides). The accelerator actually used by
        ``other`` is reused, so both sides match.
        """
        return cls(
            qemu or other.qemu,
            workdir if workdir is not None else other.workdir,
            name=name,
            append=other.append,
            mem=other.mem,
            machine=other.machine,
            accel=other.accel,
            kernel=other.kernel,
            incoming=incoming,
            paused=paused,
            extra_args=other.extra_args,
            qmp_timeout=other.qmp_timeout,
            smp=other.smp,
            defaults=other.defaults,
            initrd=other.initrd,
            control=other.control,
        )

    def vm_args(self) -> list[str]:
        """The arguments that define the VM, identical for source and destination."""
        from fixedram.testing.guest import build_guest

        if self.kernel is None:
            self.kernel = build_guest()
        if self.accel is None:
            self.accel = choose_accel(self.qemu)
        return [
            *("-M", self.machine, "-accel", self.accel, "-m", self.mem, "-smp", str(self.smp)),
            *(() if self.defaults else ("-nodefaults",)),
            *("-no-user-config", "-display", "none"),
            *("-kernel", str(self.kernel), "-append", self.append),
            *(("-initrd", str(self.initrd)) if self.initrd is not None else ()),
        ]

    @property
    def mem_bytes(self) -> int:
        """RAM size given with ``-m``, in bytes."""
        return parse_mem_size(self.mem)

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self, timeout: float = 30.0) -> Guest:
        """Spawn QEMU and connect QMP. Raises :class:`VMError` if QEMU exits or QMP fails."""
        if self._proc is not None:
            raise VMError(f"guest {self.name} already started")
        self.workdir.mkdir(parents=True, exist_ok=True)
        qmp_path = self.qmp_path
        if len(str(qmp_path)) > 100:  # sun_path is 108 bytes
            self._sockdir = tempfile.mkdtemp(prefix="fr-", dir="/tmp")
            qmp_path = Path(self._sockdir) / f"{self.name}.qmp"
        self._qmp_sock = qmp_path
        for p in (qmp_path, self.log_path):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
        args = [
            *self.vm_args(),
            *("-serial", f"file:{self.log_path}"),
            *("-qmp", f"unix:{qmp_path},server=on,wait=off"),
        ]
        if self.incoming:
            args += ["-incoming", "defer", "-S"]
        elif self.paused:
            args += ["-S"]
        if self.control:
            if self._sockdir is None:
                self._sockdir = tempfile.mkdtemp(prefix="fr-", dir="/tmp")
            self.control_path = Path(self._sockdir) / f"{self.name}-ctl.qmp"
            args += ["-qmp", f"unix:{self.control_path},server=on,wait=off"]
        args += [a.replace("{guest}", self.name) for a in self.extra_args]
        self.argv = self.qemu.argv(*args)
        self._errfile = open(self.err_path, "wb")  # noqa: SIM115 - closed in close()
        try:
            self._proc = subprocess.Popen(
                self.argv,
                cwd=self.workdir,
                stdin=subprocess.DEVNULL,
                stdout=self._errfile,
                stderr=self._errfile,
                env=self.qemu.environ(),
                start_new_session=True,
            )
        except OSError as e:
            self._errfile.close()
            raise VMError(f"cannot run {self.argv[0]}: {e}") from e
        _live_guests.add(self)
        try:
            self._connect(qmp_path, timeout)
        except BaseException:
            self.kill()
            raise
        return self

    def _connect(self, sock: Path, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            if self._proc is not None and self._proc.poll() is not None:
                raise VMError(
                    f"QEMU ({self.name}) exited with status {self._proc.returncode} at start: "
                    f"{self.last_error or '(no message)'}\ncommand: {shlex.join(self.argv)}"
                )
            if sock.exists():
                try:
                    self._qmp = QMP.connect(sock, timeout=self.qmp_timeout)
                    return
                except VMError as e:
                    last = e
            time.sleep(0.02)
        raise VMError(
            f"QMP of QEMU ({self.name}) not reachable at {sock} after {timeout:.0f} s: "
            f"{last or 'socket never appeared'}; {self.last_error}"
        )

    def __enter__(self) -> Guest:
        if self._proc is None:
            self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def pid(self) -> int | None:
        """QEMU's process id (``None`` before :meth:`start`)."""
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        """True while the QEMU process exists."""
        return self._proc is not None and self._proc.poll() is None

    @property
    def returncode(self) -> int | None:
        """QEMU's exit status once it has exited."""
        return self._proc.poll() if self._proc is not None else None

    def quit(self, timeout: float = 15.0) -> None:
        """Shut QEMU down with QMP ``quit`` and wait; SIGKILL it if that fails."""
        if self._proc is None:
            return
        if self._proc.poll() is None and self._qmp is not None:
            with contextlib.suppress(Exception):
                self._qmp_call("quit", {}, timeout=5.0)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._proc.wait(timeout)
        self.kill()

    def kill(self) -> None:
        """SIGKILL QEMU if it still runs, and release QMP and files. Safe to call twice."""
        if self._qmp is not None:
            qmp, self._qmp = self._qmp, None
            with contextlib.suppress(Exception):
                qmp.close()
        if self._proc is not None and self._proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self._proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._proc.wait(10)
        if self._errfile is not None:
            self._errfile.close()
            self._errfile = None
        if self._sockdir is not None:
            shutil.rmtree(self._sockdir, ignore_errors=True)
            self._sockdir = None
        _live_guests.discard(self)

    close = quit

    # -- messages ----------------------------------------------------------------------------

    @property
    def last_error(self) -> str:
        """The last lines QEMU printed on stdout/stderr (its error messages), stripped."""
        return _tail(self.err_path, 8)

    def serial_tail(self, lines: int = 10) -> str:
        """The last ``lines`` lines of the guest's serial output."""
        return _tail(self.log_path, lines)

    def serial(self) -> bytes:
        """All serial output so far."""
        try:
            return self.log_path.read_bytes()
        except FileNotFoundError:
            return b""

    def _died(self, what: str) -> VMError:
        if self._proc is not None:
            # QEMU prints its error and then exits: give it a moment, so the message is read.
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._proc.wait(2.0)
        rc = self._proc.poll() if self._proc is not None else None
        state = f"QEMU ({self.name}) exited with status {rc}" if rc is not None else ""
        msg = f"{what}: {state}".rstrip(": ")
        if self.last_error:
            msg += f"\nQEMU said: {self.last_error}"
        return VMError(msg)

    # -- QMP ---------------------------------------------------------------------------------

    def _qmp_call(self, name: str, args: dict[str, Any], timeout: float | None = None) -> Any:
        if self._qmp is None:
            raise VMError(f"guest {self.name} is not started (QMP {name})")
        try:
            return self._qmp.cmd(name, args, timeout=timeout or self.qmp_timeout)
        except QMPCommandError as e:
            raise QMPCommandError(f"{e} (guest {self.name})") from e
        except VMError as e:
            raise self._died(f"QMP {name} on {self.name} failed") from e

    def cmd(self, name: str, args: Mapping[str, Any] | None = None, /, **kwargs: Any) -> Any:
        """Run QMP command ``name`` and return its ``return`` value.

        Arguments come from the ``args`` dict (exact QMP names) and/or keywords, where ``_``
        becomes ``-`` (``cmd("migrate-set-parameters", max_bandwidth=1)``).
        Raises :class:`VMError` on a QMP error or if QEMU is gone.
        """
        a = dict(args or {})
        a.update({k.replace("_", "-"): v for k, v in kwargs.items()})
        return self._qmp_call(name, a)

    def send_fd(self, fd: int, name: str) -> None:
        """Hand ``fd`` to QEMU (SCM_RIGHTS + ``getfd``) under ``name``, for ``fd:NAME`` URIs."""
        if self._qmp is None:
            raise VMError(f"guest {self.name} is not started (getfd)")
        self._qmp.send_fd(fd, name)

    def hmp(self, cmdline: str) -> str:
        """Run a human-monitor command and return its output."""
        return str(self.cmd("human-monitor-command", {"command-line": cmdline}))

    def status(self) -> str:
        """The run state: ``running``, ``paused``, ``inmigrate``, ``postmigrate``, ..."""
        return str(self.cmd("query-status")["status"])

    def stop(self) -> None:
        """Pause the vCPUs."""
        self.cmd("stop")

    def cont(self) -> None:
        """Resume the vCPUs."""
        self.cmd("cont")

    def wait_status(self, *wanted: str, timeout: float = 60.0, interval: float = 0.02) -> str:
        """Poll ``query-status`` until it is one of ``wanted``; return it.

        Raises :class:`VMError` on timeout or if QEMU exits meanwhile.
        """
        deadline = time.monotonic() + timeout
        st = ""
        while True:
            if not self.running:
                raise self._died(f"waiting for status {'/'.join(wanted)} (last {st or '?'})")
            try:
                st = self.status()
            except VMError:
                if not self.running:
                    raise self._died(
                        f"waiting for status {'/'.join(wanted)} (last {st or '?'})"
                    ) from None
                raise
            if st in wanted:
                return st
            if time.monotonic() > deadline:
                raise VMError(
                    f"{self.name}: status still {st!r} after {timeout:.0f} s, wanted "
                    f"{'/'.join(wanted)}"
                )
            time.sleep(interval)

    # -- serial heartbeats -------------------------------------------------------------------

    def heartbeats(self) -> list[Heartbeat]:
        """All complete heartbeat lines the guest printed so far."""
        return parse_heartbeats(self.serial())

    def bad_lines(self) -> list[str]:
        """The guest's ``BAD page=...`` lines so far."""
        return [
            ln
            for ln in self.serial().decode(errors="replace").splitlines()
            if ln.startswith("BAD ")
        ]

    def wait_heartbeat(
        self,
        *,
        gen_at_least: int | None = None,
        n_at_least: int | None = None,
        after: int | None = None,
        timeout: float = 60.0,
    ) -> Heartbeat:
        """Wait for a heartbeat that satisfies every given condition and return it.

        ``gen_at_least``: its generation; ``n_at_least``: its number; ``after``: its number is
        above this. Without conditions, any heartbeat. Raises :class:`VMError` on timeout (with
        the serial tail) or if QEMU exits.
        """
        deadline = time.monotonic() + timeout
        while True:
            for hb in self.heartbeats():
                if (
                    (gen_at_least is None or hb.gen >= gen_at_least)
                    and (n_at_least is None or hb.n >= n_at_least)
                    and (after is None or hb.n > after)
                ):
                    return hb
            if not self.running:
                raise self._died(f"waiting for a heartbeat; serial: {self.serial_tail(3)!r}")
            if time.monotonic() > deadline:
                raise VMError(
                    f"{self.name}: no heartbeat with gen>={gen_at_least} n>={n_at_least} "
                    f"after={after} within {timeout:.0f} s; serial tail: {self.serial_tail(3)!r}"
                )
            time.sleep(0.02)

    # -- memory ------------------------------------------------------------------------------

    def pmemsave(
        self, path: str | os.PathLike[str], addr: int = 0, size: int | None = None
    ) -> Path:
        """Dump guest-physical memory ``[addr, addr+size)`` to ``path`` (default: all of
        ``-m`` from physical 0, which is all of ``pc.ram`` while RAM fits below the PCI hole:
        up to 2 GiB on q35, 3 GiB on pc). Returns the absolute path."""
        p = Path(path).resolve()
        n = self.mem_bytes - addr if size is None else size
        self.cmd("pmemsave", val=addr, size=n, filename=str(p))
        return p

    def ram_ranges(self) -> list[tuple[int, int]]:
        """Guest-physical ``(address, size)`` ranges of all of ``-m``'s RAM, less the legacy
        VGA/ROM window at 0xa0000-0xfffff (device memory whose reads have side effects).

        RAM above the PCI hole (q35: ``-m`` of 2.75 GiB or more keeps 2 GiB below 4 GiB; pc:
        3.5 GiB or more keeps 3 GiB) is mapped from 4 GiB up.
        """
        mem = self.mem_bytes
        q35 = "q35" in self.machine
        if q35:
            low = 0x80000000 if mem >= 0xB0000000 else mem
        else:
            low = 0xC0000000 if mem >= 0xE0000000 else mem
        out = [(0, min(low, 0xA0000))]
        if low > 0x100000:
            out.append((0x100000, low - 0x100000))
        if mem > low:
            out.append((1 << 32, mem - low))
        return out

    def ram_digests(self, scratch: str | os.PathLike[str],
                    chunk: int = 256 << 20) -> dict[int, str]:
        """xxh3-128 digest of every ``chunk`` of :meth:`ram_ranges`, keyed by address.

        Each chunk is dumped with ``pmemsave`` into a file in ``scratch`` (best on tmpfs),
        hashed and deleted, so a guest of many GiB needs ``chunk`` bytes of scratch space.
        Compare two guests' digests to compare their RAM.
        """
        import xxhash

        out: dict[int, str] = {}
        tmp = Path(scratch).resolve() / f"{self.name}-{os.getpid()}.chunk"
        try:
            for addr, size in self.ram_ranges():
                for a in range(addr, addr + size, chunk):
                    n = min(chunk, addr + size - a)
                    self.pmemsave(tmp, a, n)
                    h = xxhash.xxh3_128()
                    with open(tmp, "rb") as f:
                        while blk := f.read(16 << 20):
                            h.update(blk)
                    out[a] = h.hexdigest()
        finally:
            tmp.unlink(missing_ok=True)
        return out

    def ramblocks(self) -> list[RamBlock]:
        """The RAM blocks from HMP ``info ramblock``."""
        text = self.hmp("info ramblock")
        blocks = parse_info_ramblock(text)
        if not blocks:
            raise VMError(f"cannot parse 'info ramblock' output: {text!r}")
        return blocks

    # -- migration ---------------------------------------------------------------------------

    def set_migration(
        self,
        caps: Mapping[str, bool] | None = None,
        params: Mapping[str, Any] | None = None,
    ) -> None:
        """Set migration capabilities and parameters (exact QMP names)."""
        if caps:
            self.cmd(
                "migrate-set-capabilities",
                capabilities=[{"capability": k, "state": bool(v)} for k, v in caps.items()],
            )
        if params:
            self.cmd("migrate-set-parameters", dict(params))

    def migrate(
        self,
        uri: str,
        *,
        caps: Mapping[str, bool] | None = None,
        params: Mapping[str, Any] | None = None,
        max_bandwidth: int | None = DEFAULT_MAX_BANDWIDTH,
    ) -> None:
        """Start an outgoing migration to ``uri`` (``file:/abs[,offset=N]``, ``exec:cmd``, ...).

        ``caps`` and ``params`` are applied first; ``max-bandwidth`` is raised to 1 TiB/s
        unless ``max_bandwidth`` is ``None`` or ``params`` sets it. Returns at once; see
        :meth:`wait_migration`.
        """
        p = dict(params or {})
        if max_bandwidth is not None:
            p.setdefault("max-bandwidth", max_bandwidth)
        self.set_migration(caps, p)
        self.cmd("migrate", uri=uri)

    def query_migrate(self) -> dict[str, Any]:
        """``query-migrate``."""
        return dict(self.cmd("query-migrate"))

    def wait_migration(
        self,
        timeout: float = 120.0,
        *,
        stop_after: float | None = None,
        interval: float = 0.02,
    ) -> dict[str, Any]:
        """Poll ``query-migrate`` until the outgoing migration is ``completed``; return it.

        ``stop_after``: if still running after that many seconds, pause the VM (QMP ``stop``)
        so that a live migration that does not converge completes. Raises :class:`VMError` if
        it fails, is cancelled, QEMU exits, or ``timeout`` passes.
        """
        t0 = time.monotonic()
        stopped = False
        while True:
            info = self.query_migrate()
            st = info.get("status")
            if st == "completed":
                return info
            if st in ("failed", "cancelled"):
                raise VMError(
                    f"migration from {self.name} {st}: {info.get('error-desc', '')}".rstrip(": ")
                )
            el = time.monotonic() - t0
            if stop_after is not None and not stopped and el > stop_after:
                self.stop()
                stopped = True
            if el > timeout:
                raise VMError(f"migration from {self.name} still {st!r} after {timeout:.0f} s")
            time.sleep(interval)

    def migrate_incoming(
        self,
        uri: str,
        *,
        caps: Mapping[str, bool] | None = None,
        params: Mapping[str, Any] | None = None,
    ) -> None:
        """Set ``caps``/``params`` and start ``migrate-incoming`` (needs ``incoming=True``)."""
        if not self.incoming:
            raise VMError(f"{self.name} was not started with incoming=True (-incoming defer)")
        self.set_migration(caps, params)
        self.cmd("migrate-incoming", uri=uri)

    def wait_incoming(self, timeout: float = 120.0) -> dict[str, Any]:
        """Wait until an incoming migration has loaded (run state leaves ``inmigrate``).

        Returns ``query-migrate``. Raises :class:`VMError` with QEMU's message if the load fails
        (the destination QEMU usually exits then).
        """
        deadline = time.monotonic() + timeout
        while True:
            if not self.running:
                raise self._died(f"incoming migration into {self.name} failed")
            try:
                st = self.status()
                info = self.query_migrate()
            except VMError:
                if not self.running:
                    raise self._died(f"incoming migration into {self.name} failed") from None
                raise
            mst = info.get("status")
            if mst == "failed":
                raise VMError(
                    f"incoming migration into {self.name} failed: "
                    f"{info.get('error-desc', '')} {self.last_error}".strip()
                )
            if st != "inmigrate" and mst in (None, "completed"):
                return info
            if time.monotonic() > deadline:
                raise VMError(
                    f"incoming migration into {self.name}: still {st}/{mst} after {timeout:.0f} s"
                )
            time.sleep(0.02)

    def __repr__(self) -> str:
        return f"<Guest {self.name} pid={self.pid} qemu={self.qemu.version_str} {self.machine}>"


def _tail(path: Path, lines: int) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 8192))
            data = f.read()
    except FileNotFoundError:
        return ""
    return "\n".join(data.decode(errors="replace").strip().splitlines()[-lines:])


# ---------------------------------------------------------------------------------------------
# QEMU's own save / restore
# ---------------------------------------------------------------------------------------------

Transport = Literal["file", "exec"]


def _migration_setup(mode: str, multifd_channels: int) -> tuple[dict[str, bool], dict[str, Any]]:
    if mode not in ("legacy", "mapped-ram"):
        raise VMError(f"unknown save mode {mode!r} (legacy or mapped-ram)")
    caps: dict[str, bool] = {}
    params: dict[str, Any] = {}
    if mode == "mapped-ram":
        caps["mapped-ram"] = True
    if multifd_channels:
        caps["multifd"] = True
        params["multifd-channels"] = multifd_channels
    return caps, params


def _pick_transport(qemu: QemuBinary, transport: Transport | None) -> Transport:
    """``file:`` exists since QEMU 8.2; older QEMUs save through ``exec:cat``."""
    if transport is None:
        return "file" if qemu.version >= (8, 2, 0) else "exec"
    if transport == "file" and qemu.version < (8, 2, 0):
        raise VMError(f"QEMU {qemu.version_str} has no file: migration (8.2+); use exec")
    return transport


def _uri(path: Path, transport: Transport, offset: int, incoming: bool) -> str:
    if transport == "file":
        return f"file:{path}" + (f",offset={offset}" if offset else "")
    if transport == "exec":
        if offset:
            raise VMError("offset needs the file: transport")
        q = shlex.quote(str(path))
        return f"exec:cat {q}" if incoming else f"exec:cat > {q}"
    raise VMError(f"unknown transport {transport!r}")


def qemu_save(
    guest: Guest,
    path: str | os.PathLike[str],
    mode: MigrationMode = "legacy",
    multifd_channels: int = 0,
    offset: int = 0,
    live: bool = True,
    *,
    transport: Transport | None = None,
    stop_after: float | None = 20.0,
    timeout: float = 180.0,
) -> dict[str, Any]:
    """Save ``guest`` with QEMU's own migration into ``path`` and return ``query-migrate``.

    ``mode`` ``"mapped-ram"`` turns on the mapped-ram capability (``file:`` only);
    ``multifd_channels`` > 0 also turns on multifd with that many channels. ``offset`` writes
    the stream at that byte of the file (``file:PATH,offset=N``; QEMU keeps the bytes before
    it). ``transport="exec"`` saves through ``exec:cat > PATH``; the default is ``file`` on
    QEMU 8.2+ and ``exec`` before (QEMU 7.2 has no ``file:``). With ``live=False`` the VM is
    paused first; a live save that has not converged after ``stop_after`` seconds is finished
    by pausing the VM. Afterwards the source is in ``postmigrate`` (paused).
    """
    p = Path(path).resolve()
    caps, params = _migration_setup(mode, multifd_channels)
    transport = _pick_transport(guest.qemu, transport)
    if mode == "mapped-ram" and transport != "file":
        raise VMError("mapped-ram needs the file: transport")
    if not live:
        guest.stop()
    guest.migrate(_uri(p, transport, offset, incoming=False), caps=caps, params=params)
    return guest.wait_migration(timeout, stop_after=stop_after if live else None)


def qemu_restore(
    like: Guest,
    path: str | os.PathLike[str],
    mode: MigrationMode = "legacy",
    multifd_channels: int = 0,
    offset: int = 0,
    *,
    transport: Transport | None = None,
    name: str = "dst",
    workdir: str | os.PathLike[str] | None = None,
    qemu: QemuBinary | None = None,
    timeout: float = 120.0,
) -> Guest:
    """Start a destination with ``like``'s VM arguments and load ``path`` into it.

    The destination starts with ``-incoming defer -S``, gets the capabilities that ``mode``
    and ``multifd_channels`` call for, and loads with ``migrate-incoming``. It is returned
    started and **paused** (run state ``paused``); ``transport`` defaults as in
    :func:`qemu_save`. It is ready for :meth:`Guest.pmemsave` and
    :meth:`Guest.cont`; the caller closes it (it is a context manager). On failure it is killed
    and :class:`VMError` carries QEMU's message.
    """
    p = Path(path).resolve()
    caps, params = _migration_setup(mode, multifd_channels)
    dst = Guest.like(like, name=name, workdir=workdir, incoming=True, qemu=qemu)
    transport = _pick_transport(dst.qemu, transport)
    dst.start()
    try:
        dst.migrate_incoming(_uri(p, transport, offset, incoming=True), caps=caps, params=params)
        dst.wait_incoming(timeout)
        dst.wait_status("paused", "running", timeout=timeout)
    except BaseException:
        dst.kill()
        raise
    return dst
