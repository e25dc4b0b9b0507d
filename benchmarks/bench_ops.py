"""CPU op benchmark (the code is ``flexkd.bench.ops_cpu``; ``flexkd bench --device cpu`` runs it too).

    python benchmarks/bench_ops.py --quick              # the target shapes only (a few minutes)
    python benchmarks/bench_ops.py                      # the full sweep (long)
    python benchmarks/bench_ops.py --filter 'mse-fp32-N8192-D2048'

Writes benchmarks/results/ops_cpu.csv and .png unless ``--out PREFIX`` says otherwise.
"""

from __future__ import annotations

import sys
from pathlib import Path

from flexkd.bench import ops_cpu

if __name__ == "__main__":
    sys.exit(ops_cpu.main(out_default=Path(__file__).resolve().parent / "results" / "ops_cpu"))
