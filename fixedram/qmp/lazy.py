"""Lazy restore driven over QMP: the guest runs at once, its pages follow on demand.

:func:`lazy_restore` takes a QEMU started with ``-incoming defer`` (same VM options as the
saved one), checks the image against it (machine type, RAM blocks) before QEMU sees a byte,
turns on capability ``postcopy-ram`` (mapped-ram and multifd off), and acts as the postcopy
source with :func:`fixedram.endpoint.postcopy.send_postcopy`. Transports:

``fd``
    a socketpair; one end goes to QEMU with ``getfd`` (``migrate-incoming uri=fd:NAME``).
``unix``
    QEMU listens on a private unix socket (``migrate-incoming uri=unix:PATH``), fixedram
    connects.
``exec``
    QEMU runs ``python -m fixedram send --postcopy IMAGE`` itself and reads its stdout; page
    requests go to the child's stdin. The child writes its report to a private JSON file.

Unless ``paused``, ``cont`` is issued while QEMU still waits (it then starts the guest the
moment it processes RUN, with no extra round trip). *Time to running* is measured from the
call to the moment QEMU left ``inmigrate`` (guest running, or ready and paused).

Once the guest runs, a failure of the image or of fixedram cannot be recovered: see
:mod:`fixedram.endpoint.postcopy`.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from fixedram.errors import EndpointError, VMError
from fixedram.qmp.client import QMP
from fixedram.qmp.common import (
    WAKE_EVENTS,
    MigrationSettings,
    Worker,
    abandon,
    hand_socket,
    read_facts,
    wait_event,
)
from fixedram.qmp.progress import Progress

__all__ = ["LazyRestoreReport", "lazy_restore"]

Transport = Literal["fd", "unix", "exec"]
ProgressFn = Callable[[Progress], None]

_FD_NAME = "fixedram-lazy"
_POLL = 0.005
_PAGE = 4096


@dataclass
class LazyRestoreReport:
    """What a lazy restore did. Times in seconds from the start of :func:`lazy_restore`."""

    image: str
    transport: str
    qemu_version: str
    machine: str
    image_format: str
    time_to_running: float  # QEMU left inmigrate: guest resumed (or ready, paused)
    time_to_run_sent: float | None  # fixedram wrote RUN (fd/unix only)
    total_time: float  # every page sent, SHUT received, QEMU reports completed
    pages: int  # pages with data in the image
    pages_on_demand: int  # sent because the guest touched them
    pages_pushed: int  # sent in the background
    zero_on_demand: int  # absent pages requested, answered with ZERO records
    requests: int  # page requests from QEMU
    bytes_sent: int
    ram_size: int
    status: str  # run state at the end
    caps_changed: dict[str, bool]

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return asdict(self)


def _lazy_progress(progress: ProgressFn) -> Callable[[Any], None]:
    def cb(s: Any) -> None:
        mbps = s.bytes_sent * 8 / s.elapsed / 1e6 if s.elapsed > 0 else None
        progress(Progress(
            phase="lazy restore", status="postcopy-active" if s.running else "setup",
            done_bytes=s.pages_done * _PAGE, total_bytes=s.pages_total * _PAGE,
            pages=s.pages_done, mbps=mbps,
            remaining_bytes=(s.pages_total - s.pages_done) * _PAGE,
        ))
    return cb


def _private_dir() -> Path:
    """A private directory for the unix socket or the exec: child's report (fd needs none)."""
    import tempfile

    return Path(tempfile.mkdtemp(prefix="fixedram-lazy-"))


def _poll_state(qmp: QMP, worker: Worker | None) -> tuple[str, dict[str, Any]]:
    """Run state and incoming migration state; raise when the load failed."""
    if worker is not None and worker.error is not None:
        raise worker.error
    try:
        status, mig = qmp.batch(("query-status", None), ("query-migrate", None))
        st = str(status["status"])
    except VMError:
        if worker is not None:
            worker.join(5.0)
            if worker.error is not None:
                raise worker.error from None
        raise VMError("the destination QEMU exited during the lazy restore (its stderr says "
                      "why)") from None
    if mig.get("status") == "failed":
        desc = mig.get("error-desc", "")
        raise VMError("the lazy restore failed" + (f": {desc}" if desc else ""))
    return st, mig


def lazy_restore(
    qmp: QMP,
    image: str | os.PathLike[str],
    *,
    transport: Transport = "fd",
    paused: bool = False,
    progress: ProgressFn | None = None,
    push_rate: float | None = None,
    timeout: float | None = None,
    started: float | None = None,
) -> LazyRestoreReport:
    """Restore ``image`` lazily into the QEMU behind ``qmp`` (started ``-incoming defer``).

    Returns once every page is in and QEMU reports ``completed``. ``paused`` leaves the VM
    paused (it is ready at once, pages still arrive). ``push_rate`` (bytes/s) throttles the
    background push; ``progress`` gets a :class:`Progress` now and then (fd/unix only).
    ``started`` (a :func:`time.monotonic` value, default: now) is where the reported times
    count from, e.g. the start of the command. Raises
    :class:`~fixedram.errors.MismatchError` / :class:`~fixedram.errors.ImageError` before
    anything is sent, :class:`~fixedram.endpoint.postcopy.PostcopyFailed` when the restore
    broke after the guest started.
    """
    from fixedram.endpoint.postcopy import check_page_sizes, send_postcopy
    from fixedram.endpoint.send import (
        dest_page_sizes_from_hmp,
        dest_ramblocks_from_hmp,
        validate,
    )
    from fixedram.image import open_image
    from fixedram.io.channel import Channel, SocketChannel, connect

    t0 = time.monotonic() if started is None else started
    path = Path(image).absolute()
    if transport not in ("fd", "unix", "exec"):
        raise VMError(f"unknown transport {transport!r} (fd, unix or exec)")
    facts = read_facts(qmp)
    if facts.status != "inmigrate":
        raise VMError(f"QEMU at {qmp.path} is not waiting for an incoming migration (status "
                      f"{facts.status}); start it with -incoming defer")
    if facts.migration not in (None, "none"):
        raise VMError(f"QEMU at {qmp.path} already has an incoming migration")
    machine = facts.machine
    ramblocks = facts.ramblocks
    dest_blocks = dest_ramblocks_from_hmp(ramblocks)
    if not dest_blocks:
        raise VMError(f"cannot read the RAM blocks of QEMU at {qmp.path} (info ramblock)")
    check_page_sizes(dest_page_sizes_from_hmp(ramblocks))
    with open_image(path) as img:
        validate(img, dest_machine=machine, dest_blocks=dest_blocks)
        pages = sum(img.count_present(n) for n in img.blocks)
        ram_size, fmt = img.ram_size, img.format
        settings = MigrationSettings(qmp, facts)
        events = qmp.events(*WAKE_EVENTS)
        worker: Worker | None = None
        ours: socket.socket | None = None
        tmp = _private_dir() if transport != "fd" else None
        report_file = tmp / "report.json" if tmp is not None else None
        run_sent: list[float] = []
        try:
            settings.set({"postcopy-ram": True, "mapped-ram": False, "multifd": False}, {})
            if not paused:
                qmp.cmd("cont")  # while inmigrate: start the guest as soon as RUN arrives
            cb = _lazy_progress(progress) if progress is not None else None

            def start_sender(chan: Channel) -> Worker:
                def run() -> Any:
                    return send_postcopy(img, chan, dest_machine=machine,
                                         dest_blocks=dest_blocks, progress=cb,
                                         on_running=lambda: run_sent.append(time.monotonic()),
                                         push_rate=push_rate)
                w = Worker("fixedram-postcopy", run)
                w.start()
                return w

            if transport == "fd":
                ours = hand_socket(qmp, _FD_NAME, large_buffers=False)
                # the sender prepares and writes the stream's head while QEMU starts the
                # load: the socket holds it until QEMU reads (a refused load ends the sender)
                worker = start_sender(SocketChannel(ours))
                try:
                    qmp.cmd("migrate-incoming", uri=f"fd:{_FD_NAME}")
                except BaseException:
                    qmp.close_fd(_FD_NAME)
                    raise
            elif transport == "unix":
                assert tmp is not None
                sock = tmp / "mig.sock"
                qmp.cmd("migrate-incoming", uri=f"unix:{sock}")
                chan = connect(f"unix:{sock}", large_buffers=False)
                ours = chan.sock
                worker = start_sender(chan)
            else:
                import shlex

                assert report_file is not None
                argv = [str(Path(sys.executable).absolute()), "-m", "fixedram", "send",
                        "--postcopy", "--quiet", "--report-json", str(report_file), str(path)]
                if push_rate:
                    argv[5:5] = ["--push-rate", str(int(push_rate))]
                qmp.cmd("migrate-incoming", uri="exec:" + shlex.join(argv))
            # time to running: QEMU leaves inmigrate once it has processed RUN
            deadline = None if timeout is None else t0 + timeout
            while True:
                st, _ = _poll_state(qmp, worker)
                if st != "inmigrate":
                    t_running = time.monotonic() - t0
                    break
                if deadline is not None and time.monotonic() > deadline:
                    raise VMError(f"the guest did not start within {timeout:.0f} s")
                wait_event(events, _POLL)
            # then every page: wait for completion
            while True:
                st, mig = _poll_state(qmp, worker)
                done = mig.get("status") in ("completed", None, "none")
                if done and (worker is None or not worker.is_alive()):
                    break
                if deadline is not None and time.monotonic() > deadline:
                    raise VMError(f"the lazy restore did not finish within {timeout:.0f} s "
                                  f"(status {mig.get('status')})")
                wait_event(events, 0.05)
            if worker is not None:
                rep = worker.outcome()
                counts = {"pages_on_demand": rep.pages_on_demand,
                          "pages_pushed": rep.pages_pushed,
                          "zero_on_demand": rep.zero_on_demand, "requests": rep.requests,
                          "bytes_sent": rep.bytes_sent}
            else:
                assert report_file is not None
                try:
                    counts = json.loads(report_file.read_text())
                except (OSError, ValueError):
                    raise EndpointError("the exec: child left no report (QEMU's stderr says "
                                        "why)") from None
        except BaseException:
            abandon(worker, ours)
            raise
        finally:
            events.close()
            settings.restore()
            if ours is not None:
                ours.close()
            if tmp is not None:
                with contextlib.suppress(OSError):
                    (tmp / "report.json").unlink(missing_ok=True)
                    (tmp / "mig.sock").unlink(missing_ok=True)
                    tmp.rmdir()
    if paused and qmp.status() == "running":
        qmp.cmd("stop")
    return LazyRestoreReport(
        image=str(path),
        transport=transport,
        qemu_version=qmp.version_str,
        machine=machine,
        image_format=fmt,
        time_to_running=t_running,
        time_to_run_sent=run_sent[0] - t0 if run_sent else None,
        total_time=time.monotonic() - t0,
        pages=pages,
        pages_on_demand=int(counts["pages_on_demand"]),
        pages_pushed=int(counts["pages_pushed"]),
        zero_on_demand=int(counts["zero_on_demand"]),
        requests=int(counts["requests"]),
        bytes_sent=int(counts["bytes_sent"]),
        ram_size=ram_size,
        status=qmp.status(),
        caps_changed=dict(settings.caps),
    )
