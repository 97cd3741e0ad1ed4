"""The resident server's wire protocol, and its client: a command sent to ``fixedram serve``.

A fresh ``fixedram`` process spends most of its start-up importing (click, asyncio and
qemu.qmp, numpy, fixedram's own modules: 0.3-0.4 s), which a lazy restore's time to running
and a native save's or restore's fixed cost both carry. ``fixedram serve --socket PATH``
(:mod:`fixedram.commands.serve`) imports all of that once and forks a child per command;
``FIXEDRAM_SERVER=PATH fixedram ARGS`` sends the command to it. This module is what the
client runs, before anything heavy is imported (:func:`fixedram.cli.main` checks the
variable first), so it imports nothing but the C modules under the standard library's
socket and signal (their Python wrappers build enums and import selectors and typing:
several milliseconds of the client's start-up) and struct. docs/resident-server.md tells
the whole story.

The connection is a unix ``SOCK_SEQPACKET`` socket: one packet per message.

* Request, client to server: :data:`REQUEST` (magic, umask, argument count, environment
  count, descriptor count), then the arguments and the environment (``NAME=VALUE``), each
  NUL-terminated, then the descriptor numbers the client's open descriptors are to have in
  the command (uint32 each). ``SCM_RIGHTS`` carries the client's working directory
  (an ``O_PATH`` descriptor) and then those descriptors, in that order: every descriptor the
  client would pass to a program it ran (those without close-on-exec: stdin, stdout,
  stderr and whatever the client inherited), so that the command writes to the client's
  terminal or pipes and ``--fd N`` names the same thing as without the server.
* Replies, server to client: :data:`REPLY` (kind, value), then for :data:`ERROR` the
  message. :data:`PID`: the command runs as process ``value``, which the client signals
  itself (SIGINT, SIGTERM, SIGHUP, SIGQUIT are forwarded to it). :data:`EXIT`: the command
  ended, ``value`` as :func:`os.waitstatus_to_exitcode` gives it (negative: killed by that
  signal, which the client then dies of too). :data:`ERROR`: the server did not run the
  command; one line for the user.
"""

from __future__ import annotations

import _signal as signal
import _socket as socket
import os
import struct
import sys

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import NoReturn

__all__ = ["ENV_VAR", "run_remote", "REQUEST", "REPLY", "PID", "EXIT", "ERROR",
           "MAX_REQUEST", "MAX_FDS", "Request", "encode_request", "decode_request",
           "encode_reply", "decode_reply"]

#: The environment variable naming the server's socket.
ENV_VAR = "FIXEDRAM_SERVER"
#: Request header: magic, umask, argc, envc, number of descriptors after the cwd's.
REQUEST = struct.Struct("<4sIIII")
MAGIC = b"FRS1"
#: Reply: kind, value (then, for :data:`ERROR`, a UTF-8 message).
REPLY = struct.Struct("<4si")
PID, EXIT, ERROR = b"pid\0", b"exit", b"err\0"
#: Largest request (arguments and environment): what one packet of the socket carries.
MAX_REQUEST = 1 << 20
#: Most descriptors one request passes (the kernel's limit per message is 253, cwd's included).
MAX_FDS = 250
#: Signals the client forwards to the command.
FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)


class Request:
    """A decoded request: ``argv`` (``argv[0]`` the client's program), ``env``, ``umask``,
    ``targets`` (the descriptor number each passed descriptor is to have)."""

    __slots__ = ("argv", "env", "targets", "umask")

    def __init__(self, argv: list[bytes], env: list[bytes], umask: int,
                 targets: list[int]) -> None:
        self.argv, self.env, self.umask, self.targets = argv, env, umask, targets


def encode_request(argv: list[bytes], env: list[bytes], umask: int,
                   targets: list[int]) -> bytes:
    """The request packet (see the module doc)."""
    strings = b"".join(s + b"\0" for s in (*argv, *env))
    return (REQUEST.pack(MAGIC, umask, len(argv), len(env), len(targets)) + strings
            + struct.pack(f"<{len(targets)}I", *targets))


def decode_request(data: bytes) -> Request:
    """Parse a request packet; ValueError names what is wrong with it."""
    if len(data) < REQUEST.size:
        raise ValueError("short request")
    magic, umask, argc, envc, nfds = REQUEST.unpack_from(data)
    if magic != MAGIC:
        raise ValueError("not a fixedram request (another version of fixedram?)")
    tail = 4 * nfds
    strings = data[REQUEST.size:len(data) - tail].split(b"\0")
    if nfds > MAX_FDS or len(strings) != argc + envc + 1 or strings[-1]:
        raise ValueError("malformed request")
    targets = list(struct.unpack_from(f"<{nfds}I", data, len(data) - tail))
    return Request(strings[:argc], strings[argc:argc + envc], umask & 0o777, targets)


def encode_reply(kind: bytes, value: int, message: str = "") -> bytes:
    """A reply packet."""
    return REPLY.pack(kind, value) + message.encode("utf-8", "replace")


def decode_reply(data: bytes) -> tuple[bytes, int, str]:
    """``(kind, value, message)`` of a reply packet."""
    kind, value = REPLY.unpack_from(data)
    return kind, value, data[REPLY.size:].decode("utf-8", "replace")


def _fail(message: str) -> NoReturn:
    """One line on stderr and exit status 2, as every fixedram command fails."""
    os.write(2, f"fixedram: error: {message}\n".encode("utf-8", "backslashreplace"))
    os._exit(2)


def _passed_fds() -> list[int]:
    """The descriptors a program started by this process would inherit (no close-on-exec)."""
    fds = []
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        try:
            if os.get_inheritable(fd):
                fds.append(fd)
        except OSError:
            pass  # the listing's own descriptor, closed by now
    return sorted(fds)


def run_remote(path: str, argv: list[str] | None = None) -> NoReturn:
    """Run ``argv`` (default :data:`sys.argv`) as a fixedram command in the server at
    ``path``; exit as the command did. A server that is not there or goes away: one line on
    stderr, exit status 2."""
    argv = sys.argv if argv is None else argv
    targets = _passed_fds()
    if len(targets) > MAX_FDS:
        _fail(f"{len(targets)} open descriptors to pass to the server at {path}; "
              f"at most {MAX_FDS}")
    mask = os.umask(0)
    os.umask(mask)
    env = [k + b"=" + v for k, v in os.environb.items() if k != ENV_VAR.encode()]
    request = encode_request([os.fsencode(a) for a in argv], env, mask, targets)
    cwd = os.open(".", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    fds = [cwd, *targets]
    try:
        sock.connect(path)
    except OSError as e:
        _fail(f"no fixedram server at {path} ({ENV_VAR}): {e.strerror or e}")
    pending: list[int] = []
    pidfd: list[int] = []

    def forward(signum: int, frame: object) -> None:
        if pidfd:
            try:
                signal.pidfd_send_signal(pidfd[0], signum)
            except OSError:
                pass  # the command has just ended: its status is on the way
        else:
            pending.append(signum)

    for sig in FORWARDED:
        signal.signal(sig, forward)
    unsent = None
    try:
        sock.sendmsg([request], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                  struct.pack(f"{len(fds)}i", *fds))])
    except OSError as e:  # the server may have said why (a refusal) before it hung up
        unsent = f"cannot send the command to the server at {path}: {e.strerror or e}"
    os.close(cwd)
    while True:
        try:
            data = sock.recv(4096)
        except OSError:
            data = b""
        if len(data) < REPLY.size:
            break
        kind, value, message = decode_reply(data)
        if kind == ERROR:
            _fail(message)
        if kind == PID:
            try:
                pidfd.append(os.pidfd_open(value))
            except OSError:
                pass  # already ended: its status comes next
            for signum in pending:
                forward(signum, None)
        elif kind == EXIT:
            for sig in FORWARDED:
                signal.signal(sig, signal.SIG_DFL)
            if value < 0:  # killed by a signal: so is the client
                os.kill(os.getpid(), -value)
                value = 128 - value
            os._exit(value)
    if unsent:
        _fail(unsent)
    if not pidfd:
        _fail(f"the server at {path} closed the connection before running the command")
    _wait_readable(pidfd[0])
    _fail(f"the server at {path} stopped during the command; its exit status is unknown")


def _wait_readable(fd: int) -> None:
    """Until the process behind pidfd ``fd`` ends (signals keep being forwarded)."""
    import select

    poller = select.poll()
    poller.register(fd, select.POLLIN)
    while not poller.poll():
        pass
