"""Lazy vs full restore: time until the guest runs, and total time, as RAM grows.

For each RAM size a guest stamps half of its RAM, is saved once by ``fixedram save --via
native`` (a mapped-ram image, on tmpfs unless ``--dir``), and the image is restored into a
fresh QEMU (``-incoming defer``) by each method, guest running afterwards:

* ``full proxy``: ``fixedram restore --via proxy`` (fixedram streams every page, then ``cont``);
* ``full native``: ``fixedram restore --via native`` (QEMU reads the mapped-ram file);
* ``lazy``: ``fixedram restore --lazy --no-record`` (postcopy: the guest runs at once, pages
  follow; ``--no-record`` keeps every repeat the same: no working set is learned into the
  image or prefetched from it, ``bench/workingset.py`` measures those).

*Time to running* is from starting the command to the destination's run state becoming
``running``, polled every 2 ms on a second QMP monitor, the same way for every method (so
Python's start-up, ~0.2 s, is in every figure). *Total* is the command's wall time (for
lazy: every page sent and QEMU ``completed``). Usage::

    .venv/bin/python -m bench.lazy                       # 256M, 2G, 4G
    .venv/bin/python -m bench.lazy --sizes 256M,1G --repeat 1   # quick

``--server`` adds the same restores sent to a resident server (``fixedram serve``,
docs/resident-server.md; started by the benchmark on a private socket), whose time to running
counts the client's start-up and not the imports, and ``qemu native``: QEMU loading the image
alone (``migrate-incoming file:`` with mapped-ram, then ``cont``; its time to running from the
harness's ``migrate-incoming``). Each repeat runs every method once, so the old and new ways
alternate within the same minutes; ``--methods REGEX`` picks some::

    .venv/bin/python -m bench.lazy --server --sizes 256M,2G --methods 'native|lazy'

Run as root, free page reporting is held off for the run and ``--warm-gib`` of free memory
touched first (``bench.common.steady_memory``; ``--keep-page-reporting`` leaves it on).
Writes ``bench/results/lazy-<stamp>.json`` and prints a table. Not run by the tests.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import (
    FIXEDRAM,
    ResidentServer,
    add_memory_args,
    command_env,
    compile_package,
    describe_memory,
    memory_of,
)
from fixedram.testing.guest import build_guest
from fixedram.testing.vm import Guest, choose_accel, find_qemu, parse_mem_size

ROOT = Path(__file__).resolve().parent.parent
METHODS: dict[str, list[str]] = {
    "full proxy": ["--via", "proxy"],
    "full native": ["--via", "native"],
    "lazy": ["--lazy", "--no-record"],
}


#: ``--server``: the same restores through the resident server, and QEMU loading alone.
SERVER_METHODS: dict[str, list[str]] = {
    "full native (server)": METHODS["full native"],
    "lazy (server)": METHODS["lazy"],
}
QEMU_ALONE = "qemu native"


def qemu_alone(dst: Guest, img: Path) -> tuple[float, float]:
    """QEMU loads ``img`` itself (mapped-ram), then runs: time to running, total (the same)."""
    t = time.monotonic()
    dst.migrate_incoming(f"file:{img}", caps={"mapped-ram": True})
    dst.wait_incoming(600)
    dst.cont()
    wall = time.monotonic() - t
    return wall, wall


def run(args: list[str]) -> tuple[float, dict[str, Any]]:
    """Run a fixedram command; its wall time and JSON report."""
    t = time.monotonic()
    r = subprocess.run([*FIXEDRAM, *args], capture_output=True, text=True, check=False)
    wall = time.monotonic() - t
    if r.returncode:
        raise RuntimeError(f"fixedram {' '.join(args)} failed: {r.stderr.strip()}")
    return wall, json.loads(r.stdout)


def run_watched(dst: Guest, args: list[str],
                server: ResidentServer | None = None) -> tuple[float, float, dict[str, Any]]:
    """Run a fixedram restore (through the resident server at ``server``, if given); wall
    time, time until ``dst`` runs (polled from outside on the harness's own QMP monitor, the
    same way for every method), and the JSON report."""
    env = command_env(os.environ, server)
    t = time.monotonic()
    p = subprocess.Popen([*FIXEDRAM, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, env=env)
    ttr = None
    while ttr is None and p.poll() is None:
        if dst.status() == "running":
            ttr = time.monotonic() - t
        else:
            time.sleep(0.002)
    out, err = p.communicate()
    wall = time.monotonic() - t
    if p.returncode:
        raise RuntimeError(f"fixedram {' '.join(args)} failed: {err.strip()}")
    return wall, ttr if ttr is not None else wall, json.loads(out)


def bench_size(mem: str, workdir: Path, imgdir: Path, qemu: Any, accel: str, kernel: Path,
               repeat: int, server: ResidentServer | None = None,
               pick: str | None = None) -> dict[str, Any]:
    """Save one guest of ``mem`` RAM, restore it ``repeat`` times by every method (those
    matching ``pick``; with ``server``, the server's and QEMU's alone too)."""
    methods: dict[str, list[str] | None] = dict(METHODS)
    if server is not None:
        methods |= {**SERVER_METHODS, QEMU_ALONE: None}
    methods = {m: a for m, a in methods.items() if pick is None or re.search(pick, m)}
    socks = Path(tempfile.mkdtemp(prefix="frl-", dir="/tmp"))
    data_mib = parse_mem_size(mem) // (2 << 20)
    img = imgdir / f"lazy-{mem}.img"
    out: dict[str, Any] = {"mem": mem, "data_mib": data_mib, "methods": {}}
    ctl = socks / "src.qmp"
    src = Guest(qemu, workdir, name=f"src-{mem}", mem=mem, accel=accel, kernel=kernel,
                append=f"mib={data_mib} rate=0 gens=1 hb=100",
                extra_args=["-qmp", f"unix:{ctl},server=on,wait=off"])
    try:
        with src:
            src.wait_heartbeat(gen_at_least=1, timeout=600)
            _, rep = run(["save", "--qmp", str(ctl), "--via", "native", "--json", str(img)])
            out["pages_in_image"] = rep["pages_in_image"]
        for _ in range(repeat):
            for method, extra in methods.items():
                dst = Guest.like(src, name=f"dst-{mem}", incoming=True)
                dctl = socks / "dst.qmp"
                dst.extra_args = ("-qmp", f"unix:{dctl},server=on,wait=off")
                with dst:
                    if extra is None:
                        wall, ttr = qemu_alone(dst, img)
                        rep = {}
                    else:
                        wall, ttr, rep = run_watched(
                            dst, ["restore", "--qmp", str(dctl), "--json", "--no-progress",
                                  *extra, str(img)],
                            server if method in SERVER_METHODS else None)
                    hb = src.heartbeats()[-1].n if src.heartbeats() else 0
                    dst.wait_heartbeat(after=hb, timeout=60)  # the guest really runs on
                entry = out["methods"].setdefault(method, {"time_to_running": [], "total": []})
                entry["time_to_running"].append(ttr)
                entry["total"].append(wall)
                if method.startswith("full native"):
                    # what fixedram adds to QEMU's load: start-up, checks, QMP round trips
                    entry.setdefault("own", []).append(wall - rep["load_time"])
                    # of which the command's own QMP work (first command to resumed)
                    entry.setdefault("command_total", []).append(rep["total_time"])
                    entry.setdefault("load_time", []).append(rep["load_time"])
                if method.startswith("lazy"):
                    entry.setdefault("pages_on_demand", []).append(rep["pages_on_demand"])
                    entry.setdefault("lazy_total_time", []).append(rep["total_time"])
                    # fixedram's own figure: command start to QEMU leaving inmigrate
                    entry.setdefault("reported_time_to_running", []).append(
                        rep["time_to_running"])
    finally:
        img.unlink(missing_ok=True)
        shutil.rmtree(socks, ignore_errors=True)
    return out


def main() -> None:
    """Run the benchmark and print the table."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="256M,2G,4G", help="RAM sizes (comma separated)")
    ap.add_argument("--repeat", type=int, default=3, help="restores per method and size")
    ap.add_argument("--dir", type=Path, default=Path("/dev/shm"),
                    help="where the image goes (default tmpfs)")
    ap.add_argument("--server", action="store_true",
                    help="also through a resident server (fixedram serve), and QEMU alone")
    ap.add_argument("--methods", default=None, metavar="REGEX",
                    help="only the methods matching REGEX")
    add_memory_args(ap, 8.0)
    args = ap.parse_args()
    compile_package()
    qemu = find_qemu("10")
    kernel = build_guest()
    accel = choose_accel(qemu)
    workdir = Path(tempfile.mkdtemp(prefix="fixedram-bench-lazy-"))
    results: dict[str, Any] = {"host": platform.node(), "qemu": qemu.version_str,
                               "accel": accel, "image_dir": str(args.dir), "sizes": []}
    server = ResidentServer() if args.server else None
    try:
        with memory_of(args) as memory:
            results["memory"] = memory
            print(f"# memory: {memory}", file=sys.stderr, flush=True)
            for mem in args.sizes.split(","):
                print(f"# {mem} ...", file=sys.stderr, flush=True)
                results["sizes"].append(bench_size(mem, workdir, args.dir, qemu, accel, kernel,
                                                   args.repeat, server, args.methods))
    finally:
        if server is not None:
            server.close()
        shutil.rmtree(workdir, ignore_errors=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    dest = ROOT / "bench" / "results" / f"lazy-{stamp}.json"
    dest.parent.mkdir(exist_ok=True)
    dest.write_text(json.dumps(results, indent=2))
    med = statistics.median
    print(f"QEMU {results['qemu']} ({accel}); medians of {args.repeat}; image on {args.dir}; "
          f"{describe_memory(results['memory'])}")
    print(f"{'RAM':>6} {'data':>7} {'method':<20} {'to running':>11} {'total':>8} "
          f"{'on demand':>10}  (native: wall less QEMU's load)")
    for s in results["sizes"]:
        base = next((b for b in ("full proxy", QEMU_ALONE) if b in s["methods"]), None)
        full = med(s["methods"][base]["total"]) if base else float("nan")
        for method, m in s["methods"].items():
            ttr, tot = med(m["time_to_running"]), med(m["total"])
            od = f"{med(m['pages_on_demand']):.0f}" if "pages_on_demand" in m else ""
            od = f"own {med(m['own']) * 1000:.0f} ms" if "own" in m else od
            label = "proxy" if base == "full proxy" else base
            ratio = f" ({tot / full:.2f}x {label})" if method != base else ""
            print(f"{s['mem']:>6} {s['data_mib']:>5}Mi {method:<20} {ttr * 1000:>8.0f} ms "
                  f"{tot:>6.2f} s {od:>10}{ratio}")
    print(f"results: {dest}")


if __name__ == "__main__":
    main()
