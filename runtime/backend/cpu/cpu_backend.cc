#include "runtime/backend/cpu/cpu_backend.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <numeric>
#include <string>
#include <vector>

#include "runtime/backend/cpu/host_gemv.h"
#include "runtime/core/block_scaled.h"
#include "runtime/core/packed_bf16.h"
#include "runtime/core/params.h"
#include "runtime/core/quant.h"
#include "runtime/core/sample_row.h"

EF_PARAM(CpuInt8X, std::string, "EF_CPU_INT8_X", "none",
         "CPU backend: multiply int4 (int4) or int8 and int4 (all) weights with x rounded to int8 per group of 64, "
         "as cache.cpu_compute's host kernel does (to measure what that costs in quality)");
EF_PARAM(CpuMemoryBudgetMiB, int64_t, "EF_CPU_MEMORY_BUDGET_MIB", 0,
         "cpu backend: memory its buffers (activations, KV cache, expert slots) may hold, MiB (0: no limit)");

namespace ef::runtime {
namespace {

// Dot product with 8 independent accumulators so the compiler vectorises without -ffast-math.
inline float Dot(const float* a, const float* b, int64_t n) {
  float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int j = 0; j < 8; ++j) acc[j] += a[i + j] * b[i + j];
  float s = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

// Row r of a weight as fp32: the stored row itself for F32, else converted (or dequantized) into
// scratch.
inline const float* WeightRow(const Weight& w, int64_t r, float* scratch) {
  if (IsQuantized(w.dtype)) {
    DequantizeRow(w.dtype, w.data, w.rows, w.cols, r, scratch);
    return scratch;
  }
  if (IsBlockScaled(w.dtype)) {
    DequantizeBlockScaledRow(w.dtype, w.data, w.rows, w.cols, r, scratch);
    return scratch;
  }
  if (w.dtype == DType::kPbf16) {  // the bf16 row's exact values: outputs as with the bf16 weight
    UnpackBf16RowF32(w.data, w.rows, w.cols, r, scratch);
    return scratch;
  }
  const size_t esz = DTypeSize(w.dtype);
  const auto* p = static_cast<const std::byte*>(w.data) + static_cast<size_t>(r * w.cols) * esz;
  if (w.dtype == DType::kF32) return reinterpret_cast<const float*>(p);
  ConvertToF32(w.dtype, p, scratch, static_cast<size_t>(w.cols));
  return scratch;
}

inline float VectorElement(const Weight& w, int64_t i) {
  float v;
  ConvertToF32(w.dtype, static_cast<const std::byte*>(w.data) + static_cast<size_t>(i) * DTypeSize(w.dtype), &v, 1);
  return v;
}

}  // namespace

CpuBackend::CpuBackend(ThreadPool* pool, size_t memory_budget)
    : pool_(pool),
      budget_(memory_budget > 0 ? memory_budget
                                : static_cast<size_t>(std::max<int64_t>(0, params::CpuMemoryBudgetMiB())) << 20) {}

std::string CpuBackend::name() const { return "cpu (" + std::to_string(pool_->num_threads()) + " threads)"; }

StatusOr<Buffer> CpuBackend::Allocate(size_t bytes) {
  size_t padded = (std::max<size_t>(bytes, 1) + 63) / 64 * 64;
  if (budget_ > 0 && bytes_in_use_.load() + padded > budget_)
    return ResourceExhausted("cpu backend: cannot allocate " + std::to_string(bytes) +
                             " bytes: " + std::to_string(bytes_in_use_.load()) + " of the budget of " +
                             std::to_string(budget_) + " bytes are in use (EF_CPU_MEMORY_BUDGET_MIB)");
  void* p = std::aligned_alloc(64, padded);
  if (!p) return ResourceExhausted("cpu backend: cannot allocate " + std::to_string(bytes) + " bytes of host memory");
  std::memset(p, 0, padded);
  bytes_in_use_ += padded;
  return Buffer(this, p, bytes);
}

void CpuBackend::Free(void* ptr, size_t bytes) {
  std::free(ptr);
  bytes_in_use_ -= (std::max<size_t>(bytes, 1) + 63) / 64 * 64;
}

void CpuBackend::CopyToDevice(void* dst, const void* src, size_t bytes) { std::memcpy(dst, src, bytes); }
void CpuBackend::CopyToHost(void* dst, const void* src, size_t bytes) { std::memcpy(dst, src, bytes); }
void CpuBackend::CopyOnDevice(void* dst, const void* src, size_t bytes) { std::memmove(dst, src, bytes); }

void CpuBackend::CopyBatchToBf16(const CopyItem* items, int num_items) {
  for (int i = 0; i < num_items; ++i) {
    const auto* src = static_cast<const float*>(items[i].src);
    auto* dst = static_cast<uint16_t*>(items[i].dst);
    for (size_t j = 0; j < items[i].bytes / sizeof(float); ++j) dst[j] = F32ToBf16(src[j]);
  }
}
void CpuBackend::SetZero(void* dst, size_t bytes) { std::memset(dst, 0, bytes); }

StatusOr<uint64_t> CpuBackend::UploadStepSeqs(const AttentionSeq* seqs_host, int num_seqs, int num_heads,
                                              int num_kv_heads, int head_dim) {
  step_seqs_.assign(seqs_host, seqs_host + std::max(num_seqs, 0));
  step_heads_ = num_heads;
  step_kv_heads_ = num_kv_heads;
  step_head_dim_ = head_dim;
  return uint64_t{0};  // nothing decided from the values
}

void CpuBackend::AppendKvStep(void* k_pool, void* v_pool, const float* k, const float* v, int64_t k_width,
                              int64_t v_width) {
  const size_t elem = kv_bf16_ ? sizeof(uint16_t) : sizeof(float);
  std::vector<CopyItem> items;
  for (const AttentionSeq& s : step_seqs_) {
    for (int i = 0; i < s.n_new; ++i) {
      const int64_t row = KvRow(s, s.n_total - s.n_new + i), src = s.q_row + i;
      items.push_back(
          {static_cast<std::byte*>(k_pool) + row * k_width * elem, k + src * k_width, sizeof(float) * k_width});
      if (v)
        items.push_back(
            {static_cast<std::byte*>(v_pool) + row * v_width * elem, v + src * v_width, sizeof(float) * v_width});
    }
  }
  if (kv_bf16_) {
    CopyBatchToBf16(items.data(), static_cast<int>(items.size()));
  } else {
    CopyBatch(items.data(), static_cast<int>(items.size()));
  }
}

void CpuBackend::AttentionStep(const float* q, const void* k_pool, const void* v_pool, float* out) {
  std::vector<AttentionSeq> seqs = step_seqs_;
  for (AttentionSeq& s : seqs) {
    s.k = k_pool;
    s.v = v_pool;
  }
  AttentionBatch(q, seqs.data(), static_cast<int>(seqs.size()), step_heads_, step_kv_heads_, step_head_dim_, out);
}

StatusOr<Weight> CpuBackend::UploadWeight(DType dtype, const void* host_data, int64_t rows, int64_t cols) {
  EF_RETURN_IF_ERROR(CheckWeightType("cpu backend", dtype, cols));
  return Weight{dtype, host_data, rows, cols};
}

void CpuBackend::Embed(const int32_t* ids, int n, const Weight& table, float* out) {
  for (int i = 0; i < n; ++i) {
    const size_t esz = DTypeSize(table.dtype);
    ConvertToF32(table.dtype,
                 static_cast<const std::byte*>(table.data) + static_cast<size_t>(ids[i]) * table.cols * esz,
                 out + static_cast<size_t>(i) * table.cols, static_cast<size_t>(table.cols));
  }
}

void CpuBackend::RmsNorm(const float* x, int64_t rows, int dim, const Weight& w, float eps, float* out) {
  std::vector<float> wf(dim);
  ConvertToF32(w.dtype, w.data, wf.data(), dim);
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x + r * dim;
    float* yr = out + r * dim;
    double ss = 0;
    for (int i = 0; i < dim; ++i) ss += static_cast<double>(xr[i]) * xr[i];
    float inv = 1.0f / std::sqrt(static_cast<float>(ss / dim) + eps);
    for (int i = 0; i < dim; ++i) yr[i] = (xr[i] * inv) * wf[i];
  }
}

void CpuBackend::RmsNormTwin(const float* x, int64_t rows, int dim, const Weight& w, float eps, float* out,
                             uint16_t* out16) {
  RmsNorm(x, rows, dim, w, eps, out);
  for (int64_t i = 0; i < rows * dim; ++i) out16[i] = F32ToBf16(out[i]);
}

void CpuBackend::Gemm(const float* x, int64_t m, const Weight& w, const Weight* bias, float* y, bool accumulate) {
  const int64_t n = w.rows, k = w.cols;
  // EF_CPU_INT8_X: x as the host kernel's int8 path multiplies it (HostGemv, RoundToInt8Groups).
  std::vector<float> rounded;
  static const std::string int8_x = Int8XChoice("EF_CPU_INT8_X", params::CpuInt8X(), "none");
  if (k % 64 == 0 && Int8XCovers(int8_x, w.dtype)) {
    rounded.resize(static_cast<size_t>(m * k));
    RoundToInt8Groups(x, m, k, rounded.data());
    x = rounded.data();
  }
  // Each worker owns a block of output columns (weight rows): every weight byte is read once
  // per call, which is what bounds decode; x rows stay in cache.
  pool_->ParallelFor(
      n,
      [&](int64_t begin, int64_t end) {
        std::vector<float> scratch(w.dtype == DType::kF32 ? 0 : static_cast<size_t>(k));
        for (int64_t j = begin; j < end; ++j) {
          const float* wr = WeightRow(w, j, scratch.data());
          const float b = bias && !bias->empty() ? VectorElement(*bias, j) : 0.f;
          for (int64_t i = 0; i < m; ++i) {
            float v = Dot(x + i * k, wr, k) + b;
            float& dst = y[i * n + j];
            dst = accumulate ? dst + v : v;
          }
        }
      },
      /*min_chunk=*/16);
}

void CpuBackend::Rope(float* x, const int32_t* positions, int64_t rows, int num_heads, int head_dim, float theta) {
  const int half = head_dim / 2;
  std::vector<float> inv_freq(half);
  for (int i = 0; i < half; ++i)
    inv_freq[i] = 1.0f / std::pow(theta, static_cast<float>(2 * i) / static_cast<float>(head_dim));
  std::vector<float> cs(half), sn(half);
  for (int64_t r = 0; r < rows; ++r) {
    for (int i = 0; i < half; ++i) {
      float a = static_cast<float>(positions[r]) * inv_freq[i];
      cs[i] = std::cos(a);
      sn[i] = std::sin(a);
    }
    for (int h = 0; h < num_heads; ++h) {
      float* v = x + (r * num_heads + h) * head_dim;
      for (int i = 0; i < half; ++i) {
        float a = v[i], b = v[i + half];
        v[i] = a * cs[i] - b * sn[i];
        v[i + half] = b * cs[i] + a * sn[i];
      }
    }
  }
}

void CpuBackend::Attention(const float* q, int n_new, const float* k, const float* v, int n_total, int num_heads,
                           int num_kv_heads, int head_dim, float* out) {
  const int group = num_heads / num_kv_heads;
  const int q_stride = num_heads * head_dim, kv_stride = num_kv_heads * head_dim;
  const float scale = 1.0f / std::sqrt(static_cast<float>(head_dim));
  const int offset = n_total - n_new;
  pool_->ParallelFor(static_cast<int64_t>(num_heads) * n_new, [&](int64_t begin, int64_t end) {
    std::vector<float> scores(n_total);
    for (int64_t job = begin; job < end; ++job) {
      const int h = static_cast<int>(job / n_new), i = static_cast<int>(job % n_new);
      const int kvh = h / group;
      const float* qi = q + static_cast<int64_t>(i) * q_stride + h * head_dim;
      const int visible = offset + i + 1;  // causal: positions 0..offset+i
      float mx = -INFINITY;
      for (int t = 0; t < visible; ++t) {
        scores[t] = Dot(qi, k + static_cast<int64_t>(t) * kv_stride + kvh * head_dim, head_dim) * scale;
        mx = std::max(mx, scores[t]);
      }
      float sum = 0;
      for (int t = 0; t < visible; ++t) sum += (scores[t] = std::exp(scores[t] - mx));
      float* o = out + static_cast<int64_t>(i) * q_stride + h * head_dim;
      std::fill(o, o + head_dim, 0.f);
      for (int t = 0; t < visible; ++t) {
        const float p = scores[t] / sum;
        const float* vt = v + static_cast<int64_t>(t) * kv_stride + kvh * head_dim;
        for (int d = 0; d < head_dim; ++d) o[d] += p * vt[d];
      }
    }
  });
}

// Position t's keys and values (kw and vw values) of `a`, widened to fp32 from the cache's dtype.
void CpuBackend::GatherKvRow(const AttentionSeq& a, int64_t t, int64_t kw, int64_t vw, float* k, float* v) const {
  const int64_t r = KvRow(a, t);
  if (kv_bf16_) {
    const auto* kb = static_cast<const uint16_t*>(a.k) + r * kw;
    const auto* vb = static_cast<const uint16_t*>(a.v) + r * vw;
    for (int64_t i = 0; i < kw; ++i) k[i] = Bf16ToF32(kb[i]);
    for (int64_t i = 0; i < vw; ++i) v[i] = Bf16ToF32(vb[i]);
  } else {
    std::memcpy(k, static_cast<const float*>(a.k) + r * kw, sizeof(float) * kw);
    std::memcpy(v, static_cast<const float*>(a.v) + r * vw, sizeof(float) * vw);
  }
}

// The reference: the per-sequence op, sequence by sequence (bitwise what a caller looping over
// Attention gets).
void CpuBackend::AttentionBatch(const float* q, const AttentionSeq* seqs_host, int num_seqs, int num_heads,
                                int num_kv_heads, int head_dim, float* out) {
  const int64_t q_stride = static_cast<int64_t>(num_heads) * head_dim;
  for (int s = 0; s < num_seqs; ++s) {
    const AttentionSeq& a = seqs_host[s];
    if (a.n_new <= 0) continue;
    const float* k = static_cast<const float*>(a.k);
    const float* v = static_cast<const float*>(a.v);
    std::vector<float> kf, vf;
    if (kv_bf16_ || a.blocks) {
      // Rows in position order, widened: the same values the contiguous fp32 op reads.
      const int64_t w = static_cast<int64_t>(num_kv_heads) * head_dim;
      kf.resize(static_cast<size_t>(a.n_total * w));
      vf.resize(kf.size());
      for (int64_t t = 0; t < a.n_total; ++t) GatherKvRow(a, t, w, w, kf.data() + t * w, vf.data() + t * w);
      k = kf.data();
      v = vf.data();
    }
    Attention(q + a.q_row * q_stride, a.n_new, k, v, a.n_total, num_heads, num_kv_heads, head_dim,
              out + a.q_row * q_stride);
  }
}

void CpuBackend::RopeTable(float* x, const int32_t* positions, int64_t rows, int num_heads, const RopeSpec& spec) {
  const int half = spec.rot_dim / 2;
  std::vector<float> cs(half), sn(half);
  for (int64_t r = 0; r < rows; ++r) {
    for (int i = 0; i < half; ++i) {
      const float a = static_cast<float>(positions[r]) * spec.inv_freq[i];
      cs[i] = std::cos(a) * spec.scale;
      sn[i] = std::sin(a) * spec.scale;
    }
    for (int h = 0; h < num_heads; ++h) {
      float* v = x + r * spec.row_stride + static_cast<int64_t>(h) * spec.head_stride + spec.offset;
      for (int i = 0; i < half; ++i) {
        // The pair (a, b) rotates as the complex number a + ib times cos + i sin.
        float& a = spec.interleaved ? v[2 * i] : v[i];
        float& b = spec.interleaved ? v[2 * i + 1] : v[i + half];
        const float a0 = a, b0 = b;
        a = a0 * cs[i] - b0 * sn[i];
        b = b0 * cs[i] + a0 * sn[i];
      }
    }
  }
}

void CpuBackend::AttentionEx(const float* q, const AttentionSeq* seqs_host, int num_seqs, const AttentionSpec& spec,
                             float* out) {
  const int group = spec.num_heads / spec.num_kv_heads;
  for (int s = 0; s < num_seqs; ++s) {
    const AttentionSeq& a = seqs_host[s];
    if (a.n_new <= 0) continue;
    const float* ak = static_cast<const float*>(a.k);  // fp32 whatever SetKvCacheDType says
    const float* av = static_cast<const float*>(a.v);
    std::vector<float> kf, vf;
    if (a.blocks) {
      // Paged: rows in position order (whole rows: k_stride and v_stride floats).
      kf.resize(static_cast<size_t>(a.n_total * spec.k_stride));
      vf.resize(static_cast<size_t>(a.n_total * spec.v_stride));
      for (int64_t t = 0; t < a.n_total; ++t) {
        const int64_t r = KvRow(a, t);
        std::memcpy(kf.data() + t * spec.k_stride, ak + r * spec.k_stride, sizeof(float) * spec.k_stride);
        std::memcpy(vf.data() + t * spec.v_stride, av + r * spec.v_stride, sizeof(float) * spec.v_stride);
      }
      ak = kf.data();
      av = vf.data();
    }
    const int offset = a.n_total - a.n_new;
    pool_->ParallelFor(static_cast<int64_t>(spec.num_heads) * a.n_new, [&](int64_t begin, int64_t end) {
      std::vector<float> scores(a.n_total);
      for (int64_t job = begin; job < end; ++job) {
        const int h = static_cast<int>(job / a.n_new), i = static_cast<int>(job % a.n_new);
        const int kvh = h / group;
        const float* qi = q + (a.q_row + i) * spec.q_stride + static_cast<int64_t>(h) * spec.qk_dim;
        const int last = offset + i;  // causal: keys 0..last
        const int first = spec.window > 0 ? std::max(0, last - spec.window + 1) : 0;
        float mx = spec.sinks ? spec.sinks[h] : -INFINITY;
        for (int t = first; t <= last; ++t) {
          scores[t] =
              Dot(qi, ak + t * spec.k_stride + static_cast<int64_t>(kvh) * spec.qk_dim, spec.qk_dim) * spec.scale;
          mx = std::max(mx, scores[t]);
        }
        float sum = spec.sinks ? std::exp(spec.sinks[h] - mx) : 0.f;
        for (int t = first; t <= last; ++t) sum += (scores[t] = std::exp(scores[t] - mx));
        float* o = out + (a.q_row + i) * spec.out_stride + static_cast<int64_t>(h) * spec.v_dim;
        std::fill(o, o + spec.v_dim, 0.f);
        for (int t = first; t <= last; ++t) {
          const float p = scores[t] / sum;
          const float* vt = av + t * spec.v_stride + static_cast<int64_t>(kvh) * spec.v_dim;
          for (int d = 0; d < spec.v_dim; ++d) o[d] += p * vt[d];
        }
      }
    });
  }
}

void CpuBackend::GemmPerHead(const float* x, int64_t rows, int num_heads, int64_t x_stride, int x_head_stride,
                             const Weight& w, int n, float* y, int64_t y_stride, int y_head_stride) {
  const int64_t k = w.cols;
  pool_->ParallelFor(
      static_cast<int64_t>(num_heads) * n,
      [&](int64_t begin, int64_t end) {
        std::vector<float> scratch(w.dtype == DType::kF32 ? 0 : static_cast<size_t>(k));
        for (int64_t hj = begin; hj < end; ++hj) {
          const int64_t h = hj / n, j = hj % n;
          const float* wr = WeightRow(w, hj, scratch.data());
          for (int64_t r = 0; r < rows; ++r)
            y[r * y_stride + h * y_head_stride + j] = Dot(x + r * x_stride + h * x_head_stride, wr, k);
        }
      },
      /*min_chunk=*/16);
}

void CpuBackend::Copy2D(float* dst, int64_t dst_pitch, const float* src, int64_t src_pitch, int64_t width,
                        int64_t rows) {
  for (int64_t r = 0; r < rows; ++r) std::memcpy(dst + r * dst_pitch, src + r * src_pitch, sizeof(float) * width);
}

void CpuBackend::ClampedSwiGlu(const float* gate, const float* up, float* out, int64_t n, float alpha, float limit) {
  for (int64_t i = 0; i < n; ++i) {
    const float g = std::min(gate[i], limit);
    const float u = std::clamp(up[i], -limit, limit);
    out[i] = (u + 1.0f) * (g / (1.0f + std::exp(-alpha * g)));
  }
}

void CpuBackend::SiluMul(const float* gate, const float* up, float* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    float g = gate[i];
    out[i] = g / (1.0f + std::exp(-g)) * up[i];
  }
}

void CpuBackend::Add(float* y, const float* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] += x[i];
}

void CpuBackend::Clamp(float* x, int64_t n, float c) {
  for (int64_t i = 0; i < n; ++i) x[i] = std::clamp(x[i], -c, c);
}

void CpuBackend::RouterTopK(const float* logits, int64_t rows, int num_experts, int k, bool renormalize, int32_t* ids,
                            float* weights) {
  std::vector<float> p(num_experts);
  std::vector<int> order(num_experts);
  for (int64_t r = 0; r < rows; ++r) {
    const float* l = logits + r * num_experts;
    float mx = *std::max_element(l, l + num_experts);
    float sum = 0;
    for (int e = 0; e < num_experts; ++e) sum += (p[e] = std::exp(l[e] - mx));
    for (int e = 0; e < num_experts; ++e) p[e] /= sum;
    std::iota(order.begin(), order.end(), 0);
    std::partial_sort(order.begin(), order.begin() + k, order.end(),
                      [&](int a, int b) { return p[a] != p[b] ? p[a] > p[b] : a < b; });
    float top = 0;
    for (int j = 0; j < k; ++j) top += p[order[j]];
    for (int j = 0; j < k; ++j) {
      ids[r * k + j] = order[j];
      weights[r * k + j] = renormalize ? p[order[j]] / top : p[order[j]];
    }
  }
}

void CpuBackend::GatherRows(const float* src, const int32_t* idx, int64_t n, int dim, float* dst) {
  for (int64_t i = 0; i < n; ++i)
    std::memcpy(dst + i * dim, src + static_cast<int64_t>(idx[i]) * dim, sizeof(float) * dim);
}

void CpuBackend::GatherRowsTwin(const float* src, const int32_t* idx, int64_t n, int dim, float* dst, uint16_t* dst16) {
  GatherRows(src, idx, n, dim, dst);
  for (int64_t i = 0; i < n * dim; ++i) dst16[i] = F32ToBf16(dst[i]);
}

void CpuBackend::ArgMaxRows(const float* x, int64_t rows, int64_t cols, int32_t* out) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* v = x + r * cols;
    float best = -std::numeric_limits<float>::infinity();
    int64_t at = -1;
    for (int64_t i = 0; i < cols; ++i)
      if (v[i] > best || (at < 0 && v[i] == best)) best = v[i], at = i;
    out[r] = static_cast<int32_t>(at < 0 ? 0 : at);
  }
}

void CpuBackend::SampleRows(const float* x, int64_t rows, int64_t cols, const RowSampling* params, int32_t* out) {
  for (int64_t r = 0; r < rows; ++r) out[r] = SampleRow(x + r * cols, cols, params[r]);
}

void CpuBackend::ScatterAddRows(const float* src, const int32_t* idx, const float* scale, int64_t n, int dim,
                                float* dst) {
  for (int64_t i = 0; i < n; ++i) {
    float* d = dst + static_cast<int64_t>(idx[i]) * dim;
    const float* s = src + i * dim;
    const float c = scale[i];
    for (int j = 0; j < dim; ++j) d[j] += c * s[j];
  }
}

void CpuBackend::CombineRows(const float* src, const int32_t* pos, const float* scale, int64_t tokens, int k, int dim,
                             float* dst) {
  // The statement ScatterAddRows runs, term by term (so the same rounding under any contraction).
  for (int64_t t = 0; t < tokens; ++t) {
    float* d = dst + t * dim;
    for (int j = 0; j < k; ++j) {
      const int64_t r = pos[t * k + j];
      const float* s = src + r * dim;
      const float c = scale[r];
      for (int i = 0; i < dim; ++i) d[i] += c * s[i];
    }
  }
}

void CpuBackend::AddSigmoidGated(const float* src, const float* gate_logit, int64_t rows, int dim, float* dst) {
  for (int64_t r = 0; r < rows; ++r) {
    const float g = 1.0f / (1.0f + std::exp(-gate_logit[r]));
    for (int j = 0; j < dim; ++j) dst[r * dim + j] += g * src[r * dim + j];
  }
}

StatusOr<std::unique_ptr<Backend>> MakeCpuBackend() { return std::unique_ptr<Backend>(std::make_unique<CpuBackend>()); }

}  // namespace ef::runtime
