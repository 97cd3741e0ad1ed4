"""``fixedram save --via proxy --channels N``: QEMU's multifd channels into fixedram."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from fixedram.image import open_image
from fixedram.testing.guest import build_guest
from fixedram.testing.vm import Guest, choose_accel, find_qemu

pytestmark = pytest.mark.qemu


@pytest.mark.parametrize(("version", "machine"), [("10", "q35"), ("7.2", "pc-i440fx-7.2")])
def test_proxy_multifd_save_loads_natively(version: str, machine: str, tmp_path: Path) -> None:
    qemu = find_qemu(version)
    ctl = tmp_path / "ctl.qmp"
    src = Guest(qemu, tmp_path, name="src", mem="128M", machine=machine,
                append="mib=32 rate=64", kernel=build_guest(), accel=choose_accel(qemu),
                extra_args=["-qmp", f"unix:{ctl},server=on,wait=off"])
    image = tmp_path / "vm.img"
    with src:
        src.wait_heartbeat(gen_at_least=1)
        r = subprocess.run([sys.executable, "-m", "fixedram", "save", "--qmp", str(ctl),
                            "--via", "proxy", "--channels", "2", "--live", "--json", str(image)],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
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
