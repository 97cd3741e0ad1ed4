"""``fixedram convert``: legacy migration stream file <-> mapped-ram image.

* to mapped-ram: a stream file is fed, byte for byte, through the same
  :class:`~fixedram.endpoint.receive.Receiver` that ``fixedram receive`` uses (a
  mapped-ram input is re-laid out by converting it to a stream on the fly);
* to stream: the image goes through :func:`~fixedram.endpoint.send.send`, the same
  code that restores it into QEMU, with the file as the channel: a precopy stream QEMU
  loads through ``exec:cat FILE`` into a fresh QEMU (pages as PAGE records; pages without
  data as ZERO records, except in blocks of guest RAM, which a fresh destination holds as
  zeros: ``docs/fresh-destination.md``; the device state verbatim, EOF and the VM
  description).

The output appears only when complete (fsynced, then renamed into place).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import click

from fixedram.commands import cli, one_line_errors
from fixedram.endpoint.send import send
from fixedram.errors import FixedramError, ImageError, printable
from fixedram.image.libvirt import is_libvirt, read_domain_xml
from fixedram.image.reader import open_image
from fixedram.io.channel import SinkChannel
from fixedram.io.files import pwritev_all
from fixedram.stream import Configuration, StreamDecoder
from fixedram.stream.format import FILE_MAGIC

__all__ = ["convert", "convert_cmd"]

Buffer = bytes | bytearray | memoryview


def _probe(path: Path) -> tuple[int, bool]:
    """``(stream offset, read through open_image)`` from the head of ``path``: a mapped-ram
    or libvirt image is read through :func:`open_image`, a plain stream file byte by byte."""
    with open(path, "rb") as f:
        head = f.read(1 << 20)
    if not head:
        raise ImageError(f"{path} is empty")
    if is_libvirt(head):  # read through open_image, which knows the header (and compression)
        return 0, True
    magic = FILE_MAGIC.to_bytes(4, "big") + b"\x00\x00\x00\x03"
    base = 0 if head.startswith(magic[:4]) else head.find(magic)
    if base < 0:
        raise ImageError(f"{path} is not a QEMU migration image (no QEVM magic)")
    dec = StreamDecoder(base_offset=base)
    mapped = False
    for r in dec.feed(memoryview(head)[base : base + 65536]):
        if isinstance(r, Configuration):
            mapped = r.mapped_ram
            break
    return base, mapped


def convert(src: str | os.PathLike[str], dst: str | os.PathLike[str], *,
            to: str = "mapped-ram", libvirt_xml: str | None = None) -> str:
    """Convert image ``src`` into ``dst`` (``to``: ``mapped-ram`` or ``stream``); either
    may be an object image (``s3://bucket/key``, mapped-ram only).

    ``libvirt_xml`` (mapped-ram only): write a libvirt sparse save image with this domain
    XML in its header, which ``virsh restore`` loads.

    Returns a one-line summary.
    """
    from fixedram.io.objstore import is_object_url

    if libvirt_xml is not None and is_object_url(str(dst)):
        raise FixedramError("--libvirt-xml writes a libvirt image: OUT must be a local file")
    if is_object_url(str(dst)):
        if to != "mapped-ram":
            raise FixedramError("an object image is mapped-ram: --to stream needs a local OUT")
        if str(src) == str(dst):
            raise FixedramError("input and output are the same object")
        from fixedram.image.chunked import local_image

        with local_image(str(dst)) as (local, uploads):
            _convert(src, local, to)
        return uploads[0].summary()
    return _convert(src, dst, to, libvirt_xml)


def _convert(src: str | os.PathLike[str], dst: str | os.PathLike[str], to: str,
             libvirt_xml: str | None = None) -> str:
    from fixedram.endpoint.receive import Receiver
    from fixedram.io.objstore import is_object_url

    if to not in ("mapped-ram", "stream"):
        raise FixedramError(f"unknown output format '{to}' (mapped-ram or stream)")
    if is_object_url(str(src)):  # an object image: always mapped-ram, read through its pages
        if to == "stream":
            return _to_stream(str(src), Path(dst))
        with Receiver(Path(dst), libvirt_xml=libvirt_xml) as rx, open_image(str(src)) as img:
            def feed_rx(bufs: Sequence[Buffer]) -> None:
                for b in bufs:
                    rx.feed(b)

            send(img, SinkChannel(feed_rx))
            return rx.commit().summary()
    sp, dp = Path(src), Path(dst)
    if sp.resolve() == dp.resolve():
        raise FixedramError("input and output are the same file")
    base, mapped = _probe(sp)
    if libvirt_xml is not None and to != "mapped-ram":
        raise FixedramError("--libvirt-xml writes a libvirt sparse image: use --to mapped-ram")
    if to == "mapped-ram":
        with Receiver(dp, libvirt_xml=libvirt_xml) as rx:
            if mapped:
                def feed(bufs: Sequence[Buffer]) -> None:
                    for b in bufs:
                        rx.feed(b)

                with open_image(sp) as img:
                    send(img, SinkChannel(feed))
            else:
                fd = os.open(sp, os.O_RDONLY)
                try:
                    buf = bytearray(1 << 20)
                    mv = memoryview(buf)
                    pos = base
                    while not rx.done:
                        n = os.preadv(fd, [mv], pos)
                        if not n:
                            rx.feed_eof()
                            break
                        pos += n
                        rx.feed(mv[:n])
                finally:
                    os.close(fd)
            rep = rx.commit()
        return rep.summary()
    return _to_stream(sp, dp)


def _to_stream(sp: str | Path, dp: Path) -> str:
    from fixedram.endpoint.receive import ImageFile

    with open_image(sp) as img, ImageFile(dp) as out:
        written = 0

        def write(bufs: Sequence[Buffer]) -> None:
            nonlocal written
            written += pwritev_all(out.fd, bufs, written)

        send(img, SinkChannel(write))
        out.commit()
        return (f"{dp}: {img.machine} migration stream, {written / (1 << 20):.1f} MiB "
                f"(RAM {img.ram_size / (1 << 20):.1f} MiB)")


@cli.command("convert")
@click.argument("src", metavar="IN", type=click.Path(dir_okay=False))
@click.argument("dst", metavar="OUT", type=click.Path(dir_okay=False))
@click.option("--to", "to", type=click.Choice(["mapped-ram", "stream"]), default="mapped-ram",
              show_default=True, help="Output format.")
@click.option("--libvirt-xml", "libvirt_xml", type=click.Path(dir_okay=False, exists=True),
              metavar="XML", help="Write OUT as a libvirt (virsh save) sparse image with this "
              "domain XML (virsh dumpxml --migratable) in its header.")
@click.option("-q", "--quiet", is_flag=True, help="No summary on stderr.")
@one_line_errors
def convert_cmd(src: str, dst: str, to: str, quiet: bool, libvirt_xml: str | None = None) -> None:
    """Convert the image IN (legacy stream, mapped-ram or libvirt save image) into OUT."""
    xml = read_domain_xml(libvirt_xml) if libvirt_xml else None
    summary = convert(src, dst, to=to, libvirt_xml=xml)
    if not quiet:
        click.echo(f"fixedram: wrote {printable(summary)}", err=True)
