"""Make the fuzz seed corpus: small images and streams derived from real QEMU output.

    .venv/bin/python fuzz/make_corpus.py [--out fuzz/corpus] [--synthetic-only]

Boots the bare test guest under QEMU 10 with 16 MiB of RAM, saves it with QEMU's own
``migrate`` once as a legacy stream and once as a mapped-ram file, then shrinks both
to a few KiB so a fuzzer can mutate them fast: every RAM block is cut to its first
:data:`KEEP_PAGES` pages (their real data and ZERO records kept), the configuration,
commands, device state and VM description stay exactly as QEMU wrote them, and the
mapped-ram variant puts the pages regions on 4 KiB instead of 1 MiB boundaries (QEMU
loads either). Synthetic seeds (tiny images, multifd channels from the codec's
encoder) are added, and a seed cut before its device state. Nothing is committed:
``fuzz/corpus`` is ignored, tests make their own copy in a temporary directory.

Layout of the output directory: ``image/`` (files for analyze/verify/validate/convert),
``stream/`` (migration streams for the decoder and the receiver), ``multifd/`` (one
multifd channel each).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from fixedram.image.layout import PAGE_SIZE, align_up, bitmap_bytes  # noqa: E402
from fixedram.stream import (  # noqa: E402
    CommandRecord,
    Configuration,
    DeviceState,
    EndOfFile,
    EndOfSection,
    FileHeader,
    MemSize,
    Page,
    RamBlock,
    Record,
    SectionEnd,
    SectionFooter,
    SectionPart,
    SectionStart,
    StreamDecoder,
    VMDescription,
    Zero,
    encode,
)
from fixedram.stream.format import CAP_MAPPED_RAM, MAPPED_RAM_HEADER, Command  # noqa: E402
from fixedram.stream.multifd import encode_init, encode_packet  # noqa: E402

#: Pages kept per RAM block in the shrunk seeds.
KEEP_PAGES = 2


def records_of(path: Path) -> list[Record]:
    """Every record of a stream or mapped-ram file (mapped-ram pages read from the bitmap)."""
    from fixedram.image import open_image

    data = path.read_bytes()
    dec = StreamDecoder()
    out: list[Record] = []
    pos = 0
    while not dec.done:
        want = dec.next_offset
        if want != pos:
            dec.seek(want)
            pos = want
        chunk = data[pos : pos + (1 << 16)]
        out += dec.feed(chunk) if chunk else dec.feed_eof()
        pos += len(chunk)
        if not chunk:
            break
    if any(isinstance(r, Configuration) and r.mapped_ram for r in out):
        # add the pages as records so the shrinker sees them like a stream's
        with open_image(path) as img:
            extra: list[Record] = []
            for name in img.blocks:
                for first, view in img.iter_data(name):
                    for k in range(len(view) // PAGE_SIZE):
                        off = (first + k) * PAGE_SIZE
                        extra.append(Page(name, off, bytes(view[k * PAGE_SIZE :
                                                                (k + 1) * PAGE_SIZE]), 0))
        i = next(i for i, r in enumerate(out) if isinstance(r, EndOfSection))
        out[i + 2 : i + 2] = [SectionPart(1), *extra, EndOfSection(), SectionFooter(1)]
    return out


def shrink(records: list[Record], keep: int = KEEP_PAGES) -> list[Record]:
    """Blocks cut to ``keep`` pages, pages beyond dropped, MEM_SIZE recomputed; no mapped-ram."""
    lengths = {r.name: min(r.length, keep * PAGE_SIZE) for r in records
               if isinstance(r, RamBlock)}
    out: list[Record] = []
    for r in records:
        if isinstance(r, Configuration):
            caps = tuple(c for c in r.capabilities or () if c != CAP_MAPPED_RAM)
            out.append(Configuration(r.machine, caps or None, r.page_bits, r.uuid))
        elif isinstance(r, MemSize):
            out.append(MemSize(sum(lengths.values())))
        elif isinstance(r, RamBlock):
            out.append(RamBlock(r.name, lengths[r.name]))
        elif isinstance(r, Page | Zero):
            if r.offset < lengths[r.block]:
                out.append(r)
        else:
            out.append(r)
    return out


def slim(records: list[Record]) -> list[Record]:
    """The device state cut to about its first KiB and the VM description to two devices."""
    import json

    out: list[Record] = []
    for r in records:
        if isinstance(r, DeviceState):
            # cut after a section footer (7e + be32 id), where the real blob can end
            cut = max((c for c in range(6, min(len(r.data), 1024) + 1)
                       if r.data[c - 5] == 0x7E), default=len(r.data))
            out.append(DeviceState(r.data[:cut]))
        elif isinstance(r, VMDescription):
            desc = json.loads(r.data)
            desc["devices"] = desc.get("devices", [])[:2]
            out.append(VMDescription(json.dumps(desc).encode()))
        else:
            out.append(r)
    return out


def to_stream(records: list[Record]) -> bytes:
    return b"".join(r.data if isinstance(r, DeviceState) else encode(r) for r in records)


def to_mapped(records: list[Record], align: int = PAGE_SIZE) -> bytes:
    """A mapped-ram file of ``records`` (as :func:`shrink` returns them), regions on ``align``."""
    cfg = next(r for r in records if isinstance(r, Configuration))
    caps = (*(cfg.capabilities or ()), CAP_MAPPED_RAM)
    blocks = [r for r in records if isinstance(r, RamBlock)]
    pages: dict[str, dict[int, bytes]] = {b.name: {} for b in blocks}
    for r in records:
        if isinstance(r, Page):
            pages[r.block][r.offset // PAGE_SIZE] = r.data
        elif isinstance(r, Zero):
            pages[r.block].pop(r.offset // PAGE_SIZE, None)
    out = bytearray()
    for r in (FileHeader(), Configuration(cfg.machine, caps, cfg.page_bits, cfg.uuid),
              SectionStart(1, "ram", 0, 4), MemSize(sum(b.length for b in blocks))):
        out += encode(r)
    for b in blocks:
        out += encode(RamBlock(b.name, b.length))
        npages = b.length // PAGE_SIZE
        bm = len(out) + MAPPED_RAM_HEADER.size
        po = align_up(bm + bitmap_bytes(npages), align)
        out += MAPPED_RAM_HEADER.pack(1, PAGE_SIZE, bm, po)
        bits = bytearray(bitmap_bytes(npages))
        body = bytearray(b.length)
        for i, data in pages[b.name].items():
            bits[i // 8] |= 1 << (i % 8)
            body[i * PAGE_SIZE : (i + 1) * PAGE_SIZE] = data
        out += bits
        out += bytes(po - len(out))
        out += body
    sid = 1
    out += encode(EndOfSection()) + encode(SectionFooter(sid))
    for r in records:
        if isinstance(r, CommandRecord):
            out += encode(r)
    out += encode(SectionEnd(sid)) + encode(EndOfSection()) + encode(SectionFooter(sid))
    dev = next((r.data for r in records if isinstance(r, DeviceState)), b"")
    vmd = next((r.data for r in records if isinstance(r, VMDescription)), b"{}")
    out += dev + encode(EndOfFile()) + encode(VMDescription(vmd))
    return bytes(out)


def synthetic() -> list[Record]:
    """A tiny stream: one block of 3 pages, one with data, a 9-byte device state."""
    dev = b"\x04\x00\x00\x00\x0a\x05timer\x00\x00\x00\x00\x00\x00\x00\x01\x7e\x00\x00\x00\x0a"
    return [
        FileHeader(), Configuration("pc-q35-10.0"), SectionStart(1, "ram", 0, 4),
        MemSize(3 * PAGE_SIZE), RamBlock("pc.ram", 3 * PAGE_SIZE), EndOfSection(),
        SectionFooter(1), SectionPart(1), Page("pc.ram", PAGE_SIZE, b"\xab" * PAGE_SIZE, 0),
        Zero("pc.ram", 0, 0), EndOfSection(), SectionFooter(1),
        CommandRecord(Command.SWITCHOVER_START), SectionEnd(1), EndOfSection(),
        SectionFooter(1), DeviceState(dev), EndOfFile(),
        VMDescription(b'{"page_size": 4096, "devices": [{"name": "timer"}]}'),
    ]


def claims() -> dict[str, list[Record]]:
    """Large claims with little data: the synthetic stream's block grown to 1 TiB (its
    page moved to the top) and a 16 TiB block list with no pages at all."""
    big = 1 << 40
    recs: list[Record] = []
    for r in synthetic():
        if isinstance(r, MemSize):
            r = MemSize(big)
        elif isinstance(r, RamBlock):
            r = RamBlock(r.name, big)
        elif isinstance(r, Page):
            r = Page(r.block, big - PAGE_SIZE, r.data, 0)
        recs.append(r)
    empty = [FileHeader(), Configuration("pc-q35-10.0"), SectionStart(1, "ram", 0, 4),
             MemSize(1 << 44), RamBlock("pc.ram", 1 << 44), EndOfSection(), SectionFooter(1)]
    return {"claim-1t": recs, "claim-16t-empty": empty}


def multifd_seeds() -> dict[str, bytes]:
    page = bytes(range(256)) * 16
    return {
        "multifd-pages": encode_init(0, b"u" * 16)
        + encode_packet(block="pc.ram", normal_offsets=[0, PAGE_SIZE], zero_offsets=[
            8 * PAGE_SIZE], data=page * 2, packet_num=1)
        + encode_packet(sync=True, packet_num=2),
        "multifd-sync-only": encode_init(1) + encode_packet(sync=True),
    }


def qemu_sources(work: Path) -> dict[str, Path]:
    """Save a small real guest with QEMU 10: legacy stream and mapped-ram file."""
    from fixedram.testing.vm import Guest, find_qemu, qemu_save

    qemu = find_qemu("10")
    out: dict[str, Path] = {}
    for mode in ("legacy", "mapped-ram"):
        src = Guest(qemu, work, name=f"corpus-{mode}", mem="16M",
                    append="mib=2 rate=0 gens=2 hb=100")
        with src:
            src.wait_heartbeat(gen_at_least=2)
            path = work / f"{mode}.img"
            qemu_save(src, path, mode, live=False)
            out[mode] = path
    return out


def make(out: Path, *, qemu: bool = True) -> dict[str, int]:
    """Write the corpus into ``out``; returns file name -> size."""
    for sub in ("image", "stream", "multifd"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    seeds: dict[str, list[Record]] = {"synthetic": synthetic()}
    if qemu:
        with tempfile.TemporaryDirectory(prefix="fixedram-corpus-") as tmp:
            for mode, path in qemu_sources(Path(tmp)).items():
                recs = shrink(records_of(path))
                seeds[f"qemu10-{mode}"] = recs
                seeds[f"qemu10-{mode}-slim"] = slim(recs)
    sizes: dict[str, int] = {}

    def put(sub: str, name: str, data: bytes) -> None:
        (out / sub / name).write_bytes(data)
        sizes[f"{sub}/{name}"] = len(data)

    for name, recs in seeds.items():
        stream = to_stream(recs)
        mapped = to_mapped(recs)
        put("image", f"{name}.stream", stream)
        put("image", f"{name}.mapped", mapped)
        put("stream", f"{name}.stream", stream)
        put("stream", f"{name}.mapped", mapped)
        cut = next(i for i, r in enumerate(recs) if isinstance(r, DeviceState))
        put("stream", f"{name}.no-device", to_stream(recs[:cut]))
    for name, recs in claims().items():  # receive paths only (not images: see claims)
        put("stream", f"{name}.stream", to_stream(recs) if name == "claim-1t" else b"".join(
            encode(r) for r in recs))
    for name, data in multifd_seeds().items():
        put("multifd", name, data)
    return sizes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=HERE / "corpus")
    ap.add_argument("--synthetic-only", action="store_true",
                    help="no QEMU: only the synthetic seeds")
    args = ap.parse_args()
    if args.out.exists():
        shutil.rmtree(args.out)
    sizes = make(args.out, qemu=not args.synthetic_only)
    for name, n in sorted(sizes.items()):
        print(f"{n:8d}  {args.out / name}")
    print(f"{len(sizes)} seeds, {sum(sizes.values())} bytes", file=sys.stderr)
    os.sync()


if __name__ == "__main__":
    main()
