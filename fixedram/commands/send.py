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
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import click

from fixedram.commands import (
    cli,
    direct_io_options,
    direct_mode,
    lazy_options,
    one_line_errors,
)
from fixedram.errors import EndpointError
from fixedram.io.channel import Channel, FdChannel, connect, from_fd
from fixedram.units import format_size

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
@click.option("--verify", "verify_first", is_flag=True,
              help="Check every page against the image's checksums before the first byte "
                   "(one extra read of the image). Without it pages are checked as they are "
                   "sent, and a bad one stops the stream before the device state.")
@click.option("--postcopy", is_flag=True,
              help="Lazy restore: the guest runs at once and its pages are served on demand "
                   "(the destination needs capability postcopy-ram). If the image or fixedram "
                   "fails after the guest started, the guest cannot continue.")
@lazy_options("--postcopy")
@click.option("--report-json", type=click.Path(dir_okay=False), default=None, metavar="FILE",
              help="Write the report as JSON to FILE.")
@direct_io_options("Read")
@click.option("--channels", type=click.IntRange(0, 255), default=0, show_default=True,
              help="Be a multifd source with this many channels (the destination's "
                   "multifd-channels, capability multifd on); needs --connect.")
@click.option("--uuid", "uuid_text", default=None, metavar="UUID",
              help="--channels: the destination's -uuid (default: from --qmp, else the "
                   "image's, else zeros).")
@one_line_errors
def send_command(image: str, address: str | None, fd: int | None, qmp_socket: str | None,
                 readers: int, quiet: bool, postcopy: bool = False,
                 push_rate: str | None = None, report_json: str | None = None,
                 verify_first: bool = False, direct_io: bool = False,
                 require_direct_io: bool = False,
                 channels: int = 0, uuid_text: str | None = None, no_record: bool = False,
                 no_prefetch: bool = False, prefetch_rate: str | None = None) -> None:
    """Restore IMAGE into a waiting QEMU (stream on stdout unless --connect/--fd)."""
    from fixedram.endpoint.send import send, validate
    from fixedram.image import open_image

    direct = direct_mode(direct_io, require_direct_io)

    if address is not None and fd is not None:
        raise click.UsageError("--connect and --fd exclude each other")
    if postcopy and verify_first:  # a lazily restored guest runs before all pages are sent
        from fixedram.image.verify import require_checksums

        with open_image(image) as vimg:
            require_checksums(vimg)
    if channels:
        if postcopy or fd is not None or address is None:
            raise EndpointError("--channels needs --connect unix:PATH or tcp:HOST:PORT (one "
                                "connection per channel), without --fd or --postcopy")
        _send_multifd(image, address, channels, qmp_socket, quiet, uuid_text, verify_first,
                      report_json, direct)
        return
    if uuid_text is not None:
        raise EndpointError("--uuid is for --channels (multifd)")
    if (no_record or no_prefetch or prefetch_rate) and not postcopy:
        raise click.UsageError("--no-record, --no-prefetch and --prefetch-rate go with "
                               "--postcopy")
    if postcopy:
        _send_postcopy(image, address, fd, qmp_socket, quiet, push_rate, report_json,
                       not no_prefetch, not no_record, prefetch_rate)
        return
    with open_image(image) as img:
        img.prefetch()  # an object image: its first chunks, while it is checked
        dest_machine = dest_blocks = None
        if qmp_socket is not None:  # the QMP modules are imported only when needed
            from fixedram.qmp.destination import query_destination

            dest_machine, dest_blocks = query_destination(qmp_socket)
        # Refuse before connecting: QEMU cannot be reused after a failed load.
        validate(img, dest_machine=dest_machine, dest_blocks=dest_blocks)
        if verify_first:
            from fixedram.image.verify import require_checksums

            require_checksums(img)
        img.open_direct(direct)  # =required fails here, before connecting
        channel = _open_channel(address, fd)
        bar, progress = _page_bar(quiet, lambda: sum(b.npages for b in img.blocks.values()),
                                  "send")
        try:
            report = send(img, channel, dest_machine=dest_machine, dest_blocks=dest_blocks,
                          readers=readers, progress=progress, direct_io=direct)
        finally:
            if bar is not None:
                bar.close()
            channel.close()
    if not quiet:
        click.echo(
            f"fixedram: sent {image} ({report.machine}): {report.pages_sent} pages + "
            f"{report.zero_pages} zero pages, {format_size(report.bytes_sent)} in "
            f"{report.elapsed:.2f} s ({format_size(report.rate)}/s), "
            f"{report.preadv_calls} reads" + (" (O_DIRECT)" if report.direct_io else ""),
            err=True)


def _open_channel(address: str | None, fd: int | None, *, lazy: bool = False) -> Channel:
    """The channel toward QEMU: ``--connect``, ``--fd``, or stdout (``exec:``); a ``lazy``
    restore's socket keeps the kernel's default buffers (``UNIX_SOCKET_BUFFER``)."""
    if address is not None:
        return connect(address, large_buffers=not lazy)
    if fd is not None:
        return from_fd(fd)
    return _stdio_channel()


def _page_bar(quiet: bool, total: Callable[[], int], desc: str) -> tuple[Any, Any]:
    """A tqdm page counter on a terminal stderr, and the progress callback feeding it."""
    if quiet or not sys.stderr.isatty():
        return None, None
    from tqdm import tqdm

    bar = tqdm(total=total(), unit="page", unit_scale=True, file=sys.stderr, desc=desc,
               leave=False)

    def progress(s: Any) -> None:
        bar.update(s.pages_done - bar.n)

    return bar, progress


def _send_postcopy(image: str, address: str | None, fd: int | None, qmp_socket: str | None,
                   quiet: bool, push_rate: str | None, report_json: str | None,
                   prefetch: bool = True, record: bool = True,
                   prefetch_rate: str | None = None) -> None:
    """``send --postcopy``: serve IMAGE lazily (see :mod:`fixedram.endpoint.postcopy`)."""
    import json
    from dataclasses import asdict

    from fixedram.commands.save import parse_rate
    from fixedram.endpoint.postcopy import RECORD_DEADLINE, PostcopyReport, send_postcopy
    from fixedram.endpoint.send import validate
    from fixedram.image import open_image
    from fixedram.qmp.destination import query_destination

    rate = parse_rate(push_rate) if push_rate else None
    pre_rate = parse_rate(prefetch_rate) if prefetch_rate else None
    with open_image(image) as img:
        dest_machine = dest_blocks = None
        if qmp_socket is not None:
            from fixedram.qmp.client import QMP

            with QMP.connect(qmp_socket) as q:
                if not q.capabilities().get("postcopy-ram", False):
                    raise EndpointError("the destination has capability postcopy-ram off "
                                        "(migrate-set-capabilities postcopy-ram=on first)")
            dest_machine, dest_blocks = query_destination(qmp_socket)
        validate(img, dest_machine=dest_machine, dest_blocks=dest_blocks)
        channel = _open_channel(address, fd, lazy=True)
        bar, progress = _page_bar(
            quiet, lambda: sum(img.count_present(n) for n in img.blocks), "lazy restore")

        def write_report(r: PostcopyReport) -> None:
            # replaced whole, never read half-written
            assert report_json is not None
            tmp = Path(report_json + ".tmp")
            tmp.write_text(json.dumps({**asdict(r), "pages_sent": r.pages_sent}))
            os.replace(tmp, report_json)

        try:
            # The report and (bounded in time) the record are written once every page is
            # sent, before the stream's end: under exec: (the stream on stdout) QEMU may
            # stop this process as soon as the restore completes.
            under_exec = address is None and fd is None
            report = send_postcopy(img, channel, dest_machine=dest_machine,
                                   dest_blocks=dest_blocks, progress=progress, push_rate=rate,
                                   prefetch=prefetch, record=record, prefetch_rate=pre_rate,
                                   record_deadline=RECORD_DEADLINE if under_exec else None,
                                   on_last_page=write_report if report_json else None)
        finally:
            if bar is not None:
                bar.close()
            channel.close()
    if report_json is not None:
        write_report(report)
    if not quiet:
        click.echo(
            f"fixedram: lazily restored {image} ({report.machine}): guest started after "
            f"{report.time_to_run * 1000:.0f} ms; {report.pages_on_demand} pages on demand "
            f"({report.requests} requests), {report.pages_pushed} pushed, "
            f"{format_size(report.bytes_sent)} in {report.elapsed:.2f} s", err=True)


def _send_multifd(image: str, address: str, channels: int, qmp_socket: str | None, quiet: bool,
                  uuid_text: str | None, verify_first: bool, report_json: str | None,
                  direct: bool | Literal["required"] = False) -> None:
    """``send --channels N``: be a multifd source (see :mod:`fixedram.endpoint.multifd_send`)."""
    import json
    from dataclasses import asdict

    from fixedram.endpoint.multifd_send import parse_uuid, send_multifd
    from fixedram.image import open_image
    from fixedram.qmp.destination import query_multifd_dest

    uuid = parse_uuid(uuid_text) if uuid_text is not None else None
    with open_image(image) as img:
        dest = None
        if qmp_socket is not None:
            dest = query_multifd_dest(qmp_socket, channels)
            if uuid is None:
                uuid = dest.uuid
        if verify_first:
            from fixedram.image.verify import require_checksums

            require_checksums(img)
        bar, progress = _page_bar(quiet, lambda: sum(b.npages for b in img.blocks.values()),
                                  "send")
        try:
            report = send_multifd(
                img, address, channels, uuid=uuid,
                dest_machine=dest.machine if dest else None,
                dest_blocks=dest.blocks if dest else None,
                dest_version=dest.version if dest else None, progress=progress,
                direct_io=direct)
        finally:
            if bar is not None:
                bar.close()
    if report_json is not None:
        Path(report_json).write_text(json.dumps(asdict(report)))
    if not quiet:
        click.echo(
            f"fixedram: sent {image} ({report.machine}) over {channels} multifd channels: "
            f"{report.pages_sent} pages + {report.zero_pages} zero pages "
            f"({report.packets} packets, {report.sync} syncs, zero pages {report.zero}), "
            f"{format_size(report.bytes_sent)} in {report.elapsed:.2f} s "
            f"({format_size(report.rate)}/s), {report.preadv_calls} reads", err=True)
