"""Save a running QEMU VM into a mapped-ram image, driven over QMP (``fixedram save``).

Two ways to get the bytes out of QEMU:

``proxy``
    fixedram is the migration destination: one end of a socketpair goes to QEMU with
    ``getfd``, QEMU migrates into it (``migrate uri=fd:NAME``), and the other end is fed to
    :func:`fixedram.endpoint.receive.receive` in a thread, which writes the mapped-ram image
    atomically. Works with any QEMU (7.2 included).
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
import shutil
import socket
import tempfile
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from fixedram.errors import EndpointError, FixedramError, ImageError, VMError
from fixedram.io.channel import Listener
from fixedram.io.files import AtomicFile, drop_cached
from fixedram.qmp.client import QMP, Events
from fixedram.qmp.common import (
    WAKE_EVENTS,
    MigrationSettings,
    Worker,
    hand_socket,
    read_facts,
    wait_event,
)
from fixedram.qmp.progress import Progress, from_query_migrate
from fixedram.versions import MAPPED_RAM, MAPPED_RAM_DIRECT_IO

__all__ = ["MAX_BANDWIDTH", "SaveReport", "Via", "choose_save_via", "save"]

#: max-bandwidth during a save: QEMU's 128 MiB/s default also throttles fd: and file:.
MAX_BANDWIDTH = 1 << 40

Via = Literal["auto", "native", "proxy"]
ProgressFn = Callable[[Progress], None]

_FD_NAME = "fixedram-save"
_POLL = 0.02


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

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return asdict(self)


def choose_save_via(version: tuple[int, int, int], via: Via, *, direct_io: bool = False) -> str:
    """Resolve ``via`` for a source QEMU of ``version``; raise :class:`VMError` if impossible."""
    native_ok = version[:2] >= MAPPED_RAM.since and (
        not direct_io or version[:2] >= MAPPED_RAM_DIRECT_IO.since)
    if via == "auto":
        return "native" if native_ok else "proxy"
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


def _wait_migration(
    qmp: QMP,
    progress: ProgressFn | None,
    *,
    worker: Worker | None = None,
    stop_after: float | None = None,
    timeout: float | None = None,
    events: Events | None = None,
) -> dict[str, Any]:
    """Poll ``query-migrate`` until completed (every 20 ms, or at once on one of ``events``);
    raise on failure (cancelling what runs)."""
    t0 = time.monotonic()
    stopped = False
    while True:
        info = qmp.query_migrate()
        st = info.get("status", "")
        if progress is not None and info.get("ram"):
            progress(from_query_migrate(info))
        if st == "completed":
            return info
        if st in ("failed", "cancelled"):
            if worker is not None:
                worker.join(5.0)
                # the writer's own failure (disk full...) says more than QEMU's; "the source
                # closed the connection" says less
                if worker.error is not None and not isinstance(worker.error, EndpointError):
                    raise _writer_error(worker.error, worker.target)
            desc = info.get("error-desc", "")
            raise VMError(f"migration {st}" + (f": {desc}" if desc else ""))
        if worker is not None and worker.error is not None:
            with contextlib.suppress(FixedramError):
                qmp.cmd("migrate_cancel")
            raise _writer_error(worker.error, worker.target)
        el = time.monotonic() - t0
        if stop_after is not None and not stopped and el > stop_after and st == "active":
            with contextlib.suppress(FixedramError):
                qmp.cmd("stop")  # a live save that does not converge: finish it paused
            stopped = True
        if timeout is not None and el > timeout:
            with contextlib.suppress(FixedramError):
                qmp.cmd("migrate_cancel")
            raise VMError(f"the save did not finish within {timeout:.0f} s (status {st})")
        wait_event(events, _POLL)


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
        return _count_pages(path, [(n, b.npages, b.mapped.bitmap_offset)
                                   for n, b in img.blocks.items() if b.mapped is not None])


#: Bitmap bytes read at a time when counting pages (8 Mi pages, 32 GiB of RAM).
_BITMAP_PIECE = 1 << 20


def _count_pages(path: Path, bitmaps: list[tuple[str, int, int]]) -> int:
    """Pages holding data, counted from the blocks' bitmaps ``(name, pages, offset)`` on disk
    a piece at a time: the memory it takes does not grow with the RAM (a bool per page of a
    1 TiB guest would be 256 MiB). A bit set beyond a block's last page is refused."""
    import numpy as np

    from fixedram.image.layout import bitmap_bytes
    from fixedram.io.files import preadv_exact

    total = 0
    buf = bytearray(_BITMAP_PIECE)
    fd = os.open(path, os.O_RDONLY)
    try:
        for name, npages, offset in bitmaps:
            nbytes = bitmap_bytes(npages)
            for start in range(0, nbytes, _BITMAP_PIECE):
                view = memoryview(buf)[: min(_BITMAP_PIECE, nbytes - start)]
                preadv_exact(fd, view, offset + start, f"{path}: bitmap of RAM block '{name}'")
                bits = np.unpackbits(np.frombuffer(view, dtype=np.uint8), bitorder="little")
                inside = max(0, min(len(bits), npages - start * 8))
                if bits[inside:].any():
                    raise ImageError(f"{path}: RAM block '{name}': bitmap bits set beyond its "
                                     f"{npages} pages")
                total += int(np.count_nonzero(bits[:inside]))
    finally:
        os.close(fd)
    return total


def _drop_from_cache(image: Path) -> None:
    """Drop the saved (fsynced, renamed) image's pages from the page cache, in a child
    process the command does not wait for.

    QEMU wrote the image through the page cache (all of it, or its metadata with
    direct-io); evicting a GiB of clean pages takes the kernel a few hundred milliseconds,
    which the image does not need to be durable and complete. A thread reaps the child.
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


def _writer_error(e: BaseException, target: Path) -> BaseException:
    """The image writer's exception, with the image named when it is a bare OSError."""
    if isinstance(e, OSError) and not isinstance(e, FixedramError):
        return FixedramError(f"writing {target}: {e.strerror or e}")
    return e


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


def _migrate(qmp: QMP, uri: str, status: str) -> None:
    try:
        qmp.cmd("migrate", uri=uri)
    except VMError as e:
        if status == "postmigrate":
            raise VMError(f"{e} (the VM is still paused after an earlier save or migration: "
                          "resume it with QMP 'cont' first, or save with --resume)") from None
        raise


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
) -> SaveReport:
    """Save the VM behind ``qmp`` into the mapped-ram file ``image`` (see the module doc).

    ``live``: keep the guest running during the save (it is paused at the switchover; a save
    still running after ``stop_after`` seconds is finished by pausing the VM). ``resume``:
    run the VM again after a successful save. ``direct_io``: write pages with O_DIRECT.
    ``multifd_channels``: multifd channels (0 = none); ``native``: QEMU's writer threads
    (default 2); ``proxy``: QEMU sends pages over that many extra connections to a private
    unix socket that fixedram receives on in parallel (default 0: one fd channel). ``progress``
    is called with
    a :class:`Progress` about every 20 ms. Raises :class:`FixedramError` (one line) on failure.
    """
    t0 = time.monotonic()
    target = Path(image).absolute()
    _dir_check(target)
    version = qmp.version
    how = choose_save_via(version, via, direct_io=direct_io)
    channels = multifd_channels if multifd_channels is not None else (
        2 if how == "native" else 0)
    if channels < 0 or channels > 64:
        raise VMError(f"{channels} multifd channels requested (0 to 64)")
    facts = read_facts(qmp)
    status = facts.status
    mig = facts.migration
    if mig in ("setup", "active", "pre-switchover", "device", "cancelling", "wait-unplug"):
        raise VMError(f"a migration is already in progress (status {mig})")
    if status == "inmigrate":
        raise VMError("this QEMU is waiting for an incoming migration; there is nothing to save")
    machine = facts.machine
    ram_size = 0
    blocks: dict[str, int] = {}
    settings = MigrationSettings(qmp, facts)
    events = qmp.events(*WAKE_EVENTS)
    t_setup = t_check = t_commit = 0.0
    was_running = status == "running"
    stopped_by_us = False
    atomic: AtomicFile | None = None
    worker: Worker | None = None
    ours: socket.socket | None = None
    listener: Listener | None = None
    done = False
    try:
        caps: dict[str, bool] = {}
        params: dict[str, Any] = {"max-bandwidth": int(max_bandwidth)}
        if how == "proxy":
            # QEMU then completes only after receive() has fsynced and renamed the image and
            # answered SHUT(0); a failure on our side makes QEMU fail (and resume) the source.
            caps["return-path"] = True
            if channels:
                caps["multifd"] = True
                params["multifd-channels"] = channels
        else:
            caps["mapped-ram"] = True
            if channels or direct_io:
                caps["multifd"] = True
                params["multifd-channels"] = max(1, channels)
            if direct_io:
                params["direct-io"] = True
        settings.set(caps, params)
        if not live and was_running:
            qmp.cmd("stop")
            stopped_by_us = True
        if how == "native":
            # Created by us (mode 0600) so an unwritable directory fails before QEMU starts.
            atomic = AtomicFile(target)
            t_mig = time.monotonic()
            t_setup = t_mig - t0
            _migrate(qmp, f"file:{atomic.temp}", status)
            ram_size, blocks = _ram_size(facts.ramblocks)
            info = _wait_migration(qmp, progress, stop_after=stop_after if live else None,
                                   timeout=timeout, events=events)
            t_check = time.monotonic()
            t_mig = t_check - t_mig
            pages_in_image = _check_image(atomic.temp, machine, blocks)
            t_commit = time.monotonic()
            t_check = t_commit - t_check
            # fsync file, rename over IMAGE, fsync directory; then out of the page cache
            atomic.commit()
            t_commit = time.monotonic() - t_commit
            _drop_from_cache(target)
        else:
            from fixedram.endpoint.receive import receive, receive_listening
            from fixedram.io.channel import SocketChannel, listen

            if channels:
                # multifd needs a socket QEMU can connect to 1 + N times
                sockdir = tempfile.mkdtemp(prefix="fixedram-", dir="/tmp")
                lst = listen(f"unix:{sockdir}/mig.sock", backlog=channels + 2)
                listener = lst
                uri = f"unix:{sockdir}/mig.sock"

                def run_receive() -> Any:
                    try:
                        return receive_listening(lst, target, channels=channels,
                                                 direct_io=direct_io, accept_timeout=60.0)
                    finally:
                        lst.close()
                        shutil.rmtree(sockdir, ignore_errors=True)
            else:
                ours = hand_socket(qmp, _FD_NAME)
                chan = SocketChannel(ours)
                uri = f"fd:{_FD_NAME}"

                def run_receive() -> Any:
                    try:
                        return receive(chan, target, direct_io=direct_io)
                    finally:
                        chan.close()

            worker = Worker("fixedram-receive", run_receive)
            worker.target = target
            worker.start()
            t_mig = time.monotonic()
            t_setup = t_mig - t0
            try:
                _migrate(qmp, uri, status)
            except BaseException:
                if listener is not None:
                    listener.close()
                else:
                    qmp.close_fd(_FD_NAME)
                raise
            ram_size, blocks = _ram_size(facts.ramblocks)
            info = _wait_migration(qmp, progress, worker=worker,
                                   stop_after=stop_after if live else None, timeout=timeout,
                                   events=events)
            t_mig = time.monotonic() - t_mig
            worker.join(timeout if timeout is not None else 600.0)
            if worker.is_alive():
                raise VMError("QEMU finished the migration but the image writer did not")
            if worker.error is not None:
                raise _writer_error(worker.error, target)
            t_check = time.monotonic()
            pages_in_image = _check_image(target, machine, blocks)
            t_check = time.monotonic() - t_check
        done = True
    except BaseException:
        if worker is not None and worker.is_alive():
            with contextlib.suppress(FixedramError):
                qmp.cmd("migrate_cancel")
            if ours is not None:
                with contextlib.suppress(OSError):
                    ours.shutdown(socket.SHUT_RDWR)
            if listener is not None:
                listener.close()
            worker.join(30.0)
        if atomic is not None:
            with contextlib.suppress(FixedramError):
                st = qmp.query_migrate().get("status")
                if st not in (None, "completed", "failed", "cancelled"):
                    qmp.cmd("migrate_cancel")
            atomic.abort()
        raise
    finally:
        events.close()
        settings.restore()
        if not done and (was_running or stopped_by_us):
            with contextlib.suppress(FixedramError):
                if qmp.status() != "running":
                    qmp.cmd("cont")
    resumed = False
    if resume:
        qmp.cmd("cont")
        resumed = True
    st = os.stat(target)
    ram = info.get("ram") or {}
    return SaveReport(
        image=str(target),
        via=how,
        qemu_version=qmp.version_str,
        machine=machine,
        live=live,
        resumed=resumed,
        total_time=time.monotonic() - t0,
        migration_time=t_mig,
        qemu_total_time=info["total-time"] / 1000 if "total-time" in info else None,
        downtime=info["downtime"] / 1000 if "downtime" in info else None,
        bytes_transferred=int(ram.get("transferred", 0)),
        pages_transferred=int(ram.get("normal", 0)),
        dirty_passes=int(ram["dirty-sync-count"]) if "dirty-sync-count" in ram else None,
        pages_in_image=pages_in_image,
        ram_size=ram_size,
        image_apparent_size=st.st_size,
        image_allocated_size=st.st_blocks * 512,
        caps_changed=settings.caps,
        params_changed=settings.params,
        setup_time=t_setup,
        check_time=t_check,
        commit_time=t_commit,
    )
