// loss="corr": one statistics pass over the rows (per-chunk partial sums, shifted by row 0 of each
// column so that the variances do not cancel), a per-column pass that merges the chunks in a fixed
// order into r_j and the gradient coefficients, then the row pass for the gradients.
#include <ATen/ops/empty.h>

#include "cuda/launchers.h"
#include "cuda/row_pass.cuh"

namespace flexkd::cuda {
namespace {

constexpr int kStatsCols = 32;     // columns per block (one per lane)
constexpr int kStatsRowLanes = 8;  // rows of a chunk are split over this many threads per column
constexpr int kMinRowsPerChunk = 64;
enum Moment : int { kSx = 0, kSy, kSxx, kSyy, kSxy, kMoments };

// partials[chunk][m][j]: sum over the chunk's rows of w x, w y, w x^2, w y^2, w x y with
// x = s_nj - s_0j, y = t_nj - t_0j.
template <typename S, typename T, typename Acc>
__global__ void __launch_bounds__(kStatsCols * kStatsRowLanes)
    corr_stats_kernel(RowPassArgs<S, T, Acc> a, int64_t rows_per_chunk, Acc* __restrict__ partials) {
  __shared__ Acc moments[kMoments][kStatsRowLanes][kStatsCols];
  const int64_t j = static_cast<int64_t>(blockIdx.x) * kStatsCols + threadIdx.x;
  const int64_t begin = static_cast<int64_t>(blockIdx.y) * rows_per_chunk;
  const int64_t end = min(a.rows, begin + rows_per_chunk);
  Acc sx = 0, sy = 0, sxx = 0, syy = 0, sxy = 0;
  if (j < a.k) {
    const int64_t col = a.index[j];
    CUDA_KERNEL_ASSERT(col >= 0 && col < a.width);
    const S* s_col = a.student + j * a.s_col;
    const T* t_col = a.teacher + col * a.t_col;
    const Acc s0 = static_cast<Acc>(s_col[0]);
    const Acc t0 = static_cast<Acc>(t_col[0]);
#pragma unroll 4
    for (int64_t n = begin + threadIdx.y; n < end; n += kStatsRowLanes) {
      const Acc w = a.mask ? a.mask[n] : Acc(1);
      const Acc x = static_cast<Acc>(s_col[n * a.s_row]) - s0;
      const Acc y = static_cast<Acc>(t_col[n * a.t_row]) - t0;
      const Acc wx = w * x, wy = w * y;
      sx += wx;
      sy += wy;
      sxx += wx * x;
      syy += wy * y;
      sxy += wx * y;
    }
  }
  moments[kSx][threadIdx.y][threadIdx.x] = sx;
  moments[kSy][threadIdx.y][threadIdx.x] = sy;
  moments[kSxx][threadIdx.y][threadIdx.x] = sxx;
  moments[kSyy][threadIdx.y][threadIdx.x] = syy;
  moments[kSxy][threadIdx.y][threadIdx.x] = sxy;
  __syncthreads();
  if (threadIdx.y < kMoments && j < a.k) {
    Acc total = 0;
#pragma unroll
    for (int lane = 0; lane < kStatsRowLanes; ++lane) total += moments[threadIdx.y][lane][threadIdx.x];
    partials[(static_cast<int64_t>(blockIdx.y) * kMoments + threadIdx.y) * a.k + j] = total;
  }
}

// Per column j: merge the chunks in order, then r_j, the column loss 1 - r_j and the gradient terms
// of CorrGradOp. `c` is 1/k for the mean, 1 for sum and none.
template <typename S, typename T, typename Acc>
__global__ void __launch_bounds__(kBlockThreads)
    corr_columns_kernel(RowPassArgs<S, T, Acc> a, const Acc* __restrict__ partials, int chunks,
                        LossScale<Acc> weights, Acc eps, Acc c, Acc* __restrict__ params,
                        Acc* __restrict__ column_loss) {
  const int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j >= a.k) return;
  const int64_t k = a.k;
  if (weights.positive_rows() < Acc(2)) {
    column_loss[j] = 0;
    params[kMeanS * k + j] = 0;
    params[kMeanT * k + j] = 0;
    params[kCoef * k + j] = 0;
    params[kAlphaS * k + j] = 0;
    params[kAlphaT * k + j] = 0;
    return;
  }
  Acc m[kMoments] = {0, 0, 0, 0, 0};
  for (int chunk = 0; chunk < chunks; ++chunk) {
#pragma unroll
    for (int q = 0; q < kMoments; ++q) m[q] += partials[(static_cast<int64_t>(chunk) * kMoments + q) * k + j];
  }
  const Acc inv_w = Acc(1) / weights.weight_sum();
  const Acc mx = m[kSx] * inv_w, my = m[kSy] * inv_w;
  const Acc cov = m[kSxy] * inv_w - mx * my;
  const Acc var_s = max(m[kSxx] * inv_w - mx * mx, Acc(0));
  const Acc var_t = max(m[kSyy] * inv_w - my * my, Acc(0));
  const Acc q = var_s * var_t + eps;
  const Acc rsqrt_q = Acc(1) / sqrt(q);
  column_loss[j] = Acc(1) - cov * rsqrt_q;
  const int64_t col = a.index[j];
  params[kMeanS * k + j] = static_cast<Acc>(a.student[j * a.s_col]) + mx;
  params[kMeanT * k + j] = static_cast<Acc>(a.teacher[col * a.t_col]) + my;
  params[kCoef * k + j] = -c * rsqrt_q * inv_w;
  params[kAlphaS * k + j] = cov * var_t / q;
  params[kAlphaT * k + j] = cov * var_s / q;
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
  corr_columns_kernel<S, T, Acc><<<static_cast<unsigned>(ceil_div(k, kBlockThreads)), kBlockThreads, 0, stream>>>(
      args, partials.const_data_ptr<Acc>(), static_cast<int>(chunks), weights, static_cast<Acc>(p.eps),
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
