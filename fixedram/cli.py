"""The ``fixedram`` command line: the console script's entry point over the command group of
:mod:`fixedram.commands` (thin layers over the library).

Every command reports a failure as one line on stderr (``fixedram: error: ...``)
and exits non-zero (2 for bad input or a failed operation); no traceback reaches
the user for errors fixedram anticipates.
"""

from __future__ import annotations

import os
import sys

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing and click stay out of a command sent to a server
    from typing import Any

    from fixedram.commands import cli

__all__ = ["main", "cli"]


def __getattr__(name: str) -> Any:
    """``cli``, the command group, imported on first use: :func:`main` sends a command to a
    resident server (``FIXEDRAM_SERVER``) without importing click or any command."""
    if name == "cli":
        from fixedram.commands import cli

        return cli
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def main() -> None:
    """Entry point of the ``fixedram`` console script.

    With ``FIXEDRAM_SERVER`` set, the command runs in the resident server at that socket
    (:mod:`fixedram.resident`, docs/resident-server.md), except ``fixedram serve`` itself.

    numpy's OpenBLAS starts a thread per core when numpy is imported, and fixedram does no
    linear algebra: one thread saves the command tens of milliseconds of CPU at start-up
    (set ``OPENBLAS_NUM_THREADS`` to override).
    """
    server = os.environ.get("FIXEDRAM_SERVER")
    if server and sys.argv[1:2] != ["serve"]:
        from fixedram.resident import run_remote

        run_remote(server)
    from fixedram.commands import cli

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
        if stream is None:  # started with that descriptor closed
            continue
        try:
            stream.flush()
        except (OSError, ValueError):
            code = code or 1  # stdout closed early (a pipe): as Python itself reports it
    os._exit(code or 0)
