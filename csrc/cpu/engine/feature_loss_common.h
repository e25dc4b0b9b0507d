// Pieces shared by the mse and corr kernels. Included by engine.h inside the per-ISA namespace.

// Element offsets of the selected teacher columns within a teacher row.
inline std::vector<int64_t> teacher_column_offsets(const FeatureLossArgs& a) {
  std::vector<int64_t> offsets(static_cast<size_t>(a.k));
  for (int64_t j = 0; j < a.k; ++j) offsets[j] = a.index[j] * a.teacher.col_stride;
  return offsets;
}

inline int64_t loss_count(const FeatureLossArgs& a) {
  if (a.reduction != Reduction::kNone) return 1;
  return a.loss == Loss::kMse ? a.rows : a.k;
}

// The degenerate result (no weight, too few rows): loss 0 and zero gradients.
template <class S, class T, class Acc>
void write_zero_result(const FeatureLossArgs& a) {
  fill_zero(static_cast<Acc*>(a.loss_out), loss_count(a));
  if (a.grad_student != nullptr) fill_zero(static_cast<S*>(a.grad_student), a.rows * a.k);
  if (a.grad_teacher != nullptr) fill_zero(static_cast<T*>(a.grad_teacher), a.rows * a.k);
}

// Vector units cannot gather 16-bit elements, so a loop that reads bf16/fp16 teacher columns through
// the index would stay scalar. For those types each row's selected elements are first copied into a
// small per-thread buffer (one row, never the whole [N, k] selection); the arithmetic loop then reads
// the buffer contiguously and vectorises. Wider types are gathered in place.
template <class T>
inline constexpr bool kGatherIntoBuffer = sizeof(T) == 2;

template <class T>
struct TeacherRows {
  const T* data;
  int64_t row_stride;
  const int64_t* cols;
  std::vector<T> buffer;

  TeacherRows(const T* data_, int64_t row_stride_, const int64_t* cols_, int64_t k)
      : data(data_), row_stride(row_stride_), cols(cols_),
        buffer(kGatherIntoBuffer<T> ? static_cast<size_t>(k) : 0) {}

  // Row n's selected elements: element j is row(n)[j] when kGatherIntoBuffer<T>, else row(n)[cols[j]].
  const T* row(int64_t n) {
    const T* r = data + n * row_stride;
    if constexpr (kGatherIntoBuffer<T>) {
      for (size_t j = 0; j < buffer.size(); ++j) buffer[j] = r[cols[j]];
      return buffer.data();
    } else {
      return r;
    }
  }
};
