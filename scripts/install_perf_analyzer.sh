#!/usr/bin/env bash
# Install Triton's perf_analyzer (from the tritonclient 2.51.0 wheel) with the libraries it links, outside any venv.
#
# perf_analyzer is a C++ binary shipped inside the tritonclient manylinux wheel; that wheel's Python dependencies
# (protobuf<5) collide with this project's, and newer wheels need glibc 2.38. So the wheel is downloaded without
# dependencies and only bin/perf_analyzer is unpacked, next to libcudart.so.12 from nvidia-cuda-runtime-cu12
# (perf_analyzer links it even on CPU-only machines). Debian's libb64-0d provides its base64 library.
#
# Usage: scripts/install_perf_analyzer.sh [--dest DIR] [--python PYTHON]
#   DIR     default: $LP_PERF_ANALYZER_DIR, else ${XDG_CACHE_HOME:-~/.cache}/liveportrait-triton/perf_analyzer
#   PYTHON  an interpreter with pip, only used to download wheels (default: python3)
# Result: DIR/bin/perf_analyzer and DIR/lib/libcudart.so.12; `liveportrait-triton bench` finds them there.
# Idempotent: a second run with the same pins does nothing. Needs root (or sudo) only to apt-get libb64-0d.
set -euo pipefail

TRITONCLIENT_VERSION=2.51.0
CUDA_RUNTIME_VERSION=12.9.79
DEST="${LP_PERF_ANALYZER_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/liveportrait-triton/perf_analyzer}"
PYTHON=python3

while [[ $# -gt 0 ]]; do
    case "$1" in
        --dest) DEST="$2"; shift 2 ;;
        --python) PYTHON="$2"; shift 2 ;;
        -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
        *) echo "install_perf_analyzer.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done

STAMP="tritonclient==${TRITONCLIENT_VERSION} nvidia-cuda-runtime-cu12==${CUDA_RUNTIME_VERSION}"

as_root() {
    if [[ $(id -u) -eq 0 ]]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else
        echo "install_perf_analyzer.sh: need root (or sudo) to run: $*" >&2; exit 1; fi
}

# 1. libb64 (Debian package; perf_analyzer links libb64.so.0d)
if ! dpkg-query -W -f='${Status}' libb64-0d 2>/dev/null | grep -q "install ok installed"; then
    echo "installing Debian package libb64-0d"
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libb64-0d
fi

# 2. the binary and libcudart, unless this exact pin set is already in place
if [[ -x "$DEST/bin/perf_analyzer" && -f "$DEST/lib/libcudart.so.12" && -f "$DEST/VERSION" ]] \
        && [[ "$(cat "$DEST/VERSION")" == "$STAMP" ]]; then
    echo "perf_analyzer already installed in $DEST ($STAMP)"
else
    if ! "$PYTHON" -m pip --version >/dev/null 2>&1; then
        echo "installing Debian package python3-pip (to download wheels)"
        as_root apt-get update -qq
        as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-pip
    fi
    WORK="$(mktemp -d)"
    trap 'rm -rf "$WORK"' EXIT
    "$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --dest "$WORK" \
        "tritonclient==${TRITONCLIENT_VERSION}" "nvidia-cuda-runtime-cu12==${CUDA_RUNTIME_VERSION}"
    mkdir -p "$DEST/bin" "$DEST/lib"
    "$PYTHON" - "$WORK" "$DEST" "$TRITONCLIENT_VERSION" <<'EOF'
import pathlib, shutil, sys, zipfile
work, dest, version = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2]), sys.argv[3]
members = {f"tritonclient-{version}.data/data/bin/perf_analyzer": dest / "bin" / "perf_analyzer",
           "nvidia/cuda_runtime/lib/libcudart.so.12": dest / "lib" / "libcudart.so.12"}
for wheel in work.glob("*.whl"):
    with zipfile.ZipFile(wheel) as z:
        for name in set(z.namelist()) & set(members):
            target = members.pop(name)
            with z.open(name) as src, open(target.with_suffix(target.suffix + ".part"), "wb") as out:
                shutil.copyfileobj(src, out)
            target.with_suffix(target.suffix + ".part").replace(target)
            target.chmod(0o755)
if members:
    sys.exit(f"install_perf_analyzer.sh: not found in the downloaded wheels: {sorted(members)}")
EOF
    echo "$STAMP" > "$DEST/VERSION"
    echo "installed perf_analyzer into $DEST ($STAMP)"
fi

# 3. it must start (every shared library resolved)
if ! LD_LIBRARY_PATH="$DEST/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" "$DEST/bin/perf_analyzer" --version \
        >/dev/null 2>&1; then
    echo "install_perf_analyzer.sh: $DEST/bin/perf_analyzer does not start; missing libraries:" >&2
    LD_LIBRARY_PATH="$DEST/lib" ldd "$DEST/bin/perf_analyzer" | grep "not found" >&2 || true
    exit 1
fi
echo "perf_analyzer OK: $DEST/bin/perf_analyzer"
