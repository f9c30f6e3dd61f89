// CUDA append (encode) and read-back (dequantize) of the paged KV cache, for every KV format the
// CPU reference stores, so that a GPU worker never encodes on the host.
//
// Same device pool as kvgate/kernels/cuda_attention.h: [num_blocks][layer][kv_head][block_size]
// [record_bytes], a record being one token's [key | value] bytes exactly as kernels/cpu/kv_codec.cc
// encodes them, and the same per-sequence side state:
//   - FP8: (key_scale, value_scale) per (sequence, kv-head); 0 = not chosen yet. An append chooses
//     them like CpuKvCache::Append (KvCodec::ChooseScales): from the amax of the sequence's rows in
//     that call (keys amax/192, values amax/96), only while still 0 and only from a nonzero
//     finite amax; then every row is encoded with them.
//   - KIVI and TurboQuant with R > 0 (tq4 etc.; "tq:k=4,v=4,r=0" has none): the fp16 residual
//     window of the newest tokens in the ORIGINAL basis, [kv_heads][residual_capacity = R + F]
//     [head_dim] per sequence (keys and values apart), F being the tokens flushed at a time (KIVI:
//     its key group G; TurboQuant: 16). An append follows CpuKvCache::Append: new tokens are
//     rounded to fp16 into the window; while the window holds >= R + F tokens its oldest F are
//     encoded (KIVI: as one key group; TurboQuant: token by token) into the next F block slots,
//     from their fp16 values, and the window shifts down by F. The caller tracks the
//     encoded/residual split on the host (it follows from the token counts alone: see
//     SplitStoredTokens below) and passes stored counts in.
// Per-sequence state arrays are indexed by a SLOT: seq_slots[s] for batch entry s (nullptr: slot =
// s), so a runner can keep state for its sequences at fixed slots and batch any subset of them.
// The slots of one batch must be distinct.
//
// Every pointer in the batches is a DEVICE pointer; streams are cudaStream_t passed as void*.
// Append and Read only enqueue (no host synchronization, no allocation). The records are the CPU
// codec's bytes exactly (tests/gpu/cuda_kv_append_test.cc compares them): the kernels repeat the
// CPU's float operations in its order, TurboQuant's norms and Walsh-Hadamard transform included.
// While one Append runs, an FP8 scale being chosen transiently holds -amax (sign bit set); work
// ordered after the Append on its stream sees the final scale.
//
// Supported: head_dim 64, 128, 256; any block_size; every format of kernels/cpu except
// TurboQuant with QJL keys and eviction (UnimplementedError); KIVI needs 8 | G. Eviction itself is
// CudaKvCache's (workers/backend/cuda): it compacts the records and windows, and gives the append
// and the read per-kv-head windows (head_window) and, for KIVI, where key groups start
// (key_offsets).
//
//   ASSIGN_OR_RETURN(auto append, CudaKvAppend::Create(spec, /*head_dim=*/128, /*kv_heads=*/8, 16));
//   AppendBatch a{.pool = d_pool, ...};
//   RETURN_IF_ERROR(append->Append(a, stream));
#pragma once

#include <cstdint>
#include <memory>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "kvgate/kernels/kv_format.h"

namespace kvgate::kernels::cuda {

// The split of a sequence's `stored` tokens (per layer) between the blocks and the fp16 residual
// window, as CpuKvCache::Append leaves it after any sequence of appends totalling `stored`
// tokens: encoded = 0 if stored < R + F, else F * floor((stored - R) / F) (F: KIVI's G,
// TurboQuant's 16); the rest is in the window. For formats without a window (fp16, bf16, fp8,
// int8, TurboQuant with r=0): encoded = stored, residual = 0.
struct StoredSplit {
  int64_t encoded = 0;
  int64_t residual = 0;
};
using KiviCounts = StoredSplit;  // the name from when only KIVI had a window
StoredSplit SplitStoredTokens(const KvFormatSpec& spec, int64_t stored);

// KIVI under eviction (CudaKvCache; CpuKvCache's LayerState::solo_keys): a key group that lost
// members to eviction leaves its survivors as solo keys (kernels/cpu/kv_codec.h: per token,
// (scale, min) per G channels, the value half's layout), and the whole groups that move no longer
// start at multiples of G. The cache then keeps one byte per pool slot, laid out like the records
// ([num_blocks][...][kv_head][block_size]: slot t of kv-head h of a sequence at
// key_offsets[table[t / block_size] * key_offsets_block_stride + h * block_size +
// t % block_size], the pointer at the layer's first byte): the slot's offset within its key group
// (0 .. G-1: the group is slots t - offset .. t - offset + G - 1) or kSoloKeyOffset. Slots of
// the fp16 window carry the offsets they take when flushed. kSoloKeyOffset is in
// kvgate/kernels/kv_record_layout.h. nullptr key_offsets: groups at multiples of G, no solo keys.

// One append call: for one layer, rows of several sequences. Sequence s (batch entry) owns rows
// [row_begin[s], row_begin[s + 1]) of k / v, which follow the `stored_before[s]` tokens it already
// holds for this layer (encoded + residual). At most 65535 sequences per call. A token whose
// block-table entry is missing (beyond max_blocks_per_seq, or negative) is not written.
struct AppendBatch {
  uint8_t* pool = nullptr;                // block pool base (written)
  int64_t block_stride_bytes = 0;         // bytes of one pool block (all layers)
  int64_t layer_offset_bytes = 0;         // this layer's offset inside a block
  const int32_t* block_tables = nullptr;  // [num_seqs, max_blocks_per_seq] pool block ids
  int max_blocks_per_seq = 0;
  int num_seqs = 0;
  const int32_t* seq_slots = nullptr;      // [num_seqs] state slot of each entry (nullptr: s)
  const int32_t* row_begin = nullptr;      // [num_seqs + 1]
  const int32_t* stored_before = nullptr;  // [num_seqs] tokens held before this call
  int num_rows = 0;                        // row_begin[num_seqs] (host value)
  int max_rows_per_seq = 0;                // host value: >= every sequence's row count
  // k, v: row r, kv-head h at k[r * row_stride + h * head_dim] (float32, post-RoPE). row_stride
  // lets the caller pass slices of a fused qkv buffer.
  const float* k = nullptr;
  const float* v = nullptr;
  int64_t row_stride = 0;
  // FP8 only: [slots, kv_heads, 2] (read and, while 0, chosen).
  float* head_scales = nullptr;
  // Formats with a window (residual_capacity() > 0) only: [slots, kv_heads, residual_capacity,
  // head_dim] fp16 (read and written), 16-byte aligned.
  uint16_t* residual_k = nullptr;
  uint16_t* residual_v = nullptr;
  int residual_capacity = 0;
  // TurboQuant with a window, per-kv-head windows (eviction keeps different tokens per head,
  // CudaKvCache): when non-null, [slots, kv_heads] rows in each head's window (read and written:
  // the append leaves the new counts). Head h of sequence s then holds stored_before[s] -
  // head_window[slot * heads + h] tokens in blocks, and its window takes the new rows and flushes
  // as a window of that many rows would (each head's split follows from its own count). nullptr:
  // every head's split follows from stored_before (SplitStoredTokens). KIVI: the flushed
  // groups are written at each head's own encoded count.
  int32_t* head_window = nullptr;
};

// Reads (dequantizes) what attention sees for the first `lens[s]` tokens of sequences, one layer,
// in the ORIGINAL basis (TurboQuant un-rotated; norms applied), as float32:
//   out_k/out_v[s][kv_head][t][head_dim], t < lens[s], with out_stride_tokens slots per (s, head).
// Tokens below the sequence's encoded count come from the blocks, the rest (KIVI, TurboQuant with
// R > 0) from the residual window, as fp16 values. Used by the runner for prefill over a cached
// prefix, and by tests.
struct ReadBatch {
  const uint8_t* pool = nullptr;
  int64_t block_stride_bytes = 0;
  int64_t layer_offset_bytes = 0;
  const int32_t* block_tables = nullptr;
  int max_blocks_per_seq = 0;
  int num_seqs = 0;
  const int32_t* seq_slots = nullptr;  // nullptr: slot = s
  const int32_t* lens = nullptr;       // [num_seqs] tokens to read (= stored: the split
                                       // between blocks and window follows from it)
  int max_len = 0;                     // host value: >= every lens[s]
  const float* head_scales = nullptr;  // FP8
  const uint16_t* residual_k = nullptr;  // with a window (as in AppendBatch)
  const uint16_t* residual_v = nullptr;
  int residual_capacity = 0;
  const int32_t* head_window = nullptr;  // as in AppendBatch (read only)
  // KIVI under eviction: where each slot's key group starts, or solo keys (kSoloKeyOffset above).
  const uint8_t* key_offsets = nullptr;
  int64_t key_offsets_block_stride = 0;
  float* out_k = nullptr;  // [num_seqs, kv_heads, out_stride_tokens, head_dim]
  float* out_v = nullptr;
  int64_t out_stride_tokens = 0;
};

class CudaKvAppend {
 public:
  virtual ~CudaKvAppend() = default;
  // UnimplementedError for formats without a device encoder (TurboQuant QJL keys; any eviction:
  // eviction is the cache's job, not the codec's), InvalidArgumentError for bad shapes.
  static absl::StatusOr<std::unique_ptr<CudaKvAppend>> Create(const KvFormatSpec& spec,
                                                              int head_dim, int num_kv_heads,
                                                              int block_size);
  virtual int record_bytes() const = 0;
  // R + F (the fp16 residual window's capacity in tokens: KIVI R + G, TurboQuant R + 16); 0 for
  // formats without a window (TurboQuant with r=0 included).
  virtual int residual_capacity() const = 0;
  // Enqueues the encode on `stream`. The caller has reserved blocks for every written slot.
  virtual absl::Status Append(const AppendBatch& batch, void* stream) = 0;
  virtual absl::Status Read(const ReadBatch& batch, void* stream) = 0;
};

}  // namespace kvgate::kernels::cuda
