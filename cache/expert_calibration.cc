#include "cache/expert_calibration.h"

#include <algorithm>
#include <cmath>

#include "runtime/core/quant.h"
#include "runtime/core/quant_format.h"
#include "runtime/core/thread_pool.h"

namespace ef::cache {
namespace {

// Row r of w as fp32 into out[cols].
void RowF32(const runtime::Weight& w, int64_t r, float* out) {
  const auto* base = static_cast<const std::byte*>(w.data);
  ConvertToF32(w.dtype, base + static_cast<size_t>(r * w.cols) * DTypeSize(w.dtype), out, static_cast<size_t>(w.cols));
}

// h (lower triangle, [n, n]) += x x^T.
void AddOuter(std::vector<double>& h, const float* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const double xi = x[i];
    if (xi == 0) continue;
    double* hi = h.data() + i * n;
    for (int64_t j = 0; j <= i; ++j) hi[j] += xi * x[j];
  }
}

// The weight as fp32, row-major.
std::vector<float> WeightF32(const runtime::Weight& w) {
  std::vector<float> out(static_cast<size_t>(w.rows * w.cols));
  for (int64_t r = 0; r < w.rows; ++r) RowF32(w, r, out.data() + r * w.cols);
  return out;
}

// The full symmetric matrix from its lower triangle.
std::vector<double> Symmetric(const std::vector<double>& lower, int64_t n) {
  std::vector<double> h = lower;
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < i; ++j) h[j * n + i] = h[i * n + j];
  return h;
}

// sum_t |(W - Q) x_t|^2 = sum over rows of d^T H d, d = w - dequant(q) (H full, [cols, cols]); rows
// spread over the default pool.
double OutputError(const std::vector<float>& w, DType t, const std::vector<std::byte>& q, int64_t rows, int64_t cols,
                   const std::vector<double>& h) {
  std::vector<double> per_row(static_cast<size_t>(rows), 0.0);
  ThreadPool::Default().ParallelFor(rows, [&](int64_t begin, int64_t end) {
    std::vector<float> row(static_cast<size_t>(cols));
    std::vector<double> d(static_cast<size_t>(cols));
    for (int64_t r = begin; r < end; ++r) {
      DequantizeRow(t, q.data(), rows, cols, r, row.data());
      for (int64_t i = 0; i < cols; ++i) d[i] = double(w[r * cols + i]) - row[i];
      double err = 0;
      for (int64_t i = 0; i < cols; ++i) {
        double s = 0;
        for (int64_t j = 0; j < cols; ++j) s += h[i * cols + j] * d[j];
        err += d[i] * s;
      }
      per_row[r] = err;
    }
  });
  double err = 0;
  for (double e : per_row) err += e;  // in row order: the same sum whatever the split
  return err;
}

}  // namespace

size_t ExpertCalibration::HessianBytes(const runtime::ModelConfig& c) {
  const auto h = static_cast<size_t>(c.hidden_size), i = static_cast<size_t>(c.moe_intermediate_size);
  return c.MoeLayers().size() * static_cast<size_t>(c.num_experts) * (h * h + i * i) * sizeof(double);
}

ExpertCalibration::ExpertCalibration(const runtime::ModelWeights* model, runtime::ExpertActivationParams activation)
    : model_(model), activation_(activation), num_experts_(model->config().num_experts) {
  const runtime::ModelConfig& c = model->config();
  const size_t n = static_cast<size_t>(c.num_layers) * num_experts_;
  tokens_.assign(n, 0);
  eligible_.assign(n, 0);
  h_in_.resize(n);
  h_mid_.resize(n);
  for (int l : c.MoeLayers())
    for (int e = 0; e < num_experts_; ++e) {
      const runtime::ExpertWeights& w = model->host_expert(l, e);
      eligible_[Index(l, e)] = CacheQuantizes(w, DType::kQ8) || CacheQuantizes(w, DType::kQ4);
    }
}

Status ExpertCalibration::Add(const runtime::LayerRouting& r) {
  const int64_t H = model_->config().hidden_size;
  if (r.hidden.size() != static_cast<size_t>(r.num_tokens * H))
    return Internal("calibration needs the router's inputs (Engine::set_expose_router_inputs)");
  // Tokens per expert, in order.
  std::vector<std::vector<int32_t>> rows(static_cast<size_t>(num_experts_));
  for (int t = 0; t < r.num_tokens; ++t)
    for (int j = 0; j < r.top_k; ++j) {
      const int32_t e = r.ids[static_cast<size_t>(t * r.top_k + j)];
      if (e < 0 || e >= num_experts_) return Internal("calibration: routing names expert " + std::to_string(e));
      rows[static_cast<size_t>(e)].push_back(t);
    }
  std::vector<float> g, u, gate, up, a;
  for (int e = 0; e < num_experts_; ++e) {
    const std::vector<int32_t>& mine = rows[static_cast<size_t>(e)];
    const size_t idx = Index(r.layer, e);
    if (mine.empty() || !eligible_[idx]) continue;
    const runtime::ExpertWeights& w = model_->host_expert(r.layer, e);
    // The expert's own shapes (CacheQuantizes checked that they chain: gate, up [I, H], down [H, I]).
    const int64_t I = w.gate.rows;
    if (w.gate.cols != H) return Internal("calibration: expert width differs from the hidden size");
    if (h_in_[idx].empty()) {
      h_in_[idx].assign(static_cast<size_t>(H * H), 0.0);
      h_mid_[idx].assign(static_cast<size_t>(I * I), 0.0);
    }
    // gate x and up x for every token of this expert: one pass over the rows of each weight.
    const size_t m = mine.size();
    g.resize(static_cast<size_t>(H));
    u.resize(static_cast<size_t>(H));
    a.resize(static_cast<size_t>(I));
    gate.assign(m * static_cast<size_t>(I), 0.f);
    up.assign(m * static_cast<size_t>(I), 0.f);
    for (int64_t row = 0; row < I; ++row) {
      RowF32(w.gate, row, g.data());
      RowF32(w.up, row, u.data());
      for (size_t k = 0; k < m; ++k) {
        const float* x = r.hidden.data() + static_cast<size_t>(mine[k]) * H;
        float sg = 0, su = 0;
        for (int64_t c = 0; c < H; ++c) sg += g[c] * x[c], su += u[c] * x[c];
        gate[k * I + row] = sg;
        up[k * I + row] = su;
      }
    }
    for (size_t k = 0; k < m; ++k) {
      AddOuter(h_in_[idx], r.hidden.data() + static_cast<size_t>(mine[k]) * H, H);
      for (int64_t c = 0; c < I; ++c) {
        float gv = gate[k * I + c], uv = up[k * I + c];
        if (activation_.kind == runtime::ExpertActivation::kClampedSwiGlu) {
          gv = std::min(gv, activation_.limit);
          uv = std::clamp(uv, -activation_.limit, activation_.limit);
          a[c] = (uv + 1.0f) * (gv / (1.0f + std::exp(-activation_.alpha * gv)));
        } else {
          a[c] = gv / (1.0f + std::exp(-gv)) * uv;
        }
      }
      AddOuter(h_mid_[idx], a.data(), I);
    }
    tokens_[idx] += static_cast<int64_t>(m);
  }
  return Status::Ok();
}

StatusOr<ExpertCalibration::Result> ExpertCalibration::Quantize(const Options& o, Progress* progress,
                                                                const ExpertCalibration* held_out) const {
  if (o.dtype != DType::kQ8 && o.dtype != DType::kQ4) return InvalidArgument("GPTQ quantizes to int8 or int4");
  const runtime::ModelConfig& c = model_->config();
  Result res;
  res.fewest_tokens = INT64_MAX;
  double err[2][2] = {};  // [in-sample, held-out][gptq, rounding]
  for (int l : c.MoeLayers()) {
    for (int e = 0; e < num_experts_; ++e) {
      if (progress) progress->Advance(1);
      const size_t idx = Index(l, e);
      const runtime::ExpertWeights& w = model_->host_expert(l, e);
      if (!CacheQuantizes(w, o.dtype)) {
        ++res.not_quantized;
        continue;
      }
      const int64_t H = w.gate.cols, I = w.gate.rows;
      if (tokens_[idx] == 0 || tokens_[idx] < (o.min_tokens > 0 ? o.min_tokens : I)) {
        ++res.too_few_tokens;
        continue;
      }
      const std::vector<double> h_in = Symmetric(h_in_[idx], H), h_mid = Symmetric(h_mid_[idx], I);
      const bool eval = held_out && held_out->tokens_[idx] > 0;
      std::vector<double> e_in, e_mid;
      if (eval) e_in = Symmetric(held_out->h_in_[idx], H), e_mid = Symmetric(held_out->h_mid_[idx], I);
      const runtime::Weight* parts[3] = {&w.gate, &w.up, &w.down};
      std::vector<QuantizedExperts::Block> mine;
      bool singular = false;
      double part_err[2][2] = {};
      for (int p = 0; p < 3 && !singular; ++p) {
        const runtime::Weight& x = *parts[p];
        const std::vector<float> wf = WeightF32(x);
        QuantizedExperts::Block b{l, e, p, std::vector<std::byte>(WeightBytes(o.dtype, x.rows, x.cols))};
        auto n = QuantizeGptq(o.dtype, wf.data(), x.rows, x.cols, p == 2 ? h_mid.data() : h_in.data(), b.bytes.data(),
                              b.bytes.size(), o.gptq);
        if (!n.ok()) {
          if (n.status().code() == StatusCode::kFailedPrecondition) {
            singular = true;
            break;
          }
          return std::move(n).status().Prepend("expert " + std::to_string(e) + " of layer " + std::to_string(l) + " (" +
                                               QuantizedExpertName(l, e, p) + ")");
        }
        std::vector<std::byte> rtn(b.bytes.size());
        EF_RETURN_IF_ERROR(
            ::ef::Quantize(o.dtype, DType::kF32, wf.data(), x.rows, x.cols, rtn.data(), rtn.size()).status());
        part_err[0][0] += OutputError(wf, o.dtype, b.bytes, x.rows, x.cols, p == 2 ? h_mid : h_in);
        part_err[0][1] += OutputError(wf, o.dtype, rtn, x.rows, x.cols, p == 2 ? h_mid : h_in);
        if (eval) {
          part_err[1][0] += OutputError(wf, o.dtype, b.bytes, x.rows, x.cols, p == 2 ? e_mid : e_in);
          part_err[1][1] += OutputError(wf, o.dtype, rtn, x.rows, x.cols, p == 2 ? e_mid : e_in);
        }
        mine.push_back(std::move(b));
      }
      if (singular) {
        ++res.singular;
        continue;
      }
      for (int i = 0; i < 2; ++i)
        for (int j = 0; j < 2; ++j) err[i][j] += part_err[i][j];
      for (auto& b : mine) res.blocks.push_back(std::move(b));
      ++res.experts;
      res.fewest_tokens = std::min(res.fewest_tokens, tokens_[idx]);
    }
  }
  if (res.experts == 0) res.fewest_tokens = 0;
  if (err[0][1] > 0) res.error_ratio = err[0][0] / err[0][1];
  if (err[1][1] > 0) res.held_out_error_ratio = err[1][0] / err[1][1];
  return res;
}

}  // namespace ef::cache
