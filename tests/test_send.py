"""``fixedram send``: restoring images into real QEMU 10 and 7.2 over exec:, unix: and fd:.

Every restore is checked three ways: the destination's RAM (dumped while paused, before
``cont``) is byte-identical to the source's ``pmemsave``; the guest's heartbeat carries on
after ``cont``; and the guest re-checks every page with ``err=0``. Refusals must happen
before QEMU sees a byte, so the waiting QEMU stays usable.
"""

from __future__ import annotations

import os
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from qemu_images import ImageSpec

from fixedram.endpoint.send import (
    FRESH_MIN_BLOCK,
    dest_ramblocks_from_hmp,
    machine_from_qom_type,
    send,
    validate,
)
from fixedram.errors import MismatchError
from fixedram.image import open_image
from fixedram.image.layout import MAPPED_RAM_HEADER_SIZE
from fixedram.io.channel import FdChannel
from fixedram.qmp.client import QMP
from fixedram.stream import (
    CommandRecord,
    Configuration,
    DeviceState,
    Page,
    RamBlock,
    StreamDecoder,
    VMDescription,
    Zero,
)
from fixedram.testing.guest import read_status
from fixedram.testing.vm import Guest, Heartbeat, QemuBinary, find_qemu
from fixedram.versions import wants_switchover_start

REPO = Path(__file__).resolve().parent.parent
# Not resolve(): .venv/bin/python is a symlink, and following it leaves the venv.
PY = str(Path(sys.executable).absolute())
PS = 4096

# QEMU 10 saving a pc-i440fx-7.2 machine, for restoring into QEMU 7.2.
MAPPED_RAM_AS_72 = ImageSpec(mode="mapped-ram", machine="pc-i440fx-7.2")


# ---------------------------------------------------------------------------------------------
# Pure tests
# ---------------------------------------------------------------------------------------------

HMP_10 = """\
              Block Name    PSize              Offset               Used              Total                HVA  RO
                  pc.ram    4 KiB  0x0000000000000000 0x0000000008000000 0x0000000008000000 0x00007f1cc7e00000  rw
    /rom@etc/acpi/tables    4 KiB  0x0000000008080000 0x0000000000020000 0x0000000000200000 0x00007f1cc7a00000  ro
                 pc.bios    4 KiB  0x0000000008000000 0x0000000000040000 0x0000000000040000 0x00007f1d1c600000  ro
"""  # noqa: E501
HMP_72 = """\
              Block Name    PSize              Offset               Used              Total
                  pc.ram    4 KiB  0x0000000000000000 0x0000000010000000 0x0000000010000000
      /rom@etc/acpi/rsdp    4 KiB  0x00000000082c0000 0x0000000000001000 0x0000000000001000
"""


def test_dest_ramblocks_from_hmp() -> None:
    assert dest_ramblocks_from_hmp(HMP_10) == [
        ("pc.ram", 0x8000000), ("/rom@etc/acpi/tables", 0x20000), ("pc.bios", 0x40000)]
    assert dest_ramblocks_from_hmp(HMP_72) == [("pc.ram", 0x10000000),
                                               ("/rom@etc/acpi/rsdp", 0x1000)]
    assert dest_ramblocks_from_hmp("") == []


def test_switchover_start_rule() -> None:
    assert wants_switchover_start("pc-q35-10.0")
    assert wants_switchover_start("pc-i440fx-10.1")
    assert wants_switchover_start("pc-q35-11.0")
    for old in ("pc-i440fx-7.2", "pc-q35-8.1", "pc-q35-9.2", "pc-i440fx-2.12"):
        assert not wants_switchover_start(old)
    assert not wants_switchover_start("microvm")
    assert wants_switchover_start("microvm", ["SWITCHOVER_START"])
    assert machine_from_qom_type("pc-q35-10.0-machine") == "pc-q35-10.0"


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


class MemoryChannel:
    """A sink channel: collects the stream, counts writes, never sends anything back."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.sendv_calls = 0
        self.shut = False

    def recv_into(self, buf: memoryview) -> int:
        return 0

    def sendall(self, data: Any) -> None:
        self.sendv([data])

    def sendv(self, bufs: Sequence[Any]) -> None:
        self.sendv_calls += 1
        for b in bufs:
            self.data += b

    def shutdown_write(self) -> None:
        self.shut = True

    def fileno_read(self) -> int:
        return -1

    def close(self) -> None:
        pass


@dataclass
class Case:
    """What a restore test needs from an image: the file, the source's RAM, its command line."""

    path: Path
    mem_dump_path: Path
    source: Guest
    last_heartbeat: Heartbeat | None
    machine: str


def _case(c: Any) -> Case:
    return Case(c.path, c.mem_dump_path, c.source, c.last_heartbeat, c.machine)


@pytest.fixture
def sockdir() -> Iterator[Path]:
    """A short directory for unix sockets (sun_path is 108 bytes), removed afterwards."""
    d = Path(tempfile.mkdtemp(prefix="frs-", dir="/tmp"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


def _dest(case: Case, workdir: Path, sockdir: Path, *, qemu: QemuBinary | None = None,
          name: str = "dst", mem: str | None = None, machine: str | None = None,
          extra: Sequence[str] = ()) -> tuple[Guest, Path]:
    """A destination like the source, waiting with ``-incoming defer -S``, plus a second QMP
    socket for ``fixedram send --qmp`` (the harness holds the first one)."""
    dst = Guest.like(case.source, name=name, workdir=workdir, qemu=qemu)
    if mem is not None:
        dst.mem = mem
    if machine is not None:
        dst.machine = machine
    qmp2 = sockdir / f"{name}.qmp"
    dst.extra_args = (*extra, "-qmp", f"unix:{qmp2},server=on,wait=off")
    dst.start()
    return dst, qmp2


def _cli(*args: str, pass_fds: Sequence[int] = ()) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PY, "-m", "fixedram", "send", *args], cwd=REPO, text=True,
                          capture_output=True, timeout=120, pass_fds=tuple(pass_fds),
                          check=False)


def _compare_ram(dst: Guest, case: Case, shm_dir: Path, tag: str) -> None:
    """The destination's RAM must equal the source's pmemsave, byte for byte."""
    got = dst.pmemsave(shm_dir / f"{tag}.dst.mem")
    try:
        a = np.fromfile(got, dtype=np.uint8)
        b = np.fromfile(case.mem_dump_path, dtype=np.uint8)
        assert a.size == b.size
        diff = a.reshape(-1, PS) != b.reshape(-1, PS)
        pages = np.flatnonzero(diff.any(axis=1))
        if dst.accel == "kvm":  # KVM rewrites SeaBIOS data at 0xe8000 (docs/test-guest.md)
            pages = pages[pages != 0xE8000 // PS]
        first = [hex(p * PS) for p in pages[:8]]
        assert pages.size == 0, f"{pages.size} pages differ, first at {first}"
    finally:
        got.unlink(missing_ok=True)


def _check_runs_on(dst: Guest, case: Case) -> None:
    """After ``cont`` the heartbeat carries on, and the guest re-checks every page (err=0)."""
    last = case.last_heartbeat
    assert last is not None
    dst.cont()
    hb = dst.wait_heartbeat(gen_at_least=last.gen + 2, timeout=90)
    assert hb.n > last.n
    beats = dst.heartbeats()
    assert beats and all(b.err == 0 for b in beats), beats[-3:]
    assert not dst.bad_lines()


def _restore(case: Case, transport: str, workdir: Path, sockdir: Path, shm_dir: Path,
             qemu: QemuBinary | None = None, tag: str = "r") -> None:
    """Restore ``case`` with ``fixedram send`` over ``transport`` and check the result."""
    img = str(case.path)
    dst, qmp2 = _dest(case, workdir, sockdir, qemu=qemu, name=f"dst-{tag}")
    with dst:
        if transport == "exec":
            cmd = shlex.join([PY, "-m", "fixedram", "send", "--qmp", str(qmp2), img])
            dst.migrate_incoming(f"exec:{cmd}")
            dst.wait_incoming(60)
            assert "fixedram: sent" in dst.err_path.read_text()
        elif transport == "unix":
            sock = qmp2.parent / "mig.sock"
            dst.migrate_incoming(f"unix:{sock}")
            r = _cli("--connect", f"unix:{sock}", "--qmp", str(qmp2), img)
            assert r.returncode == 0, r.stderr
            assert r.stdout == ""
            dst.wait_incoming(60)
        elif transport == "fd":
            ours, theirs = socket.socketpair()
            with ours, theirs:
                with QMP.connect(qmp2) as q:
                    q.send_fd(theirs.fileno(), "mig")
                    q.cmd("migrate-incoming", uri="fd:mig")
                theirs.close()
                r = _cli("--fd", str(ours.fileno()), "--qmp", str(qmp2), img,
                         pass_fds=[ours.fileno()])
                assert r.returncode == 0, r.stderr
                dst.wait_incoming(60)
        else:
            raise AssertionError(transport)
        assert dst.status() == "paused"
        assert dst.query_migrate().get("status") == "completed"
        _compare_ram(dst, case, shm_dir, tag)
        _check_runs_on(dst, case)


# ---------------------------------------------------------------------------------------------
# Restores of QEMU-written images
# ---------------------------------------------------------------------------------------------

RESTORES = [
    pytest.param("mapped-ram", "10", "exec", id="10-mapped-ram-exec"),
    pytest.param("mapped-ram-multifd2", "10", "unix", id="10-mapped-ram-multifd2-unix"),
    pytest.param("legacy", "10", "fd", id="10-legacy-fd"),
    pytest.param("legacy-7.2", "7.2", "exec", id="72-legacy-exec"),
    pytest.param("legacy-7.2", "7.2", "fd", id="72-legacy-fd"),
    pytest.param(MAPPED_RAM_AS_72, "7.2", "unix", id="10as72-mapped-ram-unix-into-72"),
]


@pytest.mark.qemu
@pytest.mark.parametrize(("kind", "dest", "transport"), RESTORES)
def test_restore_qemu_image(qemu_image: Callable[[Any], Any], shm_dir: Path, tmp_path: Path,
                            sockdir: Path, kind: Any, dest: str, transport: str) -> None:
    case = _case(qemu_image(kind))
    _restore(case, transport, tmp_path, sockdir, shm_dir, qemu=find_qemu(dest), tag=transport)


# ---------------------------------------------------------------------------------------------
# Restores of images written by ``fixedram receive``
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def received_image(tmp_path_factory: pytest.TempPathFactory, shm_dir: Path,
                   accel: str) -> Iterator[Callable[[str], Case]]:
    """Factory: ``received_image("10"|"7.2")``: a running guest saved by ``fixedram receive``
    (over exec:) from that QEMU, with the source's RAM dump."""
    cache: dict[str, Case] = {}
    root = tmp_path_factory.mktemp("received")

    def make(version: str) -> Case:
        if version in cache:
            return cache[version]
        qemu = find_qemu(version)
        machine = "q35" if version == "10" else "pc-i440fx-7.2"
        work = root / version
        work.mkdir()
        img = work / "vm.img"
        src = Guest(qemu, work, name="src", append="mib=32 rate=64 hb=100", mem="128M",
                    machine=machine, accel=accel)
        with src:
            src.wait_heartbeat(gen_at_least=1)
            cmd = shlex.join([PY, "-m", "fixedram", "receive", "--quiet", str(img)])
            src.migrate(f"exec:{cmd}")
            src.wait_migration(120, stop_after=20)
            dump = src.pmemsave(shm_dir / f"received-{version}.mem")
        beats = src.heartbeats()
        assert img.exists(), src.last_error
        with open(dump, "rb") as f:
            f.seek(0x3FF000)
            read_status(f.read(PS), base=0x3FF000)
        cache[version] = Case(img, dump, src, beats[-1] if beats else None, machine)
        return cache[version]

    yield make


@pytest.mark.qemu
@pytest.mark.parametrize(("version", "transport"), [("10", "unix"), ("7.2", "exec")],
                         ids=["10-unix", "72-exec"])
def test_restore_received_image(received_image: Callable[[str], Case], shm_dir: Path,
                                tmp_path: Path, sockdir: Path, version: str,
                                transport: str) -> None:
    case = received_image(version)
    with open_image(case.path) as img:
        assert img.format == "mapped-ram"
    _restore(case, transport, tmp_path, sockdir, shm_dir, qemu=find_qemu(version), tag="recv")


# ---------------------------------------------------------------------------------------------
# The stream itself, and the read pattern
# ---------------------------------------------------------------------------------------------


@pytest.mark.qemu
@pytest.mark.parametrize("fresh", [True, False], ids=["fresh", "every-page"])
@pytest.mark.parametrize("kind", ["mapped-ram", "legacy-7.2"])
def test_stream_rebuilds_source_ram(qemu_image: Callable[[Any], Any], kind: str,
                                    fresh: bool) -> None:
    """Decoding what send() writes gives the source's RAM, with the configuration rewritten
    for a stream and SWITCHOVER_START only for machine types >= 10.0. For a fresh
    destination pages without data get no record; else every page gets exactly one."""
    case = qemu_image(kind)
    ch = MemoryChannel()
    with open_image(case.path) as img:
        report = send(img, ch, fresh=fresh)
        blocks = {n: b.length for n, b in img.blocks.items()}
        device, vmdesc, machine = img.device_state, img.vmdesc, img.machine
    assert ch.shut
    assert report.bytes_sent == len(ch.data)
    dec = StreamDecoder()
    records = dec.feed(ch.data) + dec.feed_eof()
    assert dec.done
    cfg = next(r for r in records if isinstance(r, Configuration))
    assert cfg.machine == machine
    assert not cfg.capabilities
    rbs = [r for r in records if isinstance(r, RamBlock)]
    assert {r.name: r.length for r in rbs} == blocks
    assert all(r.mapped is None for r in rbs)
    cmds = [r.name for r in records if isinstance(r, CommandRecord)]
    want_so = cfg.machine.endswith("-10.0")
    assert cmds == (["SWITCHOVER_START"] if want_so else [])
    assert report.switchover_start == want_so
    ram = np.zeros(blocks["pc.ram"], dtype=np.uint8)
    seen = np.zeros(blocks["pc.ram"] // PS, dtype=np.int8)
    pages = zeros = zero_ram = 0
    for r in records:
        if isinstance(r, Page):
            pages += 1
            if r.block == "pc.ram":
                ram[r.offset : r.offset + PS] = np.frombuffer(r.data, np.uint8)
                seen[r.offset // PS] += 1
        elif isinstance(r, Zero):
            zeros += 1
            assert r.fill == 0
            if r.block == "pc.ram":
                seen[r.offset // PS] += 1
                zero_ram += 1
    if fresh:  # only the pages of small blocks (not guest RAM) get ZERO records
        assert blocks["pc.ram"] > FRESH_MIN_BLOCK
        assert zero_ram == 0 and (seen <= 1).all() and pages == report.pages_sent
        assert pages + report.zero_pages == sum(blocks.values()) // PS
        assert zeros == sum(n // PS for n in blocks.values() if n <= FRESH_MIN_BLOCK) - sum(
            1 for r in records if isinstance(r, Page) and blocks[r.block] <= FRESH_MIN_BLOCK)
    else:
        assert (seen == 1).all()  # every page exactly once
        assert (pages, zeros) == (report.pages_sent, report.zero_pages)
        assert pages + zeros == sum(blocks.values()) // PS
    src = np.fromfile(case.mem_dump_path, dtype=np.uint8)
    assert np.array_equal(ram[: src.size], src)
    assert next(r for r in records if isinstance(r, DeviceState)).data == device
    assert next(r for r in records if isinstance(r, VMDescription)).data == (vmdesc or b"")


@pytest.mark.qemu
def test_reads_one_per_run(qemu_image: Callable[[Any], Any], tmp_path: Path,
                           monkeypatch: pytest.MonkeyPatch) -> None:
    """An image whose pc.ram pages form k runs costs at most a read per run, never one per
    page: runs that lie close together are read in one go, a record buffer's worth of
    pages (256) at a time, from the stretch of the file they lie in (gaps included)."""
    case = qemu_image("mapped-ram")
    path = tmp_path / "runs.img"
    subprocess.run(["cp", "--sparse=always", str(case.path), str(path)], check=True)
    k, run_len, gap = 64, 16, 16
    with open_image(path) as img:
        blk = img.blocks["pc.ram"]
        assert blk.mapped is not None
        bits = np.zeros(blk.npages, dtype=bool)
        for i in range(k):
            bits[i * (run_len + gap) : i * (run_len + gap) + run_len] = True
        raw = np.packbits(bits.astype(np.uint8), bitorder="little").tobytes()
        bitmap_at = blk.mapped.bitmap_offset
    with open(path, "r+b") as f:
        f.seek(bitmap_at)
        f.write(raw)
    calls = 0
    real = os.preadv

    def counting(fd: int, bufs: Any, offset: int, *a: Any) -> int:
        nonlocal calls
        if ram[0] <= offset < ram[1]:  # pc.ram's page data, not bitmaps
            calls += 1
        return real(fd, bufs, offset, *a)

    with open_image(path) as img:
        pc = img.blocks["pc.ram"].mapped
        assert pc is not None
        ram = (pc.pages_offset, pc.pages_offset + img.blocks["pc.ram"].length)
        assert list(img.runs("pc.ram")) == [(i * (run_len + gap), run_len) for i in range(k)]
        ch = MemoryChannel()
        monkeypatch.setattr(os, "preadv", counting)
        report = send(img, ch)
        monkeypatch.undo()
    # 1024 pages in groups of 256, each within 16 runs and 496 pages of the file: 4 reads
    assert calls == k * run_len // 256
    assert report.pages_sent >= k * run_len
    assert ch.sendv_calls <= report.preadv_calls + 8  # a write per group at most


@pytest.mark.qemu
def test_readers_same_stream(qemu_image: Callable[[Any], Any]) -> None:
    """Kernel read-ahead (readers > 1) changes nothing in the stream."""
    case = qemu_image("mapped-ram")
    a, b = MemoryChannel(), MemoryChannel()
    ra = send(case.path, a)
    rb = send(case.path, b, readers=4)
    assert a.data == b.data
    assert (ra.pages_sent, ra.preadv_calls) == (rb.pages_sent, rb.preadv_calls)


@pytest.mark.qemu
def test_validate_against_destination(qemu_image: Callable[[Any], Any]) -> None:
    case = qemu_image("mapped-ram")
    blocks = [(b.name, b.used_length) for b in case.ramblocks]
    validate(case.path, dest_machine="pc-q35-10.0-machine", dest_blocks=blocks)
    with pytest.raises(MismatchError, match=r"machine type differs.*pc-q35-10.0.*pc-q35-9.2"):
        validate(case.path, dest_machine="pc-q35-9.2", dest_blocks=blocks)
    bigger = [(n, 2 * ln if n == "pc.ram" else ln) for n, ln in blocks]
    with pytest.raises(MismatchError, match=r"'pc.ram' differs in size: image 128 MiB.*"
                                            r"destination 256 MiB"):
        validate(case.path, dest_blocks=bigger)
    with pytest.raises(MismatchError, match=r"'pc.bios' .* missing in the destination"):
        validate(case.path, dest_blocks=[b for b in blocks if b[0] != "pc.bios"])
    with pytest.raises(MismatchError, match=r"'vga.vram' .* not in the image"):
        validate(case.path, dest_blocks=[*blocks, ("vga.vram", 16 << 20)])


# ---------------------------------------------------------------------------------------------
# Refusals, before QEMU sees a byte
# ---------------------------------------------------------------------------------------------


def _corrupt_copies(src: Path, workdir: Path) -> dict[str, tuple[Path, str]]:
    """A truncated image and corrupt ones, with the error each must produce."""
    with open_image(src) as img:
        blk = img.blocks["pc.ram"]
        rsdp = img.blocks["/rom@etc/acpi/rsdp"]
        assert blk.mapped is not None and rsdp.mapped is not None
        hdr_at = blk.mapped.bitmap_offset - MAPPED_RAM_HEADER_SIZE
        rsdp_bitmap = rsdp.mapped.bitmap_offset
    out = {}
    trunc = workdir / "truncated.img"
    subprocess.run(["cp", "--sparse=always", str(src), str(trunc)], check=True)
    os.truncate(trunc, os.path.getsize(trunc) // 2)
    out["truncated"] = (trunc, "past the end of the file|incomplete")
    page = workdir / "pagesize.img"
    subprocess.run(["cp", "--sparse=always", str(src), str(page)], check=True)
    with open(page, "r+b") as f:  # header page_size 4096 -> 8192
        f.seek(hdr_at + 4)
        f.write((8192).to_bytes(8, "big"))
    out["page-size"] = (page, "page size 8192")
    beyond = workdir / "beyond.img"
    subprocess.run(["cp", "--sparse=always", str(src), str(beyond)], check=True)
    with open(beyond, "r+b") as f:  # the 1-page rsdp block: set bit 5
        f.seek(rsdp_bitmap)
        f.write(b"\x21")
    out["bit-beyond"] = (beyond, "beyond the block")
    return out


def _refused(r: subprocess.CompletedProcess[str], pattern: str) -> None:
    import re

    assert r.returncode != 0
    assert r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("fixedram: error: ")
    assert re.search(pattern, lines[0]), lines[0]


def _still_waiting(dst: Guest) -> None:
    assert dst.running
    assert dst.status() == "inmigrate"
    assert dst.query_migrate().get("status") in (None, "setup", "none")


@pytest.mark.qemu
def test_refusals_leave_qemu_usable(qemu_image: Callable[[Any], Any], shm_dir: Path,
                                    tmp_path: Path, sockdir: Path) -> None:
    """Truncated/corrupt images and an image of another machine type are refused with one
    line; the waiting QEMU then takes a correct restore."""
    case = _case(qemu_image("mapped-ram"))
    other_machine = qemu_image("legacy-7.2")
    bad = _corrupt_copies(case.path, tmp_path)
    dst, qmp2 = _dest(case, tmp_path, sockdir)
    with dst:
        sock = qmp2.parent / "mig.sock"
        dst.migrate_incoming(f"unix:{sock}")
        for _, (path, pattern) in bad.items():
            _refused(_cli("--connect", f"unix:{sock}", str(path)), pattern)
            _still_waiting(dst)
        _refused(_cli("--connect", f"unix:{sock}", "--qmp", str(qmp2), str(other_machine.path)),
                 r"machine type differs: image 'pc-i440fx-7.2', destination 'pc-q35-10.0'")
        _still_waiting(dst)
        r = _cli("--connect", f"unix:{sock}", "--qmp", str(qmp2), str(case.path))
        assert r.returncode == 0, r.stderr
        dst.wait_incoming(60)
        _compare_ram(dst, case, shm_dir, "refusals")
        _check_runs_on(dst, case)


@pytest.mark.qemu
@pytest.mark.parametrize(
    ("what", "pattern"),
    [
        ("mem", r"RAM block 'pc.ram' differs in size: image 128 MiB \(0x8000000\), "
                r"destination 256 MiB \(0x10000000\)"),
        ("missing", r"RAM block '/rom@etc/acpi/tables' \(128 KiB\) of the image is missing"),
        ("extra", r"RAM block '.*vga.*' .* of the destination is not in the image"),
    ],
    ids=["mem", "missing", "extra"],
)
def test_refuses_mismatched_destination(qemu_image: Callable[[Any], Any], tmp_path: Path,
                                        sockdir: Path, what: str, pattern: str) -> None:
    """Another RAM size, a block missing on the destination, or an extra one: refused with
    the block and both sizes named, and the destination still waits untouched."""
    case = _case(qemu_image("mapped-ram"))
    kw: dict[str, Any] = {}
    if what == "mem":
        kw["mem"] = "256M"
    elif what == "missing":
        kw["machine"] = "q35,acpi=off"
    else:
        kw["extra"] = ("-device", "VGA")
    dst, qmp2 = _dest(case, tmp_path, sockdir, **kw)
    with dst:
        sock = qmp2.parent / "mig.sock"
        dst.migrate_incoming(f"unix:{sock}")
        _refused(_cli("--connect", f"unix:{sock}", "--qmp", str(qmp2), str(case.path)), pattern)
        _still_waiting(dst)


def test_cli_one_line_errors(tmp_path: Path) -> None:
    r = _cli("--connect", "unix:/x", "--fd", "3", str(tmp_path / "nope.img"))
    assert r.returncode != 0
    _refused(_cli(str(tmp_path / "nope.img")), "cannot open")
    garbage = tmp_path / "garbage.img"
    garbage.write_bytes(b"x" * 100)
    _refused(_cli(str(garbage)), "not a QEMU migration image")


@pytest.mark.parametrize("direct", [False, True], ids=["buffered", "direct"])
@pytest.mark.parametrize("every", [2, 3, 300], ids=["alternate", "every-third", "sparse"])
def test_scattered_pages_one_stream(every: int, direct: bool, tmp_path: Path) -> None:
    """A guest whose pages with data are scattered among zero pages, sent over one
    connection from fixedram's own image (checksums checked as the pages are read): every
    page arrives once with its data, in a few reads; a page changed in the file stops the
    stream before the device state, naming the pages."""
    from synth_images import write_mapped_image

    from fixedram.commands.convert import convert
    from fixedram.errors import ImageError

    src, own = tmp_path / "qemu.img", tmp_path / "own.img"
    wanted = {i: bytes([i % 251 + 1]) * PS for i in range(0, 4096 * 3, every)}
    write_mapped_image(src, {"pc.ram": 128 << 20}, {"pc.ram": wanted})  # guest RAM: > 64 MiB
    convert(src, own)
    ch = MemoryChannel()
    report = send(own, ch, direct_io=direct)
    assert report.direct_io == direct
    dec = StreamDecoder()
    got = {r.offset // PS: r.data for r in dec.feed(ch.data) + dec.feed_eof()
           if isinstance(r, Page) and r.block == "pc.ram"}
    assert got == wanted
    assert report.pages_sent == len(wanted)
    assert report.zero_pages == (128 << 20) // PS - len(wanted)
    if every < 300:  # close together: a read per 256 pages (and one per small block)
        assert report.preadv_calls <= len(wanted) // 256 + 4
    # a destination whose RAM may hold data: every other page gets one ZERO record too
    ch = MemoryChannel()
    every_page = send(own, ch, direct_io=direct, fresh=False)
    dec = StreamDecoder()
    records = [r for r in dec.feed(ch.data) + dec.feed_eof()
               if isinstance(r, Page | Zero) and r.block == "pc.ram"]
    assert {r.offset // PS: r.data for r in records if isinstance(r, Page)} == wanted
    seen = np.bincount([r.offset // PS for r in records], minlength=(128 << 20) // PS)
    assert (seen == 1).all()
    assert (every_page.pages_sent, every_page.zero_pages) == (report.pages_sent,
                                                               report.zero_pages)
    assert every_page.preadv_calls == report.preadv_calls
    with open_image(own) as img:
        mapped = img.block("pc.ram").mapped
        assert mapped is not None
    with open(own, "r+b") as f:  # one byte of a page in the middle
        f.seek(mapped.pages_offset + 3000 * PS + 17)  # page 3000 holds data in each case
        f.write(b"\xee")
    with pytest.raises(ImageError, match=r"pages 2816-3071.*does not match its checksum"):
        send(own, MemoryChannel(), direct_io=direct)


@pytest.mark.parametrize("kind", ["interleaved", "pages-only"])
def test_scattered_legacy_stream(kind: str, tmp_path: Path,
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """A legacy stream whose pages with data are scattered, written as QEMU writes them
    over one connection (page and zero records in turn) or with its zero pages left out:
    opened (its index built from whole stretches of records), sent as one stream, every
    page arrives once with its data."""
    from synth_images import device_blob, vmdesc, write_mapped_image

    from fixedram.commands.convert import convert
    from fixedram.stream import (
        EndOfFile,
        EndOfSection,
        FileHeader,
        MemSize,
        SectionEnd,
        SectionFooter,
        SectionPart,
        SectionStart,
        StreamEncoder,
        encode,
    )

    # every other page, then a run of 1000 (consecutive records in the file)
    wanted = {i: bytes([i % 251 + 1]) * PS for i in [*range(0, 6000, 2), *range(6000, 7000)]}
    legacy = tmp_path / "legacy.stream"
    if kind == "pages-only":
        src = tmp_path / "src.img"
        write_mapped_image(src, {"pc.ram": 128 << 20}, {"pc.ram": wanted})
        convert(src, legacy, to="stream")
    else:
        enc = StreamEncoder()
        eos = encode(EndOfSection()) + encode(SectionFooter(2))
        out = [encode(FileHeader()), encode(Configuration("pc-q35-10.0")),
               encode(SectionStart(2, "ram", 0, 4)), encode(MemSize(128 << 20)),
               encode(RamBlock("pc.ram", 128 << 20)), eos, encode(SectionPart(2))]
        out += [enc.encode(Page("pc.ram", i * PS, wanted[i]) if i in wanted else
                           Zero("pc.ram", i * PS)) for i in range(7000)]
        out += [eos, encode(SectionEnd(2)), eos, device_blob(), encode(EndOfFile()),
                encode(VMDescription(vmdesc()))]
        legacy.write_bytes(b"".join(out))
    with open_image(legacy) as img:
        assert img.format == "stream"
        assert np.flatnonzero(img.present("pc.ram")).tolist() == sorted(wanted)
        ch = MemoryChannel()
        report = send(img, ch)
    dec = StreamDecoder()
    got = {r.offset // PS: r.data for r in dec.feed(ch.data) + dec.feed_eof()
           if isinstance(r, Page) and r.block == "pc.ram"}
    assert got == wanted
    assert report.pages_sent == len(wanted)
    assert report.preadv_calls <= len(wanted) // 256 + 4  # gathered, not a read per page
    # into a file descriptor (records as the file stores them, by sendfile), for a
    # destination whose RAM may hold data: every page of the block exactly once
    send_module = sys.modules["fixedram.endpoint.send"]  # (the package's `send` is the function)
    files = []
    real_sendfile = send_module.sendfile_all

    def sendfile_all(out_fd: int, in_fd: int, offset: int, count: int) -> int:
        files.append(count)
        return real_sendfile(out_fd, in_fd, offset, count)

    monkeypatch.setattr(send_module, "sendfile_all", sendfile_all)
    out = tmp_path / "sent.stream"
    ch = FdChannel(os.open(os.devnull, os.O_RDONLY), os.open(out, os.O_WRONLY | os.O_CREAT,
                                                             0o600))
    try:
        send(legacy, ch, fresh=False)
    finally:
        ch.close()
    assert sum(files) >= 512 * (PS + 8)  # most of the run went out from the file
    dec = StreamDecoder()
    records = [r for r in dec.feed(out.read_bytes()) + dec.feed_eof()
               if isinstance(r, Page | Zero) and r.block == "pc.ram"]
    assert {r.offset // PS: r.data for r in records if isinstance(r, Page)} == wanted
    assert (np.bincount([r.offset // PS for r in records], minlength=(128 << 20) // PS)
            == 1).all()
