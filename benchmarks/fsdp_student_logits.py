"""Peak memory per rank of a sharded (FSDP2) student's distillation step: fused vs materialised logits.

    python benchmarks/fsdp_student_logits.py               # 4-layer, 512-wide Llama student, vocab 128k, 2 ranks
    python benchmarks/fsdp_student_logits.py --vocab 4000 --tokens 64   # reduced

The student and a 2-layer teacher of the same vocabulary (random weights, built on the meta device and
materialised already sharded) take one Distiller forward + backward of ``batch x tokens`` positions with
the task and logit-KD terms, ``logit_kd_backend="fused"`` (the head computes both terms through
``flexkd.ops.linear_logit_kd`` while FSDP holds its weight) and ``"materialised"`` (the student's
``[B, T, V]`` logits and ``flexkd.losses``), each in its own ``torchrun``. Per rank: the peak resident
memory during the step (``VmHWM`` after a reset, Linux) above the resident memory before it, and the
step's wall time. Random weights: this measures memory, not quality.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from fsdp_memory import llama_config, materialise_random, reset_peak, rss_mib, torchrun_each

PATHS = ("materialised", "fused")


def build(config, seed: int):
    import torch
    import transformers as tf

    from flexkd.distributed import shard_model

    torch.manual_seed(seed)
    with torch.device("meta"):
        model = tf.LlamaForCausalLM(config)
    shard_model(model)
    materialise_random(model)
    return model


def worker(args) -> None:
    import torch
    import torch.distributed as dist

    from flexkd.distill import Distiller

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    student = build(llama_config(args), seed=0)
    teacher_args = argparse.Namespace(**{**vars(args), "layers": 2})
    teacher = build(llama_config(teacher_args), seed=1).eval().requires_grad_(False)
    distiller = Distiller(
        teacher,
        student,
        feature="none",
        weights={"task": 1.0, "logit": 1.0},
        logit_kd_backend=args.path,
    )
    generator = torch.Generator().manual_seed(2 + rank)
    ids = torch.randint(0, args.vocab, (args.batch, args.tokens), generator=generator)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    distiller(batch)[0].backward()  # the first step checks the head against the model's logits
    student.zero_grad(set_to_none=True)
    dist.barrier()
    before = rss_mib("VmRSS")
    reset_peak()
    started = time.perf_counter()
    loss, _ = distiller(batch)
    loss.backward()
    seconds = time.perf_counter() - started
    peak = rss_mib("VmHWM")
    assert distiller.logit_kd_path == args.path
    row = {
        "path": args.path,
        "rank": rank,
        "step_peak_mib": peak - before,
        "step_s": seconds,
        "loss": float(loss.detach()),
    }
    Path(args.out, f"{args.path}-{rank}.json").write_text(json.dumps(row))
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=128000)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--path", choices=PATHS, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.path is not None:
        return worker(args)

    rows = torchrun_each(__file__, "--path", PATHS, args.nproc)
    print(
        f"sharded Llama student {args.layers} layers x {args.hidden} wide, vocab {args.vocab}, fp32, "
        f"batch {args.batch} x {args.tokens} tokens, task + logit KD, {args.nproc} ranks (gloo, CPU); "
        "step peak = MiB above the RSS before the step"
    )
    print(f"{'path':<13} {'rank':>4} {'step peak':>10} {'step s':>7} {'loss':>9}")
    for row in rows:
        print(
            f"{row['path']:<13} {row['rank']:>4} {row['step_peak_mib']:>10.1f} "
            f"{row['step_s']:>7.2f} {row['loss']:>9.4f}"
        )
    peak = {p: max(r["step_peak_mib"] for r in rows if r["path"] == p) for p in PATHS}
    print(f"fused / materialised step peak (max over ranks): {peak['fused'] / peak['materialised']:.3f}")


if __name__ == "__main__":
    main()
