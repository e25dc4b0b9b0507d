"""``flexkd distill cfg.yaml``: distil the student (scoring the teacher first when the selection is missing).

Resumes from the newest intact checkpoint under ``<output_dir>/checkpoints`` (damaged newer ones
are named and skipped) unless ``train.resume`` is false, and only with the config recorded in
``<output_dir>/run_config.json`` up to the fields that cannot change the result (see
``flexkd.training.run_dir.RESULT_NEUTRAL_FIELDS``); the same command runs under
``torchrun``/``accelerate launch``.
"""

from __future__ import annotations

import argparse

from flexkd.config import add_config_arguments, config_from_args


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from flexkd.training import train

    result = train(config_from_args(args))
    if result.is_main_process:
        print(
            f"student after {result.steps} steps: {result.student_dir} (metrics: {result.metrics_path})"
        )
    return 0
