"""``fixedram convert``: legacy migration stream file <-> mapped-ram image.

* to mapped-ram: a stream file is fed, byte for byte, through the same
  :class:`~fixedram.endpoint.receive.Receiver` that ``fixedram receive`` uses (a
  mapped-ram input is re-laid out by converting it to a stream on the fly);
* to stream: the image is written as a precopy stream QEMU loads through
  ``exec:cat FILE``: pages as PAGE records, absent pages as ZERO records, the device
  state verbatim, EOF and the VM description.

The output appears only when complete (fsynced, then renamed into place).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import click
import numpy as np

from fixedram.cli import cli, one_line_errors, printable
from fixedram.errors import FixedramError, ImageError
from fixedram.image.layout import PAGE_SIZE, runs
from fixedram.image.reader import Image, open_image
from fixedram.io.files import pwritev_all
from fixedram.stream import (
    CommandRecord,
    Configuration,
    EndOfFile,
    EndOfSection,
    FileHeader,
    MemSize,
    RamBlock,
    SectionEnd,
    SectionFooter,
    SectionPart,
    SectionStart,
    StreamDecoder,
    StreamEncoder,
    VMDescription,
    encode,
)
from fixedram.stream.format import CAP_MAPPED_RAM, FILE_MAGIC, RAM_SECTION, Command

__all__ = ["convert", "convert_cmd", "image_stream"]

Buffer = bytes | bytearray | memoryview

#: Most ZERO records encoded at once.
_ZERO_CHUNK = 4096


def _probe(path: Path) -> tuple[int, bool, int]:
    """``(stream offset, is mapped-ram, ram section id)`` from the head of ``path``."""
    with open(path, "rb") as f:
        head = f.read(1 << 20)
    if not head:
        raise ImageError(f"{path} is empty")
    magic = FILE_MAGIC.to_bytes(4, "big") + b"\x00\x00\x00\x03"
    base = 0 if head.startswith(magic[:4]) else head.find(magic)
    if base < 0:
        raise ImageError(f"{path} is not a QEMU migration image (no QEVM magic)")
    dec = StreamDecoder(base_offset=base)
    mapped = False
    sid = 1
    for r in dec.feed(memoryview(head)[base : base + 65536]):
        if isinstance(r, Configuration):
            mapped = r.mapped_ram
        elif isinstance(r, SectionStart):
            sid = r.section_id
            break
    return base, mapped, sid


def image_stream(img: Image, section_id: int = 1) -> Iterator[Sequence[Buffer]]:
    """The image as a precopy migration stream, in batches of buffers.

    Page buffers may be views of a reused read buffer: write each batch before
    asking for the next.
    """
    cfg = img.configuration
    caps = tuple(c for c in cfg.capabilities or () if c != CAP_MAPPED_RAM)
    plain = Configuration(cfg.machine, caps or None, cfg.page_bits, cfg.uuid)
    sid = section_id
    eos_footer = encode(EndOfSection()) + encode(SectionFooter(sid))
    head = [encode(FileHeader()), encode(plain), encode(SectionStart(sid, RAM_SECTION, 0, 4)),
            encode(MemSize(img.ram_size))]
    head += [encode(RamBlock(b.name, b.length)) for b in img.blocks.values()]
    head.append(eos_footer)
    yield head
    enc = StreamEncoder()
    yield [encode(SectionPart(sid))]
    for name in img.blocks:
        present = img.present(name)
        data = img.iter_data(name)
        for first, n in _merged_runs(present):
            if not present[first]:
                for z in range(first, first + n, _ZERO_CHUNK):
                    k = min(_ZERO_CHUNK, first + n - z)
                    yield [enc.zero_run(name, z * PAGE_SIZE, k)]
                continue
            end = first + n
            while first < end:
                p, view = next(data)
                assert p == first, (p, first)
                yield enc.page_run(name, p * PAGE_SIZE, view)
                first += len(view) // PAGE_SIZE
    yield [eos_footer]
    for c in img.commands:
        if c == Command.SWITCHOVER_START.name:
            yield [encode(CommandRecord(Command.SWITCHOVER_START))]
    yield [encode(SectionEnd(sid)) + eos_footer]
    tail: list[Buffer] = [img.device_state, encode(EndOfFile())]
    if img.vmdesc is not None:
        tail.append(encode(VMDescription(img.vmdesc)))
    yield tail


def _merged_runs(arr: np.ndarray) -> Iterator[tuple[int, int]]:
    """Alternating runs of present and absent pages covering the whole block, in order."""
    pos = 0
    for first, n in runs(arr):
        if first > pos:
            yield pos, first - pos
        yield first, n
        pos = first + n
    if pos < len(arr):
        yield pos, len(arr) - pos


def convert(src: str | os.PathLike[str], dst: str | os.PathLike[str], *,
            to: str = "mapped-ram") -> str:
    """Convert image ``src`` into ``dst`` (``to``: ``mapped-ram`` or ``stream``).

    Returns a one-line summary.
    """
    from fixedram.endpoint.receive import Receiver, _ImageFile

    sp, dp = Path(src), Path(dst)
    if sp.resolve() == dp.resolve():
        raise FixedramError("input and output are the same file")
    base, mapped, sid = _probe(sp)
    if to == "mapped-ram":
        with Receiver(dp) as rx:
            if mapped:
                with open_image(sp) as img:
                    for bufs in image_stream(img, sid):
                        for b in bufs:
                            rx.feed(b)
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
    if to != "stream":
        raise FixedramError(f"unknown output format '{to}' (mapped-ram or stream)")
    with open_image(sp) as img, _ImageFile(dp) as out:
        pos = 0
        for bufs in image_stream(img, sid):
            pos += pwritev_all(out.fd, bufs, pos)
        out.commit()
        return (f"{dp}: {img.machine} migration stream, {pos / (1 << 20):.1f} MiB "
                f"(RAM {img.ram_size / (1 << 20):.1f} MiB)")


@cli.command("convert")
@click.argument("src", metavar="IN", type=click.Path(dir_okay=False, exists=True))
@click.argument("dst", metavar="OUT", type=click.Path(dir_okay=False))
@click.option("--to", "to", type=click.Choice(["mapped-ram", "stream"]), default="mapped-ram",
              show_default=True, help="Output format.")
@click.option("-q", "--quiet", is_flag=True, help="No summary on stderr.")
@one_line_errors
def convert_cmd(src: str, dst: str, to: str, quiet: bool) -> None:
    """Convert the image IN (legacy stream or mapped-ram) into OUT."""
    summary = convert(src, dst, to=to)
    if not quiet:
        click.echo(f"fixedram: wrote {printable(summary)}", err=True)
