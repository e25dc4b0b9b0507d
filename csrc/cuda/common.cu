#include "cuda/common.cuh"

#include <algorithm>
#include <array>
#include <atomic>

namespace flexkd::cuda {

int sm_count(int device) {
  static std::array<std::atomic<int>, 64> cache{};
  TORCH_CHECK(device >= 0 && device < static_cast<int>(cache.size()), "flexkd: CUDA device ", device,
              " is out of the supported range");
  int count = cache[device].load(std::memory_order_relaxed);
  if (count == 0) {
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device));
    cache[device].store(count, std::memory_order_relaxed);
  }
  return count;
}

int grid_blocks(int device, int64_t work_blocks, int blocks_per_sm) {
  const int64_t full = static_cast<int64_t>(sm_count(device)) * blocks_per_sm;
  return static_cast<int>(std::max<int64_t>(1, std::min(full, work_blocks)));
}

}  // namespace flexkd::cuda
