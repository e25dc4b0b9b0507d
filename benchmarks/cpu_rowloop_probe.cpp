// Where the CPU mse forward's row loop spends its time, outside torch: the AVX-512 block gather with masked and
// plain loads, permute vs compress, and the arithmetic alone. N=8192 D=2048 k=768 fp32, 1 thread, medians of 11.
//   g++ -std=c++17 -O3 -fopenmp -ffp-contract=off benchmarks/cpu_rowloop_probe.cpp -o /tmp/probe && OMP_NUM_THREADS=1 /tmp/probe
#include <immintrin.h>
#include <chrono>
#include <cstdio>
#include <cstdint>
#include <vector>
#include <algorithm>
#include <random>
#pragma GCC target("avx512f,avx512bw,avx512dq,avx512vl,avx2,fma,f16c,prefer-vector-width=512")
const int64_t N = 8192, D = 2048, K = 768;
struct Blocks { std::vector<int64_t> starts; std::vector<uint16_t> masks; };
__attribute__((noinline)) void compress_row(const float* r, const Blocks& b, float* out) {
  for (size_t i = 0; i < b.starts.size(); ++i) {
    __mmask16 m = b.masks[i];
    __m512 v = _mm512_maskz_loadu_ps(m, r + b.starts[i]);
    _mm512_storeu_ps(out, _mm512_maskz_compress_ps(m, v));
    out += __builtin_popcount(m);
  }
}
__attribute__((noinline)) float mse_row(const float* s, const float* t, float g, float* gs) {
  float sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t j = 0; j < K; ++j) { float d = s[j] - t[j]; sum += d * d; gs[j] = g * d; }
  return sum;
}
__attribute__((noinline)) void unmasked_compress(const float* r, const Blocks& b, float* out) {
  for (size_t i = 0; i < b.starts.size(); ++i) {
    __mmask16 m = b.masks[i];
    __m512 v = _mm512_loadu_ps(r + b.starts[i]);
    _mm512_storeu_ps(out, _mm512_maskz_compress_ps(m, v));
    out += __builtin_popcount(m);
  }
}
__attribute__((noinline)) void masked_nocompress(const float* r, const Blocks& b, float* out) {
  for (size_t i = 0; i < b.starts.size(); ++i) {
    __mmask16 m = b.masks[i];
    __m512 v = _mm512_maskz_loadu_ps(m, r + b.starts[i]);
    _mm512_storeu_ps(out, v);
    out += __builtin_popcount(m);
  }
}
std::vector<int> perms;
__attribute__((noinline)) void unmasked_permute(const float* r, const Blocks& b, float* out) {
  for (size_t i = 0; i < b.starts.size(); ++i) {
    __m512 v = _mm512_loadu_ps(r + b.starts[i]);
    _mm512_storeu_ps(out, _mm512_permutexvar_ps(_mm512_loadu_si512(&perms[16 * i]), v));
    out += __builtin_popcount(b.masks[i]);
  }
}
template <class F> double med(F f) {
  std::vector<double> ts;
  for (int r = 0; r < 11; ++r) { auto a = std::chrono::steady_clock::now(); f(); ts.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - a).count()); }
  std::sort(ts.begin(), ts.end()); return ts[5];
}
int main() {
  std::vector<float> T(N * D), S(N * K), G(N * K), buf(K + 16), Tg(N * K);
  std::mt19937 rng(0); std::normal_distribution<float> nd;
  for (auto& x : T) x = nd(rng); for (auto& x : S) x = nd(rng); for (auto& x : G) x = 1;
  std::vector<int64_t> cols(D); for (int64_t i = 0; i < D; ++i) cols[i] = i;
  std::shuffle(cols.begin(), cols.end(), rng); cols.resize(K); std::sort(cols.begin(), cols.end());
  Blocks b;
  for (auto c : cols) { int64_t st = c / 16 * 16; if (b.starts.empty() || b.starts.back() != st) { b.starts.push_back(st); b.masks.push_back(0); } b.masks.back() |= 1u << (c - st); }
  for (size_t i = 0; i < b.starts.size(); ++i) { alignas(64) int idx[16] = {0}; int c = 0; for (int l = 0; l < 16; ++l) if (b.masks[i] >> l & 1) idx[c++] = l; perms.insert(perms.end(), idx, idx + 16); }
  printf("blocks %zu\n", b.starts.size());
  volatile float sink = 0;
  double g = med([&] { for (int64_t n = 0; n < N; ++n) compress_row(&T[n * D], b, buf.data()); sink = buf[3]; });
  double u = med([&] { for (int64_t n = 0; n < N; ++n) unmasked_compress(&T[n * D], b, buf.data()); sink = buf[3]; });
  double mn = med([&] { for (int64_t n = 0; n < N; ++n) masked_nocompress(&T[n * D], b, buf.data()); sink = buf[3]; });
  double up = med([&] { for (int64_t n = 0; n < N; ++n) unmasked_permute(&T[n * D], b, buf.data()); sink = buf[3]; });
  printf("unmasked load + compress %.2f\nmasked load, no compress %.2f\nunmasked load + permutexvar %.2f\n", u, mn, up);
  double gt = med([&] { for (int64_t n = 0; n < N; ++n) compress_row(&T[n * D], b, &Tg[n * K]); });
  double a = med([&] { float s = 0; for (int64_t n = 0; n < N; ++n) s += mse_row(&S[n * K], &Tg[n * K], 1e-3f, &G[n * K]); sink = s; });
  double a2 = med([&] { float s = 0; for (int64_t n = 0; n < N; ++n) s += mse_row(&S[n * K], buf.data(), 1e-3f, &G[n * K]); sink = s; });
  double both = med([&] { float s = 0; for (int64_t n = 0; n < N; ++n) { compress_row(&T[n * D], b, buf.data()); s += mse_row(&S[n * K], buf.data(), 1e-3f, &G[n * K]); } sink = s; });
  printf("gather only (into one buffer) %.2f ms\ngather into [N,K] %.2f ms\nmse_row from [N,K] %.2f ms\nmse_row from one hot buffer %.2f ms\nboth (the kernel) %.2f ms\n", g, gt, a, a2, both);
}
