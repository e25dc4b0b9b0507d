// The per-row closed form of forward-KL logit KD for linear_logit_kd's chunks, fused: for each row of
// student logits z [V] (fp32, overwritten) and teacher logits t [V], with s = z/T, q = softmax(s),
// p = softmax(t/T): loss = T^2 sum p (log p - log q) (0 where p = 0) and z <- T (q - p). Three passes
// over the row (maxima, sums of exp, then loss and gradient), which stay in cache for a row of a few
// hundred KiB, instead of the dozen [rows, V] passes of the torch formulation. Included by engine.h
// inside the per-ISA namespace.

// exp(x) in fp32, to about 2 ulp, in a form loops vectorise: 0 below ln(FLT_MIN) and for -inf, inf above
// the fp32 range, NaN stays NaN. Cody-Waite reduction by ln 2 and the degree-5 polynomial of Cephes' expf.
inline float exp_fp32(float x) {
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

template <class T>
void kd_rows_forward_kl_row(float* z, const T* t, int64_t vocab, float temperature, float* loss_out) {
  const float inv_t = 1.0f / temperature;
  float max_z = -std::numeric_limits<float>::infinity();
  float max_t = max_z;
#pragma omp simd reduction(max : max_z, max_t)
  for (int64_t j = 0; j < vocab; ++j) {
    max_z = std::max(max_z, z[j]);
    max_t = std::max(max_t, load<float>(t[j]));
  }
  float sum_q = 0, sum_p = 0;
#pragma omp simd reduction(+ : sum_q, sum_p)
  for (int64_t j = 0; j < vocab; ++j) {
    sum_q += exp_fp32((z[j] - max_z) * inv_t);
    sum_p += exp_fp32((load<float>(t[j]) - max_t) * inv_t);
  }
  // A NaN anywhere in the row (the maxima skip it, exp_fp32 keeps it) makes the whole row NaN, as the
  // torch formulation's amax does.
  if (std::isnan(sum_q + sum_p)) {
    *loss_out = std::numeric_limits<float>::quiet_NaN();
    std::fill(z, z + vocab, std::numeric_limits<float>::quiet_NaN());
    return;
  }
  const float log_sum_q = std::log(sum_q), log_sum_p = std::log(sum_p);
  const float inv_sum_q = 1.0f / sum_q, inv_sum_p = 1.0f / sum_p;
  float loss = 0;
#pragma omp simd reduction(+ : loss)
  for (int64_t j = 0; j < vocab; ++j) {
    const float a = (z[j] - max_z) * inv_t;
    const float b = (load<float>(t[j]) - max_t) * inv_t;
    const float q = exp_fp32(a) * inv_sum_q;
    const float p = exp_fp32(b) * inv_sum_p;
    const float log_ratio = (b - log_sum_p) - (a - log_sum_q);
    loss += p > 0.0f ? p * log_ratio : 0.0f;
    z[j] = temperature * (q - p);
  }
  *loss_out = temperature * temperature * loss;
}

inline void kd_rows_forward_kl(const KdRowsArgs& a) {
  with_storage_type(a.teacher.dtype, [&](auto teacher_type) {
    using T = typename decltype(teacher_type)::type;
    if constexpr (std::is_same_v<T, double>) {
      return;  // fp64 runs the torch formulation (checked by the caller)
    } else {
      const T* teacher = static_cast<const T*>(a.teacher.data);
      const RowChunks chunks = make_row_chunks(a.rows, 1, 1 << 30);
      for_each_chunk(chunks, a.rows * a.vocab, a.num_threads, [&](int64_t, int64_t begin, int64_t end) {
        for (int64_t n = begin; n < end; ++n) {
          kd_rows_forward_kl_row<T>(a.z + n * a.z_row_stride, teacher + n * a.teacher.row_stride, a.vocab,
                                    a.temperature, a.loss_out + n);
        }
      });
    }
  });
}
