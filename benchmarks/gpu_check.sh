#!/usr/bin/env bash
# The GPU check, for a machine with an NVIDIA GPU, its own torch with CUDA (and the Triton that ships
# with it) and possibly no network: builds flexkd._C with the CUDA kernels for this GPU, runs the
# tests marked `cuda`, then benchmarks flexkd-cuda and flexkd-triton against the formula a user writes
# for each op (flexkd/bench/user_formulas.py), eager and torch.compile'd, at N=16384, D=4096, k=2048:
# mse fwd+bwd, corr fwd+bwd and importance, in bf16 and fp32 (bench_gpu.py). Nothing is downloaded.
# The last thing printed is one table: per op, dtype and implementation, ms, GB/s of the bytes floor,
# % of a device-to-device copy measured in the same run, and the speed over the user's eager and
# compiled formula (SLOWER where flexkd loses). Then linear_logit_kd (fused linear + logit KD) at
# N=8192 V=151936 H=1024 bf16, the op (auto, and its Triton kernels) against the formula eager and
# compiled and, when it can be imported, Liger-Kernel's fused linear JSD (then against a top-128
# teacher, which Liger does not take).
# Meant to finish within one 10-minute device call (the step limits below add up to 9.5 minutes after the
# build, and the steps should take far less); GPU_CHECK_STEPS splits it over two calls on a warm machine
# if a step runs long.
#
#   bash benchmarks/gpu_check.sh [results-dir]      # default results-dir: benchmarks/results/gpu
#   bash benchmarks/gpu_check.sh --dry-run           # no GPU: only the benchmark step, on the CPU at a
#                                                    # tiny shape, to check the script (numbers mean nothing)
#   GPU_CHECK_STEPS=kd,kd-topk bash benchmarks/gpu_check.sh   # some steps (the build also runs when
#                                                    # flexkd._C has no CUDA kernels yet)
#
# The device machine has no network and no pydantic or datasets (flexkd.config and the training code
# import them): `bash benchmarks/gpu_wheels.sh` here puts the wheels it lacks, Liger-Kernel's among them,
# into .whl/ (git-ignored, ~4 MB; name it in the device call's carry), and this script installs them into
# /tmp/flexkd-site first.
#
# Environment: PYTHON (default python3), FLEXKD_CUDA_ARCH_LIST (default: this GPU's capability),
# MAX_JOBS (default: all cores), GPU_CHECK_STEPS (default build,tests,bench,kd,kd-topk,overhead),
# GPU_CHECK_TEST_TIMEOUT / GPU_CHECK_BENCH_TIMEOUT / GPU_CHECK_KD_TIMEOUT / GPU_CHECK_KD_TOPK_TIMEOUT /
# GPU_CHECK_OVERHEAD_TIMEOUT (seconds, 150 / 150 / 120 / 90 / 30 per backend). Writes build.log, tests.log,
# bench.json, bench.md, linear_logit_kd{,_topk}.csv and .log, overhead.log into the results directory.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DRY_RUN=0
if [[ "${1:-}" == "--dry-run" ]]; then
  DRY_RUN=1
  shift
fi
RESULTS="${1:-$ROOT/benchmarks/results/gpu}"
PY="${PYTHON:-python3}"
mkdir -p "$RESULTS"
cd "$ROOT" || exit 1
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PIP_NO_INDEX=1
export PYTHONUNBUFFERED=1
export PYTHONPATH="$ROOT:$ROOT/lab${PYTHONPATH:+:$PYTHONPATH}"  # flexkd from this tree, and the lab its tests import
unset TRITON_INTERPRET
START=$SECONDS
step() { printf '\n=== [gpu_check %4ds] %s\n' "$((SECONDS - START))" "$*"; }

# The table is the tail of the benchmark's output, starting at its "N=... on <device>" line.
extract_table() { sed -n '/^N=[0-9]* D=[0-9]* k=[0-9]* on /,$p' "$1"; }

if [[ $DRY_RUN == 1 ]]; then
  step "dry run: bench_gpu.py --dry-run on the CPU (not a measurement)"
  "$PY" benchmarks/bench_gpu.py --dry-run --iters 1 --reps 1 --warmup 1 --json "$RESULTS/dry_run.json" \
    >"$RESULTS/dry_run.log" 2>&1 || { cat "$RESULTS/dry_run.log"; exit 1; }
  extract_table "$RESULTS/dry_run.log"
  step "dry run: flexkd bench --suite linear_logit_kd on the CPU at a tiny shape"
  "$PY" -m flexkd bench --suite linear_logit_kd --n 64 --vocab 512 --hidden 32 --dtypes bf16 --kd-reps 1 \
    --kd-out "$RESULTS/dry_run_linear_logit_kd" | tail -n 1 || exit 1
  step "dry run: call_overhead.py on the CPU"
  "$PY" benchmarks/call_overhead.py --n 64 --d 32 --k 8 --calls 5 --loops 1 | tail -n 1 || exit 1
  step "dry run: the Triton paths of that benchmark under the interpreter, dense and top-8 teachers"
  for topk in 0 8; do
    TRITON_INTERPRET=1 "$PY" -m flexkd bench --suite linear_logit_kd --n 16 --vocab 64 --hidden 8 --dtypes fp32 \
      --kd-impls fused,fused-triton,eager --kd-kinds forward_kl,jsd --kd-topk $topk --kd-reps 1 \
      --kd-out "$RESULTS/dry_run_linear_logit_kd_triton_$topk" | tail -n 1 || exit 1
  done
  exit 0
fi

STEPS=",${GPU_CHECK_STEPS:-build,tests,bench,kd,kd-topk,overhead},"
wants() { [[ $STEPS == *",$1,"* ]]; }

if compgen -G "$ROOT/.whl/*.whl" >/dev/null; then
  step "wheels from .whl/ into /tmp/flexkd-site (benchmarks/gpu_wheels.sh made them)"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/flexkd-site \
    "$ROOT"/.whl/*.whl || exit 1
  export PYTHONPATH="/tmp/flexkd-site${PYTHONPATH:+:$PYTHONPATH}"
fi

step "environment"
"$PY" - <<'EOF' || { echo "gpu_check: torch cannot see a CUDA GPU here" >&2; exit 1; }
import torch
assert torch.cuda.is_available(), "no CUDA device"
p = torch.cuda.get_device_properties(0)
print(f"{p.name}: capability {p.major}.{p.minor}, {p.multi_processor_count} SMs, "
      f"{p.total_memory / 2**30:.0f} GiB; torch {torch.__version__}, CUDA {torch.version.cuda}")
EOF
if [[ -z "${FLEXKD_CUDA_ARCH_LIST:-}" ]]; then
  FLEXKD_CUDA_ARCH_LIST="$("$PY" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())')"
fi
export FLEXKD_CUDA_ARCH_LIST MAX_JOBS="${MAX_JOBS:-$(nproc)}"
if [[ -z "${CUDA_HOME:-}" ]] && command -v nvcc >/dev/null; then
  source "$ROOT/tools/cuda_home.sh"
  cuda_home_from_nvcc
fi
echo "FLEXKD_CUDA_ARCH_LIST=$FLEXKD_CUDA_ARCH_LIST MAX_JOBS=$MAX_JOBS CUDA_HOME=${CUDA_HOME:-unset}"

has_cuda_kernels() { "$PY" -c "from flexkd import _native; raise SystemExit(not _native.has_cuda_kernels())" 2>/dev/null; }
if wants build || ! has_cuda_kernels; then
step "build flexkd._C with CUDA (log: $RESULTS/build.log)"
# Without pip's help (no setuptools wheel here, say), build in place instead.
if ! "$PY" -m pip install --no-build-isolation --no-deps --no-index -e . >"$RESULTS/build.log" 2>&1; then
  echo "pip install -e . failed (tail of the log below); building in place with setup.py"
  tail -n 15 "$RESULTS/build.log"
  "$PY" setup.py build_ext --inplace >>"$RESULTS/build.log" 2>&1 || {
    tail -n 60 "$RESULTS/build.log"
    echo "gpu_check: the build failed" >&2
    exit 1
  }
fi
"$PY" - <<'EOF' || { echo "gpu_check: flexkd._C has no CUDA kernels" >&2; exit 1; }
from flexkd import _native
info = _native.build_info()
print({k: info.get(k) for k in ("torch_version", "cuda_kernels", "cuda_version", "cuda_archs")})
raise SystemExit(0 if info.get("cuda_kernels") else 1)
EOF
fi

TEST_STATUS="not run"
BENCH_STATUS=0
KD_STATUS=0
if wants tests; then
step "tests marked cuda (log: $RESULTS/tests.log)"
if ! "$PY" -c "import pytest" 2>/dev/null; then
  # Only from what is already on this machine (pip's find-links or cache): nothing is downloaded.
  "$PY" -m pip install --quiet --no-index pytest >/dev/null 2>&1 || true
fi
if "$PY" -c "import pytest" 2>/dev/null; then
  parallel=()  # a few workers share the GPU; the reference side of each test runs on the CPU
  "$PY" -c "import xdist" 2>/dev/null && parallel=(-n 4)
  # a module that cannot be imported here (a package this machine lacks) must not stop the others
  timeout "${GPU_CHECK_TEST_TIMEOUT:-150}" "$PY" -m pytest -m cuda -q --maxfail=25 -p no:cacheprovider \
    --continue-on-collection-errors "${parallel[@]}" tests 2>&1 | tee "$RESULTS/tests.log" | tail -n 25
  status=${PIPESTATUS[0]}
  TEST_STATUS="exit $status"
  [[ $status == 124 ]] && TEST_STATUS="timed out after ${GPU_CHECK_TEST_TIMEOUT:-150}s"
else
  echo "SKIPPED: the cuda tests need pytest, which is not installed here and cannot be downloaded"
  TEST_STATUS="skipped (no pytest)"
fi
fi

if wants bench; then
step "benchmarks (bench_gpu.py)"
timeout "${GPU_CHECK_BENCH_TIMEOUT:-150}" "$PY" benchmarks/bench_gpu.py --json "$RESULTS/bench.json" \
  2>&1 | tee "$RESULTS/bench.log"
BENCH_STATUS=${PIPESTATUS[0]}
extract_table "$RESULTS/bench.log" >"$RESULTS/bench.md"
fi

if wants kd; then
step "linear_logit_kd (flexkd bench --suite linear_logit_kd --kd-device cuda; log: $RESULTS/linear_logit_kd.log)"
KD_IMPLS=fused,fused-triton,eager,compile
if "$PY" -c "import liger_kernel.transformers" 2>/dev/null; then
  KD_IMPLS+=",liger"
else
  echo "Liger-Kernel is not importable here (no wheel in .whl/: benchmarks/gpu_wheels.sh): no liger path"
fi
timeout "${GPU_CHECK_KD_TIMEOUT:-120}" "$PY" -m flexkd bench --suite linear_logit_kd --kd-device cuda \
  --n 8192 --vocab 151936 --hidden 1024 --dtypes bf16 --kd-impls "$KD_IMPLS" --kd-reps 5 \
  --kd-out "$RESULTS/linear_logit_kd" 2>&1 | tee "$RESULTS/linear_logit_kd.log"
KD_STATUS=${PIPESTATUS[0]}
fi
if wants kd-topk; then
step "linear_logit_kd against a top-128 teacher (forward KL, JSD; log: $RESULTS/linear_logit_kd_topk.log)"
timeout "${GPU_CHECK_KD_TOPK_TIMEOUT:-90}" "$PY" -m flexkd bench --suite linear_logit_kd --kd-device cuda \
  --n 8192 --vocab 151936 --hidden 1024 --dtypes bf16 --kd-impls fused,fused-triton,eager,compile \
  --kd-kinds forward_kl,jsd --kd-topk 128 --kd-reps 3 --kd-out "$RESULTS/linear_logit_kd_topk" 2>&1 \
  | tee "$RESULTS/linear_logit_kd_topk.log"
KD_STATUS=$((KD_STATUS | PIPESTATUS[0]))
fi

if wants overhead; then
step "per-call cost of flex_feature_loss at N=8192 D=4096 k=2048 fp32 (call_overhead.py; log: $RESULTS/overhead.log)"
for backend in cuda triton; do
  timeout "${GPU_CHECK_OVERHEAD_TIMEOUT:-30}" "$PY" benchmarks/call_overhead.py --device cuda --backend $backend \
    --n 8192 --d 4096 --k 2048 --calls 200 --loops 5 2>&1 | tee -a "$RESULTS/overhead.log"
done
fi

step "done ($STEPS): tests $TEST_STATUS, benchmark exit $BENCH_STATUS, linear_logit_kd exit $KD_STATUS"
[[ -f "$RESULTS/bench.md" ]] && cat "$RESULTS/bench.md"
for log in "$RESULTS/linear_logit_kd.log" "$RESULTS/linear_logit_kd_topk.log"; do
  [[ -f $log ]] && grep '^N[0-9]*-V' "$log"
done
[[ -f "$RESULTS/overhead.log" ]] && cat "$RESULTS/overhead.log"
[[ ( "$TEST_STATUS" == "exit 0" || "$TEST_STATUS" == "not run" ) && $BENCH_STATUS == 0 && $KD_STATUS == 0 ]]
