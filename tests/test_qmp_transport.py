"""The transports and the migration wait of the QMP orchestration, without QEMU: what each
transport gives QEMU and takes back on a refusal, a failure or the end, and how
:class:`~fixedram.qmp.common.Watch` turns readings into a result or one error."""

from __future__ import annotations

import os
import shlex
import time
from pathlib import Path
from typing import Any, cast

import pytest

from fixedram.errors import EndpointError, FixedramError, VMError
from fixedram.qmp.common import Watch, Worker
from fixedram.qmp.transport import ExecTransport, FdTransport, UnixConnect, UnixListen


class FakeEvents:
    def get(self, timeout: float) -> None:
        time.sleep(min(timeout, 0.001))

    def close(self) -> None:
        pass


class FakeQMP:
    """Answers query-migrate / query-status from a script of readings; records commands."""

    path = Path("/fake.qmp")

    def __init__(self, readings: list[tuple[str, dict[str, Any]]] | None = None) -> None:
        self.readings = list(readings or [])
        self.calls: list[str] = []
        self.fds: dict[str, int] = {}

    def events(self, *names: str) -> FakeEvents:
        return FakeEvents()

    def _next(self) -> tuple[str, dict[str, Any]]:
        if not self.readings:
            raise VMError("QMP query-status: lost the connection to QEMU")
        return self.readings[0] if len(self.readings) == 1 else self.readings.pop(0)

    def query_migrate(self) -> dict[str, Any]:
        return dict(self._next()[1])

    def batch(self, *calls: tuple[str, Any]) -> list[Any]:
        run, mig = self._next()
        return [{"status": run}, mig]

    def cmd(self, name: str, args: Any = None, **kw: Any) -> Any:
        self.calls.append(name)
        return {}

    def send_fd(self, fd: int, name: str) -> None:
        self.fds[name] = os.dup(fd)
        self.calls.append("getfd")

    def close_fd(self, name: str) -> None:
        os.close(self.fds.pop(name))
        self.calls.append("closefd")


def failing(e: BaseException) -> Worker:
    def run() -> None:
        raise e

    w = Worker.started("test", run)
    w.join()
    return w


def test_fd_transport_hands_its_end_once_and_takes_it_back_on_refusal() -> None:
    q = FakeQMP()
    t = FdTransport(cast(Any, q), "mig")
    assert t.uri == "fd:mig" and q.calls == []  # nothing in QEMU before the migrate command
    t.hand()

    def refuse(uri: str) -> None:
        raise VMError(f"QMP migrate-incoming: {uri} refused")

    with pytest.raises(VMError, match="fd:mig refused"):
        t.migrate(refuse)
    assert q.calls == ["getfd", "closefd"] and q.fds == {}
    t.abandon()
    t.close()
    t.close()


def test_fd_transport_carries_bytes_to_qemus_end() -> None:
    q = FakeQMP()
    t = FdTransport(cast(Any, q), "mig")
    t.migrate(lambda uri: None)
    t.channel.sendall(b"QEVM")
    assert os.read(q.fds["mig"], 4) == b"QEVM"
    t.close()
    assert os.read(q.fds.pop("mig"), 4) == b""  # our end closed: QEMU reads end of stream


def test_unix_transports_remove_their_directories() -> None:
    listening = UnixListen(3)
    sock = Path(listening.uri.removeprefix("unix:"))
    assert sock.is_socket() and listening.dir.stat().st_mode & 0o777 == 0o700
    listening.refused()
    assert not sock.exists()
    listening.close()
    listening.close()
    assert not listening.dir.exists()
    connecting = UnixConnect("fixedram-test-")
    assert connecting.dir.name.startswith("fixedram-test-") and connecting.channel is None
    connecting.abandon()
    connecting.close()
    assert not connecting.dir.exists()


def test_exec_transport_command_and_report() -> None:
    t = ExecTransport(lambda report: ["fixedram", "send", "--report-json", str(report), "a b"])
    assert t.uri == "exec:" + shlex.join(
        ["fixedram", "send", "--report-json", str(t.report_file), "a b"]
    )
    with pytest.raises(EndpointError, match="left no report"):
        t.report()
    t.report_file.write_text('{"requests": 3}')
    assert t.report() == {"requests": 3}
    t.close()
    assert not t.dir.exists()


def test_watch_destination_waits_and_names_its_failures() -> None:
    q = FakeQMP([("inmigrate", {"status": "active"}), ("running", {"status": "completed"})])
    w = Watch(cast(Any, q), incoming="the load")
    r = w.until(lambda r: r.run != "inmigrate" and r.status in (None, "none", "completed"))
    assert (r.run, r.status) == ("running", "completed")
    q = FakeQMP([("inmigrate", {"status": "failed", "error-desc": "bad section"})])
    with pytest.raises(VMError, match=r"^the load failed: bad section$"):
        Watch(cast(Any, q), incoming="the load").until(lambda r: False)
    q = FakeQMP([])  # QEMU gone
    with pytest.raises(VMError, match="exited during the lazy restore"):
        Watch(cast(Any, q), incoming="the lazy restore").until(lambda r: False)
    w = Watch(cast(Any, FakeQMP([])), incoming="the load")
    w.worker = failing(EndpointError("the peer closed the connection"))
    with pytest.raises(EndpointError, match="peer closed"):  # the sender's error first
        w.until(lambda r: False)
    q = FakeQMP([("inmigrate", {"status": "active"})])
    with pytest.raises(VMError, match=r"^slow inmigrate/active$"):
        Watch(cast(Any, q), incoming="the load").until(
            lambda r: False,
            deadline=time.monotonic() + 0.01,
            late=lambda r: f"slow {r.run}/{r.status}",
        )


def test_watch_source_prefers_the_writers_error_and_cancels() -> None:
    q = FakeQMP([("", {"status": "failed", "error-desc": "Unable to write"})])
    w = Watch(cast(Any, q))
    w.worker = failing(FixedramError("writing /x: No space left on device"))
    with pytest.raises(FixedramError, match="No space left"):
        w.until(lambda r: r.status == "completed")
    w.worker = failing(EndpointError("the source closed the connection"))
    with pytest.raises(VMError, match=r"^migration failed: Unable to write$"):
        w.until(lambda r: r.status == "completed")
    q = FakeQMP([("", {"status": "active"})])
    w = Watch(cast(Any, q))
    w.worker = failing(FixedramError("writing /x: disk gone"))
    with pytest.raises(FixedramError, match="disk gone"):
        w.until(lambda r: r.status == "completed")
    assert q.calls == ["migrate_cancel"]
    q = FakeQMP([("", {"status": "active"}), ("", {"status": "completed", "ram": {}})])
    seen: list[Any] = []
    r = Watch(cast(Any, q)).until(
        lambda r: r.status == "completed", each=lambda r: seen.append(r.status)
    )
    assert r.status == "completed" and seen == ["active", "completed"]
    q = FakeQMP([("", {"status": "active"})])
    with pytest.raises(VMError, match="too slow"):
        Watch(cast(Any, q)).until(
            lambda r: False, deadline=time.monotonic(), late=lambda r: "too slow"
        )
    assert q.calls == ["migrate_cancel"]
