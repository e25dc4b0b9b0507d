#!/usr/bin/env bash
# Compiles flexkd._C with its CUDA kernels, no GPU needed, so CUDA code that does not compile or link
# cannot land. Steps:
#   1. a virtual environment of its own (FLEXKD_CUDA_VENV, default /tmp/flexkd-cuda-venv, reused when
#      present) with the CUDA build of torch (FLEXKD_CUDA_TORCH, default torch==2.14.1, cu130),
#      setuptools, ninja and pybind11;
#   2. CUDA_HOME = the toolkit that nvcc belongs to (unless CUDA_HOME is set);
#   3. `setup.py build_ext` with FLEXKD_CUDA_ARCH_LIST (default "8.0;9.0") and MAX_JOBS (default 2)
#      into a temporary directory, or FLEXKD_CUDA_BUILD_DIR to keep it (the source tree's
#      flexkd/_C*.so belongs to the CPU build);
#   4. checks: the .so holds sm_XX cubins of every kernel file for every requested architecture and the
#      kernel symbols; loading it into that torch registers the CUDA (and CPU) kernels of both ops;
#      build_info() reports the CUDA version and architectures; the CPU kernels run.
# Prints the time of each step; exits non-zero on the first failure. Usage: bash .ci/build_cuda_extension.sh
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${FLEXKD_CUDA_VENV:-/tmp/flexkd-cuda-venv}"
TORCH_SPEC="${FLEXKD_CUDA_TORCH:-torch==2.14.1}"
export FLEXKD_CUDA_ARCH_LIST="${FLEXKD_CUDA_ARCH_LIST:-8.0;9.0}"
export MAX_JOBS="${MAX_JOBS:-2}"
START=$SECONDS
step() { printf '[build_cuda_extension %4ds] %s\n' "$((SECONDS - START))" "$*"; }
fail() { printf '[build_cuda_extension] FAILED: %s\n' "$*" >&2; exit 1; }

# 1. The CUDA torch lives in its own environment: it must never replace the CPU torch of the project.
if [[ ! -x "$VENV/bin/python" ]]; then
  step "creating $VENV"
  python3 -m venv "$VENV"
fi
PY="$VENV/bin/python"
step "installing $TORCH_SPEC (CUDA build) and build tools into $VENV"
"$PY" -m pip install --quiet --disable-pip-version-check "$TORCH_SPEC" setuptools wheel ninja pybind11 \
  2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
"$PY" -W ignore - <<'EOF' || fail "the torch in $VENV has no CUDA"
import torch
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}")
raise SystemExit(0 if torch.version.cuda else 1)
EOF

# 2. The toolkit root of the nvcc on PATH.
if [[ -z "${CUDA_HOME:-}" ]]; then
  command -v nvcc >/dev/null || fail "nvcc is not on PATH and CUDA_HOME is not set"
  source "$ROOT/tools/cuda_home.sh"
  cuda_home_from_nvcc
fi
export CUDA_HOME
[[ -x "$CUDA_HOME/bin/nvcc" ]] || fail "no nvcc in CUDA_HOME=$CUDA_HOME"
step "CUDA_HOME=$CUDA_HOME ($("$CUDA_HOME/bin/nvcc" --version | tail -n1))"

# 3. Build into a temporary directory (FLEXKD_CUDA_BUILD_DIR keeps one, so a rebuild is incremental).
if [[ -n "${FLEXKD_CUDA_BUILD_DIR:-}" ]]; then
  WORK="$FLEXKD_CUDA_BUILD_DIR"
  mkdir -p "$WORK"
else
  WORK="$(mktemp -d /tmp/flexkd-cuda-build.XXXXXX)"
  trap 'rm -rf "$WORK"' EXIT
fi
step "building flexkd._C for FLEXKD_CUDA_ARCH_LIST=$FLEXKD_CUDA_ARCH_LIST with MAX_JOBS=$MAX_JOBS"
(cd "$ROOT" && "$PY" setup.py --quiet build_ext --build-lib "$WORK/lib" --build-temp "$WORK/tmp") \
  >"$WORK/build.log" 2>&1 || { tail -n 80 "$WORK/build.log" >&2; fail "the CUDA build failed"; }
grep -E "^flexkd: building" "$WORK/build.log" || true
SO="$(find "$WORK/lib" -name '_C*.so' | head -n1)"
[[ -n "$SO" ]] || fail "no flexkd/_C*.so in $WORK/lib"
step "built $(basename "$SO") ($(du -h "$SO" | cut -f1))"

# 4a. Device code: one cubin per kernel file and architecture, and the kernels inside them.
CUOBJDUMP="$(command -v cuobjdump || true)"
for candidate in "$CUDA_HOME/bin/cuobjdump" \
  "$("$PY" -c 'import os, triton; print(os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/cuobjdump"))' 2>/dev/null || true)"; do
  [[ -z "$CUOBJDUMP" && -x "$candidate" ]] && CUOBJDUMP="$candidate"
done
[[ -n "$CUOBJDUMP" ]] || fail "no cuobjdump found (PATH, \$CUDA_HOME/bin, triton's nvidia backend)"
"$CUOBJDUMP" --list-elf "$SO" >"$WORK/elf.txt"
"$CUOBJDUMP" --dump-elf-symbols "$SO" >"$WORK/symbols.txt"
IFS=';' read -r -a ARCHS <<<"$FLEXKD_CUDA_ARCH_LIST"
for arch in "${ARCHS[@]}"; do
  sm="sm_$(echo "${arch%+PTX}" | tr -d '.')"
  for unit in feature_loss_mse feature_loss_corr importance; do
    grep -q "${unit}\.${sm}\.cubin" "$WORK/elf.txt" || fail "no $sm cubin for csrc/cuda/$unit.cu"
  done
done
for kernel in row_pass_kernel corr_stats_kernel corr_columns_kernel importance_kernel add_chunks_kernel \
  weight_stats_kernel reduce_to_scalar_kernel; do
  grep -q "$kernel" "$WORK/symbols.txt" || fail "kernel $kernel is missing from the device code"
done
step "device code: $(wc -l <"$WORK/elf.txt") cubins ($(sed 's/.*: //' "$WORK/elf.txt" | tr '\n' ' '))"

# 4b. Load it into the CUDA torch: the CUDA dispatch key must have kernels, build_info must say so.
FLEXKD_SO="$SO" FLEXKD_ARCHS="$FLEXKD_CUDA_ARCH_LIST" "$PY" -W ignore - <<'EOF' || fail "loading the built extension"
import importlib.util
import os
import re
import sys
import types

import torch

so = os.environ["FLEXKD_SO"]
sys.modules.setdefault("flexkd", types.ModuleType("flexkd"))  # the extension is flexkd._C
spec = importlib.util.spec_from_file_location("flexkd._C", so)
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
info = dict(module.build_info())
print("build_info:", {k: info[k] for k in ("torch_version", "cuda_kernels", "cuda_version", "cuda_archs")})
assert info["cuda_kernels"] is True, info
assert info["cuda_archs"] == ";".join(a.removesuffix("+PTX") for a in os.environ["FLEXKD_ARCHS"].split(";")), info
assert re.fullmatch(r"\d+\.\d+", str(info["cuda_version"])), info
for op in ("flexkd::feature_loss_fwd", "flexkd::importance_scores_acc"):
    for key in ("CUDA", "CPU"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op, key), f"{op} has no {key} kernel"
    print(f"{op}: CPU and CUDA kernels registered")
# The CPU kernels of the same build still run under this torch.
s, t = torch.randn(5, 3), torch.randn(5, 7)
index = torch.tensor([6, 0, 3])
loss, grad, _ = torch.ops.flexkd.feature_loss_fwd(s, t, index, None, "mse", "mean", 1e-6, True, False)
expected = (s - t[:, index]).pow(2).mean()
assert torch.allclose(loss, expected, rtol=1e-5), (loss, expected)
print(f"CPU feature_loss_fwd through this build: {loss.item():.6f} (expected {expected.item():.6f})")
EOF
step "OK: CUDA kernels compiled for $FLEXKD_CUDA_ARCH_LIST and registered for the CUDA dispatch key"
