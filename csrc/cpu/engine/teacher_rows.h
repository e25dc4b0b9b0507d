// A teacher row's selected elements, gathered and converted to Acc into a k-element buffer: with AVX-512
// and a sorted unit-stride index by masked block loads and compresses (column_blocks.h), otherwise with
// scalar loads. Scalar loads beat the AVX2 gather instructions on the CPUs measured (and 16-bit elements
// have none): see benchmarks/README.md. The mse and corr kernels read the teacher through it. Included
// by engine.h inside the per-ISA namespace.

template <class Acc, class T>
struct GatheredTeacherRow {
  // When the selected part of a row does not run into the next row's (a column slice of a wider
  // tensor) the hardware prefetcher restarts on every row, so rows are prefetched by hand: the block
  // gather prefetches each block kCompressRowsAhead rows on as it reads it (2.8x -> 1.7x a copy's CPU
  // time for fp32 on Zen 5, 5.0x -> 2.0x for bf16); the scalar gather prefetches the first
  // kPrefetchLines lines of the next row.
  static constexpr int kPrefetchLines = 16;
  static constexpr int64_t kCompressRowsAhead = 2;

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
    gather(n, buffer.data());
    return buffer.data();
  }

  // Row n's selected elements into out, which has room for ColumnBlocks::kWidth elements past the k-th.
  void gather(int64_t n, Acc* out) const {
    const T* r = data + n * row_stride;
    const bool strided = !prefetch_offsets.empty();
    if constexpr (kCanCompress<Acc, T>) {
      if (blocks != nullptr && !blocks->empty()) {
        // a block of row n reads at most 15 elements past the row's last selected column, and those lie
        // before the last selected element of row n + 1 when rows are at least a block apart
        const int64_t ahead = strided ? kCompressRowsAhead * row_stride * static_cast<int64_t>(sizeof(T)) : 0;
        compress_row(r, *blocks, out, n + 1 < rows && row_stride >= ColumnBlocks::kWidth, ahead);
        return;
      }
    }
#if defined(__GNUC__)
    if (strided && n + 1 < rows) {
      const char* next = reinterpret_cast<const char*>(r + row_stride);
      for (const int64_t offset : prefetch_offsets) __builtin_prefetch(next + offset);
    }
#endif
    int64_t j = 0;
    for (; j + 4 <= k; j += 4) {
      const T t0 = r[cols[j]], t1 = r[cols[j + 1]], t2 = r[cols[j + 2]], t3 = r[cols[j + 3]];
      out[j] = load<Acc>(t0);
      out[j + 1] = load<Acc>(t1);
      out[j + 2] = load<Acc>(t2);
      out[j + 3] = load<Acc>(t3);
    }
    for (; j < k; ++j) out[j] = load<Acc>(r[cols[j]]);
  }
};

// The block view of the selected columns where compress_row serves this (Acc, T); empty otherwise.
template <class Acc, class T>
inline ColumnBlocks teacher_column_blocks(const FeatureLossArgs& a, const std::vector<int64_t>& t_cols) {
  if constexpr (kCanCompress<Acc, T>) {
    return column_blocks(t_cols.data(), a.k, a.teacher.col_stride == 1);
  } else {
    return ColumnBlocks{};
  }
}
