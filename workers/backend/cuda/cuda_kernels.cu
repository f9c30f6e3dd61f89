// Device kernels of the CUDA ModelRunner; contracts in cuda_kernels.h. Simple and correct first:
// one CTA (or warp) per row/head, fp32 arithmetic, 2-byte coalesced loads of the fp16 pool.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "workers/backend/cuda/cuda_kernels.h"

namespace kvgate::worker::cuda {
namespace {

__device__ __forceinline__ float Bf16ToFloat(uint16_t bits) {
  return __uint_as_float(static_cast<uint32_t>(bits) << 16);
}
__device__ __forceinline__ uint16_t FloatToBf16(float x) {
  return __bfloat16_as_ushort(__float2bfloat16_rn(x));
}
__device__ __forceinline__ float HalfToFloat(uint16_t bits) {
  return __half2float(__ushort_as_half(bits));
}
__device__ __forceinline__ uint16_t FloatToHalf(float x) {
  return __half_as_ushort(__float2half_rn(x));
}

__device__ __forceinline__ float WarpSum(float x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

// Offset (in halves) of token `position`'s record of (layer, k|v, kv_head) in the pool.
__device__ __forceinline__ int64_t PoolOffset(const KvPoolLayout& kv, const int32_t* table,
                                              int64_t position, int layer, int kv_or_v,
                                              int kv_head) {
  const int64_t block = table[position / kv.block_size];
  const int64_t slot = position % kv.block_size;
  return block * kv.block_elems() +
         ((int64_t{layer} * 2 + kv_or_v) * kv.num_kv_heads + kv_head) * kv.block_size *
             kv.head_dim +
         slot * kv.head_dim;
}

__global__ void EmbeddingKernel(const uint16_t* embed, const int32_t* tokens, float* x,
                                int hidden) {
  const int64_t row = blockIdx.x;
  const uint16_t* src = embed + int64_t{tokens[row]} * hidden;
  float* dst = x + row * hidden;
  for (int j = threadIdx.x; j < hidden; j += blockDim.x) dst[j] = Bf16ToFloat(src[j]);
}

__global__ void RmsNormKernel(const float* x, const float* weight, const int32_t* gather_rows,
                              uint16_t* out, int hidden, float eps) {
  __shared__ float partial[32];
  const int64_t row = blockIdx.x;
  const int64_t src_row = gather_rows != nullptr ? gather_rows[row] : row;
  const float* src = x + src_row * hidden;
  float sum = 0;
  for (int j = threadIdx.x; j < hidden; j += blockDim.x) sum += src[j] * src[j];
  sum = WarpSum(sum);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) partial[warp] = sum;
  __syncthreads();
  if (warp == 0) {
    float s = lane < static_cast<int>(blockDim.x / 32) ? partial[lane] : 0.0f;
    s = WarpSum(s);
    if (lane == 0) partial[0] = s;
  }
  __syncthreads();
  const float inv = rsqrtf(partial[0] / hidden + eps);
  uint16_t* dst = out + row * hidden;
  for (int j = threadIdx.x; j < hidden; j += blockDim.x) {
    dst[j] = FloatToBf16(src[j] * inv * weight[j]);
  }
}

// grid (rows, Hq + 2 Hkv), one warp: one head vector of one row.
__global__ void QkvEpilogueKernel(float* qkv, const float* bias, const float* q_norm,
                                  const float* k_norm, const double* inv_freq, float norm_eps,
                                  StepLayout step, KvPoolLayout kv, int layer, int num_q_heads,
                                  float* q_out, float* fresh_k, float* fresh_v) {
  const int row = blockIdx.x;
  const int head = blockIdx.y;  // [0, Hq): q; [Hq, Hq + Hkv): k; then v
  const int lane = threadIdx.x;
  const int d = kv.head_dim, half = d / 2, hkv = kv.num_kv_heads;
  const int64_t qkv_dim = int64_t{num_q_heads + 2 * hkv} * d;
  float* src = qkv + row * qkv_dim + int64_t{head} * d;
  const float* b = bias != nullptr ? bias + int64_t{head} * d : nullptr;
  const bool is_q = head < num_q_heads;
  const bool is_k = !is_q && head < num_q_heads + hkv;
  const float* norm = is_q ? q_norm : (is_k ? k_norm : nullptr);
  constexpr int kMaxPairs = 4;  // half <= 128
  float lo[kMaxPairs], hi[kMaxPairs];
  float sumsq = 0;
#pragma unroll
  for (int i = 0; i < kMaxPairs; ++i) {
    const int j = lane + 32 * i;
    lo[i] = hi[i] = 0;
    if (j < half) {
      lo[i] = src[j] + (b ? b[j] : 0.0f);
      hi[i] = src[j + half] + (b ? b[j + half] : 0.0f);
      sumsq += lo[i] * lo[i] + hi[i] * hi[i];
    }
  }
  if (norm != nullptr) {
    const float inv = rsqrtf(WarpSum(sumsq) / d + norm_eps);
#pragma unroll
    for (int i = 0; i < kMaxPairs; ++i) {
      const int j = lane + 32 * i;
      if (j < half) {
        lo[i] = lo[i] * inv * norm[j];
        hi[i] = hi[i] * inv * norm[j + half];
      }
    }
  }
  const int64_t position = step.row_position[row];
  if (is_q || is_k) {
#pragma unroll
    for (int i = 0; i < kMaxPairs; ++i) {
      const int j = lane + 32 * i;
      if (j < half) {
        double s, c;
        sincos(static_cast<double>(position) * inv_freq[j], &s, &c);
        const float cf = static_cast<float>(c), sf = static_cast<float>(s);
        const float a = lo[i], bb = hi[i];
        lo[i] = a * cf - bb * sf;
        hi[i] = bb * cf + a * sf;
      }
    }
  }
  float* dst;
  uint16_t* cache = nullptr;
  if (is_q) {
    dst = q_out + (int64_t{row} * num_q_heads + head) * d;
  } else {
    const int kv_head = is_k ? head - num_q_heads : head - num_q_heads - hkv;
    dst = (is_k ? fresh_k : fresh_v) + (int64_t{row} * hkv + kv_head) * d;
    const int chunk = step.row_chunk[row];
    cache = kv.pool + PoolOffset(kv, step.block_tables + int64_t{chunk} * step.max_blocks, position,
                                 layer, is_k ? 0 : 1, kv_head);
  }
#pragma unroll
  for (int i = 0; i < kMaxPairs; ++i) {
    const int j = lane + 32 * i;
    if (j < half) {
      dst[j] = lo[i];
      dst[j + half] = hi[i];
      if (cache != nullptr) {
        cache[j] = FloatToHalf(lo[i]);
        cache[j + half] = FloatToHalf(hi[i]);
      }
    }
  }
}

constexpr int kAttnWarps = 8;
constexpr int kMaxPerLane = 8;  // head_dim <= 256

// grid (rows, Hq), kAttnWarps warps; warp w takes keys w, w + kAttnWarps, ...; online softmax
// per warp, then the warps' partial results are merged in shared memory.
__global__ void __launch_bounds__(kAttnWarps * 32)
    PagedAttentionKernel(const float* q, const float* fresh_k, const float* fresh_v,
                         StepLayout step, KvPoolLayout kv, int layer, int num_q_heads, float scale,
                         uint16_t* out, float* out_f32) {
  __shared__ float warp_max[kAttnWarps], warp_sum[kAttnWarps];
  __shared__ float warp_acc[kAttnWarps][kMaxPerLane * 32];
  const int row = blockIdx.x, head = blockIdx.y;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int d = kv.head_dim, per_lane = d / 32, hkv = kv.num_kv_heads;
  const int kv_head = head / (num_q_heads / hkv);
  const int chunk = step.row_chunk[row];
  const int64_t position = step.row_position[row];
  const int64_t past = step.chunk_past[chunk];
  const bool all_cached = step.chunk_all_cached[chunk] != 0;
  const int64_t first_fresh_row = step.row_begin[chunk];
  const int32_t* table = step.block_tables + int64_t{chunk} * step.max_blocks;

  float qv[kMaxPerLane], acc[kMaxPerLane];
  const float* qrow = q + (int64_t{row} * num_q_heads + head) * d;
#pragma unroll
  for (int i = 0; i < kMaxPerLane; ++i) {
    qv[i] = i < per_lane ? qrow[lane + 32 * i] * scale : 0.0f;
    acc[i] = 0.0f;
  }
  float m = -INFINITY, l = 0.0f;
  for (int64_t t = warp; t <= position; t += kAttnWarps) {
    float kvals[kMaxPerLane], vvals[kMaxPerLane];
    if (t < past || all_cached) {
      const int64_t k_off = PoolOffset(kv, table, t, layer, 0, kv_head);
      const int64_t v_off = k_off + int64_t{hkv} * kv.block_size * d;
#pragma unroll
      for (int i = 0; i < kMaxPerLane; ++i) {
        if (i < per_lane) {
          kvals[i] = HalfToFloat(kv.pool[k_off + lane + 32 * i]);
          vvals[i] = HalfToFloat(kv.pool[v_off + lane + 32 * i]);
        }
      }
    } else {
      const int64_t fresh_row = first_fresh_row + (t - past);
      const float* krow = fresh_k + (fresh_row * hkv + kv_head) * d;
      const float* vrow = fresh_v + (fresh_row * hkv + kv_head) * d;
#pragma unroll
      for (int i = 0; i < kMaxPerLane; ++i) {
        if (i < per_lane) {
          kvals[i] = krow[lane + 32 * i];
          vvals[i] = vrow[lane + 32 * i];
        }
      }
    }
    float dot = 0;
#pragma unroll
    for (int i = 0; i < kMaxPerLane; ++i) {
      if (i < per_lane) dot += qv[i] * kvals[i];
    }
    const float s = WarpSum(dot);
    const float m_new = fmaxf(m, s);
    const float correction = __expf(m - m_new);
    const float p = __expf(s - m_new);
    l = l * correction + p;
#pragma unroll
    for (int i = 0; i < kMaxPerLane; ++i) {
      if (i < per_lane) acc[i] = acc[i] * correction + p * vvals[i];
    }
    m = m_new;
  }
  if (lane == 0) {
    warp_max[warp] = m;
    warp_sum[warp] = l;
  }
#pragma unroll
  for (int i = 0; i < kMaxPerLane; ++i) {
    if (i < per_lane) warp_acc[warp][lane + 32 * i] = acc[i];
  }
  __syncthreads();
  float total_max = -INFINITY;
  for (int w = 0; w < kAttnWarps; ++w) total_max = fmaxf(total_max, warp_max[w]);
  float total_sum = 0;
  for (int w = 0; w < kAttnWarps; ++w) {
    if (warp_sum[w] > 0) total_sum += warp_sum[w] * __expf(warp_max[w] - total_max);
  }
  const int64_t out_row = (int64_t{row} * num_q_heads + head) * d;
  for (int j = threadIdx.x; j < d; j += blockDim.x) {
    float value = 0;
    for (int w = 0; w < kAttnWarps; ++w) {
      if (warp_sum[w] > 0) value += warp_acc[w][j] * __expf(warp_max[w] - total_max);
    }
    value /= total_sum;
    if (out_f32 != nullptr) {
      out_f32[out_row + j] = value;
    } else {
      out[out_row + j] = FloatToBf16(value);
    }
  }
}

__global__ void SwiGluKernel(const float* gate_up, uint16_t* act, int num_rows, int inter) {
  const int64_t total = int64_t{num_rows} * inter;
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < total;
       i += int64_t{gridDim.x} * blockDim.x) {
    const int64_t row = i / inter, j = i % inter;
    const float gate = gate_up[row * 2 * inter + j];
    const float up = gate_up[row * 2 * inter + inter + j];
    act[i] = FloatToBf16(gate / (1.0f + __expf(-gate)) * up);
  }
}

__global__ void AddBiasKernel(float* x, const float* bias, int num_rows, int cols) {
  const int64_t total = int64_t{num_rows} * cols;
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < total;
       i += int64_t{gridDim.x} * blockDim.x) {
    x[i] += bias[i % cols];
  }
}

__global__ void FloatToBf16Kernel(const float* src, uint16_t* dst, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n;
       i += int64_t{gridDim.x} * blockDim.x) {
    dst[i] = FloatToBf16(src[i]);
  }
}

// grid (n, Hkv), D threads (strided).
__global__ void AppendKvKernel(const float* k, const float* v, int64_t first_position,
                               const int32_t* table, KvPoolLayout kv, int layer) {
  const int64_t token = blockIdx.x;
  const int kv_head = blockIdx.y, d = kv.head_dim;
  const int64_t k_off = PoolOffset(kv, table, first_position + token, layer, 0, kv_head);
  const int64_t v_off = k_off + int64_t{kv.num_kv_heads} * kv.block_size * d;
  const int64_t src = (token * kv.num_kv_heads + kv_head) * d;
  for (int j = threadIdx.x; j < d; j += blockDim.x) {
    kv.pool[k_off + j] = FloatToHalf(k[src + j]);
    kv.pool[v_off + j] = FloatToHalf(v[src + j]);
  }
}

__global__ void ReadKvKernel(const int32_t* table, KvPoolLayout kv, int layer, int kv_head,
                             float* k, float* v) {
  const int64_t token = blockIdx.x;
  const int d = kv.head_dim;
  const int64_t k_off = PoolOffset(kv, table, token, layer, 0, kv_head);
  const int64_t v_off = k_off + int64_t{kv.num_kv_heads} * kv.block_size * d;
  for (int j = threadIdx.x; j < d; j += blockDim.x) {
    k[token * d + j] = HalfToFloat(kv.pool[k_off + j]);
    v[token * d + j] = HalfToFloat(kv.pool[v_off + j]);
  }
}

int GridFor(int64_t n, int threads) {
  const int64_t blocks = (n + threads - 1) / threads;
  return static_cast<int>(blocks < 65535 * 16 ? (blocks > 0 ? blocks : 1) : 65535 * 16);
}

}  // namespace

cudaError_t LaunchEmbedding(const uint16_t* embed_bf16, const int32_t* tokens, float* x,
                            int num_rows, int hidden, cudaStream_t stream) {
  if (num_rows <= 0) return cudaSuccess;
  EmbeddingKernel<<<num_rows, 256, 0, stream>>>(embed_bf16, tokens, x, hidden);
  return cudaGetLastError();
}

cudaError_t LaunchRmsNormToBf16(const float* x, const float* weight, const int32_t* gather_rows,
                                uint16_t* out, int num_rows, int hidden, float eps,
                                cudaStream_t stream) {
  if (num_rows <= 0) return cudaSuccess;
  RmsNormKernel<<<num_rows, 256, 0, stream>>>(x, weight, gather_rows, out, hidden, eps);
  return cudaGetLastError();
}

cudaError_t LaunchQkvEpilogue(float* qkv, const float* bias, const float* q_norm,
                              const float* k_norm, const double* inv_freq, float norm_eps,
                              const StepLayout& step, const KvPoolLayout& kv, int layer,
                              int num_q_heads, float* q, float* fresh_k, float* fresh_v,
                              cudaStream_t stream) {
  if (step.num_rows <= 0) return cudaSuccess;
  if (kv.head_dim % 2 != 0 || kv.head_dim > 256) return cudaErrorInvalidValue;
  const dim3 grid(step.num_rows, num_q_heads + 2 * kv.num_kv_heads);
  QkvEpilogueKernel<<<grid, 32, 0, stream>>>(qkv, bias, q_norm, k_norm, inv_freq, norm_eps, step,
                                             kv, layer, num_q_heads, q, fresh_k, fresh_v);
  return cudaGetLastError();
}

cudaError_t LaunchPagedAttention(const float* q, const float* fresh_k, const float* fresh_v,
                                 const StepLayout& step, const KvPoolLayout& kv, int layer,
                                 int num_q_heads, float scale, uint16_t* out, float* out_f32,
                                 cudaStream_t stream) {
  if (step.num_rows <= 0) return cudaSuccess;
  if (kv.head_dim % 32 != 0 || kv.head_dim > 32 * kMaxPerLane) return cudaErrorInvalidValue;
  const dim3 grid(step.num_rows, num_q_heads);
  PagedAttentionKernel<<<grid, kAttnWarps * 32, 0, stream>>>(q, fresh_k, fresh_v, step, kv, layer,
                                                             num_q_heads, scale, out, out_f32);
  return cudaGetLastError();
}

cudaError_t LaunchSwiGlu(const float* gate_up, uint16_t* act, int num_rows, int inter,
                         cudaStream_t stream) {
  if (num_rows <= 0) return cudaSuccess;
  SwiGluKernel<<<GridFor(int64_t{num_rows} * inter, 256), 256, 0, stream>>>(gate_up, act, num_rows,
                                                                            inter);
  return cudaGetLastError();
}

cudaError_t LaunchAddBias(float* x, const float* bias, int num_rows, int cols,
                          cudaStream_t stream) {
  if (num_rows <= 0) return cudaSuccess;
  AddBiasKernel<<<GridFor(int64_t{num_rows} * cols, 256), 256, 0, stream>>>(x, bias, num_rows,
                                                                            cols);
  return cudaGetLastError();
}

cudaError_t LaunchFloatToBf16(const float* src, uint16_t* dst, int64_t n, cudaStream_t stream) {
  if (n <= 0) return cudaSuccess;
  FloatToBf16Kernel<<<GridFor(n, 256), 256, 0, stream>>>(src, dst, n);
  return cudaGetLastError();
}

cudaError_t LaunchAppendKv(const float* k, const float* v, int n, int64_t first_position,
                           const int32_t* table, const KvPoolLayout& kv, int layer,
                           cudaStream_t stream) {
  if (n <= 0) return cudaSuccess;
  AppendKvKernel<<<dim3(n, kv.num_kv_heads), 128, 0, stream>>>(k, v, first_position, table, kv,
                                                               layer);
  return cudaGetLastError();
}

cudaError_t LaunchReadKv(const int32_t* table, int64_t n, const KvPoolLayout& kv, int layer,
                         int kv_head, float* k, float* v, cudaStream_t stream) {
  if (n <= 0) return cudaSuccess;
  ReadKvKernel<<<static_cast<unsigned>(n), 128, 0, stream>>>(table, kv, layer, kv_head, k, v);
  return cudaGetLastError();
}

}  // namespace kvgate::worker::cuda
