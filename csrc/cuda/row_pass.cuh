// One pass over the rows of student [N, k] and the selected columns of teacher [N, D]: each element of
// both is read once, an elementwise `Op` yields the gradients (and, for mse, the loss) in that pass.
//
// A warp owns a row at a time. The selected teacher columns of a tile of up to kTileCols student
// columns sit in shared memory, loaded once per block. Where the student rows allow it, each lane
// reads V = 16 / sizeof(student) consecutive student elements as one 16-byte vector and writes its
// gradients as vectors too; the teacher is gathered with consecutive lanes on consecutive selected
// columns (coalesced) and regrouped to the lanes through a per-warp staging buffer.
#pragma once

#include "cuda/common.cuh"
#include "cuda/launchers.h"
#include "cuda/loss_reduce.cuh"

#include <algorithm>

namespace flexkd::cuda {

constexpr int kTileCols = 4096;
constexpr int kRowPassMaxBlocksPerSm = 8;

template <typename S, typename T, typename Acc>
struct RowPassArgs {
  const S* student;
  int64_t s_row, s_col;
  const T* teacher;
  int64_t t_row, t_col;
  const int64_t* index;  // [k]
  int64_t rows, k, width;
  const Acc* mask;       // [rows], or nullptr for weights 1
  S* grad_student;       // contiguous [rows, k], or nullptr
  T* grad_teacher;       // contiguous [rows, k], or nullptr
  Acc* row_loss;         // [rows] = w_n * l_n (reduction "none"), or nullptr
  Acc* block_loss;       // [gridDim.x] partial sums of w_n * l_n, or nullptr
};

// l_n = sum_j (s - t)^2; grad_s = c * 2 w (s - t); grad_t = -grad_s.
template <typename Acc>
struct MseOp {
  static constexpr bool kHasLoss = true;
  LossScale<Acc> scale;

  __device__ Acc grad_scale() const { return scale.value(); }
  __device__ __forceinline__ void apply(int64_t, Acc s, Acc t, Acc w, Acc c, Acc& loss, Acc& gs,
                                        Acc& gt) const {
    const Acc d = s - t;
    loss += d * d;
    gs = c * Acc(2) * w * d;
    gt = -gs;
  }
};

// The per-column terms of the corr gradient, laid out as kCorrParams rows of k (see corr_forward).
constexpr int kCorrParams = 5;
enum CorrParam : int { kMeanS = 0, kMeanT = 1, kCoef = 2, kAlphaS = 3, kAlphaT = 4 };

// grad_s = coef_j w (b - alpha_s_j a), grad_t = coef_j w (a - alpha_t_j b), a = s - mu_s, b = t - mu_t.
template <typename Acc>
struct CorrGradOp {
  static constexpr bool kHasLoss = false;
  const Acc* __restrict__ params;  // [kCorrParams, k]
  int64_t k;

  __device__ Acc grad_scale() const { return Acc(1); }
  __device__ __forceinline__ void apply(int64_t j, Acc s, Acc t, Acc w, Acc, Acc&, Acc& gs,
                                        Acc& gt) const {
    const Acc a = s - params[kMeanS * k + j];
    const Acc b = t - params[kMeanT * k + j];
    const Acc cw = params[kCoef * k + j] * w;
    gs = cw * (b - params[kAlphaS * k + j] * a);
    gt = cw * (a - params[kAlphaT * k + j] * b);
  }
};

template <int V, typename Acc>
constexpr size_t row_pass_stage_bytes() {
  return V > 1 ? sizeof(Acc) * kBlockThreads * V : 0;
}

template <int V, typename Acc>
size_t row_pass_smem_bytes(int64_t k) {
  return row_pass_stage_bytes<V, Acc>() + sizeof(int32_t) * static_cast<size_t>(std::min<int64_t>(k, kTileCols));
}

template <int V, typename S, typename T, typename Acc, typename Op>
__global__ void __launch_bounds__(kBlockThreads) row_pass_kernel(RowPassArgs<S, T, Acc> a, Op op) {
  extern __shared__ __align__(64) unsigned char smem[];
  Acc* stage = reinterpret_cast<Acc*>(smem) + (threadIdx.x / kWarpSize) * (kWarpSize * V);
  int32_t* cols = reinterpret_cast<int32_t*>(smem + row_pass_stage_bytes<V, Acc>());

  const int lane = threadIdx.x % kWarpSize;
  const int64_t first_warp = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / kWarpSize;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * blockDim.x / kWarpSize;
  const Acc c = op.grad_scale();
  Acc block_total = 0;

  for (int64_t tile = 0; tile < a.k; tile += kTileCols) {
    const int tile_k = static_cast<int>(min(static_cast<int64_t>(kTileCols), a.k - tile));
    __syncthreads();  // the previous tile's columns are no longer read
    for (int i = threadIdx.x; i < tile_k; i += blockDim.x) {
      const int64_t col = a.index[tile + i];
      CUDA_KERNEL_ASSERT(col >= 0 && col < a.width);
      cols[i] = static_cast<int32_t>(col);
    }
    __syncthreads();

    for (int64_t n = first_warp; n < a.rows; n += warps) {
      const Acc w = a.mask ? a.mask[n] : Acc(1);
      const S* s_row = a.student + n * a.s_row + tile * a.s_col;
      const T* t_row = a.teacher + n * a.t_row;
      S* gs_row = a.grad_student ? a.grad_student + n * a.k + tile : nullptr;
      T* gt_row = a.grad_teacher ? a.grad_teacher + n * a.k + tile : nullptr;
      Acc loss = 0;

      for (int c0 = 0; c0 < tile_k; c0 += kWarpSize * V) {
        const int col0 = c0 + lane * V;  // this lane's first student column in the tile
        const bool active = col0 < tile_k;
        Acc s[V], t[V];
        if constexpr (V > 1) {
          Vec<S, V> sv;
          if (active) sv = load_vec<V>(s_row + col0);
#pragma unroll
          for (int u = 0; u < V; ++u) {
            const int cc = c0 + u * kWarpSize + lane;
            if (cc < tile_k) stage[u * kWarpSize + lane] = static_cast<Acc>(t_row[cols[cc] * a.t_col]);
          }
          __syncwarp();
          if (active) {
            const Vec<Acc, V> tv = *reinterpret_cast<const Vec<Acc, V>*>(stage + lane * V);
#pragma unroll
            for (int u = 0; u < V; ++u) {
              s[u] = static_cast<Acc>(sv.v[u]);
              t[u] = tv.v[u];
            }
          }
          __syncwarp();  // the stage is rewritten by the next chunk
        } else if (active) {
          s[0] = static_cast<Acc>(s_row[col0 * a.s_col]);
          t[0] = static_cast<Acc>(t_row[cols[col0] * a.t_col]);
        }
        if (!active) continue;

        Acc gs[V], gt[V];
#pragma unroll
        for (int u = 0; u < V; ++u) op.apply(tile + col0 + u, s[u], t[u], w, c, loss, gs[u], gt[u]);
        if (gs_row) {
          Vec<S, V> out;
#pragma unroll
          for (int u = 0; u < V; ++u) out.v[u] = static_cast<S>(gs[u]);
          store_vec<V>(gs_row + col0, out);
        }
        if (gt_row) {
          Vec<T, V> out;
#pragma unroll
          for (int u = 0; u < V; ++u) out.v[u] = static_cast<T>(gt[u]);
          store_vec<V>(gt_row + col0, out);
        }
      }

      if constexpr (Op::kHasLoss) {
        if (a.row_loss) {
          loss = warp_sum(loss);
          // The same warp owns row n in every tile, so this read-modify-write needs no atomics.
          if (lane == 0) a.row_loss[n] = (tile == 0 ? Acc(0) : a.row_loss[n]) + w * loss;
        } else {
          block_total += w * loss;
        }
      }
    }
  }

  if constexpr (Op::kHasLoss) {
    if (a.block_loss) {
      __shared__ Acc scratch[kWarpsPerBlock];
      const Acc total = block_sum(block_total, scratch);
      if (threadIdx.x == 0) a.block_loss[blockIdx.x] = total;
    }
  }
}

// Upper bound on the blocks of one row pass: callers size the block_loss buffer with it.
inline int row_pass_max_blocks(int device) { return sm_count(device) * kRowPassMaxBlocksPerSm; }

// Launches the row pass over `a` with as many blocks as fit on the GPU at once (never more than the
// rows need) and returns that count, which is also the number of block_loss partials written.
template <typename S, typename T, typename Acc, typename Op>
int launch_row_pass(const RowPassArgs<S, T, Acc>& a, const Op& op, int device, cudaStream_t stream) {
  constexpr int V = 16 / sizeof(S);
  // Student rows and both gradient outputs move as V-element vectors when alignment allows.
  const bool vectorize = a.k % V == 0 && vector_friendly(a.student, a.s_row, a.s_col, sizeof(S), V);
  const auto kernel = vectorize ? row_pass_kernel<V, S, T, Acc, Op> : row_pass_kernel<1, S, T, Acc, Op>;
  const size_t smem = vectorize ? row_pass_smem_bytes<V, Acc>(a.k) : row_pass_smem_bytes<1, Acc>(a.k);
  int resident = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&resident, kernel, kBlockThreads, smem));
  const int per_sm = std::max(1, std::min(resident, kRowPassMaxBlocksPerSm));
  const int blocks = grid_blocks(device, ceil_div(a.rows, kWarpsPerBlock), per_sm);
  kernel<<<blocks, kBlockThreads, smem, stream>>>(a, op);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return blocks;
}

// Calls f(TypeTag<S>{}, TypeTag<T>{}) for the student and teacher dtypes of `p`.
template <typename F>
void dispatch_student_teacher(const FeatureLossProblem& p, F&& f) {
  dispatch_float(p.student.scalar_type(), "student", [&](auto s) {
    dispatch_float(p.teacher.scalar_type(), "teacher", [&](auto t) { f(s, t); });
  });
}

// The row-pass view of `p`; the loss outputs (row_loss / block_loss) are left for the caller.
template <typename S, typename T, typename Acc>
RowPassArgs<S, T, Acc> row_pass_args(const FeatureLossProblem& p) {
  RowPassArgs<S, T, Acc> a{};
  a.student = static_cast<const S*>(p.student.const_data_ptr());
  a.s_row = p.student.stride(0);
  a.s_col = p.student.stride(1);
  a.teacher = static_cast<const T*>(p.teacher.const_data_ptr());
  a.t_row = p.teacher.stride(0);
  a.t_col = p.teacher.stride(1);
  a.index = p.index.const_data_ptr<int64_t>();
  a.rows = p.student.size(0);
  a.k = p.student.size(1);
  a.width = p.teacher.size(1);
  a.mask = p.mask.defined() ? static_cast<const Acc*>(p.mask.const_data_ptr()) : nullptr;
  a.grad_student = p.grad_student.defined() ? static_cast<S*>(p.grad_student.mutable_data_ptr()) : nullptr;
  a.grad_teacher = p.grad_teacher.defined() ? static_cast<T*>(p.grad_teacher.mutable_data_ptr()) : nullptr;
  return a;
}

}  // namespace flexkd::cuda
