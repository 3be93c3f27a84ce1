#include "cache/predictor_prefetcher.h"

#include <algorithm>
#include <numeric>

#include "placement/affinity_predictor.h"
#include "placement/hybrid_predictor.h"
#include "placement/path_predictor.h"
#include "placement/predictor_file.h"
#include "runtime/core/logging.h"

namespace ef::cache {
namespace {

// Token ids of a sequence kept for the path predictor's context; it reads the previous token and
// a window of 8 before it, so a short tail is all it needs.
constexpr size_t kHistoryKeep = 64;
// Sequences not seen for this many forwards are forgotten (finished requests).
constexpr int64_t kHistoryIdleSteps = 1024;

std::string ShapeText(int layers, int experts, int top_k) {
  return std::to_string(layers) + " MoE layers x " + std::to_string(experts) + " experts, top-" + std::to_string(top_k);
}

}  // namespace

StatusOr<std::unique_ptr<PredictorPrefetcher>> PredictorPrefetcher::Create(const runtime::ModelWeights& model,
                                                                           const PredictorPrefetcherOptions& options,
                                                                           UpcomingSink upcoming,
                                                                           ForecastSink forecast) {
  const runtime::ModelConfig& c = model.config();
  const int M = c.num_moe_layers(), E = c.num_experts, K = c.top_k;
  if (M < 1) return InvalidArgument("prefetch predictor: the model has no MoE layer");
  if (options.depth < 1)
    return InvalidArgument("prefetch predictor: depth must be >= 1, got " + std::to_string(options.depth));
  if (!(options.min_prob >= 0 && options.min_prob <= 1))
    return InvalidArgument("prefetch predictor: min_prob must be in [0, 1], got " + std::to_string(options.min_prob));
  if (!options.capacity.empty() && options.capacity.size() != static_cast<size_t>(c.num_layers))
    return InvalidArgument("prefetch predictor: " + std::to_string(options.capacity.size()) + " layer capacities for " +
                           std::to_string(c.num_layers) + " layers");
  auto p = std::unique_ptr<PredictorPrefetcher>(new PredictorPrefetcher());
  p->config_ = &c;
  p->options_ = options;
  p->upcoming_ = std::move(upcoming);
  p->forecast_ = std::move(forecast);
  p->moe_layers_ = c.MoeLayers();
  const std::string& kind = options.kind;
  if (kind == "lookahead") {
    if (!options.path.empty())
      return InvalidArgument("predictor kind lookahead reads the model's own routers and takes no file (got " +
                             options.path + ")");
    EF_ASSIGN_OR_RETURN(p->lookahead_, placement::LookaheadPredictor::FromModel(model));
    p->description_ = "lookahead (the next layers' routers on the current hidden state)";
  } else if (kind == "frequency" && options.path.empty()) {
    if (options.trace) {
      EF_RETURN_IF_ERROR(placement::CheckTraceShape(*options.trace, M, E, K));
      EF_ASSIGN_OR_RETURN(p->frequency_, placement::FrequencyPredictor::Fit(*options.trace));
      p->description_ = "frequency (fitted on the routing trace)";
    } else {
      p->frequency_ = std::make_unique<placement::FrequencyPredictor>(M, E, K);
      p->observe_online_ = true;
      p->description_ = "frequency (counted online)";
    }
  } else if (kind == "frequency" || kind == "path" || kind == "affinity" || kind == "hybrid") {
    if (options.path.empty())
      return InvalidArgument("predictor kind " + kind +
                             " needs a trained predictor file (predictor.path; expertflow train-predictor)");
    auto loaded = placement::LoadPredictor(options.path);
    if (!loaded.ok()) {
      Status s = loaded.status();
      return s.Prepend("predictor.path");
    }
    const placement::PredictorInfo& info = loaded->info;
    if (info.kind != kind)
      return InvalidArgument("predictor file " + options.path + " holds a " + info.kind +
                             " predictor, the configured kind is " + kind);
    if (info.num_layers != M || info.num_experts != E || info.top_k != K)
      return InvalidArgument("predictor file " + options.path + " was trained for " +
                             ShapeText(info.num_layers, info.num_experts, info.top_k) + ", the model has " +
                             ShapeText(M, E, K));
    if (kind == "frequency") {
      if (!dynamic_cast<placement::FrequencyPredictor*>(loaded->predictor.get()))
        return Internal("predictor file " + options.path + ": kind frequency did not load as one");
      p->frequency_.reset(static_cast<placement::FrequencyPredictor*>(loaded->predictor.release()));
    } else {
      p->loaded_ = std::move(loaded->predictor);
      p->conditional_ = dynamic_cast<const placement::ConditionalPredictor*>(p->loaded_.get());
      // A path model without path inputs gives its a-priori forecast whatever is observed: once
      // per forward is enough.
      if (auto* path = dynamic_cast<const placement::PathPredictor*>(p->loaded_.get());
          path && !path->options().observe_path)
        p->conditional_ = nullptr;
    }
    p->description_ = kind + " (" + options.path + ")";
  } else {
    return InvalidArgument("unknown prefetch predictor '" + kind + "' (lookahead, frequency, path, affinity, hybrid)");
  }
  p->predicted_.resize(M);
  p->step_ = placement::RoutingForecast(1, c.num_layers, E);
  return p;
}

Status PredictorPrefetcher::BeginForward(const runtime::LayerRouting& r) {
  const int M = static_cast<int>(moe_layers_.size()), K = config_->top_k, T = r.num_tokens;
  ++step_count_;
  num_tokens_ = T;
  observed_.assign(static_cast<size_t>(T) * M * K, -1);
  for (auto& p : predicted_) p.clear();
  std::fill(step_.prob.begin(), step_.prob.end(), 0.f);
  if (!loaded_) return Status::Ok();  // only the trained kinds read tokens and context
  // Append this forward's tokens to each sequence's history, then point every row's context at
  // the tokens before it (no history vector grows after the spans are taken).
  for (int t = 0; t < T; ++t) {
    History& h = history_[r.seq[t]];
    const int64_t pos = r.pos[t];
    if (h.last_step != step_count_) {
      h.last_step = step_count_;
      if (h.tokens.size() > kHistoryKeep) {
        const size_t drop = h.tokens.size() - kHistoryKeep;
        h.tokens.erase(h.tokens.begin(), h.tokens.begin() + static_cast<std::ptrdiff_t>(drop));
        h.first_pos += static_cast<int64_t>(drop);
      }
    }
    const int64_t end = h.first_pos + static_cast<int64_t>(h.tokens.size());
    if (pos < h.first_pos || pos > end) {  // a new sequence under a reused id, or a gap: start over
      h.first_pos = pos;
      h.tokens.clear();
    } else if (pos < end) {
      h.tokens.resize(static_cast<size_t>(pos - h.first_pos));
    }
    h.tokens.push_back(r.token_ids[t]);
  }
  inputs_.assign(T, {});
  for (int t = 0; t < T; ++t) {
    const History& h = history_.at(r.seq[t]);
    placement::PredictorInput& in = inputs_[t];
    in.seq = r.seq[t];
    in.pos = r.pos[t];
    in.token = r.token_ids[t];
    in.context = std::span<const int32_t>(h.tokens.data(), static_cast<size_t>(in.pos - h.first_pos));
  }
  if (step_count_ % kHistoryIdleSteps == 0)
    std::erase_if(history_, [&](const auto& kv) { return kv.second.last_step < step_count_ - kHistoryIdleSteps; });
  if (!conditional_) {
    EF_ASSIGN_OR_RETURN(apriori_, loaded_->Predict(inputs_));
  }
  return Status::Ok();
}

Status PredictorPrefetcher::TokenProbs(const runtime::LayerRouting& r, int m, int target) {
  const int E = config_->num_experts, H = config_->hidden_size, T = r.num_tokens;
  probs_.resize(static_cast<size_t>(T) * E);
  if (lookahead_) {
    if (r.hidden.size() != static_cast<size_t>(T) * H)
      return FailedPrecondition(
          "lookahead prefetch needs the router inputs (Engine::set_expose_router_inputs(true)); got " +
          std::to_string(r.hidden.size()) + " values for " + std::to_string(T) + " tokens");
    for (int t = 0; t < T; ++t)
      EF_RETURN_IF_ERROR(lookahead_->LayerProbs(r.hidden.subspan(static_cast<size_t>(t) * H, H), m, target,
                                                probs_.data() + static_cast<size_t>(t) * E));
  } else if (frequency_) {
    const std::vector<float> p = frequency_->LayerProbs(target);
    for (int t = 0; t < T; ++t) std::copy(p.begin(), p.end(), probs_.begin() + static_cast<ptrdiff_t>(t) * E);
  } else {
    const placement::RoutingForecast& f = conditional_ ? conditional_f_ : apriori_;
    for (int t = 0; t < T; ++t) std::copy_n(f.row(t, target), E, probs_.begin() + static_cast<ptrdiff_t>(t) * E);
  }
  return Status::Ok();
}

Status PredictorPrefetcher::OnRouting(const runtime::LayerRouting& r) {
  const int M = static_cast<int>(moe_layers_.size()), E = config_->num_experts, K = config_->top_k;
  const int m = r.moe_layer.index, T = r.num_tokens;
  if (m < 0 || m >= M || r.top_k != K) return Internal("prefetch predictor: routing of an unexpected shape");
  if (m == 0 || T != num_tokens_) EF_RETURN_IF_ERROR(BeginForward(r));

  // The truth of layer m: observed routing, forecast accuracy, the policy's current row.
  std::vector<char> truth(E, 0);
  for (int t = 0; t < T; ++t)
    for (int j = 0; j < K; ++j) {
      const int32_t e = r.ids[static_cast<size_t>(t) * K + j];
      if (e < 0 || e >= E) continue;
      truth[e] = 1;
      observed_[(static_cast<size_t>(t) * M + m) * K + j] = static_cast<int16_t>(e);
    }
  float* now = step_.row(0, moe_layers_[m]);
  for (int e = 0; e < E; ++e) now[e] = truth[e] ? 1.f : 0.f;
  if (!predicted_[m].empty()) {
    for (int e = 0; e < E; ++e) forecast_chosen_ += truth[e];
    for (int32_t e : predicted_[m]) forecast_hits_ += truth[e];
  }
  if (m == M - 1 && observe_online_) {
    const placement::PredictorInput none;
    for (int t = 0; t < T; ++t)
      frequency_->Observe(none, std::span<const int16_t>(observed_).subspan(static_cast<size_t>(t) * M * K, M * K), K);
  }

  if (conditional_ && m + 1 < M) {
    std::vector<placement::ObservedRouting> obs(T);
    for (int t = 0; t < T; ++t) {
      obs[t].num_layers_done = m + 1;
      obs[t].top_k = K;
      obs[t].horizon = options_.depth;  // only the layers prefetched from here are read
      obs[t].experts = std::span<const int16_t>(observed_).subspan(static_cast<size_t>(t) * M * K, M * K);
    }
    EF_ASSIGN_OR_RETURN(conditional_f_, conditional_->PredictGiven(inputs_, obs));
  }

  std::vector<double> score(E);
  std::vector<char> wanted(E);
  std::vector<double> idle(E);  // the probability that no token of the batch routes to e
  std::vector<int> order(E);
  for (int target = m + 1; target < M && target <= m + options_.depth; ++target) {
    EF_RETURN_IF_ERROR(TokenProbs(r, m, target));
    std::fill(score.begin(), score.end(), 0.0);
    std::fill(wanted.begin(), wanted.end(), 0);
    std::fill(idle.begin(), idle.end(), 1.0);
    for (int t = 0; t < T; ++t) {
      const float* p = probs_.data() + static_cast<size_t>(t) * E;
      for (int e = 0; e < E; ++e) {
        score[e] += p[e];
        idle[e] *= 1.0 - std::clamp(static_cast<double>(p[e]), 0.0, 1.0);
      }
      // This token's top-k (ties: lower id), as the router would pick.
      std::iota(order.begin(), order.end(), 0);
      std::partial_sort(order.begin(), order.begin() + K, order.end(),
                        [p](int a, int b) { return p[a] != p[b] ? p[a] > p[b] : a < b; });
      for (int j = 0; j < K; ++j) wanted[order[j]] = 1;
    }
    std::vector<int32_t> list;
    for (int e = 0; e < E; ++e)
      if (wanted[e]) list.push_back(e);
    std::stable_sort(list.begin(), list.end(), [&](int32_t a, int32_t b) { return score[a] > score[b]; });
    const int layer = moe_layers_[target];
    const int cap = options_.capacity.empty() ? E : options_.capacity[layer];
    if (static_cast<int>(list.size()) > cap) list.resize(static_cast<size_t>(cap));
    // The policy protects every forecast expert; only those at least min_prob probable load now
    // (a prefetch that evicts an expert the token may still need costs a copy if it does).
    float* row = step_.row(0, layer);
    std::fill(row, row + E, 0.f);
    for (int32_t e : list) row[e] = 1.f;
    std::erase_if(list, [&](int32_t e) { return 1.0 - idle[e] < options_.min_prob; });
    predicted_[target] = list;
    // The batch's need of every expert of the layer, listed or not: the cache weighs a prefetch
    // against the need of the resident it would evict.
    std::vector<float> need(E);
    for (int e = 0; e < E; ++e) need[e] = static_cast<float>(1.0 - idle[e]);
    upcoming_(layer, std::move(list), std::move(need));
  }
  if (forecast_) forecast_(step_);
  return Status::Ok();
}

}  // namespace ef::cache
