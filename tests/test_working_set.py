"""The working-set record (``docs/working-set.md``): recorded by lazy restores, prefetched by
the next ones, stored in the image's padding next to the checksums.

Without QEMU (fixedram-written images): the record round-trips and merges, a torn copy or
a record bound to other content is ignored with a warning, concurrent writers (real
processes) leave a valid record, a read-only image gets a warning and stays unchanged, and
the checksums and the record never overlap.

With real QEMU (the bare guest): two lazy restores running at once record into one image,
which ``verify`` passes and QEMU still loads natively with RAM equal to the source's;
prefetch sends no page twice (every PAGE/ZERO record on the wire counted); a damaged or stale
record is ignored with a warning and the restore is RAM-equal; a fan-out of lazy restores
of one image all end RAM-equal (3 here, 8 with ``-m fanout``).

With the Linux guest's touch workload: the first lazy restore records the region the guest
reads (its push waits while the guest asks), the second prefetches it and the guest asks
for a small fraction of those pages; the guest's own check of the region passes both times.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from synth_images import write_mapped_image

from fixedram.image import open_image
from fixedram.image import workingset as wsm
from fixedram.image.extensions import WS_AREA, WS_COPY, BlockGeometry, Geometry
from fixedram.testing.guest.linux import (
    COMMAND_PORT_ARGS,
    LinuxGuest,
    Touch,
    linux_append,
    parse_touches,
    send_touch,
)
from fixedram.testing.vm import Guest

PY = str(Path(sys.executable).absolute())
PS = 4096
BLOCKS = {"pc.ram": 2048 * PS, "pc.bios": 4 * PS}


def fixedram(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PY, "-m", "fixedram", *args], capture_output=True, text=True,
                          timeout=timeout, check=False)


def synth(path: Path, seed: int = 1) -> Path:
    """A fixedram-written image (with checksums): pc.ram pages 0-499 present."""
    pages = {"pc.ram": {i: bytes([(i * seed) % 250 + 1]) * PS for i in range(500)},
             "pc.bios": {1: b"\x07" * PS}}
    write_mapped_image(path, BLOCKS, pages)
    return path


def observe(*reqs: tuple[str, int, int, int], prefetched: bool = False) -> wsm.Observation:
    return wsm.Observation(list(reqs), prefetched)


def record(path: Path, obs: wsm.Observation) -> wsm.RecordResult:
    with open_image(path) as img:
        return wsm.record(img, obs)


def load(path: Path) -> wsm.Loaded:
    with open_image(path) as img:
        return wsm.load(img)


def pages_of(ws: wsm.WorkingSet) -> list[tuple[str, int]]:
    return [(ws.blocks[b], int(p)) for b, p in zip(ws.block, ws.page, strict=True)]


# ---------------------------------------------------------------------------------------------
# The record itself
# ---------------------------------------------------------------------------------------------


def test_round_trip_merge_and_verify(tmp_path: Path) -> None:
    img = synth(tmp_path / "a.img")
    assert fixedram("verify", "--add", str(img)).returncode == 0  # checksums too
    before = img.read_bytes()
    assert load(img).record is None
    # first request order, duplicates dropped; a multi-page request expands
    r = record(img, observe(("pc.ram", 9, 1, 0), ("pc.ram", 3, 2, 0), ("pc.bios", 1, 1, 0),
                            ("pc.ram", 9, 1, 0), ("pc.ram", 1500, 1, 0)))
    assert (r.status, r.pages, r.restores, r.warning) == ("recorded", 5, 1, None)
    got = load(img)
    assert got.warnings == [] and got.record is not None
    assert pages_of(got.record) == [("pc.ram", 9), ("pc.ram", 3), ("pc.ram", 4),
                                    ("pc.bios", 1), ("pc.ram", 1500)]
    first_copy = got.record.offset
    # a prefetching restore: page 1500 needed at cursor 0 moves up to the mean of ranks 4
    # and 0, page 700 is new at rank 2 (ties: the record's pages first); pages it did not
    # ask for keep their rank
    r = record(img, observe(("pc.ram", 1500, 1, 0), ("pc.ram", 700, 1, 2), prefetched=True))
    assert (r.status, r.restores) == ("recorded", 2)
    got = load(img)
    assert got.record is not None and got.record.offset != first_copy  # the other copy
    assert got.record.generation == 2
    assert pages_of(got.record) == [("pc.ram", 9), ("pc.ram", 3), ("pc.ram", 4),
                                    ("pc.ram", 1500), ("pc.ram", 700), ("pc.bios", 1)]
    # nothing outside the working set's area changed, QEMU-visible bytes included
    with open_image(img) as im:
        blk = Geometry.of_image(im).working_set_block()
    assert blk is not None
    after = img.read_bytes()
    lo = blk.pages_offset - WS_AREA
    assert after[:lo] == before[:lo] and after[blk.pages_offset :] == before[blk.pages_offset :]
    # verify passes and shows it; analyze shows it
    v = fixedram("verify", "--json", str(img))
    assert v.returncode == 0, v.stdout
    rep = json.loads(v.stdout)
    assert rep["working_set"]["status"] == "ok" and rep["working_set"]["pages"] == 6
    assert rep["checksums"] is not None
    a = json.loads(fixedram("analyze", "--json", str(img)).stdout)
    assert a["working_set"]["restores"] == 2
    # re-checksumming leaves the record alone
    assert fixedram("verify", "--add", "--force", str(img)).returncode == 0
    assert load(img).record is not None


def test_merge_bounded_and_absence_counts_without_prefetch() -> None:
    old = wsm.merge(None, observe(*[("pc.ram", i, 1, 0) for i in range(10)]), ["pc.ram"])
    # a restore that did not prefetch and never asked for pages 0-4: they sink
    new = wsm.merge(old, observe(*[("pc.ram", i, 1, 0) for i in range(5, 10)]), ["pc.ram"])
    # ranks: 0-4 (absent: (r + 5) / 2) 2.5 3 3.5 4 4.5; 5-9 ((r + r - 5) / 2) 2.5 3.5 4.5 5.5 6.5
    assert [p for _, p in pages_of(new)] == [0, 5, 1, 2, 6, 3, 4, 7, 8, 9]
    big = wsm.merge(None, observe(("pc.ram", 0, wsm.MAX_PAGES + 10, 0)), ["pc.ram"])
    assert len(big) == wsm.MAX_PAGES
    # what does not fit in a copy is cut, whole runs at a time
    scattered = wsm.merge(None, observe(*[("pc.ram", 3 * i, 1, 0) for i in range(40000)]),
                          ["pc.ram"])
    data = wsm.encode(scattered)
    assert len(data) <= WS_COPY
    back = wsm.decode(data)
    assert 0 < len(back) < 40000 and pages_of(back) == pages_of(scattered)[: len(back)]


def test_torn_copy_and_stale_record_ignored(tmp_path: Path) -> None:
    img = synth(tmp_path / "a.img")
    record(img, observe(("pc.ram", 1, 1, 0)))
    record(img, observe(("pc.ram", 2, 1, 0)))
    newest = load(img).record
    assert newest is not None and newest.generation == 2
    # tear the newest copy: the older one is used, with a warning; verify says corrupt
    with open(img, "r+b") as f:
        f.seek(newest.offset + 70)
        f.write(b"\xff\xff")
    got = load(img)
    assert got.record is not None and got.record.generation == 1
    assert len(got.warnings) == 1 and "damaged" in got.warnings[0]
    v = fixedram("verify", str(img))
    assert v.returncode == 1 and "working-set record" in v.stdout
    # the next record overwrites the torn copy
    record(img, observe(("pc.ram", 3, 1, 0)))
    got = load(img)
    assert got.warnings == [] and got.record is not None and got.record.generation == 2
    # the same area in an image with other content: stale, ignored
    other = synth(tmp_path / "b.img", seed=3)
    shutil.copyfile(img, tmp_path / "copy.img")
    with open_image(img) as im:
        blk = Geometry.of_image(im).working_set_block()
    assert blk is not None
    area = img.read_bytes()[blk.pages_offset - WS_AREA : blk.pages_offset]
    with open(other, "r+b") as f:  # b.img differs in its pages only: change its tail too
        f.seek(0, os.SEEK_END)
        end = f.tell()
        f.seek(blk.pages_offset - WS_AREA)
        f.write(area)
    assert load(other).record is not None  # same layout and tail: pages are not bound
    with open(other, "r+b") as f:  # the VM description: a space becomes a tab, still valid
        f.seek(end - 512)
        f.seek(end - 512 + f.read().rindex(b" "))
        f.write(b"\t")
    got = load(other)
    assert got.record is None and got.stale is not None
    assert any("stale" in w for w in got.warnings)


def test_read_only_image_warns_and_stays_unchanged(tmp_path: Path) -> None:
    img = synth(tmp_path / "a.img")
    before = img.read_bytes()
    img.chmod(0o444)
    frozen = False
    try:
        try:
            os.close(os.open(img, os.O_RDWR))
            # root ignores permissions: make the file immutable instead
            subprocess.run(["chattr", "+i", str(img)], check=True, capture_output=True)
            frozen = True
        except PermissionError:
            pass
        r = record(img, observe(("pc.ram", 1, 1, 0)))
    finally:
        if frozen:
            subprocess.run(["chattr", "-i", str(img)], check=True)
    assert r.status == "skipped" and r.warning is not None
    assert "read-only" in r.warning and "\n" not in r.warning
    assert img.read_bytes() == before


def _writer(path: str, k: int) -> None:
    with open_image(path) as img:
        for j in range(5):
            res = wsm.record(img, wsm.Observation([("pc.ram", 10 * k + j, 1, 0)], False))
            assert res.status == "recorded", res


def test_concurrent_writers_leave_a_valid_record(tmp_path: Path) -> None:
    img = synth(tmp_path / "a.img")
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(str(img), k)) for k in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    got = load(img)
    assert got.warnings == [] and got.record is not None
    assert got.record.restores == 20 and got.record.generation == 20
    assert sorted(p for _, p in pages_of(got.record)) == sorted(
        10 * k + j for k in range(4) for j in range(5))
    assert fixedram("verify", str(img)).returncode == 0


def test_space_accounting() -> None:
    """Two blocks with room: the record takes the second one's end, the checksums keep the
    first whole. One block: they share it, the checksums' room shrinks by the record's."""
    a = BlockGeometry("a", 1 << 30, 100, 1 << 20)
    b = BlockGeometry("b", 1 << 20, (1 << 30) + (2 << 20) + 100, (1 << 30) + (3 << 20))
    two = Geometry((a, b), 0, 4 << 30)
    assert two.checksum_block() == b  # b has the most room (a's bitmap is larger)
    assert two.working_set_block() == a
    assert two.checksum_room(b) == b.room and two.checksum_room(a) == a.room - WS_AREA
    one = Geometry((a,), 0, 2 << 30)
    assert one.working_set_block() == a and one.checksum_room(a) == a.room - WS_AREA
    tight = BlockGeometry("t", 1 << 20, 100, 100 + 64 + WS_AREA)
    assert Geometry((tight,), 0, 2 << 20).working_set_block() is None


# ---------------------------------------------------------------------------------------------
# Real QEMU: the bare guest
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def sockdir() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="frw-", dir="/tmp"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


def _dest(case: Any, workdir: Path, sockdir: Path, name: str) -> tuple[Guest, Path]:
    dst = Guest.like(case.source, name=name, workdir=workdir)
    ctl = sockdir / f"{name}.qmp"
    dst.extra_args = ("-qmp", f"unix:{ctl},server=on,wait=off")
    dst.start()
    return dst, ctl


def _lazy(ctl: Path, image: Path, *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen([PY, "-m", "fixedram", "restore", "--lazy", "--qmp", str(ctl),
                             "--json", "--no-progress", *extra, str(image)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _done(p: subprocess.Popen[str]) -> tuple[dict[str, Any], str]:
    out, err = p.communicate(timeout=180)
    assert p.returncode == 0, err
    return json.loads(out), err


def _same_ram(dst: Guest, case: Any, shm: Path, tag: str) -> None:
    got = dst.pmemsave(shm / f"ws-{tag}.mem")
    try:
        a = np.fromfile(got, dtype=np.uint8).reshape(-1, PS)
        b = np.fromfile(case.mem_dump_path, dtype=np.uint8).reshape(-1, PS)
        pages = np.flatnonzero((a != b).any(axis=1))
        if dst.accel == "kvm":
            pages = pages[pages != 0xE8000 // PS]
        assert pages.size == 0, f"{pages.size} pages differ, first at {pages[:8] * PS}"
    finally:
        got.unlink(missing_ok=True)


def _clear_record(path: Path) -> None:
    """Remove any working-set record from image ``path`` (its copies' magic zeroed)."""
    with open_image(path) as im:
        geom = Geometry.of_image(im)
    fd = os.open(path, os.O_RDWR)
    try:
        for at in wsm.find(fd, geom).copies:
            os.pwrite(fd, bytes(8), at)
        assert wsm.find(fd, geom).record is None
    finally:
        os.close(fd)


@pytest.fixture(scope="module")
def recorded_once(qemu_image: Callable[[str], Any], tmp_path_factory: pytest.TempPathFactory
                  ) -> Iterator[tuple[Any, Path]]:
    """The bare guest's mapped-ram image, copied, after two lazy restores *at once* that ran
    the guest (throttled push: it asks for pages) and recorded into it."""
    case = qemu_image("mapped-ram")
    work = tmp_path_factory.mktemp("ws-recorded")
    socks = Path(tempfile.mkdtemp(prefix="frw-", dir="/tmp"))
    img = work / "rec.img"
    shutil.copyfile(case.path, img)
    _clear_record(img)  # other modules' lazy restores of the shared image recorded into it
    dsts = [_dest(case, work, socks, f"r{i}") for i in range(2)]
    try:
        procs = [_lazy(ctl, img, "--push-rate", "24M") for _, ctl in dsts]
        reps = [_done(p)[0] for p in procs]
    finally:
        for d, _ in dsts:
            d.kill()
        shutil.rmtree(socks, ignore_errors=True)
    assert all(r["record"] == "recorded" and r["requests"] > 0 for r in reps), reps
    yield case, img


@pytest.fixture
def recorded(recorded_once: tuple[Any, Path], tmp_path: Path) -> tuple[Any, Path]:
    """A copy of :func:`recorded_once`'s image, for a test to use (and damage)."""
    case, img = recorded_once
    mine = tmp_path / "rec.img"
    shutil.copyfile(img, mine)
    return case, mine


@pytest.mark.qemu
def test_concurrent_recording_valid_and_native_load(recorded: tuple[Any, Path], shm_dir: Path,
                                                    tmp_path: Path, sockdir: Path) -> None:
    case, img = recorded
    v = fixedram("verify", "--json", str(img))
    assert v.returncode == 0, v.stdout
    ws = json.loads(v.stdout)["working_set"]
    assert ws["status"] == "ok" and ws["restores"] == 2 and ws["pages"] > 0
    # QEMU loads the image natively, its RAM equal to the source's
    dst, ctl = _dest(case, tmp_path, sockdir, "native")
    with dst:
        r = fixedram("restore", "--qmp", str(ctl), "--via", "native", "--paused", str(img))
        assert r.returncode == 0, r.stderr
        _same_ram(dst, case, shm_dir, "native")


@pytest.mark.qemu
@pytest.mark.long
def test_record_never_delays_the_end(recorded: tuple[Any, Path], tmp_path: Path,
                                     sockdir: Path) -> None:
    """A record that cannot be written yet (another process holds a lock on the image):
    with the fd transport the destination completes first and the record follows once the
    lock is free; under exec the restore ends without it, with one warning line."""
    import fcntl

    case, img = recorded
    args = ("--no-prefetch", "--push-rate", "24M")  # the guest asks: there is a record
    holder = os.open(img, os.O_RDONLY)
    try:
        fcntl.flock(holder, fcntl.LOCK_SH)
        dst, ctl = _dest(case, tmp_path, sockdir, "held")
        with dst:
            p = _lazy(ctl, img, *args)
            try:
                deadline = time.monotonic() + 120
                while dst.query_migrate().get("status") != "completed":
                    assert p.poll() is None, p.communicate()[1]
                    assert time.monotonic() < deadline, "the restore waited for the record"
                    time.sleep(0.1)
                assert p.poll() is None  # still waiting for the lock, the guest running
            finally:
                fcntl.flock(holder, fcntl.LOCK_UN)
            rep, _ = _done(p)
            assert rep["record"] == "recorded" and rep["requests"] > 0, rep
            assert dst.status() == "running"
        fcntl.flock(holder, fcntl.LOCK_SH)
        dst, ctl = _dest(case, tmp_path, sockdir, "held-exec")
        with dst:
            p = _lazy(ctl, img, "--transport", "exec", *args)
            try:
                rep, err = _done(p)
            finally:
                if p.poll() is None:
                    p.kill()
                    p.wait()
            assert rep["record"] == "skipped" and rep["requests"] > 0, rep
            assert "working set not recorded: the image did not take it within" in err, err
            assert dst.status() == "running"
    finally:
        os.close(holder)
    assert wsm.load(open_image(img)).record is not None  # the record stays valid


class _Tap(threading.Thread):
    """Forwards one direction of a connection, keeping a copy of what passed."""

    def __init__(self, src: socket.socket, dst: socket.socket, keep: bool) -> None:
        super().__init__(daemon=True)
        self.src, self.dst, self.keep = src, dst, keep
        self.data = bytearray()

    def run(self) -> None:
        try:
            while chunk := self.src.recv(1 << 20):
                if self.keep:
                    self.data += chunk
                self.dst.sendall(chunk)
        except OSError:
            pass
        for s in (self.dst,):
            try:
                s.shutdown(socket.SHUT_WR)
            except OSError:
                pass


@pytest.mark.qemu
def test_prefetch_never_sends_a_page_twice(recorded: tuple[Any, Path], tmp_path: Path,
                                           sockdir: Path) -> None:
    """Every PAGE and ZERO record between fixedram and a running guest, counted."""
    from fixedram.endpoint.postcopy import send_postcopy
    from fixedram.io.channel import SocketChannel
    from fixedram.qmp.client import QMP
    from fixedram.stream import Page, StreamDecoder, Zero

    case, img = recorded
    dst, ctl = _dest(case, tmp_path, sockdir, "tap")
    with dst:
        dst.cmd("migrate-set-capabilities", capabilities=[
            {"capability": "postcopy-ram", "state": True}])
        dst.cont()  # runs as soon as RUN arrives
        listen = sockdir / "in.sock"
        dst.cmd("migrate-incoming", uri=f"unix:{listen}")
        qemu_side = socket.socket(socket.AF_UNIX)
        qemu_side.connect(str(listen))
        ours, mid = socket.socketpair()
        down = _Tap(mid, qemu_side, keep=True)
        up = _Tap(qemu_side, mid, keep=False)
        down.start()
        up.start()
        # the prefetch throttled too, so that the guest asks while it runs
        rep = send_postcopy(img, SocketChannel(ours), push_rate=24e6, prefetch_rate=24e6,
                            record=False)
        ours.close()
        down.join(10)
        dec = StreamDecoder()
        recs = dec.feed(bytes(down.data)) + dec.feed_eof()
        with QMP.connect(str(ctl)) as q:
            assert q.status() == "running"
    counts = Counter((r.block, r.offset // PS) for r in recs if isinstance(r, Page | Zero))
    twice = [k for k, n in counts.items() if n > 1]
    assert not twice, twice[:10]
    assert rep.working_set_pages > 0 and rep.pages_prefetched > 0, rep
    assert rep.requests > 0, rep  # the guest ran and asked while pages were prefetched
    with open_image(img) as im:
        present = sum(im.count_present(n) for n in im.blocks)
    assert sum(isinstance(r, Page) for r in recs) == present == rep.pages_sent


@pytest.mark.qemu
@pytest.mark.parametrize("damage", ["torn", "stale"])
def test_bad_record_ignored_ram_equal(recorded: tuple[Any, Path], shm_dir: Path,
                                      tmp_path: Path, sockdir: Path, damage: str) -> None:
    case, img = recorded
    got = load(img)
    assert got.record is not None
    with open_image(img) as im:
        copies = wsm.find(im.fileno(), Geometry.of_image(im)).copies
    with open(img, "r+b") as f:
        if damage == "torn":  # every copy
            for at in copies:
                f.seek(at + 80)
                f.write(b"\xee" * 8)
        else:  # other content (the VM description: a space becomes a tab, still valid)
            f.seek(0, os.SEEK_END)
            end = f.tell()
            f.seek(end - 4096)
            tail = f.read()
            at = tail.rindex(b" ")
            f.seek(end - 4096 + at)
            f.write(b"\t")
    dst, ctl = _dest(case, tmp_path, sockdir, "bad")
    with dst:
        rep, err = _done(_lazy(ctl, img, "--paused", "--transport", "exec"))
        assert "working-set record ignored" in err, err
        assert len([ln for ln in err.splitlines() if "working-set" in ln]) >= 1
        assert rep["working_set_pages"] == 0 and rep["pages_prefetched"] == 0
        _same_ram(dst, case, shm_dir, damage)


def _fanout(case: Any, img: Path, n: int, shm: Path, tmp_path: Path, sockdir: Path) -> None:
    dsts = [_dest(case, tmp_path, sockdir, f"f{i}") for i in range(n)]
    try:
        procs = [_lazy(ctl, img, "--paused") for _, ctl in dsts]
        reps = [_done(p)[0] for p in procs]
        for r in reps:
            assert r["working_set_pages"] > 0 and r["status"] == "paused", r
        for i, (d, _) in enumerate(dsts):
            _same_ram(d, case, shm, f"fan{i}")
    finally:
        for d, _ in dsts:
            d.kill()


@pytest.mark.qemu
def test_fanout_ram_equal(recorded: tuple[Any, Path], shm_dir: Path, tmp_path: Path,
                          sockdir: Path) -> None:
    """Lazy restores of one image at once (prefetching its record): all RAM-equal."""
    case, img = recorded
    _fanout(case, img, 3, shm_dir, tmp_path, sockdir)


@pytest.mark.qemu
@pytest.mark.fanout
def test_fanout_8_ram_equal(recorded: tuple[Any, Path], shm_dir: Path, tmp_path: Path,
                            sockdir: Path) -> None:
    case, img = recorded
    _fanout(case, img, 8, shm_dir, tmp_path, sockdir)


# ---------------------------------------------------------------------------------------------
# The Linux guest's touch workload: learn, then prefetch
# ---------------------------------------------------------------------------------------------

TOUCH_MIB = 8


def _touch_after_restore(src: Guest, img: Path, name: str, last_hb: int,
                         *extra: str) -> tuple[dict[str, Any], Touch]:
    """Lazy restore of ``img`` into a new destination; the touch command is sent as soon as
    the guest runs. The report and the guest's answer, once its heartbeat is back."""
    dst = Guest.like(src, name=name, incoming=True)
    with dst:
        assert dst.control_path is not None and dst.pid is not None
        p = _lazy(dst.control_path, img, *extra)
        try:
            deadline = time.monotonic() + 180
            while dst.status() != "running":
                assert p.poll() is None, p.communicate()[1]
                assert time.monotonic() < deadline, f"guest {name} never ran"
                time.sleep(0.05)
            send_touch(dst.pid, dst.name)
            rep, _ = _done(p)
        finally:
            if p.poll() is None:
                p.kill()
                p.wait()
        dst.wait_heartbeat(after=last_hb, timeout=120)
        deadline = 120
        while not (touches := parse_touches(dst.serial())) and deadline > 0:
            time.sleep(0.1)
            deadline -= 0.1
    assert touches, f"guest {name} never answered the touch command"
    return rep, touches[0]


@pytest.mark.qemu
def test_linux_touch_learned_then_prefetched(linux_guest: LinuxGuest, qemu10: Any,
                                             tmp_path: Path) -> None:
    """The first lazy restore of an image records while the guest reads its touch region
    (the push waits while it asks, so the region is not hidden by it); the second pushes
    the record first, and the guest asks for a small fraction of those pages. Both times
    the guest's own check of every page of the region passes."""
    touch_pages = TOUCH_MIB * 256
    src = Guest(qemu10, tmp_path, name="src", kernel=linux_guest.kernel,
                initrd=linux_guest.initrd, mem="256M", control=True, qmp_timeout=120,
                append=linux_append(data=4, mib=2, rate=1, hb=500, touch=TOUCH_MIB),
                extra_args=COMMAND_PORT_ARGS)
    img = tmp_path / "touch.img"
    with src:
        src.wait_heartbeat(gen_at_least=1, timeout=300)
        assert src.control_path is not None
        r = fixedram("save", "--qmp", str(src.control_path), "--via", "proxy", str(img))
        assert r.returncode == 0, r.stderr
        last_hb = src.heartbeats()[-1].n
        first, t1 = _touch_after_restore(src, img, "learn", last_hb)
        learned = load(img).record
        second, t2 = _touch_after_restore(src, img, "prefetch", last_hb, "--no-record")
    assert t1.bad == 0 and t2.bad == 0 and t1.pages == t2.pages == touch_pages, (t1, t2)
    # the first restore had no record: it recorded what the guest asked for
    assert first["working_set_pages"] == 0 and first["record"] == "recorded", first
    assert first["requests"] > 0 and learned is not None, first
    # (how many of the region's pages the guest asked for, rather than got from the push,
    # depends on how long the guest pauses while reading; the second restore shows what
    # was learned:) it prefetched that record whole (at least the region's size), and the
    # guest, reading every page of the region again, asked for few pages: the record
    # covered the region, and far fewer requests than the record's pages were needed
    ws = second["working_set_pages"]
    assert ws == len(learned) >= touch_pages, (second, len(learned))
    assert second["pages_prefetched"] > touch_pages, second
    assert second["pages_on_demand"] * 4 <= touch_pages, second
    assert second["requests"] * 5 <= ws, second
