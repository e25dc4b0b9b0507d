"""The teacher check on an MPNet teacher (the 2:1 pair's): every layer, top-k / random-k / bottom-k, k = half
the width, on a tiny random MPNet."""

import torch
from transformers import MPNetConfig, MPNetForSequenceClassification

import flexkd
from flexkd_lab.experiments.plots import plot_teacher_check
from flexkd_lab.experiments.study import teacher_check_table
from flexkd_lab.experiments.teacher_check import run_teacher_check


def test_every_layer_of_an_mpnet_teacher_is_checked(tmp_path):
    torch.manual_seed(0)
    config = MPNetConfig(
        vocab_size=50, hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64,
        num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )  # fmt: skip
    teacher = MPNetForSequenceClassification(config).eval()
    batch = {
        "input_ids": torch.randint(5, 50, (6, 9)),
        "attention_mask": torch.ones(6, 9, dtype=torch.long),
        "labels": torch.tensor([0, 1, 2, 0, 1, 2]),
    }
    layers = [1, 2, 3]
    selection = flexkd.score(teacher, [batch], layers=layers, k=16, progress=False)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    intact = teacher(**inputs).logits

    def evaluate(model):
        with torch.no_grad():
            return {"accuracy": float((model(**inputs).logits - intact).abs().mean())}

    rows = run_teacher_check(teacher, {layer: selection.scores(layer) for layer in layers}, 16, evaluate)
    conditions = {r["condition"] for r in rows if r["layer"] is not None}
    assert conditions == {"zero top-16", "zero random 16", "zero bottom-16"}  # bottom-16 is the lower half
    assert sorted({r["layer"] for r in rows if r["layer"] is not None}) == layers
    assert all(r["accuracy"] > 0 for r in rows if r["layer"] is not None)  # each zeroing changed the logits
    check = {"rows": rows, "mass_in_top_k": {str(layer): 0.5 for layer in layers}, "distilled_layers": [3]}
    table = teacher_check_table(check, "accuracy")
    assert [set(r) for r in table] == [{"layer", "top", "random", "bottom", "mass"}] * 3
    assert plot_teacher_check([("debian-sections", table, 0.0, "accuracy")], tmp_path / "check.png").is_file()
