// Host sampling of a step's rows (runtime::Sampler, what the serving loop runs for requests with a
// temperature): the previous algorithm (sort the vocabulary, then cut top_k / top_p) against the
// current one (selection, no sort), per row, and a step of R rows drawn on the thread pool as the
// serving loop draws them. Logits: normal(0, 2.5) (a flat, worst-case tail). Medians of `iters`.
// (A program, not a test.)
//
//   ef_sampler_bench [rows iters]      (default 64 rows, 7 iterations)
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <numeric>
#include <random>
#include <vector>

#include "runtime/core/thread_pool.h"
#include "runtime/engine/sampler.h"

namespace {

using ef::runtime::Sampler;
using ef::runtime::SamplingParams;
using Clock = std::chrono::steady_clock;

// The algorithm before: a (partial) sort of the whole row by logit, then top_p on the sorted prefix.
int32_t SortedSample(const SamplingParams& params, std::mt19937_64& rng, const float* logits, int n) {
  std::vector<int32_t> idx(n);
  std::iota(idx.begin(), idx.end(), 0);
  int keep = params.top_k > 0 ? std::min(params.top_k, n) : n;
  std::partial_sort(idx.begin(), idx.begin() + keep, idx.end(),
                    [&](int32_t a, int32_t b) { return logits[a] != logits[b] ? logits[a] > logits[b] : a < b; });
  idx.resize(keep);
  std::vector<double> p(keep);
  const double mx = logits[idx[0]];
  double sum = 0;
  for (int i = 0; i < keep; ++i) sum += (p[i] = std::exp((logits[idx[i]] - mx) / params.temperature));
  if (params.top_p < 1.f) {
    double cum = 0;
    for (int i = 0; i < keep; ++i)
      if ((cum += p[i] / sum) >= params.top_p) {
        keep = i + 1;
        break;
      }
    sum = std::accumulate(p.begin(), p.begin() + keep, 0.0);
  }
  std::uniform_real_distribution<double> u(0.0, sum);
  double r = u(rng), acc = 0;
  for (int i = 0; i < keep; ++i)
    if (r < (acc += p[i])) return idx[i];
  return idx[keep - 1];
}

template <typename F>
double MedianMs(int iters, F&& f) {
  std::vector<double> t;
  for (int i = 0; i < iters; ++i) {
    const auto t0 = Clock::now();
    f();
    t.push_back(std::chrono::duration<double, std::milli>(Clock::now() - t0).count());
  }
  std::sort(t.begin(), t.end());
  return t[t.size() / 2];
}

}  // namespace

int main(int argc, char** argv) {
  const int rows = argc > 1 ? std::atoi(argv[1]) : 64;
  const int iters = argc > 2 ? std::atoi(argv[2]) : 7;
  if (rows < 1 || iters < 1) {
    std::fprintf(stderr, "usage: ef_sampler_bench [rows >= 1] [iters >= 1]\n");
    return 2;
  }
  ef::ThreadPool& pool = ef::ThreadPool::Default();
  std::printf("# %d rows per step, %d host threads, medians of %d\n", rows, pool.num_threads(), iters);
  std::printf("%-8s %-26s %12s %12s %8s %16s\n", "vocab", "sampling", "sort ms/row", "select ms/row", "ratio",
              "step ms (pool)");
  for (int vocab : {32000, 151936}) {
    std::mt19937 gen(1);
    std::normal_distribution<float> nd(0.f, 2.5f);
    std::vector<float> logits(static_cast<size_t>(rows) * vocab);
    for (float& x : logits) x = nd(gen);
    struct Case {
      const char* name;
      float t, top_p;
      int top_k;
    };
    for (Case c : {Case{"T 1", 1.f, 1.f, 0}, Case{"T 0.7, top_p 0.9", 0.7f, 0.9f, 0},
                   Case{"T 1, top_k 50", 1.f, 1.f, 50}, Case{"T 0.8, top_k 40, top_p 0.95", 0.8f, 0.95f, 40}}) {
      SamplingParams p;
      p.temperature = c.t;
      p.top_p = c.top_p;
      p.top_k = c.top_k;
      std::mt19937_64 rng(3);
      volatile int32_t sink = 0;
      const int probe = std::min(rows, 8);
      const double sorted =
          MedianMs(iters,
                   [&] {
                     for (int r = 0; r < probe; ++r)
                       sink = SortedSample(p, rng, logits.data() + static_cast<size_t>(r) * vocab, vocab);
                   }) /
          probe;
      std::vector<Sampler> samplers(rows, Sampler(p));
      const double selected = MedianMs(iters,
                                       [&] {
                                         for (int r = 0; r < probe; ++r)
                                           sink = samplers[r].Sample({logits.data() + static_cast<size_t>(r) * vocab,
                                                                      static_cast<size_t>(vocab)});
                                       }) /
                              probe;
      const double step = MedianMs(iters, [&] {
        pool.ParallelFor(rows, [&](int64_t b, int64_t e) {
          for (int64_t r = b; r < e; ++r)
            sink = samplers[r].Sample({logits.data() + static_cast<size_t>(r) * vocab, static_cast<size_t>(vocab)});
        });
      });
      std::printf("%-8d %-26s %12.3f %12.3f %7.1fx %16.3f\n", vocab, c.name, sorted, selected, sorted / selected, step);
    }
  }
  return 0;
}
