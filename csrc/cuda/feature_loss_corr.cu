// loss="corr": a statistics pass over chunks of rows, a per-column pass that merges the chunks in a
// fixed order into 1 - r_j and the gradient terms, then the row pass for the gradients. The algorithm
// and the names are those of flexkd/ops/reference.py ("corr statistics"): column moments merged with
// Chan's pairwise update (each thread adds its rows one at a time, the one-row case of the update), so
// any column mean and any first row are exact to rounding.
#include <ATen/ops/empty.h>

#include "cuda/launchers.h"
#include "cuda/row_pass.cuh"

namespace flexkd::cuda {
namespace {

constexpr int kStatsCols = 32;     // columns per block (one per lane)
constexpr int kStatsRowLanes = 8;  // rows of a chunk are split over this many threads per column
constexpr int kMinRowsPerChunk = 64;
// Rows of a chunk's partials (named apart from row_pass.cuh's CorrParam rows of the gradient terms).
enum Moment : int {
  kMomentWeight = 0, kMomentMeanS, kMomentMeanT, kMomentM2S, kMomentM2T, kMomentCoM2, kMoments
};

// One column's moments over a set of rows: weight, weighted means, centred second moments, co-moment.
template <typename Acc>
struct ColumnMoments {
  Acc weight = 0, mean_s = 0, mean_t = 0, m2_s = 0, m2_t = 0, co_m2 = 0;

  // Absorbs the moments of more rows (Chan's pairwise update): W = W_a + W_b, f = W_b / W, g = W_a f.
  __device__ __forceinline__ void merge(Acc weight_b, Acc mean_s_b, Acc mean_t_b, Acc m2_s_b, Acc m2_t_b,
                                        Acc co_m2_b) {
    const Acc merged = weight + weight_b;
    const Acc f = merged != Acc(0) ? weight_b / merged : Acc(0);
    const Acc g = weight * f;
    const Acc d_s = mean_s_b - mean_s, d_t = mean_t_b - mean_t;
    const Acc gd_s = g * d_s;
    weight = merged;
    mean_s += f * d_s;
    mean_t += f * d_t;
    m2_s += m2_s_b + gd_s * d_s;
    m2_t += m2_t_b + g * d_t * d_t;
    co_m2 += co_m2_b + gd_s * d_t;
  }
  __device__ __forceinline__ void add_row(Acc w, Acc s, Acc t) { merge(w, s, t, Acc(0), Acc(0), Acc(0)); }
};

// partials[chunk][m][j]: the Moment m of column j over the chunk's rows.
template <typename S, typename T, typename Acc>
__global__ void __launch_bounds__(kStatsCols * kStatsRowLanes)
    corr_stats_kernel(RowPassArgs<S, T, Acc> a, int64_t rows_per_chunk, Acc* __restrict__ partials) {
  __shared__ Acc moments[kMoments][kStatsRowLanes][kStatsCols];
  const int64_t j = static_cast<int64_t>(blockIdx.x) * kStatsCols + threadIdx.x;
  const int64_t begin = static_cast<int64_t>(blockIdx.y) * rows_per_chunk;
  const int64_t end = min(a.rows, begin + rows_per_chunk);
  ColumnMoments<Acc> m;
  if (j < a.k) {
    const int64_t col = a.index[j];
    CUDA_KERNEL_ASSERT(col >= 0 && col < a.width);
    const S* s_col = a.student + j * a.s_col;
    const T* t_col = a.teacher + col * a.t_col;
    // Masked rows are read too: 0 * NaN is NaN, so a NaN anywhere reaches the loss (as in torch).
#pragma unroll 4
    for (int64_t n = begin + threadIdx.y; n < end; n += kStatsRowLanes) {
      const Acc w = a.mask ? a.mask[n] : Acc(1);
      m.add_row(w, static_cast<Acc>(s_col[n * a.s_row]), static_cast<Acc>(t_col[n * a.t_row]));
    }
  }
  moments[kMomentWeight][threadIdx.y][threadIdx.x] = m.weight;
  moments[kMomentMeanS][threadIdx.y][threadIdx.x] = m.mean_s;
  moments[kMomentMeanT][threadIdx.y][threadIdx.x] = m.mean_t;
  moments[kMomentM2S][threadIdx.y][threadIdx.x] = m.m2_s;
  moments[kMomentM2T][threadIdx.y][threadIdx.x] = m.m2_t;
  moments[kMomentCoM2][threadIdx.y][threadIdx.x] = m.co_m2;
  __syncthreads();
  if (threadIdx.y == 0 && j < a.k) {
    for (int lane = 1; lane < kStatsRowLanes; ++lane) {
      m.merge(moments[kMomentWeight][lane][threadIdx.x], moments[kMomentMeanS][lane][threadIdx.x],
              moments[kMomentMeanT][lane][threadIdx.x], moments[kMomentM2S][lane][threadIdx.x],
              moments[kMomentM2T][lane][threadIdx.x], moments[kMomentCoM2][lane][threadIdx.x]);
    }
    Acc* out = partials + static_cast<int64_t>(blockIdx.y) * kMoments * a.k + j;
    out[kMomentWeight * a.k] = m.weight;
    out[kMomentMeanS * a.k] = m.mean_s;
    out[kMomentMeanT * a.k] = m.mean_t;
    out[kMomentM2S * a.k] = m.m2_s;
    out[kMomentM2T * a.k] = m.m2_t;
    out[kMomentCoM2 * a.k] = m.co_m2;
  }
}

// x, or lo where x < lo; NaN stays NaN (fmax would return lo).
template <typename Acc>
__device__ __forceinline__ Acc at_least(Acc x, Acc lo) {
  return x < lo ? lo : x;
}

// Per column j: merge the chunks in order, then the column loss 1 - r_j and the CorrGradOp terms
// (coef, alpha_s, alpha_t as in the reference). `c` is 1/k for the mean, 1 for sum and none.
template <typename Acc>
__global__ void __launch_bounds__(kBlockThreads)
    corr_columns_kernel(const Acc* __restrict__ partials, int64_t k, int chunks, LossScale<Acc> weights,
                        Acc eps, Acc c, Acc* __restrict__ params, Acc* __restrict__ column_loss) {
  const int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j >= k) return;
  if (weights.weighted_rows() < Acc(2)) {
    column_loss[j] = 0;
    params[kMeanS * k + j] = 0;
    params[kMeanT * k + j] = 0;
    params[kCoef * k + j] = 0;
    params[kAlphaS * k + j] = 0;
    params[kAlphaT * k + j] = 0;
    return;
  }
  ColumnMoments<Acc> m;
  for (int chunk = 0; chunk < chunks; ++chunk) {
    const Acc* p = partials + static_cast<int64_t>(chunk) * kMoments * k + j;
    m.merge(p[kMomentWeight * k], p[kMomentMeanS * k], p[kMomentMeanT * k], p[kMomentM2S * k],
            p[kMomentM2T * k], p[kMomentCoM2 * k]);
  }
  const Acc var_s = m.m2_s / m.weight, var_t = m.m2_t / m.weight, cov = m.co_m2 / m.weight;
  const Acc eps2 = eps * eps;
  const Acc sigmas = sqrt(at_least(var_s, eps2)) * sqrt(at_least(var_t, eps2));
  column_loss[j] = Acc(1) - cov / sigmas;
  params[kMeanS * k + j] = m.mean_s;
  params[kMeanT * k + j] = m.mean_t;
  params[kCoef * k + j] = -c / (m.weight * sigmas);
  params[kAlphaS * k + j] = var_s > eps2 ? cov / var_s : Acc(0);
  params[kAlphaT * k + j] = var_t > eps2 ? cov / var_t : Acc(0);
}

template <typename S, typename T>
void corr(const FeatureLossProblem& p, cudaStream_t stream) {
  using Acc = AccOf<S, T>;
  const int device = p.student.get_device();
  const int64_t rows = p.student.size(0), k = p.student.size(1);
  const auto acc_options = p.loss.options();
  const bool mean = p.reduction == Reduction::kMean;

  LossScale<Acc> weights{ScaleMode::kOne, static_cast<Acc>(k), static_cast<Acc>(rows), nullptr};
  at::Tensor weight_stats;
  if (p.mask.defined()) {
    weight_stats = at::empty({2}, acc_options);
    launch_weight_stats(p.mask.const_data_ptr<Acc>(), rows, weight_stats.mutable_data_ptr<Acc>(), stream);
    weights.weight_stats = weight_stats.const_data_ptr<Acc>();
  }
  auto args = row_pass_args<S, T, Acc>(p);

  const auto stats_kernel = corr_stats_kernel<S, T, Acc>;
  const int64_t col_blocks = ceil_div(k, kStatsCols);
  const int64_t chunks = row_chunks(device, resident_blocks_per_sm(stats_kernel, kStatsCols * kStatsRowLanes),
                                    col_blocks, rows, kMinRowsPerChunk);
  const int64_t rows_per_chunk = ceil_div(rows, chunks);
  at::Tensor partials = at::empty({chunks, kMoments, k}, acc_options);
  stats_kernel<<<dim3(static_cast<unsigned>(col_blocks), static_cast<unsigned>(chunks)),
         dim3(kStatsCols, kStatsRowLanes), 0, stream>>>(args, rows_per_chunk, partials.mutable_data_ptr<Acc>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  at::Tensor params = at::empty({kCorrParams, k}, acc_options);
  at::Tensor column_loss = p.reduction == Reduction::kNone ? p.loss : at::empty({k}, acc_options);
  corr_columns_kernel<Acc><<<static_cast<unsigned>(ceil_div(k, kBlockThreads)), kBlockThreads, 0, stream>>>(
      partials.const_data_ptr<Acc>(), k, static_cast<int>(chunks), weights, static_cast<Acc>(p.eps),
      mean ? Acc(1) / static_cast<Acc>(k) : Acc(1), params.mutable_data_ptr<Acc>(),
      column_loss.mutable_data_ptr<Acc>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  if (p.reduction != Reduction::kNone) {
    const LossScale<Acc> scale{mean ? ScaleMode::kInvK : ScaleMode::kOne, static_cast<Acc>(k),
                               static_cast<Acc>(rows), nullptr};
    launch_reduce_to_scalar(column_loss.const_data_ptr<Acc>(), k, scale, p.loss.mutable_data_ptr<Acc>(), stream);
  }
  if (args.grad_student || args.grad_teacher) {
    launch_row_pass(args, CorrGradOp<Acc>{params.const_data_ptr<Acc>(), k}, device, stream);
  }
}

}  // namespace

void corr_forward(const FeatureLossProblem& p, cudaStream_t stream) {
  dispatch_student_teacher(p, [&](auto s, auto t) {
    corr<typename decltype(s)::type, typename decltype(t)::type>(p, stream);
  });
}

}  // namespace flexkd::cuda
