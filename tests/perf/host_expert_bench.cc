// One expert's three matrices on the host, as cache.cpu_compute runs a missed expert: HostGemv
// (vector path) against the CPU backend's exact Gemm, per weight type (bf16, packed bf16, int8, int4), for 1..4 rows of
// x; int8 and int4 weights twice, with x in fp32 and in int8 (VNNI), bf16 weights with AVX-512 FMAs and on AMX tiles,
// where the CPU has them. Prints ms per expert and the weight bytes streamed per second (a program, not a test).
//
//   ef_host_expert_bench [hidden inter reps copies] [--memory=vector|pinned|huge] [--gap-ms=G]
//                        [--rows=1,4,16] [--no-exact]
//       (default 4096 14336 20 1: one Mixtral-8x7B expert in ordinary memory, back to back)
//
// copies > 1 keeps that many copies of the expert and computes them in turn: weights that come
// from memory, as a missed expert's do, not from a last-level cache that holds a whole int4 or
// int8 expert (tens of MB) when one is computed over and over.
// memory: where the weights live. vector (ordinary memory: 4 KiB pages unless the kernel's
// transparent huge pages are "always", which the header prints), pinned (cudaHostAlloc, 4 KiB
// pages: the expert cache's host tier) or huge (page-locked transparent huge pages,
// EF_PINNED_HUGE_PAGES); the last two in CUDA builds.
// --gap-ms sleeps that long before each computation, as a decode step leaves the host idle
// between the layers' misses (threads asleep, cores idle), and times the computation alone.
// --no-exact skips the CPU backend's exact Gemm (slow; its columns print 0).
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "runtime/backend/cpu/cpu_backend.h"
#include "runtime/backend/cpu/host_gemv.h"
#include "runtime/core/packed_bf16.h"
#include "runtime/core/quant.h"
#if defined(EF_HAVE_CUDA_BACKEND)
#include "runtime/backend/cuda/pinned_memory.h"
#endif

namespace {

using ef::DType;
using ef::runtime::Weight;

// A buffer of weights in the memory the command line names.
class Store {
 public:
  Store(const std::string& memory, size_t bytes) : bytes_(bytes) {
    if (memory == "vector") {
      vec_.assign(bytes, std::byte{0});
      data_ = vec_.data();
      return;
    }
#if defined(EF_HAVE_CUDA_BACKEND)
    namespace cu = ef::runtime::cuda;
    kind_ = memory == "huge" ? cu::PinnedKind::kHugePages : cu::PinnedKind::kDriver;
    if (memory == "pinned" || memory == "huge") {
      auto p = cu::AllocatePinned(bytes, kind_);
      if (!p.ok()) {
        std::fprintf(stderr, "%s\n", p.status().ToString().c_str());
        std::exit(1);
      }
      data_ = static_cast<std::byte*>(*p);
      pinned_ = true;
      return;
    }
#endif
    std::fprintf(stderr, "memory %s: vector, or in a CUDA build pinned or huge\n", memory.c_str());
    std::exit(2);
  }
  ~Store() {
#if defined(EF_HAVE_CUDA_BACKEND)
    if (pinned_) ef::runtime::cuda::FreePinned(data_, bytes_, kind_);
#endif
  }
  Store(const Store&) = delete;
  Store& operator=(const Store&) = delete;
  std::byte* data() const { return data_; }

 private:
  size_t bytes_;
  std::vector<std::byte> vec_;
  std::byte* data_ = nullptr;
  bool pinned_ = false;
#if defined(EF_HAVE_CUDA_BACKEND)
  ef::runtime::cuda::PinnedKind kind_ = ef::runtime::cuda::PinnedKind::kDriver;
#endif
};

Weight Make(DType t, int64_t rows, int64_t cols, const std::string& memory, std::unique_ptr<Store>& store) {
  std::mt19937 rng(1);
  std::normal_distribution<float> nd(0.f, 0.02f);
  std::vector<float> f(static_cast<size_t>(rows * cols));
  for (float& v : f) v = nd(rng);
  Weight w{t, nullptr, rows, cols};
  store = std::make_unique<Store>(memory, w.nbytes());
  if (t == DType::kBF16) {
    auto* b = reinterpret_cast<uint16_t*>(store->data());
    for (size_t i = 0; i < f.size(); ++i) b[i] = ef::F32ToBf16(f[i]);
  } else if (t == DType::kPbf16) {
    std::vector<uint16_t> b(f.size());
    for (size_t i = 0; i < f.size(); ++i) b[i] = ef::F32ToBf16(f[i]);
    if (!ef::PackBf16(b.data(), rows, cols, store->data(), w.nbytes()).ok()) {
      std::fprintf(stderr, "pack bf16 failed\n");
      std::exit(1);
    }
  } else if (!ef::Quantize(t, DType::kF32, f.data(), rows, cols, store->data(), w.nbytes()).ok()) {
    std::fprintf(stderr, "quantize failed\n");
    std::exit(1);
  }
  w.data = store->data();
  return w;
}

template <typename F>
double MedianMs(int reps, double gap_ms, F&& f) {
  std::vector<double> t;
  for (int r = 0; r < reps; ++r) {
    if (gap_ms > 0) std::this_thread::sleep_for(std::chrono::duration<double, std::milli>(gap_ms));
    auto a = std::chrono::steady_clock::now();
    f();
    t.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - a).count());
  }
  std::sort(t.begin(), t.end());
  return t[t.size() / 2];
}

}  // namespace

int main(int argc, char** argv) {
  std::vector<std::string> pos;
  std::string memory = "vector";
  double gap_ms = 0;
  std::vector<int> row_counts{1, 4, 16};
  bool exact_too = true;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a.rfind("--memory=", 0) == 0) {
      memory = a.substr(9);
    } else if (a.rfind("--gap-ms=", 0) == 0) {
      gap_ms = std::atof(a.c_str() + 9);
    } else if (a.rfind("--rows=", 0) == 0) {
      row_counts.clear();
      if (a.size() == 7) {
        std::fprintf(stderr, "--rows= needs a list of row counts, e.g. --rows=1,4,16\n");
        return 2;
      }
      for (size_t p = 7; p < a.size();) {
        const size_t q = std::min(a.find(',', p), a.size());
        row_counts.push_back(std::max(1, std::atoi(a.substr(p, q - p).c_str())));
        p = q + 1;
      }
    } else if (a == "--no-exact") {
      exact_too = false;
    } else if (a.rfind("--", 0) == 0) {
      std::fprintf(stderr, "unknown option %s (see the comment at the top of host_expert_bench.cc)\n", a.c_str());
      return 2;
    } else {
      pos.push_back(a);
    }
  }
  if (memory != "vector" && memory != "pinned" && memory != "huge") {
    std::fprintf(stderr, "--memory=%s: vector, pinned or huge\n", memory.c_str());
    return 2;
  }
  const int64_t hidden = pos.size() > 0 ? std::atoll(pos[0].c_str()) : 4096;
  const int64_t inter = pos.size() > 1 ? std::atoll(pos[1].c_str()) : 14336;
  const int reps = pos.size() > 2 ? std::atoi(pos[2].c_str()) : 20;
  const int copies = std::max(1, pos.size() > 3 ? std::atoi(pos[3].c_str()) : 1);
  ef::ThreadPool& pool = ef::ThreadPool::Default();
  ef::runtime::CpuBackend cpu(&pool);
  std::printf(
      "expert %lld x %lld, %d copies in %s memory, %.1f ms idle before each, %d threads (%s, polling %lld us), "
      "vector path %s\n",
      static_cast<long long>(hidden), static_cast<long long>(inter), copies, memory.c_str(), gap_ms, pool.num_threads(),
      pool.pinned() ? "bound to CPUs" : "unbound", static_cast<long long>(pool.spin().count()),
      ef::runtime::HostGemvVectorized(Weight{DType::kBF16, nullptr, 1, 64}) ? "avx512" : "none");
#if defined(EF_HAVE_CUDA_BACKEND)
  std::printf("transparent huge pages: %s\n", ef::runtime::cuda::TransparentHugePages().c_str());
#endif
  std::printf("%-6s %4s %4s %12s %10s %12s %10s %8s\n", "dtype", "x", "rows", "exact_ms", "exact_GB/s", "vector_ms",
              "vector_GB/s", "speedup");
  using ef::runtime::HostPath;
  for (DType t : {DType::kBF16, DType::kPbf16, DType::kQ8, DType::kQ4}) {
    struct Expert {
      std::unique_ptr<Store> sg, su, sd;
      Weight g, u, d;
    };
    std::vector<Expert> ex(static_cast<size_t>(copies));
    const auto t_alloc = std::chrono::steady_clock::now();
    ex[0].g = Make(t, inter, hidden, memory, ex[0].sg);
    ex[0].u = Make(t, inter, hidden, memory, ex[0].su);
    ex[0].d = Make(t, hidden, inter, memory, ex[0].sd);
    for (size_t c = 1; c < ex.size(); ++c) {
      Expert& e = ex[c];
      e.g = ex[0].g, e.u = ex[0].u, e.d = ex[0].d;
      for (auto [w, s] : {std::pair{&e.g, &e.sg}, {&e.u, &e.su}, {&e.d, &e.sd}}) {
        *s = std::make_unique<Store>(memory, w->nbytes());
        std::memcpy((*s)->data(), w->data, w->nbytes());
        w->data = (*s)->data();
      }
    }
    if (memory != "vector")
      std::printf("# %s: %d copies allocated, made (random, quantized) and filled in %.2f s\n", ef::DTypeName(t),
                  copies, std::chrono::duration<double>(std::chrono::steady_clock::now() - t_alloc).count());
    const Weight& g = ex[0].g;
    const double gb = static_cast<double>(ex[0].g.nbytes() + ex[0].u.nbytes() + ex[0].d.nbytes()) / 1e9;
    size_t turn = 0;
    for (int m : row_counts) {
      std::vector<float> x(static_cast<size_t>(m * hidden), 0.1f), gy(static_cast<size_t>(m * inter)), uy(gy.size()),
          y(x.size());
      auto exact = [&] {
        const Expert& e = ex[turn++ % ex.size()];
        cpu.Gemm(x.data(), m, e.g, nullptr, gy.data(), false);
        cpu.Gemm(x.data(), m, e.u, nullptr, uy.data(), false);
        cpu.SiluMul(gy.data(), uy.data(), gy.data(), m * inter);
        cpu.Gemm(gy.data(), m, e.d, nullptr, y.data(), false);
      };
      double e = 0;
      if (exact_too) {
        exact();
        e = MedianMs(std::max(3, reps / 4), gap_ms, exact);
      }
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
        const double v = MedianMs(reps, gap_ms, vec);
        std::printf("%-6s %4s %4d %12.3f %10.1f %12.3f %10.1f %7.2fx\n", ef::DTypeName(t),
                    a == HostPath::kInt8X ? "int8"
                    : a == HostPath::kAmx ? "amx"
                                          : "fp32",
                    m, e, e > 0 ? gb / e * 1e3 : 0.0, v, gb / v * 1e3, e / v);
      }
    }
  }
  return 0;
}
