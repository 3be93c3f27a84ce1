#include "runtime/backend/cpu/host_gemv.h"

#include <algorithm>
#include <cstring>
#include <vector>

#include "runtime/backend/cpu/cpu_backend.h"
#include "runtime/core/dtype.h"
#include "runtime/core/quant.h"
#include "runtime/core/quant_format.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define EF_HOST_GEMV_X86 1
#if !defined(__clang__)
// GCC 12 reports the intrinsics' own _mm512_undefined_ps() placeholders as maybe uninitialized.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#endif
#endif

namespace ef::runtime {
namespace {

#ifdef EF_HOST_GEMV_X86
#define EF_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,f16c,fma")))

EF_AVX512 inline __m512 Bf16x16(const void* p) {
  const __m256i h = _mm256_loadu_si256(static_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

// Every kernel below computes R weight rows [j, j + R) against M rows of x at once: each 16-value
// chunk of x is loaded once for the R weight rows (x, up to 4 x 57 KB for Mixtral's down
// projection, is read from L2 once per R rows rather than once per row), and the R x M
// accumulators give the fused multiply-adds independent chains.
constexpr int RowsAtOnce(int m) { return m <= 2 ? 4 : 2; }

template <int M, int R>
EF_AVX512 void RowsFloat(const float* x, int64_t k, const Weight& w, float* y, int64_t n, int64_t j) {
  const bool bf16 = w.dtype == DType::kBF16;
  __m512 acc[R][M];
  for (int r = 0; r < R; ++r)
    for (int i = 0; i < M; ++i) acc[r][i] = _mm512_setzero_ps();
  const auto* wb = static_cast<const uint16_t*>(w.data) + j * k;
  const float* wf = static_cast<const float*>(w.data) + j * k;
  for (int64_t c = 0; c < k; c += 16) {
    __m512 xv[M];
    for (int i = 0; i < M; ++i) xv[i] = _mm512_loadu_ps(x + i * k + c);
    for (int r = 0; r < R; ++r) {
      const __m512 wv = bf16 ? Bf16x16(wb + r * k + c) : _mm512_loadu_ps(wf + r * k + c);
      for (int i = 0; i < M; ++i) acc[r][i] = _mm512_fmadd_ps(xv[i], wv, acc[r][i]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int i = 0; i < M; ++i) y[i * n + j + r] = _mm512_reduce_add_ps(acc[r][i]);
}

// Q8G: per group of 64, sum q*x in fp32, then acc += scale * that.
template <int M, int R>
EF_AVX512 void RowsQ8(const float* x, int64_t k, const Weight& w, float* y, int64_t n, int64_t j) {
  const QuantFormat f = kQ8Format;
  const int64_t groups = k / f.group;
  const int8_t* q = static_cast<const int8_t*>(w.data) + j * k;
  const auto* p =
      reinterpret_cast<const uint16_t*>(static_cast<const std::byte*>(w.data) + f.params_offset(w.rows, k)) +
      j * groups;
  __m512 acc[R][M];
  for (int r = 0; r < R; ++r)
    for (int i = 0; i < M; ++i) acc[r][i] = _mm512_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    __m512 d[R][M];
    for (int r = 0; r < R; ++r)
      for (int i = 0; i < M; ++i) d[r][i] = _mm512_setzero_ps();
    for (int s = 0; s < 4; ++s) {
      const int64_t c = g * 64 + 16 * s;
      __m512 xv[M];
      for (int i = 0; i < M; ++i) xv[i] = _mm512_loadu_ps(x + i * k + c);
      for (int r = 0; r < R; ++r) {
        const __m512 wv =
            _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + r * k + c))));
        for (int i = 0; i < M; ++i) d[r][i] = _mm512_fmadd_ps(xv[i], wv, d[r][i]);
      }
    }
    for (int r = 0; r < R; ++r) {
      const __m512 scale = _mm512_set1_ps(_cvtsh_ss(p[r * groups + g]));
      for (int i = 0; i < M; ++i) acc[r][i] = _mm512_fmadd_ps(d[r][i], scale, acc[r][i]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int i = 0; i < M; ++i) y[i * n + j + r] = _mm512_reduce_add_ps(acc[r][i]);
}

// Q4G: a group's 16 possible values q * scale + min (computed as the CPU backend dequantizes:
// fp32 product, then sum) form a 16-entry table; vpermps looks each nibble up directly (it reads
// only an index's low 4 bits). A group's 32 bytes hold element 2i in the low nibble of byte i and
// 2i + 1 in the high one, so the low nibbles dot with x's even elements and the high ones with
// the odd elements: x comes de-interleaved per group (each group's 32 even, then 32 odd elements).
template <int M, int R>
EF_AVX512 void RowsQ4(const float* xs, int64_t k, const Weight& w, float* y, int64_t n, int64_t j) {
  const QuantFormat f = kQ4Format;
  const int64_t groups = k / f.group;
  const uint8_t* q = static_cast<const uint8_t*>(w.data) + j * (k / 2);
  const auto* p =
      reinterpret_cast<const uint16_t*>(static_cast<const std::byte*>(w.data) + f.params_offset(w.rows, k)) +
      j * groups * 2;
  const __m512 iota = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  __m512 acc[R][M];
  for (int r = 0; r < R; ++r)
    for (int i = 0; i < M; ++i) acc[r][i] = _mm512_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    for (int h = 0; h < 2; ++h) {  // bytes 16h..16h+15: even elements 32h.., odd elements 32h+1..
      __m512 xe[M], xo[M];
      for (int i = 0; i < M; ++i) {
        xe[i] = _mm512_loadu_ps(xs + i * k + g * 64 + 16 * h);
        xo[i] = _mm512_loadu_ps(xs + i * k + g * 64 + 32 + 16 * h);
      }
      for (int r = 0; r < R; ++r) {
        const uint16_t* pr = p + r * groups * 2;
        const __m512 table = _mm512_add_ps(_mm512_mul_ps(iota, _mm512_set1_ps(_cvtsh_ss(pr[2 * g]))),
                                           _mm512_set1_ps(_cvtsh_ss(pr[2 * g + 1])));
        const __m512i b =
            _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + r * (k / 2) + g * 32 + 16 * h)));
        const __m512 lo = _mm512_permutexvar_ps(b, table), hi = _mm512_permutexvar_ps(_mm512_srli_epi32(b, 4), table);
        for (int i = 0; i < M; ++i) acc[r][i] = _mm512_fmadd_ps(xo[i], hi, _mm512_fmadd_ps(xe[i], lo, acc[r][i]));
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int i = 0; i < M; ++i) y[i * n + j + r] = _mm512_reduce_add_ps(acc[r][i]);
}

template <int M, int R>
void RowBlock(const float* x, int64_t k, const Weight& w, float* y, int64_t n, int64_t j) {
  switch (w.dtype) {
    case DType::kQ8:
      return RowsQ8<M, R>(x, k, w, y, n, j);
    case DType::kQ4:
      return RowsQ4<M, R>(x, k, w, y, n, j);
    default:
      return RowsFloat<M, R>(x, k, w, y, n, j);
  }
}

// Weight rows [begin, end): blocks of RowsAtOnce(M), then one at a time.
template <int M>
void RowsVector(const float* x, int64_t k, const Weight& w, float* y, int64_t n, int64_t begin, int64_t end) {
  constexpr int R = RowsAtOnce(M);
  int64_t j = begin;
  for (; j + R <= end; j += R) RowBlock<M, R>(x, k, w, y, n, j);
  for (; j < end; ++j) RowBlock<M, 1>(x, k, w, y, n, j);
}

bool HaveAvx512() {
  // F16C is not a feature name clang's __builtin_cpu_supports knows; every AVX-512 CPU has it.
  static const bool have = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("fma");
  return have;
}
#endif

}  // namespace

bool HostGemvVectorized(const Weight& w) {
#ifdef EF_HOST_GEMV_X86
  const bool dtype_ok =
      w.dtype == DType::kF32 || w.dtype == DType::kBF16 || w.dtype == DType::kQ8 || w.dtype == DType::kQ4;
  return HaveAvx512() && dtype_ok && w.cols % 64 == 0 && w.cols > 0;
#else
  (void)w;
  return false;
#endif
}

void HostGemv(ThreadPool& pool, const float* x, int64_t m, const Weight& w, float* y) {
  const int64_t n = w.rows, k = w.cols;
  if (m <= 0 || n <= 0) return;
  if (!HostGemvVectorized(w)) {
    CpuBackend(&pool).Gemm(x, m, w, nullptr, y, /*accumulate=*/false);  // the exact path
    return;
  }
#ifdef EF_HOST_GEMV_X86
  // Q4G reads x de-interleaved per group of 64: its 32 even elements, then its 32 odd ones.
  std::vector<float> xs;
  if (w.dtype == DType::kQ4) {
    xs.resize(static_cast<size_t>(m * k));
    for (int64_t i = 0; i < m; ++i)
      for (int64_t c = 0; c < k; c += 64)
        for (int e = 0; e < 32; ++e) {
          xs[i * k + c + e] = x[i * k + c + 2 * e];
          xs[i * k + c + 32 + e] = x[i * k + c + 2 * e + 1];
        }
    x = xs.data();
  }
  for (int64_t r0 = 0; r0 < m; r0 += kHostGemvMaxRows) {
    const int rows = static_cast<int>(std::min<int64_t>(kHostGemvMaxRows, m - r0));
    const float* xb = x + r0 * k;
    float* yb = y + r0 * n;
    pool.ParallelFor(
        n,
        [&](int64_t begin, int64_t end) {
          switch (rows) {
            case 1:
              return RowsVector<1>(xb, k, w, yb, n, begin, end);
            case 2:
              return RowsVector<2>(xb, k, w, yb, n, begin, end);
            case 3:
              return RowsVector<3>(xb, k, w, yb, n, begin, end);
            default:
              return RowsVector<4>(xb, k, w, yb, n, begin, end);
          }
        },
        /*min_chunk=*/64);
  }
#endif
}

}  // namespace ef::runtime
