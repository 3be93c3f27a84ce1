#include "runtime/engine/model_weights.h"

#include "runtime/core/logging.h"

namespace ef::runtime {
namespace {

// Looks a tensor up, checks its shape and float dtype.
StatusOr<const TensorView*> Tensor(const Checkpoint& ckpt, const std::string& name, std::vector<int64_t> shape) {
  EF_ASSIGN_OR_RETURN(const TensorView* t, ckpt.Get(name));
  if (t->shape != shape) {
    TensorView want;
    want.shape = shape;
    return InvalidArgument("tensor \"" + name + "\" has shape " + t->ShapeString() + ", the config implies " +
                           want.ShapeString());
  }
  if (!IsFloatWeight(t->dtype))
    return InvalidArgument("tensor \"" + name + "\" has dtype " + DTypeName(t->dtype) +
                           "; weights must be F32, F16 or BF16");
  return t;
}

Weight HostWeight(const TensorView* t) {
  return Weight{t->dtype, t->data, t->shape.size() == 2 ? t->shape[0] : 1, t->shape.back()};
}

}  // namespace

StatusOr<std::unique_ptr<ModelWeights>> ModelWeights::Load(const std::string& model_dir, Backend* backend) {
  auto m = std::unique_ptr<ModelWeights>(new ModelWeights());
  EF_ASSIGN_OR_RETURN(m->config_, ModelConfig::FromModelDir(model_dir));
  EF_ASSIGN_OR_RETURN(m->checkpoint_, Checkpoint::Open(model_dir));
  const ModelConfig& c = m->config_;
  const Checkpoint& ck = *m->checkpoint_;
  const int64_t H = c.hidden_size;

  auto upload = [&](const std::string& name, std::vector<int64_t> shape, Weight* out) -> Status {
    EF_ASSIGN_OR_RETURN(const TensorView* t, Tensor(ck, name, shape));
    Weight hw = HostWeight(t);
    EF_ASSIGN_OR_RETURN(*out, backend->UploadWeight(hw.dtype, hw.data, hw.rows, hw.cols));
    return Status::Ok();
  };
  auto upload_mlp = [&](const std::string& gate, const std::string& up, const std::string& down, int64_t inter,
                        ExpertWeights* out) -> Status {
    EF_RETURN_IF_ERROR(upload(gate, {inter, H}, &out->gate));
    EF_RETURN_IF_ERROR(upload(up, {inter, H}, &out->up));
    EF_RETURN_IF_ERROR(upload(down, {H, inter}, &out->down));
    return Status::Ok();
  };

  EF_RETURN_IF_ERROR(upload("model.embed_tokens.weight", {c.vocab_size, H}, &m->embed_));
  EF_RETURN_IF_ERROR(upload("model.norm.weight", {H}, &m->final_norm_));
  if (c.tie_word_embeddings && !ck.Has("lm_head.weight")) {
    m->lm_head_ = m->embed_;
  } else {
    EF_RETURN_IF_ERROR(upload("lm_head.weight", {c.vocab_size, H}, &m->lm_head_));
  }
  m->layers_.resize(c.num_layers);
  m->host_experts_.resize(static_cast<size_t>(c.num_layers) * c.num_experts);
  for (int l = 0; l < c.num_layers; ++l) {
    LayerWeights& L = m->layers_[l];
    const std::string p = "model.layers." + std::to_string(l);
    EF_RETURN_IF_ERROR(upload(p + ".input_layernorm.weight", {H}, &L.input_norm));
    EF_RETURN_IF_ERROR(upload(p + ".post_attention_layernorm.weight", {H}, &L.post_attention_norm));
    EF_RETURN_IF_ERROR(upload(p + ".self_attn.q_proj.weight", {c.q_dim(), H}, &L.q));
    EF_RETURN_IF_ERROR(upload(p + ".self_attn.k_proj.weight", {c.kv_dim(), H}, &L.k));
    EF_RETURN_IF_ERROR(upload(p + ".self_attn.v_proj.weight", {c.kv_dim(), H}, &L.v));
    EF_RETURN_IF_ERROR(upload(p + ".self_attn.o_proj.weight", {H, c.q_dim()}, &L.o));
    if (c.qkv_bias) {
      EF_RETURN_IF_ERROR(upload(p + ".self_attn.q_proj.bias", {c.q_dim()}, &L.q_bias));
      EF_RETURN_IF_ERROR(upload(p + ".self_attn.k_proj.bias", {c.kv_dim()}, &L.k_bias));
      EF_RETURN_IF_ERROR(upload(p + ".self_attn.v_proj.bias", {c.kv_dim()}, &L.v_bias));
    }
    if (c.qk_norm == QkNorm::kPerHead) {
      EF_RETURN_IF_ERROR(upload(p + ".self_attn.q_norm.weight", {c.head_dim}, &L.q_norm));
      EF_RETURN_IF_ERROR(upload(p + ".self_attn.k_norm.weight", {c.head_dim}, &L.k_norm));
    } else if (c.qk_norm == QkNorm::kFull) {
      EF_RETURN_IF_ERROR(upload(p + ".self_attn.q_norm.weight", {c.q_dim()}, &L.q_norm));
      EF_RETURN_IF_ERROR(upload(p + ".self_attn.k_norm.weight", {c.kv_dim()}, &L.k_norm));
    }
    if (!c.IsMoeLayer(l)) {
      EF_RETURN_IF_ERROR(upload_mlp(c.DenseMlpName(l, 0), c.DenseMlpName(l, 1), c.DenseMlpName(l, 2),
                                    c.intermediate_size, &L.dense_mlp));
      continue;
    }
    EF_RETURN_IF_ERROR(upload(c.RouterName(l), {c.num_experts, H}, &L.router));
    if (c.shared_expert_intermediate_size > 0) {
      EF_RETURN_IF_ERROR(upload_mlp(c.SharedExpertName(l, 0), c.SharedExpertName(l, 1), c.SharedExpertName(l, 2),
                                    c.shared_expert_intermediate_size, &L.shared_expert));
      EF_RETURN_IF_ERROR(upload(c.SharedExpertGateName(l), {1, H}, &L.shared_expert_gate));
    }
    const int64_t I = c.moe_intermediate_size;
    for (int e = 0; e < c.num_experts; ++e) {
      ExpertWeights& ew = m->host_experts_[static_cast<size_t>(l) * c.num_experts + e];
      EF_ASSIGN_OR_RETURN(const TensorView* g, Tensor(ck, c.ExpertName(l, e, 0), {I, H}));
      EF_ASSIGN_OR_RETURN(const TensorView* u, Tensor(ck, c.ExpertName(l, e, 1), {I, H}));
      EF_ASSIGN_OR_RETURN(const TensorView* d, Tensor(ck, c.ExpertName(l, e, 2), {H, I}));
      ew = ExpertWeights{HostWeight(g), HostWeight(u), HostWeight(d)};
      m->max_expert_bytes_ = std::max(m->max_expert_bytes_, ew.nbytes());
      m->expert_dtype_ = g->dtype;
    }
  }
  EF_LOG(INFO, MODEL, "loaded %s: %s, %d layers (%d MoE) x %d experts top-%d, hidden %d, %zu bytes per expert",
         model_dir.c_str(), c.model_type.c_str(), c.num_layers, c.num_moe_layers(), c.num_experts, c.top_k,
         c.hidden_size, m->max_expert_bytes_);
  return m;
}

}  // namespace ef::runtime
