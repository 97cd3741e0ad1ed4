"""``fixedram convert``: legacy stream <-> mapped-ram, checked by loading the results in QEMU 10."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from test_receive import assert_same_ram

from fixedram.commands.convert import convert
from fixedram.image import open_image
from fixedram.testing.vm import qemu_restore

PY = sys.executable


def load_and_check(case: Any, img: Path, mode: str, transport: str, workdir: Path,
                   shm: Path) -> None:
    """QEMU 10 loads ``img``; RAM equals the source's dump; the guest carries on."""
    with qemu_restore(case.source, img, mode, transport=transport, workdir=workdir,  # type: ignore[arg-type]
                      qemu=case.qemu) as dst:
        dump = dst.pmemsave(shm / f"{workdir.name}-dst.mem")
        try:
            assert_same_ram(case.mem_dump_path, dump)
        finally:
            dump.unlink()
        dst.cont()
        last = case.last_heartbeat.n if case.last_heartbeat else 0
        hb = dst.wait_heartbeat(n_at_least=last + 2, timeout=30)
        assert hb.err == 0, dst.serial_tail()


@pytest.mark.qemu
def test_legacy_to_mapped_ram_loads(qemu_image: Any, tmp_path: Path, shm_dir: Path) -> None:
    case = qemu_image("legacy-exec")
    out = tmp_path / "vm.mr"
    r = subprocess.run([PY, "-m", "fixedram", "convert", str(case.path), str(out)],
                       capture_output=True, timeout=120)
    assert r.returncode == 0, r.stderr.decode()
    assert r.stdout == b""
    with open_image(out) as im:
        assert im.format == "mapped-ram"
        assert im.file_size <= case.mem_bytes + (8 << 20)
    load_and_check(case, out, "mapped-ram", "file", tmp_path, shm_dir)


@pytest.mark.qemu
def test_mapped_ram_to_stream_loads(qemu_image: Any, tmp_path: Path, shm_dir: Path) -> None:
    """A mapped-ram file QEMU wrote itself, as a stream QEMU 10 loads through exec:cat."""
    case = qemu_image("mapped-ram")
    out = tmp_path / "vm.stream"
    r = subprocess.run([PY, "-m", "fixedram", "convert", str(case.path), str(out), "--to",
                        "stream"], capture_output=True, timeout=120)
    assert r.returncode == 0, r.stderr.decode()
    with open_image(out) as im:
        assert im.format == "stream"
        assert im.commands == ["SWITCHOVER_START"]
    load_and_check(case, out, "legacy", "exec", tmp_path, shm_dir)


@pytest.mark.qemu
def test_round_trip_keeps_every_page(qemu_image: Any, tmp_path: Path) -> None:
    """legacy -> mapped-ram -> stream -> mapped-ram: every block reads back identical."""
    case = qemu_image("legacy-exec")
    a, b, c = tmp_path / "a.mr", tmp_path / "b.stream", tmp_path / "c.mr"
    convert(case.path, a)
    convert(a, b, to="stream")
    convert(b, c)
    with open_image(case.path) as ref, open_image(a) as ia, open_image(c) as ic:
        assert list(ref.blocks) == list(ia.blocks) == list(ic.blocks)
        assert ref.device_state == ia.device_state == ic.device_state
        assert ref.vmdesc == ic.vmdesc
        for name, blk in ref.blocks.items():
            want = ref.read(name, 0, blk.npages)
            assert ia.read(name, 0, blk.npages) == want, name
            assert ic.read(name, 0, blk.npages) == want, name
            assert (ia.present(name) == ic.present(name)).all()
    # converting twice gives the same bytes (deterministic layout)
    d = tmp_path / "d.mr"
    convert(b, d)
    assert c.read_bytes() == d.read_bytes()


def test_convert_errors(tmp_path: Path) -> None:
    bad = tmp_path / "bad.img"
    bad.write_bytes(b"not a migration stream" * 100)
    out = tmp_path / "out.mr"
    r = subprocess.run([PY, "-m", "fixedram", "convert", str(bad), str(out)],
                       capture_output=True, timeout=60)
    assert r.returncode == 2
    assert r.stderr.startswith(b"fixedram: error:") and r.stderr.count(b"\n") == 1
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["bad.img"]
