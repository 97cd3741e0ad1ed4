"""The ``fixedram`` command line: the console script's entry point over the command group of
:mod:`fixedram.commands` (thin layers over the library).

Every command reports a failure as one line on stderr (``fixedram: error: ...``)
and exits non-zero (2 for bad input or a failed operation); no traceback reaches
the user for errors fixedram anticipates.
"""

from __future__ import annotations

import os
import sys

from fixedram.commands import cli

__all__ = ["main", "cli"]


def main() -> None:
    """Entry point of the ``fixedram`` console script.

    numpy's OpenBLAS starts a thread per core when numpy is imported, and fixedram does no
    linear algebra: one thread saves the command tens of milliseconds of CPU at start-up
    (set ``OPENBLAS_NUM_THREADS`` to override).
    """
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    try:
        cli(prog_name="fixedram")
    except SystemExit as e:
        _exit_now(e.code)
    _exit_now(0)


def _exit_now(code: object) -> None:
    """End the process once the command is done, without the interpreter's teardown.

    Freeing numpy, asyncio and the other modules one by one costs tens of milliseconds of
    CPU after the work is done and the report printed (a native save or restore is timed to
    the process's end). Exit handlers still run, threads still running are waited for,
    output is flushed; the kernel closes the files.
    """
    import atexit
    import threading

    if code is not None and not isinstance(code, int):
        print(code, file=sys.stderr)
        code = 1
    me = threading.current_thread()
    for t in threading.enumerate():
        if t is not me and not t.daemon:
            t.join()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            code = code or 1  # stdout closed early (a pipe): as Python itself reports it
    os._exit(code or 0)
