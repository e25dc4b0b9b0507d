"""The training loop: exact resume after a crash, token-normalised accumulation, metrics, CLI end to end."""

import json
import shutil

import pytest
import torch
from _train_helpers import write_causal_config
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from flexkd.checkpoint import list_checkpoints
from flexkd.config import load_config
from flexkd.distill import Distiller
from flexkd.train import train


def _metrics(cfg):
    return [
        json.loads(line) for line in (cfg.output_dir / "metrics.jsonl").read_text().splitlines()
    ]


def _student(cfg):
    return AutoModelForCausalLM.from_pretrained(cfg.student_path).state_dict()


class _InjectedCrash(RuntimeError):
    pass


def test_run_crashed_mid_step_resumes_to_identical_weights(tmp_path, monkeypatch):
    overrides = {"max_steps": 6, "grad_accum": 2, "checkpoint_every": 2, "keep_checkpoints": 2}
    distill = {"feature": "projector", "weights": {"task": 1.0, "logit": 0.5, "feature": 1.0}}
    whole_dir, crash_dir = tmp_path / "whole", tmp_path / "crash"
    whole_dir.mkdir()
    whole = load_config(
        write_causal_config(whole_dir, train=overrides, distill=distill, dropout=0.1)
    )
    train(whole)

    crash_dir.mkdir()
    for name in ("train.jsonl", "val.jsonl"):
        shutil.copy(whole_dir / name, crash_dir / name)
    crashed = load_config(
        write_causal_config(crash_dir, train=overrides, distill=distill, dropout=0.1)
    )
    real_forward, calls = Distiller.forward, []

    def crash_in_step_five(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2 * 4 + 2:  # second micro-batch of step 5, after the step-4 checkpoint
            raise _InjectedCrash("simulated crash")
        return real_forward(self, *args, **kwargs)

    monkeypatch.setattr(Distiller, "forward", crash_in_step_five)
    with pytest.raises(_InjectedCrash):
        train(crashed)
    monkeypatch.setattr(Distiller, "forward", real_forward)
    assert [p.name for p in list_checkpoints(crashed.output_dir / "checkpoints")] == [
        "step-000002",
        "step-000004",
    ]
    assert not crashed.student_path.exists()

    train(crashed)  # resumes from step 4

    want, got = _student(whole), _student(crashed)
    assert want.keys() == got.keys()
    for name in want:
        assert torch.equal(want[name], got[name]), name
    whole_metrics, crashed_metrics = _metrics(whole), _metrics(crashed)
    assert [m["step"] for m in crashed_metrics] == list(range(1, 7))
    for a, b in zip(whole_metrics, crashed_metrics, strict=True):
        assert {k: v for k, v in a.items() if k != "elapsed_s"} == {
            k: v for k, v in b.items() if k != "elapsed_s"
        }
    assert {"task", "logit", "feature", "total", "lr", "grad_norm", "units_task"} <= set(
        whole_metrics[0]
    )
    # checkpoints: the last two kept, each with the projector outside the student
    newest = list_checkpoints(whole.output_dir / "checkpoints")
    assert [p.name for p in newest] == ["step-000004", "step-000006"]
    assert "0.projector.weight" in load_file(str(newest[-1] / "feature_losses.safetensors"))
    saved_keys = load_file(str(whole.student_path / "model.safetensors")).keys()
    assert not any("projector" in key for key in saved_keys)


def test_accumulation_normalises_by_valid_tokens_of_the_window(tmp_path):
    """4 rows in one micro-batch or 2 x 2 accumulated: the same gradient, because the loss is
    sum over the window / valid units of the window (with ragged padding a mean of means differs)."""
    results = {}
    for name, batch, accum in (("one", 4, 1), ("two", 2, 2)):
        folder = tmp_path / name
        folder.mkdir()
        if name == "two":
            for data in ("train.jsonl", "val.jsonl"):
                shutil.copy(tmp_path / "one" / data, folder / data)
        cfg = load_config(
            write_causal_config(
                folder,
                train={
                    "batch_size": batch,
                    "grad_accum": accum,
                    "max_steps": 3,
                    "max_grad_norm": 1.0e6,
                },
                distill={"feature": "cka", "weights": {"task": 1.0, "logit": 0.0, "feature": 0.0}},
                dropout=0.0,
            )
        )
        train(cfg)
        results[name] = _metrics(cfg)
    one, two = results["one"], results["two"]
    assert one[0]["units_task"] == two[0]["units_task"]
    assert two[0]["task"] == pytest.approx(one[0]["task"], rel=1e-5)
    assert two[0]["grad_norm"] == pytest.approx(one[0]["grad_norm"], rel=1e-4)
    for a, b in zip(one[1:], two[1:], strict=True):
        assert b["task"] == pytest.approx(a["task"], rel=1e-3)


def test_cli_score_distill_eval_end_to_end(tmp_path, capsys):
    from flexkd.cli import main
    from flexkd.selection import DimensionSelection
    from flexkd.train import build_model

    path = write_causal_config(
        tmp_path,
        train={"max_steps": 3, "checkpoint_every": 2},
        distill={"layer_pairs": [[1, 1], [-1, -1]], "feature_loss": "corr"},
    )
    path.write_text(path.read_text() + "eval: {models: [student, teacher], batch_size: 4}\n")
    cfg = load_config(path)

    assert main(["score", str(path), "--set", "selection.max_batches=2"]) == 0
    selection = DimensionSelection.load(cfg.selection_path, build_model(cfg, "teacher"))
    assert selection.layers == [1, 2] and selection.k == 16
    assert cfg.selection_path.with_suffix(".png").stat().st_size > 0

    assert main(["distill", str(path)]) == 0
    assert [m["step"] for m in _metrics(cfg)] == [1, 2, 3]
    assert AutoModelForCausalLM.from_pretrained(cfg.student_path).config.n_embd == 16

    assert main(["eval", str(path)]) == 0
    report = json.loads(cfg.eval_output.read_text())
    assert report["split"] == "validation" and set(report["models"]) == {"student", "teacher"}
    for metrics in report["models"].values():
        assert {"loss", "accuracy", "perplexity", "targets"} <= set(metrics) and metrics["loss"] > 0
    assert "student" in capsys.readouterr().out
