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
from targets import run_image, run_multifd, run_stream  # noqa: E402


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


# -- the short run over real-QEMU seeds (same driver as the long run) --------------------------


@pytest.mark.qemu
def test_short_mutation_run(corpus: Path, tmp_path: Path) -> None:
    """1000 mutants of the real seeds through every target (run.py's worker, in-process)."""
    import run

    res = run.worker((0, 0, 1000, str(corpus), 7, 20, str(tmp_path / "crashers")))
    assert res["crashes"] == [], res["crashes"]
    assert sum(res["counts"].values()) == 1000  # type: ignore[attr-defined]


@pytest.mark.qemu
@pytest.mark.parametrize("script,dirs", [("fuzz_image.py", ["image"]),
                                          ("fuzz_stream.py", ["stream", "multifd"])])
def test_atheris_short_run(script: str, dirs: list[str], corpus: Path, tmp_path: Path) -> None:
    """A few hundred coverage-guided inputs, when atheris is installed."""
    import atheris  # noqa: F401  (a dev dependency: the run must happen, not be skipped)
    work = tmp_path / "new"
    work.mkdir()
    r = subprocess.run([sys.executable, str(FUZZ / script), str(work),
                        *(str(corpus / d) for d in dirs), "-runs=300", "-max_len=262144",
                        f"-artifact_prefix={tmp_path}/"],
                       capture_output=True, text=True, timeout=240, check=False)
    assert r.returncode == 0, r.stderr[-4000:]
    assert "Done 300 runs" in r.stderr
