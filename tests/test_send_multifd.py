"""``fixedram send --channels N`` / ``restore --channels N``: fixedram as a multifd source.

Restores go into real QEMU 10 (2 and 4 channels) and QEMU 7.2 (2 channels), from images
fixedram wrote (``convert`` of a QEMU stream: mapped-ram with checksums) and images QEMU
wrote itself (mapped-ram). Each is checked like ``test_send.py`` checks single-stream
restores: the destination's RAM (paused, before ``cont``) equals the source's ``pmemsave``
byte for byte, and after ``cont`` the guest's heartbeat carries on with ``err=0``.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from qemu_images import ImageSpec
from synth_images import write_mapped_image
from test_send import _check_runs_on, _compare_ram
from test_send_fast import _cached_fraction, _drop_from_cache
from test_verify import a_present_page, flip, synth

from fixedram.commands.convert import convert
from fixedram.endpoint.multifd_send import (
    check_multifd_settings,
    send_multifd,
)
from fixedram.errors import EndpointError, ImageError, MismatchError
from fixedram.image import open_image
from fixedram.qmp.common import AUTO_PROXY_CHANNELS
from fixedram.qmp.destination import query_multifd_dest
from fixedram.qmp.restore import choose_channels
from fixedram.stream import StreamEncoder
from fixedram.stream.multifd import (
    MULTIFD_PACKET_SIZE,
    MultifdChannelDecoder,
    MultifdPacket,
    encode_init,
    encode_packet,
    packet_header_into,
)
from fixedram.testing.vm import Guest, QemuBinary, find_qemu
from fixedram.versions import choose_sync_mode, choose_zero_mode

REPO = Path(__file__).resolve().parent.parent
PY = str(Path(sys.executable).absolute())
PS = 4096

# QEMU 10 saving a pc-i440fx-7.2 machine, for restoring into QEMU 7.2.
MAPPED_RAM_AS_72 = ImageSpec(mode="mapped-ram", machine="pc-i440fx-7.2")


# ---------------------------------------------------------------------------------------------
# Pure tests
# ---------------------------------------------------------------------------------------------


def test_packet_header_matches_encoder_and_decoder() -> None:
    normal = np.array([0, 1, 2, 7, 9], dtype=np.int64) * PS
    zero = np.array([3, 4], dtype=np.int64) * PS
    hdr = bytearray(MULTIFD_PACKET_SIZE)
    hdr[:] = b"\xff" * len(hdr)  # stale bytes must be overwritten
    packet_header_into(hdr, block=b"pc.ram", normal=normal, zero=zero, packet_num=42)
    data = bytes(range(256)) * (len(normal) * PS // 256)
    want = encode_packet(block="pc.ram", normal_offsets=normal.tolist(),
                         zero_offsets=zero.tolist(), data=data, packet_num=42)
    assert bytes(hdr) + data == want
    dec = MultifdChannelDecoder()
    evs = dec.feed(encode_init(3, b"u" * 16) + bytes(hdr) + data)
    pkt = evs[1]
    assert isinstance(pkt, MultifdPacket)
    assert pkt.block == "pc.ram" and pkt.packet_num == 42 and not pkt.sync
    assert pkt.normal_offsets == tuple(normal.tolist())
    assert pkt.zero_offsets == tuple(zero.tolist())
    assert bytes(pkt.data) == data
    # a SYNC packet: no pages, pages_alloc 0 (as QEMU 10 writes it)
    packet_header_into(hdr, block=b"", normal=np.zeros(0, np.int64), packet_num=43, sync=True)
    assert bytes(hdr) == encode_packet(packet_num=43, sync=True)
    with pytest.raises(ValueError, match="at most 128"):
        packet_header_into(hdr, block=b"x", normal=np.arange(129) * PS, packet_num=0)


def test_modes_follow_machine_and_version() -> None:
    assert choose_sync_mode("pc-q35-10.0") == "flush"
    assert choose_sync_mode("pc-i440fx-8.1") == "flush"
    assert choose_sync_mode("pc-i440fx-8.0") == "eos"
    assert choose_sync_mode("pc-i440fx-7.2") == "eos"
    assert choose_sync_mode("microvm", (7, 2, 22)) == "eos"
    assert choose_sync_mode("microvm") == "flush"
    assert choose_zero_mode("pc-q35-10.0") == "packet"
    assert choose_zero_mode("pc-i440fx-8.2") == "main"
    assert choose_zero_mode("pc-i440fx-8.2", (10, 0, 2)) == "packet"
    assert choose_zero_mode("pc-i440fx-7.2", (7, 2, 22)) == "main"
    assert choose_zero_mode("pc-q35-10.0", zero="main") == "main"


def test_zero_records_layout() -> None:
    raw = StreamEncoder().zero_pages("pc.ram", np.array([5, 6, 9], dtype=np.int64))
    # one record naming the block, then CONTINUE records of 9 bytes (be64 word, fill 0)
    assert int.from_bytes(raw[:8], "big") == 5 * PS | 0x2
    assert raw[8] == len("pc.ram") and raw[9:15] == b"pc.ram" and raw[15] == 0
    recs = np.frombuffer(raw[16:], dtype=[("w", ">u8"), ("f", "u1")])
    assert (recs["w"] & 0xFFF).tolist() == [0x22, 0x22]
    assert (recs["w"] >> 12).tolist() == [6, 9]
    assert recs["f"].tolist() == [0, 0]


def test_settings_checks() -> None:
    ok = {"multifd": True}
    check_multifd_settings(ok, {"multifd-channels": 2, "multifd-compression": "none"}, 2)
    with pytest.raises(MismatchError, match="multifd off"):
        check_multifd_settings({}, {"multifd-channels": 2}, 2)
    with pytest.raises(MismatchError, match="expects 4 multifd channels"):
        check_multifd_settings(ok, {"multifd-channels": 4}, 2)
    with pytest.raises(MismatchError, match="zstd"):
        check_multifd_settings(ok, {"multifd-channels": 2, "multifd-compression": "zstd"}, 2)
    with pytest.raises(MismatchError, match="mapped-ram"):
        check_multifd_settings({**ok, "mapped-ram": True}, {"multifd-channels": 2}, 2)


def test_bad_channel_counts(tmp_path: Path) -> None:
    with pytest.raises(EndpointError, match="1 to 255"):
        send_multifd(tmp_path / "nope.img", "unix:/nonexistent", 0)


def _cli(cmd: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PY, "-m", "fixedram", cmd, *args], cwd=REPO, text=True,
                          capture_output=True, timeout=timeout, check=False)


def test_cli_needs_a_socket(tmp_path: Path) -> None:
    img = tmp_path / "x.img"
    img.write_bytes(b"")
    for extra in ([], ["--fd", "5"], ["--connect", "unix:/x", "--postcopy"]):
        r = _cli("send", "--channels", "2", *extra, str(img))
        assert r.returncode == 2, r
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and "--channels needs --connect" in lines[0], r.stderr


# ---------------------------------------------------------------------------------------------
# Real QEMU
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def sockdir() -> Iterator[Path]:
    """A short directory for unix sockets (sun_path is 108 bytes)."""
    d = Path(tempfile.mkdtemp(prefix="frm-", dir="/tmp"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="session")
def fixedram_image(qemu_image: Callable[[Any], Any],
                   tmp_path_factory: pytest.TempPathFactory) -> Callable[[Any], tuple[Path, Any]]:
    """Factory: a QEMU image kind converted by fixedram into its own mapped-ram image (with
    checksums), and the QEMU case (source RAM, command line) it came from."""
    root = tmp_path_factory.mktemp("multifd-fixedram")
    cache: dict[Any, tuple[Path, Any]] = {}

    def make(kind: Any) -> tuple[Path, Any]:
        if kind not in cache:
            case = qemu_image(kind)
            out = root / f"{len(cache)}.img"
            convert(case.path, out)
            cache[kind] = (out, case)
        return cache[kind]

    return make


def _dest(case: Any, workdir: Path, sockdir: Path, qemu: QemuBinary, name: str,
          channels: int) -> tuple[Guest, Path, Path]:
    """A destination like the source, waiting on a unix socket with multifd on; plus a
    second QMP socket for ``send --qmp``."""
    dst = Guest.like(case.source, name=name, workdir=workdir, qemu=qemu)
    qmp2 = sockdir / f"{name}.qmp"
    dst.extra_args = ("-qmp", f"unix:{qmp2},server=on,wait=off")
    dst.start()
    sock = sockdir / f"{name}.sock"
    if channels:
        dst.migrate_incoming(f"unix:{sock}", caps={"multifd": True},
                             params={"multifd-channels": channels})
    return dst, qmp2, sock


RESTORES = [
    pytest.param("fixedram", "legacy", "10", 2, id="10-fixedram-2ch"),
    pytest.param("qemu", "mapped-ram", "10", 4, id="10-qemu-mapped-ram-4ch"),
    pytest.param("fixedram", "legacy-7.2", "7.2", 2, id="72-fixedram-2ch"),
    pytest.param("qemu", MAPPED_RAM_AS_72, "7.2", 2, id="72-qemu-mapped-ram-2ch"),
]


@pytest.mark.qemu
@pytest.mark.parametrize(("source", "kind", "dest", "channels"), RESTORES)
def test_send_channels(qemu_image: Callable[[Any], Any],
                       fixedram_image: Callable[[Any], tuple[Path, Any]], shm_dir: Path,
                       tmp_path: Path, sockdir: Path, source: str, kind: Any, dest: str,
                       channels: int) -> None:
    if source == "fixedram":
        img, case = fixedram_image(kind)
    else:
        case = qemu_image(kind)
        img = case.path
    qemu = find_qemu(dest)
    dst, qmp2, sock = _dest(case, tmp_path, sockdir, qemu, f"mfd{channels}", channels)
    with dst:
        rj = tmp_path / "report.json"
        r = _cli("send", "--channels", str(channels), "--connect", f"unix:{sock}", "--qmp",
                 str(qmp2), "--report-json", str(rj), str(img))
        assert r.returncode == 0, r.stderr
        assert f"over {channels} multifd channels" in r.stderr
        rep = json.loads(rj.read_text())
        assert rep["channels"] == channels and rep["pages_sent"] > 0
        assert rep["sync"] == ("flush" if dest == "10" else "eos")
        assert rep["zero"] == ("packet" if dest == "10" else "main")
        assert rep["main_bytes"] < rep["bytes_sent"] // 4  # the pages went over the channels
        dst.wait_incoming(60)
        assert dst.status() == "paused"
        assert dst.query_migrate().get("status") == "completed"
        _compare_ram(dst, case, shm_dir, f"send-{dest}-{channels}")
        _check_runs_on(dst, case)


@pytest.mark.qemu
@pytest.mark.parametrize("dest", ["10", "7.2"])
def test_send_channels_every_page(fixedram_image: Callable[[Any], tuple[Path, Any]],
                                  shm_dir: Path, tmp_path: Path, sockdir: Path,
                                  dest: str) -> None:
    """``fresh=False``: pages without data travel too, in the packets' zero lists (QEMU 10)
    or as ZERO records on the main connection (7.2); every page is accounted for once."""
    img, case = fixedram_image("legacy" if dest == "10" else "legacy-7.2")
    dst, qmp2, sock = _dest(case, tmp_path, sockdir, find_qemu(dest), "every", 2)
    with dst:
        d = query_multifd_dest(qmp2, 2)
        rep = send_multifd(img, f"unix:{sock}", 2, uuid=d.uuid, dest_machine=d.machine,
                           dest_blocks=d.blocks, dest_version=d.version, fresh=False)
        assert rep.zero == ("packet" if dest == "10" else "main")
        assert rep.zero_pages > 0
        assert rep.pages_sent + rep.zero_pages == sum(n for _, n in rep.blocks) // PS
        dst.wait_incoming(60)
        _compare_ram(dst, case, shm_dir, f"every-{dest}")
        _check_runs_on(dst, case)


def test_default_channels() -> None:
    """Unless asked, a proxy restore of a mapped-ram image read buffered (a local file or
    an object image) takes two channels; a legacy stream, a native load and O_DIRECT reads
    one stream; asked, as asked."""
    def ch(how: str, fmt: str, asked: int | None, direct: bool = False) -> int:
        return choose_channels(how, fmt, asked, direct_io=direct)

    assert ch("proxy", "mapped-ram", None) == AUTO_PROXY_CHANNELS == 2
    assert ch("proxy", "stream", None) == 0
    assert ch("native", "mapped-ram", None) == 0
    assert ch("proxy", "mapped-ram", None, direct=True) == 0
    assert ch("proxy", "mapped-ram", 0) == 0
    assert ch("proxy", "stream", 4) == 4


@pytest.mark.qemu
@pytest.mark.parametrize("asked", [["--channels", "2"], []], ids=["asked", "default"])
def test_restore_cli_channels(fixedram_image: Callable[[Any], tuple[Path, Any]],
                              shm_dir: Path, tmp_path: Path, sockdir: Path,
                              asked: list[str]) -> None:
    img, case = fixedram_image("legacy")
    dst, qmp2, _ = _dest(case, tmp_path, sockdir, find_qemu("10"), "rst", 0)
    with dst:
        r = _cli("restore", "--qmp", str(qmp2), "--via", "proxy", *asked,
                 "--paused", "--json", str(img))
        assert r.returncode == 0, r.stderr
        rep = json.loads(r.stdout)
        assert rep["via"] == "proxy" and rep["status"] == "paused"
        assert rep["channels"] == 2
        assert rep["caps_changed"].get("multifd") is True
        # the settings are put back: a later migration of the VM must not inherit multifd
        assert not dst.cmd("query-migrate-capabilities") or not any(
            c["state"] for c in dst.cmd("query-migrate-capabilities")
            if c["capability"] == "multifd")
        _compare_ram(dst, case, shm_dir, "restore-2")
        _check_runs_on(dst, case)


@pytest.mark.qemu
def test_restore_qemu_as_another_user(qemu_image: Callable[[Any], Any],
                                      shm_dir: Path, tmp_path: Path, sockdir: Path) -> None:
    """A QEMU that runs as another user cannot listen in fixedram's private directory: asked
    for channels, the restore is refused in one line before QEMU changes (it still waits and
    takes the image over the single stream); so is a lazy restore over ``unix``."""
    # the suite runs as root (scripts/setup.sh installs packages, tests drop caches)
    assert os.geteuid() == 0, "needs root, to start QEMU as another user"
    case = qemu_image("mapped-ram")
    img = case.path
    dst = Guest.like(case.source, name="nobody", workdir=tmp_path, qemu=find_qemu("10"))
    qmp2 = sockdir / "nobody.qmp"
    dst.extra_args = ("-qmp", f"unix:{qmp2},server=on,wait=off", "-run-with", "user=nobody")
    with dst.start():
        r = _cli("restore", "--qmp", str(qmp2), "--via", "proxy", "--channels", "2",
                 "--paused", str(img))
        assert r.returncode == 2
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert "cannot listen for multifd channels" in r.stderr, r.stderr
        assert dst.status() == "inmigrate"
        assert dst.query_migrate().get("status") in (None, "none")
        r = _cli("restore", "--qmp", str(qmp2), "--lazy", "--transport", "unix", "--paused",
                 str(img))
        assert r.returncode == 2
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert "cannot listen" in r.stderr and "--transport fd" in r.stderr, r.stderr
        assert dst.status() == "inmigrate"
        r = _cli("restore", "--qmp", str(qmp2), "--via", "proxy", "--paused", "--json",
                 str(img))
        assert r.returncode == 0, r.stderr
        rep = json.loads(r.stdout)
        assert rep["channels"] == 0 and rep["status"] == "paused"
        # a folder QEMU, as nobody, may write its pmemsave to
        dumps = Path(tempfile.mkdtemp(prefix="fixedram-nobody-", dir=shm_dir.parent))
        try:
            dumps.chmod(0o777)
            _compare_ram(dst, case, dumps, "restore-nobody")
        finally:
            shutil.rmtree(dumps, ignore_errors=True)


@pytest.mark.qemu
def test_refusals(fixedram_image: Callable[[Any], tuple[Path, Any]], tmp_path: Path,
                  sockdir: Path) -> None:
    """A channel-count mismatch seen over QMP is refused before connecting (QEMU keeps
    waiting); a destination without multifd fails at once; both with one line."""
    img, case = fixedram_image("legacy")
    dst, qmp2, sock = _dest(case, tmp_path, sockdir, find_qemu("10"), "ref", 4)
    with dst:
        r = _cli("send", "--channels", "2", "--connect", f"unix:{sock}", "--qmp", str(qmp2),
                 str(img))
        assert r.returncode == 2
        assert "expects 4 multifd channels" in r.stderr
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert dst.status() == "inmigrate"
        assert dst.query_migrate().get("status") in ("setup", None, "none")
    dst, _, sock = _dest(case, tmp_path, sockdir, find_qemu("10"), "off", 0)
    with dst:
        dst.migrate_incoming(f"unix:{sock}")  # multifd off
        r = _cli("send", "--channels", "2", "--connect", f"unix:{sock}", str(img))
        assert r.returncode == 2
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert "multifd" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.qemu
def test_send_channels_direct_io(qemu_image: Callable[[Any], Any], shm_dir: Path,
                                 tmp_path: Path, sockdir: Path) -> None:
    """``send --channels 2 --require-direct-io`` from a disk directory: each channel reads
    pages with O_DIRECT into its packet; RAM equal, guest runs, the image stays out of the
    page cache."""
    case = qemu_image("mapped-ram")
    disk = Path(tempfile.mkdtemp(prefix="frs-mfd-", dir="/var/tmp"))
    try:
        img = disk / "vm.img"
        subprocess.run(["cp", "--sparse=always", str(case.path), str(img)], check=True)
        _drop_from_cache(img)
        dst, qmp2, sock = _dest(case, tmp_path, sockdir, find_qemu("10"), "mfddio", 2)
        with dst:
            r = _cli("send", "--channels", "2", "--connect", f"unix:{sock}", "--qmp",
                     str(qmp2), "--require-direct-io", str(img))
            assert r.returncode == 0, r.stderr
            dst.wait_incoming(60)
            assert _cached_fraction(img) < 0.25
            _compare_ram(dst, case, shm_dir, "send-dio")
            _check_runs_on(dst, case)
    finally:
        shutil.rmtree(disk, ignore_errors=True)


def test_bad_extent_stops_multifd_before_device_state(tmp_path: Path) -> None:
    """Pages checked against the image's checksums while the channels send them: a flipped
    byte makes send_multifd fail naming the extent, and the main connection never carries
    the device state (the destination's load cannot complete)."""
    img = synth(tmp_path / "s.mr")
    _, at = a_present_page(img, nth=1)  # in the run of pages 0-2
    flip(img, at + 17)
    with open_image(img) as im:
        device = im.device_state
    addr = tmp_path / "mig.sock"
    lst = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    lst.bind(str(addr))
    lst.listen(8)
    got: list[bytearray] = []

    def drain() -> None:  # main connection first, then the channels; each read to its end
        conns = [lst.accept()[0] for _ in range(3)]
        threads = [threading.Thread(target=_read_all, args=(c, got)) for c in conns]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)

    t = threading.Thread(target=drain)
    t.start()
    with pytest.raises(ImageError, match="refusing to complete the restore") as err:
        send_multifd(img, f"unix:{addr}", 2, uuid=bytes(16), zero="packet", sync="flush")
    # the one extent with the flip, the others checked good (pages never checked would
    # count as zero pages, and their extents as bad too)
    assert "'pc.ram' offset 0x0" in str(err.value) and "more extents" not in str(err.value)
    t.join(30)
    lst.close()
    assert len(got) == 3 and sum(map(len, got)) > 3 * PS
    assert all(device not in bytes(b) for b in got)


def _read_all(conn: socket.socket, into: list[bytearray]) -> None:
    buf = bytearray()
    while chunk := conn.recv(1 << 20):
        buf += chunk
    conn.close()
    into.append(buf)


def test_stalled_channel_is_named(tmp_path: Path) -> None:
    """A destination that takes the connections but never reads a channel: the send stops
    with one error naming the channel and the stall, once the sockets are full."""
    rng = np.random.default_rng(3)
    img = tmp_path / "big.mr"
    write_mapped_image(img, {"pc.ram": 16 << 20},
                       {"pc.ram": {i: rng.bytes(PS) for i in range(4096)}})
    addr = tmp_path / "mig.sock"
    lst = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    lst.bind(str(addr))
    lst.listen(8)
    conns: list[socket.socket] = []
    done = threading.Event()

    def accept() -> None:  # the main connection and two channels, none of them read
        conns.extend(lst.accept()[0] for _ in range(3))
        done.wait(30)
        for c in conns:
            c.close()

    t = threading.Thread(target=accept)
    t.start()
    try:
        with pytest.raises(EndpointError, match=r"multifd channel \d: the destination read "
                                                r"nothing for 1 s"):
            send_multifd(img, f"unix:{addr}", 2, uuid=bytes(16), stall_timeout=1.0)
    finally:
        done.set()
        t.join(30)
        lst.close()


@pytest.mark.qemu
@pytest.mark.parametrize("channels", ["2", "0"])
def test_restore_bad_page_never_runs(channels: str, fixedram_image: Callable[[Any], tuple[
        Path, Any]], tmp_path: Path, sockdir: Path) -> None:
    """A page that fails its checksum is found while the pages go out, after the restore has
    sent ``cont`` (QEMU starts the guest the moment its load completes): the restore fails in
    one line naming the extent, and the guest never runs (QEMU's load fails, or it stays
    paused)."""
    good, case = fixedram_image("mapped-ram")
    img = tmp_path / "bad.img"
    subprocess.run(["cp", "--sparse=always", str(good), str(img)], check=True)
    _, at = a_present_page(img, nth=300)
    flip(img, at + 100)
    dst = Guest.like(case.source, name=f"bad{channels}", workdir=tmp_path, incoming=True,
                     qemu=find_qemu("10"))
    qmp2 = sockdir / f"bad{channels}.qmp"
    dst.extra_args = ("-qmp", f"unix:{qmp2},server=on,wait=off")
    with dst.start():
        r = _cli("restore", "--qmp", str(qmp2), "--via", "proxy", "--channels", channels,
                 "--json", str(img))
        assert r.returncode != 0
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
        assert "refusing to complete the restore" in lines[0], lines[0]
        time.sleep(1.0)  # longer than the guest's heartbeat interval
        if dst.running:
            assert dst.status() != "running"
        assert dst.heartbeats() == []
