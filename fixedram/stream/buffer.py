"""A receive buffer that never rescans, never moves a byte twice, and can be received into.

Bytes are appended at the end (copied with :meth:`ReceiveBuffer.append`, or received
in place: :meth:`ReceiveBuffer.space` hands out the free tail, :meth:`ReceiveBuffer.wrote`
makes it data) and consumed from the front by moving a read index. Storage is two
arenas used in turn: when the current one has no room, the unconsumed rest moves to
the front of the other one (grown if a record needs more) and appending continues
there. Bytes are never moved inside an arena, so a view of consumed bytes (a page a
writer still holds) stays valid until the arena is used again, two switches later.

Worst case, stated: each byte is received or copied in once, and moved at most once
more when an arena switches while it is unconsumed. An arena switch happens only when
the free tail is smaller than what is asked for, and moves only the unconsumed rest,
which is smaller than one record unless the parser asked for more (then the arena
grows to ``2 * (rest + wanted)``, so a record of ``n`` bytes arriving in pieces of any
size is moved O(1) times, and memory stays at two arenas of at most twice the largest
record). A parser that finds a record incomplete leaves the index where the record
began and says how many bytes it needs before it is worth trying again, so a record
split across many small reads is parsed once, not once per read.
"""

from __future__ import annotations

from fixedram.stream.format import BE16, BE32, BE64

__all__ = ["ReceiveBuffer", "NeedData", "ARENA"]

#: Default size of each of the two arenas.
ARENA = 2 << 20


class NeedData(Exception):
    """Raised inside a parser when the buffer holds less than a whole record."""

    __slots__ = ("need",)

    def __init__(self, need: int) -> None:
        self.need = need  # bytes required from the record start before a retry


class ReceiveBuffer:
    """Append-at-end, consume-from-front byte buffer with absolute offsets.

    Indices (from :meth:`mark`) are into the current arena; :attr:`end` is the end of
    the data in it.
    """

    __slots__ = ("_arenas", "_buf", "_i", "_pos", "_size", "base", "end")

    def __init__(self, base: int = 0, arena: int = ARENA) -> None:
        self._size = arena
        self._arenas: list[bytearray] = [bytearray(), bytearray()]
        self._i = 0
        self._buf = self._arenas[0]
        self._pos = 0
        #: end of the data in the current arena
        self.end = 0
        #: absolute stream offset of index 0 of the current arena
        self.base = base

    def __len__(self) -> int:
        return self.end - self._pos

    @property
    def offset(self) -> int:
        """Absolute stream offset of the next unread byte."""
        return self.base + self._pos

    def _room(self, n: int) -> None:
        """Make at least ``n`` bytes free after :attr:`end` (maybe switching arenas)."""
        buf = self._buf
        if len(buf) - self.end >= n:
            return
        rest = self.end - self._pos
        if not len(buf):  # first use
            self._arenas[self._i] = self._buf = bytearray(max(self._size, 2 * n))
            return
        i = self._i ^ 1
        other = self._arenas[i]
        if len(other) < rest + n:
            other = self._arenas[i] = bytearray(max(self._size, 2 * (rest + n)))
        other[:rest] = memoryview(buf)[self._pos : self.end]
        self.base += self._pos
        self._i, self._buf, self._pos, self.end = i, other, 0, rest

    def append(self, data: bytes | bytearray | memoryview) -> None:
        """Add received bytes at the end (one copy)."""
        n = len(data)
        self._room(n)
        self._buf[self.end : self.end + n] = data
        self.end += n

    def space(self, n: int) -> memoryview:
        """The free tail (at least ``n`` bytes) to receive into; then call :meth:`wrote`."""
        self._room(n)
        return memoryview(self._buf)[self.end :]

    def wrote(self, n: int) -> None:
        """``n`` bytes were received into the start of :meth:`space`."""
        if n < 0 or self.end + n > len(self._buf):
            raise ValueError(f"wrote({n}) beyond the space handed out")
        self.end += n

    def clear(self, new_offset: int) -> None:
        """Drop everything and continue at absolute ``new_offset``.

        The consumed bytes stay where they are (views of them remain valid); new bytes
        go after them.
        """
        self._pos = self.end
        self.base = new_offset - self._pos

    # The accessors below read at ``pos`` (an index into the current arena, obtained
    # from ``mark``) and raise NeedData when the bytes are not there yet.

    def mark(self) -> int:
        """Index of the next unread byte, for use with the accessors."""
        return self._pos

    def commit(self, pos: int) -> None:
        """Consume everything before index ``pos``."""
        self._pos = pos

    def need(self, start: int, pos: int, n: int) -> None:
        """Raise NeedData unless ``n`` bytes are available at ``pos``."""
        if pos + n > self.end:
            raise NeedData(pos + n - start)

    def u8(self, start: int, pos: int) -> int:
        if pos >= self.end:
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
        return self.end - pos

    def view(self) -> bytearray:
        """The current arena (read-only use; indices from ``mark``, data up to :attr:`end`)."""
        return self._buf
