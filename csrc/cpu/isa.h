// Which compiled instruction-set variant of the CPU kernels runs on this machine.
#pragma once

#include <string>
#include <vector>

#include "cpu/engine/kernel_args.h"

namespace flexkd::cpu {

// Every variant compiled into this build, narrowest first ("baseline", then "avx2", "avx512" on x86-64).
std::vector<std::string> compiled_isas();

// The compiled variants this CPU can run.
std::vector<std::string> supported_isas();

// The kernels in use: the widest supported variant, or the one named by FLEXKD_CPU_ISA when set.
const KernelTable& active_kernels();

// Switches variant (tests compare them); raises ValueError for an unknown or unsupported name.
void set_active_isa(const std::string& name);

}  // namespace flexkd::cpu
