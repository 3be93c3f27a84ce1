#include "placement/path_predictor.h"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <thread>

#include "placement/trace_inputs.h"
#include "runtime/core/logging.h"

namespace ef::placement {
namespace {

constexpr int kPosFeatures = 4;
constexpr int kUnknownRow = 0;  // token not seen in training (or not recorded)
constexpr int kNoneRow = 1;     // no previous token (start of sequence)

// Portable deterministic random numbers (std distributions differ between standard libraries).
class Rng {
 public:
  explicit Rng(uint64_t seed) : state_(seed * 0x9E3779B97F4A7C15ull + 0x632BE59BD9B4E019ull) {}
  uint64_t Next() {  // splitmix64
    uint64_t z = (state_ += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
  }
  double Uniform() { return static_cast<double>(Next() >> 11) * (1.0 / 9007199254740992.0); }
  double Normal() {
    double u1 = std::max(Uniform(), 1e-300), u2 = Uniform();
    return std::sqrt(-2.0 * std::log(u1)) * std::cos(6.283185307179586 * u2);
  }
  size_t Below(size_t n) { return static_cast<size_t>(Next() % n); }

 private:
  uint64_t state_;
};

inline float Sigmoid(float z) { return 1.f / (1.f + std::exp(-z)); }

// The [cols][rows] transpose of a row-major [rows][cols] matrix.
std::vector<float> Transpose(const std::vector<float>& m, int64_t rows, int64_t cols) {
  std::vector<float> t(m.size());
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) t[c * rows + r] = m[r * cols + c];
  return t;
}

// Top-k recall of prediction p (num_experts values) against the true experts.
double RecallAtK(const float* p, int num_experts, const int16_t* truth, int k) {
  std::vector<int> idx(num_experts);
  std::iota(idx.begin(), idx.end(), 0);
  std::partial_sort(idx.begin(), idx.begin() + k, idx.end(),
                    [p](int a, int b) { return p[a] != p[b] ? p[a] > p[b] : a < b; });
  int hit = 0;
  for (int j = 0; j < k; ++j)
    for (int i = 0; i < k; ++i) hit += idx[i] == truth[j];
  return static_cast<double>(hit) / k;
}

}  // namespace

struct PathPredictor::Example {
  int tok = kUnknownRow;
  int prev = kNoneRow;
  std::vector<int> ctx;
  float pos[kPosFeatures] = {};
  int depth = 0;                      // layers whose routing is observed (inputs, not scored)
  int end_layer = 0;                  // logits of layers depth..end_layer-1 are computed (0: all)
  const int16_t* observed = nullptr;  // [layer * observed_k + j] for layers < depth
  int observed_k = 0;
  const int16_t* experts = nullptr;  // [layer * top_k + j], training only
};

PathPredictor::PathPredictor(int num_layers, int num_experts, int top_k, const PathPredictorOptions& options,
                             int vocab_rows)
    : num_layers_(num_layers), num_experts_(num_experts), top_k_(top_k), options_(options), vocab_rows_(vocab_rows) {
  const size_t d = options_.embed_dim, H = options_.hidden, V = vocab_rows_;
  const size_t out = static_cast<size_t>(num_layers_) * num_experts_;
  off_tok_ = 0;
  off_prev_ = off_tok_ + V * d;
  off_ctx_ = off_prev_ + V * d;
  off_w1_ = off_ctx_ + V * d;
  off_b1_ = off_w1_ + H * input_dim();
  off_w2_ = off_b1_ + H;
  off_b2_ = off_w2_ + out * H;
  off_skip_ = off_b2_ + out;
  size_ = off_skip_ + static_cast<size_t>(sparse_dim()) * out;
  params_.assign(size_, 0.f);
  popularity_.assign(out, 0.f);
  trust_.assign(num_layers_, 1.f);
  trust_given_.assign(num_layers_, 1.f);
  token_weight_.assign(num_layers_, 1.f);
  token_weight_given_.assign(num_layers_, 1.f);
}

int PathPredictor::dense_dim() const { return 3 * options_.embed_dim + kPosFeatures; }

int PathPredictor::sparse_dim() const { return options_.observe_path ? num_layers_ * num_experts_ + num_layers_ : 0; }

int PathPredictor::input_dim() const { return dense_dim() + sparse_dim(); }

void PathPredictor::ActiveInputs(const Example& ex, std::vector<int>* active) const {
  active->clear();
  if (!options_.observe_path) return;
  const int D0 = dense_dim(), E = num_experts_;
  const int first = options_.path_window > 0 ? std::max(0, ex.depth - options_.path_window) : 0;
  for (int l = first; l < ex.depth; ++l) {
    const size_t layer_start = active->size();
    for (int j = 0; j < ex.observed_k; ++j) {
      const int e = ex.observed[l * ex.observed_k + j];
      if (e < 0 || e >= E) continue;
      const int i = D0 + l * E + e;
      if (std::find(active->begin() + layer_start, active->end(), i) == active->end()) active->push_back(i);
    }
  }
  active->push_back(D0 + num_layers_ * E + std::min(ex.depth, num_layers_ - 1));
}

int PathPredictor::TokenIndex(int64_t token) const {
  auto it = token_index_.find(token);
  return it == token_index_.end() ? kUnknownRow : it->second;
}

PathPredictor::Example PathPredictor::MakeExample(const PredictorInput& in) const {
  Example ex;
  ex.tok = in.token < 0 ? kUnknownRow : TokenIndex(in.token);
  const auto& c = in.context;
  if (!c.empty()) ex.prev = c.back() < 0 ? kUnknownRow : TokenIndex(c.back());
  for (int i = 0; i < options_.context_window && static_cast<size_t>(i) + 2 <= c.size(); ++i) {
    int32_t t = c[c.size() - 2 - i];
    ex.ctx.push_back(t < 0 ? kUnknownRow : TokenIndex(t));
  }
  const double pos = static_cast<double>(std::max<int64_t>(in.pos, 0));
  ex.pos[0] = pos == 0 ? 1.f : 0.f;
  ex.pos[1] = static_cast<float>(std::min(pos, 1024.0) / 1024.0);
  ex.pos[2] = static_cast<float>(std::log1p(pos) / std::log1p(4096.0));
  ex.pos[3] = static_cast<float>(1.0 / (1.0 + pos));
  return ex;
}

void PathPredictor::Forward(const Example& ex, const float* P, float* x, std::vector<int>* active, float* h,
                            float* z) const {
  const int d = options_.embed_dim, H = options_.hidden, D0 = dense_dim();
  const int out = num_layers_ * num_experts_;
  const float* te = P + off_tok_ + static_cast<size_t>(ex.tok) * d;
  const float* pe = P + off_prev_ + static_cast<size_t>(ex.prev) * d;
  for (int i = 0; i < d; ++i) {
    x[i] = te[i];
    x[d + i] = pe[i];
    x[2 * d + i] = 0.f;
  }
  if (!ex.ctx.empty()) {
    const float inv = 1.f / static_cast<float>(ex.ctx.size());
    for (int r : ex.ctx) {
      const float* ce = P + off_ctx_ + static_cast<size_t>(r) * d;
      for (int i = 0; i < d; ++i) x[2 * d + i] += ce[i] * inv;
    }
  }
  for (int i = 0; i < kPosFeatures; ++i) x[3 * d + i] = ex.pos[i];
  ActiveInputs(ex, active);
  // W1 and W2 are stored transposed ([input][hidden], [hidden][output]): each input, and each
  // active hidden unit, adds one contiguous row (loops the compiler vectorises).
  const float* w1t = P + off_w1_;
  std::copy(P + off_b1_, P + off_b1_ + H, h);
  for (int i = 0; i < D0; ++i) {
    const float xi = x[i];
    if (xi == 0.f) continue;
    const float* w = w1t + static_cast<size_t>(i) * H;
    for (int j = 0; j < H; ++j) h[j] += xi * w[j];
  }
  for (int i : *active) {
    const float* w = w1t + static_cast<size_t>(i) * H;
    for (int j = 0; j < H; ++j) h[j] += w[j];
  }
  for (int j = 0; j < H; ++j) h[j] = h[j] > 0.f ? h[j] : 0.f;
  const int lo = ex.depth * num_experts_;  // observed layers need no logits, nor those past the end
  const int n = (ex.end_layer > 0 ? std::min(ex.end_layer, num_layers_) * num_experts_ : out) - lo;
  float* zo = z + lo;
  std::copy(P + off_b2_ + lo, P + off_b2_ + out, zo);
  const float* w2t = P + off_w2_ + lo;
  for (int j = 0; j < H; ++j) {
    const float hj = h[j];
    if (hj == 0.f) continue;
    const float* w = w2t + static_cast<size_t>(j) * out;
    for (int o = 0; o < n; ++o) zo[o] += hj * w[o];
  }
  // The path inputs also reach the logits directly (a linear, transition-like term).
  for (int i : *active) {
    const float* w = P + off_skip_ + static_cast<size_t>(i - D0) * out + lo;
    for (int o = 0; o < n; ++o) zo[o] += w[o];
  }
}

PathPredictor::Example PathPredictor::WithoutTokens(Example ex) const {
  ex.tok = kUnknownRow;
  if (ex.prev != kNoneRow) ex.prev = kUnknownRow;
  std::fill(ex.ctx.begin(), ex.ctx.end(), kUnknownRow);
  return ex;
}

void PathPredictor::ForecastRows(const Example& ex, int first_layer, RoutingForecast* f, int t,
                                 std::vector<float>* scratch, std::vector<int>* active) const {
  const size_t out = static_cast<size_t>(num_layers_) * num_experts_;
  scratch->resize(dense_dim() + options_.hidden + 2 * out);
  float* x = scratch->data();
  float* h = x + dense_dim();
  float* z = h + options_.hidden;
  float* zb = z + out;
  const std::vector<float>& trust = ex.depth == 0 ? trust_ : trust_given_;
  const std::vector<float>& weight = ex.depth == 0 ? token_weight_ : token_weight_given_;
  const int end = ex.end_layer > 0 ? std::min(ex.end_layer, num_layers_) : num_layers_;
  Forward(ex, params_.data(), x, active, h, z);
  bool bare = false;  // the view without token ids, where some layer's blend uses it
  for (int l = first_layer; l < end; ++l) bare = bare || weight[l] < 1.f;
  if (bare) Forward(WithoutTokens(ex), params_.data(), x, active, h, zb);
  for (int l = first_layer; l < end; ++l) {
    float* row = f->row(t, l);
    const float a = trust[l], w = weight[l];
    for (int e = 0; e < num_experts_; ++e) {
      const size_t o = static_cast<size_t>(l) * num_experts_ + e;
      const float net = bare ? w * Sigmoid(z[o]) + (1.f - w) * Sigmoid(zb[o]) : Sigmoid(z[o]);
      row[e] = a * net + (1.f - a) * popularity_[o];
    }
  }
}

StatusOr<RoutingForecast> PathPredictor::Predict(std::span<const PredictorInput> batch) const {
  RoutingForecast f(static_cast<int>(batch.size()), num_layers_, num_experts_);
  std::vector<float> scratch;
  std::vector<int> active;
  for (size_t t = 0; t < batch.size(); ++t)
    ForecastRows(MakeExample(batch[t]), 0, &f, static_cast<int>(t), &scratch, &active);
  return f;
}

StatusOr<RoutingForecast> PathPredictor::PredictGiven(std::span<const PredictorInput> batch,
                                                      std::span<const ObservedRouting> observed) const {
  if (observed.size() != batch.size())
    return InvalidArgument("path predictor: " + std::to_string(observed.size()) + " observed routings for " +
                           std::to_string(batch.size()) + " tokens");
  RoutingForecast f(static_cast<int>(batch.size()), num_layers_, num_experts_);
  std::vector<float> scratch;
  std::vector<int> active;
  for (size_t t = 0; t < batch.size(); ++t) {
    const ObservedRouting& o = observed[t];
    const int done = std::clamp(o.num_layers_done, 0, num_layers_);
    if (done > 0 && o.top_k != top_k_)
      return InvalidArgument("path predictor: token " + std::to_string(t) + " has " + std::to_string(o.top_k) +
                             " experts per observed layer, the predictor was trained on top-" + std::to_string(top_k_));
    if (done > 0 && o.experts.size() < static_cast<size_t>(done) * o.top_k)
      return InvalidArgument("path predictor: token " + std::to_string(t) + " claims " + std::to_string(done) +
                             " observed layers but has " + std::to_string(o.experts.size()) + " expert ids");
    for (int l = 0; l < done; ++l) {  // observed layers: the truth
      float* row = f.row(static_cast<int>(t), l);
      for (int j = 0; j < o.top_k; ++j) {
        const int e = o.experts[static_cast<size_t>(l) * o.top_k + j];
        if (e >= 0 && e < num_experts_) row[e] = 1.f;
      }
    }
    if (done == num_layers_) continue;
    Example ex = MakeExample(batch[t]);
    if (o.horizon > 0) ex.end_layer = std::min(num_layers_, done + o.horizon);
    if (options_.observe_path) {  // else an a-priori model: its forecast of the remaining layers
      ex.depth = done;
      ex.observed = o.experts.data();
      ex.observed_k = o.top_k;
    }
    ForecastRows(ex, done, &f, static_cast<int>(t), &scratch, &active);
  }
  return f;
}

// Mini-batch gradient computation and Adam, split over a fixed number of threads.
class PathPredictor::Trainer {
 public:
  explicit Trainer(PathPredictor* p) : p_(p), m_(p->size_, 0.f), v_(p->size_, 0.f) {
    const int threads = std::max(1, p->options_.num_threads);
    grads_.assign(threads, std::vector<float>(p->size_, 0.f));
    losses_.assign(threads, 0.0);
  }

  // One Adam step on `batch`; returns the summed BCE over the batch's outputs.
  //
  // The path term W_path has one row per path input, and a batch touches only the rows of the
  // inputs its examples have: gradients are zeroed, summed and applied on the dense parameters
  // and those rows only (lazy Adam for W_path: a row's moments advance when it has a gradient),
  // so a step costs the batch's rows, not all (L*E + L) x (L*E) of them.
  double Step(const std::vector<Example>& batch) {
    const int threads = static_cast<int>(grads_.size());
    const size_t n = batch.size();
    const float inv_b = 1.f / static_cast<float>(n);
    const PathPredictor& P = *p_;
    const size_t out = static_cast<size_t>(P.num_layers_) * P.num_experts_;
    rows_.clear();
    std::vector<int> active;
    for (const Example& ex : batch) {
      P.ActiveInputs(ex, &active);
      for (int i : active) rows_.push_back(i - P.dense_dim());
    }
    std::sort(rows_.begin(), rows_.end());
    rows_.erase(std::unique(rows_.begin(), rows_.end()), rows_.end());
    // fn(begin, end) over the parameter ranges this step updates.
    const auto for_each_range = [&](auto&& fn) {
      fn(size_t{0}, P.off_skip_);
      for (int r : rows_) fn(P.off_skip_ + r * out, P.off_skip_ + (r + 1) * out);
    };
    auto work = [&](int t) {
      std::vector<float>& g = grads_[t];
      for_each_range([&](size_t a, size_t b) { std::fill(g.begin() + a, g.begin() + b, 0.f); });
      losses_[t] = 0.0;
      const size_t lo = n * t / threads, hi = n * (t + 1) / threads;
      for (size_t i = lo; i < hi; ++i) losses_[t] += Backward(batch[i], inv_b, g.data());
    };
    if (threads == 1) {
      work(0);
    } else {
      std::vector<std::thread> pool;
      for (int t = 1; t < threads; ++t) pool.emplace_back(work, t);
      work(0);
      for (auto& th : pool) th.join();
    }
    double loss = 0;
    for (int t = 0; t < threads; ++t) loss += losses_[t];
    for (int t = 1; t < threads; ++t)
      for_each_range([&](size_t a, size_t b) {
        for (size_t i = a; i < b; ++i) grads_[0][i] += grads_[t][i];
      });
    ++step_;
    for_each_range([&](size_t a, size_t b) { Adam(grads_[0], a, b); });
    return loss;
  }

 private:
  double Backward(const Example& ex, float inv_b, float* g) {
    const PathPredictor& P = *p_;
    const int d = P.options_.embed_dim, H = P.options_.hidden, D0 = P.dense_dim();
    const int L = P.num_layers_, E = P.num_experts_, K = P.top_k_, out = L * E;
    x_.resize(D0);
    h_.resize(H);
    z_.resize(out);
    dh_.assign(H, 0.f);
    dx_.assign(D0, 0.f);
    y_.assign(out, 0.f);
    for (int l = 0; l < L; ++l)
      for (int j = 0; j < K; ++j) y_[static_cast<size_t>(l) * E + ex.experts[l * K + j]] = 1.f;
    const float* params = P.params_.data();
    P.Forward(ex, params, x_.data(), &active_, h_.data(), z_.data());
    double loss = 0;
    const int lo = ex.depth * E, n = out - lo;  // observed layers are inputs, not targets
    dz_.assign(out, 0.f);
    float* gb2 = g + P.off_b2_;
    for (int o = lo; o < out; ++o) {
      const float z = z_[o], y = y_[o];
      // Stable BCE with logits: max(z,0) - z*y + log(1 + exp(-|z|)).
      loss += std::max(z, 0.f) - z * y + std::log1p(std::exp(-std::fabs(z)));
      dz_[o] = (Sigmoid(z) - y) * inv_b;
      gb2[o] += dz_[o];
    }
    const float* dz = dz_.data() + lo;
    for (int i : active_) {
      float* gs = g + P.off_skip_ + static_cast<size_t>(i - D0) * out + lo;
      for (int o = 0; o < n; ++o) gs[o] += dz[o];
    }
    // Transposed W2 [hidden][output]: row j gets h_j * dz, and dh_j = row j . dz (active units).
    const float* w2t = params + P.off_w2_ + lo;
    float* gw2t = g + P.off_w2_ + lo;
    for (int j = 0; j < H; ++j) {
      const float hj = h_[j];
      if (hj <= 0.f) continue;
      const float* w = w2t + static_cast<size_t>(j) * out;
      float* gw = gw2t + static_cast<size_t>(j) * out;
      float s = 0.f;
      for (int o = 0; o < n; ++o) {
        gw[o] += hj * dz[o];
        s += w[o] * dz[o];
      }
      dh_[j] = s;
    }
    // Transposed W1 [input][hidden].
    const float* w1t = params + P.off_w1_;
    float* gw1t = g + P.off_w1_;
    float* gb1 = g + P.off_b1_;
    for (int j = 0; j < H; ++j) gb1[j] += dh_[j];
    for (int i = 0; i < D0; ++i) {
      const float xi = x_[i];
      const float* w = w1t + static_cast<size_t>(i) * H;
      float* gw = gw1t + static_cast<size_t>(i) * H;
      float s = 0.f;
      for (int j = 0; j < H; ++j) {
        gw[j] += xi * dh_[j];
        s += w[j] * dh_[j];
      }
      dx_[i] = s;
    }
    for (int i : active_) {
      float* gw = gw1t + static_cast<size_t>(i) * H;
      for (int j = 0; j < H; ++j) gw[j] += dh_[j];
    }
    float* gt = g + P.off_tok_ + static_cast<size_t>(ex.tok) * d;
    float* gp = g + P.off_prev_ + static_cast<size_t>(ex.prev) * d;
    for (int i = 0; i < d; ++i) {
      gt[i] += dx_[i];
      gp[i] += dx_[d + i];
    }
    if (!ex.ctx.empty()) {
      const float inv = 1.f / static_cast<float>(ex.ctx.size());
      for (int r : ex.ctx) {
        float* gc = g + P.off_ctx_ + static_cast<size_t>(r) * d;
        for (int i = 0; i < d; ++i) gc[i] += dx_[2 * d + i] * inv;
      }
    }
    return loss;
  }

  // Adam on parameters [begin, end) at step step_.
  void Adam(const std::vector<float>& g, size_t begin, size_t end) {
    constexpr float b1 = 0.9f, b2 = 0.999f, eps = 1e-8f;
    const float lr = static_cast<float>(p_->options_.learning_rate);
    const float wd = static_cast<float>(p_->options_.weight_decay);
    const float c1 = 1.f / (1.f - std::pow(b1, static_cast<float>(step_)));
    const float c2 = 1.f / (1.f - std::pow(b2, static_cast<float>(step_)));
    float* w = p_->params_.data();
    for (size_t i = begin; i < end; ++i) {
      const float gi = g[i] + wd * w[i];
      m_[i] = b1 * m_[i] + (1.f - b1) * gi;
      v_[i] = b2 * v_[i] + (1.f - b2) * gi * gi;
      w[i] -= lr * (m_[i] * c1) / (std::sqrt(v_[i] * c2) + eps);
    }
  }

  PathPredictor* p_;
  std::vector<float> m_, v_;
  std::vector<std::vector<float>> grads_;
  std::vector<double> losses_;
  std::vector<int> rows_;  // W_path rows the current batch touches
  int64_t step_ = 0;
  // Per-call scratch; Backward runs on several threads, so these are thread_local below.
  static thread_local std::vector<float> x_, h_, z_, dz_, dh_, dx_, y_;
  static thread_local std::vector<int> active_;
};

thread_local std::vector<float> PathPredictor::Trainer::x_, PathPredictor::Trainer::h_, PathPredictor::Trainer::z_,
    PathPredictor::Trainer::dz_, PathPredictor::Trainer::dh_, PathPredictor::Trainer::dx_, PathPredictor::Trainer::y_;
thread_local std::vector<int> PathPredictor::Trainer::active_;

namespace {
// The training options' ranges, each named as its train-predictor flag.
Status CheckOptions(const PathPredictorOptions& o) {
  auto bad = [](const char* flag, const std::string& want, const std::string& got) {
    return InvalidArgument("path predictor: " + std::string(flag) + " must be " + want + ", got " + got);
  };
  if (o.embed_dim < 1) return bad("--embed-dim", ">= 1", std::to_string(o.embed_dim));
  if (o.hidden < 1) return bad("--hidden", ">= 1", std::to_string(o.hidden));
  if (o.context_window < 0) return bad("--context", ">= 0", std::to_string(o.context_window));
  if (o.epochs < 1) return bad("--epochs", ">= 1", std::to_string(o.epochs));
  if (o.batch_size < 1) return bad("--batch-size", ">= 1", std::to_string(o.batch_size));
  if (!(o.learning_rate > 0)) return bad("--lr", "> 0", std::to_string(o.learning_rate));
  if (o.token_dropout < 0 || o.token_dropout >= 1)
    return bad("--token-dropout", "in [0, 1)", std::to_string(o.token_dropout));
  if (o.num_threads < 1 || o.num_threads > 64) return bad("--threads", "in 1..64", std::to_string(o.num_threads));
  if (o.path_samples < 0) return bad("--path-samples", ">= 0", std::to_string(o.path_samples));
  if (o.path_window < 0) return bad("--path-window", ">= 0", std::to_string(o.path_window));
  return Status::Ok();
}
}  // namespace

StatusOr<std::unique_ptr<PathPredictor>> PathPredictor::Train(
    const RoutingTrace& train, const RoutingTrace& val, const PathPredictorOptions& requested,
    const std::function<void(const PathEpochReport&)>& on_epoch) {
  PathPredictorOptions options = requested;
  if (options.path_samples == 0) options.observe_path = false;  // trained a priori only: no path inputs
  if (train.tokens.empty()) return InvalidArgument("cannot train a path predictor on an empty trace");
  if (!val.tokens.empty())
    EF_RETURN_IF_ERROR(CheckTraceShape(val, train.num_layers(), train.num_experts(), train.top_k()));
  EF_RETURN_IF_ERROR(CheckOptions(options));
  const int L = train.num_layers(), E = train.num_experts(), K = train.top_k();

  // Vocabulary: the token ids of the training split, in increasing order.
  std::vector<int32_t> vocab;
  for (const auto& t : train.tokens)
    if (t.token >= 0) vocab.push_back(static_cast<int32_t>(t.token));
  std::sort(vocab.begin(), vocab.end());
  vocab.erase(std::unique(vocab.begin(), vocab.end()), vocab.end());
  std::unique_ptr<PathPredictor> p(new PathPredictor(L, E, K, options, static_cast<int>(vocab.size()) + 2));
  p->vocab_ = vocab;
  for (size_t r = 0; r < vocab.size(); ++r) p->token_index_[vocab[r]] = static_cast<int>(r) + 2;

  // Popularity (the blend target and the output bias initialisation).
  std::vector<double> counts(static_cast<size_t>(L) * E, 0.0);
  for (const auto& t : train.tokens)
    for (int l = 0; l < L; ++l)
      for (int j = 0; j < K; ++j) counts[static_cast<size_t>(l) * E + t.experts[l * K + j]] += 1.0;
  const double n_train = static_cast<double>(train.tokens.size());
  for (size_t o = 0; o < counts.size(); ++o)
    p->popularity_[o] = static_cast<float>((counts[o] + static_cast<double>(K) / E) / (n_train + 1.0));

  // Initialisation.
  Rng rng(options.seed);
  const int H = options.hidden;
  // He initialisation over the inputs a token really has: the dense ones, and at most top_k path
  // inputs per observed layer plus the depth one-hot.
  const int fan_in = p->dense_dim() + (options.observe_path ? (L - 1) * K + 1 : 0);
  for (size_t i = p->off_tok_; i < p->off_w1_; ++i) p->params_[i] = static_cast<float>(0.1 * rng.Normal());
  const double s1 = std::sqrt(2.0 / fan_in), s2 = std::sqrt(1.0 / H);
  for (size_t i = p->off_w1_; i < p->off_b1_; ++i) p->params_[i] = static_cast<float>(s1 * rng.Normal());
  for (size_t i = p->off_w2_; i < p->off_b2_; ++i) p->params_[i] = static_cast<float>(0.5 * s2 * rng.Normal());
  for (size_t o = 0; o < p->popularity_.size(); ++o) {
    const double f = std::clamp(static_cast<double>(p->popularity_[o]), 1e-4, 1.0 - 1e-4);
    p->params_[p->off_b2_ + o] = static_cast<float>(std::log(f / (1.0 - f)));
  }

  // Examples.
  TraceInputs train_in(train), val_in(val);
  std::vector<Example> train_ex, val_ex;
  for (size_t i = 0; i < train.tokens.size(); ++i) {
    train_ex.push_back(p->MakeExample(train_in.inputs()[i]));
    train_ex.back().experts = train_ex.back().observed = train.tokens[i].experts.data();
    train_ex.back().observed_k = K;
  }
  for (size_t i = 0; i < val.tokens.size(); ++i) {
    val_ex.push_back(p->MakeExample(val_in.inputs()[i]));
    val_ex.back().experts = val_ex.back().observed = val.tokens[i].experts.data();
    val_ex.back().observed_k = K;
  }

  // Validation. The network's sigmoid outputs for every validation token in two modes (a priori:
  // d = 0; corrected: layer l at d = l) and two views (with the token ids; with them all
  // "unknown", as token dropout trains), so blends can be scored without re-running it.
  const size_t out = static_cast<size_t>(L) * E;
  const bool given = options.observe_path;
  const size_t nv = val_ex.size();
  std::vector<float> x(p->dense_dim()), h(H), z(out), prob(E);
  std::vector<int> active;
  std::vector<float> cache(2 * 2 * nv * out);  // [mode][view][token][layer][expert]
  auto cached = [&](int mode, int view, size_t t, int l) {
    return cache.data() + (((static_cast<size_t>(mode) * 2 + view) * nv + t) * L + l) * E;
  };
  auto fill_cache = [&]() {  // returns the a-priori BCE per output (with token ids)
    double loss = 0;
    for (size_t t = 0; t < nv; ++t) {
      for (int view = 0; view < 2; ++view) {
        Example ex = view == 0 ? val_ex[t] : p->WithoutTokens(val_ex[t]);
        for (int mode = 0; mode < (given ? 2 : 1); ++mode) {
          for (int d = 0; d < (mode == 0 ? 1 : L); ++d) {
            ex.depth = d;
            p->Forward(ex, p->params_.data(), x.data(), &active, h.data(), z.data());
            for (int l = d; l < (mode == 0 ? L : d + 1); ++l)
              for (int e = 0; e < E; ++e) cached(mode, view, t, l)[e] = Sigmoid(z[static_cast<size_t>(l) * E + e]);
            if (mode == 0 && view == 0) {
              std::vector<float> y(out, 0.f);
              for (int l = 0; l < L; ++l)
                for (int j = 0; j < K; ++j) y[static_cast<size_t>(l) * E + ex.experts[l * K + j]] = 1.f;
              for (size_t o = 0; o < out; ++o)
                loss += std::max(z[o], 0.f) - z[o] * y[o] + std::log1p(std::exp(-std::fabs(z[o])));
            }
          }
        }
      }
    }
    return loss / std::max(1.0, static_cast<double>(nv * out));
  };
  // Mean recall at layer l of a * (w * with_tokens + (1 - w) * without) + (1 - a) * popularity.
  auto blend_recall = [&](int mode, int l, float a, float w) {
    if (mode == 1 && !given) mode = 0;
    double r = 0;
    for (size_t t = 0; t < nv; ++t) {
      const float* full = cached(mode, 0, t, l);
      const float* bare = cached(mode, 1, t, l);
      for (int e = 0; e < E; ++e)
        prob[e] = a * (w * full[e] + (1.f - w) * bare[e]) + (1.f - a) * p->popularity_[static_cast<size_t>(l) * E + e];
      r += RecallAtK(prob.data(), E, val_ex[t].experts + l * K, K);
    }
    return r / static_cast<double>(std::max<size_t>(nv, 1));
  };

  Trainer trainer(p.get());
  // Each epoch shows every token a priori (depth 0) and, with path inputs, with path_samples
  // observed prefixes of distinct depths drawn from 1..L-1.
  const int samples = given && L > 1 ? std::min(options.path_samples, L - 1) : 0;
  std::vector<std::pair<size_t, int>> order;  // (example, depth)
  std::vector<int> depths(std::max(L - 1, 0));
  std::vector<float> best_params = p->params_;
  double best_recall = -1, best_loss = 1e300;
  int since_best = 0;
  for (int epoch = 1; epoch <= options.epochs; ++epoch) {
    order.clear();
    for (size_t i = 0; i < train_ex.size(); ++i) {
      order.emplace_back(i, 0);
      std::iota(depths.begin(), depths.end(), 1);
      for (int k = 0; k < samples; ++k) {  // partial Fisher-Yates: distinct depths
        std::swap(depths[k], depths[k + rng.Below(depths.size() - k)]);
        order.emplace_back(i, depths[k]);
      }
    }
    for (size_t i = order.size(); i > 1; --i) std::swap(order[i - 1], order[rng.Below(i)]);
    double loss = 0;
    std::vector<Example> batch;
    for (size_t b = 0; b < order.size(); b += options.batch_size) {
      batch.clear();
      for (size_t i = b; i < std::min(order.size(), b + options.batch_size); ++i) {
        Example ex = train_ex[order[i].first];
        ex.depth = order[i].second;
        // Token dropout, drawn here (one thread) so results do not depend on the thread count.
        if (rng.Uniform() < options.token_dropout) ex.tok = kUnknownRow;
        if (ex.prev != kNoneRow && rng.Uniform() < options.token_dropout) ex.prev = kUnknownRow;
        for (int& c : ex.ctx)
          if (rng.Uniform() < options.token_dropout) c = kUnknownRow;
        batch.push_back(std::move(ex));
      }
      loss += trainer.Step(batch);
    }
    PathEpochReport rep;
    rep.epoch = epoch;
    double scored = 0;  // outputs of the layers not observed
    for (const auto& [i, depth] : order) scored += static_cast<double>(L - depth) * E;
    rep.train_loss = loss / std::max(1.0, scored);
    if (!val_ex.empty()) {
      // Validation recall: each layer and mode with the better view, a priori and corrected.
      rep.val_loss = fill_cache();
      for (int mode = 0; mode < 2; ++mode)
        for (int l = 0; l < L; ++l)
          rep.val_recall += std::max(blend_recall(mode, l, 1.f, 1.f), blend_recall(mode, l, 1.f, 0.f)) / (2.0 * L);
      if (rep.val_recall > best_recall + 1e-9 || (rep.val_recall > best_recall - 1e-9 && rep.val_loss < best_loss)) {
        best_recall = rep.val_recall;
        best_loss = rep.val_loss;
        best_params = p->params_;
        since_best = 0;
        rep.best = true;
      } else {
        ++since_best;
      }
    } else {
      best_params = p->params_;
      rep.best = true;
    }
    EF_LOG(INFO, PLACE, "path predictor epoch %d: train loss %.5f val loss %.5f val recall %.4f", epoch, rep.train_loss,
           rep.val_loss, rep.val_recall);
    if (on_epoch) on_epoch(rep);
    if (!val_ex.empty() && since_best >= options.patience) break;
  }
  p->params_ = best_params;

  // Per layer, a priori and corrected: the trust a_l in the network (vs popularity) and the
  // weight w_l of its view with token ids (vs without) with the best validation recall; ties go
  // to the network and to the token ids.
  if (!val_ex.empty()) {
    fill_cache();
    for (int mode = 0; mode < 2; ++mode) {
      std::vector<float>& trust = mode == 0 ? p->trust_ : p->trust_given_;
      std::vector<float>& weight = mode == 0 ? p->token_weight_ : p->token_weight_given_;
      for (int l = 0; l < L; ++l) {
        double best = -1;
        for (int ws = 4; ws >= 0; --ws) {
          for (int as = 10; as >= 0; --as) {
            const float a = static_cast<float>(as) / 10.f, w = static_cast<float>(ws) / 4.f;
            const double r = blend_recall(mode, l, a, w);
            if (r > best + 1e-9) {
              best = r;
              trust[l] = a;
              weight[l] = w;
            }
          }
        }
      }
    }
  }
  return p;
}

void PathPredictor::ToFile(PredictorFile* file, const std::string& prefix) const {
  const int64_t V = vocab_rows_, d = options_.embed_dim, H = options_.hidden, D = input_dim();
  const int64_t out = static_cast<int64_t>(num_layers_) * num_experts_;
  auto slice = [&](size_t a, size_t b) { return std::vector<float>(params_.begin() + a, params_.begin() + b); };
  file->tensors[prefix + "tok_emb"] = PredictorTensor::F32({V, d}, slice(off_tok_, off_prev_));
  file->tensors[prefix + "prev_emb"] = PredictorTensor::F32({V, d}, slice(off_prev_, off_ctx_));
  file->tensors[prefix + "ctx_emb"] = PredictorTensor::F32({V, d}, slice(off_ctx_, off_w1_));
  // W1 and W2 are kept transposed in memory; files hold them as [out_features][in_features].
  file->tensors[prefix + "w1"] = PredictorTensor::F32({H, D}, Transpose(slice(off_w1_, off_b1_), D, H));
  file->tensors[prefix + "b1"] = PredictorTensor::F32({H}, slice(off_b1_, off_w2_));
  file->tensors[prefix + "w2"] = PredictorTensor::F32({out, H}, Transpose(slice(off_w2_, off_b2_), H, out));
  file->tensors[prefix + "b2"] = PredictorTensor::F32({out}, slice(off_b2_, off_skip_));
  if (options_.observe_path)
    file->tensors[prefix + "w_path"] = PredictorTensor::F32({sparse_dim(), out}, slice(off_skip_, size_));
  file->tensors[prefix + "vocab"] = PredictorTensor::I32({V - 2}, vocab_);
  file->tensors[prefix + "popularity"] = PredictorTensor::F32({num_layers_, num_experts_}, popularity_);
  file->tensors[prefix + "trust"] = PredictorTensor::F32({num_layers_}, trust_);
  file->tensors[prefix + "trust_given"] = PredictorTensor::F32({num_layers_}, trust_given_);
  file->tensors[prefix + "token_weight"] = PredictorTensor::F32({num_layers_}, token_weight_);
  file->tensors[prefix + "token_weight_given"] = PredictorTensor::F32({num_layers_}, token_weight_given_);
  auto& m = file->metadata;
  m[prefix + "embed_dim"] = std::to_string(options_.embed_dim);
  m[prefix + "hidden"] = std::to_string(options_.hidden);
  m[prefix + "context_window"] = std::to_string(options_.context_window);
  m[prefix + "pos_features"] = std::to_string(kPosFeatures);
  m[prefix + "observe_path"] = options_.observe_path ? "1" : "0";
  m[prefix + "epochs"] = std::to_string(options_.epochs);
  m[prefix + "batch_size"] = std::to_string(options_.batch_size);
  m[prefix + "learning_rate"] = std::to_string(options_.learning_rate);
  m[prefix + "weight_decay"] = std::to_string(options_.weight_decay);
  m[prefix + "token_dropout"] = std::to_string(options_.token_dropout);
  m[prefix + "patience"] = std::to_string(options_.patience);
  m[prefix + "seed"] = std::to_string(options_.seed);
  m[prefix + "num_threads"] = std::to_string(options_.num_threads);
  m[prefix + "path_samples"] = std::to_string(options_.path_samples);
  m[prefix + "path_window"] = std::to_string(options_.path_window);
}

StatusOr<std::unique_ptr<PathPredictor>> PathPredictor::FromFile(const PredictorFile& file, const std::string& prefix,
                                                                 int num_layers, int num_experts, int top_k,
                                                                 const std::string& path) {
  PathPredictorOptions o;
  EF_ASSIGN_OR_RETURN(int64_t d, file.MetaInt(prefix + "embed_dim", path));
  EF_ASSIGN_OR_RETURN(int64_t H, file.MetaInt(prefix + "hidden", path));
  EF_ASSIGN_OR_RETURN(int64_t C, file.MetaInt(prefix + "context_window", path));
  EF_ASSIGN_OR_RETURN(int64_t pf, file.MetaInt(prefix + "pos_features", path));
  if (d < 1 || d > 4096 || H < 1 || H > 65536 || C < 0 || C > 4096)
    return InvalidArgument("predictor file " + path + ": path predictor sizes out of range");
  if (pf != kPosFeatures)
    return InvalidArgument("predictor file " + path + ": " + std::to_string(pf) +
                           " position features, this build uses " + std::to_string(kPosFeatures));
  o.embed_dim = static_cast<int>(d);
  o.hidden = static_cast<int>(H);
  o.context_window = static_cast<int>(C);
  // Absent in files written before the path inputs existed: an a-priori model.
  const bool written_with_path_inputs = file.metadata.count(prefix + "observe_path") > 0;
  if (written_with_path_inputs) {
    EF_ASSIGN_OR_RETURN(int64_t op, file.MetaInt(prefix + "observe_path", path));
    if (op != 0 && op != 1)
      return InvalidArgument("predictor file " + path + ": observe_path must be 0 or 1, not " + std::to_string(op));
    o.observe_path = op == 1;
    o.path_window = 0;  // every observed layer, unless the file says otherwise
    if (file.metadata.count(prefix + "path_window")) {
      EF_ASSIGN_OR_RETURN(int64_t w, file.MetaInt(prefix + "path_window", path));
      if (w < 0 || w > 4096)
        return InvalidArgument("predictor file " + path + ": path_window " + std::to_string(w) + " out of range");
      o.path_window = static_cast<int>(w);
    }
  } else {
    o.observe_path = false;
  }
  // Training hyper-parameters are informational; absent or odd values keep the defaults.
  if (auto v = file.MetaInt(prefix + "epochs", path); v.ok()) o.epochs = static_cast<int>(*v);
  if (auto v = file.MetaInt(prefix + "seed", path); v.ok()) o.seed = static_cast<uint64_t>(*v);
  if (auto v = file.MetaDouble(prefix + "learning_rate", path); v.ok()) o.learning_rate = *v;
  auto vit = file.tensors.find(prefix + "vocab");
  if (vit == file.tensors.end() || vit->second.dtype != "I32" || vit->second.shape.size() != 1)
    return InvalidArgument("predictor file " + path + ": tensor \"" + prefix +
                           "vocab\" missing or not a 1-D I32 tensor");
  const int64_t V = vit->second.shape[0] + 2;
  std::unique_ptr<PathPredictor> p(new PathPredictor(num_layers, num_experts, top_k, o, static_cast<int>(V)));
  const int64_t D = p->input_dim(), out = static_cast<int64_t>(num_layers) * num_experts;
  struct Block {
    const char* name;
    std::vector<int64_t> shape;
    size_t offset;
  };
  for (const Block& b : {Block{"tok_emb", {V, d}, p->off_tok_}, Block{"prev_emb", {V, d}, p->off_prev_},
                         Block{"ctx_emb", {V, d}, p->off_ctx_}, Block{"w1", {H, D}, p->off_w1_},
                         Block{"b1", {H}, p->off_b1_}, Block{"w2", {out, H}, p->off_w2_},
                         Block{"b2", {out}, p->off_b2_}, Block{"w_path", {p->sparse_dim(), out}, p->off_skip_}}) {
    if (b.shape[0] == 0) continue;  // no path inputs
    EF_ASSIGN_OR_RETURN(const PredictorTensor* t, file.Tensor(prefix + b.name, "F32", b.shape, path));
    const bool transposed = b.offset == p->off_w1_ || b.offset == p->off_w2_;  // see ToFile
    const std::vector<float> v = transposed ? Transpose(t->f32, b.shape[0], b.shape[1]) : t->f32;
    std::copy(v.begin(), v.end(), p->params_.begin() + b.offset);
  }
  EF_ASSIGN_OR_RETURN(const PredictorTensor* pop,
                      file.Tensor(prefix + "popularity", "F32", {num_layers, num_experts}, path));
  EF_ASSIGN_OR_RETURN(const PredictorTensor* trust, file.Tensor(prefix + "trust", "F32", {num_layers}, path));
  p->popularity_ = pop->f32;
  p->trust_ = trust->f32;
  p->trust_given_ = trust->f32;
  if (written_with_path_inputs) {  // files of either kind since then carry every blend
    EF_ASSIGN_OR_RETURN(const PredictorTensor* tg, file.Tensor(prefix + "trust_given", "F32", {num_layers}, path));
    p->trust_given_ = tg->f32;
    EF_ASSIGN_OR_RETURN(const PredictorTensor* tw, file.Tensor(prefix + "token_weight", "F32", {num_layers}, path));
    EF_ASSIGN_OR_RETURN(const PredictorTensor* twg,
                        file.Tensor(prefix + "token_weight_given", "F32", {num_layers}, path));
    p->token_weight_ = tw->f32;
    p->token_weight_given_ = twg->f32;
  }
  p->vocab_ = vit->second.i32;
  for (size_t r = 0; r < p->vocab_.size(); ++r) {
    if (!p->token_index_.emplace(p->vocab_[r], static_cast<int>(r) + 2).second)
      return InvalidArgument("predictor file " + path + ": duplicate token id in the vocabulary");
  }
  for (float v : p->params_)
    if (!std::isfinite(v)) return InvalidArgument("predictor file " + path + ": non-finite parameter");
  return p;
}

}  // namespace ef::placement
