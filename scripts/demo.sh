#!/usr/bin/env bash
# Set up and run the main job: a live save of the built-in guest into a fixed-offset
# image through fixedram, a restore into a fresh QEMU, and proof that RAM matches.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/fixedram demo "$@"
