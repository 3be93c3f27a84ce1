#include "runtime/backend/cpu/host_gemv.h"

#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "runtime/backend/cpu/cpu_backend.h"
#include "runtime/core/block_scaled.h"
#include "runtime/core/dtype.h"
#include "runtime/core/logging.h"
#include "runtime/core/packed_bf16.h"
#include "runtime/core/packed_bf16_format.h"
#include "runtime/core/params.h"
#include "runtime/core/quant.h"
#include "runtime/core/quant_format.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <cpuid.h>
#include <immintrin.h>
#define EF_HOST_GEMV_X86 1
#if !defined(__clang__)
// GCC 12 reports the intrinsics' own _mm512_undefined_ps() placeholders as maybe uninitialized.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#endif
#endif

EF_PARAM(HostGemvAmx, bool, "EF_HOST_GEMV_AMX", true,
         "experts computed on the host: bf16 weights on AMX tiles where the CPU has them (0: AVX-512 FMAs)");
EF_PARAM(HostGemvPieces, int64_t, "EF_HOST_GEMV_PIECES", 4,
         "experts computed on the host: pieces per pool thread of each matrix's rows, handed to the "
         "threads as they get free (1: one fixed share per thread)");
EF_PARAM(HostGemvInt8X, std::string, "EF_HOST_GEMV_INT8_X", "int4",
         "experts computed on the host, which quantized weights take x rounded to int8 per group of 64 "
         "(AVX-512 VNNI): int4, all (int8 too) or none");

namespace ef::runtime {
namespace {

// Each call's rows go out in several pieces per pool thread, to whichever thread is free: an
// expert computed beside a running engine shares the CPUs with other threads (the engine's, the
// CUDA driver's), and with one fixed chunk per thread a call waits for the one that shared.
int PiecesPerThread() {
  static const int pieces = static_cast<int>(std::clamp<int64_t>(params::HostGemvPieces(), 1, 64));
  return pieces;
}

#ifdef EF_HOST_GEMV_X86
#define EF_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,f16c,fma")))

EF_AVX512 inline __m512 Bf16x16(const void* p) {
  const __m256i h = _mm256_loadu_si256(static_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

#endif

// The columns a vector kernel steps by (a block's columns must start and end on them): 64, and a
// PBF16 weight's group of 128.
constexpr int64_t VectorColumns(DType t) { return t == DType::kPbf16 ? PackedBf16Format::kGroup : 64; }

// One call's operands as the kernels read them: the block [row_begin, row_end) x [col_begin,
// col_end) of w against x[m, k] (k = col_end - col_begin), into y[m, n] (n = row_end - row_begin).
struct Operands {
  const float* x;
  int64_t k;  // columns of the block (x's row length)
  const Weight* w;
  int64_t col_begin, row_begin;
  float* y;
  int64_t n;  // rows of the block (y's row length)
};

#ifdef EF_HOST_GEMV_X86
// Every kernel below computes R weight rows [j, j + R) against M rows of x at once: each 16-value
// chunk of x is loaded once for the R weight rows (x, up to 4 x 57 KB for Mixtral's down
// projection, is read from L2 once per R rows rather than once per row), and the R x M
// accumulators give the fused multiply-adds independent chains. j counts weight rows from the
// block's first; a weight row is w.cols values long whatever columns the block takes.
constexpr int RowsAtOnce(int m) { return m <= 2 ? 4 : 2; }

template <int M, int R>
EF_AVX512 void RowsFloat(const Operands& o, int64_t j) {
  const float* x = o.x;
  const int64_t k = o.k, ld = o.w->cols, first = (o.row_begin + j) * ld + o.col_begin;
  const bool bf16 = o.w->dtype == DType::kBF16;
  __m512 acc[R][M];
  for (int r = 0; r < R; ++r)
    for (int i = 0; i < M; ++i) acc[r][i] = _mm512_setzero_ps();
  const auto* wb = static_cast<const uint16_t*>(o.w->data) + first;
  const float* wf = static_cast<const float*>(o.w->data) + first;
  for (int64_t c = 0; c < k; c += 16) {
    __m512 xv[M];
    for (int i = 0; i < M; ++i) xv[i] = _mm512_loadu_ps(x + i * k + c);
    for (int r = 0; r < R; ++r) {
      const __m512 wv = bf16 ? Bf16x16(wb + r * ld + c) : _mm512_loadu_ps(wf + r * ld + c);
      for (int i = 0; i < M; ++i) acc[r][i] = _mm512_fmadd_ps(xv[i], wv, acc[r][i]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int i = 0; i < M; ++i) o.y[i * o.n + j + r] = _mm512_reduce_add_ps(acc[r][i]);
}

// Q8G: per group of 64, sum q*x in fp32, then acc += scale * that.
template <int M, int R>
EF_AVX512 void RowsQ8(const Operands& o, int64_t j) {
  const QuantFormat f = kQ8Format;
  const float* x = o.x;
  const Weight& w = *o.w;
  const int64_t k = o.k, ld = w.cols, groups = k / f.group, ldg = ld / f.group, row = o.row_begin + j;
  const int8_t* q = static_cast<const int8_t*>(w.data) + row * ld + o.col_begin;
  const auto* p =
      reinterpret_cast<const uint16_t*>(static_cast<const std::byte*>(w.data) + f.params_offset(w.rows, ld)) +
      row * ldg + o.col_begin / f.group;
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
            _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + r * ld + c))));
        for (int i = 0; i < M; ++i) d[r][i] = _mm512_fmadd_ps(xv[i], wv, d[r][i]);
      }
    }
    for (int r = 0; r < R; ++r) {
      const __m512 scale = _mm512_set1_ps(_cvtsh_ss(p[r * ldg + g]));
      for (int i = 0; i < M; ++i) acc[r][i] = _mm512_fmadd_ps(d[r][i], scale, acc[r][i]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int i = 0; i < M; ++i) o.y[i * o.n + j + r] = _mm512_reduce_add_ps(acc[r][i]);
}

// Q4G: a group's 16 possible values q * scale + min (computed as the CPU backend dequantizes:
// fp32 product, then sum) form a 16-entry table; vpermps looks each nibble up directly (it reads
// only an index's low 4 bits). A group's 32 bytes hold element 2i in the low nibble of byte i and
// 2i + 1 in the high one, so the low nibbles dot with x's even elements and the high ones with
// the odd elements: x comes de-interleaved per group (each group's 32 even, then 32 odd elements).
template <int M, int R>
EF_AVX512 void RowsQ4(const Operands& o, int64_t j) {
  const QuantFormat f = kQ4Format;
  const float* xs = o.x;
  const Weight& w = *o.w;
  const int64_t k = o.k, ld = w.cols, groups = k / f.group, ldg = ld / f.group, row = o.row_begin + j;
  const uint8_t* q = static_cast<const uint8_t*>(w.data) + row * (ld / 2) + o.col_begin / 2;
  const auto* p =
      reinterpret_cast<const uint16_t*>(static_cast<const std::byte*>(w.data) + f.params_offset(w.rows, ld)) +
      (row * ldg + o.col_begin / f.group) * 2;
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
        const uint16_t* pr = p + r * ldg * 2;
        const __m512 table = _mm512_add_ps(_mm512_mul_ps(iota, _mm512_set1_ps(_cvtsh_ss(pr[2 * g]))),
                                           _mm512_set1_ps(_cvtsh_ss(pr[2 * g + 1])));
        const __m512i b =
            _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + r * (ld / 2) + g * 32 + 16 * h)));
        const __m512 lo = _mm512_permutexvar_ps(b, table), hi = _mm512_permutexvar_ps(_mm512_srli_epi32(b, 4), table);
        for (int i = 0; i < M; ++i) acc[r][i] = _mm512_fmadd_ps(xo[i], hi, _mm512_fmadd_ps(xe[i], lo, acc[r][i]));
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int i = 0; i < M; ++i) o.y[i * o.n + j + r] = _mm512_reduce_add_ps(acc[r][i]);
}

// A PBF16 group's 16 exponents as fp32 exponent fields (bits 23..30), by code: base - c for
// c < 15, 0 for code 15 (zeros, subnormals, exceptions). vpermd looks codes up in it (reading only
// each index's low 4 bits, so a byte of two codes needs no mask for its low nibble).
EF_AVX512 inline __m512i Pbf16ExponentTable(int base) {
  const __m512i iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512i e = _mm512_maskz_sub_epi32(0x7fff, _mm512_set1_epi32(base), iota);
  return _mm512_slli_epi32(e, 23);
}

// 16 PBF16 values as fp32 from their 16 low bytes (sign << 7 | mantissa) at `p` and their codes
// (one per lane, in its low 4 bits): one vpshufb puts each low byte in bytes 2 and 3 of its lane
// (of the 16 bytes broadcast to every 128-bit lane), so bit 31 holds the sign and bits 16..22 the
// mantissa; one vpternlogd keeps those (mask 0x807f0000) and ors in the exponent the table gives
// for the code (bits 23..30). Three vector operations per 16 values besides the load.
EF_AVX512 inline __m512 DecodePbf16(const uint8_t* p, __m512i code, __m512i table) {
  const __m512i spread = _mm512_set_epi8(15, 15, -1, -1, 14, 14, -1, -1, 13, 13, -1, -1, 12, 12, -1, -1,  //
                                         11, 11, -1, -1, 10, 10, -1, -1, 9, 9, -1, -1, 8, 8, -1, -1,      //
                                         7, 7, -1, -1, 6, 6, -1, -1, 5, 5, -1, -1, 4, 4, -1, -1,          //
                                         3, 3, -1, -1, 2, 2, -1, -1, 1, 1, -1, -1, 0, 0, -1, -1);
  const __m512i low =
      _mm512_shuffle_epi8(_mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), spread);
  // (low & mask) | exponent: ternary-logic table 0xec over (low, exponent, mask).
  return _mm512_castsi512_ps(_mm512_ternarylogic_epi32(low, _mm512_permutexvar_epi32(code, table),
                                                       _mm512_set1_epi32(static_cast<int>(0x807f0000u)), 0xec));
}

// PBF16 (runtime/core/packed_bf16_format.h): each value's bf16 bits rebuilt in registers from its
// low byte, its nibble and its group's base: codes byte q of a group holds values q (low nibble)
// and 64 + q (high), so a 16-byte load of codes serves 16 values of each half-group. An exception
// decodes to +0 and is added after the row's sum (its row's entries, in the block's columns).
template <int M, int R>
EF_AVX512 void RowsPbf16(const Operands& o, int64_t j) {
  using F = PackedBf16Format;
  const float* x = o.x;
  const Weight& w = *o.w;
  const int64_t k = o.k, ld = w.cols, groups = k / F::kGroup, ldg = ld / F::kGroup, row = o.row_begin + j;
  const auto* block = static_cast<const uint8_t*>(w.data);
  const uint8_t* low = block + row * ld + o.col_begin;
  const uint8_t* codes = block + F::codes_offset(w.rows, ld) + (row * ld + o.col_begin) / 2;
  const uint8_t* base = block + F::base_offset(w.rows, ld) + row * ldg + o.col_begin / F::kGroup;
  __m512 acc[R][M];
  for (int r = 0; r < R; ++r)
    for (int i = 0; i < M; ++i) acc[r][i] = _mm512_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    __m512i b[R];
    for (int r = 0; r < R; ++r) b[r] = Pbf16ExponentTable(base[r * ldg + g]);
    for (int q = 0; q < F::kGroup / 2; q += 16) {
      const int64_t c = g * F::kGroup + q;
      __m512 xa[M], xb[M];
      for (int i = 0; i < M; ++i) {
        xa[i] = _mm512_loadu_ps(x + i * k + c);
        xb[i] = _mm512_loadu_ps(x + i * k + c + F::kGroup / 2);
      }
      for (int r = 0; r < R; ++r) {
        const __m512i cc = _mm512_cvtepu8_epi32(
            _mm_loadu_si128(reinterpret_cast<const __m128i*>(codes + r * ld / 2 + g * F::kGroup / 2 + q)));
        const uint8_t* lr = low + r * ld + c;
        const __m512 wa = DecodePbf16(lr, cc, b[r]);
        const __m512 wb = DecodePbf16(lr + F::kGroup / 2, _mm512_srli_epi32(cc, 4), b[r]);
        for (int i = 0; i < M; ++i) acc[r][i] = _mm512_fmadd_ps(xb[i], wb, _mm512_fmadd_ps(xa[i], wa, acc[r][i]));
      }
    }
  }
  const uint8_t* row_end = block + F::row_end_offset(w.rows, ld);
  const uint8_t* exceptions = block + F::exceptions_offset(w.rows, ld);
  for (int r = 0; r < R; ++r) {
    uint32_t first = 0, last;
    if (row + r > 0) std::memcpy(&first, row_end + 4 * (row + r - 1), 4);
    std::memcpy(&last, row_end + 4 * (row + r), 4);
    for (int i = 0; i < M; ++i) {
      float s = _mm512_reduce_add_ps(acc[r][i]);
      for (uint32_t e = first; e < last; ++e) {
        uint32_t entry;
        std::memcpy(&entry, exceptions + 4 * e, 4);
        const int64_t col = static_cast<int64_t>(entry & 0xffff) - o.col_begin;
        if (col >= 0 && col < k) s += x[i * k + col] * Bf16ToF32(static_cast<uint16_t>(entry >> 16));
      }
      o.y[i * o.n + j + r] = s;
    }
  }
}

template <int M, int R>
void RowBlock(const Operands& o, int64_t j) {
  switch (o.w->dtype) {
    case DType::kQ8:
      return RowsQ8<M, R>(o, j);
    case DType::kQ4:
      return RowsQ4<M, R>(o, j);
    case DType::kPbf16:
      return RowsPbf16<M, R>(o, j);
    default:
      return RowsFloat<M, R>(o, j);
  }
}

// Block rows [begin, end): blocks of RowsAtOnce(M), then one at a time.
template <int M>
void RowsVector(const Operands& o, int64_t begin, int64_t end) {
  constexpr int R = RowsAtOnce(M);
  int64_t j = begin;
  for (; j + R <= end; j += R) RowBlock<M, R>(o, j);
  for (; j < end; ++j) RowBlock<M, 1>(o, j);
}

// f(std::integral_constant<int, M>{}) for M = rows, 1 to kHostGemvMaxRows.
template <typename F>
void WithRows(int rows, F&& f) {
  switch (rows) {
    case 1:
      return f(std::integral_constant<int, 1>{});
    case 2:
      return f(std::integral_constant<int, 2>{});
    case 3:
      return f(std::integral_constant<int, 3>{});
    default:
      return f(std::integral_constant<int, 4>{});
  }
}

bool HaveAvx512() {
  // F16C is not a feature name clang's __builtin_cpu_supports knows; every AVX-512 CPU has it.
  static const bool have = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("fma");
  return have;
}

// ---- x in int8: W8A8 / W4A8 with vpdpbusd (see host_gemv.h) ----

#define EF_VNNI __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,f16c,fma")))

// x[m, k] rounded per group of 64 as RoundToInt8Groups defines it, laid out for the kernels.
// q: kQ4 takes each group's 32 even elements, then its 32 odd ones (the order the nibbles unpack
// in); kQ8 stores q + 128 (vpdpbusd multiplies unsigned by signed bytes, and the weight is the
// signed side). scale[i, g] = a / 127; sum[i, g] = scale * sum q (kQ4's min term).
// Below this a group of x is rounded to zeros (see RoundToInt8Groups).
constexpr float kTinyGroup = 1e-30f;

struct Int8Rows {
  std::vector<uint8_t> q;
  std::vector<float> scale, sum;
};

EF_VNNI void PrepareInt8Rows(const float* x, int64_t m, int64_t k, bool q4, Int8Rows* out) {
  const int64_t groups = k / 64;
  out->q.resize(static_cast<size_t>(m * k));
  out->scale.resize(static_cast<size_t>(m * groups));
  out->sum.resize(out->scale.size());
  const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  const __m512i odd = _mm512_add_epi32(even, _mm512_set1_epi32(1));
  for (int64_t i = 0; i < m; ++i)
    for (int64_t g = 0; g < groups; ++g) {
      const float* xg = x + i * k + g * 64;
      uint8_t* qg = out->q.data() + i * k + g * 64;
      __m512 v[4];
      for (int s = 0; s < 4; ++s) v[s] = _mm512_loadu_ps(xg + 16 * s);
      const float a = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_max_ps(_mm512_abs_ps(v[0]), _mm512_abs_ps(v[1])),
                                                         _mm512_max_ps(_mm512_abs_ps(v[2]), _mm512_abs_ps(v[3]))));
      const size_t at = static_cast<size_t>(i * groups + g);
      // A non-finite value (|v| > FLT_MAX, or unordered: NaN) makes the group scale its products by
      // NaN, so its row's outputs are NaN, as the fp32 product's would be. A group whose largest
      // value is below kTinyGroup counts as zeros (127 / a would overflow).
      __mmask16 bad = 0;
      for (int s = 0; s < 4; ++s)
        bad |= _mm512_cmp_ps_mask(_mm512_abs_ps(v[s]), _mm512_set1_ps(std::numeric_limits<float>::max()), _CMP_NLE_UQ);
      if (bad || a < kTinyGroup) {
        std::memset(qg, q4 ? 0 : 128, 64);
        out->scale[at] = out->sum[at] = bad ? std::numeric_limits<float>::quiet_NaN() : 0.f;
        continue;
      }
      const __m512 inv = _mm512_set1_ps(127.f / a);
      __m512i q[4];
      for (int s = 0; s < 4; ++s) q[s] = _mm512_cvtps_epi32(_mm512_mul_ps(v[s], inv));
      const int qsum =
          _mm512_reduce_add_epi32(_mm512_add_epi32(_mm512_add_epi32(q[0], q[1]), _mm512_add_epi32(q[2], q[3])));
      __m128i b[4];
      if (q4) {
        b[0] = _mm512_cvtsepi32_epi8(_mm512_permutex2var_epi32(q[0], even, q[1]));
        b[1] = _mm512_cvtsepi32_epi8(_mm512_permutex2var_epi32(q[2], even, q[3]));
        b[2] = _mm512_cvtsepi32_epi8(_mm512_permutex2var_epi32(q[0], odd, q[1]));
        b[3] = _mm512_cvtsepi32_epi8(_mm512_permutex2var_epi32(q[2], odd, q[3]));
      } else {
        const __m128i bias = _mm_set1_epi8(static_cast<char>(0x80));
        for (int s = 0; s < 4; ++s) b[s] = _mm_xor_si128(_mm512_cvtsepi32_epi8(q[s]), bias);
      }
      for (int s = 0; s < 4; ++s) _mm_storeu_si128(reinterpret_cast<__m128i*>(qg + 16 * s), b[s]);
      out->scale[at] = a / 127.f;
      out->sum[at] = out->scale[at] * static_cast<float>(qsum);
    }
}

// The operands of an int8-x call: the weight block, and x's rows prepared for it (Int8Rows from
// its row r0: q at r0 * k, scale and sum at r0 * groups).
struct Int8Operands {
  const Operands* o;
  const uint8_t* q;
  const float *scale, *sum;
};

// Per chunk of up to 16 groups, the product of the weight's and x's scales of every (weight row,
// x row, group), so the inner loop broadcasts each from memory (a load, no shuffle).
template <int M, int R>
struct GroupScales {
  alignas(64) float s[R][M][16];
};

// Q4G with x in int8: a group's 32 bytes unpack (mask, shift) into its 32 even then 32 odd
// nibbles, one vpdpbusd multiplies them with x's 64 int8 values into 16 int32 partial sums, and
// the group adds scale_w * scale_x * those; the asymmetric min adds min * sum(x') per group.
template <int M, int R>
EF_VNNI void RowsQ4x8(const Int8Operands& io, int64_t j) {
  const Operands& o = *io.o;
  const Weight& w = *o.w;
  const int64_t k = o.k, ld = w.cols, groups = k / 64, ldg = ld / 64, row = o.row_begin + j;
  const uint8_t* q = static_cast<const uint8_t*>(w.data) + row * (ld / 2) + o.col_begin / 2;
  // Each group's {scale, min} fp16 pair read as one 32-bit word (scale in the low half).
  const auto* p =
      reinterpret_cast<const uint32_t*>(static_cast<const std::byte*>(w.data) + kQ4Format.params_offset(w.rows, ld)) +
      row * ldg + o.col_begin / 64;
  const __m256i low4 = _mm256_set1_epi8(0x0F);
  __m512 acc[R][M];
  for (int r = 0; r < R; ++r)
    for (int i = 0; i < M; ++i) acc[r][i] = _mm512_setzero_ps();
  GroupScales<M, R> gs;
  for (int64_t g0 = 0; g0 < groups; g0 += 16) {
    const int n = static_cast<int>(std::min<int64_t>(16, groups - g0));
    const __mmask16 mask = static_cast<__mmask16>((1u << n) - 1u);
    for (int r = 0; r < R; ++r) {
      const __m512i pr = _mm512_maskz_loadu_epi32(mask, p + r * ldg + g0);
      const __m512 scale = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(pr));
      const __m512 min = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(_mm512_srli_epi32(pr, 16)));
      for (int i = 0; i < M; ++i) {
        const __m512 xs = _mm512_maskz_loadu_ps(mask, io.scale + i * groups + g0);
        const __m512 xsum = _mm512_maskz_loadu_ps(mask, io.sum + i * groups + g0);
        _mm512_store_ps(gs.s[r][i], _mm512_mul_ps(scale, xs));
        acc[r][i] = _mm512_fmadd_ps(min, xsum, acc[r][i]);
      }
    }
    for (int gg = 0; gg < n; ++gg) {
      const int64_t g = g0 + gg;
      __m512i xv[M];
      for (int i = 0; i < M; ++i) xv[i] = _mm512_loadu_si512(io.q + i * k + g * 64);
      for (int r = 0; r < R; ++r) {
        const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + r * (ld / 2) + g * 32));
        const __m512i wq = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_and_si256(b, low4)),
                                              _mm256_and_si256(_mm256_srli_epi16(b, 4), low4), 1);
        for (int i = 0; i < M; ++i) {
          const __m512i d = _mm512_dpbusd_epi32(_mm512_setzero_si512(), wq, xv[i]);
          acc[r][i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), _mm512_set1_ps(gs.s[r][i][gg]), acc[r][i]);
        }
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int i = 0; i < M; ++i) o.y[i * o.n + j + r] = _mm512_reduce_add_ps(acc[r][i]);
}

// Q8G with x in int8: x is stored as q + 128, so one vpdpbusd gives sum (q + 128) w; the weight's
// 128 * sum w (a vpdpbusd of 128s, once per weight row and group for all rows of x) starts the
// accumulator negated, leaving the exact sum q w.
template <int M, int R>
EF_VNNI void RowsQ8x8(const Int8Operands& io, int64_t j) {
  const Operands& o = *io.o;
  const Weight& w = *o.w;
  const int64_t k = o.k, ld = w.cols, groups = k / 64, ldg = ld / 64, row = o.row_begin + j;
  const int8_t* q = static_cast<const int8_t*>(w.data) + row * ld + o.col_begin;
  const auto* p =
      reinterpret_cast<const uint16_t*>(static_cast<const std::byte*>(w.data) + kQ8Format.params_offset(w.rows, ld)) +
      row * ldg + o.col_begin / 64;
  const __m512i c128 = _mm512_set1_epi8(static_cast<char>(0x80));
  __m512 acc[R][M];
  for (int r = 0; r < R; ++r)
    for (int i = 0; i < M; ++i) acc[r][i] = _mm512_setzero_ps();
  GroupScales<M, R> gs;
  for (int64_t g0 = 0; g0 < groups; g0 += 16) {
    const int n = static_cast<int>(std::min<int64_t>(16, groups - g0));
    const __mmask16 mask = static_cast<__mmask16>((1u << n) - 1u);
    for (int r = 0; r < R; ++r) {
      const __m512 scale = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask, p + r * ldg + g0));
      for (int i = 0; i < M; ++i)
        _mm512_store_ps(gs.s[r][i], _mm512_mul_ps(scale, _mm512_maskz_loadu_ps(mask, io.scale + i * groups + g0)));
    }
    for (int gg = 0; gg < n; ++gg) {
      const int64_t g = g0 + gg;
      __m512i xv[M];
      for (int i = 0; i < M; ++i) xv[i] = _mm512_loadu_si512(io.q + i * k + g * 64);
      for (int r = 0; r < R; ++r) {
        const __m512i wv = _mm512_loadu_si512(q + r * ld + g * 64);
        const __m512i bias =
            _mm512_sub_epi32(_mm512_setzero_si512(), _mm512_dpbusd_epi32(_mm512_setzero_si512(), c128, wv));
        for (int i = 0; i < M; ++i) {
          const __m512i d = _mm512_dpbusd_epi32(bias, xv[i], wv);
          acc[r][i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), _mm512_set1_ps(gs.s[r][i][gg]), acc[r][i]);
        }
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int i = 0; i < M; ++i) o.y[i * o.n + j + r] = _mm512_reduce_add_ps(acc[r][i]);
}

// Weight rows at once for M rows of int8 x: the unpacked weight is shared by the M rows, so few
// rows take more weight rows per pass.
constexpr int Int8RowsAtOnce(int m) { return m <= 2 ? 4 : 2; }

template <int M>
void RowsInt8(const Int8Operands& io, int64_t begin, int64_t end) {
  constexpr int R = Int8RowsAtOnce(M);
  const bool q4 = io.o->w->dtype == DType::kQ4;
  int64_t j = begin;
  for (; j + R <= end; j += R) q4 ? RowsQ4x8<M, R>(io, j) : RowsQ8x8<M, R>(io, j);
  for (; j < end; ++j) q4 ? RowsQ4x8<M, 1>(io, j) : RowsQ8x8<M, 1>(io, j);
}

bool HaveVnni() {
  static const bool have = __builtin_cpu_supports("avx512vnni");
  return have;
}

// ---- bf16 weights on AMX tiles, x in three bf16 parts (exact) ----
//
// A tile product C[16, N] += A[16, 32] B[16, N x 2] multiplies 16 weight rows (A: 16 rows of 32
// bf16 values, loaded straight from the weight with its row stride) by 32 columns of up to 16
// rows of x (B: the columns in pairs, each pair of a row one 32-bit word). x is fp32: it is cut
// into x1 + x2 + x3, each bf16 (x1 = x truncated to bf16, x2 = x - x1 truncated, x3 = the rest),
// which together hold every bit of x for 1e-30 < |x| <= FLT_MAX, so each product w * xi is exact.
// The tile unit sums them in fp32 in an order of its own (not the AVX-512 path's; on random rows
// the error against an fp64 sum is ~5e-8 of sum |w x|, as the AVX-512 path's), and treats
// subnormal inputs and results as zero: x below ~1e-30 loses bits, subnormal weights count as 0,
// which no trained weight or activation comes near. A block of 16 weight rows is computed the same
// way whatever the rows of x (1-16) and whatever thread takes it, so a token's outputs do not
// depend on its batch or the thread count on one machine (CPU generations may sum differently).

#define EF_AMX __attribute__((target("avx512f,avx512bw,avx512vl,amx-tile,amx-bf16")))

constexpr int kAmxRows = 16;  // weight rows per tile, and the most rows of x per pass

// The tile layout: palette 1; tiles 0 (C), 1 (A), 2-4 (B, one per part of x).
struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

TileConfig MakeTileConfig(int weight_rows, int x_rows) {
  TileConfig c;
  c.rows[0] = static_cast<uint8_t>(weight_rows);  // C: weight rows x (x rows fp32)
  c.colsb[0] = static_cast<uint16_t>(x_rows * 4);
  c.rows[1] = static_cast<uint8_t>(weight_rows);  // A: weight rows x 32 bf16
  c.colsb[1] = 64;
  for (int t = 2; t < 5; ++t) {  // B: 16 column pairs x (x rows x 2 bf16)
    c.rows[t] = 16;
    c.colsb[t] = static_cast<uint16_t>(x_rows * 4);
  }
  return c;
}

// x[m, k] as the tiles read it: for each step of 32 columns, each part, each column pair p, each
// row i, the pair's two bf16 values: word ((step * 3 + part) * 16 + p) * m + i.
struct AmxRows {
  std::vector<uint32_t> words;
  std::vector<uint16_t> parts;  // scratch: each row's three parts in column order
};

// The top 16 bits of 16 fp32 values (bf16 by truncation; a NaN keeps a quiet bit, so it stays NaN).
// Truncation, not rounding: x - x1 is then exact, of x's sign, and never overflows (rounding
// x near FLT_MAX up would give inf).
EF_AMX inline __m256i Bf16Truncate16(__m512 v) {
  const __m512i u = _mm512_castps_si512(v);
  const __m512i exp_mask = _mm512_set1_epi32(0x7F800000);
  const __mmask16 nan = _mm512_cmpeq_epi32_mask(_mm512_and_si512(u, exp_mask), exp_mask) &
                        _mm512_test_epi32_mask(u, _mm512_set1_epi32(0x007FFFFF));
  const __m512i h = _mm512_srli_epi32(u, 16);
  return _mm512_cvtepi32_epi16(_mm512_mask_or_epi32(h, nan, h, _mm512_set1_epi32(0x40)));
}

EF_AMX inline __m512 Bf16Value16(__m256i h) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

// Row i of x split into its three bf16 parts, each in column order, into parts[3][k].
EF_AMX void SplitRow(const float* x, int64_t k, uint16_t* parts) {
  for (int64_t c = 0; c < k; c += 16) {
    const __m512 v = _mm512_loadu_ps(x + c);
    const __mmask16 finite = _mm512_cmpneq_epi32_mask(
        _mm512_and_si512(_mm512_castps_si512(v), _mm512_set1_epi32(0x7F800000)), _mm512_set1_epi32(0x7F800000));
    // x's 24 significant bits in three slices of 8: each difference is exact.
    const __m256i h1 = Bf16Truncate16(v);
    const __m512 r1 = _mm512_maskz_sub_ps(finite, v, Bf16Value16(h1));  // 0 beside inf / NaN
    const __m256i h2 = Bf16Truncate16(r1);
    const __m256i h3 = Bf16Truncate16(_mm512_sub_ps(r1, Bf16Value16(h2)));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(parts + c), h1);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(parts + k + c), h2);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(parts + 2 * k + c), h3);
  }
}

EF_AMX void PrepareAmxRows(const float* x, int64_t m, int64_t k, AmxRows* out) {
  const int64_t steps = k / 32;
  out->words.resize(static_cast<size_t>(steps * 3 * 16 * m));
  uint32_t* w = out->words.data();
  if (m == 1) {  // one row: each part of a step is its 32 values in column order
    std::vector<uint16_t>& parts = out->parts;
    parts.resize(static_cast<size_t>(3 * k));
    SplitRow(x, k, parts.data());
    for (int64_t s = 0; s < steps; ++s)
      for (int t = 0; t < 3; ++t) std::memcpy(w + (s * 3 + t) * 16, parts.data() + t * k + s * 32, 64);
    return;
  }
  std::vector<uint16_t>& parts = out->parts;
  parts.resize(static_cast<size_t>(3 * k * m));
  for (int64_t i = 0; i < m; ++i) SplitRow(x + i * k, k, parts.data() + i * 3 * k);
  for (int64_t s = 0; s < steps; ++s)
    for (int t = 0; t < 3; ++t)
      for (int p = 0; p < 16; ++p)
        for (int64_t i = 0; i < m; ++i) {
          uint32_t pair;
          std::memcpy(&pair, parts.data() + (i * 3 + t) * k + s * 32 + 2 * p, 4);
          w[((s * 3 + t) * 16 + p) * m + i] = pair;
        }
}

// Weight rows [16 b, 16 b + rows) of the block against the m rows of x prepared in `xa`. `a`
// gives step s's weight tile (16 rows of 32 bf16 values): a.Tile(s) returns its address and row
// stride in bytes.
template <typename WeightTiles>
EF_AMX void AmxProducts(const Operands& o, const AmxRows& xa, int64_t m, int64_t b, int rows, float* cbuf,
                        WeightTiles& a) {
  const uint32_t* xw = xa.words.data();
  const int64_t steps = o.k / 32, bstride = m * 4;
  _tile_zero(0);
  for (int64_t s = 0; s < steps; ++s) {
    const auto [tile, stride] = a.Tile(s);
    _tile_loadd(1, tile, stride);
    _tile_loadd(2, xw + (s * 3 + 0) * 16 * m, bstride);
    _tile_loadd(3, xw + (s * 3 + 1) * 16 * m, bstride);
    _tile_loadd(4, xw + (s * 3 + 2) * 16 * m, bstride);
    // x1 + x2 + x3 in that order: the small parts first would round less, but this order matches
    // how the weights' products are largest first in every block alike.
    _tile_dpbf16ps(0, 1, 2);
    _tile_dpbf16ps(0, 1, 3);
    _tile_dpbf16ps(0, 1, 4);
  }
  _tile_stored(0, cbuf, m * 4);
  for (int r = 0; r < rows; ++r)
    for (int64_t i = 0; i < m; ++i) o.y[i * o.n + b * kAmxRows + r] = cbuf[r * m + i];
}

// A bf16 weight's tiles: read in place.
struct Bf16Tiles {
  const uint16_t* rows;  // the block's first row at its first column
  int64_t ld;
  EF_AMX std::pair<const void*, int64_t> Tile(int64_t s) const { return {rows + s * 32, ld * 2}; }
};

// 32 PBF16 values of a row as their bf16 bits, into dst[32]: columns [c, c + 32) of the weight,
// c a multiple of 32 (a quarter of a group: the low or the high nibbles of 32 code bytes). 16-bit
// lanes: sign to bit 15, the exponent from a 32-entry table (vpermw; entries 16-31 unused), the
// mantissa below. Exceptions decode to +0; the caller patches them.
EF_AMX inline void DecodePbf16Row32(const uint8_t* block, int64_t rows, int64_t ld, int64_t row, int64_t c,
                                    uint16_t* dst) {
  using F = PackedBf16Format;
  const int64_t g = c / F::kGroup, q = c % F::kGroup;
  const int base = block[F::base_offset(rows, ld) + row * (ld / F::kGroup) + g];
  // (base - code) << 7 for codes 0..14, 0 for 15 (and the unused entries 16-31).
  const __m512i iota = _mm512_set_epi16(31, 30, 29, 28, 27, 26, 25, 24, 23, 22, 21, 20, 19, 18, 17, 16, 15, 14, 13, 12,
                                        11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
  const __m512i table =
      _mm512_slli_epi16(_mm512_maskz_sub_epi16(0x7fff, _mm512_set1_epi16(static_cast<int16_t>(base)), iota), 7);
  const __m512i low = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(block + row * ld + c)));
  __m512i codes = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(
      block + F::codes_offset(rows, ld) + (row * ld) / 2 + g * (F::kGroup / 2) + q % (F::kGroup / 2))));
  codes = q < F::kGroup / 2 ? _mm512_and_si512(codes, _mm512_set1_epi16(0xf)) : _mm512_srli_epi16(codes, 4);
  const __m512i exponent = _mm512_permutexvar_epi16(codes, table);
  const __m512i sign = _mm512_slli_epi16(_mm512_srli_epi16(low, 7), 15);
  const __m512i mant = _mm512_and_si512(low, _mm512_set1_epi16(0x7f));
  _mm512_storeu_si512(dst, _mm512_ternarylogic_epi32(sign, mant, exponent, 0xfe));
}

// A PBF16 weight's tiles: each step's 16 x 32 values decoded into a bf16 tile in L1 (exceptions
// patched from each row's list, walked in column order).
struct Pbf16Tiles {
  EF_AMX Pbf16Tiles(const Operands& o, int64_t b, int rows) : o(o), rows(rows) {
    using F = PackedBf16Format;
    const Weight& w = *o.w;
    row0 = o.row_begin + b * kAmxRows;
    block = static_cast<const uint8_t*>(w.data);
    const uint8_t* row_end = block + F::row_end_offset(w.rows, w.cols);
    exceptions = block + F::exceptions_offset(w.rows, w.cols);
    // Each row's next exception at or past the block's first column, and its end.
    for (int r = 0; r < rows; ++r) {
      uint32_t first = 0;
      if (row0 + r > 0) std::memcpy(&first, row_end + 4 * (row0 + r - 1), 4);
      std::memcpy(&end[r], row_end + 4 * (row0 + r), 4);
      next[r] = first;
      for (uint32_t entry; next[r] < end[r]; ++next[r]) {
        std::memcpy(&entry, exceptions + 4 * next[r], 4);
        if (static_cast<int64_t>(entry & 0xffff) >= o.col_begin) break;
      }
    }
  }
  EF_AMX std::pair<const void*, int64_t> Tile(int64_t s) {
    const int64_t c = o.col_begin + s * 32;
    for (int r = 0; r < rows; ++r) {
      DecodePbf16Row32(block, o.w->rows, o.w->cols, row0 + r, c, tile + r * 32);
      for (uint32_t entry; next[r] < end[r]; ++next[r]) {
        std::memcpy(&entry, exceptions + 4 * next[r], 4);
        const int64_t col = entry & 0xffff;
        if (col >= c + 32) break;
        tile[r * 32 + (col - c)] = static_cast<uint16_t>(entry >> 16);
      }
    }
    return {tile, 64};
  }

  const Operands& o;
  int rows;
  int64_t row0 = 0;
  const uint8_t* block = nullptr;
  const uint8_t* exceptions = nullptr;
  uint32_t next[kAmxRows] = {}, end[kAmxRows] = {};
  alignas(64) uint16_t tile[kAmxRows * 32] = {};
};

// Blocks [begin, end) of 16 weight rows; the last block of the call may be shorter.
EF_AMX void AmxBlocks(const Operands& o, const AmxRows& xa, int64_t m, int64_t begin, int64_t end) {
  alignas(64) float cbuf[kAmxRows * kAmxRows];
  const int64_t full = o.n / kAmxRows;
  int configured = 0;  // weight rows of the loaded configuration
  for (int64_t b = begin; b < end; ++b) {
    const int rows = b < full ? kAmxRows : static_cast<int>(o.n - full * kAmxRows);
    if (rows != configured) {
      const TileConfig c = MakeTileConfig(rows, static_cast<int>(m));
      // The intrinsic's asm names only the first bytes as its input: keep every store before it.
      asm volatile("" : : "m"(c) : "memory");
      _tile_loadconfig(&c);
      configured = rows;
    }
    if (o.w->dtype == DType::kPbf16) {
      Pbf16Tiles tiles(o, b, rows);
      AmxProducts(o, xa, m, b, rows, cbuf, tiles);
    } else {
      Bf16Tiles tiles{static_cast<const uint16_t*>(o.w->data) + (o.row_begin + b * kAmxRows) * o.w->cols + o.col_begin,
                      o.w->cols};
      AmxProducts(o, xa, m, b, rows, cbuf, tiles);
    }
  }
  _tile_release();
}

bool HaveAmx() {
  // Linux hands out the tile state only on request (arch_prctl ARCH_REQ_XCOMP_PERM for
  // XFEATURE_XTILEDATA), once per process.
  // CPUID leaf 7: AMX-BF16 is EDX bit 22, AMX-TILE bit 24 (read directly: not every compiler's
  // __builtin_cpu_supports knows them); the OS enables the tile state in XCR0 bits 17-18.
  static const bool have = [] {
    unsigned a = 0, b = 0, c = 0, d = 0;
    if (!HaveAvx512() || !__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
    if (!(d & (1u << 22)) || !(d & (1u << 24))) return false;
    unsigned lo = 0, hi = 0;
    asm volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    if ((lo & (3u << 17)) != (3u << 17)) return false;
    return syscall(SYS_arch_prctl, 0x1023, 18) == 0;
  }();
  return have;
}
#endif

// Row j of w as fp32 (the dtypes the CPU backend multiplies).
void WidenRow(const Weight& w, int64_t j, float* dst) {
  const int64_t k = w.cols;
  switch (w.dtype) {
    case DType::kQ8:
    case DType::kQ4:
      return DequantizeRow(w.dtype, w.data, w.rows, k, j, dst);
    case DType::kBF16: {
      const auto* p = static_cast<const uint16_t*>(w.data) + j * k;
      for (int64_t c = 0; c < k; ++c) dst[c] = Bf16ToF32(p[c]);
      return;
    }
    case DType::kF16: {
      const auto* p = static_cast<const uint16_t*>(w.data) + j * k;
      for (int64_t c = 0; c < k; ++c) dst[c] = F16ToF32(p[c]);
      return;
    }
    case DType::kF32:
      std::memcpy(dst, static_cast<const float*>(w.data) + j * k, static_cast<size_t>(k) * sizeof(float));
      return;
    case DType::kPbf16:
      return UnpackBf16RowF32(w.data, w.rows, k, j, dst);
    default:  // block-scaled (MXFP4, block FP8)
      return DequantizeBlockScaledRow(w.dtype, w.data, w.rows, k, j, dst);
  }
}

}  // namespace

void RoundToInt8Groups(const float* x, int64_t m, int64_t k, float* out) {
  for (int64_t i = 0; i < m; ++i)
    for (int64_t c0 = 0; c0 < k; c0 += 64) {
      const float* xg = x + i * k + c0;
      float* og = out + i * k + c0;
      float a = 0.f;
      bool finite = true;
      for (int c = 0; c < 64; ++c) {
        a = std::max(a, std::fabs(xg[c]));
        finite = finite && std::isfinite(xg[c]);
      }
      if (a < kTinyGroup || !finite) {
        std::fill(og, og + 64, finite ? 0.f : std::numeric_limits<float>::quiet_NaN());
        continue;
      }
      const float inv = 127.f / a, scale = a / 127.f;
      for (int c = 0; c < 64; ++c) og[c] = std::nearbyint(xg[c] * inv) * scale;
    }
}

std::string Int8XChoice(const char* key, const std::string& value, const char* fallback) {
  if (value == "int4" || value == "all" || value == "none") return value;
  EF_LOG(WARN, CORE, "%s=%s is not int4, all or none; using %s", key, value.c_str(), fallback);
  return fallback;
}

bool Int8XCovers(const std::string& choice, DType t) {
  return (t == DType::kQ4 && choice != "none") || (t == DType::kQ8 && choice == "all");
}

HostPath HostGemvPath(const Weight& w, HostPath path) {
#ifdef EF_HOST_GEMV_X86
  if (!HostGemvVectorized(w)) return HostPath::kFloat;
  const bool quantized = w.dtype == DType::kQ8 || w.dtype == DType::kQ4;
  if (path == HostPath::kDefault) {
    static const std::string which = Int8XChoice("EF_HOST_GEMV_INT8_X", params::HostGemvInt8X(), "int4");
    // PBF16 on AMX decodes each 16 x 32 tile through L1 first: slower than decoding in registers
    // for the FMAs on the 2-core machine it was measured on (0.97-1.09 against 0.50-0.79 ms for a
    // 3584 x 1024 expert, 1-4 rows), so it is asked for explicitly (ef_host_expert_bench times both).
    if (w.dtype == DType::kBF16 && params::HostGemvAmx()) path = HostPath::kAmx;
    if (Int8XCovers(which, w.dtype)) path = HostPath::kInt8X;
  }
  if (path == HostPath::kInt8X && quantized && HaveVnni()) return HostPath::kInt8X;
  if (path == HostPath::kAmx && (w.dtype == DType::kBF16 || w.dtype == DType::kPbf16) && HaveAmx())
    return HostPath::kAmx;
  return HostPath::kFloat;
#else
  (void)w;
  (void)path;
  return HostPath::kFloat;
#endif
}

bool HostGemvVectorized(const Weight& w) {
#ifdef EF_HOST_GEMV_X86
  const bool dtype_ok = w.dtype == DType::kF32 || w.dtype == DType::kBF16 || w.dtype == DType::kQ8 ||
                        w.dtype == DType::kQ4 || w.dtype == DType::kPbf16;
  return HaveAvx512() && dtype_ok && w.cols % VectorColumns(w.dtype) == 0 && w.cols > 0;
#else
  (void)w;
  return false;
#endif
}

void HostGemv(ThreadPool& pool, const float* x, int64_t m, const Weight& w, float* y, GemvBlock block, HostPath path) {
  const int64_t row_end = block.row_end < 0 ? w.rows : block.row_end;
  const int64_t col_end = block.col_end < 0 ? w.cols : block.col_end;
  const int64_t n = row_end - block.row_begin, k = col_end - block.col_begin;
  if (m <= 0 || n <= 0 || k <= 0) return;
  const bool whole = n == w.rows && k == w.cols;
  const bool aligned = block.col_begin % VectorColumns(w.dtype) == 0 && k % VectorColumns(w.dtype) == 0;
  if (!HostGemvVectorized(w) || !aligned) {
    if (whole) {
      CpuBackend(&pool).Gemm(x, m, w, nullptr, y, /*accumulate=*/false);  // the exact path
      return;
    }
    // A block off the vector path: each weight row widened to fp32, then the block's columns.
    pool.ParallelFor(
        n,
        [&](int64_t begin, int64_t end) {
          std::vector<float> row(static_cast<size_t>(w.cols));
          for (int64_t j = begin; j < end; ++j) {
            WidenRow(w, block.row_begin + j, row.data());
            for (int64_t i = 0; i < m; ++i) {
              float acc = 0.f;
              for (int64_t c = 0; c < k; ++c) acc += x[i * k + c] * row[block.col_begin + c];
              y[i * n + j] = acc;
            }
          }
        },
        /*min_chunk=*/16);
    return;
  }
#ifdef EF_HOST_GEMV_X86
  const HostPath use = HostGemvPath(w, path);
  if (use == HostPath::kAmx) {
    // Reused across calls (no allocation once grown). The workers must see this thread's
    // buffer: a lambda naming a thread_local would read each worker's own.
    thread_local AmxRows buffer;
    const AmxRows& xa = buffer;
    for (int64_t r0 = 0; r0 < m; r0 += kAmxRows) {
      const int64_t rows = std::min<int64_t>(kAmxRows, m - r0);
      PrepareAmxRows(x + r0 * k, rows, k, &buffer);
      const Operands o{x + r0 * k, k, &w, block.col_begin, block.row_begin, y + r0 * n, n};
      pool.ParallelFor((n + kAmxRows - 1) / kAmxRows,
                       [&](int64_t begin, int64_t end) { AmxBlocks(o, xa, rows, begin, end); },
                       /*min_chunk=*/4, PiecesPerThread());
    }
    return;
  }
  if (use == HostPath::kInt8X) {
    thread_local Int8Rows xq;  // reused: no allocation once grown; the workers get pointers into it
    PrepareInt8Rows(x, m, k, w.dtype == DType::kQ4, &xq);
    for (int64_t r0 = 0; r0 < m; r0 += kHostGemvMaxRows) {
      const int rows = static_cast<int>(std::min<int64_t>(kHostGemvMaxRows, m - r0));
      const Operands o{x + r0 * k, k, &w, block.col_begin, block.row_begin, y + r0 * n, n};
      const Int8Operands io{&o, xq.q.data() + r0 * k, xq.scale.data() + r0 * (k / 64), xq.sum.data() + r0 * (k / 64)};
      pool.ParallelFor(
          n, [&](int64_t begin, int64_t end) { WithRows(rows, [&](auto M) { RowsInt8<M()>(io, begin, end); }); },
          /*min_chunk=*/64, PiecesPerThread());
    }
    return;
  }
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
    const Operands o{x + r0 * k, k, &w, block.col_begin, block.row_begin, y + r0 * n, n};
    pool.ParallelFor(
        n, [&](int64_t begin, int64_t end) { WithRows(rows, [&](auto M) { RowsVector<M()>(o, begin, end); }); },
        /*min_chunk=*/64, PiecesPerThread());
  }
#endif
}

}  // namespace ef::runtime
