"""GPU op benchmark (the code is ``flexkd.bench.ops_gpu``; ``flexkd bench --device cuda`` runs it too).

    python benchmarks/bench_gpu.py                      # N=16384, D=4096, k=2048, bf16 and fp32
    python benchmarks/bench_gpu.py --n 4096 --json results.json
"""

from __future__ import annotations

import sys

from flexkd.bench import ops_gpu

if __name__ == "__main__":
    sys.exit(ops_gpu.main())
