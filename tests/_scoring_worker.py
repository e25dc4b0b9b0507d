"""One rank of the distributed scoring test: ``torchrun --nproc_per_node N _scoring_worker.py MODEL_DIR ROWS OUT_DIR``.

Loads the teacher and the rows the test saved and, with gloo, writes two all-reduced selections from
rank 0: ``split.safetensors`` scores every row, this rank taking batches rank, rank + N, ... of the
rows cut into uneven batches; ``budget.safetensors`` scores ``max_rows=BUDGET`` of the rows dealt out
row by row (``rows_for_rank``), in left-padded batches of 2.
"""

import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).parent))

import _scoring_rows as rows_of  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import transformers  # noqa: E402

import flexkd  # noqa: E402
from flexkd.distributed import end_launched_rank  # noqa: E402
from flexkd.scoring import rows_for_rank  # noqa: E402

LAYERS = [1, -1]
K = 8
SIZES = [3, 1, 2]
BUDGET = 7


def main(model_dir: str, rows_path: str, out_dir: str) -> None:
    dist.init_process_group("gloo")
    try:
        rank, world = dist.get_rank(), dist.get_world_size()
        teacher = transformers.AutoModelForCausalLM.from_pretrained(model_dir).eval()
        rows = torch.load(rows_path)
        batches = rows_of.batches_of(rows, SIZES)[rank::world]
        split = flexkd.score(teacher, batches, layers=LAYERS, k=K, progress=False)
        mine = [rows[i] for i in rows_for_rank(len(rows), rank=rank, world_size=world)]
        budget = flexkd.score(
            teacher,
            rows_of.batches_of(mine, [2], "left"),
            layers=LAYERS,
            k=K,
            max_rows=BUDGET,
            progress=False,
        )
        if rank == 0:
            split.save(Path(out_dir) / "split.safetensors")
            budget.save(Path(out_dir) / "budget.safetensors")
        dist.barrier()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:4])
    end_launched_rank()
