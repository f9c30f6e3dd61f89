#include "workers/model/llama_config.h"

#include <cmath>
#include <fstream>
#include <numbers>
#include <sstream>

#include "absl/strings/str_cat.h"
#include "kvgate/common/status_macros.h"
#include "nlohmann/json.hpp"

namespace kvgate::worker {
namespace {

using Json = nlohmann::json;

absl::Status Invalid(const std::string& message) {
  return absl::InvalidArgumentError(absl::StrCat("config.json: ", message));
}

// Reads an optional integer field into `out` (left unchanged when absent or null).
absl::Status ReadInt(const Json& obj, const char* key, int64_t& out) {
  auto it = obj.find(key);
  if (it == obj.end() || it->is_null()) return absl::OkStatus();
  if (it->is_number_integer()) {
    out = it->get<int64_t>();
    return absl::OkStatus();
  }
  if (it->is_number_float()) {
    double value = it->get<double>();
    if (std::isfinite(value) && value == std::floor(value) && std::abs(value) < 9e15) {
      out = static_cast<int64_t>(value);
      return absl::OkStatus();
    }
  }
  return Invalid(absl::StrCat("field '", key, "' must be an integer, got ", it->dump()));
}

absl::Status ReadInt(const Json& obj, const char* key, int& out) {
  int64_t value = out;
  RETURN_IF_ERROR(ReadInt(obj, key, value));
  if (value < INT32_MIN || value > INT32_MAX) {
    return Invalid(absl::StrCat("field '", key, "' is out of range: ", value));
  }
  out = static_cast<int>(value);
  return absl::OkStatus();
}

absl::Status ReadPositiveInt(const Json& obj, const char* key, int& out) {
  if (!obj.contains(key) || obj[key].is_null()) {
    return Invalid(absl::StrCat("missing required field '", key, "'"));
  }
  RETURN_IF_ERROR(ReadInt(obj, key, out));
  if (out <= 0) return Invalid(absl::StrCat("field '", key, "' must be positive, got ", out));
  return absl::OkStatus();
}

absl::Status ReadDouble(const Json& obj, const char* key, double& out) {
  auto it = obj.find(key);
  if (it == obj.end() || it->is_null()) return absl::OkStatus();
  if (!it->is_number()) {
    return Invalid(absl::StrCat("field '", key, "' must be a number, got ", it->dump()));
  }
  out = it->get<double>();
  if (!std::isfinite(out)) return Invalid(absl::StrCat("field '", key, "' is not finite"));
  return absl::OkStatus();
}

absl::Status ReadBool(const Json& obj, const char* key, bool& out) {
  auto it = obj.find(key);
  if (it == obj.end() || it->is_null()) return absl::OkStatus();
  if (!it->is_boolean()) {
    return Invalid(absl::StrCat("field '", key, "' must be true or false, got ", it->dump()));
  }
  out = it->get<bool>();
  return absl::OkStatus();
}

absl::Status ReadRopeScaling(const Json& scaling, RopeScaling& out) {
  if (scaling.is_null()) return absl::OkStatus();
  if (!scaling.is_object()) return Invalid("'rope_scaling' must be an object or null");
  std::string type;
  for (const char* key : {"rope_type", "type"}) {
    auto it = scaling.find(key);
    if (it != scaling.end() && it->is_string()) {
      type = it->get<std::string>();
      break;
    }
  }
  if (type.empty() || type == "default") {
    out.type = "none";
    return absl::OkStatus();
  }
  if (type != "llama3" && type != "linear") {
    return Invalid(absl::StrCat("unsupported rope_scaling type '", type,
                                "' (supported: default, llama3, linear)"));
  }
  out.type = type;
  if (!scaling.contains("factor")) return Invalid("rope_scaling: missing 'factor'");
  RETURN_IF_ERROR(ReadDouble(scaling, "factor", out.factor));
  if (!(out.factor > 0)) return Invalid("rope_scaling: 'factor' must be positive");
  if (type == "llama3") {
    for (const char* key :
         {"low_freq_factor", "high_freq_factor", "original_max_position_embeddings"}) {
      if (!scaling.contains(key)) return Invalid(absl::StrCat("rope_scaling: missing '", key, "'"));
    }
    RETURN_IF_ERROR(ReadDouble(scaling, "low_freq_factor", out.low_freq_factor));
    RETURN_IF_ERROR(ReadDouble(scaling, "high_freq_factor", out.high_freq_factor));
    RETURN_IF_ERROR(
        ReadInt(scaling, "original_max_position_embeddings", out.original_max_position_embeddings));
    if (!(out.low_freq_factor > 0) || !(out.high_freq_factor > out.low_freq_factor)) {
      return Invalid("rope_scaling: need 0 < low_freq_factor < high_freq_factor");
    }
    if (out.original_max_position_embeddings <= 0) {
      return Invalid("rope_scaling: 'original_max_position_embeddings' must be positive");
    }
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<LlamaConfig> ParseLlamaConfig(std::string_view text) {
  Json root = Json::parse(text.begin(), text.end(), nullptr, /*allow_exceptions=*/false);
  if (root.is_discarded()) return Invalid("not valid JSON");
  if (!root.is_object()) return Invalid("top level must be a JSON object");

  LlamaConfig c;
  auto model_type = root.find("model_type");
  if (model_type == root.end() || !model_type->is_string()) {
    return Invalid("missing 'model_type' (expected llama, mistral, qwen2 or qwen3)");
  }
  c.model_type = model_type->get<std::string>();
  if (c.model_type != "llama" && c.model_type != "mistral" && c.model_type != "qwen2" &&
      c.model_type != "qwen3") {
    return Invalid(absl::StrCat("unsupported model_type '", c.model_type,
                                "' (supported: llama, mistral, qwen2, qwen3)"));
  }
  if (auto act = root.find("hidden_act"); act != root.end() && !act->is_null()) {
    if (!act->is_string() || act->get<std::string>() != "silu") {
      return Invalid(absl::StrCat("unsupported hidden_act ", act->dump(), " (only \"silu\")"));
    }
  }

  RETURN_IF_ERROR(ReadPositiveInt(root, "vocab_size", c.vocab_size));
  RETURN_IF_ERROR(ReadPositiveInt(root, "hidden_size", c.hidden_size));
  RETURN_IF_ERROR(ReadPositiveInt(root, "intermediate_size", c.intermediate_size));
  RETURN_IF_ERROR(ReadPositiveInt(root, "num_hidden_layers", c.num_hidden_layers));
  RETURN_IF_ERROR(ReadPositiveInt(root, "num_attention_heads", c.num_attention_heads));
  c.num_key_value_heads = c.num_attention_heads;
  RETURN_IF_ERROR(ReadInt(root, "num_key_value_heads", c.num_key_value_heads));
  if (c.num_key_value_heads <= 0) return Invalid("'num_key_value_heads' must be positive");
  if (c.num_attention_heads % c.num_key_value_heads != 0) {
    return Invalid(absl::StrCat("num_attention_heads (", c.num_attention_heads,
                                ") must be a multiple of num_key_value_heads (",
                                c.num_key_value_heads, ")"));
  }
  c.head_dim = 0;
  RETURN_IF_ERROR(ReadInt(root, "head_dim", c.head_dim));
  if (c.head_dim == 0) {
    if (c.hidden_size % c.num_attention_heads != 0) {
      return Invalid(absl::StrCat("hidden_size (", c.hidden_size,
                                  ") is not divisible by num_attention_heads (",
                                  c.num_attention_heads, ") and no head_dim is given"));
    }
    c.head_dim = c.hidden_size / c.num_attention_heads;
  }
  if (c.head_dim <= 0 || c.head_dim % 2 != 0) {
    return Invalid(absl::StrCat("head_dim must be positive and even (RoPE), got ", c.head_dim));
  }

  RETURN_IF_ERROR(ReadDouble(root, "rms_norm_eps", c.rms_norm_eps));
  if (!(c.rms_norm_eps > 0)) return Invalid("'rms_norm_eps' must be positive");
  RETURN_IF_ERROR(ReadInt(root, "max_position_embeddings", c.max_position_embeddings));
  if (c.max_position_embeddings <= 0) return Invalid("'max_position_embeddings' must be positive");

  // RoPE: transformers <= 4 writes rope_theta + rope_scaling; transformers 5 nests both in
  // rope_parameters.
  RETURN_IF_ERROR(ReadDouble(root, "rope_theta", c.rope_theta));
  if (auto it = root.find("rope_scaling"); it != root.end()) {
    RETURN_IF_ERROR(ReadRopeScaling(*it, c.rope_scaling));
  }
  if (auto it = root.find("rope_parameters"); it != root.end() && it->is_object()) {
    RETURN_IF_ERROR(ReadDouble(*it, "rope_theta", c.rope_theta));
    RETURN_IF_ERROR(ReadRopeScaling(*it, c.rope_scaling));
  }
  if (!(c.rope_theta > 0)) return Invalid("'rope_theta' must be positive");

  RETURN_IF_ERROR(ReadBool(root, "tie_word_embeddings", c.tie_word_embeddings));
  bool attention_bias = false;
  RETURN_IF_ERROR(ReadBool(root, "attention_bias", attention_bias));
  bool mlp_bias = false;
  RETURN_IF_ERROR(ReadBool(root, "mlp_bias", mlp_bias));
  if (mlp_bias) return Invalid("mlp_bias=true is not supported");
  if (c.model_type == "qwen2") {
    c.attention_bias = true;  // Qwen2 always has q/k/v biases and no o_proj bias
    bool sliding = false;
    RETURN_IF_ERROR(ReadBool(root, "use_sliding_window", sliding));
    if (sliding) return Invalid("use_sliding_window=true is not supported");
  } else {
    c.attention_bias = attention_bias;
    c.o_proj_bias = attention_bias;
  }
  c.qk_norm = c.model_type == "qwen3";

  if (auto it = root.find("bos_token_id"); it != root.end() && !it->is_null()) {
    RETURN_IF_ERROR(ReadInt(root, "bos_token_id", c.bos_token_id));
    if (c.bos_token_id < 0 || c.bos_token_id >= c.vocab_size) {
      return Invalid(absl::StrCat("bos_token_id ", c.bos_token_id, " outside the vocabulary"));
    }
  }
  if (auto it = root.find("eos_token_id"); it != root.end() && !it->is_null()) {
    std::vector<Json> items =
        it->is_array() ? it->get<std::vector<Json>>() : std::vector<Json>{*it};
    for (const Json& item : items) {
      if (!item.is_number_integer()) {
        return Invalid(absl::StrCat("eos_token_id must be an integer or a list of integers, got ",
                                    it->dump()));
      }
      int64_t id = item.get<int64_t>();
      if (id < 0 || id >= c.vocab_size) {
        return Invalid(absl::StrCat("eos_token_id ", id, " outside the vocabulary"));
      }
      c.eos_token_ids.push_back(static_cast<int>(id));
    }
  }
  for (const char* key : {"torch_dtype", "dtype"}) {
    if (auto it = root.find(key); it != root.end() && it->is_string()) {
      c.torch_dtype = it->get<std::string>();
      break;
    }
  }
  return c;
}

absl::StatusOr<LlamaConfig> LoadLlamaConfig(const std::string& path) {
  std::ifstream file(path, std::ios::binary);
  if (!file) return absl::NotFoundError(absl::StrCat("cannot open ", path));
  std::stringstream buffer;
  buffer << file.rdbuf();
  absl::StatusOr<LlamaConfig> config = ParseLlamaConfig(buffer.str());
  if (!config.ok()) {
    std::string message(config.status().message());
    if (message.rfind("config.json: ", 0) == 0) message = message.substr(13);
    return absl::Status(config.status().code(), absl::StrCat(path, ": ", message));
  }
  return config;
}

std::vector<double> RopeInverseFrequencies(const LlamaConfig& config) {
  const int half = config.head_dim / 2;
  std::vector<double> inv_freq(half);
  for (int i = 0; i < half; ++i) {
    inv_freq[i] = 1.0 / std::pow(config.rope_theta, 2.0 * i / config.head_dim);
  }
  const RopeScaling& s = config.rope_scaling;
  if (s.type == "linear") {
    for (double& f : inv_freq) f /= s.factor;
  } else if (s.type == "llama3") {
    const double old_context = static_cast<double>(s.original_max_position_embeddings);
    const double low_freq_wavelen = old_context / s.low_freq_factor;
    const double high_freq_wavelen = old_context / s.high_freq_factor;
    for (double& f : inv_freq) {
      const double wavelen = 2 * std::numbers::pi / f;
      if (wavelen > low_freq_wavelen) {
        f /= s.factor;  // long wavelengths: interpolate
      } else if (wavelen >= high_freq_wavelen) {
        const double smooth =
            (old_context / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor);
        f = (1 - smooth) * f / s.factor + smooth * f;
      }  // short wavelengths: unchanged
    }
  }
  return inv_freq;
}

}  // namespace kvgate::worker
