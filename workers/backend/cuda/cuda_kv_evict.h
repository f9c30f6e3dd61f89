// Device side of KV eviction (H2O, attention sinks) for CudaKvCache, per-token formats only
// (fp16, bf16, fp8, int8): the semantics are CpuKvCache's (kernels/cpu/cpu_kv_cache.cc).
//
// Every slot of the pool has an int32 position and (H2O) a float attention mass in two arrays laid
// out like the records: [num_blocks][layer][kv_head][block_size], so they follow the block tables
// and free with the blocks.
//
//   LaunchEvictCompact: before a layer's append, per (sequence, kv-head): keep the first `lead`
//     slots, the last `trail` slots and the `heavy` middle slots of largest mass (ties: lower slot,
//     i.e. older position), compact records, positions and masses in slot order, then give the
//     `n` slots the append will fill their positions and zero mass.
//   LaunchDecodeMass: after decode attention, per (sequence, kv-head): recompute the scores of the
//     stored keys for the group's queries (fp32, as the CPU does; one key per thread, the keys
//     split over CTAs), their softmax (M, L), and add sum_j exp(s_j - M_j) / L_j to every slot's
//     mass.
//   LaunchPrefillMass: the same for chunks of prefill queries over the cached prefix (read back in
//     fp32) and the fresh keys (causal).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace kvgate::worker::cuda {

// What one sequence keeps before an append of n tokens (host-computed: CudaKvCache::PlanEviction).
struct EvictPlan {
  int32_t stored = 0;  // slots before eviction
  int32_t lead = 0;    // first slots always kept (sinks)
  int32_t trail = 0;   // last slots always kept (recent / window)
  int32_t heavy = 0;   // middle slots kept by mass (H2O)
  int32_t length = 0;  // logical length before the append: the first new slot's position
  int32_t n = 0;       // tokens the append adds
};
static_assert(sizeof(EvictPlan) == 6 * sizeof(int32_t));

// Key encodings the mass kernels read.
enum class MassKeyFormat : int { kFp16 = 0, kBf16, kFp8, kInt8 };

// Where a layer's records, positions and masses live.
struct EvictPool {
  uint8_t* pool = nullptr;
  int64_t block_stride_bytes = 0;
  int64_t layer_offset_bytes = 0;
  int record_bytes = 0;
  int32_t* positions = nullptr;  // [num_blocks][layers][kv_heads][block_size]
  float* mass = nullptr;         // same layout; nullptr without H2O
  int num_layers = 0;
  int layer = 0;
  int num_kv_heads = 0;
  int block_size = 0;
  int head_dim = 0;
  const int32_t* block_tables = nullptr;  // [num_seqs, max_blocks]
  int max_blocks = 0;
  int num_seqs = 0;
};

cudaError_t LaunchEvictCompact(const EvictPool& p, const EvictPlan* plans, cudaStream_t stream);

// Keys for the mass kernels.
struct MassKeys {
  MassKeyFormat format = MassKeyFormat::kFp16;
  const float* head_scales = nullptr;  // fp8: [slots][kv_heads][2] of this layer
  const int32_t* seq_slots = nullptr;  // [num_seqs] state slot of each sequence
};

// Splits of the decode mass: each (sequence, kv-head) runs over at most kMaxMassSplits CTAs of
// one key per thread (two passes: per-split softmax statistics, then the masses).
inline constexpr int kMaxMassSplits = 256;
// Floats of the per-split statistics for num_seqs sequences ([seqs][kv_heads][splits][8][2]).
inline constexpr int64_t DecodeMassScratchFloats(int64_t num_seqs, int num_kv_heads) {
  return num_seqs * num_kv_heads * kMaxMassSplits * 8 * 2;
}

// q [num_seqs, kv_heads * group_pad, head_dim] fp32 (padding heads ignored), lens [num_seqs]
// stored slots (device), max_len >= every lens[s]; partial_ml: DecodeMassScratchFloats floats.
cudaError_t LaunchDecodeMass(const EvictPool& p, const MassKeys& keys, const int32_t* lens,
                             int max_len, const float* q, int group, int group_pad, float scale,
                             float* partial_ml, cudaStream_t stream);

// One prefill chunk: batch index (its block table row), first query row in q / fresh keys, query
// tokens n, cached slots before the fresh ones, and its row in prefix_k (-1: none).
struct PrefillMassChunk {
  int32_t batch_index = 0;
  int32_t first_row = 0;
  int32_t n = 0;
  int32_t cached = 0;
  int32_t prefix_index = -1;
};
static_assert(sizeof(PrefillMassChunk) == 5 * sizeof(int32_t));

// q [rows, kv_heads * group_pad, head_dim], fresh_k rows at fresh_row_stride (kv-head h at
// h * head_dim), prefix_k [prefix chunks, kv_heads, prefix_stride_tokens, head_dim] (fp32, the
// cached keys as the format stores them).
cudaError_t LaunchPrefillMass(const EvictPool& p, const PrefillMassChunk* chunks, int num_chunks,
                              int max_chunk_tokens, const float* q, int group, int group_pad,
                              const float* fresh_k, int64_t fresh_row_stride, const float* prefix_k,
                              int64_t prefix_stride_tokens, float scale, cudaStream_t stream);

}  // namespace kvgate::worker::cuda
