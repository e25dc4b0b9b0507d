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
