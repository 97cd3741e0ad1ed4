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

One thread sends on every channel (:class:`_Pump`): each channel carries one packet at a
time, the sockets are written without blocking, round-robin, and polled when none takes
more. The packets are planned a bitmap piece at a time with numpy
(:func:`~fixedram.image.layout.page_groups`), whatever the runs. A packet of a buffered
mapped-ram image goes out as its header and then each run of its pages by ``sendfile``
from the image (page-cache pages handed to the socket, no copy through fixedram); one
whose pages are scattered among pages without data (more than :data:`_SENDFILE_RUNS`
runs) is gathered into its buffer first; the pages of an image with checksums are first
read into one buffer and digested there, before the packet goes out. An object image's
packets go out from its checked chunks in memory as they are (views of them, no copy); a
legacy stream image, or one read with O_DIRECT, is read into the channel's packet buffer
and sent from it. Measured
(``docs/multifd.md`` §6): one thread costs less CPU than a thread per channel (which
contend for the interpreter on every system call), and reading pages costs less than
hashing them through a mapping of the file (on tmpfs several times less).

The device state is written only after every channel's data (and its last SYNC) has
been read by the destination (the socket's output queue is empty): a QEMU that does not
read the channels (multifd off, another channel count) must not get a device state
without RAM. Everything :func:`~fixedram.endpoint.send.send` checks is checked before
the first connection.
"""

from __future__ import annotations

import collections
import contextlib
import fcntl
import os
import select
import socket
import struct
import termios
import time
import uuid as uuidlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from fixedram._lazy import numpy as np
from fixedram.endpoint.send import validate
from fixedram.endpoint.source import (
    LINGER_SECONDS,
    ImageArg,
    Progress,
    ReturnPathReader,
    SendStats,
    image_of,
    page_check,
    part_end,
    skips_absent,
    stream_head,
    stream_tail,
)
from fixedram.errors import EndpointError, ImageError, MismatchError
from fixedram.image import Image
from fixedram.image.layout import index_runs, page_groups
from fixedram.image.reader import BlockInfo, DirectIO, PageSlots
from fixedram.image.sections import ram_section_id
from fixedram.io.channel import SocketChannel, connect, writev_all
from fixedram.io.files import IOV_MAX, aligned_buffer
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
#: run); a more scattered one (a guest whose zero pages lie between its others) is
#: gathered into the packet's buffer (:meth:`~fixedram.image.Image.read_page_set`: one
#: read where its pages lie close) and sent from there at once.
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
    """One packet to send: page indices with data (``normal``) and without (``zero``);
    ``runs``: ``(slot, first, count)`` per run of ``normal``'s consecutive pages."""

    block: BlockInfo
    name: bytes
    normal: np.ndarray
    zero: np.ndarray
    runs: Sequence[tuple[int, int, int]] = ()


_EMPTY = np.zeros(0, dtype=np.int64)


def _plan(img: Image, blocks: Sequence[BlockInfo], zero_in_packets: bool) -> Iterator[_Packet]:
    """Packets for every block: its data pages 128 at a time, then (``zero_in_packets``)
    its pages without data 128 at a time. The image's bitmap is walked in bounded pieces
    (:meth:`Image.run_arrays`): memory does not grow with the RAM size, and a guest whose
    pages with data are scattered costs numpy steps per packet, not Python per run."""
    for blk in blocks:
        name = blk.name.encode("latin-1")
        for pages in page_groups(img.run_arrays(blk.name), PER_PACKET):
            yield _Packet(blk, name, pages, _EMPTY, index_runs(pages))
        if zero_in_packets:
            for pages in img.absent_groups(blk.name, PER_PACKET):
                yield _Packet(blk, name, _EMPTY, pages)


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


class _Counters:
    """What the pump counts, for the report and the progress callback."""

    def __init__(self, nchan: int) -> None:
        self.packet_num = 0
        self.pages = 0
        self.zero_pages = 0
        self.packets = 0
        self.syncs = 0
        self.reads = 0
        self.chan_bytes = [0] * nchan

    def number(self) -> int:
        num = self.packet_num
        self.packet_num += 1
        return num

    def stats(self, main_bytes: int, zero_main: int, pages_total: int,
              t0: float) -> SendStats:
        """Progress so far, with the main connection's bytes and ZERO records added."""
        return SendStats(main_bytes + sum(self.chan_bytes), self.pages,
                         self.zero_pages + zero_main, pages_total, self.reads,
                         time.monotonic() - t0)


class _Channel:
    """One multifd connection: the packet being sent on it, queued as buffers and ranges
    of the image file, sent as far as its (non-blocking) socket takes them."""

    def __init__(self, index: int, sock: socket.socket, img: Image) -> None:
        self.index = index
        self.sock = sock
        self.fd = sock.fileno()
        self.hdr = bytearray(MULTIFD_PACKET_SIZE)
        # page-aligned when the image reads with O_DIRECT: pages then go from the disk
        # straight into the packet
        self.payload = memoryview(aligned_buffer(PER_PACKET * PS) if img.direct
                                  else bytearray(PER_PACKET * PS))
        #: the payload's page slots, where the pages read into it are digested
        self.slots = PageSlots(self.payload, 0, PS, PER_PACKET)
        #: what is left to send of the current packet: buffers, and ``(offset, length)``
        #: ranges of the image file that go by ``sendfile``
        self.queue: collections.deque[memoryview | tuple[int, int]] = collections.deque()
        self.bytes = 0
        self.done = False

    def push(self, file_fd: int) -> bool:
        """Send from the queue until the socket takes no more; True once it is empty."""
        q = self.queue
        while q:
            item = q[0]
            if isinstance(item, tuple):
                off, n = item
                try:
                    k = os.sendfile(self.fd, file_fd, off, n)
                except BlockingIOError:
                    return False
                if k == 0:
                    raise ImageError(f"image ends at byte {off}, expected data up to byte "
                                     f"{off + n}", off)
                self.bytes += k
                if k < n:
                    q[0] = (off + k, n - k)
                    return False
                q.popleft()
                continue
            bufs: list[memoryview] = []
            for b in q:
                if isinstance(b, tuple) or len(bufs) == IOV_MAX:
                    break
                bufs.append(b)
            try:
                k = self.sock.sendmsg(bufs)
            except BlockingIOError:
                return False
            self.bytes += k
            for b in bufs:
                if k < len(b):
                    q[0] = b[k:]
                    return False
                k -= len(b)
                q.popleft()
        return True


class _Pump:
    """Sends the packet plan over every channel from one thread.

    Each channel carries one packet at a time: when its queue is empty it takes the next
    packet of the plan (its pages read and checked now, while the other channels' sockets
    drain), then the sockets are written without waiting, round-robin, and polled when
    none takes more. One thread needs no locks and never contends for the interpreter
    with another; its own work per packet is a read, a digest and a few system calls.
    """

    def __init__(self, img: Image, chans: Sequence[_Channel], plan: Iterator[_Packet],
                 check: PageCheck | None, counters: _Counters, syncs_last: int) -> None:
        self.img = img
        self.chans = chans
        self.plan: Iterator[_Packet] | None = plan
        self.check = check
        self.counters = counters
        self.syncs_last = syncs_last
        # a buffered mapped-ram image: each run of a packet's pages is contiguous in the
        # file, so the kernel hands its page-cache pages to the socket (sendfile), no copy
        self.zero_copy = img.format == "mapped-ram" and not img.direct and img.pages_in_file
        self.file_fd = img.fileno() if self.zero_copy else -1
        # an image holding its pages in memory, checked as they were fetched (an object
        # image's chunks): a packet's runs go out from there as they are, no copy into the
        # packet buffer
        self.held = img.holds_pages and check is None and not self.zero_copy
        #: where pages sent from the file are read to be checked: one buffer for every
        #: channel, free again once digested, so it stays in the processor's cache
        self.scratch = (PageSlots(bytearray(PER_PACKET * PS), 0, PS, PER_PACKET)
                        if self.zero_copy and check is not None else None)

    def _read(self, slots: PageSlots, name: str, runs: Sequence[tuple[int, int, int]]) -> None:
        """The pages of ``runs`` read into their slots, and digested there for the check
        (through the slots' own page views, made once: no view is made per page)."""
        for slot, first, k in runs:
            self.img.read_into(name, first, slots.buf[slot * PS : (slot + k) * PS])
            if self.check is not None:
                self.check.pages(name, first, slots.views[slot : slot + k])

    def _fill(self, ch: _Channel) -> bool:
        """Queue the next packet of the plan on ``ch`` (its last SYNCs after the plan's
        end); False when the channel has nothing more to send."""
        c = self.counters
        pkt = next(self.plan, None) if self.plan is not None else None
        if pkt is None:
            self.plan = None
            if ch.done:
                return False
            for _ in range(self.syncs_last):
                packet_header_into(ch.hdr, block=b"", normal=_EMPTY, packet_num=c.number(),
                                   sync=True)
                ch.queue.append(memoryview(bytes(ch.hdr)))
                c.syncs += 1
            ch.done = True
            return bool(ch.queue)
        name = pkt.block.name
        nn = len(pkt.normal)
        packet_header_into(ch.hdr, block=pkt.name, normal=pkt.normal * PS,
                           zero=pkt.zero * PS, packet_num=c.number())
        ch.queue.append(memoryview(ch.hdr))
        if nn:
            runs = pkt.runs
            # pages to check are read into the buffer and digested there first; the packet
            # then goes out from the file's same page-cache pages (a saved image is never
            # rewritten in place: a save writes a new file and renames it; docs/checksums.md
            # says what this leaves unchecked), or from the buffer
            if self.zero_copy and len(runs) <= _SENDFILE_RUNS:
                if self.scratch is not None:  # the image has checksums
                    self._read(self.scratch, name, runs)
                for _, first, k in runs:
                    ch.queue.append((self.img.page_offset(name, first), k * PS))
                c.reads += len(runs)
            elif self.held:  # one sendmsg takes the views of every run
                for _, first, k in runs:
                    ch.queue.extend(self.img.page_views(name, first, k))
                c.reads += len(runs)
            elif len(runs) > 1:  # scattered: gathered (one read where they lie close)
                c.reads += self.img.read_page_set(name, pkt.normal, ch.slots)
                if self.check is not None:
                    self.check.pages_at(name, pkt.normal, ch.slots.views[:nn])
                ch.queue.append(ch.payload[: nn * PS])
            else:
                self._read(ch.slots, name, runs)
                ch.queue.append(ch.payload[: nn * PS])
                c.reads += 1
        c.packets += 1
        c.pages += nn
        c.zero_pages += len(pkt.zero)
        return True

    def run(self, stall: float, progress: Progress[SendStats]) -> None:
        """Send every packet and the last SYNCs. Raises :class:`EndpointError` naming the
        channel whose destination stalled (read nothing for ``stall`` seconds) or closed."""
        poller = select.poll()
        for ch in self.chans:
            poller.register(ch.fd, select.POLLOUT)
        live = list(self.chans)
        while live:
            moved = False
            for ch in list(live):
                try:
                    empty = ch.push(self.file_fd)
                    if empty and self._fill(ch):
                        empty = ch.push(self.file_fd)
                        moved = True
                except (BrokenPipeError, ConnectionResetError):
                    raise EndpointError(f"multifd channel {ch.index}: the destination "
                                        "closed the connection") from None
                self.counters.chan_bytes[ch.index] = ch.bytes
                if empty and ch.done and not ch.queue:
                    live.remove(ch)
                    poller.unregister(ch.fd)
            progress.tick()
            if moved or not live:
                continue
            if not poller.poll(int(stall * 1000)):
                ch = live[0]
                raise EndpointError(
                    f"multifd channel {ch.index}: the destination read nothing for "
                    f"{stall:.0f} s (does it expect this many channels: multifd-channels?)")


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
    counters = _Counters(nchan)
    plan = _plan(img, blocks, zero == "packet" and not fresh)

    socks: list[socket.socket] = []
    try:
        main, main_bytes = _connect(address, nchan, uuid, stall, connect_timeout, head,
                                    counters, socks)
        # one SYNC per marker: START's (flush or EOS) first, on every channel before the
        # main connection's PART (whose markers wait for them); then PART's, and END's EOS
        chans = [_Channel(i, socks[i + 1], img) for i in range(nchan)]
        for ch in chans:
            packet_header_into(ch.hdr, block=b"", normal=_EMPTY,
                               packet_num=counters.number(), sync=True)
            counters.chan_bytes[ch.index] += writev_all(ch.sock.sendmsg, [ch.hdr])
            counters.syncs += 1
            ch.bytes = counters.chan_bytes[ch.index]
            ch.sock.setblocking(False)
        sent, zero_main = _main_part(img, main.sock, zero == "main" and not fresh, fresh,
                                     sync == "flush")
        main_bytes += sent
        _Pump(img, chans, plan, check, counters, 2 if sync == "eos" else 1).run(
            stall, Progress(progress,
                            lambda: counters.stats(main_bytes, zero_main, pages_total, t0)))
        _wait_drained(socks[1:], stall)
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
        raise EndpointError(f"the destination at {address} closed the main connection (is "
                            f"capability multifd on, with multifd-channels {nchan}? QEMU's "
                            "log says why)") from None
    except OSError as e:
        _shutdown(socks)
        raise EndpointError(f"multifd send to {address}: {e.strerror or e}") from None
    except BaseException:
        _shutdown(socks)
        raise
    finally:
        for s in socks:
            s.close()
    elapsed = time.monotonic() - t0
    stats = SendStats(main_bytes + sum(counters.chan_bytes), counters.pages,
                      counters.zero_pages + zero_main, pages_total, counters.reads, elapsed)
    if progress is not None:
        progress(stats)
    return MultifdSendReport(
        bytes_sent=stats.bytes_sent,
        main_bytes=main_bytes,
        pages_sent=counters.pages,
        zero_pages=counters.zero_pages + zero_main,
        packets=counters.packets,
        sync_packets=counters.syncs,
        preadv_calls=counters.reads,
        elapsed=elapsed,
        machine=machine,
        blocks=tuple((b.name, b.length) for b in blocks),
        channels=nchan,
        sync=sync,
        zero=zero,
        switchover_start=switchover,
        channel_bytes=tuple(counters.chan_bytes),
        bytes_received=received,
    )


def _connect(address: str, nchan: int, uuid: bytes, stall: float, connect_timeout: float,
             head: Sequence[bytes], counters: _Counters, socks: list[socket.socket],
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
        counters.chan_bytes[i] += 64
    return main, main_bytes


def _main_part(img: Image, msock: socket.socket, zero_records: bool, fresh: bool,
               flush: bool) -> tuple[int, int]:
    """The main connection's PART section, up to the last sync marker: ZERO records for the
    pages without data that need them (all with ``zero_records``; else, for a ``fresh``
    destination, those of the blocks :func:`skips_absent` does not skip), then
    [MULTIFD_FLUSH] EOS. Returns the bytes written and the pages without data accounted."""
    sid = ram_section_id(img)
    mid = [encode(SectionPart(sid))]
    main_bytes = zero_main = pending = 0
    enc = StreamEncoder()
    for blk in img.blocks.values():
        # a fresh destination: ZERO records for the blocks whose pages without data are
        # not skipped (a zero list entry would not clear a page QEMU has not received)
        if zero_records or (fresh and not skips_absent(blk, fresh)):
            for pages in img.absent_groups(blk.name, 1 << 16):
                zero_main += len(pages)
                mid.append(enc.zero_pages(blk.name, pages))
                pending += len(mid[-1])
                if pending >= 1 << 20:  # ZERO records batched into writes of about 1 MiB
                    main_bytes += writev_all(msock.sendmsg, mid)
                    mid, pending = [], 0
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


def _wait_drained(socks: Sequence[socket.socket], stall: float) -> None:
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
