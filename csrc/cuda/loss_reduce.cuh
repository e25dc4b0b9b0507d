// The small deterministic reductions around the loss kernels: the row-weight totals that the mean
// needs, and the final sum of per-block (or per-column) loss partials in one fixed order.
#pragma once

#include "cuda/common.cuh"

namespace flexkd::cuda {

enum class ScaleMode : int {
  kOne,   // sum, none
  kInvK,  // corr mean: 1 / k
  kInvKW  // mse mean: 1 / (k * sum_n w_n), 0 when the weights sum to 0
};

// The factor c of the op contract, evaluated on the device so a mask never costs a host sync.
template <typename Acc>
struct LossScale {
  ScaleMode mode;
  Acc k;
  Acc rows;
  const Acc* weight_stats;  // [2] = {sum_n w_n, rows with w_n != 0}; nullptr: no mask, all weights 1

  __device__ Acc weight_sum() const { return weight_stats ? weight_stats[0] : rows; }
  __device__ Acc weighted_rows() const { return weight_stats ? weight_stats[1] : rows; }
  __device__ Acc value() const {
    switch (mode) {
      case ScaleMode::kInvK: return Acc(1) / k;
      case ScaleMode::kInvKW: {
        const Acc w = weight_sum();  // `!= 0`: a NaN weight reaches the loss
        return w != Acc(0) ? Acc(1) / (k * w) : Acc(0);
      }
      default: return Acc(1);
    }
  }
};

template <typename Acc>
__global__ void __launch_bounds__(kBlockThreads)
    weight_stats_kernel(const Acc* __restrict__ mask, int64_t rows, Acc* __restrict__ out) {
  __shared__ Acc scratch[kWarpsPerBlock];
  Acc sum = 0, weighted = 0;
  for (int64_t i = threadIdx.x; i < rows; i += blockDim.x) {
    const Acc w = mask[i];
    sum += w;
    weighted += w != Acc(0) ? Acc(1) : Acc(0);  // a NaN weight counts
  }
  sum = block_sum(sum, scratch);
  __syncthreads();
  weighted = block_sum(weighted, scratch);
  if (threadIdx.x == 0) {
    out[0] = sum;
    out[1] = weighted;
  }
}

template <typename Acc>
__global__ void __launch_bounds__(kBlockThreads)
    reduce_to_scalar_kernel(const Acc* __restrict__ values, int64_t count, LossScale<Acc> scale,
                            Acc* __restrict__ out) {
  __shared__ Acc scratch[kWarpsPerBlock];
  Acc sum = 0;
  for (int64_t i = threadIdx.x; i < count; i += blockDim.x) sum += values[i];
  sum = block_sum(sum, scratch);
  if (threadIdx.x == 0) {
    const Acc c = scale.value();
    *out = c == Acc(0) ? Acc(0) : sum * c;
  }
}

// Writes {sum_n mask[n], count of mask[n] != 0} into out[0..1].
template <typename Acc>
void launch_weight_stats(const Acc* mask, int64_t rows, Acc* out, cudaStream_t stream) {
  weight_stats_kernel<Acc><<<1, kBlockThreads, 0, stream>>>(mask, rows, out);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// *out = scale * sum(values[0..count)).
template <typename Acc>
void launch_reduce_to_scalar(const Acc* values, int64_t count, const LossScale<Acc>& scale, Acc* out,
                             cudaStream_t stream) {
  reduce_to_scalar_kernel<Acc><<<1, kBlockThreads, 0, stream>>>(values, count, scale, out);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace flexkd::cuda
