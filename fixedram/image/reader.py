"""Reading saved VM images: QEMU mapped-ram files and legacy stream files.

:func:`open_image` recognises the format and returns an :class:`Image`. Both kinds
answer the same questions: which RAM blocks there are, which pages hold data
(:meth:`Image.present`), the data of runs of pages (:meth:`Image.iter_data`), the
opaque device state and the VM description.

A mapped-ram image is opened by reading its metadata only (stream prefix, block
headers, tail); bitmaps are read when first asked for, pages only on demand, one
positioned read per run of pages. A legacy stream has no index, so opening one
walks the whole file once and remembers where the last copy of each page is;
there a ZERO record makes the page zero again.
"""

from __future__ import annotations

import errno
import mmap
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from fixedram._lazy import numpy as np
from fixedram.errors import FixedramError, ImageError, StreamError
from fixedram.image.check import mapped_bounds, raise_first
from fixedram.image.layout import (
    BITMAP_PIECE_PAGES,
    PAGE_SIZE,
    bitmap_bits,
    bitmap_bytes,
    bitmap_run_arrays,
    bitmap_to_bools,
    gap_arrays,
    index_runs,
    one_stretch,
    page_groups,
    run_arrays,
)
from fixedram.image.libvirt import LibvirtHeader, decompress_payload, is_libvirt, read_header
from fixedram.image.sparse import SparseArray
from fixedram.io.files import (
    IOV_MAX,
    aligned_buffer,
    open_direct,
    preadv_exact,
    warn_no_direct_io,
)
from fixedram.io.objstore import is_object_url
from fixedram.stream import (
    CommandRecord,
    Configuration,
    DeviceState,
    MappedRamHeader,
    Page,
    PageRun,
    PageSet,
    RamBlock,
    SectionPart,
    SectionStart,
    StreamDecoder,
    VMDescription,
    Zero,
    ZeroPages,
    ZeroRun,
)
from fixedram.stream.format import FILE_MAGIC

__all__ = ["open_image", "image_location", "Image", "MappedRamImage", "StreamImage",
           "BlockInfo", "PageSlots", "READ_CHUNK", "SPAN_BYTES", "DirectIO", "PageIndex"]

#: Largest single read when streaming page data (bytes).
READ_CHUNK = 1 << 20

#: Widest stretch of an image file :meth:`Image.read_page_set` reads in one go (4 MiB).
SPAN_BYTES = 4 << 20

#: Pages per chunk of a legacy stream's sparse page index (:class:`PageIndex`): 1 MiB of RAM.
INDEX_CHUNK = 256

#: Pages per cached block of a mapped-ram bitmap (4 KiB of bitmap, 128 MiB of RAM), and how
#: many such blocks an image keeps (256 KiB).
_BM_BLOCK_SHIFT = 15
_BM_BLOCKS = 64

#: Read size while walking the metadata of a mapped-ram file (bytes).
METADATA_CHUNK = 16 << 10

_ABSENT = -1
#: Bytes from one page's data to the next in a run of CONTINUE PAGE records of a stream.
_REC = PAGE_SIZE + 8
_PAGE_SHIFT = PAGE_SIZE.bit_length() - 1
#: Alignment of O_DIRECT file offsets and lengths (the largest logical block size in use).
_DIO_ALIGN = 4096

#: ``--direct-io``: False (buffered), True (O_DIRECT where the filesystem allows it, else
#: buffered with a warning) or ``"required"`` (fail where it does not).
DirectIO = bool | Literal["required"]


class PageSlots:
    """Page-sized slots at a fixed stride in one buffer, where pages are read to.

    Slot ``i`` is ``buf[first + i * stride : first + i * stride + PAGE_SIZE]``; with a
    stride of ``PAGE_SIZE + 8`` they are the page parts of ``header|page|header|page…``
    PAGE records. The slot views (one iovec each for ``preadv``) and a 2-D numpy view of
    the slots are made once, so filling and digesting a piece costs no per-page Python.
    """

    def __init__(self, buf: memoryview | bytearray | mmap.mmap, first: int, stride: int,
                 count: int) -> None:
        if stride < PAGE_SIZE or count > IOV_MAX:
            raise ValueError(f"bad page slots: stride {stride}, count {count}")
        self.buf = memoryview(buf).cast("B")
        if first + (count - 1) * stride + PAGE_SIZE > len(self.buf):
            raise ValueError("page slots past the end of the buffer")
        self.first = first
        self.stride = stride
        self.count = count
        self.array = np.ndarray((count, PAGE_SIZE), dtype=np.uint8, buffer=self.buf,
                                offset=first, strides=(stride, 1))
        self._views: list[memoryview] | None = None

    @property
    def views(self) -> list[memoryview]:
        """One view per slot (made on first use)."""
        if self._views is None:
            f, st = self.first, self.stride
            self._views = [self.buf[f + i * st : f + i * st + PAGE_SIZE]
                           for i in range(self.count)]
        return self._views

    def span(self, i: int, n: int) -> memoryview:
        """Bytes from the start of slot ``i`` to the end of slot ``i + n - 1``."""
        start = self.first + i * self.stride
        return self.buf[start : start + (n - 1) * self.stride + PAGE_SIZE]


@dataclass
class BlockInfo:
    """A RAM block of an image."""

    name: str
    length: int
    mapped: MappedRamHeader | None = None
    guest_addr: int | None = None

    @property
    def npages(self) -> int:
        """Number of target pages in the block."""
        return self.length // PAGE_SIZE


@dataclass
class Image:
    """A saved VM: configuration, RAM blocks, device state, VM description."""

    path: Path
    format: Literal["mapped-ram", "stream"]
    configuration: Configuration
    blocks: dict[str, BlockInfo]
    device_state: bytes
    vmdesc: bytes | None
    base_offset: int = 0
    file_size: int = 0
    commands: list[str] = field(default_factory=list)
    sections: int = 0
    #: The id the RAM section had in the image's stream (see fixedram.image.sections).
    ram_section_id: int | None = None
    #: The libvirt save header, when the image is a ``virsh save`` file
    #: (:mod:`fixedram.image.libvirt`); a compressed one is read from a decompressed copy.
    libvirt: LibvirtHeader | None = None
    _fd: int = -1
    _dfd: int = -1
    _dmode: DirectIO | Literal["refused"] = False
    _stage: mmap.mmap | None = None

    #: Whether page data lies in the file behind :meth:`fileno` at :meth:`page_offset`
    #: (``sendfile`` from it, holes in it mean something). False for an image whose pages
    #: come from elsewhere (:class:`fixedram.image.objimage.ObjectImage`): read them with
    #: :meth:`read_slots` / :meth:`read_into`.
    pages_in_file = True
    #: Whether every page read is already checked against a checksum as strong as the
    #: checksum extension's page digests (an object image's chunks, checked against their
    #: content names): a sender then does not digest the pages again as it reads them
    #: (``verify`` still checks the extension).
    pages_checked = False
    #: Whether the image holds its pages in memory that never changes while referenced, so
    #: that :meth:`page_views` gives them without a copy (an object image's chunks).
    holds_pages = False

    @property
    def where(self) -> str:
        """The image's location as messages name it: its path, or an object's URL."""
        return str(self.path)

    # -- lifecycle -------------------------------------------------------------

    def close(self) -> None:
        """Release the file descriptors."""
        self.close_direct()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def open_direct(self, mode: DirectIO = True) -> bool:
        """Read page data through an O_DIRECT descriptor from now on (:meth:`read_slots`).

        The page cache is then neither filled nor trashed by the pages read. Where the
        filesystem refuses O_DIRECT (tmpfs), ``mode`` ``"required"`` raises
        :class:`FixedramError`; otherwise one warning goes to stderr
        (:func:`~fixedram.io.files.warn_no_direct_io`) and reads stay buffered. Returns
        whether reads are direct.
        """
        if not mode or self._dfd >= 0 or self._dmode == "refused":
            return self._dfd >= 0
        fd = open_direct(f"/proc/self/fd/{self._fd}", os.O_RDONLY)
        if fd is None:
            self._no_direct(mode, "does not support O_DIRECT")
            self._dmode = "refused"  # warned once; later calls stay buffered quietly
            return False
        stage = aligned_buffer(_stage_size())
        try:  # some filesystems take O_DIRECT at open but refuse the reads: probe one
            os.preadv(fd, [memoryview(stage)[:_DIO_ALIGN]], 0)
        except OSError as e:
            os.close(fd)
            stage.close()
            if e.errno != errno.EINVAL:
                raise
            self._no_direct(mode, "refused an O_DIRECT read")
            self._dmode = "refused"
            return False
        self._dfd = fd
        self._dmode = mode
        self._stage = stage
        return True

    def _direct_refused(self) -> None:
        """An O_DIRECT read failed with EINVAL: fail, or warn and read buffered from now on."""
        mode = self._dmode
        self.close_direct()
        self._dmode = "refused"
        self._no_direct("required" if mode == "required" else True,
                        "refused an O_DIRECT read")

    def _no_direct(self, mode: DirectIO, why: str) -> None:
        where = self.path.parent
        if mode == "required":
            raise FixedramError(f"the filesystem of {where} {why}")
        warn_no_direct_io(where, why)

    def close_direct(self) -> None:
        """Go back to buffered reads."""
        if self._dfd >= 0:
            os.close(self._dfd)
            self._dfd = -1
        if self._stage is not None:
            self._stage.close()
            self._stage = None

    @property
    def direct(self) -> bool:
        """True when page data is read with O_DIRECT."""
        return self._dfd >= 0

    def __enter__(self) -> Image:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- common questions ------------------------------------------------------

    @property
    def machine(self) -> str:
        """Machine type the image was saved from (``pc-q35-10.0``...)."""
        return self.configuration.machine

    @property
    def capabilities(self) -> tuple[str, ...]:
        """Capabilities declared in the configuration section."""
        return self.configuration.capabilities or ()

    @property
    def ram_size(self) -> int:
        """Total bytes of all RAM blocks."""
        return sum(b.length for b in self.blocks.values())

    def vmdesc_json(self) -> Any:
        """The VM description parsed as JSON, or None."""
        if not self.vmdesc:
            return None
        return VMDescription(self.vmdesc).json()

    def device_names(self) -> list[str]:
        """Device sections named by the VM description, in stream order."""
        desc = self.vmdesc_json()
        if not isinstance(desc, dict):
            return []
        names = []
        for dev in desc.get("devices", []):
            if isinstance(dev, dict) and "name" in dev:
                inst = dev.get("instance_id", 0)
                names.append(f"{dev['name']}" + (f"/{inst}" if inst else ""))
        return names

    def block(self, name: str) -> BlockInfo:
        """The block called ``name``; ImageError if there is none."""
        try:
            return self.blocks[name]
        except KeyError:
            raise ImageError(f"no RAM block '{name}' in image (blocks: "
                             f"{', '.join(self.blocks)})") from None

    def present(self, name: str) -> np.ndarray:
        """One bool per page of block ``name``: True where the image holds page data.

        Costs one byte per page of the block: walks that must stay bounded at any RAM size
        use :meth:`runs`, :meth:`present_range` or :meth:`count_present` instead.
        """
        raise NotImplementedError

    def present_range(self, name: str, first: int, npages: int) -> np.ndarray:
        """One bool per page of pages ``[first, first + npages)`` of block ``name``."""
        raise NotImplementedError

    def _piece_runs(self, name: str, first: int, npages: int) -> Iterator[tuple[int, int]]:
        """Runs of pages with data among pages ``[first, first + npages)``, relative to
        ``first``."""
        starts, lengths = self._piece_run_arrays(name, first, npages)
        return zip(starts.tolist(), lengths.tolist(), strict=True)

    def _piece_run_arrays(self, name: str, first: int,
                          npages: int) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`_piece_runs` as arrays: first pages (relative to ``first``) and lengths."""
        return run_arrays(self.present_range(name, first, npages))

    def run_arrays(self, name: str) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """The runs of pages with data in block ``name`` as arrays ``(first pages,
        lengths)``, a pair per piece of :data:`BITMAP_PIECE_PAGES` pages (a run across two
        pieces comes in both): what a consumer of very many short runs takes, with no
        Python step per run."""
        blk = self.block(name)
        for p in range(0, blk.npages, BITMAP_PIECE_PAGES):
            starts, lengths = self._piece_run_arrays(name, p,
                                                     min(BITMAP_PIECE_PAGES, blk.npages - p))
            if len(starts):
                yield starts + p, lengths

    def runs(self, name: str, start: int = 0,
             stop: int | None = None) -> Iterator[tuple[int, int]]:
        """Maximal runs ``(first_page, npages)`` of pages with data in block ``name``
        (between pages ``start`` and ``stop``), in order.

        The presence information is walked in pieces of :data:`BITMAP_PIECE_PAGES` pages,
        so memory stays bounded at any block size.
        """
        blk = self.block(name)
        stop = blk.npages if stop is None else min(stop, blk.npages)
        pending: tuple[int, int] | None = None
        for p in range(start, stop, BITMAP_PIECE_PAGES):
            for f, n in self._piece_runs(name, p, min(BITMAP_PIECE_PAGES, stop - p)):
                f += p
                if pending is not None:
                    if pending[0] + pending[1] == f:
                        pending = (pending[0], pending[1] + n)
                        continue
                    yield pending
                pending = (f, n)
        if pending is not None:
            yield pending

    def count_present(self, name: str) -> int:
        """Number of pages of block ``name`` the image holds data for (bounded memory)."""
        return sum(int(lengths.sum()) for _, lengths in self.run_arrays(name))

    def last_present(self, name: str) -> int:
        """Index of the last page of block ``name`` with data, or -1 (bounded memory)."""
        last = -1
        for starts, lengths in self.run_arrays(name):
            last = int(starts[-1] + lengths[-1]) - 1
        return last

    def read_into(self, name: str, first_page: int, dest: memoryview) -> None:
        """Read pages ``first_page…`` of block ``name`` into ``dest`` (whole pages, every one
        holding data: a piece of a run as :meth:`runs` gives them)."""
        blk = self.block(name)
        if first_page < 0 or first_page + len(dest) // PAGE_SIZE > blk.npages:
            raise ImageError(f"pages {first_page}..{first_page + len(dest) // PAGE_SIZE} "
                             f"outside block '{name}'")
        self._read_into(blk, first_page, dest)

    def iter_data(self, name: str, chunk: int = READ_CHUNK) -> Iterator[tuple[int, memoryview]]:
        """``(first_page, data)`` for every run of pages with data, in pieces of ``chunk``.

        One read per piece; ``data`` is a view of a reused buffer, valid until the next
        iteration.
        """
        blk = self.block(name)
        per = max(1, chunk // PAGE_SIZE)
        buf = memoryview(bytearray(per * PAGE_SIZE))
        for first, n in self.runs(name):
            for p in range(first, first + n, per):
                k = min(per, first + n - p)
                view = buf[: k * PAGE_SIZE]
                self._read_into(blk, p, view)
                yield p, view

    def page_sets(self, name: str) -> Iterator[tuple[np.ndarray, PageSlots]]:
        """The pages with data of block ``name``, :data:`READ_CHUNK` of them at a time
        whatever their runs: ``(page numbers, slots)``, slot ``i`` holding page
        ``pages[i]``. Consecutive pages come in one read, scattered ones gathered
        (:meth:`read_page_set`): a guest whose pages with data lie between zero pages costs
        no Python per run. The slots are reused: valid until the next iteration."""
        per = READ_CHUNK // PAGE_SIZE
        slots = PageSlots(bytearray(per * PAGE_SIZE), 0, PAGE_SIZE, per)
        for pages in page_groups(self.run_arrays(name), per):
            self.read_page_set(name, pages, slots)
            yield pages, slots

    def absent_groups(self, name: str, size: int) -> Iterator[np.ndarray]:
        """The page numbers of block ``name``'s pages without data, ``size`` at a time
        (:func:`~fixedram.image.layout.gap_arrays` of :meth:`run_arrays`: numpy steps,
        bounded memory, no Python per gap)."""
        npages = self.block(name).npages
        return page_groups(gap_arrays(self.run_arrays(name), npages), size)

    def read(self, name: str, first_page: int, npages: int) -> bytearray:
        """Pages ``[first_page, first_page + npages)`` of block ``name``; zeros where absent."""
        blk = self.block(name)
        if first_page < 0 or first_page + npages > blk.npages:
            raise ImageError(f"pages {first_page}..{first_page + npages} outside block '{name}'")
        out = bytearray(npages * PAGE_SIZE)
        for start, n in self.runs(name, first_page, first_page + npages):
            start -= first_page
            self._read_into(blk, first_page + start, memoryview(out)[start * PAGE_SIZE :
                                                                      (start + n) * PAGE_SIZE])
        return out

    def _read_into(self, blk: BlockInfo, first: int, dest: memoryview) -> None:
        raise NotImplementedError

    def fileno(self) -> int:
        """The image's (buffered) file descriptor: for ``sendfile``, and for the checks and
        reports that look at the file's layout (holes, checksummed ranges)."""
        return self._fd

    def page_views(self, name: str, first_page: int, npages: int) -> list[memoryview]:
        """Pages ``[first_page, first_page + npages)`` of block ``name`` (all holding data)
        as views of the memory the image holds them in, in order, without a copy (a view
        per stretch of that memory, not per page); only where :attr:`holds_pages`."""
        raise ImageError(f"{self.where}: the image does not hold its pages in memory")

    def page_offset(self, name: str, first_page: int) -> int:
        """File offset of page ``first_page`` of block ``name`` (mapped-ram images only:
        ``npages`` pages from there are contiguous in the file)."""
        raise ImageError("a legacy stream image has no fixed page offsets")

    def record_spans(self, name: str, first_page: int,
                     npages: int) -> list[tuple[int, int, int]] | None:
        """Where pages ``[first_page, first_page + npages)`` of ``name`` (all holding data)
        lie in the file as consecutive CONTINUE PAGE records, exactly as a stream carries
        them: ``(first, n, offset)`` per stretch, ``offset`` being the file offset of page
        ``first``'s data (each following page's 8-byte header and data come next). None
        where the image does not keep pages as records (mapped-ram)."""
        return None

    def read_slots(self, name: str, first_page: int, npages: int, slots: PageSlots) -> int:
        """Read pages ``[first_page, first_page + npages)`` of ``name`` into slots ``0..``.

        Pages must all hold data (a piece of a run, as :meth:`runs` gives them);
        ``npages`` is at most ``slots.count``. Bytes between slots may be overwritten.
        Returns the number of read system calls made.
        """
        raise NotImplementedError

    def read_page_set(self, name: str, pages: np.ndarray, slots: PageSlots) -> int:
        """Read the pages numbered in ``pages`` (increasing, each holding data, not
        necessarily consecutive) into slots ``0..``: one read of the stretch of the file
        they lie in when it is at most :data:`SPAN_BYTES` wide and
        :func:`~fixedram.image.layout.one_stretch` (gaps included) and one numpy
        copy into the slots, else one read per run of consecutive pages; consecutive
        pages straight into the slots (:meth:`read_slots`). Returns the number of reads.
        The stretch is read into a buffer the image keeps: one caller at a time."""
        n = len(pages)
        assert 0 < n <= slots.count
        first = int(pages[0])
        if int(pages[-1]) + 1 - first == n:
            return self.read_slots(name, first, n, slots)
        where = self._places(name, pages) if self.pages_in_file else None
        if where is not None:
            lo, hi = int(where.min()), int(where.max()) + PAGE_SIZE
            if hi - lo <= SPAN_BYTES and one_stretch(hi - lo, n * PAGE_SIZE):
                at = where - lo
                raw = np.frombuffer(self._read_span(name, lo, hi - lo), dtype=np.uint8)
                if self.format == "mapped-ram":  # pages on page boundaries: one copy
                    np.take(raw.reshape(-1, PAGE_SIZE), at >> _PAGE_SHIFT, axis=0,
                            out=slots.array[:n], mode="clip")
                else:  # records: pages at any offset, the rows of a view at every byte
                    rows = np.lib.stride_tricks.as_strided(
                        raw, shape=(hi - lo - PAGE_SIZE + 1, PAGE_SIZE), strides=(1, 1))
                    slots.array[:n] = rows[at]  # (np.take would copy the whole view)
                return 1
        reads = 0
        for i, first, k in index_runs(pages):
            part = PageSlots(slots.buf, slots.first + i * slots.stride, slots.stride, k)
            reads += self.read_slots(name, first, k, part)
        return reads

    def _places(self, name: str, pages: np.ndarray) -> np.ndarray | None:
        """File offsets of the data of the pages numbered in ``pages`` (``int64``), or None
        where they are not all in the file."""
        return None

    def _read_span(self, name: str, offset: int, length: int) -> memoryview:
        """``length`` bytes of the file at ``offset`` (at most :data:`SPAN_BYTES`), through
        the O_DIRECT descriptor where the image has one: a view of a buffer the image
        keeps."""
        if self._dfd >= 0:
            try:
                return self._pread_direct(offset, length)
            except _DirectRefused:
                self._direct_refused()
        span = self.__dict__.get("_span")
        if span is None:
            span = self.__dict__["_span"] = memoryview(bytearray(SPAN_BYTES))
        preadv_exact(self._fd, span[:length], offset, f"pages of RAM block '{name}'")
        return span[:length]

    def _pread_direct(self, offset: int, length: int) -> memoryview:
        """``length`` bytes at ``offset`` read with O_DIRECT: a view into the stage buffer.

        The read is widened to aligned offsets. EINVAL (a filesystem refusing the
        alignment after all) raises :class:`_DirectRefused`.
        """
        assert self._stage is not None
        a0 = offset - offset % _DIO_ALIGN
        a1 = -(-(offset + length) // _DIO_ALIGN) * _DIO_ALIGN
        if a1 - a0 > len(self._stage):
            raise ValueError(f"direct read of {a1 - a0} bytes exceeds the stage buffer")
        view = memoryview(self._stage)[: a1 - a0]
        got = 0
        try:
            while got < offset + length - a0:
                n = os.preadv(self._dfd, [view[got:]], a0 + got)
                if n <= 0:
                    raise ImageError(f"pages of the image: file ends at byte {a0 + got}, "
                                     f"expected data up to byte {offset + length}", a0 + got)
                got += n
        except OSError as e:
            if e.errno != errno.EINVAL:
                raise
            raise _DirectRefused from None
        return view[offset - a0 : offset - a0 + length]

    def allocated_bytes(self) -> int:
        """Disk space the image file uses."""
        return os.fstat(self._fd).st_blocks * 512

    def shared_reads(self) -> None:
        """Hint: other processes may read this whole image at the same time (a fan-out of
        lazy restores). Nothing to do for a file: the page cache shares it."""

    def read_ahead_once(self) -> None:
        """Hint: the reader takes each page once (a lazy restore), so data read ahead once
        need not be read ahead again. Nothing to do for a file: the kernel reads ahead."""

    def prefetch(self) -> None:
        """Hint: a reader is about to read the whole image in order (a full restore or
        ``send``): start fetching its first data. Nothing to do for a file: the kernel
        reads ahead."""

    @property
    def fetched_bytes(self) -> int:
        """Bytes fetched from an object store so far (0 for a local file)."""
        return 0


class MappedRamImage(Image):
    """A mapped-ram file: every page at ``pages_offset + index * page_size``."""

    _bitmaps: dict[str, np.ndarray]

    def present(self, name: str) -> np.ndarray:
        cache = self.__dict__.setdefault("_bitmaps", {})
        if name not in cache:
            blk = self.block(name)
            cache[name] = bitmap_to_bools(self._bitmap_bytes(blk, 0, blk.npages), blk.npages)
        return cache[name]

    def _bitmap_bytes(self, blk: BlockInfo, first: int, npages: int) -> bytearray:
        """The bitmap bytes holding the bits of pages ``[first, first + npages)``, from
        byte ``first // 8`` up to a whole 64-bit word (bits beyond the block checked when
        the range reaches its end)."""
        assert blk.mapped is not None
        if first < 0 or npages < 0 or first + npages > blk.npages:
            raise ImageError(f"pages {first}..{first + npages} outside block '{blk.name}'")
        end = first + npages
        if end == blk.npages:
            self._check_tail(blk)
        b0 = first >> 3
        b1 = min(-(-end // 64) * 8, bitmap_bytes(blk.npages))
        raw = bytearray(b1 - b0)
        preadv_exact(self._fd, memoryview(raw), blk.mapped.bitmap_offset + b0,
                     f"bitmap of RAM block '{blk.name}'")
        return raw

    def _check_tail(self, blk: BlockInfo) -> None:
        """ImageError if a bitmap bit beyond the block's last page is set."""
        done: set[str] = self.__dict__.setdefault("_tail_ok", set())
        if blk.name in done:
            return
        assert blk.mapped is not None
        n = blk.npages
        b0 = n >> 3
        raw = bytearray(bitmap_bytes(n) - b0)
        preadv_exact(self._fd, memoryview(raw), blk.mapped.bitmap_offset + b0,
                     f"bitmap of RAM block '{blk.name}'")
        bits = bitmap_bits(raw, len(raw) * 8, skip=n & 7)
        if bits:
            extra = (bits & -bits).bit_length() - 1 + b0 * 8
            raise ImageError(f"RAM block '{blk.name}': bitmap bit {extra} is set beyond the "
                             f"block's {n} pages", blk.mapped.bitmap_offset)
        done.add(blk.name)

    def present_range(self, name: str, first: int, npages: int) -> np.ndarray:
        cache = self.__dict__.get("_bitmaps", {})
        blk = self.block(name)
        if name in cache:
            return cache[name][first : first + npages]
        b = first >> _BM_BLOCK_SHIFT
        if npages > 0 and first >= 0 and (first + npages - 1) >> _BM_BLOCK_SHIFT == b \
                and first + npages <= blk.npages:
            # a small range (a page request, an extent): from a cached block of the bitmap
            raw = self._bitmap_block(blk, b)
            first -= b << _BM_BLOCK_SHIFT
        else:
            raw = self._bitmap_bytes(blk, first, npages)
            first &= 7
        lo = first >> 3
        bits = np.unpackbits(np.frombuffer(raw, dtype=np.uint8)[lo : (first + npages + 7) >> 3],
                             bitorder="little")
        s = first & 7
        return bits[s : s + npages].astype(bool)

    def _bitmap_block(self, blk: BlockInfo, b: int) -> bytearray:
        """Bitmap bytes of pages ``[b << _BM_BLOCK_SHIFT, …)`` (4 KiB: 128 MiB of RAM), read
        once while among the last :data:`_BM_BLOCKS` used: one read serves the many small
        lookups of a region (a lazy restore's page requests, an extent check's ranges)."""
        key = (blk.name, b)
        blocks: dict[tuple[str, int], bytearray] = self.__dict__.setdefault("_bm_blocks", {})
        raw = blocks.get(key)
        if raw is None:
            base = b << _BM_BLOCK_SHIFT
            raw = self._bitmap_bytes(blk, base, min(1 << _BM_BLOCK_SHIFT, blk.npages - base))
            with self.__dict__.setdefault("_bm_lock", threading.Lock()):
                while len(blocks) >= _BM_BLOCKS:  # oldest first
                    del blocks[next(iter(blocks))]
                blocks[key] = raw
        return raw

    def count_present(self, name: str) -> int:
        """Number of pages of block ``name`` with data, popcounted from the bitmap read in
        pieces of :data:`BITMAP_PIECE_PAGES` pages (a bit set beyond the block is refused)."""
        blk = self.block(name)
        if name in self.__dict__.get("_bitmaps", {}):
            return super().count_present(name)
        total = 0
        for p in range(0, blk.npages, BITMAP_PIECE_PAGES):
            n = min(BITMAP_PIECE_PAGES, blk.npages - p)
            total += bitmap_bits(self._bitmap_bytes(blk, p, n), n).bit_count()
        return total

    def last_present(self, name: str) -> int:
        """Index of the last page of block ``name`` with data, or -1: the bitmap read in
        pieces of :data:`BITMAP_PIECE_PAGES` pages (a bit set beyond the block is refused)."""
        blk = self.block(name)
        if name in self.__dict__.get("_bitmaps", {}):
            return super().last_present(name)
        last = -1
        for p in range(0, blk.npages, BITMAP_PIECE_PAGES):
            n = min(BITMAP_PIECE_PAGES, blk.npages - p)
            bits = bitmap_bits(self._bitmap_bytes(blk, p, n), n)
            if bits:
                last = p + bits.bit_length() - 1
        return last

    def _piece_run_arrays(self, name: str, first: int,
                          npages: int) -> tuple[np.ndarray, np.ndarray]:
        if first % 64 or name in self.__dict__.get("_bitmaps", {}):
            return super()._piece_run_arrays(name, first, npages)
        return bitmap_run_arrays(self._bitmap_bytes(self.block(name), first, npages), npages)

    def _read_into(self, blk: BlockInfo, first: int, dest: memoryview) -> None:
        """Read pages into ``dest``; with O_DIRECT on and ``dest`` page-aligned in memory,
        straight through the O_DIRECT descriptor (no stage: several threads may read)."""
        assert blk.mapped is not None
        fd = self._fd
        if self._dfd >= 0 and _aligned(dest):
            fd = self._dfd
        preadv_exact(fd, dest, blk.mapped.pages_offset + first * PAGE_SIZE,
                     f"pages of RAM block '{blk.name}'")

    def page_offset(self, name: str, first_page: int) -> int:
        blk = self.block(name)
        assert blk.mapped is not None
        return blk.mapped.pages_offset + first_page * PAGE_SIZE

    def _places(self, name: str, pages: np.ndarray) -> np.ndarray | None:
        blk = self.block(name)
        assert blk.mapped is not None
        return pages * PAGE_SIZE + blk.mapped.pages_offset

    def read_slots(self, name: str, first_page: int, npages: int, slots: PageSlots) -> int:
        blk = self.block(name)
        assert blk.mapped is not None and 0 < npages <= slots.count
        pos = blk.mapped.pages_offset + first_page * PAGE_SIZE
        what = f"pages of RAM block '{name}'"
        if self._dfd >= 0:
            try:
                data = self._pread_direct(pos, npages * PAGE_SIZE)
            except _DirectRefused:
                self._direct_refused()
            else:
                slots.array[:npages] = np.frombuffer(data, np.uint8).reshape(npages, PAGE_SIZE)
                return 1
        if slots.stride == PAGE_SIZE:
            preadv_exact(self._fd, slots.span(0, npages), pos, what)
            return 1
        views = slots.views[:npages]
        got = os.preadv(self._fd, views, pos)
        if got < npages * PAGE_SIZE:  # short read (end of file or a signal): finish page-wise
            k, part = divmod(got, PAGE_SIZE)
            if part:
                preadv_exact(self._fd, views[k][part:], pos + got, what)
                k += 1
            for i in range(k, npages):
                preadv_exact(self._fd, views[i], pos + i * PAGE_SIZE, what)
        return 1


class StreamImage(Image):
    """A legacy migration stream file (``migrate file:`` without mapped-ram, ``exec:cat``)."""

    _where: dict[str, PageIndex]

    def present(self, name: str) -> np.ndarray:
        blk = self.block(name)
        return self._where[name].get(0, blk.npages) >= 0

    def present_range(self, name: str, first: int, npages: int) -> np.ndarray:
        self.block(name)
        return self._where[name].get(first, npages) >= 0

    def _piece_run_arrays(self, name: str, first: int,
                          npages: int) -> tuple[np.ndarray, np.ndarray]:
        """Runs found chunk by chunk of the sparse index, with numpy (cost follows the data,
        not the number of runs); a run across two chunks of the index comes in both."""
        self.block(name)
        starts: list[np.ndarray] = []
        lengths: list[np.ndarray] = []
        for _, c, lo, hi, at in list(self._where[name].spans(first, npages)):
            s, n = run_arrays(c[lo:hi] >= 0)
            if len(s):
                starts.append(s + (at - first))
                lengths.append(n)
        if not starts:
            return run_arrays(np.zeros(0, dtype=bool))
        return np.concatenate(starts), np.concatenate(lengths)

    def _read_into(self, blk: BlockInfo, first: int, dest: memoryview) -> None:
        where = self._where[blk.name].get(first, len(dest) // PAGE_SIZE)
        n = len(where)
        per = READ_CHUNK // PAGE_SIZE
        for i in range(0, n, per):  # PageSlots hold at most IOV_MAX slots
            k = min(per, n - i)
            slots = PageSlots(dest[i * PAGE_SIZE : (i + k) * PAGE_SIZE], 0, PAGE_SIZE, k)
            self._gather(where[i : i + k], slots)

    def read_slots(self, name: str, first_page: int, npages: int, slots: PageSlots) -> int:
        self.block(name)
        assert 0 < npages <= slots.count
        return self._gather(self._where[name].get(first_page, npages), slots)

    def _places(self, name: str, pages: np.ndarray) -> np.ndarray | None:
        self.block(name)
        where = self._where[name].get_at(pages)
        return None if (where < 0).any() else where

    def record_spans(self, name: str, first_page: int,
                     npages: int) -> list[tuple[int, int, int]] | None:
        self.block(name)
        where = self._where[name].get(first_page, npages)
        if (where < 0).any():
            raise ImageError(f"pages {first_page}..{first_page + npages} of RAM block "
                             f"'{name}' do not all hold data")
        starts = _record_breaks(where)
        ends = [*starts[1:], len(where)]
        return [(first_page + s, e - s, int(where[s])) for s, e in zip(starts, ends,
                                                                        strict=True)]

    def _gather(self, where: np.ndarray, slots: PageSlots) -> int:
        """Fill slots with the pages stored at file offsets ``where`` (-1: zero page).

        Pages stored as consecutive CONTINUE records (``_REC`` bytes apart) are read in one
        go: straight into the slots when their stride is ``_REC`` (the file's record
        headers land between the slots), else into a stage buffer and copied with one
        strided numpy copy. Returns the number of reads.
        """
        n = len(where)
        if not n:
            return 0
        starts = _record_breaks(where)
        reads = 0
        for s, e in zip(starts, [*starts[1:], n], strict=True):
            pos = int(where[s])
            if pos < 0:
                slots.array[s:e] = 0
                continue
            m = e - s
            span = (m - 1) * _REC + PAGE_SIZE
            reads += 1
            if self._dfd >= 0:
                try:
                    raw = self._pread_direct(pos, span)
                except _DirectRefused:
                    self._direct_refused()
                else:
                    slots.array[s:e] = _strided(raw, m)
                    continue
            if slots.stride == _REC:
                preadv_exact(self._fd, slots.span(s, m), pos, "stream page data")
            else:
                scratch = self.__dict__.get("_scratch")
                if scratch is None or len(scratch) < span:
                    scratch = self.__dict__["_scratch"] = memoryview(bytearray(span))
                raw = scratch[:span]
                preadv_exact(self._fd, raw, pos, "stream page data")
                slots.array[s:e] = _strided(raw, m)
        return reads


class PageIndex(SparseArray):
    """Where each page of a legacy stream's block last got data: a file offset, or -1.

    Sparse: 8 bytes per page only in chunks of :data:`INDEX_CHUNK` pages that hold data
    somewhere in the stream; a chunk without any costs nothing, so the index follows the
    data, not the block's length (a ZERO record where no data was ever seen is free).
    """

    __slots__ = ()

    def __init__(self, npages: int) -> None:
        super().__init__(npages, INDEX_CHUNK.bit_length() - 1, np.int64, _ABSENT)

    def put(self, first: int, npages: int, pos: int, stride: int) -> None:
        """Pages ``first…`` have data at ``pos``, ``pos + stride``…"""
        for _, c, lo, hi, at in self.spans(first, npages, True):
            p0 = pos + (at - first) * stride
            c[lo:hi] = np.arange(p0, p0 + (hi - lo) * stride, stride, dtype=np.int64)

    def clear(self, first: int, npages: int) -> None:
        """Pages ``first…`` are zero again (a chunk left without data is freed)."""
        self.reset(first, npages, free=True)


def _record_breaks(where: np.ndarray) -> list[int]:
    """Indices where a stretch of pages stored as consecutive records (``_REC`` bytes apart in
    the file) begins; an absent page (-1) is a stretch of its own."""
    n = len(where)
    absent = where < 0
    brk = np.ones(n, dtype=bool)
    if n > 1:
        brk[1:] = (np.diff(where) != _REC) | absent[1:] | absent[:-1]
    return list(np.flatnonzero(brk).tolist())


class _DirectRefused(Exception):
    """An O_DIRECT read failed with EINVAL (alignment the filesystem does not accept)."""


def _strided(raw: memoryview, m: int) -> np.ndarray:
    """The ``m`` pages of ``m`` consecutive CONTINUE PAGE records in ``raw`` (a 2-D view)."""
    return np.ndarray((m, PAGE_SIZE), dtype=np.uint8, buffer=raw, strides=(_REC, 1))


def _aligned(buf: memoryview) -> bool:
    """Whether ``buf`` starts on an O_DIRECT boundary in memory and is a whole number of them."""
    if len(buf) % _DIO_ALIGN:
        return False
    return int(np.frombuffer(buf, dtype=np.uint8).ctypes.data) % _DIO_ALIGN == 0


def _stage_size() -> int:
    """Stage buffer for O_DIRECT reads: the widest read (a 1 MiB piece of a stream's records,
    or a stretch :meth:`Image.read_page_set` reads) plus alignment slack on both sides."""
    return max((READ_CHUNK // PAGE_SIZE) * _REC, SPAN_BYTES) + 2 * _DIO_ALIGN


def _walk(fd: int, base: int, size: int, index: bool) -> tuple[StreamDecoder, dict[str, Any]]:
    """Run the decoder over the file, seeking over mapped-ram regions."""
    # views: page runs are decoded where they were read, never copied (only their place in
    # the file is kept)
    dec = StreamDecoder(base_offset=base, views=True)
    info: dict[str, Any] = {"blocks": {}, "commands": [], "device": None, "vmdesc": None,
                            "config": None, "where": {}, "sections": 0, "ram_id": None}
    where: dict[str, PageIndex] = info["where"]
    pos = base
    chunk = READ_CHUNK if index else METADATA_CHUNK
    while True:
        want = dec.next_offset
        if want != pos:
            if want > size:
                raise ImageError(f"RAM block '{next(reversed(info['blocks']), '?')}': pages "
                                 f"region ends at byte {want}, past the end of the file "
                                 f"({size} bytes)", want)
            dec.seek(want)
            pos = want
        # Never read across a 1 MiB boundary in one go: QEMU puts every pages region on
        # such a boundary, so the decoder sees each block header (and skips the pages)
        # before a read could reach page data. Opening a mapped-ram image thus reads
        # metadata only, in small pieces since it is small and scattered.
        want = min(chunk, READ_CHUNK - pos % READ_CHUNK)
        space = dec.recv_space(want)  # read straight into the decoder's buffer
        n = os.preadv(fd, [space[:want]], pos)
        del space
        records = dec.feed_received(n)
        if not n:
            records += dec.feed_eof()
        pos += n
        for r in records:
            if isinstance(r, PageRun):
                where[r.block].put(r.offset // PAGE_SIZE, r.npages, r.pos, _REC)
            elif isinstance(r, ZeroRun):
                where[r.block].clear(r.offset // PAGE_SIZE, r.npages)
            elif isinstance(r, ZeroPages):
                where[r.block].reset_at((r.offsets // PAGE_SIZE).astype(np.int64), free=True)
            elif isinstance(r, PageSet):
                data, zero = r.numbers()
                where[r.block].store_at(data, r.pos)
                if len(zero):
                    where[r.block].reset_at(zero, free=True)
            elif isinstance(r, Page):
                where[r.block].put(r.offset // PAGE_SIZE, 1, r.pos, _REC)
            elif isinstance(r, Zero):
                if r.fill:
                    raise ImageError(f"ZERO record with fill byte 0x{r.fill:02x} in block "
                                     f"'{r.block}' is not supported")
                where[r.block].clear(r.offset // PAGE_SIZE, 1)
            elif isinstance(r, RamBlock):
                if r.mapped is not None:
                    raise_first(mapped_bounds(r.name, r.length, r.mapped, size))
                info["blocks"][r.name] = BlockInfo(r.name, r.length, r.mapped, r.guest_addr)
                if index:
                    # the page index costs 8 bytes per claimed page: bound it by the file
                    # (QEMU writes a record of >= 9 bytes for every page of the stream)
                    claimed = sum(w.npages for w in where.values()) + r.length // PAGE_SIZE
                    if claimed > size:
                        raise ImageError(
                            f"RAM block '{r.name}' of 0x{r.length:x} bytes: the RAM blocks "
                            f"claim {claimed} pages, more than a {size}-byte stream file can "
                            "describe", dec.next_offset)
                    where[r.name] = PageIndex(r.length // PAGE_SIZE)
            elif isinstance(r, Configuration):
                info["config"] = r
            elif isinstance(r, CommandRecord):
                info["commands"].append(r.name)
            elif isinstance(r, SectionPart):
                info["sections"] += 1
            elif isinstance(r, SectionStart):
                info["ram_id"] = r.section_id
            elif isinstance(r, DeviceState):
                info["device"] = r.data
            elif isinstance(r, VMDescription):
                info["vmdesc"] = r.data
        if not n:
            return dec, info


def open_image(path: str | os.PathLike[str], *, offset: int | None = None) -> Image:
    """Open an image file of either format, or an object image (``s3://bucket/key``,
    :func:`fixedram.image.objimage.open_object_image`).

    ``offset`` is where the stream starts inside the file (``file:PATH,offset=N``);
    by default it is found by looking for the ``QEVM`` magic at 0 and then within
    the first MiB. A libvirt save image (``virsh save``) is recognised by its header: the
    stream starts after it, and a compressed one is decompressed first
    (:func:`fixedram.image.libvirt.decompress_payload`).
    """
    if is_object_url(path):
        from fixedram.image.objimage import open_object_image

        return open_object_image(str(path))
    p = Path(path)
    try:
        fd = os.open(p, os.O_RDONLY)
    except OSError as e:
        raise ImageError(f"cannot open {p}: {e.strerror}") from None
    try:
        size = os.fstat(fd).st_size
        if size == 0:
            raise ImageError(f"{p} is empty")
        lv = read_header(fd, size, str(p)) if is_libvirt(os.pread(fd, 16, 0)) else None
        if lv is not None and lv.compressed:
            plain = decompress_payload(fd, lv, str(p))
            os.close(fd)
            fd = plain
            size = os.fstat(fd).st_size
            offset = 0
        elif lv is not None:
            offset = lv.payload_offset
        base = _find_base(fd, size) if offset is None else offset
        head = os.pread(fd, 4096, base)
        cfg_probe = StreamDecoder(base_offset=base)
        try:
            recs = cfg_probe.feed(head)
        except StreamError as e:
            raise ImageError(e.message, e.offset) from None
        mapped = any(isinstance(r, Configuration) and r.mapped_ram for r in recs)
        if lv is not None and mapped != (lv.format == "sparse"):
            raise ImageError(f"{p}: the libvirt header says {lv.format} but the stream is "
                             f"{'mapped-ram' if mapped else 'a plain stream'}", 28)
        try:
            dec, info = _walk(fd, base, size, index=not mapped)
        except StreamError as e:
            raise ImageError(e.message, e.offset) from None
        if not dec.done:
            raise ImageError("image is incomplete: no end-of-stream marker", dec.next_offset)
        if info["config"] is None:
            raise ImageError("configuration section missing", base + 8)
        if not info["blocks"]:
            raise ImageError("no RAM section in the image", base)
        cls = MappedRamImage if mapped else StreamImage
        img = cls(path=p, format="mapped-ram" if mapped else "stream",
                  configuration=info["config"], blocks=info["blocks"],
                  device_state=info["device"] or b"", vmdesc=info["vmdesc"],
                  base_offset=base, file_size=size, commands=info["commands"],
                  sections=info["sections"], ram_section_id=info["ram_id"], libvirt=lv,
                  _fd=fd)
        if isinstance(img, StreamImage):
            img._where = info["where"]
        return img
    except BaseException:
        os.close(fd)
        raise


def image_location(image: str | os.PathLike[str]) -> Path | str:
    """An image argument as a location that stays valid from any working directory: an
    absolute path, or an object URL (``s3://bucket/key``) as it is."""
    return str(image) if is_object_url(str(image)) else Path(image).absolute()


def _find_base(fd: int, size: int) -> int:
    magic = FILE_MAGIC.to_bytes(4, "big")
    if os.pread(fd, 4, 0) == magic:
        return 0
    head = os.pread(fd, min(size, 1 << 20), 0)
    at = head.find(magic + b"\x00\x00\x00\x03")
    if at < 0:
        at = head.find(magic)  # the decoder then names the unsupported version
    if at < 0:
        got = head[:4].hex()
        raise ImageError(f"not a QEMU migration image (no QEVM magic; file starts with {got})", 0)
    return at

