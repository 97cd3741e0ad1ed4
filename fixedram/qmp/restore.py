"""Restore an image into a QEMU waiting with ``-incoming defer``, driven over QMP.

Before QEMU sees a byte, the image is opened and checked, and compared with the destination:
its machine type (``qom-get /machine type``) and RAM blocks (HMP ``info ramblock``) must match
(:func:`fixedram.endpoint.send.validate`). A refused image leaves the destination untouched
and still waiting. Then:

``proxy``
    fixedram streams the image into QEMU; works with any QEMU and any image format. One end
    of a socketpair goes to QEMU with ``getfd`` (``migrate-incoming uri=fd:NAME``) and
    :func:`fixedram.endpoint.send.send` writes the single precopy stream into the other.
    With ``channels`` N, fixedram is a multifd source instead: QEMU listens on a unix socket
    in a private directory of fixedram's (``migrate-incoming uri=unix:…``) and
    :func:`fixedram.endpoint.multifd_send.send_multifd` connects 1 + N times. A
    ``migrate-incoming`` whose listen fails leaves QEMU unable to take another, so QEMU is
    first asked to listen there with a ``chardev-add`` it removes at once; where it cannot
    (it runs as another user, or confined), the restore is refused before anything changed.
``native``
    QEMU ≥ 9.0 loads a mapped-ram image itself: capability ``mapped-ram`` (plus multifd
    channels if asked) and ``migrate-incoming file:IMAGE[,offset=N]``.

``auto`` picks ``native`` for a mapped-ram image and QEMU ≥ 9.0, else ``proxy``. Capabilities
and parameters changed are put back after the load (a later outgoing migration of the VM must
not inherit ``mapped-ram``). Unless ``paused``, ``cont`` goes to QEMU just before
``migrate-incoming``: QEMU then starts the guest the moment the load completes, with no round
trip of fixedram's in between; a restore that fails or is given up after that ``cont`` sends
``stop`` while QEMU still waits, so the guest does not start later.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from fixedram._lazy import load_now
from fixedram._lazy import numpy as np
from fixedram.errors import MismatchError, VMError
from fixedram.image.layout import PAGE_SIZE
from fixedram.image.reader import DirectIO, image_location
from fixedram.io.files import open_direct, warn_no_direct_io
from fixedram.qmp.client import QMP
from fixedram.qmp.common import (
    AUTO_PROXY_CHANNELS,
    Facts,
    MigrationSettings,
    Watch,
    Worker,
    abandon,
    incoming_blocks,
    ram_with_data,
    read_facts,
)
from fixedram.qmp.progress import Progress, from_send_stats
from fixedram.qmp.transport import FdTransport, Transport, UnixConnect
from fixedram.versions import MAPPED_RAM

__all__ = ["RestoreReport", "choose_restore_via", "restore"]

Via = Literal["auto", "native", "proxy"]
ProgressFn = Callable[[Progress], None]

_FD_NAME = "fixedram-restore"


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


def choose_channels(how: str, image_format: str, channels: int | None, *,
                    direct_io: bool) -> int:
    """``channels`` as asked, or when not (None) the default of a load ``how`` of an image of
    ``image_format``: :data:`AUTO_PROXY_CHANNELS` for a proxy load of a mapped-ram image
    read buffered (``direct_io`` False: not asked for, or refused by the filesystem), from
    a file or an object store, else one stream (0). A legacy stream stays one stream: its
    pages lie between its records and would be copied out one by one. Images read with
    O_DIRECT go as one stream: the next piece is read in a thread while the current one is
    sent, which a single sender thread of the channels cannot do."""
    if channels is not None:
        return channels
    if how == "proxy" and image_format == "mapped-ram" and not direct_io:
        return AUTO_PROXY_CHANNELS
    return 0


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
        progress(from_send_stats(s, phase="restore", status="active", pages=s.pages_sent))
    return cb


def restore(
    qmp: QMP,
    image: str | os.PathLike[str],
    *,
    via: Via = "auto",
    paused: bool = False,
    progress: ProgressFn | None = None,
    channels: int | None = None,
    readers: int = 1,
    timeout: float | None = None,
    direct_io: DirectIO = False,
) -> RestoreReport:
    """Load ``image`` into the QEMU behind ``qmp`` (started with ``-incoming defer``).

    ``paused``: leave the VM paused after the load (else ``cont``). ``channels``: multifd
    channels (0 = none; None = :func:`choose_channels`'s default, one stream where QEMU cannot
    listen for more); ``native``: QEMU's reader threads; ``proxy``: fixedram is a multifd
    source with that many connections, over a unix socket QEMU listens on
    (:meth:`_Load.multifd`). ``readers``: read-ahead depth of a single-stream ``proxy``.
    ``direct_io``: page data is read with O_DIRECT, by fixedram (``proxy``) or by QEMU
    (``native``, which then needs multifd: at least one channel); ``"required"`` refuses,
    before QEMU sees a byte, where the filesystem does not support it, else fixedram warns
    and reads buffered. ``progress`` gets a :class:`Progress` now and then (``proxy`` only).
    Raises :class:`~fixedram.errors.MismatchError` / :class:`~fixedram.errors.ImageError`
    before anything is sent when the image does not fit, :class:`VMError` when QEMU fails.
    """
    from fixedram.endpoint.send import validate
    from fixedram.image import open_image

    t0 = time.monotonic()
    path = image_location(image)
    facts = read_facts(qmp)
    dest_blocks = incoming_blocks(qmp, facts)
    with open_image(path) as img:
        if not img.pages_in_file:  # QEMU reads only files: the proxy serves it the pages
            if via == "native":
                raise VMError(f"--via native needs a local image file; {image} is not one "
                              "(use --via proxy)")
            via = "proxy"
            # the stream's first chunks, while the image is checked and the destination is
            # set up (a refused image costs the GETs under way, nothing else)
            img.prefetch()
        validate(img, dest_machine=facts.machine, dest_blocks=dest_blocks)
        how, fresh = _choose(qmp, facts, img.format, via)
        reads_direct = bool(direct_io)
        if how == "proxy":
            reads_direct = img.open_direct(direct_io)
            # the senders frame pages with numpy: loaded now, before migrate-incoming,
            # rather than by a sender while QEMU waits for the first bytes (an image
            # without checksums has not loaded it yet; about 45 ms of CPU)
            load_now(np)
        elif direct_io and isinstance(path, Path) and not _direct_ok(path, direct_io):
            direct_io = False
        asked = channels is not None
        channels = choose_channels(how, img.format, channels, direct_io=reads_direct)
        if how == "native" and direct_io:
            channels = max(1, channels)  # QEMU reads with O_DIRECT only under multifd
        pages = sum(img.count_present(n) for n in img.blocks)
        load = _Load(qmp, img, facts, dest_blocks, fresh=fresh, progress=progress,
                     autostart=not paused)
        watch = Watch(qmp, incoming="the load")
        try:
            if how == "native":
                assert isinstance(path, Path)
                load.native(path, channels, direct_io=bool(direct_io))
            elif channels:
                try:
                    watch.worker = load.multifd(channels)
                except _CannotListen as e:
                    if not asked:  # the default: one stream needs no listening QEMU
                        channels = 0
                        watch.worker = load.fd(readers=readers, direct_io=direct_io)
                    else:
                        raise VMError(f"QEMU cannot listen for multifd channels in "
                                      f"fixedram's private directory ({e}): restore with "
                                      f"--channels 0 (one stream)") from None
            else:
                watch.worker = load.fd(readers=readers, direct_io=direct_io)
            deadline = None if timeout is None else time.monotonic() + timeout
            st = watch.until(lambda r: r.run != "inmigrate"
                             and r.status in (None, "none", "completed"), deadline=deadline,
                             late=lambda r: f"the load did not finish within {timeout:.0f} s "
                                            f"(status {r.run}/{r.status})").run
            t_load = time.monotonic() - load.started
            if progress is not None and watch.worker is None:  # native: QEMU reports none
                progress(Progress(phase="restore", status="completed",
                                  done_bytes=pages * PAGE_SIZE,
                                  total_bytes=pages * PAGE_SIZE, pages=pages))
            report = watch.worker.outcome() if watch.worker is not None else None
        except BaseException:
            abandon(watch.worker, load.way)
            load.hold()
            raise
        finally:
            watch.close()
            load.close()
    final = _run_state(qmp, st, paused)
    nbytes = pages * PAGE_SIZE
    return RestoreReport(
        image=str(path),
        via=how,
        qemu_version=qmp.version_str,
        machine=facts.machine,
        image_format=img.format,
        total_time=time.monotonic() - t0,
        load_time=t_load,
        bytes=nbytes,
        bytes_sent=report.bytes_sent if report is not None else None,
        pages=pages,
        zero_pages=img.ram_size // PAGE_SIZE - pages,
        ram_size=img.ram_size,
        mb_per_s=nbytes / t_load / 1e6 if t_load > 0 else 0.0,
        status=final,
        caps_changed=dict(load.settings.caps),
        channels=channels,
        direct_io=bool(direct_io) and (how == "native" or img.direct),
    )


def _choose(qmp: QMP, facts: Facts, image_format: str, via: Via) -> tuple[str, bool]:
    """``via`` resolved, and whether the destination's RAM is fresh (all zeros): RAM that may
    hold data before the load needs every page sent, none left as it is, which QEMU's own
    load does not do."""
    how = choose_restore_via(qmp.version, image_format, via)
    held = ram_with_data(qmp, facts)
    if held and how == "native":
        if via != "auto":
            raise MismatchError(
                f"the destination's RAM {', '.join(held)} is a file that already holds "
                f"data, and QEMU's own load leaves the image's zero pages as the file has "
                f"them: use --via proxy")
        how = "proxy"
    return how, not held


def _run_state(qmp: QMP, st: str, paused: bool) -> str:
    """Pause or resume the loaded VM as asked; return its run state."""
    if paused and st == "running":
        qmp.cmd("stop")  # QEMU started without -S runs the guest as soon as it is loaded
        return qmp.status()
    if not paused and st != "running":
        qmp.cmd("cont")
        return qmp.status()
    return st


class _Load:
    """The three ways of a load: the settings each needs, its transport, the migrate command
    and the sender's thread. :attr:`started` is when ``migrate-incoming`` was issued."""

    def __init__(self, qmp: QMP, img: Any, facts: Facts, dest_blocks: list[tuple[str, int]],
                 *, fresh: bool, progress: ProgressFn | None, autostart: bool) -> None:
        self.qmp, self.img, self.machine, self.dest_blocks = qmp, img, facts.machine, dest_blocks
        self.fresh, self.autostart = fresh, autostart
        self.cont_sent = False
        self.progress = _send_progress(progress) if progress is not None else None
        self.settings = MigrationSettings(qmp, facts)
        self.way: Transport | None = None
        self.started = 0.0

    def _incoming(self, uri: str) -> None:
        if self.autostart:  # while inmigrate: QEMU starts the guest the moment it is loaded
            self.qmp.cmd("cont")
            self.cont_sent = True
        self.started = time.monotonic()
        self.qmp.cmd("migrate-incoming", uri=uri)

    def native(self, path: Path, channels: int, *, direct_io: bool) -> None:
        """QEMU reads the mapped-ram image itself (``file:IMAGE[,offset=N]``)."""
        params: dict[str, Any] = {"multifd-channels": channels} if channels else {}
        if direct_io:
            params["direct-io"] = True
        self.settings.set({"mapped-ram": True, "multifd": channels > 0}, params)
        base = self.img.base_offset
        self._incoming(f"file:{path}" + (f",offset={base}" if base else ""))

    def fd(self, *, readers: int, direct_io: DirectIO) -> Worker:
        """A plain precopy stream over a socket pair (mapped-ram/multifd would make QEMU
        refuse ``fd:``), written by :func:`~fixedram.endpoint.send.send`."""
        from fixedram.endpoint.send import send

        self.settings.set({"mapped-ram": False, "multifd": False}, {})
        way = self.way = FdTransport(self.qmp, _FD_NAME)
        way.migrate(self._incoming)

        def run() -> Any:
            return send(self.img, way.channel, dest_machine=self.machine,
                        dest_blocks=self.dest_blocks, readers=readers, progress=self.progress,
                        direct_io=direct_io, fresh=self.fresh)

        return Worker.started("fixedram-send", run)

    def multifd(self, channels: int) -> Worker:
        """A multifd load: ``migrate-incoming`` on a unix socket QEMU listens on, and
        :func:`~fixedram.endpoint.multifd_send.send_multifd` connecting 1 + ``channels``
        times; raises :class:`_CannotListen`, with nothing changed in QEMU, where QEMU cannot
        listen in the transport's private directory. Unless ``fresh``, every page without
        data goes as a ZERO record on the main connection (a zero-page list entry does not
        clear a page QEMU has not received, ``docs/fresh-destination.md``)."""
        from fixedram.endpoint.multifd_send import parse_uuid, send_multifd

        way = UnixConnect("fixedram-restore-")
        why = way.can_listen(self.qmp)
        if why is not None:
            way.close()
            raise _CannotListen(why)
        self.way = way
        self.settings.set({"mapped-ram": False, "postcopy-ram": False, "multifd": True},
                          {"multifd-channels": channels, "multifd-compression": "none"})
        uuid = parse_uuid(str(self.qmp.cmd("query-uuid").get("UUID", "")))
        version = self.qmp.version
        way.migrate(self._incoming)
        fresh = self.fresh

        def run() -> Any:
            return send_multifd(self.img, way.uri, channels, uuid=uuid,
                                dest_machine=self.machine, dest_blocks=self.dest_blocks,
                                dest_version=version, progress=self.progress, fresh=fresh,
                                zero="auto" if fresh else "main")

        return Worker.started("fixedram-send-multifd", run)

    def hold(self) -> None:
        """After a failure: take back the ``cont`` of :meth:`_incoming` while QEMU still
        waits (``stop`` there clears its start-when-loaded), so that a load fixedram gave up
        on (QEMU reading the file itself goes on) does not start the guest later."""
        if self.cont_sent:
            with contextlib.suppress(Exception):
                if self.qmp.status() == "inmigrate":
                    self.qmp.cmd("stop")

    def close(self) -> None:
        """Put the settings back and release the transport."""
        self.settings.restore()
        if self.way is not None:
            self.way.close()


class _CannotListen(Exception):
    """QEMU cannot listen on a socket in fixedram's private directory (its reason)."""


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

