// flexkd._C: defines the op schemas of the `flexkd` namespace (the CPU and CUDA kernels register
// against them in csrc/cpu and csrc/cuda) and exposes build_info() to Python.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#include <torch/headeronly/version.h>
#include <torch/library.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#include <string>
#include <vector>

#include "cpu/isa.h"

#ifdef FLEXKD_WITH_CUDA
#include "cuda/cuda_info.h"
#endif

TORCH_LIBRARY(flexkd, m) {
  // Fake (meta) kernels live in Python; feature_loss_fwd's autograd kernel in feature_loss_autograd.cpp.
  m.set_python_module("flexkd.ops._registration");
  m.def(
      "feature_loss_fwd(Tensor student, Tensor teacher, Tensor index, Tensor? mask, str loss, "
      "str reduction, float eps, bool student_grad, bool teacher_grad) -> (Tensor, Tensor, Tensor)");
  m.def(
      "importance_scores_acc(Tensor hidden, Tensor grad, Tensor? mask, str stat, Tensor(a!) out) "
      "-> ()");
  // linear_logit_kd's per-row KD closed forms on the CPU (called inside its chunked kernel); teacher is
  // the dense logits, or the top-K values with topk_indices
  m.def(
      "kd_rows_(Tensor(a!) z, Tensor teacher, Tensor? topk_indices, str kind, float beta, float temperature) "
      "-> Tensor");
  // acc += src for fp32 acc and a 16-bit src (linear_logit_kd's sum of bf16 weight-gradient chunks)
  m.def("add_widened_(Tensor(a!) acc, Tensor src) -> ()");
}

namespace {

namespace py = pybind11;

std::string compiler_name() {
#if defined(__clang__)
  return "clang " __clang_version__;
#elif defined(__GNUC__)
  return "GCC " __VERSION__;
#elif defined(_MSC_VER)
  return "MSVC " + std::to_string(_MSC_FULL_VER);
#else
  return "unknown";
#endif
}

// Instruction-set extensions enabled for the whole build (the baseline every variant can assume).
std::vector<std::string> baseline_simd_flags() {
  std::vector<std::string> flags;
#ifdef __SSE2__
  flags.emplace_back("sse2");
#endif
#ifdef __SSE4_2__
  flags.emplace_back("sse4.2");
#endif
#ifdef __AVX__
  flags.emplace_back("avx");
#endif
#ifdef __AVX2__
  flags.emplace_back("avx2");
#endif
#ifdef __FMA__
  flags.emplace_back("fma");
#endif
#ifdef __AVX512F__
  flags.emplace_back("avx512f");
#endif
#ifdef __ARM_NEON
  flags.emplace_back("neon");
#endif
#ifdef __ARM_FEATURE_SVE
  flags.emplace_back("sve");
#endif
  return flags;
}

py::dict build_info() {
  py::dict info;
  info["torch_version"] = std::to_string(TORCH_VERSION_MAJOR) + "." +
                          std::to_string(TORCH_VERSION_MINOR) + "." +
                          std::to_string(TORCH_VERSION_PATCH);
  info["compiler"] = compiler_name();
  info["cxx_standard"] = static_cast<long>(__cplusplus);
#ifdef _OPENMP
  info["openmp"] = true;
  info["openmp_version"] = static_cast<long>(_OPENMP);
  info["openmp_max_threads"] = omp_get_max_threads();
#else
  info["openmp"] = false;
  info["openmp_version"] = py::none();
  info["openmp_max_threads"] = 1;
#endif
  info["simd_baseline"] = baseline_simd_flags();
  info["cpu_isas"] = flexkd::cpu::compiled_isas();
  info["cpu_isas_supported"] = flexkd::cpu::supported_isas();
  info["cpu_isa"] = std::string(flexkd::cpu::active_kernels().isa);
#ifdef FLEXKD_WITH_CUDA
  info["cuda_kernels"] = true;
  info["cuda_version"] = py::none();
  info["cuda_archs"] = py::none();
  for (const auto& [key, value] : flexkd_cuda_build_info()) info[py::str(key)] = value;
#else
  info["cuda_kernels"] = false;
  info["cuda_version"] = py::none();
  info["cuda_archs"] = py::none();
#endif
  return info;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "flexkd native ops (CPU kernels; CUDA kernels when built with CUDA)";
  m.def("build_info", &build_info,
        "How this extension was built: torch and CUDA versions, compiler, OpenMP, instruction sets.");
  m.def("set_cpu_isa", &flexkd::cpu::set_active_isa, py::arg("isa"),
        "Run the CPU kernels compiled for `isa` (one of build_info()['cpu_isas_supported']).");
}
