// Test helper: writes a transformers fixture (tests/data/<family>, F32 weights) as a checkpoint in
// a published quantized layout, with this file's own encoders:
//   gpt_oss      experts as MXFP4: mlp.experts.gate_up_proj_blocks/_scales and
//                down_proj_blocks/_scales ([E, out, in / 32, 16] and [E, out, in / 32], uint8),
//                quantization_config {quant_method: mxfp4}; biases stay float.
//   deepseek_v3  every decoder linear weight (attention projections, dense MLP, shared and routed
//                experts; not the router, norms, embedding or lm_head, as DeepSeek-V3 publishes
//                them) as F8_E4M3 + fp32 weight_scale_inv, quantization_config {quant_method: fp8,
//                weight_block_size}.
// The encoders round to nearest and saturate; they only need to produce valid encodings whose
// dequantization is close to the fixture's weights. A `mutate` hook edits the tensors or config
// before they are written (bad-input tests).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <nlohmann/json.hpp>
#include <regex>
#include <string>
#include <vector>

#include "runtime/core/dtype.h"
#include "runtime/model/safetensors_file.h"

namespace ef::runtime::testing {

struct OwnedTensor {
  DType dtype = DType::kF32;
  std::vector<int64_t> shape;
  std::vector<uint8_t> bytes;
};
using TensorMap = std::map<std::string, OwnedTensor>;

struct QuantWriteOptions {
  int block_rows = 128, block_cols = 128;  // fp8 weight_block_size
  DType float_dtype = DType::kF32;         // the unquantized tensors (and so the dequantized ones)
  // Edits the tensors and config.json before they are written.
  std::function<void(TensorMap&, nlohmann::json&)> mutate;
};

// The e2m1 code nearest to x (x already divided by the group's scale), ties to the even code,
// saturating at +-6.
inline uint8_t EncodeE2m1(float x) {
  static const float kPos[8] = {0.f, 0.5f, 1.f, 1.5f, 2.f, 3.f, 4.f, 6.f};
  const float a = std::min(std::fabs(x), 6.f);
  int best = 0;
  for (int c = 1; c < 8; ++c) {
    const float d = std::fabs(kPos[c] - a), bd = std::fabs(kPos[best] - a);
    if (d < bd || (d == bd && c % 2 == 0)) best = c;
  }
  return static_cast<uint8_t>(best | (std::signbit(x) && best != 0 ? 8 : 0));
}

// One row of `cols` values (a multiple of 32) as MXFP4: cols / 2 bytes of blocks, cols / 32 scale
// bytes. The shared exponent is floor(log2(amax)) - 2 (e2m1's largest exponent), as the OCP
// specification describes.
inline void EncodeMxfp4Row(const float* x, int64_t cols, uint8_t* blocks, uint8_t* scales) {
  for (int64_t g = 0; g < cols / 32; ++g) {
    float amax = 0.f;
    for (int k = 0; k < 32; ++k) amax = std::max(amax, std::fabs(x[g * 32 + k]));
    int e = amax > 0.f ? static_cast<int>(std::floor(std::log2(amax))) - 2 : 0;
    e = std::clamp(e, -127, 127);
    scales[g] = static_cast<uint8_t>(e + 127);
    for (int k = 0; k < 16; ++k) {
      const uint8_t lo = EncodeE2m1(std::ldexp(x[g * 32 + 2 * k], -e));
      const uint8_t hi = EncodeE2m1(std::ldexp(x[g * 32 + 2 * k + 1], -e));
      blocks[g * 16 + k] = static_cast<uint8_t>(lo | (hi << 4));
    }
  }
}

// The F8_E4M3 code nearest to x, ties to the even code, saturating at +-448.
inline uint8_t EncodeE4m3(float x) {
  static const std::vector<float> kPos = [] {
    std::vector<float> v;
    for (int c = 0; c < 0x7f; ++c) v.push_back(F8E4M3ToF32(static_cast<uint8_t>(c)));
    return v;
  }();
  const float a = std::min(std::fabs(x), 448.f);
  auto it = std::lower_bound(kPos.begin(), kPos.end(), a);
  int c = static_cast<int>(it - kPos.begin());
  if (c > 0 && (c == static_cast<int>(kPos.size()) || a - kPos[c - 1] < kPos[c] - a ||
                (a - kPos[c - 1] == kPos[c] - a && (c - 1) % 2 == 0)))
    --c;
  return static_cast<uint8_t>(c | (std::signbit(x) && c != 0 ? 0x80 : 0));
}

inline OwnedTensor ReadTensor(const TensorView& v) {
  OwnedTensor t{v.dtype, v.shape, std::vector<uint8_t>(v.nbytes)};
  std::memcpy(t.bytes.data(), v.data, v.nbytes);
  return t;
}

inline std::vector<float> AsF32(const OwnedTensor& t) {
  std::vector<float> f(t.bytes.size() / DTypeSize(t.dtype));
  ConvertToF32(t.dtype, t.bytes.data(), f.data(), f.size());
  return f;
}

inline OwnedTensor FloatTensor(DType dtype, std::vector<int64_t> shape, const std::vector<float>& v) {
  OwnedTensor t{dtype, std::move(shape), std::vector<uint8_t>(v.size() * DTypeSize(dtype))};
  for (size_t i = 0; i < v.size(); ++i) {
    if (dtype == DType::kF32) {
      std::memcpy(&t.bytes[i * 4], &v[i], 4);
    } else {
      const uint16_t h = dtype == DType::kBF16 ? F32ToBf16(v[i]) : F32ToF16(v[i]);
      std::memcpy(&t.bytes[i * 2], &h, 2);
    }
  }
  return t;
}

// gpt_oss: gate_up_proj [E, H, 2I] and down_proj [E, I, H] (x @ W) become [E, out, in] MXFP4.
inline void QuantizeGptOssExperts(TensorMap& tensors) {
  std::vector<std::string> fused;
  for (const auto& [name, t] : tensors)
    if (name.ends_with(".mlp.experts.gate_up_proj") || name.ends_with(".mlp.experts.down_proj")) fused.push_back(name);
  for (const std::string& name : fused) {
    const OwnedTensor t = tensors[name];
    const std::vector<float> w = AsF32(t);
    const int64_t E = t.shape[0], in = t.shape[1], out = t.shape[2];
    OwnedTensor blocks{DType::kU8, {E, out, in / 32, 16}, std::vector<uint8_t>(E * out * in / 2)};
    OwnedTensor scales{DType::kU8, {E, out, in / 32}, std::vector<uint8_t>(E * out * in / 32)};
    std::vector<float> row(in);
    for (int64_t e = 0; e < E; ++e)
      for (int64_t o = 0; o < out; ++o) {
        for (int64_t i = 0; i < in; ++i) row[i] = w[(e * in + i) * out + o];
        EncodeMxfp4Row(row.data(), in, &blocks.bytes[(e * out + o) * in / 2], &scales.bytes[(e * out + o) * in / 32]);
      }
    tensors.erase(name);
    tensors[name + "_blocks"] = std::move(blocks);
    tensors[name + "_scales"] = std::move(scales);
  }
}

// Whether DeepSeek-V3 publishes tensor `name` as block FP8: the decoder's linear weights.
inline bool DeepseekQuantizes(const std::string& name) {
  static const std::regex kLinear(R"(model\.layers\.\d+\..*(_proj|_proj_with_mqa)\.weight)");
  return std::regex_match(name, kLinear);
}

inline void QuantizeFp8Linears(TensorMap& tensors, int br, int bc) {
  std::vector<std::string> linears;
  for (const auto& [name, t] : tensors)
    if (DeepseekQuantizes(name)) linears.push_back(name);
  for (const std::string& name : linears) {
    const OwnedTensor t = tensors[name];
    const std::vector<float> w = AsF32(t);
    const int64_t rows = t.shape[0], cols = t.shape[1];
    const int64_t gr = (rows + br - 1) / br, gc = (cols + bc - 1) / bc;
    std::vector<float> scale(gr * gc);
    OwnedTensor q{DType::kF8E4M3, t.shape, std::vector<uint8_t>(rows * cols)};
    for (int64_t bi = 0; bi < gr; ++bi)
      for (int64_t bj = 0; bj < gc; ++bj) {
        float amax = 0.f;
        for (int64_t r = bi * br; r < std::min(rows, (bi + 1) * br); ++r)
          for (int64_t c = bj * bc; c < std::min(cols, (bj + 1) * bc); ++c)
            amax = std::max(amax, std::fabs(w[r * cols + c]));
        const float s = amax > 0.f ? amax / 448.f : 1.f;
        scale[bi * gc + bj] = s;
        for (int64_t r = bi * br; r < std::min(rows, (bi + 1) * br); ++r)
          for (int64_t c = bj * bc; c < std::min(cols, (bj + 1) * bc); ++c)
            q.bytes[r * cols + c] = EncodeE4m3(w[r * cols + c] / s);
      }
    tensors[name] = std::move(q);
    tensors[name + "_scale_inv"] = FloatTensor(DType::kF32, {gr, gc}, scale);
  }
}

inline nlohmann::json ReadConfig(const std::string& dir) {
  std::ifstream in(dir + "/config.json");
  return nlohmann::json::parse(in);
}

inline Status WriteCheckpoint(const std::string& dir, const TensorMap& tensors, const nlohmann::json& config) {
  std::filesystem::create_directories(dir);
  std::ofstream(dir + "/config.json") << config.dump(2);
  std::vector<TensorToWrite> list;
  for (const auto& [name, t] : tensors) list.push_back({name, t.dtype, t.shape, t.bytes.data()});
  return WriteSafetensors(dir + "/model.safetensors", list, {{"format", "pt"}});
}

// Reads the fixture in `fixture_dir` (one model.safetensors) and writes it to `out_dir`
// quantized as its family publishes it (gpt_oss: MXFP4, deepseek_v3: FP8).
inline Status WriteQuantizedFixture(const std::string& fixture_dir, const std::string& out_dir,
                                    const QuantWriteOptions& o = {}) {
  EF_ASSIGN_OR_RETURN(auto file, SafetensorsFile::Open(fixture_dir + "/model.safetensors"));
  TensorMap tensors;
  for (const auto& [name, v] : file->tensors()) {
    tensors[name] = ReadTensor(v);
    if (o.float_dtype != DType::kF32 && IsFloatWeight(v.dtype))
      tensors[name] = FloatTensor(o.float_dtype, v.shape, AsF32(tensors[name]));
  }
  nlohmann::json config = ReadConfig(fixture_dir);
  const std::string family = config["model_type"];
  if (family == "gpt_oss") {
    QuantizeGptOssExperts(tensors);
    config["quantization_config"] = {
        {"quant_method", "mxfp4"},
        {"modules_to_not_convert",
         {"model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"}}};
  } else if (family == "deepseek_v3") {
    QuantizeFp8Linears(tensors, o.block_rows, o.block_cols);
    config["quantization_config"] = {{"activation_scheme", "dynamic"},
                                     {"fmt", "e4m3"},
                                     {"quant_method", "fp8"},
                                     {"weight_block_size", {o.block_rows, o.block_cols}}};
  } else {
    return InvalidArgument("no published quantized layout for " + family);
  }
  if (o.mutate) o.mutate(tensors, config);
  return WriteCheckpoint(out_dir, tensors, config);
}

}  // namespace ef::runtime::testing
