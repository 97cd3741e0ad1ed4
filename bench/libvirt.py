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
* ``fixedram -> virsh``: ``fixedram save --libvirt`` and ``virsh restore`` of its image.

Usage (as root; libvirt from ``scripts/setup.sh --libvirt``)::

    .venv/bin/python -m bench.libvirt                          # 1 GiB guest, 512 MiB data, 3 rounds
    .venv/bin/python -m bench.libvirt --mem 256 --data 64 --repeat 1   # quick

Prints a table of medians and writes ``bench/results/libvirt-<stamp>.json``. Not run by the
tests.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from fixedram.testing.guest import build_guest
from fixedram.testing.libvirt import Libvirtd, domain_xml
from fixedram.testing.vm import parse_heartbeats

ROOT = Path(__file__).resolve().parent.parent
FIXEDRAM = [sys.executable, "-m", "fixedram"]
NAME = "frbench"

METHODS = {
    "virsh raw": ("virsh", [], "virsh"),
    "virsh sparse": ("virsh", ["--image-format", "sparse"], "virsh"),
    "fixedram native": ("fixedram", ["--via", "native"], "fixedram"),
    "fixedram proxy": ("fixedram", ["--via", "proxy"], "fixedram"),
    "fixedram -> virsh": ("fixedram", ["--via", "native"], "virsh"),
}


def _timed(argv: list[str]) -> float:
    t = time.monotonic()
    r = subprocess.run(argv, capture_output=True, text=True, check=False)
    if r.returncode:
        raise SystemExit(f"{' '.join(argv)}: {r.stderr.strip()}")
    return time.monotonic() - t


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
    ap.add_argument("--data", type=int, default=512, help="stamped data, MiB")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--dir", default="/var/tmp", help="where the images go")
    args = ap.parse_args()
    results: dict[str, list[dict[str, float]]] = {m: [] for m in METHODS}
    with tempfile.TemporaryDirectory(prefix="fr-lvbench-") as tmp, \
            tempfile.TemporaryDirectory(prefix="fr-lvbench-img-", dir=args.dir) as imgdir:
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
                for method, (saver, opts, restorer) in METHODS.items():
                    img = Path(imgdir) / f"{rnd}-{method.replace(' ', '_')}.sav"
                    if saver == "virsh":
                        t_save = _timed([*virsh, "save", NAME, str(img), *opts])
                    else:
                        t_save = _timed([*FIXEDRAM, "save", "--libvirt", NAME, "--connect",
                                         d.uri, *opts, str(img)])
                    st = img.stat()
                    if restorer == "virsh":
                        t_restore = _timed([*virsh, "restore", str(img)])
                    else:
                        t_restore = _timed([*FIXEDRAM, "restore", "--libvirt", "--connect",
                                            d.uri, str(img)])
                    results[method].append({"save": t_save, "restore": t_restore,
                                            "apparent": st.st_size,
                                            "allocated": st.st_blocks * 512})
                    img.unlink()
            d.virsh("destroy", NAME)
    print(f"guest {args.mem} MiB, {args.data} MiB stamped; medians of {args.repeat} "
          f"(wall s); images in {args.dir}")
    print("| method | save s | restore s | apparent MiB | allocated MiB |\n|---|---|---|---|---|")
    for m, rows in results.items():
        med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
        print(f"| {m} | {med['save']:.2f} | {med['restore']:.2f} | "
              f"{med['apparent'] / 2**20:.0f} | {med['allocated'] / 2**20:.0f} |")
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"libvirt-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps({"args": vars(args), "results": results}, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
