"""Sans-I/O codec of QEMU's multifd channels (nocomp), as QEMU 7.2 and 10.0 write them.

A multifd migration opens one main connection (the ordinary stream, starting with
``QEVM``) plus N multifd connections, in no guaranteed order; :func:`classify` tells
them apart by their first four bytes. Each multifd connection carries one 64-byte
init packet, then packets of a fixed 1344-byte header (flags, page counts, the
RAM block name and up to 128 page offsets) followed by ``normal_pages`` x 4 KiB of
page data. See ``docs/multifd.md`` §1-§3.

:class:`MultifdChannelDecoder` decodes one connection. It can be driven two ways:

* :meth:`~MultifdChannelDecoder.feed` with chunks of any size (h11 style), or
* zero-copy, like :class:`asyncio.BufferedProtocol`: :meth:`~MultifdChannelDecoder.get_buffer`
  returns exactly the region the next bytes belong in (``recv_into`` it) and
  :meth:`~MultifdChannelDecoder.buffer_updated` says how many arrived. Page data
  lands directly in the packet's payload buffer (from ``alloc``), so a packet's
  512 KiB are never copied by the decoder, and never read past its end.

Everything read from the wire is checked before it is used; errors are
:class:`~fixedram.errors.StreamError` (or :class:`~fixedram.errors.UnsupportedRecord`
for compressed and device-state packets) carrying the byte offset in the channel.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

from fixedram._lazy import numpy as np
from fixedram.errors import StreamError, TruncatedStream, UnsupportedRecord
from fixedram.stream.format import (
    BE32,
    FILE_MAGIC,
    MULTIFD_INIT,
    MULTIFD_MAGIC,
    MULTIFD_PACKET_FIELDS,
    MULTIFD_PACKET_HEADER,
    MULTIFD_PACKET_PREFIX,
    MULTIFD_PACKET_REST,
    MULTIFD_PAGES_PER_PACKET,
    MULTIFD_VERSION,
    TARGET_PAGE_SIZE,
    MultifdFlag,
)

__all__ = [
    "MULTIFD_PACKET_SIZE",
    "MultifdChannelDecoder",
    "MultifdEvent",
    "MultifdInit",
    "MultifdPacket",
    "classify",
    "encode_init",
    "encode_packet",
    "packet_header_into",
]

#: Size of every packet header on the wire: fixed part plus 128 offsets (1344 bytes).
MULTIFD_PACKET_SIZE = MULTIFD_PACKET_HEADER.size + 8 * MULTIFD_PAGES_PER_PACKET
_NUMPY_TYPES = {"I": ">u4", "Q": ">u8"}  # struct codes of the header; "28x", "256s": raw bytes
#: The same header as a numpy record (for :meth:`MultifdChannelDecoder.feed_batch`).
_HEADER_DTYPE = np.dtype([(name, _NUMPY_TYPES.get(code) or f"V{code[:-1]}")
                          for name, code in MULTIFD_PACKET_FIELDS]
                         + [("offs", ">u8", (MULTIFD_PAGES_PER_PACKET,))])
assert _HEADER_DTYPE.itemsize == MULTIFD_PACKET_SIZE

_PREFIX = MULTIFD_PACKET_PREFIX  # magic, version, flags: common to every packet kind
_REST = MULTIFD_PACKET_REST  # the rest of the fixed RAM packet header
_BLOCK_NAME = 256
_PAGE_MASK = TARGET_PAGE_SIZE - 1
_SYNC = int(MultifdFlag.SYNC)
_COMPRESSION = int(MultifdFlag.COMPRESSION_MASK)
_DEVICE_STATE = int(MultifdFlag.DEVICE_STATE)
_KNOWN_FLAGS = _SYNC | _COMPRESSION | _DEVICE_STATE
_COMPRESSION_NAMES = {0x02: "zlib", 0x04: "zstd", 0x08: "qpl", 0x10: "uadk", 0x20: "qatzip"}

Buffer = bytes | bytearray | memoryview


@dataclass(frozen=True, slots=True)
class MultifdInit:
    """The init packet that opens a multifd channel: source UUID and channel number."""

    uuid: bytes
    channel_id: int


@dataclass(slots=True)
class MultifdPacket:
    """One RAM packet of a multifd channel.

    ``normal_offsets`` are byte offsets in ``block`` of the pages whose data is
    ``data`` (4 KiB each, in that order); ``zero_offsets`` are pages that are all
    zero (QEMU 10 only). ``sync`` is the SYNC flag: this packet closes an epoch.
    ``offset`` is where the packet starts in the channel's byte stream.
    """

    flags: int
    packet_num: int
    block: str
    normal_offsets: tuple[int, ...]
    zero_offsets: tuple[int, ...]
    data: memoryview | bytes
    sync: bool
    offset: int = -1
    #: the offsets as one array (normal, then zero), from a decoder
    offsets: np.ndarray | None = field(default=None, compare=False, repr=False)
    #: packets this event stands for (> 1: consecutive page-less packets listing only zero
    #: pages, merged by :meth:`MultifdChannelDecoder.feed_batch`; their zero pages are in
    #: ``offsets`` only, ``zero_offsets`` is empty, the flags are the last packet's)
    packets: int = 1

    @property
    def pages(self) -> int:
        """Normal plus zero pages."""
        if self.offsets is not None:
            return len(self.offsets)
        return len(self.normal_offsets) + len(self.zero_offsets)


MultifdEvent = MultifdInit | MultifdPacket


def classify(first4: bytes | bytearray | memoryview) -> Literal["main", "multifd"]:
    """Which kind of connection starts with these 4 bytes: ``QEVM`` or the multifd magic."""
    if len(first4) != 4:
        raise StreamError(f"classify needs the first 4 bytes of a connection, got {len(first4)}",
                          0)
    magic = BE32.unpack(first4)[0]
    if magic == FILE_MAGIC:
        return "main"
    if magic == MULTIFD_MAGIC:
        return "multifd"
    raise StreamError(f"connection starts with 0x{magic:08x}, neither a migration stream "
                      "nor a multifd channel", 0)


def _default_alloc(n: int) -> memoryview:
    return memoryview(bytearray(n))


# decoder states: how many bytes the current step wants, and what they are
_INIT, _PREFIX_ST, _HEADER, _DATA = range(4)


class MultifdChannelDecoder:
    """Decodes the bytes of one multifd connection into :class:`MultifdInit` then packets.

    ``alloc(n)`` returns a writable buffer of at least ``n`` bytes for a packet's
    page data; the packet's ``data`` is a view of its first ``n`` bytes. The default
    allocates a fresh ``bytearray`` per packet; a caller that finishes with each
    packet before decoding the next may hand out the same (e.g. page-aligned)
    buffer every time, so memory stays at one packet per channel.
    ``base_offset`` is the stream offset of the first byte (4 if the caller
    consumed the magic to classify the connection and does not feed it).
    """

    def __init__(self, *, alloc: Callable[[int], memoryview] | None = None,
                 base_offset: int = 0) -> None:
        self._alloc = alloc or _default_alloc
        self._hdr = bytearray(MULTIFD_PACKET_SIZE)
        self._hdr_view = memoryview(self._hdr)
        self._state = _INIT
        self._want = MULTIFD_INIT.size  # bytes of the current step
        self._have = 0
        self._at = base_offset  # stream offset where the current record began
        self._pos = base_offset  # stream offset of the next byte
        self._flags = 0
        self._payload: memoryview | None = None
        self._pending: MultifdPacket | None = None
        self._eof = False
        #: The init packet, once decoded.
        self.init: MultifdInit | None = None
        #: Packets decoded so far, and how many of them carried SYNC.
        self.packets = 0
        self.syncs = 0
        #: Bytes of page data decoded so far.
        self.data_bytes = 0

    # -- public ------------------------------------------------------------------

    @property
    def offset(self) -> int:
        """Stream offset of the next byte the decoder expects."""
        return self._pos

    @property
    def at_boundary(self) -> bool:
        """True between packets (a clean place for the connection to end)."""
        return self._state == _PREFIX_ST and self._have == 0

    def get_buffer(self) -> memoryview:
        """The writable region the next received bytes go into (never past the current step)."""
        if self._eof:
            raise StreamError("multifd channel fed after its end", self._pos)
        if self._state == _DATA:
            assert self._payload is not None
            return self._payload[self._have : self._want]
        return self._hdr_view[self._have : self._want]

    def buffer_updated(self, n: int) -> MultifdEvent | None:
        """``n`` bytes were written at the start of :meth:`get_buffer`; return a completed event."""
        if n < 0 or self._have + n > self._want:
            raise ValueError(f"buffer_updated({n}) beyond the buffer handed out")
        self._have += n
        self._pos += n
        if self._have < self._want:
            return None
        return self._step()

    def feed(self, data: Buffer) -> list[MultifdEvent]:
        """Add received bytes (any chunking); return every event they complete."""
        src = memoryview(data).cast("B")
        out: list[MultifdEvent] = []
        i = 0
        while i < len(src):
            dst = self.get_buffer()
            n = min(len(dst), len(src) - i)
            dst[:n] = src[i : i + n]
            i += n
            ev = self.buffer_updated(n)
            if ev is not None:
                out.append(ev)
        return out

    def feed_batch(self, data: Buffer) -> tuple[MultifdPacket | None, int]:
        """Decode, at a packet boundary, the leading packets of ``data`` as one event.

        The leading packets that carry no page data and list only zero pages of one block
        (as QEMU 10 sends for the zero pages of a large guest) are checked together with
        numpy and become one :class:`MultifdPacket` (up to and including the first SYNC
        packet, so an event never spans epochs). Returns it (None when fewer than two
        such packets lead) and the bytes consumed; the caller feeds the rest as usual
        (which reports any problem exactly as it would for those packets alone).
        """
        src = memoryview(data).cast("B")
        size = MULTIFD_PACKET_SIZE
        k = len(src) // size
        if not self.at_boundary or k < 2:
            return None, 0
        h = np.frombuffer(src, dtype=_HEADER_DTYPE, count=k)
        nzero = h["nzero"].astype(np.int64)
        ok = ((h["magic"] == MULTIFD_MAGIC) & (h["version"] == MULTIFD_VERSION)
              & ((h["flags"] & ~np.uint32(_SYNC)) == 0) & (h["normal"] == 0)
              & (h["alloc"] <= MULTIFD_PAGES_PER_PACKET) & (nzero <= h["alloc"])
              & (h["name"] == h["name"][0]))
        listed = np.arange(MULTIFD_PAGES_PER_PACKET)[None, :] < nzero[:, None]
        offs = h["offs"]
        ok &= ~((offs & np.uint64(_PAGE_MASK)).astype(bool) & listed).any(axis=1)
        m = k if ok.all() else int(ok.argmin())
        syncs = np.flatnonzero(h["flags"][:m] & np.uint32(_SYNC))
        if len(syncs):
            m = int(syncs[0]) + 1
        raw_name = bytes(h["name"][0])
        nul = raw_name.find(0)
        block = raw_name[:nul].decode("latin-1") if nul >= 0 else ""
        if m < 2 or nul < 0 or (not block and int(nzero[:m].sum())):
            return None, 0
        zero = offs[:m][listed[:m]].astype(np.uint64)
        last = h[m - 1]
        flags = int(last["flags"])
        pkt = MultifdPacket(flags, int(last["num"]), block, (), (), b"", bool(flags & _SYNC),
                            self._at, zero, m)
        self.packets += m
        self.syncs += pkt.sync
        self._pos += m * size
        self._at = self._pos
        return pkt, m * size

    def feed_eof(self) -> None:
        """The connection ended; raise :class:`TruncatedStream` unless it ended between packets."""
        self._eof = True
        if self.at_boundary:
            return
        if self._state == _INIT:
            what = "in its init packet"
        elif self._state == _DATA:
            what = f"in the page data of a packet ({self._have} of {self._want} bytes)"
        else:
            what = "in a packet header"
        raise TruncatedStream(f"multifd channel ended {what}", self._pos)

    # -- steps -------------------------------------------------------------------

    def _next(self, state: int, want: int) -> None:
        self._state = state
        self._want = want
        self._have = 0

    def _step(self) -> MultifdEvent | None:
        st = self._state
        if st == _PREFIX_ST:
            # the whole fixed-size header was read in one go: prefix, then the rest
            self._parse_prefix()
            return self._parse_header()
        if st == _HEADER:
            return self._parse_header()
        if st == _DATA:
            pkt = self._pending
            assert pkt is not None
            self._pending = None
            self._payload = None
            return self._done(pkt)
        return self._parse_init()

    def _parse_init(self) -> MultifdInit:
        at = self._at
        magic, version, uuid, cid = MULTIFD_INIT.unpack_from(self._hdr)
        if magic != MULTIFD_MAGIC:
            raise StreamError(f"multifd init packet with magic 0x{magic:08x}", at)
        if version != MULTIFD_VERSION:
            raise StreamError(f"multifd init packet version {version} (expected "
                              f"{MULTIFD_VERSION})", at + 4)
        self.init = MultifdInit(bytes(uuid), cid)
        self._at = self._pos
        self._next(_PREFIX_ST, MULTIFD_PACKET_SIZE)
        return self.init

    def _parse_prefix(self) -> None:
        at = self._at
        magic, version, flags = _PREFIX.unpack_from(self._hdr)
        if magic != MULTIFD_MAGIC:
            raise StreamError(f"multifd packet with magic 0x{magic:08x}", at)
        if version != MULTIFD_VERSION:
            raise StreamError(f"multifd packet version {version} (expected {MULTIFD_VERSION})",
                              at + 4)
        if flags & _DEVICE_STATE:
            raise UnsupportedRecord("multifd device-state packet (VFIO state is not supported)",
                                    at + 8)
        comp = flags & _COMPRESSION
        if comp:
            name = _COMPRESSION_NAMES.get(comp, f"0x{comp:x}")
            raise UnsupportedRecord(f"multifd packet compressed with {name} (set "
                                    "multifd-compression none)", at + 8)
        if flags & ~_KNOWN_FLAGS:
            raise StreamError(f"multifd packet with unknown flags 0x{flags:x}", at + 8)
        self._flags = flags
        self._next(_HEADER, MULTIFD_PACKET_SIZE)
        self._have = _PREFIX.size  # the prefix stays at the start of _hdr

    def _parse_header(self) -> MultifdPacket | None:
        at = self._at
        hdr = self._hdr
        alloc, normal, next_size, packet_num, nzero, name_raw = _REST.unpack_from(
            hdr, _PREFIX.size)
        cap = MULTIFD_PAGES_PER_PACKET
        if alloc > cap:
            raise StreamError(f"multifd packet pages_alloc {alloc} (at most {cap})", at + 12)
        if normal > alloc:
            raise StreamError(f"multifd packet with {normal} normal pages but pages_alloc "
                              f"{alloc}", at + 16)
        if nzero > alloc - normal:
            raise StreamError(f"multifd packet with {normal} normal + {nzero} zero pages but "
                              f"pages_alloc {alloc}", at + 32)
        size = normal * TARGET_PAGE_SIZE
        # QEMU 7.2 leaves next_packet_size stale on page-less packets: trust normal_pages.
        if normal and next_size != size:
            raise StreamError(f"multifd packet with {normal} pages but next_packet_size "
                              f"{next_size} (expected {size})", at + 20)
        nul = name_raw.find(0)
        if nul < 0:
            raise StreamError("multifd packet RAM block name is not NUL-terminated", at + 64)
        block = name_raw[:nul].decode("latin-1")
        count = normal + nzero
        if count and not block:
            raise StreamError("multifd packet with pages but no RAM block name", at + 64)
        arr = np.frombuffer(hdr, dtype=">u8", count=count,
                            offset=MULTIFD_PACKET_HEADER.size).astype(np.uint64)
        if (arr & np.uint64(_PAGE_MASK)).any():
            i = int(np.flatnonzero(arr & np.uint64(_PAGE_MASK))[0])
            raise StreamError(f"multifd packet page offset 0x{int(arr[i]):x} is not "
                              "page-aligned", at + MULTIFD_PACKET_HEADER.size + 8 * i)
        offs: tuple[int, ...] = tuple(arr.tolist())
        flags = self._flags
        pkt = MultifdPacket(flags, packet_num, block, offs[:normal], offs[normal:], b"",
                            bool(flags & _SYNC), at, arr)
        if not size:
            return self._done(pkt)
        buf = self._alloc(size)
        if len(buf) < size:
            raise ValueError(f"alloc({size}) returned {len(buf)} bytes")
        view = memoryview(buf).cast("B")[:size]
        pkt.data = view
        self._payload = view
        self._pending = pkt
        self._next(_DATA, size)
        return None

    def _done(self, pkt: MultifdPacket) -> MultifdPacket:
        self.packets += 1
        self.syncs += pkt.sync
        self.data_bytes += len(pkt.data)
        self._at = self._pos
        self._next(_PREFIX_ST, MULTIFD_PACKET_SIZE)
        return pkt


# -- encoding (tests, and fixedram as a multifd source) -------------------------------


def encode_init(channel_id: int, uuid: bytes = bytes(16)) -> bytes:
    """The 64-byte init packet of multifd channel ``channel_id``."""
    if len(uuid) != 16:
        raise ValueError("uuid must be 16 bytes")
    return MULTIFD_INIT.pack(MULTIFD_MAGIC, MULTIFD_VERSION, uuid, channel_id)


def encode_packet(
    *,
    block: str = "",
    normal_offsets: Sequence[int] = (),
    zero_offsets: Sequence[int] = (),
    data: Buffer = b"",
    sync: bool = False,
    packet_num: int = 0,
    flags: int = 0,
    pages_alloc: int | None = None,
    next_packet_size: int | None = None,
    padding: Sequence[int] = (),
) -> bytes:
    """One nocomp packet: header, then ``data`` (``len(normal_offsets)`` pages).

    Defaults follow QEMU 10: ``pages_alloc`` is 0 for a packet without pages and
    128 otherwise, ``next_packet_size`` is the data size. ``padding`` fills offset
    slots after the listed ones (QEMU 7.2 leaves stale offsets there). Nothing is
    validated, so tests can build hostile packets too.
    """
    nn, nz = len(normal_offsets), len(zero_offsets)
    if pages_alloc is None:
        pages_alloc = MULTIFD_PAGES_PER_PACKET if nn + nz else 0
    if next_packet_size is None:
        next_packet_size = nn * TARGET_PAGE_SIZE
    name = block.encode("latin-1")
    offs = [*normal_offsets, *zero_offsets, *padding]
    offs += [0] * (MULTIFD_PAGES_PER_PACKET - len(offs))
    head = MULTIFD_PACKET_HEADER.pack(
        MULTIFD_MAGIC, MULTIFD_VERSION, flags | (_SYNC if sync else 0), pages_alloc, nn,
        next_packet_size, packet_num, nz, name)
    return head + struct.pack(f">{len(offs)}Q", *offs) + bytes(data)


_OFFSETS_AT = MULTIFD_PACKET_HEADER.size


def packet_header_into(
    out: bytearray | memoryview,
    *,
    block: bytes,
    normal: np.ndarray,
    zero: np.ndarray | None = None,
    packet_num: int,
    sync: bool = False,
) -> None:
    """Fill ``out`` (:data:`MULTIFD_PACKET_SIZE` bytes) with one nocomp packet header.

    ``normal`` and ``zero`` are byte offsets in RAM block ``block`` (latin-1 bytes, at most
    255), as integer arrays; they are written with one numpy assignment each, so building a
    header costs the same for 1 page or 128. Unused offset slots are zeroed. ``pages_alloc``
    is 128 when the packet lists pages and 0 otherwise (as QEMU 10 writes it; QEMU 7.2 accepts
    both), ``next_packet_size`` is ``len(normal)`` pages. The data (``len(normal)`` x 4 KiB,
    in the order of ``normal``) is not part of the header: send it right after.
    """
    nn = len(normal)
    nz = 0 if zero is None else len(zero)
    if nn + nz > MULTIFD_PAGES_PER_PACKET:
        raise ValueError(f"{nn} + {nz} pages in one multifd packet (at most "
                         f"{MULTIFD_PAGES_PER_PACKET})")
    if len(block) >= _BLOCK_NAME:
        raise ValueError("RAM block name longer than 255 bytes")
    MULTIFD_PACKET_HEADER.pack_into(
        out, 0, MULTIFD_MAGIC, MULTIFD_VERSION, _SYNC if sync else 0,
        MULTIFD_PAGES_PER_PACKET if nn + nz else 0, nn, nn * TARGET_PAGE_SIZE, packet_num, nz,
        block)
    offs = np.frombuffer(out, dtype=">u8", count=MULTIFD_PAGES_PER_PACKET, offset=_OFFSETS_AT)
    offs[:nn] = normal
    if nz:
        assert zero is not None
        offs[nn : nn + nz] = zero
    offs[nn + nz :] = 0
