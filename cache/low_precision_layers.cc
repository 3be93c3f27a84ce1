#include "cache/low_precision_layers.h"

#include <algorithm>
#include <charconv>
#include <cmath>
#include <cstdlib>

namespace ef::cache {

namespace {

std::string Trimmed(const std::string& t) {
  const size_t a = t.find_first_not_of(' ');
  return a == std::string::npos ? std::string() : t.substr(a, t.find_last_not_of(' ') - a + 1);
}

// A layer index: decimal digits only, at most 2^20.
bool LayerIndex(const std::string& t, int* v) {
  if (t.empty() || t.size() > 7 || t.find_first_not_of("0123456789") != std::string::npos) return false;
  long n = 0;
  const auto [end, ec] = std::from_chars(t.data(), t.data() + t.size(), n);
  if (ec != std::errc() || end != t.data() + t.size() || n > (1 << 20)) return false;
  *v = static_cast<int>(n);
  return true;
}

}  // namespace

StatusOr<LowPrecisionLayers> ParseLowPrecisionLayers(const std::string& text) {
  auto bad = [](const std::string& why) {
    return InvalidArgument(why +
                           " (all, last P% such as 'last 50%', or decoder layer indices and ranges such as "
                           "'16-31')");
  };
  const std::string spec = Trimmed(text);
  LowPrecisionLayers out;
  if (spec == "all") return out;
  out.all = false;
  if (spec.rfind("last", 0) == 0) {
    const std::string t = Trimmed(spec.substr(4));
    double p = 0;
    char* end = nullptr;
    const std::string digits = t.empty() ? t : t.substr(0, t.size() - 1);
    if (t.size() < 2 || t.back() != '%' || digits.find_first_not_of("0123456789.") != std::string::npos ||
        (p = std::strtod(digits.c_str(), &end), !end || *end != '\0'))
      return bad("'last' takes a percentage");
    if (!(p > 0 && p <= 100)) return bad("the percentage must be in (0, 100]");
    out.last_percent = p;
    return out;
  }
  if (spec.empty()) return bad("empty");
  size_t at = 0;
  while (at <= spec.size()) {
    const size_t comma = std::min(spec.find(',', at), spec.size());
    const std::string item = Trimmed(spec.substr(at, comma - at));
    const size_t dash = item.find('-');
    int a = 0, b = 0;
    if (!LayerIndex(Trimmed(item.substr(0, dash)), &a) ||
        !LayerIndex(dash == std::string::npos ? Trimmed(item) : Trimmed(item.substr(dash + 1)), &b))
      return bad(item.empty() ? std::string("an empty item") : "'" + item + "' is not a layer index or a range A-B");
    if (b < a) return bad("the range '" + item + "' runs backwards");
    out.ranges.push_back({a, b});
    at = comma + 1;
  }
  return out;
}

StatusOr<std::vector<uint8_t>> ResolveLowPrecisionLayers(const std::string& spec, const runtime::ModelConfig& config) {
  StatusOr<LowPrecisionLayers> parsed = ParseLowPrecisionLayers(spec);
  if (!parsed.ok()) return InvalidArgument("cache.low_precision_layers '" + spec + "': " + parsed.status().message());
  const LowPrecisionLayers& sel = *parsed;
  if (sel.all) return std::vector<uint8_t>{};
  const std::vector<int> moe = config.MoeLayers();
  std::vector<uint8_t> low(static_cast<size_t>(config.num_layers), 0);
  auto none = [&] {
    return InvalidArgument("cache.low_precision_layers '" + spec + "' selects none of the model's " +
                           std::to_string(moe.size()) + " MoE layers; use cache.miss_precision native");
  };
  if (sel.last_percent > 0) {
    // Rounded down: an odd count keeps the middle layer (the more sensitive side) in full precision.
    const int n = static_cast<int>(std::floor(sel.last_percent * static_cast<double>(moe.size()) / 100.0 + 1e-9));
    if (n == 0) return none();
    for (size_t i = moe.size() - static_cast<size_t>(n); i < moe.size(); ++i) low[moe[i]] = 1;
    return low;
  }
  bool any = false;
  for (const auto& [a, b] : sel.ranges)
    for (int l = a; l <= b; ++l) {
      if (l >= config.num_layers)
        return InvalidArgument("cache.low_precision_layers '" + spec + "': layer " + std::to_string(l) +
                               " past the model's " + std::to_string(config.num_layers) + " layers");
      // A range may span dense layers (first_k_dense models); a single index must be an MoE layer.
      if (!config.IsMoeLayer(l)) {
        if (a == b)
          return InvalidArgument("cache.low_precision_layers '" + spec + "': layer " + std::to_string(l) +
                                 " is a dense layer (no experts)");
        continue;
      }
      low[l] = 1;
      any = true;
    }
  if (!any) return none();
  return low;
}

std::string DescribeLayers(const std::vector<uint8_t>& layers) {
  if (layers.empty()) return "every MoE layer";
  std::string s;
  for (size_t l = 0; l < layers.size();) {
    if (!layers[l]) {
      ++l;
      continue;
    }
    size_t end = l;
    while (end + 1 < layers.size() && layers[end + 1]) ++end;
    if (!s.empty()) s += ",";
    s += std::to_string(l);
    if (end > l) s.append(1, '-').append(std::to_string(end));
    l = end + 1;
  }
  return (s.find_first_of(",-") == std::string::npos ? "layer " : "layers ") + s;
}

}  // namespace ef::cache
