"""The native extension itself: how it was built, that setup.py and CMake build the same thing, and
kernel-level properties of the CPU op (strides without copies, every dtype pair, every compiled
instruction-set variant, bit-identical results across runs and thread counts, argument checks).

The backend-parameterised comparison against the reference lives in tests/test_ops_*.py.
"""

from __future__ import annotations

import ctypes
import importlib.util
import mmap
import re
import sys
from pathlib import Path

import pytest
import torch

from flexkd import _native
from flexkd.ops import reference
from tests._tolerances import assert_grad_close, assert_loss_close

ROOT = Path(__file__).resolve().parent.parent
_C = _native.load()
pytestmark = pytest.mark.skipif(_C is None, reason=f"flexkd._C not built: {_native.load_error()}")

FLOAT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def _build_config():
    spec = importlib.util.spec_from_file_location("build_config", ROOT / "tools" / "build_config.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("build_config", module)
    spec.loader.exec_module(module)
    return module


def _fwd(student, teacher, index, mask=None, loss="mse", reduction="mean", eps=1e-6, grads=(True, True)):
    return torch.ops.flexkd.feature_loss_fwd(student, teacher, index, mask, loss, reduction, eps, *grads)


def _ref(student, teacher, index, mask=None, loss="mse", reduction="mean", eps=1e-6, grads=(True, True)):
    return reference.feature_loss_fwd(student, teacher, index, mask, loss, reduction, eps, *grads)


def _random_case(n, d, k, s_dtype=torch.float32, t_dtype=torch.float32, masked=True):
    student = torch.randn(n, k).to(s_dtype)
    teacher = (torch.randn(n, d) + 0.5 * torch.randn(d)).to(t_dtype)
    index = torch.randperm(d)[:k]
    acc = reference.accumulation_dtype(student, teacher)
    mask = (torch.rand(n) * (torch.rand(n) > 0.2)).to(acc) if masked else None
    return student, teacher, index, mask


def _check_against_reference(student, teacher, index, mask, loss, reduction, dtype):
    got = _fwd(student, teacher, index, mask, loss, reduction)
    want = _ref(student, teacher, index, mask, loss, reduction)
    assert_loss_close(got[0], want[0], dtype, f"{loss}/{reduction} loss")
    assert_grad_close(got[1], want[1], dtype, f"{loss}/{reduction} grad_student")
    assert_grad_close(got[2], want[2], teacher.dtype, f"{loss}/{reduction} grad_teacher")


# ---------------------------------------------------------------- build information


def test_build_info_describes_the_build():
    info = _native.build_info()
    assert info["torch_version"] == torch.__version__.split("+")[0]
    assert info["openmp"] is True and info["openmp_max_threads"] >= 1
    assert info["compiler"] and isinstance(info["compiler"], str)
    assert info["cxx_standard"] >= 201703
    assert info["cpu_isas"][0] == "baseline"
    assert set(info["cpu_isas_supported"]) <= set(info["cpu_isas"])
    assert info["cpu_isa"] in info["cpu_isas_supported"]
    assert isinstance(info["simd_baseline"], list)
    if torch.version.cuda is None:
        assert info["cuda_kernels"] is False and info["cuda_version"] is None
    if info["cuda_kernels"]:
        assert re.fullmatch(r"\d+\.\d+", info["cuda_version"])


def test_set_cpu_isa_rejects_unknown_names():
    with pytest.raises(ValueError, match="isa must be one of"):
        _C.set_cpu_isa("sse9")


def test_setup_py_and_cmake_share_one_source_list(tmp_path):
    config = _build_config()
    listed = set(config.cpu_sources())
    on_disk = {
        p.relative_to(ROOT).as_posix()
        for p in (ROOT / "csrc").rglob("*.cpp")
        if "cuda" not in p.relative_to(ROOT / "csrc").parts
    }
    assert listed == on_disk, "every CPU source file is built, and only those"
    out = tmp_path / "config.cmake"
    config.main(["--cmake", str(out), "--cuda", "off"])
    text = out.read_text()
    cmake_sources = re.search(r"set\(FLEXKD_CPU_SOURCES (.*)\)", text).group(1)
    assert re.findall(r'"([^"]+)"', cmake_sources) == config.cpu_sources()
    cmakelists = (ROOT / "CMakeLists.txt").read_text()
    assert "tools/build_config.py --cmake" in cmakelists
    for name in ("FLEXKD_CPU_SOURCES", "FLEXKD_CXX_FLAGS", "FLEXKD_INCLUDE_DIRS"):
        assert f"${{{name}}}" in cmakelists, f"CMakeLists.txt uses {name} from build_config"
    assert "build_config.cpu_sources()" in (ROOT / "setup.py").read_text()


def test_cuda_arch_list_is_validated(monkeypatch):
    config = _build_config()
    monkeypatch.setenv("FLEXKD_CUDA_ARCH_LIST", "8.0;9.0+PTX")
    flags = config.nvcc_flags()
    assert "-gencode=arch=compute_80,code=sm_80" in flags
    assert "-gencode=arch=compute_90,code=compute_90" in flags
    monkeypatch.setenv("FLEXKD_CUDA_ARCH_LIST", "hopper")
    with pytest.raises(ValueError, match="FLEXKD_CUDA_ARCH_LIST"):
        config.nvcc_flags()


# ---------------------------------------------------------------- feature_loss_fwd kernel


@pytest.mark.parametrize("loss", ["mse", "corr"])
@pytest.mark.parametrize("s_dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("t_dtype", FLOAT_DTYPES)
def test_every_dtype_pair(loss, s_dtype, t_dtype):
    student, teacher, index, mask = _random_case(37, 29, 11, s_dtype, t_dtype)
    acc = reference.accumulation_dtype(student, teacher)
    dtype = acc if s_dtype in (torch.float32, torch.float64) else s_dtype
    for reduction in ("mean", "sum", "none"):
        _check_against_reference(student, teacher, index, mask, loss, reduction, dtype)


@pytest.mark.parametrize("loss", ["mse", "corr"])
def test_strided_inputs_are_read_in_place(loss):
    n, d, k = 300, 70, 23
    wide = torch.randn(n, 3 * d)
    teacher = wide[:, d : 2 * d]  # a column slice: row stride 3d
    teacher_t = torch.randn(d, n).t()  # column stride n
    student_t = torch.randn(k, n).t()  # column stride n
    student_every_other = torch.randn(n, 2 * k)[:, ::2]
    index = torch.randperm(d)[:k]
    mask = torch.rand(n)
    for s in (student_t, student_every_other, student_t.contiguous()):
        for t in (teacher, teacher_t):
            _check_against_reference(s, t, index, mask, loss, "mean", torch.float32)


def test_rows_and_thread_counts_give_bit_identical_results():
    student, teacher, index, mask = _random_case(5000, 64, 40)
    threads = torch.get_num_threads()
    try:
        results = []
        for count in (1, 2, 3):
            torch.set_num_threads(count)
            for loss in ("mse", "corr"):
                results.append((count, loss, _fwd(student, teacher, index, mask, loss)))
                results.append((count, loss, _fwd(student, teacher, index, mask, loss)))
    finally:
        torch.set_num_threads(threads)
    for loss in ("mse", "corr"):
        runs = [r for (_, name, r) in results if name == loss]
        for other in runs[1:]:
            for a, b in zip(runs[0], other, strict=True):
                assert torch.equal(a, b), f"{loss}: results differ between runs or thread counts"


@pytest.mark.parametrize("isa", _native.build_info().get("cpu_isas_supported", []))
def test_every_compiled_isa_variant_matches_the_reference(isa):
    active = _native.build_info()["cpu_isa"]
    try:
        _C.set_cpu_isa(isa)
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            student, teacher, index, mask = _random_case(131, 97, 45, dtype, dtype)
            for loss in ("mse", "corr"):
                _check_against_reference(student, teacher, index, mask, loss, "mean", dtype)
        hidden, grad = torch.randn(77, 300), torch.randn(77, 300)[:, :]
        for stat in reference.STATS:
            out = torch.zeros(300)
            torch.ops.flexkd.importance_scores_acc(hidden, grad, None, stat, out)
            assert_loss_close(out, reference.importance_scores(hidden, grad, None, stat), torch.float32)
    finally:
        _C.set_cpu_isa(active)


def test_degenerate_inputs_give_zeros_not_nan():
    student, teacher, index, _ = _random_case(6, 10, 4)
    zero_mask = torch.zeros(6)
    one_row = torch.tensor([0.0, 0.0, 2.0, 0.0, 0.0, 0.0])
    for loss, mask in (("mse", zero_mask), ("corr", zero_mask), ("corr", one_row)):
        for reduction in ("mean", "sum", "none"):
            value, gs, gt = _fwd(student, teacher, index, mask, loss, reduction)
            if loss == "mse" and reduction != "mean":
                continue  # sum/none of zero weights is an exact 0 anyway
            assert not value.any() and not gs.any() and not gt.any(), (loss, reduction)
    empty_s, empty_t = torch.randn(0, 4), torch.randn(0, 10)
    value, gs, gt = _fwd(empty_s, empty_t, index, None, "mse", "none")
    assert value.shape == (0,) and gs.shape == (0, 4) and gt.shape == (0, 4)
    value, gs, _ = _fwd(empty_s, empty_t, index, None, "corr", "none")
    assert value.shape == (4,) and not value.any() and gs.shape == (0, 4)


def test_gradients_not_requested_are_empty():
    student, teacher, index, mask = _random_case(20, 12, 5, torch.bfloat16, torch.float16)
    for loss in ("mse", "corr"):
        value, gs, gt = _fwd(student, teacher, index, mask, loss, grads=(False, False))
        assert gs.shape == (0,) and gs.dtype == torch.bfloat16
        assert gt.shape == (0,) and gt.dtype == torch.float16
        assert_loss_close(value, _ref(student, teacher, index, mask, loss)[0], torch.bfloat16)


def test_fp64_gradcheck_of_the_kernel_through_the_public_op():
    from flexkd.ops import flex_feature_loss

    student = torch.randn(9, 4, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(9, 7, dtype=torch.float64, requires_grad=True)
    index = torch.tensor([5, 0, 3, 6])
    mask = torch.rand(9, dtype=torch.float64)
    for loss in ("mse", "corr"):
        for reduction in ("mean", "none"):
            def fn(s, t, loss=loss, reduction=reduction):
                return flex_feature_loss(s, t, index, mask, loss=loss, reduction=reduction, backend="cpu")

            assert torch.autograd.gradcheck(fn, (student, teacher))


def test_bad_arguments_raise_naming_the_argument():
    student, teacher, index, mask = _random_case(8, 10, 4)
    with pytest.raises(ValueError, match=r"index values must be in \[0, 10\)"):
        _fwd(student, teacher, torch.tensor([0, 1, 2, 10]), mask)
    with pytest.raises(ValueError, match="index values"):
        _fwd(student, teacher, torch.tensor([0, -1, 2, 3]), mask)
    with pytest.raises(TypeError, match="index must be int64"):
        _fwd(student, teacher, index.int(), mask)
    with pytest.raises(TypeError, match="mask must have dtype"):
        _fwd(student, teacher, index, mask.double())
    with pytest.raises(ValueError, match="mask must have shape"):
        _fwd(student, teacher, index, mask[:5])
    with pytest.raises(TypeError, match="student must be float"):
        _fwd(student.int(), teacher, index, mask)
    with pytest.raises(ValueError, match="same number of rows"):
        _fwd(student[:5], teacher, index, None)
    with pytest.raises(ValueError, match="loss must be"):
        _fwd(student, teacher, index, mask, loss="l1")
    with pytest.raises(ValueError, match="reduction must be"):
        _fwd(student, teacher, index, mask, reduction="max")
    with pytest.raises(ValueError, match="eps must be"):
        _fwd(student, teacher, index, mask, loss="corr", eps=-1.0)


# ---------------------------------------------------------------- importance_scores_acc kernel


@pytest.mark.parametrize("h_dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("g_dtype", (torch.float32, torch.bfloat16))
def test_importance_scores_add_into_out(h_dtype, g_dtype):
    hidden = torch.randn(3000, 50).to(h_dtype)
    grad = torch.randn(50, 3000).t().to(g_dtype)  # column stride 3000
    mask = (torch.rand(3000) > 0.3).float()
    start = torch.randn(50)
    for stat in reference.STATS:
        out = start.clone()
        torch.ops.flexkd.importance_scores_acc(hidden, grad, mask, stat, out)
        want = start + reference.importance_scores(hidden, grad, mask, stat)
        assert_loss_close(out, want, torch.float32, f"{stat}/{h_dtype}/{g_dtype}")


def test_importance_scores_are_bit_identical_across_thread_counts():
    hidden, grad = torch.randn(4096, 96), torch.randn(4096, 96)
    threads = torch.get_num_threads()
    outs = []
    try:
        for count in (1, 2, 3):
            torch.set_num_threads(count)
            out = torch.zeros(96)
            torch.ops.flexkd.importance_scores_acc(hidden, grad, None, "grad_x_act", out)
            outs.append(out)
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(outs[0], o) for o in outs[1:])


def test_importance_bad_arguments():
    hidden, grad = torch.randn(4, 6), torch.randn(4, 6)
    with pytest.raises(ValueError, match="stat must be"):
        torch.ops.flexkd.importance_scores_acc(hidden, grad, None, "act", torch.zeros(6))
    with pytest.raises(TypeError, match="out must be float32"):
        torch.ops.flexkd.importance_scores_acc(hidden, grad, None, "grad", torch.zeros(6).double())
    with pytest.raises(ValueError, match="out must have shape"):
        torch.ops.flexkd.importance_scores_acc(hidden, grad, None, "grad", torch.zeros(5))
    with pytest.raises(ValueError, match="same shape"):
        torch.ops.flexkd.importance_scores_acc(hidden, grad[:, :5], None, "grad", torch.zeros(6))
    with pytest.raises(TypeError, match="mask must be float32"):
        torch.ops.flexkd.importance_scores_acc(hidden, grad, torch.ones(4).bool(), "grad", torch.zeros(6))


# ---------------------------------------------------------------- the op benchmark does not rot


def test_bench_ops_runs_a_tiny_case():
    from flexkd.bench import ops_cpu as bench_ops

    for op in ("mse", "importance"):
        rows = bench_ops.run_case(bench_ops.Case(op, "fp32", 64, 32, 0 if op == "importance" else 8),
                                  ["flexkd", "user-eager"])
        assert {r["mode"] for r in rows} == ({"fwd"} if op == "importance" else set(bench_ops.MODES))
        for r in rows:
            assert r["flexkd_ms"] > 0 and r["user-eager_ms"] > 0 and r["floor_ms"] > 0
    assert any(line.startswith(("MET", "MISS")) for line in bench_ops.check_targets(
        [dict(rows[0], op="mse", n=8192, d=2048, k=768, mode="fwd+bwd", x_floor=1.0)]))


def _sorted_selections(d: int) -> dict[str, torch.Tensor]:
    """Sorted indices that exercise the AVX-512 block path (column_blocks.h): one column, the whole row,
    runs of length 1, runs crossing 16-column blocks, a block only partly inside the row."""
    generator = torch.Generator().manual_seed(d)
    selections = {
        "k=1 first": torch.tensor([0]),
        "k=1 last": torch.tensor([d - 1]),
        "whole row": torch.arange(d),
        "every other column": torch.arange(0, d, 2),
        "random sorted": torch.randperm(d, generator=generator)[: max(1, 3 * d // 8)].sort().values,
    }
    if d > 32:
        selections["runs across blocks"] = torch.cat([torch.arange(13, 21), torch.arange(30, d - 1)])
    return selections


def _teachers(n: int, d: int, dtype) -> dict[str, torch.Tensor]:
    wide = torch.randn(n, d + 19).to(dtype)
    return {
        "contiguous": torch.randn(n, d).to(dtype),
        "column slice": wide[:, 3 : 3 + d],
        "transposed": torch.randn(d, n).to(dtype).t(),  # column stride != 1: the scalar gather
    }


@pytest.mark.parametrize("isa", _native.build_info().get("cpu_isas_supported", []))
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("loss", ("mse", "corr"))
def test_sorted_selections_match_the_reference_and_the_scalar_gather(isa, dtype, loss):
    """The block path and the scalar gather feed the same arithmetic, so they agree bit for bit; the
    scalar gather runs for the same values held with a column stride != 1. corr reads the teacher
    through the same gather in both of its passes."""
    active = _native.build_info()["cpu_isa"]
    threads = torch.get_num_threads()
    n = 37
    try:
        _C.set_cpu_isa(isa)
        for d in (1, 17, 61, 100):
            for layout, teacher in _teachers(n, d, dtype).items():
                scalar_gather_teacher = torch.empty(d, n, dtype=dtype).t().copy_(teacher)
                for name, index in _sorted_selections(d).items():
                    what = f"{loss} {isa} {dtype} d={d} {layout} {name}"
                    student = torch.randn(n, index.numel()).to(dtype)
                    mask = torch.rand(n) * (torch.rand(n) > 0.2)
                    mask = mask.to(reference.accumulation_dtype(student, teacher))
                    torch.set_num_threads(1)
                    want = _fwd(student, scalar_gather_teacher, index, mask, loss)
                    for count in (1, 2):
                        torch.set_num_threads(count)
                        got = _fwd(student, teacher, index, mask, loss)
                        for a, b in zip(got, want, strict=True):
                            assert torch.equal(a, b), f"{what}, {count} threads: differs from the scalar gather"
                    ref = _ref(student, teacher, index, mask, loss)
                    assert_loss_close(got[0], ref[0], dtype, f"{what} loss")
                    assert_grad_close(got[1], ref[1], dtype, f"{what} grad_student")
                    assert_grad_close(got[2], ref[2], dtype, f"{what} grad_teacher")
    finally:
        _C.set_cpu_isa(active)
        torch.set_num_threads(threads)


def _tensor_ending_at_a_guard_page(rows: int, cols: int, dtype) -> torch.Tensor:
    """A [rows, cols] tensor whose last element ends where an inaccessible page begins, so a read past
    its end faults (the test process dies) instead of going unnoticed."""
    page = mmap.PAGESIZE
    buffer = mmap.mmap(-1, 2 * page, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    address = ctypes.addressof(ctypes.c_char.from_buffer(buffer))
    libc = ctypes.CDLL(None, use_errno=True)
    assert libc.mprotect(ctypes.c_void_p(address + page), page, 0) == 0, ctypes.get_errno()
    first_page = torch.frombuffer(buffer, dtype=dtype, count=page // dtype.itemsize)
    tensor = first_page[-rows * cols :].view(rows, cols)
    tensor.copy_(torch.randn(rows, cols).to(dtype))
    return tensor


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mprotect guard page: Linux")
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
@pytest.mark.parametrize("loss", ("mse", "corr"))
def test_block_path_reads_nothing_past_the_tensor(dtype, loss):
    """The last row's last 16-column block reaches past the end of the teacher: the masked block loads
    must not touch those columns."""
    teacher = _tensor_ending_at_a_guard_page(5, 20, dtype)
    student = torch.randn(5, 3).to(dtype)
    index = torch.tensor([1, 17, 19])
    got = _fwd(student, teacher, index, loss=loss)
    want = _ref(student, teacher, index, loss=loss)
    assert_loss_close(got[0], want[0], dtype)
    assert_grad_close(got[1], want[1], dtype)
