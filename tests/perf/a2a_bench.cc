// ef_a2a_bench: the expert-parallel token exchange of one Mixtral-shaped MoE layer (hidden 4096,
// top-2 of 8 experts placed contiguously over the ranks) through NcclExchange, against a raw NCCL
// all-to-all (grouped ncclSend/ncclRecv) moving the same bytes.
//
// Per layer the executor (comm/expert_parallel_executor.cc) exchanges counts (MPI), dispatches one
// fp32 row of hidden + 1 floats (the expert id rides in the last) per (token, expert) pair to the
// expert's rank, and returns hidden floats per pair (combine). This bench times exactly those three
// TokenExchange calls on device buffers (experts skipped: exchange only), and the raw NCCL
// baseline times the two all-to-alls with the same per-peer byte counts on its own communicator
// (counts known in advance). Each timed iteration starts at an MPI barrier; its time is the
// slowest rank's; the table shows the median over iterations. Self rows are copied by both.
//
//   mpirun -np N ef_a2a_bench [--tokens 16,64,256] [--iters 50] [--warmup 5] [--seed 1] [--json FILE]
#include <cuda_runtime_api.h>
#include <mpi.h>
#include <nccl.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <memory>
#include <nlohmann/json.hpp>
#include <random>
#include <string>
#include <vector>

#include "comm/mpi_context.h"
#include "comm/nccl_exchange.h"
#include "runtime/backend/backend.h"
#include "runtime/core/build_info.h"

namespace {

using ef::comm::MpiContext;

constexpr int kHidden = 4096, kExperts = 8, kTopK = 2;

[[noreturn]] void Die(const std::string& msg) {
  std::fprintf(stderr, "ef_a2a_bench: %s\n", msg.c_str());
  std::fflush(stderr);
  MPI_Abort(MPI_COMM_WORLD, 1);
  std::exit(1);
}

#define BENCH_CUDA(stmt)                                                                                            \
  do {                                                                                                              \
    cudaError_t e_ = (stmt);                                                                                        \
    if (e_ != cudaSuccess)                                                                                          \
      Die(std::string(#stmt) + ": " + cudaGetErrorString(e_) + " at " + __FILE__ + ":" + std::to_string(__LINE__)); \
  } while (0)
#define BENCH_NCCL(stmt)                                                                                            \
  do {                                                                                                              \
    ncclResult_t r_ = (stmt);                                                                                       \
    if (r_ != ncclSuccess)                                                                                          \
      Die(std::string(#stmt) + ": " + ncclGetErrorString(r_) + " at " + __FILE__ + ":" + std::to_string(__LINE__)); \
  } while (0)

struct Args {
  std::vector<int> tokens = {16, 64, 256};
  int iters = 50, warmup = 5;
  uint64_t seed = 1;
  std::string json;
};

Args ParseArgs(int argc, char** argv) {
  Args a;
  for (int i = 1; i < argc; ++i) {
    std::string k = argv[i];
    auto next = [&]() -> std::string {
      if (i + 1 >= argc) Die("missing value for " + k);
      return argv[++i];
    };
    if (k == "--tokens") {
      a.tokens.clear();
      std::string s = next();
      for (size_t p = 0; p < s.size();) {
        size_t c = s.find(',', p);
        if (c == std::string::npos) c = s.size();
        a.tokens.push_back(std::stoi(s.substr(p, c - p)));
        p = c + 1;
      }
    } else if (k == "--iters") {
      a.iters = std::stoi(next());
    } else if (k == "--warmup") {
      a.warmup = std::stoi(next());
    } else if (k == "--seed") {
      a.seed = std::stoull(next());
    } else if (k == "--json") {
      a.json = next();
    } else {
      Die("usage: ef_a2a_bench [--tokens 16,64,256] [--iters N] [--warmup N] [--seed N] [--json FILE]");
    }
  }
  return a;
}

double Median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  const size_t n = v.size();
  return n == 0 ? 0 : (n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]));
}

// Seconds of fn on the slowest rank, per iteration, after a barrier.
template <typename Fn>
std::vector<double> Time(int warmup, int iters, Fn&& fn) {
  std::vector<double> out;
  for (int it = 0; it < warmup + iters; ++it) {
    MPI_Barrier(MPI_COMM_WORLD);
    const auto t0 = std::chrono::steady_clock::now();
    fn();
    double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count(), mx = 0;
    MPI_Allreduce(&s, &mx, 1, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);
    if (it >= warmup) out.push_back(mx);
  }
  return out;
}

// Grouped send/recv of per-peer byte counts; returns after the stream has finished.
void RawAllToAllV(const char* send, const std::vector<int64_t>& send_bytes, char* recv,
                  const std::vector<int64_t>& recv_bytes, ncclComm_t comm, cudaStream_t stream) {
  const int n = static_cast<int>(send_bytes.size());
  int64_t so = 0, ro = 0;
  BENCH_NCCL(ncclGroupStart());
  for (int r = 0; r < n; ++r) {
    if (send_bytes[r] > 0) BENCH_NCCL(ncclSend(send + so, send_bytes[r], ncclChar, r, comm, stream));
    if (recv_bytes[r] > 0) BENCH_NCCL(ncclRecv(recv + ro, recv_bytes[r], ncclChar, r, comm, stream));
    so += send_bytes[r];
    ro += recv_bytes[r];
  }
  BENCH_NCCL(ncclGroupEnd());
  BENCH_CUDA(cudaStreamSynchronize(stream));
}

int Main(int argc, char** argv) {
  const Args a = ParseArgs(argc, argv);
  auto ctx_or = MpiContext::Init();
  if (!ctx_or.ok()) {
    std::fprintf(stderr, "ef_a2a_bench: %s\n", ctx_or.status().ToString().c_str());
    return 1;
  }
  MpiContext* ctx = ctx_or.value();
  const int N = ctx->size(), me = ctx->rank();
  if (kExperts % N != 0) Die("the world size must divide 8 experts");
  int num_devices = 0;
  BENCH_CUDA(cudaGetDeviceCount(&num_devices));
  if (num_devices == 0) Die("no CUDA device");
  const int dev = ctx->local_rank() % num_devices;
  BENCH_CUDA(cudaSetDevice(dev));
  auto backend_or = ef::runtime::MakeBackend("cuda", dev);
  if (!backend_or.ok()) Die(backend_or.status().ToString());
  ef::runtime::Backend& backend = *backend_or.value();
  auto ex_or = ef::comm::NcclExchange::Create(ctx, backend);
  if (!ex_or.ok()) Die(ex_or.status().ToString());
  ef::comm::TokenExchange& ex = *ex_or.value();

  ncclUniqueId id;
  if (me == 0) BENCH_NCCL(ncclGetUniqueId(&id));
  MPI_Bcast(&id, sizeof(id), MPI_BYTE, 0, MPI_COMM_WORLD);
  ncclComm_t comm;
  BENCH_NCCL(ncclCommInitRank(&comm, N, id, me));
  cudaStream_t stream;
  BENCH_CUDA(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));

  cudaDeviceProp prop;
  BENCH_CUDA(cudaGetDeviceProperties(&prop, dev));
  int nccl_v = 0;
  ncclGetVersion(&nccl_v);
  const char* nvls = std::getenv("NCCL_NVLS_ENABLE");
  if (me == 0) {
    std::printf("# ef_a2a_bench: git %s, build %s, %d ranks, device %s, NCCL %d, NCCL_NVLS_ENABLE=%s\n", EF_GIT_SHA,
                EF_BUILD_TYPE, N, prop.name, nccl_v, nvls ? nvls : "(unset)");
    if (std::string(EF_BUILD_TYPE) == "Debug") std::printf("# WARNING: debug build, timings are not representative\n");
    std::printf(
        "# Mixtral MoE layer: hidden %d, top-%d of %d experts, %d experts per rank (contiguous), uniform "
        "routing (seed %llu); dispatch rows (hidden+1) fp32, combine rows hidden fp32\n",
        kHidden, kTopK, kExperts, kExperts / N, static_cast<unsigned long long>(a.seed));
    std::printf(
        "# exchange = NcclExchange ExchangeCounts + dispatch + combine (experts skipped); raw = grouped "
        "ncclSend/ncclRecv of the same bytes; median of %d iterations of the slowest rank\n",
        a.iters);
    std::printf("%8s %10s %12s %12s %12s %12s %8s\n", "tokens", "pairs_out", "MiB_out", "exchange_us", "raw_us",
                "counts_us", "ratio");
  }

  nlohmann::json records = nlohmann::json::array();
  const size_t dispatch_row = (kHidden + 1) * sizeof(float), combine_row = kHidden * sizeof(float);
  for (int T : a.tokens) {
    // Routing: each token picks top-2 distinct experts uniformly.
    std::mt19937_64 rng(a.seed * 1000003 + static_cast<uint64_t>(me) * 7919 + T);
    std::vector<int64_t> send_counts(N, 0), recv_counts(N, 0);
    for (int t = 0; t < T; ++t) {
      const int e0 = static_cast<int>(rng() % kExperts);
      int e1 = static_cast<int>(rng() % (kExperts - 1));
      if (e1 >= e0) ++e1;
      ++send_counts[e0 / (kExperts / N)];
      ++send_counts[e1 / (kExperts / N)];
    }
    if (!ex.ExchangeCounts(send_counts, recv_counts, "bench counts").ok()) Die("counts exchange failed");
    int64_t P = 0, R = 0;
    for (int r = 0; r < N; ++r) {
      P += send_counts[r];
      R += recv_counts[r];
    }
    auto alloc = [&](size_t bytes) {
      auto b = backend.Allocate(std::max<size_t>(bytes, 16));
      if (!b.ok()) Die(b.status().ToString());
      return std::move(b).value();
    };
    ef::runtime::Buffer send = alloc(P * dispatch_row), recv = alloc(R * dispatch_row);
    ef::runtime::Buffer y = alloc(R * combine_row), back = alloc(P * combine_row);
    std::vector<int64_t> recv_tmp(N);

    auto exchange = [&] {
      if (!ex.ExchangeCounts(send_counts, recv_tmp, "bench counts").ok()) Die("counts exchange failed");
      if (!ex.AllToAllV(send.data(), send_counts, recv.data(), recv_counts, dispatch_row, "bench dispatch").ok())
        Die("dispatch failed");
      if (!ex.AllToAllV(y.data(), recv_counts, back.data(), send_counts, combine_row, "bench combine").ok())
        Die("combine failed");
    };
    auto counts_only = [&] {
      if (!ex.ExchangeCounts(send_counts, recv_tmp, "bench counts").ok()) Die("counts exchange failed");
    };
    std::vector<int64_t> sd(N), rd(N), sc(N), rc(N);
    for (int r = 0; r < N; ++r) {
      sd[r] = send_counts[r] * dispatch_row;
      rd[r] = recv_counts[r] * dispatch_row;
      sc[r] = recv_counts[r] * combine_row;
      rc[r] = send_counts[r] * combine_row;
    }
    auto raw = [&] {
      RawAllToAllV(static_cast<const char*>(send.data()), sd, static_cast<char*>(recv.data()), rd, comm, stream);
      RawAllToAllV(static_cast<const char*>(y.data()), sc, static_cast<char*>(back.data()), rc, comm, stream);
    };
    backend.Synchronize();
    // Interleave the three so drift in clocks or link state hits them alike.
    std::vector<double> t_ex, t_raw, t_cnt;
    for (int rep = 0; rep < 2; ++rep) {
      auto e = Time(a.warmup, a.iters / 2, exchange);
      auto r = Time(a.warmup, a.iters / 2, raw);
      auto c = Time(a.warmup, a.iters / 2, counts_only);
      t_ex.insert(t_ex.end(), e.begin(), e.end());
      t_raw.insert(t_raw.end(), r.begin(), r.end());
      t_cnt.insert(t_cnt.end(), c.begin(), c.end());
    }
    const double ex_us = Median(t_ex) * 1e6, raw_us = Median(t_raw) * 1e6, cnt_us = Median(t_cnt) * 1e6;
    const int64_t out_pairs = P - send_counts[me];
    const double mib_out =
        (static_cast<double>(out_pairs) * dispatch_row + static_cast<double>(R - recv_counts[me]) * combine_row) /
        (1 << 20);
    // Rank 0's counts are printed; times are the slowest rank's.
    if (me == 0)
      std::printf("%8d %10lld %12.3f %12.1f %12.1f %12.1f %8.2f\n", T, static_cast<long long>(out_pairs), mib_out,
                  ex_us, raw_us, cnt_us, ex_us / raw_us);
    records.push_back({{"ranks", N},
                       {"tokens_per_rank", T},
                       {"pairs_sent_rank0", out_pairs},
                       {"mib_sent_rank0", mib_out},
                       {"exchange_us", ex_us},
                       {"raw_nccl_us", raw_us},
                       {"counts_us", cnt_us},
                       {"ratio", ex_us / raw_us},
                       {"iters", static_cast<int>(t_ex.size())}});
  }
  if (me == 0) {
    std::printf("# ratio = exchange_us / raw_us (target <= 1.3); counts_us = the MPI counts exchange alone\n");
    if (!a.json.empty()) {
      nlohmann::json doc = {{"bench", "ef_a2a_bench"}, {"git", EF_GIT_SHA},   {"build_type", EF_BUILD_TYPE},
                            {"device", prop.name},     {"ranks", N},          {"nccl_version", nccl_v},
                            {"hidden", kHidden},       {"experts", kExperts}, {"top_k", kTopK},
                            {"seed", a.seed},          {"records", records}};
      std::ofstream(a.json) << doc.dump(2) << "\n";
    }
  }
  BENCH_CUDA(cudaStreamDestroy(stream));
  ncclCommDestroy(comm);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  const int rc = Main(argc, argv);  // every communicator and buffer is released inside
  if (MpiContext* ctx = MpiContext::Get()) ctx->Finalize();
  return rc;
}
