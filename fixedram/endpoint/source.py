"""What every source side shares: fixedram streaming an image into a waiting QEMU.

:func:`~fixedram.endpoint.send.send` (one connection),
:func:`~fixedram.endpoint.multifd_send.send_multifd` (page packets over extra connections)
and :func:`~fixedram.endpoint.postcopy.send_postcopy` (pages on demand after the guest runs)
differ in how page data travels; the rest of the stream, and the rules around it, are the
same and live here:

* the stream around the RAM data: :func:`stream_head` (file header, configuration, the RAM
  setup section), :func:`part_end` and :func:`ram_end` (closing a RAM section),
  :func:`stream_tail` (END section, device state, EOF, VM description);
* which pages go out at all: :func:`skips_absent` (a fresh destination needs nothing for
  pages without data, ``docs/fresh-destination.md``; the pages without data themselves
  come from :meth:`~fixedram.image.Image.absent_groups`);
* the return path: :func:`is_bidirectional` and :class:`ReturnPathReader`, which reads
  what the destination sends back until it closes (and drops it, unless told what to do
  with it);
* progress callbacks at a bounded rate (:class:`Progress`, :class:`SendStats`);
* image ownership (:func:`image_of`: a path is opened and closed here, an
  :class:`~fixedram.image.Image` stays the caller's).

Page records themselves are framed by the codec
(:meth:`~fixedram.stream.StreamEncoder.page_records`), pages read through the image's
public read API (:meth:`~fixedram.image.Image.read_into`,
:meth:`~fixedram.image.Image.read_slots`).
"""

from __future__ import annotations

import contextlib
import os
import stat
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Generic, TypeVar

from fixedram.errors import FixedramError
from fixedram.image import Image, open_image
from fixedram.image.reader import BlockInfo, PageSlots
from fixedram.image.sections import ram_section_id
from fixedram.io.channel import Buffer, Channel
from fixedram.stream import (
    CommandRecord,
    Configuration,
    EndOfFile,
    EndOfSection,
    FileHeader,
    MemSize,
    MultifdFlush,
    RamBlock,
    SectionEnd,
    SectionFooter,
    SectionStart,
    VMDescription,
    encode,
)
from fixedram.stream.encoder import PageRecords
from fixedram.stream.format import RAM_SECTION, RAM_SECTION_VERSION, Command

if TYPE_CHECKING:
    from fixedram.image.verify import PageCheck

__all__ = [
    "SendStats",
    "image_of",
    "page_check",
    "stream_head",
    "part_end",
    "ram_end",
    "stream_tail",
    "skips_absent",
    "split_runs",
    "record_buffer",
    "is_bidirectional",
    "ReturnPathReader",
    "Progress",
    "FRESH_MIN_BLOCK",
    "LINGER_SECONDS",
    "PROGRESS_INTERVAL",
]

ImageArg = str | os.PathLike[str] | Image


def record_buffer(npages: int) -> tuple[PageRecords, PageSlots]:
    """A buffer of ``npages`` PAGE records, and the page slots that reads fill in it."""
    recs = PageRecords(npages)
    return recs, PageSlots(recs.buf, recs.slot_offset, recs.stride, recs.capacity)

#: Blocks longer than this are guest RAM that a fresh destination holds as zeros: their
#: pages without data need not be sent (``docs/fresh-destination.md``). Smaller blocks
#: (firmware, ROM blobs QEMU fills at start-up, video RAM) get ZERO records for them anyway.
FRESH_MIN_BLOCK = 64 << 20
#: How long to wait, after the last byte, for the destination to close its side.
LINGER_SECONDS = 30.0
#: Minimum interval between two progress callbacks.
PROGRESS_INTERVAL = 0.2


@dataclass(frozen=True)
class SendStats:
    """Progress of a running :func:`~fixedram.endpoint.send.send` or
    :func:`~fixedram.endpoint.multifd_send.send_multifd`."""

    bytes_sent: int
    pages_sent: int
    zero_pages: int
    pages_total: int
    preadv_calls: int
    elapsed: float

    @property
    def pages_done(self) -> int:
        """Pages accounted for so far (data and zero)."""
        return self.pages_sent + self.zero_pages


# ---------------------------------------------------------------------------------------------
# The image
# ---------------------------------------------------------------------------------------------


@contextlib.contextmanager
def image_of(image: ImageArg) -> Iterator[Image]:
    """``image`` as an :class:`Image`: a path is opened, and closed on leaving; an image
    given open stays open (it is the caller's)."""
    if isinstance(image, Image):
        yield image
        return
    img = open_image(Path(image))
    try:
        yield img
    finally:
        img.close()


def page_check(img: Image) -> PageCheck | None:
    """Checks pages against the image's checksum extension as they are read (None: the
    image has none, or its pages are checked as they are read already: an object image's
    chunks against their names, :attr:`~fixedram.image.reader.Image.pages_checked`). The
    extension itself is checked in either case."""
    from fixedram.image.check import check_metadata
    from fixedram.image.verify import PageCheck

    cs = check_metadata(img)
    return PageCheck(img, cs) if cs is not None and not img.pages_checked else None


# ---------------------------------------------------------------------------------------------
# The stream around the RAM data
# ---------------------------------------------------------------------------------------------


def stream_head(
    img: Image, *, flush: bool = False, commands: Iterable[Command | tuple[Command, bytes]] = ()
) -> list[bytes]:
    """The stream up to the end of the RAM setup section: header, configuration,
    ``commands`` (each a command, or a command and its data), the RAM block list
    (``flush``: a MULTIFD_FLUSH before its EOS, a multifd sync point)."""
    cfg = img.configuration
    blocks = list(img.blocks.values())
    sid = ram_section_id(img)
    cmds = [c if isinstance(c, tuple) else (c, b"") for c in commands]
    return [
        encode(FileHeader()),
        encode(Configuration(cfg.machine, None, cfg.page_bits, cfg.uuid)),
        *(encode(CommandRecord(int(c), data)) for c, data in cmds),
        encode(SectionStart(sid, RAM_SECTION, 0, RAM_SECTION_VERSION)),
        encode(MemSize(sum(b.length for b in blocks))),
        *(encode(RamBlock(b.name, b.length)) for b in blocks),
        *([encode(MultifdFlush())] if flush else []),
        *part_end(sid),
    ]


def part_end(sid: int) -> list[bytes]:
    """The end of a RAM section (START or PART) ``sid``: EOS and the section footer."""
    return [encode(EndOfSection()), encode(SectionFooter(sid))]


def ram_end(sid: int) -> list[bytes]:
    """The END section of RAM section ``sid``: its header, EOS, its footer."""
    return [encode(SectionEnd(sid)), *part_end(sid)]


def stream_tail(img: Image, switchover: bool) -> list[Buffer]:
    """From the last RAM section to the end: [SWITCHOVER_START], the END section, the
    stored device state, EOF and the VM description."""
    tail: list[Buffer] = []
    if switchover:
        tail.append(encode(CommandRecord(Command.SWITCHOVER_START)))
    return [
        *tail,
        *ram_end(ram_section_id(img)),
        img.device_state,
        encode(EndOfFile()),
        encode(VMDescription(img.vmdesc or b"")),
    ]


# ---------------------------------------------------------------------------------------------
# Which pages go out
# ---------------------------------------------------------------------------------------------


def skips_absent(blk: BlockInfo, fresh: bool) -> bool:
    """Whether the pages of ``blk`` without data go unsent (``fresh`` destination, and a
    block larger than :data:`FRESH_MIN_BLOCK`, see ``docs/fresh-destination.md``)."""
    return fresh and blk.length > FRESH_MIN_BLOCK


def split_runs(runs: Iterable[tuple[int, int]], per: int) -> Iterator[tuple[int, int]]:
    """``(first, npages)`` pieces of at most ``per`` pages of each run, in order."""
    for first, n in runs:
        for p in range(first, first + n, per):
            yield p, min(per, first + n - p)


# ---------------------------------------------------------------------------------------------
# The return path
# ---------------------------------------------------------------------------------------------


def is_bidirectional(channel: Channel) -> bool:
    """Whether the destination can send back on ``channel`` (a socket or a pipe; a file
    or a sink cannot)."""
    try:
        mode = os.fstat(channel.fileno_read()).st_mode
    except (OSError, ValueError):
        return False
    return stat.S_ISSOCK(mode) or stat.S_ISFIFO(mode)


class ReturnPathReader:
    """Reads whatever the destination sends back on ``channel``, in a thread, until it
    closes (a channel that cannot receive is not read).

    Each chunk read goes to ``on_data`` (without one, it is dropped: the destination's
    messages of a precopy stream need no answer, but must not fill the socket); at the end
    ``on_closed`` gets why reading stopped (None: the destination closed its side).
    ``received`` counts the bytes read.
    """

    def __init__(
        self,
        channel: Channel,
        *,
        on_data: Callable[[memoryview], None] | None = None,
        on_closed: Callable[[str | None], None] | None = None,
        name: str = "fixedram-send-rp",
        chunk: int = 4096,
    ) -> None:
        self.received = 0
        self._done = threading.Event()
        self._channel = channel
        self._on_data = on_data
        self._on_closed = on_closed
        self._chunk = chunk
        self._thread: threading.Thread | None = None
        if is_bidirectional(channel):
            self._thread = threading.Thread(target=self._run, name=name, daemon=True)
            self._thread.start()

    def _run(self) -> None:
        buf = memoryview(bytearray(self._chunk))
        error = None
        try:
            while True:
                n = self._channel.recv_into(buf)
                if n <= 0:
                    break
                self.received += n
                if self._on_data is not None:
                    self._on_data(buf[:n])
        except (OSError, FixedramError, ValueError) as e:
            error = str(e) or type(e).__name__
        if self._on_closed is not None:
            self._on_closed(error)
        self._done.set()

    def wait(self, timeout: float) -> None:
        """Wait until the destination closed its side (or ``timeout`` passes)."""
        if self._thread is not None:
            self._done.wait(timeout)

    def join(self, timeout: float) -> None:
        """Wait for the reading thread to end (or ``timeout`` to pass)."""
        if self._thread is not None:
            self._thread.join(timeout)


# ---------------------------------------------------------------------------------------------
# Progress
# ---------------------------------------------------------------------------------------------

S = TypeVar("S")


class Progress(Generic[S]):
    """Calls ``callback`` with ``stats()`` at most every :data:`PROGRESS_INTERVAL` seconds
    (no callback: nothing, and ``stats`` is never called)."""

    def __init__(self, callback: Callable[[S], None] | None, stats: Callable[[], S]) -> None:
        self._callback = callback
        self._stats = stats
        self._last = 0.0

    def tick(self, force: bool = False) -> None:
        """Report now if the interval has passed since the last report (or ``force``)."""
        if self._callback is None:
            return
        now = time.monotonic()
        if force or now - self._last >= PROGRESS_INTERVAL:
            self._last = now
            self._callback(self._stats())
