"""Flex-KD inside a Hugging Face Trainer: score the teacher's hidden dims, then distil with FlexKDTrainer.

    python examples/hf_trainer.py --output-dir runs/hf-trainer
    torchrun --nproc_per_node 2 examples/hf_trainer.py --output-dir runs/hf-trainer --batch-size 2

The teacher and the student are small Llamas built from configs and the data are random token rows,
so it runs anywhere in seconds. For a real run, load both models with
``AutoModelForCausalLM.from_pretrained`` and pass a tokenized dataset; nothing else changes.
With ``--lora`` the student trains as a PEFT LoRA adapter (``pip install flexkd[peft]``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM, TrainingArguments

import flexkd
from flexkd.distributed import end_launched_rank

VOCAB = 128


def build_model(hidden: int, layers: int, seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=0,
    )
    return LlamaForCausalLM(config)


def token_rows(count: int, seed: int) -> list[dict[str, list[int]]]:
    """``count`` rows of 4-16 random tokens with a repeating pattern the student can learn."""
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(count):
        length = int(torch.randint(4, 17, (1,), generator=generator))
        start = int(torch.randint(1, VOCAB - 16, (1,), generator=generator))
        rows.append({"input_ids": [start + (i % 8) for i in range(length)]})
    return rows


def collate(rows: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
    """Right-pad to the longest row; labels are the ids, -100 on padding."""
    width = max(len(row["input_ids"]) for row in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, : len(row["input_ids"])] = torch.tensor(row["input_ids"])
        mask[i, : len(row["input_ids"])] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def next_token_accuracy(prediction) -> dict[str, float]:
    logits, labels = torch.as_tensor(prediction.predictions), torch.as_tensor(prediction.label_ids)
    predicted, target = logits[:, :-1].argmax(-1), labels[:, 1:]
    valid = target != -100
    return {"accuracy": float((predicted[valid] == target[valid]).float().mean())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", default="runs/hf-trainer")
    parser.add_argument("--max-steps", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=4, help="rows per process and step")
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--train-rows", type=int, default=64)
    parser.add_argument("--lora", action="store_true", help="train the student as a LoRA adapter")
    parser.add_argument(
        "--shard-teacher",
        action="store_true",
        help="with several processes: shard the teacher with FSDP2 (each holds 1/N of its weights)",
    )
    args = parser.parse_args()
    output_dir = Path(args.output_dir)

    # Creating the arguments first sets up torch.distributed under torchrun.
    training_args = TrainingArguments(
        output_dir=str(output_dir),
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum,
        max_steps=args.max_steps,
        learning_rate=3e-3,
        lr_scheduler_type="constant",
        logging_steps=2,
        eval_strategy="steps",
        eval_steps=4,
        save_steps=4,
        save_total_limit=1,
        load_best_model_at_end=True,
        metric_for_best_model="eval_loss",
        report_to=[],
        use_cpu=not torch.accelerator.is_available(),
        disable_tqdm=True,
        seed=0,
    )
    rank, world = training_args.process_index, training_args.world_size
    teacher, student = build_model(64, 4, seed=0), build_model(32, 2, seed=1)
    if args.lora:
        import peft

        lora = peft.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])
        student = peft.get_peft_model(student, lora)
    if args.shard_teacher and world > 1:
        from flexkd.distributed import shard_model

        shard_model(teacher.to(training_args.device))
    train_rows, eval_rows = token_rows(args.train_rows, seed=1), token_rows(16, seed=2)

    # 1. Score the teacher: each process scores its share of the rows; the scores are summed over
    #    processes, so every process holds the same selection.
    mine = train_rows[rank::world]
    batches = [collate(mine[i : i + 8]) for i in range(0, len(mine), 8)]
    selection = flexkd.score(teacher, batches, layers=[-1], k=32, progress=False)

    # 2. Distil inside the Trainer.
    distiller = flexkd.Distiller(
        teacher, student, selection=selection, weights={"task": 1.0, "logit": 0.5, "feature": 1.0}
    )
    trainer = flexkd.FlexKDTrainer(
        distiller,
        args=training_args,
        train_dataset=train_rows,
        eval_dataset=eval_rows,
        data_collator=collate,
        compute_metrics=next_token_accuracy,
    )
    trainer.train()
    trainer.save_model(str(output_dir / "student"))  # the student alone: from_pretrained loads it
    if trainer.is_world_process_zero():
        from flexkd.distributed import is_sharded

        summary = {
            "log_history": trainer.state.log_history,
            "world_size": world,
            "teacher_sharded": is_sharded(teacher),
        }
        (output_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        final = [e for e in trainer.state.log_history if "eval_feature" in e][-1]
        print(
            f"best checkpoint {trainer.state.best_model_checkpoint}; last eval: "
            + ", ".join(
                f"{k}={final[k]:.4f}"
                for k in ("eval_task", "eval_logit", "eval_feature", "eval_accuracy")
            )
        )


if __name__ == "__main__":
    main()
    end_launched_rank()  # a torchrun rank: close the process group and end (see its docstring)
