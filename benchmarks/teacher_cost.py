"""What one optimizer step of each study teacher costs on this machine (1 thread, ``time.thread_time``).

    OMP_NUM_THREADS=1 python benchmarks/teacher_cost.py --out benchmarks/results/teacher_cost.json

Times a forward + backward + AdamW step of the MiniLM-L6 and all-mpnet-base-v2 classifiers (20 classes,
fresh heads) on real debian-sections rows truncated at 128 tokens, at batch 16 and 32 (the first step of
each is a warm-up and is not counted), and one no-grad forward of the last batch. Prints the medians, the
padded lengths and the load average; extrapolate with the recipes in ``flexkd_lab.tasks.pairs``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch


def step_costs(path: str, texts: list[str], batch_sizes=(16, 32), steps: int = 5, max_length: int = 128) -> dict:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=20).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    generator = torch.Generator().manual_seed(0)
    result = {}
    for size in batch_sizes:
        times, lengths = [], []
        for i in range(steps + 1):
            batch = tokenizer(
                texts[i * size : (i + 1) * size], truncation=True, max_length=max_length,
                padding=True, return_tensors="pt",
            )  # fmt: skip
            labels = torch.randint(0, 20, (size,), generator=generator)
            started = time.thread_time()
            model(**batch, labels=labels).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            if i:
                times.append(time.thread_time() - started)
                lengths.append(int(batch["input_ids"].shape[1]))
        with torch.no_grad():
            model.eval()
            started = time.thread_time()
            model(**batch)
            forward = time.thread_time() - started
            model.train()
        result[f"batch {size}"] = {
            "step_s_median": statistics.median(times),
            "steps_s": times,
            "padded_length": lengths,
            "eval_forward_s": forward,
            "load_average": os.getloadavg(),
        }
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="write the numbers to this JSON file")
    args = parser.parse_args()
    torch.set_num_threads(1)
    from flexkd_lab.data import load_task
    from flexkd_lab.tasks.minilm import minilm_path
    from flexkd_lab.tasks.mpnet import mpnet_path

    texts = list(load_task("debian-sections", "train")["text"])[:200]
    results = {"minilm": step_costs(minilm_path(), texts), "mpnet": step_costs(mpnet_path(), texts)}
    print(json.dumps(results, indent=1))
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
