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
// of the largest (x below about -27.7) has mass 0 and is never drawn. Rows hold at most 2^23 tokens
// (masses of up to 2^40 each then sum below 2^63).
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

// exp(x) for x <= 0 (0 below -28) and the integer mass of logit l (not NaN) when the row's
// largest is mx (at most 2^40, at l = mx): the host's copies of runtime/core/sample_row_math.h.
float SampleExp(float x);
uint64_t SampleMass(float l, float mx, float inv_temperature);

// The mass a top_p prefix must reach out of `total`.
EF_SAMPLE_HD uint64_t TopPTarget(float top_p, uint64_t total) {
  const double t = ceil(static_cast<double>(top_p) * static_cast<double>(total));
  const uint64_t v = t < 1.0 ? 1 : static_cast<uint64_t>(t);
  return v > total ? total : v;
}

// The drawn point in [0, total) (a uniform outside [0, 1), or NaN, is taken as 0 or just below 1).
EF_SAMPLE_HD uint64_t DrawTarget(double uniform, uint64_t total) {
  const double u = uniform > 0.0 ? uniform : 0.0;  // NaN: 0
  if (!(u < 1.0)) return total - 1;
  const uint64_t r = static_cast<uint64_t>(floor(u * static_cast<double>(total)));
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
