"""Receive memory follows the data that arrives, not the RAM a stream claims (issue: guests
of any size).

Without QEMU: streams that claim huge RAM blocks (16 TiB with no data, 8 TiB with a few
pages) cost nothing until data arrives. With QEMU: a 64 GiB guest (``reserve=off``, so it
needs no host memory) holding a few MiB migrates into ``fixedram receive``, single stream
and multifd, and the receiving process's peak RSS stays bounded. Larger guests (256 GiB, 1 TiB)
run with ``pytest -m scale``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from synth_images import device_blob, vmdesc

from fixedram.image.layout import PAGE_SIZE
from fixedram.stream import (
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
    VMDescription,
    Zero,
    encode,
)
from fixedram.testing.guest import build_guest
from fixedram.testing.vm import Guest, choose_accel, find_qemu

#: Peak RSS allowed to the fixedram process (docs/RELIABILITY.md, memory bound).
RSS_BOUND = 100 << 20
TIB = 1 << 40


#: Runs a command from a small process and writes the command's peak RSS (KiB) to a file. A
#: child forked straight from pytest would count pytest's own pages in its peak RSS.
_WRAP = ("import resource, subprocess, sys\n"
         "r = subprocess.run(sys.argv[2:])\n"
         "open(sys.argv[1], 'w').write(str(resource.getrusage(resource.RUSAGE_CHILDREN)"
         ".ru_maxrss))\n"
         "sys.exit(r.returncode)\n")


def _spawn(argv: list[str], rss_file: Path, **kw: Any) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-c", _WRAP, str(rss_file), *argv], **kw)


def _run(argv: list[str], rss_file: Path, stdin: bytes | None = None,
         timeout: float = 300) -> tuple[int, str, int]:
    """Run ``argv``; return (exit status, stderr, peak RSS in bytes)."""
    proc = _spawn(argv, rss_file, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                  stderr=subprocess.PIPE)
    _, err = proc.communicate(stdin, timeout=timeout)
    return proc.returncode, err.decode(), int(rss_file.read_text()) * 1024


def _head(size: int) -> bytes:
    return (encode(FileHeader()) + encode(Configuration("pc-q35-10.0"))
            + encode(SectionStart(2, "ram", 0, 4)) + encode(MemSize(size))
            + encode(RamBlock("pc.ram", size)) + encode(EndOfSection())
            + encode(SectionFooter(2)))


@pytest.mark.parametrize("where", ["tmp", "shm"])
def test_huge_claim_without_data(where: str, tmp_path: Path, shm_dir: Path) -> None:
    """77 bytes announcing a 16 TiB block: a one-line refusal, no allocation for the claim."""
    stream = _head(16 * TIB)
    assert len(stream) == 77
    img = (tmp_path if where == "tmp" else shm_dir) / f"{tmp_path.name}-claim.img"
    code, err, rss = _run([sys.executable, "-m", "fixedram", "receive", str(img)],
                          tmp_path / "rss", stream)
    assert code == 2, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert err.startswith("fixedram: error: ")
    assert rss < RSS_BOUND, rss
    assert not img.exists()


def test_huge_claim_little_data(tmp_path: Path) -> None:
    """An 8 TiB block holding 3 pages (one rewritten, one zeroed) and a zeroed stretch:
    the image is written with bounded memory; bits and data sit where they belong."""
    size = 8 * TIB
    top = size - PAGE_SIZE
    pages = {0: b"\x11" * PAGE_SIZE, 5 << 30: b"\x22" * PAGE_SIZE, top: b"\x33" * PAGE_SIZE}
    body = encode(SectionPart(2))
    first = True
    for off, data in pages.items():
        body += encode(Page("pc.ram", off, data), continued=not first)
        first = False
    body += encode(Page("pc.ram", 0, b"\x44" * PAGE_SIZE), continued=True)  # rewritten
    body += encode(Zero("pc.ram", 5 << 30), continued=True)  # zeroed after data
    body += b"".join(encode(Zero("pc.ram", (7 << 30) + k * PAGE_SIZE), continued=True)
                     for k in range(1000))
    body += encode(EndOfSection()) + encode(SectionFooter(2))
    tail = (encode(SectionEnd(2)) + encode(EndOfSection()) + encode(SectionFooter(2))
            + device_blob() + encode(EndOfFile()) + encode(VMDescription(vmdesc())))
    img = tmp_path / "big.img"
    code, err, rss = _run([sys.executable, "-m", "fixedram", "receive", str(img)],
                          tmp_path / "rss", _head(size) + body + tail)
    assert code == 0, err
    assert rss < RSS_BOUND, rss
    # the image's own layout: bitmap right after the block header, pages 1 MiB aligned
    with open(img, "rb") as f:
        raw = f.read(4096)
    at = raw.index(b"pc.ram") + len(b"pc.ram") + 8  # MappedRamHeader: u32 u64 u64 u64
    bitmap_off = int.from_bytes(raw[at + 12 : at + 20], "big")
    pages_off = int.from_bytes(raw[at + 20 : at + 28], "big")
    fd = os.open(img, os.O_RDONLY)
    try:
        def bit(page: int) -> bool:
            return bool(os.pread(fd, 1, bitmap_off + page // 8)[0] >> (page % 8) & 1)

        assert bit(0) and bit(top // PAGE_SIZE) and not bit((5 << 30) // PAGE_SIZE)
        assert not bit(1) and not bit((7 << 30) // PAGE_SIZE)
        assert os.pread(fd, PAGE_SIZE, pages_off) == b"\x44" * PAGE_SIZE
        assert os.pread(fd, PAGE_SIZE, pages_off + top) == b"\x33" * PAGE_SIZE
        assert os.pread(fd, PAGE_SIZE, pages_off + (5 << 30)) == bytes(PAGE_SIZE)
        st = os.fstat(fd)
        assert st.st_size > size and st.st_blocks * 512 < 64 << 20  # sparse
    finally:
        os.close(fd)


def _big_guest_receive(tmp_path: Path, ram: str, channels: int) -> None:
    """A guest of ``ram`` holding 4 MiB migrates into ``fixedram receive --listen``
    (``channels`` multifd channels); the receiving process's peak RSS is bounded."""
    qemu = find_qemu("10")
    accel = choose_accel(qemu)
    extra = ["-object", f"memory-backend-ram,id=m0,size={ram},reserve=off",
             "-machine", "memory-backend=m0"]
    if ram.endswith("T") and accel == "tcg":
        extra += ["-cpu", "qemu64,phys-bits=44"]
    src = Guest(qemu, tmp_path, name="src", mem=ram, machine="q35", append="mib=4 rate=16",
                kernel=build_guest(), accel=accel, extra_args=extra)
    image = tmp_path / "vm.img"
    sock = tmp_path / "mig.sock"
    argv = [sys.executable, "-m", "fixedram", "receive", "--listen", f"unix:{sock}",
            "--accept-timeout", "120", "--channels", str(channels), str(image)]
    with src:
        src.wait_heartbeat(gen_at_least=1)
        src.cmd("stop")
        proc = _spawn(argv, tmp_path / "rss", stdout=subprocess.DEVNULL,
                      stderr=subprocess.PIPE)
        try:
            deadline = time.monotonic() + 30
            while not sock.exists() and time.monotonic() < deadline and proc.poll() is None:
                time.sleep(0.05)
            caps = {"multifd": True} if channels else None
            params = {"multifd-channels": channels} if channels else None
            src.migrate(f"unix:{sock}", caps=caps, params=params)
            info = src.wait_migration(900)
            assert info["status"] == "completed", info
            _, errb = proc.communicate(timeout=300)
            err = errb.decode()
        finally:
            if proc.returncode is None:
                proc.kill()
                proc.wait()
    assert proc.returncode == 0, err
    rss = int((tmp_path / "rss").read_text()) * 1024
    assert rss < RSS_BOUND, f"peak RSS {rss >> 20} MiB"
    r = subprocess.run([sys.executable, "-m", "fixedram", "verify", "--json", str(image)],
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout + r.stderr
    rep = json.loads(r.stdout)
    assert rep["status"] == "ok" and rep["pages_read"] >= 1024, rep  # the 4 MiB of data


@pytest.mark.qemu
@pytest.mark.parametrize("channels", [0, 2])
def test_receive_64g_guest_bounded_rss(channels: int, tmp_path: Path) -> None:
    _big_guest_receive(tmp_path, "64G", channels)


@pytest.mark.qemu
@pytest.mark.scale
@pytest.mark.parametrize("channels", [0, 2])
@pytest.mark.parametrize("ram", ["256G", "1T"])
def test_receive_huge_guest_bounded_rss(ram: str, channels: int, tmp_path: Path) -> None:
    _big_guest_receive(tmp_path, ram, channels)
