"""Pieces shared by save and restore: the facts read before anything changes (one round
trip), undoable migration settings, a result-keeping thread, and :class:`Watch`, the one wait
for a migration (QEMU's events, and a poll when none arrives)."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fixedram.errors import EndpointError, FixedramError, VMError
from fixedram.qmp.client import QMP, Events, machine_name

__all__ = ["Facts", "MigrationSettings", "Watch", "Reading", "Worker", "abandon",
           "incoming_blocks", "ram_with_data", "read_facts", "wait_event"]

#: Events that end a wait early: migration state changes (capability ``events``, which
#: :class:`MigrationSettings` turns on) and the guest starting or stopping.
WAKE_EVENTS = ("MIGRATION", "RESUME", "STOP")

#: Seconds between two readings of QEMU's state while no event arrives.
POLL = 0.02

#: multifd connections of a proxy save, and of a proxy restore of a mapped-ram image (a file
#: or an object image), when none are asked for. A restore: QEMU loads with a thread per
#: connection instead of parsing one stream page by page, and the image's runs of pages go
#: out by ``sendfile`` from a file, or from an object image's chunks in memory as they are
#: (docs/multifd.md §6.1). A save: QEMU sends from a thread per connection, and fixedram
#: receives 512 KiB packets whose pages are named before their data, in a thread per
#: connection (docs/multifd.md §7). More than two gained nothing on the two-core machines
#: measured (README, "Performance").
AUTO_PROXY_CHANNELS = 2


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


def incoming_blocks(qmp: QMP, facts: Facts, *, name_state: bool = True) -> list[tuple[str, int]]:
    """The RAM blocks of a destination, after checking from ``facts`` that it waits for an
    incoming migration (``-incoming defer``) and has none yet (``name_state``: say which)."""
    from fixedram.endpoint.send import dest_ramblocks_from_hmp

    if facts.status != "inmigrate":
        raise VMError(f"QEMU at {qmp.path} is not waiting for an incoming migration (status "
                      f"{facts.status}); start it with -incoming defer")
    if facts.migration not in (None, "none"):
        raise VMError(f"QEMU at {qmp.path} already has an incoming migration"
                      + (f" ({facts.migration})" if name_state else ""))
    blocks = dest_ramblocks_from_hmp(facts.ramblocks)
    if not blocks:
        raise VMError(f"cannot read the RAM blocks of QEMU at {qmp.path} (info ramblock)")
    return blocks


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

    @classmethod
    def started(cls, name: str, fn: Callable[[], Any]) -> Worker:
        """A worker running ``fn``, started."""
        w = cls(name, fn)
        w.start()
        return w

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


def abandon(worker: Worker | None, transport: Any, wait: float = 10.0) -> None:
    """After a failure: cut the worker's connection (``transport``, a
    :class:`fixedram.qmp.transport.Transport` or None) so it stops, and give it time to."""
    if transport is not None:
        transport.abandon()
    if worker is not None:
        worker.join(wait)


@dataclass
class Reading:
    """QEMU's state at one moment of a migration."""

    migration: dict[str, Any]  # query-migrate
    run: str = ""  # run state (query-status; read on a destination only)

    @property
    def status(self) -> str | None:
        """The migration's status (None before any migration)."""
        return self.migration.get("status")


class Watch:
    """The wait of a save, a restore and a lazy restore for their migration.

    Listens for :data:`WAKE_EVENTS` from its creation (before the command that starts the
    migration, so that no event is missed). :meth:`until` reads QEMU's state at once, then at
    every event or ``every`` seconds without one. A source (``incoming`` None) is read with
    ``query-migrate``; a destination with ``query-status`` and ``query-migrate`` in one round
    trip, ``incoming`` naming what it does in error messages (``"the load"``). A failure
    raises: the migration's, or that of :attr:`worker`, the thread at fixedram's end of the
    stream (its own error says more than QEMU's, unless it only saw the stream end).
    """

    def __init__(self, qmp: QMP, *, incoming: str | None = None) -> None:
        self.qmp = qmp
        self.incoming = incoming
        self.worker: Worker | None = None
        self.events = qmp.events(*WAKE_EVENTS)

    def close(self) -> None:
        """Stop listening."""
        self.events.close()

    def until(
        self,
        done: Callable[[Reading], bool],
        *,
        every: float = POLL,
        deadline: float | None = None,
        late: Callable[[Reading], str] | None = None,
        each: Callable[[Reading], None] | None = None,
    ) -> Reading:
        """Read QEMU's state until ``done`` holds for a reading, and return that reading.
        ``each`` sees every reading first. Past ``deadline`` (a :func:`time.monotonic`
        value) raise :class:`VMError` with ``late(reading)`` (a source's migration is
        cancelled first)."""
        while True:
            r = self._read()
            if each is not None:
                each(r)
            self._check(r)
            if done(r):
                return r
            if deadline is not None and time.monotonic() > deadline:
                if self.incoming is None:
                    self._cancel()
                raise VMError(late(r) if late is not None else "the migration took too long")
            wait_event(self.events, every)

    def _read(self) -> Reading:
        if self.incoming is None:
            return Reading(self.qmp.query_migrate())
        try:
            status, mig = self.qmp.batch(("query-status", None), ("query-migrate", None))
            return Reading(dict(mig), str(status["status"]))
        except VMError:
            worker = self.worker
            if worker is not None:
                worker.join(5.0)
                if worker.error is not None:
                    raise worker.error from None
            raise VMError(f"the destination QEMU exited during {self.incoming} (its stderr "
                          "says why)") from None

    def _check(self, r: Reading) -> None:
        """Raise when the migration or the worker failed."""
        worker = self.worker
        if self.incoming is not None:
            if worker is not None and worker.error is not None:
                raise worker.error
            if r.status == "failed":
                desc = r.migration.get("error-desc", "")
                raise VMError(f"{self.incoming} failed" + (f": {desc}" if desc else ""))
            return
        if r.status in ("failed", "cancelled"):
            if worker is not None:
                worker.join(5.0)
                # the writer's own failure (disk full...) says more than QEMU's; "the source
                # closed the connection" says less
                if worker.error is not None and not isinstance(worker.error, EndpointError):
                    raise worker.error
            desc = r.migration.get("error-desc", "")
            raise VMError(f"migration {r.status}" + (f": {desc}" if desc else ""))
        if r.status != "completed" and worker is not None and worker.error is not None:
            self._cancel()
            raise worker.error


    def _cancel(self) -> None:
        with contextlib.suppress(FixedramError):
            self.qmp.cmd("migrate_cancel")
