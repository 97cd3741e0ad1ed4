"""``fixedram serve``: a resident process with every command's modules imported, forking a
child per command sent to it (``FIXEDRAM_SERVER=PATH fixedram ARGS``).

A command's start-up is mostly imports (0.3-0.4 s of click, asyncio and qemu.qmp, numpy,
fixedram's modules), which a lazy restore's time to running and a native restore's fixed
cost both carry. The server pays them once. Each request (:mod:`fixedram.resident` has the
wire protocol and the client) comes with the client's arguments, environment, umask,
working directory and open descriptors; the child takes them on and runs
``python -m fixedram`` in-process (:func:`runpy.run_module`, the same entry point as a
fresh process), so output, exit status and one-line errors are the command line's own. The
server reports the child's pid (the client forwards its signals to it) and, once it has
reaped it, its exit status.

Security: the socket is created mode 0600 (in a directory created 0700 when it does not
exist), and a peer whose uid (``SO_PEERCRED``) is not the server's is refused: a command
runs with the server's credentials, so only its own user may send one.

The server forks, so it must have no threads: numpy's thread pools are held to one thread
(``OPENBLAS_NUM_THREADS`` and the like) before numpy is imported, and the server checks
``/proc/self/task`` before it serves. docs/resident-server.md tells the whole story.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import os
import pkgutil
import signal
import socket
import struct
import sys
from typing import Any, NoReturn

import click

from fixedram.commands import cli, load_commands, one_line_errors
from fixedram.errors import FixedramError
from fixedram.resident import (
    ENV_VAR,
    ERROR,
    EXIT,
    MAX_FDS,
    MAX_REQUEST,
    PID,
    Request,
    decode_request,
    encode_reply,
)

__all__ = ["serve_cmd", "preload", "Server"]

#: Thread-pool sizes of numpy's BLAS libraries: one, so that importing numpy starts no thread.
_ONE_THREAD = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS",
               "NUMEXPR_NUM_THREADS", "VECLIB_MAXIMUM_THREADS")


@cli.command("serve")
@click.option("--socket", "path", required=True, metavar="PATH", envvar=ENV_VAR,
              type=click.Path(dir_okay=False),
              help=f"The unix socket to listen on (default: ${ENV_VAR}); created mode 0600, "
                   "its directory 0700 if it does not exist.")
@one_line_errors
def serve_cmd(path: str) -> None:
    """Serve fixedram commands from a resident process (foreground).

    Every command's modules are imported once; FIXEDRAM_SERVER=PATH fixedram COMMAND ...
    then runs COMMAND in a child of this process, with the caller's arguments, environment,
    working directory and terminal, as the command line would. SIGINT or SIGTERM stops the
    server: the socket is removed and commands still running are waited for.
    """
    with Server(path) as server:  # listening first: a client started now waits in the backlog
        preload()
        threads = len(os.listdir("/proc/self/task"))
        if threads != 1:
            raise FixedramError(f"the server has {threads} threads after loading its modules; "
                                "it forks, so it must have one")
        click.echo(f"fixedram: serving on {path} (pid {os.getpid()})", err=True)
        server.run()


def preload() -> None:
    """Import what the commands need: every command module, every module of the layers
    below (their paths import them inside their functions), and the libraries they use."""
    for name in _ONE_THREAD:
        os.environ[name] = "1"
    import asyncio  # noqa: F401
    import json  # noqa: F401
    import runpy  # noqa: F401

    import numpy  # noqa: F401
    import qemu.qmp  # noqa: F401
    import tqdm  # noqa: F401
    import xxhash  # noqa: F401

    import fixedram.endpoint
    import fixedram.image
    import fixedram.io
    import fixedram.log
    import fixedram.qmp
    import fixedram.stream

    for package in (fixedram.stream, fixedram.io, fixedram.image, fixedram.endpoint,
                    fixedram.qmp):
        for module in pkgutil.iter_modules(package.__path__, f"{package.__name__}."):
            try:
                importlib.import_module(module.name)
            except ImportError:
                pass  # an optional dependency (fixedram[s3], fixedram[libvirt]) not installed
    for optional in ("obstore", "obstore.store", "zstandard", "botocore.session", "libvirt",
                     "libvirt_qemu"):
        try:  # the extras' libraries, where installed: s3://, --libvirt
            importlib.import_module(optional)
        except ImportError:
            pass
    load_commands()


class Server:
    """The listening socket and the children running commands (see the module doc)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.sock = _listen(path)
        self.ino = os.stat(path).st_ino
        self.wake_r, self.wake_w = socket.socketpair()
        self.conns: dict[socket.socket, int | None] = {}  # connection -> its child's pid
        self.children: dict[int, socket.socket] = {}
        self.stopping = False

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc: object) -> None:
        self._unlink()
        for s in (self.sock, self.wake_r, self.wake_w, *self.conns):
            s.close()

    def run(self) -> None:
        """Serve until SIGINT or SIGTERM, then until the commands still running end."""
        import selectors

        for s in (self.wake_r, self.wake_w):
            s.setblocking(False)
        old = signal.set_wakeup_fd(self.wake_w.fileno(), warn_on_full_buffer=False)
        handlers = {sig: signal.signal(sig, self._on_signal)
                    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGCHLD)}
        sel = selectors.DefaultSelector()
        sel.register(self.sock, selectors.EVENT_READ)
        sel.register(self.wake_r, selectors.EVENT_READ)
        try:
            while not self.stopping or self.children:
                if self.stopping and self.sock.fileno() >= 0:
                    sel.unregister(self.sock)
                    self._unlink()
                    self.sock.close()
                for key, _ in sel.select():
                    if key.fileobj is self.sock:
                        self._accept(sel)
                    elif key.fileobj is self.wake_r:
                        self._drain()
                    else:
                        self._readable(sel, key.fileobj)  # type: ignore[arg-type]
                self._reap(sel)
        finally:
            sel.close()
            signal.set_wakeup_fd(old)
            for sig, handler in handlers.items():
                signal.signal(sig, handler)

    def _on_signal(self, signum: int, frame: Any) -> None:
        if signum != signal.SIGCHLD:
            self.stopping = True

    def _drain(self) -> None:
        try:
            while self.wake_r.recv(4096):
                pass
        except BlockingIOError:
            pass

    def _unlink(self) -> None:
        """Remove the socket, if it is still this server's."""
        try:
            if os.stat(self.path).st_ino == self.ino:
                os.unlink(self.path)
        except FileNotFoundError:
            pass

    def _accept(self, sel: Any) -> None:
        import selectors

        try:
            conn, _ = self.sock.accept()
        except OSError:
            return
        self.conns[conn] = None
        sel.register(conn, selectors.EVENT_READ)

    def _readable(self, sel: Any, conn: socket.socket) -> None:
        """The request on a new connection, or the client hanging up."""
        pid = self.conns[conn]
        fds: list[int] = []
        try:
            data, fds, flags, _ = socket.recv_fds(conn, MAX_REQUEST, MAX_FDS + 1)
        except OSError:
            data, flags = b"", 0
        if pid is not None or not data:
            # the client went away (a second packet is a protocol error): hang up on the
            # command as a terminal would
            for fd in fds:
                os.close(fd)
            if pid is not None:
                _kill(pid, signal.SIGHUP)
            self._drop(sel, conn)
            return
        # the request is read first, so that the refusal reaches the peer (a connection
        # closed with unread data is reset, the reply lost)
        peer, uid, _gid = struct.unpack(
            "3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
        try:
            if uid != os.getuid():
                click.echo(f"fixedram: warning: refused pid {peer}: uid {uid} is not the "
                           "server's", err=True)
                raise PermissionError(f"the server at {self.path} serves uid {os.getuid()} "
                                      "only")
            if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
                raise ValueError("request too large")
            req = decode_request(data)
            if len(fds) != len(req.targets) + 1:
                raise ValueError("descriptors missing from the request")
        except (ValueError, PermissionError) as e:
            for fd in fds:
                os.close(fd)
            _send(conn, encode_reply(ERROR, 0, str(e) if isinstance(e, PermissionError) else
                                     f"the server at {self.path} refused the request: {e}"))
            self._drop(sel, conn)
            return
        try:
            pid = os.fork()
        except OSError as e:
            pid = -1
            _send(conn, encode_reply(ERROR, 0, f"the server at {self.path} cannot start "
                                     f"the command: {e.strerror}"))
        if pid == 0:
            try:  # the child never returns into the server's loop (nor unlinks its socket)
                self._child(req, fds)
            finally:
                os._exit(1)
        for fd in fds:
            os.close(fd)
        if pid < 0:
            self._drop(sel, conn)
            return
        self.conns[conn] = pid
        self.children[pid] = conn
        _send(conn, encode_reply(PID, pid))

    def _drop(self, sel: Any, conn: socket.socket) -> None:
        sel.unregister(conn)
        del self.conns[conn]
        conn.close()

    def _reap(self, sel: Any) -> None:
        while self.children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if not pid:
                return
            conn = self.children.pop(pid, None)
            if conn is not None and conn in self.conns:
                _send(conn, encode_reply(EXIT, os.waitstatus_to_exitcode(status)))
                self._drop(sel, conn)

    def _child(self, req: Request, fds: list[int]) -> NoReturn:
        """In the forked child: become the client's command and run it; never returns."""
        try:
            for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGCHLD):
                signal.signal(sig, signal.default_int_handler if sig == signal.SIGINT
                              else signal.SIG_DFL)
            signal.set_wakeup_fd(-1)
            for s in (self.sock, self.wake_r, self.wake_w, *self.conns):
                s.close()
            os.setsid()
            _take_descriptors(fds[0], fds[1:], req.targets)
            os.umask(req.umask)
            os.environb.clear()
            for item in req.env:
                name, sep, value = item.partition(b"=")
                if sep and name:
                    os.environb[name] = value
            import tempfile

            tempfile.tempdir = None  # from the client's TMPDIR when next asked
            sys.argv = [os.fsdecode(a) for a in req.argv] or ["fixedram"]
            _new_stdio()
        except BaseException as e:
            with contextlib.suppress(OSError):  # stderr may be closed
                os.write(2, f"fixedram: error: cannot take on the command: {e}\n".encode())
            os._exit(2)
        import runpy

        try:  # fixedram.cli.main ends the process itself
            runpy.run_module("fixedram", run_name="__main__")
        except SystemExit as e:
            os._exit(e.code if isinstance(e.code, int) else 1)
        except BaseException:  # as the interpreter would report it
            import traceback

            with contextlib.suppress(Exception):
                traceback.print_exc()
                sys.stderr.flush()
        os._exit(1)


def _take_descriptors(cwd: int, fds: list[int], targets: list[int]) -> None:
    """Give the received descriptors the numbers they had in the client, close every
    other descriptor a program started by the command would inherit, and move to the
    client's working directory."""
    import fcntl

    floor = max([*targets, 2]) + 1
    moved = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, floor) for fd in (cwd, *fds)]
    for fd in (cwd, *fds):
        os.close(fd)
    for fd, target in zip(moved[1:], targets, strict=True):
        os.dup2(fd, target, inheritable=True)
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        try:
            if fd not in targets and os.get_inheritable(fd):
                os.close(fd)
        except OSError:
            pass
    os.fchdir(moved[0])
    for fd in moved:
        os.close(fd)


def _new_stdio() -> None:
    """``sys.stdin``/``stdout``/``stderr`` over descriptors 0-2 as the interpreter makes them
    at start-up: stdout line-buffered on a terminal, stderr always; None where closed."""
    enc, errors = sys.__stdout__.encoding if sys.__stdout__ else "utf-8", "strict"
    streams: list[Any] = []
    for fd in range(3):
        try:
            os.fstat(fd)
        except OSError:
            streams.append(None)
            continue
        raw = open(fd, "rb" if fd == 0 else "wb", closefd=False)  # noqa: SIM115
        streams.append(io.TextIOWrapper(raw, encoding=enc,
                                        errors="backslashreplace" if fd == 2 else errors,
                                        newline="\n",
                                        line_buffering=fd == 2 or (fd == 1 and os.isatty(fd))))
    sys.stdin, sys.stdout, sys.stderr = streams


def _listen(path: str) -> socket.socket:
    """The listening socket at ``path``, mode 0600; its directory made 0700 if missing. A
    stale socket (nobody listening) is replaced; a live one or another file is refused."""
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        os.makedirs(directory, mode=0o700)
    if os.path.lexists(path):
        import stat

        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            raise FixedramError(f"{path} exists and is not a socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            probe.connect(path)
        except OSError:
            os.unlink(path)  # stale: its server is gone
        else:
            raise FixedramError(f"a server is already listening on {path}")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    old = os.umask(0o177)
    try:
        sock.bind(path)
        sock.listen(64)
    except OSError as e:
        sock.close()
        raise FixedramError(f"cannot listen on {path}: {e.strerror or e}") from None
    finally:
        os.umask(old)
    return sock


def _send(conn: socket.socket, packet: bytes) -> None:
    try:
        conn.send(packet, socket.MSG_DONTWAIT)
    except OSError:
        pass  # the client is gone


def _kill(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except OSError:
        pass
