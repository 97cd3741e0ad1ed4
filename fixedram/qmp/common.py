"""Pieces shared by save and restore: the facts read before anything changes (one round
trip), undoable migration settings, waiting on migration events, a result-keeping thread."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fixedram.errors import FixedramError, VMError
from fixedram.qmp.client import QMP, Events, machine_name

__all__ = ["Facts", "MigrationSettings", "Worker", "hand_socket", "ram_with_data", "read_facts",
           "wait_event"]

#: Events that end a wait early: migration state changes (capability ``events``, which
#: :class:`MigrationSettings` turns on) and the guest starting or stopping.
WAKE_EVENTS = ("MIGRATION", "RESUME", "STOP")


@dataclass
class Facts:
    """What a save or restore reads from QEMU before changing anything."""

    status: str  # run state (query-status)
    migration: str | None  # query-migrate's status (None before any migration)
    machine: str  # full machine type name (pc-q35-10.0)
    ramblocks: str  # HMP info ramblock
    caps: dict[str, bool]  # migration capabilities
    params: dict[str, Any]  # migration parameters
    objects: list[dict[str, Any]]  # qom-list /objects: user-created objects, memory backends


def read_facts(qmp: QMP) -> Facts:
    """Run state, migration state, machine type, RAM blocks, migration settings and the
    user-created objects, in one round trip."""
    st, mig, mtype, blocks, caps, params, objects = qmp.batch(
        ("query-status", None), ("query-migrate", None),
        ("qom-get", {"path": "/machine", "property": "type"}),
        ("human-monitor-command", {"command-line": "info ramblock"}),
        ("query-migrate-capabilities", None), ("query-migrate-parameters", None),
        ("qom-list", {"path": "/objects"}))
    return Facts(
        status=str(st["status"]), migration=dict(mig).get("status"),
        machine=machine_name(mtype), ramblocks=str(blocks),
        caps={c["capability"]: bool(c["state"]) for c in caps}, params=dict(params),
        objects=[dict(o) for o in objects])


def ram_with_data(qmp: QMP, facts: Facts) -> list[str]:
    """The destination's memory backends whose RAM may not start as zeros: a
    ``memory-backend-file`` over a regular file that already has blocks allocated, or whose
    file fixedram cannot see (``docs/fresh-destination.md``). Each as ``"ID (PATH)"``."""
    import os
    import stat

    found = []
    for o in facts.objects:
        if o.get("type") != "child<memory-backend-file>":
            continue
        name = str(o.get("name"))
        path = str(qmp.cmd("qom-get", path=f"/objects/{name}", property="mem-path"))
        try:
            st = os.stat(path)
        except OSError:
            found.append(f"{name} ({path})")
            continue
        if stat.S_ISREG(st.st_mode) and st.st_blocks > 0:
            found.append(f"{name} ({path})")
    return found


def hand_socket(qmp: QMP, name: str, *, large_buffers: bool = True) -> socket.socket:
    """Give QEMU one end of a fresh socket pair as fd ``name`` (``getfd``: for ``fd:NAME``
    URIs) and return the other end, ours (``large_buffers``: see
    :data:`fixedram.io.channel.UNIX_SOCKET_BUFFER`)."""
    from fixedram.io.channel import socket_pair

    ours, theirs = socket_pair(large_buffers)
    try:
        qmp.send_fd(theirs.fileno(), name)
    except BaseException:
        ours.close()
        raise
    finally:
        theirs.close()
    return ours


def wait_event(events: Events | None, seconds: float) -> None:
    """Sleep up to ``seconds``, ending early when one of ``events`` arrives."""
    if events is None:
        time.sleep(seconds)
    else:
        events.get(seconds)


class MigrationSettings:
    """Migration capabilities/parameters changed for one operation, and how to undo that.

    ``facts`` (from :func:`read_facts`) saves the two queries of the current settings.
    Capability ``events`` is turned on with the first :meth:`set` (where QEMU has it and it
    is off), so that waits end on QEMU's MIGRATION events instead of the next poll; it is
    put back like the others but not listed in :attr:`caps` (what the operation asked for).
    """

    def __init__(self, qmp: QMP, facts: Facts | None = None) -> None:
        self.qmp = qmp
        self._old_caps = facts.caps if facts is not None else qmp.capabilities()
        self._old_params = facts.params if facts is not None else qmp.parameters()
        self.caps: dict[str, bool] = {}
        self.params: dict[str, Any] = {}
        self._events = False  # capability events turned on by us

    def set(self, caps: dict[str, bool], params: dict[str, Any]) -> None:
        # a capability this QEMU lacks is as good as off
        caps = {k: v for k, v in caps.items() if self._old_caps.get(k, False) != v}
        events = self._old_caps.get("events") is False and not self._events
        missing = [k for k in caps if k not in self._old_caps]
        if missing:
            raise VMError(f"QEMU {self.qmp.version_str} lacks migration capability "
                          f"{', '.join(missing)}")
        # multifd-channels/direct-io only make sense with multifd: set caps first
        self.caps.update(caps)
        self.qmp.set_capabilities({"events": True, **caps} if events else caps)
        self._events = self._events or events
        params = {k: v for k, v in params.items() if self._old_params.get(k) != v}
        self.params.update(params)
        self.qmp.set_parameters(params)

    def restore(self) -> None:
        """Put back what :meth:`set` changed (parameters first, while caps still allow them:
        QEMU runs the two in the order sent, in one round trip)."""
        calls: list[tuple[str, dict[str, Any] | None]] = []
        old = {k: self._old_params[k] for k in self.params if k in self._old_params}
        if old:
            calls.append(("migrate-set-parameters", old))
        caps = {k: self._old_caps.get(k, False) for k in self.caps}
        if self._events:
            caps["events"] = False
        if caps:
            calls.append(("migrate-set-capabilities", {"capabilities": [
                {"capability": k, "state": bool(v)} for k, v in caps.items()]}))
        if calls:
            with contextlib.suppress(FixedramError):
                self.qmp.batch(*calls)


class Worker(threading.Thread):
    """Runs one endpoint function; keeps its result or its exception."""

    def __init__(self, name: str, fn: Callable[[], Any]) -> None:
        super().__init__(name=name, daemon=True)
        self._fn = fn
        self.result: Any = None
        self.error: BaseException | None = None
        self.target: Any = None  # what the worker works on, for error messages

    def run(self) -> None:
        try:
            self.result = self._fn()
        except BaseException as e:
            self.error = e

    def outcome(self, timeout: float = 60.0) -> Any:
        """Wait for the function; return its result, or raise its exception."""
        self.join(timeout)
        if self.error is not None:
            raise self.error
        return self.result


def abandon(worker: Worker | None, sock: socket.socket | None) -> None:
    """After a failure: cut the worker's connection so it stops, and give it time to."""
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
    if worker is not None:
        worker.join(10.0)
