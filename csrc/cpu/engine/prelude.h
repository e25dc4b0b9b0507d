// Every system header the engine uses. Each kernels_<isa>.cpp includes this BEFORE switching the target
// instruction set, so inline library code keeps the default target and only flexkd's own functions (in
// the per-ISA namespace) are compiled for the wider ISA.
#pragma once

#include <omp.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <utility>
#include <vector>

#include "cpu/engine/kernel_args.h"

#if FLEXKD_CPU_X86_VARIANTS
#include <immintrin.h>
#endif
