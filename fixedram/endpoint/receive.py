"""The migration destination: receive QEMU's precopy stream into a mapped-ram image.

QEMU migrates to fixedram as if to another QEMU (``exec:``, ``unix:``, ``tcp:``,
``fd:``); :func:`receive` decodes the stream with
:class:`~fixedram.stream.StreamDecoder` and writes every page in place at its fixed
offset with :class:`~fixedram.image.MappedRamWriter`, so the image never grows
beyond RAM size however often the guest re-dirties a page. The image appears
under its name only once the whole stream (EOF and VM description) has been
received, written and fsynced; until then it is an unnamed ``O_TMPFILE`` in the
image's directory (or a hidden temporary name where the filesystem lacks
``O_TMPFILE``), so a crash of either side leaves any previous image untouched.

:class:`Receiver` is the core without a channel: bytes in, return-path replies
out. ``fixedram convert`` feeds it from a file. It handles the protocol (records,
commands, the return path) and hands page and zero records to
:mod:`fixedram.endpoint.pagewrites`, which coalesces them into runs and writes them
once per feed (inline, or with O_DIRECT in a writer thread).

Multifd (``docs/multifd.md`` §1, §7): the source opens the main connection
plus N channel connections to one ``unix:``/``tcp:`` address, in no fixed order.
:func:`receive_listening` accepts them in a thread, classifies each by its first
4 bytes and hands the channels to a
:class:`~fixedram.endpoint.multifd.MultifdReceiver` (one reader thread per
channel, pages applied epoch by epoch) that writes into the same image. N is
not on the wire, so the caller says how many channels to expect
(``channels=N``, ``fixedram receive --listen ... --channels N``): the number
must equal the source's ``multifd-channels``. With ``channels=0`` a multifd
connection or a ``MULTIFD_FLUSH`` record is refused with a one-line error.
"""

from __future__ import annotations

import contextlib
import errno
import os
import select
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from fixedram import faults
from fixedram._lazy import numpy as np
from fixedram.endpoint.multifd import MultifdReceiver, MultifdStats
from fixedram.endpoint.pagewrites import RunCoalescer, WriteQueue
from fixedram.errors import (
    EndpointError,
    FixedramError,
    StreamError,
    TruncatedStream,
    UnsupportedRecord,
)
from fixedram.image.layout import PAGE_SIZE, page_ranges
from fixedram.image.libvirt import header_bytes, mark_complete, write_header
from fixedram.image.writer import Buffer, MappedRamWriter, PageObserver, mapped_configuration
from fixedram.io.channel import Channel, Listener, SocketChannel
from fixedram.io.files import (
    AtomicFile,
    aligned_buffer,
    drop_cached,
    fsync,
    open_direct,
    remove_stale_partials,
    warn_no_direct_io,
)
from fixedram.stream import (
    CommandRecord,
    Configuration,
    DeviceState,
    EndOfSection,
    MultifdFlush,
    Packaged,
    Page,
    PageRun,
    PageSet,
    RamBlock,
    Record,
    SectionEnd,
    SectionPart,
    SectionStart,
    StreamDecoder,
    VMDescription,
    Zero,
    ZeroPages,
    ZeroRun,
)
from fixedram.stream.format import Command
from fixedram.stream.multifd import classify
from fixedram.stream.returnpath import encode_pong, encode_shut, encode_switchover_ack
from fixedram.versions import wants_switchover_ack

__all__ = [
    "CHANNEL_GRACE",
    "CONNECT_TIMEOUT",
    "MAX_CHANNELS",
    "RECV_CHUNK",
    "DirectIO",
    "ImageFile",
    "ReceiveReport",
    "ReceiveStats",
    "Receiver",
    "receive",
    "receive_listening",
]

DirectIO = bool | Literal["required"]

#: Most bytes read from the channel per feed.
RECV_CHUNK = 1 << 20
#: A feed waits up to FILL_WAIT ms for more bytes while it holds less than FILL bytes:
#: a source writes its stream in pieces of tens of KiB, and every feed has a fixed
#: cost (decoding set-up, system calls, Python), so feeds of a few KiB
#: would cost several times the data's own handling. The wait ends as soon as bytes
#: arrive; a source that stops (e.g. waiting for a reply) costs one FILL_WAIT.
FILL = 256 << 10
FILL_WAIT = 1
#: Seconds between progress callbacks.
PROGRESS_INTERVAL = 0.25
#: Most multifd channels (QEMU's ``multifd-channels`` limit).
MAX_CHANNELS = 255
#: Seconds the other connections of a migration may lag behind its first one, and a
#: new connection may take to send its first 4 bytes.
CONNECT_TIMEOUT = 30.0
#: Seconds to wait at the first multifd sync point for channels not connected yet. The
#: source writes that marker only after every channel sent its first SYNC packet, so
#: all its channels are connected by then; missing ones mean a wrong channel count.
CHANNEL_GRACE = 5.0

_PAGE_SHIFT = PAGE_SIZE.bit_length() - 1


@dataclass(frozen=True)
class ReceiveStats:
    """Progress of a running receive."""

    bytes_received: int
    pages_written: int
    sections: int


@dataclass(frozen=True)
class ReceiveReport:
    """What a completed receive did."""

    image: Path
    bytes_received: int
    pages_written: int  # page writes, rewrites of the same page included
    pages_present: int  # distinct pages stored in the image (bits set)
    zero_pages: int  # ZERO records received
    sections: int  # RAM sections (START, PARTs, END): the source's passes
    elapsed: float  # seconds
    apparent_size: int  # st_size of the image
    allocated_size: int  # disk space used by the image
    ram_size: int  # total bytes of all RAM blocks
    machine: str
    direct_io: bool  # page data went through O_DIRECT
    return_path: bool  # the source opened a return path
    multifd_channels: int = 0  # multifd channels the pages also came over

    def summary(self) -> str:
        """A one-line human summary."""
        mib = 1 << 20
        rate = self.bytes_received / self.elapsed / mib if self.elapsed > 0 else 0.0
        return (f"{self.image}: {self.machine}, RAM {self.ram_size / mib:.1f} MiB; received "
                f"{self.bytes_received / mib:.1f} MiB in {self.elapsed:.2f} s "
                f"({rate:.1f} MiB/s), {self.sections} sections, {self.pages_written} page "
                f"writes, {self.pages_present} pages stored, {self.zero_pages} zero; image "
                f"{self.apparent_size / mib:.1f} MiB apparent, "
                f"{self.allocated_size / mib:.1f} MiB allocated"
                + (f"; main connection + {self.multifd_channels} multifd channels"
                   if self.multifd_channels else "")
                + ("; page data written with O_DIRECT" if self.direct_io else ""))


class ImageFile(AtomicFile):
    """:class:`AtomicFile` on an unnamed ``O_TMPFILE`` where the filesystem has it.

    The file gets a name only at :meth:`commit` (linked under the temporary name,
    then renamed over the target), so even a SIGKILL leaves nothing behind.
    """

    def __init__(self, target: str | os.PathLike[str], *, mode: int = 0o600) -> None:
        tgt = Path(target).absolute()
        parent = tgt.parent
        fd = -1
        if not tgt.is_dir() and parent.is_dir() and hasattr(os, "O_TMPFILE"):
            try:
                fd = os.open(parent, os.O_TMPFILE | os.O_RDWR, mode)
            except OSError as e:
                if e.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
                    raise FixedramError(f"cannot create a file in {parent}: "
                                        f"{e.strerror}") from None
        if fd < 0:
            super().__init__(target, mode=mode)
            self.anonymous = False
            return
        self.target = tgt
        self.temp = parent / f".{tgt.name}.fixedram-partial.{os.getpid()}"
        remove_stale_partials(tgt)  # of a writer killed between naming and renaming
        self.fd = fd
        self.committed = False
        self.anonymous = True

    def commit(self, *, drop_cache: bool = False) -> None:
        """fsync, give the file its temporary name, rename it over the target, fsync dir."""
        if not self.anonymous:
            super().commit(drop_cache=drop_cache)
            return
        fsync(self.fd)
        if drop_cache:
            drop_cached(self.fd)
        dfd = os.open(self.target.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.temp.name, dir_fd=dfd)
            # linkat(AT_SYMLINK_FOLLOW) through /proc names the unnamed file; a plain
            # link() would try to link the /proc symlink itself (EXDEV)
            os.link(f"/proc/self/fd/{self.fd}", self.temp.name, dst_dir_fd=dfd,
                    follow_symlinks=True)
            faults.point("receive-linked")
            os.close(self.fd)
            self.fd = -1
            try:
                os.replace(self.temp.name, self.target.name, src_dir_fd=dfd, dst_dir_fd=dfd)
            except BaseException:
                os.unlink(self.temp.name, dir_fd=dfd)
                raise
            fsync(dfd)
        finally:
            os.close(dfd)
        self.committed = True

    def abort(self) -> None:
        """Close (an unnamed file then simply vanishes) or remove the temporary file."""
        if not self.anonymous:
            super().abort()
            return
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class _WritebackSink:
    """The writer for multifd channels: each packet's pages are handed to writeback at
    once (as the main channel's are per feed), so the final fsync has little left."""

    def __init__(self, writer: MappedRamWriter, fd: int) -> None:
        self.writer = writer
        self.fd = fd

    def write_pages(self, block: str, first_page: int, bufs: Sequence[Buffer]) -> int:
        return self._writeback(block, first_page,
                               self.writer.write_pages(block, first_page, bufs))

    def write_page_views(self, block: str, first_page: int, pages: list[memoryview]) -> int:
        return self._writeback(block, first_page,
                               self.writer.write_page_views(block, first_page, pages))

    def write_page_set(self, block: str, pages: np.ndarray, views: list[memoryview],
                       runs: list[tuple[int, int, int]] | None = None) -> int:
        n = self.writer.write_page_set(block, pages, views, runs)
        for first, k in page_ranges(pages, runs):
            self._writeback(block, first, k)
        return n

    def _writeback(self, block: str, first_page: int, n: int) -> int:
        at = self.writer.blocks[block].pages_offset + first_page * PAGE_SIZE
        drop_cached(self.fd, at, n * PAGE_SIZE)
        return n

    def zero_pages(self, block: str, first_page: int, npages: int = 1) -> int:
        return self.writer.zero_pages(block, first_page, npages)

    def zero_page_set(self, block: str, pages: np.ndarray) -> int:
        return self.writer.zero_page_set(block, pages)


class Receiver:
    """Decodes a precopy stream into a mapped-ram image; sans channel.

    ``reply`` is called with return-path bytes to send to the source. Feed bytes
    with :meth:`feed` until :attr:`done`, then :meth:`commit`; :meth:`abort` (or an
    exception inside a ``with`` block) discards the partial image.

    ``multifd_channels`` N > 0 makes :attr:`multifd`, a
    :class:`~fixedram.endpoint.multifd.MultifdReceiver` writing into the same image:
    give it the N channel connections with ``add_channel``. ``multifd_error`` is
    called from a channel thread when a channel fails (so the caller can stop
    reading the main connection); ``before_marker`` is called before the first
    multifd sync point (e.g. to check that all N channels connected). ``drop_cache``:
    :meth:`commit` drops the image's pages from the page cache once it is durable.
    ``observer`` is told of every change to the image's page data (see
    :class:`~fixedram.image.writer.PageObserver`).
    """

    def __init__(self, image: str | os.PathLike[str], *, direct_io: DirectIO = False,
                 progress: Callable[[ReceiveStats], None] | None = None,
                 reply: Callable[[bytes], None] | None = None,
                 switchover_ack: bool | None = None, multifd_channels: int = 0,
                 multifd_error: Callable[[BaseException], None] | None = None,
                 before_marker: Callable[[], None] | None = None,
                 libvirt_xml: str | None = None, was_running: bool = True,
                 drop_cache: bool = True, observer: PageObserver | None = None) -> None:
        if not 0 <= multifd_channels <= MAX_CHANNELS:
            raise FixedramError(f"multifd channels must be 0..{MAX_CHANNELS}, not "
                                f"{multifd_channels}")
        self.image = Path(image).absolute()
        self._drop_cache = drop_cache
        self._progress = progress
        self._reply = reply
        self._switchover_ack = switchover_ack
        self._t0 = time.monotonic()
        self._last_progress = self._t0
        # page runs are views of the records as received (no copy of page data)
        self.dec = StreamDecoder(views=True)
        # page and zero records become write operations, written at the end of each feed
        self._runs = RunCoalescer()
        self.file = ImageFile(self.image)
        self._direct_fd = -1
        self.multifd: MultifdReceiver | None = None
        self.multifd_stats: MultifdStats | None = None
        self._before_marker = before_marker
        try:
            if direct_io:
                self._open_direct(direct_io)
            base = 0
            self.libvirt = libvirt_xml is not None
            if libvirt_xml is not None:  # a libvirt sparse image: header first, partial magic
                head = header_bytes(libvirt_xml, was_running=was_running, partial=True)
                write_header(self.file.fd, head)
                base = len(head)
            self.writer = MappedRamWriter(
                self.file.fd, page_fd=self._direct_fd if self._direct_fd >= 0 else None,
                base_offset=base, observer=observer)
            if multifd_channels:
                # with O_DIRECT every page buffer must be page-aligned: each channel
                # reads its packets into one aligned (anonymous mmap) buffer
                payload = ((lambda n: memoryview(aligned_buffer(n))) if self.direct
                           else None)
                # the writer takes page writes of several threads (for disjoint pages,
                # which an epoch guarantees): the channels' buffered writes take turns
                # under its lock, O_DIRECT ones go to the kernel in parallel
                sink = self.writer if self.direct else _WritebackSink(self.writer, self.file.fd)
                self.multifd = MultifdReceiver(sink, multifd_channels, serialize=False,
                                               payload_buffer=payload, on_error=multifd_error)
            self._writes = WriteQueue(self.multifd or self.writer, self.writer, self.file.fd,
                                      direct=self.direct)
        except BaseException:
            self._discard()
            raise
        self.bytes_received = 0
        self.zero_records = 0
        self.sections = 0
        self.parts = 0
        self.return_path = False
        self.configuration: Configuration | None = None
        self._ram_id: int | None = None
        self._blocks: list[RamBlock] = []
        self._begun = False
        self._commands: list[CommandRecord] = []
        self._device: bytes | None = None
        self._vmdesc: bytes | None = None
        self._ended = False

    # -- setup -------------------------------------------------------------------

    def _open_direct(self, mode: DirectIO) -> None:
        fd = open_direct(f"/proc/self/fd/{self.file.fd}", os.O_WRONLY)
        if fd is None:
            where = self.image.parent
            if mode == "required":
                raise FixedramError(f"the filesystem of {where} does not support O_DIRECT")
            warn_no_direct_io(where)
            return
        self._direct_fd = fd

    @property
    def direct(self) -> bool:
        """True when page data goes through an O_DIRECT descriptor."""
        return self._direct_fd >= 0

    @property
    def done(self) -> bool:
        """True once the whole stream (EOF and any VM description) has arrived."""
        return self.dec.done

    # -- input -------------------------------------------------------------------

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Process received bytes.

        Page writes are done before the feed returns (with O_DIRECT: by a writer thread,
        overlapping with receiving the next bytes; the writes of one feed are done before
        the feed after next, as the decoder's buffers live that long, and before any
        other record is handled).
        """
        self.bytes_received += len(data)
        self._writes.wait(1)
        self._fed(self.dec.feed(data))

    def recv_space(self) -> memoryview:
        """Where to receive the next bytes (up to :data:`RECV_CHUNK`); then :meth:`received`.

        Bytes received here are decoded in place and their pages written straight from
        it: no copy of page data in fixedram.
        """
        self._writes.wait(1)  # the space may reuse memory of the feed before the last one
        return self.dec.recv_space(RECV_CHUNK)[:RECV_CHUNK]

    def received(self, n: int) -> None:
        """``n`` bytes were received into :meth:`recv_space`: process them like :meth:`feed`."""
        self.bytes_received += n
        self._fed(self.dec.feed_received(n))

    def _fed(self, records: list[Record]) -> None:
        self._handle(records)
        self._writes.submit(self._runs.take())
        if self._progress is not None:
            now = time.monotonic()
            if now - self._last_progress >= PROGRESS_INTERVAL:
                self._last_progress = now
                self._progress(self.stats())

    def feed_eof(self) -> None:
        """The input ended; raises if the stream is incomplete."""
        self._handle(self.dec.feed_eof())
        self._sync()

    def stats(self) -> ReceiveStats:
        """Progress so far (bytes: the main connection plus multifd page data)."""
        extra = 0
        if self.multifd is not None:
            extra = sum(c.bytes for c in self.multifd.stats().channels)
        return ReceiveStats(self.bytes_received + extra,
                            self.writer.pages_written + self._runs.pending_pages,
                            self.sections)

    def _handle(self, records: list[Record]) -> None:
        run, zeros, page = self._runs.run, self._runs.zeros, self._runs.page
        for r in records:
            if isinstance(r, PageRun):
                run(r.block, r.offset >> _PAGE_SHIFT, r.data, r.stride, r.pages)
            elif isinstance(r, ZeroRun):
                self.zero_records += r.npages
                zeros(r.block, r.offset >> _PAGE_SHIFT, r.npages)
            elif isinstance(r, ZeroPages):
                self.zero_records += r.npages
                self._runs.zero_set(r.block, (r.offsets >> _PAGE_SHIFT).astype(np.int64))
            elif isinstance(r, PageSet):
                data, zero = r.numbers()
                self.zero_records += len(zero)
                self._runs.page_set(r.block, data, r.pages)
                if len(zero):  # no page is in both (a set never holds one twice)
                    self._runs.zero_set(r.block, zero)
            elif isinstance(r, Page):
                page(r.block, r.offset >> _PAGE_SHIFT, r.data)
            elif isinstance(r, Zero):
                if r.fill:
                    raise UnsupportedRecord(f"ZERO record with fill byte 0x{r.fill:02x} "
                                            f"(block '{r.block}')")
                self.zero_records += 1
                zeros(r.block, r.offset >> _PAGE_SHIFT, 1)
            else:
                self._sync()
                self._other(r)

    def _sync(self) -> None:
        """Everything queued is written (before records that depend on it)."""
        self._writes.submit(self._runs.take())
        self._writes.wait(0)

    def _send(self, data: bytes) -> None:
        if self._reply is not None:
            self._reply(data)

    def _other(self, r: object) -> None:
        if isinstance(r, RamBlock):
            self._blocks.append(r)
        elif isinstance(r, EndOfSection):
            if not self._begun:
                self._begin()
            if self.multifd is not None:
                self._marker(False)
        elif isinstance(r, SectionPart):
            faults.point("receive-part")
            self.sections += 1
            self.parts += 1
        elif isinstance(r, SectionEnd):
            self.sections += 1
            self._ended = True
        elif isinstance(r, SectionStart):
            self.sections += 1
            self._ram_id = r.section_id
        elif isinstance(r, CommandRecord):
            self._command(r)
        elif isinstance(r, Configuration):
            if r.mapped_ram:
                raise UnsupportedRecord("the source declares capability mapped-ram; "
                                        "migrate with mapped-ram off")
            mapped_configuration(r)  # refuses x-ignore-shared early
            self.configuration = r
        elif isinstance(r, MultifdFlush):
            if self.multifd is None:
                raise UnsupportedRecord(
                    "the source uses multifd (MULTIFD_FLUSH record) but no multifd channels "
                    "are expected; receive with --listen and --channels N (N = the source's "
                    "multifd-channels)")
            if not self._begun:
                self._begin()
            self._marker(True)
        elif isinstance(r, Packaged):
            raise UnsupportedRecord("postcopy not supported (PACKAGED command)")
        elif isinstance(r, DeviceState):
            faults.point("receive-device")
            self._device = r.data
        elif isinstance(r, VMDescription):
            self._vmdesc = r.data

    def _begin(self) -> None:
        """The RAM block list is complete (first EOS or MULTIFD_FLUSH): lay out the image."""
        if self.configuration is None:
            raise StreamError("RAM section before the configuration section")
        if self._ram_id is None or not self._blocks:
            raise StreamError("RAM section without a RAM block list")
        faults.point("receive-setup")
        self.writer.begin(self.configuration, self._blocks, section_id=self._ram_id)
        self._begun = True
        if self.multifd is not None:
            self.multifd.begin({b.name: b.length for b in self._blocks})

    def _marker(self, flush: bool) -> None:
        """A MULTIFD_FLUSH (``flush``) or a RAM EOS: maybe a multifd sync point."""
        mf = self.multifd
        assert mf is not None
        if (self._before_marker is not None and mf.markers == 0
                and (flush or mf.mode != "flush")):
            self._before_marker()
        if flush:
            mf.on_flush()
        else:
            mf.on_eos()

    def _command(self, r: CommandRecord) -> None:
        cmd = r.cmd
        if cmd == Command.OPEN_RETURN_PATH:
            self.return_path = True
            ack = self._switchover_ack
            if ack is None:
                ack = wants_switchover_ack(self.configuration.machine
                                           if self.configuration else "")
            if ack:
                self._send(encode_switchover_ack())
        elif cmd == Command.PING:
            if not self.return_path:
                raise StreamError("PING before the return path was opened")
            self._send(encode_pong(int.from_bytes(r.data, "big")))
        elif cmd == Command.SWITCHOVER_START:
            self._commands.append(r)
        elif cmd == Command.POSTCOPY_ADVISE:
            pass  # harmless until postcopy actually starts (LISTEN/PACKAGED)
        else:
            raise UnsupportedRecord(f"migration command {r.name} (postcopy and COLO are not "
                                    "supported)")

    # -- completion --------------------------------------------------------------

    def commit(self) -> ReceiveReport:
        """Write the trailer, fsync, rename into place; answer SHUT(0) on a return path."""
        if not self.dec.done:
            raise StreamError("the migration stream is not complete", self.dec.next_offset)
        self._sync()
        self._writes.close()
        if not self._begun or not self._ended or self._device is None:
            raise StreamError("the migration stream has no complete RAM section")
        zero = self.zero_records
        nbytes = self.bytes_received
        if self.multifd is not None:
            # every channel has delivered its last SYNC; don't wait for the source to
            # close them (with a return path it does so only after our SHUT)
            mst = self.multifd_stats = self.multifd.finish(eof_timeout=0)
            zero += mst.zero_pages
            nbytes += sum(c.bytes for c in mst.channels)
        w = self.writer
        size = w.finish(self._device, self._vmdesc, commands=self._commands, parts=self.parts)
        st = os.fstat(self.file.fd)
        direct = self.direct
        self._close_direct()
        faults.point("receive-commit")
        if self.libvirt:  # libvirt's order: everything durable, then the complete magic
            os.fsync(self.file.fd)
            mark_complete(self.file.fd)
        self.file.commit(drop_cache=self._drop_cache)
        report = ReceiveReport(
            image=self.image, bytes_received=nbytes,
            pages_written=w.pages_written, pages_present=w.pages_present,
            zero_pages=zero, sections=self.sections,
            elapsed=time.monotonic() - self._t0, apparent_size=size,
            allocated_size=st.st_blocks * 512, ram_size=w.ram_size,
            machine=self.configuration.machine if self.configuration else "",
            direct_io=direct, return_path=self.return_path,
            multifd_channels=self.multifd.channels if self.multifd is not None else 0)
        if self._progress is not None:
            self._progress(self.stats())
        if self.return_path:
            self._send(encode_shut(False))
        return report

    def _close_direct(self) -> None:
        if self._direct_fd >= 0:
            os.close(self._direct_fd)
            self._direct_fd = -1

    def abort(self) -> None:
        """Stop the writer and any multifd channel threads; discard the partial image."""
        self._writes.abort()
        self._discard()

    def _discard(self) -> None:
        if self.multifd is not None:
            self.multifd.abort()
        self._close_direct()
        self.file.abort()

    def __enter__(self) -> Receiver:
        return self

    def __exit__(self, exc_type: object, *rest: object) -> None:
        if not self.file.committed:
            if exc_type is not None and self.return_path and self._reply is not None:
                with contextlib.suppress(OSError, FixedramError):
                    self._reply(encode_shut(True))
            self.abort()


def _pump(rx: Receiver, channel: Channel, initial: bytes = b"") -> None:
    """Feed ``rx`` from ``channel`` (after ``initial``, bytes already read) to the end.

    A socket or pipe read returns what is queued, often 200 KiB or less: while more is
    already waiting (a zero-timeout poll says so) it is read too, so each feed (and each
    batch of page writes) covers up to :data:`RECV_CHUNK` bytes.
    """
    if initial:
        rx.feed(initial)
    recv = channel.recv_into
    ready = _ready_probe(channel)
    while not rx.done:
        mv = rx.recv_space()
        n = recv(mv)
        if not n:
            rx.received(0)
            try:
                rx.feed_eof()
            except TruncatedStream as e:
                raise EndpointError(f"the source closed the connection before the end "
                                    f"of the migration stream ({e})") from None
            break
        while n < len(mv) and ready(n < FILL):
            k = recv(mv[n:])
            if not k:
                break  # end of stream: the next read says so again
            n += k
        del mv
        rx.received(n)


def _ready_probe(channel: Channel) -> Callable[[bool], bool]:
    """A function telling whether ``channel`` has bytes to read: at once, or (argument
    true) within :data:`FILL_WAIT` milliseconds."""
    try:
        fd = channel.fileno_read()
    except (OSError, ValueError, AttributeError):
        fd = -1
    if fd < 0:
        return lambda wait: False
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return lambda wait: bool(poller.poll(FILL_WAIT if wait else 0))


def receive(channel: Channel, image: str | os.PathLike[str], *, direct_io: DirectIO = False,
            progress: Callable[[ReceiveStats], None] | None = None,
            switchover_ack: bool | None = None,
            libvirt_xml: str | None = None, libvirt_running: bool = True,
            drop_cache: bool = True, observer: PageObserver | None = None) -> ReceiveReport:
    """Be the destination of a precopy migration and save it as a mapped-ram ``image``.

    Reads the stream from ``channel`` until its end (EOF record plus VM description;
    the connection may stay open when the source uses a return path), answering the
    return path (SWITCHOVER_ACK, PONG, finally SHUT). ``direct_io`` writes page data
    with O_DIRECT (``"required"``: fail where unsupported instead of falling back).
    ``switchover_ack`` forces sending SWITCHOVER_ACK on or off (default: see
    :func:`wants_switchover_ack`). ``libvirt_xml``: write a libvirt sparse save image with
    this domain XML in its header (``virsh restore`` loads it, running the domain if
    ``libvirt_running``). Once the image is durable its pages leave the page cache unless
    ``drop_cache`` is false (a caller that reads the image next, or drops them itself).
    ``observer`` is told of every change to the image's page data. The channel is not
    closed.
    A multifd migration needs :func:`receive_listening`.
    """
    with Receiver(image, direct_io=direct_io, progress=progress, reply=channel.sendall,
                  switchover_ack=switchover_ack, libvirt_xml=libvirt_xml,
                  was_running=libvirt_running, drop_cache=drop_cache,
                  observer=observer) as rx:
        _pump(rx, channel)
        return rx.commit()


def _recv_exact(channel: SocketChannel, n: int) -> bytes:
    buf = bytearray(n)
    mv = memoryview(buf)
    got = 0
    while got < n:
        k = channel.recv_into(mv[got:])
        if not k:
            raise EndpointError(f"a connection closed after {got} of its first {n} bytes")
        got += k
    return bytes(buf)


class _Connections:
    """Accepts the connections of one migration on a listener, in a thread of its own.

    Each connection is classified by its first 4 bytes: the main one is handed to
    :meth:`wait_main`, multifd ones go straight to the :class:`MultifdReceiver`.
    The thread keeps accepting until :meth:`stop`, so a multifd channel nobody
    expected (or one too many) is reported instead of stalling the source. A
    failure here or in a channel thread is recorded in :attr:`error` and wakes the
    main loop (read side of the main connection shut down, receiver aborted).
    """

    def __init__(self, listener: Listener, channels: int, *, accept_timeout: float | None,
                 connect_timeout: float, channel_grace: float) -> None:
        self.listener = listener
        self.channels = channels
        self.accept_timeout = accept_timeout
        self.connect_timeout = connect_timeout
        self.channel_grace = channel_grace
        self.mf: MultifdReceiver | None = None
        self.cond = threading.Condition()
        self.main: SocketChannel | None = None
        self.first4 = b""
        self.connected = 0  # connections classified
        self.multifd = 0  # multifd connections handed to the receiver
        self.first_at: float | None = None
        self.error: BaseException | None = None
        self._stopping = False
        self._current: SocketChannel | None = None  # being classified
        self._thread: threading.Thread | None = None

    def start(self, mf: MultifdReceiver | None) -> None:
        self.mf = mf
        self._thread = threading.Thread(target=self._run, name="fixedram-accept", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        lsock = self.listener.sock
        t0 = time.monotonic()
        try:
            while not self._stopping:
                ready, _, _ = select.select([lsock], [], [], 0.2)
                if self._stopping:
                    return
                if not ready:
                    if (self.first_at is None and self.accept_timeout is not None
                            and time.monotonic() - t0 > self.accept_timeout):
                        raise EndpointError(f"no connection on {self.listener.spec} within "
                                            f"{self.accept_timeout:g} s")
                    continue
                ch = self.listener.accept(self.connect_timeout)
                with self.cond:
                    if self._stopping:
                        ch.close()
                        return
                    self._current = ch
                    if self.first_at is None:
                        self.first_at = time.monotonic()
                self._classify(ch)
        except BaseException as e:  # reported by the main thread
            self.fail(e, abort=True)

    def _classify(self, ch: SocketChannel) -> None:
        n = self.connected + 1
        try:
            ch.sock.settimeout(self.connect_timeout)
            try:
                first = _recv_exact(ch, 4)
            except TimeoutError:
                raise EndpointError(f"connection #{n} sent nothing within "
                                    f"{self.connect_timeout:g} s") from None
            except OSError as e:
                raise EndpointError(f"connection #{n} failed: {e.strerror or e}") from None
            ch.sock.settimeout(None)
            kind = classify(first)
            with self.cond:
                self._current = None
                self.connected = n
                if kind == "main":
                    if self.main is not None:
                        raise EndpointError("a second migration stream connected (two sources "
                                            "migrating to the same address?)")
                    self.main, self.first4 = ch, first
                    self.cond.notify_all()
                    return
            if self.mf is None:
                raise UnsupportedRecord(
                    "the source uses multifd (a multifd channel connected) but no multifd "
                    "channels are expected; receive with --listen and --channels N (N = the "
                    "source's multifd-channels)")
            if self.multifd >= self.channels:
                raise StreamError(f"more than {self.channels} multifd channels connected; "
                                  f"--channels must equal the source's multifd-channels")
            self.mf.add_channel(ch, first)
        except BaseException:
            with self.cond:
                self._current = None
            ch.close()
            raise
        with self.cond:
            self.multifd += 1
            self.cond.notify_all()

    def fail(self, e: BaseException, abort: bool = False) -> None:
        """Record ``e`` (the first error wins) and wake the main loop.

        Also the ``on_error`` of the multifd receiver (called from a channel thread,
        which must not abort the receiver: that joins the channel threads).
        """
        with self.cond:
            if self._stopping:
                return
            if self.error is None:
                self.error = e
            self.cond.notify_all()
            main = self.main
        if main is not None:
            # a blocked recv returns 0; the write side stays open for a SHUT(1)
            with contextlib.suppress(OSError):
                main.sock.shutdown(socket.SHUT_RD)
        if abort and self.mf is not None:
            self.mf.abort()  # wakes a main loop waiting at a sync point

    def wait_main(self) -> tuple[SocketChannel, bytes]:
        """The main connection and its first 4 bytes (it may connect after channels)."""
        with self.cond:
            while True:
                if self.error is not None:
                    raise self.error
                if self.main is not None:
                    return self.main, self.first4
                left = None
                if self.first_at is not None:
                    left = self.first_at + self.connect_timeout - time.monotonic()
                    if left <= 0:
                        raise EndpointError(
                            f"{self.multifd} multifd channels connected but no migration "
                            f"stream within {self.connect_timeout:g} s")
                self.cond.wait(left)

    def wait_channels(self) -> None:
        """Before the first sync point: every expected channel must have connected."""
        deadline = time.monotonic() + self.channel_grace
        with self.cond:
            while self.multifd < self.channels:
                if self.error is not None:
                    raise self.error
                left = deadline - time.monotonic()
                if left <= 0:
                    hint = " (the source does not use multifd?)" if not self.multifd else ""
                    raise StreamError(
                        f"only {self.multifd} of {self.channels} multifd channels connected "
                        f"by the first multifd sync point{hint}; --channels must equal the "
                        f"source's multifd-channels")
                self.cond.wait(left)

    def stop(self) -> None:
        """Stop accepting (idempotent); the listener itself stays the caller's."""
        with self.cond:
            self._stopping = True
            self.cond.notify_all()
            cur = self._current
        if cur is not None:
            with contextlib.suppress(OSError):
                cur.sock.shutdown(socket.SHUT_RDWR)
        t = self._thread
        if t is not None and t is not threading.current_thread():
            t.join(10.0)


def receive_listening(listener: Listener, image: str | os.PathLike[str], *, channels: int = 0,
                      direct_io: DirectIO = False,
                      progress: Callable[[ReceiveStats], None] | None = None,
                      switchover_ack: bool | None = None, accept_timeout: float | None = None,
                      connect_timeout: float = CONNECT_TIMEOUT,
                      channel_grace: float = CHANNEL_GRACE,
                      libvirt_xml: str | None = None,
                      libvirt_running: bool = True, drop_cache: bool = True,
                      observer: PageObserver | None = None) -> ReceiveReport:
    """:func:`receive` for a source that connects to ``listener``, with or without multifd.

    ``channels`` is the number of multifd channels to expect: the source's
    ``multifd-channels`` (0: a plain migration, and any multifd channel is an
    error). Connections are accepted and classified in a thread; the main one is
    decoded here while each channel has its reader thread. ``accept_timeout``
    bounds the wait for the first connection; the others must follow within
    ``connect_timeout``, and all channels must be there ``channel_grace`` seconds
    after the first sync point. The accepted connections are closed at the end;
    the listener is not. ``libvirt_xml``, ``drop_cache``, ``observer``: as for
    :func:`receive`.
    """
    if not 0 <= channels <= MAX_CHANNELS:
        raise FixedramError(f"multifd channels must be 0..{MAX_CHANNELS}, not {channels}")
    conns = _Connections(listener, channels, accept_timeout=accept_timeout,
                         connect_timeout=connect_timeout, channel_grace=channel_grace)
    main: list[SocketChannel] = []

    def reply(data: bytes) -> None:
        main[0].sendall(data)

    try:
        with Receiver(image, direct_io=direct_io, progress=progress, reply=reply,
                      switchover_ack=switchover_ack, multifd_channels=channels,
                      libvirt_xml=libvirt_xml, was_running=libvirt_running,
                      drop_cache=drop_cache, multifd_error=conns.fail, observer=observer,
                      before_marker=conns.wait_channels if channels else None) as rx:
            conns.start(rx.multifd)
            ch, first = conns.wait_main()
            main.append(ch)
            _pump(rx, ch, first)
            conns.stop()
            return rx.commit()
    except (StreamError, EndpointError, OSError) as e:
        conns.stop()
        err = conns.error
        if err is not None and err is not e:
            # the failure elsewhere (a channel, the accept thread) caused this one
            raise err from None
        raise
    finally:
        conns.stop()
        for c in main:
            c.close()
