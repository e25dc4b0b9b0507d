// The autograd kernel of flexkd::feature_loss_fwd, for every device the native kernels cover.
//
// The forward kernel returns the loss and, from the same pass, its gradients for grad_output == 1; the
// backward only scales them. The same formula serves the torch and Triton variants in Python
// (flexkd/ops/_registration.py, _backward_feature_loss): keep the two alike. It is registered here
// rather than through torch.library.register_autograd because the Python wrapper costs ~80 us a call
// (fwd+bwd), more than the kernel itself below a few thousand rows.
#include <ATen/TensorOperators.h>
#include <ATen/TensorSubclassLikeUtils.h>
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <optional>
#include <string_view>
#include <tuple>

namespace flexkd {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

std::tuple<at::Tensor, at::Tensor, at::Tensor> call_feature_loss_fwd(
    const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& index,
    const std::optional<at::Tensor>& mask, c10::string_view loss, c10::string_view reduction,
    double eps, bool student_grad, bool teacher_grad) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("flexkd::feature_loss_fwd", "")
          .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
              const at::Tensor&, const at::Tensor&, const at::Tensor&,
              const std::optional<at::Tensor>&, c10::string_view, c10::string_view, double, bool,
              bool)>();
  return op.call(student, teacher, index, mask, loss, reduction, eps, student_grad, teacher_grad);
}

// grad_output is exactly 1 on a real CPU tensor (loss.backward() on the loss itself): reading a CUDA
// value would sync, and a traced, fake or functorch-wrapped one has no value to read.
bool is_eager_cpu_one(const at::Tensor& grad) {
  return grad.is_cpu() && !at::isTensorSubclassLike(grad) && grad.item<double>() == 1.0;
}

at::Tensor scale(const at::Tensor& saved, const at::Tensor& grad, bool per_row,
                 c10::ScalarType dtype) {
  if (grad.dim() == 0) {
    if (is_eager_cpu_one(grad)) return saved;
    // A 0-dim operand does not promote, so a bf16/fp16 gradient rounds once.
    return saved * grad;
  }
  return (saved * (per_row ? grad.unsqueeze(-1) : grad)).to(dtype);
}

class FeatureLossFunction : public torch::autograd::Function<FeatureLossFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& student,
                               const at::Tensor& teacher, const at::Tensor& index,
                               const std::optional<at::Tensor>& mask, c10::string_view loss,
                               c10::string_view reduction, double eps, bool student_grad,
                               bool teacher_grad) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [value, grad_student, grad_teacher] = call_feature_loss_fwd(
        student, teacher, index, mask, loss, reduction, eps, student_grad, teacher_grad);
    ctx->save_for_backward({grad_student, grad_teacher, index});
    ctx->saved_data["teacher_sizes"] = teacher.sizes().vec();
    ctx->saved_data["student_dtype"] = student.scalar_type();
    // reduction="none" gives one loss per row for mse ([N]) and one per selected dim for corr ([k]).
    ctx->saved_data["per_row"] = loss == "mse";
    // The two gradient outputs are never used downstream; do not build zero tensors for them.
    ctx->set_materialize_grads(false);
    ctx->mark_non_differentiable({grad_student, grad_teacher});
    return {value, grad_student, grad_teacher};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    variable_list grads(9);  // one per forward argument; undefined = no gradient
    const at::Tensor& grad_loss = grad_outputs[0];
    if (!grad_loss.defined()) return grads;  // only the (non-differentiable) gradient outputs were used
    const variable_list saved = ctx->get_saved_variables();
    const bool per_row = ctx->saved_data["per_row"].toBool();
    if (ctx->needs_input_grad(0)) {
      grads[0] = scale(saved[0], grad_loss, per_row, ctx->saved_data["student_dtype"].toScalarType());
    }
    if (ctx->needs_input_grad(1)) {
      const at::Tensor columns = scale(saved[1], grad_loss, per_row, saved[1].scalar_type());
      grads[1] = columns.new_zeros(ctx->saved_data["teacher_sizes"].toIntVector())
                     .index_copy(-1, saved[2], columns);
    }
    return grads;
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor> feature_loss_fwd_autograd(
    const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& index,
    const std::optional<at::Tensor>& mask, c10::string_view loss, c10::string_view reduction,
    double eps, bool student_grad, bool teacher_grad) {
  variable_list out = FeatureLossFunction::apply(student, teacher, index, mask, loss, reduction, eps,
                                                 student_grad, teacher_grad);
  return {out[0], out[1], out[2]};
}

}  // namespace
}  // namespace flexkd

TORCH_LIBRARY_IMPL(flexkd, Autograd, m) {
  m.impl("feature_loss_fwd", &flexkd::feature_loss_fwd_autograd);
}
