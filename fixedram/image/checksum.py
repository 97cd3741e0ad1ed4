"""The fixedram checksum extension of a mapped-ram image (``docs/checksums.md``).

Per-extent checksums of every RAM block, plus digests of the metadata QEMU reads
(stream prefix, block headers, bitmaps, device state, VM description), stored in
the **padding** between one block's bitmap and its 1 MiB-aligned pages region.
QEMU never reads that padding (it reads the bitmap, then only runs of set bits
from ``pages_offset``), the file keeps its exact size and layout, and QEMU 10
loads the image natively.

Two levels of xxh3-64 (the maintained ``xxhash`` package):

* every page of a block gets ``xxh3_64(page)``; a page without data (bit clear)
  counts as a zero page, the RAM ``send``/``extract`` (and a fresh destination)
  give it;
* every extent of ``2**extent_shift`` bytes (1 MiB by default, 256 pages; the last
  one may be shorter) gets ``xxh3_64`` of its pages' digests as big-endian u64.

The receiver can therefore keep one 8-byte digest per page while pages are
(re)written during a live save, and combine them per extent at the end, without
reading the image back. The stored extension costs 8 bytes per extent (8 KiB per
GiB of RAM at 1 MiB extents); the extent size doubles until the extension fits in
the largest padding (about 1 MiB: 128 GiB of RAM at 1 MiB extents).

The extension becomes visible only through its 8-byte magic, written last (after
the rest is durable, for :func:`store`'s in-place update), so an interrupted update
leaves either no extension or a complete one.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import xxhash

from fixedram._lazy import numpy as np
from fixedram.errors import ImageError
from fixedram.image.extensions import BlockGeometry, ExtensionError, Geometry
from fixedram.image.layout import PAGE_SIZE, page_slices
from fixedram.image.sparse import SparseArray

__all__ = [
    "MAGIC",
    "VERSION",
    "ALG_XXH3_PAGES",
    "DEFAULT_EXTENT_SHIFT",
    "ZERO_PAGE_DIGEST",
    "BlockGeometry",
    "Geometry",
    "BlockSums",
    "Checksums",
    "Found",
    "ChecksumError",
    "PageDigests",
    "DIGEST_CHUNK_SHIFT",
    "zero_extent_digest",
    "page_digest_array",
    "digest_pages",
    "digest_views",
    "digests_of",
    "extent_digests",
    "extent_digest",
    "compute",
    "encode",
    "decode",
    "find",
    "store",
    "hash_range",
]

#: First 8 bytes of the extension; written last, it is what makes an extension exist.
MAGIC = b"FXRAMCK\x00"
#: Format version this module writes and reads.
VERSION = 1
#: Algorithm 1: xxh3-64 of each page, xxh3-64 of each extent's page digests (big-endian u64).
ALG_XXH3_PAGES = 1
ALGORITHMS = {ALG_XXH3_PAGES: "xxh3-64/page+extent"}
#: 1 MiB extents unless the extension would not fit.
DEFAULT_EXTENT_SHIFT = 20
#: Largest extent (1 TiB): beyond that the block has one extent anyway.
MAX_EXTENT_SHIFT = 40
HEADER = struct.Struct(">8sHHBBBBII5Q")  # 64 bytes
#: Per-block entry before its extent digests: name (u8 len + bytes) then this.
ENTRY = struct.Struct(">QQQQI")
#: Caps applied while parsing (the extension lives in < 1 MiB of padding anyway).
MAX_BLOCKS = 4096
MAX_BODY = 64 << 20

_PAGE_SHIFT = PAGE_SIZE.bit_length() - 1
_h = xxhash.xxh3_64_intdigest

#: Digest of a page of zeros (a page without data in the image).
ZERO_PAGE_DIGEST: int = _h(bytes(PAGE_SIZE))

Buffer = bytes | bytearray | memoryview

assert HEADER.size == 64


class ChecksumError(ExtensionError):
    """The checksum extension is damaged, unsupported, or cannot be written."""


# -- digests -----------------------------------------------------------------------------


def page_digest_array(npages: int) -> np.ndarray:
    """Digests of ``npages`` pages without data (zero pages)."""
    return np.full(npages, ZERO_PAGE_DIGEST, dtype=np.uint64)


def digest_pages(out: np.ndarray, first: int, bufs: Sequence[Buffer]) -> int:
    """Set ``out[first:]`` to the digests of the whole pages in ``bufs``; returns pages.

    The pages are sliced and hashed by ``map`` in C: no Python runs per page.
    """
    views = [memoryview(b).cast("B") for b in bufs]
    if any(len(v) % PAGE_SIZE for v in views):
        views = [memoryview(b"".join(views))]
    i = first
    for v in views:
        n = len(v) >> _PAGE_SHIFT
        if n:
            out[i : i + n] = digest_views(map(v.__getitem__, page_slices(n)), n)
        i += n
    return i - first


def digest_views(views: Iterable[Buffer], n: int) -> np.ndarray:
    """The digests of ``n`` one-page views, as an array (hashed by ``map`` in C)."""
    return np.fromiter(map(_h, views), dtype=np.uint64, count=n)


def digests_of(bufs: Sequence[Buffer]) -> np.ndarray:
    """The digests of the whole pages in ``bufs``, as a new array."""
    if len(bufs) == 1:  # the usual case: one run of pages in one buffer
        v = memoryview(bufs[0]).cast("B")
        n = len(v) >> _PAGE_SHIFT
        if n << _PAGE_SHIFT == len(v):
            return digest_views(map(v.__getitem__, page_slices(n)), n)
    out = np.empty(sum(len(memoryview(b).cast("B")) for b in bufs) >> _PAGE_SHIFT,
                   dtype=np.uint64)
    digest_pages(out, 0, bufs)
    return out


def extent_digests(pages: np.ndarray, extent_shift: int) -> np.ndarray:
    """Per-extent digests from per-page digests."""
    per = 1 << (extent_shift - _PAGE_SHIFT)
    raw = pages.astype(">u8").tobytes()
    step = per * 8
    return np.array([_h(raw[i : i + step]) for i in range(0, len(raw), step)],
                    dtype=np.uint64)


def extent_digest(pages: np.ndarray) -> int:
    """The digest of one extent from its pages' digests (one of :func:`extent_digests`)."""
    return _h(pages.astype(">u8").data)


#: Pages per chunk of :class:`PageDigests` (1 MiB of guest RAM, 2 KiB of digests).
DIGEST_CHUNK_SHIFT = 8


def zero_extent_digest(npages: int) -> int:
    """The digest of an extent of ``npages`` zero pages."""
    return _h(np.full(npages, ZERO_PAGE_DIGEST, dtype=">u8").tobytes())


class PageDigests:
    """One digest per page of every block, kept while pages are written; sparse.

    :class:`~fixedram.image.writer.MappedRamWriter` updates it as it writes and zeroes
    pages (under its own lock when channels write), so at the end the
    digests describe the final content however often a page was rewritten. Digests
    live in chunks of 256 pages (2 KiB each, a :class:`~fixedram.image.sparse.SparseArray`)
    made when a page of the chunk is first written: memory follows the data that arrived
    (2 MiB per GiB of pages with data), never the size a block claims; a page of a chunk
    never written counts as zero.
    """

    def __init__(self, blocks: Mapping[str, int]) -> None:
        self.npages = {name: length // PAGE_SIZE for name, length in blocks.items()}
        self.blocks = {name: SparseArray(n, DIGEST_CHUNK_SHIFT, np.uint64, ZERO_PAGE_DIGEST)
                       for name, n in self.npages.items()}

    def write(self, block: str, first_page: int, bufs: Sequence[Buffer]) -> None:
        self.store(block, first_page, digests_of(bufs))

    def store(self, block: str, first_page: int, digests: np.ndarray) -> None:
        """Set the digests of pages ``first_page, ...`` (one per element of ``digests``)."""
        self.blocks[block].store(first_page, digests)

    def zero(self, block: str, first_page: int, npages: int) -> None:
        self.blocks[block].reset(first_page, npages)

    def store_at(self, block: str, pages: np.ndarray, digests: np.ndarray) -> None:
        """Set the digests of the pages numbered in ``pages`` (one per element)."""
        self.blocks[block].store_at(pages, digests)

    def zero_at(self, block: str, pages: np.ndarray) -> None:
        """The pages numbered in ``pages`` are zero pages again."""
        self.blocks[block].reset_at(pages)

    def extent_digests(self, block: str, extent_shift: int) -> np.ndarray:
        """The block's per-extent digests (as :func:`extent_digests` of all its pages).

        Costs one array entry per extent plus work for the chunks that hold data: an
        extent without any is the (shared) digest of an extent of zero pages.
        """
        sp = self.blocks[block]
        npages = sp.npages
        per = 1 << (extent_shift - _PAGE_SHIFT)
        n_ext = -(-npages // per)
        full = npages // per
        out = np.empty(n_ext, dtype=np.uint64)
        if full:
            out[:full] = zero_extent_digest(per)
        if n_ext > full:
            out[full] = zero_extent_digest(npages - full * per)
        step = sp.size
        touched = sorted({e for ci in sp.chunks
                          for e in range((ci * step) // per, ((ci + 1) * step - 1) // per + 1)
                          if e < n_ext})
        for e in touched:
            first = e * per
            out[e] = _h(sp.get(first, min(per, npages - first)).astype(">u8").tobytes())
        return out

    @property
    def nbytes(self) -> int:
        """Memory held (bytes)."""
        return sum(sp.nbytes for sp in self.blocks.values())


_ZEROS = bytes(1 << 20)


def _next_data(fd: int, pos: int, end: int) -> int:
    """Where data resumes at or after ``pos`` (``end`` if only a hole follows; ``pos``
    where the filesystem cannot tell)."""
    try:
        return min(os.lseek(fd, pos, os.SEEK_DATA), end)
    except OSError:
        return end if pos < os.fstat(fd).st_size else pos


def hash_range(fd: int, start: int, end: int) -> int:
    """xxh3-64 of file bytes ``[start, end)`` (reads 1 MiB at a time; short file: error).

    Holes are hashed as zeros without reading them, so a mostly empty bitmap of a huge
    block costs hashing, not I/O.
    """
    h = xxhash.xxh3_64()
    if end > start and os.fstat(fd).st_size < end:
        raise ImageError(f"file ends at byte {os.fstat(fd).st_size}, expected data up to "
                         f"byte {end}", os.fstat(fd).st_size)
    pos = start
    while pos < end:
        data_at = _next_data(fd, pos, end)
        while pos < data_at:
            k = min(len(_ZEROS), data_at - pos)
            h.update(memoryview(_ZEROS)[:k])
            pos += k
        if pos >= end:
            break
        data = os.pread(fd, min(1 << 20, end - pos), pos)
        if not data:
            raise ImageError(f"file ends at byte {pos}, expected data up to byte {end}", pos)
        h.update(data)
        pos += len(data)
    return h.intdigest()


# -- the extension -------------------------------------------------------------------------


@dataclass
class BlockSums:
    """Checksums of one block."""

    name: str
    length: int
    pages_offset: int
    header_digest: int
    bitmap_digest: int
    extents: np.ndarray  # uint64, one per extent


@dataclass
class Checksums:
    """A decoded (or computed) checksum extension."""

    extent_shift: int
    stream_end: int
    tail_digest: int
    blocks: list[BlockSums]
    algorithm: int = ALG_XXH3_PAGES
    version: int = VERSION
    slot: int = -1  # where it was found (-1: not stored)
    size: int = 0  # bytes it occupies

    @property
    def extent_size(self) -> int:
        return 1 << self.extent_shift

    def by_name(self) -> dict[str, BlockSums]:
        return {b.name: b for b in self.blocks}

    def describe(self) -> dict[str, Any]:
        """A JSON-friendly summary."""
        return {"version": self.version, "algorithm": ALGORITHMS.get(self.algorithm, "?"),
                "extent_size": self.extent_size, "file_offset": self.slot, "size": self.size,
                "extents": int(sum(len(b.extents) for b in self.blocks)),
                "blocks": [b.name for b in self.blocks]}


def _entry_size(name: str, length: int, shift: int) -> int:
    return 1 + len(name.encode()) + ENTRY.size + 8 * (-(-length >> shift))


def encoded_size(geom: Geometry, shift: int) -> int:
    """Bytes of the extension for ``geom`` at extents of ``2**shift`` bytes."""
    return HEADER.size + sum(_entry_size(b.name, b.length, shift) for b in geom.blocks)


def encode(cs: Checksums) -> bytes:
    """The extension as stored (magic included)."""
    body = bytearray()
    for b in cs.blocks:
        name = b.name.encode()
        body += bytes([len(name)]) + name
        body += ENTRY.pack(b.length, b.pages_offset, b.header_digest, b.bitmap_digest,
                           len(b.extents))
        body += b.extents.astype(">u8").tobytes()
    head = HEADER.pack(MAGIC, cs.version, HEADER.size, cs.algorithm, _PAGE_SHIFT,
                       cs.extent_shift, 0, len(cs.blocks), 0, len(body), cs.stream_end,
                       cs.tail_digest, _h(bytes(body)), 0)
    head = head[:56] + _h(head[8:56]).to_bytes(8, "big")
    return head + bytes(body)


def decode(head: bytes, read_body: Callable[[int], bytes], *, room: int) -> Checksums:
    """Parse an extension whose 64-byte header is ``head``; ``read_body(n)`` reads the rest.

    Every length is checked against the header's own caps and ``room`` before anything
    is read or allocated. Raises :class:`ChecksumError` when damaged or unsupported.
    """
    (magic, version, hsize, alg, pshift, eshift, _flags, nblocks, _r, body_size, stream_end,
     tail, body_digest, header_digest) = HEADER.unpack(head)
    if magic != MAGIC:
        raise ChecksumError("no checksum extension magic")
    if _h(head[8:56]) != header_digest:
        raise ChecksumError("checksum extension header is damaged (its own digest differs)")
    if version != VERSION:
        raise ChecksumError(f"checksum extension version {version} is not supported "
                            f"(this fixedram reads version {VERSION})")
    if hsize != HEADER.size or alg not in ALGORITHMS or pshift != _PAGE_SHIFT:
        raise ChecksumError(f"checksum extension has an unsupported header (size {hsize}, "
                            f"algorithm {alg}, page shift {pshift})")
    if not _PAGE_SHIFT <= eshift <= MAX_EXTENT_SHIFT:
        raise ChecksumError(f"checksum extension extent shift {eshift} out of range")
    if nblocks > MAX_BLOCKS or body_size > min(MAX_BODY, room - HEADER.size):
        raise ChecksumError(f"checksum extension claims {nblocks} blocks in {body_size} "
                            f"bytes (room: {room - HEADER.size})")
    body = read_body(body_size)
    if len(body) != body_size or _h(body) != body_digest:
        raise ChecksumError("checksum extension is damaged (body digest differs)")
    blocks: list[BlockSums] = []
    p = 0
    try:
        for _ in range(nblocks):
            n = body[p]
            name = body[p + 1 : p + 1 + n].decode()
            p += 1 + n
            length, poff, hd, bd, next_ = ENTRY.unpack_from(body, p)
            p += ENTRY.size
            if next_ != -(-length >> eshift) or p + 8 * next_ > body_size:
                raise ChecksumError(f"checksum extension: block '{name}' has {next_} extents "
                                    f"for {length} bytes")
            ext = np.frombuffer(body, dtype=">u8", count=next_, offset=p).astype(np.uint64)
            p += 8 * next_
            blocks.append(BlockSums(name, length, poff, hd, bd, ext))
    except (IndexError, struct.error, UnicodeDecodeError):
        raise ChecksumError("checksum extension: block entries are malformed") from None
    if p != body_size:
        raise ChecksumError("checksum extension: block entries do not fill its body")
    return Checksums(eshift, stream_end, tail, blocks, alg, version,
                     size=HEADER.size + body_size)


@dataclass
class Found:
    """What :func:`find` saw: an extension, a damaged one, or none."""

    checksums: Checksums | None = None
    error: str | None = None  # set when an extension magic was found but it is unusable
    slots: list[int] = field(default_factory=list)  # every slot holding the magic


def find(fd: int, geom: Geometry) -> Found:
    """Look for the extension in each block's padding slot (one 8-byte read per block)."""
    found = Found()
    for b in geom.blocks:
        if b.room < HEADER.size or b.slot + HEADER.size > geom.stream_end:
            continue
        head = os.pread(fd, HEADER.size, b.slot)
        if head[: len(MAGIC)] != MAGIC:
            # all-zero magic: never committed, or cleared (no extension). A different magic
            # on a header whose own digest holds: the magic itself was damaged.
            if (len(head) == HEADER.size and any(head[: len(MAGIC)])
                    and head[8:56] != bytes(48) and _h(head[8:56]) == int.from_bytes(
                        head[56:], "big")):
                found.slots.append(b.slot)
                if found.checksums is None:
                    found.error = found.error or (f"checksum extension magic is damaged "
                                                  f"(at byte {b.slot})")
            continue
        found.slots.append(b.slot)
        if found.checksums is not None:
            continue
        body_at = b.slot + HEADER.size

        def read_body(n: int, at: int = body_at) -> bytes:
            return os.pread(fd, n, at)

        try:
            cs = decode(head, read_body, room=b.room)
        except ChecksumError as e:
            found.error = found.error or f"{e} (at byte {b.slot})"
            continue
        cs.slot = b.slot
        found.checksums = cs
        found.error = None
    return found


def _meta_digests(fd: int, geom: Geometry) -> tuple[dict[str, tuple[int, int]], int]:
    per: dict[str, list[int]] = {}
    tail = 0
    for name, what, start, end in geom.meta_regions():
        d = hash_range(fd, start, end)
        if what == "tail":
            tail = d
        else:
            per.setdefault(name, []).append(d)
    return {k: (v[0], v[1]) for k, v in per.items()}, tail


def compute(fd: int, geom: Geometry,
            extents: Callable[[str, int], np.ndarray]) -> Checksums:
    """The extension for the file behind ``fd`` (metadata read back, pages from digests).

    ``extents(name, shift)`` returns block ``name``'s extent digests for extents of
    ``2**shift`` bytes (:meth:`PageDigests.extent_digests` while writing, or computed from
    the image's pages). The extent size is the smallest (from 1 MiB up) whose extension
    fits in the largest :meth:`Geometry.checksum_room`; :class:`ChecksumError` if even one
    extent per block does not fit.
    """
    try:
        geom.check()
    except ExtensionError as e:
        raise ChecksumError(str(e)) from None
    room = max((geom.checksum_room(b) for b in geom.blocks), default=0)
    shift = DEFAULT_EXTENT_SHIFT
    while encoded_size(geom, shift) > room:
        if shift >= MAX_EXTENT_SHIFT:
            raise ChecksumError(f"no room for checksums: the largest padding between a "
                                f"bitmap and its pages is {room} bytes")
        shift += 1
    meta, tail = _meta_digests(fd, geom)
    blocks = [BlockSums(b.name, b.length, b.pages_offset, *meta[b.name],
                        extents(b.name, shift)) for b in geom.blocks]
    return Checksums(shift, geom.stream_end, tail, blocks)


def _fdatasync(fd: int) -> None:
    os.fdatasync(fd)


def store(fd: int, geom: Geometry, cs: Checksums, *, durable: bool = True,
          clear: Iterable[int] = ()) -> int:
    """Write ``cs`` into the slot of :meth:`Geometry.checksum_block`; returns its offset.

    ``clear`` are slots holding an older extension: their magic is zeroed first. With
    ``durable`` (updating an existing image in place) each step is synced before the
    next: clear old magics, write everything but the magic, write the magic. A crash
    at any point leaves no extension or a complete one (the magic is 8 bytes inside
    one 64-byte aligned slot, so it is never torn across sectors). Without ``durable``
    (a new image that is fsynced and renamed afterwards) it is one plain write.
    """
    data = encode(cs)
    slot_blk = geom.checksum_block()
    if slot_blk is None or len(data) > geom.checksum_room(slot_blk):
        raise ChecksumError(f"checksum extension of {len(data)} bytes does not fit in "
                            f"the padding")
    at = slot_blk.slot
    if not durable:
        for old in clear:
            if old != at:
                os.pwrite(fd, bytes(len(MAGIC)), old)
        _pwrite_all(fd, data, at)
        cs.slot, cs.size = at, len(data)
        return at
    olds = list(clear)
    if olds:
        for old in olds:
            os.pwrite(fd, bytes(len(MAGIC)), old)
        _fdatasync(fd)
    _pwrite_all(fd, data[len(MAGIC):], at + len(MAGIC))
    _fdatasync(fd)
    _pwrite_all(fd, data[: len(MAGIC)], at)
    _fdatasync(fd)
    cs.slot, cs.size = at, len(data)
    return at


def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    mv = memoryview(data)
    while mv:
        n = os.pwrite(fd, mv, offset)
        if n <= 0:
            raise OSError("short write")
        mv, offset = mv[n:], offset + n



def write_new(fd: int, geom: Geometry, digests: PageDigests) -> Checksums | None:
    """Checksum a freshly written image (the writer's :meth:`finish`), not synced.

    Metadata is read back through ``fd`` (or a read-only reopen if ``fd`` is
    write-only); page digests come from ``digests``. Returns None, writing nothing,
    when no padding has room for the extension (never seen with QEMU's layouts): the
    image is still valid, just without checksums.
    """
    rfd = fd
    try:
        os.pread(fd, 1, 0)
    except OSError:
        rfd = os.open(f"/proc/self/fd/{fd}", os.O_RDONLY)
    try:
        cs = compute(rfd, geom, digests.extent_digests)
    except ChecksumError:
        return None
    finally:
        if rfd != fd:
            os.close(rfd)
    store(fd, geom, cs, durable=False)
    return cs
