"""Images in an object store: a mapped-ram image kept as content-named chunks plus a manifest.

The format (``docs/object-storage.md`` describes it in full):

* Each RAM block's pages region is cut into chunks of ``chunk_size`` bytes at fixed
  offsets (chunk ``i`` holds pages ``[i * chunk_pages, (i + 1) * chunk_pages)``). A chunk
  with no page of data (bitmap bits clear) or only zero bytes is not stored: it reads as
  zeros. Every other chunk is stored once per bucket under
  ``.fixedram/chunks/<xxh3-128 of its bytes>`` (``.zst`` appended when zstd-compressed),
  so images of one guest, or of guests booted from one base, share their common chunks.
* Everything else of the mapped-ram file (stream prefix, block headers, bitmaps, the
  checksum extension, device state and VM description) is one more chunk, the *meta*
  chunk: the file's bytes outside the pages regions, concatenated.
* The manifest, a small JSON document stored at the image's own key, names the meta
  chunk and every stored chunk with its checksum. It is written last, in one PUT, after
  every chunk it names is confirmed stored: the previous image under that key stays
  whole until then.

:func:`upload` turns a local mapped-ram image into such an object (reusing chunks the
bucket holds already), :func:`collect_garbage` deletes chunks no manifest names, and
:class:`Manifest` reads and checks a manifest. Reading an object image is
:mod:`fixedram.image.objimage`.

**Garbage collection and concurrent saves.** A chunk may be deleted only when no manifest
names it *and* the server's clock shows it unmodified for the bucket's grace period
(:data:`DEFAULT_GRACE`, kept in ``.fixedram/gc.json``). A save reuses a stored chunk only
if it was written less than half the grace period ago, uploading it again otherwise
(which renews its time), and refuses to write its manifest once half the grace period
has passed since it looked: a chunk a running save relies on is therefore younger than
the grace period until that save's manifest exists, and gc, which reads the manifests
after listing the chunks, sees the manifest before the chunk is old enough to delete.

A listing can be stale, though: a save may upload an old chunk again after gc listed it
and before gc deletes it. So gc HEADs each chunk it is about to delete and keeps any whose
modification time changed since the listing, and a save, once its manifest is written,
HEADs the chunks it uploaded and uploads again any that are gone (a delete that passed
gc's check just before the save's upload).
"""

from __future__ import annotations

import functools
import json
import mmap
import os
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fixedram._lazy import numpy as np
from fixedram.errors import ImageError, StoreError
from fixedram.image.layout import PAGE_SIZE
from fixedram.io.files import scratch_writes
from fixedram.io.objstore import (
    RESERVED,
    ObjectInfo,
    ObjectURL,
    Store,
    is_object_url,
    parse_url,
)

__all__ = ["upload", "EarlyUpload", "staged", "local_image", "staging", "preflight",
           "collect_garbage", "Manifest",
           "ChunkRef", "UploadReport", "GcReport", "read_manifest", "chunk_key", "chunk_name",
           "encode_chunk", "decode_chunk", "MANIFEST_VERSION", "CHUNK_SIZE", "CHUNK_PREFIX",
           "DEFAULT_GRACE", "RECORD_PREFIX", "read_grace", "write_grace"]

#: Version of the manifest document; a reader refuses any other.
MANIFEST_VERSION = 1
#: Marks a manifest (its first key).
MAGIC = "fixedram-chunked-image"
#: Bytes of guest RAM per chunk (docs/object-storage.md: the measurement behind it).
CHUNK_SIZE = 4 << 20
#: Where chunks live in a bucket, shared by every image of the bucket.
CHUNK_PREFIX = ".fixedram/chunks/"
#: Where an object image's working-set record lives: ``RECORD_PREFIX + KEY`` in its bucket
#: (``docs/working-set.md``, "Object images"); gc removes those of keys holding no image.
RECORD_PREFIX = ".fixedram/working-sets/"
#: The bucket's garbage-collection settings.
GC_KEY = ".fixedram/gc.json"
#: Default grace period of a bucket (seconds): unreferenced chunks younger than this stay.
DEFAULT_GRACE = 24 * 3600
#: Parallel requests of an upload or a download (2-4 saturate a 2-core host).
WORKERS = 4
#: zstd level of chunks, and the share of its size a chunk must shrink to to be kept
#: compressed (else stored raw: decompressing it would cost more than it saves). 0.93
#: rather than 7/8: a re-save of the bench.s3 guest uploaded 9.3 % of the first save's
#: bytes instead of 10.2 % (its rewritten chunks shrink to 0.88), for about 0.1 CPU-s per
#: GiB more decompression on restore (docs/object-storage.md).
ZSTD_LEVEL = 1
ZSTD_KEEP = 0.93
#: A chunk is judged first by a sample (three pieces of this many bytes, from its start,
#: middle and end): one whose sample does not shrink to ZSTD_KEEP is stored raw without
#: compressing the rest (random or already compressed data then costs almost nothing).
ZSTD_SAMPLE = 32 << 10
#: Most chunk keys an upload lists to learn which chunks the bucket holds (one request per
#: 1000), instead of a HEAD per chunk; in a bucket with more it HEADs each chunk. HEADs of
#: SeaweedFS took 10-50 ms each here, four at a time, against 25-80 ms for a listing of
#: 1000 keys (docs/object-storage.md).
LIST_MAX = 50_000
#: Largest manifest a reader accepts (bytes): a 1 TiB guest full of data lists 262144
#: chunks of about 60 bytes each.
MAX_MANIFEST = 64 << 20


def chunk_name(data: Any) -> str:
    """The content name of a chunk: xxh3-128 of its uncompressed bytes, 32 hex digits."""
    import xxhash

    return xxhash.xxh3_128_hexdigest(data)


@functools.lru_cache(maxsize=8)
def _zero_name(n: int) -> str:
    """The :func:`chunk_name` of ``n`` zero bytes: a chunk of that name holds only zeros
    (comparing names spares a pass over the chunk's bytes besides the hash's)."""
    return chunk_name(bytes(n))


def chunk_key(name: str, codec: str) -> str:
    """The object key of chunk ``name`` stored with ``codec`` (``raw`` or ``zstd``)."""
    return CHUNK_PREFIX + name + (".zst" if codec == "zstd" else "")


@dataclass(frozen=True)
class ChunkRef:
    """A stored chunk: its index in the block, content name, codec, stored size."""

    index: int
    name: str
    codec: str
    stored: int

    @property
    def key(self) -> str:
        return chunk_key(self.name, self.codec)


_local = threading.local()


def _compressor() -> Any:
    c = getattr(_local, "zc", None)
    if c is None:
        import zstandard

        c = _local.zc = zstandard.ZstdCompressor(level=ZSTD_LEVEL)
    return c


def encode_chunk(data: memoryview) -> tuple[str, Any]:
    """``(codec, body)`` of a chunk as stored: zstd where it shrinks the chunk to
    :data:`ZSTD_KEEP` of its size, else raw (see :data:`ZSTD_SAMPLE`)."""
    n = len(data)
    if n >= 4 * ZSTD_SAMPLE:
        mid = (n - ZSTD_SAMPLE) // 2
        sample = b"".join(data[i : i + ZSTD_SAMPLE] for i in (0, mid, n - ZSTD_SAMPLE))
        if len(_compressor().compress(sample)) > len(sample) * ZSTD_KEEP:
            return "raw", data
    z = _compressor().compress(data)
    return ("zstd", z) if len(z) <= n * ZSTD_KEEP else ("raw", data)


def decode_chunk(raw: Any, codec: str, length: int, name: str, where: str) -> memoryview:
    """A stored chunk's bytes, decompressed and checked against its name; ImageError when
    they do not match (nothing of a bad chunk is ever returned)."""
    if codec == "zstd":
        import zstandard

        try:
            data = zstandard.ZstdDecompressor().decompress(raw, max_output_size=length)
        except zstandard.ZstdError as e:
            raise ImageError(f"{where}: chunk {name} does not decompress ({e})") from None
    elif codec == "raw":
        data = raw
    else:
        raise ImageError(f"{where}: chunk {name} has unknown codec {codec!r}")
    if len(data) != length or chunk_name(data) != name:
        raise ImageError(f"{where}: chunk {name} does not match its checksum (corrupt or "
                         "replaced object)")
    return memoryview(data)


# -- the manifest ---------------------------------------------------------------------------


@dataclass
class BlockEntry:
    """A RAM block of a manifest: where its pages are in the file, its stored chunks."""

    name: str
    length: int
    pages_offset: int
    chunks: dict[int, ChunkRef] = field(default_factory=dict)


@dataclass
class Manifest:
    """The manifest of an object image (the JSON document at the image's key)."""

    file_size: int
    chunk_size: int
    meta: ChunkRef
    meta_length: int
    blocks: list[BlockEntry]
    machine: str = ""
    created: str = ""
    data_bytes: int = 0
    #: xxh3-64 of the manifest's bytes as read (0 for one not read from a store): what an
    #: object image's working-set record is bound to (``docs/working-set.md``)
    digest: int = 0

    def to_json(self) -> bytes:
        return json.dumps({
            MAGIC: MANIFEST_VERSION,
            "created": self.created,
            "machine": self.machine,
            "file_size": self.file_size,
            "chunk_size": self.chunk_size,
            "data_bytes": self.data_bytes,
            "meta": {"name": self.meta.name, "codec": self.meta.codec,
                     "stored": self.meta.stored, "length": self.meta_length},
            "blocks": [{"name": b.name, "length": b.length, "pages_offset": b.pages_offset,
                        "chunks": [[c.index, c.name, c.codec, c.stored]
                                   for c in sorted(b.chunks.values(), key=lambda c: c.index)]}
                       for b in self.blocks],
        }, separators=(",", ":")).encode()

    def refs(self) -> Iterator[ChunkRef]:
        """The meta chunk and every stored chunk."""
        yield self.meta
        for b in self.blocks:
            yield from b.chunks.values()

    def regions(self) -> list[tuple[int, int]]:
        """``(offset, length)`` of the file's bytes outside the pages regions, in order:
        what the meta chunk holds."""
        out, pos = [], 0
        for b in sorted(self.blocks, key=lambda b: b.pages_offset):
            if b.pages_offset > pos:
                out.append((pos, b.pages_offset - pos))
            pos = max(pos, b.pages_offset + b.length)
        if self.file_size > pos:
            out.append((pos, self.file_size - pos))
        return out

    @classmethod
    def parse(cls, raw: Any, where: str) -> Manifest:
        """Read and check a manifest; ImageError naming the first problem."""
        def bad(why: str) -> ImageError:
            return ImageError(f"{where}: not a usable fixedram manifest: {why}")

        try:
            doc = json.loads(bytes(raw))
        except (ValueError, UnicodeDecodeError):
            raise bad("not JSON") from None
        if not isinstance(doc, dict) or MAGIC not in doc:
            raise bad("no format marker")
        if doc[MAGIC] != MANIFEST_VERSION:
            raise bad(f"manifest version {doc[MAGIC]!r}, this fixedram reads "
                      f"{MANIFEST_VERSION}")
        try:
            cs = _int(doc["chunk_size"])
            if cs < PAGE_SIZE or cs % PAGE_SIZE or cs > 1 << 30:
                raise bad(f"chunk size {cs}")
            fsize = _int(doc["file_size"])
            m = doc["meta"]
            meta = ChunkRef(-1, _name(m["name"]), _codec(m["codec"]), _int(m["stored"]))
            blocks = []
            for b in doc["blocks"]:
                be = BlockEntry(str(b["name"]), _int(b["length"]), _int(b["pages_offset"]))
                if be.length % PAGE_SIZE or be.pages_offset + be.length > fsize:
                    raise bad(f"RAM block '{be.name}' outside the file")
                nchunks = -(-be.length // cs)
                for i, n, c, s in b["chunks"]:
                    if not 0 <= _int(i) < nchunks:
                        raise bad(f"RAM block '{be.name}': chunk index {i} out of range")
                    be.chunks[i] = ChunkRef(i, _name(n), _codec(c), _int(s))
                blocks.append(be)
            out = cls(fsize, cs, meta, _int(m["length"]), blocks, str(doc.get("machine", "")),
                      str(doc.get("created", "")), _int(doc.get("data_bytes", 0)))
        except (KeyError, TypeError, ValueError) as e:
            raise bad(f"malformed ({type(e).__name__}: {e})") from None
        if sum(n for _, n in out.regions()) != out.meta_length:
            raise bad("the meta chunk's length does not fit the layout")
        import xxhash

        out.digest = xxhash.xxh3_64_intdigest(bytes(raw))
        return out


def _int(v: Any) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or v < 0:
        raise ValueError(f"expected a non-negative integer, got {v!r}")
    return v


def _name(v: Any) -> str:
    if not isinstance(v, str) or len(v) != 32 or any(c not in "0123456789abcdef" for c in v):
        raise ValueError(f"bad chunk name {v!r}")
    return v


def _codec(v: Any) -> str:
    if v not in ("raw", "zstd"):
        raise ValueError(f"bad codec {v!r}")
    return str(v)


# -- the bucket's gc grace period -----------------------------------------------------------


def read_grace(store: Store) -> float:
    """The bucket's grace period in seconds (:data:`DEFAULT_GRACE` when it has none set)."""
    if store.head(GC_KEY) is None:
        return DEFAULT_GRACE
    try:
        v = json.loads(bytes(store.get(GC_KEY)))["grace_seconds"]
        return float(v) if isinstance(v, int | float) and v > 0 else DEFAULT_GRACE
    except (ValueError, KeyError, TypeError):
        return DEFAULT_GRACE


def write_grace(store: Store, seconds: float) -> None:
    """Set the bucket's grace period (saves started afterwards follow it)."""
    store.put(GC_KEY, json.dumps({"grace_seconds": seconds}).encode())


def server_now(store: Store) -> datetime:
    """The store's clock: the modification time of a small object written now."""
    key = f".fixedram/clock/{uuid.uuid4().hex}"
    store.put(key, b"")
    try:
        info = store.head(key)
    finally:
        store.delete([key])
    if info is None:
        raise StoreError(f"{store.where(key)}: an object just written is missing")
    return info.modified


# -- upload ---------------------------------------------------------------------------------


@dataclass
class UploadReport:
    """What :func:`upload` stored."""

    url: str
    chunks: int = 0           # chunks the manifest names (the meta chunk included)
    uploaded: int = 0         # chunks this save PUT (early ones superseded since included)
    reused: int = 0           # already in the bucket (and recent enough to rely on)
    zero_chunks: int = 0      # chunks with page data that were all zeros (not stored)
    data_bytes: int = 0       # bytes of the chunks with data (uncompressed)
    uploaded_bytes: int = 0   # bytes sent (compressed)
    restored: int = 0         # uploaded chunks found deleted after the manifest, put again
    early: int = 0            # data chunks stored while the image was still being written
    stored_bytes: int = 0     # bytes the manifest's chunks take in the store
    #: seconds and CPU seconds of the upload from the moment the image was complete
    #: (with early uploads, what is left then)
    seconds: float = 0.0
    cpu_seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    def summary(self) -> str:
        return (f"{self.url}: {self.chunks} chunks, {self.uploaded} uploaded "
                f"({self.uploaded_bytes / 2**20:.1f} MiB), {self.reused} reused, "
                f"{self.zero_chunks} zero; {self.data_bytes / 2**20:.1f} MiB of data"
                + (f", {self.early} chunks stored while the image was written, the rest"
                   if self.early else "")
                + f" in {self.seconds:.2f} s")


class _Uploader:
    """Stores chunks, each at most once, reusing those the bucket holds recently enough."""

    def __init__(self, store: Store, report: UploadReport, fresh_after: datetime) -> None:
        self.store = store
        self.report = report
        self.fresh_after = fresh_after
        self.lock = threading.Lock()
        self.done: dict[str, Future[ChunkRef]] = {}
        #: key -> chunk name, for every chunk this save PUT
        self.put_keys: dict[str, str] = {}
        #: chunk name -> every way this save had of reading such a chunk again (a place
        #: of the staging file read early may have been written since: each is checked)
        self.readers: dict[str, list[Callable[[], memoryview]]] = {}
        #: the bucket's chunks as listed when the upload began (None: too many, or the
        #: listing failed: a HEAD per chunk instead)
        self.listing: Future[dict[str, ObjectInfo] | None] = Future()
        threading.Thread(target=lambda: self.listing.set_result(_list_chunks(store)),
                         name="fixedram-list", daemon=True).start()

    def store_chunk(self, index: int, data: memoryview,
                    again: Callable[[], memoryview] | None = None,
                    name: str | None = None) -> ChunkRef:
        """Store chunk ``index`` holding ``data`` (``name``: its :func:`chunk_name`, if
        known), unless this save or the bucket has it already; ``again`` reads it anew
        (for :meth:`restore_deleted`)."""
        if name is None:
            name = chunk_name(data)
        with self.lock:
            self.readers.setdefault(name, []).append(again or (lambda: data))
            fut = self.done.get(name)
            if fut is None:
                fut = self.done[name] = Future()
                mine = True
            else:
                mine = False
        if not mine:
            ref = fut.result()
            return ChunkRef(index, ref.name, ref.codec, ref.stored)
        try:
            ref = self._store(name, data)
        except BaseException as e:
            fut.set_exception(e)
            raise
        fut.set_result(ref)
        return ChunkRef(index, ref.name, ref.codec, ref.stored)

    def _store(self, name: str, data: memoryview) -> ChunkRef:
        codec, body = encode_chunk(data)
        key = chunk_key(name, codec)
        # what the bucket held when the upload began (as a HEAD would say: a chunk written
        # since by another save is only written again), else a HEAD
        known = self.listing.result()
        have = known.get(key) if known is not None else self.store.head(key)
        if have is not None and have.size == len(body) and have.modified >= self.fresh_after:
            with self.lock:
                self.report.reused += 1
            return ChunkRef(-1, name, codec, len(body))
        self.store.put(key, body)
        with self.lock:
            self.put_keys[key] = name
            self.report.uploaded += 1
            self.report.uploaded_bytes += len(body)
        return ChunkRef(-1, name, codec, len(body))

    def restore_deleted(self, used: set[str], workers: int = WORKERS) -> int:
        """After the manifest is written: upload again each chunk this save PUT and the
        manifest names (``used``: keys) that is gone from the store (deleted by a gc that
        listed it before this save's PUT and checked it just before too), ``workers``
        requests at a time. Returns how many."""
        def check(key: str) -> int:
            if self.store.head(key) is not None:
                return 0
            self._put_again(key)
            return 1

        mine = [k for k in self.put_keys if k in used]
        if not mine:
            return 0
        # one listing (a request per 1000 keys) rather than a HEAD per chunk (``workers``
        # at a time), where it takes fewer rounds of requests
        known = self.listing.result()
        listing = known is not None and len(known) // 1000 + 1 < len(mine) / workers
        now = _list_chunks(self.store) if listing else None
        if now is not None:
            gone = [k for k in mine if k not in now]
            for key in gone:
                self._put_again(key)
            return len(gone)
        with ThreadPoolExecutor(workers, thread_name_prefix="fixedram-check") as pool:
            return sum(pool.map(check, mine))

    def _put_again(self, key: str) -> None:
        """PUT the chunk ``key`` again from a place of the image that still holds it."""
        name = self.put_keys[key]
        for again in reversed(self.readers[name]):  # the finished image's places last
            data = again()
            if chunk_name(data) == name:
                self.store.put(key, encode_chunk(data)[1])
                return
        raise StoreError(f"chunk {name} was deleted from the store during the save and "
                         "no longer matches the image: save again")


@dataclass
class _Begun:
    """An upload begun: the bucket checked, its grace period read, the uploader ready."""

    store: Store
    report: UploadReport
    grace: float
    looked: float  # monotonic time the bucket's chunks were judged fresh against
    up: _Uploader


def _begin(loc: ObjectURL, chunk_size: int) -> _Begun:
    """Begin an upload to ``loc``: chunks a save may reuse are those written less than
    half the grace period before now, by the server's clock (see gc above)."""
    if chunk_size % PAGE_SIZE or chunk_size <= 0:
        raise ImageError(f"chunk size {chunk_size} is not a multiple of {PAGE_SIZE}")
    store = Store(loc.bucket)
    report = UploadReport(str(loc))
    grace = read_grace(store)
    now = server_now(store)  # also the check that the bucket takes writes
    looked = time.monotonic()
    fresh_after = datetime.fromtimestamp(now.timestamp() - grace / 2, UTC)
    return _Begun(store, report, grace, looked, _Uploader(store, report, fresh_after))


def _store_region(up: _Uploader, index: int, fd: int, pos: int, n: int,
                  size: int) -> ChunkRef | None:
    """Store chunk ``index``, bytes ``[pos, pos + n)`` of the image file ``fd`` (``size``
    bytes long); None when they are all zeros (not stored)."""
    data = _chunk_bytes(fd, pos, n, size)
    name = chunk_name(data)
    if name == _zero_name(n):
        return None
    return up.store_chunk(index, data, lambda: _reread(fd, pos, n), name)


class EarlyUpload:
    """Uploads the chunks of a staging image while it is still being written: the
    :class:`~fixedram.image.writer.PageObserver` of the image's writer.

    A chunk is taken once the writes have moved past it (a write lands in another chunk):
    QEMU sends a paused guest's pages once each, block by block in address order, so a
    chunk is then final. It is read where it lies (mapped from the file's cached pages,
    no copy) while the writer is kept out of it: a write to a chunk being read waits
    until the read is done (hash, compression, PUT), and a chunk is not read while a
    write to it is under way, so its name and stored bytes always agree. Each chunk's
    writes are counted; :func:`upload` uses a chunk's early upload only if the count is
    still the one it had when read, once the image is complete. Any chunk changed after
    it was read (a page sent again, a chunk taken before its last write) is uploaded
    again from the finished image before the manifest; its earlier upload is garbage for
    gc.
    """

    def __init__(self, url: str, *, chunk_size: int = CHUNK_SIZE,
                 workers: int = WORKERS) -> None:
        self.loc = parse_url(url)
        self.begun = _begin(self.loc, chunk_size)
        self.up = self.begun.up
        self.chunk_size = chunk_size
        self.cpages = chunk_size // PAGE_SIZE
        self.workers = workers
        self.cond = threading.Condition()
        self.fd = -1
        self.regions: dict[str, tuple[int, int]] = {}  # block -> pages offset, length
        self.writes: dict[tuple[str, int], int] = {}   # chunk -> writes into it done
        self.busy: dict[tuple[str, int], int] = {}     # chunk -> writes under way
        self.reading: dict[tuple[str, int], int] = {}  # chunk -> reads under way
        self.pending: dict[tuple[str, int], None] = {}  # written, not yet taken
        #: chunk -> (writes done when it was read, its ref; None: all zeros)
        self.read: dict[tuple[str, int], tuple[int, ChunkRef | None]] = {}
        self.futures: list[Future[None]] = []
        self.pool: ThreadPoolExecutor | None = None
        self.stopped = False

    # -- the writer's observer -------------------------------------------------------

    def begin(self, fd: int, blocks: Any) -> None:
        self.fd = os.dup(fd)
        self.regions = {n: (b.pages_offset, b.length) for n, b in blocks.items()}
        self.pool = ThreadPoolExecutor(self.workers, thread_name_prefix="fixedram-upload")

    def _keys(self, block: str, first_page: int, npages: int) -> list[tuple[str, int]]:
        return [(block, c) for c in range(first_page // self.cpages,
                                           (first_page + npages - 1) // self.cpages + 1)]

    def writing(self, block: str, first_page: int, npages: int) -> None:
        keys = self._keys(block, first_page, npages)
        with self.cond:
            while any(k in self.reading for k in keys):
                self.cond.wait()
            for k in keys:
                self.busy[k] = self.busy.get(k, 0) + 1

    def written(self, block: str, first_page: int, npages: int) -> None:
        keys = self._keys(block, first_page, npages)
        with self.cond:
            for k in keys:
                self.writes[k] = self.writes.get(k, 0) + 1
                left = self.busy.get(k, 0) - 1
                if left > 0:
                    self.busy[k] = left
                else:
                    self.busy.pop(k, None)
                self.pending[k] = None
            self.cond.notify_all()
            if len(self.pending) <= len(keys) or self.stopped or self.pool is None:
                return
            passed = [k for k in self.pending if k not in keys]
            for k in passed:
                del self.pending[k]
                self.futures.append(self.pool.submit(self._store, k))

    # -- the pool's work -------------------------------------------------------------

    def _store(self, k: tuple[str, int]) -> None:
        block, i = k
        with self.cond:
            while k in self.busy and not self.stopped:
                self.cond.wait()
            if self.stopped:
                return
            count = self.writes[k]
            self.reading[k] = self.reading.get(k, 0) + 1
        try:
            pos, length = self.regions[block]
            start = pos + i * self.chunk_size
            n = min(self.chunk_size, length - i * self.chunk_size)
            ref = _store_region(self.up, i, self.fd, start, n, os.fstat(self.fd).st_size)
            with self.cond:
                self.read[k] = (count, ref)
        except BaseException:
            with self.cond:
                self.stopped = True
            raise
        finally:
            with self.cond:
                left = self.reading.pop(k) - 1
                if left:
                    self.reading[k] = left
                self.cond.notify_all()

    # -- for upload() ----------------------------------------------------------------

    def finish(self) -> None:
        """Wait for the chunks taken so far (the image is complete: no more writes);
        re-raise the first failure."""
        for f in self.futures:
            f.result()
        self.futures = []

    def take(self, block: str, i: int) -> tuple[bool, ChunkRef | None]:
        """``(True, ref)`` when chunk ``i`` of ``block`` was stored as it is now in the
        image (``ref`` None: it was all zeros), else ``(False, None)``."""
        got = self.read.get((block, i))
        if got is None or got[0] != self.writes.get((block, i)):
            return False, None
        return True, got[1]

    def close(self) -> None:
        """Stop: drop chunks not started, wait for those under way, close the file."""
        with self.cond:
            self.stopped = True
            self.cond.notify_all()
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
            self.pool = None
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _list_chunks(store: Store) -> dict[str, ObjectInfo] | None:
    """The chunks of ``store``'s bucket by key, or None when there are more than
    :data:`LIST_MAX` or the listing failed (then the caller HEADs each chunk it needs,
    and those requests say what is wrong, if anything still is)."""
    listed: dict[str, ObjectInfo] = {}
    try:
        for o in store.list(CHUNK_PREFIX):
            listed[o.key] = o
            if len(listed) > LIST_MAX:
                return None
    except StoreError:
        return None
    return listed


def upload(path: str | os.PathLike[str], url: str, *, chunk_size: int = CHUNK_SIZE,
           workers: int = WORKERS, early: EarlyUpload | None = None) -> UploadReport:
    """Store the local mapped-ram image at ``path`` as the object image ``url``.

    Chunks the bucket already holds (written within half its grace period) are reused,
    the others uploaded, ``workers`` at a time; the manifest is written last, in one PUT,
    once every chunk is confirmed. Until then an earlier image at ``url`` stays intact.
    ``early``: the chunks it stored while the image was written (those still as they
    are in the image) are not read or stored again.
    """
    from fixedram.image.reader import open_image

    t0, c0 = time.monotonic(), time.process_time()
    loc = parse_url(url)
    if early is not None:
        early.finish()
        begun, chunk_size = early.begun, early.chunk_size
    else:
        begun = _begin(loc, chunk_size)
    store, report, up = begun.store, begun.report, begun.up
    grace, looked = begun.grace, begun.looked
    with open_image(path) as img:
        if img.format != "mapped-ram":
            raise ImageError(f"{path}: only mapped-ram images go to an object store "
                             "(fixedram convert makes one)")
        cpages = chunk_size // PAGE_SIZE
        blocks: list[BlockEntry] = []
        fd = img.fileno()
        with ThreadPoolExecutor(workers, thread_name_prefix="fixedram-upload") as pool:
            sem = threading.BoundedSemaphore(2 * workers)
            size = os.fstat(fd).st_size

            def one(be: BlockEntry, i: int, pos: int, n: int) -> None:
                try:
                    ref = _store_region(up, i, fd, pos, n, size)
                    with up.lock:
                        if ref is None:
                            report.zero_chunks += 1
                        else:
                            report.data_bytes += n
                            be.chunks[i] = ref
                finally:
                    sem.release()

            futs: list[Future[None]] = []
            for name, blk in img.blocks.items():
                assert blk.mapped is not None
                be = BlockEntry(name, blk.length, blk.mapped.pages_offset)
                blocks.append(be)
                for i in _chunks_with_data(img, name, cpages):
                    start = i * chunk_size
                    n = min(chunk_size, blk.length - start)
                    if early is not None:
                        done, ref = early.take(name, i)
                        if done:
                            with up.lock:
                                if ref is None:
                                    report.zero_chunks += 1
                                else:
                                    report.data_bytes += n
                                    report.early += 1
                                    be.chunks[i] = ref
                            continue
                    sem.acquire()
                    futs.append(pool.submit(one, be, i, blk.mapped.pages_offset + start, n))
                    if futs[0].done():
                        futs.pop(0).result()  # a failure stops the walk early
            for f in futs:
                f.result()
            man = Manifest(img.file_size, chunk_size, ChunkRef(-1, "0" * 32, "raw", 0), 0,
                           blocks, img.machine,
                           datetime.now(UTC).isoformat(timespec="seconds"))
            meta = bytearray()
            for off, n in man.regions():
                part = memoryview(bytearray(n))
                _pread_all(fd, part, off)
                meta += part
            man.meta = up.store_chunk(-1, memoryview(meta))
            man.meta_length = len(meta)
        man.data_bytes = report.data_bytes
        report.chunks = sum(1 for _ in man.refs())
        report.stored_bytes = sum(r.stored for r in man.refs())
        doc = man.to_json()
        if len(doc) > MAX_MANIFEST:
            raise ImageError(f"{loc}: the manifest would take {len(doc)} bytes, more than "
                             f"the {MAX_MANIFEST} a reader accepts (a smaller chunk size "
                             "than this image needs); nothing was written")
        if time.monotonic() - looked > grace / 2:
            raise StoreError(f"{loc}: the upload took longer than half the bucket's gc grace "
                             f"period ({grace:.0f} s): its chunks may have been collected; "
                             "nothing was written, save again")
        store.put(loc.key, doc)
        report.restored = up.restore_deleted({r.key for r in man.refs()}, workers)
    report.seconds = time.monotonic() - t0
    report.cpu_seconds = time.process_time() - c0
    return report


def preflight(url: str) -> Store:
    """Check, before anything irreversible, that ``url``'s bucket takes writes with these
    credentials (one tiny object written and deleted); StoreError in one line if not."""
    loc = parse_url(url)
    store = Store(loc.bucket)
    server_now(store)
    return store


@contextmanager
def staging(image: str) -> Iterator[tuple[str, Callable[[], UploadReport | None],
                                          EarlyUpload | None]]:
    """``(path, finish, early)``: the local path a command writes the image ``image`` to,
    the function that stores it there, and the observer to give the image's writer so
    that chunks are uploaded while it writes (:class:`EarlyUpload`). For a local
    ``image`` that is ``image`` itself, ``finish`` does nothing (returns None) and
    ``early`` is None; for an object (``s3://bucket/key``) a staging file (the store
    checked first, before anything irreversible) that ``finish`` uploads (what was not
    already), removed in every case when the block ends. The caller chooses when to
    finish (a save does it while it still controls the VM)."""
    if not is_object_url(image):
        yield image, lambda: None, None
        return
    early = EarlyUpload(image)  # checks the store first
    try:
        with _stage_dir(image, checked=True) as local:
            yield str(local), lambda: upload(local, image, early=early), early
    finally:
        early.close()


@contextmanager
def _stage_dir(url: str, *, checked: bool = False) -> Iterator[Path]:
    """A staging path for ``url`` (FIXEDRAM_STAGING, else TMPDIR, else /var/tmp), the store
    checked first (unless ``checked``: the caller did); the directory is removed when the
    block ends."""
    if not checked:
        preflight(url)
    base = os.environ.get("FIXEDRAM_STAGING") or os.environ.get("TMPDIR") or "/var/tmp"
    d = tempfile.mkdtemp(prefix="fixedram-stage-", dir=base)
    try:
        with scratch_writes():  # read back at once, then removed: no fsync, kept cached
            yield Path(d) / "image"
    finally:
        shutil.rmtree(d, ignore_errors=True)


@contextmanager
def staged(url: str, reports: list[UploadReport]) -> Iterator[Path]:
    """A local path to write an image to, uploaded to ``url`` once the block succeeds
    (the report appended to ``reports``); the local copy is removed in every case.

    The staging directory is ``FIXEDRAM_STAGING``, else ``TMPDIR``, else ``/var/tmp``:
    it needs room for the image's data (holes cost nothing).
    """
    with _stage_dir(url) as local:
        yield local
        reports.append(upload(local, url))


@contextmanager
def local_image(image: str) -> Iterator[tuple[str, list[Any]]]:
    """The local path a command writes the image ``image`` to: ``image`` itself, or for an
    object (``s3://bucket/key``) a staging file uploaded when the command succeeds (the
    store is checked first, before anything irreversible). Yields ``(path, uploads)``:
    ``uploads`` holds the upload's report afterwards."""
    uploads: list[Any] = []
    if not is_object_url(image):
        yield image, uploads
        return
    with staged(image, uploads) as local:
        yield str(local), uploads



def _chunk_bytes(fd: int, pos: int, n: int, size: int) -> memoryview:
    """Bytes ``[pos, pos + n)`` of the image file ``fd`` (``size`` bytes long): mapped
    from the page cache where they lie inside the file (the staging copy is read back
    while cached: no copy into a buffer of ours, and none to allocate and zero), else
    read (a region past the end of a short file reads as zeros). The image must not
    shrink meanwhile: it is the upload's own staging copy."""
    if pos % mmap.ALLOCATIONGRANULARITY == 0 and pos + n <= size:
        try:
            m = mmap.mmap(fd, n, flags=mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0),
                          prot=mmap.PROT_READ, offset=pos)
        except OSError:
            pass  # a filesystem that cannot map files: read
        else:
            return memoryview(m)  # unmapped when the last view of it goes
    return _reread(fd, pos, n)


def _reread(fd: int, pos: int, n: int) -> memoryview:
    buf = memoryview(bytearray(n))
    _pread_all(fd, buf, pos)
    return buf


def _pread_all(fd: int, buf: memoryview, pos: int) -> None:
    got = 0
    while got < len(buf):
        n = os.preadv(fd, [buf[got:]], pos + got)
        if n <= 0:  # a short file: the rest of the region reads as zeros
            buf[got:] = bytes(len(buf) - got)
            return
        got += n


def _chunks_with_data(img: Any, name: str, cpages: int) -> Iterator[int]:
    """Indices of the chunks of block ``name`` that hold at least one page of data, in
    order (found with numpy from the runs a piece of the bitmap at a time: no Python per
    run)."""
    last = -1
    for starts, lengths in img.run_arrays(name):
        a = starts // cpages
        b = (starts + lengths - 1) // cpages
        counts = b - a + 1  # the chunks each run lies in: a, a + 1 ... b
        ends = np.cumsum(counts)
        idx = np.repeat(a - (ends - counts), counts) + np.arange(int(ends[-1]))
        yield from np.unique(idx[idx > last]).tolist()
        last = max(last, int(b.max()))


def read_manifest(store: Store, loc: ObjectURL) -> Manifest:
    """The manifest at ``loc`` (StoreError when there is none, ImageError when unusable)."""
    info = store.head(loc.key)
    if info is None:
        next(iter(store.list(loc.key)), None)  # a missing bucket says so here (HEAD cannot)
        raise StoreError(f"{loc}: no such object")
    if info.size > MAX_MANIFEST:
        raise ImageError(f"{loc}: not a fixedram manifest ({info.size} bytes)")
    return Manifest.parse(store.get(loc.key), str(loc))


# -- garbage collection ---------------------------------------------------------------------


@dataclass
class GcReport:
    """What :func:`collect_garbage` found and did."""

    bucket: str
    grace_seconds: float
    manifests: int = 0
    chunks: int = 0
    referenced: int = 0
    young: int = 0
    changed: int = 0          # old in the listing, rewritten (or gone) since: kept
    deleted: int = 0
    deleted_bytes: int = 0
    records: int = 0          # working-set records in the bucket
    orphan_records: int = 0   # of those, of keys holding no image, old enough: deleted
    dry_run: bool = False

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    def summary(self) -> str:
        verb = "would delete" if self.dry_run else "deleted"
        return (f"gc s3://{self.bucket}: {self.manifests} manifests, {self.chunks} chunks: "
                f"{self.referenced} referenced, {self.young} unreferenced but younger than "
                f"{self.grace_seconds:.0f} s, {self.changed} rewritten since listed, "
                f"{verb} {self.deleted} "
                f"({self.deleted_bytes / 2**20:.1f} MiB); {self.records} working-set "
                f"records, {verb} {self.orphan_records} of deleted images")


def collect_garbage(bucket_url: str, *, grace: float | None = None,
                    dry_run: bool = False) -> GcReport:
    """Delete the chunks of a bucket that no manifest names and that are older than the
    bucket's grace period (``grace`` sets a new one first; not with ``dry_run``), and the
    working-set records (:data:`RECORD_PREFIX`) of keys that hold no image, older than the
    grace period too. Any object outside ``.fixedram/`` that starts like a manifest but
    cannot be read (or is larger than a reader accepts) stops gc before it deletes
    anything. Each object is HEADed just before it is deleted and kept if it changed since
    the listing (a save, or a lazy restore, wrote it again)."""
    loc = parse_url(bucket_url, key=False)
    if loc.key:
        raise StoreError(f"gc works on a whole bucket (s3://{loc.bucket}), not on "
                         f"{bucket_url}: chunks are shared by every image of the bucket")
    store = Store(loc.bucket)
    if grace is not None and not dry_run:
        write_grace(store, grace)
    g = read_grace(store) if grace is None else grace
    report = GcReport(loc.bucket, g, dry_run=dry_run)
    now = server_now(store)
    # chunks and records are listed before the manifests are read
    chunks = list(store.list(CHUNK_PREFIX))
    records = list(store.list(RECORD_PREFIX))
    report.chunks = len(chunks)
    report.records = len(records)
    used: set[str] = set()
    images: set[str] = set()
    for obj in store.list(""):
        if obj.key.startswith(RESERVED) or not obj.size:
            continue
        head = store.get_range(obj.key, 0, min(obj.size, 64))
        if MAGIC.encode() not in bytes(head):
            continue
        if obj.size > MAX_MANIFEST:
            raise ImageError(f"{store.where(obj.key)}: a manifest of {obj.size} bytes, more "
                             f"than the {MAX_MANIFEST} a reader accepts: gc stops, nothing "
                             "deleted (remove or replace that object first)")
        man = Manifest.parse(store.get(obj.key), store.where(obj.key))
        report.manifests += 1
        images.add(obj.key)
        used.update(r.key for r in man.refs())

    def old(o: ObjectInfo) -> bool:
        return (now - o.modified).total_seconds() >= g

    doomed = []
    for c in chunks:
        if c.key in used:
            report.referenced += 1
        elif not old(c):
            report.young += 1
        else:
            doomed.append(c)
    # a record of a key with no image: the image was deleted (a record is only ever
    # written by a lazy restore of an existing image; an old one bound to a manifest
    # written since is stale, and deleting it costs only the hint)
    orphans = [r for r in records if r.key[len(RECORD_PREFIX):] not in images and old(r)]
    if dry_run:
        report.deleted = len(doomed)
        report.deleted_bytes = sum(c.size for c in doomed)
        report.orphan_records = len(orphans)
        return report
    for i in range(0, len(doomed), 100):  # checked just before: a short window per batch
        batch = [c for c in doomed[i : i + 100] if _unchanged(store, c)]
        report.changed += min(100, len(doomed) - i) - len(batch)
        store.delete(c.key for c in batch)
        report.deleted += len(batch)
        report.deleted_bytes += sum(c.size for c in batch)
    gone = [r for r in orphans if _unchanged(store, r)]
    store.delete(r.key for r in gone)
    report.orphan_records = len(gone)
    return report


def _unchanged(store: Store, listed: ObjectInfo) -> bool:
    """Whether ``listed`` is still as the listing showed it (not written again)."""
    now = store.head(listed.key)
    return now is not None and now.modified == listed.modified and now.size == listed.size
