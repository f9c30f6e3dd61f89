// Paged KV cache: fixed-size blocks of `block_size` tokens, a block table per sequence, storage in
// the configured KV format, and the attention that reads it.
//
// One KvCache holds all layers of a model. Blocks are shared across layers (block b of a sequence
// holds that token range for every layer), so admission is one number: free blocks.
//
//   KvCacheConfig cfg{.num_layers = 8, .num_kv_heads = 2, .head_dim = 64, .block_size = 16,
//                     .num_blocks = 1024, .format = spec};
//   ASSIGN_OR_RETURN(auto cache, CreateCpuKvCache(cfg));
//   RETURN_IF_ERROR(cache->AddSequence(seq, /*reserve_tokens=*/prompt_len));
//   for each layer: cache->Append(seq, layer, n, k, v);  cache->PrefillAttention(...)
//   decode step:    cache->Reserve(seq, len + 1); Append(seq, layer, 1, k, v); DecodeAttention(...)
//   cache->FreeSequence(seq);
//
// Not thread-safe for the same sequence; distinct sequences may be used from distinct threads
// for Append/attention calls (block allocation — AddSequence/Reserve/FreeSequence — must be
// serialized by the caller).
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "kvgate/kernels/kv_format.h"

namespace kvgate::kernels {

using SeqId = int64_t;

struct KvCacheConfig {
  int num_layers = 0;
  int num_kv_heads = 0;
  int head_dim = 0;
  int block_size = 16;     // tokens per block
  int64_t num_blocks = 0;  // blocks in the pool
  KvFormatSpec format;
  // The model's RoPE inverse frequencies [head_dim / 2] (rotate-half layout; keys arrive
  // post-RoPE). Sink eviction uses them for StreamingLLM's positions within the cache: once tokens
  // are evicted, a query scores the sink tokens as if the window directly followed them (the
  // query is rotated back by the number of evicted tokens for those scores; window tokens keep
  // their distances, which are the same in both numberings). Empty: original positions.
  std::vector<double> rope_inv_freq;
};

class KvCache {
 public:
  virtual ~KvCache() = default;

  virtual const KvCacheConfig& config() const = 0;
  virtual const KvFormatDesc& desc() const = 0;

  virtual int64_t free_blocks() const = 0;
  virtual int64_t total_blocks() const = 0;
  // Blocks a sequence of `num_tokens` tokens occupies (ceil(num_tokens / block_size)).
  virtual int64_t BlocksForTokens(int64_t num_tokens) const = 0;
  // Bytes of cache one token occupies over all layers and kv-heads (descriptor-derived).
  virtual int64_t bytes_per_token() const = 0;
  // Bytes actually allocated for the block pool (a test checks it against the descriptor).
  virtual int64_t allocated_bytes() const = 0;

  // Registers a sequence and reserves blocks for `reserve_tokens` tokens.
  // AlreadyExistsError for a known id; ResourceExhaustedError when not enough free blocks (nothing
  // is allocated then).
  virtual absl::Status AddSequence(SeqId seq, int64_t reserve_tokens) = 0;
  // Grows the sequence's block table to hold `num_tokens` tokens. ResourceExhaustedError when the
  // pool has too few free blocks (the sequence keeps what it had).
  virtual absl::Status Reserve(SeqId seq, int64_t num_tokens) = 0;
  // Returns the sequence's blocks to the pool. Unknown ids are ignored.
  virtual void FreeSequence(SeqId seq) = 0;
  // Tokens appended so far for `layer` (-1 if the sequence is unknown).
  virtual int64_t Length(SeqId seq, int layer) const = 0;

  // Appends `n` tokens' keys and values (post-RoPE) at positions Length(seq, layer) ...
  // k, v: [n, num_kv_heads, head_dim] float32, row-major.
  virtual absl::Status Append(SeqId seq, int layer, int64_t n, const float* k, const float* v) = 0;

  // Causal attention for `n` new query tokens whose fresh keys/values are k, v (full precision);
  // they sit at positions Length(seq, layer) - n ... (i.e. call after Append), and attend to the
  // cached prefix before them through the format, and to the fresh tokens in full precision.
  // q, out: [n, num_q_heads, head_dim]; k, v: [n, num_kv_heads, head_dim]. fp32 accumulation.
  virtual absl::Status PrefillAttention(SeqId seq, int layer, int64_t n, int num_q_heads,
                                        const float* q, const float* k, const float* v,
                                        float scale, float* out) = 0;

  // One query token attending to every cached token of (seq, layer), read through the format.
  // q, out: [num_q_heads, head_dim]. num_q_heads must be a multiple of num_kv_heads (GQA).
  virtual absl::Status DecodeAttention(SeqId seq, int layer, int num_q_heads, const float* q,
                                       float scale, float* out) = 0;

  // ---- Optional extensions (defaults keep other implementations source-compatible) ----

  // Bytes a sequence holds outside the block pool whatever its length: KIVI's fp16 residual
  // window of the newest R (+ up to G-1) tokens, over all layers and kv-heads. Admission should
  // add it per running sequence.
  virtual int64_t residual_bytes_per_sequence() const { return 0; }
  // Tokens of (seq, layer) actually held for one kv-head (<= Length under eviction; -1 unknown).
  virtual int64_t StoredTokens(SeqId seq, int layer) const { return Length(seq, layer); }
  // Reads back what attention sees for one kv-head: k, v [StoredTokens, head_dim] dequantized in
  // the original basis, positions [StoredTokens] (the token index each slot holds), slot order.
  // For tests, parity checks against other backends and debugging.
  virtual absl::Status ReadStored(SeqId seq, int layer, int kv_head, float* k, float* v,
                                  int64_t* positions) const {
    return absl::UnimplementedError("ReadStored not implemented by this KV cache");
  }
  // H2O eviction: the accumulated attention mass of each stored slot of one kv-head,
  // mass [StoredTokens] in ReadStored's slot order (what the next eviction ranks heavy hitters
  // by). For tests and debugging; FailedPreconditionError without H2O.
  virtual absl::Status ReadAttentionMass(SeqId seq, int layer, int kv_head, float* mass) const {
    return absl::UnimplementedError("ReadAttentionMass not implemented by this KV cache");
  }
};

// CPU reference implementation (the semantics every other backend must match).
absl::StatusOr<std::unique_ptr<KvCache>> CreateCpuKvCache(const KvCacheConfig& config);

}  // namespace kvgate::kernels
