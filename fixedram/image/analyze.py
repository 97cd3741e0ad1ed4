"""Describe an image and write out one RAM block (``fixedram analyze`` and ``fixedram extract``).

:func:`analyze_image` returns a plain dict following ``docs/analyze-schema.md`` (schema 1);
:func:`format_report` renders that dict for people. For a mapped-ram image everything is
read from metadata only: the stream prefix, each block's 28-byte header and bitmap, and the
tail (device state and VM description). No page data is read, and allocation is measured
with ``SEEK_DATA``/``SEEK_HOLE``, so a multi-GiB image is described in milliseconds.

:func:`extract_block` writes a block's RAM as a raw file of the block's length: holes where
the image holds no page data, one positioned write per run of pages of at most 1 MiB.
"""

from __future__ import annotations

import errno
import os
from typing import Any

from fixedram.image import Image, open_image
from fixedram.image.layout import PAGE_SIZE, bitmap_bytes
from fixedram.image.reader import READ_CHUNK
from fixedram.units import format_size

__all__ = ["SCHEMA_VERSION", "analyze_image", "data_bytes", "extract_block", "format_report"]

#: Version of the ``--json`` document; bumped on incompatible changes.
SCHEMA_VERSION = 1


def data_bytes(fd: int, start: int, end: int) -> int:
    """Bytes of ``[start, end)`` of the file ``fd`` that lie in data extents (not holes).

    Uses ``SEEK_DATA``/``SEEK_HOLE``; on a filesystem without hole support the whole range
    counts as data.
    """
    total = 0
    pos = start
    while pos < end:
        try:
            data = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:  # no data after pos
                break
            raise
        if data >= end:
            break
        hole = os.lseek(fd, data, os.SEEK_HOLE)
        total += min(hole, end) - data
        pos = hole
    return total


def _block_report(img: Image, name: str) -> dict[str, Any]:
    blk = img.blocks[name]
    present = img.count_present(name)
    out: dict[str, Any] = {
        "name": name,
        "length": blk.length,
        "page_size": blk.mapped.page_size if blk.mapped is not None else PAGE_SIZE,
        "pages": blk.npages,
        "pages_present": present,
        "pages_absent": blk.npages - present,
        "guest_addr": blk.guest_addr,
        "mapped": None,
    }
    if blk.mapped is not None:
        m = blk.mapped
        out["mapped"] = {
            "version": m.version,
            "bitmap_offset": m.bitmap_offset,
            "bitmap_bytes": bitmap_bytes(blk.npages),
            "pages_offset": m.pages_offset,
            "pages_end": m.pages_offset + blk.length,
            "allocated_bytes": _allocated(img, name, m.pages_offset, blk.length),
        }
    return out


def _allocated(img: Image, name: str, start: int, length: int) -> int:
    """Bytes block ``name``'s page data takes: on disk, or for an object image in the
    store (its stored chunks)."""
    if img.pages_in_file:
        return data_bytes(img.fileno(), start, start + length)
    from fixedram.image.objimage import ObjectImage

    assert isinstance(img, ObjectImage)
    return img.stored_bytes(name)


def _device_sections(desc: Any) -> list[dict[str, Any]]:
    """The device sections the VM description lists, in stream order."""
    if not isinstance(desc, dict) or not isinstance(desc.get("devices"), list):
        return []
    out = []
    for dev in desc["devices"]:
        if not isinstance(dev, dict) or not isinstance(dev.get("name"), str):
            continue
        inst = dev.get("instance_id", 0)
        ver = dev.get("version")
        out.append(
            {
                "name": dev["name"],
                "instance_id": inst if isinstance(inst, int) else 0,
                "version": ver if isinstance(ver, int) else None,
            }
        )
    return out


def analyze_image(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Describe the image at ``path`` as a dict following ``docs/analyze-schema.md``.

    Raises :class:`~fixedram.errors.ImageError` (with the byte offset) if the image is
    malformed or incomplete.
    """
    with open_image(path) as img:
        blocks = [_block_report(img, name) for name in img.blocks]
        desc = img.vmdesc_json()
        page_size = desc.get("page_size") if isinstance(desc, dict) else None
        mapped = img.format == "mapped-ram"
        ram_alloc = sum(b["mapped"]["allocated_bytes"] for b in blocks) if mapped else None
        present = sum(b["pages_present"] for b in blocks)
        pages = sum(b["pages"] for b in blocks)
        devices = _device_sections(desc)
        working_set = None
        if mapped:
            from fixedram.image.workingset import load

            working_set = load(img).describe()
        return {
            "schema": SCHEMA_VERSION,
            "path": img.where,
            "format": img.format,
            "machine": img.machine,
            "capabilities": list(img.capabilities),
            "stream_offset": img.base_offset,
            "libvirt": img.libvirt.as_dict() if img.libvirt is not None else None,
            "commands": list(img.commands),
            "ram": {
                "bytes": img.ram_size,
                "blocks": len(blocks),
                "pages": pages,
                "pages_present": present,
                "pages_absent": pages - present,
                "allocated_bytes": ram_alloc,
            },
            "blocks": blocks,
            "device_state": {
                "bytes": len(img.device_state),
                "sections": devices,
            },
            "vmdesc": {
                "present": img.vmdesc is not None,
                "bytes": len(img.vmdesc) if img.vmdesc is not None else 0,
                "page_size": page_size if isinstance(page_size, int) else None,
            },
            "file": {
                "apparent_bytes": img.file_size,
                "allocated_bytes": img.allocated_bytes(),
            },
            "working_set": working_set,
        }


def format_report(report: dict[str, Any]) -> str:
    """Render an :func:`analyze_image` dict as text for people."""
    r = report
    ram = r["ram"]
    lines = [f"image:         {r['path']}"]
    lv = r.get("libvirt")
    if lv is not None:
        d = lv["domain"]
        where = ("stream decompressed from" if lv["format"] not in ("raw", "sparse")
                 else "stream") + f" byte {lv['payload_offset']}"
        lines += [
            f"libvirt:       save image v{lv['version']}, format {lv['format']} ({where}), "
            f"restores {'running' if lv['was_running'] else 'paused'}",
            f"domain:        {d['name']} ({d['type']}), {format_size(d['memory'])} RAM, "
            f"{d['vcpus']} vCPU{'s' if d['vcpus'] != 1 else ''}, machine {d['machine']}",
        ]
    lines += [
        f"format:        {r['format']} (stream at byte {r['stream_offset']})",
        f"machine:       {r['machine']}",
        f"capabilities:  {', '.join(r['capabilities']) or '(none)'}",
    ]
    if r["commands"]:
        lines.append(f"commands:      {', '.join(r['commands'])}")
    lines.append(
        f"RAM:           {format_size(ram['bytes'])} ({ram['bytes']} bytes) in {ram['blocks']} "
        f"blocks; {ram['pages_present']} of {ram['pages']} pages present, {ram['pages_absent']} "
        "zero/absent"
        + (
            f"; {format_size(ram['allocated_bytes'])} allocated"
            if ram["allocated_bytes"] is not None
            else ""
        )
    )
    f = r["file"]
    lines.append(
        f"file:          {f['apparent_bytes']} bytes apparent, "
        f"{f['allocated_bytes']} bytes allocated"
    )
    lines.append("")
    mapped = r["format"] == "mapped-ram"
    head = f"  {'block':<24} {'length':>12} {'page':>5} {'present':>9} {'absent':>9}"
    if mapped:
        head += f" {'allocated':>12} {'bitmap@':>12} {'pages@':>12}"
    lines.append(head)
    for b in r["blocks"]:
        row = (
            f"  {b['name']:<24} {b['length']:>12} {b['page_size']:>5} "
            f"{b['pages_present']:>9} {b['pages_absent']:>9}"
        )
        m = b["mapped"]
        if m is not None:
            row += (
                f" {m['allocated_bytes']:>12} {hex(m['bitmap_offset']):>12} "
                f"{hex(m['pages_offset']):>12}"
            )
        lines.append(row)
    lines.append("")
    d = r["device_state"]
    secs = [s["name"] + (f"/{s['instance_id']}" if s["instance_id"] else "") for s in d["sections"]]
    lines.append(f"device state:  {d['bytes']} bytes, {len(secs)} sections named by the vmdesc")
    for i in range(0, len(secs), 6):
        lines.append("  " + "  ".join(secs[i : i + 6]))
    v = r["vmdesc"]
    vd = f"present, {v['bytes']} bytes" if v["present"] else "absent"
    lines.append(f"vmdesc:        {vd}")
    ws = r.get("working_set")
    if ws is not None:
        lines.append(f"working set:   {ws['status']}: {ws['pages']} pages in {ws['runs']} runs, "
                     f"{ws['restores']} restores merged"
                     + (f", {ws['damaged_copies']} damaged copies" if ws["damaged_copies"]
                        else ""))
    from fixedram.errors import printable  # names come from the file: no control characters

    return "\n".join(printable(line) for line in lines)


def extract_block(path: str | os.PathLike[str], block: str, out: str | os.PathLike[str]) -> int:
    """Write RAM block ``block`` of the image at ``path`` to ``out`` as raw memory.

    The output is exactly the block's length; pages the image holds no data for are left
    as holes (they read as zero). It appears under its name only once complete. Returns
    the number of bytes of the block.
    """
    from fixedram.io.files import AtomicFile

    with open_image(path) as img:
        blk = img.block(block)
        # written under a temporary name and renamed when complete: a bad image (or a full
        # disk) half way through leaves no partial output behind
        with AtomicFile(out, mode=0o644) as f:
            fd = f.fd
            os.ftruncate(fd, blk.length)
            for first, data in img.iter_data(block, chunk=READ_CHUNK):
                off = first * PAGE_SIZE
                done = 0
                while done < len(data):
                    done += os.pwrite(fd, data[done:], off + done)
            f.commit()
        return blk.length
