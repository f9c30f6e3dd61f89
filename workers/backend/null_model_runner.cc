#include "workers/backend/null_model_runner.h"

#include <algorithm>
#include <filesystem>
#include <set>
#include <unordered_map>
#include <utility>

#include "absl/strings/str_cat.h"
#include "kvgate/common/log.h"
#include "kvgate/common/status_macros.h"
#include "kvgate/kernels/kv_cache.h"
#include "workers/model/llama_config.h"

namespace kvgate::worker {
namespace {

// A real KvCache for block accounting that also counts, per sequence, the tokens the null runner
// ran (Length) and the tokens reserved (for Forward's reservation check). Storage and attention
// calls go to the real cache unchanged; the null runner never makes them.
class TokenCountingCache : public kernels::KvCache {
 public:
  explicit TokenCountingCache(std::unique_ptr<kernels::KvCache> cache) : cache_(std::move(cache)) {}

  const kernels::KvCacheConfig& config() const override { return cache_->config(); }
  const kernels::KvFormatDesc& desc() const override { return cache_->desc(); }
  int64_t free_blocks() const override { return cache_->free_blocks(); }
  int64_t total_blocks() const override { return cache_->total_blocks(); }
  int64_t BlocksForTokens(int64_t n) const override { return cache_->BlocksForTokens(n); }
  int64_t bytes_per_token() const override { return cache_->bytes_per_token(); }
  int64_t allocated_bytes() const override { return cache_->allocated_bytes(); }
  int64_t residual_bytes_per_sequence() const override {
    return cache_->residual_bytes_per_sequence();
  }

  absl::Status AddSequence(kernels::SeqId seq, int64_t reserve_tokens) override {
    RETURN_IF_ERROR(cache_->AddSequence(seq, reserve_tokens));
    sequences_[seq] = {.length = 0, .reserved_tokens = std::max<int64_t>(reserve_tokens, 0)};
    return absl::OkStatus();
  }
  absl::Status Reserve(kernels::SeqId seq, int64_t num_tokens) override {
    RETURN_IF_ERROR(cache_->Reserve(seq, num_tokens));
    auto it = sequences_.find(seq);
    if (it != sequences_.end()) {
      it->second.reserved_tokens = std::max(it->second.reserved_tokens, num_tokens);
    }
    return absl::OkStatus();
  }
  void FreeSequence(kernels::SeqId seq) override {
    cache_->FreeSequence(seq);
    sequences_.erase(seq);
  }
  int64_t Length(kernels::SeqId seq, int layer) const override {
    auto it = sequences_.find(seq);
    return it == sequences_.end() ? -1 : it->second.length;
  }
  int64_t StoredTokens(kernels::SeqId seq, int layer) const override { return 0; }

  absl::Status Append(kernels::SeqId seq, int layer, int64_t n, const float* k,
                      const float* v) override {
    return cache_->Append(seq, layer, n, k, v);
  }
  absl::Status PrefillAttention(kernels::SeqId seq, int layer, int64_t n, int num_q_heads,
                                const float* q, const float* k, const float* v, float scale,
                                float* out) override {
    return cache_->PrefillAttention(seq, layer, n, num_q_heads, q, k, v, scale, out);
  }
  absl::Status DecodeAttention(kernels::SeqId seq, int layer, int num_q_heads, const float* q,
                               float scale, float* out) override {
    return cache_->DecodeAttention(seq, layer, num_q_heads, q, scale, out);
  }

  // Tokens reserved for `seq` (rounded up to whole blocks); -1 if unknown.
  int64_t ReservedTokens(kernels::SeqId seq) const {
    auto it = sequences_.find(seq);
    if (it == sequences_.end()) return -1;
    return cache_->BlocksForTokens(it->second.reserved_tokens) * cache_->config().block_size;
  }
  void Advance(kernels::SeqId seq, int64_t n) { sequences_[seq].length += n; }

 private:
  struct SequenceState {
    int64_t length = 0;
    int64_t reserved_tokens = 0;
  };
  std::unique_ptr<kernels::KvCache> cache_;
  std::unordered_map<kernels::SeqId, SequenceState> sequences_;
};

class NullModelRunner : public ModelRunner {
 public:
  NullModelRunner(LlamaConfig config, std::unique_ptr<TokenCountingCache> cache)
      : config_(std::move(config)), cache_(std::move(cache)) {}

  const LlamaConfig& config() const override { return config_; }
  kernels::KvCache& kv_cache() override { return *cache_; }
  std::string backend_name() const override { return "null"; }

  absl::Status Forward(std::span<const ForwardChunk> chunks, float* logits) override {
    if (chunks.empty()) return absl::OkStatus();
    if (logits == nullptr) return absl::InvalidArgumentError("logits output is null");
    RETURN_IF_ERROR(Validate(chunks));
    const int vocab = config_.vocab_size;
    float* row = logits;
    for (const ForwardChunk& chunk : chunks) {
      const size_t first = chunk.all_logits ? 0 : chunk.tokens.size() - 1;
      for (size_t i = first; i < chunk.tokens.size(); ++i) {
        std::fill(row, row + vocab, 0.0f);
        row[NullRunnerNextToken(chunk.tokens[i], vocab)] = 1.0f;
        row += vocab;
      }
      cache_->Advance(chunk.seq, static_cast<int64_t>(chunk.tokens.size()));
    }
    return absl::OkStatus();
  }

 private:
  absl::Status Validate(std::span<const ForwardChunk> chunks) const {
    RETURN_IF_ERROR(ValidateForwardChunks(chunks, config_, *cache_));
    for (const ForwardChunk& chunk : chunks) {
      const int64_t end = cache_->Length(chunk.seq, 0) + static_cast<int64_t>(chunk.tokens.size());
      if (end > cache_->ReservedTokens(chunk.seq)) {
        return absl::FailedPreconditionError(
            absl::StrCat("sequence ", chunk.seq, " would reach ", end, " tokens but only ",
                         cache_->ReservedTokens(chunk.seq), " are reserved"));
      }
    }
    return absl::OkStatus();
  }

  LlamaConfig config_;
  std::unique_ptr<TokenCountingCache> cache_;
};

}  // namespace

int32_t NullRunnerNextToken(int32_t last_token, int vocab_size) {
  const int64_t next = (static_cast<int64_t>(last_token) * 31 + 7) % vocab_size;
  return static_cast<int32_t>(next < 0 ? next + vocab_size : next);
}

absl::StatusOr<std::unique_ptr<ModelRunner>> CreateNullModelRunner(
    const NullRunnerOptions& options) {
  const RunnerOptions& ro = options.runner;
  const std::filesystem::path dir(ro.model_dir);
  ASSIGN_OR_RETURN(LlamaConfig config, LoadLlamaConfig((dir / "config.json").string()));
  if (options.max_position_embeddings < 0) {
    return absl::InvalidArgumentError(absl::StrCat("max_position_embeddings must be >= 0, got ",
                                                   options.max_position_embeddings));
  }
  if (options.max_position_embeddings > 0) {
    config.max_position_embeddings = options.max_position_embeddings;
  }
  ASSIGN_OR_RETURN(std::unique_ptr<kernels::KvCache> cache,
                   CreateSizedKvCache(config, ro, kernels::CreateCpuKvCache));
  const int64_t num_blocks = cache->total_blocks();
  KVGATE_LOG(WARNING) << "NULL backend (benchmark/test tool: no model math, deterministic "
                         "placeholder tokens): config from "
                      << ro.model_dir << ", vocab " << config.vocab_size << ", max context "
                      << config.max_position_embeddings << "; KV " << ro.kv_format.name << ", "
                      << num_blocks << " blocks of " << ro.kv_block_size << " tokens";
  return std::unique_ptr<ModelRunner>(new NullModelRunner(
      std::move(config), std::make_unique<TokenCountingCache>(std::move(cache))));
}

}  // namespace kvgate::worker
