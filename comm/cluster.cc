#include "comm/cluster.h"

#include <algorithm>

#include "comm/mpi_exchange.h"
#include "comm/nccl_exchange.h"
#include "runtime/core/logging.h"

namespace ef::comm {

StatusOr<std::unique_ptr<Cluster>> Cluster::Create(MpiContext* ctx, runtime::Engine* engine, const ClusterOptions& o) {
  auto c = std::unique_ptr<Cluster>(new Cluster());
  c->ctx_ = ctx;
  c->engine_ = engine;
  ctx->set_timeout_s(o.timeout_s);
  EF_RETURN_IF_ERROR(ctx->SetRanksPerNode(o.ranks_per_node));
  const auto& mc = engine->config();
  EF_ASSIGN_OR_RETURN(c->placement_,
                      ExpertPlacement::Create(o.placement, ctx->size(), mc.num_layers, mc.num_experts, mc.MoeLayers()));
  const bool cuda = engine->backend().kind() == runtime::BackendKind::kCuda;
  std::string exchange = o.exchange;
  if (exchange == "auto") exchange = cuda && NcclExchange::Available() ? "nccl" : "mpi";
  if (exchange == "nccl") {
    if (!NcclExchange::Available()) return Unimplemented("cluster.exchange nccl: this build has no NCCL");
    if (!cuda) return InvalidArgument("cluster.exchange nccl needs the cuda backend");
    EF_ASSIGN_OR_RETURN(c->exchange_, NcclExchange::Create(ctx, engine->backend()));
  } else if (exchange == "mpi") {
    c->exchange_ = std::make_unique<MpiExchange>(ctx);
  } else {
    return InvalidArgument("unknown exchange '" + exchange + "' (auto|mpi|nccl)");
  }
  if (o.peer_fetch != "ucx" && o.peer_fetch != "none")
    return InvalidArgument("unknown peer_fetch '" + o.peer_fetch + "' (ucx|none)");
  // With an expert cache, the shard is its host tier, so it exists whatever the compute placement.
  const bool shard = o.expert_cache ? ctx->size() > 1 : c->placement_.NeedsPeerFetch();
  if (o.peer_fetch == "ucx" && shard) {
    UcxOptions u;
    u.force_tcp = o.ranks_per_node == 1 && ctx->size() > 1;
    EF_ASSIGN_OR_RETURN(
        c->peer_source_,
        PeerExpertSource::Create(ctx, &c->placement_, &engine->weights(), &engine->backend(),
                                 engine->local_moe().expert_source(), u, o.expert_cache ? o.host_budget_bytes : 0));
    if (!o.expert_cache) {
      engine->SetExpertSource(c->peer_source_.get());
      c->set_expert_source_ = true;
    }
  }
  if (o.combine != "pairs" && o.combine != "summed")
    return InvalidArgument("unknown cluster.combine '" + o.combine + "' (pairs|summed)");
  c->executor_ =
      std::make_unique<ExpertParallelExecutor>(ctx, c->exchange_.get(), &c->placement_, engine, o.combine == "summed");
  engine->SetMoeExecutor(c->executor_.get());
  if (ctx->rank() == 0)
    EF_LOG(INFO, COMM, "expert parallelism over %d ranks: exchange %s, peer fetch %s, %s", ctx->size(),
           c->exchange_->name(), c->peer_source_ ? "ucx" : "none", c->placement_.Describe().c_str());
  return c;
}

Cluster::~Cluster() {
  if (engine_) {
    engine_->SetMoeExecutor(nullptr);
    if (set_expert_source_) engine_->SetExpertSource(nullptr);
  }
}

nlohmann::json Cluster::Stats() const {
  nlohmann::json j = {
      {"rank", ctx_->rank()},
      {"exchange", exchange_->name()},
      {"a2a_bytes_sent", exchange_->bytes_sent()},
      {"a2a_bytes_received", exchange_->bytes_received()},
      {"a2a_seconds", static_cast<double>(exchange_->a2a_ns()) * 1e-9},
      {"rows_dispatched", executor_->rows_dispatched()},
      {"rows_computed", executor_->rows_computed()},
      {"forecasts_received", executor_->forecasts_received()},
      {"steps", executor_->steps()},
      {"planned_layers", executor_->planned_layers()},
      {"rows_moved", executor_->rows_moved()},
      {"ucx_get_bytes", 0},
      {"ucx_gets", 0},
      {"experts_fetched", 0},
      {"shard_bytes", 0},
  };
  if (peer_source_) {
    UcxRemoteMemory& r = peer_source_->remote();
    j["ucx_get_bytes"] = r.bytes_fetched();
    j["ucx_gets"] = r.num_gets();
    j["ucx_get_seconds"] = static_cast<double>(r.get_ns()) * 1e-9;
    j["ucx_get_gbps"] = r.get_ns() > 0 ? static_cast<double>(r.bytes_fetched()) / static_cast<double>(r.get_ns()) : 0.0;
    j["experts_fetched"] = peer_source_->experts_fetched();
    j["shard_bytes"] = peer_source_->shard_bytes();
    j["ucx_tls"] = r.tls();
    nlohmann::json t = nlohmann::json::object();
    for (int p = 0; p < ctx_->size(); ++p)
      if (!r.transport(p).empty()) t[std::to_string(p)] = r.transport(p);
    j["ucx_transports"] = t;
  }
  return j;
}

CommCounters Cluster::LiveCounters() const {
  CommCounters c;
  c.rank = ctx_->rank();
  c.world_size = ctx_->size();
  c.a2a_bytes_sent = exchange_->bytes_sent();
  c.a2a_bytes_received = exchange_->bytes_received();
  c.a2a_exchanges = exchange_->num_exchanges();
  for (int l = 0; l < executor_->num_layers(); ++l) {
    c.a2a_layer_bytes_sent.push_back(executor_->layer_bytes_sent(l));
    c.a2a_layer_bytes_received.push_back(executor_->layer_bytes_received(l));
  }
  if (peer_source_) {
    c.peer_fetch_bytes = peer_source_->remote().bytes_fetched();
    c.peer_fetches = peer_source_->remote().num_gets();
  }
  return c;
}

StatusOr<nlohmann::json> Cluster::GatherStats(const nlohmann::json& extra) {
  nlohmann::json me = Stats();
  if (extra.is_object())
    for (const auto& [k, v] : extra.items()) me[k] = v;
  const std::string mine = me.dump();
  EF_ASSIGN_OR_RETURN(auto all, ctx_->GatherBytesToRoot({mine.data(), mine.size()}, "the statistics gather"));
  if (ctx_->rank() != 0) return nlohmann::json();
  nlohmann::json ranks = nlohmann::json::array();
  int64_t a2a = 0, ucx = 0, rows = 0, max_rows = 0;
  for (const auto& b : all) {
    auto j = nlohmann::json::parse(std::string(b.begin(), b.end()));
    a2a += j["a2a_bytes_sent"].get<int64_t>();
    ucx += j["ucx_get_bytes"].get<int64_t>();
    rows += j["rows_computed"].get<int64_t>();
    max_rows = std::max(max_rows, j["rows_computed"].get<int64_t>());
    ranks.push_back(std::move(j));
  }
  const int n = ctx_->size();
  auto ratio = [n](int64_t max, int64_t total) {
    return total > 0 ? static_cast<double>(max) * n / static_cast<double>(total) : 0.0;
  };
  nlohmann::json out = {{"world_size", n},
                        {"placement", placement_.Describe()},
                        {"placement_mode", placement_.planned() ? "planned" : "static"},
                        {"a2a_bytes", a2a},
                        {"ucx_get_bytes", ucx},
                        // Over the whole run: the rank that computed most rows / the mean.
                        {"rows_computed_max_over_mean", ratio(max_rows, rows)},
                        {"ranks", ranks}};
  if (placement_.planned()) {
    // Per (step, MoE layer), known to every rank: the busiest rank's rows / the mean, summed over
    // layer-steps (weighted by rows), under the plan and under the static plan of the same rows.
    const ExpertParallelExecutor& x = *executor_;
    out["planned"] = {{"layer_steps", x.planned_layers()},
                      {"max_imbalance_bound", placement_.max_imbalance()},
                      {"rows_max_over_mean", ratio(x.planned_max_rows_sum(), x.total_rows_sum())},
                      {"static_rows_max_over_mean", ratio(x.static_max_rows_sum(), x.total_rows_sum())},
                      {"rows_moved_to_source", x.rows_moved()},
                      {"rows", x.total_rows_sum()}};
  }
  return out;
}

Status Cluster::Shutdown() {
  if (shut_down_) return Status::Ok();
  shut_down_ = true;
  if (peer_source_) return peer_source_->Shutdown();
  return ctx_->Barrier("the shutdown barrier");
}

}  // namespace ef::comm
