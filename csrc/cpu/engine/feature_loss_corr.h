// loss="corr": one statistics pass, then one gradient pass. Included by engine.h inside the per-ISA
// namespace. The algorithm and the names (mean_s, m2_s, co_m2, coef, alpha_s, ...) are those of
// flexkd/ops/reference.py ("corr statistics"): column moments of blocks of rows merged with Chan's
// pairwise update, never E[x^2] - E[x]^2, so any column mean and any first row are exact to rounding.
// Each chunk of rows merges its blocks of BlockMoments::kRows rows in order, and the chunks are merged in
// chunk order (their bounds depend only on the row count), so the result does not depend on the thread
// count.

// The total weight of a set of rows and, per column, the weighted means, the centred second moments
// sum w (s - mean_s)^2, sum w (t - mean_t)^2 and the co-moment sum w (s - mean_s)(t - mean_t).
template <class Acc>
struct ColumnMoments {
  Acc weight = 0;
  std::vector<Acc> mean_s, mean_t, m2_s, m2_t, co_m2;

  explicit ColumnMoments(int64_t k) : mean_s(k), mean_t(k), m2_s(k), m2_t(k), co_m2(k) {}

  // Absorbs the moments of more rows: W = W_a + W_b, f = W_b / W, g = W_a f, d = mean_b - mean_a,
  // mean += f d, m2 += m2_b + g d^2, co_m2 += co_b + g d_s d_t.
  void merge(const ColumnMoments& more) {
    const Acc merged = weight + more.weight;
    const Acc f = merged != Acc(0) ? more.weight / merged : Acc(0);
    const Acc g = weight * f;
    weight = merged;
    const int64_t k = static_cast<int64_t>(mean_s.size());
#pragma omp simd
    for (int64_t j = 0; j < k; ++j) {
      const Acc d_s = more.mean_s[j] - mean_s[j];
      const Acc d_t = more.mean_t[j] - mean_t[j];
      const Acc gd_s = g * d_s;
      mean_s[j] += f * d_s;
      mean_t[j] += f * d_t;
      m2_s[j] += more.m2_s[j] + gd_s * d_s;
      m2_t[j] += more.m2_t[j] + g * d_t * d_t;
      co_m2[j] += more.co_m2[j] + gd_s * d_t;
    }
  }
};

// x, or lo where x < lo; NaN stays NaN (std::max and fmax would not promise that).
template <class Acc>
inline Acc at_least(Acc x, Acc lo) {
  return x < lo ? lo : x;
}

// Per column: the loss term 1 - r and the gradient terms grad_s = coef w (b - alpha_s a),
// grad_t = coef w (a - alpha_t b), with a = s - mean_s, b = t - mean_t.
template <class Acc>
struct CorrColumns {
  std::vector<Acc> mean_s, mean_t;
  std::vector<Acc> coef;     // -c / (W sigma_s sigma_t), c = 1/k for the mean reduction, else 1
  std::vector<Acc> alpha_s;  // cov / var_s where var_s > eps^2, else 0 (a clamped sigma is a constant)
  std::vector<Acc> alpha_t;  // cov / var_t where var_t > eps^2, else 0
  std::vector<Acc> one_minus_r;
};

// The moments of a block of kRows rows, two-pass over the block (its weighted means, then its centred
// sums), merged into the running moments with ColumnMoments::merge. Both passes run along a row's
// contiguous columns, the student as stored and the teacher's selected elements gathered once per block
// into a buffer that stays in cache for the second pass. (A one-row-at-a-time update walks the columns
// in tiles down the rows instead: a serial dependency per row and strided student reads, 2x slower.)
template <class Acc, class S, class T, bool kUnitStudent>
class BlockMoments {
 public:
  static constexpr int64_t kRows = 32;

  BlockMoments(const FeatureLossArgs& a, const int64_t* t_cols, const ColumnBlocks* blocks, const Acc* mask)
      : a_(a), mask_(mask), block_(a.k),
        teacher_(static_cast<const T*>(a.teacher.data), a.teacher.row_stride, a.rows, t_cols, a.k, blocks),
        gathered_(static_cast<size_t>(kRows * a.k + ColumnBlocks::kWidth)) {}

  void add(int64_t begin, int64_t end, ColumnMoments<Acc>& m) {
    const int64_t rows = end - begin;
    const int64_t k = a_.k;
    Acc* mean_s = block_.mean_s.data();
    Acc* mean_t = block_.mean_t.data();
    Acc* m2_s = block_.m2_s.data();
    Acc* m2_t = block_.m2_t.data();
    Acc* co_m2 = block_.co_m2.data();
    std::fill(block_.mean_s.begin(), block_.mean_s.end(), Acc(0));
    std::fill(block_.mean_t.begin(), block_.mean_t.end(), Acc(0));
    std::fill(block_.m2_s.begin(), block_.m2_s.end(), Acc(0));
    std::fill(block_.m2_t.begin(), block_.m2_t.end(), Acc(0));
    std::fill(block_.co_m2.begin(), block_.co_m2.end(), Acc(0));
    Acc weight = 0;
    // Masked rows are read too: 0 * NaN is NaN, so a NaN anywhere reaches the loss (as in torch).
    for (int64_t r = 0; r < rows; ++r) {
      teacher_.gather(begin + r, gathered_.data() + r * k);
      const Acc w = row_weight(begin + r);
      weight += w;
      const S* s = student_row(begin + r);
      const Acc* t = gathered_.data() + r * k;
#pragma omp simd
      for (int64_t j = 0; j < k; ++j) {
        mean_s[j] += w * student_at(s, j);
        mean_t[j] += w * t[j];
      }
    }
    const Acc inv_weight = weight != Acc(0) ? Acc(1) / weight : Acc(0);
#pragma omp simd
    for (int64_t j = 0; j < k; ++j) {
      mean_s[j] *= inv_weight;
      mean_t[j] *= inv_weight;
    }
    for (int64_t r = 0; r < rows; ++r) {
      const Acc w = row_weight(begin + r);
      const S* s = student_row(begin + r);
      const Acc* t = gathered_.data() + r * k;
#pragma omp simd
      for (int64_t j = 0; j < k; ++j) {
        const Acc d_s = student_at(s, j) - mean_s[j];
        const Acc d_t = t[j] - mean_t[j];
        const Acc wd_s = w * d_s;
        m2_s[j] += wd_s * d_s;
        m2_t[j] += w * d_t * d_t;
        co_m2[j] += wd_s * d_t;
      }
    }
    block_.weight = weight;
    m.merge(block_);
  }

 private:
  Acc row_weight(int64_t n) const { return mask_ != nullptr ? mask_[n] : Acc(1); }
  const S* student_row(int64_t n) const {
    return static_cast<const S*>(a_.student.data) + n * a_.student.row_stride;
  }
  Acc student_at(const S* s, int64_t j) const {
    return load<Acc>(s[kUnitStudent ? j : j * a_.student.col_stride]);
  }

  const FeatureLossArgs& a_;
  const Acc* mask_;
  ColumnMoments<Acc> block_;
  GatheredTeacherRow<Acc, T> teacher_;
  std::vector<Acc> gathered_;  // the block's selected teacher elements, row by row
};

// Rows per thread chunk of the statistics, at least: each chunk sets up its own buffers and partial
// moments, which at 32 rows per chunk cost about as much as the statistics themselves (N=2048, 1 thread:
// 1.4 -> 0.8 ms).
constexpr int64_t kMomentChunkRows = 256;

template <class Acc, class S, class T, bool kUnitStudent>
ColumnMoments<Acc> corr_moments(const FeatureLossArgs& a, const int64_t* t_cols,
                                const ColumnBlocks* blocks, const Acc* mask) {
  using Block = BlockMoments<Acc, S, T, kUnitStudent>;
  const RowChunks chunks = make_row_chunks(a.rows, kMomentChunkRows, 64);
  std::vector<ColumnMoments<Acc>> partial(static_cast<size_t>(chunks.count), ColumnMoments<Acc>(a.k));
  for_each_chunk(chunks, a.rows * a.k, a.num_threads, [&](int64_t c, int64_t begin, int64_t end) {
    Block block(a, t_cols, blocks, mask);
    for (int64_t start = begin; start < end; start += Block::kRows) {
      block.add(start, std::min(end, start + Block::kRows), partial[c]);
    }
  });
  for (int64_t c = 1; c < chunks.count; ++c) partial[0].merge(partial[c]);
  return std::move(partial[0]);
}

template <class Acc>
CorrColumns<Acc> corr_columns(ColumnMoments<Acc>&& m, Acc eps, Acc c) {
  const size_t k = m.mean_s.size();
  CorrColumns<Acc> out{std::move(m.mean_s), std::move(m.mean_t), std::vector<Acc>(k),
                       std::vector<Acc>(k), std::vector<Acc>(k), std::vector<Acc>(k)};
  const Acc eps2 = eps * eps;
  for (size_t j = 0; j < k; ++j) {
    const Acc var_s = m.m2_s[j] / m.weight;
    const Acc var_t = m.m2_t[j] / m.weight;
    const Acc cov = m.co_m2[j] / m.weight;
    const Acc sigmas = std::sqrt(at_least(var_s, eps2)) * std::sqrt(at_least(var_t, eps2));
    out.one_minus_r[j] = Acc(1) - cov / sigmas;
    out.coef[j] = -c / (m.weight * sigmas);
    out.alpha_s[j] = var_s > eps2 ? cov / var_s : Acc(0);
    out.alpha_t[j] = var_t > eps2 ? cov / var_t : Acc(0);
  }
  return out;
}

template <class Acc, class S, class T, bool kUnitStudent, bool kGradS, bool kGradT>
void corr_gradients(const FeatureLossArgs& a, const int64_t* t_cols, const ColumnBlocks* blocks,
                    const Acc* mask, const CorrColumns<Acc>& col) {
  const int64_t k = a.k;
  const S* student = static_cast<const S*>(a.student.data);
  const T* teacher = static_cast<const T*>(a.teacher.data);
  S* grad_student = static_cast<S*>(a.grad_student);
  T* grad_teacher = static_cast<T*>(a.grad_teacher);
  const Acc* mean_s = col.mean_s.data();
  const Acc* mean_t = col.mean_t.data();
  const Acc* coef = col.coef.data();
  const Acc* alpha_s = col.alpha_s.data();
  const Acc* alpha_t = col.alpha_t.data();
  const RowChunks chunks = make_row_chunks(a.rows, 64, 64);
  for_each_chunk(chunks, a.rows * k, a.num_threads, [&](int64_t, int64_t begin, int64_t end) {
    GatheredTeacherRow<Acc, T> teacher_rows(teacher, a.teacher.row_stride, a.rows, t_cols, k, blocks);
    for (int64_t n = begin; n < end; ++n) {
      const Acc w = mask != nullptr ? mask[n] : Acc(1);
      const S* s = student + n * a.student.row_stride;
      const Acc* t = teacher_rows.row(n);
      S* gs = kGradS ? grad_student + n * k : nullptr;
      T* gt = kGradT ? grad_teacher + n * k : nullptr;
#pragma omp simd
      for (int64_t j = 0; j < k; ++j) {
        const Acc centred_s = load<Acc>(s[kUnitStudent ? j : j * a.student.col_stride]) - mean_s[j];
        const Acc centred_t = t[j] - mean_t[j];
        const Acc scale = w * coef[j];
        if constexpr (kGradS) gs[j] = store<S>(scale * (centred_t - alpha_s[j] * centred_s));
        if constexpr (kGradT) gt[j] = store<T>(scale * (centred_s - alpha_t[j] * centred_t));
      }
    }
  });
}

template <class S, class T, bool kUnitStudent, bool kGradS, bool kGradT>
void corr_loss(const FeatureLossArgs& a) {
  using Acc = AccumulateT<S, T>;
  const Acc* mask = static_cast<const Acc*>(a.mask);
  if (row_weights(mask, a.rows).weighted < 2) {
    write_zero_result<S, T, Acc>(a);
    return;
  }
  const Acc c = a.reduction == Reduction::kMean ? Acc(1) / static_cast<Acc>(a.k) : Acc(1);
  const std::vector<int64_t> t_cols = teacher_column_offsets(a);
  const ColumnBlocks blocks = teacher_column_blocks<Acc, T>(a, t_cols);
  const CorrColumns<Acc> columns = corr_columns<Acc>(
      corr_moments<Acc, S, T, kUnitStudent>(a, t_cols.data(), &blocks, mask), static_cast<Acc>(a.eps), c);

  Acc* loss_out = static_cast<Acc*>(a.loss_out);
  if (a.reduction == Reduction::kNone) {
    std::copy(columns.one_minus_r.begin(), columns.one_minus_r.end(), loss_out);
  } else {
    Acc total = 0;
    for (const Acc v : columns.one_minus_r) total += v;
    loss_out[0] = total * c;
  }
  if constexpr (kGradS || kGradT) {
    corr_gradients<Acc, S, T, kUnitStudent, kGradS, kGradT>(a, t_cols.data(), &blocks, mask, columns);
  }
}
