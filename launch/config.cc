#include "launch/config.h"

#include <yaml-cpp/yaml.h>

#include <CLI/CLI.hpp>
#include <cmath>
#include <fstream>
#include <functional>
#include <map>
#include <sstream>
#include <vector>

#include "cache/low_precision_layers.h"
#include "comm/mpi_context.h"
#include "launch/cli_checks.h"
#include "launch/command.h"
#include "launch/engine_options.h"
#include "runtime/core/limits.h"
#include "runtime/core/logging.h"

namespace ef::launch {
namespace {

// Where a node sits in the file, as "file:line" (yaml-cpp marks are 0-based).
std::string Where(const std::string& name, const YAML::Node& node) {
  const YAML::Mark m = node.Mark();
  if (m.line < 0) return name;
  return name + ":" + std::to_string(m.line + 1);
}

std::string Scalar(const YAML::Node& n) {
  return n.IsScalar() ? n.Scalar() : std::string("<") + (n.IsMap() ? "map" : n.IsSequence() ? "list" : "null") + ">";
}

// Context passed to each key's parser.
struct Ctx {
  const std::string& name;
  const std::string key;  // dotted
  const YAML::Node& node;

  Status Error(const std::string& what) const {
    return InvalidArgument(Where(name, node) + ": " + key + ": " + what + ", got '" + Scalar(node) + "'");
  }
  // A key that is read and checked but that no command acts on yet: said once where it is set.
  void NoEffect(const char* why) const {
    EF_LOG(WARN, CONFIG, "%s: %s has no effect: %s", Where(name, node).c_str(), key.c_str(), why);
  }
};

Status GetString(const Ctx& c, std::string* out) {
  if (!c.node.IsScalar()) return c.Error("expected a string");
  *out = c.node.Scalar();
  return Status::Ok();
}

Status GetOneOf(const Ctx& c, std::initializer_list<const char*> allowed, std::string* out) {
  std::string v;
  EF_RETURN_IF_ERROR(GetString(c, &v));
  std::string list;
  for (const char* a : allowed) {
    if (v == a) {
      *out = v;
      return Status::Ok();
    }
    list += list.empty() ? a : std::string("|") + a;
  }
  return c.Error("expected one of " + list);
}

Status GetInt(const Ctx& c, int64_t lo, int64_t hi, int* out) {
  int64_t v = 0;
  if (!c.node.IsScalar()) return c.Error("expected an integer");
  try {
    v = c.node.as<int64_t>();
  } catch (const YAML::Exception&) {
    return c.Error("expected an integer");
  }
  if (v < lo || v > hi)
    return c.Error("expected an integer in [" + std::to_string(lo) + ", " + std::to_string(hi) + "]");
  *out = static_cast<int>(v);
  return Status::Ok();
}

Status GetU64(const Ctx& c, uint64_t* out) {
  if (!c.node.IsScalar()) return c.Error("expected a non-negative integer");
  try {
    *out = c.node.as<uint64_t>();
  } catch (const YAML::Exception&) {
    return c.Error("expected a non-negative integer");
  }
  return Status::Ok();
}

Status GetDouble(const Ctx& c, double lo, double hi, bool lo_open, double* out) {
  if (!c.node.IsScalar()) return c.Error("expected a number");
  double v = 0;
  try {
    v = c.node.as<double>();
  } catch (const YAML::Exception&) {
    return c.Error("expected a number");
  }
  if (!std::isfinite(v) || v < lo || v > hi || (lo_open && v == lo)) {
    std::ostringstream r;
    r << "expected a number in " << (lo_open ? "(" : "[") << lo << ", " << hi << "]";
    return c.Error(r.str());
  }
  *out = v;
  return Status::Ok();
}

Status GetFloat(const Ctx& c, double lo, double hi, bool lo_open, float* out) {
  double v = 0;
  EF_RETURN_IF_ERROR(GetDouble(c, lo, hi, lo_open, &v));
  *out = static_cast<float>(v);
  return Status::Ok();
}

Status GetBytes(const Ctx& c, uint64_t* out) {
  if (!c.node.IsScalar()) return c.Error("expected a size (bytes, e.g. 2GiB, or auto)");
  auto v = ParseByteSize(c.node.Scalar());
  if (!v.ok()) return c.Error("expected a size (bytes, e.g. 2GiB, or auto)");
  *out = *v;
  return Status::Ok();
}

using Setter = std::function<Status(const Ctx&, Config*)>;
using Section = std::map<std::string, Setter>;

const std::map<std::string, Section>& Schema() {
  static const auto* schema = new std::map<std::string, Section>{
      {"model",
       {
           {"path", [](const Ctx& c, Config* o) { return GetString(c, &o->model.path); }},
           {"dtype",
            [](const Ctx& c, Config* o) {
              return GetOneOf(c, {"auto", "bf16", "f16", "f32"}, &o->model.dtype);
            }},
       }},
      {"runtime",
       {
           {"backend",
            [](const Ctx& c, Config* o) {
              return GetOneOf(c, {"auto", "cuda", "cpu"}, &o->runtime.backend);
            }},
           {"device",
            [](const Ctx& c, Config* o) {
              if (c.node.IsScalar() && c.node.Scalar() == "auto") {
                o->runtime.device = -1;
                return Status::Ok();
              }
              return GetInt(c, 0, 1023, &o->runtime.device);
            }},
           {"max_seq_len", [](const Ctx& c, Config* o) { return GetInt(c, 0, 1 << 24, &o->runtime.max_seq_len); }},
           {"attention_precision",
            [](const Ctx& c, Config* o) {
              return GetOneOf(c, {"auto", "bf16", "fp32"}, &o->runtime.attention_precision);
            }},
           {"kv_cache_dtype",
            [](const Ctx& c, Config* o) {
              return GetOneOf(c, {"auto", "fp32", "bf16"}, &o->runtime.kv_cache_dtype);
            }},
           {"kv_block_size",
            [](const Ctx& c, Config* o) {
              EF_RETURN_IF_ERROR(GetInt(c, 0, 1024, &o->runtime.kv_block_size));
              const int b = o->runtime.kv_block_size;
              if ((b & (b - 1)) != 0)
                return c.Error("expected a power of two (a paged block's size in tokens) or 0 (contiguous)");
              return Status::Ok();
            }},
           {"kv_cache_tokens",
            [](const Ctx& c, Config* o) {
              int tokens = 0;
              EF_RETURN_IF_ERROR(GetInt(c, 0, (1LL << 31) - 1, &tokens));
              o->runtime.kv_cache_tokens = tokens;
              return Status::Ok();
            }},
           {"cuda_graphs",
            [](const Ctx& c, Config* o) { return GetOneOf(c, {"on", "off"}, &o->runtime.cuda_graphs); }},
       }},
      {"cluster",
       {
           {"exchange",
            [](const Ctx& c, Config* o) {
              return GetOneOf(c, {"auto", "mpi", "nccl"}, &o->cluster.exchange);
            }},
           {"ranks_per_node",
            [](const Ctx& c, Config* o) {
              if (c.node.IsScalar() && c.node.Scalar() == "auto") {
                o->cluster.ranks_per_node = 0;
                return Status::Ok();
              }
              return GetInt(c, 1, 1 << 16, &o->cluster.ranks_per_node);
            }},
           {"peer_fetch",
            [](const Ctx& c, Config* o) {
              return GetOneOf(c, {"ucx", "none"}, &o->cluster.peer_fetch);
            }},
           {"placement",
            [](const Ctx& c, Config* o) {
              EF_RETURN_IF_ERROR(GetString(c, &o->cluster.placement));
              if (o->cluster.placement.empty()) return c.Error("expected contiguous|round_robin|a placement file");
              return Status::Ok();
            }},
           {"compute_placement",
            [](const Ctx& c, Config* o) {
              return GetOneOf(c, {"home", "contiguous", "round_robin"}, &o->cluster.compute_placement);
            }},
           {"replication", [](const Ctx& c, Config* o) { return GetInt(c, 1, 1 << 16, &o->cluster.replication); }},
           {"placement_mode",
            [](const Ctx& c, Config* o) {
              return GetOneOf(c, {"static", "planned"}, &o->cluster.placement_mode);
            }},
           {"combine",
            [](const Ctx& c, Config* o) {
              return GetOneOf(c, {"pairs", "summed"}, &o->cluster.combine);
            }},
           {"planned_max_imbalance",
            [](const Ctx& c, Config* o) { return GetDouble(c, 1, 1e6, false, &o->cluster.planned_max_imbalance); }},
           {"timeout_s", [](const Ctx& c, Config* o) { return GetDouble(c, 0, 86400, true, &o->cluster.timeout_s); }},
       }},
      {"cache",
       {
           {"device_budget",
            [](const Ctx& c, Config* o) {
              if (c.node.IsScalar() && ParseDeviceBudget(c.node.Scalar(), &o->cache).ok()) return Status::Ok();
              // A value in one of the forms gets that form's rule; anything else the list of forms.
              const std::string t = c.node.IsScalar() ? c.node.Scalar() : "";
              if (!t.empty() && t.back() == '%') return c.Error("expected a percentage of the experts in (0, 100]");
              if (t.find("slot") != std::string::npos)
                return c.Error("expected 'N slots' or 'N slots per layer' with N from 1 to 16777216");
              return c.Error("expected a size (bytes, e.g. 24GiB), 'N slots', 'N slots per layer', 'P%' or auto");
            }},
           {"host_budget", [](const Ctx& c, Config* o) { return GetBytes(c, &o->cache.host_budget); }},
           {"policy",
            [](const Ctx& c, Config* o) {
              return GetOneOf(c, {"lru", "lfu", "expertflow", "static", "belady"}, &o->cache.policy);
            }},
           {"prefetch_layers", [](const Ctx& c, Config* o) { return GetInt(c, 0, 1024, &o->cache.prefetch_layers); }},
           {"prefetch_min_prob",
            [](const Ctx& c, Config* o) { return GetDouble(c, 0, 1, false, &o->cache.prefetch_min_prob); }},
           {"miss_precision",
            [](const Ctx& c, Config* o) {
              return GetOneOf(c, {"native", "bf16", "lossless", "int8", "int4", "auto"}, &o->cache.miss_precision);
            }},
           {"low_precision",
            [](const Ctx& c, Config* o) {
              return GetOneOf(c, {"int8", "int4"}, &o->cache.low_precision);
            }},
           {"low_precision_gate",
            [](const Ctx& c, Config* o) { return GetDouble(c, 0, 1, false, &o->cache.low_precision_gate); }},
           {"upgrade_uses", [](const Ctx& c, Config* o) { return GetInt(c, 0, 1 << 20, &o->cache.upgrade_uses); }},
           {"low_precision_layers",
            [](const Ctx& c, Config* o) {
              std::string v;
              EF_RETURN_IF_ERROR(GetString(c, &v));
              auto parsed = cache::ParseLowPrecisionLayers(v);
              if (!parsed.ok()) return c.Error(parsed.status().message());
              o->cache.low_precision_layers = v;
              return Status::Ok();
            }},
           {"high_precision",
            [](const Ctx& c, Config* o) {
              return GetOneOf(c, {"native", "bf16", "lossless"}, &o->cache.high_precision);
            }},
           {"quantized_experts", [](const Ctx& c, Config* o) { return GetString(c, &o->cache.quantized_experts); }},
           {"cpu_compute",
            [](const Ctx& c, Config* o) {
              return GetOneOf(c, {"default", "off", "auto", "whole", "on", "split"}, &o->cache.cpu_compute);
            }},
           {"cpu_compute_max_rows",
            [](const Ctx& c, Config* o) { return GetInt(c, 1, 64, &o->cache.cpu_compute_max_rows); }},
           {"cpu_compute_admit",
            [](const Ctx& c, Config* o) { return GetInt(c, 0, 1 << 20, &o->cache.cpu_compute_admit); }},
       }},
      {"predictor",
       {
           {"kind",
            [](const Ctx& c, Config* o) {
              return GetOneOf(c, {"none", "frequency", "affinity", "path", "lookahead", "hybrid"}, &o->predictor.kind);
            }},
           {"path", [](const Ctx& c, Config* o) { return GetString(c, &o->predictor.path); }},
       }},
      {"scheduler",
       {
           {"max_batch_tokens",
            [](const Ctx& c, Config* o) {
              EF_RETURN_IF_ERROR(GetInt(c, 1, 1 << 24, &o->scheduler.max_batch_tokens));
              c.NoEffect("the running batch is bounded by scheduler.max_batch_requests, a prefill step by "
                         "scheduler.max_prefill_tokens");
              return Status::Ok();
            }},
           {"max_batch_requests",
            [](const Ctx& c, Config* o) { return GetInt(c, 1, 1 << 20, &o->scheduler.max_batch_requests); }},
           {"regroup_window", [](const Ctx& c, Config* o) { return GetInt(c, 0, 1024, &o->scheduler.regroup_window); }},
           {"max_prefill_tokens",
            [](const Ctx& c, Config* o) { return GetInt(c, 0, 1 << 24, &o->scheduler.max_prefill_tokens); }},
           {"rank_assignment",
            [](const Ctx& c, Config* o) {
              EF_RETURN_IF_ERROR(
                  GetOneOf(c, {"locality", "round_robin", "least_loaded"}, &o->scheduler.rank_assignment));
              c.NoEffect("rank 0 admits every request; the assignment policies are compared offline by "
                         "`expertflow schedule-eval`");
              return Status::Ok();
            }},
       }},
      {"routing",
       {
           {"replay", [](const Ctx& c, Config* o) { return GetString(c, &o->routing.replay); }},
           {"key",
            [](const Ctx& c, Config* o) {
              return GetOneOf(c, {"auto", "stream", "sequence"}, &o->routing.key);
            }},
       }},
      {"server",
       {
           {"host",
            [](const Ctx& c, Config* o) {
              EF_RETURN_IF_ERROR(GetString(c, &o->server.host));
              if (o->server.host.empty()) return c.Error("expected a host name or address");
              return Status::Ok();
            }},
           {"port", [](const Ctx& c, Config* o) { return GetInt(c, 1, 65535, &o->server.port); }},
           {"api_key", [](const Ctx& c, Config* o) { return GetString(c, &o->server.api_key); }},
           {"max_body_bytes",
            [](const Ctx& c, Config* o) {
              EF_RETURN_IF_ERROR(GetBytes(c, &o->server.max_body_bytes));
              if (o->server.max_body_bytes < (1u << 10) || o->server.max_body_bytes > (1u << 30))
                return c.Error("expected a size in [1KiB, 1GiB]");
              return Status::Ok();
            }},
           {"max_tokens_limit",
            [](const Ctx& c, Config* o) { return GetInt(c, 0, 1 << 24, &o->server.max_tokens_limit); }},
       }},
      {"generate",
       {
           {"prompt", [](const Ctx& c, Config* o) { return GetString(c, &o->generate.prompt); }},
           {"max_new_tokens",
            [](const Ctx& c, Config* o) { return GetInt(c, 0, 1 << 24, &o->generate.max_new_tokens); }},
           {"temperature",
            [](const Ctx& c, Config* o) { return GetFloat(c, 0, limits::kMaxTemperature, false, &o->generate.temperature); }},
           {"top_p", [](const Ctx& c, Config* o) { return GetFloat(c, 0, 1, true, &o->generate.top_p); }},
           {"top_k", [](const Ctx& c, Config* o) { return GetInt(c, 0, 1 << 24, &o->generate.top_k); }},
           {"seed", [](const Ctx& c, Config* o) { return GetU64(c, &o->generate.seed); }},
       }},
  };
  return *schema;
}

std::string Known(const std::map<std::string, Section>& m) {
  std::string s;
  for (const auto& [k, v] : m) s += (s.empty() ? "" : ", ") + k;
  return s;
}
std::string Known(const Section& m) {
  std::string s;
  for (const auto& [k, v] : m) s += (s.empty() ? "" : ", ") + k;
  return s;
}

}  // namespace

Status ParseDeviceBudget(const std::string& text, CacheSection* cache) {
  // "P%": a share of each MoE layer's experts.
  if (!text.empty() && text.back() == '%') {
    double p = 0;
    size_t used = 0;
    try {
      p = std::stod(text.substr(0, text.size() - 1), &used);
    } catch (...) {
      used = 0;
    }
    if (used != text.size() - 1 || !(p > 0 && p <= 100))
      return InvalidArgument("bad device budget '" + text + "' (a percentage of the experts in (0, 100])");
    cache->device_budget = 0;
    cache->device_slots = 0;
    cache->device_slots_per_layer = 0;
    cache->device_experts_percent = p;
    return Status::Ok();
  }
  // "N slots" / "N slots per layer" (also "1 slot", "N slots/layer").
  size_t i = 0;
  while (i < text.size() && std::isdigit(static_cast<unsigned char>(text[i]))) ++i;
  std::string rest = text.substr(i);
  while (!rest.empty() && rest.front() == ' ') rest.erase(rest.begin());
  if (i > 0 && (rest.rfind("slot", 0) == 0)) {
    std::string unit = rest;
    while (!unit.empty() && unit.back() == ' ') unit.pop_back();
    const bool per_layer = unit == "slots per layer" || unit == "slot per layer" || unit == "slots/layer";
    if (!per_layer && unit != "slots" && unit != "slot")
      return InvalidArgument("bad device budget '" + text + "' (N slots, N slots per layer, a size or auto)");
    long long n = 0;
    try {
      n = std::stoll(text.substr(0, i));
    } catch (...) {
      return InvalidArgument("bad device budget '" + text + "'");
    }
    if (n < 1 || n > (1 << 24)) return InvalidArgument("device budget '" + text + "' out of range");
    cache->device_budget = 0;
    cache->device_slots = per_layer ? 0 : static_cast<int>(n);
    cache->device_slots_per_layer = per_layer ? static_cast<int>(n) : 0;
    cache->device_experts_percent = 0;
    return Status::Ok();
  }
  EF_ASSIGN_OR_RETURN(uint64_t bytes, ParseByteSize(text));
  cache->device_budget = bytes;
  cache->device_slots = 0;
  cache->device_slots_per_layer = 0;
  cache->device_experts_percent = 0;
  return Status::Ok();
}

std::string CacheSection::DeviceBudgetText() const {
  if (device_slots > 0) return std::to_string(device_slots) + " slots";
  if (device_slots_per_layer > 0) return std::to_string(device_slots_per_layer) + " slots per layer";
  if (device_experts_percent > 0) {
    char pct[32];
    std::snprintf(pct, sizeof pct, "%g%%", device_experts_percent);
    return pct;
  }
  return device_budget == 0 ? "auto" : std::to_string(device_budget);
}

StatusOr<uint64_t> ParseByteSize(const std::string& text) {
  if (text == "auto" || text == "0") return uint64_t{0};
  size_t i = 0;
  while (i < text.size() && (std::isdigit(static_cast<unsigned char>(text[i])) || text[i] == '.')) ++i;
  if (i == 0) return InvalidArgument("bad size '" + text + "'");
  double v = 0;
  try {
    v = std::stod(text.substr(0, i));
  } catch (...) {
    return InvalidArgument("bad size '" + text + "'");
  }
  std::string unit = text.substr(i);
  while (!unit.empty() && unit.front() == ' ') unit.erase(unit.begin());
  static const std::map<std::string, double> kUnits = {
      {"", 1},        {"B", 1},         {"KB", 1e3},       {"MB", 1e6},         {"GB", 1e9},
      {"TB", 1e12},   {"KiB", 1 << 10}, {"MiB", 1 << 20},  {"GiB", 1ull << 30}, {"TiB", 1ull << 40},
      {"K", 1 << 10}, {"M", 1 << 20},   {"G", 1ull << 30}, {"T", 1ull << 40}};
  auto it = kUnits.find(unit);
  if (it == kUnits.end()) return InvalidArgument("bad size unit '" + unit + "'");
  // Converting a double at or past 2^64 to uint64_t is undefined: reject such sizes first.
  const double bytes = v * it->second + 0.5;
  if (!(bytes < 18446744073709551616.0)) return InvalidArgument("size '" + text + "' is too large");
  return static_cast<uint64_t>(bytes);
}

StatusOr<Config> ParseConfig(const std::string& text, const std::string& name) {
  YAML::Node root;
  try {
    root = YAML::Load(text);
  } catch (const YAML::ParserException& e) {
    return InvalidArgument(name + ":" + std::to_string(e.mark.line + 1) + ": malformed YAML: " + e.msg);
  } catch (const YAML::Exception& e) {
    return InvalidArgument(name + ": malformed YAML: " + e.msg);
  }
  Config cfg;
  cfg.source = name;
  if (root.IsNull()) return cfg;  // an empty file: all defaults
  if (!root.IsMap()) return InvalidArgument(Where(name, root) + ": the top level must be a map of sections");
  const auto& schema = Schema();
  for (const auto& top : root) {
    const YAML::Node& knode = top.first;
    const std::string section = knode.Scalar();
    auto sit = schema.find(section);
    if (sit == schema.end())
      return InvalidArgument(Where(name, knode) + ": unknown key '" + section + "' (known: " + Known(schema) + ")");
    const YAML::Node& body = top.second;
    if (body.IsNull()) continue;
    if (!body.IsMap()) return InvalidArgument(Where(name, body) + ": " + section + ": expected a map of keys");
    for (const auto& kv : body) {
      const std::string key = kv.first.Scalar();
      auto kit = sit->second.find(key);
      if (kit == sit->second.end())
        return InvalidArgument(Where(name, kv.first) + ": unknown key '" + section + "." + key + "' (known in " +
                               section + ": " + Known(sit->second) + ")");
      const std::string dotted = section + "." + key;
      if (cfg.present.count(dotted))
        return InvalidArgument(Where(name, kv.first) + ": " + dotted + ": key given twice");
      Ctx c{name, dotted, kv.second};
      EF_RETURN_IF_ERROR(kit->second(c, &cfg));
      cfg.present.insert(dotted);
    }
  }
  // Cross-key checks.
  if (cfg.cluster.exchange == "nccl" && cfg.runtime.backend == "cpu")
    return InvalidArgument(name + ": cluster.exchange: nccl needs runtime.backend cuda (or auto), not cpu");
  if (cfg.predictor.kind == "path" && cfg.predictor.path.empty() && cfg.has("predictor.kind"))
    return InvalidArgument(name + ": predictor.path: kind 'path' needs a trained predictor file");
  return cfg;
}

Status SetConfigKey(const std::string& dotted_key, const std::string& value, const std::string& origin,
                    Config* config) {
  const size_t dot = dotted_key.find('.');
  const auto& schema = Schema();
  auto sit = dot == std::string::npos ? schema.end() : schema.find(dotted_key.substr(0, dot));
  if (sit == schema.end()) return InvalidArgument(origin + ": unknown config key '" + dotted_key + "'");
  auto kit = sit->second.find(dotted_key.substr(dot + 1));
  if (kit == sit->second.end()) return InvalidArgument(origin + ": unknown config key '" + dotted_key + "'");
  const YAML::Node node(value);
  Ctx c{origin, dotted_key, node};
  EF_RETURN_IF_ERROR(kit->second(c, config));
  config->present.insert(dotted_key);
  return Status::Ok();
}

StatusOr<Config> LoadConfig(const std::string& path) {
  std::ifstream in(path);
  if (!in) return NotFound("cannot open config file " + path);
  std::stringstream ss;
  ss << in.rdbuf();
  return ParseConfig(ss.str(), path);
}

std::string ConfigToYaml(const Config& c, bool command_sections) {
  YAML::Emitter e;
  auto size = [](uint64_t b) { return b == 0 ? std::string("auto") : std::to_string(b); };
  e << YAML::BeginMap;
  e << YAML::Key << "model" << YAML::Value << YAML::Flow << YAML::BeginMap;
  e << YAML::Key << "path" << YAML::Value << c.model.path << YAML::Key << "dtype" << YAML::Value << c.model.dtype;
  e << YAML::EndMap;
  e << YAML::Key << "runtime" << YAML::Value << YAML::Flow << YAML::BeginMap;
  e << YAML::Key << "backend" << YAML::Value << c.runtime.backend;
  e << YAML::Key << "device" << YAML::Value
    << (c.runtime.device < 0 ? std::string("auto") : std::to_string(c.runtime.device));
  e << YAML::Key << "max_seq_len" << YAML::Value << c.runtime.max_seq_len;
  e << YAML::Key << "attention_precision" << YAML::Value << c.runtime.attention_precision;
  e << YAML::Key << "kv_cache_dtype" << YAML::Value << c.runtime.kv_cache_dtype;
  e << YAML::Key << "kv_block_size" << YAML::Value << c.runtime.kv_block_size;
  e << YAML::Key << "kv_cache_tokens" << YAML::Value << c.runtime.kv_cache_tokens;
  e << YAML::Key << "cuda_graphs" << YAML::Value << c.runtime.cuda_graphs << YAML::EndMap;
  e << YAML::Key << "cluster" << YAML::Value << YAML::Flow << YAML::BeginMap;
  e << YAML::Key << "exchange" << YAML::Value << c.cluster.exchange;
  e << YAML::Key << "ranks_per_node" << YAML::Value
    << (c.cluster.ranks_per_node == 0 ? std::string("auto") : std::to_string(c.cluster.ranks_per_node));
  e << YAML::Key << "peer_fetch" << YAML::Value << c.cluster.peer_fetch;
  e << YAML::Key << "placement" << YAML::Value << c.cluster.placement;
  e << YAML::Key << "compute_placement" << YAML::Value << c.cluster.compute_placement;
  e << YAML::Key << "replication" << YAML::Value << c.cluster.replication;
  e << YAML::Key << "placement_mode" << YAML::Value << c.cluster.placement_mode;
  e << YAML::Key << "combine" << YAML::Value << c.cluster.combine;
  e << YAML::Key << "planned_max_imbalance" << YAML::Value << c.cluster.planned_max_imbalance;
  e << YAML::Key << "timeout_s" << YAML::Value << c.cluster.timeout_s << YAML::EndMap;
  e << YAML::Key << "cache" << YAML::Value << YAML::Flow << YAML::BeginMap;
  e << YAML::Key << "device_budget" << YAML::Value << c.cache.DeviceBudgetText();
  e << YAML::Key << "host_budget" << YAML::Value << size(c.cache.host_budget);
  e << YAML::Key << "policy" << YAML::Value << c.cache.policy;
  e << YAML::Key << "prefetch_layers" << YAML::Value << c.cache.prefetch_layers;
  e << YAML::Key << "prefetch_min_prob" << YAML::Value << c.cache.prefetch_min_prob;
  e << YAML::Key << "miss_precision" << YAML::Value << c.cache.miss_precision;
  e << YAML::Key << "low_precision" << YAML::Value << c.cache.low_precision;
  e << YAML::Key << "low_precision_gate" << YAML::Value << c.cache.low_precision_gate;
  e << YAML::Key << "upgrade_uses" << YAML::Value << c.cache.upgrade_uses;
  e << YAML::Key << "low_precision_layers" << YAML::Value << c.cache.low_precision_layers;
  e << YAML::Key << "high_precision" << YAML::Value << c.cache.high_precision;
  e << YAML::Key << "quantized_experts" << YAML::Value << c.cache.quantized_experts;
  e << YAML::Key << "cpu_compute" << YAML::Value << c.cache.cpu_compute;
  e << YAML::Key << "cpu_compute_max_rows" << YAML::Value << c.cache.cpu_compute_max_rows;
  e << YAML::Key << "cpu_compute_admit" << YAML::Value << c.cache.cpu_compute_admit << YAML::EndMap;
  e << YAML::Key << "predictor" << YAML::Value << YAML::Flow << YAML::BeginMap;
  e << YAML::Key << "kind" << YAML::Value << c.predictor.kind << YAML::Key << "path" << YAML::Value << c.predictor.path
    << YAML::EndMap;
  e << YAML::Key << "routing" << YAML::Value << YAML::Flow << YAML::BeginMap;
  e << YAML::Key << "replay" << YAML::Value << YAML::DoubleQuoted << c.routing.replay;
  e << YAML::Key << "key" << YAML::Value << c.routing.key << YAML::EndMap;
  if (!command_sections) {
    e << YAML::EndMap;
    return e.c_str();
  }
  e << YAML::Key << "scheduler" << YAML::Value << YAML::Flow << YAML::BeginMap;
  e << YAML::Key << "max_batch_tokens" << YAML::Value << c.scheduler.max_batch_tokens;
  e << YAML::Key << "max_batch_requests" << YAML::Value << c.scheduler.max_batch_requests;
  e << YAML::Key << "regroup_window" << YAML::Value << c.scheduler.regroup_window;
  e << YAML::Key << "max_prefill_tokens" << YAML::Value << c.scheduler.max_prefill_tokens;
  e << YAML::Key << "rank_assignment" << YAML::Value << c.scheduler.rank_assignment << YAML::EndMap;
  e << YAML::Key << "server" << YAML::Value << YAML::Flow << YAML::BeginMap;
  e << YAML::Key << "host" << YAML::Value << c.server.host << YAML::Key << "port" << YAML::Value << c.server.port;
  e << YAML::Key << "api_key" << YAML::Value << (c.server.api_key.empty() ? "" : "<set>");
  e << YAML::Key << "max_body_bytes" << YAML::Value << size(c.server.max_body_bytes);
  e << YAML::Key << "max_tokens_limit" << YAML::Value << c.server.max_tokens_limit << YAML::EndMap;
  e << YAML::Key << "generate" << YAML::Value << YAML::Flow << YAML::BeginMap;
  e << YAML::Key << "prompt" << YAML::Value << YAML::DoubleQuoted << c.generate.prompt;
  e << YAML::Key << "max_new_tokens" << YAML::Value << c.generate.max_new_tokens;
  e << YAML::Key << "temperature" << YAML::Value << c.generate.temperature;
  e << YAML::Key << "top_p" << YAML::Value << c.generate.top_p;
  e << YAML::Key << "top_k" << YAML::Value << c.generate.top_k;
  e << YAML::Key << "seed" << YAML::Value << c.generate.seed << YAML::EndMap;
  e << YAML::EndMap;
  return e.c_str();
}

bool FlagGiven(const CLI::App& app, const std::string& name) {
  try {
    return app.get_option(name)->count() > 0;
  } catch (const CLI::Error&) {
    return false;
  }
}

void ApplyConfig(const Config& c, const CLI::App& app, ModelFlags* f) {
  if (c.has("model.path") && !FlagGiven(app, "--model")) f->dir = c.model.path;
  if (c.has("runtime.backend") && !FlagGiven(app, "--backend")) f->backend = c.runtime.backend;
  if (c.has("runtime.device") && c.runtime.device >= 0 && !FlagGiven(app, "--device")) f->device = c.runtime.device;
  if (c.has("runtime.max_seq_len") && !FlagGiven(app, "--max-seq-len")) f->max_seq_len = c.runtime.max_seq_len;
  if (c.has("runtime.attention_precision") && !FlagGiven(app, "--attention-precision"))
    f->attention_precision = c.runtime.attention_precision;
  if (c.has("runtime.kv_cache_dtype") && !FlagGiven(app, "--kv-cache-dtype"))
    f->kv_cache_dtype = c.runtime.kv_cache_dtype;
  if (c.has("runtime.kv_block_size") && !FlagGiven(app, "--kv-block-size")) f->kv_block_size = c.runtime.kv_block_size;
  if (c.has("runtime.kv_cache_tokens") && !FlagGiven(app, "--kv-cache-tokens"))
    f->kv_cache_tokens = c.runtime.kv_cache_tokens;
  if (c.has("runtime.cuda_graphs") && !FlagGiven(app, "--cuda-graphs")) f->cuda_graphs = c.runtime.cuda_graphs;
}

void CacheFlags::Register(CLI::App* app) {
  app->add_option("--cache-device-budget", device_budget,
                  "backend memory for expert slots: a size (24GiB), 'N slots', 'N slots per layer', a share of each "
                  "layer's experts (25%), or auto or 0 (no cache: every expert resident) (cache.device_budget)");
  app->add_option("--cache-host-budget", host_budget,
                  "host memory for experts per rank, a size or auto (all): pinned on cuda, the rank's home shard "
                  "under mpirun (cache.host_budget)");
  app->add_option("--cache-policy", policy, "expert cache eviction: lru, lfu, expertflow or static (cache.policy)");
  app->add_option("--prefetch-layers", prefetch_layers,
                  "MoE layers ahead the expert cache prefetches, 0: on demand (cache.prefetch_layers)");
  app->add_option("--prefetch-min-prob", prefetch_min_prob,
                  "prefetch only experts forecast at least this probable, 0..1; 0: every forecast top-k expert "
                  "(cache.prefetch_min_prob)");
  app->add_option("--miss-precision", miss_precision,
                  "precision of expert copies loaded into slots: native (bf16); lossless: bf16 packed into 12 bits a "
                  "value without losing a bit (0.76x the bytes per miss, 1.3x the experts per budget); int8; int4; "
                  "or auto: low precision for misses of small gate weight, upgraded when hot (cpu) "
                  "(cache.miss_precision)");
  app->add_option("--low-precision", low_precision, "auto's low precision: int8 or int4 (cache.low_precision)");
  app->add_option("--low-precision-gate", low_precision_gate,
                  "auto: gate weight below which a miss loads in low precision, 0..1 (cache.low_precision_gate)");
  app->add_option("--upgrade-uses", upgrade_uses,
                  "auto: uses of a low-precision copy before it is reloaded in full precision; 0: never "
                  "(cache.upgrade_uses)");
  app->add_option("--low-precision-layers", low_precision_layers,
                  "MoE layers whose expert loads may be low precision (int8, int4, auto): all, 'last P%' (e.g. "
                  "'last 50%') or decoder layer ranges ('16-31'); the others load in the checkpoint's dtype. Early "
                  "layers are the sensitive ones (cache.low_precision_layers, default all)");
  app->add_option("--high-precision", high_precision,
                  "how loads in the checkpoint's precision move: native (its bytes) or lossless (bf16 packed "
                  "bit-exactly, 0.76x the bytes): with --low-precision-layers the other layers' loads, and with "
                  "--miss-precision native every load (cache.high_precision, default native)");
  app->add_option("--quantized-experts", quantized_experts,
                  "low-precision expert copies quantized ahead of time by `expertflow quantize` (GPTQ), used instead "
                  "of rounding the checkpoint at load (cache.quantized_experts)");
  app->add_option("--cpu-experts", cpu_compute,
                  "cuda: compute missed experts of few rows on the host CPU instead of copying them: off, auto "
                  "(each miss to whichever of copy and host finishes first, and one split between them so both end "
                  "together), whole (no split), on (every one on the host) or default: auto on one process on the "
                  "cuda backend where the model allows it (whole where the split's staging area does not fit), off "
                  "elsewhere and when the budget holds every expert (cache.cpu_compute)");
  app->add_option("--cpu-experts-max-rows", cpu_compute_max_rows,
                  "cuda: misses of at most this many rows (tokens) may be computed on the host, 1..64; the host's "
                  "cost per row count is measured at start (cache.cpu_compute_max_rows)");
  app->add_option("--cpu-experts-admit", cpu_compute_admit,
                  "cuda, --cpu-experts auto/whole: load a miss into the slots, in place of the least used resident "
                  "expert of its layer, once the layer used it in at least this many more decode steps; 0: misses "
                  "the host takes never enter the slots (cache.cpu_compute_admit, default 3)");
  app->add_option("--predictor", predictor,
                  "prefetch forecast: none, lookahead, frequency, path, affinity or hybrid (predictor.kind)");
  app->add_option("--predictor-path", predictor_path, "trained predictor file (predictor.path)");
}

Status CacheFlags::Apply(const CLI::App& app, Config* config) const {
  const std::pair<const char*, std::pair<const char*, const std::string*>> flags[] = {
      {"--cache-device-budget", {"cache.device_budget", &device_budget}},
      {"--cache-host-budget", {"cache.host_budget", &host_budget}},
      {"--cache-policy", {"cache.policy", &policy}},
      {"--prefetch-layers", {"cache.prefetch_layers", &prefetch_layers}},
      {"--prefetch-min-prob", {"cache.prefetch_min_prob", &prefetch_min_prob}},
      {"--miss-precision", {"cache.miss_precision", &miss_precision}},
      {"--low-precision", {"cache.low_precision", &low_precision}},
      {"--low-precision-gate", {"cache.low_precision_gate", &low_precision_gate}},
      {"--upgrade-uses", {"cache.upgrade_uses", &upgrade_uses}},
      {"--low-precision-layers", {"cache.low_precision_layers", &low_precision_layers}},
      {"--high-precision", {"cache.high_precision", &high_precision}},
      {"--quantized-experts", {"cache.quantized_experts", &quantized_experts}},
      {"--cpu-experts", {"cache.cpu_compute", &cpu_compute}},
      {"--cpu-experts-max-rows", {"cache.cpu_compute_max_rows", &cpu_compute_max_rows}},
      {"--cpu-experts-admit", {"cache.cpu_compute_admit", &cpu_compute_admit}},
      {"--predictor", {"predictor.kind", &predictor}},
      {"--predictor-path", {"predictor.path", &predictor_path}},
  };
  for (const auto& [flag, key] : flags)
    if (FlagGiven(app, flag)) EF_RETURN_IF_ERROR(SetConfigKey(key.first, *key.second, flag, config));
  if (config->predictor.kind == "path" && config->predictor.path.empty() &&
      (FlagGiven(app, "--predictor") || FlagGiven(app, "--predictor-path")))
    return InvalidArgument("--predictor path needs a trained predictor file (--predictor-path)");
  return Status::Ok();
}

void ClusterFlags::Register(CLI::App* app, bool short_config) {
  app->add_option(short_config ? "--config,-c" : "--config", config_path,
                  "YAML config file; flags given on the command line win over its keys")
      ->check(CLI::ExistingFile);
  app->add_option("--placement", cluster.placement.placement,
                  "home ranks of experts: contiguous, round_robin or a JSON file (cluster.placement)");
  app->add_option("--compute-placement", cluster.placement.compute_placement,
                  "ranks that compute experts: home, contiguous or round_robin (cluster.compute_placement)")
      ->check(CLI::IsMember({"home", "contiguous", "round_robin"}));
  app->add_option("--replication", cluster.placement.replication, "home ranks per expert (cluster.replication)")
      ->check(kPositive);
  app->add_option("--placement-mode", cluster.placement.mode,
                  "static, or planned: per MoE layer, rows of overloaded ranks are computed on their tokens' ranks "
                  "(cluster.placement_mode)")
      ->check(CLI::IsMember({"static", "planned"}));
  app->add_option("--planned-max-imbalance", cluster.placement.max_imbalance,
                  "planned: busiest rank's rows / mean to aim for, >= 1 (cluster.planned_max_imbalance)")
      ->check(CLI::Range(1.0, 1e6));
  app->add_option("--combine", cluster.combine,
                  "pairs (results per token and expert, bitwise one process) or summed (added per rank where "
                  "computed: fewer all-to-all bytes, within float rounding) (cluster.combine)")
      ->check(CLI::IsMember({"pairs", "summed"}));
  app->add_option("--exchange", cluster.exchange, "token exchange: auto, mpi or nccl (cluster.exchange)")
      ->check(CLI::IsMember({"auto", "mpi", "nccl"}));
  app->add_option("--peer-fetch", cluster.peer_fetch, "peer expert tier: ucx or none (cluster.peer_fetch)")
      ->check(CLI::IsMember({"ucx", "none"}));
  app->add_option("--ranks-per-node", cluster.ranks_per_node,
                  "ranks per node, 0: from the launcher; 1 forces UCX over TCP (cluster.ranks_per_node)")
      ->check(kNonNegative);
  app->add_option("--timeout", cluster.timeout_s, "seconds any wait on a peer may take (cluster.timeout_s)")
      ->check(kPositive);
  app->add_option("--comm-stats", stats_out, "write communication counters of every rank as JSON (rank 0)")
      ->check(kOutputFile);
  cache.Register(app);
}

Status ClusterFlags::Load(const CLI::App& app, ModelFlags* model) {
  if (!config_path.empty()) {
    EF_ASSIGN_OR_RETURN(config, LoadConfig(config_path));
    ApplyConfig(config, app, model);
  }
  const comm::ClusterOptions file = ToClusterOptions(config);
  auto take = [&](const char* key, const char* flag, auto* dst, const auto& v) {
    if (config.has(key) && !FlagGiven(app, flag)) *dst = v;
  };
  take("cluster.exchange", "--exchange", &cluster.exchange, file.exchange);
  take("cluster.ranks_per_node", "--ranks-per-node", &cluster.ranks_per_node, file.ranks_per_node);
  take("cluster.peer_fetch", "--peer-fetch", &cluster.peer_fetch, file.peer_fetch);
  take("cluster.placement", "--placement", &cluster.placement.placement, file.placement.placement);
  take("cluster.compute_placement", "--compute-placement", &cluster.placement.compute_placement,
       file.placement.compute_placement);
  take("cluster.replication", "--replication", &cluster.placement.replication, file.placement.replication);
  take("cluster.placement_mode", "--placement-mode", &cluster.placement.mode, file.placement.mode);
  take("cluster.planned_max_imbalance", "--planned-max-imbalance", &cluster.placement.max_imbalance,
       file.placement.max_imbalance);
  take("cluster.timeout_s", "--timeout", &cluster.timeout_s, file.timeout_s);
  take("cluster.combine", "--combine", &cluster.combine, file.combine);
  EF_RETURN_IF_ERROR(cache.Apply(app, &config));
  // The effective values back into the config, for the log.
  config.model.path = model->dir;
  config.runtime.backend = model->backend;
  config.runtime.max_seq_len = model->max_seq_len;
  config.runtime.attention_precision = model->attention_precision;
  config.runtime.kv_cache_dtype = model->kv_cache_dtype;
  config.runtime.kv_block_size = model->kv_block_size;
  config.runtime.kv_cache_tokens = model->kv_cache_tokens;
  config.runtime.cuda_graphs = model->cuda_graphs;
  config.cluster.exchange = cluster.exchange;
  config.cluster.ranks_per_node = cluster.ranks_per_node;
  config.cluster.peer_fetch = cluster.peer_fetch;
  config.cluster.placement = cluster.placement.placement;
  config.cluster.compute_placement = cluster.placement.compute_placement;
  config.cluster.replication = cluster.placement.replication;
  config.cluster.placement_mode = cluster.placement.mode;
  config.cluster.planned_max_imbalance = cluster.placement.max_imbalance;
  config.cluster.timeout_s = cluster.timeout_s;
  config.cluster.combine = cluster.combine;
  return Status::Ok();
}

namespace {
// Ranks started with different settings (flags or config files that drifted apart) would compute
// different things, or wait on each other for good: every rank compares the sections that shape the
// deployment with every other rank's, and all refuse to start on a difference, naming the first
// key that differs. Left out: paths (the same file may sit at another path on each node: the
// model, predictor, trace, quantized experts and a placement file) and what a rank may size to its
// own node (its device, device budget, KV capacity and host compute).
Status CheckSameConfigOnEveryRank(comm::MpiContext* ctx, const Config& config) {
  if (!ctx->mpi() || ctx->size() < 2) return Status::Ok();
  Config c = config;
  const CacheSection defaults;
  c.model.path.clear();
  c.predictor.path.clear();
  c.routing.replay.clear();
  c.cache.quantized_experts.clear();
  if (c.cluster.placement != "contiguous" && c.cluster.placement != "round_robin") c.cluster.placement = "(a file)";
  c.runtime.device = -1;
  c.runtime.kv_cache_tokens = 0;
  c.cache.device_budget = defaults.device_budget;
  c.cache.device_slots = defaults.device_slots;
  c.cache.device_slots_per_layer = defaults.device_slots_per_layer;
  c.cache.device_experts_percent = defaults.device_experts_percent;
  c.cache.cpu_compute = defaults.cpu_compute;
  c.cache.cpu_compute_max_rows = defaults.cpu_compute_max_rows;
  c.cache.cpu_compute_admit = defaults.cpu_compute_admit;
  const std::string mine = ConfigToYaml(c, /*command_sections=*/false);
  EF_ASSIGN_OR_RETURN(
      auto all, ctx->AllGatherBytes(std::span<const char>(mine.data(), mine.size()), "comparing the ranks' configs"));
  const std::string first(all[0].begin(), all[0].end());
  for (size_t r = 1; r < all.size(); ++r) {
    const std::string other(all[r].begin(), all[r].end());
    if (other == first) continue;
    std::string where = "a setting", a, b;
    try {
      const YAML::Node y0 = YAML::Load(first), yr = YAML::Load(other);
      for (auto sec = y0.begin(); sec != y0.end() && a == b; ++sec) {
        const std::string name = sec->first.as<std::string>();
        for (auto kv = sec->second.begin(); kv != sec->second.end(); ++kv) {
          const std::string key = kv->first.as<std::string>();
          const YAML::Node there = yr[name][key];
          a = YAML::Dump(kv->second);
          b = there ? YAML::Dump(there) : std::string("(none)");
          if (a != b) {
            where = name + "." + key;
            break;
          }
        }
      }
    } catch (const YAML::Exception&) {
    }
    return InvalidArgument("rank " + std::to_string(r) + " was started with other settings than rank 0: " + where +
                           (a != b ? " is " + b + " there and " + a + " on rank 0" : std::string()) +
                           " (start every rank with the same flags and config file)");
  }
  return Status::Ok();
}
}  // namespace

int RunDistributed(const CLI::App& app, ModelFlags* model, ClusterFlags* cluster,
                   const std::function<Status(comm::MpiContext*)>& body) {
  // Config errors come first and identically on every rank: each reports, each exits 1.
  if (Status s = cluster->Load(app, model); !s.ok()) return ReportError(s);
  auto ctx_or = comm::MpiContext::Init();
  if (!ctx_or.ok()) return ReportError(ctx_or.status());
  comm::MpiContext* ctx = *ctx_or;
  ctx->set_timeout_s(cluster->cluster.timeout_s);
  // Every rank reaches the same verdict on a placement mismatch: each reports it and exits 1.
  if (Status s = ctx->SetRanksPerNode(cluster->cluster.ranks_per_node); !s.ok()) {
    const int code = ReportError(s.Prepend("cluster.ranks_per_node (--ranks-per-node)"));
    ctx->Finalize();
    return code;
  }
  if (Status s = CheckSameConfigOnEveryRank(ctx, cluster->config); !s.ok()) {
    const int code = ReportError(s);
    ctx->Finalize();
    return code;
  }
  if (ctx->mpi() && !FlagGiven(app, "--device") &&
      !(cluster->config.has("runtime.device") && cluster->config.runtime.device >= 0)) {
    model->device = ctx->local_rank();  // one rank per GPU
    log::SetDevice(model->device);
  }
  cluster->config.runtime.device = model->device;
  if (ctx->rank() == 0)
    EF_LOG(INFO, CONFIG,
           "effective config (%s; the scheduler, server and generate sections as the command applies them):\n%s",
           cluster->config_path.empty() ? "defaults" : cluster->config_path.c_str(),
           ConfigToYaml(cluster->config, /*command_sections=*/false).c_str());
  Status s = body(ctx);
  if (!s.ok()) {
    const int code = ReportError(s);
    if (ctx->mpi() && ctx->size() > 1) ctx->Abort(code);
    ctx->Finalize();
    return code;
  }
  ctx->Finalize();
  return 0;
}

comm::ClusterOptions ToClusterOptions(const Config& c) {
  comm::ClusterOptions o;
  o.exchange = c.cluster.exchange;
  o.ranks_per_node = c.cluster.ranks_per_node;
  o.peer_fetch = c.cluster.peer_fetch;
  o.placement.placement = c.cluster.placement;
  o.placement.compute_placement = c.cluster.compute_placement;
  o.placement.replication = c.cluster.replication;
  o.placement.mode = c.cluster.placement_mode;
  o.placement.max_imbalance = c.cluster.planned_max_imbalance;
  o.timeout_s = c.cluster.timeout_s;
  o.combine = c.cluster.combine;
  return o;
}

}  // namespace ef::launch
