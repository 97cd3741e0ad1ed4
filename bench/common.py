"""Helpers shared by the benchmarks (run as ``python -m bench.NAME`` from the repository)."""

from __future__ import annotations

import argparse
import compileall
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import fixedram
from fixedram.io.files import drop_cached

__all__ = ["FIXEDRAM", "ResidentServer", "add_memory_args", "command_env", "compile_package",
           "cpu_seconds", "describe_memory", "drop_cache", "memory_of", "served_cpu_seconds",
           "start_server", "steady_memory"]


def _command() -> list[str]:
    script = Path(sys.executable).parent / "fixedram"
    return [str(script)] if os.access(script, os.X_OK) else [sys.executable, "-m", "fixedram"]


#: How the benchmarks run fixedram: the ``fixedram`` console script of the interpreter's
#: environment, as a user types it (``python -m fixedram`` goes through runpy, which imports
#: another ~8 ms of modules at every start), or ``python -m fixedram`` where there is none.
FIXEDRAM = _command()


def compile_package() -> None:
    """Byte-compile fixedram where it is imported from, as an installed package is: without
    it (an editable install under PYTHONDONTWRITEBYTECODE) every fixedram process measured
    would compile its modules at start-up, a cost no installed fixedram pays."""
    compileall.compile_dir(str(Path(fixedram.__file__).parent), quiet=1)


def start_server(path: Path) -> subprocess.Popen[str]:
    """``fixedram serve --socket PATH`` (the resident server, docs/resident-server.md), once
    it listens."""
    p = subprocess.Popen([*FIXEDRAM, "serve", "--socket", str(path)], stderr=subprocess.PIPE,
                         text=True)
    assert p.stderr is not None
    line = p.stderr.readline()
    if not line.startswith("fixedram: serving on"):
        p.kill()
        raise RuntimeError(f"fixedram serve failed: {line}{p.stderr.read()}")
    return p


class ResidentServer:
    """A resident server on a private socket, for the benchmarks' rows "through the server"
    (a command's environment for it: :func:`command_env`).

    :meth:`cpu` gives the CPU seconds of the server and of every command it has run and
    reaped: the server reaps a command's child before it answers the client, so the
    difference around one command, plus the client's own, is that command's CPU.
    """

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="frsrv-", dir="/tmp"))
        self.socket = self.dir / "sock"
        try:
            self.proc = start_server(self.socket)
        except BaseException:
            shutil.rmtree(self.dir, ignore_errors=True)
            raise

    def cpu(self) -> float:
        return served_cpu_seconds(self.proc.pid)

    def close(self) -> None:
        try:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)


def command_env(base: Mapping[str, str], server: ResidentServer | None) -> dict[str, str]:
    """``base`` for a fixedram command sent to ``server``, or run as a fresh process."""
    env = {k: v for k, v in base.items() if k != "FIXEDRAM_SERVER"}
    if server is not None:
        env["FIXEDRAM_SERVER"] = str(server.socket)
    return env


def drop_cache(path: Path) -> None:
    """Make the next read of ``path`` cold where the kernel lets us: its clean pages leave
    the page cache (no privilege needed; a no-op on tmpfs), dirty ones are written first."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        drop_cached(fd)
    finally:
        os.close(fd)


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    tck = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / tck


def served_cpu_seconds(pid: int) -> float:
    """utime + stime + cutime + cstime of a process: its own CPU seconds and those of the
    children it has waited for (a resident server and the commands it has run, once each
    has exited and been reaped)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return sum(int(f) for f in fields[11:15]) / os.sysconf("SC_CLK_TCK")


#: The smallest block order the kernel's free page reporting hands back to the host.
REPORTING_ORDER = Path("/sys/module/page_reporting/parameters/page_reporting_order")


def add_memory_args(ap: argparse.ArgumentParser, warm_gib: float) -> None:
    """The options of :func:`steady_memory` on a benchmark's command line."""
    ap.add_argument("--keep-page-reporting", action="store_true",
                    help="leave the kernel's free page reporting on (bench.common.steady_memory)")
    ap.add_argument("--warm-gib", type=float, default=warm_gib,
                    help=f"GiB of free memory touched once before the run (default {warm_gib:g})")


def memory_of(args: argparse.Namespace) -> contextlib.AbstractContextManager[dict[str, Any]]:
    """:func:`steady_memory` as the options of :func:`add_memory_args` ask."""
    return steady_memory(int(args.warm_gib * (1 << 30)), hold=not args.keep_page_reporting)


def describe_memory(info: dict[str, Any] | None) -> str:
    """What :func:`steady_memory` did, as the results' headers say it (None: results from
    before benchmarks recorded it)."""
    if info is None:
        return "free page reporting not recorded"
    text = f"free page reporting {info['page_reporting']}"
    if "warmed_gib" in info:
        text += f", {info['warmed_gib']} GiB touched first"
    return text


def _hold_signals() -> dict[int, Any]:
    """SIGTERM and SIGHUP raise SystemExit, so that ``finally`` blocks run (the knob is put
    back) when a benchmark is stopped that way; returns the old handlers."""
    def stop(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    return {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGHUP)}


@contextlib.contextmanager
def steady_memory(warm_bytes: int, hold: bool = True) -> Iterator[dict[str, Any]]:
    """Hold off free page reporting while a benchmark runs, with ``warm_bytes`` of free memory
    touched once first; yields what was done, for the results.

    A guest kernel with free page reporting (virtio-balloon) hands freed memory back to its
    host within seconds, and the next first touch of each such page costs a host page
    fault. On the 2-core development VM that made touching 2 GiB of fresh memory take
    11.7-15.4 s against 0.16-0.21 s once reporting was held off and the memory touched, and
    one QEMU load of a 1.5 GiB image take 18.7 s against 0.27 s for the next: which save or
    restore pays it (QEMU's guest RAM, a tmpfs image) is an accident of timing, the same for
    QEMU alone as for fixedram, and it swamped the ratios. Where the kernel has the knob and
    it is writable (root), no block is reported while the benchmark runs (the smallest
    order reported is set above the largest the buddy allocator has), ``warm_bytes`` (at
    most the available memory less 1.5 GiB, in 256 MiB pieces) is touched and freed in a
    child process so that the host backs it again, and the old order is put back at the end
    (also when the benchmark is stopped by SIGINT, SIGTERM or SIGHUP). A knob already set
    above the largest order (another benchmark holding it) is left as it is.
    ``hold=False`` leaves reporting alone.
    """
    info: dict[str, Any] = {"page_reporting": "left on" if not hold else "no such knob"}
    if not hold or not REPORTING_ORDER.exists():
        yield info
        return
    orders = len(Path("/proc/buddyinfo").read_text().splitlines()[0].split()) - 4
    try:
        old = REPORTING_ORDER.read_text().strip()
    except OSError as e:
        info["page_reporting"] = f"left on ({e.strerror})"
        yield info
        return
    restore = int(old) < orders
    handlers = _hold_signals()
    try:
        if restore:
            try:
                REPORTING_ORDER.write_text(f"{orders}\n")
            except OSError as e:
                restore = False
                info["page_reporting"] = f"left on ({e.strerror})"
        now = REPORTING_ORDER.read_text().strip()
        if int(now) >= orders:
            info["page_reporting"] = f"held off (order {old} -> {now})"
            avail = next(int(line.split()[1]) << 10 for line in
                         Path("/proc/meminfo").read_text().splitlines()
                         if line.startswith("MemAvailable:"))
            pieces = max(0, min(warm_bytes, avail - (3 << 29))) >> 28
            t = time.monotonic()
            # in a child: the benchmark's own peak RSS stays small, and with it that of the
            # commands it starts (a child's peak RSS starts from its parent's at fork)
            subprocess.run([sys.executable, "-c",
                            f"from bench.common import _touch; _touch({pieces})"],
                           cwd=Path(__file__).resolve().parent.parent, check=True)
            info.update(warmed_gib=pieces / 4, warm_seconds=round(time.monotonic() - t, 1))
        elif restore:
            info["page_reporting"] = f"left on (order {now} kept by the kernel)"
        elif not info["page_reporting"].startswith("left on"):
            info["page_reporting"] = f"left on (order {now})"
        yield info
    finally:
        # no second signal between here and the old handlers: the knob goes back first
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, list(handlers))
        try:
            if restore:
                REPORTING_ORDER.write_text(f"{old}\n")
        finally:
            for sig, handler in handlers.items():
                signal.signal(sig, handler)
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)


def _touch(pieces: int) -> None:
    """Write one byte of every page of ``pieces`` x 256 MiB of fresh memory, then free it."""
    piece = 256 << 20
    held = []
    for _ in range(pieces):
        b = bytearray(piece)  # calloc: untouched zero pages until written
        b[::4096] = b"\x01" * (piece // 4096)
        held.append(b)
    del held
