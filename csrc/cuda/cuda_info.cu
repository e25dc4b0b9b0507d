#include "cuda/cuda_info.h"

#include <cuda_runtime_api.h>

#include <sstream>

#define FLEXKD_STRINGIFY_(...) #__VA_ARGS__
#define FLEXKD_STRINGIFY(...) FLEXKD_STRINGIFY_(__VA_ARGS__)

namespace {

// nvcc defines __CUDA_ARCH_LIST__ (e.g. 800,900) in the host pass too; "800,900" -> "8.0;9.0".
std::string compiled_archs() {
#ifdef __CUDA_ARCH_LIST__
  std::istringstream list(FLEXKD_STRINGIFY(__CUDA_ARCH_LIST__));
  std::string item, archs;
  while (std::getline(list, item, ',')) {
    const int arch = std::stoi(item);
    if (!archs.empty()) archs += ';';
    archs += std::to_string(arch / 100) + "." + std::to_string(arch / 10 % 10);
  }
  return archs;
#else
  return "unknown";
#endif
}

}  // namespace

std::vector<std::pair<std::string, std::string>> flexkd_cuda_build_info() {
  const int version = CUDART_VERSION;  // e.g. 13000
  return {
      {"cuda_version", std::to_string(version / 1000) + "." + std::to_string(version % 1000 / 10)},
      {"cuda_archs", compiled_archs()},
  };
}
