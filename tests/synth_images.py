"""Synthesised mapped-ram images laid out exactly as QEMU 10 writes them (sparse files)."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

from fixedram.image.layout import PAGE_SIZE, block_geometry
from fixedram.stream import (
    CommandRecord,
    Configuration,
    EndOfFile,
    EndOfSection,
    FileHeader,
    MappedRamHeader,
    MemSize,
    RamBlock,
    SectionEnd,
    SectionFooter,
    SectionStart,
    VMDescription,
    encode,
)
from fixedram.stream.format import Command

DEVICES = ("timer", "cpu_common", "globalstate")


def device_blob() -> bytes:
    out = b""
    for sid, name in enumerate(DEVICES, start=10):
        out += b"\x04" + struct.pack(">I", sid) + bytes([len(name)]) + name.encode()
        out += struct.pack(">II", 0, 1) + b"\x01\x02\x03" + b"\x7e" + struct.pack(">I", sid)
    return out


def vmdesc() -> bytes:
    return json.dumps(
        {
            "page_size": PAGE_SIZE,
            "devices": [{"name": d, "instance_id": 0, "version": 1} for d in DEVICES],
        }
    ).encode()


def write_mapped_image(
    path: Path,
    blocks: dict[str, int],
    pages: dict[str, dict[int, bytes]],
    machine: str = "pc-q35-10.0",
    offset: int = 0,
) -> dict[str, MappedRamHeader]:
    """Write a mapped-ram image of ``blocks`` (name -> length) holding ``pages`` (name ->
    page index -> 4096 bytes); every other page is absent. Returns each block's header."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    headers: dict[str, MappedRamHeader] = {}
    try:
        os.ftruncate(fd, offset)
        head = [
            FileHeader(3),
            Configuration(machine, ("mapped-ram",)),
            SectionStart(1, "ram", 0, 4),
            MemSize(sum(blocks.values())),
        ]
        data = b"".join(encode(r) for r in head)
        pos = offset
        os.pwrite(fd, data, pos)
        pos += len(data)
        for name, length in blocks.items():
            hdr_pos = pos + 1 + len(name) + 8
            bm, po, nxt = block_geometry(hdr_pos, length)
            m = MappedRamHeader(1, PAGE_SIZE, bm, po)
            headers[name] = m
            rec = encode(RamBlock(name, length, mapped=m))
            assert pos + len(rec) == bm
            os.pwrite(fd, rec, pos)
            # the bitmap bytes of the pages given only (the rest stays a hole: zero), so a
            # block of any claimed size costs nothing here
            bits: dict[int, int] = {}
            for i, page in pages.get(name, {}).items():
                bits[i >> 3] = bits.get(i >> 3, 0) | 1 << (i & 7)
                os.pwrite(fd, page, po + i * PAGE_SIZE)
            for at, byte in bits.items():
                os.pwrite(fd, bytes((byte,)), bm + at)
            pos = nxt
        tail = [
            EndOfSection(),
            SectionFooter(1),
            CommandRecord(Command.SWITCHOVER_START),
            SectionEnd(1),
            EndOfSection(),
            SectionFooter(1),
        ]
        data = b"".join(encode(r) for r in tail) + device_blob()
        data += encode(EndOfFile()) + encode(VMDescription(vmdesc()))
        os.pwrite(fd, data, pos)
    finally:
        os.close(fd)
    return headers
