"""Restore a saved image into a waiting QEMU by speaking the precopy stream to it.

:func:`send` turns an :class:`~fixedram.image.Image` (mapped-ram or legacy stream) into
the stream a QEMU started with ``-incoming`` loads, QEMU 7.2 and 10 alike::

    QEVM 3 | CONFIGURATION (machine, no mapped-ram) | START ram: MEM_SIZE, blocks, EOS
    | PART ram: PAGE records, then ZERO records, EOS               (one per block)
    | [SWITCHOVER_START: machine types >= 10.0 only] | END ram: EOS
    | device state (stored blob, verbatim) | EOF | VMDESCRIPTION (stored, or empty)

Pages with data go out as PAGE records. Pages without data go out as ZERO records, except
in blocks of guest RAM (larger than :data:`FRESH_MIN_BLOCK`) of a fresh destination, which
already reads as zero there (``docs/fresh-destination.md``): the stream, and the time of a
restore, follow the data, not the RAM size. The image's bitmap is walked in bounded pieces
(:meth:`~fixedram.image.Image.run_arrays`), so memory does not follow the RAM size either.

A block's pages with data go out a record buffer's worth (1 MiB) at a time whatever their
runs: one ``preadv`` puts consecutive pages straight into the page slots of a buffer laid
out as ``header|page|header|page…`` (scattered ones are gathered from one read of the
stretch they lie in, :meth:`~fixedram.image.Image.read_page_set`), one numpy assignment
writes the headers (:class:`~fixedram.stream.encoder.PageRecords`), and the group goes out
as one buffer; then the ZERO records its pages without data need, 64 Ki of them encoded in
one numpy step (a record names its page: QEMU takes them in any order). No Python runs per
page or per run. With ``direct_io`` pages are read through an O_DIRECT descriptor (no page
cache), run by run where the runs are long. A legacy stream image holds its pages as the
records the stream carries (header, page, header, page...): where the channel writes to a
descriptor, each stretch of such records goes out from the file by ``sendfile`` after a
header of ours for its first (:meth:`~fixedram.stream.StreamEncoder.stored_page_records`),
with no copy through fixedram. A mapped-ram image is still read into record buffers:
measured, sending its pages from a mapping of the file cost more CPU than reading them
(mapping and unmapping 4 KiB page-cache pages costs about what copying them does).

:func:`validate` makes every check that can refuse the image before the first byte goes
out: QEMU stops at the first inconsistency and cannot be reused after a failed load.
"""

from __future__ import annotations

import collections
import os
import re
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

from fixedram import faults
from fixedram._lazy import numpy as np
from fixedram.endpoint.source import (
    FRESH_MIN_BLOCK,
    LINGER_SECONDS,
    ImageArg,
    Progress,
    ReturnPathReader,
    SendStats,
    image_of,
    page_check,
    part_end,
    record_buffer,
    skips_absent,
    split_runs,
    stream_head,
    stream_tail,
)
from fixedram.errors import EndpointError, MismatchError
from fixedram.image import Image
from fixedram.image.check import require_restorable
from fixedram.image.layout import page_groups, page_ranges
from fixedram.image.reader import READ_CHUNK, BlockInfo, DirectIO, PageSlots
from fixedram.image.sections import ram_section_id
from fixedram.io.channel import Buffer, Channel, sendfile_all, write_fd
from fixedram.stream import SectionPart, StreamEncoder, encode
from fixedram.stream.encoder import FileRange, PageRecords
from fixedram.stream.format import TARGET_PAGE_SIZE
from fixedram.units import format_size
from fixedram.versions import wants_switchover_start

if TYPE_CHECKING:
    from fixedram.image.verify import PageCheck

__all__ = [
    "SendReport",
    "SendStats",
    "dest_page_sizes_from_hmp",
    "dest_ramblocks_from_hmp",
    "machine_from_qom_type",
    "send",
    "validate",
    "skips_absent",
    "FRESH_MIN_BLOCK",
]

PS = TARGET_PAGE_SIZE
#: Pieces smaller than this are copied and batched with their neighbours into one write.
_SMALL_PIECE = 64 << 10
#: Most pages encoded as ZERO records in one go (9 bytes each).
_ZERO_PIECE = 1 << 16
#: Flush batched buffers once they hold this many bytes.
_BATCH_BYTES = 1 << 20
#: Most pages of a legacy stream image looked up at once for records sent as they are stored.
_STORED_PIECE = 1 << 16

@dataclass(frozen=True)
class SendReport:
    """What :func:`send` did.

    ``pages_sent`` pages went out as PAGE records; ``zero_pages`` counts all the other pages
    (sent as ZERO records or, for a fresh destination's guest RAM, not sent at all);
    ``preadv_calls`` counts the reads of page data: one per record buffer's worth of pages
    (consecutive ones, or scattered ones lying close together), else one per run or 1 MiB
    piece of a run; from a legacy stream image, one per stretch of its records sent as
    stored, and one more wherever the file breaks a piece's records apart;
    ``bytes_received`` is what the destination sent back
    (nothing, in plain precopy); ``direct_io``: page data was read with O_DIRECT.
    """

    bytes_sent: int
    pages_sent: int
    zero_pages: int
    preadv_calls: int
    elapsed: float
    machine: str
    blocks: tuple[tuple[str, int], ...]
    switchover_start: bool
    bytes_received: int = 0
    direct_io: bool = False

    @property
    def rate(self) -> float:
        """Bytes per second."""
        return self.bytes_sent / self.elapsed if self.elapsed > 0 else 0.0


# ---------------------------------------------------------------------------------------------
# Destination facts
# ---------------------------------------------------------------------------------------------

_RAMBLOCK_LINE = re.compile(
    r"^\s*(\S+)\s+(?P<psize>\d+(?:\.\d+)?)\s*(?P<unit>[KMGT]?)i?B\s+0x([0-9a-fA-F]+)"
    r"\s+0x([0-9a-fA-F]+)\s+0x([0-9a-fA-F]+)"
)
_PSIZE_UNIT = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def dest_ramblocks_from_hmp(text: str) -> list[tuple[str, int]]:
    """``(name, used_length)`` of every RAM block in HMP ``info ramblock`` output.

    Works with QEMU 7.2 and 10 (10 adds the HVA and RO columns)::

                      Block Name    PSize              Offset               Used              Total
                          pc.ram    4 KiB  0x0000000000000000 0x0000000008000000 0x0000000008000000
    """
    blocks = []
    for line in text.splitlines():
        m = _RAMBLOCK_LINE.match(line)
        if m:
            blocks.append((m[1], int(m[5], 16)))
    return blocks


def dest_page_sizes_from_hmp(text: str) -> dict[str, int]:
    """Host page size (bytes) of every RAM block in HMP ``info ramblock`` output (the PSize
    column: 4 KiB, or the huge page size of a hugetlbfs-backed block)."""
    sizes = {}
    for line in text.splitlines():
        m = _RAMBLOCK_LINE.match(line)
        if m:
            sizes[m[1]] = int(float(m["psize"]) * _PSIZE_UNIT[m["unit"]])
    return sizes


def machine_from_qom_type(qom_type: str) -> str:
    """The machine type name from ``qom-get /machine type`` (``pc-q35-10.0-machine``)."""
    return qom_type.removesuffix("-machine")


# ---------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------


def validate(image: ImageArg, *, dest_machine: str | None = None,
             dest_blocks: Sequence[tuple[str, int]] | None = None) -> None:
    """Refuse an image that cannot be restored, or does not fit the destination.

    Image checks raise :class:`ImageError`: incomplete image (no device state or end
    marker), page size, block lengths, bitmap bits beyond a block, bitmap or pages outside
    the file. Destination checks raise :class:`MismatchError`: machine type differing, a
    block missing on either side or of another size.
    """
    with image_of(image) as img:
        require_restorable(img)
        _validate_dest(img, dest_machine, dest_blocks)


def _validate_dest(img: Image, dest_machine: str | None,
                   dest_blocks: Sequence[tuple[str, int]] | None) -> None:
    if dest_machine is not None:
        want = machine_from_qom_type(dest_machine)
        if want != img.machine:
            raise MismatchError(f"machine type differs: image '{img.machine}', destination "
                                f"'{want}'")
    if dest_blocks is None:
        return
    dest = dict(dest_blocks)

    def size(n: int) -> str:
        return format_size(n, exact=True)

    for name, blk in img.blocks.items():
        if name not in dest:
            raise MismatchError(f"RAM block '{name}' ({size(blk.length)}) of the image is "
                                "missing in the destination")
        if dest[name] != blk.length:
            raise MismatchError(f"RAM block '{name}' differs in size: image {size(blk.length)} "
                                f"(0x{blk.length:x}), destination {size(dest[name])} "
                                f"(0x{dest[name]:x})")
    for name, length in dest.items():
        if name not in img.blocks:
            raise MismatchError(f"RAM block '{name}' ({size(length)}) of the destination is "
                                "not in the image")


# ---------------------------------------------------------------------------------------------
# Sending
# ---------------------------------------------------------------------------------------------


class _Sender:
    """Batches buffers into vectored writes and keeps the counters."""

    def __init__(self, channel: Channel, pages_total: int,
                 progress: Callable[[SendStats], None] | None) -> None:
        self.channel = channel
        #: where data that bypasses the batch goes (-1: the channel takes buffers only)
        self.fd = write_fd(channel)
        self.pending: list[Buffer] = []
        self.pending_bytes = 0
        self.bytes_sent = 0
        self.pages_sent = 0
        self.zero_pages = 0
        self.reads = 0
        self.pages_total = pages_total
        self.t0 = time.monotonic()
        self.progress = Progress(progress, self.stats)

    def add(self, bufs: Sequence[Buffer], nbytes: int | None = None) -> None:
        self.pending.extend(bufs)
        self.pending_bytes += sum(len(b) for b in bufs) if nbytes is None else nbytes

    def flush(self) -> None:
        if self.pending:
            faults.point("send-pages")
            self.channel.sendv(self.pending)
            self.bytes_sent += self.pending_bytes
            self.pending = []
            self.pending_bytes = 0
        self.progress.tick()

    def maybe_flush(self) -> None:
        if self.pending_bytes >= _BATCH_BYTES or len(self.pending) >= 1024:
            self.flush()

    def _drain(self) -> None:
        """Write the batched buffers (before data that does not go through the batch)."""
        if self.pending:
            self.channel.sendv(self.pending)
            self.bytes_sent += self.pending_bytes
            self.pending = []
            self.pending_bytes = 0

    def send_file(self, fd: int, rng: FileRange) -> None:
        """Send a range of the image file as it is (after the batched buffers)."""
        faults.point("send-pages")
        self._drain()
        try:
            self.bytes_sent += sendfile_all(self.fd, fd, rng.offset, rng.length)
        except (BrokenPipeError, ConnectionResetError):
            raise EndpointError("the peer closed the connection") from None
        self.progress.tick()

    def stats(self) -> SendStats:
        return SendStats(self.bytes_sent, self.pages_sent, self.zero_pages, self.pages_total,
                         self.reads, time.monotonic() - self.t0)


def _pieces(img: Image, name: str, hint_fd: int, depth: int) -> Iterator[tuple[int, int]]:
    """``(first_page, npages)`` of every ≤1 MiB piece of every run of pages of ``name``.

    With ``hint_fd`` >= 0 (mapped-ram only), the kernel is asked to read the ``depth``
    pieces after the current one ahead (``POSIX_FADV_WILLNEED``), so disk reads overlap
    with sending without reader threads fighting the sender for the GIL.
    """
    plan = split_runs(img.runs(name), READ_CHUNK // PS)
    return _ahead(plan, lambda piece: [piece], img.block(name), hint_fd, depth)


_T = TypeVar("_T")


def _ahead(plan: Iterable[_T], span: Callable[[_T], Iterable[tuple[int, int]]],
           blk: BlockInfo, hint_fd: int, depth: int) -> Iterator[_T]:
    """``plan``'s pieces, the kernel asked to read the pages (``span``: ranges of first
    page and count) of the ``depth`` pieces after the current one ahead (none where
    ``hint_fd`` < 0)."""
    if hint_fd < 0 or blk.mapped is None or depth <= 0:
        yield from plan
        return
    base = blk.mapped.pages_offset
    ahead: collections.deque[_T] = collections.deque()
    for piece in plan:
        ahead.append(piece)
        for first, n in span(piece):
            os.posix_fadvise(hint_fd, base + first * PS, n * PS, os.POSIX_FADV_WILLNEED)
        if len(ahead) > depth:
            yield ahead.popleft()
    yield from ahead


def _record_buffer() -> tuple[PageRecords, PageSlots]:
    """A buffer of PAGE records for one piece, and the page slots reads fill in it."""
    return record_buffer(READ_CHUNK // PS)


def _read(img: Image, name: str, pieces: Iterable[tuple[int, int]],
          pairs: Sequence[tuple[PageRecords, PageSlots]], pool: ThreadPoolExecutor | None,
          ) -> Iterator[tuple[int, int, tuple[PageRecords, PageSlots], int]]:
    """``(first, npages, (records, slots), reads)`` per piece, its pages read into the slots.

    With ``pool`` the next piece is read in its thread while the caller sends this one;
    the two buffers of ``pairs`` alternate, so a piece's buffer is reused only after the
    caller asked for the piece after next.
    """
    if pool is None:
        for first, n in pieces:
            yield first, n, pairs[0], img.read_slots(name, first, n, pairs[0][1])
        return
    it = iter(pieces)
    nxt = next(it, None)
    fut = pool.submit(img.read_slots, name, nxt[0], nxt[1], pairs[0][1]) if nxt else None
    k = 0
    while nxt is not None and fut is not None:
        cur, reads = nxt, fut.result()
        nxt = next(it, None)
        if nxt is not None:
            fut = pool.submit(img.read_slots, name, nxt[0], nxt[1], pairs[(k + 1) % 2][1])
        yield cur[0], cur[1], pairs[k % 2], reads
        k += 1


class _PieceReader:
    """Reads a block's pages piece by piece into record buffers (:func:`_read`), with kernel
    read-ahead (``readers`` > 1, :func:`_pieces`) or, for an image read with O_DIRECT, the
    next piece read in a thread meanwhile into a second buffer."""

    def __init__(self, img: Image, readers: int, zero_copy: bool = False) -> None:
        self.img = img
        self.depth = readers - 1
        # zero_copy (the channel writes to a descriptor): a legacy stream's records go out
        # as the file stores them, by sendfile
        self.stored = (zero_copy and img.format == "stream" and not img.direct
                       and img.fileno() >= 0)
        # O_DIRECT reads wait for the disk: read the next piece in a thread meanwhile, into
        # a second record buffer (a buffered image has kernel read-ahead instead)
        self.pool = (ThreadPoolExecutor(1, thread_name_prefix="fixedram-read") if img.direct
                     else None)
        self.pairs = [_record_buffer() for _ in range(2 if self.pool is not None else 1)]
        # an image file: pages sent in groups whatever their runs (_send_groups); read
        # with O_DIRECT only where they are scattered (runs of pages read in a thread
        # meanwhile pay better on a disk)
        self.grouped = img.pages_in_file
        self.hint_fd = -1
        if (readers > 1 and img.format == "mapped-ram" and not img.direct
                and img.pages_in_file and hasattr(os, "posix_fadvise")):
            self.hint_fd = os.open(img.path, os.O_RDONLY)

    def pieces(self, name: str,
               ) -> Iterator[tuple[int, int, tuple[PageRecords, PageSlots], int]]:
        """``(first, npages, (records, slots), reads)`` per piece of ``name`` (:func:`_read`)."""
        pieces = _pieces(self.img, name, self.hint_fd, self.depth)
        return _read(self.img, name, pieces, self.pairs, self.pool)

    def groups(self, name: str) -> Iterator[np.ndarray]:
        """The page numbers of ``name``'s pages with data, a record buffer's worth at a time
        whatever their runs (:func:`~fixedram.image.layout.page_groups`), read ahead."""
        groups = page_groups(self.img.run_arrays(name), self.pairs[0][1].count)
        return _ahead(groups, page_ranges, self.img.block(name), self.hint_fd, self.depth)

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown()
        if self.hint_fd >= 0:
            os.close(self.hint_fd)


def send(image: ImageArg, channel: Channel, *,
         dest_machine: str | None = None,
         dest_blocks: Sequence[tuple[str, int]] | None = None,
         readers: int = 1,
         progress: Callable[[SendStats], None] | None = None,
         direct_io: DirectIO = False,
         fresh: bool = True) -> SendReport:
    """Send ``image`` over ``channel`` as a precopy stream a QEMU ``-incoming`` loads.

    ``fresh``: the destination's guest RAM reads as zero wherever nothing was loaded into
    it (a QEMU started with ``-incoming`` whose RAM is not backed by a file with old
    contents, ``docs/fresh-destination.md``), so pages of blocks larger than
    :data:`FRESH_MIN_BLOCK` the image holds no data for are not sent at all (the pages of
    smaller blocks go out as ZERO records); with ``fresh=False`` every page without data
    goes out as a ZERO record, and the stream describes every page.

    Everything is validated (:func:`validate`, against ``dest_machine``/``dest_blocks``
    when given) before the first byte is written. ``readers`` > 1 keeps ``readers - 1``
    pieces of a mapped-ram image in kernel read-ahead while the current one is sent (one
    thread reads; measured: threads reading ahead only slowed a cached image down, by GIL
    contention). ``progress`` is called with :class:`SendStats` now and then.
    ``direct_io`` reads page data with O_DIRECT (:meth:`Image.open_direct`: where the
    filesystem refuses, a warning and buffered reads, or with ``"required"`` an error
    before anything is sent). The write side of ``channel`` is shut down at the end; the
    channel is not closed.
    """
    with image_of(image) as img:
        validate(img, dest_machine=dest_machine, dest_blocks=dest_blocks)
        return _send(img, channel, readers, progress, direct_io, fresh)


def _absent(out: _Sender, enc: StreamEncoder, img: Image, blk: BlockInfo) -> None:
    """A ZERO record for every page of ``blk`` the image holds no data for, in pieces of
    :data:`_ZERO_PIECE` pages whatever their runs (one numpy step each: bounded memory at
    any size, no Python per run)."""
    for pages in img.absent_groups(blk.name, _ZERO_PIECE):
        out.add([enc.zero_pages(blk.name, pages)])
        out.zero_pages += len(pages)
        out.maybe_flush()


def _send_block(out: _Sender, enc: StreamEncoder, reader: _PieceReader, blk: BlockInfo,
                sid: int, check: PageCheck | None, skip: bool) -> None:
    """One PART section with every page of ``blk``: its pages with data, a record buffer's
    worth at a time whatever their runs (:func:`_send_groups`), or, from an image read with
    O_DIRECT whose runs are long or an image not in a file (an object image), piece by
    piece of each run (:func:`_send_read`); then, unless ``skip`` (:func:`skips_absent`), a
    ZERO record for each page without data. A record names its page, so QEMU loads them in
    any order (``docs/protocol.md`` §7.2). The pages without data count as done as the
    pages with data pass them (``skip``) or as their ZERO records go out."""
    out.add([encode(SectionPart(sid))])
    if reader.grouped and (not reader.img.direct or _scattered(reader.img, blk)):
        cursor = _send_groups(out, enc, reader, blk, check, skip)
    else:
        cursor = _send_read(out, enc, reader, blk, check, skip)
    if skip:
        out.zero_pages += blk.npages - cursor  # the pages without data after the last run
    else:
        _absent(out, enc, reader.img, blk)
    if check is not None:  # a bad extent stops the stream before the device state
        check.block_done(blk.name)
    out.add(part_end(sid))
    out.maybe_flush()


def _stored_run(out: _Sender, enc: StreamEncoder, img: Image, name: str, first: int,
                npages: int) -> None:
    """Pages ``first…`` of a legacy stream image, consecutive, as the file stores them: a
    header of ours for each stretch of consecutive records, the rest by ``sendfile``."""
    for p, k, pos in img.record_spans(name, first, npages) or ():
        head, rng = enc.stored_page_records(name, p * PS, k, pos)
        assert isinstance(rng, FileRange) and not isinstance(head, FileRange)
        out.add([head])
        out.send_file(img.fileno(), rng)
        out.reads += 1
    out.pages_sent += npages


def _scattered(img: Image, blk: BlockInfo) -> bool:
    """Whether ``blk``'s pages with data form runs of fewer than 16 pages on average (one
    pass over its bitmap, a piece at a time)."""
    nruns = npages = 0
    for starts, lengths in img.run_arrays(blk.name):
        nruns += len(starts)
        npages += int(lengths.sum())
    return nruns * 16 > npages


def _send_groups(out: _Sender, enc: StreamEncoder, reader: _PieceReader, blk: BlockInfo,
                 check: PageCheck | None, skip: bool) -> int:
    """The pages of ``blk`` with data, a record buffer's worth at a time whatever their runs
    (:meth:`_PieceReader.groups`): consecutive pages are read as one piece (or, from a
    legacy stream image, go out as the file stores them: :func:`_stored_run`), scattered
    ones gathered (:meth:`~fixedram.image.Image.read_page_set`); one numpy header assignment
    and one write per group. With ``skip``, the pages without data passed count as done.
    Returns the page after the last group."""
    recs, slots = reader.pairs[0]
    name = blk.name
    cursor = 0
    stored = (0, 0)  # consecutive pages of a legacy stream image not sent yet
    for pages in reader.groups(name):
        first, n = int(pages[0]), len(pages)
        consecutive = int(pages[-1]) + 1 - first == n
        if reader.stored and stored[1] and (not consecutive or first != sum(stored)
                                            or stored[1] >= _STORED_PIECE):
            _stored_run(out, enc, reader.img, name, *stored)
            stored = (0, 0)
        if consecutive and reader.stored:  # as the file stores them, in long pieces
            if skip:
                out.zero_pages += first - cursor
            stored = (stored[0] if stored[1] else first, stored[1] + n)
            cursor = first + n
            continue
        out.reads += reader.img.read_page_set(name, pages, slots)
        if check is not None:
            check.pages_at(name, pages, slots.views[:n])
        data: Buffer = enc.page_set_records(name, pages.astype(np.uint64) * np.uint64(PS),
                                            recs)
        small = len(data) < _SMALL_PIECE
        if small:  # copy, to batch it with the next groups into one write
            data = bytes(data)
        out.add([data])
        out.pages_sent += n
        if skip:  # the pages without data passed
            out.zero_pages += int(pages[-1]) + 1 - cursor - n
        cursor = int(pages[-1]) + 1
        if small:
            out.maybe_flush()
        else:
            out.flush()  # the record buffer is reused by the next group
    if stored[1]:
        _stored_run(out, enc, reader.img, name, *stored)
    return cursor


def _send_read(out: _Sender, enc: StreamEncoder, reader: _PieceReader, blk: BlockInfo,
               check: PageCheck | None, skip: bool) -> int:
    """The runs of pages of ``blk`` read piece by piece into record buffers (one read, one
    numpy header assignment and one write per piece). With ``skip``, the pages without data
    passed count as done. Returns the page after the last run."""
    cursor = 0
    for first, npages, (recs, slots), nreads in reader.pieces(blk.name):
        out.reads += nreads
        if check is not None:
            check.pages(blk.name, first, slots.views[:npages])
        if skip:  # the pages without data passed
            out.zero_pages += first - cursor
        data: Buffer = enc.page_records(blk.name, first * PS, npages, recs)
        small = len(data) < _SMALL_PIECE
        if small:  # copy, to batch it with the next pieces into one write
            data = bytes(data)
        out.add([data])
        out.pages_sent += npages
        cursor = first + npages
        if small:
            out.maybe_flush()
        else:
            out.flush()  # the record buffer is reused by the next piece
    return cursor


def _send(img: Image, channel: Channel, readers: int,
          progress: Callable[[SendStats], None] | None,
          direct_io: DirectIO = False, fresh: bool = True) -> SendReport:
    blocks = list(img.blocks.values())
    switchover = wants_switchover_start(img.machine, img.commands)
    enc = StreamEncoder()
    sid = ram_section_id(img)
    total = sum(b.length for b in blocks)
    head = stream_head(img)
    out = _Sender(channel, total // PS, progress)
    check = page_check(img)
    opened_direct = not img.direct and img.open_direct(direct_io)
    reader = _PieceReader(img, readers, zero_copy=out.fd >= 0)
    drain = ReturnPathReader(channel)
    try:
        faults.point("send-setup")
        out.add(head)
        for blk in blocks:
            _send_block(out, enc, reader, blk, sid, check, skips_absent(blk, fresh))
        faults.point("send-device")
        out.add(stream_tail(img, switchover))
        out.flush()
    finally:
        reader.close()
        was_direct = img.direct
        if opened_direct:
            img.close_direct()
    faults.point("send-end")
    channel.shutdown_write()
    drain.wait(LINGER_SECONDS)
    elapsed = time.monotonic() - out.t0
    if progress is not None:
        progress(out.stats())
    return SendReport(
        bytes_sent=out.bytes_sent,
        pages_sent=out.pages_sent,
        zero_pages=out.zero_pages,
        preadv_calls=out.reads,
        elapsed=elapsed,
        machine=img.machine,
        blocks=tuple((b.name, b.length) for b in blocks),
        switchover_start=switchover,
        bytes_received=drain.received,
        direct_io=was_direct,
    )
