// acc += src for an fp32 accumulator and a 16-bit src of the same size, in one vectorised pass: how
// linear_logit_kd sums its chunks' bf16 [V, H] weight-gradient products into the fp32 gradient. torch's
// mixed-dtype add_ runs this at about a third of the memory bandwidth. Included by engine.h inside the
// per-ISA namespace.

template <class T>
void add_widened_typed(const WidenAddArgs& a) {
  constexpr int64_t kBlock = 1 << 16;
  const T* src = static_cast<const T*>(a.src);
  const RowChunks blocks = make_row_chunks((a.size + kBlock - 1) / kBlock, 1, 1 << 30);
  for_each_chunk(blocks, a.size, a.num_threads, [&](int64_t, int64_t begin, int64_t end) {
    const int64_t stop = std::min(a.size, end * kBlock);
#pragma omp simd
    for (int64_t i = begin * kBlock; i < stop; ++i) a.acc[i] += load<float>(src[i]);
  });
}

inline void add_widened(const WidenAddArgs& a) {
  with_storage_type(a.src_dtype, [&](auto src_type) {
    using T = typename decltype(src_type)::type;
    if constexpr (!std::is_same_v<T, double>) add_widened_typed<T>(a);  // fp64 is refused by the caller
  });
}
