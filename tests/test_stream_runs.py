"""The decoder's run mode (``StreamDecoder(runs=True)``) against its per-record mode.

Run mode collapses stretches of CONTINUE page and zero records into ``PageRun`` and
``ZeroRun`` (scattered zero records into one ``ZeroPages``; with ``views``, interleaved
page and zero records into one ``PageSet``). Expanded back page by page, it must give
exactly the records of the per-record mode, for any chunking, on real QEMU streams and on
hostile ones (the same error at the same offset).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fixedram.errors import StreamError
from fixedram.stream import (
    Configuration,
    DeviceState,
    EndOfFile,
    EndOfSection,
    FileHeader,
    MemSize,
    Page,
    PageRun,
    PageSet,
    RamBlock,
    Record,
    SectionFooter,
    SectionPart,
    SectionStart,
    StreamDecoder,
    StreamEncoder,
    VMDescription,
    Zero,
    ZeroPages,
    ZeroRun,
)
from fixedram.stream.format import TARGET_PAGE_SIZE as PS

BLOCKS = [RamBlock("pc.ram", 64 * PS), RamBlock("/rom@etc/acpi/tables", 8 * PS)]


def _page(i: int) -> bytes:
    return (i + 0x5A000000).to_bytes(4, "big") * (PS // 4)


def _expand(records: list[Record]) -> list[Record]:
    """Runs back into single Page/Zero records (data copied: a run's view is reused)."""
    out: list[Record] = []
    for r in records:
        if isinstance(r, PageRun):
            step = r.stride or PS
            pages = [bytes(r.data[i * step : i * step + PS]) for i in range(r.npages)]
            if r.pages is not None:  # a views decoder's one-page views: the same pages
                assert [bytes(v) for v in r.pages] == pages
            out += [Page(r.block, r.offset + i * PS, pages[i], r.pos + i * (PS + 8))
                    for i in range(r.npages)]
        elif isinstance(r, ZeroRun):
            out += [Zero(r.block, r.offset + i * PS) for i in range(r.npages)]
        elif isinstance(r, ZeroPages):
            out += [Zero(r.block, int(off)) for off in r.offsets]
        elif isinstance(r, PageSet):
            data = iter(zip(r.pages, r.pos.tolist(), strict=True))
            for off, zero in zip(r.offsets.tolist(), r.zero.tolist(), strict=True):
                if zero:
                    out.append(Zero(r.block, off))
                else:
                    view, pos = next(data)
                    out.append(Page(r.block, off, bytes(view), pos))
        else:
            out.append(r)
    return out


def _decode(data: bytes, sizes: Callable[[], int], runs: bool,
            views: bool = False) -> tuple[list[Record], Any]:
    """All records (expanded when ``runs``) and the error that stopped decoding, if any."""
    dec = StreamDecoder(runs=runs, views=views)
    out: list[Record] = []
    p = 0
    try:
        while p < len(data):
            n = sizes()
            got = dec.feed(data[p : p + n])
            out += _expand(got) if runs else got
            p += n
        out += dec.feed_eof()
    except StreamError as e:
        return out, (type(e), str(e))
    return out, None


def _stream(ops: list[tuple[int, int, bool]]) -> bytes:
    """A stream whose one RAM part holds ``ops``: (block index, page, is_zero)."""
    enc = StreamEncoder()
    recs: list[Record] = [
        FileHeader(3), Configuration("pc-q35-10.0"), SectionStart(2, "ram", 0, 4),
        MemSize(sum(b.length for b in BLOCKS)), *BLOCKS, EndOfSection(), SectionFooter(2),
        SectionPart(2),
    ]
    for k, (bi, pg, zero) in enumerate(ops):
        blk = BLOCKS[bi]
        pg %= blk.length // PS
        recs.append(Zero(blk.name, pg * PS) if zero else Page(blk.name, pg * PS, _page(k)))
    recs += [EndOfSection(), SectionFooter(2), DeviceState(b""), EndOfFile(),
             VMDescription(b'{"page_size": 4096, "devices": []}')]
    return b"".join(enc.encode(r) for r in recs)


def _chunker(sizes: list[int]) -> Callable[[], int]:
    it = iter(range(1 << 62))
    return lambda: sizes[next(it) % len(sizes)]


ops_strategy = st.lists(
    st.one_of(
        # runs of consecutive pages (the common case; long enough for both ways of making
        # page views, StreamDecoder._page_slots) ...
        st.tuples(st.integers(0, 1), st.integers(0, 63), st.integers(1, 100), st.booleans()).map(
            lambda t: [(t[0], t[1] + i, t[3]) for i in range(t[2])]),
        # ... and scattered single records
        st.tuples(st.integers(0, 1), st.integers(0, 63), st.booleans()).map(lambda t: [t]),
    ),
    max_size=12,
).map(lambda xs: [o for x in xs for o in x])


@settings(max_examples=120, deadline=None)
@given(ops=ops_strategy, sizes=st.lists(st.integers(1, 70000), min_size=1, max_size=6))
def test_runs_equal_records(ops: list[tuple[int, int, bool]], sizes: list[int]) -> None:
    data = _stream(ops)
    want = _decode(data, _chunker(sizes), runs=False)
    assert want[1] is None
    assert _decode(data, _chunker(sizes), runs=True) == want
    assert _decode(data, _chunker(sizes), runs=True, views=True) == want
    # fed at once: stretches of more pages than a small feed holds (the arena's page views)
    assert _decode(data, _chunker([len(data)]), runs=True, views=True) == want


def test_runs_collapse_whole_stretches() -> None:
    """Fed at once, 40 consecutive CONTINUE pages become one run, 23 zeros one more."""
    ops = [(0, i, False) for i in range(41)] + [(0, i, True) for i in range(41, 64)]
    data = _stream(ops)
    dec = StreamDecoder(runs=True)
    recs = dec.feed(data) + dec.feed_eof()
    runs = [r for r in recs if isinstance(r, PageRun | ZeroRun)]
    assert [(type(r).__name__, r.offset // PS, r.npages) for r in runs] == [
        ("PageRun", 1, 40), ("ZeroRun", 41, 23)]
    assert _expand(recs) == _decode(data, _chunker([len(data)]), runs=False)[0]


def test_scattered_zeros_are_one_record() -> None:
    """Zero records of every other page (the others' data on multifd channels) come as one
    ``ZeroPages`` holding their offsets in stream order; four runs or fewer stay runs."""
    ops = [(0, i, True) for i in range(1, 64, 2)]
    data = _stream(ops)
    dec = StreamDecoder(runs=True)
    recs = dec.feed(data) + dec.feed_eof()
    sets = [r for r in recs if isinstance(r, ZeroPages)]
    assert len(sets) == 1 and sets[0].block == "pc.ram"
    # the first record names its block (not CONTINUE) and is decoded on its own
    assert [r.offset // PS for r in recs if isinstance(r, Zero | ZeroRun)] == [1]
    assert sets[0].offsets.tolist() == [i * PS for i in range(3, 64, 2)]
    assert _expand(recs) == _decode(data, _chunker([len(data)]), runs=False)[0]
    few = _stream([(0, i, True) for i in (1, 2, 5, 9, 10)])
    dec = StreamDecoder(runs=True)
    recs = dec.feed(few) + dec.feed_eof()
    assert [(r.offset // PS, r.npages) for r in recs if isinstance(r, ZeroRun)] == [
        (2, 1), (5, 1), (9, 2)]  # after page 1's record, which names the block


def test_interleaved_records_are_one_set() -> None:
    """Page and zero records of alternate pages come as one ``PageSet`` with ``views`` (a
    page given twice ends it before its second record); without views, as records."""
    ops = [(0, i, i % 2 == 1) for i in range(40)] + [(0, 7, False), (0, 40, True)]
    data = _stream(ops)
    dec = StreamDecoder(views=True)
    recs = dec.feed(data) + dec.feed_eof()
    sets = [r for r in recs if isinstance(r, PageSet)]
    assert len(sets) == 1
    # page 0's record names the block and goes alone; the set ends before page 7 again
    assert sets[0].offsets.tolist() == [i * PS for i in range(1, 40)]
    assert sets[0].zero.tolist() == [i % 2 == 1 for i in range(1, 40)]
    assert len(sets[0].pages) == 19
    assert _expand(recs) == _decode(data, _chunker([len(data)]), runs=False)[0]
    plain = StreamDecoder(runs=True)
    assert not [r for r in plain.feed(data) + plain.feed_eof() if isinstance(r, PageSet)]


@pytest.mark.parametrize("again", [False, True])
def test_scattered_pages_are_one_set(again: bool) -> None:
    """Page records of every other page (no zero records between) come as one ``PageSet``
    with ``views``; a stretch that gives a page twice stays runs (their order matters)."""
    ops = [(0, i, False) for i in range(0, 64, 2)] + ([(0, 10, False)] if again else [])
    data = _stream(ops)
    dec = StreamDecoder(views=True)
    recs = dec.feed(data) + dec.feed_eof()
    sets = [r for r in recs if isinstance(r, PageSet)]
    if again:
        assert not sets
    else:
        assert len(sets) == 1 and not sets[0].zero.any()
        assert sets[0].offsets.tolist() == [i * PS for i in range(2, 64, 2)]
    assert _expand(recs) == _decode(data, _chunker([len(data)]), runs=False)[0]


@pytest.mark.parametrize("where", ["offset", "flags", "fill", "truncated"])
def test_runs_hostile_same_error(where: str) -> None:
    """A bad record inside a stretch fails exactly as in per-record mode."""
    ops = [(0, i, False) for i in range(20)] + [(0, i, True) for i in range(20, 40)]
    data = bytearray(_stream(ops))
    first = data.index(_page(0))  # data of page 0; page 1's CONTINUE header follows
    rec = first + PS + 5 * (PS + 8)  # header of page 6
    zeros = first + PS + 19 * (PS + 8)  # header of the first zero record
    if where == "offset":
        data[rec : rec + 8] = (0x7777000 | 0x28).to_bytes(8, "big")
    elif where == "flags":
        data[rec : rec + 8] = (6 * PS | 0x28 | 0x40).to_bytes(8, "big")  # + XBZRLE
    elif where == "fill":
        data[zeros + 5 * 9 + 8] = 0xAA
    else:
        del data[rec + 100 :]
    for sizes in ([len(data)], [4096], [1, 70000]):
        want = _decode(bytes(data), _chunker(sizes), runs=False)
        assert _decode(bytes(data), _chunker(sizes), runs=True) == want
        assert _decode(bytes(data), _chunker(sizes), runs=True, views=True) == want
        if where != "fill":  # a fill byte is the consumer's business (it is decoded)
            assert want[1] is not None


@pytest.mark.parametrize("where", ["offset", "flags", "fill", "truncated", "again"])
def test_interleaved_hostile_same_error(where: str) -> None:
    """A bad record inside a stretch of interleaved page and zero records (and pages given
    again and again, which end every stretch early) decodes as in per-record mode."""
    if where == "again":  # page 0, zero page 1, page 0, zero page 1...
        ops = [(0, i % 2, i % 2 == 1) for i in range(400)]
    else:
        ops = [(0, i, i % 2 == 1) for i in range(60)]
    data = bytearray(_stream(ops))
    first = data.index(_page(0))  # data of page 0; page 1's zero record follows
    pair = 9 + 8 + PS  # a zero record and a page record
    rec = first + PS + 9 + 19 * pair  # header of page 40, well inside a stretch
    zero = first + PS + 25 * pair  # the zero record of page 51
    if where == "offset":
        data[rec : rec + 8] = (0x7777000 | 0x28).to_bytes(8, "big")
    elif where == "flags":
        data[rec : rec + 8] = (40 * PS | 0x28 | 0x40).to_bytes(8, "big")  # + XBZRLE
    elif where == "fill":
        data[zero + 8] = 0xAA
    elif where == "truncated":
        del data[rec + 100 :]
    for sizes in ([len(data)], [4096], [1, 70000]):
        want = _decode(bytes(data), _chunker(sizes), runs=False)
        assert _decode(bytes(data), _chunker(sizes), runs=True, views=True) == want
        assert (want[1] is None) == (where in ("fill", "again"))


@pytest.mark.parametrize("kind", ["legacy", "legacy-7.2"])
def test_runs_on_qemu_stream(qemu_image: Any, kind: str) -> None:
    """A real QEMU stream decodes to the same pages either way, mostly through runs."""
    case = qemu_image(kind)
    data = case.path.read_bytes()
    step = _chunker([1 << 20, 65536, 4103, 1 << 20])
    want, err = _decode(data, step, runs=False)
    assert err is None
    dec = StreamDecoder(runs=True)
    got: list[Record] = []
    run_pages = 0
    p = 0
    while p < len(data):
        n = step()
        recs = dec.feed(data[p : p + n])
        run_pages += sum(r.npages for r in recs
                         if isinstance(r, PageRun | ZeroRun | ZeroPages | PageSet))
        got += _expand(recs)
        p += n
    got += dec.feed_eof()
    assert got == want
    pages = sum(isinstance(r, Page | Zero) for r in want)
    assert run_pages > 0.9 * pages, (run_pages, pages)


def test_run_data_lives_through_the_next_feed() -> None:
    """A run's data stays intact through the next feed (the documented lifetime)."""
    ops = [(0, i, False) for i in range(60)]
    data = _stream(ops)
    dec = StreamDecoder(runs=True)
    cut = len(data) // 3
    first = [r for r in dec.feed(data[:cut]) if isinstance(r, PageRun)]
    snapshot = [bytes(r.data) for r in first]
    second = [r for r in dec.feed(data[cut : 2 * cut]) if isinstance(r, PageRun)]
    assert first and second
    assert [bytes(r.data) for r in first] == snapshot
    for r in first + second:
        assert all(bytes(r.data[i * PS : (i + 1) * PS]) == _page(r.offset // PS + i)
                   for i in range(r.npages))
