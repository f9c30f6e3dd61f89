// Internal interface between the host side (kv_append.cc) and the CUDA kernels (kv_append.cu) of
// the device KV append / read-back (kvgate/kernels/cuda_kv_append.h). Not installed; includes
// cuda_runtime.h.
//
//   SetupAppendKernels(format);                    // once, at Create (shared-memory limits)
//   LaunchAppend(format, args, stream);            // per call: enqueue only
//   LaunchRead(format, read_args, stream);
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace kvgate::kernels::cuda::internal {

enum : int { kAppendFp16 = 0, kAppendBf16, kAppendFp8, kAppendInt8, kAppendKivi, kAppendTurbo };

// TurboQuant lookup table (device memory, built at Create): for each half (0 keys, 1 values) and
// each channel class (0: channels [0, hi), 1: [hi, d)), 32 floats: the centroids (2^bits, padded
// to 16) and then the 2^bits - 1 decision bounds (padded to 16), exactly as TurboCodebook builds
// them. Then 8 words of sign bits: bit c set = the rotation's random sign of channel c is -1.
inline constexpr int kTurboTableFloats = 2 * 2 * 32;
inline constexpr int kTurboSignWords = 8;  // head_dim <= 256

// Format constants of one CudaKvAppend, passed by value to every kernel.
struct AppendFormat {
  int kind = 0;
  int head_dim = 0, num_kv_heads = 0, block_size = 0;
  int record_bytes = 0, key_bytes = 0;
  // The fp16 residual window (KIVI, TurboQuant with R > 0): R newest tokens kept (0: no window)
  // and the tokens encoded out of it at a time (KIVI: G, TurboQuant: 16). Capacity R + flush.
  int window_tokens = 0, flush_tokens = 0;
  // KIVI: bits (keys and values alike), group G, code bytes of one half (d*bits/8).
  int kivi_bits = 0, kivi_group = 0, kivi_codes_bytes = 0;
  // TurboQuant, [0] keys and [1] values: channels [0, hi) at hi_bits, [hi, d) at lo_bits, then
  // the fp16 norm at byte code_bytes of the half.
  int tq_hi_channels[2] = {}, tq_hi_bits[2] = {}, tq_lo_bits[2] = {}, tq_code_bytes[2] = {};
  float tq_wht_scale = 0;           // 1 / sqrt(d), computed as FastWalshHadamard does
  float tq_debias[2] = {1, 1};      // TurboCodebook::norm_debias() per half (1: debias=0)
  const float* tq_table = nullptr;  // kTurboTableFloats floats + kTurboSignWords words (device)
};

// One append call (AppendBatch, plus what the host derived from it).
struct AppendArgs {
  uint8_t* pool = nullptr;
  int64_t block_stride_bytes = 0, layer_offset_bytes = 0;
  const int32_t* block_tables = nullptr;
  int max_blocks_per_seq = 0, num_seqs = 0;
  const int32_t* seq_slots = nullptr;
  const int32_t* row_begin = nullptr;
  const int32_t* stored_before = nullptr;
  int num_rows = 0, max_rows_per_seq = 0;
  const float* k = nullptr;
  const float* v = nullptr;
  int64_t row_stride = 0;
  float* head_scales = nullptr;
  uint16_t* residual_k = nullptr;
  uint16_t* residual_v = nullptr;
  int residual_capacity = 0;
  int32_t* head_window = nullptr;  // AppendBatch::head_window
  // Every record's address is a multiple of store_width (2, 4, 8 or 16 bytes): records are
  // written with stores that wide. vec_loads: k and v rows are 16-byte aligned (loads of d/32
  // or 4 floats at a time).
  int store_width = 2;
  bool vec_loads = false;
  // FP8: at most kFusedAmaxRows rows per sequence, so the encode kernel takes each sequence's
  // amax itself instead of a separate Fp8AmaxKernel launch.
  bool fuse_amax = false;
};
inline constexpr int kFusedAmaxRows = 16;

struct ReadArgs {
  const uint8_t* pool = nullptr;
  int64_t block_stride_bytes = 0, layer_offset_bytes = 0;
  const int32_t* block_tables = nullptr;
  int max_blocks_per_seq = 0, num_seqs = 0;
  const int32_t* seq_slots = nullptr;
  const int32_t* lens = nullptr;
  int max_len = 0;
  const float* head_scales = nullptr;
  const uint16_t* residual_k = nullptr;
  const uint16_t* residual_v = nullptr;
  int residual_capacity = 0;
  const int32_t* head_window = nullptr;  // ReadBatch::head_window
  const uint8_t* key_offsets = nullptr;  // ReadBatch::key_offsets (KIVI under eviction)
  int64_t key_offsets_block_stride = 0;
  float* out_k = nullptr;
  float* out_v = nullptr;
  int64_t out_stride_tokens = 0;
  int load_width = 2;       // as AppendArgs::store_width
  bool vec_stores = false;  // out rows can be stored d/32 floats at a time
};

// Dynamic shared memory the KIVI group kernel needs for a format (bytes).
int KiviGroupSmemBytes(const AppendFormat& f);
// Raises the kernels' dynamic shared-memory limits where a format needs more than 48 KB.
cudaError_t SetupAppendKernels(const AppendFormat& f);
cudaError_t LaunchAppend(const AppendFormat& f, const AppendArgs& a, cudaStream_t stream);
cudaError_t LaunchRead(const AppendFormat& f, const ReadArgs& a, cudaStream_t stream);

}  // namespace kvgate::kernels::cuda::internal
