// The CPU engine's interface: plain structs and function pointers, no torch types, so that the same
// kernels can be compiled once per instruction set (kernels_<isa>.cpp) without ODR hazards.
#pragma once

#include <cstdint>

#include "flexkd/options.h"

namespace flexkd::cpu {

using flexkd::Loss;
using flexkd::Reduction;
using flexkd::Stat;
enum class DType : int { kFloat32, kFloat64, kBFloat16, kFloat16 };

// A rows x cols view of elements of `dtype`; strides count elements and may be anything.
struct StridedMatrix {
  const void* data;
  DType dtype;
  int64_t row_stride;
  int64_t col_stride;
};

// feature_loss_fwd (see the op contract). Accumulation is fp64 when student or teacher is fp64,
// else fp32; `mask` and `loss_out` have the accumulation dtype.
struct FeatureLossArgs {
  StridedMatrix student;  // [rows, k]
  StridedMatrix teacher;  // [rows, D]; column index[j] pairs with student column j
  const int64_t* index;   // [k], each in [0, D)
  int64_t rows;
  int64_t k;
  const void* mask;       // [rows] row weights >= 0, or nullptr for all ones
  Loss loss;
  Reduction reduction;
  double eps;             // corr only: r = cov / (max(sigma_s, eps) * max(sigma_t, eps))
  void* loss_out;         // one value; [rows] for mse/none; [k] for corr/none
  void* grad_student;     // contiguous [rows, k], student dtype, or nullptr
  void* grad_teacher;     // contiguous [rows, k], teacher dtype, or nullptr
  int num_threads;
};

// importance_scores_acc: out[j] += sum_n w_n f(h_nj, g_nj), accumulated in fp32 (fp64 for fp64 inputs).
struct ImportanceArgs {
  StridedMatrix hidden;  // [rows, cols]
  StridedMatrix grad;    // [rows, cols]
  int64_t rows;
  int64_t cols;
  const float* mask;     // [rows] or nullptr
  Stat stat;
  float* out;            // contiguous [cols], added into
  int num_threads;
};

// kd_rows_: per row n, loss_out[n] = T^2 D(p_n || q_n) with q_n = softmax(z_n / T) and p_n the teacher's
// softmax at T (over V dense logits, or over K top-K values, 0 off their indices), and
// z_n <- T dD/ds, in fp32 (closed forms: flexkd/ops/linear_logit_kd_impl.py).
enum class KdKind : int { kForwardKl, kReverseKl, kJsd };

struct KdRowsArgs {
  float* z;                     // [rows, vocab], unit column stride, overwritten with the gradient
  int64_t z_row_stride;
  StridedMatrix teacher;        // unit column stride, fp32/bf16/fp16: [rows, vocab], or [rows, top_k] values
  const int64_t* topk_indices;  // [rows, top_k], unique in [0, vocab) per row; nullptr for a dense teacher
  int64_t indices_row_stride;
  int64_t top_k;
  int64_t rows;
  int64_t vocab;
  KdKind kind;                  // not kReverseKl with a top-K teacher (+inf)
  float beta;                   // jsd's mixture weight, in (0, 1)
  float temperature;
  float* loss_out;              // [rows]
  int num_threads;
};

// add_widened_: acc[i] += src[i] for i < size; both contiguous, src fp32, bf16 or fp16.
struct WidenAddArgs {
  float* acc;
  const void* src;
  DType src_dtype;
  int64_t size;
  int num_threads;
};

struct KernelTable {
  const char* isa;
  void (*feature_loss)(const FeatureLossArgs&);
  void (*importance_scores)(const ImportanceArgs&);
  void (*kd_rows)(const KdRowsArgs&);
  void (*add_widened)(const WidenAddArgs&);
};

// One table per compiled instruction set (defined in kernels_<isa>.cpp).
const KernelTable& baseline_kernels();
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define FLEXKD_CPU_X86_VARIANTS 1
const KernelTable& avx2_kernels();
const KernelTable& avx512_kernels();
#else
#define FLEXKD_CPU_X86_VARIANTS 0
#endif

}  // namespace flexkd::cpu
