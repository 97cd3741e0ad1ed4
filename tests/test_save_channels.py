"""``fixedram save --via proxy``: QEMU's multifd channels into fixedram (the default, and
``--channels N``), and one connection where QEMU cannot connect to fixedram."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fixedram.image import open_image
from fixedram.testing.guest import build_guest
from fixedram.testing.vm import Guest, choose_accel, find_qemu

pytestmark = pytest.mark.qemu


@pytest.mark.parametrize(("version", "machine", "channels"),
                         [("10", "q35", "0"), ("7.2", "pc-i440fx-7.2", "4")])
def test_proxy_save_loads_natively(version: str, machine: str, channels: str,
                                   tmp_path: Path) -> None:
    """A live proxy save over one connection (``--channels 0``) or over channels asked for
    loads in QEMU's own mapped-ram load, RAM equal, the guest running on."""
    qemu = find_qemu(version)
    ctl = tmp_path / "ctl.qmp"
    src = Guest(qemu, tmp_path, name="src", mem="128M", machine=machine,
                append="mib=32 rate=64", kernel=build_guest(), accel=choose_accel(qemu),
                extra_args=["-qmp", f"unix:{ctl},server=on,wait=off"])
    image = tmp_path / "vm.img"
    with src:
        src.wait_heartbeat(gen_at_least=1)
        r = subprocess.run([sys.executable, "-m", "fixedram", "save", "--qmp", str(ctl),
                            "--via", "proxy", "--channels", channels, "--live", "--json",
                            str(image)], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["channels"] == int(channels)
        assert src.status() == "postmigrate"
        src_mem = src.pmemsave(tmp_path / "src.mem")
        last = src.heartbeats()[-1]
        qom_type = src.cmd("qom-get", path="/machine", property="type")
    with open_image(image) as img:
        assert img.format == "mapped-ram"
        assert f"{img.machine}-machine" == qom_type
    dst = Guest.like(src, name="dst", incoming=True, qemu=find_qemu("10"))
    dst.extra_args = ()
    with dst:
        dst.migrate_incoming(f"file:{image}", caps={"mapped-ram": True})
        dst.wait_incoming()
        dst_mem = dst.pmemsave(tmp_path / "dst.mem")
        assert src_mem.read_bytes() == dst_mem.read_bytes()
        dst.cont()
        hb = dst.wait_heartbeat(after=last.n + 3)
        assert dst.heartbeats()[0].n == last.n + 1
        assert hb.err == 0 and not dst.bad_lines()


def test_proxy_save_qemu_as_another_user(tmp_path: Path) -> None:
    """A QEMU that runs as another user cannot connect to fixedram's private directory:
    asked for channels, a proxy save is refused in one line before the VM changes; by
    default it saves over one connection."""
    # the suite runs as root (scripts/setup.sh installs packages, tests drop caches)
    assert os.geteuid() == 0, "needs root, to start QEMU as another user"
    qemu = find_qemu("10")
    ctl = tmp_path / "ctl.qmp"
    src = Guest(qemu, tmp_path, name="nobody", mem="128M", append="mib=32 rate=64",
                kernel=build_guest(), accel=choose_accel(qemu),
                extra_args=["-qmp", f"unix:{ctl},server=on,wait=off", "-run-with",
                            "user=nobody"])
    image = tmp_path / "vm.img"

    def save(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "fixedram", "save", "--qmp", str(ctl),
                               "--via", "proxy", "--json", *args, str(image)],
                              capture_output=True, text=True, timeout=120)

    def caps() -> dict[str, bool]:
        return {c["capability"]: c["state"] for c in src.cmd("query-migrate-capabilities")}

    def private_dirs() -> set[Path]:
        return set(Path("/tmp").glob("fixedram-*"))  # where UnixListen makes them

    with src:
        src.wait_heartbeat(gen_at_least=1)
        before = caps()
        dirs = private_dirs()
        r = save("--channels", "2")
        assert r.returncode != 0
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert "cannot connect" in r.stderr and "--channels 0" in r.stderr, r.stderr
        assert src.status() == "running"
        assert caps() == before
        assert src.query_migrate().get("status") in (None, "none")
        assert not image.exists()
        assert private_dirs() <= dirs  # the probe's directory is gone
        r = save()
        assert r.returncode == 0, r.stderr
        rep = json.loads(r.stdout)
        assert rep["channels"] == 0 and "multifd" not in rep["caps_changed"]
        assert src.status() == "postmigrate"
        assert caps() == before
    with open_image(image) as img:
        assert img.format == "mapped-ram"
        assert sum(img.count_present(n) for n in img.blocks) > 32 * 256
