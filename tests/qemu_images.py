"""Migration images written by real QEMU at test time, with the source's memory dump.

Each image *kind* (see :data:`KINDS`) names one way QEMU saves a running bare test guest:
which QEMU, machine type, legacy stream or mapped-ram, transport, multifd, file offset, and
whether the guest keeps dirtying memory during the live save. :func:`make_image` boots the
source, waits until every workload page has been stamped, saves with QEMU's own ``migrate``,
then ``pmemsave``\\s all of ``pc.ram`` from the (now ``postmigrate``, i.e. paused) source and
records ``info ramblock``. The result is an :class:`ImageCase`.

The ``qemu_image`` fixture in ``conftest.py`` makes each kind once per session.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from fixedram.testing.guest import GuestStatus, read_status
from fixedram.testing.vm import (
    Guest,
    Heartbeat,
    QemuBinary,
    RamBlock,
    find_qemu,
    qemu_restore,
    qemu_save,
)

# Small guests keep the suite fast on 2 cores: 128 MiB of RAM, 32 MiB of it stamped.
MEM = "128M"
DIRTY_APPEND = "mib=32 rate=64 hb=100"  # keeps dirtying 64 MiB/s during the live save
IDLE_APPEND = "mib=32 rate=0 gens=2 hb=100"  # prefill + one checked pass, then only hlt


@dataclass(frozen=True)
class ImageSpec:
    """How to make one image."""

    qemu: str = "10"  # version prefix for find_qemu
    machine: str = "q35"
    mode: Literal["legacy", "mapped-ram"] = "legacy"
    transport: Literal["file", "exec"] | None = None  # None: file on 8.2+, exec before
    multifd_channels: int = 0
    offset: int = 0
    workload: Literal["dirty", "idle"] = "dirty"
    mem: str = MEM

    @property
    def append(self) -> str:
        return DIRTY_APPEND if self.workload == "dirty" else IDLE_APPEND


KINDS: dict[str, ImageSpec] = {
    # QEMU 10, legacy stream
    "legacy": ImageSpec(),
    "legacy-idle": ImageSpec(workload="idle"),
    "legacy-exec": ImageSpec(transport="exec"),
    "legacy-pc": ImageSpec(machine="pc"),
    # QEMU 10, mapped-ram
    "mapped-ram": ImageSpec(mode="mapped-ram"),
    "mapped-ram-idle": ImageSpec(mode="mapped-ram", workload="idle"),
    "mapped-ram-multifd2": ImageSpec(mode="mapped-ram", multifd_channels=2),
    "mapped-ram-offset": ImageSpec(mode="mapped-ram", offset=12345),
    "mapped-ram-pc": ImageSpec(mode="mapped-ram", machine="pc"),
    # QEMU 7.2 (no file: transport there, so exec:cat > f)
    "legacy-7.2": ImageSpec(qemu="7.2", machine="pc-i440fx-7.2"),
    "legacy-7.2-idle": ImageSpec(qemu="7.2", machine="pc-i440fx-7.2", workload="idle"),
}


@dataclass
class ImageCase:
    """A QEMU-written image plus everything needed to check or restore it.

    ``path`` holds the migration stream at byte ``offset``. ``mem_dump_path`` is the source's
    ``pmemsave`` of all of ``pc.ram`` (``mem_bytes`` bytes from physical 0), taken after the
    save while the source was paused, so it is exactly the RAM the image must restore.
    ``ramblocks`` is the source's ``info ramblock``. ``source`` is the (shut down) source
    :class:`Guest`: ``Guest.like(case.source, ...)`` or :meth:`restore` starts a destination
    with the identical command line.
    """

    kind: str
    path: Path
    mem_dump_path: Path
    ramblocks: list[RamBlock]
    machine: str
    qemu_version: str
    offset: int
    mem_bytes: int
    mode: Literal["legacy", "mapped-ram"]
    multifd_channels: int
    transport: Literal["file", "exec"]
    workload: str
    append: str
    qemu: QemuBinary
    source: Guest
    migrate_info: dict[str, Any] = field(default_factory=dict)
    source_status: str = ""
    guest_status: GuestStatus | None = None  # the guest's status block in the dump
    last_heartbeat: Heartbeat | None = None  # last complete HB line of the source

    def ramblock(self, name: str = "pc.ram") -> RamBlock:
        """The RAM block called ``name``."""
        for b in self.ramblocks:
            if b.name == name:
                return b
        raise KeyError(name)

    def restore(self, workdir: Path, name: str = "dst", **kw: Any) -> Guest:
        """Load this image into a fresh QEMU (same version and argv); returned paused."""
        return qemu_restore(
            self.source,
            self.path,
            self.mode,
            self.multifd_channels,
            self.offset,
            transport=self.transport,
            name=name,
            workdir=workdir,
            **kw,
        )


def make_image(
    kind: str | ImageSpec,
    workdir: Path,
    dump_dir: Path,
    *,
    accel: str | None = None,
) -> ImageCase:
    """Boot a source, save it with QEMU into ``workdir``, dump its RAM into ``dump_dir``."""
    spec = KINDS[kind] if isinstance(kind, str) else kind
    name = kind if isinstance(kind, str) else "custom"
    qemu = find_qemu(spec.qemu)
    workdir.mkdir(parents=True, exist_ok=True)
    dump_dir.mkdir(parents=True, exist_ok=True)
    img = workdir / f"{name}.img"
    if spec.offset:
        # QEMU keeps the bytes before the offset: fill them so a reader cannot rely on zeros.
        img.write_bytes(b"M" * spec.offset)
    src = Guest(
        qemu,
        workdir,
        name=f"{name}-src",
        append=spec.append,
        mem=spec.mem,
        machine=spec.machine,
        accel=accel,
    )
    with src:
        # gen >= 1: every page was stamped once; idle guests must also finish their last pass.
        src.wait_heartbeat(gen_at_least=2 if spec.workload == "idle" else 1)
        info = qemu_save(
            src,
            img,
            spec.mode,
            spec.multifd_channels,
            spec.offset,
            live=True,
            transport=spec.transport,
        )
        status = src.status()
        dump = src.pmemsave(dump_dir / f"{name}.mem")
        blocks = src.ramblocks()
        transport: Literal["file", "exec"] = spec.transport or (
            "file" if qemu.version >= (8, 2, 0) else "exec"
        )
    beats = src.heartbeats()
    with open(dump, "rb") as f:
        f.seek(0x3FF000)
        gstatus = read_status(f.read(4096), base=0x3FF000)
    return ImageCase(
        kind=name,
        path=img,
        mem_dump_path=dump,
        ramblocks=blocks,
        machine=spec.machine,
        qemu_version=qemu.version_str,
        offset=spec.offset,
        mem_bytes=src.mem_bytes,
        mode=spec.mode,
        multifd_channels=spec.multifd_channels,
        transport=transport,
        workload=spec.workload,
        append=spec.append,
        qemu=qemu,
        source=src,
        migrate_info=info,
        source_status=status,
        guest_status=gstatus,
        last_heartbeat=beats[-1] if beats else None,
    )
