"""Guests far larger than their data: memory and time follow the data, not the RAM size.

A bare test guest holding a few MiB in a 64 GiB guest (default run), or 256 MiB in 256 GiB
and 1 TiB guests (``pytest -m scale``), its RAM a ``memory-backend-ram`` with
``reserve=off`` so the host only provides the pages the guest touches. Saved by QEMU
(mapped-ram and legacy stream) and checksummed by ``fixedram verify --add``; restored with
``fixedram restore --via proxy`` (single stream and multifd) into a fresh destination, which
must run on with every page it checks intact. Every fixedram process's peak RSS must stay
under :data:`RSS_LIMIT_MIB` (a resource bound; time is measured in ``bench/``, not here),
also for ``verify``, ``analyze`` and ``extract``.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from fixedram.image import open_image
from fixedram.testing.vm import Guest, Heartbeat, choose_accel, find_qemu

REPO = Path(__file__).resolve().parent.parent
PY = sys.executable
RSS_LIMIT_MIB = 100

SIZES = [
    pytest.param(("64G", 8), id="64G"),
    pytest.param(("256G", 256), id="256G", marks=pytest.mark.scale),
    pytest.param(("1T", 256), id="1T", marks=pytest.mark.scale),
]


@dataclass
class Big:
    """A saved big guest: its images and how to start a destination like it."""

    mem: str
    src: Guest
    mapped: Path  # QEMU's mapped-ram save
    legacy: Path  # QEMU's legacy stream
    ours: Path  # the mapped-ram save with fixedram's checksums added
    last: Heartbeat
    workdir: Path


def _guest_args(mem: str) -> tuple[str, ...]:
    args = ("-object", f"memory-backend-ram,id=m0,size={mem},reserve=off",
            "-machine", "memory-backend=m0")
    if mem.endswith("T"):  # more than TCG's default 40 physical address bits reach
        args += ("-cpu", "qemu64,phys-bits=44")
    return args


#: Forks fixedram from a small process and writes its peak RSS (KiB) to $RSS_OUT: a child
#: forked straight from pytest would inherit the test process's RSS in its peak (the high
#: water mark survives exec).
_LAUNCH = """
import os, sys
pid = os.fork()
if pid == 0:
    os.execv(sys.executable, [sys.executable, "-m", "fixedram", *sys.argv[1:]])
_, status, ru = os.wait4(pid, 0)
with open(os.environ["RSS_OUT"], "w") as f:
    f.write(str(ru.ru_maxrss))
sys.exit(os.waitstatus_to_exitcode(status))
"""


def _fixedram(*args: str) -> tuple[subprocess.CompletedProcess[str], float]:
    """Run a fixedram command; returns the result and its peak RSS in MiB."""
    with tempfile.TemporaryDirectory() as d:
        rss_out = Path(d) / "rss"
        res = subprocess.run([PY, "-c", _LAUNCH, *args], cwd=REPO, text=True,
                             capture_output=True, check=False,
                             env={**os.environ, "RSS_OUT": str(rss_out)})
        rss = int(rss_out.read_text()) / 1024
    return res, rss


@pytest.fixture(scope="module", params=SIZES)
def big(request: pytest.FixtureRequest, shm_dir: Path) -> Iterator[Big]:
    mem, mib = request.param
    qemu = find_qemu("10")
    work = Path(tempfile.mkdtemp(prefix=f"frscale-{mem}-", dir="/tmp"))
    imgs = Path(tempfile.mkdtemp(prefix=f"scale-{mem}-", dir=shm_dir))
    src = Guest(qemu, work, name="src", mem=mem, accel=choose_accel(qemu),
                append=f"mib={mib} rate=0 gens=1 hb=100", extra_args=_guest_args(mem))
    try:
        with src:
            src.wait_heartbeat(gen_at_least=1, timeout=300)
            src.stop()
            mapped, legacy = imgs / "mapped.img", imgs / "legacy.img"
            src.set_migration(caps={"mapped-ram": True})
            src.migrate(f"file:{mapped}")
            src.wait_migration(600)
            src.cont()
            src.stop()
            src.set_migration(caps={"mapped-ram": False})
            src.migrate(f"file:{legacy}")
            src.wait_migration(600)
            beats = src.heartbeats()
        ours = imgs / "ours.img"
        subprocess.run(["cp", "--sparse=always", str(mapped), str(ours)], check=True)
        r, _ = _fixedram("verify", "--add", str(ours))
        assert r.returncode == 0, r.stderr
        yield Big(mem, src, mapped, legacy, ours, beats[-1], work)
    finally:
        shutil.rmtree(imgs, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)


def _runs_on(dst: Guest, last: Heartbeat) -> None:
    """After ``cont`` the heartbeat carries on and the guest's own page checks pass."""
    dst.cont()
    hb = dst.wait_heartbeat(n_at_least=last.n + 3, timeout=120)
    assert hb.gen >= last.gen
    beats = dst.heartbeats()
    assert beats and all(b.err == 0 for b in beats), beats[-3:]
    assert not dst.bad_lines()


@pytest.mark.qemu
@pytest.mark.parametrize(("image", "how"), [
    ("ours", ("--channels", "0")), ("ours", ()), ("mapped", ("--channels", "0")),
    ("mapped", ()), ("legacy", ()),
])
def test_proxy_restore_bounded(big: Big, tmp_path: Path, image: str,
                               how: tuple[str, ...]) -> None:
    """A proxy restore of a big, nearly empty guest: peak RSS bounded, guest runs on, and
    the pages without data were not sent (the destination is fresh)."""
    path = getattr(big, image)
    sock = Path(tempfile.mkdtemp(prefix="frs-", dir="/tmp"))
    try:
        dst = Guest.like(big.src, name="dst", workdir=tmp_path)
        dst.extra_args = (*dst.extra_args, "-qmp", f"unix:{sock}/d.qmp,server=on,wait=off")
        with dst:
            r, rss = _fixedram("restore", "--qmp", str(sock / "d.qmp"), "--via", "proxy",
                               *how, "--paused", "--no-progress", "--json", str(path))
            assert r.returncode == 0, r.stderr
            rep = json.loads(r.stdout)
            assert rep["via"] == "proxy"
            # the stream carried the data pages, not a record per page of RAM
            assert rep["bytes_sent"] < rep["bytes"] + (64 << 20), rep
            assert rss <= RSS_LIMIT_MIB, f"fixedram restore peak RSS {rss:.0f} MiB"
            _runs_on(dst, big.last)
    finally:
        shutil.rmtree(sock, ignore_errors=True)


@pytest.mark.qemu
def test_read_commands_bounded(big: Big, tmp_path: Path) -> None:
    """verify, analyze and extract of a big image: peak RSS bounded."""
    r, rss = _fixedram("verify", str(big.ours))
    assert r.returncode == 0 and "extents match" in r.stdout + r.stderr, r
    assert rss <= RSS_LIMIT_MIB, f"verify peak RSS {rss:.0f} MiB"
    for img in (big.ours, big.legacy):
        r, rss = _fixedram("analyze", "--json", str(img))
        assert r.returncode == 0, r.stderr
        assert rss <= RSS_LIMIT_MIB, f"analyze peak RSS {rss:.0f} MiB"
    doc = json.loads(r.stdout)
    block = next(b for b in doc["blocks"] if b["name"] == "m0")
    out = tmp_path / "m0.raw"
    r, rss = _fixedram("extract", str(big.legacy), "--block", "m0", "-o", str(out))
    assert r.returncode == 0, r.stderr
    assert rss <= RSS_LIMIT_MIB, f"extract peak RSS {rss:.0f} MiB"
    assert out.stat().st_size == block["length"]
    with open_image(big.legacy) as img:  # spot-check the first run of pages
        first, n = next(img.runs("m0"))
        k = min(n, 64)
        with open(out, "rb") as f:
            f.seek(first * 4096)
            assert f.read(k * 4096) == bytes(img.read("m0", first, k))


def test_huge_claims_cost_nothing(tmp_path: Path) -> None:
    """A small sparse image whose block claims 4 TiB (and a page at its far end): reading
    commands answer with bounded memory, and a legacy stream claiming more pages than its
    file could describe is refused in one line."""
    from synth_images import write_mapped_image

    img = tmp_path / "huge.img"
    last = (4 << 40) // 4096 - 1
    write_mapped_image(img, {"pc.ram": 4 << 40}, {"pc.ram": {0: b"\x01" * 4096,
                                                            last: b"\x02" * 4096}})
    assert img.stat().st_blocks * 512 < 64 << 20
    r, rss = _fixedram("analyze", "--json", str(img))
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["blocks"][0]["pages_present"] == 2
    assert rss <= RSS_LIMIT_MIB, f"analyze peak RSS {rss:.0f} MiB"
    with open_image(img) as im:
        assert list(im.runs("pc.ram")) == [(0, 1), (last, 1)]
        assert bytes(im.read("pc.ram", last, 1)) == b"\x02" * 4096
    out = tmp_path / "stream"
    r, rss = _fixedram("convert", str(img), str(out), "--to", "stream")
    assert r.returncode == 0, r.stderr
    assert rss <= RSS_LIMIT_MIB, f"convert peak RSS {rss:.0f} MiB"
    assert out.stat().st_size < 1 << 20  # two pages, not a record per claimed page
    # a legacy stream claiming that block: refused before any per-page state exists
    r, rss = _fixedram("analyze", str(out))
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r
    assert "Traceback" not in r.stderr and "claim" in r.stderr
    assert rss <= RSS_LIMIT_MIB


@pytest.mark.qemu
def test_lazy_restore_bounded(big: Big, tmp_path: Path) -> None:
    """A lazy (postcopy) restore of a big, nearly empty guest: peak RSS bounded, guest runs
    on with its pages intact."""
    sock = Path(tempfile.mkdtemp(prefix="frs-", dir="/tmp"))
    try:
        dst = Guest.like(big.src, name="lazy", workdir=tmp_path)
        dst.extra_args = (*dst.extra_args, "-qmp", f"unix:{sock}/d.qmp,server=on,wait=off")
        with dst:
            r, rss = _fixedram("restore", "--qmp", str(sock / "d.qmp"), "--lazy",
                               "--no-progress", "--json", str(big.ours))
            assert r.returncode == 0, r.stderr
            assert rss <= RSS_LIMIT_MIB, f"lazy restore peak RSS {rss:.0f} MiB"
            _runs_on(dst, big.last)
    finally:
        shutil.rmtree(sock, ignore_errors=True)


def test_runs_in_pieces_equal_whole_bitmap(tmp_path: Path) -> None:
    """Walking a bitmap in bounded pieces gives the runs of the whole bitmap: runs across a
    piece boundary merge, sparse and dense words alike; present_range and count agree."""
    import numpy as np
    from synth_images import write_mapped_image

    from fixedram.image.layout import BITMAP_PIECE_PAGES as P
    from fixedram.image.layout import runs

    npages = 2 * P + 100
    pages = [0, 5, 63, 64, P - 2, P - 1, P, P + 1, P + 640, 2 * P + 99]
    pages += list(range(P + 1000, P + 1000 + 70000))  # dense stretch: whole words set
    img_path = tmp_path / "runs.img"
    write_mapped_image(img_path, {"pc.ram": npages * 4096},
                       {"pc.ram": {p: b"\x07" * 4096 for p in pages}})
    with open_image(img_path) as img:
        got = list(img.runs("pc.ram"))
        whole = np.zeros(npages, dtype=bool)
        whole[pages] = True
        assert got == list(runs(whole))
        assert (P - 2, 4) in got
        assert img.count_present("pc.ram") == len(set(pages))
        assert img.last_present("pc.ram") == 2 * P + 99
        assert np.array_equal(img.present_range("pc.ram", P - 3, 9), whole[P - 3 : P + 6])
        assert list(img.runs("pc.ram", P - 1, P + 2)) == [(P - 1, 3)]
        # small ranges come from cached blocks of the bitmap, large ones straight from it
        rng = np.random.default_rng(5)
        for _ in range(2000):
            a = int(rng.integers(0, npages))
            k = int(rng.integers(0, min(int(rng.choice([300, 70000])), npages - a) + 1))
            assert np.array_equal(img.present_range("pc.ram", a, k), whole[a : a + k]), (a, k)
        for a in (npages - 1, npages - 200, 0):
            assert np.array_equal(img.present_range("pc.ram", a, npages - a), whole[a:])


def test_bitmap_runs_match_per_page() -> None:
    """Runs found from a bitmap's edges, word-wise, are the runs of one bool per page: runs
    across word boundaries, whole words set, a last partial word with bits set beyond the
    range, sparse and dense bitmaps."""
    import itertools

    import numpy as np

    from fixedram.image.layout import bitmap_runs

    def plain(bits: np.ndarray) -> list[tuple[int, int]]:
        out, at = [], 0
        for value, group in itertools.groupby(bits.tolist()):
            n = len(list(group))
            if value:
                out.append((at, n))
            at += n
        return out

    rng = np.random.default_rng(11)
    for _ in range(3000):
        nwords = int(rng.integers(1, 40))
        if rng.random() < 0.3:  # whole words set or clear
            bits = np.repeat(rng.random(nwords) < 0.5, 64)
        else:
            bits = rng.random(nwords * 64) < rng.random() ** 3
        raw = np.packbits(bits, bitorder="little").tobytes() + bytes(8 * int(rng.integers(0, 2)))
        npages = int(rng.integers((nwords - 1) * 64 + 1, nwords * 64 + 1))
        assert list(bitmap_runs(raw, npages)) == plain(bits[:npages])


def test_page_index_matches_dense() -> None:
    """The sparse legacy-stream page index gives what a dense per-page array gives, for
    random overlapping runs of data and zeroing; chunks cleared whole are freed."""
    import numpy as np

    from fixedram.image.reader import INDEX_CHUNK, PageIndex

    rng = np.random.default_rng(7)
    n = 40 * INDEX_CHUNK + 17
    idx, dense = PageIndex(n), np.full(n, -1, dtype=np.int64)
    for _ in range(300):
        first = int(rng.integers(0, n))
        k = int(rng.integers(1, min(3 * INDEX_CHUNK, n - first) + 1))
        if rng.random() < 0.6:
            pos = int(rng.integers(0, 1 << 30))
            idx.put(first, k, pos, 4104)
            dense[first : first + k] = pos + 4104 * np.arange(k)
        else:
            idx.clear(first, k)
            dense[first : first + k] = -1
        a = int(rng.integers(0, n))
        b = int(rng.integers(a, n + 1))
        assert np.array_equal(idx.get(a, b - a), dense[a:b])
    assert np.array_equal(idx.get(0, n), dense)
    idx.clear(0, n)
    assert not idx.chunks and idx.nbytes == 0


def test_scattered_page_sets_match_dense() -> None:
    """The per-page-number forms of the sparse arrays (``get_at``, ``store_at``,
    ``reset_at``, ``set_at``, ``clear_at``) give what dense arrays give, for random
    scattered pages across chunks (some twice in a set, for the ones that allow it)."""
    import numpy as np

    from fixedram.image.sparse import SparseArray, SparseBits

    rng = np.random.default_rng(5)
    n = 3 * (1 << SparseBits.SHIFT) + 1000
    bits, dense_bits = SparseBits(n), np.zeros(n, dtype=bool)
    vals, dense_vals = SparseArray(n, 8, np.int64, -1), np.full(n, -1, dtype=np.int64)
    for _ in range(300):
        pages = np.unique(rng.integers(0, n, size=int(rng.integers(1, 600))))
        if rng.random() < 0.5:
            pages = pages[(pages - pages[0]) % 2 == 0]  # every other page, scattered
        v = rng.integers(0, 1 << 40, size=len(pages))
        r = rng.random()
        if r < 0.4:
            bits.set_at(pages)
            dense_bits[pages] = True
            vals.store_at(pages, v)
            dense_vals[pages] = v
        elif r < 0.8:
            twice = np.concatenate([pages, pages[: len(pages) // 3]])
            had = bits.clear_at(twice)
            assert np.array_equal(np.unique(had), pages[dense_bits[pages]])
            dense_bits[pages] = False
            vals.reset_at(twice, free=bool(rng.random() < 0.5))
            dense_vals[pages] = -1
        assert np.array_equal(vals.get_at(pages), dense_vals[pages])
    assert np.array_equal(bits.dense(), dense_bits)
    assert np.array_equal(vals.dense(), dense_vals)


def test_page_groups_match_pages() -> None:
    """``page_groups`` gives the pages of the runs, in order, in groups of the size asked
    (runs longer than what it expands at once included); ``gap_arrays`` gives every other
    page, each once and in order (a run in two parts, a piece without runs, a block ending
    in a gap, a block without runs)."""
    import numpy as np

    from fixedram.image.layout import gap_arrays, page_groups

    rng = np.random.default_rng(3)
    for size in (128, 256):
        starts, lengths, p = [], [], 0
        for _ in range(3000):
            p += int(rng.integers(1, 50))
            k = int(rng.choice([1, 2, 3, 100, 200_000], p=[0.3, 0.3, 0.2, 0.195, 0.005]))
            starts.append(p)
            lengths.append(k)
            p += k
        want = np.concatenate([np.arange(a, a + k) for a, k in zip(starts, lengths, strict=True)])
        pieces = [(np.array(starts[i : i + 700]), np.array(lengths[i : i + 700]))
                  for i in range(0, len(starts), 700)]
        got = list(page_groups(pieces, size))
        assert all(len(g) == size for g in got[:-1]) and 0 < len(got[-1]) <= size
        assert np.array_equal(np.concatenate(got), want)
        npages = p + 70_000
        # the runs again with one cut in two at a piece boundary, and an empty piece
        i = next(i for i in range(10, len(starts)) if lengths[i] > 1)
        cut = [(np.array([*starts[:i], starts[i]]), np.array([*lengths[:i], 1])),
               (np.array([], dtype=np.int64), np.array([], dtype=np.int64)),
               (np.array([starts[i] + 1, *starts[i + 1 :]]),
                np.array([lengths[i] - 1, *lengths[i + 1 :]]))]
        for runs in (pieces, cut):
            gaps = np.concatenate(list(page_groups(gap_arrays(runs, npages), size)))
            present = np.zeros(npages, dtype=bool)
            present[want] = True
            assert np.array_equal(gaps, np.flatnonzero(~present))
    assert list(page_groups([], 128)) == []
    assert [(a.tolist(), b.tolist()) for a, b in gap_arrays([], 5)] == [([0], [5])]


def test_chunks_with_data_match_runs() -> None:
    """The S3 upload's chunks with data (found with numpy from run arrays) are the chunks
    some run lies in, each once and in order: runs within a chunk, across many chunks, and
    cut in two where a bitmap piece ends."""
    import numpy as np

    from fixedram.image.chunked import _chunks_with_data

    class Runs:
        def __init__(self, runs: list[tuple[int, int]], piece: int) -> None:
            self.runs, self.piece = runs, piece

        def run_arrays(self, name: str) -> Any:
            cut: list[tuple[int, int]] = []
            for f, n in self.runs:  # as an image gives them: a piece of the bitmap at a time
                p = f
                while p < f + n:
                    end = min(f + n, (p // self.piece + 1) * self.piece)
                    cut.append((p, end - p))
                    p = end
            for _, g in itertools.groupby(cut, key=lambda r: r[0] // self.piece):
                a = np.array(list(g), dtype=np.int64)
                yield a[:, 0], a[:, 1]

    rng = np.random.default_rng(5)
    for _ in range(200):
        runs, p = [], int(rng.integers(0, 50))
        for _ in range(int(rng.integers(0, 40))):
            n = int(rng.choice([1, 2, 5, 300, 5000]))
            runs.append((p, n))
            p += n + int(rng.integers(1, 3000))
        cpages, piece = int(rng.choice([1, 3, 64, 1024])), int(rng.choice([64, 4096, 1 << 20]))
        want = sorted({c for f, n in runs for c in range(f // cpages, (f + n - 1) // cpages + 1)})
        assert list(_chunks_with_data(Runs(runs, piece), "pc.ram", cpages)) == want


def test_sparse_bits_and_digests_match_dense() -> None:
    """The receiver's sparse page bitmap and page digests give what dense per-page arrays
    give, for random overlapping writes and zeroing (extent digests included)."""
    import numpy as np

    from fixedram.image.checksum import PageDigests, extent_digests, page_digest_array
    from fixedram.image.sparse import SparseBits

    rng = np.random.default_rng(11)
    n = 3 * (1 << SparseBits.SHIFT) + 1000
    bits, dense_bits = SparseBits(n), np.zeros(n, dtype=bool)
    digs, dense_digs = PageDigests({"b": n * 4096}), page_digest_array(n)
    for _ in range(200):
        first = int(rng.integers(0, n))
        k = int(rng.integers(1, min(5000, n - first) + 1))
        if rng.random() < 0.6:
            d = rng.integers(0, 1 << 63, size=k, dtype=np.uint64)
            bits.set(first, k)
            dense_bits[first : first + k] = True
            digs.store("b", first, d)
            dense_digs[first : first + k] = d
        else:
            got = np.zeros(n, dtype=bool)
            for s, m in bits.clear_runs(first, k):
                got[s : s + m] = True
            assert np.array_equal(got[first : first + k], dense_bits[first : first + k])
            assert not got[:first].any() and not got[first + k :].any()
            dense_bits[first : first + k] = False
            digs.zero("b", first, k)
            dense_digs[first : first + k] = page_digest_array(k)
    assert np.array_equal(bits.dense(), dense_bits)
    assert bits.count() == int(dense_bits.sum())
    for shift in (20, 22):
        assert np.array_equal(digs.extent_digests("b", shift), extent_digests(dense_digs, shift))


def test_validate_of_converted_huge_claim_bounded(tmp_path: Path) -> None:
    """A small legacy stream whose block claims 1 TiB (one page at its top), converted to a
    sparse mapped-ram image: send's ``validate`` of that image allocates little (it used to
    build one bool per claimed page, 256 MiB, and more on the way)."""
    import tracemalloc

    from fixedram.endpoint.send import validate

    sys.path.insert(0, str(REPO / "fuzz"))
    try:
        import make_corpus
    finally:
        sys.path.remove(str(REPO / "fuzz"))
    src = tmp_path / "claim.stream"
    src.write_bytes(make_corpus.to_stream(make_corpus.claims()["claim-1t"]))
    dst = tmp_path / "claim.img"
    r = subprocess.run([PY, "-m", "fixedram", "convert", "-q", "--to", "mapped-ram", str(src),
                        str(dst)], cwd=REPO, text=True, capture_output=True, check=False)
    assert r.returncode == 0, r.stderr
    with open_image(dst) as img:
        assert list(img.runs("pc.ram")) == [((1 << 40) // 4096 - 1, 1)]
    tracemalloc.start()
    try:
        validate(dst)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 32 << 20, f"validate allocated {peak >> 20} MiB at its peak"
