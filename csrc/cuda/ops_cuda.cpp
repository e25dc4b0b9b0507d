// The CUDA kernels of flexkd::feature_loss_fwd and flexkd::importance_scores_acc (schemas in
// csrc/module.cpp): argument checks (flexkd/op_args.h, shared with the CPU kernels), output allocation,
// and the launches on the current stream. Nothing here reads device memory, so no call synchronises
// with the GPU (the index range is checked inside the kernels).
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
#include "flexkd/op_args.h"

namespace flexkd::cuda {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> feature_loss_fwd_cuda(
    const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& index,
    const std::optional<at::Tensor>& mask, c10::string_view loss, c10::string_view reduction, double eps,
    bool student_grad, bool teacher_grad) {
  const Loss loss_kind = parse_loss(loss);
  const Reduction red = parse_reduction(reduction);
  check_feature_loss_args(student, teacher, index, mask, eps);
  TORCH_CHECK_VALUE(teacher.size(1) <= std::numeric_limits<int32_t>::max(), "teacher has too many columns (",
                    teacher.size(1), ")");
  const int64_t rows = student.size(0), k = student.size(1);
  const c10::cuda::CUDAGuard guard(student.device());
  const auto acc_options = student.options().dtype(accumulation_type(student, teacher));
  const auto loss_sizes = loss_shape(loss_kind, red, rows, k);
  const auto grad_shape = [&](bool wanted) {
    return wanted ? std::vector<int64_t>{rows, k} : std::vector<int64_t>{0};
  };

  if (rows == 0) {
    return {at::zeros(loss_sizes, acc_options), at::empty(grad_shape(student_grad), student.options()),
            at::empty(grad_shape(teacher_grad), teacher.options())};
  }

  FeatureLossProblem p;
  p.student = student;
  p.teacher = teacher;
  p.index = index;
  if (mask.has_value()) p.mask = *mask;
  p.reduction = red;
  p.eps = eps;
  p.loss = at::empty(loss_sizes, acc_options);
  if (student_grad) p.grad_student = at::empty({rows, k}, student.options());
  if (teacher_grad) p.grad_teacher = at::empty({rows, k}, teacher.options());

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(student.get_device()).stream();
  if (loss_kind == Loss::kMse) {
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
  const Stat which = parse_stat(stat);
  check_importance_args(hidden, grad, mask, out);
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
