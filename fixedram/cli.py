"""The ``fixedram`` command line: thin layers over the library.

Every command reports a failure as one line on stderr (``fixedram: error: ...``)
and exits non-zero (2 for bad input or a failed operation); no traceback reaches
the user for errors fixedram anticipates.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from functools import wraps
from typing import Any, Literal, TypeVar

import click

from fixedram.errors import FixedramError, printable

__all__ = ["main", "cli", "one_line_errors", "direct_io_options", "direct_mode", "printable"]

F = TypeVar("F", bound=Callable[..., Any])


def one_line_errors(fn: F) -> F:
    """Turn anticipated failures into one line on stderr and exit status 2."""

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except FixedramError as e:
            _fail(str(e))
        except OSError as e:
            where = f": {e.filename}" if e.filename else ""
            _fail(f"{e.strerror or e}{where}")
        except KeyboardInterrupt:
            _fail("interrupted", status=130)

    return wrapper  # type: ignore[return-value]


def direct_io_options(what: str) -> Callable[[F], F]:
    """``--direct-io`` and ``--require-direct-io`` flags; ``what``: "Read" or "Write"."""

    def deco(fn: F) -> F:
        fn = click.option(
            "--require-direct-io", is_flag=True,
            help="Like --direct-io, but fail where the filesystem does not support O_DIRECT "
                 "(instead of warning and using buffered I/O).")(fn)
        return click.option(
            "--direct-io", is_flag=True,
            help=f"{what} page data with O_DIRECT (aligned buffers), keeping the page cache "
                 "clean.")(fn)

    return deco


def direct_mode(direct_io: bool, require_direct_io: bool) -> bool | Literal["required"]:
    """The ``direct_io`` argument of the library from the two flags."""
    return "required" if require_direct_io else direct_io


def _fail(message: str, status: int = 2) -> None:
    click.echo(f"fixedram: error: {printable(message)}", err=True)
    sys.exit(status)


class _LazyGroup(click.Group):
    """A group whose sub-commands live in ``fixedram.commands.<name>`` and are imported only
    when asked for: ``fixedram restore`` loads the restore command's module and nothing of
    the others (their imports are most of a command's start-up time)."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        import pkgutil

        import fixedram.commands as pkg

        return sorted({*self.commands, *(m.name for m in pkgutil.iter_modules(pkg.__path__))})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in self.commands and cmd_name.isidentifier():
            import importlib

            try:
                importlib.import_module(f"fixedram.commands.{cmd_name}")
            except ModuleNotFoundError as e:
                if e.name != f"fixedram.commands.{cmd_name}":
                    raise
        return self.commands.get(cmd_name)


@click.group(cls=_LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="fixedram")
@click.option("--endpoint", metavar="URL", default=None,
              help="S3 endpoint for s3://BUCKET/KEY images (sets AWS_ENDPOINT_URL for the "
                   "command and the processes it starts).")
def cli(endpoint: str | None = None) -> None:
    """Save and restore QEMU guest RAM in fixed-offset (mapped-ram) images.

    Wherever an image is named, s3://BUCKET/KEY names one in an object store (endpoint and
    credentials from the usual AWS_* variables and profiles; docs/object-storage.md).
    """
    if endpoint:
        os.environ["AWS_ENDPOINT_URL"] = endpoint


def _load_commands() -> None:
    """Import every command module (``main`` imports only the one it runs)."""
    for name in cli.list_commands(click.Context(cli)):
        cli.get_command(click.Context(cli), name)


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
