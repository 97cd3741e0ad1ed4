#!/usr/bin/env bash
# Set up (QEMU 10, QEMU 7.2 for interop, .venv with dev dependencies), lint, type-check
# and run the test suite against real QEMU guests. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --dev
.venv/bin/ruff check fixedram tests bench fuzz
.venv/bin/mypy
set +e
.venv/bin/pytest -q -ra --durations=15 "$@"
rc=$?
set -e
# pytest exits 5 when it collected no test: that is a failure here, never a pass.
exit "$rc"
