"""A destination whose guest RAM already holds data (``docs/fresh-destination.md``).

A proxy restore leaves the pages the image holds no data for as the destination has them,
which is right for every QEMU whose RAM starts as zeros. A ``memory-backend-file`` over a file
that already holds data does not: ``fixedram restore`` must then send every page (single
stream or multifd), choose the proxy under ``--via auto``, and refuse ``--via native`` (QEMU's
own load would keep the file's stale pages) before anything is loaded.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from test_save_restore import ctl_args, fixedram, run_ok, same_ram, socks  # noqa: F401

from fixedram.testing.vm import Guest, find_qemu

pytestmark = pytest.mark.qemu

MEM = 128 << 20
STALE = b"\xa5" * (1 << 20)


def _guest(qemu_version: str, workdir: Path, sockdir: Path, accel: str, name: str,
           **kw: object) -> Guest:
    backend = (f"memory-backend-file,id=ram0,size={MEM},share=on,"
               f"mem-path={workdir}/{{guest}}.ram")
    return Guest(find_qemu(qemu_version), workdir, name=name, append="mib=16 rate=16 hb=100",
                 mem="128M", accel=accel,
                 extra_args=["-object", backend, "-machine", "memory-backend=ram0",
                             *ctl_args(sockdir, f"{name}-ctl")], **kw)  # type: ignore[arg-type]


def _stale_file(path: Path) -> None:
    with path.open("wb") as f:
        for _ in range(MEM // len(STALE)):
            f.write(STALE)


@pytest.mark.parametrize("channels", [0, 2])
def test_restore_into_ram_with_data(accel: str, tmp_path: Path, shm_dir: Path,
                                    socks: Path,  # noqa: F811  (fixture)
                                    channels: int) -> None:
    image = tmp_path / "vm.img"
    with _guest("10", tmp_path, socks, accel, "src") as src:
        src.wait_heartbeat(gen_at_least=1)
        run_ok("save", "--qmp", str(socks / "src-ctl.qmp"), str(image), "--via", "proxy")
        src_mem = src.pmemsave(shm_dir / "src.mem", size=MEM)
    # the destination's RAM file is full of old data before QEMU starts
    _stale_file(tmp_path / "dst.ram")
    with _guest("10", tmp_path, socks, accel, "dst", incoming=True) as dst:
        ctl = str(socks / "dst-ctl.qmp")
        r = fixedram("restore", "--qmp", ctl, str(image), "--via", "native")
        assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
        assert "already holds data" in r.stderr and "dst.ram" in r.stderr
        assert dst.status() == "inmigrate"  # refused before anything was loaded
        via = ["--via", "proxy", "--channels", str(channels)] if channels else ["--channels",
                                                                                  "0"]
        rep = run_ok("restore", "--qmp", ctl, str(image), "--paused", *via)
        assert rep["via"] == "proxy"  # auto picks the proxy for such a destination
        dst_mem = dst.pmemsave(shm_dir / "dst.mem", size=MEM)
        assert same_ram(src_mem, dst_mem, accel) == []
