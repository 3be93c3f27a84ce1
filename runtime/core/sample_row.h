// Drawing one token from a row of logits: the one definition the host sampler
// (runtime/engine/sampler.h), the CPU backend and the CUDA kernel (Backend::SampleRows) share, so a
// request draws the same tokens for the same seed wherever its row is sampled.
//
//   1. Greedy (the first index of the largest logit; NaN never wins; a row without a number gives
//      0, as runtime::ArgMax) when inv_temperature is 0, or when the largest logit is not finite.
//   2. Otherwise each non-NaN logit l gets the integer mass q = SampleMass(l, max, inv_temperature):
//      exp((l - max) / T) in 2^-40 units, from a float exp computed with the same IEEE operations on
//      the host and the device, so every q, every sum of q (integers: any order) and every cut
//      below is the same bits on both.
//   3. Tokens are ordered by (logit descending, id ascending). top_k > 0 keeps the first top_k;
//      top_p < 1 then keeps the shortest prefix of those whose mass reaches
//      TopPTarget(top_p, their mass).
//   4. r = DrawTarget(uniform, mass kept); walking the kept tokens in increasing id, the token is the
//      first whose running mass exceeds r.
//
// The distribution is softmax(logits / T) restricted as above; a token whose weight is below 2^-40
// of the largest (x below about -27.7) has mass 0 and is never drawn.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define EF_SAMPLE_HD __host__ __device__ __forceinline__
#else
#define EF_SAMPLE_HD inline
#endif

namespace ef::runtime {

// One row's parameters (POD: copied to the device as is).
struct RowSampling {
  float inv_temperature = 0.f;  // 1 / temperature; 0: greedy
  float top_p = 1.f;            // (0, 1]
  int32_t top_k = 0;            // 0: no limit
  int32_t pad = 0;
  double uniform = 0.0;  // [0, 1): the request's random draw for this token
};
static_assert(sizeof(RowSampling) == 24);

inline constexpr int kSampleMassBits = 40;

// Multiply and add that no compiler fuses into an FMA (the device intrinsics are never contracted;
// the host file that uses these is compiled with -ffp-contract=off), so both sides round the same.
EF_SAMPLE_HD float SampleMul(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}
EF_SAMPLE_HD float SampleAdd(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}

// exp(x) for x <= 0, 0 below -28 (where the mass is 0 anyway): x = n ln2 + r, |r| <= ln2 / 2, and
// a degree-7 Taylor polynomial of e^r (relative error below 2e-7). n is rounded by adding and
// subtracting 1.5 x 2^23 and 2^n is built from its bits: exact, and no library call on the host.
EF_SAMPLE_HD float SampleExpCore(float x);  // x in [-28, 0]
EF_SAMPLE_HD float SampleExp(float x) { return x >= -28.f ? SampleExpCore(x) : 0.f; }
EF_SAMPLE_HD float SampleExpCore(float x) {
  const float n = SampleAdd(SampleAdd(SampleMul(x, 1.44269504f), 12582912.f), -12582912.f);
  float r = SampleAdd(x, SampleMul(n, -0.693145751953125f));  // ln 2, high part (n * it is exact)
  r = SampleAdd(r, SampleMul(n, -1.428606765330187e-06f));    // ln 2, low part
  float p = 1.98412698e-4f;                                   // 1/7!
  p = SampleAdd(SampleMul(p, r), 1.38888889e-3f);
  p = SampleAdd(SampleMul(p, r), 8.33333333e-3f);
  p = SampleAdd(SampleMul(p, r), 4.16666667e-2f);
  p = SampleAdd(SampleMul(p, r), 1.66666667e-1f);
  p = SampleAdd(SampleMul(p, r), 0.5f);
  p = SampleAdd(SampleMul(p, r), 1.f);
  p = SampleAdd(SampleMul(p, r), 1.f);
  const uint32_t bits = static_cast<uint32_t>(static_cast<int>(n) + 127) << 23;  // 2^n, n in [-41, 0]
#if defined(__CUDA_ARCH__)
  const float scale = __uint_as_float(bits);
#else
  float scale;
  __builtin_memcpy(&scale, &bits, sizeof(scale));
#endif
  return SampleMul(p, scale);
}

// The mass of logit l when the row's largest is mx, as a float holding an integer in [0, 2^40]
// (2^40 when l = mx; 0 for NaN). Branch-free, so the host loop over a row vectorises.
EF_SAMPLE_HD float SampleMassFloat(float l, float mx, float inv_temperature) {
  const float x = SampleMul(SampleAdd(l, -mx), inv_temperature);
  const bool in_range = x >= -28.f;  // false for NaN
  // SampleExpCore is at most 1 on [-28, 0] (1 at 0: each Horner step adds a product <= 0 to 1).
  const float e = SampleExpCore(in_range ? x : -28.f);
  return in_range ? SampleMul(e, 1099511627776.f) : 0.f;  // x 2^40: exact
}
// The integer mass of logit l (not NaN): at most 2^40 (l = mx).
EF_SAMPLE_HD uint64_t SampleMass(float l, float mx, float inv_temperature) {
  return static_cast<uint64_t>(static_cast<int64_t>(SampleMassFloat(l, mx, inv_temperature)));
}

// The mass a top_p prefix must reach out of `total`.
EF_SAMPLE_HD uint64_t TopPTarget(float top_p, uint64_t total) {
  const double t = ceil(static_cast<double>(top_p) * static_cast<double>(total));
  const uint64_t v = t < 1.0 ? 1 : static_cast<uint64_t>(t);
  return v > total ? total : v;
}

// The drawn point in [0, total).
EF_SAMPLE_HD uint64_t DrawTarget(double uniform, uint64_t total) {
  const uint64_t r = static_cast<uint64_t>(floor(uniform * static_cast<double>(total)));
  return r >= total ? total - 1 : r;
}

// A float's bits as an unsigned key that sorts as the float does (NaN excluded by the caller).
EF_SAMPLE_HD uint32_t SampleOrderedKey(float v) {
#if defined(__CUDA_ARCH__)
  uint32_t b = __float_as_uint(v);
#else
  uint32_t b;
  __builtin_memcpy(&b, &v, sizeof(b));
#endif
  if ((b & 0x7fffffffu) == 0) b = 0;  // -0 is 0: ties of equal logits break by id
  return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

// The position of token i of logit v in the order (logit descending, id ascending): larger first.
EF_SAMPLE_HD uint64_t SampleRank(float v, int32_t i) {
  return (static_cast<uint64_t>(SampleOrderedKey(v)) << 32) | (0xffffffffu - static_cast<uint32_t>(i));
}

// The host's implementation (runtime/core/sample_row.cc): the token drawn from logits[0, n).
int32_t SampleRow(const float* logits, int64_t n, const RowSampling& s);
// The first index of the largest logit; NaN never wins, a row without a number gives 0.
int32_t ArgMaxRow(const float* logits, int64_t n);
// True when s asks for a draw (inv_temperature positive and finite), false for greedy.
EF_SAMPLE_HD bool SamplesRandomly(const RowSampling& s) {
  return s.inv_temperature > 0.f && s.inv_temperature <= 3.402823466e38f;
}

}  // namespace ef::runtime
