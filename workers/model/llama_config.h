// LlamaConfig: the architecture hyper-parameters of a Llama-family model, read from a Hugging Face
// `config.json` (LlamaForCausalLM; Qwen2 attention biases and Qwen3 QK-norm as flags).
//
//   ASSIGN_OR_RETURN(LlamaConfig cfg, LoadLlamaConfig("model/config.json"));
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"

namespace kvgate::worker {

struct RopeScaling {
  // "none" or "llama3" (factor, low/high frequency factors, original context), or "linear".
  std::string type = "none";
  double factor = 1.0;
  double low_freq_factor = 1.0;
  double high_freq_factor = 4.0;
  int64_t original_max_position_embeddings = 8192;
};

struct LlamaConfig {
  std::string model_type = "llama";  // "llama", "mistral", "qwen2", "qwen3"
  int vocab_size = 0;
  int hidden_size = 0;
  int intermediate_size = 0;
  int num_hidden_layers = 0;
  int num_attention_heads = 0;
  int num_key_value_heads = 0;
  int head_dim = 0;  // hidden_size / num_attention_heads unless given
  double rms_norm_eps = 1e-5;
  double rope_theta = 10000.0;
  RopeScaling rope_scaling;
  int64_t max_position_embeddings = 2048;
  bool tie_word_embeddings = false;
  bool attention_bias = false;  // q/k/v biases (Qwen2; Llama/Qwen3 "attention_bias")
  bool o_proj_bias = false;     // o_proj bias (Llama/Qwen3 "attention_bias"; never Qwen2)
  bool qk_norm = false;         // per-head RMSNorm on q and k before RoPE (Qwen3)
  int bos_token_id = -1;
  std::vector<int> eos_token_ids;
  std::string torch_dtype = "float32";
};

// Parses and validates config.json. InvalidArgumentError names the missing or inconsistent field
// (e.g. heads not dividing hidden_size, kv heads not dividing heads, non-positive sizes).
absl::StatusOr<LlamaConfig> LoadLlamaConfig(const std::string& path);
// Accepts model_type llama, mistral, qwen2, qwen3; rope_scaling null/"default", "llama3" or
// "linear" (also inside transformers 5's "rope_parameters"); eos_token_id an int or a list.
absl::StatusOr<LlamaConfig> ParseLlamaConfig(std::string_view json);

// Inverse RoPE frequencies [head_dim / 2] after rope_scaling, as transformers computes them
// (rope_theta^(-2i/head_dim), then the Llama-3 band-wise or linear scaling), in double precision.
std::vector<double> RopeInverseFrequencies(const LlamaConfig& config);

}  // namespace kvgate::worker
