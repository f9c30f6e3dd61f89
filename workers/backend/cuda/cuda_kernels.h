// Device kernels of the CUDA ModelRunner (workers/backend/cuda/cuda_kernels.cu): embedding,
// RMSNorm, the fused q/k/v epilogue (bias, QK-norm, RoPE, KV append in fp16), paged attention
// over the fp16 KV pool for prefill chunks and decode tokens of one step, SwiGLU, and small
// helpers. Host-callable launchers; every pointer is a DEVICE pointer unless noted, every launcher
// enqueues on `stream` and returns the launch error (cudaGetLastError) as cudaError_t, so callers
// turn it into an absl::Status. Activations are fp32 row-major [rows, ...]; weights and GEMM
// inputs bf16 (stored as uint16_t bit patterns); the KV pool fp16 (uint16_t).
//
// KV pool layout (CudaKvCache): [num_blocks][layers][2 (k, v)][kv_heads][block_size][head_dim]
// fp16, so one (block, layer, k|v, kv_head) segment is block_size * head_dim contiguous halves.
//
//   StepRows rows{...};  // per-row chunk index and position, per-chunk tables (device)
//   LaunchEmbedding(embed, tokens, x, num_rows, hidden, stream);
//   LaunchRmsNormToBf16(x, weight, nullptr, normed, num_rows, hidden, eps, stream);
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace kvgate::worker::cuda {

// Per-step metadata, all device arrays. Chunk c owns token rows [row_begin[c], row_begin[c+1]).
struct StepLayout {
  int num_rows = 0;
  int num_chunks = 0;
  const int32_t* row_chunk = nullptr;     // [num_rows] chunk of each row
  const int32_t* row_position = nullptr;  // [num_rows] absolute position of each row's token
  const int32_t* row_begin = nullptr;     // [num_chunks + 1]
  const int32_t* chunk_past = nullptr;    // [num_chunks] tokens cached before this step
  // [num_chunks] 1: every key (including the step's own token) is read from the fp16 pool
  // (decode: one token after a cached prefix, as CpuKvCache::DecodeAttention); 0: the prefix from
  // the pool and the step's own tokens in fp32 from fresh_k/fresh_v (CpuKvCache::PrefillAttention).
  const int32_t* chunk_all_cached = nullptr;
  const int32_t* block_tables = nullptr;  // [num_chunks, max_blocks] pool block ids
  int max_blocks = 0;
};

struct KvPoolLayout {
  uint16_t* pool = nullptr;  // fp16 [num_blocks][layers][2][kv_heads][block_size][head_dim]
  int num_layers = 0;
  int num_kv_heads = 0;
  int head_dim = 0;
  int block_size = 0;
  __host__ __device__ int64_t block_elems() const {
    return int64_t{num_layers} * 2 * num_kv_heads * block_size * head_dim;
  }
};

// x[r, :] = float(embed[tokens[r], :]).
cudaError_t LaunchEmbedding(const uint16_t* embed_bf16, const int32_t* tokens, float* x,
                            int num_rows, int hidden, cudaStream_t stream);

// out[r, :] = bf16(x[src_row(r), :] * rsqrt(mean(x^2) + eps) * weight); src_row(r) = r, or
// gather_rows[r] when gather_rows is non-null.
cudaError_t LaunchRmsNormToBf16(const float* x, const float* weight, const int32_t* gather_rows,
                                uint16_t* out, int num_rows, int hidden, float eps,
                                cudaStream_t stream);

// The q/k/v epilogue of one layer. qkv: [rows, (Hq + 2 Hkv) * D] fp32 GEMM output. Adds bias
// (optional, [(Hq + 2 Hkv) * D]), applies per-head RMSNorm to q and k when q_norm/k_norm are
// non-null ([D]), rotates q and k with rotate-half RoPE at each row's position (angles in double:
// position * inv_freq[j], inv_freq [D/2]), writes q [rows, Hq, D], fresh_k/fresh_v
// [rows, Hkv, D] fp32, and appends k/v as fp16 into the pool at (chunk's block table, position).
cudaError_t LaunchQkvEpilogue(float* qkv, const float* bias, const float* q_norm,
                              const float* k_norm, const double* inv_freq, float norm_eps,
                              const StepLayout& step, const KvPoolLayout& kv, int layer,
                              int num_q_heads, float* q, float* fresh_k, float* fresh_v,
                              cudaStream_t stream);

// Causal paged attention for every row of the step: row r (chunk c, position p) attends to
// positions [0, p]. Keys/values below chunk_past[c] come from the fp16 pool; those of the step
// from fresh_k/fresh_v unless chunk_all_cached[c]. fp32 scores, softmax and accumulation.
// out: bf16 [rows, Hq, D] (the o_proj GEMM input), or fp32 into out_f32 when that is non-null
// (the KvCache interface). D must be a multiple of 32 and <= 256.
cudaError_t LaunchPagedAttention(const float* q, const float* fresh_k, const float* fresh_v,
                                 const StepLayout& step, const KvPoolLayout& kv, int layer,
                                 int num_q_heads, float scale, uint16_t* out, float* out_f32,
                                 cudaStream_t stream);

// act[r, j] = bf16(silu(gate[r, j]) * up[r, j]); gate_up: [rows, 2 * inter] (gate then up).
cudaError_t LaunchSwiGlu(const float* gate_up, uint16_t* act, int num_rows, int inter,
                         cudaStream_t stream);

// x[r, :] += bias (bias [cols]).
cudaError_t LaunchAddBias(float* x, const float* bias, int num_rows, int cols, cudaStream_t stream);

// dst[i] = bf16(src[i]) for n floats.
cudaError_t LaunchFloatToBf16(const float* src, uint16_t* dst, int64_t n, cudaStream_t stream);

// For the KvCache interface: copies k/v [n, Hkv, D] fp32 into the pool at positions
// first_position ... of one sequence (block table `table`, device) for one layer, as fp16.
cudaError_t LaunchAppendKv(const float* k, const float* v, int n, int64_t first_position,
                           const int32_t* table, const KvPoolLayout& kv, int layer,
                           cudaStream_t stream);

// For the KvCache interface: reads one (sequence, layer, kv_head)'s first `n` tokens back as
// fp32 k/v [n, D].
cudaError_t LaunchReadKv(const int32_t* table, int64_t n, const KvPoolLayout& kv, int layer,
                         int kv_head, float* k, float* v, cudaStream_t stream);

}  // namespace kvgate::worker::cuda
