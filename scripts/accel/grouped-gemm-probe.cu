// Standalone probe: E expert GEMMs y_e [m_e, n] = x_e [m_e, k] . w_e [n, k]^T in bf16 (fp32 sums),
// as a loop of cublasGemmEx calls against one cublasGemmGroupedBatchedEx call; prints the median
// of 15 synchronised runs of each (and the loop's host enqueue time) and whether the bits agree.
// The m_e vary around ROWS (ROWS/2 .. 3 ROWS/2). The numbers behind CudaBackendOptions::
// kGroupedExpertMaxMacs (docs/results/gpu_kernels/README.md):
//
//   nvcc -O2 -arch=sm_90 -std=c++17 -o /tmp/probe scripts/accel/grouped-gemm-probe.cu -lcublas
//   /tmp/probe E ROWS N K [c32]      e.g. 128 128 768 2048 (Qwen3-30B-A3B gate), 8 512 14336 4096
//
// c32 = 1 asks for fp32 outputs (cuBLAS 13.1 refuses those from bf16 operands: status 15).
#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <vector>

#define CK(x)                                                      \
  do {                                                             \
    const int ck_ = static_cast<int>(x);                           \
    if (ck_ != 0) {                                                \
      std::printf("error %d at %s:%d\n", ck_, __FILE__, __LINE__); \
      std::exit(1);                                                \
    }                                                              \
  } while (0)

using Clock = std::chrono::steady_clock;

__global__ void Fill(__nv_bfloat16* p, size_t n, unsigned seed) {
  for (size_t i = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<size_t>(gridDim.x) * blockDim.x) {
    unsigned h = static_cast<unsigned>(i) * 2654435761u ^ seed;
    h ^= h >> 13;
    h *= 0x5bd1e995;
    h ^= h >> 15;
    p[i] = __float2bfloat16(((h & 0xffff) / 65536.f - 0.5f) * 0.05f);
  }
}

int main(int argc, char** argv) {
  if (argc < 5) {
    std::printf("usage: %s E ROWS N K [c32]\n", argv[0]);
    return 2;
  }
  const int E = std::atoi(argv[1]), rows = std::atoi(argv[2]), N = std::atoi(argv[3]), K = std::atoi(argv[4]);
  const bool c32 = argc > 5 && std::atoi(argv[5]) != 0;
  cublasHandle_t h;
  CK(cublasCreate(&h));
  void* ws;
  CK(cudaMalloc(&ws, 32 << 20));
  CK(cublasSetWorkspace(h, ws, 32 << 20));
  cudaStream_t st;
  CK(cudaStreamCreate(&st));
  CK(cublasSetStream(h, st));
  std::vector<int> m(E);
  std::vector<size_t> off(E);
  size_t total = 0;
  for (int e = 0; e < E; ++e) {
    m[e] = std::max(1, rows / 2 + (e * 7919) % (rows + 1));
    off[e] = total;
    total += m[e];
  }
  std::vector<__nv_bfloat16*> w(E);
  for (int e = 0; e < E; ++e) {
    CK(cudaMalloc(&w[e], static_cast<size_t>(N) * K * 2));
    Fill<<<256, 256>>>(w[e], static_cast<size_t>(N) * K, e);
  }
  __nv_bfloat16* x;
  CK(cudaMalloc(&x, total * K * 2));
  Fill<<<256, 256>>>(x, total * K, 99);
  const int cb = c32 ? 4 : 2;
  const cudaDataType ct = c32 ? CUDA_R_32F : CUDA_R_16BF;
  char* y;
  CK(cudaMalloc(&y, total * N * cb));
  double flops = 0;
  for (int e = 0; e < E; ++e) flops += 2.0 * m[e] * N * K;
  const float one = 1.f, zero = 0.f;
  auto loop = [&] {
    for (int e = 0; e < E; ++e)
      CK(cublasGemmEx(h, CUBLAS_OP_T, CUBLAS_OP_N, N, m[e], K, &one, w[e], CUDA_R_16BF, K, x + off[e] * K, CUDA_R_16BF,
                      K, &zero, y + off[e] * N * cb, ct, N, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
  };
  std::vector<cublasOperation_t> ta(E, CUBLAS_OP_T), tb(E, CUBLAS_OP_N);
  std::vector<int> ns(E, N), ks(E, K), sizes(E, 1);
  std::vector<float> alpha(E, 1.f), beta(E, 0.f);
  std::vector<const void*> a(E), b(E);
  std::vector<void*> c(E);
  for (int e = 0; e < E; ++e) {
    a[e] = w[e];
    b[e] = x + off[e] * K;
    c[e] = y + off[e] * N * cb;
  }
  const void** da;
  const void** db;
  void** dc;
  CK(cudaMalloc(&da, E * sizeof(void*)));
  CK(cudaMalloc(&db, E * sizeof(void*)));
  CK(cudaMalloc(&dc, E * sizeof(void*)));
  CK(cudaMemcpy(da, a.data(), E * sizeof(void*), cudaMemcpyHostToDevice));
  CK(cudaMemcpy(db, b.data(), E * sizeof(void*), cudaMemcpyHostToDevice));
  CK(cudaMemcpy(dc, c.data(), E * sizeof(void*), cudaMemcpyHostToDevice));
  auto grouped = [&] {
    CK(cublasGemmGroupedBatchedEx(h, ta.data(), tb.data(), ns.data(), m.data(), ks.data(), alpha.data(), da,
                                  CUDA_R_16BF, ks.data(), db, CUDA_R_16BF, ks.data(), beta.data(), dc, ct, ns.data(), E,
                                  sizes.data(), CUBLAS_COMPUTE_32F));
  };
  auto time = [&](auto run, const char* name) {
    for (int i = 0; i < 3; ++i) run();
    CK(cudaStreamSynchronize(st));
    std::vector<double> total_s, enqueue_s;
    for (int r = 0; r < 15; ++r) {
      const auto t0 = Clock::now();
      run();
      const auto t1 = Clock::now();
      CK(cudaStreamSynchronize(st));
      const auto t2 = Clock::now();
      enqueue_s.push_back(std::chrono::duration<double>(t1 - t0).count());
      total_s.push_back(std::chrono::duration<double>(t2 - t0).count());
    }
    std::sort(total_s.begin(), total_s.end());
    std::sort(enqueue_s.begin(), enqueue_s.end());
    std::printf("E %d rows~%d N %d K %d out %s %-8s %8.1f us (host enqueue %7.1f us) %6.1f TFLOP/s\n", E, rows, N, K,
                c32 ? "fp32" : "bf16", name, total_s[7] * 1e6, enqueue_s[7] * 1e6, flops / total_s[7] / 1e12);
  };
  const auto t0 = Clock::now();  // out of the idle clocks first
  while (std::chrono::duration<double>(Clock::now() - t0).count() < 0.3) loop();
  time(loop, "loop");
  time(grouped, "grouped");
  time(loop, "loop");
  time(grouped, "grouped");
  std::vector<char> y1(total * N * cb), y2(total * N * cb);
  loop();
  CK(cudaMemcpy(y1.data(), y, y1.size(), cudaMemcpyDeviceToHost));
  grouped();
  CK(cudaMemcpy(y2.data(), y, y2.size(), cudaMemcpyDeviceToHost));
  size_t differ = 0;
  for (size_t i = 0; i < y1.size(); ++i) differ += y1[i] != y2[i];
  std::printf("  bytes that differ, loop vs grouped: %zu of %zu\n", differ, y1.size());
  return 0;
}
