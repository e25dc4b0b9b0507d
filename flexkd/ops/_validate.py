"""Argument checks for the public ops: each error names the argument and what was expected.

Metadata checks (shapes, dtypes, devices) always run. Checks that read data run in eager mode only:
``index`` (range, repeats) once per index tensor and version, so a training loop that reuses one index
pays for them once; the ``mask`` weights (finite and >= 0) and ``teacher_topk``'s indices (in range,
unique per row) on every call. Those two never wait for an accelerator: on CPU tensors they are read
and raise a ``ValueError``; on other devices they are queued as ``torch._assert_async`` checks, which
fail the device's next synchronisation with the same message (on CUDA a device-side assert). Under
``torch.compile`` none of them runs, so nothing enters the graph: the C++ kernels still check the index
range, and a NaN, inf or negative weight is then used as given (NaN and inf propagate into the loss as
in torch's ``mask * loss``; a negative weight gives a backend-dependent value).
"""

from __future__ import annotations

import operator
from collections.abc import Sequence

import torch
from torch.utils.weak import WeakIdKeyDictionary

from flexkd.ops.reference import LOSSES, REDUCTIONS, STATS

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
INDEX_DTYPES = (torch.int32, torch.int64)


def choice(name: str, value, allowed: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
    return value


def tensor(name: str, value) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    return value


def float_tensor(name: str, value) -> torch.Tensor:
    tensor(name, value)
    if value.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a float tensor (fp32, bf16, fp16 or fp64), got {value.dtype}")
    if value.dim() < 1:
        raise ValueError(f"{name} must have at least one dimension [..., features], got a 0-d tensor")
    return value


def same_device(**named: torch.Tensor | None) -> None:
    present = {name: t for name, t in named.items() if t is not None}
    devices = {t.device for t in present.values()}
    if len(devices) > 1:
        listing = ", ".join(f"{name} on {t.device}" for name, t in present.items())
        raise ValueError(f"all tensors must be on one device, got {listing}")


def mask(value, leading_shape: torch.Size, against: str) -> torch.Tensor | None:
    if value is None:
        return None
    tensor("mask", value)
    if value.dtype != torch.bool and value.dtype not in FLOAT_DTYPES:
        raise TypeError(f"mask must be a bool or float tensor, got {value.dtype}")
    if value.shape != leading_shape:
        raise ValueError(
            f"mask must have the leading shape of {against} {tuple(leading_shape)}, "
            f"got {tuple(value.shape)}"
        )
    if value.dtype == torch.bool or not value.numel() or _skips_data_checks(value):
        return value
    if value.device.type == "cpu":
        _mask_weights_on_host(value)
    else:
        _mask_weights_on_device(value)
    return value


def _mask_weights_on_host(value: torch.Tensor) -> None:
    low, high = torch.aminmax(value)  # NaN makes both NaN
    if not (low.item() >= 0 and high.item() < float("inf")):
        bad = value[~((value >= 0) & (value < float("inf")))]
        raise ValueError(
            f"mask weights must be finite and >= 0, got {bad.numel()} that are not "
            f"(e.g. {bad[0].item()})"
        )


def _mask_weights_on_device(value: torch.Tensor) -> None:
    valid = ((value >= 0) & (value < float("inf"))).all()  # NaN fails both
    torch._assert_async(valid, "mask weights must be finite and >= 0")


def _skips_data_checks(value: torch.Tensor) -> bool:
    return torch.compiler.is_compiling() or value.is_meta


_checked_indices = WeakIdKeyDictionary()


def as_index(value, device: torch.device) -> torch.Tensor:
    """``index`` as a tensor: any integer tensor as given, a sequence of ints as int64 on ``device``."""
    if isinstance(value, torch.Tensor):
        return value
    if not isinstance(value, Sequence) or isinstance(value, str):
        raise TypeError(
            f"index must be an integer tensor or a sequence of ints, got {type(value).__name__}"
        )
    try:
        entries = [operator.index(entry) for entry in value if not isinstance(entry, bool)]
    except TypeError:
        entries = []
    if len(entries) != len(value):
        raise TypeError("index must be an integer tensor or a sequence of ints, got other entries")
    return torch.tensor(entries, dtype=torch.int64, device=device)


def index(value, k: int, width: int) -> torch.Tensor:
    """``value`` must be a 1-D integer tensor of ``k`` unique entries in ``[0, width)``."""
    tensor("index", value)
    if value.dtype.is_floating_point or value.dtype.is_complex or value.dtype == torch.bool:
        raise TypeError(f"index must be an integer tensor (e.g. int32 or int64), got {value.dtype}")
    if value.dim() != 1 or value.numel() != k:
        raise ValueError(
            f"index must be 1-D with one entry per student feature (k={k}), got shape {tuple(value.shape)}"
        )
    if _skips_data_checks(value):
        return value
    key = (value._version, width)
    if _checked_indices.get(value) == key:
        return value
    entries = value.tolist()  # one host read; a set finds repeats faster than torch.unique at small k
    low, high = (min(entries), max(entries)) if entries else (0, -1)
    if low < 0 or high >= width:
        raise ValueError(f"index values must lie in [0, {width}), got values in [{low}, {high}]")
    if len(set(entries)) != k:
        raise ValueError("index must not repeat a teacher dimension, got repeated values")
    _checked_indices[value] = key
    return value


def feature_loss_args(student, teacher, index_, mask_, loss, reduction, eps) -> torch.Tensor:
    """Checks every argument; returns ``index_`` as a tensor (see :func:`as_index`)."""
    choice("loss", loss, LOSSES)
    choice("reduction", reduction, REDUCTIONS)
    float_tensor("student", student)
    float_tensor("teacher", teacher)
    index_ = as_index(index_, student.device)
    if not isinstance(eps, (int, float)) or not eps >= 0:
        raise ValueError(f"eps must be a number >= 0, got {eps!r}")
    same_device(student=student, teacher=teacher, index=index_, mask=mask_)
    if student.shape[:-1] != teacher.shape[:-1]:
        raise ValueError(
            "student and teacher must share their leading shape, got student "
            f"{tuple(student.shape)} and teacher {tuple(teacher.shape)}"
        )
    k = student.shape[-1]
    if k == 0:
        raise ValueError("student must have at least one feature (k >= 1), got k = 0")
    if k > teacher.shape[-1]:
        raise ValueError(
            f"student has k={k} features but teacher only {teacher.shape[-1]}; k must be <= D"
        )
    index(index_, k, teacher.shape[-1])
    mask(mask_, student.shape[:-1], "student")
    return index_


def importance_args(hidden, grad, mask_, stat, out):
    choice("stat", stat, STATS)
    float_tensor("hidden", hidden)
    float_tensor("grad", grad)
    same_device(hidden=hidden, grad=grad, mask=mask_, out=out)
    if hidden.shape != grad.shape:
        raise ValueError(
            f"grad must have the shape of hidden {tuple(hidden.shape)}, got {tuple(grad.shape)}"
        )
    mask(mask_, hidden.shape[:-1], "hidden")
    if out is not None:
        tensor("out", out)
        if out.dtype != torch.float32:
            raise TypeError(f"out must be a float32 tensor, got {out.dtype}")
        if out.shape != hidden.shape[-1:] or not out.is_contiguous():
            raise ValueError(
                f"out must be a contiguous [{hidden.shape[-1]}] tensor, got shape {tuple(out.shape)}"
            )


def teacher_topk(
    value, logits_shape, kind: str, *, read_indices: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """``teacher_topk`` as ``(values [..., K], indices [..., K])`` checked against logits of
    ``logits_shape`` (``[..., V]``): float values, integer indices unique per row in ``[0, V)``, K <= V,
    and a ``kind`` that is finite against a distribution with zeros. The indices' values are checked in
    eager mode without waiting for the device: read on the CPU (a ``ValueError``), queued as device-side
    asserts elsewhere. Under ``torch.compile``, or with ``read_indices=False`` (indices valid by
    construction or checked where they were loaded), only the metadata is checked."""
    if kind == "reverse_kl":
        raise ValueError(
            "kind='reverse_kl' is +inf against a top-K teacher (it has no mass off its K indices); "
            "use kind='forward_kl' or 'jsd', or dense teacher_logits"
        )
    if not isinstance(value, tuple | list) or len(value) != 2:
        raise TypeError("teacher_topk must be a pair (values [..., K], indices [..., K])")
    values, indices = value
    if not isinstance(values, torch.Tensor) or not values.is_floating_point():
        raise TypeError("teacher_topk values must be a floating-point tensor")
    if not isinstance(indices, torch.Tensor) or indices.dtype not in (torch.int32, torch.int64):
        raise TypeError("teacher_topk indices must be an int32 or int64 tensor")
    if values.shape != indices.shape:
        raise ValueError(
            f"teacher_topk values {tuple(values.shape)} and indices {tuple(indices.shape)} "
            "must have the same shape"
        )
    vocab, leading = int(logits_shape[-1]), tuple(logits_shape[:-1])
    if values.dim() < 1 or tuple(values.shape[:-1]) != leading:
        raise ValueError(
            f"teacher_topk must have the student's leading shape {leading} and a last dim K, "
            f"got {tuple(values.shape)}"
        )
    k = values.shape[-1]
    if not 1 <= k <= vocab:
        raise ValueError(f"teacher_topk: K must lie in [1, V={vocab}], got K={k}")
    if values.device != indices.device:
        raise ValueError(
            f"teacher_topk values ({values.device}) and indices ({indices.device}) "
            "must be on one device"
        )
    if not read_indices or _skips_data_checks(indices) or indices.numel() == 0:
        return values, indices
    if indices.device.type == "cpu":
        _topk_indices_on_host(indices, vocab, k)
    else:
        _topk_indices_on_device(indices, vocab, k)
    return values, indices


def _topk_indices_on_host(indices: torch.Tensor, vocab: int, k: int) -> None:
    """Range and per-row uniqueness of CPU top-K indices, read here (a CPU tensor: nothing to wait for)."""
    low, high = int(indices.min()), int(indices.max())
    if low < 0 or high >= vocab:
        raise ValueError(
            f"teacher_topk indices must lie in [0, {vocab}), got values in [{low}, {high}]"
        )
    if k > 1 and bool(_repeats_in_a_row(indices, k).any()):
        raise ValueError("teacher_topk indices must be unique within each row, got a repeat")


def _topk_indices_on_device(indices: torch.Tensor, vocab: int, k: int) -> None:
    """The same checks queued on the device (``torch._assert_async``): nothing is read back, and a bad
    index fails the device's next synchronisation with this message (on CUDA a device-side assert, like
    an out-of-range index in torch's own ops)."""
    in_range = ((indices >= 0) & (indices < vocab)).all()
    torch._assert_async(in_range, f"teacher_topk indices must lie in [0, {vocab})")
    if k > 1:
        unique = ~_repeats_in_a_row(indices, k).any()
        torch._assert_async(unique, "teacher_topk indices must be unique within each row")


def _repeats_in_a_row(indices: torch.Tensor, k: int) -> torch.Tensor:
    ordered = indices.reshape(-1, k).sort(dim=-1).values
    return ordered[:, 1:] == ordered[:, :-1]


def linear_logit_kd_args(
    hidden, weight, teacher_logits, topk, bias, mask_, kind, beta, temperature, chunk_size,
    *, read_topk_indices: bool = True,
):
    from flexkd.ops.linear_logit_kd_impl import KINDS

    choice("kind", kind, KINDS)
    if isinstance(temperature, bool) or not isinstance(temperature, int | float) or not (
        0 < temperature < float("inf")
    ):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    if kind == "jsd" and not (isinstance(beta, int | float) and 0.0 < beta < 1.0):
        raise ValueError(f"beta must lie strictly between 0 and 1 for kind='jsd', got {beta!r}")
    if chunk_size is not None and (
        isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1
    ):
        raise ValueError(f"chunk_size must be None or an int >= 1, got {chunk_size!r}")
    float_tensor("hidden", hidden)
    float_tensor("weight", weight)
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"weight must be [V, H] with H = hidden's last dim {hidden.shape[-1]}, "
            f"got {tuple(weight.shape)}"
        )
    vocab = weight.shape[0]
    if vocab == 0:
        raise ValueError("weight must have at least one row (V >= 1)")
    if bias is not None:
        float_tensor("bias", bias)
        if bias.shape != (vocab,):
            raise ValueError(f"bias must be [V] = [{vocab}], got {tuple(bias.shape)}")
    if (teacher_logits is None) == (topk is None):
        raise ValueError("pass exactly one of teacher_logits and teacher_topk")
    leading = hidden.shape[:-1]
    if teacher_logits is not None:
        float_tensor("teacher_logits", teacher_logits)
        if teacher_logits.shape[-1] != vocab:
            raise ValueError(
                f"teacher_logits has {teacher_logits.shape[-1]} classes but weight has V={vocab} "
                "rows: logit KD needs one vocabulary"
            )
        if teacher_logits.shape[:-1] != leading:
            raise ValueError(
                f"teacher_logits must have hidden's leading shape {tuple(leading)}, "
                f"got {tuple(teacher_logits.shape)}"
            )
        teacher_tensors = {"teacher_logits": teacher_logits}
    else:
        values, indices = teacher_topk(topk, (*leading, vocab), kind, read_indices=read_topk_indices)
        teacher_tensors = {"teacher_topk values": values, "teacher_topk indices": indices}
    same_device(hidden=hidden, weight=weight, bias=bias, mask=mask_, **teacher_tensors)
    mask(mask_, leading, "hidden")
