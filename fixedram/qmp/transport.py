"""How the migration stream travels between QEMU and fixedram, for save, restore and lazy
restore.

A transport knows the URI QEMU is given (``migrate`` or ``migrate-incoming``) and fixedram's
end of the stream (a channel, a listener, or an address to connect to). Creating one touches
nothing in QEMU: a failed check leaves QEMU as it was. Then:

* :meth:`Transport.hand` gives QEMU its end where it needs one (``getfd``), before a
  thread at fixedram's end that may close the transport when it is done starts (a save's
  writer); one that does not (a lazy restore's sender) may start before, and write into
  its end of a socket pair, which holds the bytes until QEMU reads;
* :meth:`Transport.migrate` hands QEMU its end if not done yet and runs the migrate
  command; when QEMU refuses, what it was given is dropped again;
* :meth:`Transport.abandon`, after a failure, cuts fixedram's end so that the thread reading
  or writing it stops;
* :meth:`Transport.close` releases sockets, descriptors and private directories (safe to
  call more than once).

``fd``
    :class:`FdTransport`: a socket pair, one end handed to QEMU with ``getfd`` (``fd:NAME``).
``unix``
    :class:`UnixListen`: fixedram listens on a private unix socket and QEMU connects (a
    multifd save: QEMU opens 1 + N connections); :class:`UnixConnect`: QEMU listens and
    fixedram connects (a multifd restore, a lazy restore over ``unix``).
``exec``
    :class:`ExecTransport`: QEMU runs a fixedram child and reads its stdout; the child's
    report comes back through a file in a private directory.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import socket
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fixedram.errors import EndpointError, QMPCommandError, VMError
from fixedram.io.channel import Listener, SocketChannel
from fixedram.qmp.client import QMP

__all__ = ["Transport", "FdTransport", "UnixListen", "UnixConnect", "ExecTransport"]


class Transport:
    """The stream's way between QEMU and fixedram (see the module doc)."""

    #: What QEMU is given: ``migrate uri=...`` or ``migrate-incoming uri=...``.
    uri: str

    def migrate(self, command: Callable[[str], object]) -> None:
        """Give QEMU its end (:meth:`hand`), then run ``command(uri)`` (the migrate command);
        when that raises, drop what QEMU was given (:meth:`refused`)."""
        self.hand()
        try:
            command(self.uri)
        except BaseException:
            self.refused()
            raise

    def hand(self) -> None:
        """Give QEMU its end before the migrate command, where it needs one (once)."""

    def refused(self) -> None:
        """QEMU refused the migrate command: drop what it was given."""

    def abandon(self) -> None:
        """After a failure: cut fixedram's end so that its reader or writer stops."""

    def close(self) -> None:
        """Release what the transport holds."""


class FdTransport(Transport):
    """A socket pair: one end goes to QEMU as fd ``name`` (``getfd``, for ``fd:NAME``), the
    other is :attr:`channel`, fixedram's. ``large_buffers``: see
    :data:`fixedram.io.channel.UNIX_SOCKET_BUFFER`."""

    def __init__(self, qmp: QMP, name: str, *, large_buffers: bool = True) -> None:
        from fixedram.io.channel import socket_pair

        self._qmp = qmp
        self.name = name
        self.uri = f"fd:{name}"
        self.sock, theirs = socket_pair(large_buffers)
        self._theirs: socket.socket | None = theirs
        self.channel = SocketChannel(self.sock)

    def hand(self) -> None:
        theirs, self._theirs = self._theirs, None
        if theirs is None:
            return
        # QEMU keeps its own copy of the descriptor: ours goes at once
        try:
            self._qmp.send_fd(theirs.fileno(), self.name)
        finally:
            theirs.close()

    def refused(self) -> None:
        self._qmp.close_fd(self.name)

    def abandon(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        if self._theirs is not None:
            self._theirs.close()
            self._theirs = None
        self.sock.close()


def _probe(qmp: QMP, path: str, *, server: bool) -> str | None:
    """Whether QEMU can listen on (``server``) or connect to the unix socket ``path``: QEMU
    adds a socket chardev there and removes it at once, which changes nothing. None if it
    could, else QEMU's reason; a probe chardev QEMU refuses to remove is an error naming it."""
    name = f"fixedram-probe-{os.getpid()}"
    data: dict[str, Any] = {"addr": {"type": "unix", "data": {"path": path}}, "server": server}
    if server:
        data["wait"] = False
    try:
        qmp.cmd("chardev-add", id=name, backend={"type": "socket", "data": data})
    except QMPCommandError as e:
        return str(e)
    try:
        qmp.cmd("chardev-remove", id=name)
    except QMPCommandError as e:
        raise VMError(f"QEMU refused to remove fixedram's probe chardev '{name}', which is "
                      f"left in QEMU ({e})") from None
    return None


def _private_dir(prefix: str, parent: str | None = None) -> Path:
    return Path(tempfile.mkdtemp(prefix=prefix, dir=parent))


class UnixListen(Transport):
    """fixedram listens on ``mig.sock`` in a private directory under /tmp (kept short: a
    unix socket path has at most 107 bytes), for ``connections`` connections from QEMU."""

    def __init__(self, connections: int) -> None:
        from fixedram.io.channel import listen

        self.dir = _private_dir("fixedram-", "/tmp")
        self.uri = f"unix:{self.dir}/mig.sock"
        try:
            self.listener: Listener = listen(self.uri, backlog=connections + 1)
        except BaseException:
            shutil.rmtree(self.dir, ignore_errors=True)
            raise

    def can_connect(self, qmp: QMP) -> str | None:
        """Whether QEMU can connect to a socket in the private directory; None if so, else
        QEMU's reason.

        QEMU may run as another user, or confined, and a multifd migration whose channels
        cannot connect fails only once the save has begun; so QEMU is first asked to
        connect to a probe socket of fixedram's there (a ``chardev-add`` client, removed at
        once), which changes nothing. The probe connection is never accepted.
        """
        path = f"{self.dir}/probe.sock"
        probe = Listener(f"unix:{path}", backlog=1)
        try:
            return _probe(qmp, path, server=False)
        finally:
            probe.close()

    def refused(self) -> None:
        self.listener.close()

    def abandon(self) -> None:
        self.listener.close()

    def close(self) -> None:
        self.listener.close()
        shutil.rmtree(self.dir, ignore_errors=True)


class UnixConnect(Transport):
    """QEMU listens on ``mig.sock`` in a private directory (its name starts with
    ``prefix``); fixedram connects, with :meth:`connect` or by handing :attr:`uri` to a
    sender that connects itself."""

    def __init__(self, prefix: str) -> None:
        self.dir = _private_dir(prefix)
        self.uri = f"unix:{self.dir}/mig.sock"
        self.channel: SocketChannel | None = None

    def can_listen(self, qmp: QMP) -> str | None:
        """Whether QEMU can listen in the private directory; None if so, else QEMU's reason.

        QEMU may run as another user, or confined, and a ``migrate-incoming`` that fails to
        listen leaves QEMU unable to take another; so QEMU is first asked to listen on a
        socket of its own there (``chardev-add``, removed at once), which changes nothing.
        """
        return _probe(qmp, f"{self.dir}/probe.sock", server=True)

    def connect(self, *, large_buffers: bool = True) -> SocketChannel:
        """Connect to QEMU (once it listens: after ``migrate-incoming``)."""
        from fixedram.io.channel import connect

        self.channel = connect(self.uri, large_buffers=large_buffers)
        return self.channel

    def abandon(self) -> None:
        if self.channel is not None:
            with contextlib.suppress(OSError):
                self.channel.sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        if self.channel is not None:
            self.channel.close()
        shutil.rmtree(self.dir, ignore_errors=True)


class ExecTransport(Transport):
    """QEMU runs the command ``argv(report_file)`` and reads its stdout; the command writes
    its report to ``report_file``, in a private directory."""

    def __init__(self, argv: Callable[[Path], list[str]]) -> None:
        self.dir = _private_dir("fixedram-lazy-")
        self.report_file = self.dir / "report.json"
        self.uri = "exec:" + shlex.join(argv(self.report_file))

    def report(self) -> dict[str, Any]:
        """The child's report; raises :class:`EndpointError` when it left none."""
        try:
            return dict(json.loads(self.report_file.read_text()))
        except (OSError, ValueError):
            raise EndpointError("the exec: child left no report (QEMU's stderr says why)") from None

    def close(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
