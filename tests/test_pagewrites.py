"""The destination's run coalescer and write queue (fixedram.endpoint.pagewrites), alone."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from types import SimpleNamespace
from typing import Any, cast

import pytest

from fixedram.endpoint.pagewrites import MAX_RUN, RunCoalescer, WriteOp, WriteQueue
from fixedram.image.layout import PAGE_SIZE
from fixedram.image.writer import Buffer, MappedRamWriter


def page(i: int) -> bytes:
    return bytes([i % 251 + 1]) * PAGE_SIZE


def test_consecutive_pages_and_zeros_become_runs() -> None:
    runs = RunCoalescer()
    for i in range(3):
        runs.page("pc.ram", 10 + i, page(i))
    assert runs.pending_pages == 3
    runs.zeros("pc.ram", 13, 2)  # another kind: the page run ends
    assert runs.pending_pages == 0
    runs.zeros("pc.ram", 15, 1)
    runs.zeros("pc.ram", 17, 1)  # a gap
    runs.page("vga.vram", 18, page(9))
    runs.page("pc.ram", 19, page(8))  # another block
    ops = runs.take()
    assert [(b, f, len(bufs), z, s) for b, f, bufs, z, s, _ in ops] == [
        ("pc.ram", 10, 3, 0, 0),
        ("pc.ram", 13, 0, 3, 0),
        ("pc.ram", 17, 0, 1, 0),
        ("vga.vram", 18, 1, 0, 0),
        ("pc.ram", 19, 1, 0, 0),
    ]
    assert ops[0][2] == [page(0), page(1), page(2)]
    assert runs.take() == [] and runs.pending_pages == 0


def test_page_runs_split_at_max_run_and_decoder_runs_stand_alone() -> None:
    runs = RunCoalescer()
    for i in range(MAX_RUN + 5):
        runs.page("pc.ram", i, page(i))
    assert runs.pending_pages == 5
    data = memoryview(bytes(3 * (PAGE_SIZE + 8)))
    runs.run("pc.ram", 1000, data, PAGE_SIZE + 8)
    runs.page("pc.ram", 1003, page(1))
    ops = runs.take()
    assert [(f, len(bufs), s) for _, f, bufs, _, s, _ in ops] == [
        (0, MAX_RUN, 0),
        (MAX_RUN, 5, 0),
        (1000, 1, PAGE_SIZE + 8),
        (1003, 1, 0),
    ]
    assert ops[2][2][0] is data


class _Sink:
    """Records the writes it is given (page bytes copied: the O_DIRECT stage is reused)."""

    def __init__(self, fail: bool = False) -> None:
        self.calls: list[tuple[str, str, int, Any]] = []
        self.threads: set[str] = set()
        self.fail = fail
        self.gate = threading.Event()
        self.gate.set()

    def _note(self, *call: Any) -> None:
        self.gate.wait(10)
        self.threads.add(threading.current_thread().name)
        if self.fail:
            raise OSError(28, "No space left on device")
        self.calls.append(call)

    def write_pages(self, block: str, first_page: int, bufs: Sequence[Buffer]) -> int:
        data = b"".join(bytes(b) for b in bufs)
        self._note("pages", block, first_page, data)
        return len(data) // PAGE_SIZE

    def write_page_views(self, block: str, first_page: int, pages: list[memoryview]) -> int:
        self._note("pages", block, first_page, b"".join(bytes(p) for p in pages))
        return len(pages)

    def zero_pages(self, block: str, first_page: int, npages: int = 1) -> int:
        self._note("zeros", block, first_page, npages)
        return npages

    def write_page_set(self, block: str, pages: Any, views: Sequence[memoryview]) -> int:
        self._note("page set", block, pages.tolist(), [bytes(v) for v in views])
        return len(views)


def _queue(sink: _Sink, fd: int, direct: bool) -> WriteQueue:
    writer = SimpleNamespace(blocks={})  # no layout: no writeback range to hand over
    return WriteQueue(cast(MappedRamWriter, sink), cast(MappedRamWriter, writer), fd, direct=direct)


def _ops(views: bool = False) -> list[WriteOp]:
    """A run of pages, zero pages, a decoder's page run (``views``: with its one-page views)."""
    stride = PAGE_SIZE + 8
    strided = memoryview(bytearray(3 * stride - 8))
    for k in range(3):
        strided[k * stride : k * stride + PAGE_SIZE] = page(40 + k)
    big = b"".join(page(i) for i in range(MAX_RUN + 3))  # more than one stage of pages
    one = [strided[k * stride : k * stride + PAGE_SIZE] for k in range(3)] if views else None
    return [
        ("pc.ram", 0, [big], 0, 0, None),
        ("pc.ram", 500, [], 7, 0, None),
        ("pc.ram", 600, [strided], 0, stride, one),
    ]


@pytest.mark.parametrize("views", [False, True])
@pytest.mark.parametrize("direct", [False, True])
def test_queue_writes_in_order(direct: bool, views: bool, tmp_path: Any) -> None:
    sink = _Sink()
    q = _queue(sink, -1, direct)
    q.submit(_ops(views))
    q.wait(0)
    q.close()
    pages = [c for c in sink.calls if c[0] == "pages"]
    assert b"".join(c[3] for c in pages[:-1]) == b"".join(page(i) for i in range(MAX_RUN + 3))
    assert pages[-1] == ("pages", "pc.ram", 600, page(40) + page(41) + page(42))
    assert ("zeros", "pc.ram", 500, 7) in sink.calls
    assert [c[2] for c in sink.calls][-2:] == [500, 600]  # stream order
    if direct:  # through the stage, a stage at a time, in the writer thread
        assert len(pages) == 3 and sink.threads == {"fixedram-write_0"}
    else:  # as given, inline
        assert len(pages) == 2 and sink.threads == {threading.current_thread().name}


@pytest.mark.parametrize("direct", [False, True])
def test_queue_page_sets(direct: bool) -> None:
    """Scattered pages (a decoder's PageSet) go to the sink as sets: as given when
    buffered; with O_DIRECT copied through the aligned stage a stage's worth at a time (one
    set per stage, not a write per run), each page with its own data."""
    import numpy as np

    pages = np.arange(0, 2 * (MAX_RUN + 5), 2, dtype=np.int64)  # every other page
    views = [memoryview(page(int(p))) for p in pages]
    sink = _Sink()
    q = _queue(sink, -1, direct)
    q.submit([("pc.ram", pages, views)])
    q.wait(0)
    q.close()
    sets = [c for c in sink.calls if c[0] == "page set"]
    assert [p for c in sets for p in c[2]] == pages.tolist()
    assert [d for c in sets for d in c[3]] == [page(int(p)) for p in pages]
    assert len(sets) == (2 if direct else 1) and len(sink.calls) == len(sets)


def test_one_inflight_entry_per_feed_and_errors_surface_at_wait() -> None:
    sink = _Sink()
    sink.gate.clear()  # the writer thread blocks in its first write
    q = _queue(sink, -1, True)
    q.submit(_ops())
    q.submit([])  # a feed without pages still counts
    q.wait(2)  # nothing to wait for
    assert not sink.calls
    sink.gate.set()
    q.wait(1)  # the first feed's batch is written
    assert len(sink.calls) == 4
    sink.fail = True
    q.submit([("pc.ram", 0, [], 1, 0, None)])
    with pytest.raises(OSError, match="No space"):
        q.wait(0)
    q.abort()
