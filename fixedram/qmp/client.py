"""A small synchronous QMP client over QEMU's own ``qemu.qmp`` library.

:class:`QMP` runs a :class:`qemu.qmp.QMPClient` on a private asyncio loop in a daemon thread,
so it can be used from plain synchronous code (and from threads) without touching the
caller's event loop. Every failure is a :class:`~fixedram.errors.VMError` with a one-line
message: a socket that does not exist or refuses connections, a QMP monitor that never greets
(another client holds it), QEMU going away, or QEMU's own error text for a failed command.

Example::

    with QMP.connect("/run/vm.qmp") as q:
        print(q.version_str, q.status())
        q.send_fd(sock.fileno(), "mig")
        q.cmd("migrate", uri="fd:mig")
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
from collections.abc import Coroutine, Mapping
from pathlib import Path
from typing import Any, TypeVar

from qemu.qmp import ConnectError, EventListener, ExecuteError, QMPClient, QMPError

from fixedram.errors import QMPCommandError, VMError

__all__ = ["DEFAULT_TIMEOUT", "QMP", "Events", "machine_name"]

#: Seconds to wait for one QMP command (or for the greeting) before giving up.
DEFAULT_TIMEOUT = 60.0

_T = TypeVar("_T")

# qemu.qmp logs connection trouble at WARNING/ERROR; without a handler Python would print it
# to stderr, which breaks fixedram's one-line errors. Errors reach the caller as VMError.
logging.getLogger("qemu.qmp").addHandler(logging.NullHandler())
logging.getLogger("qemu.qmp").propagate = False


class QMP:
    """A connected QMP session (use :meth:`connect`). A context manager; :meth:`close` ends it.

    ``path`` is the unix socket of a ``-qmp unix:PATH,server=on,wait=off`` (or ``-chardev
    socket`` + ``-mon mode=control``) monitor. QEMU serves one client per monitor at a time.
    """

    def __init__(self, path: str | os.PathLike[str], *, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.path = Path(path)
        self.timeout = timeout
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="fixedram-qmp-client", daemon=True
        )
        self._thread.start()
        self._client: QMPClient | None = None
        self._lock = threading.Lock()
        self._version: tuple[int, int, int] | None = None

    # -- connection --------------------------------------------------------------------------

    @classmethod
    def connect(
        cls, path: str | os.PathLike[str], *, timeout: float = DEFAULT_TIMEOUT,
        greeting_timeout: float = 10.0,
    ) -> QMP:
        """Connect to the QMP socket at ``path`` and negotiate capabilities.

        Raises :class:`VMError` when the socket is missing, refuses the connection, or QEMU
        does not greet within ``greeting_timeout`` seconds (its monitor is busy with another
        client).
        """
        q = cls(path, timeout=timeout)
        try:
            q._open(greeting_timeout)
        except BaseException:
            q._stop_loop()
            raise
        return q

    def _open(self, greeting_timeout: float) -> None:
        p = self.path
        if not p.exists():
            raise VMError(f"QMP socket {p} does not exist")
        if not p.is_socket():
            raise VMError(f"{p} is not a QMP (unix) socket")
        client = QMPClient("fixedram")

        async def go() -> None:
            await client.connect(str(p))

        try:
            self._run(go(), greeting_timeout)
        except TimeoutError:
            with contextlib.suppress(Exception):
                self._run(client.disconnect(), 5.0)
            raise VMError(
                f"no QMP greeting on {p} within {greeting_timeout:.0f} s "
                "(is another client connected to this monitor?)"
            ) from None
        except ConnectError as e:
            cause = e.exc
            why = (cause.strerror if isinstance(cause, OSError) and cause.strerror
                   else str(cause) or e.error_message)
            raise VMError(f"cannot connect to QMP socket {p}: {why}") from None
        except (QMPError, OSError, EOFError) as e:
            raise VMError(f"cannot connect to QMP socket {p}: {e or type(e).__name__}") from None
        self._client = client
        with contextlib.suppress(AttributeError, KeyError, TypeError, ValueError):
            q: Any = client.greeting.QMP.version["qemu"]  # type: ignore[union-attr]
            self._version = (int(q["major"]), int(q["minor"]), int(q["micro"]))

    def close(self) -> None:
        """Disconnect (QEMU keeps running) and stop the private loop. Safe to call twice."""
        client, self._client = self._client, None
        if client is not None:
            with contextlib.suppress(Exception):
                self._run(client.disconnect(), 5.0)
        self._stop_loop()

    def _stop_loop(self) -> None:
        if self._loop.is_running():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(5.0)
        if not self._loop.is_running() and not self._loop.is_closed():
            self._loop.close()

    def __enter__(self) -> QMP:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _run(self, coro: Coroutine[Any, Any, _T], timeout: float | None) -> _T:
        fut = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return fut.result(timeout)
        except TimeoutError:
            fut.cancel()
            raise

    # -- commands ----------------------------------------------------------------------------

    def cmd(
        self, name: str, args: Mapping[str, Any] | None = None, /, *,
        timeout: float | None = None, **kwargs: Any,
    ) -> Any:
        """Run QMP command ``name`` and return its ``return`` value.

        Arguments come from ``args`` (exact QMP names) and/or keywords, where ``_`` becomes
        ``-`` (``cmd("migrate-set-parameters", max_bandwidth=1 << 40)``). Raises
        :class:`VMError` with QEMU's error text, or when QEMU is gone or does not answer.
        """
        a = dict(args or {})
        a.update({k.replace("_", "-"): v for k, v in kwargs.items()})
        return self.batch((name, a), timeout=timeout)[0]

    def batch(self, *calls: tuple[str, Mapping[str, Any] | None],
              timeout: float | None = None) -> list[Any]:
        """Run several commands in one round trip: all are sent at once, QEMU answers them in
        order. Returns their ``return`` values; the first failure raises as in :meth:`cmd`
        (the others still ran: batch only commands whose order does not matter, like
        queries)."""
        client = self._client
        first = calls[0][0] if calls else "?"
        if client is None:
            raise VMError(f"QMP {first}: not connected to {self.path}")
        wait = timeout or self.timeout

        async def go() -> list[Any]:
            return await asyncio.gather(
                *(client.execute(name, dict(args) if args else None) for name, args in calls),
                return_exceptions=True)

        with self._lock:
            try:
                results = self._run(go(), wait)
            except TimeoutError:
                raise VMError(f"QMP {first}: QEMU did not answer within {wait:.0f} s") from None
            except (QMPError, OSError, EOFError):
                results = [EOFError()]
        for (name, _), r in zip(calls, results, strict=False):
            if isinstance(r, ExecuteError):
                raise QMPCommandError(f"QMP {name}: {r}") from None
            if isinstance(r, (QMPError, OSError, EOFError)):
                raise VMError(
                    f"QMP {name}: lost the connection to QEMU at {self.path} (QEMU exited?)"
                ) from None
            if isinstance(r, BaseException):
                raise r
        return list(results)

    def events(self, *names: str) -> Events:
        """Start collecting QEMU's events named ``names`` (``RESUME``, ``MIGRATION``...);
        read them with :meth:`Events.get`. Use as a context manager (or ``close`` it)."""
        client = self._client
        if client is None:
            raise VMError(f"events: not connected to {self.path}")
        return Events(self, client, names)

    def hmp(self, cmdline: str) -> str:
        """Run a human-monitor command and return its text output."""
        return str(self.cmd("human-monitor-command", {"command-line": cmdline}))

    def send_fd(self, fd: int, name: str) -> None:
        """Pass ``fd`` to QEMU (SCM_RIGHTS) and register it as ``name`` with ``getfd``.

        QEMU keeps its own copy; the caller still owns (and should close) ``fd``. A name
        already in use is replaced.
        """
        client = self._client
        if client is None:
            raise VMError(f"getfd: not connected to {self.path}")
        with self._lock:
            try:
                client.send_fd_scm(fd)
            except (QMPError, OSError) as e:
                raise VMError(f"cannot pass a file descriptor to QEMU over {self.path}: {e}") \
                    from None
        self.cmd("getfd", fdname=name)

    def close_fd(self, name: str) -> None:
        """Drop a descriptor registered with :meth:`send_fd` (no error if it is gone)."""
        with contextlib.suppress(VMError):
            self.cmd("closefd", fdname=name)

    # -- queries -----------------------------------------------------------------------------

    @property
    def version(self) -> tuple[int, int, int]:
        """QEMU's version (``query-version``), e.g. ``(10, 0, 2)``."""
        if self._version is None:
            q = self.cmd("query-version")["qemu"]
            self._version = (int(q["major"]), int(q["minor"]), int(q["micro"]))
        return self._version

    @property
    def version_str(self) -> str:
        """``"10.0.2"``."""
        return ".".join(map(str, self.version))

    def status(self) -> str:
        """Run state from ``query-status``: ``running``, ``paused``, ``inmigrate``, ..."""
        return str(self.cmd("query-status")["status"])

    def query_migrate(self) -> dict[str, Any]:
        """``query-migrate`` (``{}`` before any migration)."""
        return dict(self.cmd("query-migrate"))

    def capabilities(self) -> dict[str, bool]:
        """All migration capabilities and their current state."""
        return {c["capability"]: bool(c["state"])
                for c in self.cmd("query-migrate-capabilities")}

    def set_capabilities(self, caps: Mapping[str, bool]) -> None:
        """``migrate-set-capabilities`` for the given ones (no-op when empty)."""
        if caps:
            self.cmd("migrate-set-capabilities",
                     capabilities=[{"capability": k, "state": bool(v)} for k, v in caps.items()])

    def parameters(self) -> dict[str, Any]:
        """Current migration parameters (``query-migrate-parameters``)."""
        return dict(self.cmd("query-migrate-parameters"))

    def set_parameters(self, params: Mapping[str, Any]) -> None:
        """``migrate-set-parameters`` (no-op when empty)."""
        if params:
            self.cmd("migrate-set-parameters", dict(params))

    def machine_type(self) -> str:
        """The running machine's full type name (``pc-q35-10.0``, never an alias like ``q35``)."""
        return machine_name(self.cmd("qom-get", path="/machine", property="type"))

    def ramblocks_text(self) -> str:
        """HMP ``info ramblock`` output."""
        return self.hmp("info ramblock")

    def __repr__(self) -> str:
        return f"<QMP {self.path} {'connected' if self._client else 'closed'}>"


def machine_name(qom_type: Any) -> str:
    """The machine type name from ``qom-get /machine type`` (``pc-q35-10.0-machine``)."""
    return str(qom_type).removesuffix("-machine")


class Events:
    """Events of one QMP session, collected from :meth:`QMP.events` on: waiting for one
    costs no round trips (unlike polling ``query-status``), and none is missed between a
    command and the wait that follows it."""

    def __init__(self, qmp: QMP, client: QMPClient, names: tuple[str, ...]) -> None:
        self._qmp = qmp
        self._client = client
        self._listener = EventListener(names or None)

        async def register() -> None:
            client.register_listener(self._listener)

        qmp._run(register(), 5.0)

    def get(self, timeout: float) -> dict[str, Any] | None:
        """The next event (``{"event": NAME, "data": {...}, ...}``), or None after
        ``timeout`` seconds without one."""
        listener = self._listener

        async def next_event() -> Any:
            return await asyncio.wait_for(listener.get(), timeout)

        try:
            return dict(self._qmp._run(next_event(), timeout + 5.0))
        except TimeoutError:
            return None

    def close(self) -> None:
        """Stop collecting."""
        async def remove() -> None:
            with contextlib.suppress(Exception):
                self._client.remove_listener(self._listener)

        with contextlib.suppress(Exception):
            self._qmp._run(remove(), 5.0)

    def __enter__(self) -> Events:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
