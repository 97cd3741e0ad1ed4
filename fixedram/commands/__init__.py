"""Sub-commands of the ``fixedram`` command line, one module each, named after its command,
and what they share: the command group :data:`cli`, the one-line error handling of every
command (:func:`one_line_errors`), the ``--direct-io`` options.

Module ``fixedram.commands.<name>`` registers command ``<name>`` on :data:`cli` when
imported; the group imports only the module of the command it runs (its imports are most of
a command's start-up time), so a module imports what its command needs inside the command's
function. :func:`fixedram.cli.main` is the console script's entry point.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from functools import wraps
from typing import Any, Literal, TypeVar

import click

from fixedram.errors import FixedramError, printable

__all__ = ["cli", "one_line_errors", "direct_io_options", "lazy_options", "direct_mode",
           "load_commands"]

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


def lazy_options(flag: str) -> Callable[[F], F]:
    """The options of a lazy (postcopy) restore: ``--push-rate``, ``--prefetch-rate``,
    ``--no-record``, ``--no-prefetch``; ``flag``: the option that makes the restore lazy
    (``--lazy``, ``--postcopy``), named in the help."""

    def deco(fn: F) -> F:
        fn = click.option(
            "--no-prefetch", "no_prefetch", is_flag=True,
            help=f"{flag}: do not push the image's recorded working set first.")(fn)
        fn = click.option(
            "--no-record", "no_record", is_flag=True,
            help=f"{flag}: do not record the pages the guest asked for in the image's "
                 "working-set record.")(fn)
        fn = click.option(
            "--prefetch-rate", type=str, default=None, metavar="RATE",
            help=f"{flag}: throttle the push of the recorded working set to RATE bytes/s "
                 "too (default: full speed; --push-rate throttles the rest).")(fn)
        return click.option(
            "--push-rate", type=str, default=None, metavar="RATE",
            help=f"{flag}: throttle the background push to RATE bytes/s (64M, 1G...); "
                 "requested pages are always served at once, the recorded working set "
                 "first at full speed (see --prefetch-rate).")(fn)

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

        return sorted({*self.commands, *(m.name for m in pkgutil.iter_modules(__path__))})

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
              help="S3 endpoint for s3://BUCKET/KEY images (sets AWS_ENDPOINT_URL and "
                   "AWS_ENDPOINT_URL_S3 for the command and the processes it starts).")
def cli(endpoint: str | None = None) -> None:
    """Save and restore QEMU guest RAM in fixed-offset (mapped-ram) images.

    Wherever an image is named, s3://BUCKET/KEY names one in an object store (endpoint and
    credentials from the usual AWS_* variables and profiles; docs/object-storage.md).
    """
    if endpoint:
        os.environ["AWS_ENDPOINT_URL"] = os.environ["AWS_ENDPOINT_URL_S3"] = endpoint


def load_commands() -> None:
    """Import every command module (``main`` imports only the one it runs)."""
    for name in cli.list_commands(click.Context(cli)):
        cli.get_command(click.Context(cli), name)
