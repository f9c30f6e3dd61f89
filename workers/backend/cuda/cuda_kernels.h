// Device kernels of the CUDA ModelRunner (workers/backend/cuda/cuda_kernels.cu): embedding,
// RMSNorm, the fused q/k/v epilogue (bias, QK-norm, RoPE), causal prefill attention over a prefix
// read out of the KV pool plus the step's fresh tokens, SwiGLU, the decode-output conversion, and
// the hash-based random fills that make weights and synthetic KV on the GPU. The KV pool itself is
// written and read by kvgate_kernels_cuda (kvgate/kernels/cuda_kv_append.h,
// kvgate/kernels/cuda_attention.h), not here.
//
// Host-callable launchers; every pointer is a DEVICE pointer unless noted, every launcher enqueues
// on `stream` and returns the launch error (cudaGetLastError) as cudaError_t, so callers turn it
// into an absl::Status. Activations are fp32 row-major [rows, ...]. Weights and GEMM inputs are of
// the runner's compute type T: uint16_t (bf16 bit patterns, round to nearest even) in bf16 mode,
// float in fp32 mode; the launchers taking T are instantiated for exactly those two.
//
//   LaunchEmbedding<uint16_t>(embed, tokens, x, num_rows, hidden, stream);
//   LaunchRmsNorm<uint16_t>(x, weight, nullptr, normed, num_rows, hidden, eps, stream);
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace kvgate::worker::cuda {

// x[r, :] = float(embed[tokens[r], :]); embed [vocab, hidden] of type T.
template <class T>
cudaError_t LaunchEmbedding(const T* embed, const int32_t* tokens, float* x, int num_rows,
                            int hidden, cudaStream_t stream);

// out[r, :] = T(x[src_row(r), :] * rsqrt(mean(x^2) + eps) * weight); src_row(r) = r, or
// gather_rows[r] when gather_rows is non-null.
template <class T>
cudaError_t LaunchRmsNorm(const float* x, const float* weight, const int32_t* gather_rows, T* out,
                          int num_rows, int hidden, float eps, cudaStream_t stream);

// Shapes of the q/k/v epilogue: Hq query heads in groups of G = Hq / Hkv per kv-head, head_dim D.
struct QkvShape {
  int num_q_heads = 0;
  int num_kv_heads = 0;
  int head_dim = 0;
  // Query heads per kv-head in the q output (>= G): head j of group h is written to output head
  // h * group_pad + j; heads [G, group_pad) of each group are left untouched (the caller keeps
  // them zero), so that a decode kernel that supports only some group sizes can run on them.
  int group_pad = 0;
};

// The q/k/v epilogue of one layer. qkv: [rows, (Hq + 2 Hkv) * D] fp32 GEMM output, modified in
// place: adds the bias (optional, [(Hq + 2 Hkv) * D]), applies per-head RMSNorm to q and k when
// q_norm/k_norm are non-null ([D]), rotates q and k with rotate-half RoPE at row_position[r]
// (angles in double: position * inv_freq[j], inv_freq [D/2]). The final k and v stay in qkv (the
// KV append and the prefill attention read them there, row stride (Hq + 2 Hkv) * D); q goes to
// q_out [rows, Hkv * group_pad, D].
cudaError_t LaunchQkvEpilogue(float* qkv, const float* bias, const float* q_norm,
                              const float* k_norm, const double* inv_freq, float norm_eps,
                              const int32_t* row_position, int num_rows, const QkvShape& shape,
                              float* q_out, cudaStream_t stream);

// One tile of query rows of a prefill chunk for LaunchPrefillAttention and
// LaunchPrefillAttentionMma (prefill_attention.h); int32 fields, in order.
struct PrefillTile {
  int32_t first_row;     // step row of the chunk's first fresh token
  int32_t tile_begin;    // index of the tile's first query inside the chunk
  int32_t tile_rows;     // queries in this tile (<= the launcher's tile rows)
  int32_t past;          // cached tokens before the chunk (its first position)
  int32_t prefix_index;  // entry of the prefix arrays holding the cached tokens; -1 if past == 0
};
// Query rows per tile of LaunchPrefillAttention (LaunchPrefillAttentionMma: kPrefillMmaTileRows).
inline constexpr int kPrefillTileRows = 32;

struct PrefillAttentionArgs {
  const PrefillTile* tiles = nullptr;  // [num_tiles]
  int num_tiles = 0;
  QkvShape shape;
  // Queries: row r, head h at q[(r * Hkv * group_pad + (h / G) * group_pad + h % G) * D].
  const float* q = nullptr;
  // Fresh keys/values of the step: row r, kv-head h at fresh_k[r * fresh_row_stride + h * D].
  const float* fresh_k = nullptr;
  const float* fresh_v = nullptr;
  int64_t fresh_row_stride = 0;
  // The cached prefix read out of the pool (CudaKvAppend::Read): entry e, kv-head h, token t at
  // prefix_k[((e * Hkv + h) * prefix_stride_tokens + t) * D].
  const float* prefix_k = nullptr;
  const float* prefix_v = nullptr;
  int64_t prefix_stride_tokens = 0;
  // Attention sinks under sink eviction (CpuKvCache's SinkShift), per prefix entry e: cached slots
  // [0, sink_slots[e]) are scored against the query rotated back by sink_shift[e] RoPE positions
  // (angles in double: shift * rope_inv_freq[j], rope_inv_freq [D/2]). nullptr: no sinks.
  const int32_t* sink_slots = nullptr;
  const int32_t* sink_shift = nullptr;
  const double* rope_inv_freq = nullptr;
  float scale = 1.0f;
  // Output row r, head h at [(r * Hq + h) * D]: bf16 into out_bf16, or fp32 into out_f32 when
  // that is non-null.
  uint16_t* out_bf16 = nullptr;
  float* out_f32 = nullptr;
};

// Causal attention of every query of the tiles: query i of a chunk (position past + i) attends to
// positions [0, past + i]; positions below past come from the prefix arrays (the cache read through
// its format), the others from the fresh fp32 keys/values (CpuKvCache::PrefillAttention's
// semantics, sinks included). fp32 scores, online softmax and accumulation. D must be 64 or 128.
// The runner's fp32 compute mode uses it; the bf16 mode the tensor-core LaunchPrefillAttentionMma.
cudaError_t LaunchPrefillAttention(const PrefillAttentionArgs& args, cudaStream_t stream);

// out[r, h, :] = T(in[r, (h / G) * group_pad + h % G, :]) for the Hq real heads of each row:
// the fp32 decode-attention output (padded groups) -> the o_proj GEMM input.
template <class T>
cudaError_t LaunchGatherHeads(const float* in, T* out, int num_rows, const QkvShape& shape,
                              cudaStream_t stream);

// act[r, j] = T(silu(gate[r, j]) * up[r, j]); gate_up: [rows, 2 * inter] (gate then up).
template <class T>
cudaError_t LaunchSwiGlu(const float* gate_up, T* act, int num_rows, int inter,
                         cudaStream_t stream);

// Counter-based random fills (a SplitMix64-style hash of (seed, i); the same values on every run
// and device): dst[i] uniform in [-bound, bound). LaunchFillUniformBf16 rounds each value to bf16
// and stores it as T, so a bf16 and an fp32 runner made from one seed hold the same weights.
template <class T>
cudaError_t LaunchFillUniformBf16(T* dst, int64_t n, uint64_t seed, float bound,
                                  cudaStream_t stream);
cudaError_t LaunchFillUniformFloat(float* dst, int64_t n, uint64_t seed, float bound,
                                   cudaStream_t stream);
// dst[i] = value.
cudaError_t LaunchFillFloat(float* dst, int64_t n, float value, cudaStream_t stream);

// ---- Sampling on the GPU ------------------------------------------------------------------------
// LaunchSampleTokens picks one token per logits row by the host Sampler's algorithm
// (workers/engine/sampler.h, SampleWithUniform), so that only token ids leave the GPU:
//   greedy (temperature <= 0): argmax, the lowest id on ties;
//   otherwise: the finite logits sorted descending (ties: lowest id first), the first top_k of them
//   (top_k > 0), softmax at temperature (fp64), the smallest prefix whose mass reaches top_p
//   (top_p in (0, 1)), then the first candidate whose cumulative mass reaches uniform x the kept
//   mass (inverse CDF); token 0 when no logit is finite.
// The sampled rows are sorted together by one CUB radix sort of 64-bit keys (row in the high bits,
// the order-preserving bits of the negated logit below), which is stable, so equal logits keep
// ascending ids. The sums are parallel fp64 reductions, so a token can differ from the host's only
// where a cumulative mass and its threshold (top_p, or the scaled uniform) are within ~1e-15 of
// each other.

// One row's parameters, 24 bytes (uploaded as an array).
struct SampleRow {
  float temperature = 0.0f;  // <= 0: greedy
  int32_t top_k = 0;         // 0: all candidates
  float top_p = 1.0f;        // outside (0, 1): no nucleus cut
  // Index of this row among the rows that sample (temperature > 0), 0.. sort_rows - 1, in row
  // order; -1 for greedy rows.
  int32_t sort_row = -1;
  double uniform = 0.0;  // [0, 1): the draw of the request's generator
};
static_assert(sizeof(SampleRow) == 24);

// Device workspace bytes LaunchSampleTokens needs for `sort_rows` sampled rows of `vocab` logits
// (0 when sort_rows is 0). cudaErrorInvalidValue when sort_rows x vocab exceeds INT32_MAX.
cudaError_t SamplingWorkspaceBytes(int sort_rows, int vocab, size_t* bytes);

// tokens[r] for every row r of logits [rows, vocab] (device), with params[r] (device, `rows`
// entries; sort_rows of them with temperature > 0, numbered by sort_row as above). workspace:
// SamplingWorkspaceBytes(sort_rows, vocab) bytes, 256-byte aligned.
cudaError_t LaunchSampleTokens(const float* logits, int rows, int vocab, const SampleRow* params,
                               int sort_rows, void* workspace, size_t workspace_bytes,
                               int32_t* tokens, cudaStream_t stream);

}  // namespace kvgate::worker::cuda
