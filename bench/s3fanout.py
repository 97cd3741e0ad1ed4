"""A fan-out of lazy restores of one object image (``s3://``) on one host, against one.

The Linux test guest (``fixedram/testing/guest/linux.py``, touch workload) is saved into
one ``weed mini`` on loopback (``fixedram save --via proxy s3://...``). Then, for the
image without a working-set record (``--no-prefetch --no-record``) and with the record
(made first by one lazy restore of the image, which learns and stores it next to the
manifest; then ``--no-record`` so that every restore of a row sees the same record):

* **one** lazy restore alone, with an empty chunk cache;
* **N** (``--fanout``, default 8) lazy restores of the image at once into as many
  destinations, sharing one empty chunk cache (one host, one user).

Right after each guest runs the harness sends it the touch command; *workload* is the time
from the start of its ``fixedram restore`` until the guest's ``TOUCH`` line (the guest
checks every page it reads), *running* is fixedram's ``time_to_running``. *Fetched* is the
sum of the restores' ``bytes_fetched`` (GET bytes fixedram counted, meta chunk included,
the manifest not); *requests* are QEMU's page requests (median).

Run as root, free page reporting is held off for the run and ``--warm-gib`` of free memory
touched first (``bench.common.steady_memory``; ``--keep-page-reporting`` leaves it on).

Usage::

    .venv/bin/python -m bench.s3fanout                 # 256M guest, 8 at once
    .venv/bin/python -m bench.s3fanout --fanout 3      # quick

Writes ``bench/results/s3fanout-<stamp>.json`` and prints a markdown table headed by the
command that made it. Not run by the tests.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import add_memory_args, compile_package, describe_memory, memory_of
from bench.touchguest import lazy_restores, save, touch_guest
from fixedram.testing.seaweed import TEST_BUCKET, Seaweed
from fixedram.testing.vm import Guest, choose_accel, find_qemu

ROOT = Path(__file__).resolve().parent.parent
#: What the table keeps of each restore (fixedram's report and the harness's times).
KEYS = ("time_to_running", "time_to_workload", "requests", "bytes_fetched", "record",
        "working_set_pages", "total_time")


def restores(src: Guest, url: str, n: int, extra: list[str], env: dict[str, str],
             work: Path, last_hb: int) -> list[dict[str, Any]]:
    """``n`` lazy restores of ``url`` at once (:func:`bench.touchguest.lazy_restores`)."""
    return [{k: r[k] for k in KEYS} for r in lazy_restores(src, url, n, extra, work, last_hb,
                                                           env)]


def main() -> None:
    """Run the benchmark and print the table."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mem", default="256M", help="guest RAM")
    ap.add_argument("--touch", type=int, default=32, help="MiB the workload reads")
    ap.add_argument("--fanout", type=int, default=8, help="concurrent restores")
    add_memory_args(ap, 8.0)
    args = ap.parse_args()
    compile_package()
    qemu = find_qemu("10")
    accel = choose_accel(qemu)
    work = Path(tempfile.mkdtemp(prefix="fixedram-bench-s3fan-"))
    sw = Seaweed(work / "weed")
    url = f"s3://{TEST_BUCKET}/bench/fanout"
    res: dict[str, Any] = {"host": platform.node(), "qemu": qemu.version_str, "accel": accel,
                           "mem": args.mem, "touch_mib": args.touch, "fanout": args.fanout,
                           "command": " ".join(["python -m bench.s3fanout", *sys.argv[1:]])}
    caches = iter(range(1000))

    def env() -> dict[str, str]:  # an empty chunk cache: a host that never read the image
        return sw.env(FIXEDRAM_CHUNK_CACHE=str(work / f"cache{next(caches)}"),
                      FIXEDRAM_STAGING=str(work))

    try:
        with memory_of(args) as memory, touch_guest(qemu, work, args.mem, args.touch) as src:
            res["memory"] = memory
            sw.start()
            sw.client().create_bucket(Bucket=TEST_BUCKET)
            src.wait_heartbeat(gen_at_least=1, timeout=300)
            res["stored_bytes"] = save(src, url, env())["upload"]["uploaded_bytes"]
            last_hb = src.heartbeats()[-1].n
            rows: dict[str, dict[str, Any]] = {}
            for name, extra in (("without record", ["--no-prefetch", "--no-record"]),
                                ("with record", ["--no-record"])):
                if name == "with record":
                    print("# recording", file=sys.stderr, flush=True)
                    rows["recording"] = {"one": restores(src, url, 1, ["--no-prefetch"], env(),
                                                         work, last_hb)}
                print(f"# {name}: 1", file=sys.stderr, flush=True)
                one = restores(src, url, 1, extra, env(), work, last_hb)
                print(f"# {name}: {args.fanout}", file=sys.stderr, flush=True)
                many = restores(src, url, args.fanout, extra, env(), work, last_hb)
                rows[name] = {"one": one, "many": many}
            res["rows"] = rows
    finally:
        sw.stop()
        shutil.rmtree(work, ignore_errors=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    dest = ROOT / "bench" / "results" / f"s3fanout-{stamp}.json"
    dest.parent.mkdir(exist_ok=True)
    dest.write_text(json.dumps(res, indent=2))
    report(res)
    print(f"results: {dest}")


def report(res: dict[str, Any]) -> None:
    """Print the results as a markdown table, with the command that made them."""
    n = res["fanout"]
    print(f"`{res['command']}`: QEMU {res['qemu']} ({res['accel']}), {res['mem']} Linux guest, "
          f"touch workload {res['touch_mib']} MiB, one `weed mini` on loopback, "
          f"{os.cpu_count()} CPUs; {describe_memory(res.get('memory'))}; "
          f"image {res['stored_bytes'] / 2**20:.0f} MiB stored. "
          "Times in s from the start of each `fixedram restore`; for "
          f"{n} at once: median / max.\n")
    print(f"| record | fetched, 1 | fetched, {n} at once (ratio) | requests 1 / {n} "
          f"| running 1 / {n} | workload 1 / {n} |")
    print("|---|---:|---:|---|---|---|")
    for name in ("without record", "with record"):
        one, many = res["rows"][name]["one"][0], res["rows"][name]["many"]
        f1, fn = one["bytes_fetched"], sum(r["bytes_fetched"] for r in many)

        def mm(key: str, rs: list[dict[str, Any]] = many) -> str:
            vs = sorted(r[key] for r in rs)
            return f"{statistics.median(vs):.2f} / {vs[-1]:.2f}"

        reqs = statistics.median(r["requests"] for r in many)
        print(f"| {name} | {f1 / 2**20:.1f} MiB | {fn / 2**20:.1f} MiB ({fn / f1:.2f}x) | "
              f"{one['requests']} / {reqs:.0f} | {one['time_to_running']:.2f} / "
              f"{mm('time_to_running')} | {one['time_to_workload']:.2f} / "
              f"{mm('time_to_workload')} |")


if __name__ == "__main__":
    main()
