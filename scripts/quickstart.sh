#!/usr/bin/env bash
# The main job end to end on a fresh machine: install, weights (official if present, else synthetic), export,
# the bundled Triton server, and an animated portrait written to artifacts/demo/demo.mp4. Extra arguments go to `demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${LP_VENV:-.venv}
bash scripts/install.sh "$VENV"
exec "$VENV/bin/liveportrait-triton" demo "$@"
