"""``benchmarks/quality/teacher_check_logits.py`` on the study's --quick teacher: the logit shift of
every zeroing, against the intact teacher's own logits."""

import importlib.util
import json
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location(
    "teacher_check_logits", REPO / "benchmarks/quality/teacher_check_logits.py"
)
teacher_check_logits = importlib.util.module_from_spec(spec)
spec.loader.exec_module(teacher_check_logits)


def test_logit_shift_is_zero_for_the_same_logits_and_kl_otherwise():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.0, 1.0, 0.0]])
    assert teacher_check_logits.logit_shift(logits, logits) == {
        "kl_mean": 0.0,
        "kl_ci95": 0.0,
        "changed": 0.0,
    }
    flipped = logits.flip(-1)
    shift = teacher_check_logits.logit_shift(logits, flipped)
    p, q = logits.softmax(-1), flipped.softmax(-1)
    kl = (p * (p / q).log()).sum(-1)
    torch.testing.assert_close(torch.tensor(shift["kl_mean"]), kl.mean(), rtol=1e-5, atol=0)
    assert shift["changed"] == 0.5  # row 2's argmax (the middle) survives the flip


def test_quick_run_writes_every_condition_with_its_shift(tmp_path):
    report = teacher_check_logits.main(
        ["--quick", "--layers", "1", "-1", "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path)]
    )
    written = json.loads((tmp_path / "teacher_check_logits-minilm-tiny.json").read_text())
    assert written == json.loads(json.dumps(report))
    zeroed = [row for row in report["rows"] if row["layer"] is not None]
    assert {row["layer"] for row in zeroed} == {1, -1}
    assert len(zeroed) >= 6  # top, random, bottom (and half) at each layer
    for row in zeroed:
        assert row["kl_mean"] >= 0 and 0 <= row["changed"] <= 1 and row["kl_ci95"] >= 0
    assert "| layer | zeroed |" in (tmp_path / "teacher_check_logits-minilm-tiny.md").read_text()
