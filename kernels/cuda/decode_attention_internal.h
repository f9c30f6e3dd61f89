// Internal interface between the host side (decode_attention.cc) and the CUDA kernels
// (decode_attention.cu) of kvgate_kernels_cuda. Not installed; includes cuda_runtime.h.
//
//   SetupSplitKernel(kKindTurbo, 128, 8, smem_bytes, &ctas_per_sm);   // once per (kind, d, g)
//   LaunchDecode(kKindTurbo, 128, 8, args, params, ...);               // per call
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace kvgate::kernels::cuda::internal {

enum : int { kKindFp16 = 0, kKindBf16, kKindFp8, kKindInt8, kKindKivi, kKindTurbo };

// Scores of one tile live in shared memory [G][kMaxTileTokens].
inline constexpr int kMaxTileTokens = 128;

// Per-format constants (passed by value to the kernel).
struct FormatParams {
  int record_bytes = 0;  // key_bytes + value bytes of one token
  int key_bytes = 0;
  // KIVI
  int kivi_bits = 0, kivi_group = 0, kivi_codes_bytes = 0;
  // TurboQuant: channels [0, hi) at hi_bits, [hi, d) at lo_bits; fp16 norm after the codes.
  int tq_key_hi_channels = 0, tq_key_hi_bits = 0, tq_key_lo_bits = 0, tq_key_code_bytes = 0;
  int tq_value_hi_channels = 0, tq_value_hi_bits = 0, tq_value_lo_bits = 0,
      tq_value_code_bytes = 0;
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
  const int32_t* residual_lens = nullptr;
  const uint16_t* residual_k = nullptr;
  const uint16_t* residual_v = nullptr;
  int residual_capacity = 0;
  int residual_tile_tokens = 0;
  const float* head_scales = nullptr;
  float* qprep = nullptr;  // [seqs, q_heads, d]
  float* part_acc = nullptr;     // [seqs, kv_heads, total_splits, G, d]
  float* part_ml = nullptr;      // [seqs, kv_heads, total_splits, G, 2]
  int num_q_heads = 0;
  int block_size = 0;
  int tile_blocks = 0;
  int blocks_per_split = 0;
  int num_splits = 0;    // splits over the blocks
  int total_splits = 0;  // + 1 for the KIVI residual split
};

int MaxStages();
int ThreadsPerCta();
cudaError_t SetupSplitKernel(int kind, int d, int g, int smem_bytes, int* blocks_per_sm);
cudaError_t LaunchDecode(int kind, int d, int g, const SplitArgs& a, const FormatParams& fp,
                         int num_kv_heads, int num_seqs, int smem_bytes, const float* q, float* out,
                         const float* signs, float scale, cudaStream_t stream);

}  // namespace kvgate::kernels::cuda::internal
