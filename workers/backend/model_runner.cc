#include "workers/backend/model_runner.h"

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

}  // namespace kvgate::worker
