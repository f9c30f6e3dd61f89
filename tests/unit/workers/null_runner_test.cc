// The null runner (a benchmark tool) must keep the serving contract that the engine and the
// gateway benchmark rely on: deterministic greedy streams, real block accounting, and the same
// input validation as the CPU runner.
#include "workers/backend/null_model_runner.h"

#include <future>
#include <vector>

#include "gtest/gtest.h"
#include "tests/unit/workers/model_test_util.h"
#include "workers/engine/engine.h"

namespace kvgate::worker {
namespace {

TEST(NullRunnerTest, DeterministicLogitsAccountingAndValidation) {
  std::string dir = testing::TinyModelDir("llama");
  if (dir.empty()) GTEST_SKIP() << "tiny model not generated (needs python3-numpy)";
  NullRunnerOptions opts;
  opts.runner.model_dir = dir;
  opts.runner.kv_num_blocks = 8;
  opts.max_position_embeddings = 65536;
  auto runner = CreateNullModelRunner(opts);
  ASSERT_TRUE(runner.ok()) << runner.status();
  ModelRunner& r = **runner;
  const int vocab = r.config().vocab_size;
  EXPECT_EQ(r.config().max_position_embeddings, 65536);

  ASSERT_TRUE(r.kv_cache().AddSequence(1, 20).ok());
  EXPECT_EQ(r.kv_cache().free_blocks(), 6);
  std::vector<int32_t> prompt = {5, 9, 200};
  ForwardChunk chunk{.seq = 1, .tokens = prompt};
  std::vector<float> logits(vocab);
  ASSERT_TRUE(r.Forward({&chunk, 1}, logits.data()).ok());
  int argmax = std::max_element(logits.begin(), logits.end()) - logits.begin();
  EXPECT_EQ(argmax, NullRunnerNextToken(200, vocab));
  EXPECT_EQ(r.kv_cache().Length(1, 0), 3);

  std::vector<int32_t> bad = {vocab};
  ForwardChunk bad_chunk{.seq = 1, .tokens = bad};
  EXPECT_EQ(r.Forward({&bad_chunk, 1}, logits.data()).code(), absl::StatusCode::kInvalidArgument);
  std::vector<int32_t> too_many(40, 1);  // beyond the 32 tokens reserved
  ForwardChunk over{.seq = 1, .tokens = too_many};
  EXPECT_FALSE(r.Forward({&over, 1}, logits.data()).ok());
  r.kv_cache().FreeSequence(1);
  EXPECT_EQ(r.kv_cache().free_blocks(), 8);
}

TEST(NullRunnerTest, EngineStreamsTheChainOfNextTokens) {
  std::string dir = testing::TinyModelDir("llama");
  if (dir.empty()) GTEST_SKIP() << "tiny model not generated (needs python3-numpy)";
  NullRunnerOptions opts;
  opts.runner.model_dir = dir;
  opts.runner.kv_num_blocks = 64;
  auto runner = CreateNullModelRunner(opts);
  ASSERT_TRUE(runner.ok());
  const int vocab = (*runner)->config().vocab_size;
  auto engine = Engine::Create(*std::move(runner), {});
  ASSERT_TRUE(engine.ok());
  GenerateParams p;
  p.prompt = {1, 2, 3};
  p.max_tokens = 10;
  p.ignore_eos = true;
  std::vector<int32_t> got;
  std::promise<void> done;
  ASSERT_TRUE((*engine)
                  ->Submit(p,
                           [&](const StepOutput& out) {
                             got.insert(got.end(), out.token_ids.begin(), out.token_ids.end());
                             if (out.finished) done.set_value();
                           })
                  .ok());
  done.get_future().wait();
  std::vector<int32_t> want;
  int32_t last = 3;
  for (int i = 0; i < 10; ++i) want.push_back(last = NullRunnerNextToken(last, vocab));
  EXPECT_EQ(got, want);
}

}  // namespace
}  // namespace kvgate::worker
