#include "runtime/engine/model_weights.h"

#include <cstring>
#include <iterator>
#include <unordered_set>

#include "runtime/core/block_scaled.h"
#include "runtime/core/logging.h"
#include "runtime/model/checkpoint_quant.h"

namespace ef::runtime {
namespace {

Status CheckShape(const TensorView* t, const std::vector<int64_t>& shape) {
  if (t->shape == shape) return Status::Ok();
  TensorView want;
  want.shape = shape;
  return InvalidArgument("tensor \"" + t->name + "\" has shape " + t->ShapeString() + ", the config implies " +
                         want.ShapeString());
}

// Looks a tensor up, checks its shape and float dtype.
StatusOr<const TensorView*> Tensor(const Checkpoint& ckpt, const std::string& name, std::vector<int64_t> shape) {
  EF_ASSIGN_OR_RETURN(const TensorView* t, ckpt.Get(name));
  EF_RETURN_IF_ERROR(CheckShape(t, shape));
  if (!IsFloatWeight(t->dtype))
    return InvalidArgument(
        "tensor \"" + name + "\" has dtype " + DTypeName(t->dtype) + "; weights must be F32, F16 or BF16" +
        (t->dtype == DType::kF8E4M3 ? " (or F8_E4M3 under quantization_config.quant_method fp8)" : ""));
  return t;
}

Weight HostWeight(const TensorView* t) {
  return Weight{t->dtype, t->data, t->shape.size() == 2 ? t->shape[0] : 1, t->shape.back()};
}

}  // namespace

// Loads one checkpoint into a ModelWeights, step by step (attention, MLP, experts per layer).
class ModelWeightsLoader {
 public:
  ModelWeightsLoader(ModelWeights* m, Backend* backend, const LoadOptions& options)
      : m_(m),
        c_(m->config_),
        ck_(*m->checkpoint_),
        backend_(backend),
        H_(c_.hidden_size),
        keep_mxfp4_(c_.quant.method == WeightQuant::kMxfp4 && !options.dequantize_experts),
        keep_fp8_(c_.quant.method == WeightQuant::kFp8 && !options.dequantize_experts &&
                  c_.quant.block_rows == kFp8BlockFormat.block_rows &&
                  c_.quant.block_cols == kFp8BlockFormat.block_cols) {}

  Status Run();

 private:
  // Tensor(), and every value a finite number. A NaN or an infinity in a weight fails nowhere
  // later: the logits turn to NaN and greedy decoding emits token 0 on and on. Bytes that several
  // tensors alias (repeated layers) are scanned once.
  StatusOr<const TensorView*> FiniteTensor(const std::string& name, std::vector<int64_t> shape) {
    EF_ASSIGN_OR_RETURN(const TensorView* t, Tensor(ck_, name, std::move(shape)));
    if (!scanned_.insert(t->data).second) return t;
    int64_t first = -1;
    const int64_t bad = CountNonFinite(t->dtype, t->data, t->numel(), &first);
    if (bad == 0) return t;
    const int64_t cols = t->shape.empty() ? 1 : t->shape.back();
    return InvalidArgument("tensor \"" + name + "\" holds " + std::to_string(bad) + " NaN or infinite value" +
                           (bad == 1 ? "" : "s") + " (the first at row " + std::to_string(first / cols) + ", column " +
                           std::to_string(first % cols) + "): the checkpoint's weights must be finite numbers");
  }

  Status Upload(const std::string& name, std::vector<int64_t> shape, Weight* out) {
    EF_ASSIGN_OR_RETURN(Weight hw, HostTensor(name, shape));
    EF_ASSIGN_OR_RETURN(*out, backend_->UploadWeight(hw.dtype, hw.data, hw.rows, hw.cols));
    if (out->data != hw.data) Release(hw.data);  // the backend copied it (CUDA); the CPU backend views it
    return Status::Ok();
  }
  // Weight `name` of `shape` in host memory as F32/F16/BF16: the checkpoint's bytes, or the
  // dequantization (owned) of a block FP8 weight into fp8_out_.
  StatusOr<Weight> HostTensor(const std::string& name, const std::vector<int64_t>& shape) {
    EF_ASSIGN_OR_RETURN(const TensorView* t, ck_.Get(name));
    if (t->dtype != DType::kF8E4M3 || c_.quant.method != WeightQuant::kFp8) {
      EF_ASSIGN_OR_RETURN(t, FiniteTensor(name, shape));
      return HostWeight(t);
    }
    EF_RETURN_IF_ERROR(CheckShape(t, shape));
    EF_ASSIGN_OR_RETURN(const TensorView* scale, ck_.Get(Fp8ScaleName(name)));
    EF_RETURN_IF_ERROR(CheckFp8(*t, *scale, c_.quant.block_rows, c_.quant.block_cols));
    const Weight w{fp8_out_, nullptr, t->dim(0), t->dim(1)};
    std::byte* dst = Own(w.nbytes());
    EF_RETURN_IF_ERROR(DequantizeFp8(*t, *scale, c_.quant.block_rows, c_.quant.block_cols, fp8_out_, dst));
    return Weight{w.dtype, dst, w.rows, w.cols};
  }
  // A routed expert's weight `name`: packed as kFp8Block (owned) when the checkpoint stores it as
  // block FP8 and keep_fp8_, else HostTensor's. Every value is dequantized once into scratch_ all
  // the same: that validates the codes and scales with HostTensor's errors (NaN codes, non-finite
  // scales, products out of range), so the backends never meet them.
  StatusOr<Weight> ExpertTensor(const std::string& name, const std::vector<int64_t>& shape) {
    EF_ASSIGN_OR_RETURN(const TensorView* t, ck_.Get(name));
    if (!keep_fp8_ || t->dtype != DType::kF8E4M3) return HostTensor(name, shape);
    EF_RETURN_IF_ERROR(CheckShape(t, shape));
    EF_ASSIGN_OR_RETURN(const TensorView* scale, ck_.Get(Fp8ScaleName(name)));
    EF_RETURN_IF_ERROR(CheckFp8(*t, *scale, c_.quant.block_rows, c_.quant.block_cols));
    const Weight w{DType::kFp8Block, nullptr, t->dim(0), t->dim(1)};
    scratch_.resize(static_cast<size_t>(w.rows * w.cols) * sizeof(float));
    EF_RETURN_IF_ERROR(
        DequantizeFp8(*t, *scale, c_.quant.block_rows, c_.quant.block_cols, DType::kF32, scratch_.data()));
    std::byte* dst = Own(w.nbytes());
    PackFp8Block(reinterpret_cast<const uint8_t*>(t->data), scale->data, w.rows, w.cols, dst);
    return Weight{w.dtype, dst, w.rows, w.cols};
  }
  Status UploadMlp(int layer, bool shared, int64_t inter, ExpertWeights* out) {
    auto name = [&](int p) { return shared ? c_.SharedExpertName(layer, p) : c_.DenseMlpName(layer, p); };
    EF_RETURN_IF_ERROR(Upload(name(0), {inter, H_}, &out->gate));
    EF_RETURN_IF_ERROR(Upload(name(1), {inter, H_}, &out->up));
    EF_RETURN_IF_ERROR(Upload(name(2), {H_, inter}, &out->down));
    return Status::Ok();
  }
  // Host bytes owned by the ModelWeights (stable address).
  std::byte* Own(size_t bytes) {
    m_->owned_.push_back(std::make_unique<std::vector<std::byte>>(bytes));
    return m_->owned_.back()->data();
  }
  // Frees the owned bytes at `data` once nothing views them (a dequantized weight that was copied
  // again); a no-op for checkpoint bytes. Searches from the newest: the bytes are recent.
  void Release(const void* data) {
    for (auto it = m_->owned_.rbegin(); it != m_->owned_.rend(); ++it) {
      if ((*it)->data() == data) {
        m_->owned_.erase(std::next(it).base());
        return;
      }
    }
  }
  // An fp32 copy of a vector tensor, uploaded: ops that take plain float pointers (sinks, rope).
  StatusOr<Weight> UploadF32(const float* data, int64_t n) {
    auto* dst = reinterpret_cast<float*>(Own(static_cast<size_t>(n) * sizeof(float)));
    std::memcpy(dst, data, static_cast<size_t>(n) * sizeof(float));
    return backend_->UploadWeight(DType::kF32, dst, 1, n);
  }
  StatusOr<std::vector<float>> ReadF32(const std::string& name, int64_t n) {
    EF_ASSIGN_OR_RETURN(const TensorView* t, FiniteTensor(name, {n}));
    std::vector<float> v(static_cast<size_t>(n));
    ConvertToF32(t->dtype, t->data, v.data(), v.size());
    return v;
  }
  Status LoadAttention(int l, LayerWeights* L);
  Status LoadMla(int l, LayerWeights* L);
  Status LoadMoe(int l, LayerWeights* L);
  Status LoadExperts(int l);
  Status LoadFusedExperts(int l);
  // Fills the gate, up and down parts of expert e (owned, laid out as ExpertWeights) from the
  // fused bf16/fp32 tensors or from MXFP4 blocks (dequantized, or packed when the parts are kMxfp4).
  Status FillFusedExpert(const TensorView* gate_up, const TensorView* down, int64_t e, const ExpertWeights& ew);
  Status FillMxfp4Expert(const TensorView* gate_up_blocks, const TensorView* gate_up_scales,
                         const TensorView* down_blocks, const TensorView* down_scales, int64_t e,
                         const ExpertWeights& ew);

  ModelWeights* m_;
  const ModelConfig& c_;
  const Checkpoint& ck_;
  Backend* backend_;
  const int64_t H_;
  // Routed experts stay packed (kMxfp4, kFp8Block); kFp8Block has 128 x 128 blocks, so other
  // weight_block_size values are dequantized.
  const bool keep_mxfp4_, keep_fp8_;
  std::unordered_set<const std::byte*> scanned_;  // FiniteTensor: bytes already scanned
  // Block FP8 weights that are not kept packed are dequantized into the dtype the checkpoint keeps
  // its unquantized weights in (that of the token embedding, which no published checkpoint
  // quantizes). In BF16 (the published DeepSeek-V3) each fp32 product fp8 x scale_inv is rounded
  // once more to nearest even, as transformers does when it dequantizes into the model's dtype; in
  // F32 it is exact. Kept as floats: the packed form is for routed experts, which the expert cache
  // moves; the other weights load once.
  DType fp8_out_ = DType::kF32;
  std::vector<std::byte> scratch_;  // one weight dequantized (MXFP4 gate_up rows; validation of a packed one)
};

Status ModelWeightsLoader::Run() {
  EF_ASSIGN_OR_RETURN(const TensorView* embed, FiniteTensor("model.embed_tokens.weight", {c_.vocab_size, H_}));
  fp8_out_ = embed->dtype;
  EF_RETURN_IF_ERROR(Upload("model.embed_tokens.weight", {c_.vocab_size, H_}, &m_->embed_));
  EF_RETURN_IF_ERROR(Upload("model.norm.weight", {H_}, &m_->final_norm_));
  if (c_.tie_word_embeddings && !ck_.Has("lm_head.weight")) {
    m_->lm_head_ = m_->embed_;
  } else {
    EF_RETURN_IF_ERROR(Upload("lm_head.weight", {c_.vocab_size, H_}, &m_->lm_head_));
  }
  const RopeFrequencies rope = RopeFrequencies::ForModel(c_);
  EF_ASSIGN_OR_RETURN(m_->rope_inv_freq_, UploadF32(rope.inv_freq.data(), static_cast<int64_t>(rope.inv_freq.size())));
  m_->rope_attention_factor_ = rope.attention_factor;
  m_->layers_.resize(c_.num_layers);
  m_->host_experts_.resize(static_cast<size_t>(c_.num_layers) * c_.num_experts);
  for (int l = 0; l < c_.num_layers; ++l) {
    LayerWeights& L = m_->layers_[l];
    const std::string p = "model.layers." + std::to_string(l);
    EF_RETURN_IF_ERROR(Upload(p + ".input_layernorm.weight", {H_}, &L.input_norm));
    EF_RETURN_IF_ERROR(Upload(p + ".post_attention_layernorm.weight", {H_}, &L.post_attention_norm));
    EF_RETURN_IF_ERROR(c_.mla ? LoadMla(l, &L) : LoadAttention(l, &L));
    if (!c_.IsMoeLayer(l)) {
      EF_RETURN_IF_ERROR(UploadMlp(l, /*shared=*/false, c_.intermediate_size, &L.dense_mlp));
      continue;
    }
    EF_RETURN_IF_ERROR(LoadMoe(l, &L));
  }
  return Status::Ok();
}

Status ModelWeightsLoader::LoadAttention(int l, LayerWeights* L) {
  const std::string p = "model.layers." + std::to_string(l) + ".self_attn.";
  EF_RETURN_IF_ERROR(Upload(p + "q_proj.weight", {c_.q_dim(), H_}, &L->q));
  EF_RETURN_IF_ERROR(Upload(p + "k_proj.weight", {c_.kv_dim(), H_}, &L->k));
  EF_RETURN_IF_ERROR(Upload(p + "v_proj.weight", {c_.kv_dim(), H_}, &L->v));
  EF_RETURN_IF_ERROR(Upload(p + "o_proj.weight", {H_, c_.q_dim()}, &L->o));
  if (c_.qkv_bias) {
    EF_RETURN_IF_ERROR(Upload(p + "q_proj.bias", {c_.q_dim()}, &L->q_bias));
    EF_RETURN_IF_ERROR(Upload(p + "k_proj.bias", {c_.kv_dim()}, &L->k_bias));
    EF_RETURN_IF_ERROR(Upload(p + "v_proj.bias", {c_.kv_dim()}, &L->v_bias));
  }
  if (c_.o_bias) EF_RETURN_IF_ERROR(Upload(p + "o_proj.bias", {H_}, &L->o_bias));
  if (c_.qk_norm == QkNorm::kPerHead) {
    EF_RETURN_IF_ERROR(Upload(p + "q_norm.weight", {c_.head_dim}, &L->q_norm));
    EF_RETURN_IF_ERROR(Upload(p + "k_norm.weight", {c_.head_dim}, &L->k_norm));
  } else if (c_.qk_norm == QkNorm::kFull) {
    EF_RETURN_IF_ERROR(Upload(p + "q_norm.weight", {c_.q_dim()}, &L->q_norm));
    EF_RETURN_IF_ERROR(Upload(p + "k_norm.weight", {c_.kv_dim()}, &L->k_norm));
  }
  if (c_.attention_sinks) {
    EF_ASSIGN_OR_RETURN(std::vector<float> sinks, ReadF32(p + "sinks", c_.num_heads));
    EF_ASSIGN_OR_RETURN(L->sinks, UploadF32(sinks.data(), c_.num_heads));
  }
  return Status::Ok();
}

// kv_b_proj [heads * (nope + v), kv_lora] holds, per head, W_uk [nope, kv_lora] then W_uv
// [v, kv_lora]. Attention runs in the absorbed form (engine.cc), which wants W_uk transposed per
// head ([kv_lora, nope]) and the W_uv blocks contiguous: repacked here once, in the checkpoint's dtype.
Status ModelWeightsLoader::LoadMla(int l, LayerWeights* L) {
  const std::string p = "model.layers." + std::to_string(l) + ".self_attn.";
  const int64_t nh = c_.num_heads, nope = c_.qk_nope_head_dim, rope = c_.qk_rope_head_dim, vd = c_.v_head_dim,
                r = c_.kv_lora_rank;
  if (c_.q_lora_rank > 0) {
    EF_RETURN_IF_ERROR(Upload(p + "q_a_proj.weight", {c_.q_lora_rank, H_}, &L->q_a));
    EF_RETURN_IF_ERROR(Upload(p + "q_a_layernorm.weight", {c_.q_lora_rank}, &L->q_a_norm));
    EF_RETURN_IF_ERROR(Upload(p + "q_b_proj.weight", {c_.q_dim(), c_.q_lora_rank}, &L->q));
  } else {
    EF_RETURN_IF_ERROR(Upload(p + "q_proj.weight", {c_.q_dim(), H_}, &L->q));
  }
  EF_RETURN_IF_ERROR(Upload(p + "kv_a_proj_with_mqa.weight", {r + rope, H_}, &L->kv_a));
  EF_RETURN_IF_ERROR(Upload(p + "kv_a_layernorm.weight", {r}, &L->kv_a_norm));
  EF_RETURN_IF_ERROR(Upload(p + "o_proj.weight", {H_, nh * vd}, &L->o));
  EF_ASSIGN_OR_RETURN(const Weight kvb, HostTensor(p + "kv_b_proj.weight", {nh * (nope + vd), r}));
  const size_t esz = DTypeSize(kvb.dtype);
  const auto* src = static_cast<const std::byte*>(kvb.data);
  std::byte* key = Own(static_cast<size_t>(nh * r * nope) * esz);
  std::byte* value = Own(static_cast<size_t>(nh * vd * r) * esz);
  for (int64_t h = 0; h < nh; ++h) {
    const std::byte* head = src + static_cast<size_t>(h * (nope + vd) * r) * esz;
    for (int64_t i = 0; i < nope; ++i)
      for (int64_t j = 0; j < r; ++j)
        std::memcpy(key + static_cast<size_t>((h * r + j) * nope + i) * esz,
                    head + static_cast<size_t>(i * r + j) * esz, esz);
    std::memcpy(value + static_cast<size_t>(h * vd * r) * esz, head + static_cast<size_t>(nope * r) * esz,
                static_cast<size_t>(vd * r) * esz);
  }
  Release(kvb.data);  // a dequantized kv_b_proj: only its repacked copies are used
  EF_ASSIGN_OR_RETURN(L->kv_b_key, backend_->UploadWeight(kvb.dtype, key, nh * r, nope));
  EF_ASSIGN_OR_RETURN(L->kv_b_value, backend_->UploadWeight(kvb.dtype, value, nh * vd, r));
  return Status::Ok();
}

Status ModelWeightsLoader::LoadMoe(int l, LayerWeights* L) {
  EF_RETURN_IF_ERROR(Upload(c_.RouterName(l), {c_.num_experts, H_}, &L->router));
  const std::string mlp = "model.layers." + std::to_string(l) + ".mlp.";
  if (c_.router_bias) EF_RETURN_IF_ERROR(Upload(mlp + "router.bias", {c_.num_experts}, &L->router_bias));
  if (c_.score_correction_bias) {
    EF_ASSIGN_OR_RETURN(L->score_correction_bias, ReadF32(mlp + "gate.e_score_correction_bias", c_.num_experts));
  }
  if (c_.shared_expert_intermediate_size > 0) {
    EF_RETURN_IF_ERROR(UploadMlp(l, /*shared=*/true, c_.shared_expert_intermediate_size, &L->shared_expert));
    if (c_.shared_expert_gated) EF_RETURN_IF_ERROR(Upload(c_.SharedExpertGateName(l), {1, H_}, &L->shared_expert_gate));
  }
  return c_.expert_bias ? LoadFusedExperts(l) : LoadExperts(l);
}

Status ModelWeightsLoader::LoadExperts(int l) {
  const int64_t I = c_.moe_intermediate_size;
  for (int e = 0; e < c_.num_experts; ++e) {
    ExpertWeights& ew = m_->host_experts_[static_cast<size_t>(l) * c_.num_experts + e];
    EF_ASSIGN_OR_RETURN(const Weight g, ExpertTensor(c_.ExpertName(l, e, 0), {I, H_}));
    EF_ASSIGN_OR_RETURN(const Weight u, ExpertTensor(c_.ExpertName(l, e, 1), {I, H_}));
    EF_ASSIGN_OR_RETURN(const Weight d, ExpertTensor(c_.ExpertName(l, e, 2), {H_, I}));
    ew = ExpertWeights{g, u, d, {}, {}, {}};
    m_->max_expert_bytes_ = std::max(m_->max_expert_bytes_, ew.nbytes());
    m_->expert_dtype_ = g.dtype;
  }
  return Status::Ok();
}

// GPT-OSS keeps a layer's experts in four tensors: gate_up_proj [E, H, 2I] (x @ W, gate in the
// even columns, up in the odd ones), its bias [E, 2I], down_proj [E, I, H] and its bias [E, H].
// Each expert is repacked into one owned block in ExpertWeights' packed order with the engine's
// [out, in] layout, so caches and peers copy it as they copy any expert.
//
// The published checkpoints store the two projections as MXFP4 (quant_method "mxfp4"):
// gate_up_proj_blocks [E, 2I, H / 32, 16] + _scales [E, 2I, H / 32] and down_proj_blocks
// [E, H, I / 32, 16] + _scales [E, H, I / 32], that is [out, in] per expert. transformers
// dequantizes them to [E, 2I, H] and [E, H, I] and transposes each to the layout above, so row
// 2i of gate_up is gate row i, row 2i + 1 is up row i, and down's rows are its outputs. They are
// kept as kMxfp4 weights, the checkpoint's codes and scales copied row by row (gate and up taking
// the even and odd rows of gate_up), so an expert holds its stored size. Under
// LoadOptions::dequantize_experts they are dequantized expert by expert straight into the
// expert's block, in the biases' dtype (BF16 in the published checkpoints), where every value
// e2m1 x 2^k is exact (checked). Either way the experts' values equal transformers' dequantized ones.
Status ModelWeightsLoader::LoadFusedExperts(int l) {
  const std::string p = "model.layers." + std::to_string(l) + ".mlp.experts.";
  const int64_t E = c_.num_experts, I = c_.moe_intermediate_size;
  const bool mxfp4 = c_.quant.method == WeightQuant::kMxfp4;
  const TensorView *gu = nullptr, *dp = nullptr, *gu_scales = nullptr, *dp_scales = nullptr;
  if (mxfp4) {
    EF_ASSIGN_OR_RETURN(gu, ck_.Get(p + "gate_up_proj_blocks"));
    EF_ASSIGN_OR_RETURN(gu_scales, ck_.Get(p + "gate_up_proj_scales"));
    EF_ASSIGN_OR_RETURN(dp, ck_.Get(p + "down_proj_blocks"));
    EF_ASSIGN_OR_RETURN(dp_scales, ck_.Get(p + "down_proj_scales"));
    EF_RETURN_IF_ERROR(CheckMxfp4(*gu, *gu_scales, {E}, 2 * I, H_));
    EF_RETURN_IF_ERROR(CheckMxfp4(*dp, *dp_scales, {E}, H_, I));
  } else {
    if (!ck_.Has(p + "gate_up_proj") && ck_.Has(p + "gate_up_proj_blocks"))
      return InvalidArgument("layer " + std::to_string(l) + " holds MXFP4 experts (\"" + p +
                             "gate_up_proj_blocks\") but config.json has no quantization_config with quant_method "
                             "\"mxfp4\"");
    EF_ASSIGN_OR_RETURN(gu, FiniteTensor(p + "gate_up_proj", {E, H_, 2 * I}));
    EF_ASSIGN_OR_RETURN(dp, FiniteTensor(p + "down_proj", {E, I, H_}));
  }
  EF_ASSIGN_OR_RETURN(const TensorView* gub, FiniteTensor(p + "gate_up_proj_bias", {E, 2 * I}));
  EF_ASSIGN_OR_RETURN(const TensorView* dpb, FiniteTensor(p + "down_proj_bias", {E, H_}));
  const DType dt = mxfp4 ? gub->dtype : gu->dtype;
  for (const TensorView* t : {gu, gub, dp, dpb})
    if (IsFloatWeight(t->dtype) && t->dtype != dt)
      return InvalidArgument("layer " + std::to_string(l) + ": fused expert tensors mix dtypes (" + DTypeName(dt) +
                             " and " + DTypeName(t->dtype) + ")");
  const size_t esz = DTypeSize(dt);
  auto at = [esz](const void* base, int64_t i) {
    return static_cast<const std::byte*>(base) + static_cast<size_t>(i) * esz;
  };
  const DType wt = mxfp4 && keep_mxfp4_ ? DType::kMxfp4 : dt;
  for (int64_t e = 0; e < E; ++e) {
    ExpertWeights ew{{wt, nullptr, I, H_}, {wt, nullptr, I, H_}, {wt, nullptr, H_, I},
                     {dt, nullptr, 1, I},  {dt, nullptr, 1, I},  {dt, nullptr, 1, H_}};
    ew = ew.Rebased(Own(ew.nbytes()));
    EF_RETURN_IF_ERROR(mxfp4 ? FillMxfp4Expert(gu, gu_scales, dp, dp_scales, e, ew) : FillFusedExpert(gu, dp, e, ew));
    auto* gb = const_cast<std::byte*>(static_cast<const std::byte*>(ew.gate_bias.data));
    auto* ub = const_cast<std::byte*>(static_cast<const std::byte*>(ew.up_bias.data));
    auto* db = const_cast<std::byte*>(static_cast<const std::byte*>(ew.down_bias.data));
    for (int64_t i = 0; i < I; ++i) {
      std::memcpy(gb + static_cast<size_t>(i) * esz, at(gub->data, e * 2 * I + 2 * i), esz);
      std::memcpy(ub + static_cast<size_t>(i) * esz, at(gub->data, e * 2 * I + 2 * i + 1), esz);
    }
    std::memcpy(db, at(dpb->data, e * H_), static_cast<size_t>(H_) * esz);
    m_->host_experts_[static_cast<size_t>(l) * E + e] = ew;
    m_->max_expert_bytes_ = std::max(m_->max_expert_bytes_, ew.nbytes());
    m_->expert_dtype_ = wt;
  }
  return Status::Ok();
}

Status ModelWeightsLoader::FillFusedExpert(const TensorView* gu, const TensorView* dp, int64_t e,
                                           const ExpertWeights& ew) {
  const int64_t I = c_.moe_intermediate_size;
  const size_t esz = DTypeSize(gu->dtype);
  auto at = [esz](const void* base, int64_t i) {
    return static_cast<const std::byte*>(base) + static_cast<size_t>(i) * esz;
  };
  auto* gate = const_cast<std::byte*>(static_cast<const std::byte*>(ew.gate.data));
  auto* up = const_cast<std::byte*>(static_cast<const std::byte*>(ew.up.data));
  auto* down = const_cast<std::byte*>(static_cast<const std::byte*>(ew.down.data));
  for (int64_t h = 0; h < H_; ++h)
    for (int64_t i = 0; i < I; ++i) {
      const int64_t row = (e * H_ + h) * 2 * I;
      std::memcpy(gate + static_cast<size_t>(i * H_ + h) * esz, at(gu->data, row + 2 * i), esz);
      std::memcpy(up + static_cast<size_t>(i * H_ + h) * esz, at(gu->data, row + 2 * i + 1), esz);
      std::memcpy(down + static_cast<size_t>(h * I + i) * esz, at(dp->data, (e * I + i) * H_ + h), esz);
    }
  return Status::Ok();
}

Status ModelWeightsLoader::FillMxfp4Expert(const TensorView* gu, const TensorView* gu_scales, const TensorView* dp,
                                           const TensorView* dp_scales, int64_t e, const ExpertWeights& ew) {
  const int64_t I = c_.moe_intermediate_size;
  // Packed parts are validated by dequantizing them into fp32 scratch (HostTensor's errors).
  const bool packed = ew.gate.dtype == DType::kMxfp4;
  const DType dt = packed ? DType::kF32 : ew.gate.dtype;
  const size_t row_bytes = static_cast<size_t>(H_) * DTypeSize(dt);
  auto blocks = [e](const TensorView* t, int64_t rows, int64_t cols) {
    return reinterpret_cast<const uint8_t*>(t->data) + e * rows * cols / 2;
  };
  auto scales = [e](const TensorView* t, int64_t rows, int64_t cols) {
    return reinterpret_cast<const uint8_t*>(t->data) + e * rows * (cols / kMxfp4Group);
  };
  auto* gate = const_cast<std::byte*>(static_cast<const std::byte*>(ew.gate.data));
  auto* up = const_cast<std::byte*>(static_cast<const std::byte*>(ew.up.data));
  auto* down = const_cast<void*>(ew.down.data);
  const std::string expert = ", expert " + std::to_string(e);
  // gate_up's [2I, H] rows interleave gate (even) and up (odd): dequantized here, then split.
  scratch_.resize(2 * static_cast<size_t>(I) * row_bytes);  // also holds down's H x I values when packed
  EF_RETURN_IF_ERROR(DequantizeMxfp4(blocks(gu, 2 * I, H_), scales(gu_scales, 2 * I, H_), 2 * I, H_, dt,
                                     scratch_.data(), "tensor \"" + gu->name + "\"" + expert));
  if (packed) {
    PackMxfp4(blocks(gu, 2 * I, H_), scales(gu_scales, 2 * I, H_), I, H_, /*row_stride=*/2, gate);
    PackMxfp4(blocks(gu, 2 * I, H_) + H_ / 2, scales(gu_scales, 2 * I, H_) + H_ / kMxfp4Group, I, H_,
              /*row_stride=*/2, up);
  } else {
    for (int64_t i = 0; i < I; ++i) {
      std::memcpy(gate + static_cast<size_t>(i) * row_bytes, &scratch_[static_cast<size_t>(2 * i) * row_bytes],
                  row_bytes);
      std::memcpy(up + static_cast<size_t>(i) * row_bytes, &scratch_[static_cast<size_t>(2 * i + 1) * row_bytes],
                  row_bytes);
    }
  }
  EF_RETURN_IF_ERROR(DequantizeMxfp4(blocks(dp, H_, I), scales(dp_scales, H_, I), H_, I, dt,
                                     packed ? static_cast<void*>(scratch_.data()) : down,
                                     "tensor \"" + dp->name + "\"" + expert));
  if (packed) PackMxfp4(blocks(dp, H_, I), scales(dp_scales, H_, I), H_, I, /*row_stride=*/1, down);
  return Status::Ok();
}

namespace {

// A checkpoint with decoder layers past num_hidden_layers (and past the multi-token-prediction
// layers it declares) most likely has a config.json that says too few: those layers never run.
void WarnAboutLayersPastTheConfig(const Checkpoint& ckpt, const ModelConfig& c) {
  const std::string prefix = "model.layers.";
  int last = -1;
  for (const std::string& name : ckpt.names()) {
    if (name.compare(0, prefix.size(), prefix) != 0) continue;
    const int layer = std::atoi(name.c_str() + prefix.size());
    last = std::max(last, layer);
  }
  const int expected = c.num_layers + c.num_nextn_predict_layers;
  if (last >= expected)
    EF_LOG(WARN, MODEL,
           "the checkpoint holds decoder layers %d..%d past config.json's num_hidden_layers (%d): they are not loaded "
           "(is num_hidden_layers right?)",
           expected, last, c.num_layers);
}

}  // namespace

StatusOr<std::unique_ptr<ModelWeights>> ModelWeights::Load(const std::string& model_dir, Backend* backend,
                                                           const LoadOptions& options) {
  auto m = std::unique_ptr<ModelWeights>(new ModelWeights());
  EF_ASSIGN_OR_RETURN(m->config_, ModelConfig::FromModelDir(model_dir));
  if (options.checkpoint) {
    m->checkpoint_ = options.checkpoint;
  } else {
    EF_ASSIGN_OR_RETURN(m->checkpoint_, Checkpoint::Open(model_dir));
  }
  EF_RETURN_IF_ERROR(ModelWeightsLoader(m.get(), backend, options).Run());
  const ModelConfig& c = m->config_;
  WarnAboutLayersPastTheConfig(*m->checkpoint_, c);
  EF_LOG(INFO, MODEL, "loaded %s: %s, %d layers (%d MoE) x %d experts top-%d, hidden %d, %zu bytes per expert",
         model_dir.c_str(), c.model_type.c_str(), c.num_layers, c.num_moe_layers(), c.num_experts, c.top_k,
         c.hidden_size, m->max_expert_bytes_);
  if (c.quant.method != WeightQuant::kNone)
    EF_LOG(INFO, MODEL, "%s checkpoint: routed experts held as %s%s", WeightQuantName(c.quant.method),
           DTypeName(m->expert_dtype_),
           IsBlockScaled(m->expert_dtype_) ? " (stored size), other quantized weights dequantized at load"
                                           : ", dequantized at load");
  return m;
}

}  // namespace ef::runtime
