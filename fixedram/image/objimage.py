"""Reading an image kept in an object store (``s3://bucket/key``, :mod:`fixedram.image.chunked`).

:func:`open_object_image` reads the manifest and the meta chunk, lays the meta chunk's
bytes out at their file offsets in an anonymous sparse memory file, and parses that as a
mapped-ram file: the result, an :class:`ObjectImage`, answers every question a local
:class:`~fixedram.image.reader.MappedRamImage` answers (blocks, bitmaps, device state,
the checksum extension) and reads page data from the chunks instead of a file.

Page data: :class:`ChunkSource` fetches a chunk the first time a page of it is read,
checks it against the manifest (xxh3-128 of its bytes) before any byte of it is used,
reads ahead the next ones of the block in parallel GETs when a reader moves on to the
next chunk (not for random requests; in a lazy restore each chunk at most once) and keeps
recent ones in memory, so a sequential
reader (a full restore, verify, the background push of a lazy restore) runs at the
store's parallel speed while a random one (a lazy restore's page
requests) pays one GET per chunk. Chunks read ahead for a sequential reader leave memory
once it has passed them (memory bounded by the read-ahead window); those of random
requests stay among the most recently used. A :class:`DiskCache` (on by default, shared by every
fixedram process of the user) keeps the chunks readers asked for (not those read ahead),
so a guest's working set is fetched from the store once per host; a lazy restore keeps
every chunk it fetches (:meth:`ObjectImage.shared_reads`), and processes about to fetch
the same chunk wait for one another (a lock file per chunk), so a fan-out of lazy
restores of one image fetches each chunk about once. Chunks go into the disk cache in a
writer thread: a reader does not wait for the disk.

An object image's working-set record (:mod:`fixedram.image.workingset`) is a small object
of its own next to the manifest (:data:`RECORD_PREFIX` + key), read and written whole by
:meth:`ObjectImage.read_record` / :meth:`ObjectImage.write_record`.

An object image has no file holding its page data: :attr:`ObjectImage.pages_in_file` is
False, so code that would hand the image's file descriptor to ``sendfile`` or look for
holes in it reads pages through :meth:`~fixedram.image.reader.Image.read_slots` instead,
or, where it sends them on (:attr:`ObjectImage.holds_pages`), takes them as views of the
checked chunks (:meth:`ObjectImage.page_views`): chunks are immutable once checked.
Its :meth:`fileno` is the memory file holding the metadata (headers, bitmaps, the
checksum extension, the stream tail) at their offsets.
"""

from __future__ import annotations

import bisect
import collections
import contextlib
import dataclasses
import fcntl
import os
import tempfile
import threading
from collections import OrderedDict
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from fixedram._lazy import numpy as np
from fixedram.errors import FixedramError, ImageError, StoreError
from fixedram.image.chunked import (
    RECORD_PREFIX,
    WORKERS,
    ChunkRef,
    Manifest,
    decode_chunk,
    read_manifest,
)
from fixedram.image.layout import PAGE_SIZE
from fixedram.image.reader import BlockInfo, MappedRamImage, PageSlots, open_image
from fixedram.io.objstore import ObjectURL, Store, parse_url
from fixedram.log import warn

__all__ = ["open_object_image", "ObjectImage", "ChunkSource", "DiskCache", "cache_from_env",
           "RECORD_PREFIX"]

#: Chunks read ahead of the one asked for, in the same block (64 MiB at 4 MiB chunks):
#: enough to ride out a slow GET or a burst of the reader's while QEMU loads.
READ_AHEAD = 16
#: Chunks a sequential reader keeps behind the one it reads (those read ahead for it and
#: passed are dropped from memory then, not when they are the least recently used:
#: bounded memory, and the allocator hands their freed memory to the next chunks while
#: it is still mapped, instead of faulting in fresh pages; a chunk still referenced, e.g.
#: by a view a sender has queued, stays as it is).
BEHIND = 2
#: Chunks of a block asked for last that count as where its readers are: a request for
#: the chunk after one of them reads ahead (:meth:`ChunkSource._moves_on`), so a background
#: push keeps its read-ahead while page requests come in between.
RECENT = 4
#: Chunks kept in memory (the most recently used): a lazy restore's page requests come
#: back to the chunks of the guest's working set while the background push goes on.
MEMORY_CHUNKS = 32
#: Default bound of the shared chunk cache (bytes).
CACHE_MAX = 4 << 30
#: Chunks waiting for the cache writer at most (their buffers stay in memory meanwhile);
#: a fetch that finds this many waiting writes its chunk itself.
CACHE_PENDING = 8
#: The largest working-set record object read (a record holds at most 64 KiB).
RECORD_MAX = 1 << 20


class DiskCache:
    """Chunks as fetched (compressed or not), one file per chunk named by its key, shared
    safely by concurrent processes: a chunk is written under a temporary name and renamed
    into place (readers see a whole file or none), and every chunk read from the cache is
    checked against its name like one from the store (a damaged file is dropped and
    fetched again). Bounded: when the files pass ``max_bytes`` the least recently used
    (by modification time, renewed on every hit) are removed."""

    def __init__(self, root: str | os.PathLike[str], max_bytes: int = CACHE_MAX) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.max_bytes = max_bytes
        self._added = 0
        self._lock = threading.Lock()

    def _path(self, key: str) -> Path:
        name = key.rsplit("/", 1)[-1]
        return self.root / name[:2] / name

    def get(self, key: str) -> bytes | None:
        p = self._path(key)
        try:
            data = p.read_bytes()
            os.utime(p)
            return data
        except OSError:
            return None

    def lock(self, key: str) -> int | None:
        """Take chunk ``key``'s lock file (``<name>.lock`` beside it, an exclusive
        ``flock``), waiting for the process that holds it: processes that would fetch the
        same chunk at the same time fetch it one after the other, and those that waited find
        it in the cache. Returns the lock's descriptor for :meth:`unlock` (None: the cache
        cannot hold the lock, and just does not coalesce)."""
        p = self._path(key)
        try:
            p.parent.mkdir(exist_ok=True)
            fd = os.open(p.with_name(p.name + ".lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC,
                         0o600)
        except OSError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def unlock(self, key: str, fd: int | None) -> None:
        """Release a lock :meth:`lock` took."""
        if fd is None:
            return
        p = self._path(key)
        with contextlib.suppress(OSError):
            os.unlink(p.with_name(p.name + ".lock"))  # waiters hold the old file; they
            # find the chunk cached
        os.close(fd)

    @contextlib.contextmanager
    def locked(self, key: str) -> Iterator[None]:
        """:meth:`lock` and :meth:`unlock` around a block."""
        fd = self.lock(key)
        try:
            yield
        finally:
            self.unlock(key, fd)

    def drop(self, key: str) -> None:
        with contextlib.suppress(OSError):
            self._path(key).unlink()

    def put(self, key: str, data: Any) -> None:
        """Keep chunk ``key`` (its bytes as stored). A full or read-only cache costs a
        refetch, never the restore."""
        p = self._path(key)
        try:
            p.parent.mkdir(exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=".tmp-")
            try:
                try:
                    self._write(fd, data)
                finally:
                    os.close(fd)
                os.replace(tmp, p)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
        except OSError:
            return
        with self._lock:
            self._added += len(data)
            trim = self._added > self.max_bytes // 8
            if trim:
                self._added = 0
        if trim:
            self.trim()

    @staticmethod
    def _write(fd: int, data: Any) -> None:
        view = memoryview(data).cast("B")
        done = 0
        while done < len(view):
            done += os.pwrite(fd, view[done:], done)

    def trim(self) -> None:
        """Remove least recently used chunks until the cache is under its bound."""
        files = []
        for sub in self.root.iterdir():
            if sub.is_dir():
                for f in sub.iterdir():
                    if f.name.startswith(".tmp-") or f.name.endswith(".lock"):
                        continue  # another process's write or lock in progress
                    with contextlib.suppress(OSError):
                        st = f.stat()
                        files.append((st.st_mtime, st.st_size, f))
        total = sum(s for _, s, _ in files)
        for _, size, f in sorted(files):
            if total <= self.max_bytes:
                break
            with contextlib.suppress(OSError):
                f.unlink()
            total -= size


def cache_from_env() -> DiskCache | None:
    """The shared chunk cache: ``FIXEDRAM_CHUNK_CACHE`` (a directory, or ``off``), else
    ``$XDG_CACHE_HOME/fixedram/chunks`` (``~/.cache/...``); bounded by
    ``FIXEDRAM_CHUNK_CACHE_MAX`` bytes (default 4 GiB)."""
    where = os.environ.get("FIXEDRAM_CHUNK_CACHE")
    if where == "off":
        return None
    if not where:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
        where = os.path.join(base, "fixedram", "chunks")
    try:
        cap = int(os.environ.get("FIXEDRAM_CHUNK_CACHE_MAX", CACHE_MAX))
        return DiskCache(where, cap)
    except (OSError, ValueError):
        return None


class ChunkSource:
    """Fetches, checks, caches and reads ahead the chunks of one object image."""

    def __init__(self, store: Store, manifest: Manifest, where: str,
                 cache: DiskCache | None, workers: int = WORKERS) -> None:
        self.store = store
        self.manifest = manifest
        self.where = where
        self.cache = cache
        self.pool = ThreadPoolExecutor(workers, thread_name_prefix="fixedram-fetch")
        self.lock = threading.Lock()
        self.mem: OrderedDict[tuple[str, int], memoryview] = OrderedDict()
        self.flight: dict[tuple[str, int], Future[memoryview]] = {}
        self.keep = max(MEMORY_CHUNKS, READ_AHEAD + workers + BEHIND)
        #: chunks fetched by read-ahead that no reader asked for yet
        self.ahead: set[tuple[str, int]] = set()
        #: chunks read ahead so far (:meth:`ObjectImage.read_ahead_once`)
        self.read_ahead: set[tuple[str, int]] = set()
        #: read a chunk ahead at most once
        self.once = False
        #: read-ahead chunks a sequential reader has reached, oldest first
        self.passed: collections.deque[tuple[str, int]] = collections.deque()
        self.last: dict[str, int] = {}
        #: the last chunks readers asked for, per block (:meth:`_moves_on`)
        self.recent: dict[str, collections.deque[int]] = {}
        self.blocks = {b.name: b for b in manifest.blocks}
        self.order = {b.name: sorted(b.chunks) for b in manifest.blocks}
        self.fetched = 0
        self.fetched_bytes = 0
        self.cache_hits = 0
        #: keep the chunks read ahead in the disk cache too (:meth:`ObjectImage.shared_reads`)
        self.share = False
        #: writes chunks into the disk cache (:meth:`_keep`), at most CACHE_PENDING waiting
        self.writer = ThreadPoolExecutor(1, thread_name_prefix="fixedram-cache")
        self.writes = threading.Semaphore(CACHE_PENDING)

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)
        self.writer.shutdown(wait=True)  # the cache writes under way finish, and unlock

    def length(self, block: str, index: int) -> int:
        b = self.blocks[block]
        return min(self.manifest.chunk_size, b.length - index * self.manifest.chunk_size)

    def fetch(self, ref: ChunkRef, length: int, *, keep: bool = True) -> memoryview:
        """One chunk's bytes, from the cache or the store, checked against its name;
        ``keep``: a chunk fetched from the store goes into the disk cache, and processes
        fetching it at the same time wait for one another (:meth:`DiskCache.lock`)."""
        data = self._cached(ref, length)
        if data is not None:
            return data
        if self.cache is None or not keep:
            return self._get(ref, length)[1]
        fd = self.cache.lock(ref.key)
        handed = False
        try:
            data = self._cached(ref, length)  # fetched by another process meanwhile
            if data is not None:
                return data
            got, data = self._get(ref, length)
            handed = self._keep(ref.key, got, fd)
            return data
        finally:
            if not handed:
                self.cache.unlock(ref.key, fd)

    def _keep(self, key: str, got: memoryview, fd: int | None) -> bool:
        """Put a fetched chunk into the disk cache and release its lock: in the cache
        writer's thread (the reader does not wait for the disk; True: it unlocks), or here
        when :data:`CACHE_PENDING` writes are waiting already (False)."""
        assert self.cache is not None
        if self.writes.acquire(blocking=False):
            try:
                self.writer.submit(self._write_cached, key, got, fd)
                return True
            except RuntimeError:  # closing: write it here
                self.writes.release()
        self.cache.put(key, got)
        return False

    def _write_cached(self, key: str, got: memoryview, fd: int | None) -> None:
        assert self.cache is not None
        try:
            self.cache.put(key, got)
        finally:
            self.cache.unlock(key, fd)
            self.writes.release()

    def _cached(self, ref: ChunkRef, length: int) -> memoryview | None:
        if self.cache is None:
            return None
        raw = self.cache.get(ref.key)
        if raw is None:
            return None
        try:
            data = decode_chunk(raw, ref.codec, length, ref.name, self.where)
        except ImageError:
            self.cache.drop(ref.key)
            return None
        with self.lock:
            self.cache_hits += 1
        return data

    def _get(self, ref: ChunkRef, length: int) -> tuple[memoryview, memoryview]:
        """``(as stored, checked bytes)`` of a chunk fetched from the store."""
        got = self.store.get(ref.key)
        data = decode_chunk(got, ref.codec, length, ref.name, self.where)
        with self.lock:
            self.fetched += 1
            self.fetched_bytes += len(got)
        return got, data

    def _future(self, block: str, index: int, asked: bool
                ) -> Future[memoryview] | memoryview | None:
        """Under the lock: the chunk if in memory, its fetch (started if need be), or None
        when the chunk is not stored (reads as zeros). ``asked``: a reader waits for this
        chunk (else it is read ahead)."""
        key = (block, index)
        got = self.mem.get(key)
        if got is not None:
            self.mem.move_to_end(key)
            return got
        fut = self.flight.get(key)
        if fut is None:
            ref = self.blocks[block].chunks.get(index)
            if ref is None:
                return None
            fut = self.pool.submit(self._fetch_into_memory, block, index, ref, asked)
            self.flight[key] = fut
            if not asked:
                self.ahead.add(key)
                self.read_ahead.add(key)
        return fut

    def _moves_on(self, block: str, index: int) -> bool:
        """Under the lock: whether a reader asking for chunk ``index`` reads ahead: it
        moves on to ``index`` from the stored chunk before it (one of the block's last
        :data:`RECENT` chunks asked for), or it is the first request of the block. Not a
        reader still in a chunk it asked for before, and not a random request: were each of
        a lazy restore's page requests and working-set prefetches to read 16 chunks ahead,
        they would push one another out of memory before use, and every chunk would be read
        back from the disk cache and checked again several times (docs/object-storage.md)."""
        rec = self.recent.setdefault(block, collections.deque(maxlen=RECENT))
        if index in rec:
            rec.remove(index)
            rec.append(index)
            return False
        order = self.order[block]
        at = bisect.bisect_left(order, index)
        on = not rec or (at > 0 and order[at - 1] in rec)
        rec.append(index)
        return on

    def _reached(self, block: str, index: int) -> None:
        """Under the lock: a reader asks for chunk ``index``. When it was read ahead for
        a sequential reader (the block's previous request was for it or the one before),
        the read-ahead chunks more than :data:`BEHIND` behind it leave memory; chunks of
        random requests stay (the working set of a lazy restore)."""
        key = (block, index)
        last = self.last.get(block)
        self.last[block] = index
        if key not in self.ahead:
            return
        self.ahead.discard(key)
        if last is None:
            return
        order = self.order[block]
        nxt = bisect.bisect_right(order, last)
        if index != last and not (nxt < len(order) and order[nxt] == index):
            return
        if not self.passed or self.passed[-1] != key:
            self.passed.append(key)
        while len(self.passed) > BEHIND:
            self.mem.pop(self.passed.popleft(), None)

    def _fetch_into_memory(self, block: str, index: int, ref: ChunkRef,
                           asked: bool) -> memoryview:
        # the disk cache keeps the chunks readers asked for (a lazy restore's page
        # requests: the guest's working set), not those read ahead of a sequential read,
        # unless other processes may read them too (share)
        data = self.fetch(ref, self.length(block, index), keep=asked or self.share)
        with self.lock:
            self.flight.pop((block, index), None)
            self.mem[(block, index)] = data
            while len(self.mem) > self.keep:
                self.mem.popitem(last=False)
        return data

    def chunk(self, block: str, index: int) -> memoryview | None:
        """Chunk ``index`` of ``block`` (None: not stored, all zeros); reads ahead."""
        with self.lock:
            got = self._future(block, index, True)
            ahead = self._moves_on(block, index)
            self._reached(block, index)
            if ahead:
                order = self.order[block]
                at = bisect.bisect_right(order, index)
                for nxt in order[at : at + READ_AHEAD]:
                    if (block, nxt) not in self.mem and not (
                            self.once and (block, nxt) in self.read_ahead):
                        self._future(block, nxt, False)
        if isinstance(got, Future):
            try:
                return got.result()
            except BaseException:
                with self.lock:
                    self.flight.pop((block, index), None)
                raise
        return got


class ObjectImage(MappedRamImage):
    """A mapped-ram image whose page data lives in an object store's chunks."""

    pages_in_file = False
    pages_checked = True  # each chunk against its name before any byte of it is used
    holds_pages = True  # checked chunks are immutable bytes: page_views gives them as they are
    url: ObjectURL
    source: ChunkSource

    @property
    def where(self) -> str:
        return str(self.url)

    def close(self) -> None:
        src = self.__dict__.get("source")
        if src is not None:
            src.close()
        super().close()

    def open_direct(self, mode: Any = True) -> bool:
        """No local file: nothing for O_DIRECT to bypass. ``"required"`` raises; any other
        true ``mode`` warns once and the chunks are read as always."""
        if mode == "required":
            raise FixedramError(f"{self.url}: an object image has no local file to read "
                                "with O_DIRECT")
        if mode and not self.__dict__.get("_direct_warned"):
            self.__dict__["_direct_warned"] = True
            warn("%s: an object image has no local file to read with O_DIRECT; reading its "
                 "chunks as always", self.url)
        return False

    def shared_reads(self) -> None:
        """Keep every chunk fetched in the shared disk cache, read ahead or not: other
        processes reading the image at the same time (a fan-out of lazy restores) take them
        from there, or wait for this one's fetch, instead of fetching them again."""
        self.source.share = True

    def read_ahead_once(self) -> None:
        """Read each chunk ahead at most once: one read ahead before and dropped from memory
        is read again only when a reader asks for it. For a reader that takes each page
        once (a lazy restore: page requests, working-set prefetch and push together send
        every page once), where chunks read ahead again are mostly chunks whose pages were
        sent already: in a lazy restore of the ``bench/s3.py`` image they were read back
        from the disk cache and checked again 445 times for 168 fetched
        (docs/object-storage.md). A reader that reads the image twice (``verify``) keeps
        reading ahead on its second pass."""
        self.source.once = True

    @property
    def fetched_bytes(self) -> int:
        return self.source.fetched_bytes

    @property
    def record_key(self) -> str:
        """The key of this image's working-set record in its bucket."""
        return RECORD_PREFIX + self.url.key

    def read_record(self) -> bytes | None:
        """The working-set record object's bytes (None: there is none). StoreError when the
        store cannot be read."""
        info = self.source.store.head(self.record_key)
        if info is None:
            return None
        try:  # a record is at most 64 KiB: a larger object is cut and found damaged
            return bytes(self.source.store.get_range(self.record_key, 0,
                                                     min(info.size, RECORD_MAX)))
        except StoreError:
            if self.source.store.head(self.record_key) is None:
                return None  # deleted between the two requests
            raise

    def write_record(self, data: bytes) -> None:
        """Store the working-set record object (one PUT: readers see the old or the new
        one). StoreError when the store refuses it."""
        self.source.store.put(self.record_key, data)

    def prefetch(self) -> None:
        """Start fetching the first chunks a sequential read of the image asks for (those
        a full restore's stream starts with), so that they arrive while the caller sets
        up the destination."""
        src = self.source
        with src.lock:
            for name in self.blocks:
                order = src.order.get(name)
                if order:
                    for i in order[:READ_AHEAD]:
                        src._future(name, i, False)
                    return

    def allocated_bytes(self) -> int:
        return sum(r.stored for r in self.source.manifest.refs())

    def stored_bytes(self, name: str) -> int:
        """Bytes the chunks of block ``name`` take in the store."""
        return sum(r.stored for b in self.source.manifest.blocks if b.name == name
                   for r in b.chunks.values())

    def check_chunks(self) -> tuple[list[str], int]:
        """Fetch every chunk and check it against the manifest: ``(problems, chunks)``."""
        probs: list[str] = []
        n = 0
        for b in self.source.manifest.blocks:
            for i in sorted(b.chunks):
                n += 1
                try:
                    self.source.chunk(b.name, i)
                except ImageError as e:
                    probs.append(f"RAM block '{b.name}' chunk {i}: {e}")
                except StoreError:
                    ref = b.chunks[i]
                    if self.source.store.head(ref.key) is not None:
                        raise  # the store failed, not the image: stop (one line)
                    probs.append(f"RAM block '{b.name}' chunk {i}: chunk {ref.name} is "
                                 f"missing from the bucket ({ref.key})")
        return probs, n

    def page_offset(self, name: str, first_page: int) -> int:
        raise ImageError(f"{self.url}: an object image has no page data in a file")

    def _read_into(self, blk: BlockInfo, first: int, dest: memoryview) -> None:
        self._copy(blk.name, first, len(dest) // PAGE_SIZE,
                   np.frombuffer(dest, np.uint8).reshape(-1, PAGE_SIZE))

    def read_slots(self, name: str, first_page: int, npages: int, slots: PageSlots) -> int:
        self.block(name)
        assert 0 < npages <= slots.count
        self._copy(name, first_page, npages, slots.array[:npages])
        return 1

    def page_views(self, name: str, first_page: int, npages: int) -> list[memoryview]:
        """Pages ``[first_page, first_page + npages)`` of ``name`` as views of their checked
        chunks (one per chunk they lie in; a chunk not stored reads as zeros). A view keeps
        its chunk's bytes alive after the chunk leaves the image's memory."""
        blk = self.block(name)
        if first_page < 0 or npages < 0 or first_page + npages > blk.npages:
            raise ImageError(f"pages {first_page}..{first_page + npages} outside block "
                             f"'{name}'")
        per = self.source.manifest.chunk_size // PAGE_SIZE
        out: list[memoryview] = []
        done = 0
        while done < npages:
            i, off = divmod(first_page + done, per)
            k = min(per - off, npages - done)
            data = self.source.chunk(name, i)
            if data is None:
                out.append(self._zeros()[: k * PAGE_SIZE])
            else:
                out.append(data[off * PAGE_SIZE : (off + k) * PAGE_SIZE])
            done += k
        return out

    def _zeros(self) -> memoryview:
        """A chunk's worth of zero bytes, made once."""
        z = self.__dict__.get("_zero_chunk")
        if z is None:
            z = self.__dict__["_zero_chunk"] = memoryview(
                bytes(self.source.manifest.chunk_size))
        return z

    def _copy(self, name: str, first: int, npages: int, out: np.ndarray) -> None:
        """Pages ``[first, first + npages)`` of block ``name`` into ``out`` (npages x 4096)."""
        per = self.source.manifest.chunk_size // PAGE_SIZE
        done = 0
        while done < npages:
            p = first + done
            i, off = divmod(p, per)
            k = min(per - off, npages - done)
            data = self.source.chunk(name, i)
            if data is None:
                out[done : done + k] = 0
            else:
                out[done : done + k] = np.frombuffer(
                    data, np.uint8, k * PAGE_SIZE, off * PAGE_SIZE).reshape(k, PAGE_SIZE)
            done += k


def open_object_image(url: str, *, cache: DiskCache | bool | None = True) -> ObjectImage:
    """Open the object image at ``url`` (``s3://bucket/key``).

    Reads the manifest and the meta chunk (both checked) and nothing of the page data.
    ``cache``: True for the shared chunk cache (:func:`cache_from_env`), False for none,
    or a :class:`DiskCache`.
    """
    loc = parse_url(url)
    store = Store(loc.bucket)
    man = read_manifest(store, loc)
    where = str(loc)
    dc = cache_from_env() if cache is True else (cache or None)
    src = ChunkSource(store, man, where, dc)
    fd = -1
    try:
        meta = src.fetch(man.meta, man.meta_length)
        fd = os.memfd_create("fixedram-meta", os.MFD_CLOEXEC)
        os.ftruncate(fd, man.file_size)
        pos = 0
        for off, n in man.regions():
            view = meta[pos : pos + n]
            w = 0
            while w < n:
                w += os.pwrite(fd, view[w:], off + w)
            pos += n
        with open_image(f"/proc/self/fd/{fd}") as local:
            fields = {f.name: getattr(local, f.name)
                      for f in dataclasses.fields(local) if f.init}
            if local.format != "mapped-ram":
                raise ImageError(f"{where}: the manifest's metadata is not a mapped-ram "
                                 "image")
        names = {b.name for b in man.blocks}
        if names != set(fields["blocks"]):
            raise ImageError(f"{where}: the manifest lists blocks {sorted(names)}, its "
                             f"metadata {sorted(fields['blocks'])}")
        for b in man.blocks:
            mb = fields["blocks"][b.name].mapped
            if mb is None or mb.pages_offset != b.pages_offset or \
                    fields["blocks"][b.name].length != b.length:
                raise ImageError(f"{where}: RAM block '{b.name}' differs between the "
                                 "manifest and its metadata")
        fields.update(path=Path(where), _fd=fd)
        img = ObjectImage(**fields)
        img.url = loc
        img.source = src
        return img
    except BaseException:
        src.close()
        if fd >= 0:
            os.close(fd)
        raise
