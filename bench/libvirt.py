"""``virsh save``/``virsh restore`` next to ``fixedram save --libvirt``/``restore --libvirt``,
on the same libvirt domain.

A private libvirtd (:class:`fixedram.testing.libvirt.Libvirtd`) runs one TCG domain with the
bare test guest, which stamps ``--data`` of its RAM and then idles. Each round saves the
running domain into a fresh image by one method and restores it by the matching one; the
domain runs again afterwards. Wall time of each command (fixedram's includes Python's
start-up), apparent and allocated size of the image. Methods:

* ``virsh raw`` / ``virsh sparse``: ``virsh save [--image-format sparse]`` and ``virsh
  restore``;
* ``fixedram native`` / ``fixedram proxy``: ``fixedram save --libvirt --via native|proxy``
  (a libvirt sparse image) and ``fixedram restore --libvirt``;
* ``fixedram -> virsh``: ``fixedram save --libvirt`` and ``virsh restore`` of its image;
* with ``--server``, each fixedram method again with its fixedram commands sent to a resident
  server (``fixedram serve``, started here on a private socket; docs/resident-server.md):
  rows ``... (server)``, without Python's start-up and imports.

Fairness: between a save and its restore, every image is fsynced (the time that takes is
the ``fsync`` column: what a save left to write before its image was durable, about nothing
for fixedram's saves, which fsync before they return, and for ``virsh save`` of a raw image,
but the whole image for a sparse one) and then dropped from the page cache
(``posix_fadvise(DONTNEED)``), so that every restore reads its image from the disk: a restore
normally comes long after its save, and fixedram's save drops its image from the cache
itself. fixedram's modules are byte-compiled first, as an installed package has them (with
``PYTHONDONTWRITEBYTECODE`` set, every run would compile them again). Each method runs
``--repeat`` times, the rounds interleaved; the table shows medians.

Usage (as root; libvirt and its Python binding from ``scripts/setup.sh --libvirt``)::

    .venv/bin/python -m bench.libvirt                          # 1 GiB guest, 256 MiB data, 5 rounds
    .venv/bin/python -m bench.libvirt --mem 256 --data 64 --repeat 1   # quick
    .venv/bin/python -m bench.libvirt --server                 # and through a resident server

Free page reporting is held off for the run and ``--warm-gib`` of free memory touched first
(``bench.common.steady_memory``; ``--keep-page-reporting`` leaves it on).

Prints the command and a markdown table of medians (as the README shows it) and writes
``bench/results/libvirt-<stamp>.json``. Not run by the tests.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

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
from fixedram.testing.libvirt import Libvirtd, domain_xml
from fixedram.testing.vm import parse_heartbeats

ROOT = Path(__file__).resolve().parent.parent
NAME = "frbench"

METHODS = {
    "virsh raw": ("virsh", [], "virsh"),
    "virsh sparse": ("virsh", ["--image-format", "sparse"], "virsh"),
    "fixedram native": ("fixedram", ["--via", "native"], "fixedram"),
    "fixedram proxy": ("fixedram", ["--via", "proxy"], "fixedram"),
    "fixedram -> virsh": ("fixedram", ["--via", "native"], "virsh"),
}


#: ``--server``: fixedram's commands of each fixedram method again, sent to a resident server
SERVED = " (server)"


def _timed(argv: list[str], env: dict[str, str] | None = None) -> float:
    t = time.monotonic()
    r = subprocess.run(argv, capture_output=True, text=True, check=False, env=env)
    if r.returncode:
        raise SystemExit(f"{' '.join(argv)}: {r.stderr.strip()}")
    return time.monotonic() - t


def _sync_and_drop(path: Path) -> float:
    """fsync ``path`` (seconds it took), then drop its pages from the page cache."""
    fd = os.open(path, os.O_RDONLY)
    try:
        t = time.monotonic()
        os.fsync(fd)
        took = time.monotonic() - t
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    return took


def _wait_idle(log: Path, gens: int, timeout: float = 300.0) -> int:
    """Until the guest reached generation ``gens`` (its data stamped); its last beat."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        hbs = parse_heartbeats(log.read_bytes())
        if hbs and hbs[-1].gen >= gens:
            return hbs[-1].n
        time.sleep(0.1)
    raise SystemExit("the guest did not finish stamping its data")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mem", type=int, default=1024, help="guest RAM, MiB")
    ap.add_argument("--data", type=int, default=256, help="stamped data, MiB")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--dir", default="/var/tmp", help="where the images go")
    ap.add_argument("--server", action="store_true", help="also every fixedram method through "
                    "a resident server (fixedram serve, started here on a private socket)")
    add_memory_args(ap, 8.0)
    args = ap.parse_args()
    compile_package()
    methods = dict(METHODS)
    if args.server:
        methods.update({m + SERVED: v for m, v in METHODS.items() if "fixedram" in v})
    results: dict[str, list[dict[str, float]]] = {m: [] for m in methods}
    with memory_of(args) as memory, \
            tempfile.TemporaryDirectory(prefix="fr-lvbench-") as tmp, \
            tempfile.TemporaryDirectory(prefix="fr-lvbench-img-", dir=args.dir) as imgdir, \
            contextlib.ExitStack() as stack:
        server = None
        if args.server:
            server = ResidentServer()
            stack.callback(server.close)
        work = Path(tmp)
        log = work / "serial.log"
        xml = work / "dom.xml"
        xml.write_text(domain_xml(NAME, build_guest(), log, mem_mib=args.mem,
                                  cmdline=f"mib={args.data} rate=0 hb=200 gens=1"))
        with Libvirtd(work / "libvirtd") as d:
            virsh = ["virsh", "-q", "-c", d.uri]
            d.virsh("create", str(xml))
            _wait_idle(log, 1)
            for rnd in range(args.repeat):
                for method, (saver, opts, restorer) in methods.items():
                    env = command_env(os.environ, server if method.endswith(SERVED) else None)
                    img = Path(imgdir) / f"{rnd}-{method.replace(' ', '_')}.sav"
                    if saver == "virsh":
                        t_save = _timed([*virsh, "save", NAME, str(img), *opts])
                    else:
                        t_save = _timed([*FIXEDRAM, "save", "--libvirt", NAME, "--connect",
                                         d.uri, *opts, str(img)], env)
                    st = img.stat()
                    t_sync = _sync_and_drop(img)
                    if restorer == "virsh":
                        t_restore = _timed([*virsh, "restore", str(img)])
                    else:
                        t_restore = _timed([*FIXEDRAM, "restore", "--libvirt", "--connect",
                                            d.uri, str(img)], env)
                    if d.virsh("domstate", NAME).strip() != "running":
                        raise SystemExit(f"{method}: the domain is not running after restore")
                    results[method].append({"save": t_save, "fsync": t_sync,
                                            "restore": t_restore,
                                            "apparent": st.st_size,
                                            "allocated": st.st_blocks * 512})
                    img.unlink()
            d.virsh("destroy", NAME)
    command = " ".join(["python -m bench.libvirt", *sys.argv[1:]])
    print(f"`{command}`: a {args.mem} MiB TCG guest "
          f"with {args.data} MiB of data, saved running; medians of {args.repeat} rounds, "
          "wall seconds of each command; every image fsynced and dropped from the page cache "
          f"before its restore; {describe_memory(memory)}\n")
    print("| method | save s | fsync after save s | restore s | image MiB (allocated) |\n"
          "|---|---|---|---|---|")
    for m, rows in results.items():
        med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
        print(f"| {m} | {med['save']:.2f} | {med['fsync']:.2f} | {med['restore']:.2f} | "
              f"{med['apparent'] / 2**20:.0f} ({med['allocated'] / 2**20:.0f}) |")
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"libvirt-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps({"args": vars(args), "memory": memory, "results": results},
                               indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
