// Host entry points of the CUDA kernels (defined in the .cu files), called by ops_cuda.cpp once it has
// checked the arguments and allocated the outputs. All launches go to `stream`; none synchronises.
#pragma once

#include <ATen/core/Tensor.h>
#include <cuda_runtime.h>

#include "flexkd/options.h"

namespace flexkd::cuda {

using flexkd::Loss;
using flexkd::Reduction;
using flexkd::Stat;

// One feature_loss_fwd call on 2-D inputs with N > 0 rows (see the op contract).
struct FeatureLossProblem {
  at::Tensor student;       // [N, k], any strides
  at::Tensor teacher;       // [N, D], any strides
  at::Tensor index;         // int64 [k], contiguous
  at::Tensor mask;          // contiguous [N] of the accumulation dtype, or undefined
  Reduction reduction;
  double eps;               // corr only
  at::Tensor loss;          // accumulation dtype: [] for mean/sum, [N] (mse) or [k] (corr) for none
  at::Tensor grad_student;  // contiguous [N, k] of the student's dtype, or undefined
  at::Tensor grad_teacher;  // contiguous [N, k] of the teacher's dtype, or undefined
};

void mse_forward(const FeatureLossProblem& p, cudaStream_t stream);
void corr_forward(const FeatureLossProblem& p, cudaStream_t stream);

// out[j] += sum_n mask[n] * f(hidden[n, j], grad[n, j]); out is contiguous fp32 [D].
void importance_accumulate(const at::Tensor& hidden, const at::Tensor& grad, const at::Tensor& mask,
                           Stat stat, const at::Tensor& out, cudaStream_t stream);

}  // namespace flexkd::cuda
