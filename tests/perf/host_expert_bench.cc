// One expert's three matrices on the host, as cache.cpu_compute runs a missed expert: HostGemv
// (vector path) against the CPU backend's exact Gemm, per weight type, for 1..4 rows of x; int8
// and int4 weights twice, with x in fp32 and in int8 (VNNI), bf16 weights with AVX-512 FMAs and on
// AMX tiles, where the CPU has them.
// Prints ms per expert and the weight bytes streamed per second (a program, not a test).
//
//   ef_host_expert_bench [hidden inter reps copies]   (default 4096 14336 20 1: one Mixtral-8x7B expert)
//
// copies > 1 keeps that many copies of the expert and computes them in turn: weights that come
// from memory, as a missed expert's do, not from a last-level cache that holds a whole int4 or
// int8 expert (tens of MB) when one is computed over and over.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

#include "runtime/backend/cpu/cpu_backend.h"
#include "runtime/backend/cpu/host_gemv.h"
#include "runtime/core/quant.h"

namespace {

using ef::DType;
using ef::runtime::Weight;

Weight Make(DType t, int64_t rows, int64_t cols, std::vector<std::byte>& store) {
  std::mt19937 rng(1);
  std::normal_distribution<float> nd(0.f, 0.02f);
  std::vector<float> f(static_cast<size_t>(rows * cols));
  for (float& v : f) v = nd(rng);
  Weight w{t, nullptr, rows, cols};
  store.assign(w.nbytes(), std::byte{0});
  if (t == DType::kBF16) {
    auto* b = reinterpret_cast<uint16_t*>(store.data());
    for (size_t i = 0; i < f.size(); ++i) b[i] = ef::F32ToBf16(f[i]);
  } else if (!ef::Quantize(t, DType::kF32, f.data(), rows, cols, store.data(), store.size()).ok()) {
    std::fprintf(stderr, "quantize failed\n");
    std::exit(1);
  }
  w.data = store.data();
  return w;
}

template <typename F>
double MedianMs(int reps, F&& f) {
  std::vector<double> t;
  for (int r = 0; r < reps; ++r) {
    auto a = std::chrono::steady_clock::now();
    f();
    t.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - a).count());
  }
  std::sort(t.begin(), t.end());
  return t[t.size() / 2];
}

}  // namespace

int main(int argc, char** argv) {
  const int64_t hidden = argc > 1 ? std::atoll(argv[1]) : 4096, inter = argc > 2 ? std::atoll(argv[2]) : 14336;
  const int reps = argc > 3 ? std::atoi(argv[3]) : 20;
  const int copies = std::max(1, argc > 4 ? std::atoi(argv[4]) : 1);
  ef::ThreadPool& pool = ef::ThreadPool::Default();
  ef::runtime::CpuBackend cpu(&pool);
  std::printf("expert %lld x %lld, %d copies, %d threads, vector path %s\n", static_cast<long long>(hidden),
              static_cast<long long>(inter), copies, pool.num_threads(),
              ef::runtime::HostGemvVectorized(Weight{DType::kBF16, nullptr, 1, 64}) ? "avx512" : "none");
  std::printf("%-6s %4s %4s %12s %10s %12s %10s %8s\n", "dtype", "x", "rows", "exact_ms", "exact_GB/s", "vector_ms",
              "vector_GB/s", "speedup");
  using ef::runtime::HostPath;
  for (DType t : {DType::kBF16, DType::kQ8, DType::kQ4}) {
    struct Expert {
      std::vector<std::byte> sg, su, sd;
      Weight g, u, d;
    };
    std::vector<Expert> ex(static_cast<size_t>(copies));
    ex[0].g = Make(t, inter, hidden, ex[0].sg);
    ex[0].u = Make(t, inter, hidden, ex[0].su);
    ex[0].d = Make(t, hidden, inter, ex[0].sd);
    for (size_t c = 1; c < ex.size(); ++c) {
      Expert& e = ex[c];
      e.sg = ex[0].sg, e.su = ex[0].su, e.sd = ex[0].sd;
      e.g = ex[0].g, e.u = ex[0].u, e.d = ex[0].d;
      e.g.data = e.sg.data(), e.u.data = e.su.data(), e.d.data = e.sd.data();
    }
    const Weight& g = ex[0].g;
    const double gb = static_cast<double>(ex[0].g.nbytes() + ex[0].u.nbytes() + ex[0].d.nbytes()) / 1e9;
    size_t turn = 0;
    for (int m : {1, 4, 16}) {
      std::vector<float> x(static_cast<size_t>(m * hidden), 0.1f), gy(static_cast<size_t>(m * inter)), uy(gy.size()),
          y(x.size());
      auto exact = [&] {
        const Expert& e = ex[turn++ % ex.size()];
        cpu.Gemm(x.data(), m, e.g, nullptr, gy.data(), false);
        cpu.Gemm(x.data(), m, e.u, nullptr, uy.data(), false);
        cpu.SiluMul(gy.data(), uy.data(), gy.data(), m * inter);
        cpu.Gemm(gy.data(), m, e.d, nullptr, y.data(), false);
      };
      exact();
      const double e = MedianMs(std::max(3, reps / 4), exact);
      for (HostPath a : {HostPath::kFloat, HostPath::kInt8X, HostPath::kAmx}) {
        if (a != HostPath::kFloat && ef::runtime::HostGemvPath(g, a) != a) continue;
        auto vec = [&] {
          const Expert& e = ex[turn++ % ex.size()];
          ef::runtime::HostGemv(pool, x.data(), m, e.g, gy.data(), {}, a);
          ef::runtime::HostGemv(pool, x.data(), m, e.u, uy.data(), {}, a);
          cpu.SiluMul(gy.data(), uy.data(), gy.data(), m * inter);
          ef::runtime::HostGemv(pool, gy.data(), m, e.d, y.data(), {}, a);
        };
        vec();
        const double v = MedianMs(reps, vec);
        std::printf("%-6s %4s %4d %12.3f %10.1f %12.3f %10.1f %7.2fx\n", ef::DTypeName(t),
                    a == HostPath::kInt8X ? "int8"
                    : a == HostPath::kAmx ? "amx"
                                          : "fp32",
                    m, e, gb / e * 1e3, v, gb / v * 1e3, e / v);
      }
    }
  }
  return 0;
}
