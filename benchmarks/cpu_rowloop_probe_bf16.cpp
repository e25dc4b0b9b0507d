// bf16 mse forward + student gradient row loop outside torch (N=8192 D=2048 k=768, sorted random index, 1
// thread, medians of 11): the kernel's layout (teacher block-compressed into an fp32 row buffer, then one
// vector loop) against the same with non-temporal gradient stores, a loop fused per 16-column block (the
// teacher compressed in a register against the student's next 16 elements, no buffer), a copy of the
// bytes, and the buffer layout on a column slice of a [N, 2D] teacher with prefetch distances 0-8 rows.
//   g++ -std=c++20 -O3 -fopenmp -ffp-contract=off benchmarks/cpu_rowloop_probe_bf16.cpp -o /tmp/probe_bf16 \
//     && OMP_NUM_THREADS=1 taskset -c 1 /tmp/probe_bf16
#include <immintrin.h>
#include <chrono>
#include <cstdio>
#include <cstdint>
#include <cstring>
#include <vector>
#include <algorithm>
#include <random>
#pragma GCC target("avx512f,avx512bw,avx512dq,avx512vl,avx2,fma,f16c,prefer-vector-width=512")
int64_t N = 8192, D = 2048, K = 768;
struct Blocks { std::vector<int64_t> starts; std::vector<uint16_t> masks; };
static inline float bf(uint16_t b) { uint32_t u = uint32_t(b) << 16; float f; memcpy(&f, &u, 4); return f; }
static inline uint16_t tobf(float v) {
  uint32_t b; memcpy(&b, &v, 4);
  uint32_t r = (b + 0x7FFFu + ((b >> 16) & 1u)) >> 16;
  bool nan = (b & 0x7FFFFFFFu) > 0x7F800000u;
  return uint16_t(nan ? 0x7FC0u : r);
}
__attribute__((noinline)) void compress_row(const uint16_t* r, const Blocks& b, float* out) {
  for (size_t i = 0; i < b.starts.size(); ++i) {
    __mmask16 m = b.masks[i];
    __m256i bits = _mm256_loadu_si256((const __m256i*)(r + b.starts[i]));
    __m512i w = _mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16);
    _mm512_storeu_ps(out, _mm512_maskz_compress_ps(m, _mm512_castsi512_ps(w)));
    out += __builtin_popcount(m);
  }
}
__attribute__((noinline)) void compress_row_pf(const uint16_t* r, const Blocks& b, float* out, int64_t ahead) {
  for (size_t i = 0; i < b.starts.size(); ++i) {
    __mmask16 m = b.masks[i];
    const char* blk = (const char*)(r + b.starts[i]);
    if (ahead) __builtin_prefetch(blk + ahead);
    __m256i bits = _mm256_loadu_si256((const __m256i*)blk);
    __m512i w = _mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16);
    _mm512_storeu_ps(out, _mm512_maskz_compress_ps(m, _mm512_castsi512_ps(w)));
    out += __builtin_popcount(m);
  }
}
__attribute__((noinline)) float mse_row(const uint16_t* s, const float* t, float g, uint16_t* gs) {
  float sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t j = 0; j < K; ++j) { float d = bf(s[j]) - t[j]; sum += d * d; gs[j] = tobf(g * d); }
  return sum;
}
static inline __m256i round_bf16(__m512 v) {
  __m512i b = _mm512_castps_si512(v);
  __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(b, _mm512_set1_epi32(0x7FFF)), lsb), 16);
  __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  r = _mm512_mask_mov_epi32(r, nan, _mm512_set1_epi32(0x7FC0));
  return _mm512_cvtepi32_epi16(r);
}
// fused: per block, compress the teacher in a register, load the student's next 16, diff in compressed order
__attribute__((noinline)) float fused_row(const uint16_t* r, const Blocks& b, const uint16_t* s, float g,
                                          uint16_t* gs, bool last_row) {
  __m512 acc = _mm512_setzero_ps();
  const __m512 vg = _mm512_set1_ps(g);
  const size_t nb = b.starts.size();
  int64_t j = 0;
  for (size_t i = 0; i < nb; ++i) {
    const __mmask16 m = b.masks[i];
    const int cnt = __builtin_popcount(m);
    const __mmask16 head = (__mmask16)((1u << cnt) - 1);
    __m256i tb = _mm256_loadu_si256((const __m256i*)(r + b.starts[i]));
    __m512 t = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(tb), 16));
    t = _mm512_maskz_compress_ps(m, t);
    const bool tail = i + 1 == nb;
    __m256i sb = tail ? _mm256_maskz_loadu_epi16(head, s + j) : _mm256_loadu_si256((const __m256i*)(s + j));
    __m512 sv = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(sb), 16));
    __m512 d = _mm512_maskz_sub_ps(head, sv, t);
    acc = _mm512_add_ps(acc, _mm512_mul_ps(d, d));
    __m256i gr = round_bf16(_mm512_mul_ps(vg, d));
    if (tail) _mm256_mask_storeu_epi16(gs + j, head, gr);
    else _mm256_storeu_si256((__m256i*)(gs + j), gr);
    j += cnt;
  }
  (void)last_row;
  return _mm512_reduce_add_ps(acc);
}
template <class F> double med(F f) {
  std::vector<double> ts;
  for (int r = 0; r < 11; ++r) { auto a = std::chrono::steady_clock::now(); f(); ts.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - a).count()); }
  std::sort(ts.begin(), ts.end()); return ts[5];
}
int main(int argc, char** argv) {
  if (argc > 1) N = atoi(argv[1]);
  std::vector<uint16_t> T(N * D), S(N * K); uint16_t* G1 = (uint16_t*)aligned_alloc(64, (N * K + 64) * 2); std::vector<uint16_t> G2(N * K + 16), Cp(N * (D + 2 * K));
  std::mt19937 rng(0); std::normal_distribution<float> nd;
  for (auto& x : T) x = tobf(nd(rng)); for (auto& x : S) x = tobf(nd(rng));
  std::vector<int64_t> idx(D); for (int64_t i = 0; i < D; ++i) idx[i] = i;
  std::shuffle(idx.begin(), idx.end(), rng); idx.resize(K); std::sort(idx.begin(), idx.end());
  Blocks b;
  for (auto c : idx) { int64_t st = c / 16 * 16; if (b.starts.empty() || b.starts.back() != st) { b.starts.push_back(st); b.masks.push_back(0); } b.masks.back() |= 1u << (c - st); }
  std::vector<float> buf(K + 16);
  float s1 = 0, s2 = 0;
  auto A = [&] { s1 = 0; for (int64_t n = 0; n < N; ++n) { compress_row(&T[n * D], b, buf.data()); s1 += mse_row(&S[n * K], buf.data(), 0.5f, G1 + n * K); } };
  auto B = [&] { s2 = 0; for (int64_t n = 0; n < N; ++n) s2 += fused_row(&T[n * D], b, &S[n * K], 0.5f, &G2[n * K], n + 1 == N); };
  std::vector<uint16_t> scratch(K + 32);
  auto A2 = [&] { s1 = 0; for (int64_t n = 0; n < N; ++n) { compress_row(&T[n * D], b, buf.data()); s1 += mse_row(&S[n * K], buf.data(), 0.5f, scratch.data());
      char* dst = (char*)G1 + n * K; const char* src = (const char*)scratch.data();
      for (int64_t o = 0; o < K * 2; o += 64) _mm512_stream_si512((__m512i*)(dst + o), _mm512_loadu_si512(src + o)); } _mm_sfence(); };
  auto C = [&] { memcpy(Cp.data(), T.data(), N * D * 2); memcpy(Cp.data() + N * D, S.data(), N * K * 2); memcpy(Cp.data() + N * D + N * K, S.data(), N * K * 2); };
  std::vector<uint16_t> T2(N * 2 * D);
  for (int64_t n = 0; n < N; ++n) memcpy(&T2[n * 2 * D], &T[n * D], D * 2);
  auto Sx = [&](int64_t rows_ahead) { return [&, rows_ahead] { s1 = 0; for (int64_t n = 0; n < N; ++n) { compress_row_pf(&T2[n * 2 * D], b, buf.data(), rows_ahead * 2 * D * 2); s1 += mse_row(&S[n * K], buf.data(), 0.5f, G1 + n * K); } }; };
  auto Cx = [&](int64_t rows_ahead) { return [&, rows_ahead] { s1 = 0; for (int64_t n = 0; n < N; ++n) { compress_row_pf(&T[n * D], b, buf.data(), rows_ahead * D * 2); s1 += mse_row(&S[n * K], buf.data(), 0.5f, G1 + n * K); } }; };
  for (int rep = 0; rep < 2; ++rep) {
    printf("contiguous: pf0 %.3f pf1 %.3f pf2 %.3f | strided: pf0 %.3f pf1 %.3f pf2 %.3f pf4 %.3f pf8 %.3f\n", med(Cx(0)), med(Cx(1)), med(Cx(2)), med(Sx(0)), med(Sx(1)), med(Sx(2)), med(Sx(4)), med(Sx(8)));
  }
  A(); B();
  printf("sums %.6f %.6f grads equal %d\n", s1, s2, memcmp(G1, G2.data(), N * K * 2) == 0);
  for (int rep = 0; rep < 3; ++rep)
    printf("N=%ld buffer %.3f ms  buffer+stream %.3f ms  fused %.3f ms  copy-of-bytes %.3f ms\n", (long)N, med(A), med(A2), med(B), med(C));
}
