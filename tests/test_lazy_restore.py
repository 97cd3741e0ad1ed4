"""``fixedram restore --lazy``: postcopy restores into real QEMU 10 and 7.2.

fixedram is the postcopy source: the guest runs before any page is sent, pages follow on
demand and in the background. Images: QEMU's own mapped-ram files, and fixedram-written ones
(``fixedram convert`` re-lays a QEMU image out through the same writer ``fixedram receive``
uses). Each case runs the command line as a user would, against a destination started like
the source with ``-incoming defer -S`` plus a second QMP monitor for fixedram.

* ``--paused``: once QEMU reports ``completed`` the destination's RAM equals the source's
  ``pmemsave`` byte for byte; after ``cont`` the heartbeat carries on and the guest re-checks
  every page (err=0).
* running: the background push is throttled, so the guest runs while pages are still being
  pushed (heartbeats advance during ``postcopy-active``) and some pages are served on demand;
  then it completes and the guest's own page check stays clean.
* QEMU 7.2 loads the working-set record's first pages, sent before RUN as precopy pages
  (``docs/working-set.md``): RAM equal to the source's after a prefetching restore.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from qemu_images import ImageSpec

from fixedram.testing.vm import Guest, find_qemu

PY = str(Path(sys.executable).absolute())
PS = 4096
#: QEMU 10 saving a pc-i440fx-7.2 machine in mapped-ram, restorable into QEMU 7.2.
MAPPED_RAM_AS_72 = ImageSpec(mode="mapped-ram", machine="pc-i440fx-7.2")
#: Background push throttle for the running cases: ~33 MiB of pages take ~2.5 s.
PUSH_RATE = "12M"


@pytest.fixture
def sockdir() -> Iterator[Path]:
    """A short directory for unix sockets (sun_path is 108 bytes)."""
    d = Path(tempfile.mkdtemp(prefix="frl-", dir="/tmp"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def images(qemu_image: Callable[[Any], Any],
           tmp_path_factory: pytest.TempPathFactory) -> Callable[[str, str], tuple[Any, Path]]:
    """``images(version, "qemu"|"ours") -> (case, image path)``; ours = ``fixedram convert``."""
    root = tmp_path_factory.mktemp("lazy-images")
    made: dict[tuple[str, str], tuple[Any, Path]] = {}

    def get(version: str, kind: str) -> tuple[Any, Path]:
        if (version, kind) not in made:
            case = qemu_image("mapped-ram" if version == "10" else MAPPED_RAM_AS_72)
            path = case.path
            if kind == "ours":
                path = root / f"ours-{version}.img"
                r = subprocess.run([PY, "-m", "fixedram", "convert", "-q", str(case.path),
                                    str(path)], capture_output=True, text=True, check=False)
                assert r.returncode == 0, r.stderr
            made[version, kind] = (case, path)
        return made[version, kind]

    return get


def _destination(case: Any, version: str, workdir: Path, sockdir: Path,
                 name: str) -> tuple[Guest, Path]:
    dst = Guest.like(case.source, name=name, workdir=workdir, qemu=find_qemu(version))
    ctl = sockdir / f"{name}.qmp"
    dst.extra_args = ("-qmp", f"unix:{ctl},server=on,wait=off")
    dst.start()
    return dst, ctl


def _same_ram(dst: Guest, case: Any, shm_dir: Path, tag: str) -> None:
    got = dst.pmemsave(shm_dir / f"lazy-{tag}.mem")
    try:
        a = np.fromfile(got, dtype=np.uint8).reshape(-1, PS)
        b = np.fromfile(case.mem_dump_path, dtype=np.uint8).reshape(-1, PS)
        pages = np.flatnonzero((a != b).any(axis=1))
        if dst.accel == "kvm":  # KVM rewrites SeaBIOS data at 0xe8000
            pages = pages[pages != 0xE8000 // PS]
        assert pages.size == 0, f"{pages.size} pages differ, first at {pages[:8] * PS}"
    finally:
        got.unlink(missing_ok=True)


def _runs_on(dst: Guest, case: Any) -> None:
    """The heartbeat carries on from the source's, the guest re-checks every page (err=0)."""
    last = case.last_heartbeat
    hb = dst.wait_heartbeat(gen_at_least=last.gen + 2, timeout=60)
    beats = dst.heartbeats()
    assert beats[0].n == last.n + 1, (beats[0], last)
    assert hb.err == 0 and all(b.err == 0 for b in beats), beats[-3:]
    assert not dst.bad_lines()


CASES = [
    # (destination QEMU, image, transport, paused)
    pytest.param("10", "qemu", "fd", True, id="10-qemu-mapped-ram-paused-fd"),
    pytest.param("10", "ours", "unix", False, id="10-ours-running-unix"),
    pytest.param("10", "qemu", "exec", False, id="10-qemu-mapped-ram-running-exec"),
    pytest.param("7.2", "qemu", "exec", True, id="72-qemu-mapped-ram-paused-exec"),
    pytest.param("7.2", "ours", "fd", False, id="72-ours-running-fd"),
]


@pytest.mark.qemu
@pytest.mark.parametrize(("version", "kind", "transport", "paused"), CASES)
def test_lazy_restore(images: Callable[[str, str], tuple[Any, Path]], shm_dir: Path,
                      tmp_path: Path, sockdir: Path, version: str, kind: str, transport: str,
                      paused: bool) -> None:
    case, image = images(version, kind)
    dst, ctl = _destination(case, version, tmp_path, sockdir, "dst")
    with dst:
        # one running case draws its progress bar (to stderr, read below)
        bar = transport == "unix"
        args = [PY, "-m", "fixedram", "restore", "--lazy", "--qmp", str(ctl), str(image),
                "--transport", transport, "--json", "--progress" if bar else "--no-progress"]
        if paused:
            args.append("--paused")
        else:
            args += ["--push-rate", PUSH_RATE]
        p = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        # while pages are still being pushed, the guest runs (or, paused, stays paused)
        during: list[int] = []
        deadline = time.monotonic() + 60
        while p.poll() is None and time.monotonic() < deadline:
            if dst.query_migrate().get("status") == "postcopy-active":
                beats = dst.heartbeats()
                if beats:
                    during.append(beats[-1].n)
            time.sleep(0.05)
        out, err = p.communicate(timeout=60)
        assert p.returncode == 0, err
        rep = json.loads(out)
        assert dst.query_migrate().get("status") == "completed"
        assert rep["pages"] == rep["pages_on_demand"] + rep["pages_pushed"]
        assert rep["time_to_running"] < rep["total_time"]
        assert rep["caps_changed"] == {"postcopy-ram": True}
        if bar:  # tqdm's line shows the last sample: every page accounted for
            assert f"pages={rep['pages']}" in err, err
        caps = {c["capability"]: c["state"] for c in dst.cmd("query-migrate-capabilities")}
        assert not caps["postcopy-ram"]  # put back
        if paused:
            assert rep["status"] == "paused" and dst.status() == "paused"
            assert not dst.heartbeats()
            _same_ram(dst, case, shm_dir, f"{version}-{kind}-{transport}")
            dst.cont()
        else:
            assert rep["status"] == "running"
            assert rep["pages_on_demand"] > 0, rep
            assert rep["pages_pushed"] > 0, rep
            # heartbeats advanced while QEMU still waited for pushed pages
            assert len(during) >= 2 and during[-1] - during[0] >= 3, during
        _runs_on(dst, case)


@pytest.mark.qemu
def test_prefetch_before_run_qemu72(images: Callable[[str, str], tuple[Any, Path]],
                                    shm_dir: Path, tmp_path: Path, sockdir: Path) -> None:
    """QEMU 7.2 takes the working-set record's first pages as precopy pages before RUN
    (``docs/working-set.md``): a running restore records, the next one prefetches, RAM
    equal to the source's and the guest's own check clean."""
    case, image = images("7.2", "ours")
    img = tmp_path / "rec.img"
    shutil.copyfile(image, img)
    base = [PY, "-m", "fixedram", "restore", "--lazy", "--json", "--no-progress", str(img)]
    reps = []
    # the module's other cases may have recorded into the image already: learn anew
    for name, extra in (("rec", ["--no-prefetch"]), ("pre", ["--paused", "--no-record"])):
        dst, ctl = _destination(case, "7.2", tmp_path, sockdir, name)
        with dst:
            r = subprocess.run([*base, "--qmp", str(ctl), *extra], capture_output=True,
                               text=True, timeout=120, check=False)
            assert r.returncode == 0, r.stderr
            reps.append(json.loads(r.stdout))
            if name == "pre":
                _same_ram(dst, case, shm_dir, "72-prefetch")
                dst.cont()
            _runs_on(dst, case)
    rec, pre = reps
    assert rec["record"] == "recorded" and rec["requests"] > 0, rec
    assert pre["working_set_pages"] > 0 and pre["pages_prefetched"] > 0, pre
    assert pre["pages"] == pre["pages_on_demand"] + pre["pages_pushed"], pre


# ---------------------------------------------------------------------------------------------
# The stream itself, against a scripted destination (no QEMU)
# ---------------------------------------------------------------------------------------------

BLOCKS = {"pc.ram": 64 * PS, "pc.bios": 4 * PS}


def _page(i: int) -> bytes:
    return bytes([i % 251 + 1]) * PS


@pytest.fixture
def synth(tmp_path: Path) -> Path:
    """A mapped-ram image: pc.ram pages 0-9 and 20-39 present, pc.bios pages 1-2."""
    from synth_images import write_mapped_image

    path = tmp_path / "synth.img"
    pages = {"pc.ram": {i: _page(i) for i in [*range(10), *range(20, 40)]},
             "pc.bios": {1: _page(101), 2: _page(102)}}
    write_mapped_image(path, BLOCKS, pages)
    return path


class FakeDestination(threading.Thread):
    """Plays QEMU's side: PONGs every PING, asks for some pages right away, SHUT after EOF.

    The requests travel together with PONG(2), so they are queued before RUN goes out.
    """

    def __init__(self, sock: socket.socket, requests: bytes = b"", close_at_start: bool = False,
                 ) -> None:
        super().__init__(daemon=True)
        self.sock = sock
        self.requests = requests
        self.close_at_start = close_at_start
        self.data = bytearray()

    def run(self) -> None:
        from fixedram.stream.returnpath import encode_pong, encode_shut

        if self.close_at_start:
            self.sock.recv(16)
            self.sock.close()
            return
        pings = 0
        while chunk := self.sock.recv(1 << 16):
            before = len(self.data)
            self.data += chunk
            # PING = 08 0002 0004 be32(n): answer each new one
            while (i := self.data.find(b"\x08\x00\x02\x00\x04", max(0, before - 8))) >= 0 \
                    and pings < 3 and i + 9 <= len(self.data):
                n = int.from_bytes(self.data[i + 5 : i + 9], "big")
                if n != pings + 1:
                    break
                pings += 1
                before = i + 9
                self.sock.sendall((self.requests if n == 2 else b"") + encode_pong(n))
            if self.data.endswith(b"\x10\x7e\x00\x00\x00\x01\x00"):  # END's EOS, footer, EOF
                self.sock.sendall(encode_shut())
                break
        self.sock.close()


def _decode(data: bytes | bytearray) -> list[Any]:
    from fixedram.stream import StreamDecoder

    dec = StreamDecoder()
    return dec.feed(bytes(data)) + dec.feed_eof()


def test_stream_order_and_every_page_once(synth: Path) -> None:
    from synth_images import device_blob

    from fixedram.endpoint.postcopy import send_postcopy
    from fixedram.io.channel import SocketChannel
    from fixedram.stream import CommandRecord, Packaged, Page, SectionPart, Zero
    from fixedram.stream.format import Command
    from fixedram.stream.returnpath import encode_req_pages

    ours, theirs = socket.socketpair()
    # pages 5-6 (present, adjacent: one run), 50 (absent), pc.bios 2
    reqs = (encode_req_pages(5 * PS, PS, "pc.ram") + encode_req_pages(6 * PS, PS)
            + encode_req_pages(50 * PS, PS) + encode_req_pages(2 * PS, PS, "pc.bios"))
    fake = FakeDestination(theirs, reqs)
    fake.start()
    running: list[bool] = []
    rep = send_postcopy(synth, SocketChannel(ours), on_running=lambda: running.append(True))
    fake.join(10)
    ours.close()
    assert running == [True]
    recs = _decode(fake.data)
    cmds = [(r.cmd, r.data) for r in recs if isinstance(r, CommandRecord)]
    names = [Command(c).name for c, _ in cmds]
    assert names == ["OPEN_RETURN_PATH", "PING", "POSTCOPY_ADVISE", "POSTCOPY_RAM_DISCARD",
                     "POSTCOPY_RAM_DISCARD", "PING"]
    assert cmds[2][1] == (PS).to_bytes(8, "big") * 2
    # one discard per block, covering all of it
    whole = (0).to_bytes(8, "big") + (64 * PS).to_bytes(8, "big")
    assert cmds[3][1] == b"\x00\x06pc.ram\x00" + whole
    pkg_at = next(i for i, r in enumerate(recs) if isinstance(r, Packaged))
    first_page_at = next(i for i, r in enumerate(recs) if isinstance(r, Page | Zero))
    assert pkg_at < first_page_at  # the guest runs before any page is sent
    pkg = recs[pkg_at].data
    assert pkg == (b"\x08\x00\x04\x00\x00" + device_blob()
                   + b"\x08\x00\x02\x00\x04\x00\x00\x00\x03" + b"\x08\x00\x05\x00\x00")
    # the first PART answers the requests, merged, in block order
    first_part = []
    for r in recs[recs.index(next(r for r in recs[pkg_at:] if isinstance(r, SectionPart))) + 1:]:
        if not isinstance(r, Page | Zero):
            break
        first_part.append((type(r).__name__, r.block, r.offset // PS))
    assert first_part == [("Page", "pc.bios", 2), ("Page", "pc.ram", 5), ("Page", "pc.ram", 6),
                          ("Zero", "pc.ram", 50)]
    # every page with data exactly once, with its data; no other ZERO record
    pages = [(r.block, r.offset // PS, r.data) for r in recs if isinstance(r, Page)]
    want = [("pc.ram", i) for i in [*range(10), *range(20, 40)]] + [("pc.bios", 1),
                                                                     ("pc.bios", 2)]
    assert sorted((b, i) for b, i, _ in pages) == sorted(want)
    for b, i, d in pages:
        assert d == _page(i if b == "pc.ram" else 100 + i)
    assert [(r.block, r.offset // PS) for r in recs if isinstance(r, Zero)] == [("pc.ram", 50)]
    assert (rep.pages_on_demand, rep.pages_pushed, rep.zero_on_demand) == (3, 29, 1)
    assert rep.requests == 4
    assert rep.bytes_sent == len(fake.data)


def test_refused_before_run(synth: Path) -> None:
    """A destination that hangs up at once (postcopy-ram off): not started, plain error."""
    from fixedram.endpoint.postcopy import PostcopyFailed, send_postcopy
    from fixedram.errors import EndpointError
    from fixedram.io.channel import SocketChannel

    ours, theirs = socket.socketpair()
    fake = FakeDestination(theirs, close_at_start=True)
    fake.start()
    with pytest.raises(EndpointError, match="before the guest started") as e:
        send_postcopy(synth, SocketChannel(ours), accept_timeout=10)
    assert not isinstance(e.value, PostcopyFailed)
    ours.close()


def test_image_failure_after_run(synth: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The image cannot be read once the guest runs: the user is told it cannot continue."""
    from fixedram.endpoint import postcopy
    from fixedram.errors import ImageError
    from fixedram.io.channel import SocketChannel

    def broken(self: Any, name: str, *args: Any) -> None:
        raise ImageError("pages of RAM block 'pc.ram': file ends at byte 12345")

    monkeypatch.setattr(postcopy._Server, "_read", broken)  # pages asked for
    monkeypatch.setattr(postcopy._Server, "_read_set", broken)  # pages pushed
    ours, theirs = socket.socketpair()
    fake = FakeDestination(theirs)
    fake.start()
    with pytest.raises(postcopy.PostcopyFailed, match="guest cannot continue") as e:
        postcopy.send_postcopy(synth, SocketChannel(ours))
    assert "reading the image failed" in str(e.value)
    fake.join(10)  # the stream was ended: the destination noticed
    assert not fake.is_alive()
    ours.close()
