// The float arithmetic of the sampling rule (runtime/core/sample_row.h): exp and the integer
// masses. Include only from files whose float multiplies and adds are never fused into FMAs:
// CUDA files (these functions use the device's unfused intrinsics) and runtime/core/sample_row.cc
// (compiled with -ffp-contract=off). Anywhere else a compiler targeting FMA hardware may fuse
// them and round differently; other code calls the host wrappers SampleExp / SampleMass.
#pragma once

#include <cstdint>

#include "runtime/core/sample_row.h"

namespace ef::runtime::sample_math {

// Multiply and add that no compiler fuses into an FMA (the device intrinsics are never contracted;
// on the host, see the top of this file), so both sides round the same.
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

// exp(x) for x in [-28, 0] (below, the mass is 0 anyway): x = n ln2 + r, |r| <= ln2 / 2, and
// a degree-7 Taylor polynomial of e^r (relative error below 2e-7). n is rounded by adding and
// subtracting 1.5 x 2^23 and 2^n is built from its bits: exact, and no library call on the host.
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
  // SampleExpCore is at most 1 on [-28, 0]: with n = 0 its last step adds p * r <= 0 to 1, with
  // n < 0 it is at most e^(ln 2 / 2) / 2.
  const float e = SampleExpCore(in_range ? x : -28.f);
  return in_range ? SampleMul(e, 1099511627776.f) : 0.f;  // x 2^40: exact
}
// The integer mass of logit l (not NaN): at most 2^40 (l = mx).
EF_SAMPLE_HD uint64_t SampleMass(float l, float mx, float inv_temperature) {
  return static_cast<uint64_t>(static_cast<int64_t>(SampleMassFloat(l, mx, inv_temperature)));
}

}  // namespace ef::runtime::sample_math
