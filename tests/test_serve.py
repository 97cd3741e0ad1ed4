"""``fixedram serve`` and ``FIXEDRAM_SERVER``: commands run by the resident server.

A server started by a fixture on a private socket; each case runs the command line as a user
would, once through the server and, where the output is compared, once without it:

* ``analyze`` and ``verify`` (clean, damaged, unreadable) give the same stdout, stderr and exit
  status through the server as without it;
* a lazy restore of the bare test guest through the server: RAM equal to the source's, then
  the heartbeat carries on (the lazy restore tests' own checks);
* descriptors the client inherited keep their numbers in the command;
* Ctrl-C (SIGINT to the client) reaches the command, which reports it as the command line does;
  a client killed outright hangs up on its command (SIGHUP);
* a server killed during a command, and a socket with no server behind it: one line, exit 2;
* another uid is refused by the socket's mode and, with the mode opened up, by the server's
  peer-credential check (needs root to run a process as another uid).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from synth_images import write_mapped_image
from test_lazy_restore import _destination, _runs_on, _same_ram

from fixedram.image import open_image

PY = str(Path(sys.executable).absolute())
REPO = Path(__file__).resolve().parent.parent
PS = 4096


def _env(server: Path | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "FIXEDRAM_SERVER"}
    if server is not None:
        env["FIXEDRAM_SERVER"] = str(server)
    return env


def fixedram(server: Path | None, *args: str, **kw: Any) -> subprocess.CompletedProcess[str]:
    """``fixedram ARGS``, through the server at ``server`` (None: a fresh process)."""
    return subprocess.run([PY, "-m", "fixedram", *args], capture_output=True, text=True,
                          env=_env(server), timeout=120, check=False, **kw)


@pytest.fixture(scope="module")
def sockdir() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="frs-", dir="/tmp"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


#: The pid of the server on each socket the tests started.
SERVERS: dict[Path, int] = {}


def start_server(path: Path) -> subprocess.Popen[str]:
    """A server on ``path``, once it listens; its stderr goes to ``path`` + ``.log``."""
    log = Path(f"{path}.log")
    log.parent.mkdir(mode=0o700, exist_ok=True)
    with open(log, "w") as f:
        p = subprocess.Popen([PY, "-m", "fixedram", "serve", "--socket", str(path)],
                             stderr=f, text=True, env=_env(None))
    _wait_for(lambda: "serving on" in log.read_text() or p.poll() is not None, "serving")
    assert log.read_text().startswith(f"fixedram: serving on {path}"), log.read_text()
    SERVERS[path] = p.pid
    return p


@pytest.fixture(scope="module")
def server(sockdir: Path) -> Iterator[Path]:
    """A server on a socket in a directory it creates; stopped by SIGTERM at the end, which
    removes the socket."""
    path = sockdir / "srv" / "sock"
    p = start_server(path)
    try:
        yield path
    finally:
        p.send_signal(signal.SIGTERM)
        assert p.wait(timeout=30) == 0
        assert not path.exists()


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    img = tmp_path_factory.mktemp("serve") / "small.img"
    write_mapped_image(img, {"pc.ram": 64 * PS, "rom": 4 * PS},
                       {"pc.ram": {0: b"\x01" * PS, 9: b"\x02" * PS}, "rom": {1: b"\x03" * PS}})
    return img


def test_socket_and_directory_are_private(server: Path) -> None:
    assert server.stat().st_mode & 0o777 == 0o600
    assert server.parent.stat().st_mode & 0o777 == 0o700


def test_commands_give_the_same_output_through_the_server(server: Path, image: Path,
                                                          tmp_path: Path) -> None:
    damaged = tmp_path / "damaged.img"
    shutil.copyfile(image, damaged)
    assert fixedram(None, "verify", "--add", str(damaged)).returncode == 0
    with open_image(damaged) as im:  # page 9's byte: verify names it, exit 1
        m = im.blocks["pc.ram"].mapped
        assert m is not None
        at = m.pages_offset + 9 * PS + 5
    with open(damaged, "r+b") as f:
        f.seek(at)
        f.write(b"\xff")
    garbage = tmp_path / "garbage.img"
    garbage.write_bytes(b"not an image" * 100)
    cases = [("analyze", str(image)), ("analyze", "--json", str(image)),
             ("verify", "--json", str(image)),
             ("verify", str(damaged)), ("analyze", str(garbage)),
             ("verify", "--no-such-option", str(image)), ("--version",)]
    statuses = set()
    for args in cases:
        plain, served = fixedram(None, *args), fixedram(server, *args)
        assert (served.returncode, _timeless(served.stdout), served.stderr) == \
            (plain.returncode, _timeless(plain.stdout), plain.stderr), args
        statuses.add(plain.returncode)
    assert statuses == {0, 1, 2}


def _timeless(out: str) -> str:
    """A report without its timings (verify's ``elapsed``, "0.02 s")."""
    return re.sub(r'"elapsed": [0-9.e-]+|[0-9.]+ s\)', "T", out)


def test_descriptors_keep_their_numbers(server: Path, image: Path) -> None:
    """A descriptor the client inherited besides stdin, stdout and stderr reaches the
    command under the same number: ``analyze /dev/fd/N`` reads the image through it."""
    fd = os.open(image, os.O_RDONLY)
    try:
        plain, served = (fixedram(via, "analyze", "--json", f"/dev/fd/{fd}", pass_fds=[fd])
                         for via in (None, server))
    finally:
        os.close(fd)
    assert plain.returncode == 0, plain.stderr
    assert (served.returncode, served.stdout, served.stderr) == \
        (plain.returncode, plain.stdout, plain.stderr)


def test_a_second_server_on_a_live_socket_is_refused(server: Path) -> None:
    r = fixedram(None, "serve", "--socket", str(server))
    assert (r.returncode, r.stderr) == (2, f"fixedram: error: a server is already listening "
                                           f"on {server}\n")


def test_closed_stdio_and_the_socket_stays(server: Path, tmp_path: Path) -> None:
    """A command whose stdout and stderr are closed (as ``>&- 2>&-``) exits as without the
    server, and the server keeps its socket."""
    closed = ["sh", "-c", 'exec "$@" >&- 2>&-', "sh", PY, "-m", "fixedram", "--version"]
    for via in (None, server):
        r = subprocess.run(closed, env=_env(via), timeout=60, check=False)
        assert r.returncode == 0, via
    assert server.exists()
    assert fixedram(server, "--version").returncode == 0


def test_bad_input_is_one_line_through_the_server(server: Path, tmp_path: Path) -> None:
    r = fixedram(server, "analyze", "missing.img", cwd=tmp_path)  # relative: the client's cwd
    assert r.returncode == 2
    assert r.stderr == "fixedram: error: cannot open missing.img: No such file or directory\n"
    assert not r.stdout


def test_no_server_is_one_line(tmp_path: Path) -> None:
    r = fixedram(tmp_path / "none.sock", "analyze", "x.img")
    assert r.returncode == 2 and not r.stdout
    assert r.stderr.startswith("fixedram: error: no fixedram server at ")
    assert r.stderr.count("\n") == 1, r.stderr


def _default_sigint() -> None:
    """SIGINT as a terminal's command line gets it, whatever the test run inherited: a job
    started in the background has it ignored, and an ignored signal stays ignored across
    ``exec`` (Python then installs no KeyboardInterrupt handler)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _receive(server: Path | None, img: Path) -> subprocess.Popen[str]:
    """``fixedram receive IMG`` reading its stream from a pipe the test holds open."""
    return subprocess.Popen([PY, "-m", "fixedram", "receive", str(img)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=_env(server), preexec_fn=_default_sigint)


def _children(pid: int) -> list[int]:
    text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    return [int(c) for c in text.split()]


def _reading_stdin(server: Path | None, client: int) -> bool:
    """Whether the command (the client's own process, or the server's child) waits in
    ``read(0, ...)`` or ``readv(0, ...)``: past its imports and reading its stream."""
    pids = _children(SERVERS[server]) if server is not None else [client]
    for pid in pids:
        try:
            call = Path(f"/proc/{pid}/syscall").read_text().split()[:2]
            if call in (["0", "0x0"], ["19", "0x0"]):  # read, readv of fd 0
                return True
        except OSError:
            pass
    return False


def _wait_for(cond: Any, what: str) -> None:
    deadline = time.monotonic() + 60
    while not cond():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


def test_ctrl_c_reaches_the_command(server: Path, tmp_path: Path) -> None:
    """SIGINT to the client: the command is interrupted as the command line is (exit 130,
    one line), and its partial image is removed."""
    results = []
    for via in (None, server):
        img = tmp_path / f"{'served' if via else 'plain'}.img"
        p = _receive(via, img)
        _wait_for(lambda via=via, p=p: _reading_stdin(via, p.pid), "receive waits for its stream")
        p.send_signal(signal.SIGINT)
        p.wait(timeout=60)  # stdin stays open: the command ends by the signal, not by EOF
        assert p.stdin is not None and p.stdout is not None and p.stderr is not None
        results.append((p.returncode, p.stdout.read(), p.stderr.read()))
        p.stdin.close()
        assert not img.exists()
    assert results[0] == results[1]
    assert results[1][0] == 130 and results[1][2] == "fixedram: error: interrupted\n"


def test_client_killed_hangs_up_on_the_command(server: Path, tmp_path: Path) -> None:
    """A client killed outright (no signal to forward): the server sends its command SIGHUP,
    which ``receive`` answers by removing its partial image and ending."""
    p = _receive(server, tmp_path / "hup.img")
    _wait_for(lambda: _reading_stdin(server, p.pid), "receive waits for its stream")
    command = _children(SERVERS[server])
    p.kill()
    p.wait(timeout=30)
    _wait_for(lambda: not set(command) & set(_children(SERVERS[server])), "the command ended")
    assert not list(tmp_path.iterdir())


def test_server_killed_during_a_command(tmp_path: Path, sockdir: Path) -> None:
    """A server killed while its command runs: the client waits for the command to end, then
    says in one line that the exit status is unknown (exit 2)."""
    path = sockdir / "doomed.sock"
    srv = start_server(path)
    try:
        p = _receive(path, tmp_path / "x.img")
        _wait_for(lambda: _reading_stdin(path, p.pid), "receive waits for its stream")
        srv.kill()
        srv.wait(timeout=30)
        assert p.poll() is None  # the command still runs; the client waits for it
        assert p.stdin is not None and p.stderr is not None
        p.stdin.close()  # the stream ends: receive fails on its own
        p.wait(timeout=60)
        err = p.stderr.read()
    finally:
        srv.kill()
        srv.wait()
    lines = err.splitlines()
    assert p.returncode == 2
    assert lines[-1] == (f"fixedram: error: the server at {path} stopped during the command; "
                         "its exit status is unknown"), err
    assert "Traceback" not in err


def _connect_as(uid: int, path: Path) -> str:
    """Connect to ``path`` as ``uid`` (a forked child) and return what happened: the server's
    reply to a request, or the connect's error."""
    import socket

    from fixedram.resident import decode_reply, encode_request

    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            os.setgid(uid)
            os.setuid(uid)
            s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            try:
                s.connect(str(path))
                try:
                    socket.send_fds(s, [encode_request([b"fixedram", b"--version"], [], 0o22,
                                                       [])], [os.open("/", os.O_PATH)])
                except BrokenPipeError:
                    pass  # refused already: the reply is there to read
                kind, _, message = decode_reply(s.recv(4096))
                out = f"{kind!r} {message}"
            except OSError as e:
                out = f"OSError {e.strerror}"
            os.write(w, out.encode())
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        got = f.read().decode()
    os.waitpid(pid, 0)
    return got


def test_another_uid_is_refused(server: Path, sockdir: Path) -> None:
    """The socket's mode keeps another user out; opened up, the server's SO_PEERCRED check
    still refuses it."""
    # the suite runs as root (scripts/setup.sh installs packages, tests drop caches)
    assert os.getuid() == 0, "connecting as another uid needs root"
    nobody = 65534
    assert _connect_as(nobody, server) == "OSError Permission denied"
    assert _connect_as(0, server) == "b'pid\\x00' "  # the owner's is served
    modes = {p: p.stat().st_mode & 0o777 for p in (sockdir, server.parent, server)}
    try:
        for p in modes:
            os.chmod(p, 0o777)
        got = _connect_as(nobody, server)
    finally:
        for p, mode in modes.items():
            os.chmod(p, mode)
    assert got == f"b'err\\x00' the server at {server} serves uid 0 only"
    assert "uid 65534 is not the server's" in Path(f"{server}.log").read_text()


@pytest.mark.qemu
def test_lazy_restore_through_the_server(server: Path, qemu_image: Any, shm_dir: Path,
                                         tmp_path: Path, sockdir: Path) -> None:
    """A lazy restore of the bare test guest, sent to the server: the pages equal the
    source's, and once continued the guest carries on from the source's heartbeat."""
    case = qemu_image("mapped-ram")
    dst, ctl = _destination(case, "10", tmp_path, sockdir, "srv-dst")
    with dst:
        r = fixedram(server, "restore", "--lazy", "--paused", "--no-record", "--qmp", str(ctl),
                     "--json", "--no-progress", str(case.path))
        assert r.returncode == 0, r.stderr
        rep = json.loads(r.stdout)
        assert rep["status"] == "paused" and dst.status() == "paused"
        assert rep["pages"] == rep["pages_on_demand"] + rep["pages_pushed"]
        _same_ram(dst, case, shm_dir, "serve")
        dst.cont()
        _runs_on(dst, case)
