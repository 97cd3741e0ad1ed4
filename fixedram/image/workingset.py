"""The working-set record of a mapped-ram image (``docs/working-set.md``).

A lazy restore learns which pages the guest needs first: the pages QEMU asks for, in the
order of their first request. This module keeps that knowledge with the image, merged over
restores, so that the next lazy restore can push those pages first
(:mod:`fixedram.endpoint.postcopy`). It is advice on *order* only: every page sent still
comes from the image, so a stale or damaged record can cost time, never a wrong page.

Storage: a versioned, self-contained blob (:func:`encode` / :func:`decode`: header with
its own digest, body digest, a binding to the image's content) kept in two copies in the
padding QEMU never reads (:mod:`fixedram.image.extensions` says where). Updates are
crash-safe without ordering tricks: a writer always overwrites the copy that does *not*
hold the newest valid record, so a torn write damages only a copy nobody relies on (its
digest fails; it is ignored with a warning and overwritten next time). Concurrent
writers (fixedram processes restoring the same image) are serialised by an exclusive
``flock`` around read-merge-write; readers take a shared one.

The same blob lives, for an object image (``s3://bucket/key``), in an object of its own
next to the manifest (:data:`fixedram.image.chunked.RECORD_PREFIX` + key), bound to the
manifest's bytes: a re-save under the key makes it stale. There, read-merge-write has no
lock (S3 has none): a PUT replaces the object whole, so concurrent restores may lose one
another's contribution, never leave a damaged or wrong record.

Merge (:func:`merge`), for a record of pages ``R`` (ranks = positions) merged over ``n``
restores and this restore's observation ``O`` (ranks: :func:`observed_ranks`):

* a page in both gets the weighted mean rank ``(w*rank_R + rank_O) / (w + 1)`` with
  ``w = min(n, MAX_WEIGHT)``, so old behaviour fades and a new one counts at least 1/9;
* a page only in ``R`` keeps its rank when this restore prefetched ``R`` (a page pushed
  before the guest touched it is never requested: absence says nothing), else it is
  ranked ``len(O)`` in ``O`` (absence is evidence);
* a page only in ``O`` gets ``rank_O``;
* sorted by rank (ties: the record's order first), cut to :data:`MAX_PAGES` pages and to
  what fits in one copy.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import xxhash

from fixedram._lazy import numpy as np
from fixedram.image.extensions import WS_COPY, ExtensionError, Geometry

__all__ = [
    "WorkingSet",
    "Observation",
    "Loaded",
    "RecordResult",
    "WorkingSetError",
    "load",
    "record",
    "can_record",
    "merge",
    "observed_ranks",
    "binding",
    "encode",
    "decode",
    "find",
    "MAGIC",
    "VERSION",
    "MAX_PAGES",
]

MAGIC = b"FXRAMWS\x00"
VERSION = 1
#: magic, version, header size, flags, generation, binding, body size, pages, runs,
#: restores, body digest, header digest (over bytes 8..55)
HEADER = struct.Struct(">8sHHIQQIIIIQQ")
#: At most this many pages are kept (1 GiB of guest RAM).
MAX_PAGES = 1 << 18
#: The weight of the recorded order against one new restore saturates here.
MAX_WEIGHT = 8
_MAX_BLOCKS = 255
#: Bounds of a decoded value: a varint, and a page index when the blocks are not known.
_MAX_VARINT = 1 << 62
_MAX_PAGE = 1 << 52
_h = xxhash.xxh3_64_intdigest

assert HEADER.size == 64


class WorkingSetError(ExtensionError):
    """A working-set record is damaged, stale or does not fit the image."""


@dataclass
class WorkingSet:
    """Pages in the order to push them, as parallel arrays, and its bookkeeping."""

    blocks: list[str]  # block names; ``block`` indexes this list
    block: np.ndarray  # uint16 per page
    page: np.ndarray  # int64 per page
    restores: int = 0  # restores merged into it
    generation: int = 0
    binding: int = 0
    offset: int = -1  # file offset of the copy it was read from
    size: int = 0  # bytes of that copy used

    def __len__(self) -> int:
        return len(self.page)

    def runs(self) -> Iterator[tuple[str, int, int]]:
        """``(block, first, npages)``: consecutive pages of one block merged, in order."""
        if not len(self.page):
            return
        brk = np.flatnonzero((np.diff(self.page) != 1) | (np.diff(self.block) != 0)) + 1
        starts = np.concatenate(([0], brk))
        ends = np.concatenate((brk, [len(self.page)]))
        for s, e in zip(starts.tolist(), ends.tolist(), strict=True):
            yield self.blocks[int(self.block[s])], int(self.page[s]), e - s

    def describe(self) -> dict[str, Any]:
        """A JSON-friendly summary."""
        return {"version": VERSION, "pages": len(self), "runs": sum(1 for _ in self.runs()),
                "restores": self.restores, "generation": self.generation,
                "file_offset": self.offset, "size": self.size}


# -- encoding -------------------------------------------------------------------------------


def _varint(out: bytearray, v: int) -> None:
    while v >= 0x80:
        out.append((v & 0x7F) | 0x80)
        v >>= 7
    out.append(v)


def _body(ws: WorkingSet, limit: int) -> tuple[bytes, int, int]:
    """The body for as many leading pages of ``ws`` as fit in ``limit`` bytes:
    ``(body, pages, runs)``. Runs: block index, zigzag delta from the end of that block's
    previous run, length; all varints."""
    out = bytearray([len(ws.blocks)])
    for name in ws.blocks:
        raw = name.encode()
        out += bytes([len(raw)]) + raw
    ends = [0] * len(ws.blocks)
    pages = nruns = 0
    for name, first, n in ws.runs():
        bi = ws.blocks.index(name)
        mark = len(out)
        d = first - ends[bi]
        _varint(out, bi)
        _varint(out, (d << 1) ^ (d >> 63) if d < 0 else d << 1)
        _varint(out, n)
        if len(out) > limit:
            del out[mark:]
            break
        ends[bi] = first + n
        pages += n
        nruns += 1
    return bytes(out), pages, nruns


def encode(ws: WorkingSet, capacity: int = WS_COPY) -> bytes:
    """One copy of the record (header + body), the body cut to fit ``capacity`` bytes."""
    body, pages, nruns = _body(ws, capacity - HEADER.size)
    head = HEADER.pack(MAGIC, VERSION, HEADER.size, 0, ws.generation, ws.binding, len(body),
                       pages, nruns, min(ws.restores, 0xFFFFFFFF), _h(body), 0)
    return head[:56] + _h(head[8:56]).to_bytes(8, "big") + body


def decode(data: bytes, *, blocks: dict[str, int] | None = None) -> WorkingSet:
    """Parse one copy (``data`` starts at its header). ``blocks`` (name -> pages): every page
    must lie inside its block. Raises :class:`WorkingSetError` when damaged."""
    if len(data) < HEADER.size:
        raise WorkingSetError("working-set record is truncated")
    (magic, version, hsize, _flags, gen, bind, body_size, npages, nruns, restores, body_digest,
     head_digest) = HEADER.unpack_from(data)
    if magic != MAGIC:
        raise WorkingSetError("no working-set record magic")
    if _h(data[8:56]) != head_digest:
        raise WorkingSetError("working-set record header is damaged (its digest differs)")
    if version != VERSION or hsize != HEADER.size:
        raise WorkingSetError(f"working-set record version {version} is not supported "
                              f"(this fixedram reads version {VERSION})")
    if body_size > len(data) - HEADER.size or npages > MAX_PAGES:
        raise WorkingSetError(f"working-set record claims {body_size} bytes, {npages} pages")
    body = data[HEADER.size : HEADER.size + body_size]
    if _h(body) != body_digest:
        raise WorkingSetError("working-set record is damaged (body digest differs)")
    try:
        nb = body[0]
        p = 1
        names = []
        for _ in range(nb):
            n = body[p]
            names.append(body[p + 1 : p + 1 + n].decode())
            p += 1 + n
        vals = _varints(body, p)
    except (IndexError, UnicodeDecodeError):
        raise WorkingSetError("working-set record: malformed block list") from None
    if len(vals) != 3 * nruns:
        raise WorkingSetError("working-set record: malformed runs")
    sizes = [blocks.get(n, 0) if blocks is not None else _MAX_PAGE for n in names]
    firsts, total = _check_runs(vals, sizes)
    if total != npages:
        raise WorkingSetError("working-set record: runs do not match its header")
    # every value is now bounded (indices < nb, 1 <= length <= MAX_PAGES, pages inside
    # their block or below 2^52), so the int64 arithmetic below cannot overflow
    trip = np.asarray(vals, dtype=np.int64).reshape(-1, 3)
    bidx, lens = trip[:, 0], trip[:, 2]
    starts = np.asarray(firsts, dtype=np.int64)
    page = np.repeat(starts - (np.cumsum(lens) - lens), lens) + np.arange(npages,
                                                                          dtype=np.int64)
    block = np.repeat(bidx, lens).astype(np.uint16)
    return WorkingSet(names, block, page, restores, gen, bind, size=HEADER.size + body_size)


def _check_runs(vals: list[int], sizes: list[int]) -> tuple[list[int], int]:
    """The first page of every run and the page total, checked with Python ints (per run,
    bounded by the copy's size): block index in range, length 1..MAX_PAGES, every run
    inside its block (``sizes``: pages per block, in the record's block order)."""
    nb = len(sizes)
    ends = [0] * nb
    firsts = []
    total = 0
    for i in range(0, len(vals), 3):
        b, zz, n = vals[i], vals[i + 1], vals[i + 2]
        if b >= nb or not 1 <= n <= MAX_PAGES:
            raise WorkingSetError("working-set record: runs do not match its header")
        first = ends[b] + ((zz >> 1) ^ -(zz & 1))
        if first < 0 or first + n > sizes[b]:
            raise WorkingSetError("working-set record names pages outside the image's blocks")
        firsts.append(first)
        ends[b] = first + n
        total += n
        if total > MAX_PAGES:
            raise WorkingSetError("working-set record: runs do not match its header")
    return firsts, total


def _varints(buf: bytes, p: int) -> list[int]:
    """Unsigned LEB128 values; each below :data:`_MAX_VARINT` (at most 9 bytes)."""
    out = []
    v = shift = 0
    for byte in buf[p:]:
        v |= (byte & 0x7F) << shift
        if byte & 0x80:
            shift += 7
            if shift > 56:
                raise WorkingSetError("working-set record: malformed varint")
        else:
            if v >= _MAX_VARINT:
                raise WorkingSetError("working-set record: malformed varint (too large)")
            out.append(v)
            v = shift = 0
    if shift:
        raise WorkingSetError("working-set record: truncated varint")
    return out


# -- the image ------------------------------------------------------------------------------


def binding(fd: int, geom: Geometry) -> int:
    """What a record is bound to: the block layout and the stream tail (device state, VM
    description) of the image. A new save changes the device state, so a record made for
    another image, or an image rewritten in place, does not match."""
    from fixedram.image.checksum import hash_range

    h = xxhash.xxh3_64()
    for b in geom.blocks:
        h.update(b.name.encode() + b"\0" + struct.pack(">QQ", b.length, b.pages_offset))
    last = geom.blocks[-1].pages_end if geom.blocks else geom.base
    h.update(struct.pack(">QQQ", geom.base, geom.stream_end, hash_range(fd, last,
                                                                        geom.stream_end)))
    return h.intdigest()


@dataclass
class Found:
    """Both copies as read: the newest valid record, and what was wrong with the others."""

    record: WorkingSet | None = None
    damaged: list[str] = field(default_factory=list)
    copies: list[int] = field(default_factory=list)  # offsets holding the magic


def find(fd: int, geom: Geometry) -> Found:
    """Read every block's two copy offsets; keep the valid copy with the highest generation.

    Only pages inside the image's blocks are accepted (else the copy counts as damaged).
    """
    found = Found()
    sizes = {b.name: b.npages for b in geom.blocks}
    for b in geom.blocks:
        if b.room < 2 * WS_COPY:
            continue
        for at in b.ws_copies:
            if at < b.slot:
                continue
            head = os.pread(fd, HEADER.size, at)
            if head[:8] != MAGIC:
                continue
            found.copies.append(at)
            try:
                size = HEADER.unpack_from(head)[6] if len(head) == HEADER.size else 0
                ws = decode(os.pread(fd, HEADER.size + min(size, WS_COPY - HEADER.size), at),
                            blocks=sizes)
            except WorkingSetError as e:
                found.damaged.append(f"{e} (copy at byte {at})")
                continue
            ws.offset = at
            if found.record is None or ws.generation > found.record.generation:
                found.record = ws
    return found


@dataclass
class Loaded:
    """What :func:`load` found: the record to prefetch (None: none usable) and why not."""

    record: WorkingSet | None
    warnings: list[str]
    stale: WorkingSet | None = None  # a valid record bound to other content
    damaged: list[str] = field(default_factory=list)  # damaged copies, one line each
    where: str | None = None  # an object image's record: its s3:// URL

    def describe(self) -> dict[str, Any] | None:
        """For ``analyze`` / ``verify --json``: None when the image has no record."""
        ws = self.record or self.stale
        if ws is None and not self.damaged:
            return None
        out: dict[str, Any] = ws.describe() if ws is not None else {
            "version": None, "pages": 0, "runs": 0, "restores": 0, "generation": None,
            "file_offset": None, "size": 0}
        out["status"] = "ok" if self.record else "stale" if self.stale else "damaged"
        out["damaged_copies"] = len(self.damaged)
        if self.where is not None:
            out["object"] = self.where
        return out


def _object(img: Any) -> Any:
    """``img`` if it is an object image (its record is an object of its own), else None."""
    if img.pages_in_file:
        return None
    from fixedram.image.objimage import ObjectImage

    return img if isinstance(img, ObjectImage) else None


def _load_object(img: Any) -> Loaded:
    from fixedram.errors import StoreError

    where = img.source.store.where(img.record_key)
    try:
        data = img.read_record()
    except StoreError as e:
        return Loaded(None, [f"working-set record not read: {e}"])
    if data is None:
        return Loaded(None, [])
    try:
        ws = decode(data, blocks={b.name: b.npages for b in Geometry.of_image(img).blocks})
    except WorkingSetError as e:
        return Loaded(None, [f"working-set record ignored: {e} ({where})"],
                      damaged=[f"{e} ({where})"], where=where)
    if ws.binding != img.source.manifest.digest:
        return Loaded(None, ["working-set record ignored: it was recorded for other image "
                             f"content (stale: {img.where} was saved again)"], stale=ws,
                      where=where)
    return Loaded(ws, [], where=where)


def load(img: Any) -> Loaded:
    """The image's usable working-set record (an open :class:`~fixedram.image.Image`).

    Damaged copies and a record bound to other content are reported in ``warnings`` and
    ignored. A legacy stream image has none.
    """
    if img.format != "mapped-ram":
        return Loaded(None, [])
    if _object(img) is not None:
        return _load_object(img)
    geom = Geometry.of_image(img)
    fd = img.fileno()
    with _locked(fd, fcntl.LOCK_SH):
        found = find(fd, geom)
    warns = [f"working-set record ignored: {d}" for d in found.damaged]
    ws = found.record
    if ws is not None and ws.binding != binding(fd, geom):
        warns.append("working-set record ignored: it was recorded for other image content "
                     "(stale)")
        return Loaded(None, warns, stale=ws, damaged=found.damaged)
    return Loaded(ws, warns, damaged=found.damaged)


@contextlib.contextmanager
def _locked(fd: int, how: int) -> Iterator[None]:
    fcntl.flock(fd, how)
    try:
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)


# -- observing and merging ------------------------------------------------------------------


@dataclass
class Observation:
    """What one lazy restore saw: page requests ``(block, first, npages, cursor)`` in
    arrival order, where ``cursor`` is how many pages of the prefetched record had been
    pushed when the request arrived (0 without prefetch)."""

    requests: Sequence[tuple[str, int, int, int]]
    prefetched: bool  # the restore pushed a record's pages first


def observed_ranks(obs: Observation, names: list[str]) -> tuple[np.ndarray, np.ndarray,
                                                                np.ndarray]:
    """``(block index, page, rank)`` of each page at its first request.

    rank = the prefetch cursor at the request plus the number of pages first requested
    before it at that same cursor: without prefetch, the position in first-request order;
    with it, where in the record the guest needed the page.
    """
    idx = {n: i for i, n in enumerate(names)}
    reqs = list(obs.requests)
    if not reqs:
        e = np.empty(0, dtype=np.int64)
        return e, e, e
    b = np.array([idx[r[0]] for r in reqs], dtype=np.int64)
    first = np.array([r[1] for r in reqs], dtype=np.int64)
    n = np.array([r[2] for r in reqs], dtype=np.int64)
    cur = np.array([r[3] for r in reqs], dtype=np.int64)
    pb, pc = np.repeat(b, n), np.repeat(cur, n)
    pp = np.repeat(first - (np.cumsum(n) - n), n) + np.arange(int(n.sum()), dtype=np.int64)
    key = (pb << 40) | pp
    _, firsts = np.unique(key, return_index=True)
    firsts.sort()
    pb, pp, pc = pb[firsts], pp[firsts], pc[firsts]
    # within a run of equal cursors, count up from the cursor
    grp = np.concatenate(([0], np.flatnonzero(np.diff(pc) != 0) + 1))
    starts = np.zeros(len(pc), dtype=np.int64)
    starts[grp] = grp
    np.maximum.accumulate(starts, out=starts)
    return pb, pp, pc + (np.arange(len(pc)) - starts)


def merge(old: WorkingSet | None, obs: Observation, blocks: Sequence[str]) -> WorkingSet:
    """The record after this restore (the rules are in the module docstring)."""
    names = list(blocks)
    ob, op, orank = observed_ranks(obs, names)
    if old is None or not len(old):
        order = np.argsort(orank, kind="stable")[:MAX_PAGES]
        return WorkingSet(names, ob[order].astype(np.uint16), op[order],
                          restores=(old.restores if old else 0) + 1)
    remap = np.array([names.index(n) if n in names else -1 for n in old.blocks],
                     dtype=np.int64)
    rb = remap[old.block.astype(np.int64)]
    keep = rb >= 0
    rb, rp = rb[keep], old.page[keep]
    rrank = np.arange(len(rp), dtype=np.float64)
    w = min(old.restores, MAX_WEIGHT) if old.restores else 1
    okey = (ob << 40) | op
    rkey = (rb << 40) | rp
    # each record page's observed rank, where it was observed
    by_key = np.argsort(okey)
    at = np.searchsorted(okey[by_key], rkey).clip(0, max(len(okey) - 1, 0))
    in_o = okey[by_key][at] == rkey if len(okey) else np.zeros(len(rkey), dtype=bool)
    merged = rrank.copy()
    merged[in_o] = (w * rrank[in_o] + orank[by_key][at][in_o]) / (w + 1)
    if not obs.prefetched:
        merged[~in_o] = (w * rrank[~in_o] + len(okey)) / (w + 1)
    new = ~np.isin(okey, rkey)
    keys = np.concatenate((rkey, okey[new]))
    ranks = np.concatenate((merged, orank[new].astype(np.float64)))
    src = np.concatenate((np.zeros(len(rkey)), np.ones(int(new.sum()))))
    order = np.lexsort((src, ranks))[:MAX_PAGES]
    keys = keys[order]
    return WorkingSet(names, (keys >> 40).astype(np.uint16), keys & ((1 << 40) - 1),
                      restores=old.restores + 1)


# -- writing --------------------------------------------------------------------------------


@dataclass
class RecordResult:
    """What :func:`record` did: ``status`` is ``recorded``, ``unchanged`` or ``skipped``."""

    status: str
    pages: int = 0
    restores: int = 0
    warning: str | None = None


def can_record(img: Any) -> bool:
    """Whether :func:`record` may be able to write into the open image ``img`` (a mapped-ram
    image whose file this process may write); a quick check made before a restore."""
    if _object(img) is not None:
        return True  # whether the credentials may write is known only by trying
    return img.format == "mapped-ram" and os.access(img.path, os.W_OK)


def record(img: Any, obs: Observation) -> RecordResult:
    """Merge ``obs`` into the record of the open image ``img`` and write it (crash-safe, under
    an exclusive lock). Never raises for an image that cannot take it: a read-only file, no
    room, a replaced file or a failed write give ``skipped`` with a one-line ``warning``."""
    if not obs.requests:
        return RecordResult("unchanged")
    if img.format != "mapped-ram":
        return RecordResult("skipped", warning="working set not recorded: a legacy stream "
                            "image has no room for it (`fixedram convert` makes a mapped-ram "
                            "image)")
    if _object(img) is not None:
        return _record_object(img, obs)
    path = img.path
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        why = "read-only" if e.errno in (errno.EACCES, errno.EROFS, errno.EPERM) else "not writable"
        return RecordResult("skipped", warning=f"working set not recorded: {path} is {why} "
                            f"({e.strerror}); the restore is not affected")
    try:
        if os.fstat(fd).st_ino != os.fstat(img.fileno()).st_ino:
            return RecordResult("skipped", warning=f"working set not recorded: {path} was "
                                "replaced during the restore")
        geom = Geometry.of_image(img)
        return _record(fd, geom, obs)
    except OSError as e:
        return RecordResult("skipped", warning=f"working set not recorded: writing {path} "
                            f"failed ({e.strerror or e}); the restore is not affected")
    finally:
        os.close(fd)


def _record(fd: int, geom: Geometry, obs: Observation) -> RecordResult:
    from fixedram.image.checksum import find as find_checksums

    blk = geom.working_set_block()
    if blk is None:
        return RecordResult("skipped", warning="working set not recorded: no padding in the "
                            "image has room for it")
    area = (blk.ws_copies[0], blk.pages_offset)
    cs = find_checksums(fd, geom).checksums
    if cs is not None and Geometry.overlaps((cs.slot, cs.slot + cs.size), area):
        return RecordResult("skipped", warning="working set not recorded: the image's "
                            "checksums fill the padding it would use")
    bind = binding(fd, geom)
    with _locked(fd, fcntl.LOCK_EX):
        found = find(fd, geom)
        old = found.record
        if old is not None and old.binding != bind:
            old = None  # stale: start over
        ws = merge(old, obs, [b.name for b in geom.blocks])
        ws.binding = bind
        ws.generation = (found.record.generation if found.record else 0) + 1
        data = encode(ws)
        # overwrite the copy that does not hold the newest valid record
        at = blk.ws_copies[1] if old is not None and old.offset == blk.ws_copies[0] \
            else blk.ws_copies[0]
        _pwrite_all(fd, data, at)
        os.fdatasync(fd)
    kept = HEADER.unpack_from(data)[7]
    return RecordResult("recorded", pages=kept, restores=ws.restores)


def _record_object(img: Any, obs: Observation) -> RecordResult:
    """Read-merge-write of an object image's record object. No lock: a concurrent restore's
    write in between is lost (a PUT replaces the object whole), never mixed in."""
    from fixedram.errors import StoreError

    bind = img.source.manifest.digest
    try:
        data = img.read_record()
    except StoreError as e:
        return RecordResult("skipped", warning=f"working set not recorded: {e}; the restore "
                            "is not affected")
    geom = Geometry.of_image(img)
    old = None
    if data is not None:
        with contextlib.suppress(WorkingSetError):  # damaged: start over
            old = decode(data, blocks={b.name: b.npages for b in geom.blocks})
    gen = old.generation if old is not None else 0
    if old is not None and old.binding != bind:
        old = None  # stale: start over
    ws = merge(old, obs, [b.name for b in geom.blocks])
    ws.binding, ws.generation = bind, gen + 1
    data = encode(ws)
    try:
        img.write_record(data)
    except StoreError as e:
        return RecordResult("skipped", warning=f"working set not recorded: {e}; the restore "
                            "is not affected")
    return RecordResult("recorded", pages=HEADER.unpack_from(data)[7], restores=ws.restores)


def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    mv = memoryview(data)
    while mv:
        n = os.pwrite(fd, mv, offset)
        if n <= 0:
            raise OSError(errno.EIO, "short write")
        mv, offset = mv[n:], offset + n

