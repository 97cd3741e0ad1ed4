"""Coverage-guided fuzzing (atheris/libFuzzer) of the stream decoder and the multifd decoder.

    .venv/bin/pip install -e '.[fuzz]'
    .venv/bin/python fuzz/make_corpus.py
    .venv/bin/python fuzz/fuzz_stream.py fuzz/corpus/stream fuzz/corpus/multifd -runs=100000

The first input byte picks the target: even = a migration stream through
:class:`~fixedram.stream.StreamDecoder` in chunks (and, with ``FIXEDRAM_FUZZ_HEAVY=1``,
the receiver writing an image into a scratch directory), odd = one multifd channel
through :class:`~fixedram.stream.multifd.MultifdChannelDecoder`. Seeds from
``make_corpus.py`` have no selector byte; the whole seed is then used for both targets.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import atheris

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

with atheris.instrument_imports():
    import fixedram.endpoint.receive
    import fixedram.stream.decoder
    import fixedram.stream.multifd  # noqa: F401

from targets import run_multifd, run_stream  # noqa: E402

#: scratch files of the inputs, under TMPDIR; left there when libFuzzer ends the process
#: (it exits without Python's clean-up)
WORK = Path(tempfile.mkdtemp(prefix="fixedram-atheris-stream-"))
HEAVY = os.environ.get("FIXEDRAM_FUZZ_HEAVY") == "1"
TRACE = os.environ.get("FIXEDRAM_FUZZ_TRACE", "1") == "1"


def test_one(data: bytes) -> None:
    data = bytes(data)
    if data[:4] in (b"QEVM", b"\x11\x22\x33\x44"):  # an unprefixed seed: both targets
        run_stream(data, WORK if HEAVY else None, trace=TRACE)
        run_multifd(data, trace=TRACE)
    elif data and data[0] % 2 == 0:
        run_stream(data[1:], WORK if HEAVY else None, seed=data[0], trace=TRACE)
    elif data:
        run_multifd(data[1:], seed=data[0], trace=TRACE)


def main() -> None:
    atheris.Setup(sys.argv, test_one)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
