#include "workers/engine/engine.h"

#include <algorithm>
#include <utility>

#include "absl/strings/str_format.h"
#include "kvgate/common/log.h"

namespace kvgate::worker {
namespace {

int64_t MicrosBetween(Clock::time_point a, Clock::time_point b) {
  return std::chrono::duration_cast<std::chrono::microseconds>(b - a).count();
}

}  // namespace

struct Engine::Sequence {
  uint64_t id = 0;
  GenerateParams params;
  OutputCallback callback;
  std::vector<int32_t> tokens;  // prompt + generated so far (what a recompute prefills)
  int prompt_len = 0;
  int generated = 0;
  int64_t computed = 0;  // tokens whose K/V is in the cache
  bool in_cache = false;
  Sampler sampler;
  Clock::time_point arrival;
  Clock::time_point first_token;
  Clock::time_point last_token;

  Sequence(uint64_t id, GenerateParams p, OutputCallback cb)
      : id(id),
        params(std::move(p)),
        callback(std::move(cb)),
        sampler(params.sampling),
        arrival(Clock::now()) {
    tokens = params.prompt;
    prompt_len = static_cast<int>(tokens.size());
  }
};

absl::StatusOr<std::unique_ptr<Engine>> Engine::Create(std::unique_ptr<ModelRunner> runner,
                                                       const EngineOptions& options,
                                                       EngineObserver* observer) {
  if (runner == nullptr) return absl::InvalidArgumentError("engine needs a model runner");
  if (options.max_running <= 0 || options.max_batch_tokens <= 0 || options.max_waiting < 0) {
    return absl::InvalidArgumentError("engine options must be positive");
  }
  return std::unique_ptr<Engine>(new Engine(std::move(runner), options, observer));
}

Engine::Engine(std::unique_ptr<ModelRunner> runner, const EngineOptions& options,
               EngineObserver* observer)
    : runner_(std::move(runner)), options_(options), observer_(observer) {
  max_context_ = runner_->config().max_position_embeddings;
  if (options_.max_context > 0) max_context_ = std::min(max_context_, options_.max_context);
  {
    absl::MutexLock lock(&mu_);
    free_blocks_ = runner_->kv_cache().free_blocks();
  }
  thread_ = std::thread([this] { Loop(); });
}

Engine::~Engine() {
  {
    absl::MutexLock lock(&mu_);
    stopping_ = true;
  }
  if (thread_.joinable()) thread_.join();
}

absl::StatusOr<uint64_t> Engine::Submit(GenerateParams params, OutputCallback callback) {
  const auto& cfg = runner_->config();
  const std::string& rid = params.request_id;
  if (params.prompt.empty()) {
    return absl::InvalidArgumentError(absl::StrFormat("request %s: empty prompt", rid));
  }
  for (int32_t id : params.prompt) {
    if (id < 0 || id >= cfg.vocab_size) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "request %s: token id %d outside the vocabulary [0, %d)", rid, id, cfg.vocab_size));
    }
  }
  if (params.max_tokens < 0) {
    return absl::InvalidArgumentError(
        absl::StrFormat("request %s: max_tokens must be >= 0, got %d", rid, params.max_tokens));
  }
  if (params.max_tokens == 0) params.max_tokens = 16;
  if (absl::Status s = ValidateSamplingConfig(params.sampling, cfg.vocab_size); !s.ok()) {
    return absl::InvalidArgumentError(absl::StrFormat("request %s: %s", rid, s.message()));
  }
  const int64_t total = static_cast<int64_t>(params.prompt.size()) + params.max_tokens;
  if (total > max_context_) {
    return absl::OutOfRangeError(absl::StrFormat(
        "request %s: prompt (%d tokens) + max_tokens (%d) = %d exceeds the context of %d tokens",
        rid, params.prompt.size(), params.max_tokens, total, max_context_));
  }
  const auto& cache = runner_->kv_cache();
  if (cache.BlocksForTokens(total) > cache.total_blocks()) {
    return absl::ResourceExhaustedError(absl::StrFormat(
        "request %s: needs %d KV blocks for %d tokens but the cache has %d in total", rid,
        cache.BlocksForTokens(total), total, cache.total_blocks()));
  }
  absl::MutexLock lock(&mu_);
  if (!accepting_ || stopping_) {
    return absl::UnavailableError(absl::StrFormat("request %s: worker is draining", rid));
  }
  if (waiting_count_ + static_cast<int>(incoming_.size()) >= options_.max_waiting) {
    return absl::ResourceExhaustedError(
        absl::StrFormat("request %s: queue full (%d waiting)", rid, options_.max_waiting));
  }
  uint64_t id = next_id_++;
  incoming_.push_back(std::make_unique<Sequence>(id, std::move(params), std::move(callback)));
  return id;
}

void Engine::Cancel(uint64_t id) {
  absl::MutexLock lock(&mu_);
  cancelled_.insert(id);
}

void Engine::StopAccepting() {
  absl::MutexLock lock(&mu_);
  accepting_ = false;
}

EngineLoad Engine::LoadLocked() const {
  const auto& cache = runner_->kv_cache();
  EngineLoad load;
  load.running = running_count_;
  load.waiting = waiting_count_ + static_cast<int>(incoming_.size());
  load.kv_blocks_free = free_blocks_;
  load.kv_blocks_total = cache.total_blocks();
  load.kv_block_tokens = cache.config().block_size;
  load.kv_bytes_per_token = cache.bytes_per_token();
  load.accepting = accepting_ && !stopping_;
  return load;
}

EngineLoad Engine::Load() const {
  absl::MutexLock lock(&mu_);
  return LoadLocked();
}

bool Engine::Idle() const {
  absl::MutexLock lock(&mu_);
  return running_count_ == 0 && waiting_count_ == 0 && incoming_.empty();
}

void Engine::Loop() {
  for (;;) {
    bool stopping;
    {
      absl::MutexLock lock(&mu_);
      stopping = stopping_;
      while (!incoming_.empty()) {
        waiting_.push_back(std::move(incoming_.front()));
        incoming_.pop_front();
      }
    }
    if (stopping) break;
    if (!Step()) {
      // Nothing runnable: sleep until work arrives (or a short timeout for cancellations).
      absl::MutexLock lock(&mu_);
      mu_.AwaitWithTimeout(absl::Condition(
                               +[](Engine* e) ABSL_NO_THREAD_SAFETY_ANALYSIS {
                                 return e->stopping_ || !e->incoming_.empty() ||
                                        !e->cancelled_.empty();
                               },
                               this),
                           absl::Milliseconds(50));
    }
  }
  // Shutdown: fail everything still outstanding.
  StepOutput out;
  out.finished = true;
  out.status = absl::UnavailableError("worker shutting down");
  for (auto& seq : running_) Finish(*seq, out);
  for (auto& seq : waiting_) Finish(*seq, out);
  running_.clear();
  waiting_.clear();
}

void Engine::Finish(Sequence& seq, StepOutput out) {
  if (seq.in_cache) {
    runner_->kv_cache().FreeSequence(static_cast<kernels::SeqId>(seq.id));
    seq.in_cache = false;
  }
  out.finished = true;
  out.prompt_tokens = seq.prompt_len;
  out.completion_tokens = seq.generated;
  if (seq.generated > 0) {
    out.ttft_us = MicrosBetween(seq.arrival, seq.first_token);
    if (seq.generated > 1) {
      out.tpot_us = MicrosBetween(seq.first_token, seq.last_token) / (seq.generated - 1);
    }
  }
  if (!out.status.ok() && !seq.params.request_id.empty()) {
    out.status = absl::Status(out.status.code(), absl::StrFormat("request %s: %s",
                                                                 seq.params.request_id,
                                                                 out.status.message()));
  }
  seq.callback(out);
  if (observer_ != nullptr) observer_->OnRequestDone(out);
}

void Engine::Preempt(Sequence& seq) {
  runner_->kv_cache().FreeSequence(static_cast<kernels::SeqId>(seq.id));
  seq.in_cache = false;
  seq.computed = 0;
  if (observer_ != nullptr) observer_->OnPreemption();
}

bool Engine::Step() {
  auto& cache = runner_->kv_cache();
  const auto now = Clock::now();

  // 1. Cancellations and deadlines.
  absl::flat_hash_set<uint64_t> cancelled;
  {
    absl::MutexLock lock(&mu_);
    cancelled.swap(cancelled_);
  }
  auto should_end = [&](Sequence& seq) -> std::optional<absl::Status> {
    if (cancelled.contains(seq.id)) return absl::CancelledError("cancelled by the client");
    if (seq.params.deadline && now >= *seq.params.deadline) {
      return absl::DeadlineExceededError("deadline exceeded");
    }
    return std::nullopt;
  };
  auto end_matching = [&](auto& container) {
    for (auto it = container.begin(); it != container.end();) {
      if (auto status = should_end(**it)) {
        StepOutput out;
        out.status = *status;
        Finish(**it, out);
        it = container.erase(it);
      } else {
        ++it;
      }
    }
  };
  end_matching(running_);
  end_matching(waiting_);

  // 2. Admission by free blocks, first come first served (a preempted sequence is at the front).
  while (!waiting_.empty() && static_cast<int>(running_.size()) < options_.max_running) {
    Sequence& seq = *waiting_.front();
    absl::Status s = cache.AddSequence(static_cast<kernels::SeqId>(seq.id),
                                       static_cast<int64_t>(seq.tokens.size()));
    if (absl::IsResourceExhausted(s)) break;
    if (!s.ok()) {
      StepOutput out;
      out.status = s;
      Finish(seq, out);
      waiting_.pop_front();
      continue;
    }
    seq.in_cache = true;
    seq.computed = 0;
    running_.push_back(std::move(waiting_.front()));
    waiting_.pop_front();
  }

  // 3. Every running sequence must be able to hold all of its tokens (the prompt, or the one
  //    token sampled last step). Oldest first; when blocks run out, preempt the newest (possibly
  //    the sequence itself) and recompute it later.
  for (size_t i = 0; i < running_.size();) {
    Sequence& seq = *running_[i];
    absl::Status s = cache.Reserve(static_cast<kernels::SeqId>(seq.id),
                                   static_cast<int64_t>(seq.tokens.size()));
    if (s.ok()) {
      ++i;
      continue;
    }
    Preempt(*running_.back());
    waiting_.push_front(std::move(running_.back()));
    running_.pop_back();
  }

  // 4. Build the step: every decode token (one uncomputed token), then prefill chunks up to the
  //    token budget.
  std::vector<ForwardChunk> chunks;
  std::vector<Sequence*> chunk_seqs;
  std::vector<bool> samples;  // whether the chunk's last logits produce a token
  int budget = options_.max_batch_tokens;
  for (auto& seq : running_) {
    if (static_cast<int64_t>(seq->tokens.size()) - seq->computed != 1) continue;
    chunks.push_back({static_cast<kernels::SeqId>(seq->id),
                      std::span<const int32_t>(&seq->tokens[seq->computed], 1), false});
    chunk_seqs.push_back(seq.get());
    samples.push_back(true);
    --budget;
  }
  for (auto& seq : running_) {
    int64_t remaining = static_cast<int64_t>(seq->tokens.size()) - seq->computed;
    if (remaining <= 1 || budget <= 0) continue;
    int64_t n = std::min<int64_t>(remaining, budget);
    chunks.push_back({static_cast<kernels::SeqId>(seq->id),
                      std::span<const int32_t>(&seq->tokens[seq->computed], n), false});
    chunk_seqs.push_back(seq.get());
    samples.push_back(n == remaining);
    budget -= static_cast<int>(n);
  }

  {
    absl::MutexLock lock(&mu_);
    running_count_ = static_cast<int>(running_.size());
    waiting_count_ = static_cast<int>(waiting_.size());
    free_blocks_ = cache.free_blocks();
  }
  if (chunks.empty()) {
    if (observer_ != nullptr) observer_->OnLoad(Load());
    return false;
  }

  // 5. Forward, and the tokens sampled on the device when the runner can (only the ids come back;
  //    the draws come from each request's own generator, so its tokens do not depend on where
  //    they were sampled). Chunks that do not sample get a greedy entry whose token is dropped.
  const int vocab = runner_->config().vocab_size;
  const bool device_sampling = runner_->supports_device_sampling();
  absl::Status fs;
  if (device_sampling) {
    device_sampling_.clear();
    for (size_t c = 0; c < chunks.size(); ++c) {
      device_sampling_.push_back(samples[c] ? chunk_seqs[c]->sampler.NextDeviceSampling()
                                            : DeviceSampling{});
    }
    sampled_.resize(chunks.size());
    fs = runner_->ForwardSample(chunks, device_sampling_, sampled_.data());
  } else {
    logits_.resize(chunks.size() * static_cast<size_t>(vocab));
    fs = runner_->Forward(chunks, logits_.data());
  }
  if (!fs.ok()) {
    KVGATE_LOG(ERROR) << "forward step failed: " << fs;
    for (Sequence* seq : chunk_seqs) seq->computed = -1;  // mark for failure below
    for (auto it = running_.begin(); it != running_.end();) {
      if ((*it)->computed == -1) {
        StepOutput out;
        out.status = absl::InternalError(absl::StrFormat("forward step failed: %s", fs.message()));
        Finish(**it, out);
        it = running_.erase(it);
      } else {
        ++it;
      }
    }
    return true;
  }

  // 6. Sample, stream, finish.
  const auto step_done = Clock::now();
  absl::flat_hash_set<uint64_t> finished;
  for (size_t c = 0; c < chunks.size(); ++c) {
    Sequence& seq = *chunk_seqs[c];
    seq.computed += static_cast<int64_t>(chunks[c].tokens.size());
    if (!samples[c]) continue;
    const int32_t token = device_sampling ? sampled_[c]
                                          : seq.sampler.Sample(std::span<const float>(
                                                &logits_[c * static_cast<size_t>(vocab)], vocab));
    seq.tokens.push_back(token);
    ++seq.generated;
    if (seq.generated == 1) seq.first_token = step_done;
    seq.last_token = step_done;

    StepOutput out;
    out.token_ids = {token};
    const auto& cfg = runner_->config();
    bool is_stop = std::find(seq.params.stop_token_ids.begin(), seq.params.stop_token_ids.end(),
                             token) != seq.params.stop_token_ids.end();
    if (!seq.params.ignore_eos &&
        std::find(cfg.eos_token_ids.begin(), cfg.eos_token_ids.end(), token) !=
            cfg.eos_token_ids.end()) {
      is_stop = true;
    }
    if (is_stop) {
      out.finish_reason = FinishReason::kStop;
    } else if (seq.generated >= seq.params.max_tokens) {
      out.finish_reason = FinishReason::kLength;
    } else if (static_cast<int64_t>(seq.tokens.size()) >= max_context_) {
      out.finish_reason = FinishReason::kContext;
    }
    if (out.finish_reason != FinishReason::kNone) {
      Finish(seq, out);
      finished.insert(seq.id);
    } else {
      seq.callback(out);
    }
  }
  if (!finished.empty()) {
    std::erase_if(running_, [&](const auto& s) { return finished.contains(s->id); });
  }
  {
    absl::MutexLock lock(&mu_);
    running_count_ = static_cast<int>(running_.size());
    waiting_count_ = static_cast<int>(waiting_.size());
    free_blocks_ = cache.free_blocks();
  }
  if (observer_ != nullptr) observer_->OnLoad(Load());
  return true;
}

}  // namespace kvgate::worker
