"""What one Python endpoint can move on this machine: the data-path ceilings of a proxy.

Each path moves ``size`` bytes between a unix socket and a file in the target directory, in
plain Python, with the other end of the socket in a second process doing the cheapest thing
(sending from, or receiving into, one 1 MiB buffer), so the figure is the ceiling of that
path for a fixedram endpoint, with nothing of fixedram in it:

* ``socket`` -- send -> recv_into, no file (the socket alone);
* save side, socket -> file, then fsync: ``recv+pwrite``, ``recv into mmap``, ``splice``
  (socket -> pipe -> file);
* restore side, file -> socket: ``pread+send``, ``sendfile``, ``splice`` (file -> pipe ->
  socket), the file read cold where the page cache can be dropped (root, not tmpfs).

:func:`measure` returns MiB/s per path; ``bench.run`` reports them next to ``dd`` for each
target. Alone::

    .venv/bin/python -m bench.ceilings /var/tmp /dev/shm --size-mib 1024

(``bench.run`` runs it as a child process: the peers are forked, which a process with
threads, like the benchmark's QMP clients, should not do.)
"""

from __future__ import annotations

import argparse
import fcntl
import json
import mmap
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path

from bench.common import drop_cache

MIB = 1 << 20
CHUNK = MIB
_F_SETPIPE_SZ = 1031


def _pair() -> tuple[socket.socket, socket.socket]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    for s in (a, b):
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 * MIB)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * MIB)
    return a, b


def _pipe() -> tuple[int, int]:
    r, w = os.pipe()
    try:
        fcntl.fcntl(w, _F_SETPIPE_SZ, MIB)
    except OSError:
        pass  # the default pipe size still works, more slowly
    return r, w


def _feed(sock: socket.socket, size: int) -> None:
    """The peer of a save path: sends ``size`` bytes from one buffer (QEMU sending)."""
    buf = memoryview(b"\x5a" * CHUNK)
    sent = 0
    while sent < size:
        sent += sock.send(buf[: min(CHUNK, size - sent)])


def _drain(sock: socket.socket, size: int) -> None:
    """The peer of a restore path: receives into one buffer (QEMU loading)."""
    buf = bytearray(CHUNK)
    while sock.recv_into(buf):
        pass


def _timed(peer: Callable[[socket.socket, int], None], ours: Callable[[socket.socket], None],
           size: int) -> float:
    """MiB/s of ``ours`` moving ``size`` bytes with ``peer`` in a forked process."""
    a, b = _pair()
    pid = os.fork()
    if pid == 0:  # the peer
        code = 0
        try:
            a.close()
            peer(b, size)
            b.close()
        except BaseException:
            code = 1
        os._exit(code)
    b.close()
    t = time.perf_counter()
    try:
        ours(a)
    finally:
        a.close()
        os.waitpid(pid, 0)
    return size / MIB / (time.perf_counter() - t)


# -- save side: socket -> file ----------------------------------------------------------------


def _save_pwrite(path: Path) -> Callable[[socket.socket], None]:
    def run(s: socket.socket) -> None:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        buf = bytearray(CHUNK)
        mv = memoryview(buf)
        off = 0
        while n := s.recv_into(buf):
            os.pwrite(fd, mv[:n], off)
            off += n
        os.fsync(fd)
        os.close(fd)
    return run


def _save_mmap(path: Path, size: int) -> Callable[[socket.socket], None]:
    def run(s: socket.socket) -> None:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        os.ftruncate(fd, size)
        m = mmap.mmap(fd, size)
        mv = memoryview(m)
        off = 0
        while off < size:
            n = s.recv_into(mv[off : off + CHUNK])
            if not n:
                break
            off += n
        mv.release()
        m.flush()
        m.close()
        os.fsync(fd)
        os.close(fd)
    return run


def _save_splice(path: Path) -> Callable[[socket.socket], None]:
    def run(s: socket.socket) -> None:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        r, w = _pipe()
        off = 0
        while n := os.splice(s.fileno(), w, CHUNK):
            while n:
                k = os.splice(r, fd, n, offset_dst=off)
                n -= k
                off += k
        os.close(r)
        os.close(w)
        os.fsync(fd)
        os.close(fd)
    return run


# -- restore side: file -> socket -------------------------------------------------------------


def _restore_pread(path: Path, size: int) -> Callable[[socket.socket], None]:
    def run(s: socket.socket) -> None:
        fd = os.open(path, os.O_RDONLY)
        buf = bytearray(CHUNK)
        mv = memoryview(buf)
        off = 0
        while off < size:
            n = os.preadv(fd, [buf], off)
            s.sendall(mv[:n])
            off += n
        os.close(fd)
    return run


def _restore_sendfile(path: Path, size: int) -> Callable[[socket.socket], None]:
    def run(s: socket.socket) -> None:
        fd = os.open(path, os.O_RDONLY)
        off = 0
        while off < size:
            off += os.sendfile(s.fileno(), fd, off, CHUNK)
        os.close(fd)
    return run


def _restore_splice(path: Path, size: int) -> Callable[[socket.socket], None]:
    def run(s: socket.socket) -> None:
        fd = os.open(path, os.O_RDONLY)
        r, w = _pipe()
        off = 0
        while off < size:
            n = os.splice(fd, w, CHUNK, offset_src=off)
            off += n
            while n:
                n -= os.splice(r, s.fileno(), n)
        os.close(r)
        os.close(w)
        os.close(fd)
    return run


def measure(directory: str | os.PathLike[str], size_mib: int = 1024) -> dict[str, float]:
    """MiB/s of every path through ``directory`` (files removed afterwards)."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    size = size_mib * MIB
    f = d / "ceilings.bin"
    out: dict[str, float] = {}
    try:
        out["socket send->recv"] = _timed(_feed, lambda s: _drain(s, size), size)
        saves = {"save recv+pwrite+fsync": _save_pwrite(f),
                 "save recv into mmap+fsync": _save_mmap(f, size),
                 "save splice+fsync": _save_splice(f)}
        for name, fn in saves.items():
            f.unlink(missing_ok=True)
            out[name] = _timed(_feed, fn, size)
        os.sync()
        restores = {"restore pread+send": _restore_pread(f, size),
                    "restore sendfile": _restore_sendfile(f, size),
                    "restore splice": _restore_splice(f, size)}
        for name, fn in restores.items():
            drop_cache(f)
            out[name] = _timed(_drain, fn, size)
    finally:
        f.unlink(missing_ok=True)
    return out


def main() -> None:
    """Print the ceilings of each directory given."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("dirs", nargs="+")
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--json", action="store_true", help="print {dir: {path: MiB/s}} as JSON")
    args = ap.parse_args()
    res = {d: measure(d, args.size_mib) for d in args.dirs}
    if args.json:
        print(json.dumps(res))
        return
    names = list(next(iter(res.values())))
    print(f"| path (MiB/s, {args.size_mib} MiB) | " + " | ".join(res) + " |")
    print("|---|" + "---|" * len(res))
    for n in names:
        print(f"| {n} | " + " | ".join(f"{res[d][n]:.0f}" for d in res) + " |")


if __name__ == "__main__":
    main()
