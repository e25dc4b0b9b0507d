"""Peak memory per rank of a teacher forward + tap (the Distiller's hot path), replicated vs FSDP2-sharded.

    python benchmarks/fsdp_memory.py                          # 12-layer, 1024-wide Llama, 2 ranks (gloo, CPU)
    python benchmarks/fsdp_memory.py --layers 2 --hidden 256 --vocab 1000 --tokens 64 --k 64  # reduced

Each mode runs in its own ``torchrun --nproc_per_node N``. The teacher (random weights, built from a
config) is created on the meta device and materialised already sharded, so the sharded ranks never hold
the full model. Per rank it reports the resident memory (RSS) before the forward and the peak RSS
during it (``/proc/self/clear_refs`` resets the peak, Linux), both minus the RSS of the process before
the teacher's memory was allocated (torch, transformers and the model code loaded). Random weights:
this measures memory, not quality.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

MIB = 2**20


def rss_mib(field: str) -> float:
    """``VmRSS`` (now) or ``VmHWM`` (peak since the last reset) of this process, in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024 / MIB
    raise RuntimeError(f"no {field} in /proc/self/status")


def reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")


def llama_config(args):
    import transformers as tf

    return tf.LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.hidden * 11 // 4,
        num_hidden_layers=args.layers,
        num_attention_heads=args.hidden // 64,
        num_key_value_heads=args.hidden // 64,
        max_position_embeddings=args.tokens,
    )


def materialise_random(model) -> None:
    """Allocate a (possibly sharded) meta-device Llama on the CPU with N(0, 0.02) weights."""
    import torch

    model.to_empty(device="cpu")
    with torch.no_grad():
        for param in model.parameters():
            local = param.to_local() if hasattr(param, "to_local") else param
            local.normal_(0.0, 0.02)
    rotary = model.model.rotary_emb  # its buffers are computed, not loaded: build them again
    model.model.rotary_emb = type(rotary)(config=model.config)


def torchrun_each(script: str, flag: str, values, nproc: int) -> list[dict]:
    """``script`` (with this command's arguments) under ``torchrun --nproc_per_node nproc`` once per
    value of ``flag``; each rank writes ``<out>/<value>-<rank>.json``, returned in order."""
    rows = []
    with tempfile.TemporaryDirectory() as out:
        for value in values:
            command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
            command += ["--nproc_per_node", str(nproc), script, *sys.argv[1:]]
            command += [flag, value, "--out", out]
            env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
            subprocess.run(command, check=True, env=env)
            rows += [json.loads(Path(out, f"{value}-{r}.json").read_text()) for r in range(nproc)]
    return rows


def worker(args) -> None:
    import torch
    import torch.distributed as dist
    import transformers as tf

    from flexkd.distributed import shard_model
    from flexkd.taps import LayerTap

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    import torch.distributed.fsdp  # noqa: F401  (imported before the baseline, as the model code is)

    torch.manual_seed(0)
    with torch.device("meta"):
        teacher = tf.LlamaForCausalLM(llama_config(args))
    base = rss_mib("VmRSS")
    if args.mode == "sharded":
        shard_model(teacher)
    materialise_random(teacher)
    teacher.eval().requires_grad_(False)
    ids = torch.randint(
        0, args.vocab, (args.batch, args.tokens), generator=torch.Generator().manual_seed(1)
    )
    columns = {-1: torch.arange(args.k)}
    dist.barrier()
    before = rss_mib("VmRSS")
    reset_peak()
    with torch.no_grad(), LayerTap(teacher, [-1], columns=columns, stop_after_deepest=True) as tap:
        tap.run(input_ids=ids)
        kept = tap.hidden[-1]
    peak = rss_mib("VmHWM")
    assert kept.shape == (args.batch, args.tokens, args.k)
    local_params = sum(
        (p.to_local() if hasattr(p, "to_local") else p).numel() * p.element_size()
        for p in teacher.parameters()
    )
    row = {
        "mode": args.mode,
        "rank": rank,
        "world": world,
        "params_mib": local_params / MIB,
        "resident_mib": before - base,
        "forward_peak_mib": peak - base,
    }
    Path(args.out, f"{args.mode}-{rank}.json").write_text(json.dumps(row))
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--k", type=int, default=256, help="kept teacher columns")
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--mode", choices=["replicated", "sharded"], help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.mode is not None:
        return worker(args)

    rows = torchrun_each(__file__, "--mode", ("replicated", "sharded"), args.nproc)
    print(
        f"Llama {args.layers} layers x {args.hidden} wide, vocab {args.vocab}, fp32, batch "
        f"{args.batch} x {args.tokens} tokens, tap at the last layer keeping {args.k} columns, "
        f"{args.nproc} ranks (gloo, CPU); MiB per rank above the RSS before the teacher's memory"
    )
    print(f"{'mode':<11} {'rank':>4} {'params':>9} {'resident':>9} {'fwd peak':>9}")
    for row in rows:
        print(
            f"{row['mode']:<11} {row['rank']:>4} {row['params_mib']:>9.1f} "
            f"{row['resident_mib']:>9.1f} {row['forward_peak_mib']:>9.1f}"
        )
    replicated = max(r["forward_peak_mib"] for r in rows if r["mode"] == "replicated")
    sharded = max(r["forward_peak_mib"] for r in rows if r["mode"] == "sharded")
    print(f"sharded / replicated forward peak (max over ranks): {sharded / replicated:.3f}")


if __name__ == "__main__":
    main()
