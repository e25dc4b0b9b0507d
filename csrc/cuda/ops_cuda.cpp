// The CUDA kernels of flexkd::feature_loss_fwd and flexkd::importance_scores_acc (schemas in
// csrc/module.cpp): argument checks, output allocation, and the launches on the current stream.
// Nothing here reads device memory, so no call synchronises with the GPU.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <limits>
#include <optional>
#include <tuple>

#include "cuda/launchers.h"

namespace flexkd::cuda {
namespace {

Reduction parse_reduction(c10::string_view reduction) {
  if (reduction == "mean") return Reduction::kMean;
  if (reduction == "sum") return Reduction::kSum;
  TORCH_CHECK_VALUE(reduction == "none", "reduction must be 'mean', 'sum' or 'none', got '", reduction, "'");
  return Reduction::kNone;
}

Stat parse_stat(c10::string_view stat) {
  if (stat == "grad_x_act") return Stat::kGradXAct;
  if (stat == "grad") return Stat::kGrad;
  TORCH_CHECK_VALUE(stat == "grad_sq", "stat must be 'grad_x_act', 'grad' or 'grad_sq', got '", stat, "'");
  return Stat::kGradSq;
}

bool is_float(const at::Tensor& t) {
  const auto s = t.scalar_type();
  return s == at::kFloat || s == at::kDouble || s == at::kBFloat16 || s == at::kHalf;
}

void check_matrix(const at::Tensor& t, const char* name, const at::Tensor& on) {
  TORCH_CHECK_VALUE(t.dim() == 2, name, " must be 2-D [rows, features], got ", t.dim(), " dims");
  TORCH_CHECK_TYPE(is_float(t), name, " must be fp32, fp64, bf16 or fp16, got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.is_cuda() && t.device() == on.device(), name, " must be on ", on.device(), ", got ",
                    t.device());
}

void check_mask(const std::optional<at::Tensor>& mask, int64_t rows, at::ScalarType dtype, const at::Tensor& on) {
  if (!mask.has_value()) return;
  const auto& m = *mask;
  TORCH_CHECK_VALUE(m.device() == on.device(), "mask must be on ", on.device(), ", got ", m.device());
  TORCH_CHECK_TYPE(m.scalar_type() == dtype, "mask must be ", dtype, ", got ", m.scalar_type());
  TORCH_CHECK_VALUE(m.dim() == 1 && m.size(0) == rows && m.is_contiguous(),
                    "mask must be a contiguous [", rows, "] tensor, got shape ", m.sizes());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> feature_loss_fwd_cuda(
    const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& index,
    const std::optional<at::Tensor>& mask, c10::string_view loss, c10::string_view reduction, double eps,
    bool student_grad, bool teacher_grad) {
  check_matrix(student, "student", student);
  check_matrix(teacher, "teacher", student);
  TORCH_CHECK_VALUE(loss == "mse" || loss == "corr", "loss must be 'mse' or 'corr', got '", loss, "'");
  const Reduction red = parse_reduction(reduction);
  const int64_t rows = student.size(0), k = student.size(1);
  TORCH_CHECK_VALUE(teacher.size(0) == rows, "teacher must have ", rows, " rows like student, got ",
                    teacher.size(0));
  TORCH_CHECK_VALUE(k >= 1, "student must have at least one feature column");
  TORCH_CHECK_VALUE(teacher.size(1) <= std::numeric_limits<int32_t>::max(), "teacher has too many columns (",
                    teacher.size(1), ")");
  TORCH_CHECK_TYPE(index.scalar_type() == at::kLong, "index must be int64, got ", index.scalar_type());
  TORCH_CHECK_VALUE(index.device() == student.device(), "index must be on ", student.device(), ", got ",
                    index.device());
  TORCH_CHECK_VALUE(index.dim() == 1 && index.size(0) == k && index.is_contiguous(),
                    "index must be a contiguous [", k, "] tensor, got shape ", index.sizes());
  const bool fp64 = student.scalar_type() == at::kDouble || teacher.scalar_type() == at::kDouble;
  const auto acc = fp64 ? at::kDouble : at::kFloat;
  check_mask(mask, rows, acc, student);

  const c10::cuda::CUDAGuard guard(student.device());
  const auto acc_options = student.options().dtype(acc);
  const bool per_row = loss == "mse";
  const auto grad_shape = [&](bool wanted) {
    return wanted ? std::vector<int64_t>{rows, k} : std::vector<int64_t>{0};
  };

  if (rows == 0) {
    at::Tensor value = red != Reduction::kNone ? at::zeros({}, acc_options)
                                                : at::zeros({per_row ? int64_t{0} : k}, acc_options);
    return {value, at::empty(grad_shape(student_grad), student.options()),
            at::empty(grad_shape(teacher_grad), teacher.options())};
  }

  FeatureLossProblem p;
  p.student = student;
  p.teacher = teacher;
  p.index = index;
  if (mask.has_value()) p.mask = *mask;
  p.reduction = red;
  p.eps = eps;
  p.loss = red != Reduction::kNone ? at::empty({}, acc_options)
                                   : at::empty({per_row ? rows : k}, acc_options);
  if (student_grad) p.grad_student = at::empty({rows, k}, student.options());
  if (teacher_grad) p.grad_teacher = at::empty({rows, k}, teacher.options());

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(student.get_device()).stream();
  if (per_row) {
    mse_forward(p, stream);
  } else {
    corr_forward(p, stream);
  }
  return {p.loss, student_grad ? p.grad_student : at::empty({0}, student.options()),
          teacher_grad ? p.grad_teacher : at::empty({0}, teacher.options())};
}

// `out` by value: every dispatch key of an op must register the same C++ signature (see ops_cpu.cpp).
void importance_scores_acc_cuda(const at::Tensor& hidden, const at::Tensor& grad,
                                const std::optional<at::Tensor>& mask, c10::string_view stat,
                                at::Tensor out) {
  check_matrix(hidden, "hidden", hidden);
  check_matrix(grad, "grad", hidden);
  TORCH_CHECK_VALUE(grad.sizes() == hidden.sizes(), "grad must have the shape of hidden ", hidden.sizes(),
                    ", got ", grad.sizes());
  const Stat which = parse_stat(stat);
  check_mask(mask, hidden.size(0), at::kFloat, hidden);
  TORCH_CHECK_VALUE(out.device() == hidden.device(), "out must be on ", hidden.device(), ", got ", out.device());
  TORCH_CHECK_TYPE(out.scalar_type() == at::kFloat, "out must be fp32, got ", out.scalar_type());
  TORCH_CHECK_VALUE(out.dim() == 1 && out.size(0) == hidden.size(1) && out.is_contiguous(),
                    "out must be a contiguous [", hidden.size(1), "] tensor, got shape ", out.sizes());
  if (hidden.size(0) == 0 || hidden.size(1) == 0) return;

  const c10::cuda::CUDAGuard guard(hidden.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(hidden.get_device()).stream();
  importance_accumulate(hidden, grad, mask.has_value() ? *mask : at::Tensor(), which, out, stream);
}

}  // namespace
}  // namespace flexkd::cuda

TORCH_LIBRARY_IMPL(flexkd, CUDA, m) {
  m.impl("feature_loss_fwd", TORCH_FN(flexkd::cuda::feature_loss_fwd_cuda));
  m.impl("importance_scores_acc", TORCH_FN(flexkd::cuda::importance_scores_acc_cuda));
}
