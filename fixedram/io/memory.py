"""How this process's C heap treats large freed buffers.

A full read of an object image allocates a buffer per chunk (4 MiB: the client library's
response body, zstd's output) and frees it once the reader has passed the chunk. By
default glibc's malloc takes such a buffer from a fresh ``mmap``, or later from a heap
that gives memory freed at its top back to the kernel, so the next chunk's buffer is
faulted in and zeroed by the kernel page by page again (``docs/object-storage.md``).
:func:`reuse_freed_memory` makes freed buffers stay in the heap for the next ones; the
process then keeps its peak heap (a read holds about the read-ahead window) until it exits.
"""

from __future__ import annotations

import functools

__all__ = ["reuse_freed_memory"]

# mallopt(3) parameters
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
#: buffers up to this size come from the heap (glibc's largest allowed on 64-bit hosts)
_MMAP_THRESHOLD = 32 << 20
#: free memory at the top of a heap kept rather than returned to the kernel
_TRIM_THRESHOLD = 1 << 30


@functools.cache
def reuse_freed_memory() -> bool:
    """Keep freed large buffers in the process's heap for reuse (glibc's ``mallopt``);
    once per process. False where the C library has no ``mallopt`` (nothing changes)."""
    import ctypes

    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD)) and \
        bool(mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD))
