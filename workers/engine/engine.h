// Engine: continuous batching over a paged KV cache. Requests arrive from any thread (Submit);
// one engine thread admits them by free KV blocks, runs one batched forward step at a time over
// all running sequences (decode tokens first, then chunked prefill up to a token budget), samples
// (on the device when the runner supports it, else on the host), and streams tokens to each
// request's callback. When the cache runs out mid-decode the newest
// sequence is preempted and later recomputed.
//
//   ASSIGN_OR_RETURN(auto engine, Engine::Create(std::move(runner), EngineOptions{}));
//   ASSIGN_OR_RETURN(uint64_t id, engine->Submit(params, [](const StepOutput& out) { ... }));
//   engine->Cancel(id);  // client went away
//
// Callbacks run on the engine thread: they must be quick and must not call back into the engine.
#pragma once

#include <chrono>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/container/flat_hash_set.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "workers/backend/model_runner.h"
#include "workers/engine/sampler.h"

namespace kvgate::worker {

using Clock = std::chrono::steady_clock;

struct GenerateParams {
  std::string request_id;
  std::vector<int32_t> prompt;
  int max_tokens = 16;  // 1 .. max_context - prompt
  SamplingConfig sampling;
  std::vector<int32_t> stop_token_ids;
  bool ignore_eos = false;
  std::optional<Clock::time_point> deadline;
};

enum class FinishReason { kNone, kLength, kStop, kContext };

// What a request's callback receives: new tokens, and on the last call `finished` with the reason
// (status OK) or a terminal error (CANCELLED, DEADLINE_EXCEEDED, UNAVAILABLE on shutdown, ...).
struct StepOutput {
  std::vector<int32_t> token_ids;
  bool finished = false;
  FinishReason finish_reason = FinishReason::kNone;
  absl::Status status;
  int prompt_tokens = 0;
  int completion_tokens = 0;
  int64_t ttft_us = 0;  // arrival to first token
  int64_t tpot_us = 0;  // mean gap between tokens after the first
};
using OutputCallback = std::function<void(const StepOutput&)>;

struct EngineOptions {
  int max_running = 64;             // sequences decoding at once
  int max_waiting = 1024;           // queued requests before RESOURCE_EXHAUSTED
  int max_batch_tokens = 512;       // tokens per forward step (decode + prefill chunks)
  int64_t max_context = 0;          // 0: the model's max_position_embeddings
};

struct EngineLoad {
  int running = 0;
  int waiting = 0;
  int64_t kv_blocks_free = 0;
  int64_t kv_blocks_total = 0;
  int kv_block_tokens = 0;
  int64_t kv_bytes_per_token = 0;
  bool accepting = true;
};

// Notified on the engine thread; the server turns these into metrics.
class EngineObserver {
 public:
  virtual ~EngineObserver() = default;
  // A request ended: outcome "ok" or a status code name, with its token counts and latencies.
  virtual void OnRequestDone(const StepOutput& final_output) {}
  // Called after every step and when idle, with the current load.
  virtual void OnLoad(const EngineLoad& load) {}
  virtual void OnPreemption() {}
};

class Engine {
 public:
  static absl::StatusOr<std::unique_ptr<Engine>> Create(std::unique_ptr<ModelRunner> runner,
                                                        const EngineOptions& options,
                                                        EngineObserver* observer = nullptr);
  ~Engine();  // fails outstanding requests with UNAVAILABLE, joins the thread

  // Validates and queues a request. Errors: INVALID_ARGUMENT (empty prompt, token id outside the
  // vocabulary, bad sampling values, max_tokens < 0), OUT_OF_RANGE (prompt + max_tokens beyond
  // max_context), RESOURCE_EXHAUSTED (can never fit in the KV cache, or queue full), UNAVAILABLE
  // (draining). On success the callback will be called at least once, the last time with finished.
  absl::StatusOr<uint64_t> Submit(GenerateParams params, OutputCallback callback);
  // Ends a request early; its callback gets a CANCELLED final output. Unknown ids are ignored.
  void Cancel(uint64_t id);
  // Stops accepting new requests (Submit returns UNAVAILABLE); running ones finish.
  void StopAccepting();
  EngineLoad Load() const;
  bool Idle() const;

  const LlamaConfig& model_config() const { return runner_->config(); }
  int64_t max_context() const { return max_context_; }
  std::string backend_name() const { return runner_->backend_name(); }
  const kernels::KvFormatDesc& kv_desc() const { return runner_->kv_cache().desc(); }

 private:
  struct Sequence;
  Engine(std::unique_ptr<ModelRunner> runner, const EngineOptions& options,
         EngineObserver* observer);
  void Loop();
  // One scheduling round + forward step. Returns false when there was nothing to do.
  bool Step();
  void Finish(Sequence& seq, StepOutput out);
  void Preempt(Sequence& seq);
  EngineLoad LoadLocked() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  std::unique_ptr<ModelRunner> runner_;
  const EngineOptions options_;
  EngineObserver* const observer_;
  int64_t max_context_ = 0;

  mutable absl::Mutex mu_;
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  bool accepting_ ABSL_GUARDED_BY(mu_) = true;
  uint64_t next_id_ ABSL_GUARDED_BY(mu_) = 1;
  std::deque<std::unique_ptr<Sequence>> incoming_ ABSL_GUARDED_BY(mu_);
  absl::flat_hash_set<uint64_t> cancelled_ ABSL_GUARDED_BY(mu_);
  int running_count_ ABSL_GUARDED_BY(mu_) = 0;
  int waiting_count_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t free_blocks_ ABSL_GUARDED_BY(mu_) = 0;

  // Engine-thread state.
  std::deque<std::unique_ptr<Sequence>> waiting_;
  std::vector<std::unique_ptr<Sequence>> running_;
  std::vector<float> logits_;                    // host sampling: [chunks, vocab]
  std::vector<DeviceSampling> device_sampling_;  // device sampling: per chunk
  std::vector<int32_t> sampled_;                 // device sampling: the token of each chunk
  std::thread thread_;
};

}  // namespace kvgate::worker
