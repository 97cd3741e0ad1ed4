"""CPU per GiB of the proxy data path: one fixedram endpoint and a cheap peer, no QEMU.

The proxy paths' cost is fixedram's own CPU time per GiB of page data. QEMU's share of a
save or restore varies with the machine's load; this measures fixedram alone, against a
peer process that does the cheapest thing QEMU could (``sendfile`` of a recorded stream
into the socket; reading and dropping what comes)::

    .venv/bin/python -m bench.run --keep --targets tmpfs --only 'qemu (legacy|mapped-ram$)'
    .venv/bin/python -m bench.endpoint save STREAM              # fixedram receive --fd
    .venv/bin/python -m bench.endpoint save IMAGE --channels 2  # fixedram send -> receive
    .venv/bin/python -m bench.endpoint restore IMAGE [--channels 2]   # fixedram send

``save STREAM`` feeds a legacy stream file (QEMU's ``migrate file:`` without mapped-ram:
the bytes QEMU sends over a socket) to ``fixedram receive``; with ``--channels N`` the
source is ``fixedram send --channels N`` of a mapped-ram image (multifd has no file form).
``restore`` runs ``fixedram send`` into a peer that reads every connection to its end.
Prints wall seconds, fixedram's CPU seconds (user + system, Python's start-up included)
and peak RSS, and CPU seconds per GiB of page data; ``--repeat N`` gives the median.
``--perf FILE`` records the fixedram process with ``perf record -g`` (perf must be
installed), or with ``py-spy record --native`` where FILE ends in ``.txt`` (collapsed
stacks) or ``.speedscope``. The images written go to ``--dir`` and are deleted.
"""

from __future__ import annotations

import argparse
import json
import os
import selectors
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import FIXEDRAM, compile_package

GIB = 1 << 30
BUFFER = 4 << 20


def _tune(s: socket.socket) -> socket.socket:
    for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
        s.setsockopt(socket.SOL_SOCKET, opt, BUFFER)
    return s


def _wrap(cmd: list[str], perf: str | None) -> list[str]:
    """``cmd`` under a profiler: ``perf record -g`` into ``perf``, or py-spy (native frames
    too) when ``perf`` ends in ``.speedscope`` or ``.txt`` (collapsed stacks)."""
    if perf is None:
        return cmd
    if perf.endswith((".speedscope", ".txt")):
        fmt = "speedscope" if perf.endswith(".speedscope") else "raw"
        return ["py-spy", "record", "--native", "-r", "500", "-f", fmt, "-o", perf, "--",
                *cmd]
    return ["perf", "record", "-q", "-g", "-e", "cpu-clock", "-o", perf, "--", *cmd]


def _run(cmd: list[str], *, pass_fds: tuple[int, ...] = ()) -> tuple[subprocess.Popen[bytes],
                                                                        float]:
    t = time.monotonic()
    return subprocess.Popen(cmd, pass_fds=pass_fds, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE), t


def _finish(proc: subprocess.Popen[bytes], t0: float) -> dict[str, Any]:
    _, status, ru = os.wait4(proc.pid, 0)
    wall = time.monotonic() - t0
    assert proc.stdout is not None and proc.stderr is not None
    out, err = proc.stdout.read(), proc.stderr.read()
    if os.waitstatus_to_exitcode(status):
        raise RuntimeError(f"fixedram failed: {err.decode().strip()[-2000:]}")
    return {"wall": wall, "user": ru.ru_utime, "sys": ru.ru_stime,
            "rss_mib": ru.ru_maxrss / 1024, "out": out.decode()}


def _feed(path: Path, sock: socket.socket) -> None:
    """Child: send the stream file into ``sock`` (sendfile), then read replies to the end."""
    fd = os.open(path, os.O_RDONLY)
    size = os.fstat(fd).st_size
    off = 0
    while off < size:
        off += os.sendfile(sock.fileno(), fd, off, size - off)
    sock.shutdown(socket.SHUT_WR)
    while sock.recv(1 << 16):
        pass


def _drain(lsock: socket.socket, conns: int) -> None:
    """Child: accept ``conns`` connections and read them until the first one (the main
    connection) ends; then close them all."""
    sel = selectors.DefaultSelector()
    buf = bytearray(1 << 20)
    opened = []
    for _ in range(conns):
        c, _ = lsock.accept()
        _tune(c)
        opened.append(c)
        sel.register(c, selectors.EVENT_READ)
    main = opened[0]  # a source connects its main connection first
    while True:
        for key, _ in sel.select():
            c = key.fileobj
            assert isinstance(c, socket.socket)
            if not c.recv_into(buf):
                sel.unregister(c)
                if c is main:  # the end of the stream: the source waits for the close
                    for o in opened:
                        o.close()
                    return


def _fork(fn: Any, *args: Any) -> int:
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            fn(*args)
        except BaseException as e:
            print(f"bench.endpoint: peer failed: {e!r}", file=sys.stderr)
            code = 1
        finally:
            os._exit(code)
    return pid


def save(src: Path, workdir: Path, channels: int, perf: str | None) -> dict[str, Any]:
    img = workdir / "bench-endpoint.img"
    try:
        if not channels:
            a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            _tune(a), _tune(b)
            proc, t0 = _run(_wrap([*FIXEDRAM, "receive", "-q", "--fd", str(a.fileno()),
                                   str(img)], perf), pass_fds=(a.fileno(),))
            a.close()
            pid = _fork(_feed, src, b)
            b.close()
            res = _finish(proc, t0)
            os.waitpid(pid, 0)
        else:
            addr = workdir / "bench-endpoint.sock"
            proc, t0 = _run(_wrap([*FIXEDRAM, "receive", "-q", "--listen", f"unix:{addr}",
                                   "--channels", str(channels), str(img)], perf))
            while not addr.exists():
                time.sleep(0.01)
            feeder = subprocess.run([*FIXEDRAM, "send", "-q", "--connect", f"unix:{addr}",
                                     "--channels", str(channels), str(src)],
                                    capture_output=True, check=False)
            res = _finish(proc, t0)
            if feeder.returncode:
                raise RuntimeError(f"feeder failed: {feeder.stderr.decode()[-2000:]}")
        from fixedram.image import open_image

        with open_image(img) as im:
            res["bytes"] = sum(im.count_present(b) for b in im.blocks) * 4096
    finally:
        img.unlink(missing_ok=True)
    return res


def restore(image: Path, workdir: Path, channels: int, perf: str | None) -> dict[str, Any]:
    addr = workdir / "bench-endpoint.sock"
    lsock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    lsock.bind(str(addr))
    lsock.listen(64)
    try:
        pid = _fork(_drain, lsock, channels + 1)
        lsock.close()
        cmd = [*FIXEDRAM, "send", "-q", "--connect", f"unix:{addr}", str(image)]
        if channels:
            cmd += ["--channels", str(channels)]
        proc, t0 = _run(_wrap(cmd, perf))
        res = _finish(proc, t0)
        os.waitpid(pid, 0)
    finally:
        addr.unlink(missing_ok=True)
    from fixedram.image import open_image

    with open_image(image) as im:
        res["bytes"] = sum(im.count_present(b) for b in im.blocks) * 4096
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("what", choices=["save", "restore"])
    ap.add_argument("path", type=Path, help="save: stream file (or image, --channels); "
                                             "restore: image")
    ap.add_argument("--channels", type=int, default=0)
    ap.add_argument("--dir", type=Path, default=None, help="where images and sockets go "
                                                            "(default: next to PATH)")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--perf", default=None, metavar="FILE", help="perf record into FILE")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    compile_package()
    runs = []
    for _ in range(args.repeat):
        with tempfile.TemporaryDirectory(dir=args.dir or args.path.parent) as tmp:
            fn = save if args.what == "save" else restore
            runs.append(fn(args.path.absolute(), Path(tmp), args.channels, args.perf))
    gib = runs[0]["bytes"] / GIB

    def med(k: str) -> float:
        return statistics.median(r[k] for r in runs)

    cpu = med("user") + med("sys")
    summary = {"what": args.what, "channels": args.channels, "gib": gib, "wall": med("wall"),
               "user": med("user"), "sys": med("sys"), "cpu_per_gib": cpu / gib,
               "user_per_gib": med("user") / gib, "sys_per_gib": med("sys") / gib,
               "mib_s": gib * 1024 / med("wall"), "rss_mib": med("rss_mib"),
               "load": os.getloadavg()[0]}
    if args.json:
        print(json.dumps(summary))
        return
    print(f"{args.what}{f' --channels {args.channels}' if args.channels else ''}: "
          f"{gib * 1024:.0f} MiB in {summary['wall']:.2f} s ({summary['mib_s']:.0f} MiB/s); "
          f"fixedram CPU {cpu:.2f} s = {summary['cpu_per_gib']:.3f} s/GiB (user "
          f"{summary['user_per_gib']:.3f} + sys {summary['sys_per_gib']:.3f}); peak RSS "
          f"{summary['rss_mib']:.0f} MiB; load {summary['load']:.2f}; median of {len(runs)}")


if __name__ == "__main__":
    main()
