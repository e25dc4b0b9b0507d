// The CPU kernels, compiled once per instruction set. A kernels_<isa>.cpp includes prelude.h, switches
// the target ISA, defines FLEXKD_CPU_ISA and includes this header, which puts everything in
// flexkd::cpu::FLEXKD_CPU_ISA. No include guard on purpose: it is instantiated once per ISA.

#ifndef FLEXKD_CPU_ISA
#error "define FLEXKD_CPU_ISA (the namespace for this instruction set) before including engine.h"
#endif

namespace flexkd::cpu::FLEXKD_CPU_ISA {

#include "cpu/engine/numeric.h"
#include "cpu/engine/parallel.h"
#include "cpu/engine/feature_loss_common.h"
#include "cpu/engine/column_blocks.h"
#include "cpu/engine/teacher_rows.h"
#include "cpu/engine/feature_loss_mse.h"
#include "cpu/engine/feature_loss_corr.h"
#include "cpu/engine/importance.h"

// Calls body(std::type_identity<StorageType>{}) for a runtime dtype.
template <class Body>
inline void with_storage_type(DType dtype, Body&& body) {
  switch (dtype) {
    case DType::kFloat32: return body(std::type_identity<float>{});
    case DType::kFloat64: return body(std::type_identity<double>{});
    case DType::kBFloat16: return body(std::type_identity<BFloat16>{});
    case DType::kFloat16: return body(std::type_identity<Float16>{});
  }
}

// Calls body(std::bool_constant<flag>{}) so a runtime flag becomes a template parameter.
template <class Body>
inline void with_flag(bool flag, Body&& body) {
  if (flag) {
    body(std::true_type{});
  } else {
    body(std::false_type{});
  }
}

// Wide-ISA variants (FLEXKD_CPU_COMMON_CASES_ONLY) compile only the common layout: student and teacher
// of one dtype, unit column strides. Everything else runs the baseline variant, which has all cases;
// this keeps the build time of the extra variants small.
#ifdef FLEXKD_CPU_COMMON_CASES_ONLY
inline bool is_common_case(const FeatureLossArgs& a) {
  return a.student.dtype == a.teacher.dtype && a.student.col_stride == 1;
}
inline bool is_common_case(const ImportanceArgs& a) {
  return a.hidden.dtype == a.grad.dtype && a.hidden.col_stride == 1 && a.grad.col_stride == 1;
}
#endif

// Calls body(student_type, teacher_type) with std::type_identity tags for the pair of dtypes.
template <class Body>
inline void with_storage_types(DType first, DType second, Body&& body) {
#ifdef FLEXKD_CPU_COMMON_CASES_ONLY
  with_storage_type(first, [&](auto type) { body(type, type); });
#else
  with_storage_type(first, [&](auto first_type) {
    with_storage_type(second, [&](auto second_type) { body(first_type, second_type); });
  });
#endif
}

inline void feature_loss(const FeatureLossArgs& a) {
#ifdef FLEXKD_CPU_COMMON_CASES_ONLY
  if (!is_common_case(a)) return baseline_kernels().feature_loss(a);
  constexpr bool kMayBeStrided = false;
#else
  constexpr bool kMayBeStrided = true;
#endif
  with_storage_types(a.student.dtype, a.teacher.dtype, [&](auto student_type, auto teacher_type) {
    using S = typename decltype(student_type)::type;
    using T = typename decltype(teacher_type)::type;
    with_flag(!kMayBeStrided || a.student.col_stride == 1, [&](auto unit) {
      with_flag(a.grad_student != nullptr, [&](auto grad_s) {
        with_flag(a.grad_teacher != nullptr, [&](auto grad_t) {
          constexpr bool kUnit = decltype(unit)::value;
          constexpr bool kGradS = decltype(grad_s)::value;
          constexpr bool kGradT = decltype(grad_t)::value;
          if constexpr (kUnit || kMayBeStrided) {
            if (a.loss == Loss::kMse) {
              mse_loss<S, T, kUnit, kGradS, kGradT>(a);
            } else {
              corr_loss<S, T, kUnit, kGradS, kGradT>(a);
            }
          }
        });
      });
    });
  });
}

inline void importance(const ImportanceArgs& a) {
#ifdef FLEXKD_CPU_COMMON_CASES_ONLY
  if (!is_common_case(a)) return baseline_kernels().importance_scores(a);
  constexpr bool kMayBeStrided = false;
#else
  constexpr bool kMayBeStrided = true;
#endif
  with_storage_types(a.hidden.dtype, a.grad.dtype, [&](auto hidden_type, auto grad_type) {
    using H = typename decltype(hidden_type)::type;
    using G = typename decltype(grad_type)::type;
    with_flag(!kMayBeStrided || (a.hidden.col_stride == 1 && a.grad.col_stride == 1), [&](auto unit) {
      constexpr bool kUnit = decltype(unit)::value;
      if constexpr (kUnit || kMayBeStrided) {
        switch (a.stat) {
          case Stat::kGradXAct: return importance_scores<H, G, kUnit, Stat::kGradXAct>(a);
          case Stat::kGrad: return importance_scores<H, G, kUnit, Stat::kGrad>(a);
          case Stat::kGradSq: return importance_scores<H, G, kUnit, Stat::kGradSq>(a);
        }
      }
    });
  });
}

#include "cpu/engine/kd_rows.h"
#include "cpu/engine/widen_add.h"

inline const KernelTable table{FLEXKD_CPU_ISA_NAME, &feature_loss, &importance, &kd_rows,
                              &add_widened};

}  // namespace flexkd::cpu::FLEXKD_CPU_ISA
