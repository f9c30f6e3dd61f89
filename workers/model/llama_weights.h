// LlamaWeights: the weights of a Llama-family model converted to float32 in host memory, laid out
// for the CPU forward (row-major, [out_features, in_features] as in the checkpoint; q/k/v and
// gate/up fused into one matrix each so that one GEMM computes them).
//
//   ASSIGN_OR_RETURN(LlamaConfig config, LoadLlamaConfig(dir + "/config.json"));
//   ASSIGN_OR_RETURN(LlamaWeights weights, LoadLlamaWeights(dir, config));
//   const float* lm_head = weights.lm_head_matrix();   // [vocab, hidden], tied or not
#pragma once

#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "workers/model/llama_config.h"

namespace kvgate::worker {

struct LlamaLayerWeights {
  std::vector<float> input_norm;  // [hidden]
  // Rows: q_proj [heads * head_dim], k_proj [kv_heads * head_dim], v_proj [kv_heads * head_dim];
  // [q_dim + 2 * kv_dim, hidden].
  std::vector<float> qkv;
  std::vector<float> qkv_bias;             // [q_dim + 2 * kv_dim]; empty without attention_bias
  std::vector<float> q_norm;               // [head_dim]; empty without qk_norm
  std::vector<float> k_norm;               // [head_dim]; empty without qk_norm
  std::vector<float> o_proj;               // [hidden, q_dim]
  std::vector<float> o_bias;               // [hidden]; empty without o_proj_bias
  std::vector<float> post_attention_norm;  // [hidden]
  std::vector<float> gate_up;              // rows: gate_proj, up_proj; [2 * intermediate, hidden]
  std::vector<float> down;                 // [hidden, intermediate]
};

struct LlamaWeights {
  std::vector<float> embed;  // [vocab, hidden]
  std::vector<LlamaLayerWeights> layers;
  std::vector<float> final_norm;  // [hidden]
  std::vector<float> lm_head;     // [vocab, hidden]; empty when tied to embed

  const float* lm_head_matrix() const { return lm_head.empty() ? embed.data() : lm_head.data(); }
};

// Reads the safetensors of `model_dir` (single file or sharded) and checks every tensor the config
// needs: presence and shape. InvalidArgumentError naming the file and tensor otherwise.
// lm_head.weight is read unless config.tie_word_embeddings.
absl::StatusOr<LlamaWeights> LoadLlamaWeights(const std::string& model_dir,
                                              const LlamaConfig& config);

}  // namespace kvgate::worker
