"""Lazy restore: fixedram as a postcopy *source*, serving pages out of an image on demand.

:func:`send_postcopy` makes a QEMU started with ``-incoming`` (capability ``postcopy-ram``
on) run the saved guest at once, before any page of RAM has been sent (except the first
pages of the image's working-set record, if it has one), and then feeds it the pages: those
the guest touches first (QEMU asks for them on the return path), the others in the
background. The stream (``docs/protocol.md`` §8)::

    QEVM 3 | CONFIGURATION (no mapped-ram) | OPEN_RETURN_PATH | PING(1)
    | POSTCOPY_ADVISE(4096, 4096) | START ram: MEM_SIZE, blocks, EOS
    | POSTCOPY_RAM_DISCARD per block, covering the whole block | PING(2)
      -- wait for PONG(2): the destination accepted everything so far --
    | PART ram: the working-set record's first pages, EOS  (precopy pages; only with a record)
    | PACKAGED{ LISTEN | device state | PING(3) | RUN }          <- the guest runs from here
    | PART ram: requested pages only, EOS  (repeated)
      -- until PONG(3): the destination loaded the device state (at most DEVICE_LOAD_HOLD) --
    | PART ram: requested pages first, else a batch of unsent pages, EOS  (repeated)
    | END ram: EOS | EOF                                         -- wait for SHUT

Pages are read at their fixed offset in the image: requested ones with one positional read
per run (adjacent requests merged into one run), pushed ones a batch of 256 pages with data at
a time whatever their runs (one read where they are consecutive or lie close). Every page
with data is sent exactly once, as a PAGE record; a page already sent is never sent again,
even when QEMU asks for it (it is on its way).

**Working set** (``docs/working-set.md``): the image's recorded working set, if any, is
pushed first, in its order and at full speed (absent pages of it as ZERO records; its
first :data:`BEFORE_RUN_PAGES` before RUN, as precopy pages, the rest right after RUN),
then the rest under ``push_rate``; the pages QEMU asks for are logged and merged
into that record once every page is sent (:mod:`fixedram.image.workingset`; after the
stream's end, or before it and bounded in time under ``exec:``; never an error). A restore
that records with no record to prefetch holds the rest of the push while the guest keeps
asking, so that the push does not hide the pages it needs. The record only orders the
push: it never decides a page's content.

**Absent pages** (zero in the image) are not pushed. The whole-block DISCARD sent before
LISTEN drops every page of every block on the destination, firmware ROM blocks included, so
a page that never arrives reads as zero once the postcopy ends, which is exactly the image's
content; pushing ZERO records would cost the destination one ``UFFDIO_ZEROPAGE`` per page
for nothing. Only when QEMU *asks* for an absent page (the guest touched it while the
postcopy was running) is it answered, with a ZERO record.

**The discard is required**, not an optimisation: QEMU 7.2 and 10.0 prepare the postcopy
state at the first DISCARD; if LISTEN comes first, the destination's listen thread loads
pages into userfault-protected RAM and deadlocks.

**Failure after RUN cannot be undone.** Everything that can refuse the image runs before
RUN: :func:`~fixedram.endpoint.send.validate` (image consistency, machine type, RAM blocks),
the package size, a bidirectional channel, and a PING/PONG round trip proving the destination
accepted the configuration, the postcopy advice, the block list and the discards. After RUN,
the only copy of the guest's not-yet-sent memory is the image: if the image cannot be read,
fixedram dies, or the connection breaks, the guest cannot continue. QEMU then stops in
``postcopy-paused`` with vCPUs blocked on missing pages; the VM must be killed and restored
again. :class:`PostcopyFailed` says so in its message. (QEMU's postcopy recovery,
POSTCOPY_RESUME, is not implemented.)
"""

from __future__ import annotations

import collections
import contextlib
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from fixedram._lazy import numpy as np
from fixedram.endpoint.send import validate
from fixedram.endpoint.source import (
    ImageArg,
    Progress,
    ReturnPathReader,
    image_of,
    is_bidirectional,
    part_end,
    ram_end,
    record_buffer,
    stream_head,
)
from fixedram.errors import EndpointError, FixedramError, ImageError, MismatchError
from fixedram.image import Image
from fixedram.image.layout import page_groups, runs
from fixedram.image.reader import PageSlots
from fixedram.image.sections import ram_section_id
from fixedram.image.sparse import SparseBits
from fixedram.io.channel import Buffer, Channel
from fixedram.stream import CommandRecord, EndOfFile, Packaged, SectionPart, StreamEncoder, encode
from fixedram.stream.encoder import PageRecords, counted
from fixedram.stream.format import (
    BE32,
    BE64,
    MAX_PACKAGED,
    TARGET_PAGE_SIZE,
    Command,
    ReturnPathMsg,
)
from fixedram.stream.returnpath import ReturnPathDecoder

if TYPE_CHECKING:  # imported when used: xxhash stays out of a restore without a record
    from fixedram.image.workingset import Observation, RecordResult, WorkingSet

__all__ = [
    "PostcopyFailed",
    "PostcopyReport",
    "PostcopyStats",
    "send_postcopy",
    "RECORD_DEADLINE",
    "check_page_sizes",
    "postcopy_package",
    "discard_command",
]

PS = TARGET_PAGE_SIZE
#: Pages pushed per background PART section (1 MiB): bounds how long a request waits
#: behind the push.
PUSH_BATCH_PAGES = 256
#: Most requested pages answered in one PART section.
REQUEST_BATCH_PAGES = 1024
#: How long to wait for the destination to accept the stream before RUN (PONG 2).
ACCEPT_TIMEOUT = 60.0
#: How long to wait for SHUT after EOF.
SHUT_TIMEOUT = 120.0
#: How long a restore that must record before the stream's end (``exec:``) waits for the
#: working-set record to be written before it gives up on it (s).
RECORD_DEADLINE = 5.0
_PING_OPENED, _PING_ACCEPTED, _PING_RUNNING = 1, 2, 3
#: The report gives the time until the guest's first N requests were served, for these N.
REQUEST_MARKS = (1, 10, 100, 1000)
#: Requests kept for the working-set record (the rest are not recorded).
MAX_LOGGED_REQUESTS = 1 << 20
#: A restore that records without prefetching holds the background push until the guest
#: has asked for no page for this long (s), so that the push does not hide its working set...
LEARN_QUIET = 0.5
#: ... but at most this long after RUN (s).
LEARN_MAX = 10.0
#: Pages of the working-set record sent before RUN (16 MiB); the rest follows RUN at once.
BEFORE_RUN_PAGES = 4096
#: Longest the push waits after RUN for the destination to have loaded the device state
#: (PONG 3), serving only its requests meanwhile (s); past it the push starts anyway.
DEVICE_LOAD_HOLD = 2.0


class PostcopyFailed(EndpointError):
    """The lazy restore failed after the guest started running: the guest cannot continue."""


@dataclass(frozen=True)
class PostcopyStats:
    """Progress of a running :func:`send_postcopy`. Page counts are of pages with data."""

    pages_on_demand: int  # sent because QEMU asked (PAGE records)
    pages_pushed: int  # sent in the background
    pages_total: int  # pages with data in the image
    zero_on_demand: int  # absent pages QEMU asked for, answered with ZERO records
    requests: int  # REQ_PAGES(_ID) messages received
    bytes_sent: int
    elapsed: float
    running: bool  # RUN has been sent

    @property
    def pages_done(self) -> int:
        """Pages with data sent so far."""
        return self.pages_on_demand + self.pages_pushed


@dataclass(frozen=True)
class PostcopyReport:
    """What :func:`send_postcopy` did. Times in seconds from the call."""

    bytes_sent: int
    pages_on_demand: int
    pages_pushed: int
    zero_on_demand: int
    requests: int
    reads: int  # positional reads of page data
    time_to_run: float  # RUN written (the guest may run from now on)
    time_run_acked: float | None  # PONG(3) received: the destination processed the package
    elapsed: float  # SHUT received
    machine: str
    blocks: tuple[tuple[str, int], ...]
    bytes_received: int
    pages_prefetched: int = 0  # pages with data pushed first, from the working-set record
    zero_prefetched: int = 0  # absent pages of the record, sent first as ZERO records
    working_set_pages: int = 0  # pages in the record used for prefetching (0: none)
    #: seconds from the call until the guest's first N requests were answered (N in
    #: :data:`REQUEST_MARKS` that were reached)
    time_to_requests: dict[int, float] = field(default_factory=dict)
    bytes_read: int = 0  # page data read from the image
    bytes_fetched: int = 0  # bytes fetched from an object store (GETs; 0 for a local file)
    record: str = "off"  # the working-set record: recorded, unchanged, skipped or off
    warnings: tuple[str, ...] = ()

    @property
    def pages_sent(self) -> int:
        """Pages with data sent (on demand + pushed)."""
        return self.pages_on_demand + self.pages_pushed


# ---------------------------------------------------------------------------------------------
# Stream pieces
# ---------------------------------------------------------------------------------------------


def _command(cmd: Command, data: bytes = b"") -> bytes:
    return encode(CommandRecord(int(cmd), data))


def discard_command(block: str, ranges: Sequence[tuple[int, int]]) -> bytes:
    """POSTCOPY_RAM_DISCARD for byte ranges ``(start, length)`` of ``block``."""
    body = b"\x00" + counted(block) + b"\x00" + b"".join(
        BE64.pack(s) + BE64.pack(n) for s, n in ranges)
    return _command(Command.POSTCOPY_RAM_DISCARD, body)


def postcopy_package(device_state: bytes) -> bytes:
    """The PACKAGED command: LISTEN, the device state, PING(3), RUN."""
    inner = (_command(Command.POSTCOPY_LISTEN) + device_state
             + _command(Command.PING, BE32.pack(_PING_RUNNING)) + _command(Command.POSTCOPY_RUN))
    if len(inner) > MAX_PACKAGED:
        raise ImageError(f"device state of {len(device_state)} bytes does not fit in a postcopy "
                         f"package (QEMU's limit is {MAX_PACKAGED} bytes)")
    return encode(Packaged(inner))


def check_page_sizes(page_sizes: dict[str, int]) -> None:
    """Refuse a destination whose RAM blocks use pages larger than 4 KiB (hugetlbfs).

    A postcopy source for such a block must advertise its page size, name it in the block
    list and send every huge page whole, all its 4 KiB pieces in one run, zero ones
    included, before the destination can place it; fixedram's postcopy source sends 4 KiB
    pages (``docs/section-ids.md``, "Lazy restore and huge pages"). QEMU would refuse the
    stream at POSTCOPY_ADVISE; this says why before anything is sent.
    """
    huge = {n: ps for n, ps in page_sizes.items() if ps != PS}
    if huge:
        name, ps = next(iter(huge.items()))
        raise MismatchError(f"lazy restore of RAM backed by huge pages is not supported "
                            f"(RAM block '{name}' has {ps >> 10} KiB pages); restore it in full "
                            "(without --lazy)")


def _preamble(img: Image) -> bytes:
    """Everything up to and including PING(2), before which the guest cannot run."""
    out = [
        *stream_head(img, commands=[
            Command.OPEN_RETURN_PATH,
            (Command.PING, BE32.pack(_PING_OPENED)),
            (Command.POSTCOPY_ADVISE, BE64.pack(PS) + BE64.pack(PS)),
        ]),
        # at least one DISCARD before LISTEN, or QEMU deadlocks (see the module docstring)
        *(discard_command(b.name, [(0, b.length)]) for b in img.blocks.values()),
        _command(Command.PING, BE32.pack(_PING_ACCEPTED)),
    ]
    return b"".join(out)


# ---------------------------------------------------------------------------------------------
# The return path
# ---------------------------------------------------------------------------------------------


class _ReturnPath:
    """Reads the destination's messages in a thread: page requests, PONGs, SHUT."""

    def __init__(self, channel: Channel, blocks: dict[str, int]) -> None:
        self.cond = threading.Condition()
        self.requests: collections.deque[tuple[str, int, int]] = collections.deque()
        self.pongs: dict[int, float] = {}
        self.shut: int | None = None
        self.closed = False
        self.error: str | None = None
        self.nrequests = 0
        self.bad_requests = 0
        #: valid requests ``(block, first, npages, cursor)`` in arrival order, for the record
        self.log: list[tuple[str, int, int, int]] = []
        #: pages of the prefetched record handled so far (set by the sender)
        self.cursor = 0
        self.last_request = 0.0  # time.monotonic() of the last valid request
        self._blocks = blocks
        self._last_block: str | None = None
        self._dec = ReturnPathDecoder()
        self._reader = ReturnPathReader(channel, on_data=self._feed, on_closed=self._closed,
                                        name="fixedram-postcopy-rp", chunk=65536)

    @property
    def received(self) -> int:
        """Bytes read from the destination."""
        return self._reader.received

    def _feed(self, data: memoryview) -> None:
        msgs = self._dec.feed(bytes(data))
        if msgs:
            with self.cond:
                for kind, payload in msgs:
                    self._handle(kind, payload)
                self.cond.notify_all()

    def _closed(self, error: str | None) -> None:
        self.error = error
        with self.cond:
            self.closed = True
            self.cond.notify_all()

    def _handle(self, kind: int, payload: bytes) -> None:
        now = time.monotonic()
        if kind == ReturnPathMsg.PONG and len(payload) == 4:
            self.pongs[BE32.unpack(payload)[0]] = now
        elif kind == ReturnPathMsg.SHUT and len(payload) == 4:
            self.shut = BE32.unpack(payload)[0]
        elif kind in (ReturnPathMsg.REQ_PAGES, ReturnPathMsg.REQ_PAGES_ID) and len(payload) >= 12:
            start = BE64.unpack_from(payload, 0)[0]
            length = BE32.unpack_from(payload, 8)[0]
            if kind == ReturnPathMsg.REQ_PAGES_ID:
                n = payload[12] if len(payload) > 12 else 0
                self._last_block = payload[13 : 13 + n].decode("latin-1")
            self.nrequests += 1
            blk = self._last_block
            if blk is None or blk not in self._blocks or start % PS or length <= 0 \
                    or start + length > self._blocks[blk]:
                self.bad_requests += 1
                return
            first = start // PS
            npages = -(-length // PS)
            self.requests.append((blk, first, npages))
            self.last_request = now
            if len(self.log) < MAX_LOGGED_REQUESTS:
                self.log.append((blk, first, npages, self.cursor))

    def observation(self, prefetched: bool) -> Observation:
        """The requests seen so far, for the working-set record."""
        from fixedram.image.workingset import Observation

        with self.cond:
            return Observation(list(self.log), prefetched)

    def take_requests(self) -> list[tuple[str, int, int]]:
        """Every request queued so far (caller holds no lock)."""
        with self.cond:
            out = list(self.requests)
            self.requests.clear()
        return out

    def wait(self, predicate: Callable[[], bool], timeout: float | None) -> bool:
        """Wait until ``predicate`` (checked under the lock) holds or the path closes."""
        with self.cond:
            return self.cond.wait_for(lambda: predicate() or self.closed, timeout)

    def join(self, timeout: float) -> None:
        """Wait for the reader thread to end."""
        self._reader.join(timeout)


# ---------------------------------------------------------------------------------------------
# Sending
# ---------------------------------------------------------------------------------------------


def _merge(requests: list[tuple[str, int, int]]) -> list[tuple[str, int, int]]:
    """Requests as sorted, merged page runs ``(block, first, npages)``."""
    out: list[tuple[str, int, int]] = []
    for blk, first, n in sorted(requests):
        if out and out[-1][0] == blk and first <= out[-1][1] + out[-1][2]:
            b, f, m = out[-1]
            out[-1] = (b, f, max(m, first + n - f))
        else:
            out.append((blk, first, n))
    return out


class _Server:
    """Serves one lazy restore over ``channel`` once the guest runs."""

    def __init__(self, img: Image, channel: Channel, rp: _ReturnPath,
                 progress: Callable[[PostcopyStats], None] | None,
                 t0: float, plan: _Plan) -> None:
        self.img = img
        self.sid = ram_section_id(img)
        self.channel = channel
        self.rp = rp
        self.enc = StreamEncoder()
        self.sent = {n: SparseBits(b.npages, shift=12) for n, b in img.blocks.items()}
        self.pages_total = sum(img.count_present(n) for n in img.blocks)
        self.pages_on_demand = 0
        self.pages_pushed = 0
        self.zero_on_demand = 0
        self.pages_prefetched = 0
        self.zero_prefetched = 0
        self.prefetch = plan.ws
        self.served = 0  # requests answered
        self.served_at: dict[int, float] = {}
        self.reads = 0
        self.bytes_read = 0
        self.bytes_sent = 0
        self.running = False
        self.push_rate, self.prefetch_rate = plan.push_rate, plan.prefetch_rate
        self.learn = plan.learn  # hold the push until the guest stops asking (_learn)
        self.t0 = t0
        self.t_running = t0  # set at RUN
        self.pieces = self._pieces()
        self.next_piece = 0  # pieces before it were sent before RUN
        #: a batch's read buffer and record buffer (2 MiB), made by the first batch: after
        #: RUN unless a working-set record is prefetched, so the guest does not wait for
        #: their first touch
        self._bufs: tuple[memoryview, tuple[PageRecords, PageSlots]] | None = None
        self._clocks: dict[bool, list[float]] = {}
        self.progress = Progress(progress, self.stats)

    # -- output --------------------------------------------------------------------------

    def write(self, bufs: Sequence[Buffer]) -> None:
        self.channel.sendv(bufs)
        self.bytes_sent += sum(len(b) for b in bufs)

    def stats(self) -> PostcopyStats:
        return PostcopyStats(self.pages_on_demand, self.pages_pushed, self.pages_total,
                             self.zero_on_demand, self.rp.nrequests, self.bytes_sent,
                             time.monotonic() - self.t0, self.running)

    def _read(self, name: str, first: int, view: memoryview) -> None:
        """Pages ``first...`` of ``name`` (all present) into ``view``: one positional read."""
        self.reads += 1
        self.bytes_read += len(view)
        self.img.read_into(name, first, view)

    def _read_set(self, name: str, pages: np.ndarray, slots: PageSlots) -> None:
        """The pages numbered in ``pages`` (increasing, all present) into ``slots`` ``0…``:
        one read where they are consecutive or lie close
        (:meth:`~fixedram.image.Image.read_page_set`)."""
        self.reads += self.img.read_page_set(name, pages, slots)
        self.bytes_read += len(pages) * PS

    def _section(self, body: list[Buffer]) -> None:
        """One PART section around ``body``; its first record names its block."""
        self.write([encode(SectionPart(self.sid)), *body, *part_end(self.sid)])

    # -- requests ------------------------------------------------------------------------

    def serve_requests(self) -> None:
        """Answer every queued request, merged into runs, in PART sections."""
        reqs = self.rp.take_requests()
        if not reqs:
            return
        body: list[Buffer] = []
        npages = 0
        self.enc.forget_block()
        for name, first, n in _merge(reqs):
            sent = self.sent[name].get(first, n)
            pres = self.img.present_range(name, first, n)
            for off, k in runs(~sent):
                a = first + off
                for poff, pk in runs(pres[off : off + k]):  # with data: one read per run
                    buf = memoryview(bytearray(pk * PS))
                    self._read(name, a + poff, buf)
                    body += self.enc.page_run(name, (a + poff) * PS, buf)
                    self.pages_on_demand += pk
                for zoff, zk in runs(~pres[off : off + k]):  # absent: ZERO records
                    body.append(self.enc.zero_run(name, (a + zoff) * PS, zk))
                    self.zero_on_demand += zk
                self.sent[name].set(a, k)
                npages += k
            if npages >= REQUEST_BATCH_PAGES:
                self._section(body)
                body, npages = [], 0
                self.enc.forget_block()
        if body:
            self._section(body)
        before, self.served = self.served, self.served + len(reqs)
        now = time.monotonic() - self.t0
        for mark in REQUEST_MARKS:
            if before < mark <= self.served:
                self.served_at[mark] = now
        self.progress.tick()

    # -- background push -----------------------------------------------------------------

    def _pieces(self) -> list[tuple[str, int, int]]:
        """``(block, first, npages)`` pieces of at most a batch of the working-set record's
        pages, in its order (absent pages included)."""
        out = []
        if self.prefetch is not None:
            for name, first, n in self.prefetch.runs():
                for p in range(first, first + n, PUSH_BATCH_PAGES):
                    out.append((name, p, min(PUSH_BATCH_PAGES, first + n - p)))
        return out

    def _rest(self) -> Iterator[tuple[str, np.ndarray]]:
        """Every page with data, a batch's worth at a time whatever their runs, in file
        order (:func:`~fixedram.image.layout.page_groups` over the bitmap: memory bounded
        at any RAM size, no Python per run)."""
        for name in self.img.blocks:
            for pages in page_groups(self.img.run_arrays(name), PUSH_BATCH_PAGES):
                yield name, pages

    def _buffers(self) -> tuple[memoryview, tuple[PageRecords, PageSlots]]:
        """A batch's read buffer and record buffer, made by the first batch."""
        if self._bufs is None:
            self._bufs = (memoryview(bytearray(PUSH_BATCH_PAGES * PS)),
                          record_buffer(PUSH_BATCH_PAGES))
        return self._bufs

    def _batch(self, i: int) -> int:
        """Send one PART section of at most :data:`PUSH_BATCH_PAGES` unsent pages of the
        record's ``pieces[i:]``; the index of the next piece.

        The batch's pages are laid out header+page after header+page in one record buffer
        (framed by the encoder, no per-page Python), instead of two small buffers per page.
        """
        pieces, (buf, (recs, slots)) = self.pieces, self._buffers()
        body: list[Buffer] = []
        used = taken = 0
        self.enc.forget_block()  # the section's first record of a block names it
        while i < len(pieces):
            name, first, n = pieces[i]
            if taken and taken + n > PUSH_BATCH_PAGES:
                break
            i += 1
            taken += n
            unsent = ~self.sent[name].get(first, n)
            pres = self.img.present_range(name, first, n)
            for off, k in runs(unsent & ~pres):
                body.append(self.enc.zero_run(name, (first + off) * PS, k))
                self.zero_prefetched += k
            unsent &= pres
            for off, k in runs(unsent):
                view = buf[: k * PS]
                self._read(name, first + off, view)
                slots.array[used : used + k] = np.frombuffer(view, np.uint8).reshape(k, PS)
                body += self.enc.page_records_at(name, (first + off) * PS, used, k, recs)
                self.pages_pushed += k
                self.pages_prefetched += k
                used += k
            self.sent[name].set(first, n)
            self.rp.cursor += n
        if body:
            self._section(body)
        self._clock(True)[1] += used * PS
        return i

    def _push(self, name: str, pages: np.ndarray) -> None:
        """Send the pages numbered in ``pages`` (increasing, with data) that were not sent
        yet, in one PART section: read into the record buffer's slots (one read where they
        are consecutive or lie close, :meth:`~fixedram.image.Image.read_page_set`), their
        headers framed by the encoder in one numpy step."""
        pages = pages[~self.sent[name].get_at(pages)]
        n = len(pages)
        if not n:
            return
        _, (recs, slots) = self._buffers()
        self._read_set(name, pages, slots)
        self.enc.forget_block()
        body = self.enc.page_set_records(name, pages.astype(np.uint64) * np.uint64(PS), recs)
        self._section([body])
        self.sent[name].set_at(pages)
        self.pages_pushed += n
        self._clock(False)[1] += n * PS

    def _clock(self, prefetch: bool) -> list[float]:
        """``[start, bytes sent]`` of the prefetch's or the rest's throttle, started when
        first asked for."""
        return self._clocks.setdefault(prefetch, [time.monotonic(), 0.0])

    def prefetch_before_run(self) -> None:
        """Send the record's first :data:`BEFORE_RUN_PAGES` pages now, before RUN.

        QEMU loads them as ordinary precopy pages (the whole-block DISCARD came first) and
        they stay in place under LISTEN: the guest finds the pages it touches first when it
        starts, instead of faulting on pages still in the stream behind it
        (``docs/working-set.md``, "Prefetch before and after RUN").
        """
        i = 0
        while i < len(self.pieces) and self.rp.cursor < BEFORE_RUN_PAGES:
            self._pace(True)
            i = self._batch(i)
        self.next_piece = i

    def await_device_load(self) -> None:
        """Serve only the destination's requests until it has loaded the device state and
        reached RUN (PONG 3), at most :data:`DEVICE_LOAD_HOLD` s.

        The device state's loading may touch guest pages (a device's post-load reads its
        rings or ROM): each such page is a round trip the guest's start waits for, and an
        answer queued behind a megabyte of pushed pages (and a destination busy placing
        them) takes milliseconds instead of a fraction of one.
        """
        limit = time.monotonic() + DEVICE_LOAD_HOLD
        while _PING_RUNNING not in self.rp.pongs and (left := limit - time.monotonic()) > 0:
            self.rp.wait(lambda: bool(self.rp.requests) or _PING_RUNNING in self.rp.pongs,
                         left)
            self.serve_requests()
            self._check_alive()

    def push_all(self) -> None:
        """Push every unsent page, in bounded batches; requests always go first.

        The working-set record's pages go first, in its order (absent ones as ZERO records,
        so the guest need not ask for them), throttled by ``prefetch_rate`` only; then the
        rest in file order, under ``push_rate``. When this restore records without
        prefetching, the rest waits until the guest has stopped asking (:meth:`_learn`). A
        page already sent (asked for, or prefetched) is never sent again.
        """
        i = self.next_piece
        while i < len(self.pieces):
            self.serve_requests()
            self._pace(True)
            i = self._batch(i)
            self.progress.tick()
        for name, pages in self._rest():
            self.serve_requests()
            if self.learn:
                self._learn()
                self.learn = False
            self._pace(False)
            self._push(name, pages)
            self.progress.tick()
        self.serve_requests()

    def _pace(self, prefetch: bool) -> None:
        """Wait (serving requests) until the next batch of the prefetch or of the rest is
        due under its rate."""
        rate = self.prefetch_rate if prefetch else self.push_rate
        if not rate:
            return
        start, sent = self._clock(prefetch)
        until = start + sent / rate
        while (delay := until - time.monotonic()) > 0:
            self.rp.wait(lambda: bool(self.rp.requests), delay)
            self.serve_requests()
            self._check_alive()

    def _learn(self) -> None:
        """Hold the push while the guest is still asking for pages, so that the record sees
        its working set: until no request came for :data:`LEARN_QUIET` s, at most
        :data:`LEARN_MAX` s after RUN (``docs/working-set.md``, "Why the record sees the
        working set")."""
        limit = self.t_running + LEARN_MAX
        while True:
            self.serve_requests()
            self._check_alive()
            end = min(limit, max(self.rp.last_request, self.t_running) + LEARN_QUIET)
            if time.monotonic() >= end:
                return
            self.rp.wait(lambda: bool(self.rp.requests), end - time.monotonic())

    def _check_alive(self) -> None:
        if self.rp.closed:
            raise EndpointError("the destination closed the return path"
                                + (f" ({self.rp.error})" if self.rp.error else ""))


def _hang_up(channel: Channel) -> None:
    """End the stream, so QEMU notices at once (it pauses the postcopy) instead of waiting."""
    with contextlib.suppress(OSError, FixedramError):
        channel.shutdown_write()


def _failed_after_run(why: str) -> PostcopyFailed:
    return PostcopyFailed(
        f"lazy restore failed after the guest started running: {why}. The guest cannot "
        "continue: its remaining memory exists only in the image. The destination QEMU is "
        "stuck (postcopy-paused) and must be killed; restore the image again.")


def send_postcopy(image: ImageArg, channel: Channel, *,
                  dest_machine: str | None = None,
                  dest_blocks: Sequence[tuple[str, int]] | None = None,
                  progress: Callable[[PostcopyStats], None] | None = None,
                  on_running: Callable[[], None] | None = None,
                  on_last_page: Callable[[PostcopyReport], None] | None = None,
                  push_rate: float | None = None,
                  prefetch_rate: float | None = None,
                  prefetch: bool = True,
                  record: bool = True,
                  record_deadline: float | None = None,
                  accept_timeout: float = ACCEPT_TIMEOUT,
                  shut_timeout: float = SHUT_TIMEOUT) -> PostcopyReport:
    """Restore ``image`` lazily: a postcopy migration into the QEMU at the end of ``channel``.

    The destination must wait with ``-incoming`` and capability ``postcopy-ram`` on, and
    ``channel`` must be bidirectional (socket, or ``exec:`` stdin/stdout pipes): page
    requests come back on it. Every check runs before RUN (see the module docstring);
    failures then raise :class:`~fixedram.errors.ImageError`,
    :class:`~fixedram.errors.MismatchError` or :class:`~fixedram.errors.EndpointError` and
    the guest never started. ``on_running`` is called right after RUN is written;
    ``on_last_page`` gets the report as it stands when every page is sent, before the
    stream's end is written: its counts are final (its ``record`` only with
    ``record_deadline``), and the destination cannot complete (nor, under ``exec:``, stop
    this process) before the call returns (a failure of it is a warning);
    ``progress`` gets :class:`PostcopyStats` now and then. ``prefetch``: push the pages of
    the image's working-set record first (:mod:`fixedram.image.workingset`; a stale or
    damaged record is ignored with a warning), throttled to ``prefetch_rate`` (bytes/s;
    None: at full speed); ``push_rate`` throttles the rest of the background push
    (requests are always served at once). ``record``: merge the pages QEMU asked for into
    that record once every page is sent (an image that cannot take it gives a warning,
    never an error): after the stream's end is written, or, with ``record_deadline``
    (seconds; for ``exec:``, where QEMU may stop this process once it has the end), before
    it and for at most that long. Warnings are logged (:mod:`fixedram.log`) and listed in
    the report. A failure after RUN raises
    :class:`PostcopyFailed`. The channel's write side is shut down at the end; the channel is
    not closed.
    """
    t0 = time.monotonic()
    with image_of(image) as img:
        validate(img, dest_machine=dest_machine, dest_blocks=dest_blocks)
        package = postcopy_package(img.device_state)
        preamble = _preamble(img)
        if not is_bidirectional(channel):
            raise EndpointError("a lazy (postcopy) restore needs a bidirectional channel for "
                                "QEMU's page requests (a socket, or exec: with stdin)")
        for name in img.blocks:  # read every bitmap now: a bad one must fail before RUN
            img.last_present(name)
        plan = _Plan(prefetch, record, push_rate, prefetch_rate)
        if prefetch or record:
            plan.load(img)
        img.shared_reads()  # other lazy restores of the image may push the same pages
        img.read_ahead_once()  # each page is sent once: chunks read ahead again would
        # mostly hold pages sent already
        return _run(img, channel, preamble, package, progress, on_running, on_last_page,
                    accept_timeout, shut_timeout, t0, plan, record_deadline)


class _Plan:
    """How one lazy restore pushes: the rates, the working-set record to prefetch, whether to
    record, and the warnings given."""

    def __init__(self, prefetch: bool, record: bool, push_rate: float | None,
                 prefetch_rate: float | None) -> None:
        self.prefetch, self.record = prefetch, record
        self.push_rate, self.prefetch_rate = push_rate, prefetch_rate
        self.ws: WorkingSet | None = None
        #: record with nothing to prefetch: hold the push while the guest asks for pages
        self.learn = False
        self.warnings: list[str] = []
        self.outcome = "off"

    def warn(self, message: str) -> None:
        from fixedram.log import warn

        self.warnings.append(message)
        warn("%s", message)

    def load(self, img: Image) -> None:
        from fixedram.image import workingset

        try:
            loaded = workingset.load(img)
        except (OSError, FixedramError) as e:
            self.warn(f"working-set record not read: {e}")
            return
        for w in loaded.warnings:
            self.warn(w)
        if self.prefetch:
            self.ws = loaded.record
        self.learn = self.record and self.ws is None and workingset.can_record(img)

    def save(self, img: Image, rp: _ReturnPath, deadline: float | None = None) -> None:
        """Merge what QEMU asked for into the image's record. Never raises: the guest runs,
        and the stream's end must still be written. ``deadline`` (seconds): give up
        waiting after it (the write goes on in the background, crash-safe) with a warning."""
        if not self.record:
            return
        obs = rp.observation(prefetched=self.ws is not None)
        if deadline is None:
            self._done(_record(img, obs))
            return
        box: list[RecordResult] = []
        t = threading.Thread(target=lambda: box.append(_record(img, obs)),
                             name="fixedram-record", daemon=True)
        t.start()
        t.join(deadline)
        if box:
            self._done(box[0])
        else:
            self.outcome = "skipped"
            self.warn(f"working set not recorded: the image did not take it within "
                      f"{deadline:.0f} s; the restore is not affected")

    def _done(self, res: RecordResult) -> None:
        self.outcome = res.status
        if res.warning:
            self.warn(res.warning)


def _record(img: Image, obs: Observation) -> RecordResult:
    """``workingset.record``, any failure turned into a skipped result with a one-line
    warning (a bug there must not lose a running guest)."""
    from fixedram.image import workingset

    try:
        return workingset.record(img, obs)
    except Exception as e:  # after RUN nothing may escape
        why = e if isinstance(e, (OSError, FixedramError)) else f"{type(e).__name__}: {e}"
        return workingset.RecordResult("skipped", warning=f"working set not recorded: {why}; "
                                       "the restore is not affected")


def _report(img: Image, srv: _Server, rp: _ReturnPath, t_run: float, t0: float,
            unsent: int, plan: _Plan) -> PostcopyReport:
    """The report as of now, ``unsent`` bytes still to be written counted as sent."""
    acked = rp.pongs.get(_PING_RUNNING)
    return PostcopyReport(
        bytes_sent=srv.bytes_sent + unsent,
        pages_on_demand=srv.pages_on_demand,
        pages_pushed=srv.pages_pushed,
        zero_on_demand=srv.zero_on_demand,
        requests=rp.nrequests,
        reads=srv.reads,
        time_to_run=t_run,
        time_run_acked=acked - t0 if acked is not None else None,
        elapsed=time.monotonic() - t0,
        machine=img.machine,
        blocks=tuple((b.name, b.length) for b in img.blocks.values()),
        bytes_received=rp.received,
        pages_prefetched=srv.pages_prefetched,
        zero_prefetched=srv.zero_prefetched,
        working_set_pages=len(srv.prefetch) if srv.prefetch is not None else 0,
        time_to_requests=dict(srv.served_at),
        bytes_read=srv.bytes_read,
        bytes_fetched=img.fetched_bytes,
        record=plan.outcome,
        warnings=tuple(plan.warnings),
    )


def _run(img: Image, channel: Channel, preamble: bytes, package: bytes,
         progress: Callable[[PostcopyStats], None] | None,
         on_running: Callable[[], None] | None,
         on_last_page: Callable[[PostcopyReport], None] | None,
         accept_timeout: float, shut_timeout: float, t0: float, plan: _Plan,
         record_deadline: float | None) -> PostcopyReport:
    rp = _ReturnPath(channel, {n: b.length for n, b in img.blocks.items()})
    srv = _Server(img, channel, rp, progress, t0, plan)
    # -- before RUN: any failure leaves a destination that simply failed its load ----------
    try:
        srv.write([preamble])
    except EndpointError as e:
        raise EndpointError(f"the destination refused the lazy restore before the guest "
                            f"started ({e}); is capability postcopy-ram on?") from None
    if not rp.wait(lambda: _PING_ACCEPTED in rp.pongs, accept_timeout):
        raise EndpointError(f"the destination did not accept the postcopy setup within "
                            f"{accept_timeout:.0f} s; the guest was not started")
    if _PING_ACCEPTED not in rp.pongs:
        raise EndpointError("the destination refused the lazy restore before the guest started "
                            "(is capability postcopy-ram on? QEMU's stderr says why)")
    try:
        srv.prefetch_before_run()
    except OSError as e:
        raise ImageError(f"reading the image failed ({e}); the guest was not started") from e
    # -- RUN: from here on the guest depends on us ---------------------------------------
    try:
        srv.write([package])
        srv.t_running = time.monotonic()
        t_run = srv.t_running - t0
        srv.running = True
        srv.progress.tick(force=True)
        if on_running is not None:
            on_running()
        srv.await_device_load()
        srv.push_all()
        tail = [*ram_end(srv.sid), encode(EndOfFile())]
        if record_deadline is not None:
            # exec: QEMU may stop this process as soon as it has the stream's end, so the
            # record goes first, bounded in time
            plan.save(img, rp, record_deadline)
        if on_last_page is not None:
            try:
                on_last_page(_report(img, srv, rp, t_run, t0, sum(map(len, tail)), plan))
            except Exception as e:  # after RUN nothing may escape
                plan.warn(f"the report was not written before the end: {e}")
        srv.write(tail)
        if record_deadline is None:
            plan.save(img, rp)  # the destination completes meanwhile
    except (OSError, ImageError) as e:
        _hang_up(channel)
        raise _failed_after_run(f"reading the image failed: {e}") from e
    except FixedramError as e:
        _hang_up(channel)
        raise _failed_after_run(str(e)) from e
    srv.progress.tick(force=True)
    rp.wait(lambda: rp.shut is not None, shut_timeout)
    channel.shutdown_write()
    if rp.shut is None:
        raise EndpointError(f"every page was sent but the destination did not confirm the end "
                            f"of the restore (no SHUT within {shut_timeout:.0f} s)")
    if rp.shut != 0:
        raise EndpointError("the destination reported an error at the end of the lazy restore "
                            "(QEMU's stderr says why)")
    return _report(img, srv, rp, t_run, t0, 0, plan)
