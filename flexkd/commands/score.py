"""``flexkd score cfg.yaml``: score the teacher's hidden dims and write the selection file.

Runs on one process or several (``torchrun``/``accelerate launch``): the ``selection.max_rows``
rows (default: the whole split) are dealt out row by row, each process scores its share, and scores,
token counts and the data fingerprint are summed across processes before the top k are chosen, so
the result is the same for any number of processes.
Writes ``selection.path`` (default ``<output_dir>/selection.safetensors``) and a PNG of the
sorted scores next to it.
"""

from __future__ import annotations

import argparse
import sys

from flexkd.config import add_config_arguments, config_from_args
from flexkd.errors import FlexKDError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    parser.add_argument(
        "--no-plot", action="store_true", help="do not write the PNG of sorted scores"
    )


def run(args: argparse.Namespace) -> int:
    from flexkd.distributed import check_sharding, shard_from_config
    from flexkd.training import (
        Collator,
        build_model,
        build_splits,
        build_tokenizer,
        make_accelerator,
        pad_token_id,
        score_selection,
        selection_k,
    )

    try:
        cfg = config_from_args(args)
        accelerator = make_accelerator()
        check_sharding(cfg, accelerator.num_processes)
        tokenizer = build_tokenizer(cfg)
        splits = build_splits(cfg, tokenizer)
        teacher = build_model(cfg, "teacher", num_labels=splits.num_labels).to(accelerator.device)
        shard_from_config(cfg, teacher, "teacher")
        k = selection_k(cfg, teacher, build_model(cfg, "student", num_labels=splits.num_labels))
        selection = score_selection(
            cfg,
            teacher,
            k,
            splits.get(cfg.selection.split),
            Collator(cfg.data.task, pad_token_id(tokenizer, teacher)),
            rank=accelerator.process_index,
            world_size=accelerator.num_processes,
        )
    except FlexKDError as error:
        print(f"flexkd score: error: {error}", file=sys.stderr)
        return 2
    if accelerator.is_main_process:
        path = cfg.selection_path
        path.parent.mkdir(parents=True, exist_ok=True)
        selection.save(path)
        if not args.no_plot:
            selection.plot(path.with_suffix(".png"))
        print(
            f"wrote {path} (teacher {selection.teacher_id}, k={selection.k}, {selection.tokens_seen} tokens)"
        )
        for layer in selection.layers:
            print(
                f"  layer {layer}: {100 * selection.mass_in_top_k(layer):.1f}% of the score mass in the top {selection.k}"
            )
    accelerator.wait_for_everyone()
    return 0
