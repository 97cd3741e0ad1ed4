"""A small deterministic mutator for migration streams and images (no atheris needed).

Mutations are the ones that matter for a length-prefixed big-endian format: bit flips,
random bytes, "interesting" big-endian integers written over 1/2/4/8 bytes (0, 1, -1,
2^31, 2^60, page-size multiples...), truncation, deletion, duplication and insertion of
spans, splicing with another seed, and *claims*: a RAM block's length and the MEM_SIZE
total raised together (consistently, so the parser accepts them) to up to 16 TiB while
the data stays as small as it was.
"""

from __future__ import annotations

import random
import struct

__all__ = ["mutate"]

_INTERESTING = [0, 1, 2, 0x7F, 0x80, 0xFF, 0x100, 0xFFF, 0x1000, 0x7FFF, 0xFFFF, 0x10000,
                0x7FFFFFFF, 0x80000000, 0xFFFFFFFF, 1 << 32, 1 << 40, 1 << 44, (1 << 44) + 4096,
                1 << 60, (1 << 60) | 0x4, (1 << 63), (1 << 64) - 1, (1 << 64) - 4096, 0x100000,
                0x5145564D, 0x11223344]


def _int(rnd: random.Random, buf: bytearray) -> None:
    width = rnd.choice((1, 2, 4, 8))
    if len(buf) < width:
        return
    v = rnd.choice(_INTERESTING)
    if rnd.random() < 0.3:
        v += rnd.choice((-1, 1, 4096, -4096))
    v &= (1 << (8 * width)) - 1
    at = rnd.randrange(len(buf) - width + 1)
    if width == 8 and rnd.random() < 0.5:
        at &= ~7  # RAM record words are often 8-aligned
        at = min(at, len(buf) - 8)
    fmt = {1: ">B", 2: ">H", 4: ">I", 8: ">Q"}[width]
    struct.pack_into(fmt, buf, at, v)


def _claim(rnd: random.Random, buf: bytearray) -> None:
    """Raise one block length and the MEM_SIZE total by the same amount (little data,
    a huge claim). Looks in the first 8 KiB for a MEM_SIZE word (``total | 4``) followed
    by a be64 length that is a page multiple no larger than the total."""
    head = bytes(buf[:8192])
    words = [(i, int.from_bytes(head[i : i + 8], "big")) for i in range(len(head) - 7)]
    mem = next(((i, w) for i, w in words if w & 0xFFF == 4 and 0 < w >> 12 < 1 << 32), None)
    if mem is None:
        return
    mi, total = mem[0], mem[1] - 4
    lens = [(i, w) for i, w in words if i >= mi + 8 and w and not w % 4096 and w <= total]
    if not lens:
        return
    li, length = rnd.choice(lens)
    new = min(length << rnd.choice((4, 12, 20, 28, 36)), 1 << 44)
    new = max(new - (total - length), length) if total - length + new > 1 << 44 else new
    struct.pack_into(">Q", buf, li, new)
    struct.pack_into(">Q", buf, mi, (total - length + new) | 4)


def mutate(data: bytes, rnd: random.Random, other: bytes = b"") -> bytes:
    """One mutant of ``data`` (1 to 4 stacked mutations)."""
    buf = bytearray(data)
    for _ in range(rnd.choice((1, 1, 1, 2, 2, 3, 4))):
        if not buf:
            buf += bytes(rnd.randrange(1, 64))
        op = rnd.randrange(10)
        n = len(buf)
        if op == 0:  # bit flip
            i = rnd.randrange(n)
            buf[i] ^= 1 << rnd.randrange(8)
        elif op == 1:  # random byte(s)
            i = rnd.randrange(n)
            for j in range(i, min(n, i + rnd.choice((1, 1, 2, 4)))):
                buf[j] = rnd.randrange(256)
        elif op in (2, 3):  # interesting integer
            _int(rnd, buf)
        elif op == 4:  # truncate
            del buf[rnd.randrange(n) :]
        elif op == 5:  # delete a span
            i = rnd.randrange(n)
            del buf[i : i + rnd.choice((1, 4, 8, 64, 4096))]
        elif op == 6:  # duplicate a span
            i = rnd.randrange(n)
            span = buf[i : i + rnd.choice((1, 8, 64, 4104))]
            j = rnd.randrange(n)
            buf[j:j] = span
        elif op == 7:  # insert random bytes
            j = rnd.randrange(n + 1)
            buf[j:j] = bytes(rnd.randrange(256) for _ in range(rnd.choice((1, 2, 8))))
        elif op == 9:  # a huge claim with the same little data
            _claim(rnd, buf)
        elif other:  # splice with another seed
            i = rnd.randrange(n)
            j = rnd.randrange(len(other))
            buf = buf[:i] + bytearray(other[j:])
    return bytes(buf)
