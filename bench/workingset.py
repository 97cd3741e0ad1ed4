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
   misses, whoever missed first pays). Each guest's heartbeat must resume.

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

from bench.common import drop_cache
from fixedram.testing.guest.linux import (
    COMMAND_PORT_ARGS,
    build_linux_guest,
    linux_append,
    parse_touches,
    send_touch,
)
from fixedram.testing.vm import Guest, choose_accel, find_qemu

ROOT = Path(__file__).resolve().parent.parent
FIXEDRAM = [sys.executable, "-m", "fixedram"]


def start_restore(dst: Guest, img: Path, extra: list[str], out: Path) -> subprocess.Popen[bytes]:
    assert dst.control_path is not None
    with open(out, "wb") as f:
        return subprocess.Popen([*FIXEDRAM, "restore", "--lazy", "--qmp", str(dst.control_path),
                                 "--json", "--no-progress", *extra, str(img)], stdout=f,
                                stderr=subprocess.PIPE)


def finish(p: subprocess.Popen[bytes], out: Path) -> tuple[dict[str, Any], int]:
    """Wait for a restore; its report and the bytes it read from storage (``ru_inblock``)."""
    _, status, ru = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    err = p.stderr.read().decode() if p.stderr is not None else ""
    if p.returncode:
        raise RuntimeError(f"fixedram restore failed: {err.strip()}")
    return json.loads(out.read_text()), ru.ru_inblock * 512


def one_restore(src: Guest, img: Path, extra: list[str], work: Path,
                last_hb: int) -> dict[str, Any]:
    """One lazy restore with the touch command sent as soon as the guest runs."""
    dst = Guest.like(src, name="dst", incoming=True)
    with dst:
        t0 = time.monotonic()
        p = start_restore(dst, img, extra, work / "rep.json")
        ttr = t_touch = t_hb = None
        while t_touch is None or t_hb is None:
            now = time.monotonic() - t0
            if now > 300:
                raise RuntimeError("the workload did not resume within 300 s")
            if ttr is None and dst.status() == "running":
                ttr = now
                assert dst.pid is not None
                send_touch(dst.pid, dst.name)
            if ttr is not None:
                serial = dst.serial()
                if t_touch is None and parse_touches(serial):
                    t_touch = now
                if t_hb is None and any(b.n > last_hb for b in dst.heartbeats()):
                    t_hb = now
            time.sleep(0.005)
        rep, inblock = finish(p, work / "rep.json")
        touch = parse_touches(dst.serial())[0]
        if touch.bad:
            raise RuntimeError(f"the guest found {touch.bad} wrong pages")
    return {"time_to_running": ttr, "time_to_workload": t_touch, "time_to_heartbeat": t_hb,
            "guest_touch_ms": touch.ms, "requests": rep["requests"],
            "pages_on_demand": rep["pages_on_demand"], "pages_prefetched": rep["pages_prefetched"],
            "zero_prefetched": rep["zero_prefetched"],
            "working_set_pages": rep["working_set_pages"],
            "time_to_requests": rep["time_to_requests"], "record": rep["record"],
            "total_time": rep["total_time"], "storage_read": inblock}


def fanout(src: Guest, img: Path, n: int, extra: list[str], work: Path,
           last_hb: int) -> list[dict[str, Any]]:
    """``n`` lazy restores of ``img`` at once (image evicted from the page cache first)."""
    dsts = [Guest.like(src, name=f"f{i}", incoming=True) for i in range(n)]
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for d in dsts:
            d.start()
        drop_cache(img)
        for i, d in enumerate(dsts):
            procs.append(start_restore(d, img, extra, work / f"f{i}.json"))
        out = []
        for i, p in enumerate(procs):
            rep, inblock = finish(p, work / f"f{i}.json")
            out.append({"time_to_running": rep["time_to_running"],
                        "total_time": rep["total_time"], "bytes_read": rep["bytes_read"],
                        "storage_read": inblock, "requests": rep["requests"]})
        for d in dsts:
            d.wait_heartbeat(after=last_hb, timeout=300)
        return out
    finally:
        for p in procs:
            if p.returncode is None:
                p.kill()
                p.wait()
        for d in dsts:
            d.kill()


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
    args = ap.parse_args()
    qemu = find_qemu("10")
    lx = build_linux_guest()
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
    src = Guest(qemu, work, name="src", kernel=lx.kernel, initrd=lx.initrd, mem=args.mem,
                append=linux_append(data=8, mib=4, rate=1, hb=500, touch=args.touch),
                extra_args=COMMAND_PORT_ARGS, control=True, qmp_timeout=300)
    try:
        with src:
            src.wait_heartbeat(gen_at_least=1, timeout=300)
            assert src.control_path is not None
            r = subprocess.run([*FIXEDRAM, "save", "--qmp", str(src.control_path), "--via",
                                "proxy", "--json", "--no-progress", str(img)],
                               capture_output=True, text=True, check=False)
            if r.returncode:
                raise RuntimeError(f"save failed: {r.stderr.strip()}")
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
                drop_cache(recorded)
                res["single"] = fanout(src, recorded, 1, [], work, last_hb)[0]
                print(f"# fan-out: {args.fanout}", file=sys.stderr, flush=True)
                res["fanout"] = fanout(src, recorded, args.fanout, [], work, last_hb)
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
          f"touch workload {res['touch_mib']} MiB, image on disk; medians of "
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
