"""Scale series: the same data in ever larger guests; time and peak RSS per path.

The bare test guest stamps ``--data-mib`` MiB (256 by default) of a guest whose RAM grows
from 2 GiB to 1 TiB; QEMU backs the RAM with ``memory-backend-ram,reserve=off``, so the host
only provides what the guest touches, and 1 TiB guests run under TCG with ``-cpu
qemu64,phys-bits=44``. For every size the guest is saved by QEMU alone (mapped-ram) and by
every fixedram save path; fixedram's proxy image is analyzed and verified; and the images are
restored into a fresh QEMU by QEMU alone (its own image) and by every fixedram restore path
(native from the native save's image, proxy and lazy from the proxy save's). Each fixedram command
runs as its own process: its wall time, CPU seconds and peak RSS (``ru_maxrss``) are
recorded; QEMU's own save and load are timed the same way from the QMP commands. A path that
fails or exceeds ``--timeout`` is recorded as such and the series goes on. Usage::

    .venv/bin/python -m bench.scale                                  # 2G ... 1T
    .venv/bin/python -m bench.scale --sizes 2G,16G --only 'native|qemu'   # quick

Writes ``bench/results/scale-<stamp>.{json,md,png}`` (chart: time and peak RSS against RAM
size) and prints the table. Not run by the tests. Images go to ``--dir`` (sparse files).
Run as root, free page reporting is held off for the run and ``--warm-gib`` of free memory
touched first (``bench.common.steady_memory``; ``--keep-page-reporting`` leaves it on).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from bench.common import FIXEDRAM, add_memory_args, compile_package, describe_memory, memory_of
from fixedram.testing.guest import build_guest
from fixedram.testing.vm import Guest, choose_accel, find_qemu, parse_mem_size

ROOT = Path(__file__).resolve().parent.parent
GIB = 1 << 30
#: RAM from which the guest's CPU needs more physical address bits than qemu64's 40
WIDE_PHYS = 1 << 39

#: save paths: name -> ``fixedram save`` options (None: QEMU alone, mapped-ram)
SAVES: dict[str, list[str] | None] = {
    "qemu mapped-ram save": None,
    "save proxy": ["--via", "proxy", "--channels", "0"],
    "save proxy multifd2": ["--via", "proxy", "--channels", "2"],
    "save native": ["--via", "native", "--channels", "0"],
    "save native multifd2": ["--via", "native", "--channels", "2"],
}
#: the image analyze and verify read (it carries fixedram's checksums)
MAIN_IMAGE = "save proxy"
#: commands on the image alone: name -> argv after ``fixedram``
IMAGE_COMMANDS: dict[str, list[str]] = {
    "analyze": ["analyze", "--json"],
    "verify": ["verify", "--json"],
}
#: restore paths: name -> (the save whose image it loads, ``fixedram restore`` options;
#: None: QEMU alone, mapped-ram)
RESTORES: dict[str, tuple[str, list[str] | None]] = {
    "qemu mapped-ram load": ("qemu mapped-ram save", None),
    "restore native": ("save native", ["--via", "native"]),
    "restore native multifd2": ("save native", ["--via", "native", "--channels", "2"]),
    "restore proxy": ("save proxy", ["--via", "proxy", "--channels", "0"]),
    "restore proxy multifd2": ("save proxy", ["--via", "proxy", "--channels", "2"]),
    "restore lazy": ("save proxy", ["--lazy"]),
}


def vm_args(mem: str) -> list[str]:
    """QEMU options for a guest of ``mem`` RAM that the host backs only where it is touched."""
    args = ["-object", f"memory-backend-ram,id=m0,size={mem},reserve=off",
            "-machine", "memory-backend=m0"]
    if parse_mem_size(mem) >= WIDE_PHYS:
        args += ["-cpu", "qemu64,phys-bits=44"]
    return args


def run_measured(argv: list[str], timeout: float) -> dict[str, Any]:
    """Run ``fixedram ARGV``: wall and CPU seconds, peak RSS (MiB), JSON output, or error."""
    t = time.monotonic()
    proc = subprocess.Popen([*FIXEDRAM, *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    chunks: dict[str, bytes] = {}

    def drain(name: str, pipe: Any) -> None:
        chunks[name] = pipe.read()

    readers = [threading.Thread(target=drain, args=(n, p), daemon=True)
               for n, p in (("out", proc.stdout), ("err", proc.stderr))]
    for r in readers:
        r.start()
    timer = threading.Timer(timeout, proc.kill)
    timer.start()
    try:
        _, status, ru = os.wait4(proc.pid, 0)  # the child's own rusage: its peak RSS
    finally:
        timer.cancel()
    wall = time.monotonic() - t
    proc.returncode = os.waitstatus_to_exitcode(status)
    for r in readers:
        r.join(10)
    res: dict[str, Any] = {"wall": wall, "cpu": ru.ru_utime + ru.ru_stime,
                           "rss_mib": ru.ru_maxrss / 1024}
    if proc.returncode == -signal.SIGKILL and wall >= timeout:
        res["error"] = f"timed out after {timeout:.0f} s"
    elif proc.returncode:
        err = chunks.get("err", b"").decode(errors="replace").strip().splitlines() or ["?"]
        res["error"] = f"exit {proc.returncode}: {err[-1][:300]}"
    else:
        try:
            res["report"] = json.loads(chunks.get("out", b"") or b"{}")
        except ValueError:
            res["report"] = {}
    return res


def bench_size(mem: str, args: argparse.Namespace, qemu: Any, accel: str,
               kernel: Path) -> dict[str, Any]:
    """One guest size: every save, the image commands, every restore."""
    want = None if args.only is None else re.compile(args.only)

    def wanted(name: str) -> bool:
        return want is None or want.search(name) is not None

    socks = Path(tempfile.mkdtemp(prefix="frs-", dir="/tmp"))
    work = Path(tempfile.mkdtemp(prefix="fixedram-scale-"))
    imgdir = Path(args.dir) / mem
    imgdir.mkdir(parents=True, exist_ok=True)
    out: dict[str, Any] = {"mem": mem, "ram_bytes": parse_mem_size(mem),
                           "data_mib": args.data_mib, "paths": {}}
    images: dict[str, Path] = {}
    ctl = socks / "src.qmp"
    src = Guest(qemu, work, name="src", mem=mem, accel=accel, kernel=kernel,
                append=f"mib={args.data_mib} rate=0 gens=1 hb=100", qmp_timeout=args.timeout,
                extra_args=[*vm_args(mem), "-qmp", f"unix:{ctl},server=on,wait=off"])
    # a save runs when wanted, or when a wanted step reads its image
    needed = {MAIN_IMAGE} if any(wanted(n) for n in IMAGE_COMMANDS) else set()
    needed |= {image for n, (image, _) in RESTORES.items() if wanted(n)}
    try:
        with src:
            t = time.monotonic()
            src.wait_heartbeat(gen_at_least=1, timeout=args.timeout)
            out["prefill_s"] = time.monotonic() - t
            src.stop()
            for name, opts in SAVES.items():
                if not (wanted(name) or name in needed):
                    continue
                img = imgdir / (name.replace(" ", "_") + ".img")
                img.unlink(missing_ok=True)
                print(f"scale: {mem} {name} ...", file=sys.stderr, flush=True)
                if opts is None:
                    t = time.monotonic()
                    try:
                        src.migrate(f"file:{img}", caps={"mapped-ram": True, "multifd": False})
                        src.wait_migration(args.timeout)
                        subprocess.run(["sync"], check=True)
                        entry: dict[str, Any] = {"wall": time.monotonic() - t}
                    except Exception as e:  # recorded, the series goes on
                        entry = {"wall": time.monotonic() - t, "error": str(e)[:300]}
                    src.set_migration(caps={"mapped-ram": False})
                else:
                    entry = run_measured(["save", "--qmp", str(ctl), *opts, "--no-progress",
                                          "--json", str(img)], args.timeout)
                if img.exists() and "error" not in entry:
                    entry["allocated_mib"] = img.stat().st_blocks * 512 / (1 << 20)
                    images[name] = img
                out["paths"][name] = entry
                src.cont()
                src.stop()
            main_img = images.get(MAIN_IMAGE)
            for name, argv in IMAGE_COMMANDS.items():
                if wanted(name) and main_img is not None:
                    print(f"scale: {mem} {name} ...", file=sys.stderr, flush=True)
                    r = run_measured([*argv, str(main_img)], args.timeout)
                    r.pop("report", None)
                    out["paths"][name] = r
        for name, (source, opts) in RESTORES.items():
            img = images.get(source)
            if not wanted(name) or img is None:
                continue
            print(f"scale: {mem} {name} ...", file=sys.stderr, flush=True)
            dst = Guest.like(src, name="dst", incoming=True)
            dst.qmp_timeout = args.timeout
            dst.extra_args = (*vm_args(mem), "-qmp", f"unix:{socks / 'dst.qmp'},server=on,wait=off")
            with dst:
                if opts is None:
                    t = time.monotonic()
                    try:
                        dst.migrate_incoming(f"file:{img}", caps={"mapped-ram": True})
                        dst.wait_incoming(args.timeout)
                        entry = {"wall": time.monotonic() - t}
                    except Exception as e:
                        entry = {"wall": time.monotonic() - t, "error": str(e)[:300]}
                else:
                    entry = run_measured(["restore", "--qmp", str(socks / "dst.qmp"), *opts,
                                          "--paused", "--no-progress", "--json", str(img)],
                                         args.timeout)
                    rep = entry.pop("report", {})
                    if "time_to_running" in rep:
                        entry["time_to_running"] = rep["time_to_running"]
            out["paths"][name] = entry
    finally:
        src.kill()
        shutil.rmtree(socks, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)
        if not args.keep:
            shutil.rmtree(imgdir, ignore_errors=True)
    for e in out["paths"].values():
        e.pop("report", None)
    return out


def table(res: dict[str, Any]) -> str:
    """Rows: paths; columns: RAM sizes; cells: seconds / peak RSS MiB."""
    sizes = res["sizes"]
    names: list[str] = []
    for s in sizes:
        names += [n for n in s["paths"] if n not in names]
    lines = [f"`{res['command']}` on {res['date']}: {res['cores']} cores, QEMU {res['qemu']} "
             f"({res['accel']}), {res['data_mib']} MiB of data in every guest; "
             f"{describe_memory(res.get('memory'))}; wall s / fixedram peak RSS MiB",
             "", "| path | " + " | ".join(s["mem"] for s in sizes) + " |",
             "|---|" + "---|" * len(sizes)]
    for n in names:
        cells = []
        for s in sizes:
            e = s["paths"].get(n)
            if e is None:
                cells.append("")
            elif "error" in e:
                cells.append("failed" if "timed out" not in e["error"] else "timeout")
            else:
                rss = f" / {e['rss_mib']:.0f}" if "rss_mib" in e else ""
                cells.append(f"{e['wall']:.2f}{rss}")
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    errors = [f"- {s['mem']} {n}: {e['error']}" for s in sizes for n, e in s["paths"].items()
              if "error" in e]
    if errors:
        lines += ["", "Failures:", *errors]
    return "\n".join(lines)


def chart(res: dict[str, Any], path: Path) -> None:
    """Time and peak RSS against RAM size, one line per path (log-log)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(14, 6))
    names: list[str] = []
    for s in res["sizes"]:
        names += [n for n in s["paths"] if n not in names]
    colors = plt.get_cmap("tab20")
    for i, n in enumerate(names):
        pts = [(s["ram_bytes"] / GIB, s["paths"][n]) for s in res["sizes"]
               if n in s["paths"] and "error" not in s["paths"][n]]
        if not pts:
            continue
        kw: dict[str, Any] = {"color": colors(i % 20), "label": n,
                              "linestyle": "--" if n.startswith("qemu") else "-",
                              "marker": "s" if "save" in n else "o"}
        ax_t.plot([x for x, _ in pts], [e["wall"] for _, e in pts], **kw)
        if any("rss_mib" in e for _, e in pts):
            ax_m.plot([x for x, e in pts if "rss_mib" in e],
                      [e["rss_mib"] for _, e in pts if "rss_mib" in e], **kw)
    for ax, what in ((ax_t, "wall time, s"), (ax_m, "fixedram peak RSS, MiB")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("guest RAM, GiB")
        ax.set_ylabel(what)
        ax.grid(True, which="both", alpha=0.3)
    ax_m.axhline(100, color="grey", linewidth=0.8)
    ax_t.legend(fontsize=7)
    ax_t.set_title(f"{res['data_mib']} MiB of data, QEMU {res['qemu']} ({res['accel']})")
    ax_m.set_title("peak RSS (100 MiB: the goal)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="2G,16G,64G,256G,1T")
    ap.add_argument("--data-mib", type=int, default=256)
    ap.add_argument("--dir", default="/var/tmp/fixedram-scale", help="where the images go")
    ap.add_argument("--only", metavar="REGEX", help="run only the paths matching REGEX (the "
                    "images they read are saved anyway)")
    ap.add_argument("--timeout", type=float, default=1800.0,
                    help="seconds per path before it is recorded as timed out")
    ap.add_argument("--keep", action="store_true", help="keep the images")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    add_memory_args(ap, 8.0)
    args = ap.parse_args()
    compile_package()
    qemu = find_qemu("10")
    accel = choose_accel(qemu)
    kernel = build_guest()
    res: dict[str, Any] = {
        "command": " ".join(["python -m bench.scale", *sys.argv[1:]]),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"), "cores": os.cpu_count(),
        "qemu": qemu.version_str, "accel": accel, "data_mib": args.data_mib, "sizes": []}
    with memory_of(args) as memory:
        res["memory"] = memory
        for mem in args.sizes.split(","):
            res["sizes"].append(bench_size(mem, args, qemu, accel, kernel))
    outdir = Path(args.out)
    outdir.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    (outdir / f"scale-{stamp}.json").write_text(json.dumps(res, indent=2))
    text = table(res)
    (outdir / f"scale-{stamp}.md").write_text(text + "\n")
    try:
        chart(res, outdir / f"scale-{stamp}.png")
    except ImportError:
        print("bench: matplotlib missing, no chart (scripts/setup.sh --bench)", file=sys.stderr)
    print(text)
    print(f"\nscale: results in {outdir}/scale-{stamp}.*", file=sys.stderr)


if __name__ == "__main__":
    main()
