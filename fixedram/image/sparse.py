"""Per-page values of a RAM block kept sparsely: chunks made only where a value was set.

A block may claim far more pages than ever carry data (a stream can claim TiBs with a
few pages), so per-page state lives in fixed-size chunks of pages, each made when a value
other than the default is first stored in it; a page of a chunk never made has the
default. Memory follows the pages that were touched, never the block's length.

One structure serves the receiver's page bitmap (:class:`SparseBits`), its page digests
(:class:`~fixedram.image.checksum.PageDigests`), a legacy stream's page index
(:class:`~fixedram.image.reader.PageIndex`) and the pages a lazy restore has sent.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

from fixedram._lazy import numpy as np
from fixedram.image.layout import bools_to_bitmap, groups, runs

__all__ = ["SparseArray", "SparseBits"]


class SparseArray:
    """``npages`` values of ``dtype`` (default ``fill``) in chunks of ``1 << shift`` pages."""

    __slots__ = ("chunks", "dtype", "fill", "npages", "shift", "size")

    def __init__(self, npages: int, shift: int, dtype: np.dtype | type, fill: object) -> None:
        self.npages = npages
        self.shift = shift
        self.size = 1 << shift
        self.dtype = np.dtype(dtype)
        self.fill = fill
        self.chunks: dict[int, np.ndarray] = {}

    @property
    def nbytes(self) -> int:
        """Memory held by the chunks (bytes)."""
        return sum(c.nbytes for c in self.chunks.values())

    def spans(self, first: int, n: int,
              create: bool = False) -> Iterator[tuple[int, np.ndarray, int, int, int]]:
        """``(chunk index, chunk, lo, hi, page of lo)`` for pages ``[first, first + n)``:
        every chunk in range when ``create`` (made as needed), else only those that exist
        (found from the chunks held when the range covers more chunks than that)."""
        if n <= 0:
            return
        end = first + n
        a, b = first >> self.shift, (end - 1) >> self.shift
        chunks = self.chunks
        keys: Iterable[int] = (range(a, b + 1) if create or b - a < len(chunks)
                               else sorted(k for k in chunks if a <= k <= b))
        size = self.size
        for ci in keys:
            c = self._chunk(ci) if create else chunks.get(ci)
            if c is None:
                continue
            base = ci << self.shift
            lo, hi = max(first, base) - base, min(end, base + size) - base
            yield ci, c, lo, hi, base + lo

    def _chunk(self, ci: int) -> np.ndarray:
        """Chunk ``ci``, made (all default values) if it does not exist yet."""
        c = self.chunks.get(ci)
        if c is None:
            c = self.chunks[ci] = np.full(self.size, self.fill, dtype=self.dtype)
        return c

    def get(self, first: int, n: int) -> np.ndarray:
        """Values of pages ``[first, first + n)`` as one array."""
        out = np.full(n, self.fill, dtype=self.dtype)
        for _, c, lo, hi, pg in self.spans(first, n):
            out[pg - first : pg - first + hi - lo] = c[lo:hi]
        return out

    def get_at(self, pages: np.ndarray) -> np.ndarray:
        """Values of the pages numbered in ``pages``, as one array (a numpy step per chunk)."""
        out = np.full(len(pages), self.fill, dtype=self.dtype)
        at = 0
        for ci, idx in self._groups(pages):
            c = self.chunks.get(ci)
            if c is not None:
                out[at : at + len(idx)] = c[idx]
            at += len(idx)
        return out

    def store(self, first: int, values: np.ndarray) -> None:
        """Set pages ``first, first + 1, …`` to ``values``."""
        self._put(first, len(values), values, True)

    def _put(self, first: int, n: int, value: Any, many: bool) -> None:
        """Pages ``[first, first + n)`` get ``value`` (``many``: an array of ``n`` values),
        chunks made as needed: :meth:`spans` with ``create`` as one loop (a receive stores
        every run of pages it writes)."""
        shift, size, chunks = self.shift, self.size, self.chunks
        at = 0
        while at < n:
            pg = first + at
            ci = pg >> shift
            lo = pg - (ci << shift)
            k = min(size - lo, n - at)
            c = chunks.get(ci)
            if c is None:
                c = self._chunk(ci)
            c[lo : lo + k] = value[at : at + k] if many else value
            at += k

    def _groups(self, pages: np.ndarray) -> Iterator[tuple[int, np.ndarray]]:
        """``(chunk index, indices within the chunk)`` for the page numbers ``pages`` (any
        order; pages of one chunk that are not next to each other come as more groups)."""
        if not len(pages):
            return
        shift = self.shift
        lo = int(pages.min()) >> shift
        if int(pages.max()) >> shift == lo:  # the usual case: all in one chunk
            yield lo, pages - (lo << shift)
            return
        ci = pages >> shift
        for a, z in groups(ci):
            c = int(ci[a])
            yield c, pages[a:z] - (c << self.shift)

    def store_at(self, pages: np.ndarray, values: np.ndarray) -> None:
        """Set each page numbered in ``pages`` to the matching element of ``values``
        (chunks made as needed; a numpy step per chunk)."""
        at = 0
        for ci, idx in self._groups(pages):
            self._chunk(ci)[idx] = values[at : at + len(idx)]
            at += len(idx)

    def reset_at(self, pages: np.ndarray, free: bool = False) -> None:
        """The pages numbered in ``pages`` get the default again (a numpy step per chunk);
        with ``free``, a chunk left holding only the default is dropped."""
        chunks = self.chunks
        for ci, idx in self._groups(pages):
            c = chunks.get(ci)
            if c is not None:
                c[idx] = self.fill
                if free and not (c != self.fill).any():
                    del chunks[ci]

    def reset(self, first: int, n: int, free: bool = False) -> None:
        """Pages ``[first, first + n)`` get the default again; with ``free``, a chunk left
        holding only the default is dropped."""
        for ci, c, lo, hi, _ in list(self.spans(first, n)):
            c[lo:hi] = self.fill
            if free and (hi - lo == self.size or not (c != self.fill).any()):
                del self.chunks[ci]

    def dense(self) -> np.ndarray:
        """All values as one array (for tests and small blocks)."""
        return self.get(0, self.npages)


class SparseBits(SparseArray):
    """One bool per page of a block, stored only for chunks of pages where a bit was set
    (chunks of 128 MiB of guest RAM, 32 KiB of memory: a whole number of bitmap words)."""

    __slots__ = ()

    #: Pages per chunk, as a shift.
    SHIFT = 15

    def __init__(self, npages: int, shift: int = SHIFT) -> None:
        super().__init__(npages, shift, bool, False)

    def set(self, first: int, n: int) -> None:
        self._put(first, n, True, False)

    def clear_runs(self, first: int, n: int) -> list[tuple[int, int]]:
        """Clear the bits of ``[first, first + n)``; return the runs that were set."""
        out: list[tuple[int, int]] = []
        for _, c, lo, hi, pg in self.spans(first, n):
            sel = c[lo:hi]
            if sel.any():
                out += [(pg + s, k) for s, k in runs(sel)]
                sel[:] = False
        return out

    def set_at(self, pages: np.ndarray) -> None:
        """Set the bits of the pages numbered in ``pages``."""
        for ci, idx in self._groups(pages):
            self._chunk(ci)[idx] = True

    def clear_at(self, pages: np.ndarray) -> np.ndarray:
        """Clear the bits of the pages numbered in ``pages``; return those that were set."""
        had: list[np.ndarray] = []
        chunks = self.chunks
        for ci, idx in self._groups(pages):
            c = chunks.get(ci)
            if c is None:
                continue
            was = c[idx]
            if was.any():
                had.append(idx[was] + (ci << self.shift))
                c[idx] = False
        return np.concatenate(had) if had else pages[:0]

    def count(self) -> int:
        return sum(int(np.count_nonzero(c)) for c in self.chunks.values())

    def bitmap_pieces(self) -> Iterator[tuple[int, bytes]]:
        """``(byte offset in the bitmap, bytes)`` of every chunk that exists."""
        for ci in sorted(self.chunks):
            base = ci << self.shift
            yield base >> 3, bools_to_bitmap(self.chunks[ci][: min(self.size,
                                                                    self.npages - base)])
