"""Restore an image into a QEMU waiting with ``-incoming defer``, driven over QMP.

Before QEMU sees a byte, the image is opened and checked, and compared with the destination:
its machine type (``qom-get /machine type``) and RAM blocks (HMP ``info ramblock``) must match
(:func:`fixedram.endpoint.send.validate`). A refused image leaves the destination untouched
and still waiting. Then:

``proxy``
    one end of a socketpair goes to QEMU with ``getfd``, QEMU loads from it
    (``migrate-incoming uri=fd:NAME``) and :func:`fixedram.endpoint.send.send` writes the
    image into the other end in a thread. Works with any QEMU and any image format.
``native``
    QEMU ≥ 9.0 loads a mapped-ram image itself: capability ``mapped-ram`` (plus multifd
    channels if asked) and ``migrate-incoming file:IMAGE[,offset=N]``.

``auto`` picks ``native`` for a mapped-ram image and QEMU ≥ 9.0, else ``proxy``. Capabilities
and parameters changed are put back after the load (a later outgoing migration of the VM must
not inherit ``mapped-ram``). The VM is resumed (``cont``) unless ``paused``.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from fixedram.errors import MismatchError, VMError
from fixedram.image.reader import DirectIO
from fixedram.io.files import open_direct, warn_no_direct_io
from fixedram.qmp.client import QMP, Events
from fixedram.qmp.common import (
    WAKE_EVENTS,
    MigrationSettings,
    Worker,
    abandon,
    hand_socket,
    ram_with_data,
    read_facts,
    wait_event,
)
from fixedram.qmp.progress import Progress
from fixedram.versions import MAPPED_RAM

__all__ = ["RestoreReport", "choose_restore_via", "restore"]

Via = Literal["auto", "native", "proxy"]
ProgressFn = Callable[[Progress], None]

_FD_NAME = "fixedram-restore"
_POLL = 0.02
_PAGE = 4096


@dataclass
class RestoreReport:
    """What a restore did. Sizes in bytes, times in seconds."""

    image: str
    via: str
    qemu_version: str
    machine: str
    image_format: str
    total_time: float  # wall time from the first QMP command to the VM resumed (or paused)
    load_time: float  # wall time from ``migrate-incoming`` until QEMU left ``inmigrate``
    bytes: int  # bytes of page data loaded (pages in the image x 4096)
    bytes_sent: int | None  # stream bytes written to QEMU (proxy only)
    pages: int  # pages with data loaded
    zero_pages: int  # pages loaded as zero
    ram_size: int
    mb_per_s: float  # bytes / load_time, in MB/s (10^6)
    status: str  # run state at the end: running or paused
    caps_changed: dict[str, bool]
    channels: int = 0  # multifd channels (native: QEMU's; proxy: fixedram's connections)
    direct_io: bool = False  # page data read with O_DIRECT (by fixedram or by QEMU)

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return asdict(self)


def choose_restore_via(version: tuple[int, int, int], image_format: str, via: Via) -> str:
    """Resolve ``via`` for a destination QEMU of ``version`` and an image of ``image_format``."""
    native_ok = version[:2] >= MAPPED_RAM.since and image_format == "mapped-ram"
    if via == "auto":
        return "native" if native_ok else "proxy"
    if via == "native" and not native_ok:
        if image_format != "mapped-ram":
            raise VMError("--via native needs a mapped-ram image; this one is a legacy stream "
                          "(use --via proxy)")
        raise VMError(f"--via native needs QEMU >= {MAPPED_RAM.since_text}; the destination is "
                      f"{'.'.join(map(str, version))} (use --via proxy)")
    if via not in ("native", "proxy"):
        raise VMError(f"unknown --via {via!r} (auto, native or proxy)")
    return via


def _send_progress(progress: ProgressFn) -> Callable[[Any], None]:
    def cb(s: Any) -> None:
        mbps = s.bytes_sent * 8 / s.elapsed / 1e6 if s.elapsed > 0 else None
        progress(Progress(
            phase="restore", status="active", done_bytes=s.pages_done * _PAGE,
            total_bytes=s.pages_total * _PAGE, pages=s.pages_sent, mbps=mbps,
            remaining_bytes=(s.pages_total - s.pages_done) * _PAGE,
        ))
    return cb


def _wait_loaded(qmp: QMP, worker: Worker | None, timeout: float | None,
                 events: Events | None = None) -> str:
    """Wait until QEMU leaves ``inmigrate``; return the new run state. A poll every 20 ms,
    or at once on one of ``events``."""
    t0 = time.monotonic()
    while True:
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
            raise VMError("the destination QEMU exited during the load (its stderr says why)") \
                from None
        mst = mig.get("status")
        if mst == "failed":
            desc = mig.get("error-desc", "")
            raise VMError("the load failed" + (f": {desc}" if desc else ""))
        if st != "inmigrate" and mst in (None, "none", "completed"):
            return st
        if timeout is not None and time.monotonic() - t0 > timeout:
            raise VMError(f"the load did not finish within {timeout:.0f} s (status {st}/{mst})")
        wait_event(events, _POLL)


def restore(
    qmp: QMP,
    image: str | os.PathLike[str],
    *,
    via: Via = "auto",
    paused: bool = False,
    progress: ProgressFn | None = None,
    channels: int = 0,
    readers: int = 1,
    timeout: float | None = None,
    direct_io: DirectIO = False,
) -> RestoreReport:
    """Load ``image`` into the QEMU behind ``qmp`` (started with ``-incoming defer``).

    ``paused``: leave the VM paused after the load (else ``cont``). ``channels``: multifd
    channels (0 = none); ``native``: QEMU's reader threads; ``proxy``: fixedram is a multifd
    source with that many connections, over a unix socket it owns (:func:`_start_multifd`).
    ``readers``: read-ahead depth of a single-stream ``proxy``. ``direct_io``: page data is
    read with O_DIRECT, by fixedram (``proxy``) or by QEMU (``native``, which then needs
    multifd: at least one channel); ``"required"`` refuses, before QEMU sees a byte, where
    the filesystem does not support it, else fixedram warns and reads buffered. ``progress``
    gets a :class:`Progress` now and then (``proxy`` only). Raises
    :class:`~fixedram.errors.MismatchError` / :class:`~fixedram.errors.ImageError` before
    anything is sent when the image does not fit, :class:`VMError` when QEMU fails.
    """
    from fixedram.endpoint.send import dest_ramblocks_from_hmp, send, validate
    from fixedram.image import open_image

    t0 = time.monotonic()
    path = Path(image).absolute()
    facts = read_facts(qmp)
    if facts.status != "inmigrate":
        raise VMError(f"QEMU at {qmp.path} is not waiting for an incoming migration (status "
                      f"{facts.status}); start it with -incoming defer")
    if facts.migration not in (None, "none"):
        raise VMError(f"QEMU at {qmp.path} already has an incoming migration "
                      f"({facts.migration})")
    machine = facts.machine
    dest_blocks = dest_ramblocks_from_hmp(facts.ramblocks)
    if not dest_blocks:
        raise VMError(f"cannot read the RAM blocks of QEMU at {qmp.path} (info ramblock)")
    with open_image(path) as img:
        validate(img, dest_machine=machine, dest_blocks=dest_blocks)
        how = choose_restore_via(qmp.version, img.format, via)
        # RAM that may hold data before the load: every page is sent, none left as it is
        held = ram_with_data(qmp, facts)
        if held and how == "native":
            if via != "auto":
                raise MismatchError(
                    f"the destination's RAM {', '.join(held)} is a file that already holds "
                    f"data, and QEMU's own load leaves the image's zero pages as the file has "
                    f"them: use --via proxy")
            how = "proxy"
        fresh = not held
        if how == "proxy":
            img.open_direct(direct_io)
        elif direct_io and not _direct_ok(path, direct_io):
            direct_io = False
        pages = sum(img.count_present(n) for n in img.blocks)
        ram_size = img.ram_size
        settings = MigrationSettings(qmp, facts)
        events = qmp.events(*WAKE_EVENTS)
        worker: Worker | None = None
        ours: socket.socket | None = None
        sockdir: str | None = None
        try:
            if how == "native":
                if direct_io:
                    channels = max(1, channels)  # QEMU reads with O_DIRECT only under multifd
                caps = {"mapped-ram": True, "multifd": channels > 0}
                params: dict[str, Any] = {"multifd-channels": channels} if channels else {}
                if direct_io:
                    params["direct-io"] = True
                settings.set(caps, params)
                uri = f"file:{path}" + (f",offset={img.base_offset}" if img.base_offset else "")
                t_load = time.monotonic()
                qmp.cmd("migrate-incoming", uri=uri)
            elif channels:
                import tempfile

                sockdir = tempfile.mkdtemp(prefix="fixedram-restore-")
                worker, t_load = _start_multifd(qmp, img, settings, channels, sockdir, machine,
                                                dest_blocks, progress, fresh)
            else:
                # a plain precopy stream: mapped-ram/multifd would make QEMU refuse fd:
                settings.set({"mapped-ram": False, "multifd": False}, {})
                ours = hand_socket(qmp, _FD_NAME)
                from fixedram.io.channel import SocketChannel

                chan = SocketChannel(ours)
                cb = _send_progress(progress) if progress is not None else None
                t_load = time.monotonic()
                try:
                    qmp.cmd("migrate-incoming", uri=f"fd:{_FD_NAME}")
                except BaseException:
                    qmp.close_fd(_FD_NAME)
                    raise

                def run_send() -> Any:
                    return send(img, chan, dest_machine=machine, dest_blocks=dest_blocks,
                                readers=readers, progress=cb, direct_io=direct_io,
                                fresh=fresh)

                worker = Worker("fixedram-send", run_send)
                worker.start()
            st = _wait_loaded(qmp, worker, timeout, events)
            t_load = time.monotonic() - t_load
            if progress is not None and worker is None:  # native: QEMU reports no progress
                progress(Progress(phase="restore", status="completed", done_bytes=pages * _PAGE,
                                  total_bytes=pages * _PAGE, pages=pages))
            report = None
            if worker is not None:
                report = worker.outcome()
        except BaseException:
            abandon(worker, ours)
            raise
        finally:
            events.close()
            settings.restore()
            if ours is not None:
                ours.close()
            if sockdir is not None:
                import shutil

                shutil.rmtree(sockdir, ignore_errors=True)
    final = st
    if paused and st == "running":
        qmp.cmd("stop")  # QEMU started without -S runs the guest as soon as it is loaded
        final = qmp.status()
    elif not paused and st != "running":
        qmp.cmd("cont")
        final = qmp.status()
    nbytes = pages * _PAGE
    return RestoreReport(
        image=str(path),
        via=how,
        qemu_version=qmp.version_str,
        machine=machine,
        image_format=img.format,
        total_time=time.monotonic() - t0,
        load_time=t_load,
        bytes=nbytes,
        bytes_sent=report.bytes_sent if report is not None else None,
        pages=pages,
        zero_pages=ram_size // _PAGE - pages,
        ram_size=ram_size,
        mb_per_s=nbytes / t_load / 1e6 if t_load > 0 else 0.0,
        status=final,
        caps_changed=dict(settings.caps),
        channels=channels,
        direct_io=bool(direct_io) and (how == "native" or img.direct),
    )

def _direct_ok(path: Path, mode: DirectIO) -> bool:
    """Whether ``path``'s filesystem takes O_DIRECT (checked before QEMU is asked to)."""
    fd = open_direct(path, os.O_RDONLY)
    if fd is not None:
        os.close(fd)
        return True
    if mode == "required":
        raise VMError(f"the filesystem of {path.parent} does not support O_DIRECT")
    warn_no_direct_io(path.parent, fallback="QEMU reads buffered")
    return False


def _start_multifd(qmp: QMP, img: Any, settings: MigrationSettings, channels: int,
                   sockdir: str, machine: str, dest_blocks: list[tuple[str, int]],
                   progress: ProgressFn | None, fresh: bool) -> tuple[Worker, float]:
    """Start a multifd load: capability multifd and ``multifd-channels`` on the destination,
    ``migrate-incoming`` on a unix socket in ``sockdir``, and
    :func:`~fixedram.endpoint.multifd_send.send_multifd` in a thread. Returns the thread and
    the time the load started. Unless ``fresh``, every page without data goes as a ZERO
    record on the main connection (a zero-page list entry does not clear a page QEMU has not
    received, ``docs/fresh-destination.md``)."""
    from fixedram.endpoint.multifd_send import parse_uuid, send_multifd

    settings.set({"mapped-ram": False, "postcopy-ram": False, "multifd": True},
                 {"multifd-channels": channels, "multifd-compression": "none"})
    uuid = parse_uuid(str(qmp.cmd("query-uuid").get("UUID", "")))
    version = qmp.version
    address = f"unix:{sockdir}/mig.sock"
    cb = _send_progress(progress) if progress is not None else None
    t_load = time.monotonic()
    qmp.cmd("migrate-incoming", uri=address)

    def run_send() -> Any:
        return send_multifd(img, address, channels, uuid=uuid, dest_machine=machine,
                            dest_blocks=dest_blocks, dest_version=version, progress=cb,
                            fresh=fresh, zero="auto" if fresh else "main")

    worker = Worker("fixedram-send-multifd", run_send)
    worker.start()
    return worker, t_load
