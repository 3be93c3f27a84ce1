#include "placement/routing_trace.h"

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>

#include "runtime/core/limits.h"

namespace ef::placement {
namespace {

using json = nlohmann::json;

Status LineError(const std::string& path, size_t line_no, const std::string& what) {
  return InvalidArgument("routing trace " + path + " line " + std::to_string(line_no) + ": " + what);
}

StatusOr<TraceHeader> ParseHeader(const json& j, const std::string& path) {
  if (!j.is_object()) return LineError(path, 1, "header is not a JSON object");
  // value() would throw on a non-string "format"; a bad header is an error, never an exception.
  if (!j.contains("format") || !j["format"].is_string() || j["format"].get<std::string>() != "moe-routing-trace")
    return LineError(path, 1, "header \"format\" must be \"moe-routing-trace\"");
  if (!j.contains("version") || !j["version"].is_number_integer() || j["version"].get<int>() != 1)
    return LineError(path, 1, "unsupported \"version\" (this reader knows version 1)");
  TraceHeader h;
  for (auto [key, field, max] : {std::tuple{"num_layers", &h.num_layers, limits::kMaxLayers},
                                 std::tuple{"num_experts", &h.num_experts, limits::kMaxExperts},
                                 std::tuple{"top_k", &h.top_k, limits::kMaxTopK}}) {
    if (!j.contains(key) || !j[key].is_number_integer())
      return LineError(path, 1, std::string("header field \"") + key + "\" missing or not an integer");
    int64_t v = j[key].get<int64_t>();
    if (v < 1 || v > max)
      return LineError(path, 1,
                       std::string("header field \"") + key + "\" = " + std::to_string(v) + " out of range [1, " +
                           std::to_string(max) + "]");
    *field = static_cast<int>(v);
  }
  if (h.top_k > h.num_experts) return LineError(path, 1, "header top_k exceeds num_experts");
  auto str = [&](const char* key) { return j.contains(key) && j[key].is_string() ? j[key].get<std::string>() : ""; };
  h.model = str("model");
  h.phase = str("phase");
  h.dataset = str("dataset");
  h.source = str("source");
  return h;
}

Status ParseToken(const json& j, const TraceHeader& h, const std::string& path, size_t line_no, TraceToken* out) {
  if (!j.is_object()) return LineError(path, line_no, "not a JSON object");
  for (const char* key : {"seq", "pos"}) {
    if (!j.contains(key) || !j[key].is_number_integer())
      return LineError(path, line_no, std::string("\"") + key + "\" missing or not an integer");
  }
  out->seq = j["seq"].get<int64_t>();
  out->pos = j["pos"].get<int64_t>();
  if (out->seq < 0 || out->pos < 0) return LineError(path, line_no, "negative seq or pos");
  out->token = -1;
  if (j.contains("token") && !j["token"].is_null()) {
    if (!j["token"].is_number_integer()) return LineError(path, line_no, "\"token\" is not an integer or null");
    out->token = j["token"].get<int64_t>();
  }
  if (!j.contains("experts") || !j["experts"].is_array())
    return LineError(path, line_no, "\"experts\" missing or not an array");
  const json& ex = j["experts"];
  if (ex.size() != static_cast<size_t>(h.num_layers))
    return LineError(
        path, line_no,
        "\"experts\" has " + std::to_string(ex.size()) + " layers, header says " + std::to_string(h.num_layers));
  out->experts.assign(static_cast<size_t>(h.num_layers) * h.top_k, 0);
  for (int l = 0; l < h.num_layers; ++l) {
    const json& row = ex[l];
    if (!row.is_array() || row.size() != static_cast<size_t>(h.top_k))
      return LineError(path, line_no,
                       "layer " + std::to_string(l) + " does not list top_k=" + std::to_string(h.top_k) + " experts");
    for (int k = 0; k < h.top_k; ++k) {
      if (!row[k].is_number_integer()) return LineError(path, line_no, "expert id is not an integer");
      int64_t e = row[k].get<int64_t>();
      if (e < 0 || e >= h.num_experts)
        return LineError(path, line_no,
                         "expert id " + std::to_string(e) + " at layer " + std::to_string(l) + " out of range [0, " +
                             std::to_string(h.num_experts) + ")");
      int16_t* chosen = &out->experts[static_cast<size_t>(l) * h.top_k];
      if (std::find(chosen, chosen + k, static_cast<int16_t>(e)) != chosen + k)
        return LineError(path, line_no,
                         "expert id " + std::to_string(e) + " listed twice at layer " + std::to_string(l) +
                             " (a router's top-k experts are distinct)");
      chosen[k] = static_cast<int16_t>(e);
    }
  }
  out->weights.clear();
  if (j.contains("weights") && !j["weights"].is_null()) {
    const json& w = j["weights"];
    if (!w.is_array() || w.size() != static_cast<size_t>(h.num_layers))
      return LineError(path, line_no, "\"weights\" must list num_layers rows");
    out->weights.assign(static_cast<size_t>(h.num_layers) * h.top_k, 0.f);
    for (int l = 0; l < h.num_layers; ++l) {
      if (!w[l].is_array() || w[l].size() != static_cast<size_t>(h.top_k))
        return LineError(path, line_no, "weights of layer " + std::to_string(l) + " do not list top_k values");
      for (int k = 0; k < h.top_k; ++k) {
        if (!w[l][k].is_number()) return LineError(path, line_no, "weight is not a number");
        out->weights[static_cast<size_t>(l) * h.top_k + k] = w[l][k].get<float>();
      }
    }
  }
  return Status::Ok();
}

}  // namespace

void RoutingTrace::SortBySeqPos() {
  std::stable_sort(tokens.begin(), tokens.end(), [](const TraceToken& a, const TraceToken& b) {
    return a.seq != b.seq ? a.seq < b.seq : a.pos < b.pos;
  });
}

std::vector<int64_t> RoutingTrace::SequenceIds() const {
  std::set<int64_t> ids;
  for (const auto& t : tokens) ids.insert(t.seq);
  return {ids.begin(), ids.end()};
}

namespace {

// Reads line by line, so that a trace of millions of tokens is never held as text.
StatusOr<RoutingTrace> ReadRoutingTraceFrom(std::istream& in, const std::string& path) {
  RoutingTrace trace;
  std::string line;
  size_t line_no = 0;
  bool have_header = false;
  while (std::getline(in, line)) {
    ++line_no;
    if (line.empty() || line.find_first_not_of(" \t\r") == std::string::npos) continue;
    json j = json::parse(line, nullptr, /*allow_exceptions=*/false);
    if (j.is_discarded()) return LineError(path, line_no, "not valid JSON");
    if (!have_header) {
      EF_ASSIGN_OR_RETURN(trace.header, ParseHeader(j, path));
      have_header = true;
      continue;
    }
    TraceToken t;
    EF_RETURN_IF_ERROR(ParseToken(j, trace.header, path, line_no, &t));
    trace.tokens.push_back(std::move(t));
  }
  if (!have_header) return InvalidArgument("routing trace " + path + " is empty (no header line)");
  if (trace.tokens.empty()) return InvalidArgument("routing trace " + path + " has a header but no tokens");
  return trace;
}

}  // namespace

StatusOr<RoutingTrace> ReadRoutingTrace(const std::string& path) {
  std::error_code ec;
  if (std::filesystem::is_directory(path, ec)) return InvalidArgument("routing trace " + path + " is a directory");
  std::ifstream in(path);
  if (!in) return NotFound("cannot open routing trace " + path);
  return ReadRoutingTraceFrom(in, path);
}

StatusOr<RoutingTrace> ParseRoutingTrace(const std::string& text, const std::string& origin) {
  std::istringstream in(text);
  return ReadRoutingTraceFrom(in, origin);
}

Status WriteRoutingTrace(const RoutingTrace& trace, const std::string& path) {
  std::ofstream out(path);
  if (!out) return InvalidArgument("cannot write routing trace " + path);
  const auto& h = trace.header;
  json header = {{"format", "moe-routing-trace"},
                 {"version", 1},
                 {"model", h.model},
                 {"num_layers", h.num_layers},
                 {"num_experts", h.num_experts},
                 {"top_k", h.top_k},
                 {"phase", h.phase},
                 {"dataset", h.dataset},
                 {"source", h.source}};
  out << header.dump() << "\n";
  for (const auto& t : trace.tokens) {
    json j;
    j["seq"] = t.seq;
    j["pos"] = t.pos;
    j["token"] = t.token >= 0 ? json(t.token) : json(nullptr);
    json ex = json::array(), w = json::array();
    for (int l = 0; l < h.num_layers; ++l) {
      json row = json::array(), wrow = json::array();
      for (int k = 0; k < h.top_k; ++k) {
        row.push_back(t.experts[static_cast<size_t>(l) * h.top_k + k]);
        if (!t.weights.empty()) wrow.push_back(t.weights[static_cast<size_t>(l) * h.top_k + k]);
      }
      ex.push_back(row);
      w.push_back(wrow);
    }
    j["experts"] = ex;
    if (!t.weights.empty()) j["weights"] = w;
    out << j.dump() << "\n";
  }
  if (!out) return DataLoss("error writing routing trace " + path);
  return Status::Ok();
}

Status CheckTraceShape(const RoutingTrace& trace, int num_layers, int num_experts, int top_k) {
  const auto& h = trace.header;
  if (h.num_layers != num_layers || h.num_experts != num_experts || h.top_k != top_k) {
    return InvalidArgument("routing trace shape (" + std::to_string(h.num_layers) + " layers x " +
                           std::to_string(h.num_experts) + " experts, top-" + std::to_string(h.top_k) +
                           ") does not match the model (" + std::to_string(num_layers) + " layers x " +
                           std::to_string(num_experts) + " experts, top-" + std::to_string(top_k) + ")");
  }
  return Status::Ok();
}

}  // namespace ef::placement
