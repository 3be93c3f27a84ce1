// ef_a2a_bench: the expert-parallel token exchange of one Mixtral-shaped MoE layer (hidden 4096,
// top-2 of 8 experts placed contiguously over the ranks) through NcclExchange, against a raw NCCL
// all-to-all (grouped ncclSend/ncclRecv) moving the same bytes.
//
// Per layer the executor (comm/expert_parallel_executor.cc) exchanges rows per (rank, expert)
// (MPI), dispatches one fp32 row of hidden floats per (token, expert) pair to the expert's rank
// (the row's expert follows from the counts and the send order), and returns hidden floats per
// pair (combine). `exchange` times exactly those three TokenExchange calls on device buffers
// (experts skipped); `layer` adds what the executor does around them on the device: one upload of
// the pairs' indices and weights, GatherRows into the send buffer, GatherRows of the returned rows
// into combine order and one ScatterAddRows per top-k slot (then a stream synchronisation). The raw NCCL baseline times
// the two all-to-alls with the same per-peer byte counts on its own communicator (counts known in advance). Each timed
// iteration starts at an MPI barrier; its time is the slowest rank's; the table shows the median over iterations. Self
// rows go through NCCL in both.
//
//   mpirun -np N ef_a2a_bench [--tokens 16,64,256] [--iters 50] [--warmup 5] [--seed 1] [--json FILE]
#include <cuda_runtime_api.h>
#include <mpi.h>
#include <nccl.h>

#include <algorithm>
#include <bit>
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

// Grouped send/recv of per-peer byte counts; returns after the stream has finished. On a
// non-blocking communicator ncclGroupEnd hands the launch to a thread and says ncclInProgress;
// the launch is then awaited by spinning on ncclCommGetAsyncError (no sleeps).
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
  ncclResult_t rc = ncclGroupEnd();
  while (rc == ncclInProgress) BENCH_NCCL(ncclCommGetAsyncError(comm, &rc));
  BENCH_NCCL(rc);
  BENCH_CUDA(cudaStreamSynchronize(stream));
}

// A communicator of the world; non-blocking ones are awaited by spinning.
ncclComm_t MakeComm(int n, int me, bool blocking) {
  ncclUniqueId id;
  if (me == 0) BENCH_NCCL(ncclGetUniqueId(&id));
  MPI_Bcast(&id, sizeof(id), MPI_BYTE, 0, MPI_COMM_WORLD);
  ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
  config.blocking = blocking ? 1 : 0;
  ncclComm_t comm = nullptr;
  ncclResult_t rc = ncclCommInitRankConfig(&comm, n, id, me, &config);
  while (rc == ncclInProgress) BENCH_NCCL(ncclCommGetAsyncError(comm, &rc));
  BENCH_NCCL(rc);
  return comm;
}

// The '#' header and the table's column names (rank 0).
void PrintHeader(const Args& a, int N, const cudaDeviceProp& prop, int nccl_v) {
  const char* nvls = std::getenv("NCCL_NVLS_ENABLE");
  std::printf("# ef_a2a_bench: git %s, build %s, %d ranks, device %s, NCCL %d, NCCL_NVLS_ENABLE=%s\n", EF_GIT_SHA,
              EF_BUILD_TYPE, N, prop.name, nccl_v, nvls ? nvls : "(unset)");
  if (std::string(EF_BUILD_TYPE) == "Debug") std::printf("# WARNING: debug build, timings are not representative\n");
  std::printf(
      "# Mixtral MoE layer: hidden %d, top-%d of %d experts, %d experts per rank (contiguous), uniform "
      "routing (seed %llu); dispatch and combine rows hidden fp32, rows per (rank, expert) over MPI\n",
      kHidden, kTopK, kExperts, kExperts / N, static_cast<unsigned long long>(a.seed));
  std::printf(
      "# exchange = NcclExchange ExchangeCounts + dispatch + combine (experts skipped); layer = exchange + "
      "index upload, 2 GatherRows, 2 ScatterAddRows; raw = grouped ncclSend/ncclRecv of the same bytes (raw_nb: on a "
      "non-blocking communicator); median of %d iterations of the slowest rank\n",
      a.iters);
  std::printf("%8s %10s %10s %12s %10s %10s %10s %10s %8s %8s\n", "tokens", "pairs_out", "MiB_out", "exchange_us",
              "layer_us", "raw_us", "raw_nb_us", "counts_us", "ratio", "l_ratio");
}

// One token count's uniform routing as the executor lays it out.
struct Routing {
  std::vector<int32_t> ids;      // [token * kTopK + j]
  std::vector<int64_t> send_ce;  // pairs per (destination rank, expert)
  std::vector<int32_t> idx;      // the index upload: send rows' tokens, combine rows' send rows and weights, 0..T-1
};

Routing MakeRouting(const Args& a, int N, int me, int T) {
  const int per_rank = kExperts / N;
  // Each token picks top-2 distinct experts uniformly.
  std::mt19937_64 rng(a.seed * 1000003 + static_cast<uint64_t>(me) * 7919 + T);
  std::vector<int32_t> ids(static_cast<size_t>(T) * kTopK);
  for (int t = 0; t < T; ++t) {
    const int e0 = static_cast<int>(rng() % kExperts);
    int e1 = static_cast<int>(rng() % (kExperts - 1));
    if (e1 >= e0) ++e1;
    ids[2 * t] = e0;
    ids[2 * t + 1] = e1;
  }
  // Pairs in the executor's send order, (destination, expert, token); expert e's rank is
  // e / per_rank, so the key (destination, expert) is simply e.
  std::vector<int64_t> send_ce(static_cast<size_t>(N) * kExperts, 0);
  for (int32_t e : ids) ++send_ce[static_cast<size_t>(e / per_rank) * kExperts + e];
  std::vector<int64_t> first(kExperts + 1, 0);
  for (int e = 0; e < kExperts; ++e)
    first[e + 1] = first[e] + send_ce[static_cast<size_t>(e / per_rank) * kExperts + e];
  // The executor's index upload: each send row's token, each combine row's send row and weight
  // (combine row j * T + t: token t's j-th smallest expert), then 0..T-1.
  const int64_t P = static_cast<int64_t>(ids.size());
  std::vector<int32_t> idx(3 * P + T);
  std::vector<int64_t> cursor(first.begin(), first.end() - 1);
  for (int64_t p = 0; p < P; ++p) {
    const int64_t t = p / kTopK, i = cursor[ids[p]]++;
    int64_t j = 0;  // the token's experts are distinct
    for (int64_t q = t * kTopK; q < (t + 1) * kTopK; ++q) j += ids[q] < ids[p];
    idx[i] = static_cast<int32_t>(t);
    idx[P + j * T + t] = static_cast<int32_t>(i);
    idx[2 * P + j * T + t] = std::bit_cast<int32_t>(p % kTopK == 0 ? 0.625f : 0.375f);
  }
  for (int t = 0; t < T; ++t) idx[3 * P + t] = t;
  return {std::move(ids), std::move(send_ce), std::move(idx)};
}

// What every measurement runs on.
struct Comms {
  ef::runtime::Backend* backend = nullptr;
  ef::comm::TokenExchange* ex = nullptr;
  ncclComm_t comm = nullptr;     // blocking, for the raw baseline
  ncclComm_t comm_nb = nullptr;  // non-blocking, for raw_nb
  cudaStream_t stream = nullptr;
};

// Times exchange, layer, raw, raw_nb and the counts alone at T tokens per rank; rank 0 prints the
// row. Returns the JSON record.
nlohmann::json Measure(const Args& a, int N, int me, int T, const Comms& c) {
  const Routing routing = MakeRouting(a, N, me, T);
  const std::vector<int32_t>& ids = routing.ids;
  const std::vector<int64_t>& send_ce = routing.send_ce;
  const std::vector<int32_t>& idx = routing.idx;
  std::vector<int64_t> recv_ce(send_ce.size(), 0);
  const int64_t P = static_cast<int64_t>(ids.size());
  const size_t row_bytes = kHidden * sizeof(float);
  ef::runtime::Backend& backend = *c.backend;
  ef::comm::TokenExchange& ex = *c.ex;
  ncclComm_t comm = c.comm, comm_nb = c.comm_nb;
  cudaStream_t stream = c.stream;
  if (!ex.ExchangeCounts(send_ce, recv_ce, "bench counts").ok()) Die("counts exchange failed");
  std::vector<int64_t> send_rows(N, 0), recv_rows(N, 0);
  int64_t R = 0;
  for (int r = 0; r < N; ++r) {
    for (int e = 0; e < kExperts; ++e) {
      send_rows[r] += send_ce[static_cast<size_t>(r) * kExperts + e];
      recv_rows[r] += recv_ce[static_cast<size_t>(r) * kExperts + e];
    }
    R += recv_rows[r];
  }
  auto alloc = [&](size_t bytes) {
    auto b = backend.Allocate(std::max<size_t>(bytes, 16));
    if (!b.ok()) Die(b.status().ToString());
    return std::move(b).value();
  };
  ef::runtime::Buffer h = alloc(T * row_bytes), out = alloc(T * row_bytes);
  ef::runtime::Buffer idx_dev = alloc(idx.size() * sizeof(int32_t));
  ef::runtime::Buffer send = alloc(P * row_bytes), recv = alloc(R * row_bytes);
  ef::runtime::Buffer y = alloc(R * row_bytes), back = alloc(P * row_bytes);
  std::vector<int64_t> recv_tmp(recv_ce.size());

  auto exchange = [&] {
    if (!ex.ExchangeCounts(send_ce, recv_tmp, "bench counts").ok()) Die("counts exchange failed");
    if (!ex.AllToAllV(send.data(), send_rows, recv.data(), recv_rows, row_bytes, "bench dispatch").ok())
      Die("dispatch failed");
    if (!ex.AllToAllV(y.data(), recv_rows, back.data(), send_rows, row_bytes, "bench combine").ok())
      Die("combine failed");
  };
  auto layer = [&] {
    const int32_t* d = idx_dev.i32();
    backend.CopyToDevice(idx_dev.data(), idx.data(), idx.size() * sizeof(int32_t));
    backend.GatherRows(h.f32(), d, P, kHidden, send.f32());
    exchange();
    backend.GatherRows(back.f32(), d + P, P, kHidden, send.f32());
    for (int j = 0; j < kTopK; ++j)
      backend.ScatterAddRows(send.f32() + j * T * kHidden, d + 3 * P, reinterpret_cast<const float*>(d + 2 * P) + j * T,
                             T, kHidden, out.f32());
    backend.Synchronize();
  };
  auto counts_only = [&] {
    if (!ex.ExchangeCounts(send_ce, recv_tmp, "bench counts").ok()) Die("counts exchange failed");
  };
  std::vector<int64_t> sd(N), rd(N);
  for (int r = 0; r < N; ++r) {
    sd[r] = send_rows[r] * row_bytes;
    rd[r] = recv_rows[r] * row_bytes;
  }
  auto raw = [&] {
    RawAllToAllV(static_cast<const char*>(send.data()), sd, static_cast<char*>(recv.data()), rd, comm, stream);
    RawAllToAllV(static_cast<const char*>(y.data()), rd, static_cast<char*>(back.data()), sd, comm, stream);
  };
  auto raw_nb = [&] {
    RawAllToAllV(static_cast<const char*>(send.data()), sd, static_cast<char*>(recv.data()), rd, comm_nb, stream);
    RawAllToAllV(static_cast<const char*>(y.data()), rd, static_cast<char*>(back.data()), sd, comm_nb, stream);
  };
  backend.Synchronize();
  // Interleave the five so drift in clocks or link state hits them alike.
  std::vector<double> t_ex, t_layer, t_raw, t_raw_nb, t_cnt;
  auto add = [](std::vector<double>* to, const std::vector<double>& from) {
    to->insert(to->end(), from.begin(), from.end());
  };
  for (int rep = 0; rep < 2; ++rep) {
    add(&t_ex, Time(a.warmup, a.iters / 2, exchange));
    add(&t_layer, Time(a.warmup, a.iters / 2, layer));
    add(&t_raw, Time(a.warmup, a.iters / 2, raw));
    add(&t_raw_nb, Time(a.warmup, a.iters / 2, raw_nb));
    add(&t_cnt, Time(a.warmup, a.iters / 2, counts_only));
  }
  const double ex_us = Median(t_ex) * 1e6, layer_us = Median(t_layer) * 1e6, raw_us = Median(t_raw) * 1e6,
               raw_nb_us = Median(t_raw_nb) * 1e6, cnt_us = Median(t_cnt) * 1e6;
  const int64_t out_pairs = P - send_rows[me];
  const double mib_out =
      static_cast<double>(out_pairs + R - recv_rows[me]) * static_cast<double>(row_bytes) / (1 << 20);
  // Rank 0's counts are printed; times are the slowest rank's.
  if (me == 0)
    std::printf("%8d %10lld %10.3f %12.1f %10.1f %10.1f %10.1f %10.1f %8.2f %8.2f\n", T,
                static_cast<long long>(out_pairs), mib_out, ex_us, layer_us, raw_us, raw_nb_us, cnt_us, ex_us / raw_us,
                layer_us / raw_us);
  return {{"ranks", N},
          {"tokens_per_rank", T},
          {"pairs_sent_rank0", out_pairs},
          {"mib_sent_rank0", mib_out},
          {"exchange_us", ex_us},
          {"layer_us", layer_us},
          {"raw_nccl_us", raw_us},
          {"raw_nccl_nonblocking_us", raw_nb_us},
          {"counts_us", cnt_us},
          {"ratio", ex_us / raw_us},
          {"layer_ratio", layer_us / raw_us},
          {"iters", static_cast<int>(t_ex.size())}};
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

  // The baselines' communicators: blocking (raw), and non-blocking (raw_nb: what a non-blocking
  // communicator's per-group launch thread costs, for reference).
  ncclComm_t comm = MakeComm(N, me, true), comm_nb = MakeComm(N, me, false);
  cudaStream_t stream;
  BENCH_CUDA(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));

  cudaDeviceProp prop;
  BENCH_CUDA(cudaGetDeviceProperties(&prop, dev));
  int nccl_v = 0;
  ncclGetVersion(&nccl_v);
  if (me == 0) PrintHeader(a, N, prop, nccl_v);

  nlohmann::json records = nlohmann::json::array();
  const Comms comms{&backend, &ex, comm, comm_nb, stream};
  for (int T : a.tokens) records.push_back(Measure(a, N, me, T, comms));
  if (me == 0) {
    std::printf(
        "# ratio = exchange_us / raw_us (target <= 1.3), l_ratio = layer_us / raw_us; counts_us = the MPI counts "
        "exchange alone\n");
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
  ncclCommDestroy(comm_nb);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  const int rc = Main(argc, argv);  // every communicator and buffer is released inside
  if (MpiContext* ctx = MpiContext::Get()) ctx->Finalize();
  return rc;
}
