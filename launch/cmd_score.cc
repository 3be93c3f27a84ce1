// `expertflow score`: a full-sequence forward over given token ids; writes fp32 logits and each
// MoE layer's router top-k as JSON. The output contract:
//   {"logits": [batch][tokens][vocab], "router_topk": [moe_layer][batch*tokens][k]}
#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <span>
#include <sstream>

#include "comm/cluster.h"
#include "comm/mpi_context.h"
#include "launch/cli_checks.h"
#include "launch/command.h"
#include "launch/config.h"
#include "launch/deployment.h"
#include "launch/engine_options.h"
#include "runtime/core/logging.h"
#include "runtime/engine/engine.h"

namespace ef::launch {
namespace {

using json = nlohmann::json;

struct ScoreOptions {
  ModelFlags model;
  ClusterFlags cluster;
  std::string ids_file;
  std::string out;
  int chunk = 0;  // tokens per forward pass; 0: each sequence in one pass
};

StatusOr<std::vector<std::vector<int32_t>>> ReadIds(const std::string& path) {
  std::error_code ec;
  if (std::filesystem::is_directory(path, ec)) return InvalidArgument("ids file " + path + " is a directory");
  std::ifstream in(path);
  if (!in) return NotFound("cannot open ids file " + path);
  std::stringstream ss;
  ss << in.rdbuf();
  json j = json::parse(ss.str(), nullptr, false);
  if (j.is_discarded()) return InvalidArgument(path + " is not valid JSON");
  if (!j.is_object() || !j.contains("input_ids") || !j["input_ids"].is_array())
    return InvalidArgument(path + ": expected an object {\"input_ids\": [[...], ...]}");
  std::vector<std::vector<int32_t>> ids;
  for (const json& row : j["input_ids"]) {
    if (!row.is_array() || row.empty()) return InvalidArgument(path + ": each input_ids row must be a non-empty list");
    std::vector<int32_t> r;
    for (const json& v : row) {
      if (!v.is_number_integer()) return InvalidArgument(path + ": token ids must be integers, got " + v.dump());
      r.push_back(v.get<int32_t>());
    }
    ids.push_back(std::move(r));
  }
  if (ids.empty()) return InvalidArgument(path + ": input_ids is empty");
  return ids;
}

// Under mpirun, sequence b runs on rank b % N (data-parallel attention) while every MoE layer is
// expert-parallel across all ranks; rank 0 gathers the logits and router rows and writes the same
// JSON as one process. With cache.device_budget every rank's experts come from an expert cache of
// that size (per rank); the output does not change.
Status RunScore(const ScoreOptions& o, comm::MpiContext* ctx) {
  EF_ASSIGN_OR_RETURN(auto ids, ReadIds(o.ids_file));
  EF_ASSIGN_OR_RETURN(auto deployment, Deployment::Create(ctx, MakeDeploymentOptions(o.model, o.cluster)));
  runtime::Engine* engine = &deployment->engine();
  const auto& c = engine->config();
  comm::Cluster* cluster = deployment->cluster();
  const int rank = ctx->rank(), world = ctx->size();
  // Per sequence: router rows [moe_layer][tokens][k].
  std::map<int64_t, std::vector<std::vector<std::vector<int32_t>>>> topk;
  engine->AddRoutingObserver([&](runtime::LayerRouting& r) {
    for (int t = 0; t < r.num_tokens; ++t) {
      auto& per_layer = topk[r.seq[t]];
      per_layer.resize(c.num_moe_layers());
      per_layer[r.moe_layer.index].emplace_back(r.ids.begin() + t * r.top_k, r.ids.begin() + (t + 1) * r.top_k);
    }
    return Status::Ok();
  });
  // This rank's sequences, one forward each.
  json mine = json::object();
  for (size_t b = static_cast<size_t>(rank); b < ids.size(); b += static_cast<size_t>(world)) {
    EF_RETURN_IF_ERROR(engine->AddSequence(static_cast<int64_t>(b)));
    // Pieces of o.chunk tokens through the KV cache (--chunk 1: teacher-forced decode, one token a
    // step, as generation meets the expert cache), or the whole sequence at once.
    const size_t step = o.chunk > 0 ? static_cast<size_t>(o.chunk) : ids[b].size();
    json rows = json::array();
    for (size_t first = 0; first < ids[b].size(); first += step) {
      const size_t n = std::min(step, ids[b].size() - first);
      runtime::SeqChunk chunk{static_cast<int64_t>(b), std::span<const int32_t>(ids[b]).subspan(first, n),
                              /*all_logits=*/true};
      runtime::ForwardResult res;
      EF_RETURN_IF_ERROR(engine->Forward({&chunk, 1}, &res));
      for (size_t t = 0; t < n; ++t) {
        const float* p = res.logits.data() + t * c.vocab_size;
        rows.push_back(std::vector<float>(p, p + c.vocab_size));
      }
    }
    engine->RemoveSequence(static_cast<int64_t>(b));
    mine[std::to_string(b)] = {{"logits", std::move(rows)}, {"topk", topk[static_cast<int64_t>(b)]}};
  }
  json stats;
  if (cluster) {
    EF_RETURN_IF_ERROR(cluster->Drain());  // other ranks' rows are computed here too: counters final after
    EF_ASSIGN_OR_RETURN(stats, cluster->GatherStats({{"expert_cache", deployment->CacheStats()}}));
  }
  deployment->PrintCacheSummary();
  // Rank 0 assembles batch order: logits[b], router_topk[moe_layer] = rows of b = 0, 1, ...
  std::vector<std::vector<char>> parts;
  if (world > 1) {
    const std::vector<std::uint8_t> packed = json::to_msgpack(mine);
    EF_ASSIGN_OR_RETURN(parts, ctx->GatherBytesToRoot({reinterpret_cast<const char*>(packed.data()), packed.size()},
                                                      "the score results gather"));
  }
  if (cluster) EF_RETURN_IF_ERROR(cluster->Shutdown());
  if (rank != 0) return Status::Ok();
  json all = world > 1 ? json::object() : std::move(mine);
  for (const auto& p : parts) {
    json j = json::from_msgpack(p.begin(), p.end(), true, false);
    if (j.is_discarded()) return Internal("corrupt score results from a rank");
    for (auto& [k, v] : j.items()) all[k] = std::move(v);
  }
  json logits = json::array();
  std::vector<json> router(c.num_moe_layers(), json::array());
  for (size_t b = 0; b < ids.size(); ++b) {
    auto it = all.find(std::to_string(b));
    if (it == all.end()) return Internal("no results for sequence " + std::to_string(b));
    logits.push_back(std::move((*it)["logits"]));
    json& tk = (*it)["topk"];
    for (int l = 0; l < c.num_moe_layers(); ++l)
      for (auto& row : tk[l]) router[l].push_back(std::move(row));
  }
  json out = {{"logits", std::move(logits)}, {"router_topk", router}};
  if (!o.cluster.stats_out.empty() && cluster) {
    std::ofstream f(o.cluster.stats_out);
    if (!f) return InvalidArgument("cannot write " + o.cluster.stats_out);
    f << stats.dump(2) << "\n";
  }
  if (cluster && world > 1)
    std::fprintf(stderr, "comm: %d ranks, all-to-all %lld bytes, ucx gets %lld bytes\n", world,
                 static_cast<long long>(stats["a2a_bytes"].get<int64_t>()),
                 static_cast<long long>(stats["ucx_get_bytes"].get<int64_t>()));
  if (o.out.empty() || o.out == "-") {
    std::printf("%s\n", out.dump().c_str());
    return Status::Ok();
  }
  std::ofstream f(o.out);
  if (!f) return InvalidArgument("cannot write " + o.out);
  f << out.dump() << "\n";
  if (!f) return DataLoss("error writing " + o.out);
  return Status::Ok();
}

}  // namespace

Command AddScoreCommand(CLI::App& root) {
  auto o = std::make_shared<ScoreOptions>();
  Command c;
  c.app = root.add_subcommand("score", "Full-sequence forward: fp32 logits and each MoE layer's router top-k as JSON");
  o->model.Register(c.app);
  c.app->add_option("--ids-file", o->ids_file, "JSON file {\"input_ids\": [[...], ...]}")->required();
  c.app->add_option("--out", o->out, "output JSON file (default: stdout)")->check(kOutputFile);
  c.app
      ->add_option("--chunk", o->chunk,
                   "tokens per forward pass through the KV cache (1: teacher-forced decode); 0: whole sequences")
      ->check(kNonNegative);
  o->cluster.Register(c.app);
  CLI::App* app = c.app;
  c.run = [o, app] {
    return RunDistributed(*app, &o->model, &o->cluster, [o](comm::MpiContext* ctx) { return RunScore(*o, ctx); });
  };
  return c;
}

}  // namespace ef::launch
