// Paged split-KV decode attention for every KV format (kvgate/kernels/cuda_attention.h).
//
// Per call: PrepareQueryKernel (q * scale * log2(e), rotated for TurboQuant) -> DecodeSplitKernel
// (grid [splits (+1 KIVI residual split), kv_heads, seqs], 128 threads) -> ReduceSplitsKernel
// (combines the splits' (max, sum, acc), un-rotates TurboQuant outputs).
//
// DecodeSplitKernel: a split is a range of whole tiles; a tile is `tile_blocks` blocks. Each block
// segment (one kv-head of one layer: block_size * record_bytes contiguous bytes, 16-byte aligned)
// is copied into shared memory with 16-byte cp.async, STAGES tiles in flight. A team of D/8 lanes
// handles one token, each lane 8 channels: scores are reduced with shuffles inside the team; the
// online softmax runs per tile (base 2); values accumulate into per-lane [G][8] fp32 registers,
// summed over teams at the end of the split.
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "kernels/cuda/decode_attention_internal.h"

namespace kvgate::kernels::cuda::internal {
namespace {

constexpr int kThreads = 128;
constexpr int kStages = 4;
constexpr float kLog2e = 1.4426950408889634f;

__device__ __forceinline__ void CpAsync16(void* smem, const void* gmem) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(s), "l"(gmem));
}
__device__ __forceinline__ void CpAsyncCommit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void CpAsyncWait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

__device__ __forceinline__ float LoadHalfF(const uint8_t* p) {
  return __half2float(*reinterpret_cast<const __half*>(p));
}

// n (1..4) bytes at p, little-endian (codes are packed LSB-first).
__device__ __forceinline__ uint32_t LoadBytes(const uint8_t* p, int n) {
  uint32_t w = 0;
  for (int i = 0; i < n; ++i) w |= static_cast<uint32_t>(p[i]) << (8 * i);
  return w;
}

// 8 bytes at p, using the widest loads its alignment allows.
__device__ __forceinline__ void Load8(const uint8_t* p, uint8_t out[8]) {
  const uintptr_t a = reinterpret_cast<uintptr_t>(p);
  if ((a & 7) == 0) {
    const uint2 u = *reinterpret_cast<const uint2*>(p);
    *reinterpret_cast<uint2*>(out) = u;
  } else if ((a & 3) == 0) {
    const uint32_t* w = reinterpret_cast<const uint32_t*>(p);
    reinterpret_cast<uint32_t*>(out)[0] = w[0];
    reinterpret_cast<uint32_t*>(out)[1] = w[1];
  } else if ((a & 1) == 0) {
    const uint16_t* w = reinterpret_cast<const uint16_t*>(p);
    for (int i = 0; i < 4; ++i) reinterpret_cast<uint16_t*>(out)[i] = w[i];
  } else {
    for (int i = 0; i < 8; ++i) out[i] = p[i];
  }
}

__device__ __forceinline__ void Half8(const uint8_t* p, float o[8]) {
  const uint4 u = *reinterpret_cast<const uint4*>(p);
  const __half2* h = reinterpret_cast<const __half2*>(&u);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 f = __half22float2(h[i]);
    o[2 * i] = f.x;
    o[2 * i + 1] = f.y;
  }
}
__device__ __forceinline__ void Bf16x8(const uint8_t* p, float o[8]) {
  const uint4 u = *reinterpret_cast<const uint4*>(p);
  const uint32_t* w = reinterpret_cast<const uint32_t*>(&u);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    o[2 * i] = __uint_as_float(w[i] << 16);
    o[2 * i + 1] = __uint_as_float(w[i] & 0xFFFF0000u);
  }
}
__device__ __forceinline__ void Fp8x8(const uint8_t* p, float o[8]) {
  uint8_t b[8];
  Load8(p, b);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const __nv_fp8x2_storage_t pair = static_cast<__nv_fp8x2_storage_t>(b[2 * i] | (b[2 * i + 1] << 8));
    const __half2_raw raw = __nv_cvt_fp8x2_to_halfraw2(pair, __NV_E4M3);
    const float2 f = __half22float2(*reinterpret_cast<const __half2*>(&raw));
    o[2 * i] = f.x;
    o[2 * i + 1] = f.y;
  }
}

// Codes of the lane's 8 channels of a TurboQuant vector; centroids from the split tables.
template <int D>
__device__ __forceinline__ void Turbo8(const uint8_t* rec, int lane, int hi_channels, int hi_bits,
                                       int lo_bits, const float* hi_c, const float* lo_c,
                                       float scale, float o[8]) {
  const bool hi = 8 * lane < hi_channels;
  const int bits = hi ? hi_bits : lo_bits;
  const int off = hi ? lane * hi_bits : hi_channels * hi_bits / 8 + (lane - hi_channels / 8) * lo_bits;
  const uint32_t w = LoadBytes(rec + off, bits);
  const float* c = hi ? hi_c : lo_c;
  const uint32_t mask = (1u << bits) - 1;
#pragma unroll
  for (int i = 0; i < 8; ++i) o[i] = scale * c[(w >> (bits * i)) & mask];
}

// Key (key domain) of token `tok` of a tile, channels [8 lane, 8 lane + 8).
template <int KIND, int D>
__device__ __forceinline__ void KeyChunk(const uint8_t* tile, int tok, int lane,
                                         const FormatParams& fp, const float* tables, float o[8]) {
  const uint8_t* rec = tile + static_cast<size_t>(tok) * fp.record_bytes;
  if constexpr (KIND == kKindFp16) {
    Half8(rec + 16 * lane, o);
  } else if constexpr (KIND == kKindBf16) {
    Bf16x8(rec + 16 * lane, o);
  } else if constexpr (KIND == kKindFp8) {
    Fp8x8(rec + 8 * lane, o);
  } else if constexpr (KIND == kKindInt8) {
    uint8_t b[8];
    Load8(rec + 8 * lane, b);
    const float s = LoadHalfF(rec + D);
#pragma unroll
    for (int i = 0; i < 8; ++i) o[i] = static_cast<float>(static_cast<int8_t>(b[i])) * s;
  } else if constexpr (KIND == kKindKivi) {
    const int bits = fp.kivi_bits, group = fp.kivi_group, cpt = D / group;
    const uint32_t w = LoadBytes(rec + lane * bits, bits);
    const uint8_t* group_base = tile + static_cast<size_t>(tok - tok % group) * fp.record_bytes;
    const uint32_t mask = (1u << bits) - 1;
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      const int c = 8 * lane + i;
      const uint8_t* meta = group_base + static_cast<size_t>(c / cpt) * fp.record_bytes +
                            fp.kivi_codes_bytes + 4 * (c % cpt);
      o[i] = static_cast<float>((w >> (bits * i)) & mask) * LoadHalfF(meta) + LoadHalfF(meta + 2);
    }
  } else {  // Turbo
    const float s = LoadHalfF(rec + fp.tq_key_code_bytes);
    Turbo8<D>(rec, lane, fp.tq_key_hi_channels, fp.tq_key_hi_bits, fp.tq_key_lo_bits, tables,
              tables + 16, s, o);
  }
}

// Value (value domain) of token `tok` of a tile, channels [8 lane, 8 lane + 8).
template <int KIND, int D>
__device__ __forceinline__ void ValueChunk(const uint8_t* tile, int tok, int lane,
                                           const FormatParams& fp, const float* tables,
                                           float o[8]) {
  const uint8_t* rec = tile + static_cast<size_t>(tok) * fp.record_bytes + fp.key_bytes;
  if constexpr (KIND == kKindFp16) {
    Half8(rec + 16 * lane, o);
  } else if constexpr (KIND == kKindBf16) {
    Bf16x8(rec + 16 * lane, o);
  } else if constexpr (KIND == kKindFp8) {
    Fp8x8(rec + 8 * lane, o);
  } else if constexpr (KIND == kKindInt8) {
    uint8_t b[8];
    Load8(rec + 8 * lane, b);
    const float s = LoadHalfF(rec + D);
#pragma unroll
    for (int i = 0; i < 8; ++i) o[i] = static_cast<float>(static_cast<int8_t>(b[i])) * s;
  } else if constexpr (KIND == kKindKivi) {
    const int bits = fp.kivi_bits;
    const uint32_t w = LoadBytes(rec + lane * bits, bits);
    const uint8_t* meta = rec + fp.kivi_codes_bytes + 4 * ((8 * lane) / fp.kivi_group);
    const float sc = LoadHalfF(meta), mn = LoadHalfF(meta + 2);
    const uint32_t mask = (1u << bits) - 1;
#pragma unroll
    for (int i = 0; i < 8; ++i) o[i] = static_cast<float>((w >> (bits * i)) & mask) * sc + mn;
  } else {
    const float s = LoadHalfF(rec + fp.tq_value_code_bytes);
    Turbo8<D>(rec, lane, fp.tq_value_hi_channels, fp.tq_value_hi_bits, fp.tq_value_lo_bits,
              tables + 32, tables + 48, s, o);
  }
}

struct SoftmaxState {
  float* scores;  // [G][kMaxTileTokens]
  float* m;       // [G]
  float* l;       // [G]
  float* alpha;   // [G]
};

// One tile of `ntok` tokens at `tile` (records of record_bytes): scores, online softmax, values.
template <int KIND, int D, int G>
__device__ __forceinline__ void ComputeTile(const uint8_t* tile, int ntok, const FormatParams& fp,
                                            const float* tables, float key_scale,
                                            const float (&q)[G][8], float (&acc)[G][8],
                                            const SoftmaxState& st) {
  constexpr int kLanes = D / 8, kTeams = kThreads / kLanes;
  const int tid = threadIdx.x, team = tid / kLanes, lane = tid % kLanes;
  for (int base = 0; base < ntok; base += kTeams) {
    const int tok = base + team;
    const bool valid = tok < ntok;
    float k[8];
    if (valid) {
      KeyChunk<KIND, D>(tile, tok, lane, fp, tables, k);
    } else {
#pragma unroll
      for (int i = 0; i < 8; ++i) k[i] = 0.f;
    }
#pragma unroll
    for (int g = 0; g < G; ++g) {
      float s = 0.f;
#pragma unroll
      for (int i = 0; i < 8; ++i) s = fmaf(q[g][i], k[i], s);
#pragma unroll
      for (int off = kLanes / 2; off > 0; off >>= 1) s += __shfl_xor_sync(0xffffffffu, s, off);
      if (valid && lane == 0) st.scores[g * kMaxTileTokens + tok] = s * key_scale;
    }
  }
  __syncthreads();
  const int warp = tid / 32, wl = tid % 32;
  for (int g = warp; g < G; g += kThreads / 32) {
    float* s = st.scores + g * kMaxTileTokens;
    float mx = -INFINITY;
    for (int i = wl; i < ntok; i += 32) mx = fmaxf(mx, s[i]);
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, off));
    const float m_old = st.m[g];
    const float m_new = fmaxf(m_old, mx);
    float sum = 0.f;
    for (int i = wl; i < ntok; i += 32) {
      const float p = m_new == -INFINITY ? 0.f : exp2f(s[i] - m_new);
      s[i] = p;
      sum += p;
    }
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, off);
    __syncwarp();
    if (wl == 0) {
      const float alpha = m_old == -INFINITY ? 0.f : exp2f(m_old - m_new);
      st.l[g] = st.l[g] * alpha + sum;
      st.m[g] = m_new;
      st.alpha[g] = alpha;
    }
  }
  __syncthreads();
#pragma unroll
  for (int g = 0; g < G; ++g) {
    const float a = st.alpha[g];
#pragma unroll
    for (int i = 0; i < 8; ++i) acc[g][i] *= a;
  }
  for (int tok = team; tok < ntok; tok += kTeams) {
    float v[8];
    ValueChunk<KIND, D>(tile, tok, lane, fp, tables, v);
#pragma unroll
    for (int g = 0; g < G; ++g) {
      const float p = st.scores[g * kMaxTileTokens + tok];
#pragma unroll
      for (int i = 0; i < 8; ++i) acc[g][i] = fmaf(p, v[i], acc[g][i]);
    }
  }
}

template <int KIND, int D, int G>
__global__ void __launch_bounds__(kThreads) DecodeSplitKernel(SplitArgs a, FormatParams fp) {
  constexpr int kLanes = D / 8, kTeams = kThreads / kLanes;
  extern __shared__ __align__(16) uint8_t smem[];
  __shared__ float s_scores[G * kMaxTileTokens];
  __shared__ float s_m[G], s_l[G], s_alpha[G];
  __shared__ float s_tables[64];
  const int split = blockIdx.x, kvh = blockIdx.y, seq = blockIdx.z;
  const int tid = threadIdx.x, team = tid / kLanes, lane = tid % kLanes;
  const int num_kv_heads = gridDim.y;
  if (tid < 64) s_tables[tid] = fp.tables[tid];
  if (tid < G) {
    s_m[tid] = -INFINITY;
    s_l[tid] = 0.f;
  }
  float q[G][8], acc[G][8];
#pragma unroll
  for (int g = 0; g < G; ++g) {
    const float* qp = a.qprep + (static_cast<size_t>(seq) * a.num_q_heads + kvh * G + g) * D + 8 * lane;
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      q[g][i] = qp[i];
      acc[g][i] = 0.f;
    }
  }
  float key_scale = 1.f, value_scale = 1.f;
  if constexpr (KIND == kKindFp8) {
    key_scale = a.head_scales[(static_cast<size_t>(seq) * num_kv_heads + kvh) * 2];
    value_scale = a.head_scales[(static_cast<size_t>(seq) * num_kv_heads + kvh) * 2 + 1];
  }
  const SoftmaxState st{s_scores, s_m, s_l, s_alpha};
  __syncthreads();

  if (split < a.num_splits) {
    const int enc = a.encoded_lens[seq];
    const int bs = a.block_size;
    const int seq_blocks = (enc + bs - 1) / bs;
    const int b0 = split * a.blocks_per_split;
    const int b1 = min(b0 + a.blocks_per_split, seq_blocks);
    const int ntiles = b1 > b0 ? (b1 - b0 + a.tile_blocks - 1) / a.tile_blocks : 0;
    const int seg_bytes = bs * fp.record_bytes;
    const int seg_chunks = seg_bytes / 16;
    const int stage_bytes = a.tile_blocks * seg_bytes;
    const int32_t* table = a.block_tables + static_cast<size_t>(seq) * a.max_blocks_per_seq;
    auto load_tile = [&](int t) {
      uint8_t* dst = smem + (t % kStages) * stage_bytes;
      const int tb0 = b0 + t * a.tile_blocks;
      const int nb = min(a.tile_blocks, b1 - tb0);
      const int chunks = nb * seg_chunks;
      for (int c = tid; c < chunks; c += kThreads) {
        const int b = c / seg_chunks, off = (c % seg_chunks) * 16;
        const uint8_t* src = a.pool + static_cast<int64_t>(table[tb0 + b]) * a.block_stride_bytes +
                             a.layer_offset_bytes + static_cast<int64_t>(kvh) * seg_bytes + off;
        CpAsync16(dst + b * seg_bytes + off, src);
      }
    };
#pragma unroll
    for (int s = 0; s < kStages - 1; ++s) {
      if (s < ntiles) load_tile(s);
      CpAsyncCommit();
    }
    for (int t = 0; t < ntiles; ++t) {
      CpAsyncWait<kStages - 2>();
      __syncthreads();
      if (t + kStages - 1 < ntiles) load_tile(t + kStages - 1);
      CpAsyncCommit();
      const int first_tok = (b0 + t * a.tile_blocks) * bs;
      const int ntok = min(a.tile_blocks * bs, enc - first_tok);
      ComputeTile<KIND, D, G>(smem + (t % kStages) * stage_bytes, ntok, fp, s_tables, key_scale, q,
                              acc, st);
    }
    CpAsyncWait<0>();
  } else if constexpr (KIND == kKindKivi) {
    // The fp16 residual window, staged as fp16 records [k | v] (4 D bytes per token).
    const int r = a.residual_lens[seq];
    const int tile_tokens = a.residual_tile_tokens;
    const uint8_t* rk = reinterpret_cast<const uint8_t*>(
        a.residual_k + (static_cast<size_t>(seq) * num_kv_heads + kvh) * a.residual_capacity * D);
    const uint8_t* rv = reinterpret_cast<const uint8_t*>(
        a.residual_v + (static_cast<size_t>(seq) * num_kv_heads + kvh) * a.residual_capacity * D);
    FormatParams half_fp = fp;
    half_fp.record_bytes = 4 * D;
    half_fp.key_bytes = 2 * D;
    constexpr int kRowChunks = 2 * D / 16;
    for (int t0 = 0; t0 < r; t0 += tile_tokens) {
      const int ntok = min(tile_tokens, r - t0);
      __syncthreads();
      for (int c = tid; c < ntok * 2 * kRowChunks; c += kThreads) {
        const int tok = c / (2 * kRowChunks), part = (c / kRowChunks) % 2, off = (c % kRowChunks) * 16;
        const uint8_t* src = (part ? rv : rk) + static_cast<size_t>(t0 + tok) * 2 * D + off;
        *reinterpret_cast<uint4*>(smem + tok * 4 * D + part * 2 * D + off) =
            *reinterpret_cast<const uint4*>(src);
      }
      __syncthreads();
      ComputeTile<kKindFp16, D, G>(smem, ntok, half_fp, s_tables, 1.f, q, acc, st);
    }
  }
  __syncthreads();
  // Sum the teams' partial accumulators; write this split's (acc, m, l).
  float* red = reinterpret_cast<float*>(smem);
#pragma unroll
  for (int g = 0; g < G; ++g) {
#pragma unroll
    for (int i = 0; i < 8; ++i) red[(team * G + g) * D + 8 * lane + i] = acc[g][i] * value_scale;
  }
  __syncthreads();
  const size_t part = (static_cast<size_t>(seq) * num_kv_heads + kvh) * a.total_splits + split;
  for (int idx = tid; idx < G * D; idx += kThreads) {
    float sum = 0.f;
#pragma unroll
    for (int t = 0; t < kTeams; ++t) sum += red[t * G * D + idx];
    a.part_acc[part * G * D + idx] = sum;
  }
  if (tid < G) {
    a.part_ml[(part * G + tid) * 2] = s_m[tid];
    a.part_ml[(part * G + tid) * 2 + 1] = s_l[tid];
  }
}

// In-place orthonormal Walsh-Hadamard transform of x[D] in shared memory, D threads.
template <int D>
__device__ void Fwht(float* x) {
  const int c = threadIdx.x;
#pragma unroll
  for (int h = 1; h < D; h <<= 1) {
    __syncthreads();
    if ((c & h) == 0) {
      const float a = x[c], b = x[c + h];
      x[c] = a + b;
      x[c + h] = a - b;
    }
  }
  __syncthreads();
  x[c] *= rsqrtf(static_cast<float>(D));
  __syncthreads();
}

// grid [num_q_heads, num_seqs], D threads: qprep = (rotated) q * scale * log2(e).
template <int D>
__global__ void PrepareQueryKernel(const float* q, float* qprep, const float* signs, int num_q_heads,
                                   float scale) {
  __shared__ float x[D];
  const size_t row = static_cast<size_t>(blockIdx.y) * num_q_heads + blockIdx.x;
  const int c = threadIdx.x;
  float v = q[row * D + c];
  if (signs != nullptr) {
    x[c] = v * signs[c];
    Fwht<D>(x);
    v = x[c];
  }
  qprep[row * D + c] = v * scale * kLog2e;
}

// grid [num_q_heads, num_seqs], D threads.
template <int D>
__global__ void ReduceSplitsKernel(const float* part_acc, const float* part_ml, float* out,
                                   const float* signs, int num_q_heads, int num_kv_heads,
                                   int total_splits) {
  __shared__ float x[D];
  const int qh = blockIdx.x, seq = blockIdx.y, c = threadIdx.x;
  const int group = num_q_heads / num_kv_heads, kvh = qh / group, g = qh % group;
  const size_t base = (static_cast<size_t>(seq) * num_kv_heads + kvh) * total_splits;
  float m = -INFINITY;
  for (int s = 0; s < total_splits; ++s) m = fmaxf(m, part_ml[((base + s) * group + g) * 2]);
  float denom = 0.f, num = 0.f;
  if (m != -INFINITY) {
    for (int s = 0; s < total_splits; ++s) {
      const float ms = part_ml[((base + s) * group + g) * 2];
      if (ms == -INFINITY) continue;
      const float w = exp2f(ms - m);
      denom += w * part_ml[((base + s) * group + g) * 2 + 1];
      num += w * part_acc[((base + s) * group + g) * D + c];
    }
  }
  float v = denom > 0.f ? num / denom : 0.f;
  if (signs != nullptr) {
    x[c] = v;
    Fwht<D>(x);
    v = x[c] * signs[c];
  }
  out[(static_cast<size_t>(seq) * num_q_heads + qh) * D + c] = v;
}

template <int KIND, int D, int G>
cudaError_t LaunchSplit(const SplitArgs& a, const FormatParams& fp, dim3 grid, int smem_bytes,
                        cudaStream_t stream) {
  DecodeSplitKernel<KIND, D, G><<<grid, kThreads, smem_bytes, stream>>>(a, fp);
  return cudaGetLastError();
}

template <int KIND, int D, int G>
cudaError_t SetupOne(int smem_bytes, int* blocks_per_sm) {
  cudaError_t e = cudaFuncSetAttribute(DecodeSplitKernel<KIND, D, G>,
                                       cudaFuncAttributeMaxDynamicSharedMemorySize, smem_bytes);
  if (e != cudaSuccess) return e;
  return cudaOccupancyMaxActiveBlocksPerMultiprocessor(blocks_per_sm, DecodeSplitKernel<KIND, D, G>,
                                                       kThreads, smem_bytes);
}

template <int KIND, int D>
cudaError_t DispatchG(bool setup, int g, const SplitArgs& a, const FormatParams& fp, dim3 grid,
                      int smem_bytes, cudaStream_t stream, int* blocks_per_sm) {
  switch (g) {
    case 1:
      return setup ? SetupOne<KIND, D, 1>(smem_bytes, blocks_per_sm)
                   : LaunchSplit<KIND, D, 1>(a, fp, grid, smem_bytes, stream);
    case 2:
      return setup ? SetupOne<KIND, D, 2>(smem_bytes, blocks_per_sm)
                   : LaunchSplit<KIND, D, 2>(a, fp, grid, smem_bytes, stream);
    case 4:
      return setup ? SetupOne<KIND, D, 4>(smem_bytes, blocks_per_sm)
                   : LaunchSplit<KIND, D, 4>(a, fp, grid, smem_bytes, stream);
    case 8:
      return setup ? SetupOne<KIND, D, 8>(smem_bytes, blocks_per_sm)
                   : LaunchSplit<KIND, D, 8>(a, fp, grid, smem_bytes, stream);
  }
  return cudaErrorInvalidValue;
}

template <int KIND>
cudaError_t DispatchD(bool setup, int d, int g, const SplitArgs& a, const FormatParams& fp,
                      dim3 grid, int smem_bytes, cudaStream_t stream, int* blocks_per_sm) {
  if (d == 64) return DispatchG<KIND, 64>(setup, g, a, fp, grid, smem_bytes, stream, blocks_per_sm);
  if (d == 128) return DispatchG<KIND, 128>(setup, g, a, fp, grid, smem_bytes, stream, blocks_per_sm);
  return cudaErrorInvalidValue;
}

cudaError_t Dispatch(bool setup, int kind, int d, int g, const SplitArgs& a, const FormatParams& fp,
                     dim3 grid, int smem_bytes, cudaStream_t stream, int* blocks_per_sm) {
  switch (kind) {
    case kKindFp16:
      return DispatchD<kKindFp16>(setup, d, g, a, fp, grid, smem_bytes, stream, blocks_per_sm);
    case kKindBf16:
      return DispatchD<kKindBf16>(setup, d, g, a, fp, grid, smem_bytes, stream, blocks_per_sm);
    case kKindFp8:
      return DispatchD<kKindFp8>(setup, d, g, a, fp, grid, smem_bytes, stream, blocks_per_sm);
    case kKindInt8:
      return DispatchD<kKindInt8>(setup, d, g, a, fp, grid, smem_bytes, stream, blocks_per_sm);
    case kKindKivi:
      return DispatchD<kKindKivi>(setup, d, g, a, fp, grid, smem_bytes, stream, blocks_per_sm);
    case kKindTurbo:
      return DispatchD<kKindTurbo>(setup, d, g, a, fp, grid, smem_bytes, stream, blocks_per_sm);
  }
  return cudaErrorInvalidValue;
}

}  // namespace

int MaxStages() { return kStages; }
int ThreadsPerCta() { return kThreads; }

cudaError_t SetupSplitKernel(int kind, int d, int g, int smem_bytes, int* blocks_per_sm) {
  return Dispatch(true, kind, d, g, SplitArgs{}, FormatParams{}, dim3(), smem_bytes, nullptr,
                  blocks_per_sm);
}

cudaError_t LaunchDecode(int kind, int d, int g, const SplitArgs& a, const FormatParams& fp,
                         int num_kv_heads, int num_seqs, int smem_bytes, const float* q, float* out,
                         const float* signs, float scale, cudaStream_t stream) {
  const dim3 rows(a.num_q_heads, num_seqs);
  if (d == 64) {
    PrepareQueryKernel<64><<<rows, 64, 0, stream>>>(q, a.qprep, signs, a.num_q_heads, scale);
  } else {
    PrepareQueryKernel<128><<<rows, 128, 0, stream>>>(q, a.qprep, signs, a.num_q_heads, scale);
  }
  cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess) return e;
  const dim3 grid(a.total_splits, num_kv_heads, num_seqs);
  e = Dispatch(false, kind, d, g, a, fp, grid, smem_bytes, stream, nullptr);
  if (e != cudaSuccess) return e;
  if (d == 64) {
    ReduceSplitsKernel<64><<<rows, 64, 0, stream>>>(a.part_acc, a.part_ml, out, signs,
                                                    a.num_q_heads, num_kv_heads, a.total_splits);
  } else {
    ReduceSplitsKernel<128><<<rows, 128, 0, stream>>>(a.part_acc, a.part_ml, out, signs,
                                                      a.num_q_heads, num_kv_heads, a.total_splits);
  }
  return cudaGetLastError();
}

}  // namespace kvgate::kernels::cuda::internal
