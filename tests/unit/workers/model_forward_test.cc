// The CPU Llama forward against golden logits from tools/reference_forward.py (an independent NumPy
// float64 implementation of the Hugging Face forward), for the generated tiny models: Llama (GQA
// 4/2, untied, Llama-3 RoPE scaling; bf16 file, and the same weights as sharded f32 files), Qwen2
// (q/k/v biases, tied embeddings, MHA) and Qwen3 (QK-norm, GQA 4/1).
//
// Tolerance: max |logit - golden| / max |golden| per row < 1e-4 whenever attention reads float32
// keys/values (whole-prompt prefill; every path with the exact F32 test cache). Through the CPU
// reference cache in fp16, decode and later prefill chunks read the cached prefix rounded to fp16
// (relative rounding 2^-11), so those rows are held to kFp16CacheTolerance.

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <functional>
#include <memory>
#include <ostream>
#include <string>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "kvgate/kernels/kv_format.h"
#include "nlohmann/json.hpp"
#include "tests/unit/workers/model_test_util.h"
#include "workers/backend/cpu_model_runner.h"
#include "workers/backend/model_runner.h"

namespace kvgate::worker {
namespace {

using testing::F32KvCache;
using testing::Golden;
using ::testing::HasSubstr;
using testing::LoadGolden;
using testing::MakeF32KvCache;
using testing::RelativeError;
using testing::TinyModelDir;

constexpr double kTolerance = 1e-4;
constexpr double kFp16CacheTolerance = 2e-3;  // measured up to 2.8e-4

struct Case {
  std::string model;   // generated folder
  std::string golden;  // golden file
  bool fp16_cache;     // CPU reference KvCache in fp16 instead of the exact F32 test cache
};

void PrintTo(const Case& c, std::ostream* os) {
  *os << c.model << (c.fp16_cache ? " with the fp16 CPU cache" : " with the F32 test cache");
}

std::string CaseName(const ::testing::TestParamInfo<Case>& info) {
  return info.param.model + (info.param.fp16_cache ? "_fp16_cache" : "_f32_cache");
}

class ModelForwardTest : public ::testing::TestWithParam<Case> {
 protected:
  void SetUp() override {
    const std::string dir = TinyModelDir(GetParam().model);
    if (dir.empty()) {
      GTEST_SKIP() << "tiny model '" << GetParam().model
                   << "' was not generated (the build needs /usr/bin/python3 with NumPy)";
    }
    golden_ = LoadGolden(GetParam().golden);
    RunnerOptions options;
    options.model_dir = dir;
    options.kv_block_size = 16;
    options.kv_num_blocks = 64;
    auto runner = GetParam().fp16_cache ? CreateCpuModelRunner(options)
                                        : CreateCpuModelRunnerWithCache(options, MakeF32KvCache);
    ASSERT_TRUE(runner.ok()) << runner.status();
    runner_ = std::move(*runner);
    vocab_ = runner_->config().vocab_size;
  }

  // Checks `logits` rows (one per position first_position...) against the golden rows of `prompt`
  // that fall in that range; returns how many were checked.
  int Check(int prompt, int first_position, int count, const std::vector<float>& logits,
            double tolerance) {
    int checked = 0;
    for (const testing::GoldenRow& row : golden_.rows) {
      if (row.prompt != prompt || row.position < first_position ||
          row.position >= first_position + count) {
        continue;
      }
      const float* got = logits.data() + int64_t{row.position - first_position} * vocab_;
      const double error = RelativeError(got, row.logits);
      (tolerance == kTolerance ? max_fresh_error_ : max_cached_error_) =
          std::max(error, tolerance == kTolerance ? max_fresh_error_ : max_cached_error_);
      EXPECT_LT(error, tolerance) << "prompt " << prompt << " position " << row.position;
      ++checked;
    }
    return checked;
  }

  void TearDown() override {
    std::printf("max relative error %.3g (bound %.0e)", max_fresh_error_, kTolerance);
    if (GetParam().fp16_cache) {
      std::printf("; rows reading the fp16 cache %.3g (bound %.0e)", max_cached_error_,
                  kFp16CacheTolerance);
    }
    std::printf("\n");
  }

  double ReadTolerance() const { return GetParam().fp16_cache ? kFp16CacheTolerance : kTolerance; }

  Golden golden_;
  std::unique_ptr<ModelRunner> runner_;
  int vocab_ = 0;
  double max_fresh_error_ = 0;   // rows held to kTolerance
  double max_cached_error_ = 0;  // rows held to ReadTolerance()
};

TEST_P(ModelForwardTest, WholePromptPrefillMatchesGolden) {
  int checked = 0;
  for (size_t p = 0; p < golden_.prompts.size(); ++p) {
    const std::vector<int32_t>& ids = golden_.prompts[p];
    ASSERT_TRUE(runner_->kv_cache().AddSequence(p, ids.size()).ok());
    ForwardChunk chunk{.seq = static_cast<kernels::SeqId>(p), .tokens = ids, .all_logits = true};
    std::vector<float> logits(ids.size() * vocab_);
    ASSERT_TRUE(runner_->Forward({&chunk, 1}, logits.data()).ok());
    checked += Check(p, 0, ids.size(), logits, kTolerance);
    EXPECT_EQ(runner_->kv_cache().Length(p, 0), static_cast<int64_t>(ids.size()));
    EXPECT_EQ(runner_->kv_cache().Length(p, runner_->config().num_hidden_layers - 1),
              static_cast<int64_t>(ids.size()));
  }
  EXPECT_EQ(checked, static_cast<int>(golden_.rows.size()));
}

TEST_P(ModelForwardTest, LastTokenLogitsOnlyWhenNotAllLogits) {
  const std::vector<int32_t>& ids = golden_.prompts.back();
  ASSERT_TRUE(runner_->kv_cache().AddSequence(7, ids.size()).ok());
  ForwardChunk chunk{.seq = 7, .tokens = ids};
  // One row written; a sentinel row after it must stay untouched.
  std::vector<float> logits(2 * vocab_, 12345.0f);
  ASSERT_TRUE(runner_->Forward({&chunk, 1}, logits.data()).ok());
  EXPECT_EQ(Check(golden_.prompts.size() - 1, ids.size() - 1, 1, logits, kTolerance), 1);
  EXPECT_EQ(logits[vocab_], 12345.0f);
  EXPECT_EQ(logits.back(), 12345.0f);
}

TEST_P(ModelForwardTest, TokenByTokenDecodeMatchesGolden) {
  int checked = 0;
  for (size_t p = 0; p < golden_.prompts.size(); ++p) {
    const std::vector<int32_t>& ids = golden_.prompts[p];
    const kernels::SeqId seq = 100 + p;
    const size_t prefix = std::min<size_t>(ids.size(), 3);
    ASSERT_TRUE(runner_->kv_cache().AddSequence(seq, prefix).ok());
    ForwardChunk first{.seq = seq, .tokens = {ids.data(), prefix}, .all_logits = true};
    std::vector<float> logits(ids.size() * vocab_);
    ASSERT_TRUE(runner_->Forward({&first, 1}, logits.data()).ok());
    for (size_t i = prefix; i < ids.size(); ++i) {
      ASSERT_TRUE(runner_->kv_cache().Reserve(seq, i + 1).ok());
      ForwardChunk step{.seq = seq, .tokens = {ids.data() + i, 1}};
      ASSERT_TRUE(runner_->Forward({&step, 1}, logits.data() + i * vocab_).ok());
    }
    checked += Check(p, 0, prefix, logits, kTolerance);
    checked +=
        Check(p, prefix, ids.size() - prefix,
              std::vector<float>(logits.begin() + prefix * vocab_, logits.end()), ReadTolerance());
  }
  EXPECT_EQ(checked, static_cast<int>(golden_.rows.size()));
  if (!GetParam().fp16_cache) {
    // Single-token steps after a prefix go through DecodeAttention.
    auto& cache = static_cast<F32KvCache&>(runner_->kv_cache());
    EXPECT_GT(cache.decode_calls, 0);
  }
}

TEST_P(ModelForwardTest, TwoChunkPrefillMatchesGolden) {
  int checked = 0;
  for (size_t p = 0; p < golden_.prompts.size(); ++p) {
    const std::vector<int32_t>& ids = golden_.prompts[p];
    if (ids.size() < 2) continue;
    const kernels::SeqId seq = 200 + p;
    const size_t split = ids.size() / 3 + 1;
    ASSERT_TRUE(runner_->kv_cache().AddSequence(seq, ids.size()).ok());
    std::vector<float> logits(ids.size() * vocab_);
    ForwardChunk first{.seq = seq, .tokens = {ids.data(), split}, .all_logits = true};
    ASSERT_TRUE(runner_->Forward({&first, 1}, logits.data()).ok());
    ForwardChunk second{
        .seq = seq, .tokens = {ids.data() + split, ids.size() - split}, .all_logits = true};
    ASSERT_TRUE(runner_->Forward({&second, 1}, logits.data() + split * vocab_).ok());
    checked += Check(p, 0, split, logits, kTolerance);
    checked +=
        Check(p, split, ids.size() - split,
              std::vector<float>(logits.begin() + split * vocab_, logits.end()), ReadTolerance());
  }
  EXPECT_GT(checked, 10);
}

// One step mixing prefill chunks of several sequences and a decode token: rows come back in chunk
// order and each matches its own sequence's golden.
TEST_P(ModelForwardTest, BatchedStepOfSeveralSequencesMatchesGolden) {
  const auto& prompts = golden_.prompts;
  ASSERT_GE(prompts.size(), 4u);
  // Step 1: prompt 1 whole; prompt 2 and 3 up to their second-to-last token.
  for (kernels::SeqId s = 1; s <= 3; ++s) {
    ASSERT_TRUE(runner_->kv_cache().AddSequence(s, prompts[s].size()).ok());
  }
  const size_t n2 = prompts[2].size() - 1, n3 = prompts[3].size() - 1;
  std::vector<ForwardChunk> step1 = {
      {.seq = 1, .tokens = prompts[1], .all_logits = true},
      {.seq = 2, .tokens = {prompts[2].data(), n2}, .all_logits = true},
      {.seq = 3, .tokens = {prompts[3].data(), n3}}};
  std::vector<float> logits((prompts[1].size() + n2 + 1) * vocab_);
  ASSERT_TRUE(runner_->Forward(step1, logits.data()).ok());
  int checked = Check(1, 0, prompts[1].size(), logits, kTolerance);
  checked +=
      Check(2, 0, n2, std::vector<float>(logits.begin() + prompts[1].size() * vocab_, logits.end()),
            kTolerance);
  checked +=
      Check(3, n3 - 1, 1, std::vector<float>(logits.end() - vocab_, logits.end()), kTolerance);
  // Step 2: the last token of prompts 2 and 3 (decode) and prompt 0 (a fresh one-token prefill).
  ASSERT_TRUE(runner_->kv_cache().AddSequence(0, prompts[0].size()).ok());
  std::vector<ForwardChunk> step2 = {{.seq = 2, .tokens = {prompts[2].data() + n2, 1}},
                                     {.seq = 0, .tokens = prompts[0]},
                                     {.seq = 3, .tokens = {prompts[3].data() + n3, 1}}};
  std::vector<float> step2_logits(3 * vocab_);
  ASSERT_TRUE(runner_->Forward(step2, step2_logits.data()).ok());
  auto row = [&](int i) {
    return std::vector<float>(step2_logits.begin() + i * vocab_,
                              step2_logits.begin() + (i + 1) * vocab_);
  };
  checked += Check(2, n2, 1, row(0), ReadTolerance());
  checked += Check(0, prompts[0].size() - 1, 1, row(1), kTolerance);
  checked += Check(3, n3, 1, row(2), ReadTolerance());
  EXPECT_GE(checked, 8);
}

const Case kCases[] = {
    {"llama", "llama", false}, {"llama_f32_sharded", "llama", false},
    {"qwen2", "qwen2", false}, {"qwen3", "qwen3", false},
    {"llama", "llama", true},  {"qwen3", "qwen3", true},
};
INSTANTIATE_TEST_SUITE_P(TinyModels, ModelForwardTest, ::testing::ValuesIn(kCases), CaseName);

// Every KV format the worker can be started with runs the tiny model end to end (prefill, then
// decode through the format). Lossy formats are not held to the golden here (kernels/ tests bound
// their error); the figures are printed. 16-bit formats must stay within kFp16CacheTolerance.
TEST(ModelKvFormatsTest, EveryFormatRunsPrefillAndDecode) {
  const std::string dir = TinyModelDir("llama");
  if (dir.empty()) GTEST_SKIP() << "tiny model was not generated (no NumPy)";
  const Golden golden = LoadGolden("llama");
  const std::vector<int32_t>& ids = golden.prompts.back();
  for (const char* name :
       {"fp16", "bf16", "fp8", "int8", "kivi4", "kivi2", "tq4", "tq3", "tq2.5"}) {
    auto format = kernels::ParseKvFormat(name);
    ASSERT_TRUE(format.ok()) << name << ": " << format.status();
    RunnerOptions options;
    options.model_dir = dir;
    options.kv_format = *format;
    options.kv_num_blocks = 16;
    auto runner = CreateCpuModelRunner(options);
    ASSERT_TRUE(runner.ok()) << name << ": " << runner.status();
    const int vocab = (*runner)->config().vocab_size;
    ASSERT_TRUE((*runner)->kv_cache().AddSequence(1, ids.size()).ok());
    std::vector<float> logits(ids.size() * vocab);
    const size_t prefix = 8;
    ForwardChunk first{.seq = 1, .tokens = {ids.data(), prefix}, .all_logits = true};
    ASSERT_TRUE((*runner)->Forward({&first, 1}, logits.data()).ok()) << name;
    for (size_t i = prefix; i < ids.size(); ++i) {
      ForwardChunk step{.seq = 1, .tokens = {ids.data() + i, 1}};
      absl::Status status = (*runner)->Forward({&step, 1}, logits.data() + i * vocab);
      ASSERT_TRUE(status.ok()) << name << " at " << i << ": " << status;
    }
    double worst = 0;
    int same_top1 = 0, rows = 0;
    for (const testing::GoldenRow& row : golden.rows) {
      if (row.prompt != static_cast<int>(golden.prompts.size()) - 1) continue;
      const float* got = logits.data() + int64_t{row.position} * vocab;
      for (int j = 0; j < vocab; ++j) ASSERT_TRUE(std::isfinite(got[j])) << name;
      worst = std::max(worst, RelativeError(got, row.logits));
      same_top1 += std::max_element(got, got + vocab) - got ==
                   std::max_element(row.logits.begin(), row.logits.end()) - row.logits.begin();
      ++rows;
    }
    std::printf("%-6s max relative logit error %.3g, top-1 agrees on %d/%d golden rows\n", name,
                worst, same_top1, rows);
    if (std::string(name) == "fp16" || std::string(name) == "bf16") {
      // bf16 keeps 8 mantissa bits to fp16's 11: measured 8.7e-4 vs 1.1e-4.
      EXPECT_LT(worst, std::string(name) == "fp16" ? kFp16CacheTolerance : 1e-2) << name;
    }
  }
}

// ---- Errors
// --------------------------------------------------------------------------------------

class ModelForwardErrorTest : public ::testing::Test {
 protected:
  void SetUp() override {
    const std::string dir = TinyModelDir("llama");
    if (dir.empty()) GTEST_SKIP() << "tiny model was not generated (no NumPy)";
    RunnerOptions options;
    options.model_dir = dir;
    options.kv_num_blocks = 8;
    auto runner = CreateCpuModelRunnerWithCache(options, MakeF32KvCache);
    ASSERT_TRUE(runner.ok()) << runner.status();
    runner_ = std::move(*runner);
  }
  std::unique_ptr<ModelRunner> runner_;
};

TEST_F(ModelForwardErrorTest, TokenOutsideVocabularyIsRejectedBeforeTouchingTheCache) {
  ASSERT_TRUE(runner_->kv_cache().AddSequence(1, 4).ok());
  ASSERT_TRUE(runner_->kv_cache().AddSequence(2, 4).ok());
  const int vocab = runner_->config().vocab_size;
  std::vector<int32_t> good = {1, 2, 3};
  for (int32_t bad_id : {vocab, -1, 1 << 30}) {
    std::vector<int32_t> bad = {5, bad_id};
    std::vector<ForwardChunk> chunks = {{.seq = 1, .tokens = good}, {.seq = 2, .tokens = bad}};
    std::vector<float> logits(2 * vocab);
    absl::Status status = runner_->Forward(chunks, logits.data());
    EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(status.message(), HasSubstr("outside the vocabulary"));
    EXPECT_EQ(runner_->kv_cache().Length(1, 0), 0);  // no chunk of the step ran
    EXPECT_EQ(runner_->kv_cache().Length(2, 0), 0);
  }
}

TEST_F(ModelForwardErrorTest, UnknownDuplicateOrEmptyChunksAreRejected) {
  std::vector<int32_t> ids = {1, 2};
  std::vector<float> logits(2 * runner_->config().vocab_size);
  ForwardChunk unknown{.seq = 99, .tokens = ids};
  EXPECT_EQ(runner_->Forward({&unknown, 1}, logits.data()).code(),
            absl::StatusCode::kInvalidArgument);
  ASSERT_TRUE(runner_->kv_cache().AddSequence(1, 4).ok());
  std::vector<ForwardChunk> twice = {{.seq = 1, .tokens = ids}, {.seq = 1, .tokens = ids}};
  EXPECT_EQ(runner_->Forward(twice, logits.data()).code(), absl::StatusCode::kInvalidArgument);
  ForwardChunk empty;
  empty.seq = 1;
  EXPECT_EQ(runner_->Forward({&empty, 1}, logits.data()).code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(runner_->kv_cache().Length(1, 0), 0);
}

TEST_F(ModelForwardErrorTest, PositionsBeyondMaxPositionEmbeddingsAreRejected) {
  const int64_t max_positions = runner_->config().max_position_embeddings;
  ASSERT_TRUE(runner_->kv_cache().AddSequence(1, 1).ok());
  std::vector<int32_t> ids(max_positions + 1, 1);
  ForwardChunk chunk{.seq = 1, .tokens = ids};
  std::vector<float> logits(runner_->config().vocab_size);
  absl::Status status = runner_->Forward({&chunk, 1}, logits.data());
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(status.message(), HasSubstr("max_position_embeddings"));
}

TEST_F(ModelForwardErrorTest, AppendBeyondReservedBlocksFailsCleanly) {
  ASSERT_TRUE(runner_->kv_cache().AddSequence(1, 1).ok());  // one block of 16 tokens
  std::vector<int32_t> ids(20, 3);
  ForwardChunk chunk{.seq = 1, .tokens = ids};
  std::vector<float> logits(runner_->config().vocab_size);
  EXPECT_FALSE(runner_->Forward({&chunk, 1}, logits.data()).ok());
}

// ---- Loading
// -------------------------------------------------------------------------------------

// Copies a generated model folder to a fresh temporary one and rewrites config.json through `edit`.
std::string CopyWithConfig(const std::string& from, const std::string& name,
                           const std::function<void(nlohmann::json&)>& edit) {
  namespace fs = std::filesystem;
  const fs::path to = fs::path(::testing::TempDir()) / ("kvgate_model_" + name);
  fs::remove_all(to);
  fs::copy(from, to, fs::copy_options::recursive);
  std::ifstream in(to / "config.json");
  nlohmann::json config = nlohmann::json::parse(in);
  edit(config);
  std::ofstream(to / "config.json") << config.dump(2);
  return to.string();
}

TEST(ModelLoadTest, TiedModelNeedsNoLmHeadButUntiedDoes) {
  const std::string dir = TinyModelDir("qwen2");
  if (dir.empty()) GTEST_SKIP() << "tiny model was not generated (no NumPy)";
  RunnerOptions options;
  options.model_dir = dir;
  options.kv_num_blocks = 4;
  auto tied = CreateCpuModelRunnerWithCache(options, MakeF32KvCache);
  ASSERT_TRUE(tied.ok()) << tied.status();
  EXPECT_TRUE((*tied)->config().tie_word_embeddings);

  options.model_dir =
      CopyWithConfig(dir, "untied", [](nlohmann::json& c) { c["tie_word_embeddings"] = false; });
  auto untied = CreateCpuModelRunnerWithCache(options, MakeF32KvCache);
  EXPECT_EQ(untied.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(untied.status().message(), HasSubstr("missing tensor 'lm_head.weight'"));
}

TEST(ModelLoadTest, ConfigThatDisagreesWithTheWeightsNamesTheTensor) {
  const std::string dir = TinyModelDir("llama");
  if (dir.empty()) GTEST_SKIP() << "tiny model was not generated (no NumPy)";
  RunnerOptions options;
  options.kv_num_blocks = 4;
  options.model_dir =
      CopyWithConfig(dir, "wrong_inter", [](nlohmann::json& c) { c["intermediate_size"] = 96; });
  auto runner = CreateCpuModelRunnerWithCache(options, MakeF32KvCache);
  EXPECT_EQ(runner.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(runner.status().message(),
              HasSubstr("'model.layers.0.mlp.gate_proj.weight' has shape [512, 256] but the "
                        "config needs [96, 256]"));

  options.model_dir =
      CopyWithConfig(dir, "more_layers", [](nlohmann::json& c) { c["num_hidden_layers"] = 5; });
  runner = CreateCpuModelRunnerWithCache(options, MakeF32KvCache);
  EXPECT_EQ(runner.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(runner.status().message(),
              HasSubstr("missing tensor 'model.layers.3.input_layernorm.weight'"));
}

TEST(ModelLoadTest, KvPoolIsSizedFromBytesWhenNoBlockCountIsGiven) {
  const std::string dir = TinyModelDir("llama");
  if (dir.empty()) GTEST_SKIP() << "tiny model was not generated (no NumPy)";
  // Tiny Llama: 3 layers, 2 kv heads, head_dim 64. F32 test cache: keys + values in float32.
  const int64_t f32_bytes_per_token = 3 * 2 * (64 + 64) * 4;
  RunnerOptions options;
  options.model_dir = dir;
  options.kv_block_size = 16;
  options.kv_cache_bytes = f32_bytes_per_token * 16 * 10 + 100;
  auto runner = CreateCpuModelRunnerWithCache(options, MakeF32KvCache);
  ASSERT_TRUE(runner.ok()) << runner.status();
  EXPECT_EQ((*runner)->kv_cache().total_blocks(), 10);

  options.kv_cache_bytes = f32_bytes_per_token * 16 - 1;
  runner = CreateCpuModelRunnerWithCache(options, MakeF32KvCache);
  EXPECT_EQ(runner.status().code(), absl::StatusCode::kInvalidArgument);

  // The CPU reference cache in fp16: 2 bytes per element, no metadata.
  const int64_t fp16_bytes_per_token = 3 * 2 * (64 + 64) * 2;
  options.kv_cache_bytes = fp16_bytes_per_token * 16 * 7;
  runner = CreateCpuModelRunner(options);
  ASSERT_TRUE(runner.ok()) << runner.status();
  EXPECT_EQ((*runner)->kv_cache().bytes_per_token(), fp16_bytes_per_token);
  EXPECT_EQ((*runner)->kv_cache().total_blocks(), 7);
  EXPECT_EQ((*runner)->backend_name(), "cpu");
}

TEST(ModelLoadTest, MissingFolderIsAnError) {
  RunnerOptions options;
  options.model_dir = "/nonexistent/kvgate/model";
  auto runner = CreateCpuModelRunnerWithCache(options, MakeF32KvCache);
  EXPECT_FALSE(runner.ok());
  EXPECT_THAT(runner.status().message(), HasSubstr("/nonexistent/kvgate/model"));
}

}  // namespace
}  // namespace kvgate::worker
