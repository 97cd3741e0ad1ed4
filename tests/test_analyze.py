"""``fixedram analyze`` and ``fixedram extract``: metadata-only analysis of mapped-ram images,
sparse extraction, and agreement with QEMU (``info ramblock``, ``pmemsave``) for every image
kind QEMU writes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from qemu_images import KINDS, ImageCase
from synth_images import DEVICES, write_mapped_image

from fixedram.image.analyze import analyze_image, data_bytes, extract_block, format_report
from fixedram.image.layout import MAPPED_RAM_HEADER_SIZE, PAGE_SIZE, bitmap_bytes, block_geometry

REPO = Path(__file__).resolve().parent.parent
PY = str(REPO / ".venv" / "bin" / "python")
GIB = 1 << 30
MIB = 1 << 20


def run_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PY, "-m", "fixedram", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
        check=False,
    )


@contextmanager
def count_reads(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[tuple[int, int]]]:
    """Record ``(offset, bytes)`` of every positioned read (os.pread / os.preadv)."""
    reads: list[tuple[int, int]] = []
    real_pread, real_preadv = os.pread, os.preadv

    def pread(fd: int, n: int, off: int) -> bytes:
        b = real_pread(fd, n, off)
        reads.append((off, len(b)))
        return b

    def preadv(fd: int, bufs: list, off: int, *a: int) -> int:
        n = real_preadv(fd, bufs, off, *a)
        reads.append((off, n))
        return n

    with monkeypatch.context() as m:
        m.setattr(os, "pread", pread)
        m.setattr(os, "preadv", preadv)
        m.setattr(os, "read", lambda *a: pytest.fail("unpositioned read"))
        yield reads


def _assert_no_page_reads(reads: list[tuple[int, int]], report: dict) -> None:
    for b in report["blocks"]:
        m = b["mapped"]
        for off, n in reads:
            assert off + n <= m["pages_offset"] or off >= m["pages_end"], (
                f"read [{off}, {off + n}) overlaps the pages of {b['name']}"
            )


# ---------------------------------------------------------------------------------------------
# A 4 GiB sparse mapped-ram image
# ---------------------------------------------------------------------------------------------

BIG_BLOCKS = {
    "pc.ram": 4 * GIB,
    "/rom@etc/acpi/tables": 128 << 10,
    "pc.bios": 256 << 10,
    "pc.rom": 128 << 10,
    "/rom@etc/table-loader": 4096,
    "/rom@etc/acpi/rsdp": 4096,
}


def _pg(tag: int) -> bytes:
    return tag.to_bytes(8, "little") * (PAGE_SIZE // 8)


BIG_PAGES = {
    "pc.ram": {
        0: _pg(1),
        1: _pg(2),
        6: _pg(3),
        300_000: _pg(4),
        (4 * GIB // PAGE_SIZE) - 1: _pg(5),
        **{600_000 + k: _pg(100 + k) for k in range(700)},
    },  # a run longer than 1 MiB
    "pc.bios": {k: _pg(1000 + k) for k in range(17, 64)},
    "/rom@etc/acpi/rsdp": {0: _pg(7)},
}


@pytest.fixture(scope="module")
def big_image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    p = tmp_path_factory.mktemp("big") / "big.img"
    write_mapped_image(p, BIG_BLOCKS, BIG_PAGES)
    assert os.stat(p).st_size > 4 * GIB
    assert os.stat(p).st_blocks * 512 < 64 * MIB  # sparse
    return p


def test_analyze_big_sparse_reads_metadata_only(
    big_image: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with count_reads(monkeypatch) as reads:
        r = analyze_image(big_image)
    total = sum(n for _, n in reads)
    # a few KiB of headers, the 128 KiB pc.ram bitmap, the ~1 KiB tail
    assert total < 512 << 10, total
    _assert_no_page_reads(reads, r)
    assert r["schema"] == 1
    assert r["format"] == "mapped-ram"
    assert r["machine"] == "pc-q35-10.0"
    assert r["capabilities"] == ["mapped-ram"]
    assert r["stream_offset"] == 0
    assert r["commands"] == ["SWITCHOVER_START"]
    assert [(b["name"], b["length"]) for b in r["blocks"]] == list(BIG_BLOCKS.items())
    pos = None
    for b in r["blocks"]:
        want = len(BIG_PAGES.get(b["name"], {}))
        assert b["pages_present"] == want
        assert b["pages"] == b["length"] // PAGE_SIZE
        assert b["pages_absent"] == b["pages"] - want
        assert b["page_size"] == PAGE_SIZE
        m = b["mapped"]
        assert m["version"] == 1
        assert m["bitmap_bytes"] == bitmap_bytes(b["pages"])
        assert m["pages_offset"] % MIB == 0
        assert m["pages_end"] == m["pages_offset"] + b["length"]
        # allocation counts whole filesystem blocks of data: at least the pages written
        assert want * PAGE_SIZE <= m["allocated_bytes"] <= want * PAGE_SIZE + 2 * MIB
        if pos is not None:  # chained exactly as QEMU does
            hdr = m["bitmap_offset"] - MAPPED_RAM_HEADER_SIZE
            assert block_geometry(hdr, b["length"])[1] == m["pages_offset"]
            assert hdr - 1 - len(b["name"]) - 8 == pos
        pos = m["pages_end"]
    assert r["ram"]["bytes"] == sum(BIG_BLOCKS.values())
    assert r["ram"]["pages_present"] == sum(len(v) for v in BIG_PAGES.values())
    assert r["ram"]["allocated_bytes"] == sum(b["mapped"]["allocated_bytes"] for b in r["blocks"])
    assert [s["name"] for s in r["device_state"]["sections"]] == list(DEVICES)
    assert r["device_state"]["bytes"] > 0
    assert r["vmdesc"]["present"] and r["vmdesc"]["page_size"] == PAGE_SIZE
    st = os.stat(big_image)
    assert r["file"] == {"apparent_bytes": st.st_size, "allocated_bytes": st.st_blocks * 512}
    text = format_report(r)
    for name in BIG_BLOCKS:
        assert name in text
    assert "pc-q35-10.0" in text and "mapped-ram" in text and "globalstate" in text


def test_analyze_cli_json_big(big_image: Path) -> None:
    res = run_cli("analyze", "--json", str(big_image), timeout=30)
    assert res.returncode == 0, res.stderr
    r = json.loads(res.stdout)
    assert r == json.loads(json.dumps(analyze_image(big_image)))
    res = run_cli("analyze", str(big_image), timeout=30)
    assert res.returncode == 0 and "pc.ram" in res.stdout


def test_extract_big_sparse(
    big_image: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "pc.ram"
    out.write_bytes(b"junk" * 5000)  # replaced, not merged
    writes: list[int] = []
    real = os.pwrite

    def pwrite(fd: int, data: bytes, off: int) -> int:
        writes.append(len(data))
        return real(fd, data, off)

    monkeypatch.setattr(os, "pwrite", pwrite)
    assert extract_block(big_image, "pc.ram", out) == 4 * GIB
    monkeypatch.undo()
    st = os.stat(out)
    assert st.st_size == 4 * GIB
    assert st.st_blocks * 512 < 16 * MIB  # sparse: only the present pages are written
    # one pwrite per run of present pages, each at most 1 MiB
    assert max(writes) <= MIB
    # pages 0-1, 6, 300000 and the last page: 4 writes; the 700-page run: 3 pieces
    assert len(writes) == 4 + 3
    with open(out, "rb") as f:
        for i, page in BIG_PAGES["pc.ram"].items():
            f.seek(i * PAGE_SIZE)
            assert f.read(PAGE_SIZE) == page
        f.seek(2 * PAGE_SIZE)
        assert f.read(4 * PAGE_SIZE) == bytes(4 * PAGE_SIZE)
    fd = os.open(out, os.O_RDONLY)
    try:
        assert data_bytes(fd, 0, 4 * GIB) < 16 * MIB
    finally:
        os.close(fd)
    bios = tmp_path / "bios"
    res = run_cli("extract", str(big_image), "--block", "pc.bios", "-o", str(bios))
    assert res.returncode == 0, res.stderr
    raw = bios.read_bytes()
    assert len(raw) == 256 << 10
    assert raw[: 17 * PAGE_SIZE] == bytes(17 * PAGE_SIZE)
    assert raw[17 * PAGE_SIZE :] == b"".join(BIG_PAGES["pc.bios"][k] for k in range(17, 64))


def test_extract_unknown_block(big_image: Path, tmp_path: Path) -> None:
    res = run_cli("extract", str(big_image), "--block", "nope", "-o", str(tmp_path / "x"))
    assert res.returncode == 2
    assert res.stderr.count("\n") == 1 and "no RAM block 'nope'" in res.stderr


def test_data_bytes(tmp_path: Path) -> None:
    p = tmp_path / "f"
    fd = os.open(p, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.ftruncate(fd, 64 * MIB)
        os.pwrite(fd, b"x" * MIB, 8 * MIB)
        assert data_bytes(fd, 0, 64 * MIB) >= MIB
        assert data_bytes(fd, 8 * MIB, 9 * MIB) == MIB
        assert data_bytes(fd, 8 * MIB + 10, 8 * MIB + 20) == 10
        assert data_bytes(fd, 16 * MIB, 64 * MIB) == 0
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------------------
# Every image kind QEMU writes
# ---------------------------------------------------------------------------------------------


def _same_file(a: Path, b: Path) -> None:
    x = np.memmap(a, dtype=np.uint8, mode="r")
    y = np.memmap(b, dtype=np.uint8, mode="r")
    assert x.shape == y.shape
    diff = np.flatnonzero((x != y).reshape(-1, PAGE_SIZE).any(axis=1))
    assert not len(diff), f"{len(diff)} pages differ, first at 0x{diff[0] * PAGE_SIZE:x}"


@pytest.mark.qemu
@pytest.mark.parametrize("kind", sorted(KINDS))
def test_qemu_images(
    kind: str,
    qemu_image: Callable[[str], ImageCase],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    case = qemu_image(kind)
    # analyze --json: blocks equal QEMU's "info ramblock"
    res = run_cli("analyze", "--json", str(case.path))
    assert res.returncode == 0, res.stderr
    r = json.loads(res.stdout)
    assert [(b["name"], b["length"]) for b in r["blocks"]] == [
        (b.name, b.used_length) for b in case.ramblocks
    ]
    assert r["format"] == ("mapped-ram" if case.mode == "mapped-ram" else "stream")
    assert r["stream_offset"] == case.offset
    assert r["machine"].startswith("pc-q35-" if case.machine == "q35" else "pc-i440fx-")
    assert r["vmdesc"]["present"] and len(r["device_state"]["sections"]) > 20
    assert r["device_state"]["sections"][-1]["name"] == "globalstate"
    assert 0 < r["ram"]["pages_present"] < r["ram"]["pages"]
    if case.mode == "mapped-ram":
        assert r["capabilities"] == ["mapped-ram"]
        for b in r["blocks"]:
            m = b["mapped"]
            hdr = m["bitmap_offset"] - MAPPED_RAM_HEADER_SIZE
            assert block_geometry(hdr, b["length"])[1] == m["pages_offset"]
        with count_reads(monkeypatch) as reads:
            analyze_image(case.path)
        _assert_no_page_reads(reads, r)
    else:
        assert r["capabilities"] == [] and r["ram"]["allocated_bytes"] is None
    # extract pc.ram == the paused source's pmemsave
    out = tmp_path / "pc.ram"
    res = run_cli("extract", str(case.path), "-o", str(out))
    assert res.returncode == 0, res.stderr
    assert os.path.getsize(out) == case.ramblock("pc.ram").used_length == case.mem_bytes
    _same_file(out, case.mem_dump_path)
    # the guest's own pages are all there: every stamped page is present in the image
    present = r["blocks"][0]["pages_present"]
    assert present >= (32 << 20) // PAGE_SIZE
    text = run_cli("analyze", str(case.path))
    assert text.returncode == 0 and "pc.ram" in text.stdout and r["machine"] in text.stdout


def test_cli_module_entry() -> None:
    res = subprocess.run(
        [sys.executable, "-m", "fixedram", "--help"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=30,
        check=False,
    )
    assert res.returncode == 0 and "analyze" in res.stdout and "extract" in res.stdout
