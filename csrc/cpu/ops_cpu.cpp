// The CPU kernels of flexkd::feature_loss_fwd, flexkd::importance_scores_acc and flexkd::kd_rows_:
// argument checks, output allocation, and a call into the engine variant for this machine's instruction set.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <optional>
#include <string>
#include <string_view>
#include <tuple>

#include "cpu/engine/kernel_args.h"
#include "cpu/gradient_buffers.h"
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
  at::Tensor grad_student = student_grad ? cpu::empty_gradient({rows, k}, student.options())
                                         : at::empty({0}, student.options());
  at::Tensor grad_teacher = teacher_grad ? cpu::empty_gradient({rows, k}, teacher.options())
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

cpu::KdKind parse_kd_kind(std::string_view kind) {
  if (kind == "forward_kl") return cpu::KdKind::kForwardKl;
  if (kind == "reverse_kl") return cpu::KdKind::kReverseKl;
  TORCH_CHECK_VALUE(kind == "jsd", "kind must be 'forward_kl', 'reverse_kl' or 'jsd', got '", kind, "'");
  return cpu::KdKind::kJsd;
}

// teacher: dense logits [rows, V], or the top-K values [rows, K] with topk_indices [rows, K].
at::Tensor kd_rows_cpu(at::Tensor z, const at::Tensor& teacher, const std::optional<at::Tensor>& topk_indices,
                       std::string_view kind, double beta, double temperature) {
  check_cpu(z, "z");
  check_cpu(teacher, "teacher");
  TORCH_CHECK_VALUE(z.dim() == 2 && z.scalar_type() == at::kFloat && z.stride(1) == 1,
                    "z must be a 2-D fp32 tensor with unit column stride, got ", z.sizes(), " ", z.scalar_type());
  const cpu::KdKind kind_code = parse_kd_kind(kind);
  const int64_t rows = z.size(0), vocab = z.size(1);
  const int64_t teacher_cols = topk_indices.has_value() ? teacher.size(-1) : vocab;
  TORCH_CHECK_VALUE(teacher.dim() == 2 && teacher.size(0) == rows && teacher.size(1) == teacher_cols &&
                        teacher.stride(1) == 1,
                    "teacher must be [", rows, ", ", topk_indices.has_value() ? "K" : std::to_string(vocab),
                    "] with unit column stride, got ", teacher.sizes());
  TORCH_CHECK_TYPE(teacher.scalar_type() == at::kFloat || teacher.scalar_type() == at::kBFloat16 ||
                       teacher.scalar_type() == at::kHalf,
                   "teacher must be fp32, bf16 or fp16, got ", teacher.scalar_type());
  TORCH_CHECK_VALUE(temperature > 0, "temperature must be > 0, got ", temperature);
  TORCH_CHECK_VALUE(kind_code != cpu::KdKind::kJsd || (beta > 0 && beta < 1),
                    "beta must lie strictly between 0 and 1 for kind='jsd', got ", beta);
  cpu::KdRowsArgs args{};
  if (topk_indices.has_value()) {
    const at::Tensor& idx = *topk_indices;
    check_cpu(idx, "topk_indices");
    TORCH_CHECK_VALUE(kind_code != cpu::KdKind::kReverseKl, "kind='reverse_kl' is +inf against a top-K teacher");
    TORCH_CHECK_VALUE(idx.scalar_type() == at::kLong && idx.sizes() == teacher.sizes() && idx.stride(1) == 1,
                      "topk_indices must be int64 of the values' shape ", teacher.sizes(),
                      " with unit column stride, got ", idx.scalar_type(), " ", idx.sizes());
    TORCH_CHECK_VALUE(teacher_cols <= vocab, "K must be <= the vocabulary ", vocab, ", got ", teacher_cols);
    for (int64_t n = 0; n < rows; ++n) {
      const int64_t* row = idx.const_data_ptr<int64_t>() + n * idx.stride(0);
      for (int64_t i = 0; i < teacher_cols; ++i) {
        TORCH_CHECK_VALUE(row[i] >= 0 && row[i] < vocab, "topk_indices must lie in [0, ", vocab, "), got ",
                          row[i], " at [", n, ", ", i, "]");
      }
    }
    args.topk_indices = idx.const_data_ptr<int64_t>();
    args.indices_row_stride = idx.stride(0);
    args.top_k = teacher_cols;
  }
  at::Tensor loss = at::empty({rows}, z.options());
  args.z = z.mutable_data_ptr<float>();
  args.z_row_stride = z.stride(0);
  args.teacher = strided_view(teacher);
  args.rows = rows;
  args.vocab = vocab;
  args.kind = kind_code;
  args.beta = static_cast<float>(beta);
  args.temperature = static_cast<float>(temperature);
  args.loss_out = loss.mutable_data_ptr<float>();
  args.num_threads = at::get_num_threads();
  cpu::active_kernels().kd_rows(args);
  return loss;
}

void add_widened_cpu(at::Tensor acc, const at::Tensor& src) {
  check_cpu(acc, "acc");
  check_cpu(src, "src");
  TORCH_CHECK_VALUE(acc.scalar_type() == at::kFloat && acc.is_contiguous(), "acc must be a contiguous fp32 tensor");
  TORCH_CHECK_VALUE(src.sizes() == acc.sizes() && src.is_contiguous(), "src must be contiguous with acc's shape ",
                    acc.sizes(), ", got ", src.sizes());
  TORCH_CHECK_TYPE(src.scalar_type() == at::kFloat || src.scalar_type() == at::kBFloat16 ||
                       src.scalar_type() == at::kHalf,
                   "src must be fp32, bf16 or fp16, got ", src.scalar_type());
  cpu::active_kernels().add_widened(cpu::WidenAddArgs{acc.mutable_data_ptr<float>(), src.const_data_ptr(),
                                                      engine_dtype(src.scalar_type()), acc.numel(),
                                                      at::get_num_threads()});
}

}  // namespace

TORCH_LIBRARY_IMPL(flexkd, CPU, m) {
  m.impl("kd_rows_", &kd_rows_cpu);
  m.impl("add_widened_", &add_widened_cpu);
  m.impl("feature_loss_fwd", &feature_loss_fwd_cpu);
  m.impl("importance_scores_acc", &importance_scores_acc_cpu);
}

}  // namespace flexkd
