// Argument checks and string-option parsing for the kernel-level ops, shared by the CPU and CUDA
// implementations. Failures raise c10::ValueError / c10::TypeError (Python ValueError / TypeError)
// naming the argument.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <optional>
#include <vector>

#include <string_view>

#include "flexkd/options.h"

namespace flexkd {

inline Loss parse_loss(std::string_view loss) {
  if (loss == "mse") return Loss::kMse;
  if (loss == "corr") return Loss::kCorr;
  TORCH_CHECK_VALUE(false, "loss must be 'mse' or 'corr', got '", loss, "'");
}

inline Reduction parse_reduction(std::string_view reduction) {
  if (reduction == "mean") return Reduction::kMean;
  if (reduction == "sum") return Reduction::kSum;
  if (reduction == "none") return Reduction::kNone;
  TORCH_CHECK_VALUE(false, "reduction must be 'mean', 'sum' or 'none', got '", reduction, "'");
}

inline Stat parse_stat(std::string_view stat) {
  if (stat == "grad_x_act") return Stat::kGradXAct;
  if (stat == "grad") return Stat::kGrad;
  if (stat == "grad_sq") return Stat::kGradSq;
  TORCH_CHECK_VALUE(false, "stat must be 'grad_x_act', 'grad' or 'grad_sq', got '", stat, "'");
}

inline bool is_supported_float(c10::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kBFloat16 || t == at::kHalf;
}

inline void check_float_matrix(const at::Tensor& t, const char* name) {
  TORCH_CHECK_TYPE(is_supported_float(t.scalar_type()), name,
                   " must be float32, float64, bfloat16 or float16, got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.dim() == 2, name, " must be 2-D [rows, columns], got shape ", t.sizes());
}

// fp64 when either input is fp64, fp32 otherwise.
inline c10::ScalarType accumulation_type(const at::Tensor& a, const at::Tensor& b) {
  return a.scalar_type() == at::kDouble || b.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

inline void check_same_device(const at::Tensor& t, const at::Tensor& ref, const char* name,
                              const char* ref_name) {
  TORCH_CHECK_VALUE(t.device() == ref.device(), name, " is on ", t.device(), " but ", ref_name,
                    " is on ", ref.device());
}

inline void check_row_weights(const std::optional<at::Tensor>& mask, const at::Tensor& ref,
                              int64_t rows, c10::ScalarType dtype) {
  if (!mask.has_value()) return;
  const at::Tensor& m = *mask;
  check_same_device(m, ref, "mask", "student");
  TORCH_CHECK_TYPE(m.scalar_type() == dtype, "mask must have dtype ", dtype,
                   " (the accumulation dtype), got ", m.scalar_type());
  TORCH_CHECK_VALUE(m.dim() == 1 && m.size(0) == rows, "mask must have shape [", rows,
                    "], got ", m.sizes());
  TORCH_CHECK_VALUE(m.is_contiguous(), "mask must be contiguous");
}

// Everything about feature_loss_fwd's arguments except the index values (a device-side check).
inline void check_feature_loss_args(const at::Tensor& student, const at::Tensor& teacher,
                                    const at::Tensor& index, const std::optional<at::Tensor>& mask,
                                    double eps) {
  check_float_matrix(student, "student");
  check_float_matrix(teacher, "teacher");
  check_same_device(teacher, student, "teacher", "student");
  check_same_device(index, student, "index", "student");
  TORCH_CHECK_VALUE(student.size(0) == teacher.size(0), "student and teacher must have the same ",
                    "number of rows, got ", student.size(0), " and ", teacher.size(0));
  TORCH_CHECK_VALUE(student.size(1) > 0, "student must have at least one column (k > 0)");
  TORCH_CHECK_TYPE(index.scalar_type() == at::kLong, "index must be int64, got ",
                   index.scalar_type());
  TORCH_CHECK_VALUE(index.dim() == 1 && index.size(0) == student.size(1),
                    "index must have shape [k] = [", student.size(1), "], got ", index.sizes());
  TORCH_CHECK_VALUE(index.is_contiguous(), "index must be contiguous");
  TORCH_CHECK_VALUE(student.size(1) <= teacher.size(1), "index selects ", student.size(1),
                    " columns but teacher has only ", teacher.size(1));
  TORCH_CHECK_VALUE(eps >= 0.0, "eps must be >= 0, got ", eps);
  check_row_weights(mask, student, student.size(0), accumulation_type(student, teacher));
}

inline void check_importance_args(const at::Tensor& hidden, const at::Tensor& grad,
                                  const std::optional<at::Tensor>& mask, const at::Tensor& out) {
  check_float_matrix(hidden, "hidden");
  check_float_matrix(grad, "grad");
  check_same_device(grad, hidden, "grad", "hidden");
  check_same_device(out, hidden, "out", "hidden");
  TORCH_CHECK_VALUE(hidden.sizes() == grad.sizes(), "hidden and grad must have the same shape, got ",
                    hidden.sizes(), " and ", grad.sizes());
  TORCH_CHECK_TYPE(out.scalar_type() == at::kFloat, "out must be float32, got ", out.scalar_type());
  TORCH_CHECK_VALUE(out.dim() == 1 && out.size(0) == hidden.size(1), "out must have shape [",
                    hidden.size(1), "], got ", out.sizes());
  TORCH_CHECK_VALUE(out.is_contiguous(), "out must be contiguous");
  if (mask.has_value()) {
    check_same_device(*mask, hidden, "mask", "hidden");
    TORCH_CHECK_TYPE(mask->scalar_type() == at::kFloat, "mask must be float32, got ",
                     mask->scalar_type());
    TORCH_CHECK_VALUE(mask->dim() == 1 && mask->size(0) == hidden.size(0), "mask must have shape [",
                      hidden.size(0), "], got ", mask->sizes());
    TORCH_CHECK_VALUE(mask->is_contiguous(), "mask must be contiguous");
  }
}

// Shape of the loss output: 0-dim for mean/sum, [rows] for mse/none, [k] for corr/none.
inline std::vector<int64_t> loss_shape(Loss loss, Reduction reduction, int64_t rows,
                                       int64_t k) {
  if (reduction != Reduction::kNone) return {};
  return {loss == Loss::kMse ? rows : k};
}

}  // namespace flexkd
