"""The migration-stream codec: every record type round-trips through encode and the decoder
(fed in chunks of any size), unsupported records are refused with their offset, and real
QEMU 10 streams of every flavour decode into the records expected of them."""

from __future__ import annotations

import json
import os
import socket
import struct
import threading
from collections.abc import Callable, Iterable
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from qemu_images import ImageCase

from fixedram.errors import StreamError, TruncatedStream, UnsupportedRecord
from fixedram.image.layout import align_up, bitmap_bytes
from fixedram.stream import (
    CommandRecord,
    Configuration,
    DeviceState,
    EndOfFile,
    EndOfSection,
    FileHeader,
    MappedRamHeader,
    MemSize,
    MultifdFlush,
    Packaged,
    Page,
    RamBlock,
    Record,
    SectionEnd,
    SectionFooter,
    SectionPart,
    SectionStart,
    StreamDecoder,
    StreamEncoder,
    VMDescription,
    Zero,
    encode,
)
from fixedram.stream.format import MAPPED_RAM_HEADER, Command, RamFlag
from fixedram.stream.returnpath import encode_pong, encode_shut
from fixedram.testing.vm import Guest, QemuBinary

PS = 4096
RID = 3  # section id of "ram" in the synthetic streams

# ---------------------------------------------------------------------------------------------
# Synthetic streams
# ---------------------------------------------------------------------------------------------


def _page(i: int) -> bytes:
    return bytes([i & 0xFF]) * 8 + os.urandom(16) + bytes(PS - 24)


def _device_blob() -> bytes:
    """Two SECTION_FULL device sections (payload bytes include 00, 06 and 7e on purpose)."""
    out = b""
    for sid, name, payload in ((0, b"timer", b"\x00\x06\x7e\x00\x00\x00\x00"), (9, b"gs", b"x")):
        out += bytes([4]) + struct.pack(">I", sid) + bytes([len(name)]) + name
        out += struct.pack(">II", 0, 1) + payload + bytes([0x7E]) + struct.pack(">I", sid)
    return out


VMDESC = json.dumps({"page_size": PS, "devices": [{"name": "timer", "instance_id": 0}]}).encode()


def _ram_records(blocks: list[RamBlock]) -> list[Record]:
    """START with the block list; a PART and an END with pages, zeros and CONTINUE."""
    a, b = blocks[0].name, blocks[-1].name
    return [
        SectionStart(RID, "ram", 0, 4),
        MemSize(sum(x.length for x in blocks)),
        *blocks,
        EndOfSection(),
        SectionFooter(RID),
        SectionPart(RID),
        Page(a, 0, _page(0)),
        Page(a, PS, _page(1)),  # CONTINUE
        Zero(a, 2 * PS),  # CONTINUE
        Zero(b, 0),  # names its block
        Page(a, 3 * PS, _page(3)),  # names its block again
        EndOfSection(),
        SectionFooter(RID),
        SectionPart(RID),
        Page(a, 5 * PS, _page(5)),  # CONTINUE across a section boundary
        MultifdFlush(),
        EndOfSection(),
        SectionFooter(RID),
        CommandRecord(Command.SWITCHOVER_START),
        SectionEnd(RID),
        Zero(a, 5 * PS, 0),
        Page(b, 0, _page(7)),
        EndOfSection(),
        SectionFooter(RID),
    ]


def precopy_stream(
    cfg: Configuration | None = None,
    blocks: list[RamBlock] | None = None,
    commands: Iterable[Record] = (),
    vmdesc: bool = True,
) -> list[Record]:
    """A whole precopy stream as records."""
    cfg = cfg or Configuration("pc-q35-10.0")
    blocks = blocks or [RamBlock("pc.ram", 16 * PS), RamBlock("/rom@etc/acpi/rsdp", PS)]
    out: list[Record] = [FileHeader(3), cfg, *commands, *_ram_records(blocks)]
    out += [DeviceState(_device_blob()), EndOfFile()]
    if vmdesc:
        out.append(VMDescription(VMDESC))
    return out


def postcopy_stream() -> list[Record]:
    """Postcopy: ADVISE, DISCARD, PACKAGED device state, EOF without vmdesc."""
    discard = b"\x00\x06pc.ram\x00" + struct.pack(">QQ", 0, 16 * PS)
    nested = (
        encode(CommandRecord(Command.POSTCOPY_LISTEN))
        + _device_blob()
        + encode(CommandRecord(Command.PING, struct.pack(">I", 3)))
        + encode(CommandRecord(Command.POSTCOPY_RUN))
    )
    recs = precopy_stream(
        commands=[
            CommandRecord(Command.OPEN_RETURN_PATH),
            CommandRecord(Command.PING, struct.pack(">I", 1)),
            CommandRecord(Command.POSTCOPY_ADVISE, struct.pack(">QQ", PS, PS)),
        ]
    )
    mid: list[Record] = [
        CommandRecord(Command.POSTCOPY_RAM_DISCARD, discard),
        CommandRecord(Command.PING, struct.pack(">I", 2)),
        Packaged(nested),
    ]
    body = [r for r in recs[:-3] if not isinstance(r, MultifdFlush)]
    i = next(k for k, r in enumerate(body) if isinstance(r, SectionEnd))
    return [*body[:i], *mid, *body[i:], EndOfFile()]


def _mapped_bytes(cfg: Configuration, blocks: list[RamBlock]) -> tuple[bytes, list[Record]]:
    """A mapped-ram stream: block headers followed by bitmap + pages regions, as QEMU lays
    them out (pages regions page-aligned here, not 1 MiB, to keep the test small)."""
    recs: list[Record] = [
        FileHeader(3),
        cfg,
        SectionStart(RID, "ram", 0, 4),
        MemSize(sum(b.length for b in blocks)),
    ]
    out = bytearray(b"".join(encode(r) for r in recs))
    done: list[RamBlock] = []
    for blk in blocks:
        head = encode(replace(blk, mapped=None))
        bm = len(out) + len(head) + MAPPED_RAM_HEADER.size
        po = align_up(bm + bitmap_bytes(blk.length // PS), PS)
        full = replace(blk, mapped=MappedRamHeader(1, PS, bm, po))
        out += encode(full)
        assert len(out) == bm
        out += b"\xff" * bitmap_bytes(blk.length // PS)  # garbage the decoder must skip
        out += bytes(po - len(out)) + b"\xab" * blk.length
        done.append(full)
    tail: list[Record] = [
        EndOfSection(),
        SectionFooter(RID),
        SectionPart(RID),
        EndOfSection(),
        SectionFooter(RID),
        CommandRecord(Command.SWITCHOVER_START),
        SectionEnd(RID),
        EndOfSection(),
        SectionFooter(RID),
        DeviceState(_device_blob()),
        EndOfFile(),
        VMDescription(VMDESC),
    ]
    out += b"".join(encode(r) for r in tail)
    return bytes(out), [*recs, *done, *tail]


def encode_stream(records: Iterable[Record]) -> bytes:
    enc = StreamEncoder()
    return b"".join(enc.encode(r) for r in records)


def decode_chunks(data: bytes, sizes: Callable[[], int], base: int = 0) -> list[Record]:
    """Feed ``data`` in chunks whose sizes ``sizes()`` picks; return all records."""
    dec = StreamDecoder(base_offset=base)
    out: list[Record] = []
    p = 0
    while p < len(data):
        n = sizes()
        out += dec.feed(data[p : p + n])
        p += n
    out += dec.feed_eof()
    assert dec.done
    return out


def _norm(records: list[Record]) -> list[Record]:
    return [replace(r, pos=-1) if isinstance(r, Page) else r for r in records]


def _cycle(sizes: list[int]) -> Callable[[], int]:
    it = iter(range(1 << 62))
    return lambda: sizes[next(it) % len(sizes)]


CONFIGS = {
    "plain": Configuration("pc-i440fx-10.0"),
    "caps": Configuration("pc-q35-10.0", capabilities=("x-ignore-shared",)),
    "page-bits": Configuration("pc-q35-10.0", page_bits=12),
    "uuid": Configuration("pc-q35-10.0", uuid=bytes(range(16))),
    "all": Configuration("pc-q35-10.0", ("x-ignore-shared", "validate-uuid"), 12, b"u" * 16),
}


def _streams() -> dict[str, tuple[bytes, list[Record]]]:
    out: dict[str, tuple[bytes, list[Record]]] = {}
    for name, cfg in CONFIGS.items():
        blocks = None
        if cfg.ignore_shared:
            blocks = [
                RamBlock("pc.ram", 16 * PS, guest_addr=0),
                RamBlock("pc.bios", 2 * PS, guest_addr=0xFFFC0000),
            ]
        recs = precopy_stream(cfg, blocks)
        out[f"precopy-{name}"] = (encode_stream(recs), recs)
    recs = precopy_stream(vmdesc=False)
    out["no-vmdesc"] = (encode_stream(recs), recs)
    recs = postcopy_stream()
    out["postcopy"] = (encode_stream(recs), recs)
    out["mapped-ram"] = _mapped_bytes(
        Configuration("pc-q35-10.0", ("mapped-ram",)),
        [RamBlock("pc.ram", 70 * PS), RamBlock("pc.bios", PS)],
    )
    out["mapped-ram-ignore-shared"] = _mapped_bytes(
        Configuration("pc-q35-10.0", ("x-ignore-shared", "mapped-ram")),
        [RamBlock("pc.ram", 3 * PS, guest_addr=0), RamBlock("pc.rom", PS, guest_addr=0xC0000)],
    )
    return out


STREAMS = _streams()

# Which stream shows each record type (every type of records.py, every Command).
RECORD_TYPES: dict[str, tuple[str, Callable[[Record], bool]]] = {
    "FileHeader": ("precopy-plain", lambda r: isinstance(r, FileHeader)),
    "Configuration": ("precopy-plain", lambda r: isinstance(r, Configuration)),
    "Configuration/capabilities": (
        "precopy-caps",
        lambda r: isinstance(r, Configuration) and bool(r.capabilities),
    ),
    "Configuration/page-bits": (
        "precopy-page-bits",
        lambda r: isinstance(r, Configuration) and r.page_bits == 12,
    ),
    "Configuration/uuid": (
        "precopy-uuid",
        lambda r: isinstance(r, Configuration) and r.uuid is not None,
    ),
    "SectionStart": ("precopy-plain", lambda r: isinstance(r, SectionStart)),
    "SectionPart": ("precopy-plain", lambda r: isinstance(r, SectionPart)),
    "SectionEnd": ("precopy-plain", lambda r: isinstance(r, SectionEnd)),
    "SectionFooter": ("precopy-plain", lambda r: isinstance(r, SectionFooter)),
    "Packaged": ("postcopy", lambda r: isinstance(r, Packaged)),
    "MemSize": ("precopy-plain", lambda r: isinstance(r, MemSize)),
    "RamBlock": ("precopy-plain", lambda r: isinstance(r, RamBlock) and r.guest_addr is None),
    "RamBlock/guest_addr": (
        "precopy-caps",
        lambda r: isinstance(r, RamBlock) and r.guest_addr is not None,
    ),
    "RamBlock/mapped": ("mapped-ram", lambda r: isinstance(r, RamBlock) and r.mapped is not None),
    "RamBlock/mapped+guest_addr": (
        "mapped-ram-ignore-shared",
        lambda r: isinstance(r, RamBlock) and r.mapped is not None and r.guest_addr is not None,
    ),
    "Page": ("precopy-plain", lambda r: isinstance(r, Page)),
    "Zero": ("precopy-plain", lambda r: isinstance(r, Zero)),
    "MultifdFlush": ("precopy-plain", lambda r: isinstance(r, MultifdFlush)),
    "EndOfSection": ("precopy-plain", lambda r: isinstance(r, EndOfSection)),
    "DeviceState": ("precopy-plain", lambda r: isinstance(r, DeviceState)),
    "EndOfFile": ("precopy-plain", lambda r: isinstance(r, EndOfFile)),
    "VMDescription": ("precopy-plain", lambda r: isinstance(r, VMDescription)),
    "EndOfFile/no-vmdesc": ("no-vmdesc", lambda r: isinstance(r, EndOfFile)),
}
for _c in Command:
    if _c is Command.PACKAGED:
        continue
    RECORD_TYPES[f"Command/{_c.name}"] = (
        "postcopy" if _c.name != "SWITCHOVER_START" else "precopy-plain",
        lambda r, c=_c: isinstance(r, CommandRecord) and r.cmd == c,
    )


def _with_other_commands() -> None:
    """Commands a postcopy stream does not carry: put them in a stream of their own."""
    extra = [
        CommandRecord(Command.POSTCOPY_LISTEN),
        CommandRecord(Command.POSTCOPY_RUN),
        CommandRecord(Command.ENABLE_COLO),
        CommandRecord(Command.POSTCOPY_RESUME),
        CommandRecord(Command.RECV_BITMAP, b"\x06pc.ram"),
    ]
    recs = precopy_stream(commands=extra)
    STREAMS["commands"] = (encode_stream(recs), recs)
    for c in extra:
        assert isinstance(c, CommandRecord)
        RECORD_TYPES[f"Command/{Command(c.cmd).name}"] = (
            "commands",
            lambda r, k=c.cmd: isinstance(r, CommandRecord) and r.cmd == k,
        )


_with_other_commands()


@pytest.mark.parametrize("kind", sorted(RECORD_TYPES))
def test_record_roundtrip(kind: str) -> None:
    """encode -> decode gives the same record back, whole and in 1-byte chunks."""
    stream, pred = RECORD_TYPES[kind]
    data, recs = STREAMS[stream]
    assert any(pred(r) for r in recs), kind
    for sizes in (_cycle([len(data)]), _cycle([1]), _cycle([7, 4096, 1, 9, 13, 65536])):
        got = _norm(decode_chunks(data, sizes))
        assert got == recs
        assert any(pred(r) for r in got)


def test_every_record_type_and_command_covered() -> None:
    import fixedram.stream.records as records_mod

    names = {k.split("/")[0] for k in RECORD_TYPES}
    classes = {n for n in records_mod.__all__ if n not in ("Record", "MappedRamHeader")}
    # SectionFull is only a header inside the opaque device state; the decoder never emits it;
    # PageRun, ZeroRun, ZeroPages and PageSet come from run mode only
    # (tests/test_stream_runs.py)
    assert classes - names == {"SectionFull", "CommandRecord", "PageRun", "ZeroRun",
                               "ZeroPages", "PageSet"}
    assert {f"Command/{c.name}" for c in Command if c is not Command.PACKAGED} <= set(RECORD_TYPES)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    stream=st.sampled_from(sorted(STREAMS)),
    sizes=st.lists(st.integers(min_value=1, max_value=9000), min_size=1, max_size=12),
)
def test_roundtrip_random_chunks(stream: str, sizes: list[int]) -> None:
    data, recs = STREAMS[stream]
    assert _norm(decode_chunks(data, _cycle(sizes))) == recs


@settings(max_examples=40, deadline=None)
@given(
    sizes=st.lists(st.integers(min_value=1, max_value=300), min_size=1, max_size=8),
    base=st.integers(min_value=0, max_value=1 << 40),
)
def test_page_pos_is_absolute(sizes: list[int], base: int) -> None:
    data, _ = STREAMS["precopy-plain"]
    for r in decode_chunks(data, _cycle(sizes), base=base):
        if isinstance(r, Page):
            assert data[r.pos - base : r.pos - base + PS] == r.data


def test_reencode_is_identical() -> None:
    for name, (data, _recs) in STREAMS.items():
        if not name.startswith("mapped"):
            assert encode_stream(decode_chunks(data, _cycle([len(data)]))) == data, name


def test_continue_without_block_is_an_error() -> None:
    recs = precopy_stream()
    head = encode_stream(recs[: recs.index(SectionPart(RID)) + 1])
    bad = head + struct.pack(">Q", 0 | RamFlag.PAGE | RamFlag.CONTINUE) + bytes(PS)
    dec = StreamDecoder()
    with pytest.raises(StreamError, match="CONTINUE") as ei:
        dec.feed(bad)
    assert ei.value.offset == len(head)


@pytest.mark.parametrize(
    ("flag", "what"),
    [
        (RamFlag.XBZRLE, "XBZRLE"),
        (RamFlag.COMPRESS_PAGE, "compressed page"),
        (RamFlag.HOOK, "RDMA hook"),
    ],
)
@pytest.mark.parametrize("chunk", [1, 5, 1 << 20])
def test_unsupported_ram_records(flag: RamFlag, what: str, chunk: int) -> None:
    recs = precopy_stream()
    i = recs.index(SectionPart(RID))
    head = encode_stream(recs[: i + 1])
    bad = head + struct.pack(">Q", PS | flag) + b"\x06pc.ram" + b"\x01\x00\x10" + bytes(64)
    dec = StreamDecoder(base_offset=100)
    with pytest.raises(UnsupportedRecord) as ei:
        for p in range(0, len(bad), chunk):
            dec.feed(bad[p : p + chunk])
    assert what in str(ei.value)
    assert ei.value.offset == 100 + len(head)
    assert f"(at byte {100 + len(head)})" in str(ei.value)


def test_truncated_stream_names_offset() -> None:
    data, _ = STREAMS["precopy-plain"]
    for cut in (3, 8, 20, 60, len(data) // 2, len(data) - 10):
        dec = StreamDecoder()
        dec.feed(data[:cut])
        with pytest.raises(StreamError) as ei:
            dec.feed_eof()
        assert ei.value.offset is not None and 0 <= ei.value.offset <= cut


def test_cut_after_a_footer_whose_id_ends_in_zero() -> None:
    """A cut right after ``<payload 7e> 7e 00 00 00 00`` (the footer of section 0) has the
    shape of a footer followed by EOF; it is still a truncated stream."""
    sec = bytes([4]) + struct.pack(">I", 0) + bytes([5]) + b"timer" + struct.pack(">II", 0, 1)
    sec += b"\x01\x02\x7e" + bytes([0x7E]) + struct.pack(">I", 0)
    head = encode_stream(precopy_stream(vmdesc=False))
    blob = _device_blob()
    data = head[: len(head) - len(blob) - 1]
    assert head[len(data) :] == blob + b"\x00"
    dec = StreamDecoder()
    dec.feed(data + sec)
    with pytest.raises(TruncatedStream, match="no EOF marker"):
        dec.feed_eof()
    # the same section with its EOF byte is a complete stream
    dec = StreamDecoder()
    out = dec.feed(data + sec + b"\x00") + dec.feed_eof()
    assert dec.done and any(isinstance(r, DeviceState) and r.data == sec for r in out)


def test_vmdesc_not_json_names_offset() -> None:
    data, _ = STREAMS["precopy-plain"]
    at = len(data) - len(VMDESC)
    bad = data[:at] + b"[" + data[at + 1 :]
    dec = StreamDecoder()
    dec.feed(bad)
    with pytest.raises(StreamError, match="not valid JSON") as ei:
        dec.feed_eof()
    assert ei.value.offset == at - 5
    assert not isinstance(ei.value, TruncatedStream)


# ---------------------------------------------------------------------------------------------
# Real QEMU 10 streams
# ---------------------------------------------------------------------------------------------


def _kinds(records: Iterable[Record]) -> set[str]:
    out = set()
    for r in records:
        name = type(r).__name__
        if isinstance(r, CommandRecord):
            name += "/" + r.name
        if isinstance(r, RamBlock) and r.mapped is not None:
            name += "/mapped"
        if isinstance(r, Configuration) and r.capabilities:
            name += "/capabilities"
        out.add(name)
    return out


def _decode_file(path: Path, offset: int = 0) -> list[Record]:
    """Decode a file the way a seeking reader does (skipping mapped-ram pages regions)."""
    dec = StreamDecoder(base_offset=offset)
    out: list[Record] = []
    with open(path, "rb") as f:
        f.seek(offset)
        while True:
            if dec.next_offset != f.tell():
                dec.seek(dec.next_offset)
                f.seek(dec.next_offset)
            chunk = f.read(1 << 16)
            if not chunk:
                out += dec.feed_eof()
                break
            out += dec.feed(chunk)
    assert dec.done
    return out


LEGACY = {
    "FileHeader",
    "Configuration",
    "SectionStart",
    "MemSize",
    "RamBlock",
    "EndOfSection",
    "SectionFooter",
    "SectionPart",
    "Page",
    "Zero",
    "SectionEnd",
    "CommandRecord/SWITCHOVER_START",
    "DeviceState",
    "EndOfFile",
    "VMDescription",
}
MAPPED = {
    "FileHeader",
    "Configuration/capabilities",
    "SectionStart",
    "MemSize",
    "RamBlock/mapped",
    "EndOfSection",
    "SectionFooter",
    "SectionPart",
    "SectionEnd",
    "CommandRecord/SWITCHOVER_START",
    "DeviceState",
    "EndOfFile",
    "VMDescription",
}


@pytest.mark.qemu
@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        ("legacy", LEGACY),
        ("legacy-exec", LEGACY),
        ("mapped-ram", MAPPED),
        ("mapped-ram-multifd2", MAPPED),
        ("mapped-ram-offset", MAPPED),
        ("legacy-7.2", LEGACY - {"CommandRecord/SWITCHOVER_START"}),
    ],
)
def test_real_qemu_file_streams(
    kind: str, expected: set[str], qemu_image: Callable[[str], ImageCase]
) -> None:
    case = qemu_image(kind)
    recs = _decode_file(case.path, case.offset)
    kinds = _kinds(recs)
    assert kinds == expected, kinds ^ expected
    blocks = [r for r in recs if isinstance(r, RamBlock)]
    assert [(b.name, b.length) for b in blocks] == [(b.name, b.used_length) for b in case.ramblocks]
    if case.mode == "legacy":
        # PAGE/ZERO records name their block only when it changes: the same CONTINUE choices
        # as QEMU, so decoding and re-encoding gives back the file byte for byte
        assert encode_stream(recs) == case.path.read_bytes()[case.offset :]


def _serve_migration(
    sock: socket.socket, main_out: list[bytes], done: threading.Event, errors: list[BaseException]
) -> None:
    """Accept the main and multifd connections of a unix: migration; record the main channel,
    drain the others, answer PINGs and send SHUT when the stream is complete."""
    threads: list[threading.Thread] = []

    def drain(c: socket.socket, first: bytes) -> None:
        try:
            if first[:4] == b"QEVM":
                dec = StreamDecoder()
                data = bytearray(first)
                rp = bytearray()
                for r in dec.feed(first):
                    if isinstance(r, CommandRecord) and r.cmd == Command.PING:
                        rp += encode_pong(struct.unpack(">I", r.data)[0])
                while not dec.done:
                    if rp:
                        c.sendall(bytes(rp))
                        rp.clear()
                    b = c.recv(1 << 16)
                    if not b:
                        dec.feed_eof()
                        break
                    data += b
                    for r in dec.feed(b):
                        if isinstance(r, CommandRecord) and r.cmd == Command.PING:
                            rp += encode_pong(struct.unpack(">I", r.data)[0])
                if rp:
                    c.sendall(bytes(rp))
                c.sendall(encode_shut())
                main_out.append(bytes(data))
                done.set()
                while c.recv(1 << 16):
                    pass
            else:
                while c.recv(1 << 20):
                    pass
        except BaseException as e:  # reported by the test
            errors.append(e)
            done.set()
        finally:
            c.close()

    sock.settimeout(0.5)
    try:
        while not done.is_set():
            try:
                c, _ = sock.accept()
            except TimeoutError:
                continue
            c.settimeout(60)
            first = c.recv(4, socket.MSG_WAITALL)
            t = threading.Thread(target=drain, args=(c, first), daemon=True)
            t.start()
            threads.append(t)
    except OSError:
        pass
    for t in threads:
        t.join(30)


def _capture_unix(
    qemu: QemuBinary, accel: str, tmp: Path, caps: dict[str, bool], params: dict[str, object]
) -> list[Record]:
    path = Path(f"/tmp/fr-codec-{os.getpid()}-{len(caps)}.sock")
    path.unlink(missing_ok=True)
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(str(path))
    srv.listen(8)
    main: list[bytes] = []
    errors: list[BaseException] = []
    done = threading.Event()
    t = threading.Thread(target=_serve_migration, args=(srv, main, done, errors), daemon=True)
    t.start()
    try:
        with Guest(qemu, tmp, mem="128M", accel=accel, append="mib=8 rate=0 gens=2 hb=100") as g:
            g.wait_heartbeat(gen_at_least=2)
            g.migrate(f"unix:{path}", caps=caps, params=params)
            g.wait_migration(60, stop_after=10)
            assert done.wait(30)
    finally:
        srv.close()
        path.unlink(missing_ok=True)
        t.join(30)
    assert not errors, errors
    return decode_chunks(main[0], _cycle([65536]))


@pytest.mark.qemu
def test_real_qemu_multifd_unix_stream(qemu10: QemuBinary, accel: str, tmp_path: Path) -> None:
    """multifd over unix: (2 channels) with a return path: the main channel carries
    MULTIFD_FLUSH, OPEN_RETURN_PATH and PING; normal pages go over the multifd channels."""
    recs = _capture_unix(
        qemu10, accel, tmp_path, {"multifd": True, "return-path": True}, {"multifd-channels": 2}
    )
    kinds = _kinds(recs)
    assert {
        "MultifdFlush",
        "CommandRecord/OPEN_RETURN_PATH",
        "CommandRecord/PING",
        "SectionStart",
        "MemSize",
        "RamBlock",
        "EndOfSection",
        "SectionFooter",
        "SectionEnd",
        "DeviceState",
        "EndOfFile",
        "VMDescription",
    } <= kinds, kinds
    assert "Page" not in kinds


@pytest.mark.qemu
def test_real_qemu_postcopy_advise(qemu10: QemuBinary, accel: str, tmp_path: Path) -> None:
    """postcopy-ram on (precopy completion): POSTCOPY_ADVISE with both page sizes."""
    recs = _capture_unix(qemu10, accel, tmp_path, {"postcopy-ram": True}, {})
    adv = [r for r in recs if isinstance(r, CommandRecord) and r.cmd == Command.POSTCOPY_ADVISE]
    assert len(adv) == 1 and struct.unpack(">QQ", adv[0].data) == (PS, PS)
    assert {"Page", "Zero", "CommandRecord/OPEN_RETURN_PATH", "VMDescription"} <= _kinds(recs)


@pytest.mark.parametrize("last", [None, "pc.ram", "other"])
def test_zero_pages_equal_record_encoding(last: str | None) -> None:
    """The vectorised ZERO records equal ``encode`` of each Zero record, CONTINUE included."""
    pages = [7, 3, 4, 5, 900, 0]
    vec, one = StreamEncoder(), StreamEncoder()
    if last is not None:
        vec.encode(Zero(last, 0))
        one.encode(Zero(last, 0))
    got = vec.zero_pages("pc.ram", np.array(pages))
    want = b"".join(one.encode(Zero("pc.ram", p * PS)) for p in pages)
    assert got == want
    assert vec.zero_pages("pc.ram", np.array([], dtype=np.uint64)) == b""
    assert vec.zero_run("pc.ram", 10 * PS, 3) == b"".join(
        one.encode(Zero("pc.ram", p * PS)) for p in (10, 11, 12))
