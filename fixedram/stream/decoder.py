"""Sans-I/O decoder of QEMU's precopy migration stream.

Bytes go in with :meth:`StreamDecoder.feed`, records come out; the decoder never
opens a file or a socket. It understands every record of the stream as QEMU 7.2
and 10.x write it, including mapped-ram files, and carries the non-RAM device
state as one opaque :class:`~fixedram.stream.records.DeviceState` blob.

Cost: every input byte is copied into the receive buffer once and out of it at
most once more (see :mod:`fixedram.stream.buffer`); a record that arrives split
across reads is retried only once enough bytes for it have arrived. Device state
is scanned once for the end-of-stream trailer, new bytes only.

With ``runs=True`` a stretch of CONTINUE page (or zero) records already in the
buffer is decoded in one vectorised step (numpy over the fixed-size records) into
:class:`~fixedram.stream.records.PageRun` / :class:`~fixedram.stream.records.ZeroRun`
records: one copy of the page bytes, no Python work per page. A stretch of zero records
whose pages are scattered (more than :data:`_SCATTERED_RUNS` runs: a source that finds zero
pages in its migration thread while the others go over multifd channels) becomes one
:class:`~fixedram.stream.records.ZeroPages` carrying their offsets as an array. With
``views``, a stretch of page records whose pages are scattered, or one where page and
zero records interleave (zero pages between the others, over one connection), becomes
one :class:`~fixedram.stream.records.PageSet`; in the second case its
headers are looked at one by one in a short loop (the records' sizes differ, so their
places cannot be computed ahead), without an object or a copy per record.

Mapped-ram files place each block's bitmap and pages between the block's header
and the next record. After such a header the decoder skips to
``pages_offset + length``; a caller that can seek reads :attr:`next_offset` and
feeds from there, a caller that cannot just keeps feeding.
"""

from __future__ import annotations

import json
from enum import Enum, auto
from itertools import pairwise

from fixedram._lazy import numpy as np
from fixedram.errors import StreamError, TruncatedStream, UnsupportedRecord
from fixedram.stream.buffer import NeedData, ReceiveBuffer
from fixedram.stream.format import (
    BE32,
    BE64,
    COMMAND_LENGTHS,
    CONFIG_CAPABILITIES,
    CONFIG_PAGE_BITS,
    CONFIG_UUID,
    FILE_MAGIC,
    FILE_VERSION,
    MAPPED_RAM_HEADER,
    MAPPED_RAM_VERSION,
    MAX_DEVICE_STATE,
    MAX_PACKAGED,
    MAX_RAM,
    MAX_VMDESC,
    RAM_SECTION,
    RAM_SECTION_VERSION,
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
    MappedRamHeader,
    MemSize,
    MultifdFlush,
    Packaged,
    Page,
    PageRun,
    PageSet,
    RamBlock,
    Record,
    SectionEnd,
    SectionFooter,
    SectionPart,
    SectionStart,
    VMDescription,
    Zero,
    ZeroPages,
    ZeroRun,
)

__all__ = ["StreamDecoder"]

_PAGE = int(RamFlag.PAGE)
_ZERO = int(RamFlag.ZERO)
_CONT = int(RamFlag.CONTINUE)
_EOS = int(RamFlag.EOS)
_MEMSIZE = int(RamFlag.MEM_SIZE)
_FLUSH = int(RamFlag.MULTIFD_FLUSH)
_UNSUPPORTED = {
    int(RamFlag.XBZRLE): "XBZRLE page",
    int(RamFlag.COMPRESS_PAGE): "compressed page",
    int(RamFlag.HOOK): "RDMA hook",
}
#: Records of one kind a stretch of the run mode looks at first (``StreamDecoder._bulk``).
_PROBE = 64
#: Fewest pages in one decoded stretch for which the page views of the whole arena are made
#: (and kept); fewer get views of their own pages (``StreamDecoder._page_slots``).
_SLOTS_MIN = 64
#: Most runs a stretch of zero (or, with ``views``, page) records is given as ``ZeroRun``
#: (``PageRun``) records; a stretch of more becomes one ``ZeroPages`` (``PageSet``).
_SCATTERED_RUNS = 4
#: Fewest records an interleaved stretch is given as a ``PageSet`` (fewer take the
#: per-record path), and most records one ``PageSet`` holds.
_MIXED_MIN = 8
_MIXED_MAX = 1 << 16


def _closes_section(dev: bytearray, end: int) -> bool:
    """Whether ``dev[:end]`` ends with the footer of a device section that it opened.

    Device sections are not parsed (their layout is the device's), so an EOF marker is
    recognised by what precedes it: ``7e <be32 id>``, where a section with that id starts
    (``04 <id>``, or ``03 <id>`` for the end of an iterable device) earlier in the bytes.
    A cut right after a footer whose id ends in a zero byte, behind a data byte 0x7e,
    matches the footer pattern alone; the id then names no section of the state.
    """
    if end < 6 or dev[end - 5] != RecordType.SECTION_FOOTER:
        return False
    sid = bytes(dev[end - 4 : end])
    last = end - 5
    return any(dev.rfind(bytes([t]) + sid, 0, last) >= 0
               for t in (RecordType.SECTION_FULL, RecordType.SECTION_END))


class _State(Enum):
    HEADER = auto()
    TOP = auto()
    RAM = auto()
    FOOTER = auto()
    DEVICE = auto()
    AFTER_EOF = auto()
    DONE = auto()


class StreamDecoder:
    """Turns a migration stream, fed in pieces of any size, into records.

    ``base_offset`` is the absolute offset of the first byte fed (the ``offset=``
    of a ``file:`` URI): error messages and mapped-ram offsets use it. ``runs``
    collapses stretches of CONTINUE page and zero records into ``PageRun`` and
    ``ZeroRun`` records, and scattered zero records into ``ZeroPages`` (the pages and
    their order are the same either way); a ``PageRun``'s data is a view of a buffer the
    decoder reuses two :meth:`feed` calls later, so it must be consumed (or copied)
    before then. ``views`` (implies ``runs``) makes that view one of the received records
    themselves (``PageRun.stride``): no copy of page data (see :meth:`recv_space`); it
    also gives scattered or interleaved page records as ``PageSet`` records, whose page
    views live as long.
    """

    def __init__(self, *, base_offset: int = 0, runs: bool = False,
                 views: bool = False) -> None:
        self._buf = ReceiveBuffer(base_offset)
        self._runs = runs or views
        self._views = views
        self._side: memoryview | None = None  # receive space outside the buffer
        self._scratch_bufs = [memoryview(b""), memoryview(b"")]
        self._scratch_idx = 0
        self._scratch_used = 0
        self._state = _State.HEADER
        self._need = 1  # bytes needed from the current record start before a retry
        self._skip_to: int | None = None
        self._page_size = TARGET_PAGE_SIZE
        self._page_mask = TARGET_PAGE_SIZE - 1
        self._ramp: np.ndarray | None = None  # 0, page size, 2 * page size, ... (uint64)
        # per arena: the arena, the phase of its records' pages, one view per page slot
        self._slots: list[tuple[bytearray, int, list[memoryview]]] = []
        self.configuration: Configuration | None = None
        self._ram_id: int | None = None
        self._section_id: int | None = None  # id of the section whose payload is open
        self._section_kind = ""
        self._last_block: str | None = None
        self._blocks: dict[str, RamBlock] = {}
        self._memsize_left = 0
        self._memsize_total = 0
        self._memsize_at = 0
        self._postcopy = False
        self._packaged = False
        self._device = bytearray()
        self._device_at = 0
        self._device_nul = -1
        self._device_scanned = 0
        self._eof_fed = False

    # -- public ----------------------------------------------------------------

    @property
    def next_offset(self) -> int:
        """Absolute offset of the next byte the decoder needs."""
        if self._state is _State.DEVICE:
            return self._device_at + len(self._device)
        if self._skip_to is not None:
            return self._skip_to
        return self._buf.offset + len(self._buf)

    @property
    def done(self) -> bool:
        """True once the stream is complete (EOF and any vmdesc seen)."""
        return self._state is _State.DONE

    @property
    def blocks(self) -> dict[str, RamBlock]:
        """RAM blocks declared by MEM_SIZE so far, by name."""
        return self._blocks

    @property
    def in_device_state(self) -> bool:
        """True while the decoder is collecting the opaque device-state blob."""
        return self._state is _State.DEVICE

    def feed(self, data: bytes | bytearray | memoryview) -> list[Record]:
        """Add received bytes; return every record they complete.

        The data of ``PageRun`` and ``PageSet`` records (``runs=True``) stays valid
        through the next call and is overwritten by the one after.
        """
        if not data:
            return []
        self._scratch_idx ^= 1
        self._scratch_used = 0
        if self._state is _State.DEVICE:
            self._device += data
            return self._device_scan()
        if self._state is _State.DONE:
            raise StreamError("data after the end of the migration stream", self.next_offset)
        if self._skip_to is not None:
            data = self._skip(data)
            if not data:
                return []
        self._buf.append(data)
        if len(self._buf) < self._need:
            return []
        return self._run()

    def recv_space(self, n: int) -> memoryview:
        """Where to receive the next bytes (at least ``n`` free); then :meth:`feed_received`.

        Bytes received here are decoded in place: with ``views``, the data of a
        ``PageRun`` is a view of the records as received (no copy), valid through the
        next feed and overwritten by the one after. Past the RAM section (device state)
        or while skipping mapped-ram pages, the space is a side buffer and the bytes are
        fed as by :meth:`feed`.
        """
        if self._state in (_State.DEVICE, _State.DONE) or self._skip_to is not None:
            if self._side is None or len(self._side) < n:
                self._side = memoryview(bytearray(n))
            return self._side
        self._side = None
        return self._buf.space(n)

    def feed_received(self, n: int) -> list[Record]:
        """``n`` bytes were received into :meth:`recv_space`; return the records they complete."""
        if self._side is not None:
            side, self._side = self._side, None
            return self.feed(side[:n])
        if not n:
            return []
        self._scratch_idx ^= 1
        self._scratch_used = 0
        self._buf.wrote(n)
        if len(self._buf) < self._need:
            return []
        return self._run()

    def feed_eof(self) -> list[Record]:
        """The input has ended: return the last records or raise if the stream is incomplete."""
        self._eof_fed = True
        out: list[Record] = []
        st = self._state
        if st is _State.DONE:
            return out
        if st is _State.DEVICE:
            return self._device_finish()
        if st is _State.AFTER_EOF and not len(self._buf):
            self._state = _State.DONE
            return out
        if st is _State.FOOTER and not len(self._buf):
            raise TruncatedStream("stream ended after a RAM section without its footer",
                                  self.next_offset)
        where = {
            _State.HEADER: "in the file header",
            _State.TOP: "between records",
            _State.RAM: "inside a RAM section",
            _State.FOOTER: "inside a section footer",
            _State.AFTER_EOF: "inside the VM description",
        }[st]
        if self._skip_to is not None:
            raise TruncatedStream(
                f"stream ended inside the pages of RAM block '{self._last_block}'",
                self.next_offset,
            )
        raise TruncatedStream(f"stream ended {where}", self._buf.offset)

    # -- driver ----------------------------------------------------------------

    def _run(self) -> list[Record]:
        out: list[Record] = []
        buf = self._buf
        while len(buf) and self._skip_to is None:
            st = self._state
            try:
                if st is _State.RAM:
                    self._parse_ram(out)
                elif st is _State.TOP:
                    self._parse_top(out)
                elif st is _State.FOOTER:
                    self._parse_footer(out)
                elif st is _State.HEADER:
                    self._parse_header(out)
                elif st is _State.AFTER_EOF:
                    self._parse_after_eof(out)
                elif st is _State.DEVICE:
                    rest = buf.view()[buf.mark() : buf.end]
                    buf.clear(buf.offset + len(rest))
                    self._device += rest
                    out += self._device_scan()
                    break
                else:  # DONE
                    raise StreamError("data after the end of the migration stream", buf.offset)
            except NeedData as nd:
                self._need = nd.need
                return out
            self._need = 1
        if self._skip_to is not None and len(buf):
            # everything buffered lies before the skip target (see _parse_block)
            buf.clear(buf.offset + len(buf))
        return out

    def _skip(self, data: bytes | bytearray | memoryview) -> bytes | bytearray | memoryview:
        """Drop fed bytes that lie before the pending mapped-ram skip target."""
        assert self._skip_to is not None
        here = self._buf.offset + len(self._buf)
        drop = self._skip_to - here
        if drop >= len(data):
            self._buf.clear(here + len(data))
            return b""
        self._buf.clear(self._skip_to)
        self._skip_to = None
        return memoryview(data)[drop:]

    def seek(self, offset: int) -> None:
        """Tell the decoder that the next bytes fed start at ``offset`` (a caller that seeks).

        Only valid to jump forward to :attr:`next_offset`'s pending skip target.
        """
        if self._skip_to is None or offset != self._skip_to:
            raise StreamError("seek to an offset the decoder did not ask for", offset)
        self._buf.clear(offset)
        self._skip_to = None

    # -- top level -------------------------------------------------------------

    def _parse_header(self, out: list[Record]) -> None:
        b = self._buf
        s = b.mark()
        magic = b.be32(s, s)
        if magic != FILE_MAGIC:
            raise StreamError(f"not a QEMU migration stream (magic 0x{magic:08x})", b.offset)
        version = b.be32(s, s + 4)
        if version != FILE_VERSION:
            raise StreamError(f"unsupported migration stream version {version}", b.offset + 4)
        b.commit(s + 8)
        self._state = _State.TOP
        out.append(FileHeader(version))

    def _parse_top(self, out: list[Record]) -> None:
        b = self._buf
        s = b.mark()
        at = b.offset
        kind = b.u8(s, s)
        if kind == RecordType.CONFIGURATION:
            self._parse_configuration(s, at, out)
        elif kind in (RecordType.SECTION_START, RecordType.SECTION_FULL):
            sid = b.be32(s, s + 1)
            n = b.u8(s, s + 5)
            idstr = b.take(s, s + 6, n).decode("latin-1")
            p = s + 6 + n
            instance = b.be32(s, p)
            version = b.be32(s, p + 4)
            if kind == RecordType.SECTION_FULL:
                raise UnsupportedRecord(
                    f"device section '{idstr}' before the RAM section completed "
                    "(early-setup device state is not supported)", at)
            if idstr != RAM_SECTION or instance != 0:
                raise UnsupportedRecord(f"iterable section '{idstr}' (only 'ram' is supported)",
                                        at)
            if version != RAM_SECTION_VERSION:
                raise StreamError(f"RAM section version {version} (expected 4)", at)
            if self._ram_id is not None:
                raise StreamError("a second RAM SECTION_START", at)
            b.commit(p + 8)
            self._ram_id = sid
            self._open_section(sid, "start")
            out.append(SectionStart(sid, idstr, instance, version))
        elif kind in (RecordType.SECTION_PART, RecordType.SECTION_END):
            sid = b.be32(s, s + 1)
            if self._ram_id is None or sid != self._ram_id:
                raise StreamError(f"section id {sid} is not an open iterable section", at)
            b.commit(s + 5)
            end = kind == RecordType.SECTION_END
            self._open_section(sid, "end" if end else "part")
            out.append(SectionEnd(sid) if end else SectionPart(sid))
        elif kind == RecordType.COMMAND:
            cmd = b.be16(s, s + 1)
            n = b.be16(s, s + 3)
            allowed = COMMAND_LENGTHS.get(cmd, ())
            if cmd not in COMMAND_LENGTHS:
                raise StreamError(f"unknown migration command {cmd}", at)
            if allowed is not None and n not in allowed:
                raise StreamError(f"command {Command(cmd).name} with length {n}", at)
            data = b.take(s, s + 5, n)
            p = s + 5 + n
            if cmd == Command.PACKAGED:
                size = BE32.unpack(data)[0]
                if size > MAX_PACKAGED:
                    raise StreamError(f"PACKAGED command of {size} bytes (limit {MAX_PACKAGED})",
                                      at)
                blob = b.take(s, p, size)
                b.commit(p + size)
                self._packaged = True
                out.append(Packaged(blob))
                return
            b.commit(p)
            if cmd == Command.POSTCOPY_ADVISE:
                self._postcopy = True
            out.append(CommandRecord(cmd, data))
        elif kind == RecordType.EOF:
            b.commit(s + 1)
            self._state = _State.AFTER_EOF
            out.append(EndOfFile())
        elif kind == RecordType.VMDESCRIPTION:
            raise StreamError("VM description before EOF", at)
        else:
            raise StreamError(f"unknown record type 0x{kind:02x}", at)

    def _parse_configuration(self, s: int, at: int, out: list[Record]) -> None:
        b = self._buf
        if self.configuration is not None:
            raise StreamError("a second configuration section", at)
        n = b.be32(s, s + 1)
        if n == 0 or n > 256:
            raise StreamError(f"machine type name of {n} bytes in the configuration section", at)
        machine = b.take(s, s + 5, n).decode("latin-1")
        p = s + 5 + n
        caps: tuple[str, ...] | None = None
        page_bits: int | None = None
        uuid: bytes | None = None
        while True:
            if b.peek_available(p) < 1:
                if self._eof_fed:
                    break
                raise NeedData(p + 1 - s)
            if b.u8(s, p) != RecordType.SUBSECTION:
                break
            ln = b.u8(s, p + 1)
            name = b.take(s, p + 2, ln).decode("latin-1")
            q = p + 2 + ln
            version = b.be32(s, q)
            q += 4
            if version != 1:
                raise StreamError(f"configuration subsection '{name}' version {version}",
                                  b.base + p)
            if name == CONFIG_CAPABILITIES:
                count = b.be32(s, q)
                if count > 64:
                    raise StreamError(f"configuration lists {count} capabilities", b.base + q)
                q += 4
                names = []
                for _ in range(count):
                    cl = b.u8(s, q)
                    names.append(b.take(s, q + 1, cl).decode("latin-1"))
                    q += 1 + cl
                caps = tuple(names)
            elif name == CONFIG_PAGE_BITS:
                page_bits = b.be32(s, q)
                q += 4
                if page_bits != 12:
                    raise UnsupportedRecord(f"target page bits {page_bits} (only 12 supported)",
                                            b.base + p)
            elif name == CONFIG_UUID:
                uuid = b.take(s, q, 16)
                q += 16
            else:
                raise UnsupportedRecord(f"configuration subsection '{name}'", b.base + p)
            p = q
        b.commit(p)
        cfg = Configuration(machine, caps, page_bits, uuid)
        self.configuration = cfg
        out.append(cfg)

    def _open_section(self, sid: int, kind: str) -> None:
        self._section_id = sid
        self._section_kind = kind
        self._state = _State.RAM

    def _parse_footer(self, out: list[Record]) -> None:
        b = self._buf
        s = b.mark()
        kind = b.u8(s, s)
        sid = self._section_id
        assert sid is not None
        if kind == RecordType.SECTION_FOOTER:
            got = b.be32(s, s + 1)
            if got != sid:
                raise StreamError(f"section footer for id {got}, expected {sid}", b.offset)
            b.commit(s + 5)
            out.append(SectionFooter(sid))
        ended = self._section_kind == "end"
        self._section_id = None
        if ended and not self._packaged:
            self._state = _State.DEVICE
            self._device_at = b.offset
        else:
            self._state = _State.TOP

    def _parse_after_eof(self, out: list[Record]) -> None:
        b = self._buf
        s = b.mark()
        kind = b.u8(s, s)
        if kind != RecordType.VMDESCRIPTION:
            raise StreamError(f"record type 0x{kind:02x} after EOF", b.offset)
        n = b.be32(s, s + 1)
        if n > MAX_VMDESC:
            raise StreamError(f"VM description of {n} bytes (limit {MAX_VMDESC})", b.offset)
        data = b.take(s, s + 5, n)
        at = b.offset
        b.commit(s + 5 + n)
        if n:
            try:
                json.loads(data)
            except ValueError as e:
                raise StreamError(f"VM description is not JSON ({e.args[0]})", at) from None
        self._state = _State.DONE
        out.append(VMDescription(data))

    # -- the ram section -------------------------------------------------------

    def _parse_ram(self, out: list[Record]) -> None:
        b = self._buf
        buf = b.view()
        bend = b.end
        mask = self._page_mask
        psize = self._page_size
        blocks = self._blocks
        unpack = _BE64_FROM
        while True:
            s = b.mark()
            if self._memsize_left:
                self._parse_block(s, out)
                if self._skip_to is not None:
                    return
                continue
            avail = bend - s
            if avail < 8:
                raise NeedData(8)
            word = unpack(buf, s)[0]
            flags = word & mask
            offset = word - flags
            base = flags & ~_CONT
            if self._section_kind == "start" and self._memsize_total and word not in (
                    _EOS, _FLUSH):
                # QEMU's setup section holds only MEM_SIZE, the block list, [flush], EOS:
                # anything else means the list ended before the bytes that follow it
                raise StreamError(
                    f"MEM_SIZE total 0x{self._memsize_total:x} does not match the RAM block "
                    f"list (RAM record 0x{word:x} follows the last block)", self._memsize_at)
            if base in (_PAGE, _ZERO):
                if flags & _CONT:
                    name = self._last_block
                    if name is None:
                        raise StreamError("CONTINUE page record with no previous block",
                                          b.base + s)
                    stride = 8 + psize if base == _PAGE else 9
                    # a stretch only where the next record is of the same kind: a lone
                    # record between others costs less on the per-record path
                    if self._runs and avail >= 2 * stride:
                        follow = unpack(buf, s + stride)[0] & mask
                        end = 0
                        if follow == flags:
                            end = self._bulk(s, name, base == _PAGE, out)
                        elif self._views and follow == (flags ^ (_PAGE | _ZERO)):
                            end = self._mixed(s, name, out)
                        if end:
                            b.commit(end)
                            continue
                    p = s + 8
                else:
                    if avail < 9:
                        raise NeedData(9)
                    n = buf[s + 8]
                    p = s + 9 + n
                    if p > bend:
                        raise NeedData(p - s)
                    name = buf[s + 9 : p].decode("latin-1")
                    if name != self._last_block:
                        if name not in blocks:
                            raise StreamError(f"page record for unknown RAM block '{name}'",
                                              b.base + s)
                        self._last_block = name
                blk = blocks[name]
                if offset >= blk.length:
                    raise StreamError(
                        f"page offset 0x{offset:x} outside RAM block '{name}' "
                        f"(length 0x{blk.length:x})", b.base + s)
                if base == _PAGE:
                    end = p + psize
                    if end > bend:
                        raise NeedData(end - s)
                    out.append(Page(name, offset, bytes(buf[p:end]), b.base + p))
                    b.commit(end)
                else:
                    if p >= bend:
                        raise NeedData(p + 1 - s)
                    out.append(Zero(name, offset, buf[p]))
                    b.commit(p + 1)
            elif flags == _EOS:
                b.commit(s + 8)
                out.append(EndOfSection())
                self._state = _State.FOOTER
                return
            elif flags == _FLUSH:
                b.commit(s + 8)
                out.append(MultifdFlush())
            elif flags == _MEMSIZE:
                if self._section_kind != "start":
                    raise StreamError("MEM_SIZE outside the RAM setup section", b.base + s)
                if offset == 0:
                    raise StreamError("MEM_SIZE with a total of 0 bytes", b.base + s)
                if offset > MAX_RAM:
                    raise StreamError(f"MEM_SIZE claims 0x{offset:x} bytes of RAM (limit "
                                      f"0x{MAX_RAM:x})", b.base + s)
                b.commit(s + 8)
                self._memsize_left = offset
                self._memsize_total = offset
                self._memsize_at = b.base + s
                out.append(MemSize(offset))
            else:
                for bit, what in _UNSUPPORTED.items():
                    if flags & bit:
                        raise UnsupportedRecord(f"{what} record (RAM flags 0x{flags:x})",
                                                b.base + s)
                raise StreamError(f"unknown RAM record flags 0x{flags:x}", b.base + s)

    def _bulk(self, s: int, name: str, pages: bool, out: list[Record]) -> int:
        """Decode the CONTINUE page (``pages``) or zero records of ``name`` from index ``s``.

        Takes every whole record of that kind in the buffer, up to the first record of
        another kind, a bad offset or a non-zero fill byte (those go through the
        per-record path, which reports them). Returns the index after the last record
        taken, or 0 when none was.

        The first :data:`_PROBE` records are looked at before the rest of the buffer: a
        buffer of 1 MiB holds over 100,000 zero records' worth of bytes, and a short
        stretch between records of other kinds must not cost a look at all of them.
        """
        stride = 8 + self._page_size if pages else 9
        total = (self._buf.end - s) // stride
        end = self._stretch(s, name, pages, min(total, _PROBE), out)
        if total > _PROBE and end == s + _PROBE * stride:
            end = self._stretch(end, name, pages, total - _PROBE, out) or end
        return end

    def _stretch(self, s: int, name: str, pages: bool, k: int, out: list[Record]) -> int:
        """:meth:`_bulk` over at most the ``k`` records from index ``s``."""
        buf = self._buf.view()
        psize = self._page_size
        stride = 8 + psize if pages else 9
        want = (_PAGE if pages else _ZERO) | _CONT
        raw = np.ndarray((k,), dtype=">u8", buffer=buf, offset=s, strides=(stride,))
        words = raw.astype(np.uint64)
        del raw
        length = self._blocks[name].length
        fill = None if pages else np.ndarray((k,), dtype=np.uint8, buffer=buf, offset=s + 8,
                                             strides=(stride,))
        # the usual case, in a few array operations: all k records are of this kind, their
        # pages consecutive (one run) up to one inside the block, zero fill bytes
        w0 = int(words[0])
        first = w0 - want
        if (w0 & self._page_mask) == want and first + (k - 1) * psize < length:
            ramp = self._ramp
            if ramp is None or len(ramp) < k:
                ramp = self._ramp = np.arange(0, 2 * k * psize, psize, dtype=np.uint64)
            words -= ramp[:k]
            if (words == np.uint64(w0)).all() and (fill is None or not fill.any()):
                self._emit(s, name, pages, [(0, k, first)], out)
                return s + k * stride
            words += ramp[:k]
        ok = (words & np.uint64(self._page_mask)) == want
        offsets = words - np.uint64(want)
        ok &= offsets < np.uint64(length)
        if fill is not None:
            ok &= fill == 0
        del fill
        n = k if ok.all() else int(ok.argmin())
        if not n:
            return 0
        offsets = offsets[:n]
        breaks = np.flatnonzero(np.diff(offsets) != psize) + 1
        if len(breaks) >= _SCATTERED_RUNS and not pages:
            out.append(ZeroPages(name, offsets))  # scattered zero pages: one record
            return s + n * stride
        if (len(breaks) >= _SCATTERED_RUNS and self._views
                and (offsets[breaks] > offsets[breaks - 1]).all()):  # scattered, each once
            at = s + 8
            if n >= _SLOTS_MIN:
                j = at // stride
                views = self._page_slots(buf, at % stride, stride)[j : j + n]
            else:
                mv = memoryview(buf)
                views = [mv[p : p + psize] for p in range(at, at + n * stride, stride)]
            pos = np.arange(n, dtype=np.int64) * stride + (self._buf.base + at)
            out.append(PageSet(name, offsets, np.zeros(n, dtype=bool), views, pos))
            return s + n * stride
        cuts = [0, *breaks.tolist(), n]
        self._emit(s, name, pages, [(a, z, int(offsets[a])) for a, z in pairwise(cuts)], out)
        return s + n * stride

    def _mixed(self, s: int, name: str, out: list[Record]) -> int:
        """Decode the interleaved CONTINUE page and zero records of ``name`` from index ``s``
        into one :class:`PageSet`. A record of another kind, a bad offset or fill byte, an
        incomplete record or a page given twice ends the stretch (the per-record path then
        reports what it must). Returns the index after the last record taken, or 0 when
        fewer than :data:`_MIXED_MIN` were."""
        buf = self._buf.view()
        end = self._buf.end
        psize = self._page_size
        mask = self._page_mask
        page, zero = _PAGE | _CONT, _ZERO | _CONT
        length = self._blocks[name].length
        unpack = _BE64_FROM
        words: list[int] = []
        starts: list[int] = []
        seen: set[int] = set()
        p = s
        while p + 8 <= end and len(words) < _MIXED_MAX:
            w = unpack(buf, p)[0]
            f = w & mask
            if f == page:
                q = p + 8 + psize
            elif f == zero:
                q = p + 9
                if q <= end and buf[p + 8]:
                    break
            else:
                break
            if q > end or w - f >= length or w - f in seen:  # a page twice: its order counts
                break
            seen.add(w - f)
            words.append(w)
            starts.append(p)
            p = q
        n = len(words)
        if n < _MIXED_MIN:
            return 0
        w = np.array(words, dtype=np.uint64)
        offsets = w & np.uint64(~mask & (2**64 - 1))
        is_zero = (w & np.uint64(mask)) == np.uint64(zero)
        at = np.array(starts[:n], dtype=np.int64)[~is_zero] + 8
        mv = memoryview(buf)
        views = [mv[q : q + psize] for q in at.tolist()]
        out.append(PageSet(name, offsets, is_zero, views, at + self._buf.base))
        last = starts[n - 1]
        return last + (9 if is_zero[-1] else 8 + psize)

    def _emit(self, s: int, name: str, pages: bool, runs: list[tuple[int, int, int]],
              out: list[Record]) -> None:
        """The ``PageRun`` (``pages``) or ``ZeroRun`` records of the records from index
        ``s``: one per ``(first record, end record, page offset)`` of ``runs``."""
        buf = self._buf.view()
        psize = self._page_size
        stride = 8 + psize if pages else 9
        base = self._buf.base + s
        if pages and self._views:
            mv = memoryview(buf)
            at = s + 8
            if runs[-1][1] >= _SLOTS_MIN:
                slots = self._page_slots(buf, at % stride, stride)
                j = at // stride
                views = [slots[j + a : j + z] for a, z, _ in runs]
            else:  # a few pages between other records: views of these pages only
                views = [[mv[p : p + psize] for p in range(at + a * stride, at + z * stride,
                                                           stride)] for a, z, _ in runs]
            for (a, z, off), v in zip(runs, views, strict=True):
                out.append(PageRun(name, off, mv[at + a * stride : at + (z - 1) * stride
                                                  + psize], base + a * stride + 8, stride, v))
        elif pages:
            n = runs[-1][1]
            src = np.ndarray((n, psize), dtype=np.uint8, buffer=buf, offset=s + 8,
                             strides=(stride, 1))
            data = self._scratch(n * psize)
            np.copyto(np.frombuffer(data, dtype=np.uint8).reshape(n, psize), src)
            del src
            for a, z, off in runs:
                out.append(PageRun(name, off, data[a * psize : z * psize], base + a * stride + 8))
        else:
            for a, z, off in runs:
                out.append(ZeroRun(name, off, z - a))

    def _page_slots(self, buf: bytearray, phase: int, stride: int) -> list[memoryview]:
        """One view per page-sized slot of arena ``buf`` at ``phase + j * stride``.

        Within a run of page records every page of an arena lies at one phase (an arena
        begins with the record the last one left unfinished), so the views are made once
        per arena and phase and reused by every feed, instead of once per page and feed.
        Any other record between pages moves the phase, and a new phase costs a view per
        slot of the arena: :meth:`_emit` asks for them only for stretches of at least
        :data:`_SLOTS_MIN` pages, so that pages mixed with zero records cost a view each,
        never an arena's worth.
        """
        for i, (b, ph, views) in enumerate(self._slots):
            if b is buf:
                if ph == phase:
                    return views
                del self._slots[i]
                break
        mv = memoryview(buf)
        psize = self._page_size
        views = [mv[p : p + psize] for p in range(phase, len(buf) - psize + 1, stride)]
        self._slots = [*self._slots[-1:], (buf, phase, views)]
        return views

    def _scratch(self, n: int) -> memoryview:
        """``n`` bytes of run buffer, after those already handed out in this feed.

        Two buffers alternate, one per :meth:`feed`: ``PageRun`` data stays valid through
        the next feed (so a consumer may write one feed's runs while the next is decoded)
        and is overwritten by the one after. A buffer grows (a new one) when one feed
        needs more; each is at most twice the page data of one feed.
        """
        at = self._scratch_used
        i = self._scratch_idx
        if at + n > len(self._scratch_bufs[i]):
            self._scratch_bufs[i] = memoryview(bytearray(max(2 * (at + n), 1 << 20)))
            at = 0
        self._scratch_used = at + n
        return self._scratch_bufs[i][at : at + n]

    def _parse_block(self, s: int, out: list[Record]) -> None:
        b = self._buf
        at = b.base + s
        n = b.u8(s, s)
        if n == 0:
            word = b.be64(s, s)
            if word in (_EOS, _FLUSH):
                # the block list ended (EOS/flush follows) before the total was reached
                raise StreamError(
                    f"MEM_SIZE total 0x{self._memsize_total:x} does not match the RAM block "
                    f"list (it ends 0x{self._memsize_left:x} bytes short)", self._memsize_at)
            raise StreamError("RAM block with an empty name in MEM_SIZE", at)
        name = b.take(s, s + 1, n).decode("latin-1")
        p = s + 1 + n
        length = b.be64(s, p)
        p += 8
        if length == 0 or length % self._page_size:
            raise StreamError(f"RAM block '{name}' has length 0x{length:x}", at)
        if length > self._memsize_left:
            raise StreamError(
                f"MEM_SIZE total 0x{self._memsize_total:x} does not match the RAM block list "
                f"(block '{name}' of 0x{length:x} bytes exceeds the 0x{self._memsize_left:x} "
                "left)", self._memsize_at)
        if name in self._blocks:
            raise StreamError(f"RAM block '{name}' listed twice", at)
        cfg = self.configuration
        page_size = None
        guest_addr = None
        mapped = None
        # A page_size field follows only for hugepage blocks under postcopy; x86
        # guests with 4 KiB pages never carry it, so it is not expected here.
        if cfg is not None and cfg.ignore_shared:
            guest_addr = b.be64(s, p)
            p += 8
        if cfg is not None and cfg.mapped_ram:
            b.need(s, p, MAPPED_RAM_HEADER.size)
            version, psize, bitmap_off, pages_off = MAPPED_RAM_HEADER.unpack_from(b.view(), p)
            hdr_at = b.base + p
            p += MAPPED_RAM_HEADER.size
            if version != MAPPED_RAM_VERSION:
                raise StreamError(f"RAM block '{name}': mapped-ram header version {version}",
                                  hdr_at)
            if psize != self._page_size:
                raise StreamError(f"RAM block '{name}': page size {psize} (expected "
                                  f"{self._page_size})", hdr_at)
            end = b.base + p
            if bitmap_off < end:
                raise StreamError(f"RAM block '{name}': bitmap offset 0x{bitmap_off:x} "
                                  "overlaps the block header", hdr_at)
            if pages_off % self._page_size:
                raise StreamError(f"RAM block '{name}': pages offset 0x{pages_off:x} is not "
                                  "page-aligned", hdr_at)
            nbits = length // self._page_size
            if pages_off < bitmap_off + (nbits + 63) // 64 * 8:
                raise StreamError(f"RAM block '{name}': pages offset 0x{pages_off:x} overlaps "
                                  "its bitmap", hdr_at)
            mapped = MappedRamHeader(version, psize, bitmap_off, pages_off)
        b.commit(p)
        blk = RamBlock(name, length, page_size, guest_addr, mapped)
        self._blocks[name] = blk
        self._memsize_left -= length
        out.append(blk)
        if mapped is not None:
            self._skip_to = mapped.pages_offset + length
            rest = len(b)
            here = b.offset
            if here + rest >= self._skip_to:
                b.commit(b.mark() + (self._skip_to - here))
                self._skip_to = None

    # -- device state ----------------------------------------------------------

    def _device_scan(self) -> list[Record]:
        """Look for the ``00 06 len json`` trailer at the end of the device bytes."""
        dev = self._device
        if len(dev) > MAX_DEVICE_STATE + MAX_VMDESC:
            raise StreamError(f"device state larger than {MAX_DEVICE_STATE} bytes",
                              self._device_at)
        nul = dev.rfind(0, self._device_scanned)
        if nul >= 0:
            self._device_nul = nul
        self._device_scanned = len(dev)
        if not dev or dev[-1] != 0x7D or self._device_nul < 0:
            return []
        last = self._device_nul
        for p in range(max(0, last - 5), last + 1):
            if dev[p] != 0 or p + 6 > len(dev) or dev[p + 1] != RecordType.VMDESCRIPTION:
                continue
            n = BE32.unpack_from(dev, p + 2)[0]
            if n != len(dev) - p - 6 or n == 0:
                continue
            if p and (p < 5 or dev[p - 5] != RecordType.SECTION_FOOTER):
                continue
            try:
                parsed = json.loads(dev[p + 6 :])
            except ValueError:
                continue
            if not isinstance(parsed, dict):
                continue
            vmd = VMDescription(bytes(dev[p + 6 :]))
            vmd._parsed = parsed
            return self._device_done(p, vmd)
        return []

    def _device_done(self, p: int, vmd: VMDescription | None) -> list[Record]:
        blob = bytes(self._device[:p])
        end = self._device_at + len(self._device)
        self._device = bytearray()
        self._buf.clear(end)
        self._state = _State.DONE
        out: list[Record] = [DeviceState(blob), EndOfFile()]
        if vmd is not None:
            out.append(vmd)
        return out

    def _device_finish(self) -> list[Record]:
        dev = self._device
        if len(dev) >= 6 and dev[-6:] == b"\x00\x06\x00\x00\x00\x00":
            return self._device_done(len(dev) - 6, VMDescription(b""))
        eof = len(dev) - 1
        if dev and dev[-1] == RecordType.EOF and (eof == 0 or _closes_section(dev, eof)):
            return self._device_done(len(dev) - 1, None)
        bad = self._bad_vmdesc()
        if bad is not None:
            raise bad
        if dev and dev[-1] == 0x7D:
            raise StreamError("stream ends in a VM description whose length does not match",
                              self._device_at)
        raise TruncatedStream("stream ended inside the device state (no EOF marker)",
                              self._device_at + len(dev))

    def _bad_vmdesc(self) -> StreamError | None:
        """The error for a ``7e sid 00 06 len`` trailer that is cut short or is not JSON.

        Looks for the last EOF + VMDESCRIPTION header that follows a section footer and
        whose length reaches at least to the end of the input. None if there is none or
        it is fine.
        """
        dev = self._device
        p = len(dev)
        while p > 0:
            p = dev.rfind(b"\x00\x06", 0, p)
            if p < 0 or p + 6 > len(dev):
                continue
            if p and (p < 5 or dev[p - 5] != RecordType.SECTION_FOOTER):
                continue
            n = BE32.unpack_from(dev, p + 2)[0]
            have = len(dev) - p - 6
            at = self._device_at + p + 1
            if n > have and n <= MAX_VMDESC:
                return TruncatedStream(f"stream ended inside the VM description ({have} of "
                                       f"{n} bytes)", at)
            if n != have:
                continue
            try:
                parsed = json.loads(bytes(dev[p + 6 :]))
            except ValueError as e:
                return StreamError(f"VM description is not valid JSON ({e.args[0]})", at)
            if not isinstance(parsed, dict):
                return StreamError("VM description is not a JSON object", at)
            return None
        return None


_BE64_FROM = BE64.unpack_from
