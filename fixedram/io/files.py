"""Positioned, vectored file I/O; O_DIRECT; hole punching; crash-safe replacement.

Hot paths write or read one run of contiguous pages per system call
(:func:`pwritev_all`, :func:`preadv_exact`). :class:`AtomicFile` writes a new file
under a temporary name in the target's directory and renames it over the target
only when :meth:`AtomicFile.commit` is called after an fsync of file and
directory, so an existing good file is never replaced by a partial one.

Durability is decided here, once: every fsync and every page-cache drop goes through
:func:`fsync` and :func:`drop_cached`, which do nothing inside :func:`scratch_writes`
(a staging copy read back at once and then removed, as an object-store save writes:
syncing it would wait for the disk, and dropping it from the cache would make the
upload read it back from the disk).
"""

from __future__ import annotations

import contextlib
import errno
import functools
import mmap
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from fixedram.errors import FixedramError, ImageError

__all__ = [
    "pwritev_all",
    "fsync",
    "scratch_writes",
    "advance",
    "preadv_exact",
    "aligned_buffer",
    "open_direct",
    "warn_no_direct_io",
    "punch_hole",
    "drop_cached",
    "fsync_dir",
    "AtomicFile",
    "remove_stale_partials",
    "IOV_MAX",
]

IOV_MAX = os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024

Buffer = bytes | bytearray | memoryview


def advance(views: list[memoryview], i: int, n: int) -> int:
    """After a vectored write of ``n`` bytes from ``views[i:]``, the index of the first
    buffer not yet fully written (a partly written one is trimmed in place)."""
    while n and i < len(views):
        ln = len(views[i])
        if n >= ln:
            n -= ln
            i += 1
        else:
            views[i] = views[i][n:]
            n = 0
    return i


def pwritev_all(fd: int, bufs: Sequence[Buffer], offset: int) -> int:
    """Write every buffer at ``offset`` onwards; retries short writes. Returns bytes written."""
    views = [memoryview(b).cast("B") for b in bufs if len(b)]
    total = 0
    i = 0
    while i < len(views):
        n = os.pwritev(fd, views[i : i + IOV_MAX], offset + total)
        if n <= 0:
            raise OSError(errno.EIO, "short write")
        total += n
        i = advance(views, i, n)
    return total


def preadv_exact(fd: int, buf: memoryview, offset: int, what: str = "file") -> None:
    """Fill ``buf`` from ``offset``; ImageError naming ``what`` if the file is shorter."""
    got = os.preadv(fd, [buf], offset)
    while got < len(buf):
        n = os.preadv(fd, [buf[got:]], offset + got)
        if n <= 0:
            raise ImageError(f"{what}: file ends at byte {offset + got}, expected "
                             f"{len(buf) - got} more bytes", offset + got)
        got += n


def aligned_buffer(size: int) -> mmap.mmap:
    """A page-aligned, zero-filled buffer of ``size`` bytes (anonymous mmap), for O_DIRECT."""
    return mmap.mmap(-1, max(size, mmap.PAGESIZE))


def open_direct(path: str | os.PathLike[str], flags: int, mode: int = 0o600) -> int | None:
    """Open ``path`` with O_DIRECT added to ``flags``; None where the filesystem refuses it."""
    try:
        return os.open(path, flags | os.O_DIRECT, mode)
    except OSError as e:
        if e.errno == errno.EINVAL:
            return None
        raise


def warn_no_direct_io(where: str | os.PathLike[str], why: str = "does not support O_DIRECT",
                      fallback: str = "using buffered I/O") -> None:
    """The one warning for a filesystem that refuses O_DIRECT, where fixedram goes on without:
    ``fixedram: warning: the filesystem of WHERE WHY; FALLBACK`` (through :mod:`fixedram.log`).
    """
    from fixedram.log import warn

    warn("the filesystem of %s %s; %s", where, why, fallback)


_FADVISE = hasattr(os, "posix_fadvise")


@functools.cache
def _fallocate() -> Any:
    """libc's fallocate(2), loaded on first use (finding libc runs ldconfig: milliseconds that
    every command would otherwise pay at start-up)."""
    import ctypes
    import ctypes.util

    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    fn = libc.fallocate
    fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong]
    return fn

_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02


_scratch = False


@contextlib.contextmanager
def scratch_writes() -> Iterator[None]:
    """Within this block (process-wide) the files written are scratch copies: neither
    fsynced nor dropped from the page cache (:func:`fsync`, :func:`drop_cached`)."""
    global _scratch
    before, _scratch = _scratch, True
    try:
        yield
    finally:
        _scratch = before


def fsync(fd: int) -> None:
    """fsync ``fd``, except inside :func:`scratch_writes`."""
    if not _scratch:
        os.fsync(fd)


def drop_cached(fd: int, offset: int = 0, length: int = 0) -> None:
    """Ask the kernel to write back and forget the cached pages of a file range.

    Dirty pages are queued for writeback at once (so a later fsync has less to do);
    clean ones leave the page cache, so a large image does not evict the host's
    working set. ``length`` 0 means to the end. A no-op where unsupported, and inside
    :func:`scratch_writes`.
    """
    if _FADVISE and not _scratch:
        with contextlib.suppress(OSError):
            os.posix_fadvise(fd, offset, length, os.POSIX_FADV_DONTNEED)


def punch_hole(fd: int, offset: int, length: int) -> bool:
    """Deallocate ``[offset, offset+length)`` keeping the file size; False if unsupported.

    Where holes cannot be punched the range is overwritten with zeros instead, so
    old data never stays reachable.
    """
    if length <= 0:
        return True
    rc = _fallocate()(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length)
    if rc == 0:
        return True
    zeros = bytes(min(length, 1 << 20))
    done = 0
    while done < length:
        n = min(len(zeros), length - done)
        pwritev_all(fd, [memoryview(zeros)[:n]], offset + done)
        done += n
    return False


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """fsync a directory so a rename or create inside it is durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fsync(fd)
    finally:
        os.close(fd)


def remove_stale_partials(target: str | os.PathLike[str]) -> list[Path]:
    """Remove ``.<name>.fixedram-partial.<pid>`` files of ``target`` whose process is gone.

    Such a file is left only if a writer was killed (SIGKILL, power cut) in the instant
    between naming its finished temporary file and renaming it over ``target``. Files of
    a running pid are left alone. Returns the paths removed.
    """
    tgt = Path(target).absolute()
    removed: list[Path] = []
    prefix = f".{tgt.name}.fixedram-partial."
    try:
        names = [n for n in os.listdir(tgt.parent) if n.startswith(prefix)]
    except OSError:
        return removed
    for name in names:
        pid = name[len(prefix) :]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
            continue  # still running
        except ProcessLookupError:
            pass
        except PermissionError:
            continue  # someone else's live process
        try:
            os.unlink(tgt.parent / name)
            removed.append(tgt.parent / name)
        except OSError:
            pass
    return removed


class AtomicFile:
    """A file written under a temporary name and renamed over ``target`` on commit.

    The temporary file lives in the target's directory (same filesystem) and is
    named ``.<name>.fixedram-partial.<pid>``, so it is never mistaken for an image.
    ``abort`` (or leaving a ``with`` block by an exception) removes it.
    """

    def __init__(self, target: str | os.PathLike[str], *, mode: int = 0o600) -> None:
        self.target = Path(target).absolute()
        if self.target.is_dir():
            raise FixedramError(f"{self.target} is a directory")
        parent = self.target.parent
        if not parent.is_dir():
            raise FixedramError(f"directory {parent} does not exist")
        self.temp = parent / f".{self.target.name}.fixedram-partial.{os.getpid()}"
        remove_stale_partials(self.target)
        try:
            self.fd = os.open(self.temp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, mode)
        except OSError as e:
            raise FixedramError(f"cannot create a file in {parent}: {e.strerror}") from None
        self.committed = False

    def commit(self, *, drop_cache: bool = False) -> None:
        """fsync the file, rename it over the target, fsync the directory.

        ``drop_cache``: once durable, the file's pages leave the page cache.
        """
        fsync(self.fd)
        if drop_cache:
            drop_cached(self.fd)
        os.close(self.fd)
        self.fd = -1
        os.replace(self.temp, self.target)
        fsync_dir(self.target.parent)
        self.committed = True

    def abort(self) -> None:
        """Close and remove the temporary file (the target is untouched)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if not self.committed:
            try:
                self.temp.unlink()
            except FileNotFoundError:
                pass

    def __enter__(self) -> AtomicFile:
        return self

    def __exit__(self, exc_type: object, *rest: object) -> None:
        if exc_type is not None or not self.committed:
            self.abort()
