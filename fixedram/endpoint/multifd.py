"""Receiving multifd channels: one thread per channel, pages applied epoch by epoch.

A multifd migration sends normal pages over N extra connections while the main
connection carries the block list, sync markers and (in some modes) ZERO records.
Pages of one RAM page can travel on different channels in different rounds, so
they must be applied in order of *epochs* (``docs/multifd.md`` §4):

* On every channel, epoch ``e`` is the packets after its ``e``-th SYNC packet, up
  to and including its next one (a SYNC packet's own pages belong to the epoch it
  closes).
* On the main channel, epoch ``e`` is everything after the ``e``-th sync marker:
  a ``MULTIFD_FLUSH`` record (QEMU 10, machine >= 8.1) or every RAM EOS (QEMU 7.2,
  and QEMU 10 with machine <= 8.0). ``sync="auto"`` picks the mode from whichever
  comes first: a flush-mode setup section has a flush before its EOS.
* Marker ``k`` waits until every channel has read its ``k``-th SYNC; a channel
  that has read its ``k``-th SYNC waits for marker ``k`` before it applies more.
  So at any time the main channel and every channel that is writing are in the
  same epoch, and within an epoch QEMU never sends a page twice.

This is QEMU's own receive discipline, and it bounds memory: each channel holds
one packet (its 512 KiB payload buffer is reused), the rest waits in the socket.

:class:`MultifdReceiver` knows nothing of sockets: it reads :class:`Channel`\\ s
given to :meth:`~MultifdReceiver.add_channel` and writes to a :class:`PageSink`
(the shape of :class:`fixedram.image.writer.MappedRamWriter`). The main-channel
loop reports RAM blocks and markers with :meth:`~MultifdReceiver.begin`,
:meth:`~MultifdReceiver.on_flush` and :meth:`~MultifdReceiver.on_eos` (or hands
every record to :meth:`~MultifdReceiver.handle`), and ends with
:meth:`~MultifdReceiver.finish`.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from fixedram._lazy import numpy as np
from fixedram.errors import EndpointError, FixedramError, StreamError, UnsupportedRecord
from fixedram.image.layout import index_runs
from fixedram.io.channel import Channel, recv_whole
from fixedram.stream.format import MULTIFD_PAGES_PER_PACKET, TARGET_PAGE_SIZE
from fixedram.stream.multifd import (
    MULTIFD_PACKET_SIZE,
    MultifdChannelDecoder,
    MultifdInit,
    MultifdPacket,
)
from fixedram.stream.records import EndOfSection, MultifdFlush, Page, RamBlock, Record, Zero
from fixedram.versions import SyncMode

__all__ = ["ChannelStats", "MultifdReceiver", "MultifdStats", "PageSink"]

Buffer = bytes | bytearray | memoryview
_SHIFT = TARGET_PAGE_SIZE.bit_length() - 1
_SHIFT_U64 = np.uint64(_SHIFT)
_PAYLOAD = MULTIFD_PAGES_PER_PACKET * TARGET_PAGE_SIZE
#: Bytes of packet headers read at once after a packet without page data.
_STAGE = 48 * MULTIFD_PACKET_SIZE


class PageSink(Protocol):
    """Where pages go. Called from several threads, for disjoint pages, unless serialised.

    ``bufs`` are only valid during the call (they are views of reused buffers). A sink may
    also take scattered pages in one call each, as
    :class:`~fixedram.image.writer.MappedRamWriter` does: ``write_page_views(block, first,
    views)``, ``write_page_set(block, pages, views, runs)`` and ``zero_page_set(block,
    pages)``; where it does not, they come as one call per run.
    """

    def write_pages(self, block: str, first_page: int, bufs: Sequence[Buffer]) -> Any:
        """Store consecutive pages of ``block`` from page index ``first_page``."""
        ...

    def zero_pages(self, block: str, first_page: int, npages: int = 1) -> Any:
        """Mark ``npages`` consecutive pages from ``first_page`` as all zero."""
        ...


@dataclass
class ChannelStats:
    """Counters of one multifd channel."""

    channel_id: int | None
    packets: int = 0
    sync_packets: int = 0
    pages: int = 0
    zero_pages: int = 0
    bytes: int = 0
    eof: bool = False


@dataclass
class MultifdStats:
    """What the receiver saw: sync mode, markers and per-channel counters."""

    mode: SyncMode
    markers: int
    channels: list[ChannelStats] = field(default_factory=list)

    @property
    def pages(self) -> int:
        """Normal pages received over all channels."""
        return sum(c.pages for c in self.channels)

    @property
    def zero_pages(self) -> int:
        """Zero pages listed in packets over all channels."""
        return sum(c.zero_pages for c in self.channels)


class _Stop(Exception):
    """A channel thread stops because the receiver is closing or failed elsewhere."""


class _Conn:
    """One multifd connection and its thread's state (guarded by the receiver's lock)."""

    def __init__(self, channel: Channel, initial: bytes, index: int) -> None:
        self.channel = channel
        self.initial = initial
        self.index = index  # order of add_channel, for messages before the init packet
        self.decoder = MultifdChannelDecoder(base_offset=0)
        self.stats = ChannelStats(None)
        self.epoch = 0  # SYNC packets applied
        self.since_sync = 0  # packets with pages applied after the last SYNC packet
        self.waiting = False  # holds a packet of an epoch not open yet
        self.done = False  # thread finished
        self.thread: threading.Thread | None = None
        # one view per page of the payload buffer, where every packet's pages land from
        # its start (made once: the page writes and digests take one view per page)
        self.page_views: list[memoryview] = []

    @property
    def name(self) -> str:
        cid = self.stats.channel_id
        return f"multifd channel {cid}" if cid is not None else f"multifd connection #{self.index}"


def _wake(channel: Channel) -> None:
    """Make a thread blocked reading ``channel`` return (shutdown of the socket)."""
    sock = getattr(channel, "sock", None)
    if isinstance(sock, socket.socket):
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
        return
    with contextlib.suppress(OSError, ValueError):
        s = socket.socket(fileno=channel.fileno_read())
        try:
            s.shutdown(socket.SHUT_RDWR)
        finally:
            s.detach()


class MultifdReceiver:
    """Receives the multifd channels of one migration into a :class:`PageSink`.

    ``channels`` is N, the source's ``multifd-channels`` (the destination must
    know it, as QEMU's does). ``uuid``, if given, must match every init packet
    (else all channels must agree). ``sync`` fixes the marker mode (see the module
    doc). With ``serialize`` every sink call, the main channel's included, holds
    one lock. ``payload_buffer(n)`` makes each channel's reusable page buffer
    (e.g. page-aligned memory for O_DIRECT). ``marker_timeout`` bounds how long a
    marker waits for the channels. ``on_error`` is called (from a channel thread)
    when a channel fails, so the caller can stop reading the main channel.
    """

    def __init__(
        self,
        sink: PageSink,
        channels: int,
        *,
        uuid: bytes | None = None,
        sync: SyncMode = "auto",
        serialize: bool = True,
        payload_buffer: Callable[[int], memoryview] | None = None,
        marker_timeout: float | None = None,
        on_error: Callable[[BaseException], None] | None = None,
    ) -> None:
        if not 1 <= channels <= 255:
            raise ValueError(f"multifd channels must be 1..255, not {channels}")
        if sync not in ("auto", "flush", "eos"):
            raise ValueError(f"sync must be auto, flush or eos, not {sync!r}")
        self.sink = sink
        # a sink's write of one-page views, where it has one (the channels' pages)
        self._write_views: Callable[[str, int, list[memoryview]], Any] | None = getattr(
            sink, "write_page_views", None)
        # and of scattered pages, and of scattered zero pages, in one call each
        self._write_page_set: Callable[..., Any] | None = getattr(
            sink, "write_page_set", None)
        self._zero_page_set: Callable[[str, Any], Any] | None = getattr(
            sink, "zero_page_set", None)
        self.channels = channels
        self.uuid = uuid
        self._mode: SyncMode = sync
        self._lock: contextlib.AbstractContextManager[Any] = (
            threading.Lock() if serialize else contextlib.nullcontext())
        self._payload_buffer = payload_buffer or (lambda n: memoryview(bytearray(n)))
        self._marker_timeout = marker_timeout
        self._on_error = on_error
        self._cond = threading.Condition()
        self._conns: list[_Conn] = []
        self._by_id: dict[int, _Conn] = {}
        self._blocks: dict[str, int] | None = None
        self._pending_blocks: dict[str, int] = {}
        self._open = -1  # highest epoch channels may apply (-1: block list not known yet)
        self._markers = 0
        self._error: BaseException | None = None
        self._closing = False

    # -- channels ----------------------------------------------------------------

    def add_channel(self, channel: Channel, initial: Buffer = b"") -> None:
        """Start reading a multifd connection; ``initial`` = bytes already read from it."""
        with self._cond:
            if self._closing:
                raise EndpointError("multifd receiver is closed")
            if len(self._conns) >= self.channels:
                raise StreamError(f"more than {self.channels} multifd connections")
            conn = _Conn(channel, bytes(initial), len(self._conns))
            self._conns.append(conn)
        t = threading.Thread(target=self._run, args=(conn,), name=f"multifd-{conn.index}",
                             daemon=True)
        conn.thread = t
        t.start()

    def _run(self, conn: _Conn) -> None:
        try:
            self._read(conn)
        except _Stop:
            pass
        except BaseException as e:  # handed to the main thread
            self._fail(conn, e)
        finally:
            with self._cond:
                conn.done = True
                conn.waiting = False
                self._cond.notify_all()

    def _read(self, conn: _Conn) -> None:
        buf = self._payload_buffer(_PAYLOAD)
        if len(buf) < _PAYLOAD:
            raise ValueError(f"payload_buffer({_PAYLOAD}) returned {len(buf)} bytes")
        # One packet at a time: each is applied before the next byte is read, so
        # every packet's data can live in the same buffer.
        dec = conn.decoder = MultifdChannelDecoder(alloc=lambda n: buf[:n])
        conn.page_views = [buf[i : i + TARGET_PAGE_SIZE]
                           for i in range(0, _PAYLOAD, TARGET_PAGE_SIZE)]
        for first in dec.feed(conn.initial):
            self._event(conn, first)
        recv = conn.channel.recv_into
        # Reads straight to where the decoder wants the next bytes (a packet's header, then
        # its pages into ``buf``) wait until that region is full: one system call (and one
        # return to Python) per header and per payload, however the kernel splits them.
        whole = recv_whole(conn.channel)
        # After a packet without page data, the next bytes are read into ``stage``, many
        # packet headers at once, decoded together (feed_batch): a large guest's zero pages
        # come as hundreds of thousands of such packets.
        stage = memoryview(bytearray(_STAGE))
        batch = False
        while True:
            if self._closing:
                raise _Stop
            batch = batch and dec.at_boundary
            try:
                n = recv(stage) if batch else whole(dec.get_buffer())
            except (OSError, EndpointError) as e:
                if self._closing:
                    raise _Stop from None
                raise EndpointError(f"{conn.name}: read failed: {e}") from None
            if not n:
                if self._closing and not dec.at_boundary:
                    raise _Stop
                dec.feed_eof()
                with self._cond:
                    conn.stats.eof = True
                return
            if not batch:
                ev = dec.buffer_updated(n)
                if ev is not None:
                    self._event(conn, ev)
                    batch = isinstance(ev, MultifdPacket) and not ev.data
                continue
            pkt, used = dec.feed_batch(stage[:n])
            if pkt is not None:
                self._event(conn, pkt)
            # the rest packet by packet, each applied before the next is decoded (they
            # share the payload buffer)
            while used < n:
                dst = dec.get_buffer()
                k = min(len(dst), n - used)
                dst[:k] = stage[used : used + k]
                used += k
                ev = dec.buffer_updated(k)
                if ev is not None:
                    self._event(conn, ev)
                    batch = isinstance(ev, MultifdPacket) and not ev.data

    def _event(self, conn: _Conn, ev: MultifdInit | MultifdPacket) -> None:
        if isinstance(ev, MultifdInit):
            self._register(conn, ev)
        else:
            self._apply(conn, ev)

    def _register(self, conn: _Conn, init: MultifdInit) -> None:
        cid = init.channel_id
        with self._cond:
            if cid >= self.channels:
                raise StreamError(f"multifd channel id {cid} but only {self.channels} channels "
                                  "are expected", 24)
            if cid in self._by_id:
                raise StreamError(f"two multifd connections claim channel id {cid}", 24)
            if self.uuid is None:
                self.uuid = init.uuid
            elif init.uuid != self.uuid:
                raise StreamError(f"multifd channel {cid} has UUID {init.uuid.hex()}, "
                                  f"expected {self.uuid.hex()}", 8)
            conn.stats.channel_id = cid
            self._by_id[cid] = conn
            self._cond.notify_all()

    def _apply(self, conn: _Conn, pkt: MultifdPacket) -> None:
        cond = self._cond
        with cond:
            while self._open < conn.epoch:
                if self._closing or self._error is not None:
                    raise _Stop
                conn.waiting = True
                cond.wait()
            conn.waiting = False
            blocks = self._blocks
        if pkt.pages:
            assert blocks is not None
            length = blocks.get(pkt.block)
            if length is None:
                raise StreamError(f"{conn.name}: packet for unknown RAM block '{pkt.block}'",
                                  pkt.offset + 64)
            offs = pkt.offsets
            if offs is None:
                offs = np.array(pkt.normal_offsets + pkt.zero_offsets, dtype=np.uint64)
            top = int(offs.max())
            if top + TARGET_PAGE_SIZE > length:
                raise StreamError(f"{conn.name}: page offset 0x{top:x} outside RAM block "
                                  f"'{pkt.block}' (length 0x{length:x})", pkt.offset + 320)
            data = memoryview(pkt.data)
            nn = len(pkt.normal_offsets)
            with self._lock:
                # one write per run of consecutive pages, straight from the payload (a
                # packet's pages are usually one run: one pwritev); pages scattered
                # among zero pages go to the sink in one call where it takes them so
                if nn:
                    pages = (offs[:nn] >> _SHIFT_U64).astype(np.int64)
                    runs = index_runs(pages)
                    page_set = self._write_page_set if conn.page_views else None
                    views = self._write_views if conn.page_views else None
                    if (page_set is not None and len(runs) > 1
                            and (np.diff(pages) > 0).all()):  # each page once: any order
                        page_set(pkt.block, pages, conn.page_views[:nn], runs)
                    else:
                        for i, first, n in runs:
                            if views is not None:  # the packet's pages: the buffer's first
                                views(pkt.block, first, conn.page_views[i : i + n])
                            else:
                                self.sink.write_pages(pkt.block, first, [
                                    data[i * TARGET_PAGE_SIZE : (i + n) * TARGET_PAGE_SIZE]])
                if nn < len(offs):
                    zpages = (offs[nn:] >> _SHIFT_U64).astype(np.int64)
                    zruns = index_runs(zpages)
                    if len(zruns) > 1 and self._zero_page_set is not None:
                        self._zero_page_set(pkt.block, zpages)
                    else:
                        for _, first, n in zruns:
                            self.sink.zero_pages(pkt.block, first, n)
        with cond:
            st = conn.stats
            st.packets += pkt.packets
            st.pages += len(pkt.normal_offsets)
            st.zero_pages += pkt.pages - len(pkt.normal_offsets)
            st.bytes += len(pkt.data)
            if pkt.sync:
                st.sync_packets += 1
                conn.epoch += 1
                conn.since_sync = 0
                cond.notify_all()
            elif pkt.pages:
                conn.since_sync += 1

    def _fail(self, conn: _Conn, e: BaseException) -> None:
        if isinstance(e, StreamError) and not e.message.startswith(conn.name):
            cls = UnsupportedRecord if isinstance(e, UnsupportedRecord) else type(e)
            err: BaseException = cls(f"{conn.name}: {e.message}", e.offset)
        else:
            err = e
        with self._cond:
            if self._closing:
                return
            if self._error is None:
                self._error = err
            self._cond.notify_all()
        if self._on_error is not None:
            self._on_error(err)

    # -- main channel ------------------------------------------------------------

    @property
    def mode(self) -> SyncMode:
        """``flush`` or ``eos`` once known; ``auto`` before the first marker."""
        return self._mode

    @property
    def markers(self) -> int:
        """Sync markers seen on the main channel so far (= the main channel's epoch)."""
        return self._markers

    def check(self) -> None:
        """Raise the error of a failed channel, if any."""
        err = self._error
        if err is not None:
            raise err

    def begin(self, blocks: Mapping[str, int]) -> None:
        """The RAM blocks (name -> length in bytes) from MEM_SIZE; channels may start writing.

        Call it once the block list is complete and the sink is ready for pages,
        before the first marker.
        """
        with self._cond:
            if self._blocks is not None:
                raise StreamError("multifd receiver: RAM block list given twice")
            self._blocks = dict(blocks)
            self._open = 0
            self._cond.notify_all()

    def on_flush(self) -> None:
        """The main channel read a ``MULTIFD_FLUSH`` record: a sync marker."""
        if self._mode == "eos":
            raise StreamError("MULTIFD_FLUSH record in a stream that syncs multifd at every "
                              "EOS")
        self._mode = "flush"
        self._marker()

    def on_eos(self) -> None:
        """The main channel read the EOS of a RAM section: a marker unless in flush mode."""
        if self._mode == "flush":
            return
        self._mode = "eos"
        self._marker()

    def _marker(self) -> None:
        cond = self._cond
        with cond:
            if self._blocks is None:
                raise StreamError("multifd sync marker before the RAM block list")
            k = self._markers + 1
            deadline = None if self._marker_timeout is None else (
                time.monotonic() + self._marker_timeout)
            while True:
                self.check()
                if self._closing:
                    raise EndpointError("multifd receiver is closed")
                ready = len(self._by_id) == self.channels and all(
                    c.epoch >= k for c in self._by_id.values())
                if ready:
                    break
                for c in self._conns:
                    if c.done and c.epoch < k:
                        raise StreamError(f"{c.name} ended after {c.epoch} sync packets; the "
                                          f"main channel reached sync marker {k}")
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    behind = [c.name for c in self._conns if c.epoch < k]
                    raise EndpointError(
                        f"multifd sync marker {k}: {len(self._by_id)} of {self.channels} "
                        f"channels known, still waiting for {', '.join(behind) or 'channels'} "
                        f"after {self._marker_timeout:.0f} s")
                cond.wait(left)
            self._markers = k
            self._open = k
            cond.notify_all()

    def write_pages(self, block: str, first_page: int, bufs: Sequence[Buffer]) -> Any:
        """Main-channel pages: written now (they belong to the current epoch)."""
        with self._lock:
            return self.sink.write_pages(block, first_page, bufs)

    def write_page_views(self, block: str, first_page: int, pages: list[memoryview]) -> Any:
        """Main-channel pages as one-page views: written now (by the sink's
        ``write_page_views`` where it has one)."""
        write = getattr(self.sink, "write_page_views", None) or self.sink.write_pages
        with self._lock:
            return write(block, first_page, pages)

    def zero_pages(self, block: str, first_page: int, npages: int = 1) -> Any:
        """Main-channel ZERO records: applied now (they belong to the current epoch)."""
        with self._lock:
            return self.sink.zero_pages(block, first_page, npages)

    def write_page_set(self, block: str, pages: np.ndarray, views: list[memoryview]) -> Any:
        """Main-channel pages, scattered (page ``pages[i]`` holds ``views[i]``): written now,
        by the sink's ``write_page_set`` where it has one."""
        with self._lock:
            if self._write_page_set is not None:
                return self._write_page_set(block, pages, views)
            return sum(self.sink.write_pages(block, first, views[i : i + n])
                       for i, first, n in index_runs(pages))

    def zero_page_set(self, block: str, pages: np.ndarray) -> Any:
        """Main-channel ZERO records of scattered pages: applied now."""
        with self._lock:
            if self._zero_page_set is not None:
                return self._zero_page_set(block, pages)
            return sum(self.sink.zero_pages(block, first, n)
                       for _, first, n in index_runs(pages))

    def handle(self, record: Record) -> None:
        """Convenience for a simple main loop: act on one main-channel record.

        RAM blocks are collected and passed to :meth:`begin` at the first marker;
        MULTIFD_FLUSH and EOS are markers; PAGE and ZERO go to the sink. Other
        records are ignored.
        """
        t = type(record)
        if t is Zero:
            assert isinstance(record, Zero)
            if record.fill:
                raise UnsupportedRecord(f"ZERO record with fill byte 0x{record.fill:02x}")
            self.zero_pages(record.block, record.offset >> _SHIFT, 1)
        elif t is Page:
            assert isinstance(record, Page)
            self.write_pages(record.block, record.offset >> _SHIFT, [record.data])
        elif t is RamBlock:
            assert isinstance(record, RamBlock)
            self._pending_blocks[record.name] = record.length
        elif t is MultifdFlush or t is EndOfSection:
            if self._blocks is None:
                self.begin(self._pending_blocks)
            if t is MultifdFlush:
                self.on_flush()
            else:
                self.on_eos()

    # -- end ---------------------------------------------------------------------

    def stats(self) -> MultifdStats:
        """Counters so far."""
        with self._cond:
            return MultifdStats(self._mode, self._markers,
                                [ChannelStats(**vars(c.stats)) for c in self._conns])

    def finish(self, eof_timeout: float = 0.0) -> MultifdStats:
        """The main stream is complete: check the channels and close them.

        Waits up to ``eof_timeout`` seconds for the source to close every channel
        (QEMU does so only after the migration completed on its side, which with a
        return path needs the destination's SHUT first, so do not wait then).
        Raises if a channel failed, never sent its init packet, sent a different
        number of SYNC packets than there were markers, or sent data after the
        last sync.
        """
        deadline = time.monotonic() + eof_timeout
        problems: list[str] = []
        try:
            with self._cond:
                while not all(c.done for c in self._conns) and self._error is None:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._cond.wait(left)
                self.check()
                if len(self._by_id) != self.channels:
                    problems.append(f"{len(self._by_id)} of {self.channels} multifd channels "
                                    "identified themselves")
                for c in self._conns:
                    if c.waiting or c.since_sync:
                        problems.append(f"{c.name} sent pages after its last sync packet")
                    elif c.epoch != self._markers:
                        problems.append(f"{c.name} sent {c.epoch} sync packets, the main "
                                        f"channel {self._markers} markers")
        finally:
            self._shutdown()
        self.check()
        for c in self._conns:
            if not c.decoder.at_boundary and not problems:
                problems.append(f"{c.name} ended inside a packet after the last sync")
        if problems:
            raise StreamError("; ".join(problems))
        return self.stats()

    def abort(self) -> None:
        """Stop every channel thread and close the channels (idempotent)."""
        self._shutdown()

    def _shutdown(self) -> None:
        with self._cond:
            self._closing = True
            self._cond.notify_all()
            conns = list(self._conns)
        for c in conns:
            if not c.done:
                _wake(c.channel)
        for c in conns:
            if c.thread is not None:
                c.thread.join(10.0)
                if c.thread.is_alive():
                    raise FixedramError(f"{c.name}: reader thread did not stop")
        for c in conns:
            with contextlib.suppress(Exception):
                c.channel.close()

    def __enter__(self) -> MultifdReceiver:
        return self

    def __exit__(self, *exc: object) -> None:
        self.abort()
