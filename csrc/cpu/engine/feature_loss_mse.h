// loss="mse" in one pass: each student element and each selected teacher element is read once; the
// row's loss and both gradients come out of the same loop. Included by engine.h inside the per-ISA
// namespace. The teacher's selected elements come through GatheredTeacherRow (teacher_rows.h), so the
// arithmetic loop reads student, buffer and writes the gradients contiguously and vectorises for every
// dtype.

template <class Acc, class S, class T, bool kUnitStudent, bool kGradS, bool kGradT>
inline Acc mse_row(const S* s, int64_t s_col_stride, const Acc* t, int64_t k, Acc grad_scale,
                   S* grad_s, T* grad_t) {
  Acc sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t j = 0; j < k; ++j) {
    const Acc diff = load<Acc>(s[kUnitStudent ? j : j * s_col_stride]) - t[j];
    sum += diff * diff;
    if constexpr (kGradS) grad_s[j] = store<S>(grad_scale * diff);
    if constexpr (kGradT) grad_t[j] = store<T>(-grad_scale * diff);
  }
  return sum;
}

template <class S, class T, bool kUnitStudent, bool kGradS, bool kGradT>
void mse_loss(const FeatureLossArgs& a) {
  using Acc = AccumulateT<S, T>;
  const Acc* mask = static_cast<const Acc*>(a.mask);
  const RowWeights<Acc> weights = row_weights(mask, a.rows);
  const bool mean = a.reduction == Reduction::kMean;
  if (mean && weights.total == Acc(0)) {  // `== 0`: a NaN weight reaches the loss
    write_zero_result<S, T, Acc>(a);
    return;
  }
  // d(loss)/d(s_nj) = 2 * w_n * (s_nj - t_nj) * scale.
  const Acc scale = mean ? Acc(1) / (static_cast<Acc>(a.k) * weights.total) : Acc(1);
  const std::vector<int64_t> t_cols = teacher_column_offsets(a);
  const ColumnBlocks blocks = teacher_column_blocks<Acc, T>(a, t_cols);
  const S* student = static_cast<const S*>(a.student.data);
  const T* teacher = static_cast<const T*>(a.teacher.data);
  S* grad_student = static_cast<S*>(a.grad_student);
  T* grad_teacher = static_cast<T*>(a.grad_teacher);
  Acc* loss_out = static_cast<Acc*>(a.loss_out);
  const bool per_row = a.reduction == Reduction::kNone;

  const RowChunks chunks = make_row_chunks(a.rows, 16, 256);
  std::vector<Acc> partial(static_cast<size_t>(chunks.count), Acc(0));
  for_each_chunk(chunks, a.rows * a.k, a.num_threads, [&](int64_t c, int64_t begin, int64_t end) {
    Acc chunk_sum = 0;
    GatheredTeacherRow<Acc, T> teacher_rows(teacher, a.teacher.row_stride, a.rows, t_cols.data(),
                                            a.k, &blocks);
    for (int64_t n = begin; n < end; ++n) {
      const Acc w = mask != nullptr ? mask[n] : Acc(1);
      const Acc row = mse_row<Acc, S, T, kUnitStudent, kGradS, kGradT>(
          student + n * a.student.row_stride, a.student.col_stride, teacher_rows.row(n), a.k,
          Acc(2) * scale * w, kGradS ? grad_student + n * a.k : nullptr,
          kGradT ? grad_teacher + n * a.k : nullptr);
      if (per_row) {
        loss_out[n] = w * row;
      } else {
        chunk_sum += w * row;
      }
    }
    partial[c] = chunk_sum;
  });
  if (!per_row) {
    Acc total = 0;
    for (const Acc p : partial) total += p;
    loss_out[0] = total * scale;
  }
}
