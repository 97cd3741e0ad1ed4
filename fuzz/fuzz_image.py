"""Coverage-guided fuzzing (atheris/libFuzzer) of image files: analyze, verify, validate, send.

    .venv/bin/pip install -e '.[fuzz]'
    .venv/bin/python fuzz/make_corpus.py
    .venv/bin/python fuzz/fuzz_image.py fuzz/corpus/image -runs=100000 -max_len=262144

Every input is written to a file and run through :func:`targets.run_image` (the CLI's
``analyze --json``, ``verify``, send's ``validate`` and stream generation; with
``FIXEDRAM_FUZZ_HEAVY=1`` also extract and convert). A property violation raises, and
libFuzzer saves the input as ``crash-*``.
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
    import fixedram.endpoint.send
    import fixedram.image.analyze
    import fixedram.image.reader
    import fixedram.stream.decoder  # noqa: F401

from targets import run_image  # noqa: E402

#: scratch files of the inputs, under TMPDIR; left there when libFuzzer ends the process
#: (it exits without Python's clean-up)
WORK = Path(tempfile.mkdtemp(prefix="fixedram-atheris-image-"))
HEAVY = os.environ.get("FIXEDRAM_FUZZ_HEAVY") == "1"
TRACE = os.environ.get("FIXEDRAM_FUZZ_TRACE", "1") == "1"


def test_one(data: bytes) -> None:
    run_image(bytes(data), WORK, heavy=HEAVY, trace=TRACE)


def main() -> None:
    atheris.Setup(sys.argv, test_one)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
