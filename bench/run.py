"""Save/restore benchmark: fixedram against QEMU's own file migration and ``dd``, in one run.

A paused guest holding ``--data-mib`` MiB of stamped pages is saved by every method
into each target directory (root disk and tmpfs by default), then each image is
restored into a fresh QEMU. Every figure comes from this one run on this machine,
so the ratios compare like with like. Usage::

    .venv/bin/python -m bench.run                       # 2 GiB guest, 1.5 GiB data
    .venv/bin/python -m bench.run --mem 512M --data-mib 256 --targets tmpfs   # quick
    .venv/bin/python -m bench.run --repeat 3            # medians of 3 runs (the README's)
    .venv/bin/python -m bench.run --layout alternate --targets tmpfs   # scattered data
    .venv/bin/python -m bench.run --server --targets tmpfs   # also through fixedram serve

Run as root, the benchmark holds off the kernel's free page reporting for its run and
first touches ``--warm-gib`` of free memory (``bench.common.steady_memory`` says why);
``--keep-page-reporting`` leaves it on.

``--server`` runs every fixedram method a second time through a resident server
(``fixedram serve``, docs/resident-server.md; started by the benchmark on a private socket),
as row "METHOD (server)": the same work without Python's start-up and imports in the
command's time. Its CPU seconds are the client's, the server's and the command child's; no
RSS. ``--only`` matches the method names without " (server)".

``--layout alternate`` keeps every other page of the data and leaves the rest zero (runs
of one page, as in a guest whose freed pages were zeroed or returned to the host): the
guest's RAM is saved by QEMU, every second data page is cleared in the image's bitmap, and
a new QEMU loads that image, paused, as the source of every method. The tables then count
half the data.

Writes ``bench/results/<stamp>.json`` and a PNG chart next to it, and prints tables.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import resource
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
    cpu_seconds,
    describe_memory,
    memory_of,
)
from fixedram.image.reader import open_image
from fixedram.testing.guest import PAGE_BASE, PAGE_SIZE, build_guest
from fixedram.testing.vm import Guest, choose_accel, find_qemu

MIB = 1 << 20
ROOT = Path(__file__).resolve().parent.parent

#: QEMU-native save methods: capabilities and parameters.
QEMU_SAVES: dict[str, tuple[dict[str, bool], dict[str, Any]]] = {
    "qemu legacy file:": ({}, {}),
    "qemu mapped-ram": ({"mapped-ram": True}, {}),
    "qemu mapped-ram multifd2": ({"mapped-ram": True, "multifd": True},
                                 {"multifd-channels": 2}),
    "qemu mapped-ram multifd2 dio": ({"mapped-ram": True, "multifd": True},
                                     {"multifd-channels": 2, "direct-io": True}),
}
ALL_CAPS_OFF = {"mapped-ram": False, "multifd": False}

#: fixedram save methods: ``fixedram save`` options.
FIXEDRAM_SAVES: dict[str, list[str]] = {
    "fixedram proxy": ["--via", "proxy", "--channels", "0"],
    "fixedram proxy dio": ["--via", "proxy", "--channels", "0", "--direct-io"],
    "fixedram proxy multifd2": ["--via", "proxy", "--channels", "2"],
    "fixedram proxy multifd2 dio": ["--via", "proxy", "--channels", "2", "--direct-io"],
    "fixedram proxy multifd4": ["--via", "proxy", "--channels", "4"],
    "fixedram proxy multifd4 dio": ["--via", "proxy", "--channels", "4", "--direct-io"],
    "fixedram native": ["--via", "native", "--channels", "0"],
    "fixedram native multifd2": ["--via", "native", "--channels", "2"],
    "fixedram native multifd2 dio": ["--via", "native", "--channels", "2", "--direct-io"],
}

#: restore methods: (image saved by, QEMU-native load settings or fixedram restore options).
RESTORES: dict[str, tuple[str, tuple[dict[str, bool], dict[str, Any]] | list[str]]] = {
    "qemu load legacy": ("qemu legacy file:", ({}, {})),
    "qemu load mapped-ram": ("qemu mapped-ram", ({"mapped-ram": True}, {})),
    "qemu load mapped-ram multifd2 dio": ("qemu mapped-ram multifd2 dio",
                                          QEMU_SAVES["qemu mapped-ram multifd2 dio"]),
    "fixedram restore proxy": ("fixedram proxy", ["--via", "proxy", "--channels", "0"]),
    "fixedram restore proxy dio": ("fixedram proxy", ["--via", "proxy", "--direct-io"]),
    "fixedram restore proxy multifd2": ("fixedram proxy", ["--via", "proxy", "--channels", "2"]),
    "fixedram restore proxy multifd4": ("fixedram proxy", ["--via", "proxy", "--channels", "4"]),
    "fixedram restore proxy (qemu mapped-ram)": ("qemu mapped-ram",
                                                 ["--via", "proxy", "--channels", "0"]),
    "fixedram restore proxy multifd2 (qemu mapped-ram)": ("qemu mapped-ram",
                                                          ["--via", "proxy", "--channels", "2"]),
    "fixedram restore proxy (legacy stream)": ("qemu legacy file:",
                                               ["--via", "proxy", "--channels", "0"]),
    "fixedram restore proxy multifd2 (legacy stream)": ("qemu legacy file:",
                                                         ["--via", "proxy", "--channels", "2"]),
    # each native restore loads the image its QEMU-alone counterpart loads
    "fixedram restore native": ("qemu mapped-ram", ["--via", "native"]),
    "fixedram restore native multifd2 dio": ("qemu mapped-ram multifd2 dio",
                                             ["--via", "native", "--channels", "2",
                                              "--direct-io"]),
}


#: native fixedram methods and QEMU doing the same alone (the 0.9x goal of issue 13)
NATIVE_PAIRS: dict[str, dict[str, str]] = {
    "save": {"fixedram native": "qemu mapped-ram",
             "fixedram native multifd2": "qemu mapped-ram multifd2",
             "fixedram native multifd2 dio": "qemu mapped-ram multifd2 dio"},
    "restore": {"fixedram restore native": "qemu load mapped-ram",
                "fixedram restore native multifd2 dio": "qemu load mapped-ram multifd2 dio"},
}


def drop_caches() -> None:
    """Flush dirty data and drop the page cache (root only; silently skipped otherwise)."""
    subprocess.run(["sync"], check=False)
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError:
        pass


def run_fixedram(args: list[str], server: ResidentServer | None = None) -> dict[str, Any]:
    """Run a fixedram command (through ``server``, if given); return wall time, its CPU
    seconds (through a server: the client's, the server's and the command child's) and peak
    RSS (none through a server), and its JSON."""
    cpu0 = server.cpu() if server is not None else 0.0
    t = time.monotonic()
    proc = subprocess.Popen([*FIXEDRAM, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=command_env(os.environ, server))
    out, err = b"", b""
    _, status, ru = os.wait4(proc.pid, 0)
    wall = time.monotonic() - t
    assert proc.stdout is not None and proc.stderr is not None
    out, err = proc.stdout.read(), proc.stderr.read()
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise RuntimeError(f"fixedram {' '.join(args)} failed: {err.decode().strip()}")
    report = json.loads(out) if out.strip() else {}
    cpu = ru.ru_utime + ru.ru_stime
    if server is not None:  # the command's child has been reaped when its client exits
        return {"wall": wall, "cpu": cpu + server.cpu() - cpu0, "report": report}
    return {"wall": wall, "cpu": cpu, "rss_mib": ru.ru_maxrss / 1024, "report": report}


def allocated(path: Path) -> int:
    return path.stat().st_blocks * 512


def bench_dd(target: Path, size_mib: int) -> dict[str, float]:
    """dd write (O_DIRECT, and fsync'd) and read (O_DIRECT, and cold buffered) of the data size."""
    f = target / "dd.bin"
    res: dict[str, float] = {}

    def timed(cmd: list[str]) -> float:
        t = time.monotonic()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return time.monotonic() - t

    count = size_mib // 4
    for name, flags in (("write direct", ["oflag=direct"]), ("write fsync", ["conv=fsync"])):
        f.unlink(missing_ok=True)
        drop_caches()
        try:
            res[f"dd {name}"] = timed(["dd", "if=/dev/zero", f"of={f}", "bs=4M",
                                       f"count={count}", *flags])
        except subprocess.CalledProcessError:
            res[f"dd {name}"] = float("nan")
    for name, flags in (("read direct", ["iflag=direct"]), ("read cold", [])):
        drop_caches()
        try:
            res[f"dd {name}"] = timed(["dd", f"if={f}", "of=/dev/null", "bs=4M", *flags])
        except subprocess.CalledProcessError:
            res[f"dd {name}"] = float("nan")
    f.unlink(missing_ok=True)
    return res


def bench_ceilings(target: Path, size_mib: int) -> dict[str, float]:
    """The data-path ceilings of one Python endpoint through ``target`` (bench.ceilings)."""
    r = subprocess.run([sys.executable, "-m", "bench.ceilings", "--json", "--size-mib",
                        str(size_mib), str(target)], capture_output=True, text=True,
                       cwd=ROOT, check=False)
    if r.returncode:
        print(f"bench: ceilings failed: {r.stderr.strip()[-500:]}", file=sys.stderr)
        return {}
    return dict(json.loads(r.stdout)[str(target)])


def bench_target(name: str, target: Path, args: argparse.Namespace, qemu: Any, accel: str,
                 kernel: Path, server: ResidentServer | None = None,
                 turn: int = 0) -> dict[str, Any]:
    target.mkdir(parents=True, exist_ok=True)
    socks = Path(tempfile.mkdtemp(prefix="frb-", dir="/tmp"))
    runs = Path(tempfile.mkdtemp(prefix="fixedram-bench-"))
    out: dict[str, Any] = {"target": name, "dir": str(target), "save": {}, "restore": {}}
    is_disk = name == "disk"
    images: dict[str, Path] = {}

    def wanted(method: str) -> bool:
        return args.only is None or re.search(args.only, method) is not None

    def keep(method: str, img: Path) -> None:
        """Keep a saved image for the restores that load it; delete the others at once (on
        tmpfs a dozen 1.5 GiB images would otherwise fill RAM and slow every later step)."""
        if any(k == method and wanted(m) for m, (k, _) in RESTORES.items()):
            images[method] = img
        elif not args.keep:
            img.unlink(missing_ok=True)

    def needed(save: str) -> bool:
        """A save runs when it is wanted or a wanted restore loads its image."""
        return wanted(save) or any(wanted(m) for m, (k, _) in RESTORES.items() if k == save)

    def turns(via: tuple[ResidentServer | None, ...]) -> tuple[ResidentServer | None, ...]:
        """A method's fresh and server runs take turns going first from run to run (the
        fresh one first in the odd-numbered runs: an even ``--repeat`` balances them)."""
        return via[::-1] if turn % 2 else via

    def ctl(n: str) -> list[str]:
        return ["-qmp", f"unix:{socks / n}.qmp,server=on,wait=off"]

    src = Guest(qemu, runs, name="src", mem=args.mem, accel=accel, kernel=kernel,
                append=f"mib={args.data_mib} rate=0 gens=1 hb=100", extra_args=ctl("src"))
    try:
        with src:
            t = time.monotonic()
            src.wait_heartbeat(gen_at_least=1, timeout=300)
            out["prefill_s"] = time.monotonic() - t
            src.stop()
            if args.layout == "alternate":
                src = alternate(src, target, args.data_mib, ctl("src"))
            for method, (caps, params) in QEMU_SAVES.items():
                if not needed(method):
                    continue
                img = target / (method.replace(" ", "_").replace(":", "") + ".img")
                img.unlink(missing_ok=True)
                if is_disk:
                    drop_caches()
                src.set_migration(caps={**ALL_CAPS_OFF, **caps},
                                  params={"multifd-channels": 2, "direct-io": False, **params})
                cpu0 = cpu_seconds(src.pid or 0)
                t = time.monotonic()
                src.migrate(f"file:{img}")
                info = src.wait_migration(600)
                wall = time.monotonic() - t
                cpu = cpu_seconds(src.pid or 0) - cpu0
                t = time.monotonic()
                subprocess.run(["sync"], check=True)
                out["save"][method] = {"wall": wall, "wall_sync": wall + time.monotonic() - t,
                                       "qemu_cpu": cpu, "total_time_ms": info.get("total-time"),
                                       "apparent": img.stat().st_size, "allocated": allocated(img)}
                keep(method, img)
                src.cont()
                src.stop()
            src.set_migration(caps=ALL_CAPS_OFF, params={"direct-io": False})
            for method, opts in FIXEDRAM_SAVES.items():
                if not needed(method):
                    continue
                # the fresh command's image is the one the restores load
                for srv in turns((None, server) if server is not None and wanted(method)
                                 else (None,)):
                    key = method if srv is None else f"{method} (server)"
                    img = target / (key.replace(" ", "_").replace("(", "").replace(")", "")
                                    + ".img")
                    img.unlink(missing_ok=True)
                    if is_disk:
                        drop_caches()
                    cpu0 = cpu_seconds(src.pid or 0)
                    r = run_fixedram(["save", "--qmp", str(socks / "src.qmp"), *opts,
                                      "--no-progress", "--json", str(img)], srv)
                    cpu = cpu_seconds(src.pid or 0) - cpu0
                    out["save"][key] = {"wall": r["wall"], "wall_sync": r["wall"],
                                        "qemu_cpu": cpu, "fixedram_cpu": r["cpu"],
                                        "fixedram_rss_mib": r.get("rss_mib"),
                                        # QEMU's own total-time of the migration
                                        "qemu_part": r["report"].get("qemu_total_time"),
                                        "apparent": img.stat().st_size,
                                        "allocated": allocated(img)}
                    if srv is None:
                        keep(method, img)
                    elif not args.keep:
                        img.unlink()
                    src.cont()
                    src.stop()
                    src.set_migration(caps=ALL_CAPS_OFF, params={"direct-io": False})
        for method, (image_key, how) in RESTORES.items():
            if not wanted(method) or image_key not in images:
                continue
            img = images[image_key]
            for srv in turns((None,) if isinstance(how, tuple) or server is None
                             else (None, server)):
                if is_disk:
                    drop_caches()
                dst = Guest.like(src, name="dst", incoming=True)
                dst.extra_args = tuple(ctl("dst"))
                with dst:
                    cpu0 = cpu_seconds(dst.pid or 0)
                    if isinstance(how, tuple):
                        caps, params = how
                        t = time.monotonic()
                        dst.migrate_incoming(f"file:{img}", caps=caps or None,
                                             params=params or None)
                        dst.wait_incoming(600)
                        wall = time.monotonic() - t
                        entry: dict[str, Any] = {"wall": wall}
                    else:
                        r = run_fixedram(["restore", "--qmp", str(socks / "dst.qmp"), *how,
                                          "--paused", "--no-progress", "--json", str(img)], srv)
                        entry = {"wall": r["wall"], "fixedram_cpu": r["cpu"],
                                 "fixedram_rss_mib": r.get("rss_mib"),
                                 # migrate-incoming until the load was seen complete
                                 "qemu_part": r["report"].get("load_time")}
                    entry["qemu_cpu"] = cpu_seconds(dst.pid or 0) - cpu0
                    entry["status"] = dst.status()
                    out["restore"][method if srv is None else f"{method} (server)"] = entry
        data = args.data_mib // 2 if args.layout == "alternate" else args.data_mib
        out["dd"] = bench_dd(target, data)
        out["ceilings"] = bench_ceilings(target, data)
    finally:
        src.kill()
        shutil.rmtree(socks, ignore_errors=True)
        shutil.rmtree(runs, ignore_errors=True)
        if not args.keep:
            for img in images.values():
                img.unlink(missing_ok=True)
    return out


def alternate(src: Guest, target: Path, data_mib: int, ctl: list[str]) -> Guest:
    """A new paused source QEMU holding ``src``'s RAM with every second data page zero
    (``src`` is shut down): saved by QEMU as mapped-ram, every odd data page's bit
    cleared in the image's bitmap, loaded by QEMU into a fresh process."""
    img = target / "layout.img"
    img.unlink(missing_ok=True)
    src.set_migration(caps={**ALL_CAPS_OFF, "mapped-ram": True}, params={"direct-io": False})
    src.migrate(f"file:{img}")
    src.wait_migration(600)
    src.quit()
    with open_image(img) as im:
        mapped = im.block("pc.ram").mapped
    assert mapped is not None
    first = PAGE_BASE // PAGE_SIZE
    assert first % 8 == 0  # whole bitmap bytes
    at, n = mapped.bitmap_offset + first // 8, data_mib * MIB // PAGE_SIZE // 8
    with open(img, "r+b") as f:
        f.seek(at)
        bits = bytearray(f.read(n))
        for i in range(n):
            bits[i] &= 0x55  # pages 0, 2, 4... of every byte's eight kept
        f.seek(at)
        f.write(bits)
    new = Guest.like(src, name="src", incoming=True)
    new.extra_args = tuple(ctl)
    try:
        new.start()
        new.migrate_incoming(f"file:{img}", caps={"mapped-ram": True})
        new.wait_incoming(600)
        new.set_migration(caps=ALL_CAPS_OFF, params={"direct-io": False})
    except BaseException:
        new.kill()
        raise
    finally:
        img.unlink(missing_ok=True)
    return new


def median_of(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One target's result from repeated runs: the median of every number (all runs kept)."""
    if len(runs) == 1:
        return runs[0]

    def merge(items: list[Any]) -> Any:
        first = items[0]
        if isinstance(first, dict):
            return {k: merge([it[k] for it in items if k in it]) for k in first}
        if isinstance(first, int | float) and not isinstance(first, bool):
            return statistics.median(items)
        return first

    out = merge(runs)
    out["runs"] = runs
    return out


def _ratio(best: float, wall: float) -> str:
    """``best / wall`` as "1.23x", or "-" when the reference method did not run (--only)."""
    return "-" if math.isnan(best) else f"{best / wall:.2f}x"


def _rss(v: dict[str, Any]) -> str:
    """A row's peak RSS of fixedram in MiB, "-" through a resident server (not measured)."""
    rss = v.get("fixedram_rss_mib", 0)
    return "-" if rss is None else f"{rss:.0f}"


def table(res: dict[str, Any], data_mib: int) -> str:
    """Ratios: each method's throughput against dd and against QEMU's best mapped-ram."""
    lines = [f"`{res['command']}` on {res['date']}: {res['machine']['cores']} cores, "
             f"QEMU {res['machine']['qemu']} ({res['machine']['accel']}), guest {res['mem']}; "
             + (f"medians of {res['repeat']} runs" if res.get("repeat", 1) > 1 else "one run")
             + f"; {describe_memory(res.get('memory'))}"]
    for t in res["targets"]:
        dd = t["dd"]
        saves = t["save"]
        best_q = min((v["wall_sync"] for k, v in saves.items() if k.startswith("qemu mapped")),
                     default=float("nan"))
        lines.append(f"\n## save, {t['target']} ({t['dir']}); {data_mib} MiB of data, "
                     f"dd write direct {data_mib / dd['dd write direct']:.0f} MiB/s, "
                     f"fsync {data_mib / dd['dd write fsync']:.0f} MiB/s")
        lines.append("| method | wall s (durable) | MiB/s | vs dd direct "
                     "| vs best QEMU mapped-ram | QEMU CPU s | fixedram CPU s "
                     "| fixedram RSS MiB | apparent / allocated MiB |")
        lines.append("|---|---|---|---|---|---|---|---|---|")
        for k, v in saves.items():
            w = v["wall_sync"]
            lines.append(
                f"| {k} | {w:.2f} | {data_mib / w:.0f} | {dd['dd write direct'] / w:.2f}x "
                f"| {_ratio(best_q, w)} | {v['qemu_cpu']:.2f} | {v.get('fixedram_cpu', 0):.2f} "
                f"| {_rss(v)} | {v['apparent'] / MIB:.0f} / "
                f"{v['allocated'] / MIB:.0f} |")
        if t.get("ceilings"):
            lines.append(f"\n## what one Python endpoint can move, {t['target']} "
                         "(bench/ceilings.py: socket <-> file, the peer a second process; "
                         "next to dd)")
            lines.append("| path | MiB/s | vs dd |")
            lines.append("|---|---|---|")
            for k, v in t["ceilings"].items():
                ref = "dd read direct" if k.startswith("restore") else "dd write direct"
                vs = "" if k.startswith("socket") else f"{v * dd[ref] / data_mib:.2f}x"
                lines.append(f"| {k} | {v:.0f} | {vs} |")
            lines.append(f"| dd write direct / fsync | {data_mib / dd['dd write direct']:.0f} / "
                         f"{data_mib / dd['dd write fsync']:.0f} | 1.00x |")
            lines.append(f"| dd read direct / cold | {data_mib / dd['dd read direct']:.0f} / "
                         f"{data_mib / dd['dd read cold']:.0f} | 1.00x |")
        rest = t["restore"]
        best_l = min((v["wall"] for k, v in rest.items() if k.startswith("qemu load mapped")),
                     default=float("nan"))
        lines.append(f"\n## restore, {t['target']}; dd read direct "
                     f"{data_mib / dd['dd read direct']:.0f} MiB/s, cold "
                     f"{data_mib / dd['dd read cold']:.0f} MiB/s")
        lines.append("| method | wall s | MiB/s | vs dd read direct "
                     "| vs best QEMU mapped-ram load | QEMU CPU s | fixedram CPU s "
                     "| fixedram RSS MiB |")
        lines.append("|---|---|---|---|---|---|---|---|")
        for k, v in rest.items():
            w = v["wall"]
            lines.append(f"| {k} | {w:.2f} | {data_mib / w:.0f} | {dd['dd read direct'] / w:.2f}x "
                         f"| {_ratio(best_l, w)} | {v['qemu_cpu']:.2f} "
                         f"| {v.get('fixedram_cpu', 0):.2f} | {_rss(v)} |")
        lines += native_pairs(t)
    return "\n".join(lines)


def native_pairs(t: dict[str, Any]) -> list[str]:
    """Each native fixedram method against QEMU doing the same alone, and what fixedram adds
    (its wall time less QEMU's part: start-up, checks, fsync, rename; docs/qmp.md)."""
    rows = []
    for kind, pairs in NATIVE_PAIRS.items():
        key = "wall_sync" if kind == "save" else "wall"
        for ours_, theirs in pairs.items():
            for ours in (ours_, f"{ours_} (server)"):
                a, b = t[kind].get(ours), t[kind].get(theirs)
                if a is None or b is None:
                    continue
                own = (a[key] - a["qemu_part"] if a.get("qemu_part") is not None
                       else float("nan"))
                rows.append(f"| {ours} | {theirs} | {b[key]:.2f} | {a[key]:.2f} "
                            f"| {b[key] / a[key]:.2f}x | {own * 1000:.0f} |")
    if not rows:
        return []
    return [f"\n## native through fixedram vs QEMU alone, {t['target']}",
            "| fixedram | QEMU alone | QEMU s | fixedram s | ratio | fixedram's own ms |",
            "|---|---|---|---|---|---|", *rows]


def chart(res: dict[str, Any], data_mib: int, path: Path) -> None:
    """Throughput bars per method and target."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(14, 6))
    for ax, kind in zip(axes, ("save", "restore"), strict=True):
        for i, t in enumerate(res["targets"]):
            key = "wall_sync" if kind == "save" else "wall"
            names = list(t[kind])
            vals = [data_mib / t[kind][n][key] for n in names]
            ys = [j + i * 0.4 for j in range(len(names))]
            ax.barh(ys, vals, height=0.4, label=t["target"])
            ax.set_yticks([j + 0.2 for j in range(len(names))], names, fontsize=8)
        ax.set_xlabel("MiB/s of guest data (higher is better)")
        ax.set_title(f"{kind} ({data_mib} MiB of data, {res['machine']['qemu']})")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mem", default="2G")
    ap.add_argument("--data-mib", type=int, default=1536)
    ap.add_argument("--targets", default="disk,tmpfs", help="comma list of disk,tmpfs")
    ap.add_argument("--disk-dir", default="/var/tmp/fixedram-bench")
    ap.add_argument("--tmpfs-dir", default="/dev/shm/fixedram-bench")
    ap.add_argument("--keep", action="store_true", help="keep the images")
    ap.add_argument("--repeat", type=int, default=1, metavar="N",
                    help="run every method N times per target and report medians")
    ap.add_argument("--only", metavar="REGEX", help="run only the methods matching REGEX "
                    "(restores also save the image they load)")
    ap.add_argument("--layout", choices=("dense", "alternate"), default="dense",
                    help="the data as written (dense), or every other page of it (alternate)")
    add_memory_args(ap, 12.0)
    ap.add_argument("--server", action="store_true",
                    help="also run every fixedram method through a resident server "
                    "(fixedram serve)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = ap.parse_args()
    data_mib = args.data_mib // 2 if args.layout == "alternate" else args.data_mib
    compile_package()
    qemu = find_qemu("10")
    accel = choose_accel(qemu)
    kernel = build_guest()
    res: dict[str, Any] = {
        "command": " ".join(["python -m bench.run", *sys.argv[1:]]),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": {"cores": os.cpu_count(), "kernel": platform.release(),
                    "qemu": qemu.version_str, "accel": accel,
                    "disk": subprocess.run(["df", "-T", "/"], capture_output=True,
                                           text=True).stdout.splitlines()[-1]},
        "mem": args.mem, "data_mib": data_mib, "layout": args.layout, "repeat": args.repeat,
        "targets": [],
    }
    dirs = {"disk": Path(args.disk_dir), "tmpfs": Path(args.tmpfs_dir)}
    server = ResidentServer() if args.server else None
    try:
        with memory_of(args) as memory:
            res["memory"] = memory
            print(f"bench: memory: {memory}", file=sys.stderr)
            for name in args.targets.split(","):
                runs = []
                for i in range(args.repeat):
                    print(f"bench: {name} ({i + 1}/{args.repeat}) ...", file=sys.stderr)
                    runs.append(bench_target(name, dirs[name], args, qemu, accel, kernel,
                                             server, i))
                    if not args.keep:
                        shutil.rmtree(dirs[name], ignore_errors=True)
                res["targets"].append(median_of(runs))
    finally:
        if server is not None:
            server.close()
    outdir = Path(args.out)
    outdir.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    (outdir / f"{stamp}.json").write_text(json.dumps(res, indent=2))
    text = table(res, data_mib)
    (outdir / f"{stamp}.md").write_text(text + "\n")
    try:
        chart(res, data_mib, outdir / f"{stamp}.png")
    except ImportError:
        print("bench: matplotlib missing, no chart (scripts/setup.sh --bench)", file=sys.stderr)
    print(text)
    print(f"\nbench: results in {outdir}/{stamp}.*  ({resource.getrusage(0).ru_maxrss // 1024}"
          " MiB peak RSS of the driver)", file=sys.stderr)


if __name__ == "__main__":
    main()
