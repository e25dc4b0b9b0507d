// Device building blocks shared by the CUDA kernels: dtype dispatch, aligned vectors, deterministic
// warp/block sums and launch sizing. Nothing here knows about a particular op.
#pragma once

#include <c10/core/ScalarType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/macros/Macros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

namespace flexkd::cuda {

constexpr int kWarpSize = 32;
constexpr int kBlockThreads = 256;
constexpr int kWarpsPerBlock = kBlockThreads / kWarpSize;

// fp64 when either operand is fp64, else fp32: bf16/fp16 are never accumulated in themselves.
template <typename A, typename B>
using AccOf = std::conditional_t<std::is_same_v<A, double> || std::is_same_v<B, double>, double, float>;

template <typename T>
struct TypeTag {
  using type = T;
};

// Calls f(TypeTag<T>{}) with the C++ type of `dtype`; `arg` names the tensor in the error.
template <typename F>
void dispatch_float(c10::ScalarType dtype, const char* arg, F&& f) {
  switch (dtype) {
    case c10::ScalarType::Float: f(TypeTag<float>{}); return;
    case c10::ScalarType::Double: f(TypeTag<double>{}); return;
    case c10::ScalarType::BFloat16: f(TypeTag<c10::BFloat16>{}); return;
    case c10::ScalarType::Half: f(TypeTag<c10::Half>{}); return;
    default: TORCH_CHECK_TYPE(false, arg, " must be fp32, fp64, bf16 or fp16, got ", dtype);
  }
}

// N elements moved as one aligned access (16 bytes when sizeof(T) * N == 16).
template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T v[N];
};

template <int N, typename T>
__device__ __forceinline__ Vec<T, N> load_vec(const T* p) {
  return *reinterpret_cast<const Vec<T, N>*>(p);
}

template <int N, typename T>
__device__ __forceinline__ void store_vec(T* p, const Vec<T, N>& x) {
  *reinterpret_cast<Vec<T, N>*>(p) = x;
}

// Elements per 16-byte access of the wider of two element types.
template <typename A, typename B>
constexpr int vec_width() {
  return 16 / (sizeof(A) > sizeof(B) ? sizeof(A) : sizeof(B));
}

// True when `count` elements of `elem_size` bytes starting at `p` may be read as aligned
// `width`-element vectors with rows `row_stride` elements apart (unit column stride assumed).
inline bool vector_friendly(const void* p, int64_t row_stride, int64_t col_stride,
                            int64_t elem_size, int width) {
  const auto bytes = static_cast<uint64_t>(elem_size) * width;
  return col_stride == 1 && reinterpret_cast<uintptr_t>(p) % bytes == 0 && row_stride % width == 0;
}

// Butterfly sum: every lane ends with the same value, summed in the same order on every run.
template <typename T>
__device__ __forceinline__ T warp_sum(T x) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    x += __shfl_xor_sync(0xffffffffu, x, offset);
  }
  return x;
}

// Sum over the block in a fixed order (warps, then warp totals); the result is valid in thread 0.
// `scratch` holds at least blockDim.x / 32 values; the caller must not reuse it until a barrier.
template <typename T>
__device__ T block_sum(T x, T* scratch) {
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  const int warps = (blockDim.x + kWarpSize - 1) / kWarpSize;
  x = warp_sum(x);
  if (lane == 0) scratch[warp] = x;
  __syncthreads();
  x = threadIdx.x < warps ? scratch[threadIdx.x] : T(0);
  if (warp == 0) x = warp_sum(x);
  return x;
}

// Multiprocessors of `device`, cached (the grid of every kernel is sized from it).
int sm_count(int device);

// Blocks for a grid-stride kernel of kBlockThreads threads: enough to fill every SM
// `blocks_per_sm` times, never more than there is work for.
int grid_blocks(int device, int64_t work_blocks, int blocks_per_sm);

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Blocks of `kernel` that fit on one SM at once (at least 1).
template <typename Kernel>
int resident_blocks_per_sm(Kernel kernel, int threads, size_t dynamic_smem = 0) {
  int blocks = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, kernel, threads, dynamic_smem));
  return blocks > 0 ? blocks : 1;
}

// Row chunks for a grid of `col_blocks` x chunks blocks: as many as fill the GPU in one wave (no
// partial second wave), each with at least `min_rows` rows, at most `max_chunks` (gridDim.y).
inline int64_t row_chunks(int device, int resident_per_sm, int64_t col_blocks, int64_t rows, int64_t min_rows,
                          int64_t max_chunks = 65535) {
  const int64_t one_wave = static_cast<int64_t>(sm_count(device)) * resident_per_sm;
  const int64_t wanted = std::max<int64_t>(1, one_wave / col_blocks);
  return std::max<int64_t>(1, std::min({wanted, ceil_div(rows, min_rows), max_chunks}));
}

}  // namespace flexkd::cuda
