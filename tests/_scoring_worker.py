"""One rank of the distributed scoring test: ``torchrun --nproc_per_node N _scoring_worker.py MODEL_DIR BATCHES OUT``.

Loads the teacher and the batches the test saved, scores this rank's share (batches rank, rank + N, ...)
with gloo, and rank 0 saves the all-reduced selection to OUT.
"""

import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import transformers  # noqa: E402

import flexkd  # noqa: E402


def main(model_dir: str, batches_path: str, out_path: str) -> None:
    dist.init_process_group("gloo")
    try:
        rank, world = dist.get_rank(), dist.get_world_size()
        teacher = transformers.AutoModelForCausalLM.from_pretrained(model_dir).eval()
        batches = torch.load(batches_path)
        selection = flexkd.score(teacher, batches[rank::world], layers=[1, -1], k=8, progress=False)
        if rank == 0:
            selection.save(out_path)
        dist.barrier()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:4])
