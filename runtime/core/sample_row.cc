// Host implementation of runtime/core/sample_row.h. Built with -ffp-contract=off (CMakeLists.txt):
// the float operations of SampleMass must round as the device's do.
//
// Without sorting the vocabulary (a sort of 152k logits per token took ~20 ms): top_k by
// selection, top_p by a quickselect that tracks the mass of what it keeps, then one pass over the
// row in id order for the draw.
#include "runtime/core/sample_row.h"

#include <algorithm>
#include <limits>
#include <numeric>
#include <vector>

#include "runtime/core/limits.h"
#include "runtime/core/sample_row_math.h"

namespace ef::runtime {
static_assert(limits::kMaxVocab <= (1 << 23), "a row's masses must sum below 2^63");

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

int32_t FirstEqual(const float* v, size_t n, float m) {
  for (size_t k = 0; k < n; ++k)
    if (v[k] == m) return static_cast<int32_t>(k);
  return 0;
}

// The masses of a whole row as floats (NaN: 0), in a thread_local buffer: one branch-free pass the
// compiler vectorises.
const float* RowMasses(const float* l, size_t n, float mx, float inv_t) {
  thread_local std::vector<float> w;
  w.resize(n);
  for (size_t i = 0; i < n; ++i) w[i] = sample_math::SampleMassFloat(l[i], mx, inv_t);
  return w.data();
}

}  // namespace

float SampleExp(float x) { return x >= -28.f ? sample_math::SampleExpCore(x) : 0.f; }

uint64_t SampleMass(float l, float mx, float inv_temperature) {
  return sample_math::SampleMass(l, mx, inv_temperature);
}

int32_t ArgMaxRow(const float* logits, int64_t n) {
  // Two passes: the maximum, then the first index holding it. NaNs never win; a row of NaNs gives 0.
  const size_t len = static_cast<size_t>(n);
  return FirstEqual(logits, len, MaxOf(logits, len));
}

int32_t SampleRow(const float* l, int64_t n_signed, const RowSampling& s) {
  const size_t n = static_cast<size_t>(n_signed);
  const float mx = MaxOf(l, n);
  if (!SamplesRandomly(s) || !std::isfinite(mx)) return FirstEqual(l, n, mx);
  const float inv_t = s.inv_temperature;
  thread_local std::vector<uint64_t> q;
  if ((s.top_k <= 0 || static_cast<size_t>(s.top_k) >= n) && !(s.top_p < 1.f)) {
    // No cut: every number is kept (a NaN weighs 0, so it is never drawn); walk the row by id.
    const float* w = RowMasses(l, n, mx, inv_t);
    q.resize(n);
    uint64_t total = 0;
    for (size_t i = 0; i < n; ++i) total += (q[i] = static_cast<uint64_t>(static_cast<int64_t>(w[i])));
    const uint64_t r = DrawTarget(s.uniform, total);
    uint64_t acc = 0;
    for (size_t i = 0; i < n; ++i)
      if (r < (acc += q[i])) return static_cast<int32_t>(i);
    return FirstEqual(l, n, mx);  // not reached: the walk adds up to total > r
  }
  // The order of the kept set (top_k and top_p cut in it): larger logit first, then the lower id.
  // On numbers this is SampleRank's order (-0 == 0 here as there), in float compares.
  auto before = [l](int32_t a, int32_t b) { return l[a] != l[b] ? l[a] > l[b] : a < b; };
  thread_local std::vector<int32_t> idx;
  size_t nans = 0;
  for (size_t i = 0; i < n; ++i) nans += l[i] != l[i];
  idx.resize(n);
  std::iota(idx.begin(), idx.end(), 0);
  if (nans > 0) idx.erase(std::remove_if(idx.begin(), idx.end(), [l](int32_t i) { return l[i] != l[i]; }), idx.end());
  size_t keep = idx.size();
  const bool cut_k = s.top_k > 0 && static_cast<size_t>(s.top_k) < keep;
  if (cut_k) {
    keep = static_cast<size_t>(s.top_k);
    // A small k: a heap of k over one pass (partial_sort); a large one: selection.
    if (keep <= 1024) {
      std::partial_sort(idx.begin(), idx.begin() + static_cast<std::ptrdiff_t>(keep), idx.end(), before);
    } else {
      std::nth_element(idx.begin(), idx.begin() + static_cast<std::ptrdiff_t>(keep - 1), idx.end(), before);
    }
    idx.resize(keep);
  }
  q.resize(keep);
  uint64_t total = 0;
  if (!cut_k) {  // the row's masses in one vectorised pass, then gathered
    const float* w = RowMasses(l, n, mx, inv_t);
    for (size_t i = 0; i < keep; ++i) total += (q[i] = static_cast<uint64_t>(static_cast<int64_t>(w[idx[i]])));
  } else {
    for (size_t i = 0; i < keep; ++i) total += (q[i] = sample_math::SampleMass(l[idx[i]], mx, inv_t));
  }
  if (s.top_p < 1.f && keep > 1) {
    // The shortest prefix, in `before` order, whose mass reaches the target: a quickselect on
    // [lo, hi) that keeps whole parts which fall short and descends into the one that crosses.
    const uint64_t target = TopPTarget(s.top_p, total);
    size_t lo = 0, hi = keep;
    uint64_t acc = 0;  // mass of [0, lo), all kept
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
      std::swap(q[lo], q[piv]);
      // [lo + 1, store) comes before the pivot.
      size_t store = lo + 1;
      uint64_t ahead = 0;
      for (size_t i = lo + 1; i < hi; ++i)
        if (before(idx[i], idx[lo])) {
          std::swap(idx[i], idx[store]);
          std::swap(q[i], q[store]);
          ahead += q[store++];
        }
      // The pivot goes between the two parts.
      std::swap(idx[lo], idx[store - 1]);
      std::swap(q[lo], q[store - 1]);
      const size_t p = store - 1;
      if (acc + ahead >= target) {
        hi = p;  // the prefix ends before the pivot
      } else if (acc + ahead + q[p] >= target) {
        lo = hi = p + 1;  // the pivot is the last one kept
      } else {
        acc += ahead + q[p];
        lo = p + 1;
      }
    }
    keep = std::max<size_t>(hi, 1);
    total = 0;
    for (size_t i = 0; i < keep; ++i) total += q[i];
  }
  // The draw walks the kept tokens by id: a small set sorted, a large one through a map from id to
  // its place in idx (reset before returning).
  const uint64_t r = DrawTarget(s.uniform, total);
  uint64_t acc = 0;
  if (keep <= 4096) {
    thread_local std::vector<std::pair<int32_t, uint64_t>> kept;
    kept.resize(keep);
    for (size_t i = 0; i < keep; ++i) kept[i] = {idx[i], q[i]};
    std::sort(kept.begin(), kept.end());
    for (const auto& [id, mass] : kept)
      if (r < (acc += mass)) return id;
    return kept.back().first;  // not reached
  }
  thread_local std::vector<int32_t> place;
  if (place.size() < n) place.assign(n, -1);
  for (size_t i = 0; i < keep; ++i) place[static_cast<size_t>(idx[i])] = static_cast<int32_t>(i);
  int32_t token = idx[0];
  for (size_t j = 0; j < n; ++j) {
    const int32_t at = place[j];
    if (at >= 0 && r < (acc += q[static_cast<size_t>(at)])) {
      token = static_cast<int32_t>(j);
      break;
    }
  }
  for (size_t i = 0; i < keep; ++i) place[static_cast<size_t>(idx[i])] = -1;
  return token;
}

}  // namespace ef::runtime
