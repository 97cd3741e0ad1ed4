"""Before and after: native save/restore, lazy and proxy restores of two fixedram checkouts.

On a shared machine single timings vary by tens of percent, so this runs QEMU alone, the
fixedram of ``--base`` (another checkout, e.g. ``git worktree add /tmp/base main``) and this
checkout's fixedram one after the other, in rotating order, against the same source guest
and the same images, ``--repeat`` times, and reports medians of: wall time, fixedram's CPU
seconds, and fixedram's own time (its wall time less QEMU's part: ``qemu_total_time`` of a
save, ``load_time`` of a restore), which the load of the machine disturbs least. Lazy
restores report the time until the destination runs, polled every millisecond on a second
QMP monitor. Usage (as root: page caches are dropped)::

    .venv/bin/python -m bench.compare --base /tmp/base                   # tmpfs, 2 GiB guest
    .venv/bin/python -m bench.compare --base /tmp/base --dir /var/tmp/frc --multifd
    .venv/bin/python -m bench.compare --base /tmp/base --lazy 256M,2G,4G
    .venv/bin/python -m bench.compare --base /tmp/base --proxy 2   # proxy restores, 2 channels

``--proxy N`` restores one image saved by this checkout (``save --via proxy``: fixedram's
own image, with checksums) through the proxy with N channels (0: one stream), QEMU alone
loading a mapped-ram image of the same guest next to it. There ``load_time`` runs from
``migrate-incoming`` until QEMU has loaded every page fixedram sent, so "fixedram's own"
is its start-up, checks and ending only.

The checkouts run with their own ``fixedram`` package (``PYTHONPATH``) and this venv. Run
as root, free page reporting is held off for the run (``bench.common.steady_memory``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench.common import FIXEDRAM, add_memory_args, compile_package, describe_memory, memory_of
from bench.run import drop_caches
from fixedram.testing.guest import build_guest
from fixedram.testing.vm import Guest, choose_accel, find_qemu, parse_mem_size

ROOT = Path(__file__).resolve().parent.parent


def fixedram(root: Path, args: list[str]) -> tuple[float, float, dict[str, Any]]:
    """Run ``fixedram ARGS`` from checkout ``root``: wall, CPU seconds, JSON report."""
    env = dict(os.environ, PYTHONPATH=str(root))
    t = time.monotonic()
    p = subprocess.Popen([*FIXEDRAM, *args, "--json", "--no-progress"],
                         cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _, status, ru = os.wait4(p.pid, 0)
    wall = time.monotonic() - t
    assert p.stdout is not None and p.stderr is not None
    out, err = p.stdout.read(), p.stderr.read()
    if os.waitstatus_to_exitcode(status):
        raise RuntimeError(f"{root}: fixedram {' '.join(args)}: {err.decode().strip()}")
    return wall, ru.ru_utime + ru.ru_stime, json.loads(out)


@contextlib.contextmanager
def _source(args: argparse.Namespace, qemu: Any, accel: str,
            kernel: Path) -> Iterator[tuple[Path, Path, Guest]]:
    """The image directory, a socket directory and the source guest (``--mem``,
    ``--data-mib`` stamped, QMP on ``src.qmp`` in the socket directory), not started;
    afterwards the guest is killed and the socket and work directories removed."""
    d = Path(args.dir)
    d.mkdir(parents=True, exist_ok=True)
    socks = Path(tempfile.mkdtemp(prefix="frc-", dir="/tmp"))
    work = Path(tempfile.mkdtemp(prefix="fixedram-compare-"))
    src = Guest(qemu, work, name="src", mem=args.mem, accel=accel, kernel=kernel,
                append=f"mib={args.data_mib} rate=0 gens=1 hb=100",
                extra_args=["-qmp", f"unix:{socks / 'src.qmp'},server=on,wait=off"])
    try:
        yield d, socks, src
    finally:
        src.kill()
        shutil.rmtree(socks, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)


def _restores(src: Guest, socks: Path, order: list[str], roots: dict[str, Path],
              res: dict[str, list[tuple[float, float, float]]], qimg: Path,
              caps: dict[str, bool], params: dict[str, Any] | None, img: Path,
              opts: list[str]) -> None:
    """One restore by each of ``order`` into a fresh destination like ``src``, the page
    cache dropped first: "qemu" loads ``qimg`` itself (``caps``, ``params``), a checkout
    runs ``fixedram restore OPTS --paused IMG``; (wall, CPU, own) appended to ``res``."""
    for who in order:
        drop_caches()
        dst = Guest.like(src, name="dst", incoming=True)
        dst.extra_args = ("-qmp", f"unix:{socks / 'dst.qmp'},server=on,wait=off")
        with dst:
            if who == "qemu":
                t = time.monotonic()
                dst.migrate_incoming(f"file:{qimg}", caps=caps, params=params)
                dst.wait_incoming(600)
                res.setdefault("restore qemu", []).append((time.monotonic() - t, 0, 0))
            else:
                w, c, rep = fixedram(roots[who], ["restore", "--qmp", str(socks / "dst.qmp"),
                                                  *opts, "--paused", str(img)])
                res.setdefault(f"restore {who}", []).append(
                    (w, c, w - (rep.get("load_time") or 0)))


def native(args: argparse.Namespace, roots: dict[str, Path], qemu: Any, accel: str,
           kernel: Path) -> dict[str, list[tuple[float, float, float]]]:
    """Native save and restore: (wall, CPU, own) per run, by who ran it."""
    if args.multifd:
        caps, params = {"mapped-ram": True, "multifd": True}, {"multifd-channels": 2,
                                                               "direct-io": True}
        opts = ["--channels", "2", "--direct-io"]
    else:
        caps, params, opts = {"mapped-ram": True, "multifd": False}, {"direct-io": False}, \
            ["--channels", "0"]
    res: dict[str, list[tuple[float, float, float]]] = {}
    with _source(args, qemu, accel, kernel) as (d, socks, src):
        ctl = socks / "src.qmp"
        qimg = d / "qemu.img"
        try:
            with src:
                src.wait_heartbeat(gen_at_least=1, timeout=600)
                src.stop()
                for i in range(args.repeat):
                    order = ["qemu", *roots]
                    order = order[i % len(order):] + order[:i % len(order)]
                    for who in order:
                        drop_caches()
                        if who == "qemu":
                            qimg.unlink(missing_ok=True)
                            src.set_migration(caps=caps, params=params)
                            t = time.monotonic()
                            src.migrate(f"file:{qimg}")
                            src.wait_migration(600)
                            subprocess.run(["sync"], check=True)
                            res.setdefault("save qemu", []).append((time.monotonic() - t, 0, 0))
                            src.set_migration(caps={"mapped-ram": False, "multifd": False},
                                              params={"direct-io": False})
                        else:
                            img = d / f"{who}.img"
                            w, c, rep = fixedram(roots[who], ["save", "--qmp", str(ctl), "--via",
                                                              "native", *opts, str(img)])
                            res.setdefault(f"save {who}", []).append(
                                (w, c, w - (rep.get("qemu_total_time") or 0)))
                            img.unlink()
                        src.cont()
                        src.stop()
                    _restores(src, socks, order, roots, res, qimg, caps,
                              params if args.multifd else None, qimg, ["--via", "native", *opts])
        finally:
            qimg.unlink(missing_ok=True)
    return res


def proxy(args: argparse.Namespace, roots: dict[str, Path], qemu: Any, accel: str,
          kernel: Path) -> dict[str, list[tuple[float, float, float]]]:
    """Proxy restores of fixedram's own image: (wall, CPU, own) per run, by who ran it."""
    res: dict[str, list[tuple[float, float, float]]] = {}
    caps = {"mapped-ram": True, "multifd": False}
    with _source(args, qemu, accel, kernel) as (d, socks, src):
        ctl = socks / "src.qmp"
        img, qimg = d / "proxy.img", d / "qemu.img"
        try:
            with src:
                src.wait_heartbeat(gen_at_least=1, timeout=600)
                src.stop()
                fixedram(ROOT, ["save", "--qmp", str(ctl), "--via", "proxy", str(img)])
                src.cont()
                src.stop()
                src.set_migration(caps=caps)
                src.migrate(f"file:{qimg}")
                src.wait_migration(600)
            for i in range(args.repeat):
                order = ["qemu", *roots]
                order = order[i % len(order):] + order[:i % len(order)]
                _restores(src, socks, order, roots, res, qimg, caps, None, img,
                          ["--via", "proxy", "--channels", str(args.proxy)])
        finally:
            img.unlink(missing_ok=True)
            qimg.unlink(missing_ok=True)
    return res


def lazy(args: argparse.Namespace, roots: dict[str, Path], qemu: Any, accel: str,
         kernel: Path) -> dict[str, list[tuple[float, float, float]]]:
    """Lazy restores: (time to running, wall, 0) per run, by RAM size and checkout."""
    res: dict[str, list[tuple[float, float, float]]] = {}
    for mem in args.lazy.split(","):
        socks = Path(tempfile.mkdtemp(prefix="frc-", dir="/tmp"))
        work = Path(tempfile.mkdtemp(prefix="fixedram-compare-"))
        img = Path(args.dir) / f"lazy-{mem}.img"
        img.parent.mkdir(parents=True, exist_ok=True)
        ctl = socks / "src.qmp"
        src = Guest(qemu, work, name="src", mem=mem, accel=accel, kernel=kernel,
                    append=f"mib={parse_mem_size(mem) // (2 << 20)} rate=0 gens=1 hb=100",
                    extra_args=["-qmp", f"unix:{ctl},server=on,wait=off"])
        try:
            with src:
                src.wait_heartbeat(gen_at_least=1, timeout=600)
                fixedram(ROOT, ["save", "--qmp", str(ctl), "--via", "native", str(img)])
            for i in range(args.repeat):
                for who in (list(roots) if i % 2 == 0 else list(reversed(roots))):
                    dst = Guest.like(src, name="dst", incoming=True)
                    dctl = socks / "dst.qmp"
                    dst.extra_args = ("-qmp", f"unix:{dctl},server=on,wait=off")
                    with dst:
                        env = dict(os.environ, PYTHONPATH=str(roots[who]))
                        t = time.monotonic()
                        p = subprocess.Popen(
                            [*FIXEDRAM, "restore", "--qmp", str(dctl),
                             "--lazy", "--json", "--no-progress", str(img)],
                            cwd=roots[who], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
                        ttr = None
                        while ttr is None and p.poll() is None:
                            if dst.status() == "running":
                                ttr = time.monotonic() - t
                            else:
                                time.sleep(0.001)
                        p.wait()
                        wall = time.monotonic() - t
                        if p.returncode:
                            assert p.stderr is not None
                            raise RuntimeError(p.stderr.read().decode())
                        res.setdefault(f"lazy {mem} {who}", []).append(
                            (ttr if ttr is not None else wall, wall, 0))
        finally:
            src.kill()
            img.unlink(missing_ok=True)
            shutil.rmtree(socks, ignore_errors=True)
            shutil.rmtree(work, ignore_errors=True)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--base", type=Path, required=True, help="the other fixedram checkout")
    ap.add_argument("--mem", default="2G")
    ap.add_argument("--data-mib", type=int, default=1536)
    ap.add_argument("--dir", default="/dev/shm/fixedram-compare", help="where images go")
    ap.add_argument("--repeat", type=int, default=5)
    how = ap.add_mutually_exclusive_group()
    how.add_argument("--multifd", action="store_true",
                     help="multifd, 2 channels, direct-io (else one channel)")
    how.add_argument("--lazy", metavar="SIZES", help="lazy restores at these RAM sizes instead")
    how.add_argument("--proxy", metavar="CHANNELS", type=int,
                     help="proxy restores of fixedram's image with this many channels instead")
    add_memory_args(ap, 8.0)
    args = ap.parse_args()
    if args.proxy is not None and not 0 <= args.proxy <= 255:
        ap.error("--proxy takes 0 (one stream) to 255 channels")
    compile_package()
    roots = {"base": args.base.resolve(), "this": ROOT}
    qemu = find_qemu("10")
    accel = choose_accel(qemu)
    kernel = build_guest()
    run = lazy if args.lazy else proxy if args.proxy is not None else native
    with memory_of(args) as memory:
        print(f"# memory: {memory}", file=sys.stderr, flush=True)
        res = run(args, roots, qemu, accel, kernel)
    print(describe_memory(memory))
    med = statistics.median
    print(f"`python -m bench.compare {' '.join(sys.argv[1:])}`: medians of {args.repeat}")
    for k, v in res.items():
        if args.lazy:
            print(f"  {k:22s} time to running {med(x[0] for x in v) * 1000:5.0f} ms "
                  f"(min {min(x[0] for x in v) * 1000:.0f}), total {med(x[1] for x in v):.2f} s")
            continue
        ref = med(x[0] for x in res["save qemu" if k.startswith("save") else "restore qemu"])
        w = med(x[0] for x in v)
        print(f"  {k:14s} wall {w:6.3f} s ({min(x[0] for x in v):.3f}-{max(x[0] for x in v):.3f})"
              f"  vs QEMU alone {ref / w:.2f}x  fixedram CPU "
              f"{med(x[1] for x in v):5.2f} s  fixedram's own {med(x[2] for x in v) * 1000:4.0f}"
              " ms")


if __name__ == "__main__":
    main()
