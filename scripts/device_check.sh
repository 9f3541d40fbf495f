#!/usr/bin/env bash
# The prepared device check of the GPU serving path: writes one markdown report (benchmarks/device_check.py).
#
# Usage: bash scripts/device_check.sh [--rehearse] [--bundle DIR] [--report FILE]
#   --rehearse   the same steps on the CPU with the tiny networks (CI runs this; needs the project's venv)
#   --bundle DIR what scripts/device_bundle.sh prepared (trimmed Triton server, tritonclient, perf_analyzer):
#                unpacked into a scratch site directory and put on PYTHONPATH, for a machine where nothing of the
#                project is installed (the lent GPU machine: Python 3.12, PyTorch, onnx, numpy, opencv, grpcio)
#   --report F   default: benchmarks/results/device_check.md (GPU) or device_check_rehearsal.md (--rehearse),
#                or $OUT/device_check.md where $OUT is set (the device tool brings $OUT back)
# Without --bundle the installed package and server are used (.venv/bin/python if present, else python3).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
REHEARSE=""
BUNDLE=""
REPORT=""
while [[ $# -gt 0 ]]; do
    case "$1" in
        --rehearse) REHEARSE="--rehearse"; shift ;;
        --bundle) BUNDLE="$2"; shift 2 ;;
        --report) REPORT="$2"; shift 2 ;;
        -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
        *) echo "device_check.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done

if [[ -z "$REPORT" ]]; then
    if [[ -n "${OUT:-}" ]]; then REPORT="$OUT/device_check.md"
    elif [[ -n "$REHEARSE" ]]; then REPORT="$ROOT/benchmarks/results/device_check_rehearsal.md"
    else REPORT="$ROOT/benchmarks/results/device_check.md"; fi
fi
mkdir -p "$(dirname "$REPORT")"
WORK="$(mktemp -d -t lp-device-check-XXXXXX)"
trap 'rm -rf "$WORK"' EXIT

if [[ -n "$BUNDLE" ]]; then
    PYTHON="$(command -v python3)"
    SITE="$WORK/site"
    mkdir -p "$SITE"
    for archive in "$BUNDLE"/*.tar.xz; do tar -xJf "$archive" -C "$SITE"; done
    # the package as pyproject.toml maps it (client/, export/, benchmarks/ are sub-packages)
    mkdir -p "$SITE/liveportrait_triton"
    cp -r "$ROOT/liveportrait_triton/." "$SITE/liveportrait_triton/"
    for sub in client export benchmarks; do cp -r "$ROOT/$sub" "$SITE/liveportrait_triton/$sub"; done
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
    STUB="$SITE/pytriton/tritonserver/python_backend_stubs/$("$PYTHON" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')/triton_python_backend_stub"
    LIBDIR="$("$PYTHON" -c 'import sysconfig; print(sysconfig.get_config_var("LIBDIR"))')"
    echo "stub libraries:"; LD_LIBRARY_PATH="$SITE/nvidia_pytriton.libs:$LIBDIR" ldd "$STUB" | grep -E "python|not found" || true
    if [[ -x "$SITE/perf_analyzer/bin/perf_analyzer" ]]; then export LP_PERF_ANALYZER_DIR="$SITE/perf_analyzer"; fi
elif [[ -x "$ROOT/.venv/bin/python" ]]; then
    PYTHON="$ROOT/.venv/bin/python"
else
    PYTHON="$(command -v python3)"
fi

cd "$ROOT"
"$PYTHON" -m liveportrait_triton.benchmarks.device_check --report "$REPORT" --work "$WORK" $REHEARSE
