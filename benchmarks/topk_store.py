"""Top-K teacher logits in the stored teacher outputs (``distill.teacher_topk``) against dense ones.

    python benchmarks/topk_store.py            # about 15 minutes on 2 busy CPU cores
    python benchmarks/topk_store.py --quick    # a reduced run (seconds), same code paths

Measures, in one run:
1. store size of the logits for ``examples/smoke_causal_lm.yaml`` (its 1,000 training rows) and for the
   study's synopsis rows (``debian-synopsis``, 9,600 training rows): dense ``positions x vocab x 4``
   bytes against top-K ``positions x K x (4 + 4)``, from the exact number of stored logit positions;
2. a teacher: the smoke config's GPT-2, fine-tuned on the smoke rows (``flexkd.training.finetune.fit``;
   an untrained teacher is near uniform, which makes top-K meaningless), then real stores (dense, K=32,
   K=128) on ``--rows`` rows: bytes on disk, and the tail mass (softmax mass outside the top K at T);
3. the logit-KD value of one fixed student against the dense and the top-K teacher (same positions);
4. a student distilled from each store with the same seed and budget, and its validation perplexity
   (one seed: differences below the seed-to-seed spread mean nothing).

Writes ``benchmarks/results/topk_store.json`` (``--out`` to change) and prints a markdown table.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "examples" / "smoke_causal_lm.yaml"
KS = (32, 128)


def logit_positions_of(rows, collate, task="causal_lm") -> int:
    from flexkd.adapters.masks import logit_positions

    total = 0
    for start in range(0, len(rows), 64):
        batch = collate([rows[i] for i in range(start, min(start + 64, len(rows)))])
        total += int(logit_positions(batch, task=task)[1].sum())
    return total


def sizes(positions: int, vocab: int) -> dict:
    return {
        "positions": positions,
        "vocab": vocab,
        "dense_bytes": positions * vocab * 4,
        **{f"top{k}_bytes": positions * k * 8 for k in KS},
    }


def smoke_config(overrides=()):
    from flexkd.config import load_config

    return load_config(SMOKE, list(overrides))


LOGIT_FILES = ("logits.npy", "logit_values.npy", "logit_indices.npy")


def logit_bytes(path: Path) -> int:
    return sum((path / name).stat().st_size for name in LOGIT_FILES if (path / name).is_file())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rows", type=int, default=256, help="training rows of the real stores and students")
    parser.add_argument("--teacher-steps", type=int, default=600)
    parser.add_argument("--student-steps", type=int, default=40)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "topk_store.json"))
    args = parser.parse_args(argv)
    if args.quick:
        args.rows, args.teacher_steps, args.student_steps = 32, 4, 2
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.manual_seed(0)

    from flexkd.commands.eval import evaluate
    from flexkd.losses import logit_kd
    from flexkd.teacher_outputs import write_teacher_outputs
    from flexkd.training import (
        Collator,
        build_model,
        build_splits,
        build_tokenizer,
        pad_token_id,
        train,
    )
    from flexkd.training.finetune import fit

    started = time.perf_counter()
    cfg = smoke_config()
    temperature = cfg.distill.temperature
    tokenizer = build_tokenizer(cfg)
    splits = build_splits(cfg, tokenizer)
    teacher = build_model(cfg, "teacher")
    collate = Collator("causal_lm", pad_token_id(tokenizer, teacher))
    train_rows = splits.get("train")
    vocab = teacher.config.vocab_size
    report = {"temperature": temperature, "sizes": {}, "quick": args.quick}
    report["sizes"]["smoke_causal_lm (1000 rows)"] = sizes(logit_positions_of(train_rows, collate), vocab)

    # the study's synopsis rows: the lab's task, its collation (labels on the synopsis only)
    try:
        from flexkd_lab.experiments.budget import study_budget
        from flexkd_lab.experiments.kits import training_rows
        from flexkd_lab.tasks import get_task

        task = get_task("debian-synopsis")
        n = study_budget("debian-synopsis").train_examples
        rows = training_rows(task, "train", 64 if args.quick else n)
        synopsis_collate = Collator("causal_lm", task.tokenizer.pad_token_id)
        report["sizes"][f"debian-synopsis study ({len(rows)} rows)"] = sizes(
            logit_positions_of(rows, synopsis_collate), len(task.tokenizer)
        )
    except ImportError as error:  # the lab is a separate distribution
        print(f"skipping the synopsis rows: {error}", file=sys.stderr)

    with tempfile.TemporaryDirectory(prefix="flexkd-topk-") as tmp:
        tmp = Path(tmp)
        subset = [train_rows[i] for i in range(args.rows)]
        # epochs: enough that max_steps is what stops it
        stats = fit(teacher, list(train_rows), collate, epochs=args.teacher_steps, max_steps=args.teacher_steps, batch_size=16,
                    lr=1e-3, warmup_ratio=0.05, seed=0, progress=False)  # fmt: skip
        report["teacher"] = {"steps": stats["steps"], "first_loss": stats["first_loss"],
                             "last_loss_mean20": stats["last_loss_mean20"]}  # fmt: skip
        teacher_dir = tmp / "teacher"
        teacher.save_pretrained(teacher_dir)

        stores = {}
        for name, k in (("dense", None), *((f"top{k}", k) for k in KS)):
            store = write_teacher_outputs(teacher, subset, tmp / f"store-{name}", layers=[-1],
                                          collate=collate, topk=k, temperature=temperature,
                                          batch_size=32, progress=False)  # fmt: skip
            stores[name] = store
            report.setdefault("stores", {})[name] = {
                "rows": len(subset),
                "logit_bytes_on_disk": logit_bytes(store.path),
                "tail_mass": store.tail_mass,
            }

        # KD of one fixed (untrained) student against each teacher, on the same positions
        student = build_model(cfg, "student").eval()
        kd = {}
        with torch.no_grad():
            batch_rows = list(range(len(subset)))
            batch = collate(subset)
            from flexkd.adapters.masks import aligned_logits, logit_positions

            positions = logit_positions(batch, task="causal_lm")[1]
            inputs = {k: v for k, v in batch.items() if k != "labels"}
            student_logits = aligned_logits(student(**inputs).logits, "causal_lm")[positions]
            for name, store in stores.items():
                out = store.batch(batch_rows)
                teacher_side = ({"teacher_logits": out.logits} if out.logit_topk is None
                                else {"teacher_topk": out.logit_topk})  # fmt: skip
                kd[name] = float(logit_kd(student_logits, **teacher_side, temperature=temperature))
        report["kd"] = {
            name: {"value": value, "relative_difference_to_dense": value / kd["dense"] - 1}
            for name, value in kd.items()
        }

        # a student from each store: same seed, same steps
        data = tmp / "train.jsonl"
        with gzip.open(cfg.path(cfg.data.train), "rt") as source, data.open("w") as target:
            for _, line in zip(range(args.rows), source, strict=False):
                target.write(line)
        validation = splits.get("validation")
        validation = [validation[i] for i in range(min(len(validation), 64 if args.quick else 1000))]
        students = {}
        for name in stores:
            overrides = [
                f"model.teacher={teacher_dir}", f"data.train={data}",
                f"distill.teacher_outputs={stores[name].path}", f"train.output_dir={tmp / ('run-' + name)}",
                f"train.max_steps={args.student_steps}", "train.checkpoint_every=null", "train.progress=false",
                "train.log_every=10", "train.seed=0",
                *([f"distill.teacher_topk={name.removeprefix('top')}"] if name != "dense" else []),
            ]  # fmt: skip
            run_cfg = smoke_config(overrides)
            result = train(run_cfg)
            trained = type(student).from_pretrained(result.student_dir)
            metrics = evaluate(trained, validation, collate, task="causal_lm", batch_size=32, progress=False)
            students[name] = {"perplexity": metrics["perplexity"], "loss": metrics["loss"],
                              "validation_rows": len(validation)}  # fmt: skip
        report["students"] = {"steps": args.student_steps, "seed": 0, "training_rows": args.rows,
                              "by_store": students}  # fmt: skip
    report["seconds"] = round(time.perf_counter() - started, 1)

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(render(report))
    return 0


def render(report: dict) -> str:
    mb = lambda b: f"{b / 2**20:,.1f} MiB"  # noqa: E731
    lines = ["| rows | logit positions | vocab | dense | top-32 | top-128 |", "|---|---|---|---|---|---|"]
    for name, s in report["sizes"].items():
        lines.append(f"| {name} | {s['positions']:,} | {s['vocab']:,} | {mb(s['dense_bytes'])} | "
                     f"{mb(s['top32_bytes'])} | {mb(s['top128_bytes'])} |")  # fmt: skip
    t = report["temperature"]
    lines += ["", f"| store ({report['stores']['dense']['rows']} rows) | logits on disk | tail mass mean (T={t:g}) "
              "| tail mass max | KD vs this teacher | KD rel. diff to dense | student perplexity |",
              "|---|---|---|---|---|---|---|"]  # fmt: skip
    for name, store in report["stores"].items():
        tail = store["tail_mass"]
        mean, most = (f"{tail['mean']:.4f}", f"{tail['max']:.4f}") if tail else ("-", "-")
        kd = report["kd"][name]
        student = report["students"]["by_store"][name]
        lines.append(f"| {name} | {mb(store['logit_bytes_on_disk'])} | {mean} | {most} | "
                     f"{kd['value']:.4f} | {kd['relative_difference_to_dense']:+.2%} | {student['perplexity']:.2f} |")  # fmt: skip
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
