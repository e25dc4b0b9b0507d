// loss="mse": the row pass computes the loss partials and both gradients at once; a one-block kernel
// sums the partials in a fixed order (and a one-block pre-pass totals the mask for the mean).
#include <ATen/ops/empty.h>

#include "cuda/launchers.h"
#include "cuda/row_pass.cuh"

namespace flexkd::cuda {
namespace {

template <typename S, typename T>
void mse(const FeatureLossProblem& p, cudaStream_t stream) {
  using Acc = AccOf<S, T>;
  const int device = p.student.get_device();
  const int64_t rows = p.student.size(0);
  const auto acc_options = p.loss.options();

  LossScale<Acc> scale{ScaleMode::kOne, static_cast<Acc>(p.student.size(1)), static_cast<Acc>(rows), nullptr};
  at::Tensor weight_stats;
  if (p.reduction == Reduction::kMean) {
    scale.mode = ScaleMode::kInvKW;
    if (p.mask.defined()) {
      weight_stats = at::empty({2}, acc_options);
      launch_weight_stats(p.mask.const_data_ptr<Acc>(), rows, weight_stats.mutable_data_ptr<Acc>(), stream);
      scale.weight_stats = weight_stats.const_data_ptr<Acc>();
    }
  }

  auto args = row_pass_args<S, T, Acc>(p);
  at::Tensor partials;
  if (p.reduction == Reduction::kNone) {
    args.row_loss = p.loss.mutable_data_ptr<Acc>();
  } else {
    partials = at::empty({row_pass_max_blocks(device)}, acc_options);
    args.block_loss = partials.mutable_data_ptr<Acc>();
  }
  const int blocks = launch_row_pass(args, MseOp<Acc>{scale}, device, stream);
  if (p.reduction != Reduction::kNone) {
    launch_reduce_to_scalar(partials.const_data_ptr<Acc>(), blocks, scale, p.loss.mutable_data_ptr<Acc>(),
                            stream);
  }
}

}  // namespace

void mse_forward(const FeatureLossProblem& p, cudaStream_t stream) {
  dispatch_student_teacher(p, [&](auto s, auto t) {
    mse<typename decltype(s)::type, typename decltype(t)::type>(p, stream);
  });
}

}  // namespace flexkd::cuda
