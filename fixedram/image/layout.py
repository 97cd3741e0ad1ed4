"""Geometry of QEMU's mapped-ram file layout, declared once.

A mapped-ram file is a migration stream whose RAM setup record is followed, for
each block, by the block's page bitmap and a pages region at fixed offsets::

    header | config | START ram | MEM_SIZE | for each block:
        name, used_length, 28-byte MappedRamHeader
        bitmap  (at bitmap_offset = right after the header; ceil(pages/64) * 8 bytes)
        padding (up to pages_offset, a 1 MiB boundary)
        pages   (used_length bytes; page i at pages_offset + i * page_size)
    EOS footer | PART/END ram | device state | EOF | vmdesc

Bitmap bits are QEMU's in-memory ``unsigned long`` words dumped raw, so on the
little-endian 64-bit hosts fixedram supports, page ``i`` is bit ``i & 7`` of byte
``i >> 3``. A set bit means the page's data is in the file; a clear bit means the
page was zero (or never sent).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator

from fixedram._lazy import numpy as np
from fixedram.stream.format import MAPPED_RAM_ALIGN, MAPPED_RAM_HEADER, TARGET_PAGE_SIZE

__all__ = [
    "PAGE_SIZE",
    "MAPPED_RAM_HEADER_SIZE",
    "bitmap_bytes",
    "align_up",
    "block_geometry",
    "bitmap_to_bools",
    "bools_to_bitmap",
    "runs",
    "run_arrays",
    "bitmap_runs",
    "bitmap_run_arrays",
    "BITMAP_PIECE_PAGES",
    "page_slices",
    "index_runs",
    "SPAN_FACTOR",
    "one_stretch",
    "page_ranges",
    "groups",
    "page_groups",
    "gap_arrays",
]

#: Pages covered by one piece of a bitmap read at a time (128 KiB of bitmap, 4 GiB of RAM):
#: what walks a bitmap holds at most this many pages' state, at any RAM size.
BITMAP_PIECE_PAGES = 1 << 20

PAGE_SIZE = TARGET_PAGE_SIZE

#: A group of scattered pages is read, read ahead or written back as the one stretch it
#: lies in, gaps included, where that stretch is at most this many times the group's own
#: size: a page of gap costs less than one more system call.
SPAN_FACTOR = 4

#: Bytes of a block's mapped-ram header (version, page size, bitmap and pages offsets);
#: QEMU writes the bitmap right behind it, so the header starts this far before the bitmap.
MAPPED_RAM_HEADER_SIZE = MAPPED_RAM_HEADER.size


def _no_runs() -> tuple[np.ndarray, np.ndarray]:
    """No runs, as :func:`run_arrays` and :func:`bitmap_run_arrays` give them."""
    return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)


def bitmap_bytes(npages: int) -> int:
    """Size on disk of the bitmap of a block of ``npages`` pages (whole 64-bit words)."""
    return (npages + 63) // 64 * 8


def align_up(value: int, align: int) -> int:
    """``value`` rounded up to a multiple of ``align``."""
    return (value + align - 1) // align * align


def block_geometry(header_pos: int, length: int) -> tuple[int, int, int]:
    """Offsets QEMU uses for a block whose mapped-ram header starts at ``header_pos``.

    Returns ``(bitmap_offset, pages_offset, next_record_offset)``, all absolute.
    """
    bitmap_offset = header_pos + MAPPED_RAM_HEADER_SIZE
    npages = length // PAGE_SIZE
    pages_offset = align_up(bitmap_offset + bitmap_bytes(npages), MAPPED_RAM_ALIGN)
    return bitmap_offset, pages_offset, pages_offset + length


def bitmap_to_bools(raw: bytes | bytearray | memoryview, npages: int) -> np.ndarray:
    """A raw on-disk bitmap as one bool per page."""
    bits = np.unpackbits(np.frombuffer(raw, dtype=np.uint8), bitorder="little")
    return bits[:npages].astype(bool)


def bools_to_bitmap(present: np.ndarray) -> bytes:
    """One bool per page as a raw on-disk bitmap (padded to whole 64-bit words)."""
    n = len(present)
    packed = np.packbits(present.astype(np.uint8), bitorder="little").tobytes()
    return packed + b"\x00" * (bitmap_bytes(n) - len(packed))


def runs(present: np.ndarray) -> Iterator[tuple[int, int]]:
    """Maximal runs of True as ``(first_page, npages)``, in order (vectorised)."""
    starts, lengths = run_arrays(present)
    return zip(starts.tolist(), lengths.tolist(), strict=True)


def run_arrays(present: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """:func:`runs` as two arrays: first pages and lengths."""
    if not len(present):
        return _no_runs()
    edges = np.diff(np.concatenate(([0], present.view(np.uint8), [0])).astype(np.int8))
    starts = np.flatnonzero(edges == 1)
    return starts, np.flatnonzero(edges == -1) - starts


def groups(keys: np.ndarray) -> list[tuple[int, int]]:
    """``(start, end)`` of each stretch of equal neighbouring values of ``keys`` (numpy)."""
    cuts = [0, *(np.flatnonzero(np.diff(keys)) + 1).tolist(), len(keys)]
    return list(itertools.pairwise(cuts))


def index_runs(pages: np.ndarray) -> list[tuple[int, int, int]]:
    """``(index, first, count)`` for each run of consecutive values of the increasing
    integers ``pages`` (page numbers): ``pages[index : index + count]`` is
    ``first, first + 1, …``. Found with numpy, one tuple per run."""
    n = len(pages)
    if not n:
        return []
    if n == 1 or (int(pages[-1]) - int(pages[0]) == n - 1 and (np.diff(pages) == 1).all()):
        return [(0, int(pages[0]), n)]
    cuts = [0, *(np.flatnonzero(np.diff(pages) != 1) + 1).tolist(), n]
    firsts = pages[cuts[:-1]].tolist()
    return [(a, f, z - a) for f, a, z in zip(firsts, cuts[:-1], cuts[1:], strict=True)]


def one_stretch(width: int, size: int) -> bool:
    """Whether something of ``size`` (pages or bytes) lying in a stretch ``width`` wide
    is handled as that one stretch (:data:`SPAN_FACTOR`)."""
    return width <= SPAN_FACTOR * size


def page_ranges(pages: np.ndarray, runs: list[tuple[int, int, int]] | None = None,
                ) -> list[tuple[int, int]]:
    """``(first, npages)`` ranges covering the distinct page numbers ``pages``: the one
    stretch from the lowest to the highest where :func:`one_stretch`, else each run of
    consecutive pages (``runs``: their :func:`index_runs`, if known)."""
    first = int(pages.min())
    width = int(pages.max()) + 1 - first
    if one_stretch(width, len(pages)):
        return [(first, width)]
    return [(f, k) for _, f, k in (runs if runs is not None else index_runs(pages))]


def bitmap_runs(raw: bytes | bytearray | memoryview, npages: int) -> Iterator[tuple[int, int]]:
    """Maximal runs ``(first, npages)`` of set bits among the first ``npages`` bits of
    ``raw`` (on-disk order), found as :func:`bitmap_run_arrays` finds them."""
    starts, lengths = bitmap_run_arrays(raw, npages)
    return zip(starts.tolist(), lengths.tolist(), strict=True)


def bitmap_run_arrays(raw: bytes | bytearray | memoryview,
                      npages: int) -> tuple[np.ndarray, np.ndarray]:
    """Maximal runs of set bits among the first ``npages`` bits of ``raw`` (on-disk order),
    as two arrays: first pages and lengths.

    ``raw`` holds whole 64-bit words. The runs are found from their edges, word-wise: a
    run starts at a set bit whose lower neighbour (across words too) is clear and ends at
    one whose upper neighbour is clear. Only the words holding an edge are unpacked, so
    the cost follows the number of runs, not the number of pages: a 4 GiB block's bitmap
    (16 Ki words) with few runs takes a few arrays of 128 KiB, where one bool per page
    would take 1 MiB and several passes over it. When runs start in most words, one bool
    per page is cheaper, and is used.
    """
    nwords = -(-npages // 64)
    words = np.frombuffer(raw, dtype="<u8", count=nwords)
    if npages % 64:  # bits beyond the last page are not the range's
        words = words.copy()
        words[-1] &= np.uint64((1 << (npages % 64)) - 1)
    if not words.any():
        return _no_runs()
    one, top = np.uint64(1), np.uint64(63)
    first = words << one  # bit i: bit i - 1 of the bitmap (in place from here: fewer arrays)
    carry = words[:-1] >> top
    first[1:] |= carry
    np.invert(first, out=first)
    first &= words  # set bits whose lower neighbour is clear
    if 2 * np.count_nonzero(first) > nwords:  # runs start in most words: per page is cheaper
        return run_arrays(bitmap_to_bools(raw, npages))
    last = np.right_shift(words, one)  # bit i: bit i + 1 of the bitmap
    np.left_shift(words[1:], top, out=carry)
    last[:-1] |= carry
    np.invert(last, out=last)
    last &= words  # set bits whose upper neighbour is clear
    starts = _set_bits(first)
    return starts, _set_bits(last) - starts + 1


def _set_bits(words: np.ndarray) -> np.ndarray:
    """Indices of the set bits of ``words`` (bit ``k`` of word ``w`` is ``64 * w + k``),
    in order; only the non-zero words are unpacked."""
    nz = np.flatnonzero(words)
    bits = np.unpackbits(words[nz].view(np.uint8), bitorder="little").reshape(len(nz), 64)
    return (nz[:, None] * 64 + np.arange(64))[bits.astype(bool)]


def bitmap_bits(raw: bytes | bytearray | memoryview, npages: int, skip: int = 0) -> int:
    """Bits ``skip`` to ``npages - 1`` of ``raw`` (on-disk order: bit ``k`` is page ``k``) as
    one integer, the others cleared: what counts and searches of a bitmap (its set bits'
    number, its last or first set bit) start from, without numpy (opening and checking an
    image does not load it)."""
    return int.from_bytes(raw, "little") & ((1 << npages) - 1) & ~((1 << skip) - 1)


_SLICES: dict[int, list[slice]] = {}


def page_slices(n: int, stride: int = PAGE_SIZE) -> list[slice]:
    """Slices of the pages of ``n`` consecutive records ``stride`` bytes apart (of ``n``
    pages of a buffer by default); made once per stride and reused, so a buffer's pages
    are cut by ``map`` in C."""
    sl = _SLICES.setdefault(stride, [])
    if n > len(sl):
        sl.extend(slice(k * stride, k * stride + PAGE_SIZE)
                  for k in range(len(sl), max(n, 256)))
    return sl[:n]


#: Pages of runs turned into page numbers at a time by :func:`page_groups` (512 KiB of
#: them; at most twice that).
_GROUP_PAGES = 1 << 16


def gap_arrays(pieces: Iterable[tuple[np.ndarray, np.ndarray]], npages: int,
               ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """The stretches of pages ``[0, npages)`` outside the runs of ``pieces`` (arrays of
    first pages and lengths, in order: :meth:`~fixedram.image.Image.run_arrays`; a run may
    come in two parts), as arrays of first pages and lengths, a pair per piece and one for
    the stretch after the last run: the pages an image holds no data for, in numpy steps
    whatever their number (what :func:`page_groups` takes)."""
    cursor = 0
    for starts, lengths in pieces:
        if not len(starts):
            continue
        ends = starts + lengths
        before = np.concatenate((np.array([cursor], dtype=ends.dtype), ends[:-1]))
        width = starts - before
        keep = width > 0
        if keep.any():
            yield before[keep], width[keep]
        cursor = int(ends[-1])
    if cursor < npages:
        yield np.array([cursor], dtype=np.int64), np.array([npages - cursor], dtype=np.int64)


def page_groups(pieces: Iterable[tuple[np.ndarray, np.ndarray]], size: int,
                ) -> Iterator[np.ndarray]:
    """The page numbers of the runs in ``pieces`` (arrays of first pages and lengths, in
    order: :meth:`~fixedram.image.Image.run_arrays`) in groups of ``size`` (the last may be
    shorter), whatever the runs: a packet or a record buffer's worth of pages of a guest
    whose pages with data are scattered costs numpy steps, no Python per run. Memory: at
    most about ``2 * _GROUP_PAGES`` page numbers at a time."""
    carry = np.zeros(0, dtype=np.int64)
    for starts, lengths in pieces:
        for pages in _page_numbers(starts, lengths):
            if len(carry):
                pages = np.concatenate((carry, pages))
            full = len(pages) - len(pages) % size
            for i in range(0, full, size):
                yield pages[i : i + size]
            carry = pages[full:]
    if len(carry):
        yield carry


def _page_numbers(starts: np.ndarray, lengths: np.ndarray) -> Iterator[np.ndarray]:
    """The page numbers of runs, in arrays of at most ``2 * _GROUP_PAGES`` (a longer run in
    parts)."""
    if not len(lengths):
        return
    if int(lengths.max()) > _GROUP_PAGES:
        parts = -(-lengths // _GROUP_PAGES)
        which = np.repeat(np.arange(len(lengths)), parts)
        k = np.arange(len(which)) - np.repeat(np.cumsum(parts) - parts, parts)
        starts = starts[which] + k * _GROUP_PAGES
        lengths = np.minimum(lengths[which] - k * _GROUP_PAGES, _GROUP_PAGES)
    ends = np.cumsum(lengths)
    # runs starting in one stretch of _GROUP_PAGES pages go together
    for a, z in groups((ends - lengths) // _GROUP_PAGES):
        s, n = starts[a:z], lengths[a:z]
        before = np.cumsum(n) - n
        yield np.repeat(s - before, n) + np.arange(int(before[-1] + n[-1]), dtype=np.int64)
