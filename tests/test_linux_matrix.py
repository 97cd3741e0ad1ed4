"""The Linux guest through every path in the VM configurations people run (``-m matrix``).

Each configuration boots one Linux guest (QEMU 10, or 7.2 where the row says so) and saves
it through proxy, native and proxy multifd as the operations need; each operation restores
one of those images (native, proxy, proxy multifd, lazy paused, lazy running, after a
``convert`` to a legacy stream, into QEMU 10 or 7.2) and judges it by the guest's RAM
(paused restores) and by what the guest says afterwards (:mod:`linux_matrix`). Where
fixedram refuses a case, the test checks that the refusal is a one-line error given before
anything irreversible: the destination still waits for its incoming migration, and a full
restore into that same destination then works.

    .venv/bin/pytest -m matrix tests/test_linux_matrix.py      # 10-15 min on 2 cores (TCG)
"""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from linux_matrix import (
    Config,
    Source,
    destination,
    fixedram,
    image_allocated,
    iter_ops,
    judge_run,
    run_op,
    same_ram,
)

from fixedram.testing.guest.linux import LinuxGuest
from fixedram.testing.vm import parse_mem_size

pytestmark = [pytest.mark.matrix, pytest.mark.qemu, pytest.mark.timeout(900)]

_NET = ("-netdev", "user,id=n0", "-device", "virtio-net-pci,netdev=n0")
CONFIGS = [
    Config("defaults", defaults=True),
    Config("virtio-net", devices=_NET),
    Config("virtio-blk", devices=("-drive", "file={disk},format=raw,if=none,id=d0",
                                  "-device", "virtio-blk-pci,drive=d0")),
    Config("virtio-rng", devices=("-device", "virtio-rng-pci")),
    Config("virtio-balloon", devices=("-device", "virtio-balloon-pci")),
    Config("usb", devices=("-device", "qemu-xhci,id=xhci", "-device", "usb-tablet,bus=xhci.0")),
    Config("smp2", smp=2, defaults=True),
    Config("smp4", smp=4, defaults=True),
    Config("ram-6G", mem="6G", data=32, mib=32),
    Config("memfd", backend="memfd"),
    Config("file", backend="file"),
    Config("hugetlb", backend="hugetlb"),
    Config("pc", machine="pc", defaults=True),
    Config("q35-7.2-on-10", machine="pc-q35-7.2", defaults=True),
    Config("pc-7.2-on-10", machine="pc-i440fx-7.2", defaults=True),
    Config("q35-7.2-on-7.2", qemu="7.2", machine="pc-q35-7.2", defaults=True),
    Config("pc-7.2-on-7.2", qemu="7.2", machine="pc-i440fx-7.2", defaults=True),
]

#: (configuration, operation) -> what fixedram's one-line refusal says.
REFUSED = {
    # fixedram: its postcopy source sends 4 KiB pages (docs/section-ids.md)
    ("hugetlb", "proxy>lazy"): "huge pages",
    ("hugetlb", "proxy>lazy-run"): "huge pages",
    # QEMU: userfaultfd cannot catch faults on a file of an ordinary filesystem
    ("file", "proxy>lazy"): "Host backend files need to be TMPFS or HUGETLBFS only",
    ("file", "proxy>lazy-run"): "Host backend files need to be TMPFS or HUGETLBFS only",
    # QEMU 7.2 has no mapped-ram
    ("q35-7.2-on-7.2", "native>none"): "needs QEMU >= 9.0",
    ("q35-7.2-on-7.2", "proxy>native@7.2"): "needs QEMU >= 9.0",
    ("pc-7.2-on-7.2", "native>none"): "needs QEMU >= 9.0",
    ("pc-7.2-on-7.2", "proxy>native@7.2"): "needs QEMU >= 9.0",
}

CASES = [pytest.param(c, op, id=f"{c.name}:{op}") for c in CONFIGS for op in iter_ops(c)]


def _disk(cfg: Config, workdir: Path) -> Config:
    """Replace ``{disk}`` in the devices by a 64 MiB raw disk in ``workdir``."""
    if not any("{disk}" in a for a in cfg.devices):
        return cfg
    disk = workdir / "disk.raw"
    with open(disk, "wb") as f:
        f.truncate(64 << 20)
    devs = tuple(a.replace("{disk}", str(disk)) for a in cfg.devices)
    return Config(**{**cfg.__dict__, "devices": devs})


@contextlib.contextmanager
def _huge_pages(n: int) -> Iterator[None]:
    """At least ``n`` free 2 MiB huge pages while the block runs (reserved as root where
    the host has too few; the count is put back afterwards). Fails, never skips."""
    if n == 0:
        yield
        return
    knob = Path("/proc/sys/vm/nr_hugepages")
    before = int(knob.read_text())

    def free() -> int:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("HugePages_Free:"):
                return int(line.split()[1])
        return 0

    if free() < n:
        try:
            knob.write_text(str(before + n - free()))
        except OSError as e:
            pytest.fail(f"hugetlb case not run: {free()} free 2 MiB pages, {n} needed, and "
                        f"they cannot be reserved ({e}); not a pass")
    if free() < n:
        knob.write_text(str(before))
        pytest.fail(f"hugetlb case not run: only {free()} of {n} 2 MiB pages could be "
                    "reserved; not a pass")
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            knob.write_text(str(before))


@pytest.fixture(scope="module")
def sources(linux_guest: LinuxGuest, tmp_path_factory: pytest.TempPathFactory,
            shm_dir: Path) -> Iterator[Callable[[Config], Source]]:
    """``sources(cfg)``: the booted source of ``cfg``; booting the next configuration shuts
    the previous one down (one configuration at a time, cases run in order)."""
    current: dict[str, Source] = {}
    stack = contextlib.ExitStack()

    def get(cfg: Config) -> Source:
        if cfg.name not in current:
            for old in current.values():
                old.close()
            current.clear()
            stack.close()
            stack.enter_context(_huge_pages(cfg.huge_pages * 2 + 8))
            workdir = tmp_path_factory.mktemp(f"matrix-{cfg.name}")
            current[cfg.name] = Source.boot(_disk(cfg, workdir), linux_guest, workdir, shm_dir)
        return current[cfg.name]

    try:
        yield get
    finally:
        for s in current.values():
            s.close()
        stack.close()


def _one_line(r: subprocess.CompletedProcess[str], expect: str) -> None:
    assert r.returncode == 2, (r.returncode, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and expect in lines[0], r.stderr


def _refused(src: Source, op: str, expect: str) -> None:
    """fixedram refuses ``op`` with one line before anything happens. A refused save leaves
    the source running and no image; a refused restore leaves the destination waiting, and
    a full proxy restore into it then works."""
    save_how, _, rest = op.partition(">")
    how, _, qemu = rest.partition("@")
    if how == "none":  # the save itself is refused
        g = src.guest
        if g.status() != "running":
            g.cont()
        image = src.workdir / "refused.img"
        _one_line(fixedram("save", "--qmp", str(g.control_path), "--via", save_how,
                           "--no-progress", str(image)), expect)
        assert g.status() == "running" and not image.exists()
        return
    saved = src.save(save_how)
    dst = destination(src, qemu or "10", "dst")
    with dst:
        args = ["--lazy"] if how.startswith("lazy") else ["--via", how]
        _one_line(fixedram("restore", "--qmp", str(dst.control_path), *args, "--paused",
                           "--no-progress", str(saved.path)), expect)
        assert dst.status() == "inmigrate"
        assert dst.query_migrate().get("status") in (None, "none")
        r = fixedram("restore", "--qmp", str(dst.control_path), "--via", "proxy", "--paused",
                     "--no-progress", str(saved.path))
        assert r.returncode == 0, r.stderr
        same_ram(saved, dst, src.scratch)
        dst.cont()
        judge_run(saved, dst)


@pytest.mark.parametrize(("cfg", "op"), CASES)
def test_matrix(sources: Callable[[Config], Source], cfg: Config, op: str) -> None:
    src = sources(cfg)
    expect = REFUSED.get((cfg.name, op))
    if expect is not None:
        _refused(src, op, expect)
        return
    run_op(src, op)
    if parse_mem_size(cfg.mem) > 4 << 30:  # the image follows the data, not the RAM size
        for saved in src.saved.values():
            assert image_allocated(saved.path) < 1 << 30, (saved.how,
                                                           image_allocated(saved.path))
