// Internal interface between the host side (decode_attention.cc) and the CUDA kernels
// (decode_attention.cu) of kvgate_kernels_cuda. Not installed; includes cuda_runtime.h.
//
//   SetupSplitKernel(kKindTurbo, 128, 8, smem_bytes, &ctas_per_sm);   // once per (kind, d, g)
//   LaunchDecode(kKindTurbo, /*mma_fmt=*/-1, 128, 8, args, params, ...);  // per call
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace kvgate::kernels::cuda::internal {

// kKindKiviEvict: KIVI under eviction (DecodeBatch::key_offsets), v1 only.
enum : int { kKindFp16 = 0, kKindBf16, kKindFp8, kKindInt8, kKindKivi, kKindTurbo, kKindKiviEvict };

// Scores of one tile live in shared memory [G][kMaxTileTokens].
inline constexpr int kMaxTileTokens = 128;
// Splits per (sequence, kv-head) the reduction kernel accepts (the window's split included).
inline constexpr int kMaxReduceSplits = 2048;

// Per-format constants (passed by value to the kernel).
struct FormatParams {
  int record_bytes = 0;  // key_bytes + value bytes of one token
  int key_bytes = 0;
  // KIVI
  int kivi_bits = 0, kivi_group = 0, kivi_codes_bytes = 0;
  // TurboQuant: channels [0, hi) at hi_bits, [hi, d) at lo_bits; fp16 norm after the codes.
  int tq_key_hi_channels = 0, tq_key_hi_bits = 0, tq_key_lo_bits = 0, tq_key_code_bytes = 0;
  int tq_value_hi_channels = 0, tq_value_hi_bits = 0, tq_value_lo_bits = 0, tq_value_code_bytes = 0;
  // Centroids: [0,16) key hi, [16,32) key lo, [32,48) value hi, [48,64) value lo.
  float tables[64] = {};
};

struct SplitArgs {
  const uint8_t* pool = nullptr;
  int64_t block_stride_bytes = 0;
  int64_t layer_offset_bytes = 0;
  const int32_t* block_tables = nullptr;
  int max_blocks_per_seq = 0;
  const int32_t* encoded_lens = nullptr;
  // fp16 window of KIVI and TurboQuant (R > 0), original basis; nullptr residual_lens: none.
  const int32_t* residual_lens = nullptr;
  const uint16_t* residual_k = nullptr;
  const uint16_t* residual_v = nullptr;
  int residual_capacity = 0;
  int residual_tile_tokens = 0;
  // DecodeBatch::head_window (nullptr: every head holds encoded_lens / residual_lens).
  const int32_t* head_window = nullptr;
  // DecodeBatch::key_offsets (kKindKiviEvict), at the layer's first byte.
  const uint8_t* key_offsets = nullptr;
  int64_t key_offsets_block_stride = 0;
  // TurboQuant's window split scores the window keys against the query in the original basis
  // (query [seqs, q_heads, d] times query_scale) and rotates its partial output by the codec's
  // random signs then Walsh-Hadamard (signs, d floats), so that it merges with the rotated-domain
  // splits before the reduction's single un-rotation. Set by LaunchDecode.
  const float* query = nullptr;
  float query_scale = 0.f;
  const float* signs = nullptr;
  const float* head_scales = nullptr;
  // Per-sequence state slot of batch entry s (head_scales, residual_k/v); nullptr: slot s.
  const int32_t* seq_slots = nullptr;
  float* qprep = nullptr;     // [seqs, q_heads, d]
  float* part_acc = nullptr;  // [seqs, kv_heads, total_splits, G, d]
  float* part_ml = nullptr;   // [seqs, kv_heads, total_splits, G, 2]
  // Attention sinks (DecodeBatch::sink_slots; nullptr: none). PrepareQueryKernel also writes
  // qprep_sink, the query rotated back by sink_shift[s] RoPE positions (rope_inv_freq) and
  // prepared (TurboQuant: then rotated like qprep); the tensor-core kernel's CTA at split
  // num_splits scores the slots [0, sink_slots[s]) held in blocks against it and the block splits
  // mask those slots. TurboQuant with a window: two window splits after the sinks' (v1 kernel,
  // split_offset num_splits + 1): the first scores the sink slots still in the window (its first
  // rows) against query_sink (the shifted query in the original basis, times scale * log2 e), the
  // second the other rows against the query. kKindKiviEvict (v1) instead scores each slot below
  // sink_slots[s] against qprep_sink in the block and window splits themselves (no extra split).
  const int32_t* sink_slots = nullptr;
  const int32_t* sink_shift = nullptr;
  const double* rope_inv_freq = nullptr;
  float* qprep_sink = nullptr;  // [seqs, q_heads, d]
  int num_q_heads = 0;
  int block_size = 0;
  int tile_blocks = 0;
  int blocks_per_split = 0;
  int num_splits = 0;    // splits over the blocks
  int total_splits = 0;  // + 1 for the sinks' split, + 1 for the fp16 window's split (KIVI,
                         // TurboQuant with R > 0; 2 with sinks)
  int split_offset = 0;  // v1 kernel: blockIdx.x + split_offset is the split
  // TurboQuant sinks with a window: the shifted query in the original basis (see sink_slots);
  // last, so that the other fields keep their offsets.
  float* query_sink = nullptr;  // [seqs, q_heads, d]
  // Without sinks: the fp16 window's rows are shared by window_row_splits splits (split
  // num_splits + w takes rows [w * ceil(len / n), ...)), so that a few (sequence, kv-head) pairs
  // do not leave their window to one CTA each.
  int window_row_splits = 1;
};

int MaxStages();
int ThreadsPerCta();
cudaError_t SetupSplitKernel(int kind, int d, int g, int smem_bytes, int* blocks_per_sm);
// v2 tensor-core split kernel (DecodeMmaKernel), one instance per (format id, d), any G <= 8.
// Format ids: kKindFp16/Bf16/Fp8/Int8, KIVI 10 + bits (2, 4), TurboQuant with equal key and value
// rates 20 (4), 21 (3.5), 22 (3), 23 (2.5). Shared memory: kStagesMma tiles + 16 bytes of slack
// (+ KIVI's staged group metadata: 2 * (tile_tokens / G) * d words), and at least the warp merge
// (MmaMergeBytes(d)).
int MmaStages();
inline constexpr int MmaMergeBytes(int d) { return 4 * 8 * d * 4 + 4 * 8 * 2 * 4; }
cudaError_t SetupMmaKernel(int fmt, int d, int smem_bytes, int* blocks_per_sm);
// mma_fmt < 0: the v1 DecodeSplitKernel over all splits (smem_bytes; no sinks). Otherwise
// DecodeMmaKernel over the num_splits block splits (+ the sinks' split; smem_bytes) and, for the
// fp16 window's splits (KIVI, TurboQuant), DecodeSplitKernel (smem_v1_bytes) at the last ones.
cudaError_t LaunchDecode(int kind, int mma_fmt, int d, int g, const SplitArgs& a,
                         const FormatParams& fp, int num_kv_heads, int num_seqs, int smem_bytes,
                         int smem_v1_bytes, const float* q, float* out, const float* signs,
                         float scale, cudaStream_t stream);

}  // namespace kvgate::kernels::cuda::internal
