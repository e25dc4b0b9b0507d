"""``flexkd bench --suite linear_logit_kd`` at a tiny size: it runs, measures every path it is asked
for, agrees on the loss and writes its CSV."""

from __future__ import annotations

import argparse
import csv

import pytest
import torch
from _targets import _triton_interpreter_reason

from flexkd.bench import linear_logit_kd
from flexkd.commands import bench


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    return parser.parse_args(["--suite", "linear_logit_kd", *argv])


def test_tiny_run_writes_the_table_and_csv(tmp_path, capsys):
    out = tmp_path / "kd"
    args = _args(
        "--n", "24", "--vocab", "96", "--hidden", "8", "--dtypes", "fp32,bf16",
        "--kd-impls", "fused,eager", "--kd-reps", "1", "--kd-out", str(out),
    )  # fmt: skip
    assert bench.run(args) == 0
    rows = list(csv.DictReader(out.with_suffix(".csv").open()))
    assert [r["case"] for r in rows] == ["N24-V96-H8-fp32", "N24-V96-H8-bf16"]
    for row in rows:
        assert float(row["fused_ms"]) > 0 and float(row["eager_ms"]) > 0
        assert float(row["loss_rel_diff"]) < 1e-2  # bf16 eager rounds its logits to bf16
    assert float(rows[0]["loss_rel_diff"]) < 1e-5
    assert "time_vs_eager=" in capsys.readouterr().out


def test_other_kinds_and_a_top_k_teacher(tmp_path):
    out = tmp_path / "kd"
    common = ("--n", "24", "--vocab", "96", "--hidden", "8", "--dtypes", "fp32", "--kd-impls", "fused,eager",
              "--kd-reps", "1", "--kd-out", str(out))  # fmt: skip
    assert bench.run(_args(*common, "--kd-kinds", "reverse_kl,jsd")) == 0
    rows = list(csv.DictReader(out.with_suffix(".csv").open()))
    assert [r["case"] for r in rows] == ["N24-V96-H8-fp32-reverse_kl", "N24-V96-H8-fp32-jsd"]
    assert bench.run(_args(*common, "--kd-kinds", "forward_kl,jsd", "--kd-topk", "7")) == 0
    rows = list(csv.DictReader(out.with_suffix(".csv").open()))
    assert [r["case"] for r in rows] == ["N24-V96-H8-fp32-top7", "N24-V96-H8-fp32-jsd-top7"]
    for row in rows:
        assert float(row["loss_rel_diff"]) < 1e-5
    assert bench.run(_args(*common, "--kd-kinds", "reverse_kl", "--kd-topk", "7")) == 2
    assert bench.run(_args(*common, "--kd-kinds", "kl")) == 2


def test_without_eager_its_memory_is_computed(tmp_path, capsys):

    out = tmp_path / "kd"
    args = _args("--n", "16", "--vocab", "64", "--hidden", "8", "--dtypes", "fp32",
                 "--kd-impls", "fused", "--kd-reps", "1", "--kd-out", str(out))  # fmt: skip
    assert bench.run(args) == 0
    (row,) = csv.DictReader(out.with_suffix(".csv").open())
    computed = linear_logit_kd.baseline_peak_mib(linear_logit_kd.Case(16, 64, 8, "fp32"))
    assert computed == (7 * 16 * 64 * 4 + 64 * 8 * 4) / 2**20
    assert float(row["eager_peak_mib_computed"]) == round(computed, 1)
    assert row["peak_vs_eager_from"] == "computed"
    assert float(row["peak_vs_eager"]) == float(row["fused_peak_mib"]) / computed
    assert "vs computed eager" in capsys.readouterr().out


def test_the_liger_path_gets_the_teacher_factors_and_the_matching_beta(monkeypatch):
    """Liger's fused linear JSD takes the teacher's hidden state and projection: with a stand-in module
    that computes the formula from them (Liger itself needs CUDA), the bench gives it the tensors whose
    product the other paths get as teacher logits, and the beta that makes it each kind."""
    import sys
    import types

    from flexkd.losses import logit_kd

    kinds = {0.0: "forward_kl", 1.0: "reverse_kl", 0.5: "jsd"}

    class FakeLigerFusedLinearJSD(torch.nn.Module):
        def __init__(self, jsd_beta, temperature):
            super().__init__()
            self.kind, self.temperature = kinds[jsd_beta], temperature

        def forward(self, hidden, weight, teacher_hidden, teacher_weight):
            return logit_kd(hidden @ weight.T, teacher_hidden @ teacher_weight.T, kind=self.kind,
                            temperature=self.temperature)  # fmt: skip

    fake = types.ModuleType("liger_kernel.transformers")
    fake.LigerFusedLinearJSD = FakeLigerFusedLinearJSD
    monkeypatch.setitem(sys.modules, "liger_kernel", types.ModuleType("liger_kernel"))
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers", fake)
    for kind in kinds.values():
        case = linear_logit_kd.Case(16, 64, 8, "fp32", kind)
        row = linear_logit_kd.run_case(case, ["fused", "liger"], 1)
        assert row["liger_loss_rel_diff"] < 1e-5, kind
        assert row["time_vs_liger"] > 0
    row = linear_logit_kd.run_case(linear_logit_kd.Case(16, 64, 8, "fp32", top_k=5), ["fused", "liger"], 1)
    assert row["liger_note"] == "n/a: no top-K teacher"


def test_fused_triton_needs_cuda_or_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # and the tensors are on the CPU (--kd-device cpu)
    assert bench.run(_args("--kd-impls", "fused,fused-triton")) == 2


@pytest.mark.parametrize("top_k", [0, 5])
def test_fused_triton_path(top_k):
    """On the GPU where there is one, else under the interpreter."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    reason = None if device == "cuda" else _triton_interpreter_reason()
    if reason:
        pytest.skip(reason)
    case = linear_logit_kd.Case(12, 40, 8, "fp32", kind="jsd", top_k=top_k)
    row = linear_logit_kd.run_case(case, ["fused", "fused-triton", "eager"], 1, device)
    assert row["fused-triton_ms"] > 0 and row["fused-triton_note"] == ""
    assert row["loss_rel_diff"] < 1e-5 and row["fused-triton_loss_rel_diff"] < 1e-5


def test_bad_options_exit_2():
    assert bench.run(_args("--kd-impls", "fused,liger")) == 2  # Liger is CUDA only
    if not torch.cuda.is_available():
        assert bench.run(_args("--kd-device", "cuda")) == 2
    assert bench.run(_args("--kd-impls", "eager")) == 2
    assert bench.run(_args("--dtypes", "fp8")) == 2
