"""Teacher cost during distillation: column-keeping tap + early exit vs ``output_hidden_states=True``.

    PYTHONPATH=. python benchmarks/bench_taps.py --model gpt2-124m --batches 8 --batch-size 8 --seq-len 128

The teacher needs k columns of one layer (no loss, so no labels). Modes, all under ``torch.no_grad``:
``hidden_states``: ``model(**batch, output_hidden_states=True)`` then ``index_select`` of the layer (the
usual way: every layer's hidden state and the logits are materialised); ``tap``: ``LayerTap`` with
``columns`` and ``stop_after_deepest`` (the head and the layers above never run, only k columns are
kept); ``tap_columns``: the tap with columns but a full forward, to separate the two effects.
Peak memory is measured in a fresh process per mode, for one batch after a warm-up pass: the highest
resident set size sampled during the pass minus the size before it (glibc is told to return every
block of 128 KiB or more to the OS on free, so the resident set tracks live tensors), or on CUDA the
peak allocation minus the allocation before.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _bench_hf as hf  # noqa: E402

from flexkd.taps import LayerTap  # noqa: E402

MODES = ("hidden_states", "tap", "tap_columns")


def teacher_pass(mode: str, model, batches, layer: int, index: torch.Tensor) -> list[torch.Tensor]:
    kept = []
    with torch.no_grad():
        for labelled in batches:
            batch = {key: value for key, value in labelled.items() if key != "labels"}
            if mode == "hidden_states":
                out = model(**batch, output_hidden_states=True)
                kept.append(out.hidden_states[layer].index_select(-1, index))
                del out
            else:
                stop = mode == "tap"
                with LayerTap(
                    model, [layer], columns={layer: index}, stop_after_deepest=stop
                ) as tap:
                    tap.run(**batch)
                kept.append(tap.hidden[layer])
    return kept


def _setup(args):
    if args.threads:
        torch.set_num_threads(args.threads)
    model = hf.load_model(args.model, args.device)
    batches = hf.make_batches(model, args.batches, args.batch_size, args.seq_len)
    hidden = model.config.hidden_size
    index = torch.randperm(hidden, generator=torch.Generator().manual_seed(0))[: hidden // 2]
    return model, batches, index.to(args.device)


def measure_peak(args) -> float:
    """MiB the teacher pass of one batch adds at its peak, after a warm-up pass (run in a fresh process)."""
    model, batches, index = _setup(args)
    teacher_pass(args.child, model, batches[:1], args.layer, index)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        teacher_pass(args.child, model, batches[:1], args.layer, index)
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / 2**20
    with hf.RssPeak() as peak:
        teacher_pass(args.child, model, batches[:1], args.layer, index)
    return peak.extra_mib


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", choices=hf.MODELS, default="gpt2-124m")
    parser.add_argument("--layer", type=int, default=-1, help="the tapped teacher layer")
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--out", type=Path, default=None, help="also write the results as JSON here"
    )
    parser.add_argument("--child", choices=MODES, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps({"peak_mib": measure_peak(args)}))
        return 0

    peaks = {}
    for mode in MODES:
        child = [
            sys.executable,
            __file__,
            *(argv if argv is not None else sys.argv[1:]),
            "--child",
            mode,
        ]
        env = dict(os.environ, **hf.MALLOC_ENV)
        result = subprocess.run(child, capture_output=True, text=True, check=True, env=env)
        peaks[mode] = json.loads(result.stdout.strip().splitlines()[-1])["peak_mib"]

    model, batches, index = _setup(args)
    reference = teacher_pass("hidden_states", model, batches[:1], args.layer, index)[0]
    for mode in MODES[1:]:
        if not torch.equal(teacher_pass(mode, model, batches[:1], args.layer, index)[0], reference):
            raise SystemExit(
                f"bench_taps: mode {mode} captured different values than hidden_states"
            )
    runs = {
        mode: lambda mode=mode: teacher_pass(mode, model, batches, args.layer, index)
        for mode in MODES
    }
    times = hf.interleaved_seconds(runs, args.repeats, args.device)

    print(
        f"# bench_taps: {args.model}, layer {args.layer}, k={len(index)}, {args.batches} batches x "
        f"{args.batch_size} x {args.seq_len}, {args.repeats} interleaved rounds; {hf.environment(args.device)}"
    )
    print("| teacher pass | min s | median s | min / hidden_states | peak extra MiB (1 batch) |")
    print("|---|---|---|---|---|")
    base = times["hidden_states"]["min"]
    for mode in MODES:
        t = times[mode]
        print(
            f"| {mode} | {t['min']:.3f} | {t['median']:.3f} | {t['min'] / base:.2f}x | {peaks[mode]:.1f} |"
        )
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.out.with_suffix(".tmp")
        payload = {"args": vars(args) | {"out": str(args.out)}, "seconds": times, "peak_mib": peaks}
        tmp.write_text(json.dumps(payload, indent=2))
        tmp.replace(args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
