// Test helper: writes a transformers fixture (tests/data/<family>, F32 weights) as a checkpoint in
// a published quantized layout, with the encoders of runtime/model/checkpoint_quant.h:
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
#include <string>
#include <vector>

#include "runtime/core/dtype.h"
#include "runtime/model/checkpoint_quant.h"
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
    std::vector<float> rows(out * in);  // one expert, [out, in]
    for (int64_t e = 0; e < E; ++e) {
      for (int64_t o = 0; o < out; ++o)
        for (int64_t i = 0; i < in; ++i) rows[o * in + i] = w[(e * in + i) * out + o];
      EncodeMxfp4Rows(rows.data(), out, in, &blocks.bytes[e * out * in / 2], &scales.bytes[e * out * in / 32]);
    }
    tensors.erase(name);
    tensors[name + "_blocks"] = std::move(blocks);
    tensors[name + "_scales"] = std::move(scales);
  }
}

inline void QuantizeFp8Linears(TensorMap& tensors, int br, int bc) {
  std::vector<std::string> linears;
  for (const auto& [name, t] : tensors)
    if (DeepseekV3StoresAsFp8(name)) linears.push_back(name);
  for (const std::string& name : linears) {
    const OwnedTensor t = tensors[name];
    const std::vector<float> w = AsF32(t);
    const int64_t rows = t.shape[0], cols = t.shape[1];
    const int64_t gr = (rows + br - 1) / br, gc = (cols + bc - 1) / bc;
    std::vector<float> scale(gr * gc);
    OwnedTensor q{DType::kF8E4M3, t.shape, std::vector<uint8_t>(rows * cols)};
    EncodeFp8Blocks(w.data(), rows, cols, br, bc, q.bytes.data(), scale.data());
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
