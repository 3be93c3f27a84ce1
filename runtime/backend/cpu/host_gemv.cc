#include "runtime/backend/cpu/host_gemv.h"

#include <algorithm>
#include <cstring>
#include <vector>

#include "runtime/core/dtype.h"
#include "runtime/core/quant.h"
#include "runtime/core/quant_format.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define EF_HOST_GEMV_X86 1
// GCC 12 reports the intrinsics' own _mm512_undefined_ps() placeholders as maybe uninitialized.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

namespace ef::runtime {
namespace {

// The exact path: the CPU backend's row conversion and 8-lane dot product.
float DotExact(const float* a, const float* b, int64_t n) {
  float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int j = 0; j < 8; ++j) acc[j] += a[i + j] * b[i + j];
  float s = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

void RowsExact(const float* x, int64_t m, const Weight& w, float* y, int64_t begin, int64_t end) {
  const int64_t n = w.rows, k = w.cols;
  std::vector<float> row(static_cast<size_t>(k));
  const size_t esz = IsQuantized(w.dtype) ? 0 : DTypeSize(w.dtype);
  for (int64_t j = begin; j < end; ++j) {
    const float* wr = row.data();
    if (IsQuantized(w.dtype)) {
      DequantizeRow(w.dtype, w.data, w.rows, k, j, row.data());
    } else if (w.dtype == DType::kF32) {
      wr = static_cast<const float*>(w.data) + j * k;
    } else {
      ConvertToF32(w.dtype, static_cast<const std::byte*>(w.data) + static_cast<size_t>(j * k) * esz, row.data(),
                   static_cast<size_t>(k));
    }
    for (int64_t i = 0; i < m; ++i) y[i * n + j] = DotExact(x + i * k, wr, k);
  }
}

#ifdef EF_HOST_GEMV_X86
#define EF_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,f16c,fma")))

EF_AVX512 inline __m512 Bf16x16(const void* p) {
  const __m256i h = _mm256_loadu_si256(static_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

// Float rows: 32 values per step in two accumulators per row of x.
template <int M>
EF_AVX512 void RowsFloat(const float* x, int64_t k, const Weight& w, float* y, int64_t n, int64_t begin, int64_t end) {
  const bool bf16 = w.dtype == DType::kBF16;
  for (int64_t j = begin; j < end; ++j) {
    __m512 a0[M], a1[M];
    for (int i = 0; i < M; ++i) a0[i] = a1[i] = _mm512_setzero_ps();
    const auto* wb = static_cast<const uint16_t*>(w.data) + j * k;
    const float* wf = static_cast<const float*>(w.data) + j * k;
    for (int64_t c = 0; c < k; c += 32) {
      const __m512 w0 = bf16 ? Bf16x16(wb + c) : _mm512_loadu_ps(wf + c);
      const __m512 w1 = bf16 ? Bf16x16(wb + c + 16) : _mm512_loadu_ps(wf + c + 16);
      for (int i = 0; i < M; ++i) {
        a0[i] = _mm512_fmadd_ps(_mm512_loadu_ps(x + i * k + c), w0, a0[i]);
        a1[i] = _mm512_fmadd_ps(_mm512_loadu_ps(x + i * k + c + 16), w1, a1[i]);
      }
    }
    for (int i = 0; i < M; ++i) y[i * n + j] = _mm512_reduce_add_ps(_mm512_add_ps(a0[i], a1[i]));
  }
}

// Q8G: per group of 64, sum q*x in fp32, then acc += scale * that.
template <int M>
EF_AVX512 void RowsQ8(const float* x, int64_t k, const Weight& w, float* y, int64_t n, int64_t begin, int64_t end) {
  const QuantFormat f = kQ8Format;
  const auto* values = static_cast<const int8_t*>(w.data);
  const auto* params =
      reinterpret_cast<const uint16_t*>(static_cast<const std::byte*>(w.data) + f.params_offset(w.rows, k));
  const int64_t groups = k / f.group;
  for (int64_t j = begin; j < end; ++j) {
    __m512 acc[M];
    for (int i = 0; i < M; ++i) acc[i] = _mm512_setzero_ps();
    const int8_t* q = values + j * k;
    const uint16_t* p = params + j * groups;
    for (int64_t g = 0; g < groups; ++g) {
      const int64_t c = g * 64;
      __m512 wv[4];
      for (int s = 0; s < 4; ++s)
        wv[s] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + c + 16 * s))));
      const __m512 scale = _mm512_set1_ps(_cvtsh_ss(p[g]));
      for (int i = 0; i < M; ++i) {
        const float* xi = x + i * k + c;
        __m512 d = _mm512_mul_ps(_mm512_loadu_ps(xi), wv[0]);
        d = _mm512_fmadd_ps(_mm512_loadu_ps(xi + 16), wv[1], d);
        d = _mm512_fmadd_ps(_mm512_loadu_ps(xi + 32), wv[2], d);
        d = _mm512_fmadd_ps(_mm512_loadu_ps(xi + 48), wv[3], d);
        acc[i] = _mm512_fmadd_ps(d, scale, acc[i]);
      }
    }
    for (int i = 0; i < M; ++i) y[i * n + j] = _mm512_reduce_add_ps(acc[i]);
  }
}

// Q4G: a group's 16 possible values q * scale + min (computed as the CPU backend dequantizes:
// fp32 product, then sum) form a 16-entry table; vpermps looks each nibble up directly (it reads
// only an index's low 4 bits). A group's 32 bytes hold element 2i in the low nibble of byte i and
// 2i + 1 in the high one, so the low nibbles dot with x's even elements and the high ones with
// the odd elements: x comes de-interleaved per group (xs: [M][k], each group's 32 even then 32
// odd elements).
template <int M>
EF_AVX512 void RowsQ4(const float* xs, int64_t k, const Weight& w, float* y, int64_t n, int64_t begin, int64_t end) {
  const QuantFormat f = kQ4Format;
  const auto* values = static_cast<const uint8_t*>(w.data);
  const auto* params =
      reinterpret_cast<const uint16_t*>(static_cast<const std::byte*>(w.data) + f.params_offset(w.rows, k));
  const int64_t groups = k / f.group;
  const __m512 iota = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  for (int64_t j = begin; j < end; ++j) {
    __m512 acc[M];
    for (int i = 0; i < M; ++i) acc[i] = _mm512_setzero_ps();
    const uint8_t* q = values + j * (k / 2);
    const uint16_t* p = params + j * groups * 2;
    for (int64_t g = 0; g < groups; ++g) {
      const __m512 table = _mm512_add_ps(_mm512_mul_ps(iota, _mm512_set1_ps(_cvtsh_ss(p[2 * g]))),
                                         _mm512_set1_ps(_cvtsh_ss(p[2 * g + 1])));
      __m512 wv[4];  // even elements 0..30, 32..62, then odd 1..31, 33..63
      for (int h = 0; h < 2; ++h) {
        const __m512i b =
            _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + g * 32 + 16 * h)));
        wv[h] = _mm512_permutexvar_ps(b, table);
        wv[2 + h] = _mm512_permutexvar_ps(_mm512_srli_epi32(b, 4), table);
      }
      const int64_t c = g * 64;
      for (int i = 0; i < M; ++i) {
        const float* xi = xs + i * k + c;
        __m512 a = acc[i];
        a = _mm512_fmadd_ps(_mm512_loadu_ps(xi), wv[0], a);
        a = _mm512_fmadd_ps(_mm512_loadu_ps(xi + 16), wv[1], a);
        a = _mm512_fmadd_ps(_mm512_loadu_ps(xi + 32), wv[2], a);
        a = _mm512_fmadd_ps(_mm512_loadu_ps(xi + 48), wv[3], a);
        acc[i] = a;
      }
    }
    for (int i = 0; i < M; ++i) y[i * n + j] = _mm512_reduce_add_ps(acc[i]);
  }
}

template <int M>
void RowsVector(const float* x, int64_t k, const Weight& w, float* y, int64_t n, int64_t begin,
                int64_t end) {
  switch (w.dtype) {
    case DType::kQ8: return RowsQ8<M>(x, k, w, y, n, begin, end);
    case DType::kQ4: return RowsQ4<M>(x, k, w, y, n, begin, end);
    default: return RowsFloat<M>(x, k, w, y, n, begin, end);
  }
}

bool HaveAvx512() {
  static const bool have = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("f16c") &&
                           __builtin_cpu_supports("fma");
  return have;
}
#endif

}  // namespace

bool HostGemvVectorized(const Weight& w) {
#ifdef EF_HOST_GEMV_X86
  const bool dtype_ok = w.dtype == DType::kF32 || w.dtype == DType::kBF16 || w.dtype == DType::kQ8 ||
                        w.dtype == DType::kQ4;
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
    pool.ParallelFor(n, [&](int64_t begin, int64_t end) { RowsExact(x, m, w, y, begin, end); }, /*min_chunk=*/16);
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
            case 1: return RowsVector<1>(xb, k, w, yb, n, begin, end);
            case 2: return RowsVector<2>(xb, k, w, yb, n, begin, end);
            case 3: return RowsVector<3>(xb, k, w, yb, n, begin, end);
            default: return RowsVector<4>(xb, k, w, yb, n, begin, end);
          }
        },
        /*min_chunk=*/64);
  }
#endif
}

}  // namespace ef::runtime
