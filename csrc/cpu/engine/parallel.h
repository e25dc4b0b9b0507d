// Row partitioning for deterministic parallel reductions. Included by engine.h inside the per-ISA
// namespace. Rows are cut into chunks whose number and bounds depend only on the row count; each chunk
// writes its own partial result and partials are combined in chunk order, so results are bit-identical
// for any thread count.

struct RowChunks {
  int64_t rows;
  int64_t size;   // rows per chunk (the last one may be shorter)
  int64_t count;  // number of chunks

  int64_t begin(int64_t chunk) const { return chunk * size; }
  int64_t end(int64_t chunk) const { return std::min(rows, (chunk + 1) * size); }
};

// At most `max_chunks` chunks of at least `min_rows` rows each (one chunk when rows == 0).
inline RowChunks make_row_chunks(int64_t rows, int64_t min_rows, int64_t max_chunks) {
  const int64_t by_count = (rows + max_chunks - 1) / max_chunks;
  const int64_t size = std::max<int64_t>(std::max<int64_t>(min_rows, by_count), 1);
  const int64_t count = rows == 0 ? 1 : (rows + size - 1) / size;
  return RowChunks{rows, size, count};
}

// Below this many element operations a parallel region costs more than it saves.
constexpr int64_t kParallelGrain = 1 << 15;

inline int threads_for(int64_t work, int64_t tasks, int requested) {
  if (work < kParallelGrain || tasks < 2 || requested < 2 || omp_in_parallel()) return 1;
  return static_cast<int>(std::min<int64_t>(requested, tasks));
}

// body(chunk, row_begin, row_end) for every chunk, spread over threads with a static schedule.
template <class Body>
inline void for_each_chunk(const RowChunks& chunks, int64_t work, int requested_threads, Body&& body) {
  const int threads = threads_for(work, chunks.count, requested_threads);
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
  for (int64_t c = 0; c < chunks.count; ++c) {
    body(c, chunks.begin(c), chunks.end(c));
  }
}

// Sum of row weights and the number of rows whose weight is not 0, deterministic (fixed chunk order).
// For valid weights (>= 0) those are the rows with positive weight; a NaN weight counts, so it reaches
// the result instead of making the rows look too few.
template <class Acc>
struct RowWeights {
  Acc total;
  int64_t weighted;
};

template <class Acc>
inline RowWeights<Acc> row_weights(const Acc* mask, int64_t rows) {
  if (mask == nullptr) return RowWeights<Acc>{static_cast<Acc>(rows), rows};
  constexpr int64_t kBlock = 1024;
  Acc total = 0;
  int64_t weighted = 0;
  for (int64_t start = 0; start < rows; start += kBlock) {
    const int64_t stop = std::min(rows, start + kBlock);
    Acc block_total = 0;
    int64_t block_weighted = 0;
#pragma omp simd reduction(+ : block_total, block_weighted)
    for (int64_t n = start; n < stop; ++n) {
      block_total += mask[n];
      block_weighted += mask[n] != Acc(0) ? 1 : 0;
    }
    total += block_total;
    weighted += block_weighted;
  }
  return RowWeights<Acc>{total, weighted};
}
