// The engine for x86-64 with AVX-512 (F, BW, DQ, VL) using 512-bit vectors, selected at run time;
// uncommon cases fall back to the baseline variant.
#include "cpu/engine/prelude.h"

#if FLEXKD_CPU_X86_VARIANTS
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512dq,avx512vl,avx2,fma,f16c,prefer-vector-width=512")
#define FLEXKD_CPU_ISA avx512
#define FLEXKD_CPU_ISA_NAME "avx512"
#define FLEXKD_CPU_AVX512 1
#define FLEXKD_CPU_COMMON_CASES_ONLY 1
#include "cpu/engine/engine.h"
#pragma GCC pop_options

namespace flexkd::cpu {
const KernelTable& avx512_kernels() { return avx512::table; }
}  // namespace flexkd::cpu
#endif
