// CUDA decode attention over the paged KV cache, for every KV format the CPU reference stores.
//
// The device pool has exactly the CPU cache's byte layout (kernels/cpu/cpu_kv_cache.cc):
// [num_blocks][layer][kv_head][block_size][record_bytes], a record being one token's
// [key | value] bytes as kernels/cpu/kv_codec.cc encodes them. A block table per sequence maps
// logical block i (tokens [i*bs, (i+1)*bs)) to a pool block. The newest tokens of KIVI and of
// TurboQuant with R > 0 live outside the pool in an fp16 residual window per (sequence, kv-head),
// in the original basis; FP8's scales are per (sequence, kv-head). This header is host-only:
// every pointer in DecodeBatch is a DEVICE pointer, and the stream is a cudaStream_t passed as
// void* so that no CUDA header leaks to callers.
//
// Kernels: split-KV (each CTA one kv-head group x a range of blocks, all query heads of the group
// so each KV byte is read once; whole block segments copied into shared memory by bulk copies,
// fp32 online softmax), then a reduction kernel over the splits (docs/GPU_NOTES.md). The fp16
// window is one more split, and so are the attention sinks of sink eviction (scored with a
// RoPE-shifted query; DecodeBatch::sink_slots). TurboQuant scores codes against the query rotated
// once per call and accumulates values in the rotated domain; its window split scores against the
// query as given and rotates its partial output, and the reduction un-rotates the merged output
// once.
//
//   ASSIGN_OR_RETURN(auto attn, CudaDecodeAttention::Create(spec, /*head_dim=*/128,
//                                                            /*num_kv_heads=*/8,
//                                                            /*block_size=*/16));
//   DecodeBatch b{.pool = d_pool, .block_stride_bytes = ..., ...};
//   RETURN_IF_ERROR(attn->Run(b, /*stream=*/nullptr));
#pragma once

#include <cstdint>
#include <memory>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "kvgate/kernels/kv_format.h"

namespace kvgate::kernels::cuda {

// OK when a CUDA device is usable; otherwise the reason (no driver, no device, ...).
absl::Status CudaDeviceStatus();

// One decode call over a batch of sequences, one layer. Device pointers unless noted.
struct DecodeBatch {
  const uint8_t* pool = nullptr;   // block pool base
  int64_t block_stride_bytes = 0;  // bytes of one pool block (all layers)
  int64_t layer_offset_bytes = 0;  // this layer's offset inside a block
  const int32_t* block_tables = nullptr;  // [num_seqs, max_blocks_per_seq]
  int max_blocks_per_seq = 0;
  const int32_t* encoded_lens = nullptr;  // [num_seqs] tokens stored in blocks
  int max_encoded_len = 0;                // host value: max of encoded_lens (plans the splits)
  // KIVI and TurboQuant with R > 0 (other formats ignore these): fp16 residual window
  // [num_seqs, num_kv_heads, residual_capacity, head_dim], original basis, token i of sequence s
  // at position encoded_lens[s] + i. residual_capacity: R + 16 for TurboQuant, R + G for KIVI
  // (CudaKvAppend / PackPagedKv lay it out).
  const int32_t* residual_lens = nullptr;  // [num_seqs]; nullptr = no residual tokens
  const uint16_t* residual_k = nullptr;
  const uint16_t* residual_v = nullptr;
  int residual_capacity = 0;
  // Per-kv-head windows (eviction with a window, CudaKvCache): when non-null (with residual_lens),
  // [slots, num_kv_heads] rows of each head's window at the sequence's state slot; kv-head h of
  // sequence s then holds encoded_lens[s] + residual_lens[s] - head_window[slot * heads + h]
  // tokens in blocks (max_encoded_len must cover encoded_lens[s] + residual_lens[s]) and the
  // rest in its window.
  const int32_t* head_window = nullptr;
  // KIVI under eviction (CudaKvCache): where each slot's key group starts, or solo keys
  // (kvgate/kernels/cuda_kv_append.h, ReadBatch::key_offsets; same layout). Runs the CUDA-core
  // kernel that reads them (not the tensor-core one): the KIVI decode without them is unchanged.
  const uint8_t* key_offsets = nullptr;
  int64_t key_offsets_block_stride = 0;
  // FP8 only: [num_seqs, num_kv_heads, 2] = (key_scale, value_scale).
  const float* head_scales = nullptr;
  // Per-sequence state slots: when non-null, batch entry s reads head_scales and the residual
  // window (residual_k/v) at slot seq_slots[s] instead of s (those arrays are then [slots, ...]);
  // block_tables, encoded_lens, residual_lens, q and out stay indexed by s. Lets a runner keep
  // state at fixed slots (kvgate/kernels/cuda_kv_append.h) and batch any subset of sequences.
  const int32_t* seq_slots = nullptr;
  // Attention sinks under sink eviction (StreamingLLM positions within the cache; CpuKvCache's
  // SinkShift): when sink_slots is non-null, slots [0, sink_slots[s]) of sequence s are scored
  // against its query rotated back by sink_shift[s] RoPE positions (rotate-half pairs (j, j + d/2)
  // at angle -sink_shift[s] * rope_inv_freq[j], computed in double), every other slot against the
  // query as given. sink_slots[s] = 0 (or a shift of 0) leaves the sequence unshifted. Per-token
  // formats (fp16, bf16, fp8, int8), TurboQuant with equal key and value rates (the shifted
  // query then rotated as CpuKvCache's PrepareShifted does; sink slots still in the fp16 window
  // are its first rows, per head with head_window) and KIVI with key_offsets only: Run returns
  // UnimplementedError for the others.
  const int32_t* sink_slots = nullptr;    // [num_seqs]
  const int32_t* sink_shift = nullptr;    // [num_seqs] evicted tokens (length - stored)
  const double* rope_inv_freq = nullptr;  // [head_dim / 2]
  int num_seqs = 0;
  int num_q_heads = 0;
  const float* q = nullptr;  // [num_seqs, num_q_heads, head_dim] fp32
  float* out = nullptr;      // [num_seqs, num_q_heads, head_dim] fp32
  float scale = 1.0f;        // softmax scale (1/sqrt(head_dim) usually)
};

class CudaDecodeAttention {
 public:
  virtual ~CudaDecodeAttention() = default;
  // UnimplementedError for combinations without a kernel (TurboQuant with QJL keys, head_dim
  // other than 64 / 128, block_size not a multiple of 16, KIVI with G not a multiple of bs).
  static absl::StatusOr<std::unique_ptr<CudaDecodeAttention>> Create(const KvFormatSpec& spec,
                                                                     int head_dim, int num_kv_heads,
                                                                     int block_size);
  virtual int record_bytes() const = 0;
  // Enqueues the attention on `stream` (cudaStream_t or nullptr). Grows an internal workspace on
  // first use (that call synchronizes; it fails inside a CUDA graph capture, so run a shape
  // eagerly before capturing it). InvalidArgumentError for bad shapes or a pool, block
  // stride or layer offset that is not 16-byte aligned; InternalError with the CUDA error string
  // when a launch fails.
  virtual absl::Status Run(const DecodeBatch& batch, void* stream) = 0;
  // Splits per (sequence, kv-head) the last Run used (for reports and tests).
  virtual int last_num_splits() const = 0;
  // Forces the number of splits of the block range (0 = automatic); tests use it to exercise
  // the reduction with many and with one split.
  virtual void set_forced_splits(int splits) = 0;
  // Counts the reallocations of the internal workspace: a CUDA graph that captured Run holds the
  // workspace's address and is stale once this changes.
  virtual uint64_t workspace_generation() const = 0;
};

}  // namespace kvgate::kernels::cuda
