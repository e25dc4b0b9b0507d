"""``flexkd bench``: the op microbenchmarks shipped in the package (``flexkd.bench``), on tiny shapes."""

from __future__ import annotations

from pathlib import Path

import pytest
from setuptools import find_packages

from flexkd import cli
from flexkd.bench import ops_cpu, ops_gpu

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--n", "64", "--d", "32", "--impls", "flexkd,user-eager", "--copy-gib", "0"]


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
        "--small-n",
        "--layouts",
        "--threads",
    ):
        assert option in out


def test_tiny_cpu_run_prints_the_table_and_writes_csv_and_png(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    out = tmp_path / "ops"
    argv = ["bench", "--device", "cpu", "--quick", "--filter", "mse-fp32", *TINY, "--out", str(out)]
    assert cli.main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    assert any(line.startswith("| case ") and "flexkd ms" in line and "vs user-eager" in line
               for line in lines)
    assert any(line.startswith("load average after") for line in lines)
    for name in ("mse-fp32-N64-D32-k12", "mse-fp32-N64-D32-k12-strided"):
        rows = [line for line in lines if line.startswith(f"| {name} ")]
        assert [row.split("|")[3].strip() for row in rows] == list(ops_cpu.MODES)
    csv = out.with_suffix(".csv").read_text()
    assert csv.count("mse-fp32-N64-D32-k12,") == len(ops_cpu.MODES)
    assert "load_before" in csv.splitlines()[0] and "x_vs_user-eager" in csv.splitlines()[0]
    assert out.with_suffix(".png").stat().st_size > 0


def test_each_case_runs_at_each_thread_count(tmp_path, capsys):
    out = tmp_path / "ops"
    argv = ["bench", "--device", "cpu", "--quick", "--ops", "importance", *TINY, "--threads", "1,2",
            "--dtypes", "fp32", "--out", str(out)]
    assert cli.main(argv) == 0
    rows = out.with_suffix(".csv").read_text().splitlines()[1:]
    assert [row.split(",")[7] for row in rows] == ["1", "2"]


def test_without_matplotlib_the_csv_is_still_written(tmp_path, capsys, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    out = tmp_path / "ops"
    argv = ["bench", "--device", "cpu", "--quick", "--ops", "importance", *TINY, "--dtypes", "fp32",
            "--out", str(out)]
    assert cli.main(argv) == 0
    assert "pip install matplotlib" in capsys.readouterr().out
    assert out.with_suffix(".csv").exists() and not out.with_suffix(".png").exists()


def test_fused_slower_than_a_baseline_is_marked_in_the_table():
    row = dict(case="mse-fp32-N64-D32-k12", threads=1, mode="fwd", floor_ms=0.01, x_floor=2.0,
               x_floor_paired=float("nan"),
               load_before=1.0, load_after=1.2, **{"flexkd_ms": 0.2, "flexkd_peak_mib": 0.0,
                                                   "user-eager_ms": 0.1, "user-eager_peak_mib": 0.0,
                                                   "x_vs_user-eager": 0.5})
    assert "0.50x SLOWER" in ops_cpu.format_table([row], ["flexkd", "user-eager"])


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
    layouts = ops_cpu.sweep(True, ["mse", "importance"], ["fp32"], layouts=ops_cpu.LAYOUTS)
    assert [c.name for c in layouts] == ["mse-fp32-N8192-D2048-k768", "mse-fp32-N8192-D2048-k768-strided",
                                         "importance-fp32-N8192-D4096"]
    small = ops_cpu.sweep(True, ["mse"], ["bf16"], small_n=True)
    assert [c.n for c in small] == list(ops_cpu.SMALL_N) == [64, 512, 4096, 32768]
    assert {(c.d, c.k) for c in small} == {(2048, 768)}


def test_targets_are_checked_at_the_target_shape_only():
    row = {"op": "mse", "dtype": "bf16", "n": 8192, "d": 2048, "k": 768, "mode": "fwd+bwd",
           "case": "mse-bf16-N8192-D2048-k768", "threads": 2, "x_floor": 1.4, "x_vs_user-compile": 1.2}
    assert ops_cpu.check_targets([row]) == [
        "MET  mse-bf16-N8192-D2048-k768 2 threads fwd+bwd: x floor 1.40 (target <= 1.5)",
        "MISS mse-bf16-N8192-D2048-k768 2 threads fwd+bwd: vs user-compile 1.20 (target >= 1.7)",
    ]
    assert ops_cpu.check_targets([{**row, "n": 64}]) == []


@pytest.mark.parametrize(
    "extra",
    [["--k", "64"], ["--filter", "no-such-case"], ["--impls", "user-eager"], ["--dtypes", "fp64"],
     ["--threads", "0"], ["--threads", "two"], ["--layouts", "diagonal"], ["--impls", "flexkd,eager"]],
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


def test_gpu_floor_counts_touched_sectors_and_the_passes():
    import torch

    n, d, k = 64, 64, 32
    teacher, student = torch.zeros(n, d), torch.zeros(n, k)
    every_other = torch.arange(0, d, 2)  # one 4-byte column in two: every 32-byte sector is touched
    sectors = n * d * 4
    assert ops_gpu.floor_bytes("mse fwd+bwd", student, teacher, every_other, None) == (
        sectors + 4 * n * k * 4 + 4 * n)
    assert ops_gpu.floor_bytes("corr fwd+bwd", student, teacher, every_other, None) == (
        2 * sectors + 5 * n * k * 4 + 4 * n)
    first_half = torch.arange(k)  # the first half of each row: half the sectors
    assert ops_gpu.floor_bytes("mse fwd+bwd", student, teacher, first_half, None) == (
        sectors // 2 + 4 * n * k * 4 + 4 * n)


def test_gpu_table_has_every_op_and_marks_slower_than_compile():
    rows = [{"op": op, "dtype": "bf16", "impl": impl, "ms": ms, "gbs": 1.0, "copy_pct": 50.0}
            for op in ops_gpu.WORKLOADS
            for impl, ms in (("flexkd-cuda", 2.0), ("user-eager", 4.0), ("user-compile", 1.0))]
    rows.append({"op": "mse fwd+bwd", "dtype": "bf16", "impl": "flexkd-triton", "skipped": "no triton"})
    ops_gpu.speedups(rows)
    text = ops_gpu.table(rows, copy_gbs=4000.0)
    cuda_lines = [line for line in text.splitlines() if "| flexkd-cuda |" in line]
    assert len(cuda_lines) == 3 and all("2.00 |" in line and "0.50 SLOWER |" in line for line in cuda_lines)
    assert "% of copy (4000 GB/s)" in text and "skipped: no triton" in text


def test_gpu_implementations_wire_every_workload_to_a_callable():
    """The GPU benchmark's calls, run on CPU tensors with the user formulas (eager): every workload
    of every implementation that can run is called the way bench_dtype calls it."""
    import torch

    impls = ops_gpu.implementations(triton_reason="not here")
    assert impls["flexkd-triton"] == "not here"
    assert set(impls["user-eager"]) == set(impls["user-compile"]) == set(ops_gpu.WORKLOADS)
    student = torch.randn(16, 4, requires_grad=True)
    teacher, hidden, grad = torch.randn(16, 8), torch.randn(16, 8), torch.randn(16, 8)
    index, mask = torch.tensor([0, 2, 5, 7]), torch.rand(16)
    fns = impls["user-eager"]
    for workload in ("mse fwd+bwd", "corr fwd+bwd"):
        ops_gpu.loss_step(fns[workload], student, teacher, index, mask)()
        assert student.grad is not None and torch.isfinite(student.grad).all()
    assert fns["importance"](hidden, grad, mask).shape == (8,)


def test_paired_ratio_is_the_median_of_per_pair_ratios(monkeypatch):
    from flexkd.bench import common

    clock = [0.0]
    monkeypatch.setattr(common.time, "perf_counter", lambda: clock[0])
    slow_pairs = iter([False, False, True, False, False, False, False])  # one disturbed call of fn

    def fn():
        clock[0] += 30.0 if next(slow_pairs, False) else 3.0

    def baseline():
        clock[0] += 1.0

    assert common.paired_ratio(fn, baseline, reps=5) == 3.0


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="glibc's mallopt: Linux")
def test_keep_freed_memory_is_applied_and_recorded(tmp_path):
    """``--keep-freed-memory`` changes the process's allocator, so it runs in a process of its own."""
    import csv as csv_module
    import subprocess
    import sys

    out = tmp_path / "ops"
    argv = [sys.executable, "-m", "flexkd", "bench", "--device", "cpu", "--quick", "--ops", "mse", *TINY,
            "--dtypes", "fp32", "--layouts", "contiguous", "--keep-freed-memory", "--out", str(out)]
    run = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "allocator glibc keeping freed memory" in run.stdout
    rows = list(csv_module.DictReader(out.with_suffix(".csv").open()))
    assert rows and {row["allocator"] for row in rows} == {"glibc keeping freed memory"}


def test_call_overhead_script_reports_every_row():
    import subprocess
    import sys

    script = ROOT / "benchmarks" / "call_overhead.py"
    argv = [sys.executable, str(script), "--n", "16", "--d", "32", "--k", "8", "--calls", "3", "--loops", "1"]
    run = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert "backend='auto' (cpu)" in lines[0]
    assert [line.rsplit(None, 1)[0].strip() for line in lines[1:]] == [
        "public fwd+bwd", "public fwd (no grad)", "kernel-level op fwd+bwd", "kernel-level op fwd (no grad)",
        "argument checks", "user eager fwd+bwd",
    ]
