"""Fuzz targets: one input through the code paths of analyze, verify, send and receive,
and through the parsers of the working-set record (:func:`run_workingset`, also forged
with valid digests) and of an object image's manifest (:func:`run_manifest`).

Shared by the atheris drivers (``fuzz_stream.py``, ``fuzz_image.py``), the long run
(``run.py``) and the CI tests (``tests/test_fuzz.py``). Each ``run_*`` function takes
one input and raises :class:`Violation` when a property fails:

* only clean errors: every exception is a :class:`~fixedram.errors.FixedramError`
  (and through the command line: exit status 0 or 2, one line on stderr);
* nothing over :data:`TIME_LIMIT` seconds per input and operation (analyze, verify,
  validate + send, extract, convert, decode, receive: each timed on its own);
* no allocation driven by a claimed length: the tracemalloc peak (numpy included)
  stays under :func:`alloc_limit` of the input's size, so a block claiming 2^60
  bytes cannot allocate;
* no write outside the output file: after ``extract``/``convert``/``receive`` into an
  empty directory, the directory holds the expected output or nothing, and the
  input's directory holds only the input.
"""

from __future__ import annotations

import os
import random
import shutil
import time
import traceback
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

from click.testing import CliRunner

from fixedram.errors import FixedramError

__all__ = [
    "TIME_LIMIT",
    "Violation",
    "alloc_limit",
    "run_image",
    "run_multifd",
    "run_stream",
    "run_workingset",
    "run_manifest",
    "forge_record",
]

#: Seconds one input may take, all paths together.
TIME_LIMIT = 2.0


def alloc_limit(nbytes: int) -> int:
    """Most bytes Python (numpy included) may hold at once for an input of ``nbytes``.

    Fixed overhead (1 MiB read buffers, the 2 MiB receive chunk, click) plus a small
    multiple of the input: per-page state of a mapped-ram image is bounded by its file,
    of a stream image by one 8-byte index entry per file byte.
    """
    return (48 << 20) + 24 * nbytes


class Violation(AssertionError):
    """A fuzz property failed for one input."""


def _timed(what: str, t0: float) -> None:
    dt = time.monotonic() - t0
    if dt > TIME_LIMIT:
        raise Violation(f"{what}: {dt:.2f} s for one input (limit {TIME_LIMIT} s)")


def _clean(what: str, fn: Callable[[], Any]) -> Any:
    """Run ``fn``; a FixedramError is a clean refusal, anything else a violation."""
    t0 = time.monotonic()
    try:
        return fn()
    except FixedramError:
        return None
    except Violation:
        raise
    except BaseException as e:
        raise Violation(f"{what}: {type(e).__name__}: {e}\n{traceback.format_exc()}") from e
    finally:
        _timed(what, t0)


def _cli(runner: CliRunner, args: list[str]) -> int:
    """Run one command in-process: exit 0, or 2 with exactly one error line."""
    from fixedram.commands import cli, load_commands

    load_commands()
    t0 = time.monotonic()
    res = runner.invoke(cli, args, catch_exceptions=True)
    _timed(f"fixedram {args[0]}", t0)
    if res.exception is not None and not isinstance(res.exception, SystemExit):
        tb = "".join(traceback.format_exception(*res.exc_info)) if res.exc_info else ""
        raise Violation(f"fixedram {args[0]}: exception escaped: {res.exception!r}\n{tb}")
    if res.exit_code not in (0, 2):
        raise Violation(f"fixedram {args[0]}: exit status {res.exit_code}")
    if res.exit_code == 2:
        err = res.stderr
        if err.count("\n") != 1 or not err.startswith("fixedram: error: "):
            raise Violation(f"fixedram {args[0]}: not one error line: {err!r}")
    return res.exit_code


def _only(d: Path, allowed: set[str], what: str) -> None:
    got = {p.name for p in d.iterdir()}
    if not got <= allowed:
        raise Violation(f"{what}: unexpected files in {d}: {sorted(got - allowed)}")


class _Measure:
    """Tracemalloc peak of a block (and time as a backstop), checked against the limits."""

    def __init__(self, what: str, nbytes: int, *, trace: bool) -> None:
        self.what = what
        self.nbytes = nbytes
        self.trace = trace

    def __enter__(self) -> _Measure:
        if self.trace:
            tracemalloc.start()
        self.t0 = time.monotonic()
        return self

    def __exit__(self, exc_type: object, *rest: object) -> None:
        dt = time.monotonic() - self.t0
        peak = 0
        if self.trace:
            _, peak = tracemalloc.get_traced_memory()
            tracemalloc.stop()
        if exc_type is not None:
            return
        if dt > 8 * TIME_LIMIT:  # every operation is timed on its own (_timed)
            raise Violation(f"{self.what}: {dt:.2f} s for a {self.nbytes}-byte input")
        if peak > alloc_limit(self.nbytes):
            raise Violation(f"{self.what}: allocated {peak} bytes at peak for a "
                            f"{self.nbytes}-byte input (limit {alloc_limit(self.nbytes)})")


def run_image(data: bytes, workdir: Path, *, heavy: bool = True, trace: bool = True) -> str:
    """``data`` as an image file through analyze (CLI), verify, send's validate and send.

    ``heavy`` also runs extract and convert (both directions) into an empty directory.
    Returns ``"ok"`` if the image was accepted by validate, else ``"refused"``.
    """
    from fixedram.endpoint.send import send, validate
    from fixedram.image import open_image
    from fixedram.image.verify import verify_image
    from fixedram.io.channel import SinkChannel

    inp = workdir / "in"
    out = workdir / "out"
    for d in (inp, out):
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
    src = inp / "image"
    src.write_bytes(data)
    runner = CliRunner()
    outcome = "refused"
    with _Measure("image", len(data), trace=trace):
        _cli(runner, ["analyze", "--json", str(src)])
        _clean("verify", lambda: verify_image(src))

        def send_all() -> None:
            nonlocal outcome
            with open_image(src) as img:
                validate(img)
                outcome = "ok"
                send(img, SinkChannel(lambda bufs: None))

        _clean("validate/send", send_all)
        if heavy:
            _cli(runner, ["analyze", str(src)])  # the text report: one line per item
            raw = out / "raw"
            code = _cli(runner, ["extract", "--block", _first_block(src), str(src), "-o",
                                 str(raw)])
            _only(out, {"raw"} if code == 0 else set(), "extract")
            shutil.rmtree(out)
            out.mkdir()
            for to in ("stream", "mapped-ram"):
                dst = out / f"conv-{to}"
                code = _cli(runner, ["convert", "-q", "--to", to, str(src), str(dst)])
                _only(out, {dst.name} if code == 0 else set(), f"convert --to {to}")
                if code == 0 and to == "mapped-ram":
                    _clean("analyze of convert output",
                           lambda d=dst: validate(d))  # type: ignore[misc]
                shutil.rmtree(out)
                out.mkdir()
    _only(inp, {"image"}, "input directory")
    return outcome


def _first_block(path: Path) -> str:
    from fixedram.image import open_image

    try:
        with open_image(path) as img:
            return next(iter(img.blocks), "pc.ram")
    except FixedramError:
        return "pc.ram"


def _chunks(data: bytes, seed: int) -> list[bytes]:
    rnd = random.Random(seed)
    out = []
    i = 0
    while i < len(data):
        n = rnd.choice((1, 2, 3, 7, 64, 511, 4096, 1 << 16))
        out.append(data[i : i + n])
        i += n
    return out


def run_stream(data: bytes, workdir: Path | None = None, *, seed: int = 0,
               trace: bool = True) -> int:
    """``data`` as a migration stream: the decoder in random chunks, then (with
    ``workdir``) the receiver writing an image there, as ``receive``/``convert`` do.

    Returns the number of records decoded.
    """
    from fixedram.endpoint.receive import Receiver
    from fixedram.stream import StreamDecoder

    count = 0
    with _Measure("stream", len(data), trace=trace):

        def decode() -> None:
            nonlocal count
            dec = StreamDecoder()
            for c in _chunks(data, seed):
                count += len(dec.feed(c))
                if dec.done:
                    break
            else:
                count += len(dec.feed_eof())

        _clean("StreamDecoder", decode)
        if workdir is not None:
            out = workdir / "rx"
            shutil.rmtree(out, ignore_errors=True)
            out.mkdir(parents=True)
            img = out / "image"

            def receive() -> None:
                with Receiver(img) as rx:
                    for c in _chunks(data, seed + 1):
                        if rx.done:
                            break
                        rx.feed(c)
                    if not rx.done:
                        rx.feed_eof()
                    rx.commit()

            ok = _clean("Receiver", receive) is None and img.exists()
            _only(out, {"image"} if ok else set(), "receive")
    return count


def run_multifd(data: bytes, *, seed: int = 0, trace: bool = True) -> int:
    """``data`` as one multifd channel through the channel decoder, both driving modes."""
    from fixedram.stream.multifd import MultifdChannelDecoder

    count = 0
    with _Measure("multifd", len(data), trace=trace):

        def feed() -> None:
            nonlocal count
            dec = MultifdChannelDecoder()
            for c in _chunks(data, seed):
                count += len(dec.feed(c))
            dec.feed_eof()

        def zero_copy() -> None:
            dec = MultifdChannelDecoder()
            mv = memoryview(data)
            i = 0
            while i < len(mv):
                buf = dec.get_buffer()
                n = min(len(buf), len(mv) - i)
                buf[:n] = mv[i : i + n]
                i += n
                dec.buffer_updated(n)
            dec.feed_eof()

        _clean("MultifdChannelDecoder.feed", feed)
        _clean("MultifdChannelDecoder zero-copy", zero_copy)
    return count


def forge_record(body: bytes, npages: int, nruns: int) -> bytes:
    """A working-set record around ``body`` whose digests are right: the digests are plain
    xxh3, so a hostile file can carry such a record; only the checks of the body stand."""
    import xxhash

    from fixedram.image import workingset as wsm

    h, digest = wsm.HEADER, xxhash.xxh3_64_intdigest
    head = h.pack(wsm.MAGIC, wsm.VERSION, h.size, 0, 1, 0, len(body), npages & 0xFFFFFFFF,
                  nruns & 0xFFFFFFFF, 1, digest(body), 0)
    return head[:56] + digest(head[8:56]).to_bytes(8, "big") + body


#: Block sizes (pages) a forged record is also checked against, as restore and verify do.
_WS_BLOCKS = {"pc.ram": 1 << 18, "vga": 16}


def run_workingset(data: bytes, *, trace: bool = True) -> str:
    """``data`` as a working-set record (``workingset.decode``, as analyze, verify and a
    lazy restore read it): as given, and forged (``data[8:]`` the body, ``data[:8]`` the
    header's page and run counts, digests made valid). An accepted record re-encodes to
    the same pages. Returns ``"ok"`` when the forged record was accepted."""
    import struct

    import numpy as np

    from fixedram.image import workingset as wsm

    outcome = "refused"
    with _Measure("workingset", len(data), trace=trace):
        npages, nruns = struct.unpack(">II", data[:8].ljust(8, b"\0"))
        forged = forge_record(data[8:], npages, nruns)
        for raw in (data, forged):
            for blocks in (None, _WS_BLOCKS):
                ws = _clean("workingset.decode",
                            lambda r=raw, b=blocks: wsm.decode(r, blocks=b))  # type: ignore[misc]
                if ws is None:
                    continue
                if raw is forged:
                    outcome = "ok"
                back = _clean("workingset round trip",
                              lambda w=ws: wsm.decode(wsm.encode(w)))  # type: ignore[misc]
                if back is None or not (np.array_equal(back.page, ws.page[: len(back)])
                                        and np.array_equal(back.block, ws.block[: len(back)])):
                    raise Violation("workingset: an accepted record does not round-trip")
    return outcome


def run_manifest(data: bytes, *, trace: bool = True) -> str:
    """``data`` as an object image's manifest (``chunked.Manifest.parse``, what opening
    an ``s3://`` image reads first). Returns ``"ok"`` when it was accepted."""
    from fixedram.image.chunked import Manifest

    with _Measure("manifest", len(data), trace=trace):
        got = _clean("Manifest.parse", lambda: Manifest.parse(data, "fuzz"))
        if got is not None:
            _clean("Manifest round trip",
                   lambda: Manifest.parse(got.to_json(), "fuzz"))  # type: ignore[union-attr]
    return "refused" if got is None else "ok"


def seed_dir() -> Path:
    """Where ``make_corpus.py`` puts the seed corpus (``$FIXEDRAM_FUZZ_CORPUS``)."""
    return Path(os.environ.get("FIXEDRAM_FUZZ_CORPUS",
                               Path(__file__).resolve().parent / "corpus"))
