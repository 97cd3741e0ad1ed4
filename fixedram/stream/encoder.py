"""Encoding of migration-stream records into bytes.

:func:`encode` turns one record into bytes. :class:`StreamEncoder` keeps the state a
stream needs across records (the block that CONTINUE refers to) and encodes runs
of pages as a list of buffers ready for ``os.writev``/``socket.sendmsg``, so page
data is never copied into an intermediate bytes object.

:class:`PageRecords` is the bulk form used by ``send``: one reusable buffer laid out as
``header|page|header|page…`` in which pages are read straight into their slots and
:meth:`StreamEncoder.page_records` writes all the headers of a piece with one numpy
assignment, so a piece of up to ``capacity`` pages goes out as one buffer with no
per-page Python. The bytes are the same as :meth:`StreamEncoder.page_run`'s.

Records that a file already holds exactly as they go on the wire (a legacy stream keeps a
run of pages as consecutive CONTINUE records) are described rather than copied, so the
endpoint can send them from the file without a buffer (the codec does no I/O):
:meth:`StreamEncoder.stored_page_records` gives the first record's header (which may have
to name the block) and a :class:`FileRange` for the rest. Same bytes again.
"""

from __future__ import annotations

from dataclasses import dataclass

from fixedram._lazy import numpy as np
from fixedram.stream.format import (
    BE16,
    BE32,
    BE64,
    CONFIG_CAPABILITIES,
    CONFIG_PAGE_BITS,
    CONFIG_UUID,
    FILE_MAGIC,
    MAPPED_RAM_HEADER,
    TARGET_PAGE_SIZE,
    Command,
    RamFlag,
    RecordType,
)
from fixedram.stream.records import (
    CommandRecord,
    Configuration,
    DeviceState,
    EndOfFile,
    EndOfSection,
    FileHeader,
    MemSize,
    MultifdFlush,
    Packaged,
    Page,
    RamBlock,
    Record,
    SectionEnd,
    SectionFooter,
    SectionFull,
    SectionPart,
    SectionStart,
    VMDescription,
    Zero,
)

__all__ = ["encode", "StreamEncoder", "PageRecords", "FileRange", "Segment", "counted"]

#: Bytes of a PAGE record with CONTINUE: the 8-byte header, then the page.
PAGE_RECORD = TARGET_PAGE_SIZE + 8
#: Room before record 0 for the block name a first record carries (counted: <= 256 bytes).
_NAME_ROOM = 256


def counted(s: str) -> bytes:
    """A one-byte-length-prefixed string."""
    b = s.encode("latin-1")
    if not 0 < len(b) < 256:
        raise ValueError(f"name of {len(b)} bytes cannot be encoded: {s!r}")
    return bytes((len(b),)) + b


def _subsection(name: str, body: bytes) -> bytes:
    return bytes((RecordType.SUBSECTION,)) + counted(name) + BE32.pack(1) + body


def _configuration(r: Configuration) -> bytes:
    name = r.machine.encode("latin-1")
    out = bytes((RecordType.CONFIGURATION,)) + BE32.pack(len(name)) + name
    if r.page_bits is not None:
        out += _subsection(CONFIG_PAGE_BITS, BE32.pack(r.page_bits))
    if r.capabilities:
        body = BE32.pack(len(r.capabilities)) + b"".join(counted(c) for c in r.capabilities)
        out += _subsection(CONFIG_CAPABILITIES, body)
    if r.uuid is not None:
        out += _subsection(CONFIG_UUID, r.uuid)
    return out


def _block(r: RamBlock) -> bytes:
    out = counted(r.name) + BE64.pack(r.length)
    if r.page_size is not None:
        out += BE64.pack(r.page_size)
    if r.guest_addr is not None:
        out += BE64.pack(r.guest_addr)
    if r.mapped is not None:
        m = r.mapped
        out += MAPPED_RAM_HEADER.pack(m.version, m.page_size, m.bitmap_offset, m.pages_offset)
    return out


def encode(r: Record, *, continued: bool = False) -> bytes:
    """Encode one record. ``continued`` sets CONTINUE on a page record (block name omitted)."""
    if isinstance(r, Page):
        if continued:
            return BE64.pack(r.offset | RamFlag.PAGE | RamFlag.CONTINUE) + r.data
        return BE64.pack(r.offset | RamFlag.PAGE) + counted(r.block) + r.data
    if isinstance(r, Zero):
        if continued:
            return BE64.pack(r.offset | RamFlag.ZERO | RamFlag.CONTINUE) + bytes((r.fill,))
        return BE64.pack(r.offset | RamFlag.ZERO) + counted(r.block) + bytes((r.fill,))
    if isinstance(r, FileHeader):
        return BE32.pack(FILE_MAGIC) + BE32.pack(r.version)
    if isinstance(r, Configuration):
        return _configuration(r)
    if isinstance(r, SectionStart | SectionFull):
        kind = (RecordType.SECTION_START if isinstance(r, SectionStart)
                else RecordType.SECTION_FULL)
        return (bytes((kind,)) + BE32.pack(r.section_id) + counted(r.idstr)
                + BE32.pack(r.instance_id) + BE32.pack(r.version_id))
    if isinstance(r, SectionPart):
        return bytes((RecordType.SECTION_PART,)) + BE32.pack(r.section_id)
    if isinstance(r, SectionEnd):
        return bytes((RecordType.SECTION_END,)) + BE32.pack(r.section_id)
    if isinstance(r, SectionFooter):
        return bytes((RecordType.SECTION_FOOTER,)) + BE32.pack(r.section_id)
    if isinstance(r, CommandRecord):
        return bytes((RecordType.COMMAND,)) + BE16.pack(r.cmd) + BE16.pack(len(r.data)) + r.data
    if isinstance(r, Packaged):
        return (bytes((RecordType.COMMAND,)) + BE16.pack(Command.PACKAGED) + BE16.pack(4)
                + BE32.pack(len(r.data)) + r.data)
    if isinstance(r, MemSize):
        return BE64.pack(r.total | RamFlag.MEM_SIZE)
    if isinstance(r, RamBlock):
        return _block(r)
    if isinstance(r, EndOfSection):
        return BE64.pack(RamFlag.EOS)
    if isinstance(r, MultifdFlush):
        return BE64.pack(RamFlag.MULTIFD_FLUSH)
    if isinstance(r, DeviceState):
        return r.data
    if isinstance(r, EndOfFile):
        return bytes((RecordType.EOF,))
    if isinstance(r, VMDescription):
        return bytes((RecordType.VMDESCRIPTION,)) + BE32.pack(len(r.data)) + r.data
    raise TypeError(f"cannot encode {type(r).__name__}")


#: A ZERO record in CONTINUE form: the big-endian word, then the fill byte (9 bytes, packed;
#: a numpy dtype's fields, made into one where used).
_ZERO_REC = [("word", ">u8"), ("fill", "u1")]
_ZERO_REC_SIZE = 9
_ZERO_CONT = int(RamFlag.ZERO | RamFlag.CONTINUE)
#: The flags of a PAGE record in CONTINUE form (the page's offset is or-ed in).
_PAGE_CONT = int(RamFlag.PAGE | RamFlag.CONTINUE)


@dataclass(frozen=True)
class FileRange:
    """``length`` bytes of the file being sent, from byte ``offset``, that go on the wire as
    they are."""

    offset: int
    length: int


#: What an encoder hands to a sender: bytes, or data it describes in the file being sent.
Segment = bytes | bytearray | memoryview | FileRange


class StreamEncoder:
    """Encodes a stream record by record, tracking the block CONTINUE refers to."""

    def __init__(self) -> None:
        self._last_block: str | None = None

    def encode(self, r: Record) -> bytes:
        """Encode ``r``; page and zero records use CONTINUE where they can."""
        if isinstance(r, Page | Zero):
            cont = r.block == self._last_block
            self._last_block = r.block
            return encode(r, continued=cont)
        return encode(r)

    def page_run(
        self, block: str, offset: int, data: memoryview | bytes
    ) -> list[bytes | memoryview]:
        """Buffers for PAGE records of consecutive pages starting at ``offset``.

        ``data`` holds whole pages; the result alternates record headers and
        page-sized views of ``data``, ready for a vectored write.
        """
        ps = TARGET_PAGE_SIZE
        mv = memoryview(data)
        n = len(mv) // ps
        out: list[bytes | memoryview] = []
        if not n:
            return out
        pack = BE64.pack
        flag = int(RamFlag.PAGE)
        cont = int(RamFlag.PAGE | RamFlag.CONTINUE)
        i = 0
        if block != self._last_block:
            out.append(pack(offset | flag) + counted(block))
            out.append(mv[:ps])
            self._last_block = block
            i = 1
        for k in range(i, n):
            out.append(pack((offset + k * ps) | cont))
            out.append(mv[k * ps : (k + 1) * ps])
        return out

    def page_records(self, block: str, offset: int, npages: int,
                     recs: PageRecords) -> memoryview:
        """PAGE records for ``npages`` pages from ``offset`` whose data is in ``recs``' slots.

        Writes the headers around the slots (one numpy assignment; the first record names
        its block when the block changes) and returns the records as one view of
        ``recs.buf``, valid until ``recs`` is reused. Same bytes as :meth:`page_run`.
        """
        if not 0 < npages <= recs.capacity:
            raise ValueError(f"{npages} pages do not fit a {recs.capacity}-page record buffer")
        _cont_headers(recs, 0, offset, npages)
        return self._framed(block, offset, npages, recs)

    def page_set_records(self, block: str, offsets: np.ndarray,
                         recs: PageRecords) -> memoryview:
        """PAGE records for pages of ``block`` at the byte ``offsets`` (``uint64``, not
        necessarily consecutive) whose data is in ``recs``' slots ``0…``: as
        :meth:`page_records` (one numpy assignment of the headers), for scattered pages."""
        n = len(offsets)
        if not 0 < n <= recs.capacity:
            raise ValueError(f"{n} pages do not fit a {recs.capacity}-page record buffer")
        recs.words[:n] = offsets | np.uint64(_PAGE_CONT)
        return self._framed(block, int(offsets[0]), n, recs)

    def _framed(self, block: str, offset: int, npages: int, recs: PageRecords) -> memoryview:
        """The ``npages`` records of ``recs`` whose headers are written, the first one naming
        its block (at ``offset``) when the block changes."""
        start = _NAME_ROOM
        if block != self._last_block:
            head = BE64.pack(offset | RamFlag.PAGE) + counted(block)
            start = _NAME_ROOM + 8 - len(head)
            recs.buf[start : _NAME_ROOM + 8] = head
            self._last_block = block
        return recs.view[start : _NAME_ROOM + npages * PAGE_RECORD]

    def page_records_at(self, block: str, offset: int, slot: int, npages: int,
                        recs: PageRecords) -> list[bytes | memoryview]:
        """PAGE records for ``npages`` pages from ``offset`` whose data is in ``recs``' slots
        ``slot…``: several runs of pages can share one buffer, each framed in place.

        As :meth:`page_records` (which this is for ``slot`` 0); past slot 0 a record that
        names its block has no room in the buffer, and goes out as :meth:`page_run` gives
        it. Views of ``recs.buf``, valid until ``recs`` is reused.
        """
        if slot == 0:
            return [self.page_records(block, offset, npages, recs)]
        if not 0 < npages <= recs.capacity - slot:
            raise ValueError(f"{npages} pages from slot {slot} do not fit a "
                             f"{recs.capacity}-page record buffer")
        out: list[bytes | memoryview] = []
        if block != self._last_block:
            at = recs.slot_offset + slot * PAGE_RECORD
            out += self.page_run(block, offset, recs.view[at : at + TARGET_PAGE_SIZE])
            slot, offset, npages = slot + 1, offset + TARGET_PAGE_SIZE, npages - 1
        if npages:
            _cont_headers(recs, slot, offset, npages)
            start = _NAME_ROOM + slot * PAGE_RECORD
            out.append(recs.view[start : start + npages * PAGE_RECORD])
        return out

    def _first_header(self, block: str, offset: int) -> bytes:
        """The header of a PAGE record of ``block`` at ``offset``: one naming the block when
        the block changes, else the CONTINUE form."""
        if block != self._last_block:
            self._last_block = block
            return BE64.pack(offset | RamFlag.PAGE) + counted(block)
        return BE64.pack(offset | _PAGE_CONT)

    def stored_page_records(self, block: str, offset: int, npages: int,
                            file_offset: int) -> list[Segment]:
        """PAGE records for ``npages`` pages of ``block`` from ``offset`` that a file holds
        as consecutive CONTINUE records (header, page, header, page... as on the wire; a
        legacy stream), the first page's data at ``file_offset``: the first record's header
        (made here: it may have to name the block), then the rest as a :class:`FileRange`
        of the file. Same bytes as :meth:`page_run` over the pages."""
        if npages <= 0:
            raise ValueError("no pages")
        head = self._first_header(block, offset)
        return [head, FileRange(file_offset, (npages - 1) * PAGE_RECORD + TARGET_PAGE_SIZE)]

    def zero_run(self, block: str, offset: int, npages: int) -> bytes:
        """ZERO records for ``npages`` consecutive pages starting at ``offset``."""
        first = offset // TARGET_PAGE_SIZE
        return self.zero_pages(block, np.arange(first, first + npages, dtype=np.uint64))

    def zero_pages(self, block: str, pages: np.ndarray) -> bytes:
        """ZERO records (fill 0) for the pages numbered ``pages`` of ``block``, in that order.

        One numpy step for all records; the first names the block unless it is the one
        CONTINUE refers to.
        """
        idx = np.asarray(pages, dtype=np.uint64)
        if not len(idx):
            return b""
        recs = np.zeros(len(idx), dtype=_ZERO_REC)
        recs["word"] = idx * np.uint64(TARGET_PAGE_SIZE) | np.uint64(_ZERO_CONT)
        out = recs.tobytes()
        if block != self._last_block:
            self._last_block = block
            word = int(idx[0]) * TARGET_PAGE_SIZE | int(RamFlag.ZERO)
            out = BE64.pack(word) + counted(block) + b"\x00" + out[_ZERO_REC_SIZE :]
        return out

    def forget_block(self) -> None:
        """Forget the CONTINUE block (the next page record names its block)."""
        self._last_block = None



def _cont_headers(recs: PageRecords, slot: int, offset: int, npages: int) -> None:
    """Write the CONTINUE headers of records ``slot…slot + npages`` of ``recs`` (pages from
    byte ``offset``), one numpy assignment."""
    tmp = recs.scratch[:npages]
    np.add(recs.steps[:npages], np.uint64(offset), out=tmp)
    tmp |= np.uint64(_PAGE_CONT)
    recs.words[slot : slot + npages] = tmp


class PageRecords:
    """A reusable buffer for up to ``capacity`` PAGE records laid out as on the wire.

    Record ``i`` (CONTINUE form) is ``buf[slot_offset - 8 + i * PAGE_RECORD :]``: an
    8-byte header, then the page at ``slot_offset + i * PAGE_RECORD`` (``stride`` =
    :data:`PAGE_RECORD`). Room before record 0 takes the longer header of a record that
    names its block. ``words`` is a strided big-endian u64 view of the headers.
    """

    def __init__(self, capacity: int) -> None:
        if capacity <= 0:
            raise ValueError("capacity must be positive")
        self.capacity = capacity
        self.stride = PAGE_RECORD
        self.slot_offset = _NAME_ROOM + 8
        self.buf = bytearray(_NAME_ROOM + capacity * PAGE_RECORD)
        self.view = memoryview(self.buf)
        self.words = np.ndarray((capacity,), dtype=">u8", buffer=self.buf, offset=_NAME_ROOM,
                                strides=(PAGE_RECORD,))
        self.steps = np.arange(capacity, dtype=np.uint64) * np.uint64(TARGET_PAGE_SIZE)
        self.scratch = np.empty(capacity, dtype=np.uint64)
