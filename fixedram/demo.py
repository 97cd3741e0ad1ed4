"""``fixedram demo``: save a running VM live into a fixed-offset image and restore it.

The demo boots the bare test guest (:mod:`fixedram.testing.guest`) under QEMU 10 (TCG where KVM
cannot run it), lets it stamp a quarter of its RAM and keep re-dirtying it as fast as it can, and
then:

1. saves it live with QEMU's own *legacy* stream (``migrate file:`` without mapped-ram) at
   QEMU's default bandwidth, pausing the guest after a few seconds because such a save never
   converges, only to show how large the stream file of that save gets; then resumes it;
2. saves it live through fixedram the same way (``proxy``: QEMU migrates into fixedram over a
   socketpair, fixedram writes the mapped-ram image, where a re-sent page overwrites its old
   copy);
3. restores the image into a fresh QEMU (``proxy``: fixedram streams it in), and checks that
   guest RAM is byte-identical to the source's (``pmemsave`` of both), that the guest's own
   page checker finds nothing wrong and that its heartbeat continues (next number, ``err=0``)
   after every page has been re-checked by the guest.

:func:`run_demo` returns a JSON-ready report; ``ok`` is false when a check failed.

The demo needs the test support of :mod:`fixedram.testing` (the test guest and starting and
driving QEMU, :mod:`fixedram.testing.vm`): it is the one command that imports it, and only when
it runs.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from fixedram._lazy import numpy as np
from fixedram.errors import FixedramError

__all__ = ["format_report", "run_demo"]

_MIB = 1 << 20
#: Both live saves run at QEMU's default migration bandwidth and pause the guest after this
#: long, so the legacy stream shows how it grows with every re-sent page.
_BANDWIDTH = 128 * _MIB
_LIVE_SECONDS = 4.0
_COMPARE_FROM = 1 << 20  # below 1 MiB: BIOS shadow pages KVM may change without dirtying


def _dump_dir() -> str | None:
    d = "/dev/shm"
    return d if os.path.isdir(d) and os.access(d, os.W_OK) else None


def _diff_pages(a: Path, b: Path, start: int) -> list[int]:
    """Guest-physical addresses of the 4 KiB pages that differ from ``start`` on."""
    x = np.fromfile(a, dtype=np.uint8)
    y = np.fromfile(b, dtype=np.uint8)
    if x.size != y.size:
        return [-1]
    n = (x.size - start) // 4096
    xs = x[start : start + n * 4096].reshape(n, 4096)
    ys = y[start : start + n * 4096].reshape(n, 4096)
    bad = np.flatnonzero((xs != ys).any(axis=1))
    return [start + int(i) * 4096 for i in bad[:100]]


def run_demo(
    *,
    mem: str = "256M",
    keep: str | os.PathLike[str] | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Run the demo (see the module doc) and return its report.

    ``mem`` is the guest's RAM (``-m``); a quarter of it (at least 8 MiB) is the workload,
    re-dirtied as fast as the guest can. ``keep``: a directory that receives the image, the
    legacy file, the memory dumps and the QEMU logs (default: a temporary directory, removed
    afterwards). ``progress``: progress bars on stderr. Raises :class:`FixedramError` when something
    cannot run at all (no QEMU, a save that fails); failed checks only set ``ok`` false.
    """
    from fixedram.qmp.client import QMP
    from fixedram.qmp.progress import ProgressBar
    from fixedram.qmp.restore import restore
    from fixedram.qmp.save import save
    from fixedram.testing.guest import build_guest, check_pages, read_status
    from fixedram.testing.vm import Guest, choose_accel, find_qemu, parse_mem_size

    t_start = time.monotonic()
    mem_bytes = parse_mem_size(mem)
    work_mib = max(8, mem_bytes // _MIB // 4)
    if mem_bytes < 64 * _MIB:
        raise FixedramError(f"--mem {mem} is too small (at least 64M)")
    qemu = find_qemu("10")
    kernel = build_guest()
    accel = choose_accel(qemu)
    if keep is not None:
        workdir = Path(keep).absolute()
        workdir.mkdir(parents=True, exist_ok=True)
        dumps = workdir
    else:
        workdir = Path(tempfile.mkdtemp(prefix="fixedram-demo-"))
        dumps = Path(tempfile.mkdtemp(prefix="fixedram-demo-", dir=_dump_dir()))
    socks = Path(tempfile.mkdtemp(prefix="fr-", dir="/tmp"))  # short unix socket paths
    image = workdir / "vm.fixedram"
    legacy = workdir / "legacy.stream"
    report: dict[str, Any] = {
        "qemu": qemu.version_str,
        "accel": accel,
        "ram_size": mem_bytes,
        "workload_bytes": work_mib * _MIB,
        "image": str(image) if keep is not None else None,
    }
    checks: dict[str, bool] = {}

    def ctl(name: str) -> list[str]:
        return ["-qmp", f"unix:{socks / name}.qmp,server=on,wait=off"]

    src = Guest(qemu, workdir, name="src", append=f"mib={work_mib} rate=0 hb=100", mem=mem,
                accel=accel, kernel=kernel, extra_args=ctl("src-ctl"))
    dst: Guest | None = None
    try:
        with src:
            src.wait_heartbeat(gen_at_least=1)
            # 1. QEMU's legacy stream of the same live workload, for the size comparison.
            t = time.monotonic()
            src.migrate(f"file:{legacy}", max_bandwidth=_BANDWIDTH)
            info = src.wait_migration(120.0, stop_after=_LIVE_SECONDS)
            report["legacy_save_time"] = time.monotonic() - t
            report["legacy_size"] = legacy.stat().st_size
            report["legacy_transferred"] = int(info.get("ram", {}).get("transferred", 0))
            legacy.unlink()  # only its size matters
            src.cont()
            hb = src.wait_heartbeat(after=src.heartbeats()[-1].n)  # dirtying again
            # 2. fixedram's live save (proxy: QEMU migrates into fixedram).
            with QMP.connect(socks / "src-ctl.qmp") as q, \
                    ProgressBar("save", disable=not progress) as bar:
                sr = save(q, image, live=True, via="proxy", progress=bar,
                          stop_after=_LIVE_SECONDS, max_bandwidth=_BANDWIDTH)
            report["save"] = sr.as_dict()
            report["save_time"] = sr.total_time
            report["image_apparent_size"] = sr.image_apparent_size
            report["image_allocated_size"] = sr.image_allocated_size
            checks["source_paused"] = src.status() == "postmigrate"
            src_mem = src.pmemsave(dumps / "src.mem")
            beats = src.heartbeats()
            last = beats[-1] if beats else hb
        # 3. restore into a fresh QEMU with the same VM arguments
        dst = Guest.like(src, name="dst", incoming=True)
        dst.extra_args = tuple(ctl("dst-ctl"))
        t = time.monotonic()
        with dst:
            with QMP.connect(socks / "dst-ctl.qmp") as q, \
                    ProgressBar("restore", disable=not progress) as bar:
                rr = restore(q, image, via="proxy", paused=True, progress=bar)
            report["restore_time"] = time.monotonic() - t  # includes starting QEMU
            report["restore"] = rr.as_dict()
            dst_mem = dst.pmemsave(dumps / "dst.mem")
            diff = _diff_pages(src_mem, dst_mem, 0 if accel == "tcg" else _COMPARE_FROM)
            report["differing_pages"] = [hex(a) for a in diff]
            checks["ram_identical"] = not diff
            with open(dst_mem, "rb") as f:
                raw = f.read()
            status = read_status(raw)
            chk = check_pages(raw, status=status)
            report["host_bad_pages"] = chk["bad_pages"]
            checks["host_check"] = chk["bad_pages"] == 0
            dst.cont()
            gen0 = status["gen"]
            # every workload page re-checked by the guest after the restore
            end = dst.wait_heartbeat(gen_at_least=gen0 + 2, timeout=60.0)
            dbeats = dst.heartbeats()
            first = dbeats[0]
            report["heartbeat"] = {
                "source_last": last.n,
                "restored_first": first.n,
                "restored_last": end.n,
                "err": end.err,
                "gen_before": gen0,
                "gen_after": end.gen,
            }
            checks["heartbeat_continues"] = first.n == last.n + 1
            checks["guest_err_0"] = all(b.err == 0 for b in dbeats) and not dst.bad_lines()
    finally:
        src.kill()
        if dst is not None:
            dst.kill()
        shutil.rmtree(socks, ignore_errors=True)
        if keep is None:
            shutil.rmtree(workdir, ignore_errors=True)
            shutil.rmtree(dumps, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                (workdir / "legacy.stream").unlink()
    report["checks"] = checks
    report["ok"] = bool(checks) and all(checks.values())
    report["total_time"] = time.monotonic() - t_start
    return report


def format_report(r: dict[str, Any]) -> str:
    """The human-readable summary of :func:`run_demo`'s report."""

    def mib(n: float) -> str:
        return f"{n / _MIB:.1f} MiB"

    hb = r.get("heartbeat", {})
    failed = [k for k, v in r["checks"].items() if not v]
    verdict = "OK" if r["ok"] else "FAILED: " + ", ".join(failed)
    lines = [
        f"fixedram demo: QEMU {r['qemu']} ({r['accel']}), guest RAM {mib(r['ram_size'])}, "
        f"{mib(r['workload_bytes'])} re-dirtied nonstop; live saves at "
        f"{mib(_BANDWIDTH)}/s, guest paused after {_LIVE_SECONDS:.0f} s",
        f"  legacy stream file (QEMU, live):   {mib(r['legacy_size'])}"
        f" ({r['legacy_size'] / r['ram_size']:.1f}x RAM)  in {r['legacy_save_time']:.2f} s"
        " (not fsynced)",
        f"  fixedram image (live, proxy):      {mib(r['image_apparent_size'])} apparent, "
        f"{mib(r['image_allocated_size'])} allocated  in {r['save_time']:.2f} s (fsynced), "
        f"after {mib(r['save']['bytes_transferred'])} sent by QEMU",
        f"  restore into a fresh QEMU:         {r['restore_time']:.2f} s "
        f"(load {r['restore']['load_time']:.2f} s)",
        f"  RAM identical: {r['checks'].get('ram_identical')} "
        f"({len(r.get('differing_pages', []))} pages differ), guest pages bad: "
        f"{r.get('host_bad_pages')}",
        f"  heartbeat: source HB {hb.get('source_last')} -> restored HB "
        f"{hb.get('restored_first')} ... HB {hb.get('restored_last')} "
        f"(gen {hb.get('gen_before')} -> {hb.get('gen_after')}), err={hb.get('err')}",
        f"  {verdict} in {r['total_time']:.1f} s",
    ]
    if r.get("image"):
        lines.append(f"  image kept at {r['image']}")
    return "\n".join(lines)
