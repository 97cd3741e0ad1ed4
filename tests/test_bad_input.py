"""Bad images through the real command line: real QEMU images truncated at every section
boundary and inside records, and corrupted one field at a time. Each must give exactly one
line on stderr naming the problem and the byte offset, exit status 2, no traceback, quickly."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
import struct
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
from qemu_images import ImageCase, ImageSpec

from fixedram.stream import (
    DeviceState,
    EndOfFile,
    MemSize,
    RamBlock,
    Record,
    SectionEnd,
    SectionPart,
    SectionStart,
    StreamDecoder,
    StreamEncoder,
    VMDescription,
)

REPO = Path(__file__).resolve().parent.parent
PY = str(REPO / ".venv" / "bin" / "python")
ERROR_LINE = re.compile(r"^fixedram: error: .+ \(at byte (\d+)\)\n$")
TIMEOUT = 20  # seconds per command; each should take well under one


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


def sparse_copy(src: Path, dst: Path, length: int | None = None) -> None:
    """Copy the first ``length`` bytes of ``src`` (all by default), keeping holes."""
    with open(src, "rb") as f, open(dst, "wb") as g:
        fi, go = f.fileno(), g.fileno()
        size = os.fstat(fi).st_size
        length = size if length is None else length
        pos = 0
        while pos < length:
            try:
                d = os.lseek(fi, pos, os.SEEK_DATA)
            except OSError as e:
                if e.errno == errno.ENXIO:
                    break
                raise
            if d >= length:
                break
            h = min(os.lseek(fi, d, os.SEEK_HOLE), length)
            p = d
            while p < h:
                n = os.copy_file_range(fi, go, h - p, p, p)
                assert n > 0
                p += n
            pos = h
        os.ftruncate(go, length)


@dataclass
class Span:
    start: int
    end: int
    record: Record | None
    what: str


def record_spans(path: Path, base: int) -> list[Span]:
    """Every top-level record of the image with its byte range; device sections inside the
    opaque device state are split at their footers; mapped-ram bitmaps/pages get spans too."""
    dec = StreamDecoder(base_offset=base)
    recs: list[Record] = []
    with open(path, "rb") as f:
        f.seek(base)
        while True:
            if dec.next_offset != f.tell():
                dec.seek(dec.next_offset)
                f.seek(dec.next_offset)
            b = f.read(1 << 16)
            if not b:
                recs += dec.feed_eof()
                break
            recs += dec.feed(b)
    enc = StreamEncoder()
    spans: list[Span] = []
    p = base
    for r in recs:
        n = len(enc.encode(r))
        if isinstance(r, DeviceState):
            spans += device_sections(r.data, p)
        else:
            spans.append(Span(p, p + n, r, type(r).__name__))
        p += n
        if isinstance(r, RamBlock) and r.mapped is not None:
            m = r.mapped
            spans.append(Span(m.bitmap_offset, m.pages_offset, None, f"bitmap {r.name}"))
            spans.append(Span(m.pages_offset, m.pages_offset + r.length, None, f"pages {r.name}"))
            p = m.pages_offset + r.length
    assert p == os.path.getsize(path)
    return spans


def device_sections(blob: bytes, at: int) -> list[Span]:
    """Split the device state at its SECTION_FULL footers (``7e be32(id)`` then ``04`` or end)."""
    out = []
    p = 0
    while p < len(blob):
        assert blob[p] == 4, f"no SECTION_FULL at {at + p}"
        sid = blob[p + 1 : p + 5]
        name = blob[p + 6 : p + 6 + blob[p + 5]].decode()
        q = p + 6
        while True:
            q = blob.index(b"\x7e" + sid, q)
            if q + 5 == len(blob) or blob[q + 5] == 4:
                break
            q += 1
        out.append(Span(at + p, at + q + 5, None, f"device {name}"))
        p = q + 5
    return out


def run_cli(*args: str, server: Path | None = None) -> subprocess.CompletedProcess[str]:
    """``fixedram ARGS`` in a fresh process, or with ``server`` through the resident server
    at that socket (the same entry point in a forked child, without the start-up's imports:
    docs/resident-server.md)."""
    env = {k: v for k, v in os.environ.items() if k != "FIXEDRAM_SERVER"}
    if server is not None:
        env["FIXEDRAM_SERVER"] = str(server)
    return subprocess.run(
        [PY, "-m", "fixedram", *args],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        cwd=REPO,
        check=False,
        env=env,
    )


@pytest.fixture(scope="module")
def server() -> Iterator[Path]:
    """A resident server (``fixedram serve``) for the module's many short commands."""
    d = Path(tempfile.mkdtemp(prefix="frbad-", dir="/tmp"))
    sock, log = d / "sock", d / "serve.log"
    env = {k: v for k, v in os.environ.items() if k != "FIXEDRAM_SERVER"}
    with open(log, "w") as f:
        p = subprocess.Popen([PY, "-m", "fixedram", "serve", "--socket", str(sock)],
                             stderr=f, env=env)
    try:
        deadline = time.monotonic() + 60
        while "serving on" not in log.read_text():
            assert p.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.02)
        yield sock
    finally:
        p.send_signal(signal.SIGTERM)
        p.wait(timeout=30)
        shutil.rmtree(d, ignore_errors=True)


def expect_error(
    path: Path, what: str, match: str | None = None, at: int | None = None, full: bool = True,
    server: Path | None = None,
) -> str | None:
    """Run ``analyze`` (with ``full``: also ``analyze --json`` and ``extract``) on ``path``
    (through ``server`` if given); return a failure description or None."""
    cmds = [("analyze", str(path))]
    if full:
        cmds += [("analyze", "--json", str(path)), ("extract", str(path), "-o", str(path) + ".o")]
    for cmd in cmds:
        try:
            res = run_cli(*cmd, server=server)
        except subprocess.TimeoutExpired:
            return f"{what}: {cmd[0]} took more than {TIMEOUT} s"
        m = ERROR_LINE.match(res.stderr)
        if res.returncode != 2 or not m or res.stdout or "Traceback" in res.stderr:
            return (
                f"{what}: {' '.join(cmd[:-1])} -> status {res.returncode}, "
                f"stderr {res.stderr!r}, stdout {res.stdout[:200]!r}"
            )
        if match and not re.search(match, res.stderr):
            return f"{what}: {res.stderr.strip()!r} does not match {match!r}"
        if at is not None and int(m[1]) != at:
            return f"{what}: {res.stderr.strip()!r}: offset is not {at}"
    return None


def run_all(cases: list[Callable[[], str | None]]) -> None:
    with ThreadPoolExecutor(max_workers=4) as ex:
        failures = [f for f in ex.map(lambda c: c(), cases) if f]
    assert not failures, "\n".join(failures)


# ---------------------------------------------------------------------------------------------
# Truncation
# ---------------------------------------------------------------------------------------------


def truncation_points(spans: list[Span]) -> list[tuple[int, str]]:
    """Section boundaries (the end of every record other than a page, of every device
    section, of every bitmap and pages region) plus a cut in the middle of the first record of
    each kind (and of the last device section), and 1 byte into the header records."""
    pts: dict[int, str] = {}
    seen: set[str] = set()
    for k, s in enumerate(spans):
        kind = s.what.split()[0]
        if kind not in ("Page", "Zero"):
            pts.setdefault(s.end, f"after {s.what} [{s.start}, {s.end})")
        last_dev = kind == "device" and spans[k + 1].what.split()[0] != "device"
        if s.end - s.start > 1 and (kind not in seen or last_dev):
            pts.setdefault((s.start + s.end) // 2, f"inside {s.what} [{s.start}, {s.end})")
            if kind in (
                "FileHeader",
                "Configuration",
                "SectionStart",
                "RamBlock",
                "device",
                "VMDescription",
            ):
                pts.setdefault(s.start + 1, f"1 byte into {s.what} at {s.start}")
        seen.add(kind)
    return sorted(pts.items())


def _truncation_cases(case: ImageCase, tmp: Path,
                      server: Path) -> tuple[list[Callable[[], str | None]], int]:
    """One check per truncation point: ``analyze`` (every 8th point: all three commands)
    through the resident ``server``, every 32nd point's commands each in a fresh process."""
    spans = record_spans(case.path, case.offset)
    size = os.path.getsize(case.path)
    eof = next(s for s in spans if isinstance(s.record, EndOfFile))
    cases = []
    for i, (cut, what) in enumerate(truncation_points(spans)):
        if cut >= size:
            continue

        def one(cut: int = cut, what: str = what, i: int = i) -> str | None:
            p = tmp / f"cut{i}.img"
            sparse_copy(case.path, p, cut)
            try:
                if cut == eof.end:
                    # EOF with no VM description is a complete stream (suppress-vmdesc=on)
                    res = run_cli("analyze", "--json", str(p))
                    if res.returncode or json.loads(res.stdout)["vmdesc"]["present"]:
                        return f"cut at {cut} ({what}): {res.returncode} {res.stderr!r}"
                    return None
                return expect_error(p, f"cut at {cut} ({what})", full=i % 8 == 0,
                                    server=None if i % 32 == 0 else server)
            finally:
                p.unlink()
                Path(str(p) + ".o").unlink(missing_ok=True)

        cases.append(one)
    return cases, len(spans)


class SmallImage(ImageSpec):
    """A guest that stamps only 4 MiB: a small stream, so each of the many runs is quick."""

    @property
    def append(self) -> str:
        return "mib=4 rate=0 gens=2 hb=100"


SMALL = {
    "legacy": SmallImage(mode="legacy", workload="idle"),
    "mapped-ram": SmallImage(mode="mapped-ram", workload="idle"),
}


@pytest.mark.qemu
@pytest.mark.parametrize("kind", sorted(SMALL))
def test_truncated_real_image(
    kind: str, qemu_image: Callable[[str | ImageSpec], ImageCase], tmp_path: Path,
    server: Path
) -> None:
    case = qemu_image(SMALL[kind])
    assert os.path.getsize(case.path) < (16 << 20) or kind == "mapped-ram"
    cases, nspans = _truncation_cases(case, tmp_path, server)
    assert nspans > 40 and len(cases) > 50
    run_all(cases)


# ---------------------------------------------------------------------------------------------
# Corruption, one field at a time
# ---------------------------------------------------------------------------------------------


@dataclass
class Fields:
    """Where the fields of a real image are."""

    base: int
    size: int
    memsize: int  # the MEM_SIZE word
    total: int
    block: int  # first RAM block record (its idstr length byte)
    length_at: int  # its be64 used_length
    header: int | None  # its mapped-ram header (mapped-ram only)
    vmdesc: int  # the VMDESCRIPTION byte
    json_at: int


def fields(case: ImageCase) -> Fields:
    spans = record_spans(case.path, case.offset)
    ms = next(s for s in spans if isinstance(s.record, MemSize))
    blk = next(s for s in spans if isinstance(s.record, RamBlock))
    vd = next(s for s in spans if isinstance(s.record, VMDescription))
    assert isinstance(ms.record, MemSize) and isinstance(blk.record, RamBlock)
    assert blk.record.name == "pc.ram"
    n = 1 + len("pc.ram")
    header = blk.start + n + 8 if blk.record.mapped is not None else None
    assert any(isinstance(s.record, SectionStart) for s in spans)
    assert any(isinstance(s.record, SectionPart | SectionEnd) for s in spans)
    return Fields(
        case.offset,
        os.path.getsize(case.path),
        ms.start,
        ms.record.total,
        blk.start,
        blk.start + n,
        header,
        vd.start,
        vd.start + 5,
    )


def _patch(case: ImageCase, dst: Path, at: int, data: bytes) -> None:
    sparse_copy(case.path, dst)
    with open(dst, "r+b") as f:
        f.seek(at)
        f.write(data)


def corruptions(case: ImageCase) -> list[tuple[str, int, bytes, str, int]]:
    """``(name, offset, new bytes, message regex, expected error offset)``."""
    f = fields(case)
    q = struct.Struct(">Q").pack
    out = [
        ("wrong magic", f.base, b"QEVX", "not a QEMU migration image", 0),
        ("wrong version", f.base + 4, b"\x00\x00\x00\x02", "version 2", f.base + 4),
        (
            "MEM_SIZE total too big",
            f.memsize,
            q((f.total + 4096) | 4),
            "MEM_SIZE total .* does not match the RAM block list",
            f.memsize,
        ),
        (
            "MEM_SIZE total too small",
            f.memsize,
            q((f.total - 4096) | 4),
            "MEM_SIZE total .* does not match the RAM block list",
            f.memsize,
        ),
        ("block length 0", f.length_at, q(0), "'pc.ram' has length 0x0", f.block),
        ("block length not page multiple", f.length_at, q(4097), "has length 0x1001", f.block),
        ("idstr length 0", f.block, b"\x00", "empty name", f.block),
        ("vmdesc not JSON", f.json_at, b"x", "VM description is not valid JSON", f.vmdesc),
    ]
    if f.base:
        out[0] = ("wrong magic", f.base, b"QEVX", "not a QEMU migration image", 0)
    if f.header is not None:
        h = f.header
        psz, bmo, pgo = h + 4, h + 12, h + 20
        page_end = (f.size + (1 << 20)) // 4096 * 4096
        out += [
            ("page_size 0", psz, q(0), "page size 0 ", h),
            ("page_size 8192", psz, q(8192), "page size 8192 ", h),
            ("header version 2", h, b"\x00\x00\x00\x02", "header version 2", h),
            ("pages offset not page-aligned", pgo, q((1 << 20) + 512), "not page-aligned", h),
            ("pages offset past EOF", pgo, q(page_end), "pages region .* past the end", page_end),
            (
                "bitmap offset past EOF",
                bmo,
                q(f.size + 8) + q(page_end),
                "bitmap .* past the end of the file",
                f.size + 8,
            ),
            ("bitmap overlaps header", bmo, q(h), "overlaps the block header", h),
        ]
    return out


@pytest.mark.qemu
@pytest.mark.parametrize("kind", ["mapped-ram", "legacy", "mapped-ram-offset"])
def test_corrupted_real_image(
    kind: str, qemu_image: Callable[[str], ImageCase], tmp_path: Path, server: Path
) -> None:
    case = qemu_image(kind)
    cases = []
    items = corruptions(case)
    assert len(items) >= (15 if case.mode == "mapped-ram" else 8)
    for i, (name, at, data, match, err_at) in enumerate(items):

        def one(
            i: int = i,
            name: str = name,
            at: int = at,
            data: bytes = data,
            match: str = match,
            err_at: int = err_at,
        ) -> str | None:
            p = tmp_path / f"bad{i}.img"
            _patch(case, p, at, data)
            try:
                # every 4th in fresh processes, the others through the resident server
                return expect_error(p, name, match, err_at, full=i % 2 == 0,
                                    server=None if i % 4 == 0 else server)
            finally:
                p.unlink()
                Path(str(p) + ".o").unlink(missing_ok=True)

        cases.append(one)
    run_all(cases)


# ---------------------------------------------------------------------------------------------
# Small files (no QEMU)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (b"", "is empty"),
        (b"hello world", "not a QEMU migration image"),
        (b"QEVM\x00\x00\x00\x03", "stream ended"),
        (b"QEVM\x00\x00\x00\x07\x07", "version 7"),
        (b"QEVM\x00\x00\x00\x03\x07\x00\x00\x00\x00", "machine type name of 0 bytes"),
        (b"QEVM\x00\x00\x00\x03\x09", "unknown record type 0x09"),
    ],
)
def test_small_bad_files(content: bytes, match: str, tmp_path: Path) -> None:
    p = tmp_path / "f.img"
    p.write_bytes(content)
    res = run_cli("analyze", str(p))
    assert res.returncode == 2 and res.stderr.count("\n") == 1, res.stderr
    assert res.stderr.startswith("fixedram: error: ") and "Traceback" not in res.stderr
    assert re.search(match, res.stderr), res.stderr
    if content:
        assert ERROR_LINE.match(res.stderr), res.stderr


def test_missing_file(tmp_path: Path) -> None:
    res = run_cli("analyze", str(tmp_path / "nope.img"))
    assert res.returncode == 2 and res.stderr.count("\n") == 1
    assert "cannot open" in res.stderr and "Traceback" not in res.stderr
