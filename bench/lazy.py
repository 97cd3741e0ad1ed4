"""Lazy vs full restore: time until the guest runs, and total time, as RAM grows.

For each RAM size a guest stamps half of its RAM, is saved once by ``fixedram save --via
native`` (a mapped-ram image, on tmpfs unless ``--dir``), and the image is restored into a
fresh QEMU (``-incoming defer``) by each method, guest running afterwards:

* ``full proxy``: ``fixedram restore --via proxy`` (fixedram streams every page over its
  default 2 multifd channels, then ``cont``);
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

Writes ``bench/results/lazy-<stamp>.json`` and prints a table. Not run by the tests.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from fixedram.testing.guest import build_guest
from fixedram.testing.vm import Guest, choose_accel, find_qemu, parse_mem_size

ROOT = Path(__file__).resolve().parent.parent
FIXEDRAM = [sys.executable, "-m", "fixedram"]
METHODS: dict[str, list[str]] = {
    "full proxy": ["--via", "proxy"],
    "full native": ["--via", "native"],
    "lazy": ["--lazy", "--no-record"],
}


def run(args: list[str]) -> tuple[float, dict[str, Any]]:
    """Run a fixedram command; its wall time and JSON report."""
    t = time.monotonic()
    r = subprocess.run([*FIXEDRAM, *args], capture_output=True, text=True, check=False)
    wall = time.monotonic() - t
    if r.returncode:
        raise RuntimeError(f"fixedram {' '.join(args)} failed: {r.stderr.strip()}")
    return wall, json.loads(r.stdout)


def run_watched(dst: Guest, args: list[str]) -> tuple[float, float, dict[str, Any]]:
    """Run a fixedram restore; wall time, time until ``dst`` runs (polled from outside on
    the harness's own QMP monitor, the same way for every method), and the JSON report."""
    t = time.monotonic()
    p = subprocess.Popen([*FIXEDRAM, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
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
               repeat: int) -> dict[str, Any]:
    """Save one guest of ``mem`` RAM, restore it ``repeat`` times by every method."""
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
            for method, extra in METHODS.items():
                dst = Guest.like(src, name=f"dst-{mem}", incoming=True)
                dctl = socks / "dst.qmp"
                dst.extra_args = ("-qmp", f"unix:{dctl},server=on,wait=off")
                with dst:
                    wall, ttr, rep = run_watched(
                        dst, ["restore", "--qmp", str(dctl), "--json", "--no-progress",
                              *extra, str(img)])
                    hb = src.heartbeats()[-1].n if src.heartbeats() else 0
                    dst.wait_heartbeat(after=hb, timeout=60)  # the guest really runs on
                entry = out["methods"].setdefault(method, {"time_to_running": [], "total": []})
                entry["time_to_running"].append(ttr)
                entry["total"].append(wall)
                if method == "lazy":
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
    args = ap.parse_args()
    qemu = find_qemu("10")
    kernel = build_guest()
    accel = choose_accel(qemu)
    workdir = Path(tempfile.mkdtemp(prefix="fixedram-bench-lazy-"))
    results: dict[str, Any] = {"host": platform.node(), "qemu": qemu.version_str,
                               "accel": accel, "image_dir": str(args.dir), "sizes": []}
    try:
        for mem in args.sizes.split(","):
            print(f"# {mem} ...", file=sys.stderr, flush=True)
            results["sizes"].append(bench_size(mem, workdir, args.dir, qemu, accel, kernel,
                                               args.repeat))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    dest = ROOT / "bench" / "results" / f"lazy-{stamp}.json"
    dest.parent.mkdir(exist_ok=True)
    dest.write_text(json.dumps(results, indent=2))
    med = statistics.median
    print(f"QEMU {results['qemu']} ({accel}); medians of {args.repeat}; image on {args.dir}")
    print(f"{'RAM':>6} {'data':>7} {'method':<12} {'to running':>11} {'total':>8} "
          f"{'on demand':>10}")
    for s in results["sizes"]:
        full = med(s["methods"]["full proxy"]["total"])
        for method, m in s["methods"].items():
            ttr, tot = med(m["time_to_running"]), med(m["total"])
            od = f"{med(m['pages_on_demand']):.0f}" if "pages_on_demand" in m else ""
            ratio = f" ({tot / full:.2f}x proxy)" if method != "full proxy" else ""
            print(f"{s['mem']:>6} {s['data_mib']:>5}Mi {method:<12} {ttr * 1000:>8.0f} ms "
                  f"{tot:>6.2f} s {od:>10}{ratio}")
    print(f"results: {dest}")


if __name__ == "__main__":
    main()
