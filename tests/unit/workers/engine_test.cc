// Engine tests on the real CPU runner with the tiny model: continuous batching must not change
// what a sequence computes, preemption (by recompute) must be invisible in the output, and
// cancellation, deadlines and admission limits end requests with the right status.
#include "workers/engine/engine.h"

#include <atomic>
#include <chrono>
#include <future>
#include <thread>
#include <vector>

#include "absl/synchronization/notification.h"
#include "gtest/gtest.h"
#include "tests/unit/workers/model_test_util.h"

namespace kvgate::worker {
namespace {

struct Result {
  std::vector<int32_t> ids;
  absl::Status status;
  FinishReason reason = FinishReason::kNone;
};

class CountingObserver : public EngineObserver {
 public:
  void OnPreemption() override { ++preemptions; }
  std::atomic<int> preemptions{0};
};

class EngineTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = testing::TinyModelDir("llama");
    if (dir_.empty()) GTEST_SKIP() << "tiny model not generated (needs python3-numpy)";
  }

  std::unique_ptr<Engine> MakeEngine(int64_t blocks, EngineOptions options = {},
                                     EngineObserver* observer = nullptr) {
    RunnerOptions ro;
    ro.model_dir = dir_;
    ro.kv_block_size = 16;
    ro.kv_num_blocks = blocks;
    ro.num_threads = 1;
    auto runner = CreateCpuModelRunner(ro);
    EXPECT_TRUE(runner.ok()) << runner.status();
    auto engine = Engine::Create(*std::move(runner), options, observer);
    EXPECT_TRUE(engine.ok()) << engine.status();
    return *std::move(engine);
  }

  // Submits and returns a future of the whole result.
  static std::future<Result> Run(Engine& engine, GenerateParams params) {
    auto promise = std::make_shared<std::promise<Result>>();
    auto result = std::make_shared<Result>();
    auto id = engine.Submit(std::move(params), [promise, result](const StepOutput& out) {
      result->ids.insert(result->ids.end(), out.token_ids.begin(), out.token_ids.end());
      if (out.finished) {
        result->status = out.status;
        result->reason = out.finish_reason;
        promise->set_value(*result);
      }
    });
    if (!id.ok()) {
      Result r;
      r.status = id.status();
      promise->set_value(r);
    }
    return promise->get_future();
  }

  static GenerateParams Params(std::vector<int32_t> prompt, int max_tokens) {
    GenerateParams p;
    p.prompt = std::move(prompt);
    p.max_tokens = max_tokens;
    p.ignore_eos = true;
    return p;
  }

  static std::vector<int32_t> Prompt(int seed, int len) {
    std::vector<int32_t> p;
    for (int i = 0; i < len; ++i) p.push_back(3 + (seed * 131 + i * 17) % 500);
    return p;
  }

  std::string dir_;
};

TEST_F(EngineTest, PreemptionByRecomputeDoesNotChangeOutputs) {
  // Solo references on a roomy cache.
  constexpr int kRequests = 6;
  std::vector<std::vector<int32_t>> solo;
  {
    auto engine = MakeEngine(512);
    for (int i = 0; i < kRequests; ++i) {
      Result r = Run(*engine, Params(Prompt(i, 20 + 7 * i), 40)).get();
      ASSERT_TRUE(r.status.ok()) << r.status;
      ASSERT_EQ(r.ids.size(), 40u);
      solo.push_back(r.ids);
    }
  }
  // A cache of 12 blocks (192 tokens) cannot hold six sequences of ~60-95 tokens at once: the
  // engine must admit by free blocks and preempt while decoding.
  CountingObserver observer;
  auto engine = MakeEngine(12, {}, &observer);
  std::vector<std::future<Result>> futures;
  for (int i = 0; i < kRequests; ++i) {
    futures.push_back(Run(*engine, Params(Prompt(i, 20 + 7 * i), 40)));
  }
  for (int i = 0; i < kRequests; ++i) {
    Result r = futures[i].get();
    ASSERT_TRUE(r.status.ok()) << r.status;
    EXPECT_EQ(r.reason, FinishReason::kLength);
    EXPECT_EQ(r.ids, solo[i]) << "request " << i;
  }
  EXPECT_GT(observer.preemptions.load(), 0) << "the test did not exercise preemption";
  // The last callback runs inside the engine's step; its bookkeeping follows right after.
  for (int i = 0; i < 200 && !engine->Idle(); ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  EXPECT_TRUE(engine->Idle());
  EXPECT_EQ(engine->Load().kv_blocks_free, 12);
}

TEST_F(EngineTest, ChunkedPrefillMatchesOneShotPrefill) {
  auto whole = MakeEngine(256);
  Result a = Run(*whole, Params(Prompt(9, 300), 12)).get();
  EngineOptions small_steps;
  small_steps.max_batch_tokens = 37;  // the 300-token prompt takes 9 steps
  auto chunked = MakeEngine(256, small_steps);
  Result b = Run(*chunked, Params(Prompt(9, 300), 12)).get();
  ASSERT_TRUE(a.status.ok() && b.status.ok());
  EXPECT_EQ(a.ids, b.ids);
}

TEST_F(EngineTest, StopTokenEndsWithStop) {
  auto engine = MakeEngine(64);
  Result free_run = Run(*engine, Params(Prompt(1, 10), 8)).get();
  ASSERT_EQ(free_run.ids.size(), 8u);
  GenerateParams p = Params(Prompt(1, 10), 8);
  p.stop_token_ids = {free_run.ids[3]};
  Result stopped = Run(*engine, p).get();
  ASSERT_TRUE(stopped.status.ok());
  EXPECT_EQ(stopped.reason, FinishReason::kStop);
  // Stops at the first occurrence of the stop id, which is included.
  size_t first = std::find(free_run.ids.begin(), free_run.ids.end(), free_run.ids[3]) -
                 free_run.ids.begin();
  EXPECT_EQ(stopped.ids, std::vector<int32_t>(free_run.ids.begin(),
                                              free_run.ids.begin() + first + 1));
}

TEST_F(EngineTest, CancelAndDeadlineEndRequestsAndFreeBlocks) {
  auto engine = MakeEngine(128);
  absl::Notification first_token;
  std::promise<absl::Status> done;
  GenerateParams p = Params(Prompt(2, 10), 1500);
  auto id = engine->Submit(p, [&](const StepOutput& out) {
    if (!out.token_ids.empty() && !first_token.HasBeenNotified()) first_token.Notify();
    if (out.finished) done.set_value(out.status);
  });
  ASSERT_TRUE(id.ok());
  first_token.WaitForNotification();
  engine->Cancel(*id);
  EXPECT_EQ(done.get_future().get().code(), absl::StatusCode::kCancelled);

  GenerateParams late = Params(Prompt(3, 10), 1500);
  late.deadline = Clock::now() + std::chrono::milliseconds(30);
  Result r = Run(*engine, late).get();
  EXPECT_EQ(r.status.code(), absl::StatusCode::kDeadlineExceeded);
  EXPECT_LT(r.ids.size(), 1500u);
  for (int i = 0; i < 100 && !engine->Idle(); ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  EXPECT_EQ(engine->Load().kv_blocks_free, 128);
}

TEST_F(EngineTest, AdmissionLimits) {
  auto engine = MakeEngine(4);  // 64 tokens in all
  Result too_big = Run(*engine, Params(Prompt(4, 40), 40)).get();
  EXPECT_EQ(too_big.status.code(), absl::StatusCode::kResourceExhausted) << too_big.status;
  Result beyond_context = Run(*engine, Params(Prompt(4, 10), 1 << 20)).get();
  EXPECT_EQ(beyond_context.status.code(), absl::StatusCode::kOutOfRange);
  Result empty = Run(*engine, Params({}, 4)).get();
  EXPECT_EQ(empty.status.code(), absl::StatusCode::kInvalidArgument);
  Result bad_token = Run(*engine, Params({1, 100000}, 4)).get();
  EXPECT_EQ(bad_token.status.code(), absl::StatusCode::kInvalidArgument);
  GenerateParams hot = Params(Prompt(4, 10), 4);
  hot.sampling.temperature = 3;
  EXPECT_EQ(Run(*engine, hot).get().status.code(), absl::StatusCode::kInvalidArgument);

  EngineOptions tiny_queue;
  tiny_queue.max_waiting = 0;
  auto no_queue = MakeEngine(64, tiny_queue);
  EXPECT_EQ(Run(*no_queue, Params(Prompt(5, 10), 4)).get().status.code(),
            absl::StatusCode::kResourceExhausted);

  engine->StopAccepting();
  EXPECT_EQ(Run(*engine, Params(Prompt(6, 10), 4)).get().status.code(),
            absl::StatusCode::kUnavailable);
}

TEST(SamplerTest, GreedyTopKTopPAndSeeds) {
  std::vector<float> logits = {0.1f, 3.0f, 2.9f, -1.0f, 0.0f};
  EXPECT_EQ(Sampler({}).Sample(logits), 1);
  // top_k = 1 is greedy whatever the temperature.
  for (uint64_t seed = 0; seed < 20; ++seed) {
    EXPECT_EQ(Sampler({.temperature = 1.5f, .top_k = 1, .seed = seed}).Sample(logits), 1);
  }
  // top_k = 2 only ever picks ids 1 or 2; both occur.
  std::set<int32_t> seen;
  for (uint64_t seed = 0; seed < 200; ++seed) {
    seen.insert(Sampler({.temperature = 1.0f, .top_k = 2, .seed = seed}).Sample(logits));
  }
  EXPECT_EQ(seen, (std::set<int32_t>{1, 2}));
  // top_p small keeps only the most likely token.
  for (uint64_t seed = 0; seed < 20; ++seed) {
    EXPECT_EQ(Sampler({.temperature = 1.0f, .top_p = 0.3f, .seed = seed}).Sample(logits), 1);
  }
  // Same seed, same sequence; the empirical distribution follows softmax(logits / T).
  Sampler a({.temperature = 1.0f, .seed = 7}), b({.temperature = 1.0f, .seed = 7});
  for (int i = 0; i < 50; ++i) EXPECT_EQ(a.Sample(logits), b.Sample(logits));
  Sampler c({.temperature = 1.0f, .seed = 11});
  std::vector<int> counts(5, 0);
  const int n = 20000;
  for (int i = 0; i < n; ++i) ++counts[c.Sample(logits)];
  double z = 0;
  for (float l : logits) z += std::exp(l);
  for (int i = 0; i < 5; ++i) {
    double p = std::exp(logits[i]) / z;
    EXPECT_NEAR(counts[i] / double(n), p, 4 * std::sqrt(p * (1 - p) / n) + 1e-3) << "id " << i;
  }
  EXPECT_FALSE(ValidateSamplingConfig({.temperature = -0.1f}, 5).ok());
  EXPECT_FALSE(ValidateSamplingConfig({.top_k = 6}, 5).ok());
  EXPECT_FALSE(ValidateSamplingConfig({.top_p = 1.1f}, 5).ok());
  EXPECT_TRUE(ValidateSamplingConfig({.temperature = 2.0f, .top_k = 5, .top_p = 1.0f}, 5).ok());
}

}  // namespace
}  // namespace kvgate::worker
