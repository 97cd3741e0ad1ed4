"""``fixedram verify`` and the checksum extension (docs/checksums.md).

Real QEMU: a save through ``fixedram receive`` carries checksums and QEMU 10 still loads it
natively; ``verify --add`` on QEMU's own mapped-ram file keeps it loadable; flipped bytes are
named by block and offset; ``send --verify`` refuses before QEMU sees a byte. Without QEMU:
structural corruptions and their exit codes, an interrupted ``--add``, the inline check of
``send``, the writer's digests under rewrites, and a defensive parser.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from synth_images import write_mapped_image

from fixedram.endpoint.send import send
from fixedram.errors import ImageError
from fixedram.image import MappedRamWriter, open_image
from fixedram.image import checksum as ck
from fixedram.image.layout import PAGE_SIZE
from fixedram.image.verify import add_checksums, verify_image
from fixedram.io.channel import FdChannel
from fixedram.stream import Configuration, RamBlock, SectionFooter, SectionFull, encode
from fixedram.testing.vm import Guest, QemuBinary, qemu_restore

PY = str(Path(sys.executable).absolute())
REPO = Path(__file__).resolve().parent.parent
PS = PAGE_SIZE


def fixedram(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PY, "-m", "fixedram", *args], cwd=REPO, text=True,
                          capture_output=True, timeout=timeout, check=False)


def flip(path: Path, offset: int, mask: int = 0x01) -> None:
    fd = os.open(path, os.O_RDWR)
    try:
        b = os.pread(fd, 1, offset)
        os.pwrite(fd, bytes([b[0] ^ mask]), offset)
    finally:
        os.close(fd)


def sparse_copy(src: Path, dst: Path) -> Path:
    subprocess.run(["cp", "--sparse=always", str(src), str(dst)], check=True)
    return dst


def a_present_page(img_path: Path, block: str = "pc.ram", nth: int = 100) -> tuple[int, int]:
    """``(page index, file offset)`` of the ``nth`` page holding data in ``block``."""
    with open_image(img_path) as im:
        idx = int(np.flatnonzero(im.present(block))[nth])
        m = im.blocks[block].mapped
        assert m is not None
        return idx, m.pages_offset + idx * PS


def compare_ram(dst: Guest, want: Path, shm: Path, tag: str) -> None:
    got = dst.pmemsave(shm / f"{tag}.dst.mem")
    try:
        a = np.fromfile(got, dtype=np.uint8).reshape(-1, PS)
        b = np.fromfile(want, dtype=np.uint8).reshape(-1, PS)
        pages = np.flatnonzero((a != b).any(axis=1))
        if dst.accel == "kvm":  # KVM rewrites SeaBIOS data at 0xe8000 (docs/test-guest.md)
            pages = pages[pages != 0xE8000 // PS]
        first = [hex(p * PS) for p in pages[:4]]
        assert pages.size == 0, f"{pages.size} pages differ, first {first}"
    finally:
        got.unlink(missing_ok=True)


def assert_bad_extent(r: subprocess.CompletedProcess[str], block: str, page: int) -> None:
    """Exit 1 and exactly one problem line naming ``block`` and the extent holding ``page``."""
    assert r.returncode == 1, (r.stdout, r.stderr)
    bad = [ln for ln in r.stdout.splitlines() if "does not match its checksum" in ln]
    assert len(bad) == 1, r.stdout
    ext = page * PS >> 20 << 20
    assert f"RAM block '{block}' offset 0x{ext:x}-" in bad[0], bad[0]
    lo, hi = bad[0].split("(pages ")[1].split(",")[0].split("-")
    assert int(lo) <= page <= int(hi)


@pytest.fixture
def sockdir() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="frv-", dir="/tmp"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


# -- real QEMU --------------------------------------------------------------------------------


@pytest.mark.qemu
def test_received_image_carries_checksums_and_loads_natively(
        tmp_path: Path, shm_dir: Path, accel: str, qemu10: QemuBinary, guest_elf: Path) -> None:
    img = tmp_path / "vm.img"
    src_dump = shm_dir / f"{tmp_path.name}-src.mem"
    with Guest(qemu10, tmp_path, name="src", append="mib=32 rate=32 hb=100", mem="128M",
               machine="q35", accel=accel) as src:
        src.wait_heartbeat(gen_at_least=1)
        src.migrate(f"exec:{PY} -m fixedram receive {img} 2>>{tmp_path}/recv.err")
        assert src.wait_migration(60, stop_after=20)["status"] == "completed"
        src.pmemsave(src_dump)
    rep = verify_image(img)
    assert rep.status == "ok", rep.problems
    assert rep.checksums is not None and rep.checksums["extent_size"] == 1 << 20
    assert rep.extents_checked >= 128  # 128 MiB of pc.ram at 1 MiB extents, plus ROMs
    r = fixedram("verify", str(img))
    assert r.returncode == 0 and " OK " in r.stdout, r.stdout + r.stderr
    # QEMU 10 loads it natively, RAM equal to the source's
    with qemu_restore(src, img, "mapped-ram", qemu=qemu10, workdir=tmp_path) as dst:
        compare_ram(dst, src_dump, shm_dir, tmp_path.name)
    src_dump.unlink()
    # one flipped byte in a page: named by block and offset, exit 1; flipped back: clean
    page, at = a_present_page(img)
    flip(img, at + 123)
    assert_bad_extent(fixedram("verify", str(img)), "pc.ram", page)
    flip(img, at + 123)
    assert fixedram("verify", str(img)).returncode == 0


@pytest.mark.qemu
def test_add_to_qemu_image_loads_and_send_refuses(
        qemu_image: Callable[[str], Any], tmp_path: Path, shm_dir: Path,
        sockdir: Path) -> None:
    case = qemu_image("mapped-ram")
    img = sparse_copy(case.path, tmp_path / "qemu.img")
    r = fixedram("verify", str(img))
    assert r.returncode == 0 and "no checksum extension" in r.stdout
    size = img.stat().st_size
    r = fixedram("verify", "--add", str(img))
    assert r.returncode == 0, r.stderr
    assert img.stat().st_size == size  # in the padding: same size, same layout
    with open_image(case.path) as a, open_image(img) as b:
        assert a.device_state == b.device_state and a.vmdesc == b.vmdesc
    rep = verify_image(img)
    assert rep.status == "ok" and rep.checksums is not None, rep.problems
    r = fixedram("verify", "--json", str(img))
    assert r.returncode == 0 and json.loads(r.stdout)["status"] == "ok"

    # QEMU 10 loads the checksummed file natively
    with qemu_restore(case.source, img, "mapped-ram", case.multifd_channels, case.offset,
                      transport=case.transport, name="native", workdir=tmp_path) as dst:
        compare_ram(dst, case.mem_dump_path, shm_dir, "native")

    # a flipped byte: verify names it; send --verify refuses before QEMU sees a byte;
    # send without --verify is refused too when the flip is in the device state
    page, at = a_present_page(img, nth=3)
    flip(img, at + 4000, 0x80)
    assert_bad_extent(fixedram("verify", str(img)), "pc.ram", page)
    dst = Guest.like(case.source, name="dst", workdir=tmp_path)
    with dst:
        sock = sockdir / "mig.sock"
        dst.migrate_incoming(f"unix:{sock}")
        r = fixedram("send", "--verify", "--connect", f"unix:{sock}", str(img))
        assert r.returncode == 2 and r.stdout == ""
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and "RAM block 'pc.ram' offset 0x" in lines[0], r.stderr
        assert dst.status() == "inmigrate"
        assert dst.query_migrate().get("status") in (None, "setup", "none")
        flip(img, at + 4000, 0x80)  # repaired: the same QEMU takes the restore
        r = fixedram("send", "--verify", "--connect", f"unix:{sock}", str(img))
        assert r.returncode == 0, r.stderr
        dst.wait_incoming(60)
        compare_ram(dst, case.mem_dump_path, shm_dir, "after-refusal")


# -- without QEMU ---------------------------------------------------------------------------

BLOCKS = {"pc.ram": 8 << 20, "/rom@etc/acpi/tables": 128 << 10, "pc.bios": 256 << 10}


def synth(path: Path, *, checksums: bool = True) -> Path:
    rng = np.random.default_rng(7)
    pages = {"pc.ram": {i: rng.bytes(PS) for i in (0, 1, 2, 300, 301, 1500, 2047)},
             "pc.bios": {i: rng.bytes(PS) for i in range(17, 64)}}
    write_mapped_image(path, BLOCKS, pages)
    if checksums:
        add_checksums(path)
    return path


def test_synthetic_add_verify_and_flips(tmp_path: Path) -> None:
    img = synth(tmp_path / "s.mr")
    assert verify_image(img).status == "ok"
    # every page with data: a flip there is one bad extent naming block and offset
    for block, page in (("pc.ram", 1500), ("pc.bios", 40)):
        with open_image(img) as im:
            m = im.blocks[block].mapped
            assert m is not None
            at = m.pages_offset + page * PS + 77
        flip(img, at)
        assert_bad_extent(fixedram("verify", str(img)), block, page)
        r = fixedram("verify", "--json", str(img))
        rep = json.loads(r.stdout)
        assert r.returncode == 1 and rep["status"] == "corrupt"
        (p,) = rep["problems"]
        assert p["block"] == block and p["offset"] <= page * PS < p["offset"] + p["length"]
        flip(img, at)
    assert fixedram("verify", str(img)).returncode == 0
    # data written into an absent page (bit clear) is unreachable: no problem
    with open_image(img) as im:
        m = im.blocks["pc.ram"].mapped
        assert m is not None and not im.present("pc.ram")[1000]
    flip(img, m.pages_offset + 1000 * PS)
    assert fixedram("verify", str(img)).returncode == 0


def test_scattered_pages_verify_and_flips(tmp_path: Path) -> None:
    """Pages with data alternating with absent ones (read a stretch at a time, gaps
    included): the checksums the writer made as it wrote them verify, and so do those added
    to QEMU's image; a flip in a page with data is its extent, one in an absent page between
    them is no problem."""
    from fixedram.commands.convert import convert

    rng = np.random.default_rng(8)
    qemu, img = tmp_path / "qemu.mr", tmp_path / "alt.mr"
    write_mapped_image(qemu, BLOCKS, {"pc.ram": {i: rng.bytes(PS) for i in range(0, 2048, 2)}})
    convert(qemu, img)  # checksums from the pages as written
    assert verify_image(img).status == "ok"
    add_checksums(qemu)
    assert verify_image(qemu).status == "ok"
    with open_image(img) as im:
        m = im.blocks["pc.ram"].mapped
        assert m is not None and not im.present("pc.ram")[1001]
    flip(img, m.pages_offset + 1000 * PS + 5)
    assert_bad_extent(fixedram("verify", str(img)), "pc.ram", 1000)
    flip(img, m.pages_offset + 1000 * PS + 5)
    flip(img, m.pages_offset + 1001 * PS + 5)
    assert fixedram("verify", str(img)).returncode == 0


def test_structural_corruptions(tmp_path: Path) -> None:
    good = synth(tmp_path / "good.mr")
    data = good.read_bytes()
    with open_image(good) as im:
        rom = im.blocks["/rom@etc/acpi/tables"].mapped
        ram = im.blocks["pc.ram"].mapped
        assert rom is not None and ram is not None
        vm_at = len(data) - len(im.vmdesc or b"")

    def variant(name: str, d: bytes | bytearray) -> subprocess.CompletedProcess[str]:
        p = tmp_path / f"{name}.mr"
        p.write_bytes(d)
        return fixedram("verify", str(p))

    # bitmap bit beyond the block's 32 pages (bit 40): corrupt, exit 1
    d = bytearray(data)
    d[rom.bitmap_offset + 5] |= 0x01
    r = variant("bit-beyond", d)
    assert r.returncode == 1 and "bitmap bit 40 is set beyond" in r.stdout, r.stdout
    # a bitmap bit of a page with data cleared: bitmap digest and page extent both fail
    d = bytearray(data)
    d[ram.bitmap_offset] &= 0xFE
    r = variant("bit-cleared", d)
    assert r.returncode == 1 and "page bitmap" in r.stdout and "offset 0x0-0xfffff" in r.stdout
    # truncated: unreadable, exit 2, one line
    for cut in (len(data) - 1000, len(data) - 10, 5000):
        r = variant(f"trunc{cut}", data[:cut])
        assert r.returncode == 2 and r.stdout == "", r.stdout
        assert r.stderr.startswith("fixedram: error: ") and r.stderr.count("\n") == 1
    # VM description: invalid JSON cannot be told from device state -> unreadable, exit 2
    d = bytearray(data)
    d[vm_at + 1] = ord("'")
    r = variant("vmdesc-json", d)
    assert r.returncode == 2 and "VM description" in r.stderr
    # ...valid JSON but altered (same length): the stream tail checksum fails, exit 1
    d = bytearray(data)
    at = data.rindex(b'"devices"', vm_at)
    d[at + 1 : at + 8] = b"DEVICES"
    r = variant("vmdesc-altered", d)
    assert r.returncode == 1 and "stream tail" in r.stdout
    # a byte of device state
    d = bytearray(data)
    d[vm_at - 30] ^= 0x10
    r = variant("device-state", d)
    assert r.returncode == 1 and "device state / VM description" in r.stdout
    # the extension's body, and its magic: reported, never taken for "no checksums"
    with open_image(good) as im:
        found = ck.find(im._fd, ck.Geometry.of_image(im))
        assert found.checksums is not None
        slot = found.checksums.slot
    for off in (slot + 3, slot + 70, slot + 20):
        d = bytearray(data)
        d[off] ^= 0x04
        r = variant(f"ext{off}", d)
        assert r.returncode == 1 and "checksum extension" in r.stdout, r.stdout
    # not an image at all / missing file
    r = variant("junk", b"hello" * 1000)
    assert r.returncode == 2 and "QEVM" in r.stderr
    r = fixedram("verify", str(tmp_path / "missing.mr"))
    assert r.returncode == 2 and r.stderr.count("\n") == 1


def test_incomplete_image_listed_by_verify_refused_by_send(tmp_path: Path) -> None:
    """One check, two wordings: verify lists every problem of an image cut short, in file
    order; a restore stops at the first with its own line; --json carries the six fields."""
    from synth_images import device_blob, vmdesc

    from fixedram.endpoint.send import validate
    from fixedram.stream import VMDescription

    data = synth(tmp_path / "good.mr", checksums=False).read_bytes()
    tail = len(encode(VMDescription(vmdesc())))
    eof = len(data) - tail - 1
    no_vmdesc = tmp_path / "no-vmdesc.mr"
    no_vmdesc.write_bytes(data[: eof + 1])
    no_tail = tmp_path / "no-tail.mr"
    no_tail.write_bytes(data[: eof - len(device_blob())] + data[eof : eof + 1])
    with pytest.raises(ImageError, match=r"^image is incomplete: no VM description after the "
                                         r"end-of-stream marker$"):
        validate(no_vmdesc)
    with pytest.raises(ImageError, match=r"^image is incomplete: no device state$"):
        validate(no_tail)
    rep = verify_image(no_tail)
    assert rep.exit_code == 1
    assert [p.message for p in rep.problems] == [
        "no device state (image incomplete)",
        "no VM description after the end-of-stream marker (image incomplete)"]
    problems = json.loads(rep.to_json())["problems"]
    assert [sorted(p) for p in problems] == [
        sorted(["kind", "message", "block", "offset", "length", "file_offset"])] * 2


def test_add_interrupted_leaves_no_extension(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """A crash between any two steps of ``--add`` leaves no extension or the complete one."""
    img = synth(tmp_path / "i.mr", checksums=False)
    before = img.read_bytes()
    real = ck._pwrite_all
    calls = {"n": 0}

    def dying(fd: int, data: bytes, offset: int) -> None:
        calls["n"] += 1
        if calls["n"] == 2:  # the magic, after the body was written and synced
            raise OSError("simulated crash")
        real(fd, data, offset)

    monkeypatch.setattr(ck, "_pwrite_all", dying)
    with pytest.raises(OSError):
        add_checksums(img)
    rep = verify_image(img)
    assert rep.status == "ok" and rep.checksums is None  # no extension, nothing else changed
    with open_image(img) as im:
        assert im.device_state and im.vmdesc
    monkeypatch.setattr(ck, "_pwrite_all", real)
    add_checksums(img)
    assert verify_image(img).checksums is not None
    # re-adding: the old magic is cleared first; a crash right after leaves no extension
    calls["n"] = 0
    monkeypatch.setattr(ck, "_pwrite_all", dying)
    monkeypatch.setattr(ck, "_fdatasync", lambda fd: (_ for _ in ()).throw(OSError("crash")))
    with pytest.raises(OSError):
        add_checksums(img)
    rep = verify_image(img)
    assert rep.status == "ok" and rep.checksums is None
    # outside the padding slot, the file is unchanged throughout
    after = img.read_bytes()
    with open_image(img) as im:
        geom = ck.Geometry.of_image(im)
    slot = max(geom.blocks, key=lambda b: b.room).slot
    assert after[:slot] == before[:slot]
    assert after[slot + 4096 :] == before[slot + 4096 :]


def test_send_checks_pages_inline(tmp_path: Path) -> None:
    """Without --verify, a bad extent stops the stream before the device state and EOF."""
    img = synth(tmp_path / "p.mr")
    out = tmp_path / "stream"
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        send(img, FdChannel(fd, fd, owned=False))
    finally:
        os.close(fd)
    clean = out.read_bytes()
    with open_image(img) as im:
        dev = im.device_state
        m = im.blocks["pc.bios"].mapped
        assert m is not None
    assert dev in clean
    flip(img, m.pages_offset + 20 * PS)
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with pytest.raises(ImageError, match=r"RAM block 'pc.bios' offset 0x0-0x3ffff"):
            send(img, FdChannel(fd, fd, owned=False))
    finally:
        os.close(fd)
    assert dev not in out.read_bytes()
    # a flip in the metadata is refused before the first byte (send's validation)
    flip(img, m.pages_offset + 20 * PS)
    flip(img, len(img.read_bytes()) - 40)
    out.unlink()
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with pytest.raises(ImageError, match="stream tail"):
            send(img, FdChannel(fd, fd, owned=False))
    finally:
        os.close(fd)
    assert out.stat().st_size == 0


def test_whole_extents_in_any_order(tmp_path: Path) -> None:
    """Extents whose every page holds data, one short of a page, a few pages, and the
    block's last extent whole: the extent digests come out the same whether the pages are
    given consecutive in pieces across extent ends or one by one in random order, and equal
    the checksums written; a flip in a whole extent, the last one included, is found."""
    from fixedram.commands.convert import convert
    from fixedram.image.check import check_metadata
    from fixedram.image.verify import _ExtentCheck

    rng = np.random.default_rng(9)
    # extents of 256 pages: 0 and 2 whole, 1 whole but for page 300, 4 a few pages, 7 (the
    # block's last) whole
    data = [*range(0, 300), *range(301, 768), *range(1024, 1031), *range(1792, 2048)]
    qemu, img = tmp_path / "qemu.mr", tmp_path / "whole.mr"
    write_mapped_image(qemu, BLOCKS, {"pc.ram": {i: rng.bytes(PS) for i in data}})
    convert(qemu, img)
    assert verify_image(img).status == "ok"
    with open_image(img) as im:
        cs = check_metadata(im)
        assert cs is not None
        want = cs.by_name()["pc.ram"].extents
        pages = np.array(data, dtype=np.int64)
        digests = ck.digests_of([im.read("pc.ram", 0, 2048)])[pages]
        pieces = _ExtentCheck(im, "pc.ram", cs.extent_shift)
        for a in range(0, len(pages), 100):  # pieces in order, across extent ends
            part = pages[a : a + 100]
            if (np.diff(part) == 1).all():
                pieces.add(int(part[0]), digests[a : a + 100])
            else:
                pieces.add_at(part, digests[a : a + 100])
        order = rng.permutation(len(pages))
        one_by_one = _ExtentCheck(im, "pc.ram", cs.extent_shift)
        one_by_one.add_at(pages[order], digests[order])
        assert (pieces.finish() == want).all() and (one_by_one.finish() == want).all()
        m = im.blocks["pc.ram"].mapped
        assert m is not None
    for page in (600, 2047):
        flip(img, m.pages_offset + page * PS + 9)
        assert_bad_extent(fixedram("verify", str(img)), "pc.ram", page)
        flip(img, m.pages_offset + page * PS + 9)
    assert verify_image(img).status == "ok"


def test_writer_digests_follow_rewrites(tmp_path: Path) -> None:
    """Pages rewritten and zeroed while writing: the checksums describe the final content."""
    img = tmp_path / "w.mr"
    rng = np.random.default_rng(1)
    fd = os.open(img, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        w = MappedRamWriter(fd)
        w.begin(Configuration("pc-q35-10.0"), [RamBlock("pc.ram", 4 << 20),
                                               RamBlock("pc.bios", 256 << 10)])
        w.write_pages("pc.ram", 0, [rng.bytes(64 * PS)])
        w.write_pages("pc.ram", 10, [rng.bytes(PS), rng.bytes(PS)])  # rewritten
        w.zero_pages("pc.ram", 20, 5)  # zeroed after holding data
        w.write_pages("pc.ram", 900, [memoryview(rng.bytes(3 * PS))[:PS * 3]])
        w.write_pages("pc.bios", 63, [rng.bytes(PS)])
        dev = encode(SectionFull(3, "timer", 0, 2)) + bytes(24) + encode(SectionFooter(3))
        w.finish(dev, json.dumps({"page_size": PS, "devices": []}).encode())
        # digests only for the 1 MiB chunks that hold data: pc.ram 0 and 3, pc.bios 0
        assert w.digests is not None and w.digests.nbytes == 3 * 256 * 8
        assert w.checksum_info is not None
    finally:
        os.close(fd)
    rep = verify_image(img)
    assert rep.status == "ok" and rep.extents_checked == 5, rep.problems


def test_extension_parser_is_defensive(tmp_path: Path) -> None:
    """Mutated extensions give ChecksumError (or parse), never another exception."""
    img = synth(tmp_path / "d.mr")
    with open_image(img) as im:
        found = ck.find(im._fd, ck.Geometry.of_image(im))
    cs = found.checksums
    assert cs is not None
    raw = ck.encode(cs)
    rng = np.random.default_rng(3)
    outcomes = {"ok": 0, "error": 0}
    for i in range(3000):
        d = bytearray(raw)
        for _ in range(1 + i % 4):
            d[int(rng.integers(len(d)))] = int(rng.integers(256))
        if i % 7 == 0:  # with a consistent header digest, so the caps are what stops it
            d[56:64] = ck._h(bytes(d[8:56])).to_bytes(8, "big")
        try:
            ck.decode(bytes(d[:64]), lambda n, d=d: bytes(d[64 : 64 + n]), room=1 << 20)
            outcomes["ok"] += 1
        except ck.ChecksumError:
            outcomes["error"] += 1
    assert outcomes["error"] > 2500
    # a header claiming a huge body is refused before reading it
    head = bytearray(raw[:64])
    head[24:32] = (1 << 60).to_bytes(8, "big")
    head[56:64] = ck._h(bytes(head[8:56])).to_bytes(8, "big")
    with pytest.raises(ck.ChecksumError, match="claims"):
        ck.decode(bytes(head), lambda n: pytest.fail("read a claimed length"), room=1 << 20)
