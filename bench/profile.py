"""Where fixedram's CPU time goes: receive a stream file, or send an image, under pyinstrument.

The two endpoint hot paths without QEMU or sockets in the way, so the profile shows
fixedram's own work (decoding, page writes, digests, framing, reads)::

    .venv/bin/python -m bench.run --keep --targets disk     # leaves images in /var/tmp/...
    .venv/bin/python -m bench.profile receive /var/tmp/fixedram-bench/qemu_legacy_file.img
    .venv/bin/python -m bench.profile send /var/tmp/fixedram-bench/fixedram_proxy.img

``receive`` reads the stream file into :class:`~fixedram.endpoint.receive.Receiver`'s
receive space (as a save receives from its socket, up to ``RECV_CHUNK`` per feed) and
writes the image into ``--dir`` (removed after the measurement); ``send`` streams the
image into a sink that discards it, or with ``--channels N`` sends it as a multifd source
over 1 + N unix-socket connections to a second process that reads and discards them (its
CPU is not counted). Prints the profile, then wall and CPU seconds per GiB of page data.
Needs ``bash scripts/setup.sh --bench`` (pyinstrument).
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from pyinstrument import Profiler

from fixedram.endpoint.multifd_send import send_multifd
from fixedram.endpoint.receive import Receiver
from fixedram.endpoint.send import send
from fixedram.io.channel import SinkChannel

GIB = 1 << 30


def profile_receive(stream: Path, workdir: Path) -> int:
    """Receive ``stream`` into an image in ``workdir``; returns the page bytes stored."""
    fd = os.open(stream, os.O_RDONLY)
    try:
        with Receiver(workdir / "profile.img") as rx:
            while not rx.done:
                # read into the receiver's own space, as a save receives from its socket
                buf = rx.recv_space()
                n = os.readv(fd, [buf])
                del buf
                if not n:
                    rx.feed_eof()
                    break
                rx.received(n)
            report = rx.commit()
    finally:
        os.close(fd)  # the image goes with workdir, after the measurement
    return report.pages_present * 4096


def profile_send(image: Path) -> int:
    """Send ``image`` into a sink; returns the page bytes sent."""
    report = send(image, SinkChannel(lambda bufs: None))
    return report.pages_sent * 4096


def profile_send_multifd(image: Path, channels: int, workdir: Path) -> int:
    """Send ``image`` as a multifd source to a draining process; returns the page bytes sent."""
    path = workdir / "drain.sock"
    drain = subprocess.Popen([sys.executable, "-m", "bench.profile", "drain", str(path),
                              "--channels", str(channels)], stdout=subprocess.PIPE)
    assert drain.stdout is not None
    drain.stdout.readline()  # listening
    try:
        report = send_multifd(image, f"unix:{path}", channels)
    finally:
        drain.wait(30)
    return report.pages_sent * 4096


def drain(path: Path, channels: int) -> None:
    """Accept 1 + ``channels`` connections on ``path``; read each to its end, then close."""
    lsock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    lsock.bind(str(path))
    lsock.listen(channels + 1)
    print("listening", flush=True)

    def read(conn: socket.socket) -> None:
        buf = memoryview(bytearray(1 << 20))
        while conn.recv_into(buf):
            pass
        conn.close()

    threads = []
    for _ in range(channels + 1):
        conn, _ = lsock.accept()
        threads.append(threading.Thread(target=read, args=(conn,)))
        threads[-1].start()
    for t in threads:
        t.join()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("what", choices=["receive", "send", "drain"])
    ap.add_argument("path", type=Path, help="stream file (receive) or image (send)")
    ap.add_argument("--dir", type=Path, default=None,
                    help="receive: directory for the image (default: next to the stream)")
    ap.add_argument("--channels", type=int, default=0,
                    help="send: as a multifd source over this many channels")
    ap.add_argument("--no-profile", action="store_true",
                    help="only the CPU figures (no profiler overhead)")
    args = ap.parse_args()
    if args.what == "drain":
        drain(args.path, args.channels)
        return
    prof = Profiler(interval=0.001)
    t0, c0 = time.monotonic(), os.times()
    with tempfile.TemporaryDirectory(dir=args.dir or args.path.parent) as tmp:
        if not args.no_profile:
            prof.start()
        if args.what == "receive":
            nbytes = profile_receive(args.path, Path(tmp))
        elif args.channels:
            nbytes = profile_send_multifd(args.path, args.channels, Path(tmp))
        else:
            nbytes = profile_send(args.path)
        if not args.no_profile:
            prof.stop()
        wall, c1 = time.monotonic() - t0, os.times()
    if not args.no_profile:
        print(prof.output_text(unicode=True, color=False, show_all=False))
    gib = nbytes / GIB
    user, system = c1.user - c0.user, c1.system - c0.system
    print(f"{args.what}: {nbytes / (1 << 20):.0f} MiB of pages in {wall:.2f} s "
          f"({nbytes / (1 << 20) / wall:.0f} MiB/s); CPU user {user / gib:.2f} + sys "
          f"{system / gib:.2f} s per GiB")


if __name__ == "__main__":
    main()
