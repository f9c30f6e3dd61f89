#include "workers/model/llama_weights.h"

#include <cstdint>
#include <initializer_list>

#include "absl/strings/str_cat.h"
#include "kvgate/common/status_macros.h"
#include "workers/model/safetensors.h"

namespace kvgate::worker {
namespace {

// Copies tensor `name` (checked against `shape`) as float32 to `out` + `offset` (elements).
absl::Status ReadInto(const SafetensorsModel& model, const std::string& name,
                      std::initializer_list<int64_t> shape, std::vector<float>& out,
                      int64_t offset = 0) {
  ASSIGN_OR_RETURN(const TensorView* view,
                   model.Get(name, std::span<const int64_t>(shape.begin(), shape.size())));
  const int64_t n = view->num_elements();
  if (offset == 0 && out.empty()) out.resize(static_cast<size_t>(n));
  if (offset + n > static_cast<int64_t>(out.size())) {
    return absl::InternalError(absl::StrCat("weight buffer too small for ", name));
  }
  return ConvertToFloat32(*view, out.data() + offset);
}

}  // namespace

absl::StatusOr<LlamaWeights> LoadLlamaWeights(const std::string& model_dir, const LlamaConfig& c) {
  ASSIGN_OR_RETURN(SafetensorsModel model, SafetensorsModel::Open(model_dir));
  const int64_t hidden = c.hidden_size;
  const int64_t vocab = c.vocab_size;
  const int64_t inter = c.intermediate_size;
  const int64_t q_dim = int64_t{c.num_attention_heads} * c.head_dim;
  const int64_t kv_dim = int64_t{c.num_key_value_heads} * c.head_dim;

  LlamaWeights w;
  RETURN_IF_ERROR(ReadInto(model, "model.embed_tokens.weight", {vocab, hidden}, w.embed));
  w.layers.resize(c.num_hidden_layers);
  for (int i = 0; i < c.num_hidden_layers; ++i) {
    LlamaLayerWeights& l = w.layers[i];
    const std::string p = absl::StrCat("model.layers.", i, ".");
    RETURN_IF_ERROR(ReadInto(model, p + "input_layernorm.weight", {hidden}, l.input_norm));
    l.qkv.resize(static_cast<size_t>((q_dim + 2 * kv_dim) * hidden));
    RETURN_IF_ERROR(ReadInto(model, p + "self_attn.q_proj.weight", {q_dim, hidden}, l.qkv, 0));
    RETURN_IF_ERROR(
        ReadInto(model, p + "self_attn.k_proj.weight", {kv_dim, hidden}, l.qkv, q_dim * hidden));
    RETURN_IF_ERROR(ReadInto(model, p + "self_attn.v_proj.weight", {kv_dim, hidden}, l.qkv,
                             (q_dim + kv_dim) * hidden));
    if (c.attention_bias) {
      l.qkv_bias.resize(static_cast<size_t>(q_dim + 2 * kv_dim));
      RETURN_IF_ERROR(ReadInto(model, p + "self_attn.q_proj.bias", {q_dim}, l.qkv_bias, 0));
      RETURN_IF_ERROR(ReadInto(model, p + "self_attn.k_proj.bias", {kv_dim}, l.qkv_bias, q_dim));
      RETURN_IF_ERROR(
          ReadInto(model, p + "self_attn.v_proj.bias", {kv_dim}, l.qkv_bias, q_dim + kv_dim));
    }
    if (c.qk_norm) {
      RETURN_IF_ERROR(ReadInto(model, p + "self_attn.q_norm.weight", {c.head_dim}, l.q_norm));
      RETURN_IF_ERROR(ReadInto(model, p + "self_attn.k_norm.weight", {c.head_dim}, l.k_norm));
    }
    RETURN_IF_ERROR(ReadInto(model, p + "self_attn.o_proj.weight", {hidden, q_dim}, l.o_proj));
    if (c.o_proj_bias) {
      RETURN_IF_ERROR(ReadInto(model, p + "self_attn.o_proj.bias", {hidden}, l.o_bias));
    }
    RETURN_IF_ERROR(
        ReadInto(model, p + "post_attention_layernorm.weight", {hidden}, l.post_attention_norm));
    l.gate_up.resize(static_cast<size_t>(2 * inter * hidden));
    RETURN_IF_ERROR(ReadInto(model, p + "mlp.gate_proj.weight", {inter, hidden}, l.gate_up, 0));
    RETURN_IF_ERROR(
        ReadInto(model, p + "mlp.up_proj.weight", {inter, hidden}, l.gate_up, inter * hidden));
    RETURN_IF_ERROR(ReadInto(model, p + "mlp.down_proj.weight", {hidden, inter}, l.down));
  }
  RETURN_IF_ERROR(ReadInto(model, "model.norm.weight", {hidden}, w.final_norm));
  if (!c.tie_word_embeddings) {
    RETURN_IF_ERROR(ReadInto(model, "lm_head.weight", {vocab, hidden}, w.lm_head));
  }
  return w;
}

}  // namespace kvgate::worker
