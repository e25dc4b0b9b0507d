"""Cost of a Flex-KD scoring pass against a plain teacher forward over the same data.

    PYTHONPATH=. python benchmarks/bench_scoring.py --model minilm --batches 8 --batch-size 8 --seq-len 128

Three ways over the same batches: ``forward`` (teacher forward with labels under no_grad, the
baseline), ``flexkd.score`` for the given layer (gradient w.r.t. the tapped hidden state only), and
``naive`` (output_hidden_states, retain_grad, full backward through the whole model). The target is
``score / forward <= 1.3`` for the last layer. Runs are interleaved round by round; the table gives
the minimum over rounds (the least disturbed by other load) and the median.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _bench_hf as hf  # noqa: E402

import flexkd  # noqa: E402


def plain_forward(model, batches) -> None:
    with torch.no_grad():
        for batch in batches:
            model(**batch)


def naive_scoring(model, batches, layer: int) -> None:
    """What scoring costs without flexkd: all hidden states, full backward, |h * g| summed."""
    params = [p for p in model.parameters() if not p.requires_grad]
    for p in params:
        p.requires_grad_(True)
    try:
        for batch in batches:
            out = model(**batch, output_hidden_states=True)
            hidden = out.hidden_states[layer]
            hidden.retain_grad()
            out.loss.backward()
            (hidden.detach() * hidden.grad).abs().sum((0, 1))
            model.zero_grad(set_to_none=True)
    finally:
        for p in params:
            p.requires_grad_(False)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", choices=hf.MODELS, default="minilm")
    parser.add_argument("--layers", type=int, nargs="+", default=[-1], help="layers to score")
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--no-naive", action="store_true", help="skip the full-backward baseline")
    parser.add_argument(
        "--out", type=Path, default=None, help="also write the results as JSON here"
    )
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    model = hf.load_model(args.model, args.device)
    batches = hf.make_batches(model, args.batches, args.batch_size, args.seq_len)
    k = model.config.hidden_size // 2
    runs = {"forward": lambda: plain_forward(model, batches)}
    for layer in args.layers:
        runs[f"score {layer}"] = lambda layer=layer: flexkd.score(
            model, batches, layers=[layer], k=k, progress=False
        )
        if not args.no_naive:
            runs[f"naive {layer}"] = lambda layer=layer: naive_scoring(model, batches, layer)
    times = hf.interleaved_seconds(runs, args.repeats, args.device)

    tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    print(
        f"# bench_scoring: {args.model}, {args.batches} batches x {args.batch_size} x {args.seq_len} "
        f"({tokens} real tokens), {args.repeats} interleaved rounds; {hf.environment(args.device)}"
    )
    print("| run | min s | median s | min / forward min | median / forward median |")
    print("|---|---|---|---|---|")
    base = times["forward"]
    for name, t in times.items():
        print(
            f"| {name} | {t['min']:.3f} | {t['median']:.3f} | {t['min'] / base['min']:.2f}x "
            f"| {t['median'] / base['median']:.2f}x |"
        )
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.out.with_suffix(".tmp")
        tmp.write_text(
            json.dumps({"args": vars(args) | {"out": str(args.out)}, "seconds": times}, indent=2)
        )
        tmp.replace(args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
