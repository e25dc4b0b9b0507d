// The engine for x86-64 with AVX2 + FMA + F16C, selected at run time (isa.cpp); other cases
// fall back to the baseline variant.
#include "cpu/engine/prelude.h"

#if FLEXKD_CPU_X86_VARIANTS
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#define FLEXKD_CPU_ISA avx2
#define FLEXKD_CPU_ISA_NAME "avx2"
#define FLEXKD_CPU_COMMON_CASES_ONLY 1
#include "cpu/engine/engine.h"
#pragma GCC pop_options

namespace flexkd::cpu {
const KernelTable& avx2_kernels() { return avx2::table; }
}  // namespace flexkd::cpu
#endif
