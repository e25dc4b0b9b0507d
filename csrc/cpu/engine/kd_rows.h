// The per-row closed forms of logit KD for linear_logit_kd's chunks, fused (the math is in
// flexkd/ops/linear_logit_kd_impl.py). For each row of student logits z [V] (fp32, overwritten with the
// gradient T dl/ds) with s = z/T, q = softmax(s), and the teacher's p = softmax(t/T):
//   dense teacher t [V]: passes for the maxima, the sums of exp, then loss and gradient (forward KL) or
//     the loss then the gradient (reverse KL and JSD, whose gradient needs the row's loss);
//   top-K teacher (values [K], indices [K]): the student's maximum and sum of exp over V, the loss over
//     the K support entries, then one pass writing the off-support gradient and K scattered writes.
// A row of a few hundred KiB stays in cache across its passes, where the torch formulation makes a dozen
// passes over the whole [rows, V] chunk. Included by engine.h inside the per-ISA namespace.

// The elementwise functions are always inlined: a call left in a loop (GCC's inliner gives up inside JSD's
// loops, which use each several times) keeps the loop from vectorising.
#ifndef FLEXKD_INLINE
#define FLEXKD_INLINE [[gnu::always_inline]] inline
#endif

// exp(x) in fp32, to about 2 ulp, in a form loops vectorise: 0 below ln(FLT_MIN) and for -inf, inf above
// the fp32 range, NaN stays NaN. Cody-Waite reduction by ln 2 and the degree-5 polynomial of Cephes' expf.
FLEXKD_INLINE float exp_fp32(float x) {
  constexpr float kLow = -87.33654475f, kHigh = 88.37626266f;
  const float xc = x < kLow ? kLow : (x > kHigh ? kHigh : x);
  // the nearest integer to x / ln 2 by the 1.5 * 2^23 trick (std::floor keeps GCC from vectorising)
  const float n = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  const float r = (xc - n * 0.693359375f) - n * -2.12194440e-4f;
  float poly = 1.9875691500e-4f;
  poly = poly * r + 1.3981999507e-3f;
  poly = poly * r + 8.3334519073e-3f;
  poly = poly * r + 4.1665795894e-2f;
  poly = poly * r + 1.6666665459e-1f;
  poly = poly * r + 5.0000001201e-1f;
  const float y = (poly * r * r + r) + 1.0f;
  const float scaled = y * f32_from_bits(static_cast<uint32_t>(static_cast<int32_t>(n) + 127) << 23);
  const float high = x > kHigh ? std::numeric_limits<float>::infinity() : scaled;
  return x != x ? x : (x < kLow ? 0.0f : high);
}

// log(1 + e) for e in [0, 1], to about 1 ulp of the result, vectorisable: u = 1 + e in [1, 2] is halved
// above sqrt(2) so that u - 1 lies in [-0.3, 0.42], then the degree-9 polynomial of Cephes' logf.
FLEXKD_INLINE float log1p_unit_fp32(float e) {
  const float u = 1.0f + e;
  const bool high = u > 1.41421356f;
  const float x = (high ? 0.5f * u : u) - 1.0f;
  const float k = high ? 1.0f : 0.0f;
  float poly = 7.0376836292e-2f;
  poly = poly * x - 1.1514610310e-1f;
  poly = poly * x + 1.1676998740e-1f;
  poly = poly * x - 1.2420140846e-1f;
  poly = poly * x + 1.4249322787e-1f;
  poly = poly * x - 1.6668057665e-1f;
  poly = poly * x + 2.0000714765e-1f;
  poly = poly * x - 2.4999993993e-1f;
  poly = poly * x + 3.3333331174e-1f;
  const float x2 = x * x;
  const float y = x * x2 * poly - 0.5f * x2 + k * -2.12194440e-4f;
  return (x + y) + k * 0.693359375f;
}

// log(exp(a) + exp(b)); -inf when both are -inf.
FLEXKD_INLINE float log_add_exp_fp32(float a, float b) {
  const float hi = std::max(a, b);
  const float gap = std::min(a, b) - hi;  // NaN when both are -inf
  const float sum = hi + log1p_unit_fp32(exp_fp32(gap));
  return hi == -std::numeric_limits<float>::infinity() ? hi : sum;
}

// What a row's passes share: the row's maximum and the log and reciprocal of its sum of exp at T.
// log q = (x - max) / T - log Σ: shifting first keeps (x - max) exact near the maximum, and rounding
// max / T + log Σ into one shift would cost |max|·eps in every log-probability, which a KL of two close
// distributions does not cancel.
struct RowSoftmax {
  float max = -std::numeric_limits<float>::infinity();
  float inv_t = 1;
  float log_sum = 0;
  float inv_sum = 0;
  FLEXKD_INLINE float scaled(float x) const { return (x - max) * inv_t; }
  FLEXKD_INLINE float log_prob(float x) const { return scaled(x) - log_sum; }
  FLEXKD_INLINE float prob(float x) const { return exp_fp32(scaled(x)) * inv_sum; }
  void set_sum(float sum) {
    log_sum = std::log(sum);
    inv_sum = 1.0f / sum;
  }
};

struct KdParams {
  float inv_t, temperature, beta, log_beta, log_one_minus_beta;
};

inline void fill_nan_row(float* z, int64_t vocab, float* loss_out) {
  *loss_out = std::numeric_limits<float>::quiet_NaN();
  std::fill(z, z + vocab, std::numeric_limits<float>::quiet_NaN());
}

inline float row_max(const float* z, int64_t vocab) {
  float m = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : m)
  for (int64_t j = 0; j < vocab; ++j) m = std::max(m, z[j]);
  return m;
}

inline float row_sum_exp(const float* z, int64_t vocab, const RowSoftmax& s) {
  float sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t j = 0; j < vocab; ++j) sum += exp_fp32(s.scaled(z[j]));
  return sum;
}

template <KdKind kKind, class T>
void kd_rows_dense_row(float* z, const T* t, int64_t vocab, const KdParams& k, float* loss_out) {
  const float inv_t = k.inv_t;
  float max_z = -std::numeric_limits<float>::infinity();
  float max_t = max_z;
#pragma omp simd reduction(max : max_z, max_t)
  for (int64_t j = 0; j < vocab; ++j) {
    max_z = std::max(max_z, z[j]);
    max_t = std::max(max_t, load<float>(t[j]));
  }
  RowSoftmax sq{max_z, inv_t}, sp{max_t, inv_t};
  float sum_q = 0, sum_p = 0;
#pragma omp simd reduction(+ : sum_q, sum_p)
  for (int64_t j = 0; j < vocab; ++j) {
    sum_q += exp_fp32(sq.scaled(z[j]));
    sum_p += exp_fp32(sp.scaled(load<float>(t[j])));
  }
  // A NaN anywhere in the row (the maxima skip it, exp_fp32 keeps it) makes the whole row NaN, as the
  // torch formulation's amax does.
  if (std::isnan(sum_q + sum_p)) return fill_nan_row(z, vocab, loss_out);
  sq.set_sum(sum_q);
  sp.set_sum(sum_p);
  const float temperature = k.temperature;
  float loss = 0, kl_qm = 0;
  if constexpr (kKind == KdKind::kForwardKl) {
#pragma omp simd reduction(+ : loss)
    for (int64_t j = 0; j < vocab; ++j) {
      const float tj = load<float>(t[j]);
      const float q = sq.prob(z[j]), p = sp.prob(tj);
      loss += p > 0.0f ? p * (sp.log_prob(tj) - sq.log_prob(z[j])) : 0.0f;
      z[j] = temperature * (q - p);
    }
  } else if constexpr (kKind == KdKind::kReverseKl) {
#pragma omp simd reduction(+ : loss)
    for (int64_t j = 0; j < vocab; ++j) {
      const float q = sq.prob(z[j]);
      const float diff = sq.log_prob(z[j]) - sp.log_prob(load<float>(t[j]));
      loss += q > 0.0f ? q * diff : 0.0f;
    }
#pragma omp simd
    for (int64_t j = 0; j < vocab; ++j) {
      const float q = sq.prob(z[j]);
      const float diff = sq.log_prob(z[j]) - sp.log_prob(load<float>(t[j]));
      z[j] = q > 0.0f ? temperature * q * (diff - loss) : 0.0f;
    }
  } else {  // JSD: m = beta p + (1 - beta) q; the gradient needs KL(q || m)
    float kl_pm = 0;
#pragma omp simd reduction(+ : kl_pm, kl_qm)
    for (int64_t j = 0; j < vocab; ++j) {
      const float tj = load<float>(t[j]);
      const float log_q = sq.log_prob(z[j]), log_p = sp.log_prob(tj);
      const float q = sq.prob(z[j]), p = sp.prob(tj);
      const float log_m = log_add_exp_fp32(log_p + k.log_beta, log_q + k.log_one_minus_beta);
      kl_pm += p > 0.0f ? p * (log_p - log_m) : 0.0f;
      kl_qm += q > 0.0f ? q * (log_q - log_m) : 0.0f;
    }
    loss = k.beta * kl_pm + (1.0f - k.beta) * kl_qm;
    const float scale = temperature * (1.0f - k.beta);
#pragma omp simd
    for (int64_t j = 0; j < vocab; ++j) {
      const float log_q = sq.log_prob(z[j]);
      const float log_p = sp.log_prob(load<float>(t[j]));
      const float q = sq.prob(z[j]);
      const float log_m = log_add_exp_fp32(log_p + k.log_beta, log_q + k.log_one_minus_beta);
      z[j] = q > 0.0f ? scale * q * (log_q - log_m - kl_qm) : 0.0f;
    }
  }
  *loss_out = temperature * temperature * loss;
}

// The top-K teacher's row: p is the softmax of the K values at T, 0 off the indices (unique, in [0, V):
// checked by the op's validation). JSD's off-support terms are constants: log q - log m = -log(1 - beta).
template <KdKind kKind, class T>
void kd_rows_topk_row(float* z, const T* values, const int64_t* indices, int64_t vocab, int64_t top_k,
                      const KdParams& k, float* scratch, float* loss_out) {
  const float inv_t = k.inv_t;
  RowSoftmax sq{row_max(z, vocab), inv_t};
  const float sum_q = row_sum_exp(z, vocab, sq);
  float max_v = -std::numeric_limits<float>::infinity();
  for (int64_t i = 0; i < top_k; ++i) max_v = std::max(max_v, load<float>(values[i]));
  RowSoftmax sp{max_v, inv_t};
  float sum_p = 0;
  for (int64_t i = 0; i < top_k; ++i) sum_p += exp_fp32(sp.scaled(load<float>(values[i])));
  if (std::isnan(sum_q + sum_p)) return fill_nan_row(z, vocab, loss_out);
  sq.set_sum(sum_q);
  sp.set_sum(sum_p);
  const float temperature = k.temperature;
  float loss = 0;
  if constexpr (kKind == KdKind::kForwardKl) {
    for (int64_t i = 0; i < top_k; ++i) {  // scratch[i] = p_i, read after z is overwritten
      const float v = load<float>(values[i]);
      const float p = sp.prob(v);
      scratch[i] = p;
      loss += p > 0.0f ? p * (sp.log_prob(v) - sq.log_prob(z[indices[i]])) : 0.0f;
    }
#pragma omp simd
    for (int64_t j = 0; j < vocab; ++j) z[j] = temperature * sq.prob(z[j]);
    for (int64_t i = 0; i < top_k; ++i) z[indices[i]] -= temperature * scratch[i];
  } else {  // JSD (reverse KL is +inf against a top-K teacher: refused by the caller)
    const float off_support = -k.log_one_minus_beta;
    float kl_pm = 0, kl_qm = 0, support_q = 0;
    for (int64_t i = 0; i < top_k; ++i) {  // scratch[i] = log q - log m on the support, then the gradient
      const float v = load<float>(values[i]);
      const float log_p = sp.log_prob(v), p = sp.prob(v);
      const float log_q = sq.log_prob(z[indices[i]]), q = exp_fp32(log_q);
      const float log_m = log_add_exp_fp32(log_p + k.log_beta, log_q + k.log_one_minus_beta);
      kl_pm += p > 0.0f ? p * (log_p - log_m) : 0.0f;
      kl_qm += q * (log_q - log_m);
      support_q += q;
      scratch[i] = log_q - log_m;
    }
    kl_qm += (1.0f - support_q) * off_support;
    loss = k.beta * kl_pm + (1.0f - k.beta) * kl_qm;
    const float scale = temperature * (1.0f - k.beta);
    for (int64_t i = 0; i < top_k; ++i) {
      const float q = exp_fp32(sq.log_prob(z[indices[i]]));
      scratch[i] = scale * q * (scratch[i] - kl_qm);
    }
    const float off_scale = scale * (off_support - kl_qm);
#pragma omp simd
    for (int64_t j = 0; j < vocab; ++j) z[j] = off_scale * sq.prob(z[j]);
    for (int64_t i = 0; i < top_k; ++i) z[indices[i]] = scratch[i];
  }
  *loss_out = temperature * temperature * loss;
}

template <KdKind kKind, class T>
void kd_rows_typed(const KdRowsArgs& a, const KdParams& params) {
  const T* teacher = static_cast<const T*>(a.teacher.data);
  const RowChunks chunks = make_row_chunks(a.rows, 1, 1 << 30);
  for_each_chunk(chunks, a.rows * a.vocab, a.num_threads, [&](int64_t, int64_t begin, int64_t end) {
    std::vector<float> scratch(a.topk_indices != nullptr ? a.top_k : 0);
    for (int64_t n = begin; n < end; ++n) {
      float* z = a.z + n * a.z_row_stride;
      const T* t = teacher + n * a.teacher.row_stride;
      if (a.topk_indices == nullptr) {
        kd_rows_dense_row<kKind, T>(z, t, a.vocab, params, a.loss_out + n);
      } else if constexpr (kKind != KdKind::kReverseKl) {
        kd_rows_topk_row<kKind, T>(z, t, a.topk_indices + n * a.indices_row_stride, a.vocab, a.top_k, params,
                                   scratch.data(), a.loss_out + n);
      }
    }
  });
}

inline void kd_rows(const KdRowsArgs& a) {
  const KdParams params{1.0f / a.temperature, a.temperature, a.beta, std::log(a.beta), std::log1p(-a.beta)};
  with_storage_type(a.teacher.dtype, [&](auto teacher_type) {
    using T = typename decltype(teacher_type)::type;
    if constexpr (!std::is_same_v<T, double>) {  // fp64 runs the torch formulation (checked by the caller)
      switch (a.kind) {
        case KdKind::kForwardKl: return kd_rows_typed<KdKind::kForwardKl, T>(a, params);
        case KdKind::kReverseKl: return kd_rows_typed<KdKind::kReverseKl, T>(a, params);
        case KdKind::kJsd: return kd_rows_typed<KdKind::kJsd, T>(a, params);
      }
    }
  });
}
