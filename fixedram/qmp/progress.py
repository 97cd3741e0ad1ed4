"""Progress bars (tqdm, on stderr) for saves and restores driven over QMP.

The library functions in :mod:`fixedram.qmp.save` and :mod:`fixedram.qmp.restore` call a
``progress`` callback with a :class:`Progress` snapshot; :class:`ProgressBar` is such a
callback that draws one tqdm line.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, TextIO

from fixedram.units import format_size

__all__ = ["Progress", "ProgressBar", "from_query_migrate", "from_send_stats"]


@dataclass
class Progress:
    """One progress sample. Byte counts are of guest RAM; rates per second."""

    phase: str  # "save" or "restore"
    status: str  # QEMU's migration status ("active", "device", "completed", ...)
    done_bytes: int
    total_bytes: int | None = None  # best estimate of the final done_bytes
    pages: int = 0  # normal pages transferred (or written) so far
    mbps: float | None = None  # QEMU's throughput figure, megabits/s
    remaining_bytes: int | None = None
    dirty_pages_rate: int | None = None  # pages/s re-dirtied by a running guest
    sync_pass: int | None = None  # dirty-bitmap sync count: the pass over RAM


def from_query_migrate(info: dict[str, Any], phase: str = "save") -> Progress:
    """A :class:`Progress` from a source's ``query-migrate`` answer."""
    ram = info.get("ram") or {}
    done = int(ram.get("transferred", 0))
    remaining = ram.get("remaining")
    total = done + int(remaining) if remaining is not None else ram.get("total")
    return Progress(
        phase=phase,
        status=str(info.get("status", "")),
        done_bytes=done,
        total_bytes=int(total) if total is not None else None,
        pages=int(ram.get("normal", 0)),
        mbps=float(ram["mbps"]) if "mbps" in ram else None,
        remaining_bytes=int(remaining) if remaining is not None else None,
        dirty_pages_rate=int(ram["dirty-pages-rate"]) if "dirty-pages-rate" in ram else None,
        sync_pass=int(ram["dirty-sync-count"]) if "dirty-sync-count" in ram else None,
    )


def from_send_stats(s: Any, *, phase: str, status: str, pages: int) -> Progress:
    """A :class:`Progress` from the statistics of fixedram's own sender (``bytes_sent``,
    ``pages_done``, ``pages_total``, ``elapsed``: a full restore's or a lazy restore's);
    ``pages``: the pages to show as transferred."""
    # imported here: a native save imports this module before ``migrate``, and the stream
    # codec only while QEMU writes (docs/qmp.md, start-up); a sender has loaded it already
    from fixedram.stream.format import TARGET_PAGE_SIZE

    mbps = s.bytes_sent * 8 / s.elapsed / 1e6 if s.elapsed > 0 else None
    return Progress(
        phase=phase, status=status, done_bytes=s.pages_done * TARGET_PAGE_SIZE,
        total_bytes=s.pages_total * TARGET_PAGE_SIZE, pages=pages, mbps=mbps,
        remaining_bytes=(s.pages_total - s.pages_done) * TARGET_PAGE_SIZE,
    )


class ProgressBar:
    """A tqdm bar (bytes, pages, MB/s, remaining, dirty rate, pass) fed by :class:`Progress`.

    Use as the ``progress`` callback, and :meth:`close` (or ``with``) when done. A disabled
    bar draws nothing and does not even import tqdm (a command's start-up time).
    """

    def __init__(self, desc: str, *, file: TextIO | None = None, disable: bool = False) -> None:
        self._bar: Any = None
        if disable:
            return
        from tqdm import tqdm

        self._bar = tqdm(
            desc=desc,
            total=None,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            file=file or sys.stderr,
            dynamic_ncols=True,
            leave=True,
            mininterval=0.1,
        )

    def __call__(self, p: Progress) -> None:
        bar = self._bar
        if bar is None:
            return
        if p.total_bytes is not None and p.total_bytes >= p.done_bytes:
            bar.total = p.total_bytes
        bar.n = p.done_bytes
        post: dict[str, str] = {"pages": str(p.pages)}
        if p.remaining_bytes is not None:
            post["left"] = format_size(p.remaining_bytes, sep="", largest="TiB")
        if p.mbps is not None:
            post["MB/s"] = f"{p.mbps / 8:.0f}"
        if p.dirty_pages_rate:
            dirty = format_size(p.dirty_pages_rate * 4096, sep="", largest="TiB")
            post["dirty"] = f"{dirty}/s"
        if p.sync_pass is not None:
            post["pass"] = str(p.sync_pass)
        bar.set_postfix(post, refresh=False)
        bar.refresh()

    def close(self) -> None:
        """Finish the line."""
        if self._bar is not None:
            self._bar.close()

    def __enter__(self) -> ProgressBar:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
