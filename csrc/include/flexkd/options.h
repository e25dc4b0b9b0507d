// The string options of the ops as enums: one set, shared by the argument parsing (op_args.h), the CPU
// engine (cpu/engine/kernel_args.h) and the CUDA launchers (cuda/launchers.h). No torch types, so the
// per-ISA CPU kernels can include it.
#pragma once

namespace flexkd {

enum class Loss : int { kMse, kCorr };
enum class Reduction : int { kMean, kSum, kNone };
enum class Stat : int { kGradXAct, kGrad, kGradSq };

}  // namespace flexkd
