"""Records of QEMU's precopy migration stream, as plain data.

The decoder turns bytes into these objects and the encoder turns them back into
bytes; nothing here does I/O. A stream is, in order::

    FileHeader  Configuration  [Command ...]
    SectionStart("ram")  MemSize  RamBlock...  [MultifdFlush]  EndOfSection  SectionFooter
    (SectionPart  Page|Zero|MultifdFlush...  EndOfSection  SectionFooter)...
    [Command(SWITCHOVER_START)]
    SectionEnd  Page|Zero...  EndOfSection  SectionFooter
    DeviceState  EndOfFile  [VMDescription]

``Page`` and ``Zero`` carry ``offset`` as a byte offset inside their RAM block. A
decoder made with ``runs=True`` also gives ``PageRun`` and ``ZeroRun``: stretches of
consecutive CONTINUE page (or zero) records of one block, collapsed into one record
each, so a consumer handles a megabyte of pages with one Python step; ``ZeroPages``:
a stretch of CONTINUE zero records whose pages are scattered (zero pages between pages
with data, sent on another connection), as one record with an array of offsets; and
``PageSet``: a stretch where CONTINUE page and zero records interleave (a guest whose
zero pages lie between its others, over one connection), as one record.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from fixedram.stream.format import MAPPED_RAM_VERSION, TARGET_PAGE_SIZE, Command

__all__ = [
    "Record",
    "FileHeader",
    "Configuration",
    "SectionStart",
    "SectionFull",
    "SectionPart",
    "SectionEnd",
    "SectionFooter",
    "CommandRecord",
    "Packaged",
    "MemSize",
    "MappedRamHeader",
    "RamBlock",
    "Page",
    "Zero",
    "PageRun",
    "ZeroRun",
    "ZeroPages",
    "PageSet",
    "MultifdFlush",
    "EndOfSection",
    "DeviceState",
    "EndOfFile",
    "VMDescription",
]


class Record:
    """Base class of every stream record. ``offset`` is where the record began, if known."""

    __slots__ = ()


@dataclass(slots=True)
class FileHeader(Record):
    """``QEVM`` magic and format version (always 3)."""

    version: int = 3


@dataclass(slots=True)
class Configuration(Record):
    """The configuration section: machine type and optional subsections."""

    machine: str
    capabilities: tuple[str, ...] | None = None
    page_bits: int | None = None
    uuid: bytes | None = None

    @property
    def mapped_ram(self) -> bool:
        """True when the stream declares the ``mapped-ram`` capability."""
        return self.capabilities is not None and "mapped-ram" in self.capabilities

    @property
    def ignore_shared(self) -> bool:
        """True when the stream declares ``x-ignore-shared``."""
        return self.capabilities is not None and "x-ignore-shared" in self.capabilities


@dataclass(slots=True)
class SectionStart(Record):
    """SECTION_START: first section of an iterable device (``ram``)."""

    section_id: int
    idstr: str
    instance_id: int = 0
    version_id: int = 4


@dataclass(slots=True)
class SectionFull(Record):
    """SECTION_FULL header (device state outside the opaque blob is not supported)."""

    section_id: int
    idstr: str
    instance_id: int = 0
    version_id: int = 1


@dataclass(slots=True)
class SectionPart(Record):
    """SECTION_PART: one iteration of an iterable device."""

    section_id: int


@dataclass(slots=True)
class SectionEnd(Record):
    """SECTION_END: the last part of an iterable device, sent with the VM stopped."""

    section_id: int


@dataclass(slots=True)
class SectionFooter(Record):
    """The footer (``0x7e be32 id``) after every section payload."""

    section_id: int


@dataclass(slots=True)
class CommandRecord(Record):
    """A COMMAND record other than PACKAGED (PING, OPEN_RETURN_PATH, SWITCHOVER_START...)."""

    cmd: int
    data: bytes = b""

    @property
    def name(self) -> str:
        """The command's name, or its number when unknown."""
        try:
            return Command(self.cmd).name
        except ValueError:
            return f"command {self.cmd}"


@dataclass(slots=True)
class Packaged(Record):
    """A PACKAGED command with the nested stream it wraps (postcopy device state)."""

    data: bytes


@dataclass(slots=True)
class MemSize(Record):
    """RAM_SAVE_FLAG_MEM_SIZE: total bytes of the RAM blocks whose records follow."""

    total: int


@dataclass(slots=True)
class MappedRamHeader:
    """The 28-byte per-block header of a mapped-ram file (offsets are absolute)."""

    version: int = MAPPED_RAM_VERSION
    page_size: int = TARGET_PAGE_SIZE
    bitmap_offset: int = 0
    pages_offset: int = 0


@dataclass(slots=True)
class RamBlock(Record):
    """One RAM block of the MEM_SIZE list: name and used length in bytes.

    ``page_size`` is present only for hugepage blocks under postcopy, ``guest_addr``
    only with ``x-ignore-shared``, ``mapped`` only in mapped-ram files.
    """

    name: str
    length: int
    page_size: int | None = None
    guest_addr: int | None = None
    mapped: MappedRamHeader | None = None


@dataclass(slots=True)
class Page(Record):
    """A page of data at byte ``offset`` of ``block``.

    ``pos`` is the absolute stream offset of the page data when decoded (-1 otherwise).
    """

    block: str
    offset: int
    data: bytes
    pos: int = -1


@dataclass(slots=True)
class Zero(Record):
    """A page filled with ``fill`` (always 0 from current QEMU)."""

    block: str
    offset: int
    fill: int = 0


@dataclass(slots=True)
class PageRun(Record):
    """Consecutive pages of ``block`` from byte ``offset``, as one record.

    ``data`` holds ``len(data) // page size`` whole pages (from a decoder, a view valid
    through its next ``feed``, reused by the one after); ``pos`` is the absolute stream
    offset of the first page's data. With ``stride`` (a decoder's ``views`` mode) the
    pages are not contiguous: page ``i`` is ``data[i * stride : i * stride + page size]``
    (the records as received, each page after its 8-byte header); ``pages``, when the
    decoder gives it, holds those pages as one view each (what a ``pwritev`` and the
    page digests take).
    """

    block: str
    offset: int
    data: memoryview
    pos: int = -1
    stride: int = 0
    pages: list[memoryview] | None = field(default=None, compare=False, repr=False)

    @property
    def npages(self) -> int:
        if self.stride:
            return (len(self.data) + self.stride - TARGET_PAGE_SIZE) // self.stride
        return len(self.data) // TARGET_PAGE_SIZE


@dataclass(slots=True)
class ZeroRun(Record):
    """``npages`` consecutive zero pages of ``block`` from byte ``offset``, as one record."""

    block: str
    offset: int
    npages: int


@dataclass(slots=True, eq=False)
class ZeroPages(Record):
    """Zero pages of ``block`` at the byte ``offsets`` (a numpy ``uint64`` array, in stream
    order; not all consecutive, else they would be a :class:`ZeroRun`; a page may come
    twice), as one record."""

    block: str
    offsets: Any

    @property
    def npages(self) -> int:
        return len(self.offsets)


@dataclass(slots=True, eq=False)
class PageSet(Record):
    """CONTINUE page records of ``block`` whose pages are scattered, or page and zero
    records in turn, as one record.

    ``offsets`` (numpy ``uint64``) holds every record's page offset in stream order, no
    page twice (so their order does not matter); ``zero`` (numpy ``bool``) marks the zero
    records; ``pages`` holds one view per page record's data, in order (a decoder's: valid
    through its next ``feed``), and ``pos`` (numpy ``int64``) the absolute stream offset of
    each one.
    """

    block: str
    offsets: Any
    zero: Any
    pages: list[memoryview]
    pos: Any

    @property
    def npages(self) -> int:
        return len(self.offsets)

    def numbers(self) -> tuple[Any, Any]:
        """Page numbers (numpy ``int64``) of the page records and of the zero records."""
        n = (self.offsets // TARGET_PAGE_SIZE).astype("int64")
        return n[~self.zero], n[self.zero]


@dataclass(slots=True)
class MultifdFlush(Record):
    """RAM_SAVE_FLAG_MULTIFD_FLUSH: every multifd channel reached a SYNC."""


@dataclass(slots=True)
class EndOfSection(Record):
    """RAM_SAVE_FLAG_EOS: the end of one ``ram`` section payload."""


@dataclass(slots=True)
class DeviceState(Record):
    """Non-RAM device state: every byte after the RAM END section up to EOF, opaque."""

    data: bytes


@dataclass(slots=True)
class EndOfFile(Record):
    """QEMU_VM_EOF."""


@dataclass(slots=True)
class VMDescription(Record):
    """The JSON device description that follows EOF in precopy."""

    data: bytes
    _parsed: Any = field(default=None, repr=False, compare=False)

    def json(self) -> Any:
        """The description parsed as JSON (cached)."""
        if self._parsed is None:
            self._parsed = json.loads(self.data) if self.data else {}
        return self._parsed
