// Parity of the CPU backend with Hugging Face transformers on the committed reference model
// (models/reference, trained by tools/train_reference_model.py). The goldens in
// tests/data/reference_golden were written by that same run: transformers' LlamaForCausalLM on the
// exported bf16 weights upcast to float64, eager attention. They hold full logits rows at three
// positions of six held-out code prompts (16..512 tokens), greedy continuations of 16 tokens, and
// tokenizer cases (text -> ids from HF tokenizers).
//
// Checks: our Tokenizer reproduces HF's ids; the CPU forward over the exact float32 test cache
// matches every golden row within 1e-3 relative error (max |diff| / max |golden| per row) and
// reproduces the greedy continuations; through the CPU reference cache in fp16 (what the worker
// runs) the greedy continuations are identical too.

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "kvgate/common/tokenizer.h"
#include "kvgate/kernels/kv_format.h"
#include "nlohmann/json.hpp"
#include "tests/unit/workers/model_test_util.h"
#include "workers/backend/cpu_model_runner.h"
#include "workers/backend/model_runner.h"

namespace kvgate::worker {
namespace {

using testing::EnvOr;
using testing::MakeF32KvCache;

constexpr double kTolerance = 1e-3;
// fp16 K/V rounding (relative 2^-11) on decode rows; only the greedy tokens are required equal.
constexpr double kFp16CacheTolerance = 1e-2;

struct ReferenceGolden {
  std::vector<std::vector<int32_t>> prompts;
  std::vector<std::string> prompt_texts;
  struct Row {
    int prompt = 0;
    int position = 0;
    std::vector<float> logits;
  };
  std::vector<Row> rows;
  std::vector<std::vector<int32_t>> greedy;
  std::vector<std::pair<std::string, std::vector<int32_t>>> tokenizer_cases;
};

std::string SourceDir() { return EnvOr("KVGATE_SOURCE_DIR", "."); }
std::string ModelDir() { return SourceDir() + "/models/reference"; }

ReferenceGolden LoadReferenceGolden() {
  const std::string dir = SourceDir() + "/tests/data/reference_golden";
  std::ifstream in(dir + "/golden.json");
  std::stringstream text;
  text << in.rdbuf();
  const nlohmann::json j = nlohmann::json::parse(text.str());
  ReferenceGolden g;
  g.prompts = j.at("prompts").get<std::vector<std::vector<int32_t>>>();
  for (const auto& s : j.at("prompt_sources")) g.prompt_texts.push_back(s.at("text"));
  const int vocab = j.at("vocab_size").get<int>();
  std::ifstream blob(dir + "/logits.f32", std::ios::binary);
  for (const auto& r : j.at("rows")) {
    ReferenceGolden::Row row{r.at("prompt").get<int>(), r.at("position").get<int>(),
                             std::vector<float>(vocab)};
    blob.seekg(static_cast<std::streamoff>(r.at("offset").get<int64_t>()) * vocab * 4);
    blob.read(reinterpret_cast<char*>(row.logits.data()), int64_t{vocab} * 4);
    EXPECT_TRUE(blob.good()) << "logits.f32 too short";
    g.rows.push_back(std::move(row));
  }
  g.greedy = j.at("greedy_continuations").get<std::vector<std::vector<int32_t>>>();
  for (const auto& c : j.at("tokenizer_cases")) {
    g.tokenizer_cases.emplace_back(c.at("text").get<std::string>(),
                                   c.at("ids").get<std::vector<int32_t>>());
  }
  return g;
}

class ReferenceParityTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!std::filesystem::exists(ModelDir() + "/config.json")) {
      GTEST_SKIP() << "models/reference not present";
    }
    golden_ = LoadReferenceGolden();
    ASSERT_EQ(golden_.prompts.size(), 6u);
    ASSERT_EQ(golden_.greedy.size(), golden_.prompts.size());
  }

  RunnerOptions Options(const std::string& format) {
    RunnerOptions opts;
    opts.model_dir = ModelDir();
    opts.kv_format = *kernels::ParseKvFormat(format);
    opts.kv_num_blocks = 512;
    opts.num_threads = 2;
    return opts;
  }

  // Logits of every position of prompt `p` (one prefill), then 16 greedy tokens by decode steps.
  void RunPrompt(ModelRunner& runner, int p, std::vector<float>* all_logits,
                 std::vector<int32_t>* greedy) {
    const auto& ids = golden_.prompts[p];
    const int vocab = runner.config().vocab_size;
    auto& cache = runner.kv_cache();
    const kernels::SeqId seq = p + 1;
    ASSERT_TRUE(cache.AddSequence(seq, ids.size() + 16).ok());
    all_logits->assign(ids.size() * vocab, 0.f);
    ForwardChunk chunk{.seq = seq, .tokens = ids, .all_logits = true};
    ASSERT_TRUE(runner.Forward({&chunk, 1}, all_logits->data()).ok());
    std::vector<float> row(all_logits->end() - vocab, all_logits->end());
    for (int step = 0; step < 16; ++step) {
      const int32_t next =
          static_cast<int32_t>(std::max_element(row.begin(), row.end()) - row.begin());
      greedy->push_back(next);
      if (step == 15) break;
      ForwardChunk decode{.seq = seq, .tokens = std::span<const int32_t>(&greedy->back(), 1)};
      ASSERT_TRUE(runner.Forward({&decode, 1}, row.data()).ok());
    }
    cache.FreeSequence(seq);
  }

  // Runs every golden prompt through `runner`: each golden logits row within `tolerance` relative
  // error and the greedy continuation identical. Returns the largest error.
  double CheckGoldens(ModelRunner& runner, double tolerance) {
    const int vocab = runner.config().vocab_size;
    double worst = 0;
    for (size_t p = 0; p < golden_.prompts.size(); ++p) {
      std::vector<float> logits;
      std::vector<int32_t> greedy;
      RunPrompt(runner, static_cast<int>(p), &logits, &greedy);
      for (const auto& row : golden_.rows) {
        if (row.prompt != static_cast<int>(p)) continue;
        const double err = testing::RelativeError(logits.data() + int64_t{row.position} * vocab,
                                                  row.logits);
        worst = std::max(worst, err);
        EXPECT_LT(err, tolerance) << "prompt " << p << " position " << row.position;
      }
      EXPECT_EQ(greedy, golden_.greedy[p]) << "prompt " << p;
    }
    return worst;
  }

  ReferenceGolden golden_;
};

TEST_F(ReferenceParityTest, TokenizerMatchesHuggingFaceIds) {
  auto tok = Tokenizer::FromFile(ModelDir() + "/tokenizer.json");
  ASSERT_TRUE(tok.ok()) << tok.status();
  for (const auto& [text, ids] : golden_.tokenizer_cases) {
    auto got = (*tok)->Encode(text);
    ASSERT_TRUE(got.ok()) << got.status();
    EXPECT_EQ(*got, ids) << "text: " << text.substr(0, 80);
  }
  for (size_t p = 0; p < golden_.prompts.size(); ++p) {
    auto got = (*tok)->Encode(golden_.prompt_texts[p]);
    ASSERT_TRUE(got.ok()) << got.status();
    EXPECT_EQ(*got, golden_.prompts[p]) << "prompt " << p;
  }
}

TEST_F(ReferenceParityTest, LogitsAndGreedyMatchTransformersWithF32Cache) {
  auto runner = CreateCpuModelRunnerWithCache(Options("fp16"), MakeF32KvCache);
  ASSERT_TRUE(runner.ok()) << runner.status();
  const double worst = CheckGoldens(**runner, kTolerance);
  std::printf("max relative logits error vs transformers (F32 cache): %.3g over %zu rows\n", worst,
              golden_.rows.size());
}

TEST_F(ReferenceParityTest, GreedyMatchesTransformersWithFp16Cache) {
  auto runner = CreateCpuModelRunner(Options("fp16"));
  ASSERT_TRUE(runner.ok()) << runner.status();
  const double worst = CheckGoldens(**runner, kFp16CacheTolerance);
  std::printf("max relative logits error vs transformers (fp16 cache): %.3g\n", worst);
}

}  // namespace
}  // namespace kvgate::worker
