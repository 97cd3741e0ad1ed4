"""``fixedram send``: restore an image into a QEMU waiting with ``-incoming``.

By default the stream goes to stdout, so QEMU can run fixedram itself::

    migrate-incoming uri="exec:/abs/.venv/bin/python -m fixedram send /abs/image"

or fixedram connects to a listening QEMU (``migrate-incoming uri=unix:PATH`` then
``fixedram send --connect unix:PATH IMAGE``), or writes to an inherited descriptor
(``--fd N``). Everything is checked before the first byte goes out; with ``--qmp`` the
image is also checked against the destination's machine type and RAM blocks.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import click

from fixedram.cli import cli, one_line_errors
from fixedram.errors import EndpointError
from fixedram.io.channel import Channel, FdChannel, connect, from_fd

__all__ = ["send_command"]


def _stdio_channel() -> FdChannel:
    """A channel owning private copies of stdin/stdout; fds 0 and 1 become /dev/null.

    Nothing printed by accident can then corrupt the stream, and shutting the channel's
    write side really closes the pipe QEMU reads.
    """
    if os.isatty(1):
        raise EndpointError("refusing to write a migration stream to a terminal "
                            "(redirect stdout, or use --connect/--fd)")
    out = os.dup(1)
    try:
        inp = os.dup(0)
    except OSError:
        inp = os.open(os.devnull, os.O_RDONLY)
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 0)
    os.dup2(null, 1)
    os.close(null)
    return FdChannel(inp, out, owned=True)


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GiB"


@cli.command("send")
@click.argument("image", type=click.Path(dir_okay=False))
@click.option("--connect", "address", metavar="unix:PATH|tcp:HOST:PORT",
              help="Connect to a QEMU listening with migrate-incoming uri=unix:/tcp:.")
@click.option("--fd", "fd", type=int, metavar="N",
              help="Write the stream to inherited file descriptor N.")
@click.option("--qmp", "qmp_socket", metavar="SOCKET", type=click.Path(),
              help="Destination's QMP socket: check machine type and RAM blocks first.")
@click.option("--readers", type=click.IntRange(1, 64), default=1, show_default=True,
              help="Keep READERS-1 pieces of a mapped-ram image in kernel read-ahead.")
@click.option("-q", "--quiet", is_flag=True, help="No summary or progress on stderr.")
@one_line_errors
def send_command(image: str, address: str | None, fd: int | None, qmp_socket: str | None,
                 readers: int, quiet: bool) -> None:
    """Restore IMAGE into a waiting QEMU (stream on stdout unless --connect/--fd)."""
    from fixedram.endpoint.send import query_destination, send, validate
    from fixedram.image import open_image

    if address is not None and fd is not None:
        raise click.UsageError("--connect and --fd exclude each other")
    with open_image(image) as img:
        dest_machine = dest_blocks = None
        if qmp_socket is not None:
            dest_machine, dest_blocks = query_destination(qmp_socket)
        # Refuse before connecting: QEMU cannot be reused after a failed load.
        validate(img, dest_machine=dest_machine, dest_blocks=dest_blocks)
        channel: Channel
        if address is not None:
            channel = connect(address)
        elif fd is not None:
            channel = from_fd(fd)
        else:
            channel = _stdio_channel()
        bar: Any = None
        progress = None
        if not quiet and sys.stderr.isatty():
            from tqdm import tqdm

            total = sum(b.npages for b in img.blocks.values())
            bar = tqdm(total=total, unit="page", unit_scale=True, file=sys.stderr,
                       desc="send", leave=False)

            def progress(s: Any) -> None:
                bar.update(s.pages_done - bar.n)
        try:
            report = send(img, channel, dest_machine=dest_machine, dest_blocks=dest_blocks,
                          readers=readers, progress=progress)
        finally:
            if bar is not None:
                bar.close()
            channel.close()
    if not quiet:
        click.echo(
            f"fixedram: sent {image} ({report.machine}): {report.pages_sent} pages + "
            f"{report.zero_pages} zero pages, {_fmt_bytes(report.bytes_sent)} in "
            f"{report.elapsed:.2f} s ({_fmt_bytes(report.rate)}/s), "
            f"{report.preadv_calls} reads", err=True)
