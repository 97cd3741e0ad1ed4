"""The bulk send path: PAGE records framed per piece, vectorised stream gathers, O_DIRECT reads.

``send()`` must put exactly the bytes on the wire that per-record encoding gives
(:func:`reference_stream`, built with :meth:`StreamEncoder.encode` one record at a time), for
mapped-ram and legacy stream images, buffered or O_DIRECT; and QEMU must load the result
(RAM equal via ``pmemsave``, the guest runs on).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from synth_images import device_blob, vmdesc
from test_send import (
    MemoryChannel,
    _case,
    _check_runs_on,
    _cli,
    _compare_ram,
    _dest,
    sockdir,  # noqa: F401  (fixture)
)

from fixedram.endpoint.send import FRESH_MIN_BLOCK, send
from fixedram.errors import FixedramError
from fixedram.image import Image, open_image
from fixedram.image import reader as reader_mod
from fixedram.image.reader import PageSlots
from fixedram.image.sections import ram_section_id
from fixedram.io.channel import Channel, FdChannel, SocketChannel
from fixedram.qmp.client import QMP
from fixedram.qmp.progress import Progress
from fixedram.qmp.restore import restore
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
    SectionPart,
    SectionStart,
    StreamEncoder,
    VMDescription,
    Zero,
    encode,
)
from fixedram.stream.encoder import PageRecords
from fixedram.stream.format import RAM_SECTION, RAM_SECTION_VERSION, Command
from fixedram.testing.vm import find_qemu
from fixedram.versions import wants_switchover_start

PS = 4096


# ---------------------------------------------------------------------------------------------
# Reference: the old framing, one record at a time
# ---------------------------------------------------------------------------------------------


def reference_stream(img: Image, fresh: bool = True) -> bytes:
    """The stream ``send()`` must write, framed record by record with ``StreamEncoder.encode``
    (``fresh``: no records for pages without data in blocks larger than FRESH_MIN_BLOCK;
    else a ZERO record each, after the block's PAGE records)."""
    enc = StreamEncoder()
    sid = ram_section_id(img)
    blocks = list(img.blocks.values())
    cfg = img.configuration
    out = [encode(FileHeader()), encode(Configuration(cfg.machine, None, cfg.page_bits, cfg.uuid)),
           encode(SectionStart(sid, RAM_SECTION, 0, RAM_SECTION_VERSION)),
           encode(MemSize(sum(b.length for b in blocks))),
           *(encode(RamBlock(b.name, b.length)) for b in blocks),
           encode(EndOfSection()), encode(SectionFooter(sid))]
    for b in blocks:
        out.append(encode(SectionPart(sid)))
        present = img.present(b.name)
        for p in range(b.npages):
            if present[p]:
                out.append(enc.encode(Page(b.name, p * PS, bytes(img.read(b.name, p, 1)))))
        for p in range(b.npages):
            if not present[p] and not (fresh and b.length > FRESH_MIN_BLOCK):
                out.append(enc.encode(Zero(b.name, p * PS)))
        out += [encode(EndOfSection()), encode(SectionFooter(sid))]
    if wants_switchover_start(img.machine, img.commands):
        out.append(encode(CommandRecord(Command.SWITCHOVER_START)))
    out += [encode(SectionEnd(sid)), encode(EndOfSection()), encode(SectionFooter(sid)),
            img.device_state, encode(EndOfFile()), encode(VMDescription(img.vmdesc or b""))]
    return b"".join(out)


def wire_stream(img: Image, how: str, fresh: bool = True) -> bytes:
    """What ``send()`` writes through a real descriptor (``how``: a unix socket or a pipe,
    read by a thread): where the channel has one, page data may go out from the file itself
    (a legacy stream's stored records by sendfile) rather than through buffers."""
    if how == "socket":
        a, b = socket.socketpair()
        ch: Channel = SocketChannel(a)
        rd, keep = b.fileno(), [a, b]
    else:
        r, w = os.pipe()  # the channel reads nothing back (/dev/null), the thread reads r
        ch, rd, keep = FdChannel(os.open(os.devnull, os.O_RDONLY), w), r, []
    out = bytearray()

    def drain() -> None:
        while chunk := os.read(rd, 1 << 20):
            out.extend(chunk)
        if how == "socket":  # as a destination does at the end: the sender stops waiting
            keep[1].shutdown(socket.SHUT_RDWR)

    t = threading.Thread(target=drain)
    t.start()
    try:
        send(img, ch, fresh=fresh)
    finally:
        t.join(30)
        ch.close()
        for s in keep:
            s.close()
        if how == "pipe":
            os.close(rd)
    return bytes(out)


# ---------------------------------------------------------------------------------------------
# Pure tests (no QEMU)
# ---------------------------------------------------------------------------------------------


def _pages(n: int, seed: int) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, n * PS, dtype=np.uint8).tobytes()


def test_page_records_equal_page_run() -> None:
    """PageRecords framing == page_run's, across block switches, CONTINUE and a full buffer."""
    recs = PageRecords(8)
    slots = PageSlots(recs.buf, recs.slot_offset, recs.stride, recs.capacity)
    a, b = StreamEncoder(), StreamEncoder()
    for block, first, n in [("pc.ram", 0, 3), ("pc.ram", 5, 8), ("/rom@etc/acpi/tables", 2, 1),
                            ("pc.ram", 1 << 18, 8), ("pc.ram", 7, 1), ("x" * 255, 0, 2)]:
        data = _pages(n, first + n)
        want = b"".join(bytes(x) for x in a.page_run(block, first * PS, data))
        slots.array[:n] = np.frombuffer(data, np.uint8).reshape(n, PS)
        got = bytes(b.page_records(block, first * PS, n, recs))
        assert got == want, (block, first, n)
    with pytest.raises(ValueError):
        b.page_records("pc.ram", 0, 9, recs)


def test_page_records_at_equal_page_run() -> None:
    """Runs framed in place at any slot of one buffer == page_run's records (a run past slot 0
    that names its block, CONTINUE runs, slot 0), whatever the buffer held before."""
    recs = PageRecords(16)
    slots = PageSlots(recs.buf, recs.slot_offset, recs.stride, recs.capacity)
    recs.buf[:] = b"\xa5" * len(recs.buf)
    a, b = StreamEncoder(), StreamEncoder()
    want: list[bytes] = []
    got: list[bytes] = []
    slot = 0
    for block, first, n in [("pc.ram", 4, 3), ("pc.ram", 9, 2), ("/rom@etc/acpi/tables", 2, 1),
                            ("pc.rom", 0, 4), ("pc.ram", 1 << 18, 5), ("pc.ram", 40, 1)]:
        data = _pages(n, first + n)
        want += [bytes(x) for x in a.page_run(block, first * PS, data)]
        slots.array[slot : slot + n] = np.frombuffer(data, np.uint8).reshape(n, PS)
        got += [bytes(x) for x in b.page_records_at(block, first * PS, slot, n, recs)]
        slot += n
    assert b"".join(got) == b"".join(want)
    with pytest.raises(ValueError):
        b.page_records_at("pc.ram", 0, 10, 7, recs)


def _legacy_stream(path: Path) -> dict[str, dict[int, bytes]]:
    """A legacy stream file with runs, re-sent pages, pages zeroed again and block switches;
    returns the final content (block -> page -> data) it describes."""
    blocks = {"pc.ram": 600 * PS, "pc.rom": 16 * PS}
    sid = 1
    enc = StreamEncoder()
    recs: list[bytes] = [
        encode(FileHeader()), encode(Configuration("pc-q35-10.0", None, 12, None)),
        encode(SectionStart(sid, RAM_SECTION, 0, RAM_SECTION_VERSION)),
        encode(MemSize(sum(blocks.values()))),
        *(encode(RamBlock(n, ln)) for n, ln in blocks.items()),
        encode(EndOfSection()), encode(SectionFooter(sid)),
    ]
    final: dict[str, dict[int, bytes]] = {n: {} for n in blocks}

    def put(block: str, first: int, n: int, seed: int) -> None:
        data = _pages(n, seed)
        for k in range(n):
            recs.append(enc.encode(Page(block, (first + k) * PS, data[k * PS : (k + 1) * PS])))
            final[block][first + k] = data[k * PS : (k + 1) * PS]

    recs.append(encode(SectionPart(sid)))
    put("pc.ram", 0, 300, 1)       # a run longer than a 256-page piece
    put("pc.rom", 0, 4, 2)         # block switch
    put("pc.ram", 300, 10, 3)      # back: named record, then CONTINUE
    recs += [encode(EndOfSection()), encode(SectionFooter(sid)), encode(SectionPart(sid))]
    put("pc.ram", 310, 200, 4)     # a new section part breaks the run
    put("pc.ram", 5, 2, 5)         # re-sent pages (later in the file)
    for p in (7, 400):             # zeroed again
        recs.append(enc.encode(Zero("pc.ram", p * PS)))
        del final["pc.ram"][p]
    put("pc.rom", 9, 3, 6)
    recs += [encode(EndOfSection()), encode(SectionFooter(sid)),
             encode(SectionEnd(sid)), encode(EndOfSection()), encode(SectionFooter(sid)),
             device_blob(), encode(EndOfFile()), encode(VMDescription(vmdesc()))]
    path.write_bytes(b"".join(recs))
    return final


@pytest.mark.parametrize("direct", [False, True], ids=["buffered", "direct"])
def test_stream_image_gather(tmp_path: Path, direct: bool) -> None:
    """A legacy stream image reads back the same through read_slots (record stride and page
    stride), iter_data and read, with and without O_DIRECT; send() equals the old framing."""
    disk = Path(tempfile.mkdtemp(prefix="frs-fast-", dir="/var/tmp"))
    try:
        path = disk / "legacy.stream"
        final = _legacy_stream(path)
        with open_image(path) as img:
            assert img.format == "stream"
            if direct:
                assert img.open_direct("required")
            for name, pages in final.items():
                npages = img.blocks[name].npages
                want = np.zeros((npages, PS), dtype=np.uint8)
                for p, d in pages.items():
                    want[p] = np.frombuffer(d, np.uint8)
                assert bytes(img.read(name, 0, npages)) == want.tobytes()
                got = np.zeros_like(want)
                for first, data in img.iter_data(name):
                    got[first : first + len(data) // PS] = np.frombuffer(data, np.uint8).reshape(
                        -1, PS)
                assert np.array_equal(got, want)
                for stride in (PS, PS + 8, PS + 100):
                    buf = bytearray(64 + 256 * stride)
                    slots = PageSlots(buf, 64, stride, 256)
                    for first, n in img.runs(name):
                        for p in range(first, first + n, 256):
                            k = min(256, first + n - p)
                            img.read_slots(name, p, k, slots)
                            assert np.array_equal(slots.array[:k], want[p : p + k])
            ch = MemoryChannel()
            report = send(img, ch)
            assert report.direct_io == direct
            assert img.direct == direct  # send leaves an image opened direct by the caller so
            assert bytes(ch.data) == reference_stream(img)
            ch = MemoryChannel()
            send(img, ch, fresh=False)
            assert bytes(ch.data) == reference_stream(img, fresh=False)
            # through descriptors: buffered, the stored records go out by sendfile
            for how in ("socket", "pipe"):
                for fresh in (True, False):
                    assert wire_stream(img, how, fresh) == reference_stream(img, fresh), how
            for first, n in img.runs("pc.ram"):  # stretches of stored records cover each run
                spans = img.record_spans("pc.ram", first, n)
                assert spans is not None and sum(k for _, k, _ in spans) == n
                assert [p for p, _, _ in spans] == sorted({p for p, _, _ in spans})
            with pytest.raises(FixedramError, match="do not all hold data"):
                img.record_spans("pc.ram", 0, 300)  # page 7 was zeroed again
    finally:
        shutil.rmtree(disk, ignore_errors=True)


def test_direct_io_fallback_and_required(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                         capfd: pytest.CaptureFixture[str]) -> None:
    """Where the filesystem refuses O_DIRECT: one warning and buffered reads (same stream), or
    with "required" an error before any byte is sent."""
    path = tmp_path / "legacy.stream"
    _legacy_stream(path)
    with open_image(path) as img:
        want = reference_stream(img)
    monkeypatch.setattr(reader_mod, "open_direct", lambda *a, **k: None)
    ch = MemoryChannel()
    report = send(path, ch, direct_io=True)
    assert not report.direct_io
    assert bytes(ch.data) == want
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fixedram: warning: the filesystem of ")
    assert "does not support O_DIRECT; using buffered I/O" in err[0]
    ch = MemoryChannel()
    with pytest.raises(FixedramError, match="does not support O_DIRECT"):
        send(path, ch, direct_io="required")
    assert not ch.data and not ch.shut


# ---------------------------------------------------------------------------------------------
# With QEMU
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def disk_dir() -> Iterator[Path]:
    """A directory on the root disk (O_DIRECT works there; /tmp may be tmpfs)."""
    d = Path(tempfile.mkdtemp(prefix="frs-fast-", dir="/var/tmp"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.mark.qemu
@pytest.mark.parametrize("kind", ["mapped-ram", "legacy", "mapped-ram-multifd2"])
def test_stream_equals_record_framing(qemu_image: Callable[[Any], Any], disk_dir: Path,
                                      kind: str) -> None:
    """On QEMU-written images, send() (buffered and O_DIRECT from disk) writes exactly the
    bytes of per-record framing."""
    case = qemu_image(kind)
    path = disk_dir / "img"
    subprocess.run(["cp", "--sparse=always", str(case.path), str(path)], check=True)
    with open_image(path) as img:
        want = {fresh: reference_stream(img, fresh) for fresh in (True, False)}
    for direct in (False, "required"):
        for fresh in (True, False):
            ch = MemoryChannel()
            report = send(path, ch, direct_io=direct, fresh=fresh)
            assert report.direct_io == bool(direct)
            assert bytes(ch.data) == want[fresh], (direct, fresh)
    with open_image(path) as img:  # through a socket: a legacy stream's records by sendfile
        for fresh in (True, False):
            assert wire_stream(img, "socket", fresh) == want[fresh], fresh


@pytest.mark.qemu
def test_send_direct_io_into_qemu(qemu_image: Callable[[Any], Any], shm_dir: Path,
                                  disk_dir: Path, sockdir: Path) -> None:  # noqa: F811
    """``fixedram send IMG --require-direct-io`` from a disk directory into QEMU 10: RAM
    equal, guest runs on, and the image's pages did not go through the page cache."""
    case = _case(qemu_image("mapped-ram"))
    path = disk_dir / "vm.img"
    subprocess.run(["cp", "--sparse=always", str(case.path), str(path)], check=True)
    _drop_from_cache(path)
    dst, qmp2 = _dest(case, disk_dir, sockdir, name="dst-dio")
    with dst:
        sock = sockdir / "mig.sock"
        dst.migrate_incoming(f"unix:{sock}")
        r = _cli("--connect", f"unix:{sock}", "--qmp", str(qmp2), str(path),
                 "--require-direct-io")
        assert r.returncode == 0, r.stderr
        assert "(O_DIRECT)" in r.stderr
        dst.wait_incoming(60)
        assert _cached_fraction(path) < 0.25
        _compare_ram(dst, case, shm_dir, "dio")
        _check_runs_on(dst, case)


@pytest.mark.qemu
def test_restore_proxy_direct_io(qemu_image: Callable[[Any], Any], shm_dir: Path,
                                 disk_dir: Path, sockdir: Path) -> None:  # noqa: F811
    """``restore --via proxy`` with direct_io reads a legacy image with O_DIRECT into
    QEMU 7.2; where the filesystem refuses O_DIRECT, "required" refuses, QEMU untouched."""
    case = _case(qemu_image("legacy-7.2"))
    path = disk_dir / "vm.stream"
    subprocess.run(["cp", "--sparse=always", str(case.path), str(path)], check=True)
    dst, qmp2 = _dest(case, disk_dir, sockdir, qemu=find_qemu("7.2"), name="dst-rdio")
    with dst, QMP.connect(qmp2) as q:
        with pytest.MonkeyPatch.context() as mp:  # a filesystem without O_DIRECT
            mp.setattr(reader_mod, "open_direct", lambda *a, **k: None)
            with pytest.raises(FixedramError, match="does not support O_DIRECT"):
                restore(q, path, via="proxy", paused=True, direct_io="required")
            assert q.status() == "inmigrate"
        samples: list[Progress] = []
        rep = restore(q, path, via="proxy", paused=True, direct_io="required",
                      progress=samples.append)
        assert rep.via == "proxy" and rep.status == "paused"
        # the sender's statistics as progress: the last sample has every page accounted for
        assert samples and all(p.phase == "restore" for p in samples)
        last = samples[-1]
        assert last.total_bytes == last.done_bytes == rep.ram_size, (last, rep)
        assert last.remaining_bytes == 0 and last.pages == rep.pages
        _compare_ram(dst, case, shm_dir, "rdio")
        _check_runs_on(dst, case)


def test_cli_direct_io_fallback(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Where the filesystem refuses O_DIRECT, ``send --direct-io`` warns once and sends the
    same stream; ``--require-direct-io`` fails with one line and sends nothing."""
    from click.testing import CliRunner

    from fixedram.commands import cli, load_commands

    load_commands()
    path = tmp_path / "legacy.stream"
    _legacy_stream(path)
    runner = CliRunner()

    def run(*opts: str) -> tuple[Any, bytes]:
        out = tmp_path / "out.stream"
        fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            r = runner.invoke(cli, ["send", "-q", "--fd", str(fd), *opts, str(path)])
        finally:
            with contextlib.suppress(OSError):  # the channel may have closed it
                os.close(fd)
        return r, out.read_bytes()

    plain, want = run()
    assert plain.exit_code == 0, plain.output
    assert len(want) > 1 << 16
    monkeypatch.setattr(reader_mod, "open_direct", lambda *a, **k: None)
    fall, got = run("--direct-io")
    assert fall.exit_code == 0, fall.output
    assert got == want
    assert fall.stderr.count("warning") == 1
    req, got = run("--require-direct-io")
    assert req.exit_code == 2
    assert got == b""
    assert req.stderr.count("\n") == 1 and "does not support O_DIRECT" in req.stderr


def _cli_cmd() -> str:
    import shlex
    import sys

    return shlex.join([str(Path(sys.executable).absolute()), "-m", "fixedram", "send", "-q"])


def _drop_from_cache(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _cached_fraction(path: Path) -> float:
    """Fraction of the file's data pages resident in the page cache (mincore)."""
    import ctypes
    import mmap

    size = path.stat().st_size
    n = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE
    vec = (ctypes.c_ubyte * n)()
    libc = ctypes.CDLL(None, use_errno=True)
    with open(path, "rb") as f:
        m = mmap.mmap(f.fileno(), size, access=mmap.ACCESS_COPY)
        try:
            cbuf = ctypes.c_char.from_buffer(m)
            rc = libc.mincore(ctypes.c_void_p(ctypes.addressof(cbuf)), ctypes.c_size_t(size),
                              vec)
            del cbuf
            assert rc == 0, ctypes.get_errno()
        finally:
            m.close()
    resident = int((np.frombuffer(vec, dtype=np.uint8) & 1).sum())
    with open_image(path) as img:
        data_pages = sum(int(img.present(n).sum()) for n in img.blocks)
    return resident / max(1, data_pages)
