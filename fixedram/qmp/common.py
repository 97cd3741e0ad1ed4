"""Pieces shared by save and restore: undoable migration settings, a result-keeping thread."""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Callable
from typing import Any

from fixedram.errors import FixedramError, VMError
from fixedram.qmp.client import QMP

__all__ = ["MigrationSettings", "Worker"]


class MigrationSettings:
    """Migration capabilities/parameters changed for one operation, and how to undo that."""

    def __init__(self, qmp: QMP) -> None:
        self.qmp = qmp
        self._old_caps = qmp.capabilities()
        self._old_params = qmp.parameters()
        self.caps: dict[str, bool] = {}
        self.params: dict[str, Any] = {}

    def set(self, caps: dict[str, bool], params: dict[str, Any]) -> None:
        # a capability this QEMU lacks is as good as off
        caps = {k: v for k, v in caps.items() if self._old_caps.get(k, False) != v}
        missing = [k for k in caps if k not in self._old_caps]
        if missing:
            raise VMError(f"QEMU {self.qmp.version_str} lacks migration capability "
                          f"{', '.join(missing)}")
        # multifd-channels/direct-io only make sense with multifd: set caps first
        self.caps.update(caps)
        self.qmp.set_capabilities(caps)
        params = {k: v for k, v in params.items() if self._old_params.get(k) != v}
        self.params.update(params)
        self.qmp.set_parameters(params)

    def restore(self) -> None:
        """Put back what :meth:`set` changed (parameters first, while caps still allow them)."""
        with contextlib.suppress(FixedramError):
            old = {k: self._old_params[k] for k in self.params if k in self._old_params}
            self.qmp.set_parameters(old)
        with contextlib.suppress(FixedramError):
            self.qmp.set_capabilities({k: self._old_caps[k] for k in self.caps})


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
