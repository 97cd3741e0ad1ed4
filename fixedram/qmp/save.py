"""Save a running QEMU VM into a mapped-ram image, driven over QMP (``fixedram save``).

Two ways to get the bytes out of QEMU:

``proxy``
    fixedram is the migration destination and writes the mapped-ram image atomically. By
    default QEMU sends the pages over 2 multifd connections to a unix socket in a private
    directory of fixedram's, received in a thread each
    (:func:`fixedram.endpoint.receive.receive_listening`); where QEMU cannot connect there
    (another user, confined), or with ``--channels 0``, one end of a socketpair goes to QEMU
    with ``getfd``, QEMU migrates into it (``migrate uri=fd:NAME``), and the other end is fed
    to :func:`fixedram.endpoint.receive.receive`; a paused save whose page writes an
    observer watches (an upload to an object store while the image is written) goes that
    way too. Works with any QEMU (7.2 included).
``native``
    QEMU ≥ 9.0 writes the mapped-ram file itself (capability ``mapped-ram``, ``migrate
    file:TEMP``, multifd channels, optionally ``direct-io``); fixedram adds what QEMU omits:
    the file is written under a temporary name next to IMAGE, fsynced, opened and checked for
    completeness against the VM's RAM blocks, then renamed over IMAGE and the directory fsynced.

``auto`` picks ``native`` when QEMU is ≥ 9.0 (≥ 9.1 with ``direct_io``), else ``proxy``.

Policy:

* The VM is paused first unless ``live``; ``max-bandwidth`` is raised to 1 TiB/s.
* Every migration capability and parameter fixedram changed is put back afterwards, on success
  and on failure (as far as QEMU still answers), so a later migration of the same VM behaves as
  before.
* On success the source is left paused (``postmigrate``) unless ``resume``.
* On failure IMAGE is untouched, no temporary file is left, and a VM that was running before
  the save is running again. The error is one :class:`~fixedram.errors.FixedramError` line.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from fixedram.errors import FixedramError, ImageError, VMError
from fixedram.image.libvirt import header_bytes, mark_complete, write_header
from fixedram.io.files import AtomicFile, drop_cached
from fixedram.qmp.client import QMP
from fixedram.qmp.common import (
    AUTO_PROXY_CHANNELS,
    Facts,
    MigrationSettings,
    Reading,
    Watch,
    Worker,
    abandon,
    read_facts,
)
from fixedram.qmp.progress import Progress, from_query_migrate
from fixedram.qmp.transport import FdTransport, Transport, UnixListen
from fixedram.versions import MAIN_THREAD_ZERO_PAGES, MAPPED_RAM, MAPPED_RAM_DIRECT_IO

if TYPE_CHECKING:
    from fixedram.image.writer import PageObserver

__all__ = ["MAX_BANDWIDTH", "SaveReport", "Via", "choose_save_via", "choose_save_channels",
           "save"]

#: max-bandwidth during a save: QEMU's 128 MiB/s default also throttles fd: and file:.
MAX_BANDWIDTH = 1 << 40

Via = Literal["auto", "native", "proxy"]
ProgressFn = Callable[[Progress], None]

_FD_NAME = "fixedram-save"

#: Seconds between two readings of QEMU's state during a save when no event arrives.
#: QEMU's MIGRATION events end the wait at once (completion, failure), so the reading only
#: feeds the progress bar and notices a live save that does not converge; every reading
#: is a QMP round trip through the client's event loop thread, which competes for the cores
#: (and the interpreter) with the proxy's receive threads: at the default 20 ms that cost
#: a proxy save 4-12 % of its CPU time (the more the busier the cores).
SAVE_POLL = 0.1


@dataclass
class SaveReport:
    """What a save did. Sizes in bytes, times in seconds."""

    image: str
    via: str
    qemu_version: str
    machine: str
    live: bool
    resumed: bool
    total_time: float  # wall time, start to IMAGE renamed into place (durable)
    migration_time: float  # wall time from ``migrate`` until QEMU said completed
    qemu_total_time: float | None  # QEMU's own total-time
    downtime: float | None  # QEMU's downtime (vCPUs stopped during the switchover)
    bytes_transferred: int  # QEMU's ram.transferred
    pages_transferred: int  # normal (non-zero) pages QEMU sent, re-sent ones included
    dirty_passes: int | None  # dirty-sync-count
    pages_in_image: int  # pages holding data in the image
    ram_size: int  # total of the VM's RAM blocks
    image_apparent_size: int
    image_allocated_size: int
    caps_changed: dict[str, bool] = field(default_factory=dict)
    params_changed: dict[str, Any] = field(default_factory=dict)
    setup_time: float = 0.0  # start until ``migrate`` was issued (queries, checks, settings)
    check_time: float = 0.0  # opening and checking the written image (metadata only)
    commit_time: float = 0.0  # fsync, page-cache drop, rename, directory fsync
    channels: int = 0  # multifd channels (proxy: connections into fixedram; native: QEMU's writers)

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return asdict(self)


def choose_save_via(version: tuple[int, int, int], via: Via, *, direct_io: bool = False,
                    watched: bool = False) -> str:
    """Resolve ``via`` for a source QEMU of ``version``; raise :class:`VMError` if impossible.

    ``watched``: something wants to see the pages as they are written (an upload to an
    object store that sends chunks while the rest comes: ``docs/object-storage.md``), which
    only the proxy on one connection shows; ``auto`` then takes it, as measured faster
    than a native save uploaded once QEMU has finished the file."""
    native_ok = version[:2] >= MAPPED_RAM.since and (
        not direct_io or version[:2] >= MAPPED_RAM_DIRECT_IO.since)
    if via == "auto":
        return "native" if native_ok and not watched else "proxy"
    if via == "native" and not native_ok:
        need = (f"{MAPPED_RAM_DIRECT_IO.since_text} (direct-io)"
                if direct_io and version[:2] >= MAPPED_RAM.since
                else f"{MAPPED_RAM.since_text} (mapped-ram)")
        raise VMError(
            f"--via native needs QEMU >= {need}; this is {'.'.join(map(str, version))} "
            "(use --via proxy)"
        )
    if via not in ("native", "proxy"):
        raise VMError(f"unknown --via {via!r} (auto, native or proxy)")
    return via


def _ram_size(ramblocks_text: str) -> tuple[int, dict[str, int]]:
    """The VM's RAM size and blocks from HMP ``info ramblock``. Called once QEMU is saving:
    the imports it brings (the image reader and numpy, needed for the check of the image
    anyway) then cost no time of the save's own."""
    from fixedram.endpoint.send import dest_ramblocks_from_hmp
    from fixedram.image import open_image  # noqa: F401 - for _check_image, imported now

    blocks = dict(dest_ramblocks_from_hmp(ramblocks_text))
    return sum(blocks.values()), blocks


def _check_image(path: Path, machine: str, blocks: dict[str, int]) -> int:
    """Open a freshly written image; it must be complete and match the VM. Returns pages."""
    from fixedram.image import open_image

    with open_image(path) as img:
        if img.format != "mapped-ram":
            raise ImageError(f"{path}: QEMU wrote a {img.format} file, not mapped-ram")
        if machine and img.machine != machine:
            raise ImageError(f"{path}: machine {img.machine!r} in the image, VM is {machine!r}")
        got = {n: b.length for n, b in img.blocks.items()}
        if got != blocks:
            raise ImageError(f"{path}: RAM blocks {got} do not match the VM's {blocks}")
        try:
            return sum(img.count_present(n) for n in img.blocks)
        except ImageError as e:
            raise ImageError(f"{path}: {e.message}") from None


def _drop_from_cache(image: Path) -> None:
    """Drop the saved (fsynced, renamed) image's pages from the page cache, in a child
    process the command does not wait for.

    The image was written through the page cache (by QEMU, all of it or its metadata with
    direct-io; or by the proxy's receiver); evicting a GiB of clean pages takes the kernel a
    few hundred milliseconds, which the image does not need to be durable and complete. A
    thread reaps the child.
    """
    try:
        fd = os.open(image, os.O_RDONLY)
    except OSError:
        return
    try:
        with warnings.catch_warnings():  # the child runs no Python thread, takes no lock
            warnings.simplefilter("ignore", DeprecationWarning)
            pid = os.fork()
    except OSError:
        pid = -1
    if pid == 0:  # the child: one system call, then out
        try:
            drop_cached(fd)
        finally:
            os._exit(0)
    if pid < 0:
        drop_cached(fd)
    os.close(fd)
    if pid > 0:
        threading.Thread(target=os.waitpid, args=(pid, 0), name="fixedram-cache-drop",
                         daemon=True).start()


def _dir_check(image: Path) -> None:
    parent = image.parent
    if not parent.is_dir():
        what = "is not a directory" if parent.exists() else "does not exist"
        raise FixedramError(f"{parent} {what}")
    if image.is_dir():
        raise FixedramError(f"{image} is a directory")
    try:  # fail before the VM is touched (a read-only filesystem, for root too)
        with tempfile.TemporaryFile(dir=parent):
            pass
    except OSError as e:
        raise FixedramError(f"cannot create a file in {parent}: {e.strerror}") from None


def save(
    qmp: QMP,
    image: str | os.PathLike[str],
    *,
    live: bool = False,
    via: Via = "auto",
    resume: bool = False,
    direct_io: bool = False,
    progress: ProgressFn | None = None,
    max_bandwidth: int = MAX_BANDWIDTH,
    multifd_channels: int | None = None,
    stop_after: float | None = None,
    timeout: float | None = None,
    libvirt_xml: str | None = None,
    libvirt_running: bool = True,
    observer: PageObserver | None = None,
) -> SaveReport:
    """Save the VM behind ``qmp`` into the mapped-ram file ``image`` (see the module doc).

    ``live``: keep the guest running during the save (it is paused at the switchover; a save
    still running after ``stop_after`` seconds is finished by pausing the VM). ``resume``:
    run the VM again after a successful save. ``direct_io``: write pages with O_DIRECT.
    ``multifd_channels``: multifd channels (0 = none; None =
    :func:`choose_save_channels`'s default); ``native``: QEMU's writer threads; ``proxy``:
    QEMU sends pages over that many extra connections to a private unix socket that fixedram
    receives on in parallel. ``progress`` is called with a :class:`Progress` about every
    20 ms. ``libvirt_xml``: write a libvirt sparse save
    image (``virsh restore`` loads it) with this domain XML in its header, restoring to a
    running domain if ``libvirt_running``. ``observer``: told of every change to the
    image's page data as it is written (:class:`~fixedram.image.writer.PageObserver`;
    ``proxy`` on one connection only: QEMU writes a native save's file, and multifd
    channels write pages out of order). Raises :class:`FixedramError` (one line) on
    failure.
    """
    t0 = time.monotonic()
    target = Path(image).absolute()
    _dir_check(target)
    if live or multifd_channels:
        observer = None  # pages sent again, or out of order: nothing to watch
    how = choose_save_via(qmp.version, via, direct_io=direct_io, watched=observer is not None)
    channels = choose_save_channels(how, multifd_channels, watched=observer is not None)
    if channels < 0 or channels > 64:
        raise VMError(f"{channels} multifd channels requested (0 to 64)")
    facts = read_facts(qmp)
    _check_source(facts)
    listening: UnixListen | None = None
    if how == "proxy" and channels:
        listening, channels = _multifd_listener(qmp, channels,
                                                asked=multifd_channels is not None)
    caps, params = _settings(how, channels, direct_io, max_bandwidth, qmp.version)
    try:
        run = _Save(qmp, facts, target, t0, progress=progress, timeout=timeout,
                    stop_after=stop_after if live else None)
    except BaseException:
        if listening is not None:
            listening.close()
        raise
    run.libvirt = (libvirt_xml, libvirt_running) if libvirt_xml is not None else None
    run.way = listening  # closed with the run if the save fails before it is used
    run.channels = int(params.get("multifd-channels", 0)) if caps.get("multifd") else 0
    try:
        run.settings.set(caps, params)
        if not live and run.was_running:
            qmp.cmd("stop")
            run.stopped_by_us = True
        if how == "native":
            run.native()
        else:
            run.proxy(channels, direct_io, observer, listening)
    except BaseException:
        run.abandon()
        raise
    finally:
        run.close()
    if resume:
        qmp.cmd("cont")
    return run.report(how, live=live, resumed=resume)


def choose_save_channels(how: str, channels: int | None, *, watched: bool) -> int:
    """``channels`` as asked, or when not (None) the default of a save ``how``: QEMU's two
    writer threads for ``native``; for the proxy :data:`AUTO_PROXY_CHANNELS` connections
    (one where QEMU cannot connect to fixedram, :meth:`UnixListen.can_connect`), but one
    connection when the image's page writes are watched (an observer sees them in the
    order of one stream)."""
    if channels is not None:
        return channels
    if how == "native":
        return 2
    return 0 if watched else AUTO_PROXY_CHANNELS


def _multifd_listener(qmp: QMP, channels: int, *,
                      asked: bool) -> tuple[UnixListen | None, int]:
    """The socket QEMU connects to ``channels`` + 1 times, and the channel count; where QEMU
    cannot connect there (:meth:`UnixListen.can_connect`), channels ``asked`` for are
    refused, and the default becomes one connection: ``(None, 0)``."""
    listening = UnixListen(channels + 1)
    try:
        why = listening.can_connect(qmp)
    except BaseException:
        listening.close()
        raise
    if why is None:
        return listening, channels
    listening.close()
    if asked:
        raise VMError(f"QEMU cannot connect to fixedram's private directory for multifd "
                      f"channels ({why}): save with --channels 0 (one connection)")
    return None, 0  # one connection, handed to QEMU as a file descriptor


def _check_source(facts: Facts) -> None:
    """Refuse a QEMU that is migrating or waiting for an incoming migration."""
    mig = facts.migration
    if mig in ("setup", "active", "pre-switchover", "device", "cancelling", "wait-unplug"):
        raise VMError(f"a migration is already in progress (status {mig})")
    if facts.status == "inmigrate":
        raise VMError("this QEMU is waiting for an incoming migration; there is nothing to save")


def _settings(how: str, channels: int, direct_io: bool, max_bandwidth: int,
              version: tuple[int, int, int]) -> tuple[dict[str, bool], dict[str, Any]]:
    """The migration capabilities and parameters a save ``how`` from a QEMU of ``version``
    needs."""
    caps: dict[str, bool] = {}
    params: dict[str, Any] = {"max-bandwidth": int(max_bandwidth)}
    if how == "proxy":
        # QEMU then completes only after receive() has fsynced and renamed the image and
        # answered SHUT(0); a failure on our side makes QEMU fail (and resume) the source.
        caps["return-path"] = True
        # a VM restored by QEMU's own mapped-ram load (virsh restore of a sparse image) still
        # has mapped-ram and multifd on, and mapped-ram refuses a socket
        caps["mapped-ram"] = False
        caps["multifd"] = False
        if channels:
            caps["multifd"] = True
            params["multifd-channels"] = channels
            params["multifd-compression"] = "none"  # fixedram receives pages as they are
            if version[:2] >= MAIN_THREAD_ZERO_PAGES.since:
                params["zero-page-detection"] = "legacy"
    else:
        caps["mapped-ram"] = True
        if channels or direct_io:
            caps["multifd"] = True
            params["multifd-channels"] = max(1, channels)
        if direct_io:
            params["direct-io"] = True
    return caps, params


class _Save:
    """One save under way: what it changed in QEMU (to undo on failure), its transport or
    temporary file, the image writer's thread, and the times and figures of the report."""

    def __init__(self, qmp: QMP, facts: Facts, target: Path, t0: float, *,
                 progress: ProgressFn | None, timeout: float | None,
                 stop_after: float | None) -> None:
        self.qmp, self.facts, self.target, self.t0 = qmp, facts, target, t0
        self.progress, self.timeout, self.stop_after = progress, timeout, stop_after
        self.was_running = facts.status == "running"
        self.stopped_by_us = False
        self.channels = 0
        self.settings = MigrationSettings(qmp, facts)
        self.watch = Watch(qmp)
        self.atomic: AtomicFile | None = None  # native: QEMU's file, until renamed
        self.way: Transport | None = None  # proxy
        self.done = False
        self.t_mig = self.t_setup = self.t_check = self.t_commit = 0.0
        self.info: dict[str, Any] = {}
        self.ram_size = self.pages = 0
        self.blocks: dict[str, int] = {}
        self.libvirt: tuple[str, bool] | None = None  # domain XML, was running

    def _migrate(self, uri: str) -> None:
        self.t_mig = time.monotonic()
        self.t_setup = self.t_mig - self.t0
        try:
            self.qmp.cmd("migrate", uri=uri)
        except VMError as e:
            if self.facts.status == "postmigrate":
                raise VMError(f"{e} (the VM is still paused after an earlier save or "
                              "migration: resume it with QMP 'cont' first, or save with "
                              "--resume)") from None
            raise

    def _wait(self) -> None:
        """Until QEMU completes (every 20 ms, or at once on an event); a live save still
        running after ``stop_after`` seconds is paused, one past ``timeout`` cancelled."""
        self.ram_size, self.blocks = _ram_size(self.facts.ramblocks)
        start = time.monotonic()
        stop_at = None if self.stop_after is None else start + self.stop_after
        stopped = False

        def completed(r: Reading) -> bool:
            nonlocal stopped
            if r.status == "completed":
                return True
            if stop_at is not None and not stopped and time.monotonic() > stop_at \
                    and r.status == "active":
                with contextlib.suppress(FixedramError):
                    self.qmp.cmd("stop")  # a live save that does not converge: finish paused
                stopped = True
            return False

        def each(r: Reading) -> None:
            if self.progress is not None and r.migration.get("ram"):
                self.progress(from_query_migrate(r.migration))

        timeout = self.timeout
        self.info = self.watch.until(
            completed, each=each, every=SAVE_POLL,
            deadline=None if timeout is None else start + timeout,
            late=lambda r: f"the save did not finish within {timeout:.0f} s "
                           f"(status {r.migration.get('status', '')})").migration

    def native(self) -> None:
        """QEMU writes the file; fixedram checks it, makes it durable and names it."""
        # Created by us (mode 0600) so an unwritable directory fails before QEMU starts.
        atomic = self.atomic = AtomicFile(self.target)
        head = b""
        if self.libvirt is not None:  # QEMU writes the stream after the libvirt header
            head = header_bytes(self.libvirt[0], was_running=self.libvirt[1], partial=True)
        self._migrate(f"file:{atomic.temp}" + (f",offset={len(head)}" if head else ""))
        self._wait()
        if head:  # QEMU truncated the file: the header goes in now, complete once durable
            write_header(atomic.fd, head)
            os.fsync(atomic.fd)
            mark_complete(atomic.fd)
        self.t_check = time.monotonic()
        self.t_mig = self.t_check - self.t_mig
        self.pages = _check_image(atomic.temp, self.facts.machine, self.blocks)
        self.t_commit = time.monotonic()
        self.t_check = self.t_commit - self.t_check
        # fsync file, rename over IMAGE, fsync directory; then out of the page cache
        atomic.commit()
        self.t_commit = time.monotonic() - self.t_commit
        _drop_from_cache(self.target)
        self.done = True

    def proxy(self, channels: int, direct_io: bool, observer: PageObserver | None = None,
              listening: UnixListen | None = None) -> None:
        """QEMU migrates into :func:`~fixedram.endpoint.receive.receive`, in a thread, which
        writes the image; on ``channels`` multifd connections to ``listening``, a private
        unix socket QEMU can connect to 1 + N times
        (:func:`~fixedram.endpoint.receive.receive_listening`), else on a socket pair."""
        from fixedram.endpoint.receive import receive, receive_listening

        target = self.target
        lv: dict[str, Any] = {} if self.libvirt is None else {
            "libvirt_xml": self.libvirt[0], "libvirt_running": self.libvirt[1]}
        way: Transport
        if channels:
            assert listening is not None
            way = listening

            def receiving() -> Any:
                return receive_listening(listening.listener, target, channels=channels,
                                         direct_io=direct_io, accept_timeout=60.0,
                                         drop_cache=False, **lv)
        else:
            way = pair = FdTransport(self.qmp, _FD_NAME)

            def receiving() -> Any:
                return receive(pair.channel, target, direct_io=direct_io, drop_cache=False,
                               observer=observer, **lv)
        self.way = way
        way.hand()
        worker = self.watch.worker = Worker.started("fixedram-receive",
                                                    _writing(receiving, target, way))
        way.migrate(self._migrate)
        self._wait()
        self.t_mig = time.monotonic() - self.t_mig
        worker.join(self.timeout if self.timeout is not None else 600.0)
        if worker.is_alive():
            raise VMError("QEMU finished the migration but the image writer did not")
        if worker.error is not None:
            raise worker.error
        self.t_check = time.monotonic()
        self.pages = _check_image(target, self.facts.machine, self.blocks)
        self.t_check = time.monotonic() - self.t_check
        # the check read the image's metadata from the cache: only now do its pages go
        # (in a child, as after a native save)
        _drop_from_cache(target)
        self.done = True

    def abandon(self) -> None:
        """After a failure: stop QEMU's migration and the writer; no file left behind."""
        worker = self.watch.worker
        if worker is not None and worker.is_alive():
            with contextlib.suppress(FixedramError):
                self.qmp.cmd("migrate_cancel")
            abandon(worker, self.way, 30.0)
        if self.atomic is not None:
            with contextlib.suppress(FixedramError):
                st = self.qmp.query_migrate().get("status")
                if st not in (None, "completed", "failed", "cancelled"):
                    self.qmp.cmd("migrate_cancel")
            self.atomic.abort()

    def close(self) -> None:
        """Put the settings back; after a failure, run a VM that ran before. (The writer's
        thread closes the transport when it ends.)"""
        if self.way is not None and self.watch.worker is None:
            self.way.close()
        self.watch.close()
        self.settings.restore()
        if not self.done and (self.was_running or self.stopped_by_us):
            with contextlib.suppress(FixedramError):
                if self.qmp.status() != "running":
                    self.qmp.cmd("cont")

    def report(self, how: str, *, live: bool, resumed: bool) -> SaveReport:
        """What the save did (once it succeeded)."""
        st = os.stat(self.target)
        info = self.info
        ram = info.get("ram") or {}
        return SaveReport(
            image=str(self.target),
            via=how,
            qemu_version=self.qmp.version_str,
            machine=self.facts.machine,
            live=live,
            resumed=resumed,
            total_time=time.monotonic() - self.t0,
            migration_time=self.t_mig,
            qemu_total_time=info["total-time"] / 1000 if "total-time" in info else None,
            downtime=info["downtime"] / 1000 if "downtime" in info else None,
            bytes_transferred=int(ram.get("transferred", 0)),
            pages_transferred=int(ram.get("normal", 0)),
            dirty_passes=int(ram["dirty-sync-count"]) if "dirty-sync-count" in ram else None,
            pages_in_image=self.pages,
            ram_size=self.ram_size,
            image_apparent_size=st.st_size,
            image_allocated_size=st.st_blocks * 512,
            caps_changed=self.settings.caps,
            params_changed=self.settings.params,
            setup_time=self.t_setup,
            check_time=self.t_check,
            commit_time=self.t_commit,
            channels=self.channels,
        )


def _writing(receiving: Callable[[], Any], target: Path,
             way: Transport) -> Callable[[], Any]:
    """``receiving``, then ``way`` closed; a bare OSError of the image writer becomes one
    naming the image."""
    def run() -> Any:
        try:
            return receiving()
        except OSError as e:
            raise FixedramError(f"writing {target}: {e.strerror or e}") from None
        finally:
            way.close()

    return run
