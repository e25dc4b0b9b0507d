"""The benchmarks' baselines (``flexkd.bench.user_formulas``) compute what the ops compute, so the
speed ratios compare equal work."""

from __future__ import annotations

import pytest
import torch

from flexkd.bench import ops_cpu, user_formulas
from flexkd.ops import reference

TOL = {torch.float32: dict(rtol=1e-5, atol=1e-6), torch.bfloat16: dict(rtol=1e-5, atol=1e-6)}


def _inputs(dtype, strided: bool, n=300, d=96, k=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    wide = torch.randn(n, 2 * d if strided else d, generator=g).to(dtype) * 3 + 1
    teacher = wide[:, :d]
    student = torch.randn(n, k, generator=g).to(dtype)
    index = torch.randperm(d, generator=g)[:k]
    mask = torch.rand(n, generator=g)
    mask[::7] = 0  # padded rows
    return student, teacher, index, mask


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("strided", [False, True])
def test_user_mse_is_the_op(dtype, strided):
    s, t, i, m = _inputs(dtype, strided)
    expected = reference.flex_feature_loss(s, t, i, m, loss="mse")
    torch.testing.assert_close(user_formulas.mse(s, t, i, m), expected, **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("strided", [False, True])
def test_user_corr_is_the_op(dtype, strided):
    s, t, i, m = _inputs(dtype, strided)
    expected = reference.flex_feature_loss(s, t, i, m, loss="corr", eps=1e-12)
    torch.testing.assert_close(user_formulas.corr(s, t, i, m, eps=1e-6), expected, **TOL[dtype])


def test_user_corr_gradient_is_the_ops():
    s, t, i, m = _inputs(torch.float32, False)
    s1, s2 = s.clone().requires_grad_(), s.clone().requires_grad_()
    user_formulas.corr(s1, t, i, m).backward()
    reference.flex_feature_loss(s2, t, i, m, loss="corr", eps=1e-12).backward()
    torch.testing.assert_close(s1.grad, s2.grad, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_user_importance_is_the_op(dtype):
    g = torch.Generator().manual_seed(1)
    h, grad = (torch.randn(200, 64, generator=g).to(dtype) for _ in range(2))
    m = torch.rand(200, generator=g)
    torch.testing.assert_close(user_formulas.importance(h, grad, m),
                               reference.importance_scores(h, grad, m), rtol=1e-5, atol=1e-5)


def test_strided_case_teacher_is_a_column_slice_of_a_wider_tensor():
    x = ops_cpu.make_inputs(ops_cpu.Case("mse", "fp32", 16, 32, 12, "strided"))
    assert x.teacher.shape == (16, 32) and x.teacher.stride() == (64, 1)
    assert ops_cpu.make_inputs(ops_cpu.Case("mse", "fp32", 16, 32, 12)).teacher.is_contiguous()


def test_gpu_benchmark_dry_run_prints_the_gpu_check_table(capsys, tmp_path):
    """bench_gpu.py --dry-run (what gpu_check.sh --dry-run runs) goes through the GPU benchmark's whole
    pipeline on the CPU, so its Python parts do not rot between GPU sessions."""
    import json
    import re
    import subprocess
    from pathlib import Path

    from flexkd.bench import ops_gpu

    out = tmp_path / "rows.json"
    argv = ["--dry-run", "--dtypes", "fp32", "--iters", "1", "--reps", "1", "--warmup", "1"]
    assert ops_gpu.main([*argv, "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    table = printed[re.search(r"^N=\d+ D=\d+ k=\d+ on ", printed, re.M).start() :].splitlines()
    assert table[0].startswith("N=64 D=32 k=8 on cpu")
    rows = [line.split(" | ") for line in table[3:]]
    assert {(r[0].strip("| "), r[2]) for r in rows} == {
        (op, impl) for op in ops_gpu.WORKLOADS for impl in ("flexkd-cpu", *ops_gpu.BASELINES)
    }
    assert all(r[3] != "skipped" and "%" in r[5] for r in rows)
    saved = json.loads(out.read_text())["rows"]
    assert all(r["ms"] > 0 and "x_user-compile" in r for r in saved)
    script = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_check.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    assert "--dry-run" in script.read_text()
