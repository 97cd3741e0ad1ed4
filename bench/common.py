"""Helpers shared by the benchmarks (run as ``python -m bench.NAME`` from the repository)."""

from __future__ import annotations

import compileall
import os
import sys
from pathlib import Path

import fixedram
from fixedram.io.files import drop_cached

__all__ = ["FIXEDRAM", "compile_package", "cpu_seconds", "drop_cache"]


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
