// Device side of KV eviction (H2O, attention sinks) for CudaKvCache, for the per-token formats
// (fp16, bf16, fp8, int8, TurboQuant), KIVI's key groups and the per-kv-head fp16 windows of
// TurboQuant and KIVI: the kept tokens are CpuKvCache's (kernels/cpu/cpu_kv_cache.cc).
//
// Every slot of the pool has an int32 position and (H2O) a float attention mass in two arrays laid
// out like the records: [num_blocks][layer][kv_head][block_size], so they follow the block tables
// and free with the blocks.
//
//   LaunchEvictCompact: before a layer's append, per (sequence, kv-head), leaves the kept tokens in
//     slots [0, kept) and gives the `n` slots the append fills next their positions (and zero
//     mass). H2O (EvictPool::mass set): the kept set is the recent window (positions >= length -
//     trail) plus the `heavy` older tokens of largest mass (ties keep the older token); the
//     evicted ones are found by their order key (mass, then newer position first) with one
//     minimum search per evicted token when few leave (a decode step: one per step) or a radix
//     select otherwise, and the holes they leave below `kept` are filled with the kept records
//     above it. Slots are therefore NOT in position order under H2O: attention and the masses do
//     not depend on the order (only the fp32 summation order changes), the positions travel with
//     the records. Sinks (mass unset): slots stay in position order (the first `lead` slots are
//     the sinks, the last `trail` the window); the kept records are compacted stably.
//     With a window (EvictPool::head_window): one kernel for both kinds chooses the kept set over
//     the records and the window's rows (H2O by the same order key; sinks by position), refills
//     the records' holes as H2O does (the sinks' own slots never move), moves the window's kept
//     rows down in order (the oldest flush first, as on the CPU) to the slots after the kept
//     records, and leaves each head's new window count. KIVI (EvictPool::key_offsets): as
//     CpuKvCache::Evict, the records compact in slot order, a key group that loses some of its
//     tokens leaves its survivors re-encoded as solo keys (byte for byte the CPU codec's), and
//     the window's and the new slots get the key offsets their flushes will give them.
//   LaunchDecodeMass (fp16, bf16, fp8, int8 and TurboQuant keys; KIVI layers take their decode
//     masses from LaunchPrefillMass over read-back keys): after decode attention, per (sequence,
//     kv-head): the scores of the stored keys for the group's queries (fp32, the keys decoded as
//     the CPU codec does; TurboQuant: the codes' centroids against the query rotated as
//     CpuKvCache prepares it, the fp16 window's rows against the query as given), their softmax
//     (M, L) per query head, and sum_j exp(s_j - M_j) / L_j added to every slot's mass. Keys are
//     read once: the first pass writes the scores to a scratch laid out like the slots, the second
//     reads them back.
//   LaunchPrefillMass: the same for chunks of prefill queries over the cached prefix (read back in
//     fp32) and the fresh keys (causal), in tiles of query rows x keys: a first pass gives each
//     query row its (M, L), a second adds each key's probabilities over the rows that see it.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace kvgate::worker::cuda {

// What one sequence keeps before an append of n tokens (host-computed: CudaKvCache::PlanAppend).
struct EvictPlan {
  int32_t stored = 0;  // slots before eviction
  int32_t lead = 0;    // first slots always kept (sinks)
  int32_t trail = 0;   // old tokens of the window, always kept: sinks the last slots, H2O the
                       // positions >= length - trail (every one of them is stored)
  int32_t heavy = 0;   // older tokens kept by mass (H2O)
  int32_t length = 0;  // logical length before the append: the first new slot's position
  int32_t n = 0;       // tokens the append adds
};
static_assert(sizeof(EvictPlan) == 6 * sizeof(int32_t));

// Key encodings the mass kernels read.
enum class MassKeyFormat : int { kFp16 = 0, kBf16, kFp8, kInt8, kTurbo };

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
  // Layers with a per-head fp16 window (TurboQuant with r > 0; nullptr head_window: none): the
  // window rows of each (state slot, kv-head) [slots][kv_heads] (read and written), the windows
  // [slots][kv_heads][residual_capacity][head_dim] fp16 and each sequence's state slot.
  int32_t* head_window = nullptr;
  uint16_t* residual_k = nullptr;
  uint16_t* residual_v = nullptr;
  int residual_capacity = 0;
  const int32_t* seq_slots = nullptr;  // [num_seqs]
  // KIVI (with its window, so head_window is set too): each slot's key-group offset
  // (kvgate/kernels/cuda_kv_append.h, ReadBatch::key_offsets), laid out like the positions (the
  // array's base, not the layer's first byte);
  // the format's bits and group G (8 | G, G | head_dim).
  uint8_t* key_offsets = nullptr;
  int kivi_bits = 0, kivi_group = 0;
};

// The largest fp16 window (residual_capacity) eviction compacts: its rows' metadata are staged in
// shared memory.
inline constexpr int kMaxEvictWindowRows = 1024;

// Grid (num_seqs, kv_heads); plans [num_seqs] (device). Positions (and masses) must be set for
// the `stored` slots of each plan; record_bytes a multiple of 4 without a window. With
// head_window (residual_capacity <= kMaxEvictWindowRows, head_dim <= 128): the kept set is chosen over the
// records and the window's rows together; the records compact as without a window, the window's
// kept rows move down in order after them and head_window becomes their count.
cudaError_t LaunchEvictCompact(const EvictPool& p, const EvictPlan* plans, cudaStream_t stream);

// TurboQuant keys (no QJL), by value: kernels::TurboKeyLayout (kv_format.h), the CPU codec's
// channel split, code bytes, centroids and rotation signs. A key is its codes then an fp16 norm s;
// its score is s * sum_c (Pi q)[c] * centroid(code_c) with Pi q the signs then the orthonormal
// Walsh-Hadamard transform of q, both in fp32 as CpuKvCache computes them. head_dim <= 128.
struct TurboMassKeys {
  int hi_channels = 0, hi_bits = 0, lo_bits = 0, code_bytes = 0;
  float hi_centroids[16] = {};
  float lo_centroids[16] = {};
  float signs[128] = {};
};

// Keys for the mass kernels.
struct MassKeys {
  MassKeyFormat format = MassKeyFormat::kFp16;
  const float* head_scales = nullptr;  // fp8: [slots][kv_heads][2] of this layer
  const int32_t* seq_slots = nullptr;  // [num_seqs] state slot of each sequence
  TurboMassKeys turbo;                 // kTurbo
};

// Query heads per kv-head the mass kernels take.
inline constexpr int kMaxMassGroup = 8;
// Splits of the decode mass: each (sequence, kv-head) runs over at most kMaxMassSplits CTAs (two
// passes: scores and per-split softmax statistics, then the masses).
inline constexpr int kMaxMassSplits = 256;
// Floats of the per-split statistics for num_seqs sequences ([seqs][kv_heads][splits][group][2]).
inline constexpr int64_t DecodeMassScratchFloats(int64_t num_seqs, int num_kv_heads) {
  return num_seqs * num_kv_heads * kMaxMassSplits * kMaxMassGroup * 2;
}
// Floats of the decode scores of one layer per pool block ([kv_heads][group][block_size]).
inline constexpr int64_t DecodeMassScoreFloatsPerBlock(int num_kv_heads, int block_size) {
  return int64_t{num_kv_heads} * kMaxMassGroup * block_size;
}

// q [num_seqs, kv_heads * group_pad, head_dim] fp32 (padding heads ignored), lens [num_seqs]
// stored slots (device), max_len >= every lens[s]; partial_ml: DecodeMassScratchFloats floats;
// scores: DecodeMassScoreFloatsPerBlock floats per pool block ([num_blocks][kv_heads][group]
// [block_size], one layer at a time). group <= kMaxMassGroup, head_dim <= 128. TurboQuant with
// EvictPool::head_window: slots [0, lens[s] - window rows) of a head are records, the rest its
// window's rows (fp16, original basis); the pool, block stride and layer offset 4-byte aligned.
cudaError_t LaunchDecodeMass(const EvictPool& p, const MassKeys& keys, const int32_t* lens,
                             int max_len, const float* q, int group, int group_pad, float scale,
                             float* partial_ml, float* scores, cudaStream_t stream);

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

// Floats of the prefill mass's row statistics per step row ([rows][kv_heads][group][2]).
inline constexpr int64_t PrefillMassStatsFloatsPerRow(int num_kv_heads) {
  return int64_t{num_kv_heads} * kMaxMassGroup * 2;
}

// q [rows, kv_heads * group_pad, head_dim], fresh_k rows at fresh_row_stride (kv-head h at
// h * head_dim), prefix_k [prefix chunks, kv_heads, prefix_stride_tokens, head_dim] (fp32, the
// cached keys as the format stores them); max_chunk_tokens >= every chunk's n, max_chunk_keys >=
// every chunk's cached + n; row_stats: PrefillMassStatsFloatsPerRow floats per row of q.
// group <= kMaxMassGroup, head_dim <= 128 and a multiple of 4.
cudaError_t LaunchPrefillMass(const EvictPool& p, const PrefillMassChunk* chunks, int num_chunks,
                              int max_chunk_tokens, int max_chunk_keys, const float* q, int group,
                              int group_pad, const float* fresh_k, int64_t fresh_row_stride,
                              const float* prefix_k, int64_t prefix_stride_tokens, float scale,
                              float* row_stats, cudaStream_t stream);

}  // namespace kvgate::worker::cuda
