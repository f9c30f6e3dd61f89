#include "workers/backend/model_runner.h"

#include <cmath>
#include <set>

#include "absl/strings/str_cat.h"

namespace kvgate::worker {

absl::Status ValidateForwardChunks(std::span<const ForwardChunk> chunks, const LlamaConfig& config,
                                   const kernels::KvCache& cache) {
  std::set<kernels::SeqId> seen;
  for (size_t c = 0; c < chunks.size(); ++c) {
    const ForwardChunk& chunk = chunks[c];
    if (chunk.tokens.empty()) {
      return absl::InvalidArgumentError(
          absl::StrCat("chunk ", c, " (sequence ", chunk.seq, ") has no tokens"));
    }
    if (!seen.insert(chunk.seq).second) {
      return absl::InvalidArgumentError(
          absl::StrCat("sequence ", chunk.seq, " appears twice in one forward step"));
    }
    const int64_t past = cache.Length(chunk.seq, 0);
    if (past < 0) return absl::InvalidArgumentError(absl::StrCat("unknown sequence ", chunk.seq));
    const int64_t end = past + static_cast<int64_t>(chunk.tokens.size());
    if (end > config.max_position_embeddings) {
      return absl::InvalidArgumentError(absl::StrCat("sequence ", chunk.seq, " would reach ", end,
                                                     " tokens, beyond max_position_embeddings ",
                                                     config.max_position_embeddings));
    }
    for (size_t i = 0; i < chunk.tokens.size(); ++i) {
      const int32_t id = chunk.tokens[i];
      if (id < 0 || id >= config.vocab_size) {
        return absl::InvalidArgumentError(
            absl::StrCat("token id ", id, " at index ", i, " of sequence ", chunk.seq,
                         " is outside the vocabulary [0, ", config.vocab_size, ")"));
      }
    }
  }
  return absl::OkStatus();
}

absl::Status ModelRunner::ForwardSample(std::span<const ForwardChunk> chunks,
                                        std::span<const DeviceSampling> sampling, int32_t* tokens) {
  return absl::UnimplementedError(
      absl::StrCat("the ", backend_name(), " backend does not sample on the device"));
}

absl::Status ValidateDeviceSampling(std::span<const ForwardChunk> chunks,
                                    std::span<const DeviceSampling> sampling) {
  if (sampling.size() != chunks.size()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "ForwardSample: ", sampling.size(), " sampling entries for ", chunks.size(), " chunks"));
  }
  for (size_t c = 0; c < chunks.size(); ++c) {
    if (chunks[c].all_logits) {
      return absl::InvalidArgumentError(absl::StrCat("ForwardSample: chunk ", c, " (sequence ",
                                                     chunks[c].seq, ") asks for all logits"));
    }
    const DeviceSampling& s = sampling[c];
    if (!std::isfinite(s.temperature) || s.top_k < 0 || !(s.top_p >= 0.0f && s.top_p <= 1.0f) ||
        !(s.uniform >= 0.0 && s.uniform < 1.0)) {
      return absl::InvalidArgumentError(absl::StrCat(
          "ForwardSample: chunk ", c, " (sequence ", chunks[c].seq, "): temperature ",
          s.temperature, ", top_k ", s.top_k, ", top_p ", s.top_p, ", uniform ", s.uniform,
          " (want a finite temperature, top_k >= 0, top_p in [0, 1], uniform in [0, 1))"));
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<std::unique_ptr<kernels::KvCache>> CreateSizedKvCache(
    const LlamaConfig& config, const RunnerOptions& options, const KvCacheFactory& make_cache) {
  if (options.kv_block_size <= 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("kv_block_size must be positive, got ", options.kv_block_size));
  }
  kernels::KvCacheConfig cache_config{.num_layers = config.num_hidden_layers,
                                      .num_kv_heads = config.num_key_value_heads,
                                      .head_dim = config.head_dim,
                                      .block_size = options.kv_block_size,
                                      .num_blocks = 1,
                                      .format = options.kv_format,
                                      .rope_inv_freq = RopeInverseFrequencies(config)};
  int64_t num_blocks = options.kv_num_blocks;
  if (num_blocks <= 0) {
    absl::StatusOr<std::unique_ptr<kernels::KvCache>> probe = make_cache(cache_config);
    if (!probe.ok()) return probe.status();
    const int64_t block_bytes = (*probe)->bytes_per_token() * options.kv_block_size;
    if (block_bytes <= 0) return absl::InternalError("KV cache reports 0 bytes per token");
    num_blocks = options.kv_cache_bytes / block_bytes;
    if (num_blocks < 1) {
      return absl::InvalidArgumentError(
          absl::StrCat("kv_cache_bytes ", options.kv_cache_bytes, " is less than one block (",
                       block_bytes, " bytes for ", options.kv_block_size, " tokens)"));
    }
  }
  cache_config.num_blocks = num_blocks;
  return make_cache(cache_config);
}

}  // namespace kvgate::worker
