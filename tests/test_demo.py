"""``fixedram demo`` runs end to end and reports what it proved."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.qemu


def test_demo_json(tmp_path: Path) -> None:
    keep = tmp_path / "keep"
    r = subprocess.run([sys.executable, "-m", "fixedram", "demo", "--json", "--keep", str(keep)],
                       capture_output=True, text=True, timeout=180, check=False)
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    assert rep["ok"] is True
    assert rep["checks"] == {"source_paused": True, "ram_identical": True, "host_check": True,
                             "heartbeat_continues": True, "guest_err_0": True}
    ram = rep["ram_size"]
    assert ram == 256 << 20
    assert rep["differing_pages"] == [] and rep["host_bad_pages"] == 0
    # fixed-offset image: RAM + ROMs in apparent size, only the dirtied pages allocated
    assert ram <= rep["image_apparent_size"] <= ram + (8 << 20)
    assert rep["workload_bytes"] <= rep["image_allocated_size"] < ram // 2
    assert rep["legacy_size"] >= rep["workload_bytes"]  # a stream holds every page it sent
    assert rep["save"]["via"] == "proxy" and rep["save"]["live"] is True
    assert rep["restore"]["via"] == "proxy"
    for k in ("save_time", "restore_time", "legacy_save_time", "total_time"):
        assert 0 < rep[k] < 60, (k, rep[k])
    hb = rep["heartbeat"]
    assert hb["restored_first"] == hb["source_last"] + 1 and hb["err"] == 0
    assert hb["gen_after"] >= hb["gen_before"] + 2
    image = Path(rep["image"])
    assert image.parent == keep and image.stat().st_size == rep["image_apparent_size"]
    assert (keep / "src.mem").exists() and (keep / "dst.mem").exists()


def test_demo_text() -> None:
    r = subprocess.run([sys.executable, "-m", "fixedram", "demo", "--mem", "128M"],
                       capture_output=True, text=True, timeout=180, check=False)
    assert r.returncode == 0, r.stderr
    assert "RAM identical: True" in r.stdout and "OK in" in r.stdout
