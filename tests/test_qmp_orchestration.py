"""The QMP orchestration of the native paths against real QEMU 10 (docs/qmp.md).

Batched commands keep their order and name a failing command; waits end on QEMU's events and
every migration setting fixedram touched (capability ``events`` included) is put back; a
native or proxy save's image leaves the page cache (in a child process the command does not
wait for) once it is durable, named and checked.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fixedram.errors import QMPCommandError
from fixedram.image import open_image
from fixedram.qmp.client import QMP
from fixedram.testing.vm import Guest, QemuBinary

pytestmark = pytest.mark.qemu


@pytest.fixture
def socks() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="fr-", dir="/tmp"))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def guest(qemu10: QemuBinary, tmp_path: Path, socks: Path, accel: str, name: str = "src",
          **kw: Any) -> Guest:
    return Guest(qemu10, tmp_path, name=name, append="mib=32 rate=0 gens=1 hb=100",
                 mem="128M", accel=accel,
                 extra_args=["-qmp", f"unix:{socks / name}-ctl.qmp,server=on,wait=off"], **kw)


def settings(g: Guest) -> tuple[dict[str, bool], dict[str, Any]]:
    caps = {c["capability"]: c["state"] for c in g.cmd("query-migrate-capabilities")}
    return caps, dict(g.cmd("query-migrate-parameters"))


def fixedram(*args: str) -> dict[str, Any]:
    r = subprocess.run([sys.executable, "-m", "fixedram", *args, "--json"],
                       capture_output=True, text=True, timeout=120, check=False)
    assert r.returncode == 0, r.stderr
    return dict(json.loads(r.stdout))


def resident(path: Path) -> int:
    """Bytes of ``path`` in the page cache (util-linux fincore)."""
    out = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES", str(path)],
                         capture_output=True, text=True, check=True).stdout
    return int(out.split()[0])


def leaves_the_cache(path: Path) -> None:
    """Wait (up to 60 s) until at most 5 % of ``path``'s allocated bytes are cached."""
    allocated = path.stat().st_blocks * 512
    assert allocated > 16 << 20
    deadline = time.monotonic() + 60
    while resident(path) >= allocated // 20 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert resident(path) < allocated // 20, (resident(path), allocated)


def test_batch_order_errors_and_events(qemu10: QemuBinary, accel: str, tmp_path: Path,
                                       socks: Path) -> None:
    with guest(qemu10, tmp_path, socks, accel, paused=True) as g, \
            QMP.connect(socks / "src-ctl.qmp") as q:
        assert q.version == tuple(int(x) for x in qemu10.version_str.split("."))
        st, mtype, blocks = q.batch(("query-status", None),
                                    ("qom-get", {"path": "/machine", "property": "type"}),
                                    ("human-monitor-command", {"command-line": "info ramblock"}))
        assert st["status"] == "prelaunch" and mtype.endswith("-machine") and "pc.ram" in blocks
        with pytest.raises(QMPCommandError, match="QMP no-such-command"):
            q.batch(("query-status", None), ("no-such-command", None))
        with q.events("RESUME", "STOP") as ev:
            assert ev.get(0.05) is None
            q.cmd("cont")
            e = ev.get(30)
            assert e is not None and e["event"] == "RESUME"
            g.stop()
            e = ev.get(30)
            assert e is not None and e["event"] == "STOP"


def test_native_save_restore_put_settings_back_and_leave_the_cache(
        qemu10: QemuBinary, accel: str, tmp_path: Path, socks: Path) -> None:
    fs = subprocess.run(["stat", "-f", "-c", "%T", "/var/tmp"], capture_output=True,
                        text=True, check=True).stdout.strip()
    assert fs != "tmpfs", "this test needs /var/tmp on a disk filesystem"
    d = Path(tempfile.mkdtemp(prefix="fixedram-test-", dir="/var/tmp"))
    try:
        img = d / "vm.img"
        with guest(qemu10, tmp_path, socks, accel) as src:
            src.wait_heartbeat(gen_at_least=1, timeout=60)
            before = settings(src)
            rep = fixedram("save", "--qmp", str(socks / "src-ctl.qmp"), "--via", "native",
                           "--channels", "0", str(img))
            assert rep["caps_changed"] == {"mapped-ram": True}
            assert settings(src) == before  # events and max-bandwidth included
            assert rep["setup_time"] > 0 and rep["check_time"] > 0
            with open_image(img) as im:
                assert im.format == "mapped-ram"
                assert sum(int(im.present(n).sum()) for n in im.blocks) == rep["pages_in_image"]
            leaves_the_cache(img)  # once saved (a child process drops it)
            dst = Guest.like(src, name="dst", incoming=True)
            dst.extra_args = ("-qmp", f"unix:{socks / 'dst'}-ctl.qmp,server=on,wait=off")
            with dst:
                before = settings(dst)
                rep = fixedram("restore", "--qmp", str(socks / "dst-ctl.qmp"), "--via",
                               "native", "--paused", str(img))
                assert rep["status"] == "paused" and rep["caps_changed"]["mapped-ram"] is True
                assert settings(dst) == before
                dst.cont()
                dst.wait_heartbeat(after=src.heartbeats()[-1].n, timeout=60)
            # a proxy save's image leaves the page cache too, after the check read it
            src.cont()
            proxy = d / "proxy.img"
            rep = fixedram("save", "--qmp", str(socks / "src-ctl.qmp"), "--via", "proxy",
                           str(proxy))
            assert rep["via"] == "proxy" and rep["pages_in_image"] > 0
            leaves_the_cache(proxy)
    finally:
        shutil.rmtree(d, ignore_errors=True)


def test_page_count_reads_bitmaps_a_piece_at_a_time(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """The count of a saved image's pages comes from the on-disk bitmaps in bounded pieces
    (here 128 pages), and a bit beyond a block's last page is refused."""
    import numpy as np
    from synth_images import write_mapped_image

    from fixedram.errors import ImageError
    from fixedram.image import open_image
    from fixedram.image import reader as reader_mod

    monkeypatch.setattr(reader_mod, "BITMAP_PIECE_PAGES", 128)
    rng = np.random.default_rng(7)
    a = np.flatnonzero(rng.random(1000) < 0.3)  # 1000 pages: 8 pieces
    b = np.flatnonzero(rng.random(70) < 0.5)
    page = b"\x5a" * 4096
    f = tmp_path / "img"
    heads = write_mapped_image(f, {"a": 1000 * 4096, "b": 70 * 4096},
                               {"a": dict.fromkeys(a.tolist(), page),
                                "b": dict.fromkeys(b.tolist(), page)})
    with open_image(f) as img:
        assert img.count_present("a") == len(a)
        assert img.count_present("b") == len(b)
        assert img.count_present("a") == sum(n for _, n in img.runs("a"))
    with f.open("r+b") as fh:  # page 79 of a 70-page block: bit 7 of its bitmap's byte 9
        fh.seek(heads["b"].bitmap_offset + 9)
        fh.write(b"\x80")
    with open_image(f) as img, pytest.raises(ImageError, match="beyond the block's 70 pages"):
        img.count_present("b")


def test_native_save_memory_does_not_follow_the_ram(qemu10: QemuBinary, accel: str,
                                                    tmp_path: Path, socks: Path) -> None:
    """32 MiB of data in a 2 GiB and in a 64 GiB guest (RAM backed only where touched):
    fixedram's peak RSS for the native save is the same within a few MiB (a bool per page,
    as before, would add 16 MiB per copy at 64 GiB)."""
    import os

    rss = {}
    for mem in ("2G", "64G"):
        name = f"g{mem}"
        g = Guest(qemu10, tmp_path, name=name, append="mib=32 rate=0 gens=1 hb=100", mem=mem,
                  accel=accel, extra_args=[
                      "-object", f"memory-backend-ram,id=m0,size={mem},reserve=off",
                      "-machine", "memory-backend=m0",
                      "-qmp", f"unix:{socks / name}-ctl.qmp,server=on,wait=off"])
        with g:
            g.wait_heartbeat(gen_at_least=1, timeout=60)
            img = tmp_path / f"{mem}.img"
            p = subprocess.Popen([sys.executable, "-m", "fixedram", "save", "--qmp",
                                  str(socks / f"{name}-ctl.qmp"), "--via", "native", "--json",
                                  str(img)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            _, status, ru = os.wait4(p.pid, 0)
            assert p.stdout is not None and p.stderr is not None
            assert os.waitstatus_to_exitcode(status) == 0, p.stderr.read().decode()
            rep = json.loads(p.stdout.read())
            assert rep["pages_in_image"] >= 32 * 256 and rep["ram_size"] >= int(mem[:-1]) << 30
            rss[mem] = ru.ru_maxrss / 1024
            img.unlink()
    assert rss["64G"] - rss["2G"] < 12, rss
