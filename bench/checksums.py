"""Cost of the checksum extension on a big image (docs/checksums.md, "Costs").

    .venv/bin/python bench/checksums.py [--gib 1] [--dir /tmp] [--fill 1.0]

Writes a mapped-ram image of GIB GiB of pc.ram (a FILL fraction of pages with random
data) through MappedRamWriter with and without checksums, through a Receiver fed a
precopy stream (the ``fixedram receive`` path) with and without, then times
``verify`` and ``verify --add`` on it. Images live in DIR (page cache warm).
"""

from __future__ import annotations

import argparse
import os
import resource
import time
from pathlib import Path
from unittest import mock

import numpy as np

from fixedram.endpoint.receive import Receiver
from fixedram.image import MappedRamWriter
from fixedram.image.layout import PAGE_SIZE
from fixedram.image.verify import add_checksums, verify_image
from fixedram.stream import (
    Configuration,
    EndOfFile,
    EndOfSection,
    FileHeader,
    MemSize,
    RamBlock,
    SectionEnd,
    SectionFooter,
    SectionFull,
    SectionPart,
    SectionStart,
    StreamEncoder,
    VMDescription,
    encode,
)

RUN = 256
DEV = encode(SectionFull(3, "timer", 0, 2)) + bytes(24) + encode(SectionFooter(3))
VMDESC = b'{"page_size": 4096, "devices": []}'


def writer_run(path: Path, npages: int, data: bytes, present: np.ndarray, checksums: bool) -> float:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    t0 = time.perf_counter()
    try:
        w = MappedRamWriter(fd, checksums=checksums)
        w.begin(Configuration("pc-q35-10.0"), [RamBlock("pc.ram", npages * PAGE_SIZE)])
        mv = memoryview(data)
        for first in range(0, npages, RUN):
            if present[first]:
                w.write_pages("pc.ram", first, [mv[: RUN * PAGE_SIZE]])
        w.finish(DEV, VMDESC)
        os.fsync(fd)
    finally:
        os.close(fd)
    return time.perf_counter() - t0


def stream_chunks(npages: int, data: bytes, present: np.ndarray):
    enc = StreamEncoder()
    yield b"".join(encode(r) for r in (FileHeader(), Configuration("pc-q35-10.0"),
                                       SectionStart(1, "ram", 0, 4), MemSize(npages * PAGE_SIZE),
                                       RamBlock("pc.ram", npages * PAGE_SIZE), EndOfSection(),
                                       SectionFooter(1), SectionPart(1)))
    mv = memoryview(data)
    for first in range(0, npages, RUN):
        if present[first]:
            bufs = enc.page_run("pc.ram", first * PAGE_SIZE, mv[: RUN * PAGE_SIZE])
        else:
            bufs = [enc.zero_run("pc.ram", first * PAGE_SIZE, RUN)]
        yield b"".join(bytes(b) for b in bufs)
    yield b"".join(encode(r) for r in (EndOfSection(), SectionFooter(1), SectionEnd(1),
                                       EndOfSection(), SectionFooter(1))) + DEV + \
        encode(EndOfFile()) + encode(VMDescription(VMDESC))


def receiver_run(path: Path, chunks: list[bytes], checksums: bool) -> float:
    real = MappedRamWriter.__init__

    def init(self, fd, *, page_fd=None, checksums_=checksums, **kw):  # type: ignore[no-untyped-def]
        real(self, fd, page_fd=page_fd, checksums=checksums_)

    with mock.patch.object(MappedRamWriter, "__init__", init):
        t0 = time.perf_counter()
        with Receiver(path) as rx:
            for c in chunks:
                rx.feed(c)
            rx.feed_eof()
            rx.commit()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gib", type=float, default=1.0)
    ap.add_argument("--dir", default="/tmp")
    ap.add_argument("--fill", type=float, default=1.0)
    a = ap.parse_args()
    npages = int(a.gib * (1 << 30)) // PAGE_SIZE
    rng = np.random.default_rng(0)
    data = rng.bytes(RUN * PAGE_SIZE)
    present = np.zeros(npages, dtype=bool)
    runs = np.flatnonzero(rng.random(npages // RUN) < a.fill) * RUN
    present[runs] = True
    d = Path(a.dir)
    img = d / "bench-checksums.mr"
    print(f"{a.gib:g} GiB pc.ram, {int(present.sum()) * RUN} pages with data, in {d}")
    for cs in (False, True, False, True):
        t = writer_run(img, npages, data, present, cs)
        print(f"  MappedRamWriter  checksums={cs!s:5}: {t:6.2f} s")
    chunks = list(stream_chunks(npages, data, present))
    for cs in (False, True, False, True):
        t = receiver_run(img, chunks, cs)
        print(f"  Receiver.feed    checksums={cs!s:5}: {t:6.2f} s")
    del chunks
    for _ in range(2):
        rep = verify_image(img)
        print(f"  verify: {rep.status}, {rep.extents_checked} extents, {rep.elapsed:.2f} s")
    rep2 = add_checksums(img, force=True)
    print(f"  verify --add: {rep2.elapsed:.2f} s (includes a verify pass of the old checksums"
          f" unless --force; here --force)")
    print(f"  extension: {rep2.checksums['size']} bytes; per-page digests in memory while "
          f"writing: {npages * 8 / (1 << 20):.1f} MiB")
    print(f"  max RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")
    img.unlink()


if __name__ == "__main__":
    main()
