// Quantizing one weight matrix at load (runtime/core/quant.h): bf16 [rows, cols] to int8 and int4
// groups, on 1 thread and on `threads`, median of `reps` runs; GB/s of bf16 read. The expert cache
// quantizes every expert of a checkpoint this way when it loads in low precision.
//
//   ef_quant_bench [rows] [cols] [reps] [threads]      (default 14336 4096 5 16: a Mixtral-8x7B up)
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <vector>

#include "runtime/core/quant.h"

int main(int argc, char** argv) {
  const int64_t rows = argc > 1 ? std::atoll(argv[1]) : 14336;
  const int64_t cols = argc > 2 ? std::atoll(argv[2]) : 4096;
  const int reps = argc > 3 ? std::max(1, std::atoi(argv[3])) : 5;
  const int threads = argc > 4 ? std::max(1, std::atoi(argv[4])) : 16;
  if (rows < 1 || cols < 64 || cols % 64 != 0) {
    std::fprintf(stderr, "ef_quant_bench: rows >= 1 and cols a multiple of 64, got %lld x %lld\n",
                 static_cast<long long>(rows), static_cast<long long>(cols));
    return 2;
  }
  std::vector<uint16_t> w(static_cast<size_t>(rows * cols));
  std::mt19937 rng(1);
  std::normal_distribution<float> normal(0.f, 0.02f);
  for (uint16_t& v : w) {
    const float f = normal(rng);
    uint32_t bits;
    std::memcpy(&bits, &f, 4);
    v = static_cast<uint16_t>(bits >> 16);
  }
  std::printf("bf16 [%lld, %lld] (%.1f MB), median of %d\n%-6s %8s %10s %10s\n", static_cast<long long>(rows),
              static_cast<long long>(cols), rows * cols * 2 / 1e6, reps, "dtype", "threads", "ms", "GB/s in");
  for (ef::DType t : {ef::DType::kQ8, ef::DType::kQ4}) {
    std::vector<std::byte> dst(ef::WeightBytes(t, rows, cols));
    for (int n : {1, threads}) {
      std::vector<double> ms;
      for (int r = 0; r < reps; ++r) {
        const auto t0 = std::chrono::steady_clock::now();
        const auto done = ef::Quantize(t, ef::DType::kBF16, w.data(), rows, cols, dst.data(), dst.size(), n);
        ms.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
        if (!done.ok()) {
          std::fprintf(stderr, "ef_quant_bench: %s\n", done.status().ToString().c_str());
          return 1;
        }
      }
      std::sort(ms.begin(), ms.end());
      const double med = ms[ms.size() / 2];
      std::printf("%-6s %8d %10.2f %10.2f\n", ef::DTypeName(t), n, med, rows * cols * 2 / med / 1e6);
    }
  }
  return 0;
}
