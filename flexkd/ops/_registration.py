"""torch.library registration shared by every backend: the torch backend's ops (their schemas inferred
from the signatures), fake (meta) kernels and the autograd formula of the feature loss (for the torch
and Triton variants; the native op's twin is C++, ``csrc/feature_loss_autograd.cpp``).

The kernel-level ops take 2-D inputs (the public wrappers in ``flexkd.ops`` flatten leading dims):

* ``feature_loss_fwd*(student [N,k], teacher [N,D], index int64 [k], mask [N]?, loss, reduction, eps,
  student_grad, teacher_grad) -> (loss, grad_student [N,k], grad_teacher_columns [N,k])``: the loss and,
  in the same pass, its gradients for ``grad_output == 1``; the backward here only scales them.
* ``importance_scores_acc*(hidden [N,D], grad [N,D], mask [N]?, stat, out [D]) -> ()``: adds into ``out``.

Variants: ``flexkd::feature_loss_fwd`` (C++, CPU and CUDA dispatch keys; ``csrc/module.cpp`` owns its schema),
``..._torch`` (here, the reference) and ``..._triton`` (``flexkd.kernels``).
"""

from __future__ import annotations

import torch

from flexkd import _native
from flexkd.ops import linear_logit_kd_impl, reference


def feature_loss_fake(student, teacher, index, mask, loss, reduction, eps, student_grad, teacher_grad):
    acc = reference.accumulation_dtype(student, teacher)
    n, k = student.shape
    if reduction != "none":
        value = student.new_empty((), dtype=acc)
    elif loss == "mse":
        value = student.new_empty((n,), dtype=acc)
    else:
        value = student.new_empty((k,), dtype=acc)
    grad_student = student.new_empty((n, k) if student_grad else (0,))
    grad_teacher = teacher.new_empty((n, k) if teacher_grad else (0,))
    return value, grad_student, grad_teacher


def _setup_feature_loss(ctx, inputs, output):
    student, teacher, index, _mask, loss = inputs[:5]
    _, grad_student, grad_teacher = output
    ctx.save_for_backward(grad_student, grad_teacher, index)
    ctx.teacher_shape = teacher.shape
    ctx.student_dtype = student.dtype
    # reduction="none" gives one loss per row for mse ([N]) and one per selected dim for corr ([k]).
    ctx.per_row = loss == "mse"
    # The two gradient outputs are never used downstream; do not build zero tensors for them.
    ctx.set_materialize_grads(False)
    ctx.mark_non_differentiable(grad_student, grad_teacher)


def _is_eager_cpu_one(grad_loss: torch.Tensor) -> bool:
    """True for a real CPU ``grad_output`` of exactly 1 (reading a CUDA value would sync; a traced,
    fake or functorch-wrapped one has no value to read)."""
    return (
        grad_loss.device.type == "cpu"
        and type(grad_loss) is torch.Tensor
        and not torch.compiler.is_compiling()
        and not torch._C._functorch.is_functorch_wrapped_tensor(grad_loss)
        and grad_loss.item() == 1.0
    )


def _scale(saved_grad, grad_loss, per_row: bool, dtype: torch.dtype) -> torch.Tensor:
    if grad_loss.dim() == 0:
        if _is_eager_cpu_one(grad_loss):
            return saved_grad  # loss.backward() on the loss itself: the saved gradient is the answer
        # A 0-dim operand enters the multiply as an fp32 scalar, so bf16/fp16 grads round once.
        return saved_grad * grad_loss
    scale = grad_loss.unsqueeze(-1) if per_row else grad_loss
    return (saved_grad * scale).to(dtype)


def _backward_feature_loss(ctx, grad_loss, _grad_student_out, _grad_teacher_out):
    # The native op's twin is FeatureLossFunction::backward (csrc/feature_loss_autograd.cpp): keep them alike.
    grad_student_saved, grad_teacher_saved, index = ctx.saved_tensors
    grad_student = grad_teacher = None
    if grad_loss is None:  # only the (non-differentiable) gradient outputs were used
        return grad_student, grad_teacher, None, None, None, None, None, None, None
    if ctx.needs_input_grad[0]:
        grad_student = _scale(grad_student_saved, grad_loss, ctx.per_row, ctx.student_dtype)
    if ctx.needs_input_grad[1]:
        columns = _scale(grad_teacher_saved, grad_loss, ctx.per_row, grad_teacher_saved.dtype)
        grad_teacher = columns.new_zeros(ctx.teacher_shape).index_copy(-1, index, columns)
    return grad_student, grad_teacher, None, None, None, None, None, None, None


def register_feature_loss_autograd(qualname: str) -> None:
    """Attach the shared backward to a Python ``feature_loss_fwd`` variant (torch or triton)."""
    torch.library.register_autograd(
        qualname, _backward_feature_loss, setup_context=_setup_feature_loss
    )


feature_loss_fwd_torch = torch.library.custom_op(
    "flexkd::feature_loss_fwd_torch", reference.feature_loss_fwd, mutates_args=()
)


feature_loss_fwd_torch.register_fake(feature_loss_fake)
register_feature_loss_autograd("flexkd::feature_loss_fwd_torch")


@torch.library.custom_op("flexkd::importance_scores_acc_torch", mutates_args=("out",))
def importance_scores_acc_torch(
    hidden: torch.Tensor, grad: torch.Tensor, mask: torch.Tensor | None, stat: str, out: torch.Tensor
) -> None:
    out.add_(reference.importance_scores(hidden, grad, mask, stat))


@torch.library.custom_op("flexkd::select_top_k", mutates_args=())
def select_top_k_op(scores: torch.Tensor, k: int, order: str) -> torch.Tensor:
    return reference.select_top_k(scores, k, order)


@select_top_k_op.register_fake
def _(scores, k, order):
    return scores.new_empty((k,), dtype=torch.int64)


def _register_native() -> None:
    if _native.load() is None:
        return
    torch.library.register_fake("flexkd::feature_loss_fwd")(feature_loss_fake)
    torch.library.register_fake("flexkd::importance_scores_acc")(lambda *args: None)
    torch.library.register_fake("flexkd::kd_rows_")(lambda z, *_: z.new_empty(z.shape[:1]))
    torch.library.register_fake("flexkd::add_widened_")(lambda acc, src: None)


_register_native()


# ------------------------------------------------------------------------------ linear_logit_kd
# ``linear_logit_kd_fwd*``: see ``flexkd/ops/linear_logit_kd_impl.py`` for the contract. No C++ kernel: the
# CPU and CUDA backends are BLAS/cuBLAS matmuls per chunk plus in-place torch ops, so the schema is
# written once here and shared by the torch, chunked and triton (``flexkd.kernels``) variants.
LINEAR_LOGIT_KD_SCHEMA = (
    "(Tensor hidden, Tensor weight, Tensor? bias, Tensor? teacher_logits, Tensor? topk_values, "
    "Tensor? topk_indices, Tensor? mask, str kind, float beta, float temperature, SymInt chunk_size, "
    "bool hidden_grad, bool weight_grad, bool bias_grad) -> (Tensor, Tensor, Tensor, Tensor)"
)


def linear_logit_kd_fake(
    hidden, weight, bias, teacher_logits, topk_values, topk_indices, mask, kind, beta, temperature,
    chunk_size, hidden_grad, weight_grad, bias_grad,
):  # fmt: skip
    acc = linear_logit_kd_impl.accumulation_dtype(hidden, weight, bias)
    empty = weight.new_empty((0,))
    return (
        hidden.new_empty((), dtype=acc),
        hidden.new_empty(hidden.shape) if hidden_grad else empty,
        weight.new_empty(weight.shape) if weight_grad else empty,
        weight.new_empty(weight.shape[:1], dtype=bias.dtype) if bias_grad else empty,
    )


def _setup_linear_logit_kd(ctx, inputs, output):
    _, grad_hidden, grad_weight, grad_bias = output
    ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
    ctx.set_materialize_grads(False)
    ctx.mark_non_differentiable(grad_hidden, grad_weight, grad_bias)


def _backward_linear_logit_kd(ctx, grad_loss, *_grad_outputs):
    grads = [None] * 14
    if grad_loss is None:
        return tuple(grads)
    for i, saved in enumerate(ctx.saved_tensors):
        if ctx.needs_input_grad[i]:
            grads[i] = saved if _is_eager_cpu_one(grad_loss) else (saved * grad_loss).to(saved.dtype)
    return tuple(grads)


def register_linear_logit_kd(qualname: str) -> None:
    """Attach the fake kernel and the shared backward (it only scales the saved gradients)."""
    torch.library.register_fake(qualname)(linear_logit_kd_fake)
    torch.library.register_autograd(
        qualname, _backward_linear_logit_kd, setup_context=_setup_linear_logit_kd
    )


linear_logit_kd_fwd_torch = torch.library.custom_op(
    "flexkd::linear_logit_kd_fwd_torch",
    linear_logit_kd_impl.fwd_materialised,
    mutates_args=(),
    schema=LINEAR_LOGIT_KD_SCHEMA,
)
linear_logit_kd_fwd_chunked = torch.library.custom_op(
    "flexkd::linear_logit_kd_fwd_chunked",
    linear_logit_kd_impl.fwd_chunked,
    mutates_args=(),
    schema=LINEAR_LOGIT_KD_SCHEMA,
)
register_linear_logit_kd("flexkd::linear_logit_kd_fwd_torch")
register_linear_logit_kd("flexkd::linear_logit_kd_fwd_chunked")
