#!/usr/bin/env bash
# Regenerates every CPU table of benchmarks/README.md in one go, meant for an idle machine (nothing
# else running: the script prints the load average first and refuses to start above MAX_LOAD unless
# FORCE=1). Writes into benchmarks/results/ (or the directory given):
#   ops_cpu_mse.{csv,png}          mse at N=8192 D=2048 k=768, both teacher layouts, 1 and 2 threads,
#                                  against the user's formula eager and compiled, with the copy floor
#   ops_cpu_small_n.{csv,png}      mse at N in {64, 512, 4096, 32768}, 1 and 2 threads
#   ops_cpu_corr_importance.{csv,png}  corr (fwd+bwd) and importance (fwd), 1 and 2 threads
#   profile_mse_cpu.md             where the mse fwd+bwd time goes (benchmarks/profile_mse_cpu.py)
#   measure_cpu.log                everything printed, with the load average and the machine
#
#   bash benchmarks/measure_cpu.sh [results-dir]       # about 20-30 minutes on an idle 2-core machine
#
# Environment: PYTHON (default python3), MAX_LOAD (default 1.5), FORCE=1 to run on a loaded machine.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
RESULTS="${1:-$ROOT/benchmarks/results}"
PY="${PYTHON:-python3}"
mkdir -p "$RESULTS"
cd "$ROOT"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
unset OMP_NUM_THREADS  # --threads sets the count per case

load="$(cut -d' ' -f1 /proc/loadavg)"
if [[ "${FORCE:-0}" != 1 ]] && "$PY" -c "import sys; sys.exit(float('$load') <= float('${MAX_LOAD:-1.5}'))"; then
  echo "measure_cpu: load average $load > ${MAX_LOAD:-1.5}; the numbers would be the other jobs'." >&2
  echo "measure_cpu: wait for an idle machine, or FORCE=1 to measure anyway." >&2
  exit 3
fi

{
  echo "== measure_cpu $(date -u '+%Y-%m-%d %H:%M UTC'), load average $(cut -d' ' -f1-3 /proc/loadavg)"
  echo "== $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(nproc) cores"
  "$PY" -c "from flexkd import _native; i = _native.build_info(); print('== cpu_isa', i['cpu_isa'], '| torch', i['torch_version'])"

  echo; echo "== mse target shape, both layouts, 1 and 2 threads"
  "$PY" benchmarks/bench_ops.py --quick --ops mse --threads 1,2 --out "$RESULTS/ops_cpu_mse"

  echo; echo "== small N"
  "$PY" benchmarks/bench_ops.py --quick --small-n --ops mse --layouts contiguous --threads 1,2 \
    --copy-gib 0 --out "$RESULTS/ops_cpu_small_n"

  echo; echo "== corr and importance"
  "$PY" benchmarks/bench_ops.py --quick --ops corr,importance --layouts contiguous --threads 1,2 \
    --copy-gib 0 --out "$RESULTS/ops_cpu_corr_importance"

  echo; echo "== where the mse time goes"
  "$PY" benchmarks/profile_mse_cpu.py | tee "$RESULTS/profile_mse_cpu.md"

  echo; echo "== done $(date -u '+%H:%M UTC'), load average $(cut -d' ' -f1-3 /proc/loadavg)"
} 2>&1 | tee "$RESULTS/measure_cpu.log"
