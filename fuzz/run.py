"""The long fuzz run: mutated seeds through analyze, verify, send's validation and receive.

    .venv/bin/python fuzz/make_corpus.py                  # once: real QEMU seeds
    .venv/bin/python fuzz/run.py --runs 100000            # ~1e5 inputs over all targets

Each input goes through one target of :mod:`targets`: ``image`` (analyze via the CLI,
verify, validate + send to a null channel; every ``--heavy-every``-th input also
extract and convert both ways), ``stream`` (the decoder in random chunks; every
``--heavy-every``-th input also the receiver writing an image) or ``multifd`` (the
channel decoder, both driving modes), in proportion 6:3:1. Inputs are mutants of the
seed corpus (:mod:`mutate`), deterministic for a given ``--seed``; workers split the
runs. A violation is saved under ``fuzz/crashers/`` and reported; the exit status is 1
if there was any. The summary (counts, time) is printed as one JSON object.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing as mp
import os
import random
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from mutate import mutate  # noqa: E402
from targets import Violation, run_image, run_multifd, run_stream, seed_dir  # noqa: E402

TARGETS = ("image",) * 6 + ("stream",) * 3 + ("multifd",)


def load_seeds(corpus: Path) -> dict[str, list[bytes]]:
    seeds = {t: [p.read_bytes() for p in sorted((corpus / t).glob("*"))]
             for t in ("image", "stream", "multifd")}
    for t, s in seeds.items():
        if not s:
            raise SystemExit(f"no seeds in {corpus / t}: run fuzz/make_corpus.py first")
    return seeds


def one(target: str, data: bytes, work: Path, heavy: bool, trace: bool, seed: int) -> str:
    if target == "image":
        return run_image(data, work, heavy=heavy, trace=trace)
    if target == "stream":
        run_stream(data, work if heavy else None, seed=seed, trace=trace)
        return "ok"
    run_multifd(data, seed=seed, trace=trace)
    return "ok"


def worker(args: tuple[int, int, int, str, int, int, str]) -> dict[str, object]:
    wid, start, count, corpus, seed, heavy_every, crash_dir = args
    seeds = load_seeds(Path(corpus))
    rnd = random.Random(seed * 1_000_003 + wid)
    counts: dict[str, int] = {}
    crashes: list[str] = []
    with tempfile.TemporaryDirectory(prefix=f"fixedram-fuzz-{wid}-") as tmp:
        work = Path(tmp)
        for i in range(start, start + count):
            target = TARGETS[rnd.randrange(len(TARGETS))]
            pool = seeds[target]
            data = mutate(rnd.choice(pool), rnd, rnd.choice(pool))
            heavy = i % heavy_every == 0
            try:
                res = one(target, data, work, heavy, True, i)
            except Violation as e:
                h = hashlib.sha1(data).hexdigest()[:12]
                path = Path(crash_dir) / f"{target}-{h}"
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(data)
                path.with_suffix(".txt").write_text(str(e))
                crashes.append(f"{path}: {str(e).splitlines()[0]}")
                res = "violation"
            key = f"{target}:{res}" + (":heavy" if heavy else "")
            counts[key] = counts.get(key, 0) + 1
    return {"counts": counts, "crashes": crashes}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=10000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--heavy-every", type=int, default=20,
                    help="every N-th input also goes through extract/convert/receive")
    ap.add_argument("--corpus", type=Path, default=seed_dir())
    ap.add_argument("--crashers", type=Path, default=HERE / "crashers")
    args = ap.parse_args()
    load_seeds(args.corpus)
    per = -(-args.runs // args.workers)
    jobs = [(w, w * per, min(per, args.runs - w * per), str(args.corpus), args.seed,
             args.heavy_every, str(args.crashers)) for w in range(args.workers)
            if w * per < args.runs]
    t0 = time.monotonic()
    with mp.get_context("spawn").Pool(len(jobs)) as pool:
        results = pool.map(worker, jobs)
    counts: dict[str, int] = {}
    crashes: list[str] = []
    for r in results:
        for k, v in r["counts"].items():  # type: ignore[attr-defined]
            counts[k] = counts.get(k, 0) + v
        crashes += r["crashes"]  # type: ignore[arg-type]
    summary = {
        "runs": sum(counts.values()),
        "seconds": round(time.monotonic() - t0, 1),
        "workers": len(jobs),
        "seed": args.seed,
        "counts": dict(sorted(counts.items())),
        "violations": len(crashes),
    }
    print(json.dumps(summary, indent=1))
    for c in crashes[:50]:
        print(c, file=sys.stderr)
    sys.exit(1 if crashes else 0)


if __name__ == "__main__":
    main()
