// importance_scores_acc: out[j] += sum_n w_n f(h_nj, g_nj), a column reduction in two stages. Blocks
// own a strip of columns and a chunk of rows and write one partial per column; a second kernel adds
// the chunks into `out` in a fixed order. No float atomics, so results repeat bit for bit.
#include <ATen/ops/empty.h>

#include <algorithm>

#include "cuda/common.cuh"
#include "cuda/launchers.h"

namespace flexkd::cuda {
namespace {

constexpr int kColLanes = 32;  // threads across columns, each owning V consecutive columns
constexpr int kRowLanes = 8;   // threads across the rows of a chunk
constexpr int kMinRowsPerChunk = 64;

template <typename H, typename G>
struct ImportanceArgs {
  const H* hidden;
  int64_t h_row, h_col;
  const G* grad;
  int64_t g_row, g_col;
  int64_t rows, cols;
  const float* mask;  // [rows] or nullptr
  Stat stat;
};

template <typename Acc>
__device__ __forceinline__ Acc importance_term(Stat stat, Acc h, Acc g) {
  switch (stat) {
    case Stat::kGrad: return fabs(g);
    case Stat::kGradSq: return g * g;
    default: return fabs(h * g);
  }
}

// Stage one. With `direct` (a single row chunk) the block adds straight into `out`; otherwise it
// writes partials[blockIdx.y][j].
template <int V, typename H, typename G, typename Acc>
__global__ void __launch_bounds__(kColLanes * kRowLanes)
    importance_kernel(ImportanceArgs<H, G> a, int64_t rows_per_chunk, Acc* __restrict__ partials,
                      float* __restrict__ out) {
  __shared__ Acc strip[kRowLanes][kColLanes * V];
  const int64_t j0 = (static_cast<int64_t>(blockIdx.x) * kColLanes + threadIdx.x) * V;
  const int64_t begin = static_cast<int64_t>(blockIdx.y) * rows_per_chunk;
  const int64_t end = min(a.rows, begin + rows_per_chunk);
  Acc sum[V];
#pragma unroll
  for (int u = 0; u < V; ++u) sum[u] = 0;

  if (j0 < a.cols) {  // vectorised only when cols % V == 0, so the whole vector is in range
#pragma unroll 4
    for (int64_t n = begin + threadIdx.y; n < end; n += kRowLanes) {
      const Acc w = a.mask ? static_cast<Acc>(a.mask[n]) : Acc(1);
      const H* h_row = a.hidden + n * a.h_row;
      const G* g_row = a.grad + n * a.g_row;
      if constexpr (V > 1) {
        const Vec<H, V> h = load_vec<V>(h_row + j0);
        const Vec<G, V> g = load_vec<V>(g_row + j0);
#pragma unroll
        for (int u = 0; u < V; ++u) {
          sum[u] += w * importance_term(a.stat, static_cast<Acc>(h.v[u]), static_cast<Acc>(g.v[u]));
        }
      } else {
        sum[0] += w * importance_term(a.stat, static_cast<Acc>(h_row[j0 * a.h_col]),
                                      static_cast<Acc>(g_row[j0 * a.g_col]));
      }
    }
  }
#pragma unroll
  for (int u = 0; u < V; ++u) strip[threadIdx.y][threadIdx.x * V + u] = sum[u];
  __syncthreads();

  // Thread t of the block finishes column t of the strip (fixed order over the row lanes).
  const int t = threadIdx.y * kColLanes + threadIdx.x;
  for (int local = t; local < kColLanes * V; local += kColLanes * kRowLanes) {
    const int64_t j = static_cast<int64_t>(blockIdx.x) * kColLanes * V + local;
    if (j >= a.cols) break;
    Acc total = 0;
#pragma unroll
    for (int lane = 0; lane < kRowLanes; ++lane) total += strip[lane][local];
    if (partials) {
      partials[static_cast<int64_t>(blockIdx.y) * a.cols + j] = total;
    } else {
      out[j] = static_cast<float>(static_cast<Acc>(out[j]) + total);
    }
  }
}

// Stage two: out[j] += sum over chunks of partials[chunk][j], chunks in order.
template <typename Acc>
__global__ void __launch_bounds__(kBlockThreads)
    add_chunks_kernel(const Acc* __restrict__ partials, int64_t chunks, int64_t cols,
                      float* __restrict__ out) {
  const int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j >= cols) return;
  Acc total = 0;
  for (int64_t chunk = 0; chunk < chunks; ++chunk) total += partials[chunk * cols + j];
  out[j] = static_cast<float>(static_cast<Acc>(out[j]) + total);
}

template <int V, typename H, typename G>
void launch(const ImportanceArgs<H, G>& a, float* out, int device, const at::TensorOptions& options,
            cudaStream_t stream) {
  using Acc = AccOf<H, G>;
  const auto kernel = importance_kernel<V, H, G, Acc>;
  const int64_t col_blocks = ceil_div(a.cols, int64_t{kColLanes} * V);
  const int64_t chunks = row_chunks(device, resident_blocks_per_sm(kernel, kColLanes * kRowLanes), col_blocks,
                                    a.rows, kMinRowsPerChunk);
  const int64_t rows_per_chunk = ceil_div(a.rows, chunks);
  at::Tensor partials;
  if (chunks > 1) partials = at::empty({chunks, a.cols}, options.dtype(c10::CppTypeToScalarType<Acc>::value));
  Acc* partials_ptr = chunks > 1 ? partials.mutable_data_ptr<Acc>() : nullptr;
  kernel<<<dim3(static_cast<unsigned>(col_blocks), static_cast<unsigned>(chunks)), dim3(kColLanes, kRowLanes), 0,
         stream>>>(a, rows_per_chunk, partials_ptr, out);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (chunks > 1) {
    add_chunks_kernel<Acc><<<static_cast<unsigned>(ceil_div(a.cols, kBlockThreads)), kBlockThreads, 0, stream>>>(
        partials_ptr, chunks, a.cols, out);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

template <typename H, typename G>
void importance(const at::Tensor& hidden, const at::Tensor& grad, const at::Tensor& mask, Stat stat,
                const at::Tensor& out, cudaStream_t stream) {
  const ImportanceArgs<H, G> a{static_cast<const H*>(hidden.const_data_ptr()),
                               hidden.stride(0),
                               hidden.stride(1),
                               static_cast<const G*>(grad.const_data_ptr()),
                               grad.stride(0),
                               grad.stride(1),
                               hidden.size(0),
                               hidden.size(1),
                               mask.defined() ? mask.const_data_ptr<float>() : nullptr,
                               stat};
  constexpr int V = vec_width<H, G>();
  const bool vectorize = a.cols % V == 0 && vector_friendly(a.hidden, a.h_row, a.h_col, sizeof(H), V) &&
                         vector_friendly(a.grad, a.g_row, a.g_col, sizeof(G), V);
  const int device = hidden.get_device();
  float* out_ptr = out.mutable_data_ptr<float>();
  if (vectorize) {
    launch<V>(a, out_ptr, device, out.options(), stream);
  } else {
    launch<1>(a, out_ptr, device, out.options(), stream);
  }
}

}  // namespace

void importance_accumulate(const at::Tensor& hidden, const at::Tensor& grad, const at::Tensor& mask,
                           Stat stat, const at::Tensor& out, cudaStream_t stream) {
  dispatch_float(hidden.scalar_type(), "hidden", [&](auto h) {
    dispatch_float(grad.scalar_type(), "grad", [&](auto g) {
      importance<typename decltype(h)::type, typename decltype(g)::type>(hidden, grad, mask, stat, out, stream);
    });
  });
}

}  // namespace flexkd::cuda
