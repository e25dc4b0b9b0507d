// The CPU kernels of flexkd::feature_loss_fwd and flexkd::importance_scores_acc: argument checks,
// output allocation, and a call into the engine variant for this machine's instruction set.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "cpu/engine/kernel_args.h"
#include "cpu/isa.h"
#include "flexkd/op_args.h"

namespace flexkd {
namespace {

cpu::DType engine_dtype(c10::ScalarType t) {
  switch (t) {
    case at::kFloat: return cpu::DType::kFloat32;
    case at::kDouble: return cpu::DType::kFloat64;
    case at::kBFloat16: return cpu::DType::kBFloat16;
    case at::kHalf: return cpu::DType::kFloat16;
    default: TORCH_CHECK_TYPE(false, "unsupported dtype ", t);
  }
}

cpu::StridedMatrix strided_view(const at::Tensor& t) {
  return cpu::StridedMatrix{t.const_data_ptr(), engine_dtype(t.scalar_type()), t.stride(0),
                            t.stride(1)};
}

void check_cpu(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.device().is_cpu(), name, " must be a CPU tensor, got ", t.device());
}

void check_index_range(const at::Tensor& index, int64_t columns) {
  const int64_t* idx = index.const_data_ptr<int64_t>();
  for (int64_t j = 0; j < index.numel(); ++j) {
    TORCH_CHECK_VALUE(idx[j] >= 0 && idx[j] < columns, "index values must be in [0, ", columns,
                      "), got index[", j, "] = ", idx[j]);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> feature_loss_fwd_cpu(
    const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& index,
    const std::optional<at::Tensor>& mask, c10::string_view loss, c10::string_view reduction,
    double eps, bool student_grad, bool teacher_grad) {
  const Loss loss_kind = parse_loss(loss);
  const Reduction reduction_kind = parse_reduction(reduction);
  check_feature_loss_args(student, teacher, index, mask, eps);
  check_cpu(student, "student");
  check_index_range(index, teacher.size(1));

  const int64_t rows = student.size(0);
  const int64_t k = student.size(1);
  const auto acc = accumulation_type(student, teacher);
  at::Tensor loss_out = at::empty(loss_shape(loss_kind, reduction_kind, rows, k),
                                  student.options().dtype(acc));
  at::Tensor grad_student = student_grad ? at::empty({rows, k}, student.options())
                                         : at::empty({0}, student.options());
  at::Tensor grad_teacher = teacher_grad ? at::empty({rows, k}, teacher.options())
                                         : at::empty({0}, teacher.options());

  cpu::FeatureLossArgs args{};
  args.student = strided_view(student);
  args.teacher = strided_view(teacher);
  args.index = index.const_data_ptr<int64_t>();
  args.rows = rows;
  args.k = k;
  args.mask = mask.has_value() ? mask->const_data_ptr() : nullptr;
  args.loss = loss_kind;
  args.reduction = reduction_kind;
  args.eps = eps;
  args.loss_out = loss_out.mutable_data_ptr();
  args.grad_student = student_grad ? grad_student.mutable_data_ptr() : nullptr;
  args.grad_teacher = teacher_grad ? grad_teacher.mutable_data_ptr() : nullptr;
  args.num_threads = at::get_num_threads();
  cpu::active_kernels().feature_loss(args);
  return {loss_out, grad_student, grad_teacher};
}

void importance_scores_acc_cpu(const at::Tensor& hidden, const at::Tensor& grad,
                               const std::optional<at::Tensor>& mask, c10::string_view stat,
                               at::Tensor out) {
  const Stat stat_kind = parse_stat(stat);
  check_importance_args(hidden, grad, mask, out);
  check_cpu(hidden, "hidden");

  cpu::ImportanceArgs args{};
  args.hidden = strided_view(hidden);
  args.grad = strided_view(grad);
  args.rows = hidden.size(0);
  args.cols = hidden.size(1);
  args.mask = mask.has_value() ? mask->const_data_ptr<float>() : nullptr;
  args.stat = stat_kind;
  args.out = out.mutable_data_ptr<float>();
  args.num_threads = at::get_num_threads();
  cpu::active_kernels().importance_scores(args);
}

at::Tensor kd_rows_forward_kl_cpu(at::Tensor z, const at::Tensor& teacher, double temperature) {
  check_cpu(z, "z");
  check_cpu(teacher, "teacher");
  TORCH_CHECK_VALUE(z.dim() == 2 && z.scalar_type() == at::kFloat && z.stride(1) == 1,
                    "z must be a 2-D fp32 tensor with unit column stride, got ", z.sizes(), " ", z.scalar_type());
  TORCH_CHECK_VALUE(teacher.sizes() == z.sizes() && teacher.stride(1) == 1,
                    "teacher must have z's shape ", z.sizes(), " and unit column stride, got ", teacher.sizes());
  TORCH_CHECK_TYPE(teacher.scalar_type() == at::kFloat || teacher.scalar_type() == at::kBFloat16 ||
                       teacher.scalar_type() == at::kHalf,
                   "teacher must be fp32, bf16 or fp16, got ", teacher.scalar_type());
  TORCH_CHECK_VALUE(temperature > 0, "temperature must be > 0, got ", temperature);
  at::Tensor loss = at::empty({z.size(0)}, z.options());
  cpu::KdRowsArgs args{};
  args.z = z.mutable_data_ptr<float>();
  args.z_row_stride = z.stride(0);
  args.teacher = strided_view(teacher);
  args.rows = z.size(0);
  args.vocab = z.size(1);
  args.temperature = static_cast<float>(temperature);
  args.loss_out = loss.mutable_data_ptr<float>();
  args.num_threads = at::get_num_threads();
  cpu::active_kernels().kd_rows_forward_kl(args);
  return loss;
}

}  // namespace

TORCH_LIBRARY_IMPL(flexkd, CPU, m) {
  m.impl("kd_rows_forward_kl_", &kd_rows_forward_kl_cpu);
  m.impl("feature_loss_fwd", &feature_loss_fwd_cpu);
  m.impl("importance_scores_acc", &importance_scores_acc_cpu);
}

}  // namespace flexkd
