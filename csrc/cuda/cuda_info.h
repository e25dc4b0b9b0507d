// What the CUDA half of flexkd._C was compiled with, for build_info() (csrc/module.cpp) to report.
// Only defined when the extension is built with CUDA (FLEXKD_WITH_CUDA).
#pragma once

#include <string>
#include <utility>
#include <vector>

// Key/value pairs: "cuda_version" (the toolkit's runtime version, e.g. "13.0") and "cuda_archs"
// (the SASS targets, e.g. "8.0;9.0").
std::vector<std::pair<std::string, std::string>> flexkd_cuda_build_info();
