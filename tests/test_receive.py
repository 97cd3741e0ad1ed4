"""``fixedram receive``: QEMU 10 and 7.2 save running guests through fixedram; QEMU 10 loads them.

Also: the writer on its own (no QEMU), byte compatibility of the image prefix with a file
QEMU wrote itself, return path + switchover-ack, a live save that never converges, and crash
safety (either side killed at several points leaves no partial image).
"""

from __future__ import annotations

import filecmp
import importlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fixedram.endpoint import ReceiveReport, receive
from fixedram.errors import FixedramError
from fixedram.image import MappedRamWriter, open_image
from fixedram.image.layout import (
    MAPPED_RAM_HEADER_SIZE,
    PAGE_SIZE,
    block_geometry,
    index_runs,
)
from fixedram.image.verify import verify_image
from fixedram.io.channel import SocketChannel
from fixedram.stream import (
    CommandRecord,
    Configuration,
    EndOfFile,
    EndOfSection,
    FileHeader,
    MemSize,
    Page,
    RamBlock,
    SectionEnd,
    SectionFooter,
    SectionFull,
    SectionPart,
    SectionStart,
    StreamEncoder,
    VMDescription,
    Zero,
    encode,
)
from fixedram.stream.format import Command
from fixedram.stream.returnpath import encode_pong, encode_shut, encode_switchover_ack
from fixedram.testing.vm import Guest, QemuBinary, qemu_restore

PY = sys.executable  # the venv's python, not resolved (the symlink carries the venv)
APPEND = "mib=32 rate=32 hb=100"


# -- helpers ----------------------------------------------------------------------------------


def fixedram_cmd(*args: str) -> list[str]:
    return [PY, "-m", "fixedram", *args]


def assert_same_ram(a: Path, b: Path) -> None:
    """Two memory dumps are identical (else: how many pages differ, and where).

    This holds for QEMU 7.2 sources too: the test guest keeps all the state it rewrites in a
    page that TCG tracks as a code page (see "the hot page" in ``fixedram/testing/guest/dirty.c``).
    """
    if filecmp.cmp(a, b, shallow=False):
        return
    x = np.fromfile(a, dtype=np.uint8)
    y = np.fromfile(b, dtype=np.uint8)
    assert x.size == y.size, f"dump sizes differ: {x.size} != {y.size}"
    bad = np.flatnonzero((x.reshape(-1, PAGE_SIZE) != y.reshape(-1, PAGE_SIZE)).any(axis=1))
    pytest.fail(f"{len(bad)} pages differ: GPA "
                f"{', '.join(hex(int(p) * PAGE_SIZE) for p in bad[:8])}")


def pass_fd(guest: Guest, fd: int, name: str) -> None:
    """Hand ``fd`` to QEMU over QMP (SCM_RIGHTS) as ``name`` (QMP ``getfd``)."""
    guest.send_fd(fd, name)


def start_source(qemu: QemuBinary, workdir: Path, accel: str, *, append: str = APPEND,
                 mem: str = "128M", name: str = "src") -> Guest:
    machine = "q35" if qemu.version >= (10, 0, 0) else "pc-i440fx-7.2"
    g = Guest(qemu, workdir, name=name, append=append, mem=mem, machine=machine, accel=accel)
    g.start()
    g.wait_heartbeat(gen_at_least=1)
    return g


def wait_file(path: Path, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.01)


def leftovers(d: Path, keep: set[str]) -> list[str]:
    """Files in ``d`` other than ``keep`` and QEMU's own logs/sockets (partial images)."""
    return sorted(p.name for p in d.iterdir()
                  if p.name not in keep and "fixedram-partial" in p.name)


def check_restore(src: Guest, img: Path, src_dump: Path, last_hb: int, q10: QemuBinary,
                  workdir: Path, shm: Path) -> None:
    """QEMU 10 loads ``img`` natively; RAM equals the source's; the guest carries on."""
    with qemu_restore(src, img, "mapped-ram", qemu=q10, workdir=workdir) as dst:
        dump = dst.pmemsave(shm / f"{workdir.name}-dst.mem")
        assert_same_ram(src_dump, dump)
        with open_image(img) as im:  # what QEMU loaded is exactly what the image holds
            low = 1 << 20
            n = src.mem_bytes // PAGE_SIZE
            assert bytes(im.read("pc.ram", low // PAGE_SIZE, n - low // PAGE_SIZE)) == \
                dump.read_bytes()[low:]
        dump.unlink()
        dst.cont()
        hb = dst.wait_heartbeat(n_at_least=last_hb + 2, timeout=30)
        assert hb.err == 0, dst.serial_tail()
        assert not dst.bad_lines()


# -- the writer alone -------------------------------------------------------------------------

DEVICE = (encode(SectionFull(3, "timer", 0, 2)) + b"\x00" * 24 + encode(SectionFooter(3)))


def test_writer_layout_and_zero_punch(tmp_path: Path) -> None:
    img = tmp_path / "w.img"
    blocks = [RamBlock("pc.ram", 4 << 20), RamBlock("pc.bios", 256 << 10),
              RamBlock("/rom@etc/acpi/rsdp", 4096)]
    fd = os.open(img, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        w = MappedRamWriter(fd)
        w.begin(Configuration("pc-q35-10.0"), blocks, section_id=7)
        page = bytes(range(256)) * 16
        assert w.write_pages("pc.ram", 10, [page, page, page]) == 3
        w.write_pages("pc.ram", 11, [b"\x11" * PAGE_SIZE])  # rewrite in place
        w.write_pages("pc.bios", 0, [memoryview(b"\x22" * (2 * PAGE_SIZE))])
        assert w.zero_pages("pc.ram", 12, 5) == 1  # page 12 had data: hole punched
        assert w.zero_pages("pc.ram", 100, 3) == 0
        with pytest.raises(Exception, match="outside"):
            w.write_pages("pc.ram", 1024, [page])
        size = w.finish(DEVICE, b'{"page_size": 4096}', parts=2)
        assert os.fstat(fd).st_size == size
    finally:
        os.close(fd)
    with open_image(img) as im:
        assert im.format == "mapped-ram"
        assert im.machine == "pc-q35-10.0"
        assert im.capabilities == ("mapped-ram",)
        assert list(im.blocks) == ["pc.ram", "pc.bios", "/rom@etc/acpi/rsdp"]
        assert np.flatnonzero(im.present("pc.ram")).tolist() == [10, 11]
        assert bytes(im.read("pc.ram", 10, 3)) == page + b"\x11" * PAGE_SIZE + bytes(PAGE_SIZE)
        assert np.flatnonzero(im.present("pc.bios")).tolist() == [0, 1]
        assert im.device_state == DEVICE
        # QEMU's geometry: bitmap right after the header, pages on 1 MiB, chaining
        pos = im.blocks["pc.ram"].mapped
        assert pos is not None and pos.pages_offset == 1 << 20
        nxt = pos.pages_offset + (4 << 20)
        bios = im.blocks["pc.bios"].mapped
        assert bios is not None
        hdr = nxt + 1 + len("pc.bios") + 8
        assert (bios.bitmap_offset, bios.pages_offset) == block_geometry(hdr, 256 << 10)[:2]
    # the zeroed page is a hole again
    fd = os.open(img, os.O_RDONLY)
    try:
        start = (1 << 20) + 12 * PAGE_SIZE
        assert os.lseek(fd, start, os.SEEK_DATA) > start
    finally:
        os.close(fd)


def test_writer_page_sets_match_per_run(tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Scattered writes and zeroing in one call each (``write_page_set``, ``zero_page_set``)
    leave the same file, counters and checksums as the same operations run by run, also
    when the kernel writes only part of a run at a time."""
    rng = np.random.default_rng(9)
    blocks = [RamBlock("pc.ram", 160 << 20), RamBlock("pc.rom", 128 << 10)]
    ops: list[tuple[str, np.ndarray, int]] = []
    for k in range(60):
        pages = np.unique(rng.integers(0, 40960, size=int(rng.integers(2, 300))))
        ops.append(("zero" if k % 3 == 2 else "write", pages, k))
    ops.append(("write", np.array([0, 2, 4, 31]), 99))
    ops.append(("write", np.array([100, 101, 102, 103, 300, 301, 302, 900]), 98))
    real_pwritev = os.pwritev

    def short_pwritev(fd: int, bufs: Any, offset: int) -> int:
        """Writes all but the last 100 bytes of more than two pages."""
        data = b"".join(bytes(b) for b in bufs)
        if len(data) <= 2 * PAGE_SIZE:
            return real_pwritev(fd, bufs, offset)
        return os.pwrite(fd, data[:-100], offset)

    files = []
    for batched, short in ((False, False), (True, False), (True, True)):
        path = tmp_path / f"{batched}-{short}.img"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        if short:
            monkeypatch.setattr(os, "pwritev", short_pwritev)
        try:
            w = MappedRamWriter(fd)
            w.begin(Configuration("pc-q35-10.0"), blocks)
            for kind, pages, k in ops:
                block = "pc.rom" if k == 99 else "pc.ram"
                views = [memoryview(bytes([k, int(p) % 256]) * (PAGE_SIZE // 2)) for p in pages]
                runs = index_runs(pages)
                if kind == "write" and batched:
                    assert w.write_page_set(block, pages, views) == len(pages)
                elif kind == "write":
                    for i, first, n in runs:
                        w.write_page_views(block, first, views[i : i + n])
                elif batched:
                    w.zero_page_set(block, pages)
                else:
                    for _, first, n in runs:
                        w.zero_pages(block, first, n)
            counters = (w.pages_written, w.holes_punched, w.pages_present)
            w.finish(DEVICE, b'{"page_size": 4096}', parts=1)
        finally:
            os.close(fd)
            monkeypatch.undo()
        files.append((path.read_bytes(), counters))
    assert files[0][1] == files[1][1] == files[2][1] and files[0][1][1] > 0
    assert files[0][0] == files[1][0] == files[2][0]
    assert verify_image(tmp_path / "True-True.img").status == "ok"


def synthetic_stream(return_path: bool = False) -> bytes:
    """A small precopy stream: 2 blocks, rewritten pages, a page zeroed after it had data."""
    enc = StreamEncoder()
    sid = 2
    out = [encode(FileHeader()), encode(Configuration("pc-i440fx-10.0"))]
    if return_path:
        out += [encode(CommandRecord(Command.OPEN_RETURN_PATH)),
                encode(CommandRecord(Command.PING, (7).to_bytes(4, "big")))]
    eos = encode(EndOfSection()) + encode(SectionFooter(sid))
    out += [encode(SectionStart(sid, "ram", 0, 4)), encode(MemSize(2 << 20)),
            encode(RamBlock("pc.ram", (2 << 20) - 8192)), encode(RamBlock("pc.rom", 8192)), eos]
    a, b = b"\xaa" * PAGE_SIZE, b"\xbb" * PAGE_SIZE
    out += [encode(SectionPart(sid))]
    out += [bytes(x) for x in enc.page_run("pc.ram", 0, a * 300)]  # > one 256-page run
    out += [enc.zero_run("pc.ram", 300 * PAGE_SIZE, 10)]
    out += [bytes(x) for x in enc.page_run("pc.rom", 0, a)]
    out += [eos, encode(SectionPart(sid))]
    out += [bytes(x) for x in enc.page_run("pc.ram", 5 * PAGE_SIZE, b * 2)]  # rewrite
    out += [enc.zero_run("pc.ram", 7 * PAGE_SIZE, 1)]  # had data: hole punched
    out += [eos, encode(CommandRecord(Command.SWITCHOVER_START)), encode(SectionEnd(sid))]
    out += [bytes(x) for x in enc.page_run("pc.rom", PAGE_SIZE, b)]
    out += [eos, DEVICE, encode(EndOfFile()), encode(VMDescription(b'{"page_size": 4096}'))]
    return b"".join(out)


class _Pipe:
    """A Channel fed from bytes in small pieces, recording what is sent back."""

    def __init__(self, data: bytes, piece: int = 1000) -> None:
        self.data, self.pos, self.piece, self.sent = data, 0, piece, b""

    def recv_into(self, buf: memoryview) -> int:
        n = min(self.piece, len(buf), len(self.data) - self.pos)
        buf[:n] = self.data[self.pos : self.pos + n]
        self.pos += n
        return n

    def sendall(self, data: Any) -> None:
        self.sent += bytes(data)

    def sendv(self, bufs: Any) -> None:
        for b in bufs:
            self.sendall(b)

    def shutdown_write(self) -> None:
        pass

    def fileno_read(self) -> int:
        return -1

    def close(self) -> None:
        pass


@pytest.mark.parametrize("direct", [False, True])
def test_receive_synthetic(direct: bool, tmp_path: Path) -> None:
    img = tmp_path / "vm.img"
    stats: list[Any] = []
    ch = _Pipe(synthetic_stream(return_path=True))
    rep = receive(ch, img, direct_io=direct, progress=stats.append)  # type: ignore[arg-type]
    assert ch.sent == (encode_switchover_ack() + encode_pong(7) + encode_shut(False))
    assert rep.return_path and rep.direct_io == direct
    assert rep.sections == 4 and rep.zero_pages == 11
    assert rep.pages_written == 300 + 1 + 2 + 1
    assert rep.pages_present == 300 - 1 + 2
    assert rep.machine == "pc-i440fx-10.0" and rep.ram_size == 2 << 20
    assert rep.apparent_size == img.stat().st_size and stats
    with open_image(img) as im:
        assert im.commands == ["SWITCHOVER_START"]
        assert np.flatnonzero(~im.present("pc.ram")[:300]).tolist() == [7]
        data = im.read("pc.ram", 0, 310)
        assert data[5 * PAGE_SIZE : 7 * PAGE_SIZE] == b"\xbb" * 2 * PAGE_SIZE
        assert data[7 * PAGE_SIZE : 8 * PAGE_SIZE] == bytes(PAGE_SIZE)
        assert data[8 * PAGE_SIZE : 9 * PAGE_SIZE] == b"\xaa" * PAGE_SIZE
        assert im.read("pc.rom", 0, 2) == b"\xaa" * PAGE_SIZE + b"\xbb" * PAGE_SIZE
        assert im.device_state == DEVICE
    assert leftovers(tmp_path, set()) == []


def scattered_stream() -> bytes:
    """A stream whose pages with data alternate with zero pages, over one connection: pages
    0-99 with data, then the even ones rewritten and the odd ones zeroed in one stretch of
    interleaved records, then zero records of every other page from 200 alone."""
    enc = StreamEncoder()
    sid = 2
    eos = encode(EndOfSection()) + encode(SectionFooter(sid))
    out = [encode(FileHeader()), encode(Configuration("pc-i440fx-10.0")),
           encode(SectionStart(sid, "ram", 0, 4)), encode(MemSize(2 << 20)),
           encode(RamBlock("pc.ram", 2 << 20)), eos, encode(SectionPart(sid))]
    out += [bytes(x) for x in enc.page_run("pc.ram", 0, b"\xaa" * 100 * PAGE_SIZE)]
    out += [eos, encode(SectionPart(sid))]
    out += [enc.encode(Zero("pc.ram", i * PAGE_SIZE)) if i % 2 else
            enc.encode(Page("pc.ram", i * PAGE_SIZE, bytes([i]) * PAGE_SIZE))
            for i in range(100)]
    out += [enc.encode(Zero("pc.ram", i * PAGE_SIZE)) for i in range(200, 300, 2)]
    out += [eos, encode(SectionEnd(sid)), eos, DEVICE, encode(EndOfFile()),
            encode(VMDescription(b'{"page_size": 4096}'))]
    return b"".join(out)


@pytest.mark.parametrize("direct", [False, True])
def test_receive_scattered(direct: bool, tmp_path: Path) -> None:
    """Interleaved page and zero records (decoded as one set) land as the records say: the
    pages rewritten, the zeroed ones punched out, the checksums right."""
    img = tmp_path / "vm.img"
    rep = receive(_Pipe(scattered_stream(), piece=1 << 20), img,  # type: ignore[arg-type]
                  direct_io=direct)
    assert rep.pages_written == 100 + 50 and rep.zero_pages == 50 + 50
    assert rep.pages_present == 50
    with open_image(img) as im:
        assert np.flatnonzero(im.present("pc.ram")).tolist() == list(range(0, 100, 2))
        data = im.read("pc.ram", 0, 100)
        for i in range(100):
            page = data[i * PAGE_SIZE : (i + 1) * PAGE_SIZE]
            assert page == (bytes(PAGE_SIZE) if i % 2 else bytes([i]) * PAGE_SIZE), i
        mapped = im.block("pc.ram").mapped
        assert mapped is not None
    fd = os.open(img, os.O_RDONLY)  # a zeroed page that had data is a hole again
    try:
        start = mapped.pages_offset + 3 * PAGE_SIZE
        assert os.lseek(fd, start, os.SEEK_DATA) > start
    finally:
        os.close(fd)
    assert verify_image(img).status == "ok"


def test_receive_direct_io_fallback(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    # the package attribute `receive` is the function; take the module from sys.modules
    rmod = importlib.import_module("fixedram.endpoint.receive")
    monkeypatch.setattr(rmod, "open_direct", lambda *a, **k: None)
    rep = receive(_Pipe(synthetic_stream()), tmp_path / "a.img", direct_io=True)
    assert not rep.direct_io
    err = capsys.readouterr().err
    assert err.startswith("fixedram: warning:") and err.count("\n") == 1
    with pytest.raises(FixedramError, match="O_DIRECT"):
        receive(_Pipe(synthetic_stream()), tmp_path / "b.img", direct_io="required")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.img"]


def test_receive_refuses_multifd_and_truncation(tmp_path: Path) -> None:
    s = synthetic_stream()
    cut = s.index(encode(SectionPart(2)))
    multifd = s[:cut] + encode(SectionPart(2)) + (0x200).to_bytes(8, "big")
    with pytest.raises(FixedramError, match=r"uses multifd .* --channels N"):
        receive(_Pipe(multifd), tmp_path / "m.img")
    with pytest.raises(FixedramError, match="closed the connection before the end"):
        receive(_Pipe(s[:-50]), tmp_path / "t.img")
    assert list(tmp_path.iterdir()) == []


# -- QEMU saves through fixedram receive ------------------------------------------------------


@pytest.mark.qemu
@pytest.mark.parametrize("transport", ["exec", "unix", "fd"])
@pytest.mark.parametrize("version", ["10", "7.2"])
def test_receive_from_qemu(version: str, transport: str, tmp_path: Path, shm_dir: Path,
                           accel: str, qemu10: QemuBinary, qemu72: QemuBinary,
                           guest_elf: Path, request: pytest.FixtureRequest) -> None:
    qemu = qemu10 if version == "10" else qemu72
    img = tmp_path / "vm.img"
    src_dump = shm_dir / f"{tmp_path.name}-src.mem"
    proc: subprocess.Popen[bytes] | None = None
    result: dict[str, Any] = {}
    with start_source(qemu, tmp_path, accel) as src:
        if transport == "exec":
            src.migrate(f"exec:{PY} -m fixedram receive {img} 2>>{tmp_path}/recv.err")
        elif transport == "unix":
            sock = tmp_path / "mig.sock"
            proc = subprocess.Popen(fixedram_cmd("receive", str(img), "--listen", f"unix:{sock}",
                                                 "--accept-timeout", "60"),
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            wait_file(sock)
            src.migrate(f"unix:{sock}")
        elif version == "7.2":  # fd: through `fixedram receive --fd N`
            a, b = socket.socketpair()
            pass_fd(src, a.fileno(), "mig")
            a.close()
            proc = subprocess.Popen(fixedram_cmd("receive", str(img), "--fd", str(b.fileno())),
                                    pass_fds=[b.fileno()], stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE)
            b.close()
            src.migrate("fd:mig")
        else:  # fd: with the library's receive() in a thread
            a, b = socket.socketpair()
            pass_fd(src, a.fileno(), "mig")
            a.close()

            def run() -> None:
                try:
                    result["report"] = receive(SocketChannel(b), img)
                except BaseException as e:  # pragma: no cover - reported below
                    result["error"] = e
                finally:
                    b.close()

            th = threading.Thread(target=run)
            th.start()
            src.migrate("fd:mig")
        info = src.wait_migration(60, stop_after=20)
        assert info["status"] == "completed"
        src.pmemsave(src_dump)
        last = src.heartbeats()[-1]
        if proc is not None:
            out, err = proc.communicate(timeout=30)
            assert proc.returncode == 0, err.decode()
            assert out == b""  # nothing but return-path bytes on stdout (none here)
            assert b"fixedram: saved" in err
        if transport == "fd" and version == "10":
            th.join(30)
            assert "error" not in result, result.get("error")
            rep: ReceiveReport = result["report"]
            assert rep.ram_size >= 128 << 20
            assert rep.pages_present <= rep.pages_written
            assert rep.apparent_size == img.stat().st_size
        if transport == "exec":
            assert "fixedram: saved" in (tmp_path / "recv.err").read_text()
    assert leftovers(tmp_path, set()) == []
    with open_image(img) as im:
        assert im.format == "mapped-ram"
        assert im.machine.startswith("pc-q35-10" if version == "10" else "pc-i440fx-7.2")
        if version == "7.2":
            assert "SWITCHOVER_START" not in im.commands
    check_restore(src, img, src_dump, last.n, qemu10, tmp_path, shm_dir)
    src_dump.unlink()
    if version == "10" and transport == "exec":
        compare_with_qemu_file(img, request)


def compare_with_qemu_file(img: Path, request: pytest.FixtureRequest) -> None:
    """Our prefix (header ... each block header ... EOS) equals the file QEMU 10 writes itself."""
    case = request.getfixturevalue("qemu_image")("mapped-ram")
    theirs, ours = case.path.read_bytes(), None
    with open_image(case.path) as q, open_image(img) as m:
        assert [(b.name, b.length, b.mapped) for b in q.blocks.values()] == \
               [(b.name, b.length, b.mapped) for b in m.blocks.values()]
        first = next(iter(m.blocks.values())).mapped
        assert first is not None
        with open(img, "rb") as f:
            ours = f.read(first.bitmap_offset)
        assert ours == theirs[: first.bitmap_offset]
        for b in m.blocks.values():
            assert b.mapped is not None
            at = b.mapped.bitmap_offset - MAPPED_RAM_HEADER_SIZE - 8 - 1 - len(b.name)
            with open(img, "rb") as f:
                f.seek(at)
                mine = f.read(b.mapped.bitmap_offset - at)
            assert mine == theirs[at : b.mapped.bitmap_offset], b.name
        assert q.commands == m.commands  # SWITCHOVER_START as QEMU writes it


@pytest.mark.qemu
@pytest.mark.parametrize("version", ["10", "7.2"])
def test_return_path(version: str, tmp_path: Path, shm_dir: Path, accel: str,
                     qemu10: QemuBinary, qemu72: QemuBinary, guest_elf: Path) -> None:
    """return-path (+ switchover-ack on 10): PONG, SWITCHOVER_ACK, SHUT; the source completes."""
    qemu = qemu10 if version == "10" else qemu72
    caps = {"return-path": True}
    if version == "10":
        caps["switchover-ack"] = True
    img = tmp_path / "vm.img"
    src_dump = shm_dir / f"{tmp_path.name}-src.mem"
    with start_source(qemu, tmp_path, accel) as src:
        src.migrate(f"exec:{PY} -m fixedram receive {img} 2>>{tmp_path}/recv.err", caps=caps)
        # a running source with switchover-ack never completes without the ACK
        info = src.wait_migration(60, stop_after=None)
        assert info["status"] == "completed"
        src.pmemsave(src_dump)
        last = src.heartbeats()[-1]
    assert "fixedram: saved" in (tmp_path / "recv.err").read_text()
    check_restore(src, img, src_dump, last.n, qemu10, tmp_path, shm_dir)
    src_dump.unlink()


@pytest.mark.qemu
@pytest.mark.long
def test_live_save_never_converging(tmp_path: Path, shm_dir: Path, accel: str,
                                    qemu10: QemuBinary, guest_elf: Path) -> None:
    """A guest dirtying faster than the 128 MiB/s default bandwidth, saved for ~12 s then
    stopped: the legacy stream of the same migration is > 2x RAM, our image stays ~RAM."""
    img = tmp_path / "vm.img"
    legacy = tmp_path / "legacy.bin"
    src_dump = shm_dir / f"{tmp_path.name}-src.mem"
    with start_source(qemu10, tmp_path, accel, append="mib=128 rate=0 hb=100",
                      mem="256M") as src:
        src.migrate(f"exec:tee {legacy} | {PY} -m fixedram receive {img} "
                    f"2>>{tmp_path}/recv.err", max_bandwidth=None)
        info = src.wait_migration(120, stop_after=12)
        assert info["status"] == "completed"
        src.pmemsave(src_dump)
        last = src.heartbeats()[-1]
    ram = 256 << 20
    try:
        assert legacy.stat().st_size > 2 * ram, legacy.stat().st_size
    finally:
        legacy.unlink()
    assert img.stat().st_size <= ram + (8 << 20)
    assert "fixedram: saved" in (tmp_path / "recv.err").read_text()
    check_restore(src, img, src_dump, last.n, qemu10, tmp_path, shm_dir)
    src_dump.unlink()


# -- crash safety -----------------------------------------------------------------------------

PREVIOUS = b"previous image, must survive\n" * 1000


@pytest.mark.qemu
@pytest.mark.parametrize("when", [0.3, 1.5])
def test_source_killed(when: float, tmp_path: Path, accel: str, qemu10: QemuBinary,
                       guest_elf: Path) -> None:
    """QEMU dies mid-migration: the receiver fails (non-zero), the old image is untouched."""
    img = tmp_path / "vm.img"
    img.write_bytes(PREVIOUS)
    sock = tmp_path / "mig.sock"
    proc = subprocess.Popen(fixedram_cmd("receive", str(img), "--listen", f"unix:{sock}",
                                         "--accept-timeout", "60"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        with start_source(qemu10, tmp_path, accel) as src:
            wait_file(sock)
            src.migrate(f"unix:{sock}", max_bandwidth=16 << 20)  # ~4 s for the whole save
            time.sleep(when)
            assert src.query_migrate()["status"] == "active"
            src.kill()
        _, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 2, err.decode()
    assert b"fixedram: error:" in err and err.count(b"\n") <= 2, err.decode()
    assert img.read_bytes() == PREVIOUS
    assert leftovers(tmp_path, set()) == []


@pytest.fixture(scope="module")
def legacy_stream(qemu_image: Any) -> bytes:
    """A complete precopy stream QEMU 10 wrote (exec:cat), for replay through a pipe."""
    return bytes(qemu_image("legacy-exec").path.read_bytes())


def _cut_points(stream: bytes) -> dict[str, int]:
    vm = stream.rfind(b"\x00\x06")
    return {"early": 100, "mid-pages": len(stream) // 2, "device-state": vm - 200,
            "vmdesc": len(stream) - 10}


@pytest.mark.qemu
@pytest.mark.parametrize("where", ["early", "mid-pages", "device-state", "vmdesc"])
def test_stream_cut(where: str, legacy_stream: bytes, tmp_path: Path) -> None:
    """The stream ends early (source died): error, exit 2, old image intact, no temp file."""
    img = tmp_path / "vm.img"
    img.write_bytes(PREVIOUS)
    cut = _cut_points(legacy_stream)[where]
    r = subprocess.run(fixedram_cmd("receive", str(img)), input=legacy_stream[:cut],
                       capture_output=True, timeout=60)
    assert r.returncode == 2, r.stderr.decode()
    assert r.stdout == b""
    assert r.stderr.startswith(b"fixedram: error:") and r.stderr.count(b"\n") == 1
    assert img.read_bytes() == PREVIOUS
    assert leftovers(tmp_path, set()) == []


def _wait_catching_sigterm(pid: int, timeout: float = 60) -> None:
    """Wait until process ``pid`` catches SIGTERM (``SigCgt`` in /proc), which ``fixedram
    receive`` arranges first thing: a signal sent earlier would meet Python's default."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = Path(f"/proc/{pid}/status").read_text()
        caught = int(next(ln.split()[1] for ln in status.splitlines()
                          if ln.startswith("SigCgt:")), 16)
        if caught & 1 << (15 - 1):
            return
        time.sleep(0.02)
    raise AssertionError(f"process {pid} did not set up its SIGTERM handler in {timeout} s")


@pytest.mark.qemu
@pytest.mark.parametrize("sig", ["SIGKILL", "SIGTERM"])
@pytest.mark.parametrize("where", ["early", "mid-pages", "vmdesc"])
def test_receiver_killed(where: str, sig: str, legacy_stream: bytes, tmp_path: Path) -> None:
    """The receiver is killed: the old image is intact and no temporary file is left."""
    img = tmp_path / "vm.img"
    img.write_bytes(PREVIOUS)
    cut = _cut_points(legacy_stream)[where]
    proc = subprocess.Popen(fixedram_cmd("receive", str(img)), stdin=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    assert proc.stdin is not None
    proc.stdin.write(legacy_stream[:cut])
    proc.stdin.flush()
    _wait_catching_sigterm(proc.pid)  # its handler is in place: the command has started
    time.sleep(0.5)  # let it process what it got
    proc.send_signal(getattr(__import__("signal"), sig))
    _, err = proc.communicate(timeout=30)
    assert proc.returncode != 0
    if sig == "SIGTERM":
        assert proc.returncode == 2 and b"terminated by SIGTERM" in err, err.decode()
    assert img.read_bytes() == PREVIOUS
    assert leftovers(tmp_path, set()) == []


@pytest.mark.qemu
def test_replayed_stream_and_no_previous(legacy_stream: bytes, tmp_path: Path,
                                         qemu_image: Any) -> None:
    """The same stream fed whole: the image appears (no previous one) and reads back equal."""
    img = tmp_path / "vm.img"
    r = subprocess.run(fixedram_cmd("receive", str(img), "--direct-io"), input=legacy_stream,
                       capture_output=True, timeout=60)
    assert r.returncode == 0, r.stderr.decode()
    assert r.stdout == b""
    case = qemu_image("legacy-exec")
    with open_image(img) as im:
        ram = im.read("pc.ram", 0, case.mem_bytes // PAGE_SIZE)
    with open(case.mem_dump_path, "rb") as f:
        dump = f.read()
    low = 1 << 20  # below 1 MiB the dump shows ROM/VGA windows, not pc.ram
    assert bytes(ram[low:]) == dump[low:]


def _resident(path: Path) -> int:
    """Bytes of ``path`` in the page cache (util-linux fincore)."""
    out = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES", str(path)],
                         capture_output=True, text=True, check=True).stdout
    return int(out.split()[0])


@pytest.mark.qemu
@pytest.mark.parametrize("direct", [False, True])
def test_receive_leaves_page_cache_alone(direct: bool, legacy_stream: bytes) -> None:
    """A saved image does not stay in the page cache (on a disk filesystem: /var/tmp)."""
    fs = subprocess.run(["stat", "-f", "-c", "%T", "/var/tmp"], capture_output=True,
                        text=True, check=True).stdout.strip()
    assert fs != "tmpfs", "this test needs /var/tmp on a disk filesystem"
    d = Path(tempfile.mkdtemp(prefix="fixedram-test-", dir="/var/tmp"))
    try:
        img = d / "vm.img"
        args = ["receive", "-q", *(["--direct-io"] if direct else []), str(img)]
        r = subprocess.run(fixedram_cmd(*args), input=legacy_stream, capture_output=True,
                           timeout=120)
        assert r.returncode == 0, r.stderr.decode()
        allocated = img.stat().st_blocks * 512
        assert allocated > 16 << 20  # the stream holds real pages
        assert _resident(img) < allocated // 20, (_resident(img), allocated)
        with open_image(img) as im:  # and it is complete
            assert im.format == "mapped-ram"
    finally:
        shutil.rmtree(d, ignore_errors=True)


def _distinct_stream(npages: int) -> tuple[bytes, bytes]:
    """A stream of ``npages`` pages of pc.ram, each page different; and the expected RAM."""
    enc = StreamEncoder()
    sid = 2
    ram = b"".join(i.to_bytes(8, "big") * (PAGE_SIZE // 8) for i in range(1, npages + 1))
    eos = encode(EndOfSection()) + encode(SectionFooter(sid))
    out = [encode(FileHeader()), encode(Configuration("pc-i440fx-10.0")),
           encode(SectionStart(sid, "ram", 0, 4)), encode(MemSize(npages * PAGE_SIZE)),
           encode(RamBlock("pc.ram", npages * PAGE_SIZE)), eos, encode(SectionPart(sid))]
    out += [bytes(x) for x in enc.page_run("pc.ram", 0, ram)]
    out += [eos, encode(SectionEnd(sid)), eos, DEVICE, encode(EndOfFile()),
            encode(VMDescription(b'{"page_size": 4096}'))]
    return b"".join(out), ram


@pytest.mark.parametrize("direct", [False, True])
def test_slow_writes_and_empty_feeds(direct: bool, tmp_path: Path,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Page writes lag behind the input, and some reads complete no record at all: every
    page still lands intact (the decoder's run buffers are reused only after the writes
    of the feed that filled them are done, however many feeds carried no pages)."""
    stream, ram = _distinct_stream(600)
    real = MappedRamWriter.write_pages

    def slow(self: MappedRamWriter, *a: Any, **k: Any) -> int:
        time.sleep(0.02)
        return real(self, *a, **k)

    monkeypatch.setattr(MappedRamWriter, "write_pages", slow)
    rec = PAGE_SIZE + 8
    # big pieces that end inside a record, each followed by single bytes that complete none
    sizes = [40 * rec + 100, 1, 1, 1, 30 * rec, 1, 2, 50 * rec + 7, 1]

    class Chunks(_Pipe):
        def recv_into(self, buf: memoryview) -> int:
            self.piece = sizes[self.k % len(sizes)]
            self.k += 1
            return super().recv_into(buf)

    ch = Chunks(stream)
    ch.k = 0
    img = tmp_path / "vm.img"
    rep = receive(ch, img, direct_io=direct)  # type: ignore[arg-type]
    assert rep.pages_present == 600
    with open_image(img) as im:
        assert im.read("pc.ram", 0, 600) == ram
