#include "runtime/engine/sampler.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <vector>

namespace ef::runtime {

Status SamplingParams::Validate() const {
  if (!(temperature >= 0.f) || !std::isfinite(temperature))
    return InvalidArgument("temperature must be >= 0, got " + std::to_string(temperature));
  if (top_k < 0) return InvalidArgument("top_k must be >= 0, got " + std::to_string(top_k));
  if (!(top_p > 0.f && top_p <= 1.f)) return InvalidArgument("top_p must be in (0, 1], got " + std::to_string(top_p));
  return Status::Ok();
}

namespace {

// Largest non-NaN value (-inf when there is none) over kLanes independent running maxima
// (branchless, so the compiler vectorises it; std::max_element's compare-and-branch mispredicts on
// every new maximum of random-looking logits: 9.5 ms for 64 rows of a 32k vocabulary against 0.8).
float MaxOf(const float* v, size_t n) {
  constexpr size_t kLanes = 16;
  float lane[kLanes];
  for (float& l : lane) l = -std::numeric_limits<float>::infinity();
  size_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (size_t j = 0; j < kLanes; ++j) lane[j] = v[i + j] > lane[j] ? v[i + j] : lane[j];
  float m = -std::numeric_limits<float>::infinity();
  for (float l : lane) m = l > m ? l : m;
  for (; i < n; ++i) m = v[i] > m ? v[i] : m;
  return m;
}

}  // namespace

int32_t ArgMax(std::span<const float> logits) {
  // Two passes: the maximum, then the first index holding it. NaNs never win; a row of NaNs gives 0.
  const size_t n = logits.size();
  const float* v = logits.data();
  const float m = MaxOf(v, n);
  for (size_t k = 0; k < n; ++k)
    if (v[k] == m) return static_cast<int32_t>(k);
  return 0;
}

// Without sorting the vocabulary (a sort of 152k logits per token took ~20 ms): top_k by
// selection, top_p by a selection that tracks the probability mass, the draw over the kept set in
// whatever order selection left it (the same distribution as walking it sorted).
int32_t Sampler::Sample(std::span<const float> logits) {
  // A temperature so small that 1 / T overflows is greedy (every weight but the top one is 0).
  if (params_.temperature <= 0.f || !std::isfinite(1.f / params_.temperature)) return ArgMax(logits);
  const float* l = logits.data();
  const size_t n = logits.size();
  // The order of the kept set: larger logit first, then the lower id (top_k and top_p cut in it).
  auto before = [l](int32_t a, int32_t b) { return l[a] != l[b] ? l[a] > l[b] : a < b; };
  thread_local std::vector<int32_t> idx;
  thread_local std::vector<float> w;
  // NaN logits are never drawn.
  size_t nans = 0;
  for (size_t i = 0; i < n; ++i) nans += l[i] != l[i];
  idx.resize(n);
  std::iota(idx.begin(), idx.end(), 0);
  if (nans > 0) idx.erase(std::remove_if(idx.begin(), idx.end(), [l](int32_t i) { return l[i] != l[i]; }), idx.end());
  size_t keep = idx.size();
  if (params_.top_k > 0 && static_cast<size_t>(params_.top_k) < keep) {
    keep = static_cast<size_t>(params_.top_k);
    // A small k: a heap of k over one pass (partial_sort); a large one: selection.
    if (keep <= 1024) {
      std::partial_sort(idx.begin(), idx.begin() + static_cast<std::ptrdiff_t>(keep), idx.end(), before);
    } else {
      std::nth_element(idx.begin(), idx.begin() + static_cast<std::ptrdiff_t>(keep - 1), idx.end(), before);
    }
    idx.resize(keep);
  }
  float mx = -std::numeric_limits<float>::infinity();
  if (keep == idx.size() && keep == n) {
    mx = MaxOf(l, n);
  } else {
    for (int32_t i : idx) mx = l[i] > mx ? l[i] : mx;
  }
  if (idx.empty() || !std::isfinite(mx)) return ArgMax(logits);  // no finite logit: nothing to weigh
  // Weights exp((logit - max) / temperature) in float (nothing overflows; a token whose weight
  // underflows, below ~1e-45 of the top one, is never drawn), summed in double. A +inf logit makes
  // the row greedy (ArgMax, below).
  const float inv_t = 1.f / params_.temperature;
  w.resize(keep);
  double total = 0;
  for (size_t i = 0; i < keep; ++i) total += (w[i] = std::exp((l[idx[i]] - mx) * inv_t));
  if (params_.top_p < 1.f && keep > 1) {
    // The smallest prefix, in `before` order, whose mass reaches top_p of the total: a quickselect
    // on [lo, hi) that keeps whole parts which fall short and descends into the one that crosses.
    const double target = static_cast<double>(params_.top_p) * total;
    size_t lo = 0, hi = keep;
    double acc = 0;  // mass of [0, lo), all kept
    while (hi - lo > 1) {
      // Median of three as the pivot, moved to lo.
      const size_t mid = lo + (hi - lo) / 2;
      size_t piv = lo;
      const int32_t a = idx[lo], b = idx[mid], c = idx[hi - 1];
      if (before(a, b) != before(a, c)) {
        piv = lo;
      } else if (before(b, a) != before(b, c)) {
        piv = mid;
      } else {
        piv = hi - 1;
      }
      std::swap(idx[lo], idx[piv]);
      std::swap(w[lo], w[piv]);
      // [lo + 1, store) comes before the pivot.
      size_t store = lo + 1;
      double ahead = 0;
      for (size_t i = lo + 1; i < hi; ++i)
        if (before(idx[i], idx[lo])) {
          std::swap(idx[i], idx[store]);
          std::swap(w[i], w[store]);
          ahead += w[store++];
        }
      // The pivot goes between the two parts.
      std::swap(idx[lo], idx[store - 1]);
      std::swap(w[lo], w[store - 1]);
      const size_t p = store - 1;
      if (acc + ahead >= target) {
        hi = p;  // the prefix ends before the pivot
      } else if (acc + ahead + w[p] >= target) {
        lo = hi = p + 1;  // the pivot is the last one kept
      } else {
        acc += ahead + w[p];
        lo = p + 1;
      }
    }
    keep = std::max<size_t>(hi, 1);
    total = 0;
    for (size_t i = 0; i < keep; ++i) total += w[i];
  }
  std::uniform_real_distribution<double> u(0.0, total);
  const double r = u(rng_);
  double acc = 0;
  for (size_t i = 0; i < keep; ++i) {
    acc += w[i];
    if (r < acc) return idx[i];
  }
  return idx[keep - 1];
}

}  // namespace ef::runtime
