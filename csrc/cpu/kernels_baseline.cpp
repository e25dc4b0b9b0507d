// The engine for the build's default target (x86-64 baseline, or whatever the platform's default is).
#include "cpu/engine/prelude.h"

#define FLEXKD_CPU_ISA baseline
#define FLEXKD_CPU_ISA_NAME "baseline"
#include "cpu/engine/engine.h"

namespace flexkd::cpu {
const KernelTable& baseline_kernels() { return baseline::table; }
}  // namespace flexkd::cpu
