"""``fixedram save`` / ``fixedram restore`` end to end against real QEMU 10 and 7.2.

Each source guest gets a second QMP monitor (``-qmp unix:...-ctl.qmp``) for fixedram, so the
harness keeps its own QMP connection for pmemsave, status and heartbeats. The command line is
run as a subprocess (``python -m fixedram ...``), exactly as a user would.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fixedram.testing.guest import check_pages, read_status
from fixedram.testing.vm import Guest, QemuBinary, find_qemu

pytestmark = pytest.mark.qemu

MEM = "128M"
APPEND = "mib=32 rate=32 hb=100"  # 32 MiB re-dirtied at 32 MiB/s: a full pass per second


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def socks() -> Iterator[Path]:
    """A short directory for unix sockets (sun_path is limited to 108 bytes)."""
    d = Path(tempfile.mkdtemp(prefix="fr-", dir="/tmp"))
    try:
        yield d
    finally:
        for p in d.iterdir():
            p.unlink()
        d.rmdir()


def ctl_args(socks: Path, name: str) -> list[str]:
    """Extra QEMU arguments: a second QMP monitor for fixedram."""
    return ["-qmp", f"unix:{socks / name}.qmp,server=on,wait=off"]


def source(qemu: QemuBinary, workdir: Path, socks: Path, accel: str, *, machine: str = "q35",
           mem: str = MEM, append: str = APPEND, name: str = "src") -> Guest:
    return Guest(qemu, workdir, name=name, append=append, mem=mem, machine=machine,
                 accel=accel, extra_args=ctl_args(socks, f"{name}-ctl"))


def destination(src: Guest, socks: Path, name: str, *, mem: str | None = None,
                workdir: Path | None = None) -> Guest:
    dst = Guest.like(src, name=name, incoming=True, workdir=workdir)
    dst.extra_args = tuple(ctl_args(socks, f"{name}-ctl"))
    if mem is not None:
        dst.mem = mem
    return dst


def fixedram(*args: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fixedram", *args], capture_output=True,
                          text=True, timeout=timeout, check=False)


def run_ok(*args: str) -> dict[str, Any]:
    r = fixedram(*args, "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def one_line_error(r: subprocess.CompletedProcess[str]) -> str:
    assert r.returncode != 0
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("fixedram: error: "), r.stderr
    assert "Traceback" not in r.stderr
    return lines[0]


def no_partial(d: Path) -> list[str]:
    return [p.name for p in d.iterdir() if "fixedram-partial" in p.name]


def same_ram(a: Path, b: Path, accel: str) -> list[int]:
    """Differing page addresses (from 1 MiB under KVM: BIOS shadow noise below)."""
    x = np.fromfile(a, np.uint8)
    y = np.fromfile(b, np.uint8)
    assert x.size == y.size
    start = 0 if accel == "tcg" else 1 << 20
    n = (x.size - start) // 4096
    d = (x[start:start + n * 4096].reshape(n, 4096) != y[start:start + n * 4096]
         .reshape(n, 4096)).any(axis=1)
    return [start + int(i) * 4096 for i in np.flatnonzero(d)]


def check_continues(dst: Guest, last_src_hb: int, gen: int) -> None:
    """Heartbeat resumes with the next number; every page re-checked (gen+2) with err=0."""
    end = dst.wait_heartbeat(gen_at_least=gen + 2, timeout=60.0)
    beats = dst.heartbeats()
    assert beats[0].n == last_src_hb + 1, (beats[0], last_src_hb)
    assert end.err == 0 and all(b.err == 0 for b in beats), beats[-3:]
    assert not dst.bad_lines()


def restore_and_check(src: Guest, socks: Path, image: Path, via: str, src_mem: Path,
                      last_hb: int, accel: str, name: str, *, paused: bool,
                      dumps: Path) -> dict[str, Any]:
    """``via``: native, proxy (its default channels) or proxy-one (one stream)."""
    dst = destination(src, socks, name)
    one = via == "proxy-one"
    via = "proxy" if one else via
    with dst:
        args = ["restore", "--qmp", str(socks / f"{name}-ctl.qmp"), str(image), "--via", via]
        rep = run_ok(*args, *(["--paused"] if paused else []), *(["--channels", "0"] if one
                                                                   else []))
        assert rep["via"] == via
        assert rep["pages"] > 0 and rep["bytes"] == rep["pages"] * 4096
        if paused:
            assert dst.status() == "paused"
            dst_mem = dst.pmemsave(dumps / f"{name}.mem")
            assert same_ram(src_mem, dst_mem, accel) == []
            raw = dst_mem.read_bytes()
            st = read_status(raw)
            assert check_pages(raw, status=st)["bad_pages"] == 0
            dst.cont()
        else:
            assert rep["status"] == "running"
            assert dst.status() == "running"
            st = read_status(src_mem.read_bytes()[: 0x400000])
        # a proxy restore of a mapped-ram image takes two multifd channels by default
        assert rep["caps_changed"] == ({"mapped-ram": True} if via == "native"
                                       else {} if one else {"multifd": True})
        assert rep["channels"] == (2 if via == "proxy" and not one else 0)
        # capabilities are put back after the load
        caps = {c["capability"]: c["state"] for c in dst.cmd("query-migrate-capabilities")}
        assert not caps.get("mapped-ram", False) and not caps.get("multifd", False)
        check_continues(dst, last_hb, st["gen"])
    return rep


# ---------------------------------------------------------------------------------------------
# round trips
# ---------------------------------------------------------------------------------------------

ROUNDTRIPS = [
    # (qemu, save via, live, [(restore via, paused)])
    pytest.param("10", "proxy", True, [("native", True), ("proxy", False), ("proxy-one", True)],
                 id="10-proxy-live"),
    pytest.param("10", "native", False, [("proxy", True), ("native", False)], id="10-native"),
    pytest.param("7.2", "proxy", True, [("proxy", True)], id="7.2-proxy-live"),
]


@pytest.mark.parametrize(("version", "via", "live", "restores"), ROUNDTRIPS)
def test_save_restore_roundtrip(version: str, via: str, live: bool,
                                restores: list[tuple[str, bool]], accel: str, tmp_path: Path,
                                shm_dir: Path, socks: Path) -> None:
    qemu = find_qemu(version)
    machine = "pc-i440fx-7.2" if version == "7.2" else "q35"
    image = tmp_path / "vm.img"
    dumps = shm_dir / f"rt-{version}-{via}"
    dumps.mkdir()
    src = source(qemu, tmp_path, socks, accel, machine=machine)
    with src:
        src.wait_heartbeat(gen_at_least=1)
        args = ["save", "--qmp", str(socks / "src-ctl.qmp"), str(image), "--via", via]
        if live:
            args += ["--live", "--live-timeout", "20"]
        rep = run_ok(*args)
        assert rep["via"] == via and rep["live"] == live
        # both ways take two multifd channels by default: QEMU's writer threads (native),
        # connections into fixedram (proxy)
        assert rep["channels"] == 2
        assert rep["caps_changed"].get("multifd") is True
        # a proxy save from QEMU >= 9.0 has QEMU find zero pages in its migration thread
        assert (rep["params_changed"].get("zero-page-detection") == "legacy") == (
            via == "proxy" and version == "10")
        assert rep["qemu_version"] == qemu.version_str
        assert rep["pages_in_image"] > 32 * 256  # the stamped workload at least
        assert rep["ram_size"] >= 128 << 20
        assert rep["ram_size"] <= rep["image_apparent_size"] <= rep["ram_size"] + (8 << 20)
        assert rep["image_allocated_size"] < rep["ram_size"] // 2  # sparse
        assert src.status() == "postmigrate"
        # what fixedram changed was put back
        params = src.cmd("query-migrate-parameters")
        assert params["max-bandwidth"] == 128 << 20
        assert params.get("zero-page-detection", "multifd") == "multifd"
        caps = {c["capability"]: c["state"] for c in src.cmd("query-migrate-capabilities")}
        assert not caps["return-path"] and not caps.get("mapped-ram", False)
        assert not caps.get("multifd", False)
        assert not [c["label"] for c in src.cmd("query-chardev")
                    if c["label"].startswith("fixedram-probe")]
        assert not no_partial(tmp_path)
        src_mem = src.pmemsave(dumps / "src.mem")
        last_hb = src.heartbeats()[-1].n
    for i, (rvia, paused) in enumerate(restores):
        restore_and_check(src, socks, image, rvia, src_mem, last_hb, accel, f"dst{i}",
                          paused=paused, dumps=dumps)


def test_save_resume_replaces_image(accel: str, tmp_path: Path, socks: Path) -> None:
    """--resume runs the VM again; a second save replaces the first image atomically."""
    qemu = find_qemu("10")
    image = tmp_path / "vm.img"
    image.write_bytes(b"old image")
    with source(qemu, tmp_path, socks, accel) as src:
        src.wait_heartbeat(gen_at_least=1)
        ctl = str(socks / "src-ctl.qmp")
        rep = run_ok("save", "--qmp", ctl, str(image), "--via", "proxy", "--resume")
        assert rep["resumed"] and src.status() == "running"
        n = src.heartbeats()[-1].n
        src.wait_heartbeat(after=n)  # the guest runs on
        r = fixedram("save", "--qmp", ctl, str(image), "--via", "native", "--resume")
        assert r.returncode == 0, r.stderr
        assert "via native over 2 multifd channels" in r.stdout and "VM resumed" in r.stdout
        assert src.status() == "running"
    assert image.stat().st_size > 128 << 20
    assert not no_partial(tmp_path)


# ---------------------------------------------------------------------------------------------
# failures
# ---------------------------------------------------------------------------------------------


def test_save_wrong_qmp_socket(tmp_path: Path) -> None:
    image = tmp_path / "vm.img"
    e = one_line_error(fixedram("save", "--qmp", str(tmp_path / "nope.qmp"), str(image)))
    assert "nope.qmp" in e and "does not exist" in e
    plain = tmp_path / "plain"
    plain.write_text("x")
    e = one_line_error(fixedram("save", "--qmp", str(plain), str(image)))
    assert "not a QMP" in e
    e = one_line_error(fixedram("restore", "--qmp", str(tmp_path / "nope.qmp"), str(plain)))
    assert not image.exists()


@contextlib.contextmanager
def _tmpfs(where: Path, opts: str) -> Iterator[Path]:
    where.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(where)],
                       capture_output=True, text=True, check=False)
    if r.returncode != 0:
        pytest.fail(f"cannot mount a tmpfs (tests run as root): {r.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


@pytest.mark.parametrize("via", ["proxy", "native"])
def test_save_unwritable_directory(via: str, accel: str, tmp_path: Path, socks: Path) -> None:
    """IMAGE's directory cannot take a file (even for root): the VM runs on, nothing left."""
    qemu = find_qemu("10")
    afile = tmp_path / "afile"
    afile.write_text("x")
    with source(qemu, tmp_path, socks, accel) as src:
        src.wait_heartbeat(gen_at_least=1)
        ctl = str(socks / "src-ctl.qmp")
        e = one_line_error(fixedram("save", "--qmp", ctl, str(afile / "vm.img"), "--via", via))
        assert "is not a directory" in e
        assert src.status() == "running"
        with _tmpfs(tmp_path / "ro", "ro,size=1M") as ro:
            e = one_line_error(fixedram("save", "--qmp", ctl, str(ro / "vm.img"), "--via", via))
            assert "Read-only" in e or "read-only" in e, e
            assert src.status() == "running"
            assert list(ro.iterdir()) == []
        # the VM can still be saved afterwards
        rep = run_ok("save", "--qmp", ctl, str(tmp_path / "ok.img"), "--via", via)
        assert rep["pages_in_image"] > 0


@pytest.mark.parametrize("via", ["proxy", "proxy-one", "native"])
def test_save_disk_full(via: str, accel: str, tmp_path: Path, socks: Path) -> None:
    """ENOSPC mid-save: one-line error, previous image kept, no temp file, VM running again
    (``proxy-one``: the proxy on one connection, ``--channels 0``)."""
    qemu = find_qemu("10")
    with _tmpfs(tmp_path / "small", "size=16M") as small:
        image = small / "vm.img"
        image.write_bytes(b"previous image")
        with source(qemu, tmp_path, socks, accel) as src:
            src.wait_heartbeat(gen_at_least=1)
            args = ["save", "--qmp", str(socks / "src-ctl.qmp"), str(image), "--via",
                    "proxy" if via == "proxy-one" else via]
            if via == "proxy-one":
                args += ["--channels", "0"]
            e = one_line_error(fixedram(*args, "--live"))
            assert "space" in e.lower(), e
            assert src.status() == "running"
            e = one_line_error(fixedram(*args))  # paused save: resumed after the failure
            assert src.status() == "running"
            n = src.heartbeats()[-1].n
            src.wait_heartbeat(after=n)
        assert image.read_bytes() == b"previous image"
        assert not no_partial(small)


@pytest.mark.parametrize("via", ["proxy", "native"])
def test_save_source_killed(via: str, accel: str, tmp_path: Path, shm_dir: Path,
                            socks: Path) -> None:
    """QEMU dies mid-save: one-line error, the previous IMAGE intact, no temporary file."""
    qemu = find_qemu("10")
    image = tmp_path / "vm.img"
    image.write_bytes(b"previous image")
    src = source(qemu, tmp_path, socks, accel, mem="512M", append="mib=256 rate=0 hb=100")
    with src:
        src.wait_heartbeat(gen_at_least=1, timeout=120)
        p = subprocess.Popen(
            [sys.executable, "-m", "fixedram", "save", "--qmp", str(socks / "src-ctl.qmp"),
             str(image), "--via", via, "--bandwidth", "16M"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 30
        while (src.query_migrate().get("ram", {}).get("transferred", 0) < 8 << 20
               and time.monotonic() < deadline):
            assert p.poll() is None, p.communicate()
            time.sleep(0.05)
        assert src.pid is not None
        os.kill(src.pid, signal.SIGKILL)
        _, err = p.communicate(timeout=60)
    assert p.returncode != 0
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("fixedram: error: "), err
    assert image.read_bytes() == b"previous image"
    assert not no_partial(tmp_path)


def test_restore_mismatch_refused(qemu_image: Any, accel: str, tmp_path: Path,
                                  socks: Path) -> None:
    """A destination with another -m is refused before QEMU gets a byte; it stays usable."""
    case = qemu_image("mapped-ram")
    dst = destination(case.source, socks, "dst", mem="256M", workdir=tmp_path)
    with dst:
        for via in ("proxy", "native", "auto"):
            e = one_line_error(fixedram("restore", "--qmp", str(socks / "dst-ctl.qmp"),
                                        str(case.path), "--via", via))
            assert "pc.ram" in e and "differs in size" in e, e
            assert dst.status() == "inmigrate"
            assert dst.query_migrate().get("status") in (None, "none")
        caps = {c["capability"]: c["state"] for c in dst.cmd("query-migrate-capabilities")}
        assert not caps["mapped-ram"]
        # still usable: it takes an incoming migration from a matching 256M source
        src = source(case.qemu, tmp_path, socks, accel, mem="256M", name="src256",
                     append=case.append)
        with src:
            src.wait_heartbeat(gen_at_least=1)
            image = tmp_path / "vm256.img"
            run_ok("save", "--qmp", str(socks / "src256-ctl.qmp"), str(image))
            last = src.heartbeats()[-1].n
            gen = src.heartbeats()[-1].gen
        rep = run_ok("restore", "--qmp", str(socks / "dst-ctl.qmp"), str(image))
        assert rep["status"] == "running"
        check_continues(dst, last, gen)


def test_restore_not_incoming(accel: str, tmp_path: Path, socks: Path) -> None:
    qemu = find_qemu("10")
    img = tmp_path / "x.img"
    img.write_bytes(b"x")
    with source(qemu, tmp_path, socks, accel):
        e = one_line_error(fixedram("restore", "--qmp", str(socks / "src-ctl.qmp"), str(img)))
        assert "-incoming defer" in e


def test_auto_takes_the_proxy_for_a_watched_save() -> None:
    """``--via auto`` is native where QEMU has mapped-ram, unless the pages are watched
    as they are written (an upload to an object store), which only the proxy shows."""
    from fixedram.qmp.save import choose_save_via

    assert choose_save_via((10, 0, 2), "auto") == "native"
    assert choose_save_via((10, 0, 2), "auto", watched=True) == "proxy"
    assert choose_save_via((7, 2, 0), "auto") == "proxy"
    assert choose_save_via((10, 0, 2), "native", watched=True) == "native"


def test_save_channels_default() -> None:
    """A save takes two multifd channels unless told: QEMU's writers (native), connections
    into fixedram (proxy); one connection for a proxy save whose page writes are watched."""
    from fixedram.qmp.save import choose_save_channels

    assert choose_save_channels("native", None, watched=False) == 2
    assert choose_save_channels("proxy", None, watched=False) == 2
    assert choose_save_channels("proxy", None, watched=True) == 0
    assert choose_save_channels("proxy", 0, watched=False) == 0
    assert choose_save_channels("proxy", 4, watched=True) == 4
    assert choose_save_channels("native", 0, watched=False) == 0
