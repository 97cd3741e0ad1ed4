"""``receive --listen tcp:`` and ``send --connect tcp:`` against real QEMU 10, on loopback."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fixedram.testing.guest import build_guest
from fixedram.testing.vm import Guest, choose_accel, find_qemu

pytestmark = pytest.mark.qemu

FIXEDRAM = [sys.executable, "-m", "fixedram"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_listening(port: int, timeout: float = 20.0) -> None:
    """Wait until a socket listens on ``port`` (without connecting: both QEMU's incoming
    side and ``fixedram receive`` take the first connection as the migration)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            if state == "0A" and int(local.split(":")[1], 16) == port:  # 0A: LISTEN
                return
        time.sleep(0.05)
    raise AssertionError(f"nothing listens on 127.0.0.1:{port}")


def test_tcp_save_and_restore(tmp_path: Path) -> None:
    qemu = find_qemu("10")
    src = Guest(qemu, tmp_path, name="src", mem="128M", append="mib=32 rate=64",
                kernel=build_guest(), accel=choose_accel(qemu))
    image = tmp_path / "vm.img"
    with src:
        src.wait_heartbeat(gen_at_least=1)
        port = free_port()
        recv = subprocess.Popen([*FIXEDRAM, "receive", "--listen", f"tcp:127.0.0.1:{port}",
                                 "--quiet", str(image)], stderr=subprocess.PIPE)
        wait_listening(port)
        src.migrate(f"tcp:127.0.0.1:{port}")
        info = src.wait_migration(120)
        assert info["status"] == "completed"
        _, err = recv.communicate(timeout=60)
        assert recv.returncode == 0, err.decode()
        src_mem = src.pmemsave(tmp_path / "src.mem")
        last = src.heartbeats()[-1]
    dst = Guest.like(src, name="dst", incoming=True)
    with dst:
        port = free_port()
        dst.migrate_incoming(f"tcp:127.0.0.1:{port}")
        wait_listening(port)
        r = subprocess.run([*FIXEDRAM, "send", "--connect", f"tcp:127.0.0.1:{port}", "--quiet",
                            str(image)], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        dst.wait_incoming()
        assert dst.pmemsave(tmp_path / "dst.mem").read_bytes() == src_mem.read_bytes()
        dst.cont()
        hb = dst.wait_heartbeat(after=last.n + 3)
        assert dst.heartbeats()[0].n == last.n + 1 and hb.err == 0


def test_tcp_listen_refuses_remote_address(tmp_path: Path) -> None:
    r = subprocess.run([*FIXEDRAM, "receive", "--listen", "tcp:0.0.0.0:0",
                        str(tmp_path / "x.img")], capture_output=True, text=True, timeout=30)
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and "--allow-remote" in r.stderr
