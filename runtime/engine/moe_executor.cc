#include "runtime/engine/moe_executor.h"

#include <algorithm>
#include <cstring>

namespace ef::runtime {
namespace {
enum Slot { kPerm, kGathered, kExpertOut, kGate, kUp, kHostPart, kGathered16 };
}

StatusOr<float*> LocalMoeExecutor::Scratch(int slot, size_t floats) {
  Buffer& b = scratch_[slot];
  const size_t bytes = std::max<size_t>(floats, 1) * sizeof(float);
  if (b.bytes() < bytes) {
    b = Buffer();  // free the old one first: the budget may hold only one of them
    auto nb = backend_->Allocate(bytes + bytes / 2);
    if (!nb.ok()) {
      Status st = nb.status();
      return st.Prepend("expert activation buffer of " + std::to_string(bytes) + " bytes");
    }
    b = std::move(nb).value();
  }
  return b.f32();
}

Status LocalMoeExecutor::Mlp(const ExpertWeights& w, int64_t rows, const float* x, float* out) {
  const int64_t inter = w.gate.rows;
  EF_ASSIGN_OR_RETURN(float* g, Scratch(kGate, static_cast<size_t>(rows * inter)));
  const bool bias = w.has_bias();
  if (!bias && activation_.kind != ExpertActivation::kClampedSwiGlu && backend_->GateUpSilu(x, rows, w.gate, w.up, g)) {
    backend_->Gemm(g, rows, w.down, nullptr, out, false);
    return Status::Ok();
  }
  EF_ASSIGN_OR_RETURN(float* u, Scratch(kUp, static_cast<size_t>(rows * inter)));
  backend_->Gemm(x, rows, w.gate, bias ? &w.gate_bias : nullptr, g, false);
  backend_->Gemm(x, rows, w.up, bias ? &w.up_bias : nullptr, u, false);
  if (activation_.kind == ExpertActivation::kClampedSwiGlu) {
    backend_->ClampedSwiGlu(g, u, g, rows * inter, activation_.alpha, activation_.limit);
  } else {
    backend_->SiluMul(g, u, g, rows * inter);
  }
  backend_->Gemm(g, rows, w.down, bias ? &w.down_bias : nullptr, out, false);
  return Status::Ok();
}

Status LocalMoeExecutor::MlpGroup(std::span<const int32_t> experts, std::span<const ExpertWeights> w,
                                  const std::vector<int32_t>& offset, const float* xe, const uint16_t* xe16,
                                  float* ye) {
  const int H = hidden_;
  if (!w.empty()) expert_dtype_ = w[0].gate.dtype;
  bool fused = activation_.kind == ExpertActivation::kSiluMul;
  std::vector<Backend::ExpertMlpRows> rows;
  for (size_t i = 0; fused && i < experts.size(); ++i) {
    fused = !w[i].has_bias();
    rows.push_back({&w[i].gate, &w[i].up, &w[i].down, offset[experts[i]], offset[experts[i] + 1] - offset[experts[i]]});
  }
  if (fused && backend_->ExpertMlps(xe, xe16, rows.data(), static_cast<int>(rows.size()), ye)) return Status::Ok();
  for (size_t i = 0; i < experts.size(); ++i) {
    const int64_t begin = offset[experts[i]], cnt = offset[experts[i] + 1] - begin;
    EF_RETURN_IF_ERROR(Mlp(w[i], cnt, xe + begin * H, ye + begin * H));
  }
  return Status::Ok();
}

Status LocalMoeExecutor::ComputeExperts(int layer, std::span<const int32_t> order, const std::vector<int32_t>& offset,
                                        const float* xe, const uint16_t* xe16, float* ye) {
  std::vector<int32_t> todo;
  for (int32_t e : order)
    if (offset[e + 1] > offset[e]) todo.push_back(e);
  const size_t group = static_cast<size_t>(std::max(1, source_->MaxAcquired()));
  std::vector<ExpertWeights> w;
  for (size_t first = 0; first < todo.size(); first += group) {
    const std::span<const int32_t> g(todo.data() + first, std::min(group, todo.size() - first));
    w.clear();
    Status st;
    for (int32_t e : g) {
      auto a = source_->Acquire(layer, e);
      if (!a.ok()) {
        st = a.status();
        break;
      }
      w.push_back(std::move(a).value());
    }
    if (st.ok()) st = MlpGroup(g, w, offset, xe, xe16, ye);
    for (size_t i = 0; i < w.size(); ++i) source_->Release(layer, g[i]);
    EF_RETURN_IF_ERROR(st);
  }
  return Status::Ok();
}

StatusOr<float*> LocalMoeExecutor::ComputeActive(int layer, std::vector<int32_t>& active,
                                                 const std::vector<int32_t>& offset, const float* src,
                                                 const int32_t* perm_dev, int64_t n) {
  const int H = hidden_;
  ExpertSource::HostShare host;
  {
    std::vector<int64_t> rows(active.size());
    for (size_t i = 0; i < active.size(); ++i) rows[i] = offset[active[i] + 1] - offset[active[i]];
    source_->TakeHostExperts(layer, active, rows, host);
  }
  source_->OnRouting(layer, active);
  const int32_t split = host.split_expert;
  // The split expert's part loads behind this layer's misses (the plan counted it there).
  if (split >= 0) EF_RETURN_IF_ERROR(source_->StartPart(layer, split, host.split));
  EF_ASSIGN_OR_RETURN(float* xe, Scratch(kGathered, static_cast<size_t>(n) * H));
  EF_ASSIGN_OR_RETURN(float* ye, Scratch(kExpertOut, static_cast<size_t>(n) * H));
  // A bf16 twin of the gathered rows where the backend's experts will read them in bf16: an expert
  // of this call past the GEMV's rows (Bf16Twins), the fused SwiGLU, experts of the type last
  // acquired (the first call makes none).
  int64_t most_rows = 0;
  for (int32_t e : active) most_rows = std::max<int64_t>(most_rows, offset[e + 1] - offset[e]);
  uint16_t* xe16 = nullptr;
  if (activation_.kind == ExpertActivation::kSiluMul && backend_->Bf16Twins(most_rows, expert_dtype_)) {
    EF_ASSIGN_OR_RETURN(float* twin, Scratch(kGathered16, (static_cast<size_t>(n) * H + 1) / 2));
    xe16 = reinterpret_cast<uint16_t*>(twin);
    backend_->GatherRowsTwin(src, perm_dev, n, H, xe, xe16);
  } else {
    backend_->GatherRows(src, perm_dev, n, H, xe);
  }
  if (host.whole.empty() && split < 0) {
    EF_RETURN_IF_ERROR(ComputeExperts(layer, active, offset, xe, xe16, ye));
    return ye;
  }
  // The host's experts' rows come to the host first (this waits for the gather), the backend's
  // experts are enqueued next (the split expert's part last: its copy comes last), and the host
  // computes its share while the backend runs (and its misses copy); the host's outputs go into ye
  // (the split expert's added to the backend's part) before the scatter.
  std::vector<int32_t> on_host = host.whole;
  if (split >= 0) on_host.push_back(split);
  host_x_.resize(static_cast<size_t>(n) * H);
  host_y_.resize(static_cast<size_t>(n) * H);
  for (int32_t e : on_host) {
    const int64_t begin = offset[e], cnt = offset[e + 1] - offset[e];
    backend_->CopyToHost(host_x_.data() + begin * H, xe + begin * H, static_cast<size_t>(cnt * H) * sizeof(float));
  }
  EF_RETURN_IF_ERROR(ComputeExperts(layer, active, offset, xe, xe16, ye));
  if (split >= 0) {
    EF_ASSIGN_OR_RETURN(ExpertWeights part, source_->AcquirePart());
    const int64_t begin = offset[split];
    EF_RETURN_IF_ERROR(Mlp(part, offset[split + 1] - begin, xe + begin * H, ye + begin * H));
  }
  // Every host computation before the first upload: a copy from pageable memory waits for the
  // compute stream, which waits for this layer's loads.
  for (int32_t e : on_host) {
    const int64_t begin = offset[e], cnt = offset[e + 1] - offset[e];
    EF_RETURN_IF_ERROR(source_->ComputeOnHost(layer, e, cnt, host_x_.data() + begin * H, host_y_.data() + begin * H,
                                              e == split ? host.split : 0));
  }
  for (int32_t e : on_host) {
    const int64_t begin = offset[e], cnt = offset[e + 1] - offset[e];
    const size_t bytes = static_cast<size_t>(cnt * H) * sizeof(float);
    float* hy = host_y_.data() + begin * H;
    if (e != split) {
      backend_->CopyToDevice(ye + begin * H, hy, bytes);
      continue;
    }
    EF_ASSIGN_OR_RETURN(float* part_out, Scratch(kHostPart, static_cast<size_t>(cnt) * H));
    backend_->CopyToDevice(part_out, hy, bytes);
    backend_->Add(ye + begin * H, part_out, cnt * H);
  }
  return ye;
}

StatusOr<LocalMoeExecutor::DeviceRouting> LocalMoeExecutor::Upload(const std::vector<int32_t>& perm,
                                                                   const std::vector<float>& scale, int64_t tokens,
                                                                   int k) {
  const size_t n = perm.size();
  if (scale.size() != n || static_cast<int64_t>(n) != tokens * k)
    return Internal("moe routing: " + std::to_string(n) + " rows for " + std::to_string(tokens) + " tokens of " +
                    std::to_string(k));
  // pos[t * k + j]: the j-th row (ascending) that belongs to token t; rows are expert-major, so
  // that is token t's j-th expert in increasing id.
  upload_.resize(3 * n);
  std::memcpy(upload_.data(), perm.data(), n * sizeof(int32_t));
  std::memcpy(upload_.data() + n, scale.data(), n * sizeof(float));
  int32_t* pos = reinterpret_cast<int32_t*>(upload_.data() + 2 * n);
  std::vector<int32_t> filled(static_cast<size_t>(tokens), 0);
  for (size_t r = 0; r < n; ++r) {
    const int32_t t = perm[r];
    if (t < 0 || t >= tokens || filled[t] >= k)
      return Internal("moe routing: row " + std::to_string(r) + " names token " + std::to_string(t) + " of " +
                      std::to_string(tokens) + " (" + std::to_string(k) + " rows each)");
    pos[static_cast<size_t>(t) * k + filled[t]++] = static_cast<int32_t>(r);
  }
  // perm, scale and pos in one buffer and one copy.
  EF_ASSIGN_OR_RETURN(float* dev, Scratch(kPerm, 3 * n));
  backend_->CopyToDevice(dev, upload_.data(), upload_.size() * sizeof(uint32_t));
  return DeviceRouting{reinterpret_cast<int32_t*>(dev), dev + n, reinterpret_cast<int32_t*>(dev + 2 * n)};
}

Status LocalMoeExecutor::Run(int layer, int64_t T, int top_k, const float* h, std::span<const int32_t> ids,
                             std::span<const float> weights, float* out) {
  const int E = num_experts_, H = hidden_;
  // Counting sort of (token, slot) pairs by expert: perm lists the token rows of expert 0, then 1...
  std::vector<int32_t> offset(E + 1, 0);
  for (int32_t e : ids) {
    if (e < 0 || e >= E) return Internal("routing chose expert " + std::to_string(e) + " out of range");
    ++offset[e + 1];
  }
  for (int e = 0; e < E; ++e) offset[e + 1] += offset[e];
  std::vector<int32_t> perm(ids.size()), cursor(offset.begin(), offset.end() - 1);
  std::vector<float> scale(ids.size());
  for (int64_t t = 0; t < T; ++t) {
    for (int j = 0; j < top_k; ++j) {
      const int32_t e = ids[t * top_k + j];
      perm[cursor[e]] = static_cast<int32_t>(t);
      scale[cursor[e]++] = weights[t * top_k + j];
    }
  }
  const int64_t n = static_cast<int64_t>(perm.size());
  EF_ASSIGN_OR_RETURN(const DeviceRouting dr, Upload(perm, scale, T, top_k));

  // Acquire order: first appearance in the routing (token-major, the router's order), which the
  // source may change (e.g. resident experts first while misses load).
  std::vector<int32_t> active;
  std::vector<bool> seen(E, false);
  for (int32_t e : ids)
    if (!seen[e]) seen[e] = true, active.push_back(e);
  EF_ASSIGN_OR_RETURN(float* ye, ComputeActive(layer, active, offset, h, dr.perm, n));
  // Accumulate in increasing expert id whatever the compute order was, so the result is bitwise
  // independent of cache state, policy and prefetch timing (and matches transformers' order): each
  // token's rows of ye listed by ascending expert (perm is expert-major), one combine for all.
  backend_->CombineRows(ye, dr.pos, dr.scale, T, top_k, H, out);
  return Status::Ok();
}

Status LocalMoeExecutor::ComputeRows(int layer, int64_t n, const float* x, std::span<const int32_t> expert,
                                     std::span<const float> scale, float* y) {
  const int E = num_experts_, H = hidden_;
  std::vector<int32_t> offset(E + 1, 0);
  for (int32_t e : expert) {
    if (e < 0 || e >= E) return InvalidArgument("row names expert " + std::to_string(e) + " out of range");
    ++offset[e + 1];
  }
  for (int e = 0; e < E; ++e) offset[e + 1] += offset[e];
  std::vector<int32_t> perm(n), cursor(offset.begin(), offset.end() - 1);
  std::vector<float> sc(n);
  for (int64_t i = 0; i < n; ++i) {
    perm[cursor[expert[i]]] = static_cast<int32_t>(i);
    sc[cursor[expert[i]]++] = scale[i];
  }
  EF_ASSIGN_OR_RETURN(const DeviceRouting dr, Upload(perm, sc, n, 1));
  std::vector<int32_t> active;
  for (int e = 0; e < E; ++e)
    if (offset[e + 1] > offset[e]) active.push_back(e);
  EF_ASSIGN_OR_RETURN(float* ye, ComputeActive(layer, active, offset, x, dr.perm, n));
  // y starts at zero; each row receives exactly one scaled expert output.
  backend_->SetZero(y, static_cast<size_t>(n) * H * sizeof(float));
  backend_->CombineRows(ye, dr.pos, dr.scale, n, 1, H, y);
  return Status::Ok();
}

}  // namespace ef::runtime
