"""Short fuzz runs for CI (issue 6, item 3): hypothesis property tests and a deterministic
mutation run over seeds derived from real QEMU 10 output, plus a short atheris run
(atheris is a dev dependency).

Properties (checked by ``fuzz/targets.py``): only :class:`~fixedram.errors.FixedramError`
escapes (through the CLI: exit 0 or 2 and one line), under 2 s per input, tracemalloc peak
bounded by the input's size (not by any length it claims), and no file left anywhere but
the expected output. The long run is ``python fuzz/run.py --runs 100000``
(docs/RELIABILITY.md).
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

FUZZ = Path(__file__).resolve().parent.parent / "fuzz"
sys.path.insert(0, str(FUZZ))

import make_corpus  # noqa: E402
from mutate import mutate  # noqa: E402
from targets import (  # noqa: E402
    forge_record,
    run_image,
    run_manifest,
    run_multifd,
    run_stream,
    run_workingset,
)

from fixedram.image import workingset as wsm  # noqa: E402


def fuzz_settings(n: int) -> settings:
    return settings(max_examples=n, deadline=None, derandomize=True, database=None,
                    suppress_health_check=list(HealthCheck))


@pytest.fixture(scope="module")
def synthetic_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("corpus-synthetic")
    make_corpus.make(out, qemu=False)
    return out


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory, qemu10: object, accel: str) -> Path:
    """Seeds shrunk from a real QEMU 10 legacy stream and mapped-ram file (plus synthetic)."""
    out = tmp_path_factory.mktemp("corpus")
    os.environ.setdefault("FIXEDRAM_ACCEL", accel)
    make_corpus.make(out, qemu=True)
    return out


def seeds(corpus: Path, kind: str) -> list[bytes]:
    return [p.read_bytes() for p in sorted((corpus / kind).iterdir())]


def test_seeds_are_valid(corpus: Path, tmp_path: Path) -> None:
    """Every image seed is accepted whole (so mutants start from deep inside the parsers)."""
    for data in seeds(corpus, "image"):
        assert run_image(data, tmp_path, heavy=True) == "ok"
    for data in seeds(corpus, "stream"):
        assert run_stream(data, tmp_path) > 0


# -- hypothesis: structure-blind bytes and mutated real seeds ---------------------------------


@fuzz_settings(1000)
@given(data=st.binary(max_size=2048), seed=st.integers(0, 1 << 16))
def test_stream_decoder_arbitrary_bytes(data: bytes, seed: int) -> None:
    run_stream(b"QEVM\x00\x00\x00\x03" + data, seed=seed, trace=False)
    run_multifd(data, seed=seed, trace=False)


@fuzz_settings(800)
@given(pick=st.integers(0, 1 << 30), rnd=st.randoms(use_true_random=False))
def test_stream_mutants(pick: int, rnd: random.Random, synthetic_corpus: Path,
                        tmp_path_factory: pytest.TempPathFactory) -> None:
    pool = seeds(synthetic_corpus, "stream")
    data = mutate(pool[pick % len(pool)], rnd, pool[(pick >> 8) % len(pool)])
    work = tmp_path_factory.mktemp("s", numbered=True) if pick % 10 == 0 else None
    run_stream(data, work, seed=pick, trace=pick % 4 == 0)


@fuzz_settings(300)
@given(pick=st.integers(0, 1 << 30), rnd=st.randoms(use_true_random=False))
def test_multifd_mutants(pick: int, rnd: random.Random, synthetic_corpus: Path) -> None:
    pool = seeds(synthetic_corpus, "multifd")
    run_multifd(mutate(pool[pick % len(pool)], rnd), seed=pick, trace=pick % 4 == 0)


@fuzz_settings(400)
@given(pick=st.integers(0, 1 << 30), rnd=st.randoms(use_true_random=False))
def test_image_mutants(pick: int, rnd: random.Random, synthetic_corpus: Path,
                       tmp_path_factory: pytest.TempPathFactory) -> None:
    pool = seeds(synthetic_corpus, "image")
    data = mutate(pool[pick % len(pool)], rnd, pool[(pick >> 8) % len(pool)])
    work = tmp_path_factory.mktemp("i", numbered=True)
    run_image(data, work, heavy=pick % 8 == 0, trace=pick % 2 == 0)


# -- the working-set record and the object-store manifest -------------------------------------


def _leb(*vals: int) -> bytes:
    out = bytearray()
    for v in vals:
        while v >= 0x80:
            out.append((v & 0x7F) | 0x80)
            v >>= 7
        out.append(v)
    return bytes(out)


def _runs_body(runs: list[tuple[int, int, int]], names: tuple[str, ...] = ("pc.ram",)) -> bytes:
    head = bytes([len(names)]) + b"".join(bytes([len(n)]) + n.encode() for n in names)
    return head + b"".join(_leb(*r) for r in runs)


_EDGES = [0, 1, 2, 0x7F, 0x80, (1 << 18), (1 << 18) + 1, (1 << 32) - 1, 1 << 32, (1 << 61) - 1,
          1 << 61, (1 << 62) - 1, 1 << 62, (1 << 62) + 5, (1 << 63) - 1, 1 << 63, (1 << 64) - 1,
          1 << 70]


@pytest.mark.parametrize("runs,npages", [
    ([(0, 0, 1 << 63)], 0),  # a length >= 2^63 (was an OverflowError)
    ([(0, 0, (1 << 62) + 5)] * 4, 20),  # lengths whose int64 sum wraps to npages (SIGSEGV)
    ([(0, 0, 1 << 61)] * 8 + [(0, 0, 5)], 5),  # the same wrap below the varint bound
    ([(0, (1 << 62) - 2, 1)], 1),  # a huge positive delta
    ([(0, 1 << 63, 1)], 1),  # a delta beyond any varint (was an OverflowError)
    ([(0, 3, 1)], 1),  # a negative first page
    ([(0, 0, 0)], 0),  # an empty run
    ([(1, 0, 1)], 1),  # a block index past the block list
    ([(0, 0, wsm.MAX_PAGES + 1)], wsm.MAX_PAGES + 1),  # more pages than a record keeps
    ([(0, 0, wsm.MAX_PAGES)] * 2, 2 * wsm.MAX_PAGES),
])
def test_workingset_hostile_runs_refused(runs: list[tuple[int, int, int]], npages: int) -> None:
    """Hostile run values in a record with valid digests: a WorkingSetError, never a crash
    (analyze, verify and a lazy restore all read records through ``decode``)."""
    body = _runs_body(runs)
    data = forge_record(body, npages, len(runs))
    for blocks in (None, {"pc.ram": 1 << 20}):
        with pytest.raises(wsm.WorkingSetError):
            wsm.decode(data, blocks=blocks)
    head = (npages & 0xFFFFFFFF).to_bytes(4, "big") + len(runs).to_bytes(4, "big")
    assert run_workingset(head + body) == "refused"


def test_workingset_hostile_varints_refused() -> None:
    body = _runs_body([]) + b"\xff" * 9 + b"\x01" + _leb(0, 1)  # a 10-byte varint
    with pytest.raises(wsm.WorkingSetError, match="varint"):
        wsm.decode(forge_record(body, 1, 1))
    body = _runs_body([]) + _leb(0, 0, 1 << 62)  # 9 bytes, but past the bound
    with pytest.raises(wsm.WorkingSetError, match="varint"):
        wsm.decode(forge_record(body, 1, 1))
    ok = forge_record(_runs_body([(0, 10, 3), (0, 2, 2)]), 5, 2)  # the shape still read
    assert wsm.decode(ok, blocks={"pc.ram": 20}).page.tolist() == [5, 6, 7, 9, 10]
    with pytest.raises(wsm.WorkingSetError, match="outside"):
        wsm.decode(ok, blocks={"pc.ram": 10})


def test_hostile_record_in_an_image(tmp_path: Path) -> None:
    """Both copies of an image's record replaced by a hostile one (valid digests, a run of
    2^63 pages): analyze and verify report it in one line, a restore's load ignores it with
    a warning, and recording overwrites it. A record save that fails in any way (here: a
    block the image lacks) is a skipped record with a warning, never an exception."""
    from synth_images import write_mapped_image

    from fixedram.endpoint.postcopy import _record
    from fixedram.image import open_image
    from fixedram.image.extensions import Geometry

    img = tmp_path / "a.img"
    write_mapped_image(img, {"pc.ram": 2048 * 4096}, {"pc.ram": {1: b"\x01" * 4096}})
    with open_image(img) as im:
        blk = Geometry.of_image(im).working_set_block()
    assert blk is not None
    hostile = forge_record(_runs_body([(0, 0, 1 << 63)]), 0, 1)
    with open(img, "r+b") as f:
        for at in blk.ws_copies:
            f.seek(at)
            f.write(hostile)
    for cmd, status in (("analyze", 0), ("verify", 1)):
        r = subprocess.run([sys.executable, "-m", "fixedram", cmd, str(img)],
                           capture_output=True, text=True, timeout=60, check=False)
        assert r.returncode == status and "Traceback" not in r.stderr, r
        assert "2 damaged copies" in r.stdout or "malformed varint" in r.stdout, r
    with open_image(img) as im:
        got = wsm.load(im)
        assert got.record is None and len(got.warnings) == 2, got.warnings
        obs = wsm.Observation([("pc.ram", 7, 2, 0)], False)
        assert wsm.record(im, obs).status == "recorded"
        assert _record(im, obs).status == "recorded"
        bad = _record(im, wsm.Observation([("nosuch", 1, 1, 0)], False))
    assert bad.status == "skipped" and bad.warning and "\n" not in bad.warning, bad
    with open_image(img) as im:
        got = wsm.load(im)
    assert got.record is not None and got.record.restores == 2 and got.warnings == []


@fuzz_settings(600)
@given(runs=st.lists(st.tuples(st.sampled_from([0, 1, 2, 255, 1 << 62]) | st.integers(0, 3),
                               st.sampled_from(_EDGES) | st.integers(0, 1 << 20),
                               st.sampled_from(_EDGES) | st.integers(0, 64)), max_size=12),
       names=st.sampled_from([("pc.ram",), ("pc.ram", "vga"), ("x",), ()]),
       npages=st.none() | st.integers(0, (1 << 32) - 1))
def test_workingset_forged_runs(runs: list[tuple[int, int, int]], names: tuple[str, ...],
                                npages: int | None) -> None:
    """Structured hostile runs with valid digests: only WorkingSetError, bounded memory."""
    total = sum(r[2] for r in runs) if npages is None else npages
    head = (total & 0xFFFFFFFF).to_bytes(4, "big") + len(runs).to_bytes(4, "big")
    run_workingset(head + _runs_body(runs, names), trace=False)


@fuzz_settings(400)
@given(data=st.binary(max_size=512))
def test_workingset_arbitrary_bytes(data: bytes) -> None:
    run_workingset(data, trace=False)
    run_workingset(wsm.MAGIC + data, trace=False)


def _manifest_doc() -> dict[str, object]:
    return {"fixedram-chunked-image": 1, "file_size": 1 << 22, "chunk_size": 1 << 20,
            "data_bytes": 0, "meta": {"name": "a" * 32, "codec": "raw", "stored": 10,
                                      "length": 2 << 20},
            "blocks": [{"name": "pc.ram", "length": 1 << 21, "pages_offset": 1 << 20,
                        "chunks": [[0, "b" * 32, "zstd", 4096]]}]}


_JSON = st.recursive(st.none() | st.booleans() | st.sampled_from([*_EDGES, -1, -(1 << 70)])
                     | st.floats() | st.text(max_size=8),
                     lambda inner: st.lists(inner, max_size=5)
                     | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)


@fuzz_settings(400)
@given(path=st.lists(st.sampled_from(["blocks", 0, "chunks", 0, 1, 2, 3, "meta", "name",
                                      "length", "pages_offset", "codec", "stored",
                                      "chunk_size", "file_size", "data_bytes"]),
                     min_size=1, max_size=4),
       value=_JSON, raw=st.binary(max_size=256))
def test_manifest_mutants(path: list[object], value: object, raw: bytes) -> None:
    """The object-store manifest parser: a valid manifest with one value replaced, and raw
    bytes: only ImageError escapes."""
    import json

    assert run_manifest(json.dumps(_manifest_doc()).encode(), trace=False) == "ok"

    doc: object = _manifest_doc()
    node = doc
    for k in path[:-1]:
        try:
            node = node[k]  # type: ignore[index]
        except (KeyError, IndexError, TypeError):
            break
    try:
        node[path[-1]] = value  # type: ignore[index]
    except (IndexError, TypeError):
        pass
    run_manifest(json.dumps(doc).encode(), trace=False)
    run_manifest(raw, trace=False)


# -- the short run over real-QEMU seeds (same driver as the long run) --------------------------


@pytest.mark.qemu
def test_short_mutation_run(corpus: Path, tmp_path: Path) -> None:
    """500 mutants of the real seeds through every target (run.py's worker, in-process;
    every 20th also through extract and convert). The hypothesis tests above mutate the
    synthetic seeds; the long run is fuzz/run.py."""
    import run

    res = run.worker((0, 0, 500, str(corpus), 7, 20, str(tmp_path / "crashers")))
    assert res["crashes"] == [], res["crashes"]
    counts: dict[str, int] = res["counts"]  # type: ignore[assignment]
    assert sum(counts.values()) == 500
    # every target ran, and some inputs went through the heavy commands
    assert {k.split(":")[0] for k in counts} == {"image", "stream", "multifd"}, counts
    assert any(k.endswith(":heavy") for k in counts), counts


@pytest.mark.qemu
@pytest.mark.parametrize("script,dirs", [("fuzz_image.py", ["image"]),
                                          ("fuzz_stream.py", ["stream", "multifd"])])
def test_atheris_short_run(script: str, dirs: list[str], corpus: Path, tmp_path: Path) -> None:
    """A few hundred coverage-guided inputs, when atheris is installed."""
    import atheris  # noqa: F401  (a dev dependency: the run must happen, not be skipped)
    work = tmp_path / "new"
    work.mkdir()
    # the script's scratch directory goes under TMPDIR: here, into this test's directory
    # (libFuzzer leaves the process without running Python's clean-up)
    r = subprocess.run([sys.executable, str(FUZZ / script), str(work),
                        *(str(corpus / d) for d in dirs), "-runs=300", "-max_len=262144",
                        f"-artifact_prefix={tmp_path}/"],
                       capture_output=True, text=True, timeout=240, check=False,
                       env={**os.environ, "TMPDIR": str(tmp_path)})
    assert r.returncode == 0, r.stderr[-4000:]
    assert "Done 300 runs" in r.stderr
