"""The destination's page writes: page and zero records coalesced into runs, queued per feed.

:class:`~fixedram.endpoint.receive.Receiver` speaks the protocol; every page and zero
record it decodes comes here, where two pieces turn them into few, large writes:

- :class:`RunCoalescer` joins consecutive pages (or consecutive zero pages) of one block
  into one write operation of up to :data:`MAX_RUN` pages: one ``pwritev``, or one hole
  punched. A run holds pages or zero pages, never both (:class:`RunKind`). The decoder's
  page runs (``PageRun``: a view of the records as received, pages ``stride`` bytes
  apart) are operations of their own, and so are its scattered zero pages (``ZeroPages``:
  one :class:`ZeroSetOp`, bits and digests cleared in a few numpy steps) and scattered
  pages (``PageSet``: a :class:`PageSetOp` for the pages, a :class:`ZeroSetOp` for its
  zero pages; one ``pwritev`` per run, the digests and bits in a few numpy steps).
- :class:`WriteQueue` performs the operations of one feed as one batch, in stream order
  (a page re-sent, or zeroed after it had data, ends as the last record says).
  Buffered writes run inline: they only copy into the page cache, work a writer thread
  would do on the same (shared) cores plus a hand-over per feed: with QEMU as the source on
  2 cores, a writer thread was 2-10 % slower and took 5-20 % more of fixedram's CPU (one
  connection into tmpfs); it was faster only against a peer that did nothing but send. Each
  buffered batch's range is then handed to writeback, which starts at once rather than
  at the final fsync. O_DIRECT writes wait for the device: they run in a writer thread,
  overlapping the receive of the next bytes, through a page-aligned stage buffer (pages
  in the stream are not aligned).

Page data is not copied on its way to the write (only into the O_DIRECT stage): the
operations hold views of the decoder's buffers, and the decoder reuses those per feed
(a buffer is refilled two feeds later). So every feed ends with exactly one in-flight
entry (``None`` when nothing went to the writer thread) and :meth:`WriteQueue.wait`
counts feeds, not batches: before the decoder takes more bytes, the writes of all but the
last feed are done; before any record that depends on the pages (section markers,
multifd syncs, device state, the end of the stream), all of them are.
"""

from __future__ import annotations

import enum
import mmap
from concurrent.futures import Future, ThreadPoolExecutor

from fixedram import faults
from fixedram._lazy import numpy as np
from fixedram.endpoint.multifd import MultifdReceiver
from fixedram.image.layout import PAGE_SIZE, page_slices
from fixedram.image.writer import Buffer, MappedRamWriter
from fixedram.io.files import aligned_buffer, drop_cached

__all__ = ["MAX_RUN", "PageSetOp", "RunCoalescer", "RunKind", "WriteOp", "WriteQueue",
           "ZeroSetOp"]

#: Most pages written by one pwritev (1 MiB).
MAX_RUN = 256

#: One queued write: block, first page, page buffers, zero pages, the stride of a
#: decoder's page run (0 otherwise) and that run's one-page views (if the decoder gave
#: them). Zero pages > 0: punch them, the buffers are empty; stride > 0: the one buffer
#: holds pages ``stride`` bytes apart.
WriteOp = tuple[str, int, list[Buffer], int, int, list[memoryview] | None]
#: Scattered zero pages: block and page numbers (``int64``).
ZeroSetOp = tuple[str, np.ndarray]
#: Scattered pages: block, page numbers (``int64``) and one view per page.
PageSetOp = tuple[str, np.ndarray, list[memoryview]]


class RunKind(enum.Enum):
    """What the pending run of a :class:`RunCoalescer` holds."""

    PAGES = enum.auto()
    ZEROS = enum.auto()


_PAGES = RunKind.PAGES
_ZEROS = RunKind.ZEROS


class RunCoalescer:
    """Turns page and zero records into write operations, consecutive ones as one run.

    Feed it records in stream order with :meth:`page`, :meth:`zeros`, :meth:`run`,
    :meth:`zero_set` and :meth:`page_set`; :meth:`take` ends the pending run and hands
    over the operations so far.
    """

    def __init__(self) -> None:
        self._ops: list[WriteOp | ZeroSetOp | PageSetOp] = []
        # the pending run: consecutive pages (or zero pages) of one block
        self._kind: RunKind | None = None
        self._blk = ""
        self._first = 0
        self._n = 0
        self._bufs: list[Buffer] = []

    @property
    def pending_pages(self) -> int:
        """Pages held in the pending run, not yet an operation (zero pages not counted)."""
        return self._n if self._kind is _PAGES else 0

    def page(self, block: str, page: int, data: Buffer) -> None:
        """One page record: page index ``page`` of ``block`` holds ``data``."""
        if (
            self._kind is not _PAGES
            or block != self._blk
            or page != self._first + self._n
            or self._n >= MAX_RUN
        ):
            self.flush()
            self._kind, self._blk, self._first = _PAGES, block, page
        self._bufs.append(data)
        self._n += 1

    def zeros(self, block: str, first: int, n: int) -> None:
        """``n`` zero pages of ``block`` from page index ``first``."""
        if self._kind is not _ZEROS or block != self._blk or first != self._first + self._n:
            self.flush()
            self._kind, self._blk, self._first = _ZEROS, block, first
        self._n += n

    def zero_set(self, block: str, pages: np.ndarray) -> None:
        """Scattered zero pages of ``block`` (page numbers, ``int64``); one operation."""
        self.flush()
        self._ops.append((block, pages))

    def page_set(self, block: str, pages: np.ndarray, views: list[memoryview]) -> None:
        """Scattered pages of ``block``: page ``pages[i]`` (``int64``) holds ``views[i]``;
        one operation."""
        self.flush()
        if len(pages):
            self._ops.append((block, pages, views))

    def run(self, block: str, first: int, data: Buffer, stride: int,
            pages: list[memoryview] | None = None) -> None:
        """A decoder's page run: pages of ``block`` from ``first``, ``stride`` bytes apart
        in ``data`` (``pages``: the same pages, one view each); one operation of its own."""
        if self._n:
            self.flush()
        self._ops.append((block, first, [data], 0, stride, pages))

    def flush(self) -> None:
        """End the pending run: queue it as one operation."""
        n = self._n
        if not n:
            return
        if self._kind is _PAGES:
            self._ops.append((self._blk, self._first, self._bufs, 0, 0, None))
            self._bufs = []
        else:
            self._ops.append((self._blk, self._first, [], n, 0, None))
        self._kind = None
        self._n = 0

    def take(self) -> list[WriteOp | ZeroSetOp | PageSetOp]:
        """End the pending run; the operations queued since the last take, in order."""
        self.flush()
        ops, self._ops = self._ops, []
        return ops


class WriteQueue:
    """Performs batches of write operations on ``sink``, one batch per feed.

    ``writer`` is the image's writer (its block layout places a batch's range for
    writeback) and ``fd`` the image's descriptor; ``direct``: ``sink`` writes page data
    with O_DIRECT, so batches run in the writer thread through an aligned stage buffer.
    :meth:`submit` once per feed, :meth:`wait` before reusing a feed's buffers, then
    :meth:`close` (or :meth:`abort`).
    """

    def __init__(
        self,
        sink: MultifdReceiver | MappedRamWriter,
        writer: MappedRamWriter,
        fd: int,
        *,
        direct: bool,
    ) -> None:
        self._sink = sink
        self._writer = writer
        self._fd = fd
        self._inflight: list[Future[None] | None] = []
        self._io = ThreadPoolExecutor(1, thread_name_prefix="fixedram-write")
        self._stage: memoryview | None = None
        self._stage_map: mmap.mmap | None = None
        #: the stage's pages, one view each (made once)
        self._stage_pages: list[memoryview] = []
        if direct:
            stage = aligned_buffer(MAX_RUN * PAGE_SIZE)
            self._stage_map = stage
            self._stage = memoryview(stage)
            self._stage_pages = list(map(self._stage.__getitem__, page_slices(MAX_RUN)))

    def submit(self, ops: list[WriteOp | ZeroSetOp | PageSetOp]) -> None:
        """Perform the operations of one feed: buffered, at once; with O_DIRECT, in the
        writer thread (as one batch, overlapping the next receive). Adds exactly one
        in-flight entry (None when nothing is in flight), so :meth:`wait` counts feeds."""
        fut = None
        if ops:
            if self._stage is None:
                self._apply(ops)
            else:
                fut = self._io.submit(self._apply, ops)
        self._inflight.append(fut)

    def wait(self, keep: int) -> None:
        """Wait until the batches of all but the last ``keep`` feeds are written."""
        q = self._inflight
        while len(q) > keep:
            fut = q.pop(0)
            if fut is not None:
                fut.result()  # re-raises the writer's error here

    def close(self) -> None:
        """Stop the writer thread (after :meth:`wait`\\ ``(0)``) and free the stage."""
        self._io.shutdown()
        self._release()

    def abort(self) -> None:
        """Drop batches not started, wait for a running one, free the stage."""
        self._io.shutdown(cancel_futures=True)
        self._inflight = []
        self._release()

    def _release(self) -> None:
        for v in self._stage_pages:
            v.release()
        self._stage_pages = []
        if self._stage is not None:
            self._stage.release()
            self._stage = None
        if self._stage_map is not None:
            self._stage_map.close()
            self._stage_map = None

    def _apply(self, ops: list[WriteOp | ZeroSetOp | PageSetOp]) -> None:
        """Perform ``ops`` in order (writer thread with O_DIRECT: copied through the stage)."""
        sink = self._sink
        stage = self._stage
        lo, hi = -1, -1
        for op in ops:
            faults.point("receive-pages")
            if len(op) == 2:
                sink.zero_page_set(*op)
                continue
            if len(op) == 3:
                block, pages, page_views = op
                if stage is None:
                    sink.write_page_set(block, pages, page_views)
                else:  # O_DIRECT: through the aligned stage, a stage's worth at a time
                    per = len(self._stage_pages)
                    for j in range(0, len(pages), per):
                        k = min(per, len(pages) - j)
                        stage[: k * PAGE_SIZE] = b"".join(page_views[j : j + k])
                        sink.write_page_set(block, pages[j : j + k], self._stage_pages[:k])
                blk = self._writer.blocks.get(block)
                if blk is not None:
                    a = blk.pages_offset + int(pages.min()) * PAGE_SIZE
                    b = blk.pages_offset + (int(pages.max()) + 1) * PAGE_SIZE
                    lo = a if lo < 0 else min(lo, a)
                    hi = max(hi, b)
                continue
            block, first, bufs, zeros, stride, views = op
            if zeros:
                sink.zero_pages(block, first, zeros)
                continue
            if stride:
                data = memoryview(bufs[0])
                npages = (len(data) + stride - PAGE_SIZE) // stride
                if stage is None:
                    if views is None:
                        views = list(map(data.__getitem__, page_slices(npages, stride)))
                    n = sink.write_page_views(block, first, views)
                else:
                    n = 0
                    per = len(stage) // PAGE_SIZE
                    while n < npages:
                        k = min(per, npages - n)
                        src = np.ndarray(
                            (k, PAGE_SIZE),
                            dtype=np.uint8,
                            buffer=data,
                            offset=n * stride,
                            strides=(stride, 1),
                        )
                        dst = np.frombuffer(stage, dtype=np.uint8, count=k * PAGE_SIZE)
                        np.copyto(dst.reshape(k, PAGE_SIZE), src)
                        del src, dst
                        n += sink.write_pages(block, first + n, [stage[: k * PAGE_SIZE]])
            elif stage is None:
                n = sink.write_pages(block, first, bufs)
            else:
                n = 0
                for buf in bufs:
                    data = memoryview(buf)
                    for at in range(0, len(data), len(stage)):
                        piece = data[at : at + len(stage)]
                        stage[: len(piece)] = piece
                        n += sink.write_pages(block, first + n, [stage[: len(piece)]])
            blk = self._writer.blocks.get(block)
            if blk is not None:
                a = blk.pages_offset + first * PAGE_SIZE
                b = a + n * PAGE_SIZE
                lo = a if lo < 0 else min(lo, a)
                hi = max(hi, b)
        if lo >= 0 and stage is None:
            drop_cached(self._fd, lo, hi - lo)  # writeback starts now, not at fsync
