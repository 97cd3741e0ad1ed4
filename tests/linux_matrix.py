"""Real-guest cases: the Linux test guest in the VM configurations people run.

A :class:`Config` describes one VM (QEMU version, machine type, vCPUs, RAM and its backend,
devices); :class:`Source` boots it once and saves it any number of ways (``fixedram save``
through proxy, native, proxy multifd; the source is resumed between saves), each save kept as
a :class:`Saved` image with the source's RAM digests and serial output at that moment;
:func:`run_op` restores a saved image into a fresh destination (``fixedram restore``,
``--lazy``, after ``fixedram convert``) and judges it:

* paused restores: the destination's RAM equals the source's (``pmemsave`` digests);
* every restore: the guest carries on (heartbeat numbers continue from the source's, with no
  reboot), its own checks pass (err=0, its data digest unchanged) for a few more beats.

Everything goes through the command line, as a user would run it, on a second QMP monitor.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fixedram.testing.guest.linux import LinuxGuest, linux_append
from fixedram.testing.vm import Guest, Heartbeat, find_qemu, parse_heartbeats, parse_mem_size

PY = str(Path(sys.executable).absolute())
HB_MS = 500
#: Heartbeats a restored guest must print (with its checks passing) to count as running on.
BEATS_AFTER = 3


@dataclass(frozen=True)
class Config:
    """One VM configuration of the matrix."""

    name: str
    qemu: str = "10"
    machine: str = "q35"
    smp: int = 1
    mem: str = "512M"
    defaults: bool = False
    devices: tuple[str, ...] = ()
    backend: str | None = None  # None, "memfd", "file", "hugetlb"
    data: int = 16  # MiB of known data
    mib: int = 16  # MiB the workload rewrites

    def extra_args(self, workdir: Path) -> list[str]:
        args = list(self.devices)
        size = parse_mem_size(self.mem)
        if self.backend is not None:
            obj = {
                "memfd": f"memory-backend-memfd,id=ram0,size={size},share=on",
                "file": (f"memory-backend-file,id=ram0,size={size},share=on,"
                         f"mem-path={workdir}/{{guest}}.ram"),
                "hugetlb": (f"memory-backend-memfd,id=ram0,size={size},share=on,hugetlb=on,"
                            "hugetlbsize=2M"),
            }[self.backend]
            args += ["-object", obj, "-machine", "memory-backend=ram0"]
        return args

    @property
    def huge_pages(self) -> int:
        """2 MiB pages one guest of this configuration needs."""
        return parse_mem_size(self.mem) >> 21 if self.backend == "hugetlb" else 0


@dataclass
class Saved:
    """An image saved from a :class:`Source`, and the source's state at that moment."""

    path: Path
    how: str
    digests: dict[int, str]
    serial: bytes
    report: dict[str, Any]

    @property
    def last(self) -> Heartbeat:
        return parse_heartbeats(self.serial)[-1]


def fixedram(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """Run the ``fixedram`` command line."""
    return subprocess.run([PY, "-m", "fixedram", *args], capture_output=True, text=True,
                          timeout=timeout, check=False)


@dataclass
class Source:
    """A booted source guest of one configuration and the images saved from it."""

    cfg: Config
    guest: Guest
    workdir: Path
    scratch: Path
    saved: dict[str, Saved] = field(default_factory=dict)

    @classmethod
    def boot(cls, cfg: Config, lx: LinuxGuest, workdir: Path, scratch: Path) -> Source:
        workdir.mkdir(parents=True, exist_ok=True)
        g = Guest(find_qemu(cfg.qemu), workdir, name="src", kernel=lx.kernel, initrd=lx.initrd,
                  append=linux_append(data=cfg.data, mib=cfg.mib, rate=4, hb=HB_MS),
                  mem=cfg.mem, machine=cfg.machine, smp=cfg.smp, defaults=cfg.defaults,
                  extra_args=cfg.extra_args(workdir), control=True, qmp_timeout=300)
        g.start()
        try:
            g.wait_heartbeat(gen_at_least=1, timeout=300)
        except BaseException:
            g.kill()
            raise
        return cls(cfg, g, workdir, scratch)

    def save(self, how: str) -> Saved:
        """``how``: ``proxy``, ``native`` or ``proxy-mf`` (2 channels). Cached per ``how``."""
        if how in self.saved:
            return self.saved[how]
        g = self.guest
        if g.status() != "running":
            g.cont()
        # a few beats after the previous save: the guest runs between saves
        g.wait_heartbeat(after=g.heartbeats()[-1].n + 1, timeout=120)
        path = self.workdir / f"{how}.img"
        via = "proxy" if how.startswith("proxy") else how
        args = ["save", "--qmp", str(g.control_path), "--via", via, "--live", "--json",
                "--no-progress", str(path)]
        if how.startswith("proxy"):  # one connection, or two channels (the default)
            args[1:1] = ["--channels", "2" if how == "proxy-mf" else "0"]
        r = fixedram(*args)
        if r.returncode != 0:
            raise AssertionError(f"fixedram save --via {how} failed: {r.stderr.strip()}")
        g.wait_status("postmigrate", "paused", timeout=60)
        saved = Saved(path, how, g.ram_digests(self.scratch), g.serial(), json.loads(r.stdout))
        self.saved[how] = saved
        return saved

    def close(self) -> None:
        self.guest.kill()
        for s in self.saved.values():
            s.path.unlink(missing_ok=True)


def judge_run(saved: Saved, dst: Guest) -> list[Heartbeat]:
    """The restored guest carries on: consecutive heartbeats from the source's, no restart,
    err=0 and the data digest the guest computed at boot, for :data:`BEATS_AFTER` beats."""
    last = saved.last
    dst.wait_heartbeat(n_at_least=last.n + BEATS_AFTER, timeout=180)
    beats = parse_heartbeats(saved.serial + dst.serial())
    ns = [b.n for b in beats]
    assert ns == list(range(ns[0], ns[0] + len(ns))), f"heartbeats not consecutive: {ns[-12:]}"
    assert all(b.err == 0 for b in beats), beats[-3:]
    digests = {b.data for b in beats}
    assert len(digests) == 1, f"the guest's data digest changed: {digests}"
    bad = [ln for ln in dst.serial().decode(errors="replace").splitlines()
           if ln.startswith("BAD ")]
    assert not bad, bad[:3]
    return beats


def same_ram(saved: Saved, dst: Guest, scratch: Path) -> None:
    """The paused destination's RAM equals the source's at the save."""
    got = dst.ram_digests(scratch)
    diff = [hex(a) for a in saved.digests if got.get(a) != saved.digests[a]]
    assert not diff, f"guest RAM differs in the 256 MiB chunks at {diff}"


def destination(src: Source, qemu: str, name: str) -> Guest:
    # a new VM gets a new RAM file: one an earlier destination left holds that guest's RAM
    # (docs/fresh-destination.md), and restores are judged on fresh destinations here
    (src.guest.workdir / f"{name}.ram").unlink(missing_ok=True)
    dst = Guest.like(src.guest, name=name, qemu=find_qemu(qemu), incoming=True)
    dst.qmp_timeout = 300
    return dst.start()


def restore(saved: Saved, src: Source, how: str, *, qemu: str = "10", paused: bool = True,
            name: str = "dst", image: Path | str | None = None) -> tuple[Guest, dict[str, Any]]:
    """Start a destination and restore ``saved`` into it with ``fixedram restore``.

    ``how``: ``native``, ``proxy``, ``proxy-mf`` (2 channels) or ``lazy``. Returns the
    destination (paused if ``paused``) and fixedram's JSON report.
    """
    dst = destination(src, qemu, name)
    try:
        args = ["restore", "--qmp", str(dst.control_path), "--json", "--no-progress"]
        if how == "lazy":
            args.append("--lazy")
        else:
            args += ["--via", "proxy" if how.startswith("proxy") else how]
        if how.startswith("proxy"):  # one stream, or two channels (the default)
            args += ["--channels", "2" if how == "proxy-mf" else "0"]
        if paused:
            args.append("--paused")
        args.append(str(image or saved.path))
        r = fixedram(*args)
        if r.returncode != 0:
            raise AssertionError(f"fixedram restore ({how}) into QEMU {qemu} failed: "
                                 f"{r.stderr.strip()}\nQEMU said: {dst.last_error}")
        return dst, json.loads(r.stdout)
    except BaseException:
        dst.kill()
        raise


def check_restore(saved: Saved, src: Source, how: str, *, qemu: str = "10",
                  paused: bool = True, image: Path | str | None = None) -> None:
    """Restore and judge: RAM equal (paused), then the guest runs on."""
    dst, rep = restore(saved, src, how, qemu=qemu, paused=paused, image=image)
    with dst:
        if paused:
            assert dst.status() == "paused", dst.status()
            same_ram(saved, dst, src.scratch)
            dst.cont()
        judge_run(saved, dst)
        assert rep.get("status", "running") in ("running", "paused"), rep


def image_allocated(path: Path) -> int:
    """Bytes of disk the image uses."""
    return os.stat(path).st_blocks * 512


def iter_ops(cfg: Config) -> Iterator[str]:
    """The operations run on a configuration (test ids): ``<save>><restore>[@<qemu>]``.

    ``<save>``: ``proxy``, ``native``, ``proxy-mf`` (``fixedram save`` that way),
    ``convert`` (the proxy image converted to a legacy stream), ``reconvert`` (that stream
    converted back to mapped-ram). ``<restore>``: ``native``, ``proxy``, ``proxy-mf``,
    ``lazy`` (paused until complete), ``lazy-run`` (the guest runs at once), ``none`` (only
    the save). ``<qemu>``: the destination's QEMU (default 10).
    """
    if cfg.qemu == "7.2":  # no native mapped-ram in 7.2
        yield from ("proxy>proxy@7.2", "proxy>lazy@7.2", "proxy-mf>proxy-mf@7.2",
                    "proxy>native@10", "proxy>proxy@10", "proxy>lazy-run@10",
                    "native>none", "proxy>native@7.2")
        return
    if cfg.machine.endswith("7.2"):  # a 10 source with a 7.2 machine: into both
        yield from ("proxy>proxy@7.2", "proxy>lazy@7.2", "proxy>proxy-mf@7.2",
                    "native>proxy@7.2", "convert>proxy@7.2", "proxy>native@10")
        return
    yield from ("proxy>native", "proxy>proxy", "proxy>proxy-mf", "proxy>lazy",
                "proxy>lazy-run", "native>proxy", "proxy-mf>native", "convert>proxy",
                "reconvert>native")


def run_op(src: Source, op: str) -> None:
    """Run one operation of :func:`iter_ops` on ``src``."""
    save_how, _, rest = op.partition(">")
    how, _, qemu = rest.partition("@")
    qemu = qemu or "10"
    image = None
    if save_how in ("convert", "reconvert"):
        # the proxy image re-written as a legacy stream (and that back into mapped-ram)
        saved = src.save("proxy")
        image = src.workdir / "converted.stream"
        if not image.exists():
            r = fixedram("convert", "-q", "--to", "stream", str(saved.path), str(image))
            assert r.returncode == 0, r.stderr
        if save_how == "reconvert":
            stream, image = image, src.workdir / "reconverted.img"
            if not image.exists():
                r = fixedram("convert", "-q", str(stream), str(image))
                assert r.returncode == 0, r.stderr
    else:
        saved = src.save(save_how)
    if how == "lazy-run":
        check_restore(saved, src, "lazy", qemu=qemu, paused=False, image=image)
    else:
        check_restore(saved, src, how, qemu=qemu, paused=True, image=image)
