"""Writing QEMU mapped-ram files, byte-compatible with QEMU 10.0.2's ``migrate file:``.

:class:`MappedRamWriter` lays a file out exactly as QEMU does (see
:mod:`fixedram.image.layout`)::

    begin():   QEVM header | configuration (+ capabilities: mapped-ram) | START ram |
               MEM_SIZE | per block: name, length, MappedRamHeader | EOS | footer
    (pages are written in place at pages_offset + i * PAGE_SIZE while they arrive)
    finish():  bitmaps | PART ram (EOS, footer) x n | [commands, e.g. SWITCHOVER_START] |
               END ram (EOS, footer) | device state blob | EOF | [vmdesc]

The per-page bitmaps live in memory and are written once, at
:meth:`MappedRamWriter.finish`, as QEMU does. They are sparse (:class:`SparseBits`:
chunks of one bool per page, made when a page of the chunk is first written), so
memory follows the pages that arrived, not the size the stream claims for a block;
the bitmap of a chunk never written stays a hole of the file (zeros). A page that is
zeroed after it held data has its bit cleared and its file range deallocated (hole
punched), so stale guest data is not left reachable in the file; QEMU leaves such
data behind.

By default the writer also keeps one xxh3 digest per page written (8 bytes per page
with data, sparse: :class:`~fixedram.image.checksum.PageDigests`) and, at
:meth:`MappedRamWriter.finish`, stores the checksum extension in the padding before a
pages region, where QEMU never looks (``docs/checksums.md``); ``checksums=False`` turns
this off.
"""

from __future__ import annotations

import contextlib
import errno
import os
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from fixedram._lazy import numpy as np
from fixedram.errors import FixedramError, UnsupportedRecord
from fixedram.image.checksum import (
    BlockGeometry,
    Checksums,
    Geometry,
    PageDigests,
    digest_views,
    digests_of,
    write_new,
)
from fixedram.image.layout import PAGE_SIZE, block_geometry, index_runs, page_ranges
from fixedram.image.sparse import SparseBits
from fixedram.io.files import IOV_MAX, punch_hole, pwritev_all
from fixedram.stream.encoder import encode
from fixedram.stream.format import (
    CAP_IGNORE_SHARED,
    CAP_MAPPED_RAM,
    MAPPED_RAM_HEADER,
    MAPPED_RAM_VERSION,
    RAM_SECTION,
)
from fixedram.stream.records import (
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
    VMDescription,
)

__all__ = ["BlockLayout", "MappedRamWriter", "PageObserver", "SparseBits",
           "mapped_configuration"]

Buffer = bytes | bytearray | memoryview


@dataclass
class BlockLayout:
    """Where one RAM block lives in the file, plus its in-memory (sparse) bitmap."""

    name: str
    length: int
    header_offset: int
    bitmap_offset: int
    pages_offset: int
    present: SparseBits

    @property
    def npages(self) -> int:
        """Number of target pages in the block."""
        return self.length // PAGE_SIZE


class PageObserver(Protocol):
    """Told by a :class:`MappedRamWriter` where page data changed in its file, e.g. to
    upload parts of the image while it is still being written
    (:class:`fixedram.image.chunked.EarlyUpload`)."""

    def begin(self, fd: int, blocks: Mapping[str, BlockLayout]) -> None:
        """The layout is written: ``blocks`` are where the pages regions are in ``fd``
        (the observer dups ``fd`` if it reads the file later)."""

    def writing(self, block: str, first_page: int, npages: int) -> None:
        """Pages ``[first_page, first_page + npages)`` of ``block`` are about to change
        in the file (may wait, e.g. until a reader of those pages is done with them).
        Called outside the writer's lock; :meth:`written` follows once they changed."""

    def written(self, block: str, first_page: int, npages: int) -> None:
        """Pages ``[first_page, first_page + npages)`` of ``block`` changed in the file
        (written, or zeroed after they held data). Called after the change, under the
        writer's lock: it must be quick."""


def mapped_configuration(cfg: Configuration) -> Configuration:
    """``cfg`` with the capabilities a mapped-ram file declares (``mapped-ram`` added).

    Refuses ``x-ignore-shared``: QEMU 10.0.2 cannot load such mapped-ram files.
    """
    caps = list(cfg.capabilities or ())
    if CAP_IGNORE_SHARED in caps:
        raise UnsupportedRecord("capability x-ignore-shared is not supported in mapped-ram "
                                "images (QEMU 10.0 cannot load them)")
    if CAP_MAPPED_RAM not in caps:
        caps.append(CAP_MAPPED_RAM)
    return Configuration(cfg.machine, tuple(caps), cfg.page_bits, cfg.uuid)


def _pwrite_pages(fd: int, pages: Sequence[memoryview], at: int) -> None:
    """Write one-page views at ``at`` onwards: one ``pwritev`` per :data:`IOV_MAX` pages."""
    if len(pages) <= IOV_MAX and os.pwritev(fd, pages, at) == len(pages) * PAGE_SIZE:
        return  # the usual case: one call wrote them all (else the careful way, again)
    for i in range(0, len(pages), IOV_MAX):
        group = pages[i : i + IOV_MAX]
        want = len(group) * PAGE_SIZE
        n = os.pwritev(fd, group, at)
        if n != want:  # short write: finish it the careful way
            done, part = divmod(n, PAGE_SIZE)
            rest: list[Buffer] = [group[done][part:], *group[done + 1 :]]
            pwritev_all(fd, rest, at + n)
        at += want


class MappedRamWriter:
    """Lays out a mapped-ram image in an open file.

    ``fd`` receives the metadata (stream prefix, bitmaps, trailer) through buffered
    positional writes; ``page_fd`` (default ``fd``) receives page data, e.g. an
    ``O_DIRECT`` descriptor of the same file, in which case the buffers given to
    :meth:`write_pages` must be page-aligned. Page writes and zeroing may be called
    from several threads at once for disjoint pages. ``base_offset`` is where the stream
    starts in the file (what comes before it, e.g. a libvirt save header, is the caller's);
    every bitmap and pages offset in the stream is absolute, as QEMU writes them for
    ``file:PATH,offset=N``. ``observer`` is told of every change to page data
    (:class:`PageObserver`).
    """

    def __init__(self, fd: int, *, page_fd: int | None = None, checksums: bool = True,
                 base_offset: int = 0, observer: PageObserver | None = None) -> None:
        self.fd = fd
        self.observer = observer
        self.base_offset = base_offset
        # checksums: keep one digest per page and store the checksum extension at finish
        # (fixedram.image.checksum; 8 bytes of memory per page)
        self.checksums = checksums
        self.digests: PageDigests | None = None
        self.checksum_info: Checksums | None = None
        self.page_fd = fd if page_fd is None else page_fd
        self.blocks: dict[str, BlockLayout] = {}
        self.configuration: Configuration | None = None
        self.section_id = 0
        self.end_offset = 0  # where finish() continues the main stream
        self.pages_written = 0
        self.holes_punched = 0
        self._finished = False
        # page writes may come from several threads (multifd channels) for disjoint
        # pages: data is hashed outside these locks, bits and digests are kept under
        # _lock, and buffered writes reach the file under _io: the kernel lets one
        # buffered write into a file at a time anyway (the inode's lock, on tmpfs and
        # ext4), and a thread that waits for it in the kernel spins on a CPU the
        # migration's other threads need, while one that waits here sleeps. O_DIRECT
        # writes (page_fd another descriptor) wait for the device instead, and are left
        # to the kernel
        self._lock = threading.Lock()
        self._io: contextlib.AbstractContextManager[Any] = (
            threading.Lock() if self.page_fd == fd else contextlib.nullcontext())

    # -- setup ---------------------------------------------------------------------

    def begin(self, configuration: Configuration, blocks: Sequence[RamBlock | tuple[str, int]],
              *, section_id: int = 1) -> None:
        """Write the stream prefix and every block's header; reserve the pages regions.

        ``blocks`` are in the source's order (QEMU's RAM list order); ``section_id`` is
        the ``ram`` section id to use (the source's, so the device blob stays coherent).
        """
        if self.configuration is not None:
            raise FixedramError("MappedRamWriter.begin called twice")
        if not blocks:
            raise FixedramError("no RAM blocks to write")
        cfg = mapped_configuration(configuration)
        self.configuration = cfg
        self.section_id = section_id
        norm = [(b.name, b.length) if isinstance(b, RamBlock) else b for b in blocks]
        total = sum(n for _, n in norm)
        head = bytearray()
        for r in (FileHeader(), cfg, SectionStart(section_id, RAM_SECTION, 0, 4),
                  MemSize(total)):
            head += encode(r)
        pos = self.base_offset
        pieces: list[tuple[int, bytes]] = []
        for name, length in norm:
            if length <= 0 or length % PAGE_SIZE:
                raise FixedramError(f"RAM block '{name}' has length {length}")
            if name in self.blocks:
                raise FixedramError(f"RAM block '{name}' listed twice")
            head += encode(RamBlock(name, length))
            hdr_pos = pos + len(head)
            bm, pg, nxt = block_geometry(hdr_pos, length)
            head += MAPPED_RAM_HEADER.pack(MAPPED_RAM_VERSION, PAGE_SIZE, bm, pg)
            pieces.append((pos, bytes(head)))
            self.blocks[name] = BlockLayout(name, length, hdr_pos, bm, pg,
                                            SparseBits(length // PAGE_SIZE))
            pos = nxt
            head = bytearray()
        head += encode(EndOfSection()) + encode(SectionFooter(section_id))
        pieces.append((pos, bytes(head)))
        if self.checksums:
            self.digests = PageDigests(dict(norm))
        self.end_offset = pos + len(head)
        try:
            for off, data in pieces:
                pwritev_all(self.fd, [data], off)
        except OSError as e:
            if e.errno != errno.EFBIG:
                raise
            raise FixedramError(f"RAM blocks of {total} bytes need an image of at least "
                                f"{self.end_offset} bytes, more than the filesystem allows "
                                "for one file") from None
        if self.observer is not None:
            self.observer.begin(self.fd, self.blocks)

    # -- pages ---------------------------------------------------------------------

    def _block(self, name: str) -> BlockLayout:
        try:
            return self.blocks[name]
        except KeyError:
            raise FixedramError(f"unknown RAM block '{name}'") from None

    def write_pages(self, block: str, first_page: int, bufs: Sequence[Buffer]) -> int:
        """Write consecutive pages of ``block`` from ``first_page`` with one ``pwritev``.

        ``bufs`` hold whole pages (any split); returns the number of pages written.
        A page written again simply overwrites its earlier copy.
        """
        blk = self._block(block)
        nbytes = sum(len(b) for b in bufs)
        npages, rest = divmod(nbytes, PAGE_SIZE)
        if rest:
            raise FixedramError(f"write of {nbytes} bytes to '{block}' is not whole pages")
        if first_page < 0 or first_page + npages > blk.npages:
            raise FixedramError(f"pages {first_page}..{first_page + npages} outside RAM "
                                f"block '{block}' ({blk.npages} pages)")
        if not npages:
            return 0
        digests = digests_of(bufs) if self.digests is not None else None
        if self.observer is not None:
            self.observer.writing(block, first_page, npages)
        with self._io:
            pwritev_all(self.page_fd, bufs, blk.pages_offset + first_page * PAGE_SIZE)
        self._written(blk, first_page, npages, digests)
        return npages

    def _written(self, blk: BlockLayout, first_page: int, npages: int,
                 digests: np.ndarray | None) -> None:
        """Record pages written: bits, digests, counters (under the bookkeeping lock)."""
        with self._lock:
            if self.digests is not None and digests is not None:
                self.digests.store(blk.name, first_page, digests)
            blk.present.set(first_page, npages)
            self.pages_written += npages
            if self.observer is not None:
                self.observer.written(blk.name, first_page, npages)

    def write_page_views(self, block: str, first_page: int, pages: list[memoryview]) -> int:
        """:meth:`write_pages` for a list of one-page views (e.g. of received records).

        One ``pwritev`` per :data:`~fixedram.io.files.IOV_MAX` pages, the digests hashed
        from the same views (no copy, no Python per page); returns the pages written.
        """
        blk = self._block(block)
        npages = len(pages)
        if first_page < 0 or first_page + npages > blk.npages:
            raise FixedramError(f"pages {first_page}..{first_page + npages} outside RAM "
                                f"block '{block}' ({blk.npages} pages)")
        if not npages:
            return 0
        digests = digest_views(pages, npages) if self.digests is not None else None
        if self.observer is not None:
            self.observer.writing(block, first_page, npages)
        with self._io:
            _pwrite_pages(self.page_fd, pages, blk.pages_offset + first_page * PAGE_SIZE)
        self._written(blk, first_page, npages, digests)
        return npages

    def write_page_set(self, block: str, pages: np.ndarray, views: Sequence[memoryview],
                       runs: list[tuple[int, int, int]] | None = None) -> int:
        """:meth:`write_page_views` for pages that need not be consecutive: ``views[i]`` is
        page number ``pages[i]`` (``int64``), e.g. a multifd packet of a guest whose zero
        pages lie between its others (``runs``: their :func:`index_runs`, if known). One
        ``pwritev`` per run of consecutive pages, but one digest pass and one bookkeeping
        step for all of them (not a call per run); returns the pages written."""
        blk = self._block(block)
        n = len(pages)
        if not n:
            return 0
        if int(pages.min()) < 0 or int(pages.max()) >= blk.npages:
            raise FixedramError(f"pages outside RAM block '{block}' ({blk.npages} pages)")
        if runs is None:
            runs = index_runs(pages)
        if len(runs) == 1:
            return self.write_page_views(block, runs[0][1], list(views[:n]))
        digests = digest_views(views, n) if self.digests is not None else None
        # the observer hears of the stretches the pages lie in (layout.page_ranges), not of
        # each run: pages between them that did not change are only looked at again
        obs = self.observer
        spans = page_ranges(pages, runs) if obs is not None else []
        if obs is not None:
            for first, k in spans:
                obs.writing(block, first, k)
        fd, base = self.page_fd, blk.pages_offset
        with self._io:
            for i, first, k in runs:
                _pwrite_pages(fd, views[i : i + k], base + first * PAGE_SIZE)
        with self._lock:
            if self.digests is not None and digests is not None:
                self.digests.store_at(block, pages, digests)
            blk.present.set_at(pages)
            self.pages_written += n
            if obs is not None:
                for first, k in spans:
                    obs.written(block, first, k)
        return n

    def zero_pages(self, block: str, first_page: int, npages: int = 1) -> int:
        """Mark ``npages`` pages from ``first_page`` as zero (bits cleared).

        Pages that held data are deallocated (hole punched, or overwritten with zeros
        where the filesystem cannot punch) so the old bytes are not reachable. Returns
        how many pages had data.
        """
        blk = self._block(block)
        if first_page < 0 or npages < 0 or first_page + npages > blk.npages:
            raise FixedramError(f"pages {first_page}..{first_page + npages} outside RAM "
                                f"block '{block}' ({blk.npages} pages)")
        with self._lock:
            if self.digests is not None:
                self.digests.zero(block, first_page, npages)
            cleared = blk.present.clear_runs(first_page, npages)
        return sum(self._punch(blk, start, n) for start, n in cleared)

    def zero_page_set(self, block: str, pages: np.ndarray) -> int:
        """:meth:`zero_pages` for the scattered pages numbered in ``pages`` (``int64``):
        the bits and digests of all of them in a few numpy steps, holes punched only
        for those that had data. Returns how many had data."""
        blk = self._block(block)
        if not len(pages):
            return 0
        if int(pages.min()) < 0 or int(pages.max()) >= blk.npages:
            raise FixedramError(f"zero pages outside RAM block '{block}' "
                                f"({blk.npages} pages)")
        with self._lock:
            if self.digests is not None:
                self.digests.zero_at(block, pages)
            had = blk.present.clear_at(pages)
        if not len(had):
            return 0
        return sum(self._punch(blk, first, n) for _, first, n in index_runs(np.unique(had)))

    def _punch(self, blk: BlockLayout, first: int, n: int) -> int:
        """Deallocate ``n`` pages from ``first`` whose bits were just cleared: hole punched
        (or overwritten with zeros where the filesystem cannot punch), so the old bytes are
        not reachable. Returns ``n``."""
        if self.observer is not None:
            self.observer.writing(blk.name, first, n)
        with self._io:
            punch_hole(self.fd, blk.pages_offset + first * PAGE_SIZE, n * PAGE_SIZE)
        with self._lock:
            self.holes_punched += n
            if self.observer is not None:
                self.observer.written(blk.name, first, n)
        return n

    # -- completion ----------------------------------------------------------------

    @property
    def pages_present(self) -> int:
        """Pages whose bit is set (data stored in the file), over all blocks."""
        return sum(b.present.count() for b in self.blocks.values())

    @property
    def ram_size(self) -> int:
        """Total bytes of all RAM blocks."""
        return sum(b.length for b in self.blocks.values())

    def finish(self, device_state: Buffer, vmdesc: Buffer | None, *,
               commands: Sequence[CommandRecord] = (), parts: int = 1) -> int:
        """Write the bitmaps and the trailer; return the file's final size.

        The trailer is ``parts`` empty PART sections, ``commands`` (e.g. SWITCHOVER_START,
        only if the source sent it), an empty END section, ``device_state`` verbatim,
        EOF and, unless ``vmdesc`` is None, the VM description. The caller fsyncs.
        """
        if self.configuration is None:
            raise FixedramError("MappedRamWriter.finish called before begin")
        if self._finished:
            raise FixedramError("MappedRamWriter.finish called twice")
        for blk in self.blocks.values():
            for at, raw in blk.present.bitmap_pieces():
                pwritev_all(self.fd, [raw], blk.bitmap_offset + at)
        sid = self.section_id
        eos = encode(EndOfSection())
        tail: list[Buffer] = []
        part = encode(SectionPart(sid)) + eos + encode(SectionFooter(sid))
        tail += [part] * max(0, parts)
        tail += [encode(c) for c in commands]
        tail.append(encode(SectionEnd(sid)) + eos + encode(SectionFooter(sid)))
        tail.append(device_state)
        tail.append(encode(EndOfFile()))
        if vmdesc is not None:
            tail.append(encode(VMDescription(bytes(vmdesc))))
        n = pwritev_all(self.fd, tail, self.end_offset)
        size = self.end_offset + n
        os.ftruncate(self.fd, size)
        if self.digests is not None:
            geom = Geometry(tuple(BlockGeometry(b.name, b.length, b.bitmap_offset, b.pages_offset)
                                  for b in self.blocks.values()), self.base_offset, size)
            self.checksum_info = write_new(self.fd, geom, self.digests)
        self._finished = True
        return size
