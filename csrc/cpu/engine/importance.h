// importance_scores_acc: out[j] += sum_n w_n f(h_nj, g_nj). Rows are split into fixed chunks, each
// accumulating a private [cols] partial; partials are then added into `out` in chunk order. Included by
// engine.h inside the per-ISA namespace.

template <Stat kStat, class Acc>
inline Acc importance_term(Acc h, Acc g) {
  if constexpr (kStat == Stat::kGradXAct) {
    return std::fabs(h * g);
  } else if constexpr (kStat == Stat::kGrad) {
    return std::fabs(g);
  } else {
    return g * g;
  }
}

template <class H, class G, bool kUnitCols, Stat kStat>
void importance_scores(const ImportanceArgs& a) {
  using Acc = AccumulateT<H, G>;
  const int64_t cols = a.cols;
  const H* hidden = static_cast<const H*>(a.hidden.data);
  const G* grad = static_cast<const G*>(a.grad.data);
  const float* mask = a.mask;
  const RowChunks chunks = make_row_chunks(a.rows, 32, 64);
  std::vector<Acc> partial(static_cast<size_t>(chunks.count * cols), Acc(0));
  for_each_chunk(chunks, a.rows * cols, a.num_threads, [&](int64_t c, int64_t begin, int64_t end) {
    Acc* acc = partial.data() + c * cols;
    for (int64_t n = begin; n < end; ++n) {
      // Masked rows are read too: 0 * NaN is NaN, so a NaN anywhere reaches the scores (as in torch).
      const Acc w = mask != nullptr ? static_cast<Acc>(mask[n]) : Acc(1);
      const H* h = hidden + n * a.hidden.row_stride;
      const G* g = grad + n * a.grad.row_stride;
      const int64_t hs = a.hidden.col_stride;
      const int64_t gs = a.grad.col_stride;
#pragma omp simd
      for (int64_t j = 0; j < cols; ++j) {
        const Acc hv = load<Acc>(h[kUnitCols ? j : j * hs]);
        const Acc gv = load<Acc>(g[kUnitCols ? j : j * gs]);
        acc[j] += w * importance_term<kStat>(hv, gv);
      }
    }
  });
  // Column blocks in parallel; within a column the chunks are added in order.
  constexpr int64_t kColumnBlock = 256;
  const int64_t blocks = (cols + kColumnBlock - 1) / kColumnBlock;
  const int threads = threads_for(chunks.count * cols, blocks, a.num_threads);
  float* out = a.out;
  Acc* first = partial.data();  // chunk 0's partial; the others are added into it
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t begin = b * kColumnBlock;
    const int64_t end = std::min(cols, begin + kColumnBlock);
    for (int64_t c = 1; c < chunks.count; ++c) {
      const Acc* more = partial.data() + c * cols;
#pragma omp simd
      for (int64_t j = begin; j < end; ++j) first[j] += more[j];
    }
#pragma omp simd
    for (int64_t j = begin; j < end; ++j) out[j] += static_cast<float>(first[j]);
  }
}
