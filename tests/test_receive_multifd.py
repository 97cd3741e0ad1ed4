"""``fixedram receive --listen ... --channels N``: QEMU 10 and 7.2 migrate with multifd into
fixedram; QEMU 10 loads the image natively and the guest carries on.

Also the refusals: a multifd source with ``--channels 0``, a channel count that differs from
the source's ``multifd-channels`` (fewer, more, or a source without multifd), and
``--channels`` without ``--listen``.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fixedram.endpoint import ReceiveStats, receive_listening
from fixedram.endpoint.multifd_send import send_multifd
from fixedram.errors import FixedramError, StreamError, VMError
from fixedram.image import open_image
from fixedram.image.layout import PAGE_SIZE
from fixedram.image.verify import verify_image
from fixedram.io.channel import connect, listen
from fixedram.stream import (
    CommandRecord,
    Configuration,
    EndOfFile,
    EndOfSection,
    FileHeader,
    MemSize,
    MultifdFlush,
    RamBlock,
    SectionEnd,
    SectionFooter,
    SectionFull,
    SectionPart,
    SectionStart,
    VMDescription,
    encode,
)
from fixedram.stream.format import Command
from fixedram.stream.multifd import encode_init, encode_packet
from fixedram.stream.returnpath import encode_shut, encode_switchover_ack
from fixedram.testing.vm import Guest, QemuBinary, qemu_restore

PY = sys.executable
APPEND = "mib=32 rate=64 hb=100"

PREVIOUS = b"previous image, must survive\n" * 100


def _cmd(*args: str) -> list[str]:
    return [PY, "-m", "fixedram", *args]


def _listen(img: Path, sock: Path, *args: str,
            env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(_cmd("receive", "--listen", f"unix:{sock}", "--accept-timeout", "60",
                                 *args, str(img)),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    deadline = time.monotonic() + 15
    while not sock.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            _, err = proc.communicate()
            pytest.fail(f"fixedram receive did not listen: {err.decode()}")
        time.sleep(0.01)
    return proc


def _multifd(n: int) -> tuple[dict[str, bool], dict[str, int]]:
    return {"multifd": True}, {"multifd-channels": n}


def _diff_pages(a: Path, b: Path) -> set[int]:
    x = np.fromfile(a, np.uint8)
    y = np.fromfile(b, np.uint8)
    assert x.size == y.size, f"dump sizes differ: {x.size} != {y.size}"
    return {int(p) for p in np.flatnonzero((x != y).reshape(-1, PAGE_SIZE).any(axis=1))}


def _partials(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir() if "fixedram-partial" in p.name)


# -- synthetic sources (no QEMU) ---------------------------------------------------------------

SID = 2
DEVICE = encode(SectionFull(3, "timer", 0, 2)) + b"\x00" * 24 + encode(SectionFooter(3))
RAM = 64 * PAGE_SIZE


def _page(tag: int) -> bytes:
    return tag.to_bytes(4, "big") * (PAGE_SIZE // 4)


def _main_stream(return_path: bool) -> bytes:
    """QEMU 10 flush mode: a flush in START, one per pass, END with a flush; no pages here."""
    eos = encode(EndOfSection()) + encode(SectionFooter(SID))
    flush = encode(MultifdFlush())
    out = [encode(FileHeader()), encode(Configuration("pc-q35-10.0"))]
    if return_path:
        out.append(encode(CommandRecord(Command.OPEN_RETURN_PATH)))
    out += [encode(SectionStart(SID, "ram", 0, 4)), encode(MemSize(RAM)),
            encode(RamBlock("pc.ram", RAM)), flush, eos,
            encode(SectionPart(SID)), flush, eos,
            encode(SectionEnd(SID)), flush, eos,
            DEVICE, encode(EndOfFile()), encode(VMDescription(b'{"page_size": 4096}'))]
    return b"".join(out)


def _channel(cid: int, bad: bool = False) -> bytes:
    """SYNC (setup), pages of epoch 1, SYNC, rewrites of epoch 2 (+ a zeroed page), SYNC."""
    base = 16 * cid
    e1 = encode_packet(block="pc.ram", normal_offsets=[(base + i) * PAGE_SIZE for i in range(4)],
                       data=b"".join(_page(0x100 + base + i) for i in range(4)))
    e2 = encode_packet(block="pc.ram", normal_offsets=[base * PAGE_SIZE],
                       zero_offsets=[(base + 1) * PAGE_SIZE], data=_page(0x200 + base))
    if bad:
        e2 = encode_packet(block="rom", normal_offsets=[0], data=_page(1))
    sync = encode_packet(sync=True)
    return encode_init(cid) + sync + e1 + sync + e2 + sync


def test_synthetic_channels_first_and_progress(tmp_path: Path) -> None:
    """Both channels connect before the main connection; pages of a later epoch win; the
    return path gets SWITCHOVER_ACK then SHUT; progress counts the channels' page bytes."""
    lst = listen(f"unix:{tmp_path}/m.sock")
    result: dict[str, Any] = {}
    progress: list[ReceiveStats] = []

    def run() -> None:
        try:
            result["report"] = receive_listening(lst, tmp_path / "vm.img", channels=2,
                                                 progress=progress.append)
        except BaseException as e:  # reported below
            result["error"] = e

    th = threading.Thread(target=run)
    th.start()
    chans = [connect(lst.address) for _ in range(2)]
    for cid, ch in zip((1, 0), chans, strict=True):
        ch.sendall(_channel(cid))
    time.sleep(0.2)
    main = connect(lst.address)
    main.sendall(_main_stream(return_path=True))
    th.join(30)
    lst.close()
    assert "error" not in result, result.get("error")
    sent = b""
    main.sock.settimeout(10)
    while chunk := main.sock.recv(100):
        sent += chunk
    assert sent == encode_switchover_ack() + encode_shut(False)
    for c in [main, *chans]:
        c.close()
    rep = result["report"]
    assert rep.multifd_channels == 2 and rep.return_path
    assert rep.bytes_received == len(_main_stream(True)) + 2 * 5 * PAGE_SIZE
    assert progress[-1].bytes_received == rep.bytes_received
    assert rep.pages_written == 2 * 5 and rep.zero_pages == 2
    with open_image(tmp_path / "vm.img") as im:
        data = bytes(im.read("pc.ram", 0, 64))
        assert im.present("pc.ram").sum() == 2 * 3
    for cid in (0, 1):
        base = 16 * cid
        pg = [data[(base + i) * PAGE_SIZE : (base + i + 1) * PAGE_SIZE] for i in range(4)]
        assert pg == [_page(0x200 + base), bytes(PAGE_SIZE), _page(0x102 + base),
                      _page(0x103 + base)]
    assert _partials(tmp_path) == []


def test_synthetic_channel_failure(tmp_path: Path) -> None:
    """A bad packet on channel 1 ends the receive with that channel's error (the main loop,
    blocked reading an idle main connection, is woken); no image is left."""
    lst = listen(f"unix:{tmp_path}/m.sock")
    result: dict[str, Any] = {}

    def run() -> None:
        try:
            receive_listening(lst, tmp_path / "vm.img", channels=2)
        except BaseException as e:
            result["error"] = e

    th = threading.Thread(target=run)
    th.start()
    main = connect(lst.address)
    stream = _main_stream(return_path=False)
    main.sendall(stream[: stream.index(encode(SectionEnd(SID)))])  # then stays silent
    chans = [connect(lst.address) for _ in range(2)]
    chans[0].sendall(_channel(0))
    chans[1].sendall(_channel(1, bad=True))
    th.join(30)
    assert not th.is_alive()
    lst.close()
    for c in [main, *chans]:
        c.close()
    err = result.get("error")
    assert isinstance(err, StreamError) and isinstance(err, FixedramError)
    assert str(err).startswith("multifd channel 1: packet for unknown RAM block 'rom'"), err
    assert list(tmp_path.iterdir()) == []


# -- real QEMU ------------------------------------------------------------------------------------

CASES = [
    pytest.param("10", 2, False, False, id="qemu10-2ch"),
    pytest.param("10", 4, False, False, id="qemu10-4ch"),
    pytest.param("7.2", 2, False, False, id="qemu72-2ch"),
    pytest.param("10", 3, True, False, id="qemu10-3ch-direct-io"),
    # return path + switchover-ack: the source closes its channels only after our SHUT
    pytest.param("10", 2, False, True, id="qemu10-2ch-return-path"),
]


@pytest.mark.qemu
@pytest.mark.timeout(150)
@pytest.mark.parametrize("version,nchan,direct,return_path", CASES)
def test_multifd_receive_and_restore(version: str, nchan: int, direct: bool,
                                     return_path: bool, tmp_path: Path, shm_dir: Path,
                                     accel: str, qemu10: QemuBinary, qemu72: QemuBinary,
                                     guest_elf: Path) -> None:
    qemu = qemu10 if version == "10" else qemu72
    machine = "q35" if version == "10" else "pc-i440fx-7.2"
    img = tmp_path / "vm.img"
    sock = tmp_path / "mig.sock"
    src_dump = shm_dir / f"{tmp_path.name}-src.mem"
    dst_dump = shm_dir / f"{tmp_path.name}-dst.mem"
    extra = ["--require-direct-io"] if direct else []
    with Guest(qemu, tmp_path, append=APPEND, mem="128M", machine=machine,
               accel=accel) as src:
        src.wait_heartbeat(gen_at_least=1)
        proc = _listen(img, sock, "--channels", str(nchan), *extra)
        try:
            t0 = time.monotonic()
            caps, params = _multifd(nchan)
            if return_path:
                caps |= {"return-path": True, "switchover-ack": True}
            src.migrate(f"unix:{sock}", caps=caps, params=params)
            info = src.wait_migration(60, stop_after=20)
            out, err = proc.communicate(timeout=30)
            took = time.monotonic() - t0
        finally:
            proc.kill()
        assert info["status"] == "completed"
        assert proc.returncode == 0, err.decode()
        assert out == b""  # return-path bytes go to the main connection, never stdout
        msg = err.decode()
        assert "fixedram: saved" in msg and f"main connection + {nchan} multifd channels" in msg
        assert ("written with O_DIRECT" in msg) == direct
        assert not sock.exists()  # the listener is gone
        src.pmemsave(src_dump)
        last = src.heartbeats()[-1]
        with open_image(img) as im:
            assert im.format == "mapped-ram"
            assert im.machine.startswith("pc-q35-10" if version == "10" else "pc-i440fx-7.2")
            present = int(im.present("pc.ram").sum())
        assert present >= (32 << 20) // PAGE_SIZE  # the workload at least
        assert _partials(tmp_path) == []
        # QEMU 10 loads the image natively (a 7.2 image with -M pc-i440fx-7.2, as the source)
        with qemu_restore(src, img, "mapped-ram", qemu=qemu10, workdir=tmp_path) as dst:
            dst.pmemsave(dst_dump)
            diff = _diff_pages(src_dump, dst_dump)  # exact for 7.2 too: see guest/dirty.c
            assert not diff, (f"{len(diff)} pages differ: "
                              f"{[hex(p * PAGE_SIZE) for p in sorted(diff)[:8]]}")
            dst.cont()
            hb = dst.wait_heartbeat(n_at_least=last.n + 2, timeout=30)
            assert hb.err == 0, dst.serial_tail()
            assert not dst.bad_lines()
    src_dump.unlink()
    dst_dump.unlink()
    print(f"\n{version} x{nchan}{' direct' if direct else ''}"
          f"{' return-path' if return_path else ''}: migrated in {took:.2f} s"
          f"; {msg.strip().splitlines()[-1]}")


def _wait_failed(src: Guest, timeout: float = 30.0) -> str:
    """The source's migration ends (failed/cancelled); return its status."""
    deadline = time.monotonic() + timeout
    while True:
        info = src.query_migrate()
        if info.get("status") in ("failed", "cancelled", "completed"):
            return str(info["status"])
        if time.monotonic() > deadline:
            raise VMError(f"migration still {info.get('status')} after {timeout} s")
        time.sleep(0.05)


#: (--channels, source's multifd-channels (0: multifd off), expected message)
MISMATCHES = [
    # either the channel's connection or the main channel's MULTIFD_FLUSH may reveal it first
    (0, 2, r"but no multifd channels are expected; receive with --listen and --channels N \(N = "
           r"the source's multifd-channels\)"),
    (4, 2, "only 2 of 4 multifd channels connected"),
    (2, 0, r"only 0 of 2 multifd channels connected by the first multifd sync point \(the "
           r"source does not use multifd\?\)"),
    # the third connection, or channel id 2 arriving first, whichever comes first
    (2, 3, r"more than 2 multifd channels connected|multifd channel id 2 but only 2 channels"),
]


@pytest.mark.qemu
@pytest.mark.timeout(120)
@pytest.mark.parametrize("version", ["10", "7.2"])
def test_channel_count_mismatch(version: str, tmp_path: Path, accel: str, qemu10: QemuBinary,
                                qemu72: QemuBinary, guest_elf: Path) -> None:
    """Each mismatch: one line on stderr, exit 2, the source's migration fails, the previous
    image is untouched and no partial file is left; the source can migrate again.

    QEMU 7.2 (sync at every EOS, no MULTIFD_FLUSH record) must be caught too: with
    ``--channels 0`` nothing on its main connection says multifd.

    A missing channel is waited for ``FIXEDRAM_CHANNEL_GRACE`` seconds (1.5 here, 5 by
    default): the source connects every channel before it writes the first sync point.
    """
    qemu = qemu10 if version == "10" else qemu72
    machine = "q35" if version == "10" else "pc-i440fx-7.2"
    cases = MISMATCHES if version == "10" else MISMATCHES[:2]
    img = tmp_path / "vm.img"
    img.write_bytes(PREVIOUS)
    with Guest(qemu, tmp_path, append=APPEND, mem="128M", machine=machine,
               accel=accel) as src:
        src.wait_heartbeat(gen_at_least=1)
        for i, (ours, theirs, want) in enumerate(cases):
            sock = tmp_path / f"m{i}.sock"
            proc = _listen(img, sock, "--channels", str(ours), env=GRACE_ENV)
            try:
                caps = {"multifd": bool(theirs)}
                params = {"multifd-channels": theirs} if theirs else {}
                t0 = time.monotonic()
                src.migrate(f"unix:{sock}", caps=caps, params=params)
                _, err = proc.communicate(timeout=30)
                took = time.monotonic() - t0
            finally:
                proc.kill()
            msg = err.decode()
            assert proc.returncode == 2, msg
            lines = [ln for ln in msg.splitlines() if not ln.startswith("fixedram: listening")]
            assert len(lines) == 1 and lines[0].startswith("fixedram: error:"), msg
            assert re.search(want, lines[0]), msg
            if ours == 0:
                assert lines[0].startswith("fixedram: error: the source uses multifd ("), msg
            assert took < 15, f"{want}: took {took:.1f} s"
            assert _wait_failed(src) == "failed"
            assert img.read_bytes() == PREVIOUS
            assert _partials(tmp_path) == []
            assert not sock.exists()
            print(f"\n--channels {ours} vs multifd-channels {theirs} ({took:.2f} s): {lines[0]}")
        src.wait_status("running")


GRACE_ENV = {**os.environ, "FIXEDRAM_CHANNEL_GRACE": "1.5"}


@pytest.mark.parametrize("value", ["soon", "0"])
def test_bad_channel_grace(value: str, tmp_path: Path) -> None:
    """A bad ``FIXEDRAM_CHANNEL_GRACE`` is one line and exit 2, and no image is left."""
    sock = tmp_path / "g.sock"
    r = subprocess.run(_cmd("receive", "--listen", f"unix:{sock}", "--channels", "2", "--quiet",
                            str(tmp_path / "vm.img")),
                       capture_output=True, timeout=30,
                       env={**os.environ, "FIXEDRAM_CHANNEL_GRACE": value})
    assert r.returncode == 2
    assert r.stderr.decode() == (f"fixedram: error: FIXEDRAM_CHANNEL_GRACE={value!r}: expected "
                                 "a number of seconds above 0\n")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("args", [[], ["--fd", "0"]], ids=["stdin", "fd"])
def test_channels_needs_listen(args: list[str], tmp_path: Path) -> None:
    r = subprocess.run(_cmd("receive", "--channels", "2", *args, str(tmp_path / "vm.img")),
                       input=b"", capture_output=True, timeout=30)
    assert r.returncode == 2
    assert r.stderr.decode() == (
        "fixedram: error: --channels needs --listen unix:PATH or tcp:HOST:PORT (QEMU opens "
        "multifd channels only over unix: and tcp:, not exec: or fd:)\n")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("direct", [False, True], ids=["buffered", "direct"])
@pytest.mark.parametrize("zero", ["packet", "main"])
def test_scattered_pages_send_to_receive(zero: str, direct: bool, tmp_path: Path) -> None:
    """A guest whose pages with data alternate with zero pages, sent by ``fixedram send``
    over two channels (every page: the zero ones in the packets' zero lists, or as ZERO
    records on the main connection) into ``fixedram receive``: pages written a packet at a
    time, whatever their runs, give the same RAM and checksums that verify."""
    from synth_images import write_mapped_image

    src = tmp_path / "src.img"
    pages = {i: bytes([i % 251 + 1]) * PAGE_SIZE for i in range(0, 3000, 2)}
    pages.update({i: bytes([7]) * PAGE_SIZE for i in range(3000, 3100)})  # and one run
    write_mapped_image(src, {"pc.ram": 16 << 20}, {"pc.ram": pages})
    lst = listen(f"unix:{tmp_path}/m.sock")
    result: dict[str, Any] = {}

    def run() -> None:
        try:
            result["report"] = receive_listening(lst, tmp_path / "dst.img", channels=2,
                                                 direct_io=direct)
        except BaseException as e:  # reported below
            result["error"] = e

    th = threading.Thread(target=run)
    th.start()
    rep = send_multifd(src, lst.address, 2, zero=zero, fresh=False)  # type: ignore[arg-type]
    th.join(60)
    lst.close()
    assert "error" not in result, result.get("error")
    assert rep.zero_pages == 4096 - len(pages)
    got = result["report"]
    assert got.pages_written == len(pages) and got.pages_present == len(pages)
    with open_image(src) as a, open_image(tmp_path / "dst.img") as b:
        assert (a.present("pc.ram") == b.present("pc.ram")).all()
        assert a.read("pc.ram", 0, 4096) == b.read("pc.ram", 0, 4096)
    assert verify_image(tmp_path / "dst.img").status == "ok"


def _send_to_receive(src: Path, dst: Path, tmp: Path) -> Any:
    """``send_multifd`` of ``src`` over two channels into ``receive_listening`` writing
    ``dst``; returns the receive's report (raises what the send raised)."""
    lst = listen(f"unix:{tmp}/c.sock")
    result: dict[str, Any] = {}

    def run() -> None:
        try:
            result["report"] = receive_listening(lst, dst, channels=2)
        except BaseException as e:  # the send's failure shows in the receive too
            result["error"] = e

    th = threading.Thread(target=run, daemon=True)
    th.start()
    try:
        send_multifd(src, lst.address, 2)
    except BaseException:
        lst.close()  # wakes a receiver still waiting for connections
        th.join(60)
        assert not th.is_alive()
        raise
    th.join(60)
    lst.close()
    assert not th.is_alive()
    assert "error" not in result, result.get("error")
    return result["report"]


def test_checked_send_of_runs_and_scattered_pages(tmp_path: Path) -> None:
    """An image with checksums whose pages lie both in long runs (read into the sender's
    check buffer and digested, then sent from the file by ``sendfile``) and scattered among
    zero pages (gathered into the packet buffer, digested there and sent from it): every
    page arrives, and a flipped byte in either kind stops the send naming its extent."""
    from synth_images import write_mapped_image

    from fixedram.commands.convert import convert

    rng = np.random.default_rng(11)
    pages = {i: rng.bytes(PAGE_SIZE) for i in range(0, 6000, 2)}  # scattered
    pages.update({i: rng.bytes(PAGE_SIZE) for i in range(6000, 12000)})  # one run
    qemu = tmp_path / "qemu.img"
    write_mapped_image(qemu, {"pc.ram": 64 << 20}, {"pc.ram": pages})
    src = tmp_path / "src.img"
    convert(qemu, src)  # with checksums
    got = _send_to_receive(src, tmp_path / "dst.img", tmp_path)
    assert got.pages_written == len(pages)
    with open_image(src) as a, open_image(tmp_path / "dst.img") as b:
        assert a.read("pc.ram", 0, 16384) == b.read("pc.ram", 0, 16384)
        m = a.blocks["pc.ram"].mapped
        assert m is not None
    for page in (1000, 9000):  # scattered, in the run
        at = m.pages_offset + page * PAGE_SIZE + 5
        with open(src, "r+b") as f:
            f.seek(at)
            byte = f.read(1)
            f.seek(at)
            f.write(bytes([byte[0] ^ 1]))
        ext = page * PAGE_SIZE >> 20 << 20
        with pytest.raises(FixedramError, match=f"'pc.ram' offset 0x{ext:x}-"):
            _send_to_receive(src, tmp_path / "bad.img", tmp_path)
        with open(src, "r+b") as f:
            f.seek(at)
            f.write(byte)
        assert not (tmp_path / "bad.img").exists()
