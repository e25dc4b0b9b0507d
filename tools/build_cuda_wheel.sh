#!/usr/bin/env bash
# Builds a flexkd wheel whose flexkd._C holds the CUDA kernels as well as the CPU ones.
#
# Usage:
#   bash tools/build_cuda_wheel.sh [OUTDIR]          # default OUTDIR: dist/
#
# Run it with the Python environment the wheel is for: the wheel is built against the torch installed
# there (--no-isolation), which must be a CUDA build of torch, and it only works with that torch
# version (`flexkd info` warns when the running torch differs). A CUDA toolkit must be found: CUDA_HOME,
# or nvcc on PATH. No GPU is needed to build.
#
# Environment:
#   PYTHON                 the interpreter to build with (default: python3)
#   FLEXKD_CUDA_ARCH_LIST  GPU architectures to compile for, ";"-separated (default "8.0;9.0"; add
#                          "+PTX" to the last one, e.g. "8.0;9.0+PTX", to also embed PTX for newer GPUs)
#   MAX_JOBS               parallel compile jobs (default: the number of cores)
#   CUDA_HOME              the toolkit root (default: the toolkit of the nvcc on PATH)
#
# Example: FLEXKD_CUDA_ARCH_LIST="8.0;8.6;9.0" MAX_JOBS=8 bash tools/build_cuda_wheel.sh wheelhouse
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUTDIR="$(mkdir -p "${1:-$ROOT/dist}" && cd "${1:-$ROOT/dist}" && pwd)"
PY="${PYTHON:-python3}"
export FLEXKD_CUDA_ARCH_LIST="${FLEXKD_CUDA_ARCH_LIST:-8.0;9.0}"
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
unset FLEXKD_BUILD_CUDA  # a CUDA wheel must not be built with CUDA turned off

"$PY" -c 'import torch, sys; sys.exit(0 if torch.version.cuda else 1)' || {
  echo "build_cuda_wheel: $("$PY" -c 'import torch; print(torch.__version__)') is not a CUDA build of torch" >&2
  exit 1
}
if [[ -z "${CUDA_HOME:-}" ]]; then
  command -v nvcc >/dev/null || { echo "build_cuda_wheel: set CUDA_HOME or put nvcc on PATH" >&2; exit 1; }
  source "$ROOT/tools/cuda_home.sh"
  cuda_home_from_nvcc
fi

echo "build_cuda_wheel: archs $FLEXKD_CUDA_ARCH_LIST, MAX_JOBS=$MAX_JOBS, CUDA_HOME=$CUDA_HOME"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
"$PY" -m build --wheel --no-isolation --outdir "$WORK" "$ROOT"
WHEEL="$(ls "$WORK"/flexkd-*.whl)"

# Refuse to hand out a wheel whose extension came out without the CUDA kernels.
"$PY" - "$WHEEL" <<'EOF'
import sys
import zipfile

with zipfile.ZipFile(sys.argv[1]) as wheel:
    extension = [n for n in wheel.namelist() if n.startswith("flexkd/_C") and n.endswith(".so")]
    assert extension, "the wheel has no flexkd/_C extension"
    data = wheel.read(extension[0])
assert b".nv_fatbin" in data, "flexkd/_C in the wheel holds no CUDA device code"
EOF
mv "$WHEEL" "$OUTDIR/"
echo "build_cuda_wheel: wrote $OUTDIR/$(basename "$WHEEL")"
