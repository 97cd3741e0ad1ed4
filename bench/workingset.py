"""Lazy restore with and without the recorded working set, and a fan-out of lazy restores.

The Linux test guest (``fixedram/testing/guest/linux.py``) runs its touch workload
(``touch=N`` MiB, read in full on a command from its second serial port). It is saved once
(``fixedram save --via proxy``, image on disk: ``--dir``, default a temporary directory under
``/tmp``), then:

1. **Working set**, for each ``--push-rate`` (default 16M and 128M: storage slower and
   faster than the guest), on a fresh copy of the image: ``--repeat`` restores *without* a
   record (``--no-prefetch --no-record``), one *recording* restore (``--no-prefetch``: the
   image's first, which holds the push while the guest asks and records), then ``--repeat``
   restores *with* the record (the default: prefetch, and merge into it). Right after the
   guest runs the harness sends the touch command; *workload* is the time from the start of
   ``fixedram restore`` until the guest's ``TOUCH`` line appears on its serial console
   (polled every 5 ms), *heartbeat* until its first heartbeat after the restore, *running*
   until QMP reports it running. Page requests (QEMU's, on the guest's critical path) and
   the time until the first N requests were served come from fixedram's JSON report.
2. **Fan-out.** The image recorded at the last rate is dropped from the page cache, one lazy
   restore runs alone, the cache is dropped again, and ``--fanout`` lazy restores of the
   same image run at once into as many destinations. For each: time to running (fixedram's
   report), page data fixedram read from the image (``bytes_read``) and bytes the kernel read
   from storage for that process (``ru_inblock`` of the child from ``wait4``: page-cache
   misses, whoever missed first pays). Each guest is sent the touch command as it runs, as
   in 1 (``bench/touchguest.py`` runs the restores of both parts); its pages must check
   and its heartbeat resume.

Run as root, free page reporting is held off for the run and ``--warm-gib`` of free memory
touched first (``bench.common.steady_memory``; ``--keep-page-reporting`` leaves it on).

Usage::

    .venv/bin/python -m bench.workingset                      # 256M guest, 8-way fan-out
    .venv/bin/python -m bench.workingset --repeat 1 --fanout 3   # quick

Writes ``bench/results/workingset-<stamp>.json`` and prints markdown tables headed by the
command that made them. Not run by the tests.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import (
    add_memory_args,
    compile_package,
    describe_memory,
    drop_cache,
    memory_of,
)
from bench.touchguest import lazy_restores, save, touch_guest
from fixedram.testing.vm import Guest, choose_accel, find_qemu

ROOT = Path(__file__).resolve().parent.parent

#: What a working-set row keeps of each restore (fixedram's report and the harness's times).
ROW_KEYS = ("time_to_workload", "time_to_heartbeat", "guest_touch_ms", "requests",
            "pages_on_demand", "pages_prefetched", "zero_prefetched", "working_set_pages",
            "time_to_requests", "record", "total_time", "storage_read")
#: What the fan-out keeps of each restore.
FANOUT_KEYS = ("time_to_running", "total_time", "bytes_read", "storage_read", "requests",
               "time_to_workload")


def one_restore(src: Guest, img: Path, extra: list[str], work: Path,
                last_hb: int) -> dict[str, Any]:
    """One lazy restore; its running time as the harness saw it (QMP status polled)."""
    r = lazy_restores(src, str(img), 1, extra, work, last_hb)[0]
    return {"time_to_running": r["seen_running"], **{k: r[k] for k in ROW_KEYS}}


def fanout(src: Guest, img: Path, n: int, work: Path, last_hb: int) -> list[dict[str, Any]]:
    """``n`` lazy restores of ``img`` at once, the image evicted from the page cache first."""
    drop_cache(img)
    return [{k: r[k] for k in FANOUT_KEYS}
            for r in lazy_restores(src, str(img), n, [], work, last_hb)]


def copy_image(src: Path, dst: Path) -> Path:
    """A sparse copy of the image (each push rate starts from an image without a record)."""
    subprocess.run(["cp", "--sparse=always", str(src), str(dst)], check=True)
    return dst


#: The restores of one push rate: (name, ``restore`` flags, how many; ``None`` = --repeat).
PLAN = (
    ("without", ["--no-prefetch", "--no-record"], None),  # no record used or made
    ("recording", ["--no-prefetch"], 1),  # the first restore of the image: records it
    ("with", [], None),  # prefetch the record (and merge into it)
)


def main() -> None:
    """Run the benchmark and print the summary."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mem", default="256M", help="guest RAM")
    ap.add_argument("--touch", type=int, default=32, help="MiB the workload reads")
    ap.add_argument("--push-rate", default="16M,128M",
                    help="restore --push-rate values, comma-separated")
    ap.add_argument("--prefetch-rate", default=None, help="restore --prefetch-rate")
    ap.add_argument("--repeat", type=int, default=3, help="restores without and with")
    ap.add_argument("--fanout", type=int, default=8, help="concurrent restores (0: skip)")
    ap.add_argument("--dir", type=Path, default=None, help="where the image goes")
    add_memory_args(ap, 8.0)
    args = ap.parse_args()
    compile_package()
    qemu = find_qemu("10")
    accel = choose_accel(qemu)
    work = Path(tempfile.mkdtemp(prefix="fixedram-bench-ws-"))
    imgdir = Path(tempfile.mkdtemp(prefix="fixedram-bench-ws-", dir=args.dir)) if args.dir \
        else work
    img = imgdir / "ws.img"
    rates = [r.strip() for r in args.push_rate.split(",") if r.strip()]
    res: dict[str, Any] = {"host": platform.node(), "qemu": qemu.version_str, "accel": accel,
                           "mem": args.mem, "touch_mib": args.touch, "push_rates": rates,
                           "prefetch_rate": args.prefetch_rate, "image_dir": str(imgdir),
                           "command": " ".join(["python -m bench.workingset", *sys.argv[1:]])}
    try:
        with memory_of(args) as memory, touch_guest(qemu, work, args.mem, args.touch) as src:
            res["memory"] = memory
            src.wait_heartbeat(gen_at_least=1, timeout=300)
            save(src, str(img))
            last_hb = src.heartbeats()[-1].n
            res["restores"] = {}
            recorded = img
            for rate in rates:
                recorded = copy_image(img, imgdir / f"ws-{rate}.img")
                flags = ["--push-rate", rate, *(["--prefetch-rate", args.prefetch_rate]
                                                if args.prefetch_rate else [])]
                runs: dict[str, list[dict[str, Any]]] = {}
                for name, extra, count in PLAN:
                    runs[name] = []
                    for i in range(count or args.repeat):
                        print(f"# {rate} {name} {i + 1}", file=sys.stderr, flush=True)
                        runs[name].append(one_restore(src, recorded, [*flags, *extra], work,
                                                      last_hb))
                res["restores"][rate] = runs
            if args.fanout:  # the image recorded at the last rate; full speed
                print("# fan-out: 1", file=sys.stderr, flush=True)
                res["single"] = fanout(src, recorded, 1, work, last_hb)[0]
                print(f"# fan-out: {args.fanout}", file=sys.stderr, flush=True)
                res["fanout"] = fanout(src, recorded, args.fanout, work, last_hb)
    finally:
        for f in imgdir.glob("ws*.img"):
            with contextlib.suppress(OSError):
                f.unlink()
        shutil.rmtree(work, ignore_errors=True)
        if imgdir != work:
            shutil.rmtree(imgdir, ignore_errors=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    dest = ROOT / "bench" / "results" / f"workingset-{stamp}.json"
    dest.parent.mkdir(exist_ok=True)
    dest.write_text(json.dumps(res, indent=2))
    report(res)
    print(f"results: {dest}")


def _med(rs: list[dict[str, Any]], key: str) -> float:
    return statistics.median(r[key] for r in rs)


def _served(rs: list[dict[str, Any]], n: int) -> str:
    """Median time until the first ``n`` requests were served, '-' when a restore made fewer."""
    ts = [r["time_to_requests"].get(str(n)) for r in rs]
    return f"{statistics.median(ts):.2f}" if all(t is not None for t in ts) else "-"


def report(res: dict[str, Any]) -> None:
    """Print the results as markdown tables, with the command that made them."""
    print(f"`{res['command']}`: QEMU {res['qemu']} ({res['accel']}), {res['mem']} Linux guest, "
          f"touch workload {res['touch_mib']} MiB, image on disk; "
          f"{describe_memory(res.get('memory'))}; medians of "
          f"{len(next(iter(res['restores'].values()))['with'])} restores (recording: 1)."
          " Times in s from the start of `fixedram restore`.\n")
    print("| push rate | restore | requests | prefetched | first 10 / 100 / 1000 served "
          "| running | heartbeat | workload |")
    print("|---|---|---:|---:|---|---:|---:|---:|")
    for rate, runs in res["restores"].items():
        for name, rs in runs.items():
            pre = statistics.median(r["pages_prefetched"] + r["zero_prefetched"] for r in rs)
            print(f"| {rate} | {name} | {_med(rs, 'requests'):.0f} | {pre:.0f} | "
                  f"{_served(rs, 10)} / {_served(rs, 100)} / {_served(rs, 1000)} | "
                  f"{_med(rs, 'time_to_running'):.2f} | {_med(rs, 'time_to_heartbeat'):.2f} | "
                  f"{_med(rs, 'time_to_workload'):.2f} |")
    print()
    for rate, runs in res["restores"].items():
        w, p = runs["without"], runs["with"]
        print(f"- {rate}: requests without / with the record "
              f"{_med(w, 'requests') / max(1.0, _med(p, 'requests')):.1f}x; time to workload "
              f"{_med(w, 'time_to_workload') / _med(p, 'time_to_workload'):.2f}x")
    if "fanout" in res:
        one, many = res["single"], res["fanout"]
        n = len(many)
        read1, readn = one["storage_read"], sum(f["storage_read"] for f in many)
        ttrs = sorted(f["time_to_running"] for f in many)
        print(f"- fan-out, {n} lazy restores of one image at once (page cache dropped first): "
              f"read from storage {readn / 2**20:.0f} MiB vs {read1 / 2**20:.0f} MiB for one "
              f"({readn / max(1, read1):.2f}x; fixedram read "
              f"{sum(f['bytes_read'] for f in many) / 2**20:.0f} MiB from the page cache); "
              f"time to running {one['time_to_running']:.2f} s alone, median "
              f"{statistics.median(ttrs):.2f} s / max {ttrs[-1]:.2f} s of {n} at once "
              f"({os.cpu_count()} CPUs, TCG)")


if __name__ == "__main__":
    main()
