"""``fixedram receive``: be the destination of a QEMU migration and save a mapped-ram image.

By default the stream comes on stdin and return-path messages go to stdout, which
is what QEMU's ``exec:`` transport provides::

    migrate uri=exec:/abs/path/to/fixedram receive /abs/path/vm.img

Nothing but return-path bytes is ever written to stdout; messages go to stderr.
"""

from __future__ import annotations

import signal
import sys
from types import FrameType

import click

from fixedram.cli import cli, one_line_errors
from fixedram.endpoint.receive import DirectIO
from fixedram.errors import EndpointError, FixedramError

__all__ = ["receive_cmd"]


class _Terminated(FixedramError):
    """The process got SIGTERM/SIGHUP: unwind so the partial image is removed."""


def _on_signal(signum: int, frame: FrameType | None) -> None:
    raise _Terminated(f"terminated by {signal.Signals(signum).name}")


def _direct_mode(value: str | None) -> DirectIO:
    if value is None:
        return False
    if value in ("on", "yes", "true", "1"):
        return True
    if value == "required":
        return "required"
    if value in ("off", "no", "false", "0"):
        return False
    raise EndpointError(f"bad --direct-io value '{value}' (expected --direct-io or "
                        "--direct-io=required)")


@cli.command("receive")
@click.argument("image", type=click.Path(dir_okay=False))
@click.option("--listen", "listen_spec", metavar="unix:PATH|tcp:HOST:PORT",
              help="Accept one connection here instead of using stdin/stdout.")
@click.option("--fd", "fd", type=int, metavar="N",
              help="Use the inherited file descriptor N (a socket) as the channel.")
@click.option("--direct-io", "direct_io", is_flag=False, flag_value="on", default=None,
              metavar="[=required]",
              help="Write page data with O_DIRECT (=required: fail if unsupported).")
@click.option("--allow-remote", is_flag=True,
              help="Allow --listen on a non-loopback tcp address.")
@click.option("--accept-timeout", type=float, default=None, metavar="SECONDS",
              help="Give up if nobody connects to --listen within this time.")
@click.option("-q", "--quiet", is_flag=True, help="No report on stderr.")
@one_line_errors
def receive_cmd(image: str, listen_spec: str | None, fd: int | None, direct_io: str | None,
                allow_remote: bool, accept_timeout: float | None, quiet: bool) -> None:
    """Receive a migration from QEMU and save it as the mapped-ram image IMAGE.

    IMAGE appears only once the whole migration has arrived and is on disk; a
    previous IMAGE stays untouched until then.
    """
    from fixedram.endpoint.receive import receive
    from fixedram.io.channel import Channel, from_fd, listen, stdio

    if listen_spec is not None and fd is not None:
        raise EndpointError("--listen and --fd exclude each other")
    mode = _direct_mode(direct_io)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _on_signal)
    channel: Channel
    if listen_spec is not None:
        lst = listen(listen_spec, allow_remote=allow_remote)
        try:
            if not quiet:
                click.echo(f"fixedram: listening on {lst.address}", err=True)
            channel = lst.accept(accept_timeout)
        finally:
            lst.close()
    elif fd is not None:
        channel = from_fd(fd)
    else:
        channel = stdio()
    try:
        report = receive(channel, image, direct_io=mode)
    finally:
        channel.close()
    if not quiet:
        click.echo(f"fixedram: saved {report.summary()}", err=True)
    sys.stderr.flush()
