// loss="mse" in one pass: each student element and each selected teacher element is read once; the
// row's loss and both gradients come out of the same loop. Included by engine.h inside the per-ISA
// namespace.
//
// Each row's selected teacher elements are first gathered, converted to Acc, into a k-element
// per-thread buffer: with AVX-512 and a sorted unit-stride index by masked block loads and compresses
// (column_blocks.h), otherwise with scalar loads. The arithmetic loop then reads student, buffer and
// writes the gradients contiguously, so it vectorises for every dtype. Scalar loads beat the AVX2
// gather instructions on the CPUs measured (and 16-bit elements have none): see benchmarks/README.md.

template <class Acc, class T>
struct GatheredTeacherRow {
  // When the selected part of a row does not run into the next row's (a column slice of a wider
  // tensor) the hardware prefetcher restarts on every row; the first lines of the next row are
  // prefetched by hand instead.
  static constexpr int kPrefetchLines = 16;

  const T* data;
  int64_t row_stride;
  int64_t rows;
  const int64_t* cols;
  const ColumnBlocks* blocks;  // null or empty: scalar gather
  int64_t k;
  std::vector<Acc> buffer;  // k elements, and room for one block's full vector store
  std::vector<int64_t> prefetch_offsets;  // byte offsets within a row; empty for adjacent rows

  GatheredTeacherRow(const T* data_, int64_t row_stride_, int64_t rows_, const int64_t* cols_,
                     int64_t k, const ColumnBlocks* blocks_)
      : data(data_), row_stride(row_stride_), rows(rows_), cols(cols_), blocks(blocks_),
        k(k), buffer(static_cast<size_t>(k + ColumnBlocks::kWidth)) {
    int64_t span = 0;
    for (int64_t j = 0; j < k; ++j) span = std::max(span, cols[j] + 1);
    if (row_stride <= span) return;
    constexpr int64_t kLine = 64;
    for (int64_t j = 0; j < k && static_cast<int>(prefetch_offsets.size()) < kPrefetchLines; ++j) {
      const int64_t line = cols[j] * static_cast<int64_t>(sizeof(T)) / kLine * kLine;
      if (prefetch_offsets.empty() || prefetch_offsets.back() != line) prefetch_offsets.push_back(line);
    }
  }

  // Row n's selected elements: element j is teacher[n, index[j]]. Unrolled by hand into four
  // independent loads: left to itself GCC turns the loop into an emulated vector gather (element
  // inserts), about twice as slow as these scalar loads.
  const Acc* row(int64_t n) {
    const T* r = data + n * row_stride;
#if defined(__GNUC__)
    if (n + 1 < rows) {
      const char* next = reinterpret_cast<const char*>(r + row_stride);
      for (const int64_t offset : prefetch_offsets) __builtin_prefetch(next + offset);
    }
#endif
    Acc* out = buffer.data();
    if constexpr (kCanCompress<Acc, T>) {
      if (blocks != nullptr && !blocks->empty()) {
        compress_row(r, *blocks, out);
        return out;
      }
    }
    int64_t j = 0;
    for (; j + 4 <= k; j += 4) {
      const T t0 = r[cols[j]], t1 = r[cols[j + 1]], t2 = r[cols[j + 2]], t3 = r[cols[j + 3]];
      out[j] = load<Acc>(t0);
      out[j + 1] = load<Acc>(t1);
      out[j + 2] = load<Acc>(t2);
      out[j + 3] = load<Acc>(t3);
    }
    for (; j < k; ++j) out[j] = load<Acc>(r[cols[j]]);
    return out;
  }
};

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
  const ColumnBlocks blocks = kCanCompress<Acc, T>
                                  ? column_blocks(t_cols.data(), a.k, a.teacher.col_stride == 1)
                                  : ColumnBlocks{};
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
