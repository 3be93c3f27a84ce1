// `expertflow score`: a full-sequence forward over given token ids; writes fp32 logits and each
// MoE layer's router top-k as JSON. The output contract:
//   {"logits": [batch][tokens][vocab], "router_topk": [moe_layer][batch*tokens][k]}
#include <cstdio>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "launch/command.h"
#include "launch/engine_options.h"
#include "runtime/engine/engine.h"

namespace ef::launch {
namespace {

using json = nlohmann::json;

struct ScoreOptions {
  ModelFlags model;
  std::string ids_file;
  std::string out;
};

StatusOr<std::vector<std::vector<int32_t>>> ReadIds(const std::string& path) {
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

Status RunScore(const ScoreOptions& o) {
  EF_ASSIGN_OR_RETURN(auto ids, ReadIds(o.ids_file));
  EF_ASSIGN_OR_RETURN(auto engine, runtime::Engine::Create(o.model.dir, o.model.ToEngineOptions()));
  const auto& c = engine->config();
  // router_topk[moe_layer][batch*tokens][k], tokens flattened batch-major.
  std::vector<json> topk(c.num_moe_layers(), json::array());
  std::vector<std::vector<std::vector<int32_t>>> per_layer(c.num_moe_layers());
  engine->AddRoutingHook([&](runtime::LayerRouting& r) {
    for (int t = 0; t < r.num_tokens; ++t)
      per_layer[r.moe_layer].emplace_back(r.ids.begin() + t * r.top_k, r.ids.begin() + (t + 1) * r.top_k);
    return Status::Ok();
  });
  json logits = json::array();
  // Sequences run one at a time so router rows come out batch-major.
  for (size_t b = 0; b < ids.size(); ++b) {
    EF_RETURN_IF_ERROR(engine->AddSequence(static_cast<int64_t>(b)));
    runtime::SeqChunk chunk{static_cast<int64_t>(b), ids[b], /*all_logits=*/true};
    runtime::ForwardResult res;
    EF_RETURN_IF_ERROR(engine->Forward({&chunk, 1}, &res));
    engine->RemoveSequence(static_cast<int64_t>(b));
    json rows = json::array();
    for (size_t t = 0; t < ids[b].size(); ++t) {
      const float* p = res.logits.data() + t * c.vocab_size;
      rows.push_back(std::vector<float>(p, p + c.vocab_size));
    }
    logits.push_back(std::move(rows));
  }
  json out = {{"logits", std::move(logits)}, {"router_topk", per_layer}};
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
  c.app->add_option("--out", o->out, "output JSON file (default: stdout)");
  c.run = [o] {
    Status s = RunScore(*o);
    return s.ok() ? 0 : ReportError(s);
  };
  return c;
}

}  // namespace ef::launch
