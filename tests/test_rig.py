"""The test rig itself: the bare guest, the host-side checker, the QEMU harness, and QEMU's
own save/restore of the guest (the baseline every fixedram test builds on)."""

from __future__ import annotations

import os
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
from qemu_images import KINDS, ImageCase

from fixedram.errors import VMError
from fixedram.testing.guest import (
    MAGIC,
    PAGE_BASE,
    PAGE_SIZE,
    STATUS_ADDR,
    build_guest,
    check_pages,
    expected_page,
    read_status,
)
from fixedram.testing.vm import (
    Guest,
    QemuBinary,
    choose_accel,
    find_qemu,
    kvm_runs_guest,
    parse_heartbeats,
    parse_info_ramblock,
    parse_mem_size,
    qemu_restore,
    qemu_save,
)

# ---------------------------------------------------------------------------------------------
# Pure tests (no QEMU)
# ---------------------------------------------------------------------------------------------


def _synthetic(npages: int, gen: int, cur: int, fill: int = 1) -> np.ndarray:
    """Memory as the guest leaves it: pages < cur hold gen, the rest gen-1."""
    mem = np.zeros(PAGE_BASE + npages * PAGE_SIZE, dtype=np.uint8)
    mem[STATUS_ADDR : STATUS_ADDR + 36] = np.frombuffer(
        b"MIGSTAT1" + struct.pack("<7I", 5, gen, cur, npages, 0, 16, fill), np.uint8
    )
    for i in range(npages):
        g = gen if i < cur else gen - 1
        page = expected_page(i, g) if fill else struct.pack("<3I", MAGIC, i, g)
        o = PAGE_BASE + i * PAGE_SIZE
        mem[o : o + len(page)] = np.frombuffer(page, np.uint8)
    return mem


def test_check_pages_synthetic() -> None:
    mem = _synthetic(64, gen=3, cur=20)
    assert read_status(mem)["npages"] == 64
    r = check_pages(mem)
    assert (r["bad_pages"], r["checked"], r["gen"], r["cur"]) == (0, 64, 3, 20)

    # Page `cur` half written (new generation up to word 500) is accepted ...
    o = PAGE_BASE + 20 * PAGE_SIZE
    new = np.frombuffer(expected_page(20, 3), np.uint8)
    mem[o : o + 2000] = new[:2000]
    assert check_pages(mem)["bad_pages"] == 0
    # ... but any other page with a wrong word is not.
    mem[PAGE_BASE + 7 * PAGE_SIZE + 100] ^= 1
    mem[PAGE_BASE + 40 * PAGE_SIZE + 8] ^= 1  # the generation word
    assert check_pages(mem)["bad"] == [7, 40]
    # A garbled cursor page is caught too.
    mem[o + 3000] ^= 0xFF
    assert check_pages(mem)["bad"] == [7, 20, 40]


def test_check_pages_prefill_and_header_only() -> None:
    mem = _synthetic(32, gen=1, cur=0)
    # gen 0 (prefill): pages from cur on were never written and are not checked
    mem[STATUS_ADDR + 12 : STATUS_ADDR + 20] = np.frombuffer(struct.pack("<2I", 0, 10), np.uint8)
    mem[PAGE_BASE + 10 * PAGE_SIZE :] = 0
    for i in range(10):
        o = PAGE_BASE + i * PAGE_SIZE
        mem[o : o + PAGE_SIZE] = np.frombuffer(expected_page(i, 0), np.uint8)
    r = check_pages(mem)
    assert (r["bad_pages"], r["checked"]) == (0, 10)

    hdr = _synthetic(16, gen=2, cur=5, fill=0)
    assert check_pages(hdr)["bad_pages"] == 0
    hdr[PAGE_BASE + 3 * PAGE_SIZE + 500] = 7  # body is not checked with fill=0
    assert check_pages(hdr)["bad_pages"] == 0
    hdr[PAGE_BASE + 3 * PAGE_SIZE + 4] = 7  # page index word
    assert check_pages(hdr)["bad"] == [3]


def test_build_guest(tmp_path: Path) -> None:
    elf = build_guest(tmp_path)
    data = elf.read_bytes()
    assert data[:5] == b"\x7fELF\x01"  # ELF32
    assert struct.unpack_from("<H", data, 18)[0] == 3  # EM_386
    # Multiboot v1 header within the first 8 KiB, 4-aligned, checksum 0.
    off = data.find(struct.pack("<I", 0x1BADB002))
    assert 0 <= off < 8192 and off % 4 == 0
    assert sum(struct.unpack_from("<3I", data, off)) & 0xFFFFFFFF == 0
    assert build_guest(tmp_path) == elf  # cached by source hash
    assert [p.name for p in tmp_path.iterdir()] == [elf.parent.name]  # no leftovers


def test_parsers() -> None:
    v10 = """\
              Block Name    PSize              Offset               Used              Total                HVA  RO
                  pc.ram    4 KiB  0x0000000000000000 0x0000000008000000 0x0000000008000000 0x00007fa6ebe00000  rw
    /rom@etc/acpi/tables    4 KiB  0x0000000008080000 0x0000000000020000 0x0000000000200000 0x00007fa742400000  ro
"""  # noqa: E501
    v72 = """\
              Block Name    PSize              Offset               Used              Total
                  pc.ram    4 KiB  0x0000000000000000 0x0000000008000000 0x0000000008000000
                 pc.bios    4 KiB  0x0000000008000000 0x0000000000040000 0x0000000000040000
"""
    b10, b72 = parse_info_ramblock(v10), parse_info_ramblock(v72)
    assert b10[0] == ("pc.ram", 128 << 20, 128 << 20, 0, 4096)
    assert b10[1].name == "/rom@etc/acpi/tables" and b10[1].max_length == 2 << 20
    assert [b.name for b in b72] == ["pc.ram", "pc.bios"]
    assert parse_mem_size("128M") == parse_mem_size("128") == 128 << 20
    assert parse_mem_size("2G") == 2 << 30
    hbs = parse_heartbeats(b"junk\nHB 3 gen=1 cur=5 err=0 KiBps=65536\nHB 4 gen=1 cur=9 err=0 Ki")
    assert [h.n for h in hbs] == [3]  # the cut-off last line is ignored


def test_find_qemu_missing_names_setup(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(VMError, match=r"QEMU 99 .*scripts/setup\.sh"):
        find_qemu("99")


# ---------------------------------------------------------------------------------------------
# Real QEMU
# ---------------------------------------------------------------------------------------------


@pytest.mark.qemu
def test_qemu_binaries(qemu10: QemuBinary, qemu72: QemuBinary) -> None:
    assert qemu10.version[0] == 10
    assert qemu72.version[:2] == (7, 2)


@pytest.mark.qemu
def test_accel_probe_agrees(qemu10: QemuBinary, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FIXEDRAM_ACCEL", raising=False)
    accel = choose_accel(qemu10)
    if os.path.exists("/sys/module/kvm_pvm"):
        assert accel == "tcg"
    if accel == "tcg" and not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return  # nothing to probe
    assert kvm_runs_guest(qemu10, 3.0) == (accel == "kvm")


@pytest.mark.qemu
def test_guest_heartbeats(qemu10: QemuBinary, accel: str, tmp_path: Path, shm_dir: Path) -> None:
    with Guest(qemu10, tmp_path, append="mib=16 rate=64 hb=50", accel=accel) as g:
        hb = g.wait_heartbeat(gen_at_least=3, timeout=30)
        assert g.status() == "running" and g.pid
        g.stop()
        beats = g.heartbeats()
        assert [b.n for b in beats] == list(range(len(beats)))
        assert [b.gen for b in beats] == sorted(b.gen for b in beats)
        assert all(b.err == 0 for b in beats) and not g.bad_lines()
        # the guest's rate limit holds (never above 64 MiB/s); how close it gets below
        # depends on the host's load, which is the benchmarks' business, not a test's
        steady = [b.kibps for b in beats if b.gen >= 2]
        assert steady and all(0 < k < 65536 + 2000 for k in steady), steady
        dump = g.pmemsave(shm_dir / "hb.mem", addr=STATUS_ADDR, size=PAGE_SIZE + (16 << 20))
        r = check_pages(np.fromfile(dump, np.uint8), base=STATUS_ADDR)
        assert r["bad_pages"] == 0 and r["npages"] == 16 * 256 and r["gen"] >= hb.gen
        assert r["hb"] >= hb.n
        assert g.ramblocks()[0].name == "pc.ram"
        assert "pc.ram" in g.hmp("info ramblock")


@pytest.mark.qemu
def test_guest_start_failure_is_vmerror(qemu10: QemuBinary, accel: str, tmp_path: Path) -> None:
    with pytest.raises(VMError, match="no-such-machine"):
        Guest(qemu10, tmp_path, machine="no-such-machine", accel=accel).start()


@pytest.mark.qemu
def test_checker_on_real_dump(qemu_image) -> None:
    case: ImageCase = qemu_image("legacy")
    mem = np.fromfile(case.mem_dump_path, np.uint8)
    assert mem.size == case.mem_bytes == case.ramblock("pc.ram").used_length
    r = check_pages(mem)
    assert r["bad_pages"] == 0 and r["err"] == 0 and r["gen"] >= 1 and r["npages"] == 8192
    victim = (r["cur"] + 100) % r["npages"]
    mem[PAGE_BASE + victim * PAGE_SIZE + 2048] ^= 0x40
    assert check_pages(mem)["bad"] == [victim]


def _roundtrip(case: ImageCase, workdir: Path, shm: Path) -> None:
    """Restore ``case`` into a fresh QEMU and check it against the source's dump."""
    src = case.mem_dump_path
    assert case.source_status == "postmigrate"
    assert case.migrate_info["status"] == "completed"
    with case.restore(workdir) as dst:
        assert dst.status() == "paused"
        dump = dst.pmemsave(shm / f"{case.kind}-dst.mem")
        a, b = np.fromfile(src, np.uint8), np.fromfile(dump, np.uint8)
        diff = np.flatnonzero((a != b).reshape(-1, PAGE_SIZE).any(axis=1))
        assert diff.size == 0, [hex(p * PAGE_SIZE) for p in diff[:10]]
        r = check_pages(b)
        assert r["bad_pages"] == 0 and r["err"] == 0
        dst.cont()
        if case.workload == "dirty":
            hb = dst.wait_heartbeat(gen_at_least=r["gen"] + 2, timeout=30)
        else:
            hb = dst.wait_heartbeat(after=r["hb"] + 2, timeout=30)
        assert hb.err == 0 and not dst.bad_lines()
        first = dst.heartbeats()[0]
        assert case.last_heartbeat is not None
        assert first.n >= case.last_heartbeat.n + 1
        assert first.n <= case.last_heartbeat.n + 2  # nothing lost but a cut-off line


@pytest.mark.qemu
@pytest.mark.parametrize("kind", ["legacy", "mapped-ram", "legacy-7.2"])
def test_qemu_roundtrip(kind: str, qemu_image, tmp_path: Path, shm_dir: Path) -> None:
    _roundtrip(qemu_image(kind), tmp_path, shm_dir)


@pytest.mark.qemu
def test_all_image_kinds(qemu_image, shm_dir: Path) -> None:
    """Every kind the fixture offers is made, is plausible, and its dump is clean."""
    for kind, spec in KINDS.items():
        case = qemu_image(kind)
        assert case.path.stat().st_size > case.offset + (1 << 20), kind
        head = case.path.read_bytes()[: case.offset + 8]
        assert head[case.offset : case.offset + 8] == b"QEVM\x00\x00\x00\x03", kind
        assert head[: case.offset] == b"M" * case.offset
        assert case.qemu_version.startswith(spec.qemu)
        assert case.source_status == "postmigrate"
        r = check_pages(np.fromfile(case.mem_dump_path, np.uint8))
        assert r["bad_pages"] == 0 and r["err"] == 0, (kind, r)
        if case.workload == "idle":
            assert (r["gen"], r["cur"]) == (2, 0)
        if case.mode == "mapped-ram":
            # apparent size: RAM + ROMs + headers, never more
            assert case.path.stat().st_size <= case.offset + case.mem_bytes + (8 << 20)


@pytest.mark.qemu
def test_guest_catches_corrupted_restore(qemu_image, tmp_path: Path, shm_dir: Path) -> None:
    """Flip a byte of workload page 1000 inside a mapped-ram file: the guest, the host checker
    and the dump comparison all notice."""
    case: ImageCase = qemu_image("mapped-ram")
    bad = tmp_path / "bad.img"
    shutil.copyfile(case.path, bad)
    needle = struct.pack("<2I", MAGIC, 1000)
    data = bad.read_bytes()
    pos = data.find(needle)
    while pos >= 0 and pos % PAGE_SIZE:
        pos = data.find(needle, pos + 1)
    assert pos > 0
    with open(bad, "r+b") as f:
        f.seek(pos + 400)
        byte = f.read(1)
        f.seek(pos + 400)
        f.write(bytes([byte[0] ^ 0x10]))
    with qemu_restore(case.source, bad, "mapped-ram", workdir=tmp_path) as dst:
        dump = dst.pmemsave(shm_dir / "corrupt-dst.mem")
        mem = np.fromfile(dump, np.uint8)
        src = np.fromfile(case.mem_dump_path, np.uint8)
        diff = np.flatnonzero((mem != src).reshape(-1, PAGE_SIZE).any(axis=1))
        assert list(diff) == [(PAGE_BASE >> 12) + 1000]
        assert check_pages(mem)["bad"] == [1000]
        dst.cont()
        hb = dst.wait_heartbeat(gen_at_least=check_pages(mem)["gen"] + 2, timeout=30)
        assert hb.err == 1
        assert len(dst.bad_lines()) == 1 and dst.bad_lines()[0].startswith("BAD page=1000 ")


@pytest.mark.qemu
def test_mapped_ram_mismatch_is_vmerror(qemu_image, tmp_path: Path) -> None:
    case: ImageCase = qemu_image("mapped-ram")
    with pytest.raises(VMError, match="mapped-ram is off"):
        qemu_restore(case.source, case.path, "legacy", workdir=tmp_path)


@pytest.mark.qemu
def test_paused_save_exec(qemu10: QemuBinary, accel: str, tmp_path: Path) -> None:
    """A non-live save through exec:, and the destination started without -S keeps going."""
    with Guest(qemu10, tmp_path, append="mib=8 rate=64", accel=accel) as g:
        g.wait_heartbeat(gen_at_least=1)
        info = qemu_save(g, tmp_path / "s.bin", live=False, transport="exec")
        assert info["status"] == "completed" and g.status() == "postmigrate"
        n = g.heartbeats()[-1].n
    with qemu_restore(g, tmp_path / "s.bin", transport="exec") as dst:
        dst.cont()
        assert dst.wait_heartbeat(after=n + 3).err == 0
