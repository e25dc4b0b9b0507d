// loss="corr": one statistics pass (weighted sums per column, shifted by row 0's values so a large mean
// does not cancel the variance), then one gradient pass. Included by engine.h inside the per-ISA
// namespace.

// Weighted sums of x = s - shift_s and y = t - shift_t over a chunk of rows, one entry per column.
template <class Acc>
struct ColumnSums {
  Acc* x;
  Acc* y;
  Acc* xx;
  Acc* yy;
  Acc* xy;
};

template <class Acc>
struct CorrColumns {
  std::vector<Acc> mean_s, mean_t;  // weighted column means
  std::vector<Acc> scale;           // c * Q^-1/2 / W
  std::vector<Acc> beta_s;          // cov * var_t / Q (student gradient's a-coefficient)
  std::vector<Acc> beta_t;          // cov * var_s / Q (teacher gradient's b-coefficient)
  std::vector<Acc> one_minus_r;
};

template <class Acc, class S, class T, bool kUnitStudent>
CorrColumns<Acc> corr_statistics(const FeatureLossArgs& a, const int64_t* t_cols, const Acc* mask,
                                 Acc total_weight, Acc loss_scale) {
  const int64_t k = a.k;
  const S* student = static_cast<const S*>(a.student.data);
  const T* teacher = static_cast<const T*>(a.teacher.data);
  std::vector<Acc> shift_s(k), shift_t(k);
  for (int64_t j = 0; j < k; ++j) {
    shift_s[j] = load<Acc>(student[kUnitStudent ? j : j * a.student.col_stride]);
    shift_t[j] = load<Acc>(teacher[t_cols[j]]);
  }

  const RowChunks chunks = make_row_chunks(a.rows, 64, 64);
  std::vector<Acc> partial(static_cast<size_t>(chunks.count * 5 * k), Acc(0));
  auto sums_of = [&](int64_t c) {
    Acc* base = partial.data() + c * 5 * k;
    return ColumnSums<Acc>{base, base + k, base + 2 * k, base + 3 * k, base + 4 * k};
  };
  for_each_chunk(chunks, a.rows * k, a.num_threads, [&](int64_t c, int64_t begin, int64_t end) {
    const ColumnSums<Acc> acc = sums_of(c);
    const Acc* s0 = shift_s.data();
    const Acc* t0 = shift_t.data();
    TeacherRows<T> teacher_rows(teacher, a.teacher.row_stride, t_cols, k);
    for (int64_t n = begin; n < end; ++n) {
      const Acc w = mask != nullptr ? mask[n] : Acc(1);
      if (w == Acc(0)) continue;
      const S* s = student + n * a.student.row_stride;
      const T* t = teacher_rows.row(n);
#pragma omp simd
      for (int64_t j = 0; j < k; ++j) {
        const Acc x = load<Acc>(s[kUnitStudent ? j : j * a.student.col_stride]) - s0[j];
        const Acc y = load<Acc>(t[kGatherIntoBuffer<T> ? j : t_cols[j]]) - t0[j];
        const Acc wx = w * x;
        const Acc wy = w * y;
        acc.x[j] += wx;
        acc.y[j] += wy;
        acc.xx[j] += wx * x;
        acc.yy[j] += wy * y;
        acc.xy[j] += wx * y;
      }
    }
  });
  Acc* combined = partial.data();  // chunk 0's five sums, then every other chunk's added in order
  for (int64_t c = 1; c < chunks.count; ++c) {
    const Acc* more = partial.data() + c * 5 * k;
#pragma omp simd
    for (int64_t j = 0; j < 5 * k; ++j) combined[j] += more[j];
  }

  const ColumnSums<Acc> sums = sums_of(0);
  const Acc eps = static_cast<Acc>(a.eps);
  CorrColumns<Acc> out{std::vector<Acc>(k), std::vector<Acc>(k), std::vector<Acc>(k),
                       std::vector<Acc>(k), std::vector<Acc>(k), std::vector<Acc>(k)};
  for (int64_t j = 0; j < k; ++j) {
    const Acc mx = sums.x[j] / total_weight;
    const Acc my = sums.y[j] / total_weight;
    const Acc var_s = std::max(sums.xx[j] / total_weight - mx * mx, Acc(0));
    const Acc var_t = std::max(sums.yy[j] / total_weight - my * my, Acc(0));
    const Acc cov = sums.xy[j] / total_weight - mx * my;
    const Acc q = var_s * var_t + eps;
    const Acc inv_sqrt_q = Acc(1) / std::sqrt(q);
    out.mean_s[j] = shift_s[j] + mx;
    out.mean_t[j] = shift_t[j] + my;
    out.scale[j] = loss_scale * inv_sqrt_q / total_weight;
    out.beta_s[j] = cov * var_t / q;
    out.beta_t[j] = cov * var_s / q;
    out.one_minus_r[j] = Acc(1) - cov * inv_sqrt_q;
  }
  return out;
}

// grad_s = -w * scale * (b - beta_s * a), grad_t = -w * scale * (a - beta_t * b), with a and b the
// centred student and teacher values.
template <class Acc, class S, class T, bool kUnitStudent, bool kGradS, bool kGradT>
void corr_gradients(const FeatureLossArgs& a, const int64_t* t_cols, const Acc* mask,
                    const CorrColumns<Acc>& col) {
  const int64_t k = a.k;
  const S* student = static_cast<const S*>(a.student.data);
  const T* teacher = static_cast<const T*>(a.teacher.data);
  S* grad_student = static_cast<S*>(a.grad_student);
  T* grad_teacher = static_cast<T*>(a.grad_teacher);
  const Acc* mean_s = col.mean_s.data();
  const Acc* mean_t = col.mean_t.data();
  const Acc* scale = col.scale.data();
  const Acc* beta_s = col.beta_s.data();
  const Acc* beta_t = col.beta_t.data();
  const RowChunks chunks = make_row_chunks(a.rows, 16, 1 << 30);
  for_each_chunk(chunks, a.rows * k, a.num_threads, [&](int64_t, int64_t begin, int64_t end) {
    TeacherRows<T> teacher_rows(teacher, a.teacher.row_stride, t_cols, k);
    for (int64_t n = begin; n < end; ++n) {
      const Acc neg_w = -(mask != nullptr ? mask[n] : Acc(1));
      const S* s = student + n * a.student.row_stride;
      const T* t = teacher_rows.row(n);
      S* gs = kGradS ? grad_student + n * k : nullptr;
      T* gt = kGradT ? grad_teacher + n * k : nullptr;
#pragma omp simd
      for (int64_t j = 0; j < k; ++j) {
        const Acc centred_s = load<Acc>(s[kUnitStudent ? j : j * a.student.col_stride]) - mean_s[j];
        const Acc centred_t = load<Acc>(t[kGatherIntoBuffer<T> ? j : t_cols[j]]) - mean_t[j];
        const Acc coef = neg_w * scale[j];
        if constexpr (kGradS) gs[j] = store<S>(coef * (centred_t - beta_s[j] * centred_s));
        if constexpr (kGradT) gt[j] = store<T>(coef * (centred_s - beta_t[j] * centred_t));
      }
    }
  });
}

template <class S, class T, bool kUnitStudent, bool kGradS, bool kGradT>
void corr_loss(const FeatureLossArgs& a) {
  using Acc = AccumulateT<S, T>;
  const Acc* mask = static_cast<const Acc*>(a.mask);
  const RowWeights<Acc> weights = row_weights(mask, a.rows);
  if (weights.positive < 2) {
    write_zero_result<S, T, Acc>(a);
    return;
  }
  const Acc loss_scale = a.reduction == Reduction::kMean ? Acc(1) / static_cast<Acc>(a.k) : Acc(1);
  const std::vector<int64_t> t_cols = teacher_column_offsets(a);
  const CorrColumns<Acc> columns =
      corr_statistics<Acc, S, T, kUnitStudent>(a, t_cols.data(), mask, weights.total, loss_scale);

  Acc* loss_out = static_cast<Acc*>(a.loss_out);
  if (a.reduction == Reduction::kNone) {
    std::copy(columns.one_minus_r.begin(), columns.one_minus_r.end(), loss_out);
  } else {
    Acc total = 0;
    for (const Acc v : columns.one_minus_r) total += v;
    loss_out[0] = total * loss_scale;
  }
  if constexpr (kGradS || kGradT) {
    corr_gradients<Acc, S, T, kUnitStudent, kGradS, kGradT>(a, t_cols.data(), mask, columns);
  }
}
