"""Check an image's structure and, where it carries them, its checksums (``fixedram verify``).

:func:`verify_image` returns a :class:`VerifyReport`; its ``status`` is

* ``"unreadable"`` (exit 2): the file cannot be read as an image at all (missing,
  not a migration stream, truncated so that no end marker or a pages region is
  missing, offsets past the end of the file, misplaced or overlapping regions ...:
  everything :func:`open_image` refuses);
* ``"corrupt"`` (exit 1): it opens, but a check failed: the structure checks of
  :mod:`fixedram.image.check` (bitmap bits beyond a block, no device state, a VM
  description that does not parse), a damaged checksum extension, or data that does
  not match its checksums (one problem per bad extent, with block and offset in the
  block);
* ``"ok"`` (exit 0), possibly with notes (e.g. no checksum extension).

:func:`add_checksums` writes the extension into an existing mapped-ram image in
place (QEMU's own included; see :func:`fixedram.image.checksum.store` for why an
interrupted update leaves no extension or a complete one).
:class:`PageCheck` is what ``send`` checks page data with as it reads it, after
:func:`~fixedram.image.check.check_metadata`.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Collection, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from fixedram._lazy import numpy as np
from fixedram.errors import FixedramError, ImageError, StreamError
from fixedram.image.check import (
    Problem,
    check_metadata,
    checksum_metadata,
    raise_counted,
    structure,
)
from fixedram.image.checksum import (
    PAGE_SIZE,
    ChecksumError,
    Checksums,
    Geometry,
    compute,
    digest_views,
    extent_digest,
    find,
    page_digest_array,
    store,
    zero_extent_digest,
)
from fixedram.image.layout import groups
from fixedram.image.reader import Image, open_image

__all__ = [
    "Problem",
    "VerifyReport",
    "verify_image",
    "add_checksums",
    "verify_pages",
    "PageCheck",
    "require_checksums",
    "EXIT_OK",
    "EXIT_CORRUPT",
    "EXIT_UNREADABLE",
]

EXIT_OK, EXIT_CORRUPT, EXIT_UNREADABLE = 0, 1, 2
PAGE_SHIFT = PAGE_SIZE.bit_length() - 1

Status = Literal["ok", "corrupt", "unreadable"]


@dataclass
class VerifyReport:
    """What :func:`verify_image` found."""

    image: str
    status: Status = "ok"
    format: str | None = None
    problems: list[Problem] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    checksums: dict[str, Any] | None = None
    working_set: dict[str, Any] | None = None
    extents_checked: int = 0
    pages_read: int = 0
    elapsed: float = 0.0

    @property
    def exit_code(self) -> int:
        return {"ok": EXIT_OK, "corrupt": EXIT_CORRUPT, "unreadable": EXIT_UNREADABLE}[
            self.status]

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    def lines(self) -> list[str]:
        """Human output: one line per problem, then a summary."""
        out = [f"{self.image}: {p.message}" for p in self.problems]
        out += [f"{self.image}: note: {n}" for n in self.notes]
        ws = self.working_set
        if ws is not None and ws["status"] == "ok":
            out.append(f"{self.image}: working-set record: {ws['pages']} pages, "
                       f"{ws['restores']} restores merged")
        if self.status == "ok":
            what = (f"{self.extents_checked} extents match their checksums"
                    if self.checksums else "structure ok, no checksums")
            out.append(f"{self.image}: OK ({self.format}; {what}; {self.elapsed:.2f} s)")
        elif self.status == "corrupt":
            out.append(f"{self.image}: CORRUPT ({len(self.problems)} problem"
                       f"{'s' if len(self.problems) != 1 else ''})")
        return out


def _bad_extent(img_name: str, b_name: str, e: int, shift: int, length: int,
                pages_offset: int) -> Problem:
    off = e << shift
    n = min(1 << shift, length - off)
    p0, p1 = off // PAGE_SIZE, (off + n) // PAGE_SIZE - 1
    return Problem("page-checksum",
                   f"RAM block '{b_name}' offset 0x{off:x}-0x{off + n - 1:x} (pages {p0}-{p1}, "
                   f"file bytes 0x{pages_offset + off:x}-0x{pages_offset + off + n - 1:x}): "
                   "page data does not match its checksum",
                   block=b_name, offset=off, length=n, file_offset=pages_offset + off)


def verify_pages(img: Image, cs: Checksums,
                 skip: Collection[str] = ()) -> tuple[list[Problem], int, int]:
    """Compare every block's pages with ``cs``: ``(problems, extents checked, pages read)``."""
    probs: list[Problem] = []
    checked = read = 0
    check = PageCheck(img, cs)
    for s in cs.blocks:
        if s.name in skip or s.name not in img.blocks:
            continue
        for pages, slots in img.page_sets(s.name):
            check.pages_at(s.name, pages, slots.views[: len(pages)])
            read += len(pages)
        checked += len(s.extents)
        for e in check.bad_extents(s.name):
            probs.append(_bad_extent(img.where, s.name, e, cs.extent_shift, s.length,
                                     s.pages_offset))
    return probs, checked, read


def verify_image(path: str | os.PathLike[str], *, pages: bool = True) -> VerifyReport:
    """Check ``path``: structure, and the checksums it carries (``pages``: page data too)."""
    t0 = time.monotonic()
    rep = VerifyReport(image=str(path))
    try:
        img = open_image(path)
    except (ImageError, StreamError) as e:
        rep.status = "unreadable"
        rep.problems.append(Problem("unreadable", str(e)))
        return rep
    except OSError as e:
        rep.status = "unreadable"
        rep.problems.append(Problem("unreadable", f"{e.strerror or e}"))
        return rep
    with img:
        rep.format = img.format
        try:
            found = structure(img)
            rep.problems += found
            skip = {p.block for p in found if p.kind == "bitmap" and p.block is not None}
            if img.format != "mapped-ram":
                rep.notes.append("legacy stream image: no checksum extension possible "
                                 "(structure checked by a full walk)")
            else:
                cs, found = checksum_metadata(img)
                rep.problems += found
                bad: list[str] = []
                if not img.pages_in_file and pages:  # an object image: every chunk
                    from fixedram.image.objimage import ObjectImage

                    assert isinstance(img, ObjectImage)
                    bad, n = img.check_chunks()
                    rep.problems += [Problem("chunk", m) for m in bad]
                    rep.notes.append(f"{n} stored chunks fetched and checked against the "
                                     "manifest")
                if cs is None and not rep.problems and img.pages_in_file:
                    rep.notes.append("no checksum extension: page data not verified "
                                     "(`fixedram verify --add` adds one)")
                if cs is not None:
                    rep.checksums = cs.describe()
                    if pages and bad:  # reading the pages would stop at the same chunks
                        rep.notes.append("page checksums not checked: chunks are damaged "
                                         "or missing")
                    elif pages:
                        probs, rep.extents_checked, rep.pages_read = verify_pages(img, cs, skip)
                        rep.problems += probs
                _working_set(img, rep)
        except (ImageError, StreamError) as e:
            rep.problems.append(Problem("unreadable", str(e)))
        except OSError as e:
            rep.problems.append(Problem("io", f"read error: {e.strerror or e}"))
    if rep.problems:
        rep.status = "corrupt"
    rep.elapsed = time.monotonic() - t0
    return rep


def _working_set(img: Image, rep: VerifyReport) -> None:
    """The working-set record: a damaged copy is a problem (its bytes do not match their
    digest); a stale record is a note (a lazy restore ignores it and records anew)."""
    from fixedram.image.workingset import load

    ws = load(img)
    rep.working_set = ws.describe()
    rep.problems += [Problem("working-set", f"working-set record: {d}") for d in ws.damaged]
    if ws.stale is not None:
        rep.notes.append("working-set record is stale (recorded for other image content): "
                         "lazy restores ignore it")


@dataclass
class AddReport:
    """What :func:`add_checksums` did."""

    image: str
    checksums: dict[str, Any]
    replaced: bool
    pages_read: int
    elapsed: float


def add_checksums(path: str | os.PathLike[str], *, force: bool = False) -> AddReport:
    """Checksum an existing mapped-ram image in place (QEMU-written ones included).

    Refuses (:class:`ImageError`) an image with structural problems, and, unless
    ``force``, one whose existing checksums do not match (that would bless the damage).
    """
    t0 = time.monotonic()
    rep = verify_image(path, pages=not force)
    if rep.status == "unreadable":
        raise ImageError(rep.problems[0].message)
    if rep.format != "mapped-ram":
        raise ChecksumError(f"{path}: checksums are only supported in mapped-ram images "
                            f"(this is a {rep.format} image; `fixedram convert` makes one)")
    blocking = [p for p in rep.problems
                if not (force and p.kind in ("page-checksum", "header-checksum",
                                             "bitmap-checksum", "tail-checksum", "extension"))]
    if blocking:
        raise ImageError(f"{blocking[0].message}; not checksumming a damaged image"
                         + (f" ({len(blocking) - 1} more problems)" if len(blocking) > 1
                            else ""))
    p = Path(path)
    with open_image(p) as img:
        geom = Geometry.of_image(img)
        pages_read = sum(img.count_present(n) for n in img.blocks)
        try:
            fd = os.open(p, os.O_RDWR)
        except OSError as e:
            raise FixedramError(f"cannot open {p} for writing: {e.strerror}") from None
        try:
            old = find(fd, geom)
            cs = compute(fd, geom, lambda name, shift: block_extent_digests(img, name, shift))
            store(fd, geom, cs, durable=True, clear=old.slots)
        finally:
            os.close(fd)
    return AddReport(str(p), cs.describe(), bool(old.slots), pages_read,
                     time.monotonic() - t0)


class PageCheck:
    """Checks page data as it is read, against the extension, extent by extent.

    :meth:`pages` / :meth:`pages_at` are given every page with data (in any order, each once);
    an extent is compared as soon as all its pages with data (the bitmap says which) were
    given, and its page digests dropped. :meth:`block_done` compares what is left (pages
    never given count as zero pages, extents without data must have the all-zero digest)
    and raises :class:`ImageError` naming the first bad extent. Memory: one byte per
    extent, plus the page digests of the extents in progress (8 bytes per page of an
    extent), whatever the RAM size.
    """

    def __init__(self, img: Image, cs: Checksums) -> None:
        self.img = img
        self.cs = cs
        self.sums = cs.by_name()
        self._blocks: dict[str, _ExtentCheck] = {}

    def _block(self, name: str) -> _ExtentCheck | None:
        st = self._blocks.get(name)
        if st is None and name in self.sums:
            st = self._blocks[name] = _ExtentCheck(self.img, name, self.cs.extent_shift)
        return st

    def pages(self, name: str, first_page: int, views: Sequence[memoryview]) -> None:
        """Digest pages given as one view each (``send``'s page slots)."""
        st = self._block(name)
        if st is not None:
            st.add(first_page, digest_views(views, len(views)))

    def pages_at(self, name: str, pages: np.ndarray, views: Sequence[memoryview]) -> None:
        """Digest pages that need not be consecutive: ``views[i]`` is page ``pages[i]``."""
        st = self._block(name)
        if st is not None:
            st.add_at(pages, digest_views(views, len(views)))

    def bad_extents(self, name: str) -> list[int]:
        """Finish block ``name``: the indices of its extents that do not match."""
        st = self._block(name)
        if st is None:
            return []
        del self._blocks[name]
        want = self.sums[name].extents
        got = st.finish()
        if len(got) != len(want):
            return list(range(len(want)))
        return np.flatnonzero(got != want).tolist()

    def block_done(self, name: str) -> None:
        bad = self.bad_extents(name)
        if bad:
            s = self.sums[name]
            p = _bad_extent(self.img.where, name, bad[0], self.cs.extent_shift, s.length,
                            s.pages_offset)
            raise ImageError(f"{p.message}" + (f" (and {len(bad) - 1} more extents)"
                                                if len(bad) > 1 else "")
                             + "; refusing to complete the restore")


#: Pages whose presence :class:`_ExtentCheck` looks up at once (2 KiB of bitmap).
_COUNT_PAGES = 1 << 14


class _ExtentCheck:
    """Extent digests of one block computed from its pages' digests as they are given (in
    any order): an extent is digested as soon as all its pages with data were given, and
    its page digests dropped."""

    def __init__(self, img: Image, name: str, shift: int) -> None:
        self.img = img
        self.name = name
        self.shift = shift
        self.per = 1 << (shift - PAGE_SHIFT)
        self.npages = img.block(name).npages
        self.got = np.zeros(-(-self.npages // self.per), dtype=np.uint64)
        self.touched = np.zeros(len(self.got), dtype=bool)
        self.open: dict[int, np.ndarray] = {}
        self.left: dict[int, int] = {}
        self._blank = page_digest_array(self.per)
        #: pages with data per extent of a group of extents, counted with one bitmap lookup
        self._group = max(1, _COUNT_PAGES // self.per)
        self._counts = np.zeros(0, dtype=np.int64)
        self._counts_at = -1

    def _pages(self, e: int) -> int:
        return min(self.per, self.npages - e * self.per)

    def _present(self, e: int) -> int:
        """How many pages of extent ``e`` hold data."""
        g = e - e % self._group
        if g != self._counts_at:
            lo = g * self.per
            bits = self.img.present_range(self.name, lo,
                                          min(self._group * self.per, self.npages - lo))
            pad = -len(bits) % self.per
            if pad:
                bits = np.concatenate([bits, np.zeros(pad, dtype=bool)])
            self._counts = bits.reshape(-1, self.per).sum(axis=1)
            self._counts_at = g
        return int(self._counts[e - g])

    def _extent(self, e: int, p: int) -> np.ndarray:
        """The page digests of extent ``e`` in progress (opened for page ``p`` if new)."""
        arr = self.open.get(e)
        if arr is None:
            if e >= len(self.got):
                raise ImageError(f"RAM block '{self.name}': page {p} beyond its end")
            arr = self.open[e] = self._blank[: self._pages(e)].copy()
            self.left[e] = self._present(e)
            self.touched[e] = True
        return arr

    def _given(self, e: int, n: int) -> None:
        """``n`` more pages of extent ``e`` were given: digest it once all were."""
        self.left[e] -= n
        if self.left[e] <= 0:
            self._close(e)

    def add(self, first: int, digests: np.ndarray) -> None:
        per = self.per
        end = first + len(digests)
        p = first
        while p < end:
            e = p // per
            e0 = e * per
            hi = min(end, e0 + per)
            self._extent(e, p)[p - e0 : hi - e0] = digests[p - first : hi - first]
            self._given(e, hi - p)
            p = hi

    def add_at(self, pages: np.ndarray, digests: np.ndarray) -> None:
        """:meth:`add` for pages that need not be consecutive (``digests[i]`` is page
        ``pages[i]``, ``int64``): a numpy step per extent they fall in."""
        if not len(pages):
            return
        if int(pages.min()) < 0:
            raise ImageError(f"RAM block '{self.name}': negative page number")
        ext = pages // self.per
        for a, z in groups(ext):
            e = int(ext[a])
            self._extent(e, int(pages[a]))[pages[a:z] - e * self.per] = digests[a:z]
            self._given(e, z - a)

    def _close(self, e: int) -> None:
        arr = self.open.pop(e)
        del self.left[e]
        self.got[e] = extent_digest(arr)

    def finish(self) -> np.ndarray:
        """The digest of every extent (pages never given count as zero pages)."""
        for e in list(self.open):
            self._close(e)
        idle = ~self.touched
        if idle.any():
            self.got[idle] = zero_extent_digest(self.per)
            last = len(self.got) - 1
            if idle[last] and self._pages(last) != self.per:
                self.got[last] = zero_extent_digest(self._pages(last))
        return self.got


def block_extent_digests(img: Image, name: str, shift: int) -> np.ndarray:
    """Extent digests of block ``name`` (extents of ``2**shift`` bytes), reading its pages
    with data once; memory: the digests of one extent's pages, plus 8 bytes per extent."""
    st = _ExtentCheck(img, name, shift)
    for pages, slots in img.page_sets(name):
        st.add_at(pages, digest_views(slots.views, len(pages)))
    return st.finish()


def require_checksums(img: Image) -> Checksums | None:
    """``send --verify``: raise :class:`ImageError` unless every checksum matches.

    Returns the extension, or None when the image carries none (nothing to check).
    """
    cs = check_metadata(img)
    if cs is None:
        return None
    probs, _, _ = verify_pages(img, cs)
    raise_counted(probs, "image fails its checksums")
    return cs
