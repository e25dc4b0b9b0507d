"""``flexkd bench``: the op microbenchmarks shipped in the package (``flexkd.bench``), on tiny shapes."""

from __future__ import annotations

from pathlib import Path

import pytest
from setuptools import find_packages

from flexkd import cli
from flexkd.bench import ops_cpu, ops_gpu

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--n", "64", "--d", "32", "--impls", "flexkd,eager", "--copy-gib", "0"]


def test_help_lists_the_cpu_and_gpu_options(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["bench", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for option in (
        "--device",
        "--quick",
        "--filter",
        "--n",
        "--dtypes",
        "--out",
        "--json",
        "--iters",
    ):
        assert option in out


def test_tiny_cpu_run_prints_the_table_and_writes_csv_and_png(tmp_path, capsys):
    out = tmp_path / "ops"
    argv = ["bench", "--device", "cpu", "--quick", "--filter", "mse-fp32", *TINY, "--out", str(out)]
    assert cli.main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    assert any(line.startswith("| case ") and "flexkd ms" in line for line in lines)
    rows = [line for line in lines if line.startswith("| mse-fp32-N64-D32-k12 ")]
    assert [row.split("|")[2].strip() for row in rows] == list(ops_cpu.MODES)
    assert out.with_suffix(".csv").read_text().count("mse-fp32-N64-D32-k12") == len(ops_cpu.MODES)
    assert out.with_suffix(".png").stat().st_size > 0


def test_sweep_keeps_the_target_shapes_and_takes_sizes():
    quick = ops_cpu.sweep(True, ["mse", "importance"], ["fp32"])
    assert [c.name for c in quick] == ["mse-fp32-N8192-D2048-k768", "importance-fp32-N8192-D4096"]
    assert len(ops_cpu.sweep(False, ["corr"], ["bf16"])) == 27
    sized = ops_cpu.sweep(False, ["mse", "importance"], ["fp32"], n=64, d=32)
    assert [c.name for c in sized] == [
        "mse-fp32-N64-D32-k4",
        "mse-fp32-N64-D32-k8",
        "mse-fp32-N64-D32-k12",
        "importance-fp32-N64-D32",
    ]
    assert [c.k for c in ops_cpu.sweep(True, ["mse"], ["fp32"], d=32, k=5)] == [5]


@pytest.mark.parametrize(
    "extra",
    [["--k", "64"], ["--filter", "no-such-case"], ["--impls", "eager"], ["--dtypes", "fp64"]],
)
def test_bad_options_exit_2(extra, capsys):
    assert cli.main(["bench", "--device", "cpu", "--quick", *TINY, *extra]) == 2
    assert "flexkd bench: error:" in capsys.readouterr().err


def test_device_default_follows_cuda_availability(monkeypatch):
    import torch

    ran = []
    monkeypatch.setattr(ops_cpu, "run", lambda args: ran.append("cpu") or 0)
    monkeypatch.setattr(ops_gpu, "run", lambda args: ran.append("cuda") or 0)
    for available in (False, True):
        monkeypatch.setattr(torch.cuda, "is_available", lambda available=available: available)
        assert cli.main(["bench"]) == 0
    assert cli.main(["bench", "--device", "cpu"]) == 0
    assert ran == ["cpu", "cuda", "cpu"]


def test_gpu_options_resolve_to_the_default_shape():
    args = cli.build_parser(["bench"]).parse_args(["bench", "--n", "128"])
    assert ops_gpu.shape(args) == (128, ops_gpu.DEFAULT_D, ops_gpu.DEFAULT_K)
    assert ops_gpu.dtypes_from_args(args) == ops_gpu.DEFAULT_DTYPES.split(",")


def test_the_wheel_ships_flexkd_bench():
    assert "flexkd.bench" in find_packages(where=str(ROOT), include=["flexkd", "flexkd.*"])
