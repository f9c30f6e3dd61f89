// config.json parsing and validation (ParseLlamaConfig / LoadLlamaConfig) and the RoPE frequencies.

#include <cmath>
#include <filesystem>
#include <fstream>
#include <numbers>
#include <string>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "workers/model/llama_config.h"

namespace kvgate::worker {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;

// Llama-3.1-8B's config.json (abridged to the fields that matter).
constexpr char kLlama31[] = R"({
  "architectures": ["LlamaForCausalLM"], "attention_bias": false, "bos_token_id": 128000,
  "eos_token_id": [128001, 128008, 128009], "hidden_act": "silu", "hidden_size": 4096,
  "intermediate_size": 14336, "max_position_embeddings": 131072, "mlp_bias": false,
  "model_type": "llama", "num_attention_heads": 32, "num_hidden_layers": 32,
  "num_key_value_heads": 8, "rms_norm_eps": 1e-05,
  "rope_scaling": {"factor": 8.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                   "original_max_position_embeddings": 8192, "rope_type": "llama3"},
  "rope_theta": 500000.0, "tie_word_embeddings": false, "torch_dtype": "bfloat16",
  "vocab_size": 128256})";

nlohmann::json Llama() { return nlohmann::json::parse(kLlama31); }

absl::Status ParseError(const nlohmann::json& j) { return ParseLlamaConfig(j.dump()).status(); }

TEST(LlamaConfigTest, ParsesLlama31) {
  auto c = ParseLlamaConfig(kLlama31);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->model_type, "llama");
  EXPECT_EQ(c->vocab_size, 128256);
  EXPECT_EQ(c->hidden_size, 4096);
  EXPECT_EQ(c->intermediate_size, 14336);
  EXPECT_EQ(c->num_hidden_layers, 32);
  EXPECT_EQ(c->num_attention_heads, 32);
  EXPECT_EQ(c->num_key_value_heads, 8);
  EXPECT_EQ(c->head_dim, 128);  // derived
  EXPECT_DOUBLE_EQ(c->rms_norm_eps, 1e-5);
  EXPECT_DOUBLE_EQ(c->rope_theta, 500000.0);
  EXPECT_EQ(c->rope_scaling.type, "llama3");
  EXPECT_DOUBLE_EQ(c->rope_scaling.factor, 8.0);
  EXPECT_DOUBLE_EQ(c->rope_scaling.low_freq_factor, 1.0);
  EXPECT_DOUBLE_EQ(c->rope_scaling.high_freq_factor, 4.0);
  EXPECT_EQ(c->rope_scaling.original_max_position_embeddings, 8192);
  EXPECT_EQ(c->max_position_embeddings, 131072);
  EXPECT_FALSE(c->tie_word_embeddings);
  EXPECT_FALSE(c->attention_bias);
  EXPECT_FALSE(c->o_proj_bias);
  EXPECT_FALSE(c->qk_norm);
  EXPECT_EQ(c->bos_token_id, 128000);
  EXPECT_THAT(c->eos_token_ids, ElementsAre(128001, 128008, 128009));
  EXPECT_EQ(c->torch_dtype, "bfloat16");
}

TEST(LlamaConfigTest, SingleEosDefaultsAndNullScaling) {
  auto j = Llama();
  j["eos_token_id"] = 128001;
  j["rope_scaling"] = nullptr;
  j.erase("num_key_value_heads");
  j.erase("tie_word_embeddings");
  auto c = ParseLlamaConfig(j.dump());
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_THAT(c->eos_token_ids, ElementsAre(128001));
  EXPECT_EQ(c->rope_scaling.type, "none");
  EXPECT_EQ(c->num_key_value_heads, 32);  // MHA when absent
  EXPECT_FALSE(c->tie_word_embeddings);
}

TEST(LlamaConfigTest, Qwen2HasQkvBiasesAndTiedEmbeddings) {
  // Qwen2.5-0.5B: no attention_bias field, biases implied by the model type.
  auto c = ParseLlamaConfig(R"({"model_type": "qwen2", "vocab_size": 151936, "hidden_size": 896,
      "intermediate_size": 4864, "num_hidden_layers": 24, "num_attention_heads": 14,
      "num_key_value_heads": 2, "rope_theta": 1000000.0, "rms_norm_eps": 1e-06,
      "tie_word_embeddings": true, "use_sliding_window": false, "sliding_window": 32768,
      "bos_token_id": 151643, "eos_token_id": 151643, "max_position_embeddings": 32768,
      "hidden_act": "silu", "torch_dtype": "bfloat16"})");
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_TRUE(c->attention_bias);
  EXPECT_FALSE(c->o_proj_bias);
  EXPECT_FALSE(c->qk_norm);
  EXPECT_TRUE(c->tie_word_embeddings);
  EXPECT_EQ(c->head_dim, 64);
}

TEST(LlamaConfigTest, Qwen3HasQkNormAndExplicitHeadDim) {
  // Qwen3-4B: head_dim 128 although hidden_size / heads = 80.
  auto c = ParseLlamaConfig(R"({"model_type": "qwen3", "vocab_size": 151936, "hidden_size": 2560,
      "intermediate_size": 9728, "num_hidden_layers": 36, "num_attention_heads": 32,
      "num_key_value_heads": 8, "head_dim": 128, "attention_bias": false,
      "rope_theta": 1000000, "rms_norm_eps": 1e-06, "tie_word_embeddings": true,
      "rope_scaling": null, "eos_token_id": 151645, "max_position_embeddings": 40960})");
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_TRUE(c->qk_norm);
  EXPECT_FALSE(c->attention_bias);
  EXPECT_EQ(c->head_dim, 128);
  EXPECT_DOUBLE_EQ(c->rope_theta, 1e6);
}

TEST(LlamaConfigTest, LlamaAttentionBiasCoversOutputProjection) {
  auto j = Llama();
  j["attention_bias"] = true;
  auto c = ParseLlamaConfig(j.dump());
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_TRUE(c->attention_bias);
  EXPECT_TRUE(c->o_proj_bias);
}

TEST(LlamaConfigTest, Transformers5RopeParameters) {
  auto j = Llama();
  j.erase("rope_theta");
  j.erase("rope_scaling");
  j["rope_parameters"] = {{"rope_type", "llama3"},   {"rope_theta", 500000.0},
                          {"factor", 32.0},          {"low_freq_factor", 1.0},
                          {"high_freq_factor", 4.0}, {"original_max_position_embeddings", 8192}};
  auto c = ParseLlamaConfig(j.dump());
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_DOUBLE_EQ(c->rope_theta, 500000.0);
  EXPECT_EQ(c->rope_scaling.type, "llama3");
  EXPECT_DOUBLE_EQ(c->rope_scaling.factor, 32.0);
}

struct BadCase {
  const char* name;
  std::function<void(nlohmann::json&)> edit;
  const char* message;
};

TEST(LlamaConfigTest, InvalidConfigsNameTheProblem) {
  const BadCase cases[] = {
      {"missing vocab", [](auto& j) { j.erase("vocab_size"); },
       "missing required field 'vocab_size'"},
      {"zero hidden", [](auto& j) { j["hidden_size"] = 0; }, "'hidden_size' must be positive"},
      {"negative layers", [](auto& j) { j["num_hidden_layers"] = -2; }, "'num_hidden_layers'"},
      {"string size", [](auto& j) { j["intermediate_size"] = "big"; }, "must be an integer"},
      {"fractional size", [](auto& j) { j["hidden_size"] = 4096.5; }, "must be an integer"},
      {"heads do not divide hidden",
       [](auto& j) {
         j["num_attention_heads"] = 30;
         j["num_key_value_heads"] = 10;
       },
       "not divisible by num_attention_heads"},
      {"kv heads do not divide heads", [](auto& j) { j["num_key_value_heads"] = 5; },
       "must be a multiple of num_key_value_heads"},
      {"odd head_dim", [](auto& j) { j["head_dim"] = 65; }, "head_dim must be positive and even"},
      {"model type", [](auto& j) { j["model_type"] = "gpt2"; }, "unsupported model_type 'gpt2'"},
      {"no model type", [](auto& j) { j.erase("model_type"); }, "missing 'model_type'"},
      {"activation", [](auto& j) { j["hidden_act"] = "gelu"; }, "unsupported hidden_act"},
      {"yarn",
       [](auto& j) {
         j["rope_scaling"] = {{"rope_type", "yarn"}, {"factor", 4.0}};
       },
       "unsupported rope_scaling type 'yarn'"},
      {"llama3 incomplete", [](auto& j) { j["rope_scaling"].erase("low_freq_factor"); },
       "rope_scaling: missing 'low_freq_factor'"},
      {"llama3 factors", [](auto& j) { j["rope_scaling"]["high_freq_factor"] = 0.5; },
       "low_freq_factor < high_freq_factor"},
      {"rope theta", [](auto& j) { j["rope_theta"] = -1; }, "'rope_theta' must be positive"},
      {"eps", [](auto& j) { j["rms_norm_eps"] = 0; }, "'rms_norm_eps' must be positive"},
      {"eos outside",
       [](auto& j) {
         j["eos_token_id"] = {1, 200000};
       },
       "eos_token_id 200000 outside the vocabulary"},
      {"eos type", [](auto& j) { j["eos_token_id"] = "</s>"; }, "eos_token_id must be an integer"},
      {"bos outside", [](auto& j) { j["bos_token_id"] = -3; }, "bos_token_id -3 outside"},
      {"tie type", [](auto& j) { j["tie_word_embeddings"] = "yes"; }, "must be true or false"},
      {"mlp bias", [](auto& j) { j["mlp_bias"] = true; }, "mlp_bias=true is not supported"},
      {"huge", [](auto& j) { j["hidden_size"] = 1e12; }, "out of range"},
  };
  for (const BadCase& c : cases) {
    auto j = Llama();
    c.edit(j);
    absl::Status status = ParseError(j);
    EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument) << c.name;
    EXPECT_THAT(status.message(), HasSubstr(c.message)) << c.name << ": " << status;
  }
}

TEST(LlamaConfigTest, NotJsonOrNotAnObject) {
  for (const char* text : {"", "{", "{\"model_type\": \"llama\",}", "[1, 2]", "null", "\xff\xfe"}) {
    auto c = ParseLlamaConfig(text);
    EXPECT_EQ(c.status().code(), absl::StatusCode::kInvalidArgument) << text;
  }
}

TEST(LlamaConfigTest, LoadNamesTheFile) {
  const std::string dir = ::testing::TempDir();
  const std::string path = dir + "/kvgate_bad_config.json";
  std::ofstream(path) << R"({"model_type": "llama", "vocab_size": 10})";
  auto c = LoadLlamaConfig(path);
  EXPECT_EQ(c.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(c.status().message(), HasSubstr(path + ": missing required field 'hidden_size'"));

  auto missing = LoadLlamaConfig(dir + "/no_such_config.json");
  EXPECT_EQ(missing.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(missing.status().message(), HasSubstr("no_such_config.json"));
}

TEST(RopeTest, PlainFrequenciesAreThetaPowers) {
  auto c = ParseLlamaConfig(Llama().dump());
  ASSERT_TRUE(c.ok());
  c->rope_scaling.type = "none";
  std::vector<double> f = RopeInverseFrequencies(*c);
  ASSERT_EQ(f.size(), 64u);
  EXPECT_DOUBLE_EQ(f[0], 1.0);
  EXPECT_NEAR(f[1], std::pow(500000.0, -2.0 / 128), 1e-15);
  EXPECT_NEAR(f[63], std::pow(500000.0, -126.0 / 128), 1e-18);
}

// Llama-3 scaling: wavelengths below original/high_freq_factor keep their frequency, those above
// original/low_freq_factor are divided by factor, the band between interpolates smoothly.
TEST(RopeTest, Llama3ScalingBands) {
  auto c = ParseLlamaConfig(kLlama31);
  ASSERT_TRUE(c.ok());
  std::vector<double> scaled = RopeInverseFrequencies(*c);
  LlamaConfig plain_config = *c;
  plain_config.rope_scaling.type = "none";
  std::vector<double> plain = RopeInverseFrequencies(plain_config);
  int kept = 0, divided = 0, between = 0;
  for (size_t i = 0; i < plain.size(); ++i) {
    const double wavelen = 2 * std::numbers::pi / plain[i];
    if (wavelen < 8192.0 / 4) {
      EXPECT_DOUBLE_EQ(scaled[i], plain[i]) << i;
      ++kept;
    } else if (wavelen > 8192.0) {
      EXPECT_DOUBLE_EQ(scaled[i], plain[i] / 8) << i;
      ++divided;
    } else {
      EXPECT_LT(scaled[i], plain[i]) << i;
      EXPECT_GT(scaled[i], plain[i] / 8) << i;
      ++between;
    }
    if (i > 0) {
      EXPECT_LT(scaled[i], scaled[i - 1]);
    }
  }
  EXPECT_GT(kept, 0);
  EXPECT_GT(divided, 0);
  EXPECT_GT(between, 0);
  // At the band edges the interpolation meets the outer bands: smooth = (8192 / wavelen - 1) / 3.
  for (size_t i = 0; i < plain.size(); ++i) {
    const double wavelen = 2 * std::numbers::pi / plain[i];
    if (wavelen >= 2048 && wavelen <= 8192) {
      const double smooth = (8192 / wavelen - 1) / 3;
      EXPECT_NEAR(scaled[i], (1 - smooth) * plain[i] / 8 + smooth * plain[i], 1e-15);
    }
  }
}

TEST(RopeTest, LinearScalingDividesEveryFrequency) {
  auto j = Llama();
  j["rope_scaling"] = {{"type", "linear"}, {"factor", 2.0}};
  auto c = ParseLlamaConfig(j.dump());
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->rope_scaling.type, "linear");
  std::vector<double> f = RopeInverseFrequencies(*c);
  EXPECT_DOUBLE_EQ(f[0], 0.5);
  EXPECT_NEAR(f[10], std::pow(500000.0, -20.0 / 128) / 2, 1e-15);
}

}  // namespace
}  // namespace kvgate::worker
