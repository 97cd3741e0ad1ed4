"""``fixedram receive``: be the destination of a QEMU migration and save a mapped-ram image.

By default the stream comes on stdin and return-path messages go to stdout, which
is what QEMU's ``exec:`` transport provides::

    migrate uri=exec:/abs/path/to/fixedram receive /abs/path/vm.img

Nothing but return-path bytes is ever written to stdout; messages go to stderr.

Multifd: QEMU opens the main connection plus ``multifd-channels`` N more, and only
over ``unix:``/``tcp:`` (it refuses ``exec:``/``fd:`` with multifd). The channel
count is not on the wire, so it is given explicitly and must equal the source's::

    fixedram receive --listen unix:/run/mig.sock --channels 4 /abs/path/vm.img
    (QMP: migrate-set-capabilities multifd=on; migrate-set-parameters multifd-channels=4;
     migrate uri=unix:/run/mig.sock)

``--channels 0`` (the default) refuses a multifd source with a one-line error, as
does a count that differs from the source's.
"""

from __future__ import annotations

import math
import os
import signal
import sys
from types import FrameType

import click

from fixedram.commands import cli, direct_io_options, direct_mode, one_line_errors
from fixedram.endpoint.receive import MAX_CHANNELS, ReceiveReport
from fixedram.errors import EndpointError, FixedramError
from fixedram.image.libvirt import read_domain_xml
from fixedram.image.reader import DirectIO

__all__ = ["receive_cmd"]


class _Terminated(FixedramError):
    """The process got SIGTERM/SIGHUP: unwind so the partial image is removed."""


def _on_signal(signum: int, frame: FrameType | None) -> None:
    raise _Terminated(f"terminated by {signal.Signals(signum).name}")


@cli.command("receive")
@click.argument("image", type=click.Path(dir_okay=False))
@click.option("--listen", "listen_spec", metavar="unix:PATH|tcp:HOST:PORT",
              help="Accept the migration here instead of using stdin/stdout.")
@click.option("--channels", type=click.IntRange(0, MAX_CHANNELS), default=0, show_default=True,
              metavar="N",
              help="Expect N multifd channels (the source's multifd-channels; needs --listen).")
@click.option("--fd", "fd", type=int, metavar="N",
              help="Use the inherited file descriptor N (a socket) as the channel.")
@direct_io_options("Write")
@click.option("--allow-remote", is_flag=True,
              help="Allow --listen on a non-loopback tcp address.")
@click.option("--accept-timeout", type=float, default=None, metavar="SECONDS",
              help="Give up if nobody connects to --listen within this time.")
@click.option("--libvirt-xml", "libvirt_xml", type=click.Path(dir_okay=False, exists=True),
              metavar="XML", help="Write a libvirt (virsh save) sparse image with this domain "
              "XML (virsh dumpxml --migratable) in its header.")
@click.option("-q", "--quiet", is_flag=True, help="No report on stderr.")
@one_line_errors
def receive_cmd(image: str, listen_spec: str | None, channels: int, fd: int | None,
                direct_io: bool, require_direct_io: bool, allow_remote: bool,
                accept_timeout: float | None, quiet: bool,
                libvirt_xml: str | None = None) -> None:
    """Receive a migration from QEMU and save it as the mapped-ram image IMAGE.

    IMAGE appears only once the whole migration has arrived and is on disk; a
    previous IMAGE stays untouched until then.
    """
    if listen_spec is not None and fd is not None:
        raise EndpointError("--listen and --fd exclude each other")
    if channels and listen_spec is None:
        raise EndpointError("--channels needs --listen unix:PATH or tcp:HOST:PORT (QEMU opens "
                            "multifd channels only over unix: and tcp:, not exec: or fd:)")
    mode = direct_mode(direct_io, require_direct_io)
    xml = read_domain_xml(libvirt_xml) if libvirt_xml else None
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _on_signal)
    from fixedram.image.chunked import local_image
    from fixedram.io.objstore import is_object_url

    if xml is not None and is_object_url(image):
        raise FixedramError("--libvirt-xml writes a libvirt image: IMAGE must be a local file")
    with local_image(image) as (target, uploads):
        report = _receive(target, listen_spec, channels, fd, mode, allow_remote,
                          accept_timeout, quiet, xml)
    if not quiet:  # an object image: what was uploaded (the staging copy is gone)
        click.echo(f"fixedram: uploaded {uploads[0].summary()}" if uploads else
                   f"fixedram: saved {report.summary()}", err=True)
    sys.stderr.flush()


def _channel_grace() -> float:
    """Seconds to wait at the first multifd sync point for missing channels:
    ``FIXEDRAM_CHANNEL_GRACE`` when set (the tests' channel-count refusals wait out a shorter
    one), else :data:`~fixedram.endpoint.receive.CHANNEL_GRACE`."""
    from fixedram.endpoint.receive import CHANNEL_GRACE

    v = os.environ.get("FIXEDRAM_CHANNEL_GRACE", "")
    if not v:
        return CHANNEL_GRACE
    try:
        secs = float(v)
    except ValueError:
        secs = math.nan
    if not (secs > 0 and math.isfinite(secs)):
        raise EndpointError(f"FIXEDRAM_CHANNEL_GRACE={v!r}: expected a number of seconds "
                            "above 0")
    return secs


def _receive(image: str, listen_spec: str | None, channels: int, fd: int | None,
             mode: DirectIO, allow_remote: bool, accept_timeout: float | None,
             quiet: bool, xml: str | None) -> ReceiveReport:
    from fixedram.endpoint.receive import receive, receive_listening
    from fixedram.io.channel import Channel, from_fd, listen, stdio

    report: ReceiveReport
    if listen_spec is not None:
        grace = _channel_grace()
        # the main connection plus N channels may all be pending at once
        lst = listen(listen_spec, allow_remote=allow_remote, backlog=max(16, channels + 2))
        try:
            if not quiet:
                click.echo(f"fixedram: listening on {lst.address}", err=True)
            report = receive_listening(lst, image, channels=channels, direct_io=mode,
                                       accept_timeout=accept_timeout, libvirt_xml=xml,
                                       channel_grace=grace)
        finally:
            lst.close()
    else:
        channel: Channel = from_fd(fd) if fd is not None else stdio()
        try:
            report = receive(channel, image, direct_io=mode, libvirt_xml=xml)
        finally:
            channel.close()
    return report
