"""A receive buffer that never rescans and never copies quadratically.

Bytes are appended at the end and consumed from the front. Consumption only moves
a read index; the consumed prefix is dropped once it is larger than what remains
(and at least 64 KiB), so every byte is moved at most a constant number of times:
appending ``n`` bytes and consuming them costs O(n) in total, whatever the chunk
sizes. A parser that finds a record incomplete leaves the index where the record
began and says how many bytes it needs before it is worth trying again, so a
record split across many small reads is parsed once, not once per read.
"""

from __future__ import annotations

from fixedram.stream.format import BE16, BE32, BE64

__all__ = ["ReceiveBuffer", "NeedData"]


class NeedData(Exception):
    """Raised inside a parser when the buffer holds less than a whole record."""

    __slots__ = ("need",)

    def __init__(self, need: int) -> None:
        self.need = need  # bytes required from the record start before a retry


class ReceiveBuffer:
    """Append-at-end, consume-from-front byte buffer with absolute offsets."""

    __slots__ = ("_buf", "_pos", "base")

    def __init__(self, base: int = 0) -> None:
        self._buf = bytearray()
        self._pos = 0
        #: absolute stream offset of ``_buf[0]``
        self.base = base

    def __len__(self) -> int:
        return len(self._buf) - self._pos

    @property
    def offset(self) -> int:
        """Absolute stream offset of the next unread byte."""
        return self.base + self._pos

    def append(self, data: bytes | bytearray | memoryview) -> None:
        """Add received bytes at the end."""
        buf = self._buf
        if self._pos and self._pos >= len(buf) - self._pos and self._pos >= 65536:
            del buf[: self._pos]
            self.base += self._pos
            self._pos = 0
        buf += data

    def clear(self, new_offset: int) -> None:
        """Drop everything and continue at absolute ``new_offset``."""
        self._buf = bytearray()
        self._pos = 0
        self.base = new_offset

    # The accessors below read at ``pos`` (an index into the internal buffer,
    # obtained from ``mark``) and raise NeedData when the bytes are not there yet.

    def mark(self) -> int:
        """Index of the next unread byte, for use with the accessors."""
        return self._pos

    def commit(self, pos: int) -> None:
        """Consume everything before index ``pos``."""
        self._pos = pos

    def need(self, start: int, pos: int, n: int) -> None:
        """Raise NeedData unless ``n`` bytes are available at ``pos``."""
        if pos + n > len(self._buf):
            raise NeedData(pos + n - start)

    def u8(self, start: int, pos: int) -> int:
        if pos >= len(self._buf):
            raise NeedData(pos + 1 - start)
        return self._buf[pos]

    def be16(self, start: int, pos: int) -> int:
        self.need(start, pos, 2)
        return BE16.unpack_from(self._buf, pos)[0]

    def be32(self, start: int, pos: int) -> int:
        self.need(start, pos, 4)
        return BE32.unpack_from(self._buf, pos)[0]

    def be64(self, start: int, pos: int) -> int:
        self.need(start, pos, 8)
        return BE64.unpack_from(self._buf, pos)[0]

    def take(self, start: int, pos: int, n: int) -> bytes:
        self.need(start, pos, n)
        return bytes(self._buf[pos : pos + n])

    def peek_available(self, pos: int) -> int:
        """Bytes available from index ``pos``."""
        return len(self._buf) - pos

    def view(self) -> bytearray:
        """The raw internal buffer (read-only use; indices from ``mark``)."""
        return self._buf
