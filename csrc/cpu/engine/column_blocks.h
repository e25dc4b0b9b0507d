// A sorted selection of unit-stride columns seen as 16-column blocks of a row, each with the mask of its
// selected columns. Included by engine.h inside the per-ISA namespace.
//
// With AVX-512 a row's selected elements are then read with one masked vector load per block and packed
// with a compress (vcompressps), instead of one scalar load per element: the loads follow the row's
// cache lines in order and their count is the number of blocks, not k. A top-k selection's index is
// sorted (select_top_k's default order="index"), so this is the common case; an unsorted index keeps
// the scalar gather. The packed elements are exactly those the
// scalar gather reads, so results are bit-identical.

struct ColumnBlocks {
  static constexpr int64_t kWidth = 16;
  std::vector<int64_t> starts;  // first column of each block that holds selected columns
  std::vector<uint16_t> masks;  // bit c set: column starts[b] + c is selected

  bool empty() const { return starts.empty(); }
};

// The blocks of `cols` (element offsets within a row) when they are strictly increasing offsets of
// unit-stride columns; empty otherwise (and when nothing is selected).
inline ColumnBlocks column_blocks(const int64_t* cols, int64_t k, bool unit_columns) {
  ColumnBlocks blocks;
  if (!unit_columns || k == 0) return blocks;
  for (int64_t j = 1; j < k; ++j) {
    if (cols[j] <= cols[j - 1]) return blocks;
  }
  for (int64_t j = 0; j < k; ++j) {
    const int64_t start = cols[j] / ColumnBlocks::kWidth * ColumnBlocks::kWidth;
    if (blocks.starts.empty() || blocks.starts.back() != start) {
      blocks.starts.push_back(start);
      blocks.masks.push_back(0);
    }
    blocks.masks.back() |= static_cast<uint16_t>(1u << (cols[j] - start));
  }
  return blocks;
}

// FLEXKD_CPU_AVX512: set by kernels_avx512.cpp (GCC's target pragma does not define __AVX512F__).
#ifdef FLEXKD_CPU_AVX512
#define FLEXKD_CPU_HAS_COMPRESS 1

// The selected elements of row `r`, in column order, as fp32 into `out`, which has room for
// ColumnBlocks::kWidth elements past the last one (each block stores a full vector).
// `whole_blocks`: read each block with a plain load, which may touch up to 15 columns past the row's last
// selected one; the caller allows it only where a later row of the same tensor lies beyond them. Else
// masked loads, which do not touch unselected columns, so a block past the end of the tensor cannot fault.
// Plain loads are 3.8x faster on Zen 5, where a masked load costs ~40 cycles (benchmarks/README.md).
// `prefetch_ahead`: when non-zero, each block also prefetches the block that many bytes further on (the
// same columns of a later row), which spreads the prefetches of rows the hardware prefetcher does not
// follow across the row.
inline void compress_row(const float* r, const ColumnBlocks& blocks, float* out, bool whole_blocks,
                         int64_t prefetch_ahead) {
  const size_t count = blocks.starts.size();
  for (size_t b = 0; b < count; ++b) {
    const __mmask16 mask = blocks.masks[b];
    const float* block = r + blocks.starts[b];
    if (prefetch_ahead != 0) __builtin_prefetch(reinterpret_cast<const char*>(block) + prefetch_ahead);
    const __m512 values = whole_blocks ? _mm512_loadu_ps(block) : _mm512_maskz_loadu_ps(mask, block);
    _mm512_storeu_ps(out, _mm512_maskz_compress_ps(mask, values));
    out += __builtin_popcount(mask);
  }
}

// bf16 widens to fp32 by a 16-bit shift, exactly what bf16_to_f32 does.
inline void compress_row(const BFloat16* r, const ColumnBlocks& blocks, float* out, bool whole_blocks,
                         int64_t prefetch_ahead) {
  const size_t count = blocks.starts.size();
  for (size_t b = 0; b < count; ++b) {
    const __mmask16 mask = blocks.masks[b];
    const auto* block = reinterpret_cast<const __m256i*>(r + blocks.starts[b]);
    if (prefetch_ahead != 0) __builtin_prefetch(reinterpret_cast<const char*>(block) + prefetch_ahead);
    const __m256i bits = whole_blocks ? _mm256_loadu_si256(block) : _mm256_maskz_loadu_epi16(mask, block);
    const __m512i widened = _mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16);
    _mm512_storeu_ps(out, _mm512_maskz_compress_ps(mask, _mm512_castsi512_ps(widened)));
    out += __builtin_popcount(mask);
  }
}
#else
#define FLEXKD_CPU_HAS_COMPRESS 0
#endif

// Whether compress_row exists for this ISA, accumulation type and teacher storage type.
template <class Acc, class T>
inline constexpr bool kCanCompress = FLEXKD_CPU_HAS_COMPRESS && std::is_same_v<Acc, float> &&
                                     (std::is_same_v<T, float> || std::is_same_v<T, BFloat16>);
