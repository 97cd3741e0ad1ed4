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

The image's working-set record (``docs/working-set.md``) is prefetched and updated unless
``prefetch`` / ``record`` are off; its warnings (stale or damaged record, image not
writable) are printed once, by whichever process read or wrote it.

Once the guest runs, a failure of the image or of fixedram cannot be recovered: see
:mod:`fixedram.endpoint.postcopy`.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from fixedram._lazy import load_now
from fixedram._lazy import numpy as np
from fixedram.errors import VMError
from fixedram.image.reader import image_location
from fixedram.io.channel import Channel
from fixedram.io.objstore import is_object_url
from fixedram.qmp.client import QMP
from fixedram.qmp.common import (
    MigrationSettings,
    Watch,
    Worker,
    abandon,
    incoming_blocks,
    read_facts,
)
from fixedram.qmp.progress import Progress, from_send_stats
from fixedram.qmp.transport import ExecTransport, FdTransport, UnixConnect

__all__ = ["LazyRestoreReport", "lazy_restore"]

Transport = Literal["fd", "unix", "exec"]
ProgressFn = Callable[[Progress], None]
_Way = FdTransport | UnixConnect | ExecTransport

_FD_NAME = "fixedram-lazy"
_POLL = 0.005


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
    pages_prefetched: int = 0  # pages with data pushed first, from the working-set record
    zero_prefetched: int = 0  # absent pages of the record sent first (ZERO records)
    working_set_pages: int = 0  # pages in the record prefetched from (0: none)
    #: seconds from the start until the guest's first N requests were served ("N": s)
    time_to_requests: dict[str, float] = field(default_factory=dict)
    bytes_read: int = 0  # page data fixedram read from the image
    bytes_fetched: int = 0  # bytes fetched from an object store (GETs; 0 for a local file)
    record: str = "off"  # working-set record: recorded, unchanged, skipped, off

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return asdict(self)


def _lazy_progress(progress: ProgressFn) -> Callable[[Any], None]:
    def cb(s: Any) -> None:
        progress(from_send_stats(s, phase="lazy restore", pages=s.pages_done,
                                 status="postcopy-active" if s.running else "setup"))
    return cb


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
    prefetch: bool = True,
    record: bool = True,
    prefetch_rate: float | None = None,
) -> LazyRestoreReport:
    """Restore ``image`` lazily into the QEMU behind ``qmp`` (started ``-incoming defer``).

    Returns once every page is in and QEMU reports ``completed``. ``paused`` leaves the VM
    paused (it is ready at once, pages still arrive). ``push_rate`` (bytes/s) throttles the
    background push; ``progress`` gets a :class:`Progress` now and then (fd/unix only).
    ``started`` (a :func:`time.monotonic` value, default: now) is where the reported times
    count from, e.g. the start of the command. ``prefetch`` / ``record``: use and update the
    image's working-set record; ``prefetch_rate`` throttles the push of its pages (default:
    full speed). Raises
    :class:`~fixedram.errors.MismatchError` / :class:`~fixedram.errors.ImageError` before
    anything is sent, :class:`~fixedram.endpoint.postcopy.PostcopyFailed` when the restore
    broke after the guest started.
    """
    from fixedram.endpoint.postcopy import check_page_sizes
    from fixedram.endpoint.send import dest_page_sizes_from_hmp, validate
    from fixedram.image import open_image
    from fixedram.image.libvirt import refuse_compressed

    t0 = time.monotonic() if started is None else started
    path = image_location(image)
    if transport not in ("fd", "unix", "exec"):
        raise VMError(f"unknown transport {transport!r} (fd, unix or exec)")
    if transport == "exec" and is_object_url(path):
        # QEMU starts the exec: child with QEMU's environment, not fixedram's: the child
        # would have none of the AWS_* settings, --endpoint or FIXEDRAM_CHUNK_CACHE
        raise VMError(f"{path}: a lazy restore of an s3:// image runs over --transport fd "
                      "or unix, not exec (QEMU would start the reader without fixedram's "
                      "S3 settings)")
    refuse_compressed(path, "a lazy restore")
    facts = read_facts(qmp)
    dest_blocks = incoming_blocks(qmp, facts, name_state=False)
    check_page_sizes(dest_page_sizes_from_hmp(facts.ramblocks))
    with open_image(path) as img:
        validate(img, dest_machine=facts.machine, dest_blocks=dest_blocks)
        pages = sum(img.count_present(n) for n in img.blocks)
        ram_size, fmt = img.ram_size, img.format
        rates = (push_rate, prefetch_rate)
        # the sender needs numpy before RUN (its page bookkeeping): loaded here, before QEMU
        # is touched, rather than by the sender while QEMU waits for the stream's head
        load_now(np)
        sender = _Sender(img, facts.machine, dest_blocks, progress, rates, prefetch, record)
        settings = MigrationSettings(qmp, facts)
        watch = Watch(qmp, incoming="the lazy restore")
        try:
            way = _transport(qmp, transport, path, rates, prefetch, record)
        except BaseException:
            watch.close()
            raise
        try:
            if isinstance(way, FdTransport):
                # the sender prepares (checks, bitmaps, the stream's head) and writes the
                # head into its end of the socket pair while QEMU is set up below: the
                # socket holds it until QEMU reads (a refused set-up cuts the socket)
                watch.worker = sender.start(way.channel)
            settings.set({"postcopy-ram": True, "mapped-ram": False, "multifd": False}, {})
            if not paused:
                qmp.cmd("cont")  # while inmigrate: start the guest as soon as RUN arrives
            watch.worker = _start(qmp, way, sender, watch.worker)
            t_running, counts = _wait(watch, way, t0, timeout)
        except BaseException:
            abandon(watch.worker, way)
            raise
        finally:
            watch.close()
            settings.restore()
            way.close()
    if paused and qmp.status() == "running":
        qmp.cmd("stop")
    return LazyRestoreReport(
        image=str(path),
        transport=transport,
        qemu_version=qmp.version_str,
        machine=facts.machine,
        image_format=fmt,
        time_to_running=t_running,
        time_to_run_sent=sender.run_sent[0] - t0 if sender.run_sent else None,
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
        pages_prefetched=int(counts.get("pages_prefetched", 0)),
        zero_prefetched=int(counts.get("zero_prefetched", 0)),
        working_set_pages=int(counts.get("working_set_pages", 0)),
        time_to_requests={str(k): float(v) for k, v in
                          dict(counts.get("time_to_requests") or {}).items()},
        bytes_read=int(counts.get("bytes_read", 0)),
        bytes_fetched=int(counts.get("bytes_fetched", 0)),
        record=str(counts.get("record", "off")),
    )


class _Sender:
    """The postcopy source in a thread of this process (fd and unix transports)."""

    def __init__(self, img: Any, machine: str, dest_blocks: list[tuple[str, int]],
                 progress: ProgressFn | None, rates: tuple[float | None, float | None],
                 prefetch: bool, record: bool) -> None:
        self.img, self.machine, self.dest_blocks = img, machine, dest_blocks
        self.progress = _lazy_progress(progress) if progress is not None else None
        self.push_rate, self.prefetch_rate = rates
        self.prefetch, self.record = prefetch, record
        self.run_sent: list[float] = []  # when RUN was written

    def start(self, chan: Channel) -> Worker:
        from fixedram.endpoint.postcopy import send_postcopy

        def run() -> Any:
            return send_postcopy(self.img, chan, dest_machine=self.machine,
                                 dest_blocks=self.dest_blocks, progress=self.progress,
                                 on_running=lambda: self.run_sent.append(time.monotonic()),
                                 push_rate=self.push_rate, prefetch_rate=self.prefetch_rate,
                                 prefetch=self.prefetch,
                                 record=self.record)

        return Worker.started("fixedram-postcopy", run)


def _transport(qmp: QMP, kind: Transport, path: Path | str,
               rates: tuple[float | None, float | None], prefetch: bool, record: bool) -> _Way:
    """The transport ``kind``, made before QEMU is touched. Its sockets keep the kernel's
    default buffers: a page the guest waits for must not queue behind megabytes of pages
    pushed in the background (:data:`fixedram.io.channel.UNIX_SOCKET_BUFFER`)."""
    if kind == "fd":
        return FdTransport(qmp, _FD_NAME, large_buffers=False)
    if kind == "unix":
        way = UnixConnect("fixedram-lazy-")
        why = way.can_listen(qmp)  # a failed listen would leave QEMU unable to take another
        if why is not None:
            way.close()
            raise VMError(f"QEMU cannot listen in fixedram's private directory ({why}): "
                          "use --transport fd")
        return way

    def argv(report_file: Path) -> list[str]:
        rate = [*(["--push-rate", str(int(rates[0]))] if rates[0] else []),
                *(["--prefetch-rate", str(int(rates[1]))] if rates[1] else [])]
        ws = [*([] if prefetch else ["--no-prefetch"]), *([] if record else ["--no-record"])]
        return [str(Path(sys.executable).absolute()), "-m", "fixedram", "send", "--postcopy",
                *rate, *ws, "--quiet", "--report-json", str(report_file), str(path)]

    return ExecTransport(argv)


def _start(qmp: QMP, way: _Way, sender: _Sender, worker: Worker | None) -> Worker | None:
    """Start the load on ``way``; return the sender's thread (``worker``, already started
    on an fd transport's socket; None: QEMU runs the exec: child)."""
    def incoming(uri: str) -> None:
        qmp.cmd("migrate-incoming", uri=uri)

    if isinstance(way, FdTransport):
        way.migrate(incoming)  # hands QEMU its end first
        return worker
    way.migrate(incoming)
    if isinstance(way, UnixConnect):
        return sender.start(way.connect(large_buffers=False))
    return None


def _wait(watch: Watch, way: _Way, t0: float,
          timeout: float | None) -> tuple[float, dict[str, Any]]:
    """Wait for the guest to run, then for every page; return the time to running and the
    sender's counts."""
    deadline = None if timeout is None else t0 + timeout
    # time to running: QEMU leaves inmigrate once it has processed RUN
    watch.until(lambda r: r.run != "inmigrate", every=_POLL, deadline=deadline,
                late=lambda r: f"the guest did not start within {timeout:.0f} s")
    t_running = time.monotonic() - t0
    worker = watch.worker
    watch.until(lambda r: r.status in ("completed", None, "none")
                and (worker is None or not worker.is_alive()), every=0.05, deadline=deadline,
                late=lambda r: f"the lazy restore did not finish within {timeout:.0f} s "
                               f"(status {r.status})")
    if worker is None:
        assert isinstance(way, ExecTransport)
        counts = way.report()
        from fixedram.log import warn

        for w in counts.get("warnings") or ():  # the child's stderr is QEMU's: say them here
            warn("%s", w)
        return t_running, counts
    rep = worker.outcome()
    return t_running, {k: getattr(rep, k) for k in (
        "pages_on_demand", "pages_pushed", "zero_on_demand", "requests", "bytes_sent",
        "pages_prefetched", "zero_prefetched", "working_set_pages", "time_to_requests",
        "bytes_read", "bytes_fetched", "record")}
