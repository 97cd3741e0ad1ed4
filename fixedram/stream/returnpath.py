"""Sans-I/O codec of the return path (destination to source messages).

Each message is ``be16 type, be16 len, payload``. :class:`ReturnPathDecoder` is fed
bytes and yields ``(type, payload)`` pairs; the ``encode_*`` helpers build the
messages a destination sends.
"""

from __future__ import annotations

from fixedram.errors import StreamError
from fixedram.stream.format import BE16, BE32, BE64, ReturnPathMsg

__all__ = [
    "ReturnPathDecoder",
    "encode_shut",
    "encode_pong",
    "encode_switchover_ack",
    "encode_req_pages",
    "MAX_RP_MESSAGE",
]

#: The largest payload QEMU accepts on its return path.
MAX_RP_MESSAGE = 512


def _msg(kind: int, payload: bytes = b"") -> bytes:
    return BE16.pack(kind) + BE16.pack(len(payload)) + payload


def encode_shut(error: bool = False) -> bytes:
    """SHUT: the destination finished loading (``error`` if it failed)."""
    return _msg(ReturnPathMsg.SHUT, BE32.pack(1 if error else 0))


def encode_pong(value: int) -> bytes:
    """PONG answering a PING(value)."""
    return _msg(ReturnPathMsg.PONG, BE32.pack(value))


def encode_switchover_ack() -> bytes:
    """SWITCHOVER_ACK: the destination is ready for the source to stop the VM."""
    return _msg(ReturnPathMsg.SWITCHOVER_ACK)


def encode_req_pages(start: int, length: int, block: str | None = None) -> bytes:
    """REQ_PAGES (or REQ_PAGES_ID when ``block`` is given)."""
    body = BE64.pack(start) + BE32.pack(length)
    if block is None:
        return _msg(ReturnPathMsg.REQ_PAGES, body)
    name = block.encode("latin-1")
    return _msg(ReturnPathMsg.REQ_PAGES_ID, body + bytes((len(name),)) + name)


class ReturnPathDecoder:
    """Splits return-path bytes into ``(type, payload)`` messages."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        """Add bytes; return the complete messages."""
        self._buf += data
        out = []
        buf = self._buf
        p = 0
        while len(buf) - p >= 4:
            kind = BE16.unpack_from(buf, p)[0]
            n = BE16.unpack_from(buf, p + 2)[0]
            if n > MAX_RP_MESSAGE:
                raise StreamError(f"return-path message of {n} bytes")
            if len(buf) - p - 4 < n:
                break
            out.append((kind, bytes(buf[p + 4 : p + 4 + n])))
            p += 4 + n
        del buf[:p]
        return out
