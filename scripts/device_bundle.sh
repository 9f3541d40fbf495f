#!/usr/bin/env bash
# Prepare what the device check needs on a machine where nothing of the project is installed (run it HERE, then
# carry the result): a trimmed Triton server, the Python tritonclient and, if installed, perf_analyzer.
#
# Usage: bash scripts/device_bundle.sh [DIR] [--python-version 3.12]
#   DIR  default .device (git-ignored); carry it with the device tool (`carry: [".device"]`) and run there
#        `bash scripts/device_check.sh --bundle .device`.
# Contents (xz archives, unpacked by device_check.sh into a scratch site directory):
#   triton.tar.xz         tritonserver, the libraries of nvidia_pytriton.libs it and the Python backend link
#                         (all but the wheel's own libpython), libtriton_python.so, triton_python_backend_utils.py,
#                         the Python-backend stub of --python-version, the wheel's METADATA (serve.find_triton
#                         reads its version)
#   tritonclient.tar.xz   the pure-Python tritonclient package (gRPC/HTTP clients; grpcio and protobuf must be
#                         on the machine)
#   perf_analyzer.tar.xz  perf_analyzer with libcudart.so.12 and libb64.so.0d (only if
#                         scripts/install_perf_analyzer.sh installed it here)
# Prints the size of each archive and the total that travels with the working tree, in MiB.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DIR="$ROOT/.device"
PYVER=3.12
while [[ $# -gt 0 ]]; do
    case "$1" in
        --python-version) PYVER="$2"; shift 2 ;;
        -h|--help) sed -n '2,18p' "$0"; exit 0 ;;
        -*) echo "device_bundle.sh: unknown argument $1" >&2; exit 2 ;;
        *) DIR="$1"; shift ;;
    esac
done
PYTHON="$ROOT/.venv/bin/python"; [[ -x "$PYTHON" ]] || PYTHON="$(command -v python3)"
SITE="$("$PYTHON" -c 'import importlib.util, pathlib; s = importlib.util.find_spec("pytriton"); print(pathlib.Path(list(s.submodule_search_locations)[0]).parent)')"
PA_DIR="${LP_PERF_ANALYZER_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/liveportrait-triton/perf_analyzer}"

mkdir -p "$DIR"
STAGE="$(mktemp -d)"
trap 'rm -rf "$STAGE"' EXIT

T="$STAGE/triton"
mkdir -p "$T/pytriton/tritonserver/bin" "$T/pytriton/tritonserver/backends/python" \
         "$T/pytriton/tritonserver/python_backend_stubs" "$T/nvidia_pytriton.libs" "$T/nvidia_pytriton-0.7.0.dist-info"
cp "$SITE/pytriton/__init__.py" "$T/pytriton/"
cp "$SITE/pytriton/tritonserver/bin/tritonserver" "$T/pytriton/tritonserver/bin/"
cp "$SITE/pytriton/tritonserver/backends/python/"{libtriton_python.so,triton_python_backend_utils.py} \
   "$T/pytriton/tritonserver/backends/python/"
cp -r "$SITE/pytriton/tritonserver/python_backend_stubs/$PYVER" "$T/pytriton/tritonserver/python_backend_stubs/"
find "$SITE/nvidia_pytriton.libs" -maxdepth 1 -type f ! -name 'libpython3*' -exec cp {} "$T/nvidia_pytriton.libs/" \;
cp "$SITE"/nvidia_pytriton-*.dist-info/METADATA "$T/nvidia_pytriton-0.7.0.dist-info/"
tar -cJf "$DIR/triton.tar.xz" -C "$T" .

C="$STAGE/client"
mkdir -p "$C"
cp -r "$SITE/tritonclient" "$C/"
cp -r "$SITE"/tritonclient-*.dist-info "$C/"
find "$C" -name __pycache__ -prune -exec rm -rf {} +
rm -rf "$C/tritonclient/bin"
tar -cJf "$DIR/tritonclient.tar.xz" -C "$C" .

if [[ -x "$PA_DIR/bin/perf_analyzer" ]]; then
    P="$STAGE/pa/perf_analyzer"
    mkdir -p "$P/bin" "$P/lib"
    cp "$PA_DIR/bin/perf_analyzer" "$P/bin/"
    cp "$PA_DIR/lib/libcudart.so.12" "$P/lib/"
    cp "$(ls "$SITE"/nvidia_pytriton.libs/libb64-*.so.0d)" "$P/lib/libb64.so.0d"
    tar -cJf "$DIR/perf_analyzer.tar.xz" -C "$STAGE/pa" .
else
    rm -f "$DIR/perf_analyzer.tar.xz"
    echo "perf_analyzer not installed here (scripts/install_perf_analyzer.sh): the check will use the stream client"
fi

mib() { awk -v b="$1" 'BEGIN { printf "%.1f", b / 1048576 }'; }
TOTAL=0
for f in "$DIR"/*.tar.xz; do
    SIZE=$(stat -c %s "$f"); TOTAL=$((TOTAL + SIZE)); echo "$(basename "$f"): $(mib "$SIZE") MiB"
done
TREE=$(cd "$ROOT" && git ls-files -co --exclude-standard -z | xargs -0 stat -c %s 2>/dev/null | awk '{s += $1} END {print s}')
echo "carried: $(mib "$TOTAL") MiB; working tree: $(mib "$TREE") MiB; travels in all: $(mib $((TOTAL + TREE))) MiB (limit 64)"
