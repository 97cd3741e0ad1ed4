"""Byte channels to and from QEMU: stdio (``exec:``), inherited fds, unix and tcp sockets.

A channel moves bytes and nothing else; the migration protocol lives in
:mod:`fixedram.stream`. Every channel is bidirectional because the return path
runs back over the same connection: over ``exec:`` QEMU reads the command's stdout
and writes its stdin (or the other way round on the incoming side).
"""

from __future__ import annotations

import contextlib
import os
import select
import socket
import stat
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol

from fixedram.errors import EndpointError, ImageError
from fixedram.io.files import IOV_MAX, advance

__all__ = [
    "Channel",
    "FdChannel",
    "SocketChannel",
    "SinkChannel",
    "Listener",
    "parse_address",
    "listen",
    "connect",
    "from_fd",
    "recv_whole",
    "stdio",
    "writev_all",
    "write_fd",
    "sendfile_all",
]

Buffer = bytes | bytearray | memoryview


class Channel(Protocol):
    """What the endpoints need from a connection."""

    def recv_into(self, buf: memoryview) -> int:
        """Read into ``buf``; 0 at end of stream."""
        ...

    def sendall(self, data: Buffer) -> None:
        """Write all of ``data``."""
        ...

    def sendv(self, bufs: Sequence[Buffer]) -> None:
        """Write all buffers, in order, with vectored writes."""
        ...

    def shutdown_write(self) -> None:
        """Signal end of stream to the peer, keeping the read side open."""
        ...

    def fileno_read(self) -> int:
        """File descriptor to poll for readability."""
        ...

    def close(self) -> None:
        """Close both directions."""
        ...




def writev_all(write_v: Callable[[list[memoryview]], int], bufs: Sequence[Buffer]) -> int:
    """Call ``write_v`` (``os.writev``-like: ``socket.sendmsg``, a bound ``os.writev``) until
    every byte of ``bufs`` is written, at most ``IOV_MAX`` buffers a call. Returns the
    bytes written."""
    views = [memoryview(b).cast("B") for b in bufs if len(b)]
    total = sum(len(v) for v in views)
    i = 0
    while i < len(views):
        i = advance(views, i, write_v(views[i : i + IOV_MAX]))
    return total


class FdChannel:
    """A channel over one or two plain file descriptors (pipes, stdio, a passed fd)."""

    def __init__(self, read_fd: int, write_fd: int, *, owned: bool = True) -> None:
        self.read_fd = read_fd
        self.write_fd = write_fd
        self._owned = owned
        self._write_open = True

    def recv_into(self, buf: memoryview) -> int:
        return os.readv(self.read_fd, [buf])

    def sendall(self, data: Buffer) -> None:
        self.sendv([data])

    def sendv(self, bufs: Sequence[Buffer]) -> None:
        try:
            writev_all(lambda b: os.writev(self.write_fd, b), bufs)
        except BrokenPipeError:
            raise EndpointError("the peer closed the connection") from None

    def shutdown_write(self) -> None:
        if self._write_open and self.write_fd != self.read_fd:
            self._write_open = False
            if self._owned:
                os.close(self.write_fd)

    def fileno_read(self) -> int:
        return self.read_fd

    def close(self) -> None:
        if not self._owned:
            return
        fds = {self.read_fd}
        if self._write_open:
            fds.add(self.write_fd)
        for fd in fds:
            try:
                os.close(fd)
            except OSError:
                pass
        self._owned = False


class SocketChannel:
    """A channel over a connected stream socket."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def recv_into(self, buf: memoryview) -> int:
        try:
            return self.sock.recv_into(buf)
        except ConnectionResetError:
            raise EndpointError("the peer reset the connection") from None

    def recv_whole(self, buf: memoryview) -> int:
        """Read until ``buf`` is full (``MSG_WAITALL``: one system call however the bytes
        arrive); fewer bytes only at end of stream, on a shutdown or a signal."""
        try:
            return self.sock.recv_into(buf, 0, socket.MSG_WAITALL)
        except ConnectionResetError:
            raise EndpointError("the peer reset the connection") from None

    def sendall(self, data: Buffer) -> None:
        try:
            self.sock.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            raise EndpointError("the peer closed the connection") from None

    def sendv(self, bufs: Sequence[Buffer]) -> None:
        try:
            writev_all(self.sock.sendmsg, bufs)
        except (BrokenPipeError, ConnectionResetError):
            raise EndpointError("the peer closed the connection") from None

    def shutdown_write(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def fileno_read(self) -> int:
        return self.sock.fileno()

    def close(self) -> None:
        self.sock.close()


class SinkChannel:
    """A write-only channel handing every batch of buffers to ``write`` (a file, a decoder).

    It never receives anything: :meth:`recv_into` answers end of stream at once.
    """

    def __init__(self, write: Callable[[Sequence[Buffer]], object]) -> None:
        self._write = write

    def recv_into(self, buf: memoryview) -> int:
        return 0

    def sendall(self, data: Buffer) -> None:
        self._write([data])

    def sendv(self, bufs: Sequence[Buffer]) -> None:
        self._write(bufs)

    def shutdown_write(self) -> None:
        pass

    def fileno_read(self) -> int:
        raise ValueError("a sink channel has no read side")

    def close(self) -> None:
        pass


def recv_whole(channel: Channel) -> Callable[[memoryview], int]:
    """A ``recv_into`` for ``channel`` that waits until the buffer is full where the channel
    can do that in one system call (a socket: :meth:`SocketChannel.recv_whole`), else the
    channel's own ``recv_into``. For a reader that knows how many bytes come next (a multifd
    packet's header, then its page data) and would otherwise return to Python for every
    piece the kernel hands over."""
    if isinstance(channel, SocketChannel):
        return channel.recv_whole
    return channel.recv_into


def write_fd(channel: Channel) -> int:
    """The descriptor a channel writes to, for data sent without passing through a buffer
    (``sendfile``, iovec arrays: :mod:`fixedram.io.zerocopy`); -1 for a channel that takes
    buffers only (a sink)."""
    if isinstance(channel, SocketChannel):
        return channel.sock.fileno()
    if isinstance(channel, FdChannel):
        return channel.write_fd
    return -1


def sendfile_all(out_fd: int, in_fd: int, offset: int, count: int,
                 timeout: float | None = None) -> int:
    """Send ``count`` bytes of file ``in_fd`` from ``offset`` to ``out_fd`` with ``sendfile``
    (page-cache pages go to the socket without a copy through fixedram). A non-blocking
    ``out_fd`` (a socket with a timeout) is waited on for at most ``timeout`` seconds without
    progress, then :class:`TimeoutError`; :class:`ImageError` if the file ends first."""
    done = 0
    poller: select.poll | None = None
    while done < count:
        try:
            n = os.sendfile(out_fd, in_fd, offset + done, count - done)
        except BlockingIOError:
            if poller is None:
                poller = select.poll()
                poller.register(out_fd, select.POLLOUT)
            if not poller.poll(None if timeout is None else int(timeout * 1000)):
                raise TimeoutError from None
            continue
        if n == 0:
            raise ImageError(f"image ends at byte {offset + done}, expected data up to "
                             f"byte {offset + count}", offset + done)
        done += n
    return done


def parse_address(spec: str) -> tuple[str, str | tuple[str, int]]:
    """``unix:PATH`` or ``tcp:HOST:PORT`` as ``(family, address)``."""
    kind, _, rest = spec.partition(":")
    if kind == "unix" and rest:
        return "unix", rest
    if kind == "tcp" and rest:
        host, _, port = rest.rpartition(":")
        host = host.strip("[]")
        if not host or not port.isdigit():
            raise EndpointError(f"bad tcp address '{spec}' (expected tcp:HOST:PORT)")
        return "tcp", (host, int(port))
    raise EndpointError(f"bad address '{spec}' (expected unix:PATH or tcp:HOST:PORT)")


def _is_loopback(host: str) -> bool:
    try:
        infos = socket.getaddrinfo(host, None)
    except socket.gaierror:
        return False
    import ipaddress

    return all(ipaddress.ip_address(i[4][0]).is_loopback for i in infos)


#: Kernel buffer asked for on the unix sockets fixedram creates or accepts (the kernel caps it
#: at ``net.core.wmem_max``/``rmem_max``). With the default (~200 KiB) the two processes of a
#: migration take turns on a buffer that holds 50 pages, and every turn is a wake-up; with
#: 4 MiB a proxy save and restore of 1.5 GiB on tmpfs ran 30-40 % faster
#: (``python -m bench.run``). TCP sockets keep the kernel's autotuning, and a lazy restore
#: the kernel's default: there a page the guest waits for must not queue behind megabytes
#: of pages pushed in the background.
UNIX_SOCKET_BUFFER = 4 << 20


def tune(sock: socket.socket) -> socket.socket:
    """Give a unix stream socket large send and receive buffers (best effort)."""
    if sock.family == socket.AF_UNIX:
        for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, opt, UNIX_SOCKET_BUFFER)
    return sock


def socket_pair(large_buffers: bool = True) -> tuple[socket.socket, socket.socket]:
    """A connected pair of unix stream sockets (one end for QEMU), with large buffers unless
    told otherwise."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    return (tune(a), tune(b)) if large_buffers else (a, b)


class Listener:
    """A listening socket; unix sockets are created mode 0600 and removed on close."""

    def __init__(self, spec: str, *, allow_remote: bool = False, backlog: int = 16) -> None:
        family, addr = parse_address(spec)
        self.spec = spec
        self._path: Path | None = None
        if family == "unix":
            assert isinstance(addr, str)
            path = Path(addr)
            if path.exists() and stat.S_ISSOCK(path.stat().st_mode):
                path.unlink()
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            # bound under a temporary name and renamed once listening: a peer that
            # connects as soon as PATH appears is never refused (bind..listen window)
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            old = os.umask(0o177)
            try:
                with contextlib.suppress(FileNotFoundError):
                    tmp.unlink()
                sock.bind(str(tmp))
                sock.listen(backlog)
                os.rename(tmp, path)
            except OSError as e:
                sock.close()
                with contextlib.suppress(OSError):
                    tmp.unlink()
                raise EndpointError(f"cannot listen on {spec}: {e.strerror}") from None
            finally:
                os.umask(old)
            self._path = path
        else:
            assert isinstance(addr, tuple)
            if not allow_remote and not _is_loopback(addr[0]):
                raise EndpointError(f"refusing to listen on non-loopback address {addr[0]} "
                                    "without --allow-remote")
            fam = socket.AF_INET6 if ":" in addr[0] else socket.AF_INET
            sock = socket.socket(fam, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind(addr)
            except OSError as e:
                sock.close()
                raise EndpointError(f"cannot listen on {spec}: {e.strerror}") from None
        sock.listen(backlog)
        self.sock = sock

    @property
    def address(self) -> str:
        """The address in ``unix:``/``tcp:`` form (with the real port for ``tcp:...:0``)."""
        if self._path is not None:
            return f"unix:{self._path}"
        host, port = self.sock.getsockname()[:2]
        return f"tcp:{host}:{port}"

    def accept(self, timeout: float | None = None) -> SocketChannel:
        """Wait for one connection."""
        self.sock.settimeout(timeout)
        try:
            conn, _ = self.sock.accept()
        except TimeoutError:
            raise EndpointError(f"no connection on {self.spec} within {timeout} s") from None
        conn.settimeout(None)
        return SocketChannel(conn)

    def close(self) -> None:
        """Stop listening (and remove a unix socket file)."""
        self.sock.close()
        if self._path is not None:
            try:
                self._path.unlink()
            except FileNotFoundError:
                pass


def listen(spec: str, *, allow_remote: bool = False, backlog: int = 16) -> Listener:
    """Listen on ``unix:PATH`` or ``tcp:HOST:PORT`` (``backlog``: pending connections kept)."""
    return Listener(spec, allow_remote=allow_remote, backlog=backlog)


def connect(spec: str, *, timeout: float = 30.0, large_buffers: bool = True) -> SocketChannel:
    """Connect to ``unix:PATH`` or ``tcp:HOST:PORT`` (``large_buffers``: see
    :data:`UNIX_SOCKET_BUFFER`)."""
    family, addr = parse_address(spec)
    if family == "unix":
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    else:
        assert isinstance(addr, tuple)
        sock = socket.socket(socket.AF_INET6 if ":" in addr[0] else socket.AF_INET,
                             socket.SOCK_STREAM)
    if large_buffers:
        tune(sock)
    sock.settimeout(timeout)
    try:
        sock.connect(addr)
    except OSError as e:
        sock.close()
        raise EndpointError(f"cannot connect to {spec}: {e.strerror or e}") from None
    sock.settimeout(None)
    return SocketChannel(sock)


def from_fd(fd: int) -> Channel:
    """A channel over an inherited file descriptor (socket, pipe or file)."""
    try:
        st = os.fstat(fd)
    except OSError:
        raise EndpointError(f"file descriptor {fd} is not open") from None
    if stat.S_ISSOCK(st.st_mode):
        return SocketChannel(socket.socket(fileno=fd))
    return FdChannel(fd, fd)


def stdio() -> FdChannel:
    """Standard input and output, as used by QEMU's ``exec:`` transport."""
    return FdChannel(0, 1, owned=False)
