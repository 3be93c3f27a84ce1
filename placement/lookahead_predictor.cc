#include "placement/lookahead_predictor.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "runtime/core/dtype.h"

namespace ef::placement {
namespace {

// Elements [offset, offset + n) of a float tensor of the checkpoint, as F32.
StatusOr<std::vector<float>> ToF32(const runtime::TensorView& t, int64_t offset, int64_t n) {
  if (offset < 0 || offset + n > t.numel())
    return OutOfRange("tensor \"" + t.name + "\" has " + std::to_string(t.numel()) + " elements, asked for [" +
                      std::to_string(offset) + ", " + std::to_string(offset + n) + ")");
  std::vector<float> out(static_cast<size_t>(n));
  const size_t esize = DTypeSize(t.dtype);
  const std::byte* p = t.data + static_cast<size_t>(offset) * esize;
  switch (t.dtype) {
    case DType::kF32:
      std::memcpy(out.data(), p, out.size() * sizeof(float));
      break;
    case DType::kBF16:
    case DType::kF16:
      for (int64_t i = 0; i < n; ++i) {
        uint16_t h;
        std::memcpy(&h, p + static_cast<size_t>(i) * 2, 2);
        out[static_cast<size_t>(i)] = t.dtype == DType::kBF16 ? Bf16ToF32(h) : F16ToF32(h);
      }
      break;
    default:
      return InvalidArgument("tensor \"" + t.name + "\" has dtype " + DTypeName(t.dtype) +
                             "; expected F32, F16 or BF16");
  }
  return out;
}

void Softmax(float* x, int n) {
  const float mx = *std::max_element(x, x + n);
  float sum = 0.f;
  for (int i = 0; i < n; ++i) sum += x[i] = std::exp(x[i] - mx);
  for (int i = 0; i < n; ++i) x[i] /= sum;
}

}  // namespace

StatusOr<std::unique_ptr<LookaheadPredictor>> LookaheadPredictor::FromModel(const runtime::ModelWeights& weights,
                                                                            const LookaheadOptions& options) {
  const runtime::ModelConfig& c = weights.config();
  const runtime::Checkpoint& ck = weights.checkpoint();
  std::vector<std::vector<float>> routers, norms;
  for (int l : c.MoeLayers()) {
    EF_ASSIGN_OR_RETURN(const runtime::TensorView* r, ck.Get(c.RouterName(l)));
    if (r->numel() != static_cast<int64_t>(c.num_experts) * c.hidden_size)
      return InvalidArgument("router \"" + r->name + "\" has shape " + r->ShapeString() + ", expected [" +
                             std::to_string(c.num_experts) + ", " + std::to_string(c.hidden_size) + "]");
    EF_ASSIGN_OR_RETURN(std::vector<float> rw, ToF32(*r, 0, r->numel()));
    const std::string norm_name = "model.layers." + std::to_string(l) + ".post_attention_layernorm.weight";
    EF_ASSIGN_OR_RETURN(const runtime::TensorView* n, ck.Get(norm_name));
    if (n->numel() != c.hidden_size) return InvalidArgument("norm \"" + norm_name + "\" has shape " + n->ShapeString());
    EF_ASSIGN_OR_RETURN(std::vector<float> nw, ToF32(*n, 0, n->numel()));
    routers.push_back(std::move(rw));
    norms.push_back(std::move(nw));
  }
  return Create(c.hidden_size, c.num_experts, c.top_k, std::move(routers), std::move(norms), c.rms_norm_eps, options);
}

StatusOr<std::unique_ptr<LookaheadPredictor>> LookaheadPredictor::Create(int hidden, int num_experts, int top_k,
                                                                         std::vector<std::vector<float>> routers,
                                                                         std::vector<std::vector<float>> norms,
                                                                         float rms_eps,
                                                                         const LookaheadOptions& options) {
  if (hidden < 1 || num_experts < 1 || top_k < 1 || top_k > num_experts)
    return InvalidArgument("lookahead predictor: bad shape (hidden " + std::to_string(hidden) + ", experts " +
                           std::to_string(num_experts) + ", top-k " + std::to_string(top_k) + ")");
  if (routers.empty()) return InvalidArgument("lookahead predictor: the model has no MoE layer");
  if (options.max_lookahead < 0) return InvalidArgument("lookahead predictor: max_lookahead must be >= 0");
  if (!norms.empty() && norms.size() != routers.size())
    return InvalidArgument("lookahead predictor: " + std::to_string(norms.size()) + " norm weights for " +
                           std::to_string(routers.size()) + " routers");
  auto p = std::unique_ptr<LookaheadPredictor>(new LookaheadPredictor());
  p->hidden_ = hidden;
  p->num_experts_ = num_experts;
  p->top_k_ = top_k;
  p->rms_eps_ = rms_eps;
  p->options_ = options;
  const size_t L = routers.size(), H = static_cast<size_t>(hidden);
  for (size_t m = 0; m < L; ++m) {
    if (routers[m].size() != static_cast<size_t>(num_experts) * H)
      return InvalidArgument(
          "lookahead predictor: router " + std::to_string(m) + " has " + std::to_string(routers[m].size()) +
          " values, expected experts x hidden = " + std::to_string(static_cast<size_t>(num_experts) * H));
    std::vector<float> g = norms.empty() ? std::vector<float>(H, 1.f) : std::move(norms[m]);
    if (g.size() != H)
      return InvalidArgument("lookahead predictor: norm " + std::to_string(m) + " has " + std::to_string(g.size()) +
                             " values, expected " + std::to_string(H));
    std::vector<float> folded(routers[m].size()), inv(H);
    for (size_t e = 0; e < static_cast<size_t>(num_experts); ++e)
      for (size_t i = 0; i < H; ++i) folded[e * H + i] = routers[m][e * H + i] * g[i];
    // A (near-)zero norm weight erases that coordinate from h_s; it cannot be recovered, so it
    // contributes nothing.
    for (size_t i = 0; i < H; ++i) inv[i] = std::fabs(g[i]) > 1e-12f ? 1.f / g[i] : 0.f;
    p->folded_.push_back(std::move(folded));
    p->inv_norm_.push_back(std::move(inv));
  }
  p->routers_ = std::move(routers);
  return p;
}

StatusOr<std::vector<float>> LookaheadPredictor::InputEmbedding(const runtime::ModelWeights& weights, int64_t token) {
  const runtime::ModelConfig& c = weights.config();
  if (token < 0 || token >= c.vocab_size)
    return InvalidArgument("token id " + std::to_string(token) + " is outside the vocabulary of " +
                           std::to_string(c.vocab_size));
  EF_ASSIGN_OR_RETURN(const runtime::TensorView* t, weights.checkpoint().Get("model.embed_tokens.weight"));
  return ToF32(*t, token * c.hidden_size, c.hidden_size);
}

Status LookaheadPredictor::LayerProbs(std::span<const float> hidden, int source, int target, float* out) const {
  const int L = num_layers(), H = hidden_;
  if (hidden.size() != static_cast<size_t>(H))
    return InvalidArgument("lookahead predictor: a hidden state of " + std::to_string(hidden.size()) +
                           " values, the model's hidden size is " + std::to_string(H));
  if (source < -1 || source >= L || target < 0 || target >= L)
    return InvalidArgument("lookahead predictor: layers " + std::to_string(source) + " -> " + std::to_string(target) +
                           " out of range for " + std::to_string(L) + " MoE layers");
  std::vector<float> u(hidden.begin(), hidden.end());
  const std::vector<float>* w = &folded_[static_cast<size_t>(target)];
  if (source < 0) {  // an embedding: RMSNorm without weight, then the folded router
    double ss = 0;
    for (float v : u) ss += static_cast<double>(v) * v;
    const float scale = 1.f / std::sqrt(static_cast<float>(ss / H) + rms_eps_);
    for (float& v : u) v *= scale;
  } else if (options_.rescale_norm) {
    const std::vector<float>& inv = inv_norm_[static_cast<size_t>(source)];
    for (int i = 0; i < H; ++i) u[i] *= inv[i];
  } else {
    w = &routers_[static_cast<size_t>(target)];
  }
  for (int e = 0; e < num_experts_; ++e) {
    const float* row = w->data() + static_cast<size_t>(e) * H;
    float acc = 0.f;
    for (int i = 0; i < H; ++i) acc += row[i] * u[i];
    out[e] = acc;
  }
  Softmax(out, num_experts_);
  return Status::Ok();
}

Status LookaheadPredictor::FillFrom(std::span<const float> hidden, int source, int first, RoutingForecast* f,
                                    int t) const {
  const int L = num_layers();
  const int last = options_.max_lookahead > 0 ? std::min(L, source + 1 + options_.max_lookahead) : L;
  for (int m = first; m < L; ++m) {
    if (m < last) {
      EF_RETURN_IF_ERROR(LayerProbs(hidden, source, m, f->row(t, m)));
    } else {
      std::fill(f->row(t, m), f->row(t, m) + num_experts_, 1.f / num_experts_);
    }
  }
  return Status::Ok();
}

StatusOr<RoutingForecast> LookaheadPredictor::Predict(std::span<const PredictorInput> batch) const {
  RoutingForecast f(static_cast<int>(batch.size()), num_layers(), num_experts_);
  for (size_t t = 0; t < batch.size(); ++t) {
    if (batch[t].embedding.empty())
      return InvalidArgument("lookahead predictor: token " + std::to_string(t) +
                             " has no input embedding (PredictorInput::embedding) to forecast from");
    EF_RETURN_IF_ERROR(FillFrom(batch[t].embedding, -1, 0, &f, static_cast<int>(t)));
  }
  return f;
}

StatusOr<RoutingForecast> LookaheadPredictor::PredictGiven(std::span<const PredictorInput> batch,
                                                           std::span<const ObservedRouting> observed) const {
  if (observed.size() != batch.size())
    return InvalidArgument("lookahead predictor: " + std::to_string(observed.size()) + " observations for " +
                           std::to_string(batch.size()) + " tokens");
  const int L = num_layers();
  RoutingForecast f(static_cast<int>(batch.size()), L, num_experts_);
  for (size_t t = 0; t < batch.size(); ++t) {
    const ObservedRouting& o = observed[t];
    const int n = std::clamp(o.num_layers_done, 0, L);
    if (static_cast<int64_t>(o.experts.size()) < static_cast<int64_t>(n) * o.top_k)
      return InvalidArgument("lookahead predictor: token " + std::to_string(t) + " observes " + std::to_string(n) +
                             " layers but lists " + std::to_string(o.experts.size()) + " experts");
    for (int l = 0; l < n; ++l)
      for (int j = 0; j < o.top_k; ++j) {
        const int e = o.experts[static_cast<size_t>(l) * o.top_k + j];
        if (e >= 0 && e < num_experts_) f.row(static_cast<int>(t), l)[e] = 1.f;
      }
    if (n == L) continue;
    if (n == 0) {
      if (batch[t].embedding.empty())
        return InvalidArgument("lookahead predictor: token " + std::to_string(t) +
                               " has nothing observed and no input embedding to forecast from");
      EF_RETURN_IF_ERROR(FillFrom(batch[t].embedding, -1, 0, &f, static_cast<int>(t)));
    } else {
      if (o.hidden.empty())
        return InvalidArgument("lookahead predictor: token " + std::to_string(t) +
                               " has no hidden state (ObservedRouting::hidden; enable "
                               "Engine::set_expose_router_inputs)");
      EF_RETURN_IF_ERROR(FillFrom(o.hidden, n - 1, n, &f, static_cast<int>(t)));
    }
  }
  return f;
}

}  // namespace ef::placement
