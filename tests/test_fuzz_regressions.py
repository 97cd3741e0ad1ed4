"""Regression tests for what fuzzing found, and the security checks of issue 6 (item 4):
hostile streams that claim offsets and blocks beyond MEM_SIZE, lengths of 2^60, listening
sockets (unix 0600, tcp non-loopback only with --allow-remote)."""

from __future__ import annotations

import os
import socket
import stat
import subprocess
import sys
import tracemalloc
from pathlib import Path

import pytest
from click.testing import CliRunner

from fixedram.commands import cli, load_commands
from fixedram.commands.convert import convert
from fixedram.endpoint.receive import Receiver
from fixedram.errors import EndpointError, FixedramError, ImageError, StreamError
from fixedram.image import open_image
from fixedram.image.layout import PAGE_SIZE
from fixedram.io.channel import listen
from fixedram.io.files import remove_stale_partials
from fixedram.stream import (
    Configuration,
    DeviceState,
    EndOfFile,
    EndOfSection,
    FileHeader,
    MappedRamHeader,
    MemSize,
    Page,
    RamBlock,
    Record,
    SectionEnd,
    SectionFooter,
    SectionPart,
    SectionStart,
    StreamDecoder,
    VMDescription,
    encode,
)
from fixedram.stream.format import BE64, MAX_RAM, RamFlag
from fixedram.stream.multifd import MultifdChannelDecoder, encode_init, encode_packet

DEV = b"\x04\x00\x00\x00\x0a\x05timer\x00\x00\x00\x00\x00\x00\x00\x01\x7e\x00\x00\x00\x0a"
PY = sys.executable


def stream(blocks: list[tuple[str, int]], body: list[Record] | None = None, *,
           memsize: int | None = None, raw_body: bytes = b"") -> bytes:
    """A complete precopy stream: ``blocks``, then ``body`` records in one PART section."""
    recs: list[Record] = [
        FileHeader(), Configuration("pc-q35-10.0"), SectionStart(1, "ram", 0, 4),
        MemSize(memsize if memsize is not None else sum(n for _, n in blocks)),
        *(RamBlock(n, ln) for n, ln in blocks), EndOfSection(), SectionFooter(1),
        SectionPart(1), *(body or []),
    ]
    out = b"".join(encode(r) for r in recs) + raw_body
    tail: list[Record] = [EndOfSection(), SectionFooter(1), SectionEnd(1), EndOfSection(),
                          SectionFooter(1)]
    out += b"".join(encode(r) for r in tail) + DEV
    out += encode(EndOfFile()) + encode(VMDescription(b'{"devices": []}'))
    return out


def cli_run(*args: str) -> tuple[int, str]:
    load_commands()
    r = CliRunner().invoke(cli, list(args))
    assert r.exception is None or isinstance(r.exception, SystemExit), r.exc_info
    return r.exit_code, r.stderr


def receive_into(data: bytes, d: Path) -> None:
    with Receiver(d / "vm.img") as rx:
        rx.feed(data)
        if not rx.done:
            rx.feed_eof()
        rx.commit()


# -- found by fuzzing ----------------------------------------------------------------------------


def test_error_with_control_characters_is_one_escaped_line(tmp_path: Path) -> None:
    """Fuzzing: a RAM block name holding a newline and a terminal escape, quoted in an error
    message, split it over lines (and reached the terminal). Now escaped: one line."""
    name = "evil\n\x1b[31mname\r"
    data = bytearray(stream([(name, 2 * PAGE_SIZE)]))
    at = data.find(name.encode()) + len(name)
    data[at : at + 8] = BE64.pack(123)  # a length that is no multiple of the page size
    img = tmp_path / "bad.img"
    img.write_bytes(data)
    code, err = cli_run("analyze", str(img))
    assert code == 2
    assert err.count("\n") == 1 and "\x1b" not in err and "\r" not in err
    assert "evil\\n\\x1b[31mname\\r" in err


def test_text_report_escapes_names(tmp_path: Path) -> None:
    img = tmp_path / "ok.img"
    img.write_bytes(stream([("ram\x1b]0;pwned\x07", PAGE_SIZE)]))
    code, _ = cli_run("analyze", str(img))
    assert code == 0
    r = CliRunner().invoke(cli, ["analyze", str(img)])
    assert "\x1b" not in r.output and "\x07" not in r.output
    assert "ram\\x1b]0;pwned\\x07" in r.output


def test_extract_failure_leaves_no_output(tmp_path: Path) -> None:
    """Extract used to create OUT before reading: an image failing half way left it behind."""
    from fixedram.image.analyze import extract_block

    data = stream([("pc.ram", 4 * PAGE_SIZE)], [Page("pc.ram", 0, b"\x01" * PAGE_SIZE, 0)])
    img = tmp_path / "in.img"
    img.write_bytes(data)
    out = tmp_path / "out" / "raw"
    out.parent.mkdir()
    with open_image(img) as im:
        assert im.present("pc.ram")[0]
    # the page data is read after OUT is created: make that read fail
    with open(img, "r+b") as f:
        f.truncate(data.find(b"\x01" * PAGE_SIZE) + 10)
    with pytest.raises(FixedramError):
        extract_block(img, "pc.ram", out)
    assert list(out.parent.iterdir()) == []


# -- lengths claimed on the wire, capped before use -----------------------------------------------


def _peak(fn: object) -> int:
    tracemalloc.start()
    try:
        try:
            fn()  # type: ignore[operator]
        except FixedramError:
            pass
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("claim", [1 << 60, (1 << 64) - PAGE_SIZE, MAX_RAM + PAGE_SIZE])
def test_mem_size_beyond_limit_refused(claim: int, tmp_path: Path) -> None:
    """A MEM_SIZE/block of 2^60 bytes: refused at the record, nothing allocated, no file."""
    data = stream([("pc.ram", claim)])
    with pytest.raises(StreamError, match="MEM_SIZE claims"):
        StreamDecoder().feed(data)
    img = tmp_path / "in.img"
    img.write_bytes(data)
    out = tmp_path / "out"
    out.mkdir()
    for fn in (lambda: open_image(img), lambda: receive_into(data, out),
               lambda: convert(img, out / "conv.img")):
        assert _peak(fn) < 8 << 20
        assert list(out.iterdir()) == []


def test_stream_image_claiming_more_pages_than_bytes(tmp_path: Path) -> None:
    """A legacy stream file whose blocks claim MAX_RAM: the page index (8 bytes a page) is
    bounded by the file, so it is refused without allocating 32 GiB."""
    img = tmp_path / "in.img"
    img.write_bytes(stream([("pc.ram", MAX_RAM)]))
    with pytest.raises(ImageError, match=r"more than a .*-byte stream file can describe"):
        open_image(img)
    assert _peak(lambda: open_image(img)) < 8 << 20


def test_mapped_ram_regions_beyond_the_file(tmp_path: Path) -> None:
    """Bitmap and pages offsets of 2^62: refused from the header, nothing read or allocated."""
    hdr = MappedRamHeader(1, PAGE_SIZE, 1 << 62, 1 << 63)
    recs: list[Record] = [FileHeader(), Configuration("pc-q35-10.0", ("mapped-ram",)),
                          SectionStart(1, "ram", 0, 4), MemSize(1 << 40),
                          RamBlock("pc.ram", 1 << 40, mapped=hdr)]
    img = tmp_path / "in.img"
    img.write_bytes(b"".join(encode(r) for r in recs) + bytes(8192))
    with pytest.raises(ImageError, match="past the end of the file"):
        open_image(img)
    assert _peak(lambda: open_image(img)) < 8 << 20


# -- the receiver never writes outside its target file -------------------------------------------


def _page_word(offset: int, cont: bool = False) -> bytes:
    return BE64.pack(offset | int(RamFlag.PAGE) | (int(RamFlag.CONTINUE) if cont else 0))


@pytest.mark.parametrize("offset", [4 * PAGE_SIZE, 5 * PAGE_SIZE, 1 << 40, (1 << 64) - PAGE_SIZE])
@pytest.mark.parametrize("cont", [False, True])
def test_page_offset_beyond_block(offset: int, cont: bool, tmp_path: Path) -> None:
    """PAGE records at or past the end of their block (direct or CONTINUE): refused before any
    write; the directory holds nothing, the previous image is intact."""
    first = encode(Page("pc.ram", 0, b"\x02" * PAGE_SIZE, 0))
    if cont:
        hostile = _page_word(offset, cont=True) + b"\xee" * PAGE_SIZE
    else:
        hostile = _page_word(offset) + b"\x06pc.ram" + b"\xee" * PAGE_SIZE
    data = stream([("pc.ram", 4 * PAGE_SIZE), ("other", PAGE_SIZE)], raw_body=first + hostile)
    out = tmp_path / "out"
    out.mkdir()
    (out / "vm.img").write_bytes(b"previous")
    with pytest.raises(StreamError, match=r"outside RAM block 'pc\.ram'"):
        receive_into(data, out)
    assert sorted(p.name for p in out.iterdir()) == ["vm.img"]
    assert (out / "vm.img").read_bytes() == b"previous"


def test_blocks_beyond_mem_size(tmp_path: Path) -> None:
    """A block list longer than MEM_SIZE (the 2nd block would lie past the total): refused."""
    data = stream([("pc.ram", 4 * PAGE_SIZE), ("x", 1 << 30)], memsize=4 * PAGE_SIZE)
    with pytest.raises(StreamError, match="does not match the RAM block list"):
        receive_into(data, tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_multifd_offsets_capped() -> None:
    """A multifd packet claiming more pages than a packet holds, or a misaligned offset."""
    bad_alloc = encode_init(0) + encode_packet(block="pc.ram", normal_offsets=[0],
                                               data=bytes(PAGE_SIZE), pages_alloc=1 << 30)
    with pytest.raises(StreamError, match="pages_alloc"):
        MultifdChannelDecoder().feed(bad_alloc)
    odd = encode_init(0) + encode_packet(block="pc.ram", normal_offsets=[(1 << 60) + 1],
                                         data=bytes(PAGE_SIZE))
    with pytest.raises(StreamError, match="not page-aligned"):
        MultifdChannelDecoder().feed(odd)


def test_device_state_record_is_opaque_but_bounded() -> None:
    """DeviceState carries no length: the decoder stops collecting at MAX_DEVICE_STATE."""
    from fixedram.stream import format as fmt

    assert fmt.MAX_DEVICE_STATE <= 1 << 30 and fmt.MAX_VMDESC <= 64 << 20
    assert fmt.MAX_PACKAGED <= 1 << 24
    assert DeviceState(b"x").data == b"x"


# -- listening sockets ---------------------------------------------------------------------------


def test_unix_listener_is_0600(tmp_path: Path) -> None:
    old = os.umask(0)  # even with a permissive umask
    try:
        lst = listen(f"unix:{tmp_path / 'l.sock'}")
    finally:
        os.umask(old)
    try:
        mode = (tmp_path / "l.sock").stat().st_mode
        assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o600
    finally:
        lst.close()
    assert not (tmp_path / "l.sock").exists()


@pytest.mark.parametrize("host", ["0.0.0.0", "[::]", "192.0.2.1", "no-such-host.invalid"])
def test_tcp_non_loopback_needs_flag(host: str) -> None:
    with pytest.raises(EndpointError, match=r"non-loopback|--allow-remote"):
        listen(f"tcp:{host}:0")


def test_tcp_loopback_and_allow_remote() -> None:
    for spec, kw in (("tcp:127.0.0.1:0", {}), ("tcp:localhost:0", {}),
                     ("tcp:0.0.0.0:0", {"allow_remote": True})):
        lst = listen(spec, **kw)
        assert lst.sock.type == socket.SOCK_STREAM
        lst.close()


def test_receive_cli_refuses_remote_listen(tmp_path: Path) -> None:
    r = subprocess.run([PY, "-m", "fixedram", "receive", str(tmp_path / "vm.img"), "--listen",
                        "tcp:0.0.0.0:0", "--accept-timeout", "1"],
                       capture_output=True, text=True, timeout=60, check=False)
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and "--allow-remote" in r.stderr
    assert list(tmp_path.iterdir()) == []


# -- stale temporary names ------------------------------------------------------------------------


def test_remove_stale_partials(tmp_path: Path) -> None:
    """A writer SIGKILLed between naming and renaming leaves ``.IMG.fixedram-partial.PID``;
    the next write of IMG removes it when PID is gone, and never touches a live writer's."""
    img = tmp_path / "vm.img"
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = tmp_path / f".vm.img.fixedram-partial.{dead.pid}"
    live = tmp_path / f".vm.img.fixedram-partial.{os.getppid()}"
    other = tmp_path / f".other.img.fixedram-partial.{dead.pid}"
    for p in (stale, live, other):
        p.write_bytes(b"x")
    receive_into(stream([("pc.ram", PAGE_SIZE)]), tmp_path)
    assert not stale.exists() and live.exists() and other.exists()
    assert remove_stale_partials(img) == []
