"""Restore an image into a waiting QEMU as a *multifd* migration source.

Why: the single-stream :func:`fixedram.endpoint.send.send` puts an 8-byte header before
every page and QEMU parses the whole stream in one thread. With multifd the page data
travels in 512 KiB packets over N extra connections, which QEMU reads with one thread
each straight into guest RAM, and fixedram fills each packet with one positioned read
per run of pages (``docs/multifd.md`` §6).

What goes where (QEMU started with ``-incoming`` and capability ``multifd`` on,
``multifd-channels`` = N; :func:`send_multifd` connects 1 + N times to the same
address, main connection first)::

    main       QEVM 3 | CONFIGURATION | START ram: MEM_SIZE, blocks, [MULTIFD_FLUSH] EOS
               | PART ram: [ZERO records] [MULTIFD_FLUSH] EOS
               | (every channel drained) [SWITCHOVER_START] | END ram: EOS
               | device state | EOF | VMDESCRIPTION
    channel i  init packet (uuid, id i) | SYNC | packets of <= 128 pages... | SYNC [| SYNC]

Two destination behaviours decide the shape (both follow from the machine type, and from
the destination's QEMU version when known):

* sync markers: ``flush`` (QEMU >= 8.1 with machine >= 8.1) syncs the channels only at a
  MULTIFD_FLUSH record; ``eos`` (QEMU 7.2, and machine types <= 8.0) at every RAM EOS.
  The destination's main thread waits at each marker until every channel delivered one
  SYNC packet, so each channel sends exactly one SYNC per marker.
* zero pages: ``packet`` (QEMU >= 9.0) lists them in the packets' zero-page list;
  ``main`` sends them as ZERO records on the main connection (QEMU 7.2 ignores the list).
  For a fresh destination (the default, ``docs/fresh-destination.md``) the pages without
  data of guest RAM are not sent at all, and those of small blocks go as ZERO records on
  the main connection whatever the mode.

A packet of a buffered mapped-ram image goes out as its header and then each run of its
pages by ``sendfile`` from the image (page-cache pages handed to the socket, no copy
through fixedram); pages that are checked against the image's checksums are first read
into the packet buffer and digested there (a legacy stream image, or one read with
O_DIRECT, is read into the buffer and sent from it).

The device state is written only after every channel's data (and its last SYNC) has
been read by the destination (the socket's output queue is empty): a QEMU that does not
read the channels (multifd off, another channel count) must not get a device state
without RAM. Everything :func:`~fixedram.endpoint.send.send` checks is checked before
the first connection.
"""

from __future__ import annotations

import contextlib
import fcntl
import socket
import struct
import termios
import threading
import time
import uuid as uuidlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from fixedram._lazy import numpy as np
from fixedram.endpoint.send import validate
from fixedram.endpoint.source import (
    LINGER_SECONDS,
    PROGRESS_INTERVAL,
    ImageArg,
    Progress,
    ReturnPathReader,
    SendStats,
    absent_runs,
    image_of,
    page_check,
    part_end,
    skips_absent,
    stream_head,
    stream_tail,
)
from fixedram.errors import EndpointError, FixedramError, MismatchError
from fixedram.image import Image
from fixedram.image.checksum import digests_of
from fixedram.image.layout import index_runs
from fixedram.image.reader import BlockInfo, DirectIO
from fixedram.image.sections import ram_section_id
from fixedram.io.channel import SocketChannel, connect, sendfile_all, writev_all
from fixedram.io.files import aligned_buffer
from fixedram.stream import SectionPart, StreamEncoder, encode
from fixedram.stream.format import (
    MULTIFD_PAGES_PER_PACKET,
    TARGET_PAGE_SIZE,
)
from fixedram.stream.multifd import MULTIFD_PACKET_SIZE, encode_init, packet_header_into
from fixedram.stream.records import MultifdFlush
from fixedram.versions import (
    SyncMode,
    ZeroMode,
    choose_sync_mode,
    choose_zero_mode,
    wants_switchover_start,
)

if TYPE_CHECKING:
    from fixedram.image.verify import PageCheck

__all__ = [
    "MultifdDestination",
    "MultifdSendReport",
    "check_multifd_settings",
    "parse_uuid",
    "send_multifd",
]

PS = TARGET_PAGE_SIZE
PER_PACKET = MULTIFD_PAGES_PER_PACKET
#: Most channels QEMU accepts (the channel id is one byte; ``multifd-channels`` <= 255).
MAX_CHANNELS = 255
#: A packet whose pages form at most this many runs goes out by ``sendfile`` (one call per
#: run); a more scattered one is read into a buffer with one read per run and sent at once.
_SENDFILE_RUNS = 8
#: Seconds without any byte accepted by the destination before giving up.
STALL_SECONDS = 60.0


@dataclass(frozen=True)
class MultifdSendReport:
    """What :func:`send_multifd` did.

    ``pages_sent`` pages travelled in packets as data, ``zero_pages`` as zero (in the
    packets' zero list or as ZERO records on the main connection, see ``zero``);
    ``preadv_calls`` counts reads of page data (one per run of pages in a packet);
    ``bytes_sent`` sums every connection, ``main_bytes`` is the main connection's share.
    """

    bytes_sent: int
    main_bytes: int
    pages_sent: int
    zero_pages: int
    packets: int
    sync_packets: int
    preadv_calls: int
    elapsed: float
    machine: str
    blocks: tuple[tuple[str, int], ...]
    channels: int
    sync: str
    zero: str
    switchover_start: bool
    channel_bytes: tuple[int, ...] = ()
    bytes_received: int = 0

    @property
    def rate(self) -> float:
        """Bytes per second over all connections."""
        return self.bytes_sent / self.elapsed if self.elapsed > 0 else 0.0


# ---------------------------------------------------------------------------------------------
# What the destination expects
# ---------------------------------------------------------------------------------------------


def parse_uuid(text: str) -> bytes:
    """The 16 bytes of a UUID as QEMU prints it (``query-uuid``, ``-uuid``)."""
    try:
        return uuidlib.UUID(text).bytes
    except ValueError:
        raise EndpointError(f"bad UUID '{text}'") from None


# ---------------------------------------------------------------------------------------------
# Packet plan
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Packet:
    """One packet to send: page indices with data (``normal``) and without (``zero``)."""

    block: BlockInfo
    name: bytes
    normal: np.ndarray
    zero: np.ndarray


_EMPTY = np.zeros(0, dtype=np.int64)


def _plan(img: Image, blocks: Sequence[BlockInfo], zero_in_packets: bool) -> Iterator[_Packet]:
    """Packets for every block: its data pages 128 at a time, then (``zero_in_packets``)
    its pages without data 128 at a time. The image's bitmap is walked in bounded pieces
    (:meth:`Image.runs`): memory does not grow with the RAM size."""
    for blk in blocks:
        name = blk.name.encode("latin-1")
        for pages in _packets(img.runs(blk.name)):
            yield _Packet(blk, name, pages, _EMPTY)
        if zero_in_packets:
            for pages in _packets(absent_runs(img, blk.name)):
                yield _Packet(blk, name, _EMPTY, pages)


def _packets(runs: Iterable[tuple[int, int]]) -> Iterator[np.ndarray]:
    """Page indices of ``runs`` in groups of :data:`PER_PACKET` (the last may be shorter)."""
    pend: list[np.ndarray] = []
    count = 0
    for first, n in runs:
        p, end = first, first + n
        while p < end:
            k = min(PER_PACKET - count, end - p)
            pend.append(np.arange(p, p + k, dtype=np.int64))
            count += k
            p += k
            if count == PER_PACKET:
                yield pend[0] if len(pend) == 1 else np.concatenate(pend)
                pend, count = [], 0
    if count:
        yield pend[0] if len(pend) == 1 else np.concatenate(pend)


# ---------------------------------------------------------------------------------------------
# Channels
# ---------------------------------------------------------------------------------------------


def _outq(sock: socket.socket) -> int:
    """Bytes written to ``sock`` that the peer has not consumed yet (``SIOCOUTQ``).

    On a unix socket that is data the destination has not *read*; on TCP, data its kernel
    has not acknowledged.
    """
    buf = fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0")
    return int(struct.unpack("i", buf)[0])


class _State:
    """What the channel threads share: the packet plan, counters, the first error."""

    def __init__(self, plan: Iterator[_Packet], nchan: int,
                 check: PageCheck | None) -> None:
        self.lock = threading.Lock()
        self.plan = plan
        self.packet_num = 0
        self.error: BaseException | None = None
        self.failed = threading.Event()
        #: Checks pages against the image's checksums (None: it has none); its calls are
        #: made under ``check_lock``.
        self.check = check
        self.check_lock = threading.Lock()
        self.pages = 0
        self.zero_pages = 0
        self.packets = 0
        self.syncs = 0
        self.reads = 0
        self.chan_bytes = [0] * nchan
        #: Held around reads of images whose reader keeps per-image scratch buffers (legacy
        #: streams); a mapped-ram read is one ``preadv`` and needs no lock.
        self.read_lock: contextlib.AbstractContextManager[object] = contextlib.nullcontext()

    def take(self) -> tuple[_Packet | None, int]:
        """The next packet of the plan (None at the end) and its packet number."""
        with self.lock:
            if self.failed.is_set():
                return None, 0
            pkt = next(self.plan, None)
            num = self.packet_num
            self.packet_num += 1
            return pkt, num

    def stats(self, main_bytes: int, zero_main: int, pages_total: int,
              t0: float) -> SendStats:
        """Progress so far, with the main connection's bytes and ZERO records added."""
        with self.lock:
            return SendStats(main_bytes + sum(self.chan_bytes), self.pages,
                             self.zero_pages + zero_main, pages_total, self.reads,
                             time.monotonic() - t0)

    def number(self) -> int:
        with self.lock:
            num = self.packet_num
            self.packet_num += 1
            return num

    def fail(self, e: BaseException) -> None:
        with self.lock:
            if self.error is None:
                self.error = e
        self.failed.set()


class _ChannelThread(threading.Thread):
    """Sends packets on one multifd connection until the plan is exhausted, then SYNCs."""

    def __init__(self, index: int, sock: socket.socket, img: Image, state: _State,
                 syncs_first: int, syncs_last: int) -> None:
        super().__init__(name=f"fixedram-multifd-{index}", daemon=True)
        self.index = index
        self.sock = sock
        self.img = img
        self.state = state
        self.syncs_first = syncs_first
        self.syncs_last = syncs_last
        self.hdr = bytearray(MULTIFD_PACKET_SIZE)
        # page-aligned when the image reads with O_DIRECT: pages then go from the disk
        # straight into the packet
        self.payload = memoryview(aligned_buffer(PER_PACKET * PS) if img.direct
                                  else bytearray(PER_PACKET * PS))
        # a buffered mapped-ram image: each run of a packet's pages is contiguous in the
        # file, so the kernel hands its page-cache pages to the socket (sendfile), no copy
        self.zero_copy = img.format == "mapped-ram" and not img.direct and img.pages_in_file

    def run(self) -> None:
        try:
            self._run()
        except TimeoutError:
            self.state.fail(EndpointError(
                f"multifd channel {self.index}: the destination read nothing for "
                f"{self.sock.gettimeout():.0f} s (does it expect this many channels: "
                "multifd-channels?)"))
        except (BrokenPipeError, ConnectionResetError):
            self.state.fail(EndpointError(
                f"multifd channel {self.index}: the destination closed the connection"))
        except OSError as e:
            if self.state.failed.is_set():  # our own shutdown after another failure
                return
            self.state.fail(EndpointError(f"multifd channel {self.index}: {e.strerror or e}"))
        except BaseException as e:
            self.state.fail(e)

    def _sync(self) -> None:
        st = self.state
        packet_header_into(self.hdr, block=b"", normal=_EMPTY, packet_num=st.number(),
                           sync=True)
        n = writev_all(self.sock.sendmsg, [self.hdr])
        with st.lock:
            st.syncs += 1
            st.chan_bytes[self.index] += n

    def _check(self, check: PageCheck, name: str, first: int, data: memoryview) -> None:
        """Digest a run's pages (outside the lock: channels hash in parallel), then add."""
        d = digests_of([data])
        with self.state.check_lock:
            check.add(name, first, d)

    def _send_read(self, name: str, nn: int, runs: Sequence[tuple[int, int, int]],
                   check: PageCheck | None) -> int:
        """The packet's pages read into its payload buffer (one read per run), then sent."""
        data = self.payload[: nn * PS]
        for slot, first, k in runs:
            view = data[slot * PS : (slot + k) * PS]
            with self.state.read_lock:
                self.img.read_into(name, first, view)
            if check is not None:
                self._check(check, name, first, view)
        return writev_all(self.sock.sendmsg, [self.hdr, data])

    def _send_file(self, name: str, runs: Sequence[tuple[int, int, int]]) -> int:
        """The packet header, then each run straight from the file (``sendfile``)."""
        img = self.img
        n = writev_all(self.sock.sendmsg, [self.hdr])
        for _, first, k in runs:
            n += sendfile_all(self.sock.fileno(), img.fileno(), img.page_offset(name, first),
                              k * PS, self.sock.gettimeout())
        return n

    def _run(self) -> None:
        st = self.state
        for _ in range(self.syncs_first):
            self._sync()
        while True:
            pkt, num = st.take()
            if pkt is None:
                break
            blk = pkt.block
            nn = len(pkt.normal)
            packet_header_into(self.hdr, block=pkt.name, normal=pkt.normal * PS,
                               zero=pkt.zero * PS, packet_num=num)
            check = st.check if nn else None
            runs = index_runs(pkt.normal)
            # pages to check are read into the buffer they are digested in and sent from:
            # the bytes checked are the bytes sent (sending them from the file again, to
            # save the socket's copy, would check one copy and send another). Hashing
            # through a mapping of the file costs more: mapping and unmapping 4 KiB
            # page-cache pages costs about what copying them does
            if self.zero_copy and check is None and len(runs) <= _SENDFILE_RUNS:
                n = self._send_file(blk.name, runs)
            else:
                n = self._send_read(blk.name, nn, runs, check)
            reads = len(runs)
            with st.lock:
                st.packets += 1
                st.pages += nn
                st.zero_pages += len(pkt.zero)
                st.reads += reads
                st.chan_bytes[self.index] += n
        if st.failed.is_set():
            return
        for _ in range(self.syncs_last):
            self._sync()


def _shutdown(socks: Sequence[socket.socket]) -> None:
    for s in socks:
        with contextlib.suppress(OSError):
            s.shutdown(socket.SHUT_RDWR)


# ---------------------------------------------------------------------------------------------
# Sending
# ---------------------------------------------------------------------------------------------


def send_multifd(
    image: ImageArg,
    address: str,
    channels: int,
    *,
    uuid: bytes | None = None,
    dest_machine: str | None = None,
    dest_blocks: Sequence[tuple[str, int]] | None = None,
    dest_version: tuple[int, int, int] | None = None,
    sync: SyncMode = "auto",
    zero: ZeroMode = "auto",
    stall_timeout: float = STALL_SECONDS,
    connect_timeout: float = 30.0,
    progress: Callable[[SendStats], None] | None = None,
    direct_io: DirectIO = False,
    fresh: bool = True,
) -> MultifdSendReport:
    """Send ``image`` to the QEMU listening on ``address`` as a multifd source, ``channels``
    page connections plus the main one.

    The destination needs capability ``multifd`` and ``multifd-channels`` = ``channels``.
    ``uuid`` must equal the destination's ``query-uuid`` (its ``-uuid``; default: the uuid
    stored in the image's configuration, else all zeros, QEMU's default). ``sync``/``zero``
    choose the marker and zero-page styles (see the module docstring; ``auto`` decides from
    the machine type and ``dest_version``). Everything is validated (:func:`validate`,
    against ``dest_machine``/``dest_blocks`` when given) before connecting. ``stall_timeout``
    bounds how long the destination may read nothing. ``direct_io`` reads the pages of a
    mapped-ram image with O_DIRECT, each channel into its own aligned packet buffer (see
    :meth:`~fixedram.image.Image.open_direct` for the fallback; a legacy stream image is
    read buffered). ``fresh``: the destination's RAM reads as zero where nothing is loaded
    (``docs/fresh-destination.md``), so pages without data are not sent at all; with
    ``fresh=False`` they go in the packets' zero lists or as ZERO records (``zero``).
    Raises :class:`~fixedram.errors.EndpointError` when a connection fails or stalls.
    """
    if not 1 <= channels <= MAX_CHANNELS:
        raise EndpointError(f"multifd needs 1 to {MAX_CHANNELS} channels, not {channels}")
    if uuid is not None and len(uuid) != 16:
        raise EndpointError("the uuid of a multifd source must be 16 bytes")
    with image_of(image) as img:
        validate(img, dest_machine=dest_machine, dest_blocks=dest_blocks)
        opened = not img.direct and img.format == "mapped-ram" and img.open_direct(direct_io)
        try:
            return _send(img, address, channels, uuid, dest_version, sync, zero,
                         stall_timeout, connect_timeout, progress, fresh)
        finally:
            if opened:
                img.close_direct()


def _send(img: Image, address: str, nchan: int, uuid: bytes | None,
          dest_version: tuple[int, int, int] | None, sync_opt: SyncMode, zero_opt: ZeroMode,
          stall: float, connect_timeout: float,
          progress: Callable[[SendStats], None] | None, fresh: bool) -> MultifdSendReport:
    t0 = time.monotonic()
    blocks = list(img.blocks.values())
    cfg = img.configuration
    machine = img.machine
    sync = choose_sync_mode(machine, dest_version, sync_opt)
    zero = choose_zero_mode(machine, dest_version, zero_opt)
    switchover = wants_switchover_start(machine, img.commands)
    if uuid is None:
        uuid = cfg.uuid if cfg.uuid is not None and len(cfg.uuid) == 16 else bytes(16)
    total = sum(b.length for b in blocks)
    pages_total = total // PS
    # the first sync point: QEMU's channel threads write pages as soon as they read them,
    # and only the setup of the load (done before this marker) allocates what they write
    # into: a page read earlier crashes QEMU 10 (SIGSEGV, observed)
    head = stream_head(img, flush=sync == "flush")
    check = page_check(img)
    state = _State(_plan(img, blocks, zero == "packet" and not fresh), nchan, check)
    if img.format != "mapped-ram":
        state.read_lock = threading.Lock()

    socks: list[socket.socket] = []
    threads: list[_ChannelThread] = []
    try:
        main, main_bytes = _connect(address, nchan, uuid, stall, connect_timeout, head, state,
                                    socks)
        # one SYNC per marker: START's (flush or EOS) first; then PART's, and END's EOS
        first, last = 1, (2 if sync == "eos" else 1)
        threads = [_ChannelThread(i, socks[i + 1], img, state, first, last)
                   for i in range(nchan)]
        for t in threads:
            t.start()
        sent, zero_main = _main_part(img, main.sock, zero == "main" and not fresh, fresh,
                                     sync == "flush")
        main_bytes += sent
        _wait_threads(threads, state, Progress(
            progress, lambda: state.stats(main_bytes, zero_main, pages_total, t0)))
        _wait_drained(socks[1:], state, stall)
        if check is not None:  # a bad extent stops the stream before the device state
            for blk in blocks:
                check.block_done(blk.name)
        sent, received = _end_main(main, img, switchover)
        main_bytes += sent
    except TimeoutError:
        _shutdown(socks)
        raise EndpointError(f"the destination at {address} read nothing on the main "
                            f"connection for {stall:.0f} s (is it waiting for more multifd "
                            "channels?)") from None
    except (BrokenPipeError, ConnectionResetError):
        _shutdown(socks)
        err = state.error
        if isinstance(err, FixedramError):
            raise err from None
        raise EndpointError(f"the destination at {address} closed the main connection (is "
                            f"capability multifd on, with multifd-channels {nchan}? QEMU's "
                            "log says why)") from None
    except OSError as e:
        _shutdown(socks)
        raise EndpointError(f"multifd send to {address}: {e.strerror or e}") from None
    except BaseException:
        state.fail(EndpointError("stopped"))
        _shutdown(socks)
        raise
    finally:
        for t in threads:
            t.join(10.0)
        for s in socks:
            s.close()
    elapsed = time.monotonic() - t0
    stats = SendStats(main_bytes + sum(state.chan_bytes), state.pages,
                      state.zero_pages + zero_main, pages_total, state.reads, elapsed)
    if progress is not None:
        progress(stats)
    return MultifdSendReport(
        bytes_sent=stats.bytes_sent,
        main_bytes=main_bytes,
        pages_sent=state.pages,
        zero_pages=state.zero_pages + zero_main,
        packets=state.packets,
        sync_packets=state.syncs,
        preadv_calls=state.reads,
        elapsed=elapsed,
        machine=machine,
        blocks=tuple((b.name, b.length) for b in blocks),
        channels=nchan,
        sync=sync,
        zero=zero,
        switchover_start=switchover,
        channel_bytes=tuple(state.chan_bytes),
        bytes_received=received,
    )


def _connect(address: str, nchan: int, uuid: bytes, stall: float, connect_timeout: float,
             head: Sequence[bytes], state: _State, socks: list[socket.socket],
             ) -> tuple[SocketChannel, int]:
    """Open the main connection and send it ``head``, then the ``nchan`` channels with their
    init packets; each socket is appended to ``socks`` as it opens (for the caller to close).
    Returns the main connection and the bytes written on it."""
    # main first (QEMU 7.2 takes the first connection as the main one), its header at
    # once (QEMU 10 peeks at the first bytes of every connection to classify it)
    main = connect(address, timeout=connect_timeout)
    socks.append(main.sock)
    main.sock.settimeout(stall)
    main_bytes = writev_all(main.sock.sendmsg, head)
    for i in range(nchan):
        try:
            ch = connect(address, timeout=connect_timeout)
        except EndpointError as e:
            raise EndpointError(
                f"multifd channel {i + 1} of {nchan}: {e} (the destination needs "
                f"capability multifd on and multifd-channels {nchan})") from None
        socks.append(ch.sock)
        ch.sock.settimeout(stall)
        writev_all(ch.sock.sendmsg, [encode_init(i, uuid)])
        state.chan_bytes[i] += 64
    return main, main_bytes


def _main_part(img: Image, msock: socket.socket, zero_records: bool, fresh: bool,
               flush: bool) -> tuple[int, int]:
    """The main connection's PART section, up to the last sync marker: ZERO records for the
    pages without data that need them (all with ``zero_records``; else, for a ``fresh``
    destination, those of the blocks :func:`skips_absent` does not skip), then
    [MULTIFD_FLUSH] EOS. Returns the bytes written and the pages without data accounted."""
    sid = ram_section_id(img)
    mid = [encode(SectionPart(sid))]
    main_bytes = zero_main = 0
    enc = StreamEncoder()
    for blk in img.blocks.values():
        # a fresh destination: ZERO records for the blocks whose pages without data are
        # not skipped (a zero list entry would not clear a page QEMU has not received)
        if zero_records or (fresh and not skips_absent(blk, fresh)):
            for p, k in absent_runs(img, blk.name, 1 << 16):
                zero_main += k
                mid.append(enc.zero_run(blk.name, p * PS, k))
                if len(mid) >= 64:
                    main_bytes += writev_all(msock.sendmsg, mid)
                    mid = []
        elif skips_absent(blk, fresh):  # not sent, but counted
            zero_main += blk.npages - img.count_present(blk.name)
    if flush:
        mid.append(encode(MultifdFlush()))
    mid += part_end(sid)
    return main_bytes + writev_all(msock.sendmsg, mid), zero_main


def _end_main(main: SocketChannel, img: Image, switchover: bool) -> tuple[int, int]:
    """The stream's tail on the main connection, whose write side is then shut down, and
    whatever the destination sends back drained until it closes (at most
    :data:`LINGER_SECONDS`). Returns the bytes written and the bytes received."""
    sent = writev_all(main.sock.sendmsg, stream_tail(img, switchover))
    main.shutdown_write()
    main.sock.settimeout(LINGER_SECONDS)
    drain = ReturnPathReader(main)
    drain.wait(LINGER_SECONDS)
    return sent, drain.received


def _wait_threads(threads: Sequence[_ChannelThread], state: _State,
                  progress: Progress[SendStats]) -> None:
    """Join the channel threads (reporting progress); raise the first error of any."""
    for t in threads:
        while t.is_alive():
            t.join(PROGRESS_INTERVAL)
            if state.failed.is_set():
                break
            progress.tick(force=True)
        if state.failed.is_set():
            break
    if state.error is not None:
        raise state.error


def _wait_drained(socks: Sequence[socket.socket], state: _State, stall: float) -> None:
    """Wait until the destination has read everything sent on every channel."""
    last = -1
    since = time.monotonic()
    while True:
        left = sum(_outq(s) for s in socks)
        if left == 0:
            return
        now = time.monotonic()
        if left != last:
            last, since = left, now
        elif now - since > stall:
            raise EndpointError(
                f"the destination stopped reading the multifd channels ({left} bytes unread "
                f"for {stall:.0f} s): does it have capability multifd on and multifd-channels "
                f"= {len(socks)}?")
        time.sleep(0.005)


# ---------------------------------------------------------------------------------------------
# What the destination must be (its QMP answers are read by fixedram.qmp.destination)
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MultifdDestination:
    """What a multifd source must know of its destination (read over QMP by
    :func:`fixedram.qmp.destination.query_multifd_dest`)."""

    machine: str
    blocks: list[tuple[str, int]]
    version: tuple[int, int, int]
    uuid: bytes


def check_multifd_settings(caps: dict[str, bool], params: dict[str, object],
                           channels: int) -> None:
    """Refuse a destination whose migration settings do not take ``channels`` channels."""
    if not caps.get("multifd", False):
        raise MismatchError("the destination has capability multifd off "
                            "(migrate-set-capabilities multifd=on before migrate-incoming)")
    for cap in ("mapped-ram", "postcopy-ram"):
        if caps.get(cap, False):
            raise MismatchError(f"the destination has capability {cap} on; a multifd stream "
                                "over sockets needs it off")
    comp = params.get("multifd-compression", "none")
    if comp not in (None, "none"):
        raise MismatchError(f"the destination expects multifd-compression {comp}; fixedram "
                            "sends uncompressed (none) packets")
    want = params.get("multifd-channels")
    if want != channels:
        raise MismatchError(f"the destination expects {want} multifd channels "
                            f"(multifd-channels), not {channels}")
