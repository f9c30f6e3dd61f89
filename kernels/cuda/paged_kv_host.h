// Host-side packing of keys/values into the paged layout the CPU cache stores and the CUDA
// decode attention reads (kvgate/kernels/cuda_attention.h), one layer, through the CPU codecs
// (kernels/cpu/kv_codec.h) and with the CPU cache's rules for one Append of all n tokens:
// FP8 scales from the amax of the appended tokens (amax/192 keys, amax/96 values); KIVI and
// TurboQuant with R > 0 keep the newest tokens in their fp16 residual window (SplitStoredTokens:
// encoded = 0 if n < R + F, else F*floor((n - R)/F), F = KIVI's G or TurboQuant's 16) and encode
// the older ones from their fp16-rounded values.
// Used by tests/gpu (compared against CpuKvCache::DecodeAttention) and tools/bench.
//
//   ASSIGN_OR_RETURN(HostPagedKv kv, PackPagedKv(spec, 128, 8, 16, {k0, k1}, {v0, v1}, seed));
//   // upload kv.pool, kv.block_tables, ... and fill a DecodeBatch.
#pragma once

#include <cstdint>
#include <vector>

#include "absl/status/statusor.h"
#include "kvgate/kernels/kv_format.h"

namespace kvgate::kernels::cuda {

struct HostPagedKv {
  int head_dim = 0, num_kv_heads = 0, block_size = 0, record_bytes = 0;
  int64_t block_bytes = 0;  // one block, one layer: num_kv_heads * block_size * record_bytes
  int64_t num_blocks = 0;
  int num_seqs = 0, max_blocks_per_seq = 0, max_encoded_len = 0;
  int residual_capacity = 0;           // R + F with a window (KIVI, TurboQuant R > 0); 0 otherwise
  std::vector<uint8_t> pool;           // [num_blocks][num_kv_heads][block_size][record_bytes]
  std::vector<int32_t> block_tables;   // [num_seqs, max_blocks_per_seq]
  std::vector<int32_t> encoded_lens;   // [num_seqs]
  std::vector<int32_t> residual_lens;  // [num_seqs] (0 without a window)
  std::vector<uint16_t> residual_k, residual_v;  // [num_seqs, heads, capacity, d] fp16 (window)
  std::vector<float> head_scales;                // [num_seqs, heads, 2] (FP8)
  int64_t bytes_read = 0;  // block bytes + residual bytes attention reads (whole blocks)
};

// k[s], v[s]: [len_s, num_kv_heads, head_dim] float32. Pool blocks are assigned in a random
// order drawn from `seed` (so block tables are not the identity).
absl::StatusOr<HostPagedKv> PackPagedKv(const KvFormatSpec& spec, int head_dim, int num_kv_heads,
                                        int block_size, const std::vector<std::vector<float>>& k,
                                        const std::vector<std::vector<float>>& v, uint64_t seed);

}  // namespace kvgate::kernels::cuda
