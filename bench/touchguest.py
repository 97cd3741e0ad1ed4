"""Lazy restores of the Linux test guest running its touch workload, for the benchmarks.

``bench.workingset`` (local images) and ``bench.s3fanout`` (object images) measure the same
thing, the time until a lazily restored guest has done real work, for different images:
both save the guest made here by :func:`touch_guest` (``fixedram save --via proxy``) and
run :func:`lazy_restores`, one or several at once. Right after a destination runs, the
touch command goes to its guest (it reads, and checks, ``touch`` MiB of its memory):
*workload* is the time from the start of that destination's ``fixedram restore`` until the
guest's ``TOUCH`` line appears on its serial console (polled every 5 ms), *heartbeat* until
its first heartbeat after the restore, *running* until QMP reports it running.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any

from bench.common import FIXEDRAM
from fixedram.testing.guest.linux import (
    COMMAND_PORT_ARGS,
    build_linux_guest,
    linux_append,
    parse_touches,
    send_touch,
)
from fixedram.testing.vm import Guest, QemuBinary

__all__ = ["touch_guest", "save", "lazy_restores"]

#: Seconds a destination may take from its restore's start to the workload's end.
WORKLOAD_TIMEOUT = 600


def touch_guest(qemu: QemuBinary, work: Path, mem: str, touch: int) -> Guest:
    """The source guest (not started): the Linux test guest, 8 MiB of stamped data, the
    touch workload reading ``touch`` MiB on command."""
    lx = build_linux_guest()
    return Guest(qemu, work, name="src", kernel=lx.kernel, initrd=lx.initrd, mem=mem,
                 append=linux_append(data=8, mib=4, rate=1, hb=500, touch=touch),
                 extra_args=COMMAND_PORT_ARGS, control=True, qmp_timeout=300)


def save(src: Guest, image: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    """``fixedram save --via proxy`` of the running ``src`` into ``image``; its report."""
    assert src.control_path is not None
    r = subprocess.run([*FIXEDRAM, "save", "--qmp", str(src.control_path), "--via", "proxy",
                        "--json", "--no-progress", image], env=env, capture_output=True,
                       text=True, check=False)
    if r.returncode:
        raise RuntimeError(f"save failed: {r.stderr.strip()}")
    return dict(json.loads(r.stdout))


def _failed(p: subprocess.Popen[bytes]) -> bool:
    """Whether ``p`` has ended unsuccessfully (looked at without reaping it)."""
    info = os.waitid(os.P_PID, p.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    return info is not None and (info.si_code != os.CLD_EXITED or info.si_status != 0)


def lazy_restores(src: Guest, image: str, n: int, extra: list[str], work: Path, last_hb: int,
                  env: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """``n`` lazy restores of ``image`` at once into fresh destinations like ``src``, each
    guest sent the touch command as soon as it runs. Returns, for each, fixedram's JSON
    report with ``seen_running``, ``time_to_workload``, ``time_to_heartbeat`` (seconds from
    its restore's start), ``guest_touch_ms`` and ``storage_read`` (bytes the kernel read
    from storage for it: ``ru_inblock``) added. Every guest must find its pages right and
    its heartbeat resume after ``last_hb``."""
    dsts = [Guest.like(src, name=f"d{i}", incoming=True) for i in range(n)]
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for d in dsts:
            d.start()
        t0 = []
        for i, d in enumerate(dsts):
            assert d.control_path is not None
            t0.append(time.monotonic())
            with open(work / f"r{i}.json", "wb") as f:
                procs.append(subprocess.Popen(
                    [*FIXEDRAM, "restore", "--lazy", "--qmp", str(d.control_path), "--json",
                     "--no-progress", *extra, image], env=env, stdout=f,
                    stderr=subprocess.PIPE))
        seen: list[dict[str, float]] = [{} for _ in dsts]
        while any("time_to_workload" not in s or "time_to_heartbeat" not in s for s in seen):
            for i, d in enumerate(dsts):
                s, now = seen[i], time.monotonic() - t0[i]
                if now > WORKLOAD_TIMEOUT:
                    raise RuntimeError(f"a workload did not resume within {WORKLOAD_TIMEOUT} s")
                if _failed(procs[i]):
                    err = procs[i].stderr.read().decode() if procs[i].stderr else ""
                    raise RuntimeError(f"fixedram restore failed: {err.strip()}")
                if "seen_running" not in s:
                    if d.status() != "running":
                        continue
                    s["seen_running"] = now
                    assert d.pid is not None
                    send_touch(d.pid, d.name)
                if "time_to_workload" not in s and parse_touches(d.serial()):
                    s["time_to_workload"] = now
                if "time_to_heartbeat" not in s and any(b.n > last_hb
                                                        for b in d.heartbeats()):
                    s["time_to_heartbeat"] = now
            time.sleep(0.005)
        out = []
        for i, p in enumerate(procs):
            _, status, ru = os.wait4(p.pid, 0)
            p.returncode = os.waitstatus_to_exitcode(status)
            err = p.stderr.read().decode() if p.stderr is not None else ""
            if p.returncode:
                raise RuntimeError(f"fixedram restore failed: {err.strip()}")
            touch = parse_touches(dsts[i].serial())[0]
            if touch.bad:
                raise RuntimeError(f"guest {i} found {touch.bad} wrong pages")
            rep = json.loads((work / f"r{i}.json").read_text())
            out.append({**rep, **seen[i], "guest_touch_ms": touch.ms,
                        "storage_read": ru.ru_inblock * 512})
        return out
    finally:
        for p in procs:
            if p.returncode is None:
                p.kill()
                p.wait()
        for d in dsts:
            d.kill()
