#!/usr/bin/env bash
# Install (idempotent) and run the whole test suite, as CI does. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${LP_VENV:-.venv}
bash scripts/install.sh --with-perf-analyzer "$VENV"     # the benchmark tests run perf_analyzer
exec "$VENV/bin/python" -m pytest -q -p no:cacheprovider --timeout=1200 -rfEs "$@" tests
