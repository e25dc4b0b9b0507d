// CPU memory for the feature loss's gradient outputs, kept for reuse once the tensor is freed.
//
// The op writes a fresh [N, k] gradient every call (24 MiB at N=8192, k=768 in fp32; 64 MiB and more for
// an LLM's k). glibc gives a freed block that large back to the OS, so the next call's gradient is new
// pages that the kernel faults in and zeroes as the op writes them: up to 2x the op's time in fp32
// (benchmarks/README.md, "the allocator's share"). Here a freed gradient's block goes to a small cache
// instead and the next gradient of a size it fits takes it, pages still mapped.
//
// Blocks below kMinBytes come from torch's allocator as usual (glibc reuses those by itself). The cache
// holds at most FLEXKD_CPU_GRAD_CACHE_MIB MiB (default 512; 0 turns it off), dropping its oldest blocks
// first.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/TensorOptions.h>

namespace flexkd::cpu {

// Uninitialised, like at::empty: the kernel writes every element.
at::Tensor empty_gradient(at::IntArrayRef sizes, const at::TensorOptions& options);

}  // namespace flexkd::cpu
