"""QEMU-version and machine-type behaviour: one table, each row with its reason.

Some behaviour follows the QEMU binary, some the machine type (QEMU keeps old machine types
migration-compatible through ``hw_compat_*`` property lists), and fixedram often knows only the
machine type (from the stream's or the image's configuration section). A versioned machine
type ``…-X.Y`` implies a QEMU >= X.Y. :data:`TABLE` lists every rule; the functions below are
the decisions the endpoints and the orchestration take from it. ``docs/protocol.md`` §9 shows
the same rules against QEMU 7.2 and QEMU 10.

The module sits at the bottom of the package, next to :mod:`fixedram.errors`, and imports
nothing of fixedram at load time: the native save path uses it without loading the codec.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

__all__ = [
    "MAIN_THREAD_ZERO_PAGES",
    "MAPPED_RAM",
    "MAPPED_RAM_DIRECT_IO",
    "MULTIFD_FLUSH",
    "MULTIFD_ZERO_LIST",
    "SWITCHOVER_ACK",
    "SWITCHOVER_START",
    "TABLE",
    "Rule",
    "SyncMode",
    "ZeroMode",
    "choose_sync_mode",
    "choose_zero_mode",
    "machine_version",
    "wants_switchover_ack",
    "wants_switchover_start",
]

SyncMode = Literal["auto", "flush", "eos"]
ZeroMode = Literal["auto", "packet", "main"]


@dataclass(frozen=True)
class Rule:
    """One row: a behaviour that ``since`` the version ``(major, minor)`` of ``keyed_on`` (the
    QEMU binary, the machine type, or both) is on, and why fixedram follows it."""

    behaviour: str
    keyed_on: Literal["qemu", "machine", "qemu and machine"]
    since: tuple[int, int]
    reason: str

    @property
    def since_text(self) -> str:
        """``since`` as QEMU writes a version (``9.1``)."""
        return ".".join(map(str, self.since))


SWITCHOVER_ACK = Rule(
    "receive sends SWITCHOVER_ACK on the return path",
    "machine",
    (8, 1),
    "QEMU 8.1+ needs it when capability switchover-ack is on and ignores it otherwise; QEMU "
    "before 8.1 aborts the migration on this unknown message. A source running a machine type "
    "older than 8.1 may be such a QEMU, so it gets none; an unversioned machine type gets one.",
)
SWITCHOVER_START = Rule(
    "send and multifd send put SWITCHOVER_START before the END section",
    "machine",
    (10, 0),
    "QEMU 10 sends it for machine types >= 10.0 (property send-switchover-start, off for 9.2 "
    "and older through hw_compat_9_2); QEMU 7.2 rejects it. For an unversioned machine type, "
    "the stream carries it iff the image's source sent it.",
)
MULTIFD_FLUSH = Rule(
    "multifd channels sync at MULTIFD_FLUSH records (else at every RAM EOS)",
    "qemu and machine",
    (8, 1),
    "QEMU < 8.1 knows only EOS syncs; QEMU >= 8.1 uses MULTIFD_FLUSH unless the machine type "
    "is 8.0 or older (property multifd-flush-after-each-section, set by hw_compat_8_0). A "
    "versioned machine type >= 8.1 implies a QEMU >= 8.1.",
)
MULTIFD_ZERO_LIST = Rule(
    "multifd zero pages travel in the packets' zero list (else as ZERO records on the main "
    "connection)",
    "qemu",
    (9, 0),
    "zero-page-detection multifd is QEMU's default since 9.0 and QEMU 7.2 ignores the list. "
    "Without the destination's version, a versioned machine type >= 9.0 proves QEMU >= 9.0; "
    "anything else gets ZERO records, which every QEMU loads.",
)
MAIN_THREAD_ZERO_PAGES = Rule(
    "a proxy save over multifd channels has QEMU find zero pages in its migration thread "
    "(ZERO records on the main connection), not in the channels' zero lists",
    "qemu",
    (9, 0),
    "parameter zero-page-detection exists from QEMU 9.0 (default multifd); QEMU before 9.0 "
    "finds zero pages in its migration thread whatever the channels. A zero list costs "
    "fixedram a packet per 128 zero pages, where ZERO records are decoded a buffer at a "
    "time: measured, saves of large mostly empty guests took longer over channels than over "
    "one connection with zero lists, and about as long with ZERO records (docs/multifd.md "
    "§7).",
)
MAPPED_RAM = Rule(
    "save and restore can let QEMU read and write the mapped-ram image itself (--via native)",
    "qemu",
    (9, 0),
    "capability mapped-ram (and migration to file:) exists from QEMU 9.0; before, fixedram "
    "speaks the stream (--via proxy).",
)
MAPPED_RAM_DIRECT_IO = Rule(
    "a native save can write the image with O_DIRECT",
    "qemu",
    (9, 1),
    "parameter direct-io of mapped-ram migrations exists from QEMU 9.1.",
)

#: Every version- and machine-type-dependent rule fixedram follows.
TABLE: tuple[Rule, ...] = (
    SWITCHOVER_ACK,
    SWITCHOVER_START,
    MULTIFD_FLUSH,
    MULTIFD_ZERO_LIST,
    MAIN_THREAD_ZERO_PAGES,
    MAPPED_RAM,
    MAPPED_RAM_DIRECT_IO,
)

_MACHINE_VERSION = re.compile(r"-(\d+)\.(\d+)$")


def machine_version(machine: str) -> tuple[int, int] | None:
    """``(major, minor)`` of a versioned machine type (``pc-q35-10.0``), else None
    (``microvm``, ``q35``)."""
    m = _MACHINE_VERSION.search(machine)
    return (int(m[1]), int(m[2])) if m else None


def wants_switchover_ack(machine: str) -> bool:
    """Whether to send SWITCHOVER_ACK when the source opens the return path
    (:data:`SWITCHOVER_ACK`)."""
    mv = machine_version(machine)
    return mv is None or mv >= SWITCHOVER_ACK.since


def wants_switchover_start(machine: str, image_commands: Sequence[str] = ()) -> bool:
    """Whether a stream for ``machine`` carries SWITCHOVER_START (:data:`SWITCHOVER_START`);
    ``image_commands`` are the COMMAND names found in the image, which decide for an
    unversioned machine type."""
    from fixedram.stream.format import Command

    mv = machine_version(machine)
    if mv is not None:
        return mv >= SWITCHOVER_START.since
    return Command.SWITCHOVER_START.name in image_commands


def choose_sync_mode(
    machine: str, dest_version: tuple[int, int, int] | None = None, sync: SyncMode = "auto"
) -> Literal["flush", "eos"]:
    """Where the destination syncs its channels: at MULTIFD_FLUSH records or at every EOS
    (:data:`MULTIFD_FLUSH`); ``sync`` other than ``"auto"`` forces it."""
    if sync != "auto":
        if sync not in ("flush", "eos"):
            raise ValueError(f"unknown sync mode {sync!r}")
        return sync
    if dest_version is not None and dest_version[:2] < MULTIFD_FLUSH.since:
        return "eos"
    mv = machine_version(machine)
    if mv is not None and mv < MULTIFD_FLUSH.since:
        return "eos"
    return "flush"


def choose_zero_mode(
    machine: str, dest_version: tuple[int, int, int] | None = None, zero: ZeroMode = "auto"
) -> Literal["packet", "main"]:
    """How zero pages travel: in the packets' zero list or on the main channel
    (:data:`MULTIFD_ZERO_LIST`); ``zero`` other than ``"auto"`` forces it."""
    if zero != "auto":
        if zero not in ("packet", "main"):
            raise ValueError(f"unknown zero-page mode {zero!r}")
        return zero
    if dest_version is not None:
        return "packet" if dest_version[:2] >= MULTIFD_ZERO_LIST.since else "main"
    mv = machine_version(machine)
    return "packet" if mv is not None and mv >= MULTIFD_ZERO_LIST.since else "main"
