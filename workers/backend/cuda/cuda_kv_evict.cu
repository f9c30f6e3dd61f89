#include "workers/backend/cuda/cuda_kv_evict.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>

#include <cfloat>

namespace kvgate::worker::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kCopySlots = 32;  // records staged per compaction step
constexpr int kMaxGroup = 8;
constexpr int kMaxHeadDim = 128;

__device__ __forceinline__ int64_t MetaIndex(const EvictPool& p, int32_t block, int head,
                                             int64_t slot_in_block) {
  return ((int64_t{block} * p.num_layers + p.layer) * p.num_kv_heads + head) * p.block_size +
         slot_in_block;
}

__device__ __forceinline__ int64_t SlotMeta(const EvictPool& p, const int32_t* table, int head,
                                            int64_t slot) {
  return MetaIndex(p, table[slot / p.block_size], head, slot % p.block_size);
}

__device__ __forceinline__ uint8_t* SlotRecord(const EvictPool& p, const int32_t* table, int head,
                                               int64_t slot) {
  return p.pool + int64_t{table[slot / p.block_size]} * p.block_stride_bytes +
         p.layer_offset_bytes +
         (int64_t{head} * p.block_size + slot % p.block_size) * p.record_bytes;
}

// Block-wide sum of one int per thread.
__device__ int BlockSum(int v, int* scratch) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  __syncthreads();
  if ((threadIdx.x & 31) == 0) scratch[threadIdx.x >> 5] = v;
  __syncthreads();
  int total = 0;
  for (int w = 0; w < kWarps; ++w) total += scratch[w];
  return total;
}

// Grid (num_seqs, kv_heads). Masses are >= 0, so their bit patterns order like the floats: the
// heavy-th largest is found by a radix search on the bits (32 counting passes over the middle).
__global__ void EvictCompactKernel(EvictPool p, const EvictPlan* plans) {
  const EvictPlan plan = plans[blockIdx.x];
  const int head = blockIdx.y;
  const int32_t* table = p.block_tables + int64_t{blockIdx.x} * p.max_blocks;
  __shared__ int scratch[kWarps];
  __shared__ int32_t dst_of[kCopySlots];
  __shared__ int32_t pos_stage[kCopySlots];
  __shared__ float mass_stage[kCopySlots];
  __shared__ bool moving;
  extern __shared__ uint32_t record_stage[];  // [kCopySlots][record_bytes / 4]

  const int64_t stored = plan.stored;
  int64_t kept = stored;
  if (int64_t{plan.lead} + plan.trail + plan.heavy < stored) {
    const int64_t mid_begin = plan.lead, mid_end = stored - plan.trail;
    // Threshold T: the heavy-th largest mass bits among the middle; keep > T, and the first
    // (heavy - count(> T)) slots equal to T.
    uint32_t threshold = 0;
    int need_equal = 0;
    if (plan.heavy > 0) {
      for (int bit = 31; bit >= 0; --bit) {
        const uint32_t candidate = threshold | (1u << bit);
        int count = 0;
        for (int64_t i = mid_begin + threadIdx.x; i < mid_end; i += kThreads) {
          count += __float_as_uint(p.mass[SlotMeta(p, table, head, i)]) >= candidate;
        }
        if (BlockSum(count, scratch) >= plan.heavy) threshold = candidate;
      }
      int greater = 0;
      for (int64_t i = mid_begin + threadIdx.x; i < mid_end; i += kThreads) {
        greater += __float_as_uint(p.mass[SlotMeta(p, table, head, i)]) > threshold;
      }
      need_equal = plan.heavy - BlockSum(greater, scratch);
    }
    // Compaction in slot order, kCopySlots at a time: a destination never exceeds its source, so
    // staging a whole step before writing it keeps unread sources intact.
    const int words = p.record_bytes / 4;
    int64_t dst = 0;
    int equal_seen = 0;
    for (int64_t c0 = 0; c0 < stored; c0 += kCopySlots) {
      if (threadIdx.x < 32) {
        const int64_t i = c0 + threadIdx.x;
        bool keep = false, equal = false;
        if (i < stored) {
          if (i < mid_begin || i >= mid_end) {
            keep = true;
          } else if (plan.heavy > 0) {
            const uint32_t bits = __float_as_uint(p.mass[SlotMeta(p, table, head, i)]);
            keep = bits > threshold;
            equal = bits == threshold;
          }
        }
        const uint32_t lower = (1u << threadIdx.x) - 1u;
        const uint32_t eq_ballot = __ballot_sync(0xffffffffu, equal);
        if (equal && equal_seen + __popc(eq_ballot & lower) < need_equal) keep = true;
        const uint32_t keep_ballot = __ballot_sync(0xffffffffu, keep);
        dst_of[threadIdx.x] =
            keep ? static_cast<int32_t>(dst + __popc(keep_ballot & lower)) : -1;
        if (keep && i < stored) {
          const int64_t m = SlotMeta(p, table, head, i);
          pos_stage[threadIdx.x] = p.positions[m];
          mass_stage[threadIdx.x] = p.mass != nullptr ? p.mass[m] : 0.0f;
        }
        // A step whose slots all stay where they are (the kept prefix) copies nothing.
        if (threadIdx.x == 0) moving = !(dst == c0 && keep_ballot == 0xffffffffu);
        equal_seen += __popc(eq_ballot);
        dst += __popc(keep_ballot);
      }
      __syncthreads();
      if (!moving) {
        __syncthreads();  // everyone has read `moving` before warp 0 rewrites it
        continue;
      }
      for (int e = threadIdx.x; e < kCopySlots * words; e += kThreads) {
        const int s = e / words, w = e % words;
        if (dst_of[s] >= 0) {
          record_stage[e] = reinterpret_cast<const uint32_t*>(SlotRecord(p, table, head, c0 + s))[w];
        }
      }
      __syncthreads();
      for (int e = threadIdx.x; e < kCopySlots * words; e += kThreads) {
        const int s = e / words, w = e % words;
        if (dst_of[s] >= 0) {
          reinterpret_cast<uint32_t*>(SlotRecord(p, table, head, dst_of[s]))[w] = record_stage[e];
        }
      }
      if (threadIdx.x < kCopySlots && dst_of[threadIdx.x] >= 0) {
        const int64_t m = SlotMeta(p, table, head, dst_of[threadIdx.x]);
        p.positions[m] = pos_stage[threadIdx.x];
        if (p.mass != nullptr) p.mass[m] = mass_stage[threadIdx.x];
      }
      __syncthreads();
    }
    // Every lane of warp 0 holds the same dst; share it.
    if (threadIdx.x == 0) scratch[0] = static_cast<int>(dst);
    __syncthreads();
    kept = scratch[0];
  }
  for (int i = threadIdx.x; i < plan.n; i += kThreads) {
    const int64_t m = SlotMeta(p, table, head, kept + i);
    p.positions[m] = plan.length + i;
    if (p.mass != nullptr) p.mass[m] = 0.0f;
  }
}

__device__ __forceinline__ float KeyElement(MassKeyFormat format, const uint8_t* record, int c,
                                            int d, float fp8_scale) {
  switch (format) {
    case MassKeyFormat::kFp16:
      return __half2float(reinterpret_cast<const __half*>(record)[c]);
    case MassKeyFormat::kBf16:
      return __bfloat162float(reinterpret_cast<const __nv_bfloat16*>(record)[c]);
    case MassKeyFormat::kFp8: {
      __nv_fp8_e4m3 x;
      x.__x = record[c];
      return static_cast<float>(x) * fp8_scale;
    }
    case MassKeyFormat::kInt8: {
      const __half s = *reinterpret_cast<const __half*>(record + d);
      return static_cast<float>(static_cast<int8_t>(record[c])) * __half2float(s);
    }
  }
  return 0.0f;
}

// Scores of one key for `group` queries (qs [group][d] in shared memory), by one warp; every lane
// returns all scores.
template <class KeyAt>
__device__ __forceinline__ void WarpScores(KeyAt key_at, const float* qs, int group, int d,
                                           float scale, float* s) {
  float partial[kMaxGroup];
  for (int j = 0; j < kMaxGroup; ++j) partial[j] = 0.0f;
  const int lane = threadIdx.x & 31;
  for (int c = lane; c < d; c += 32) {
    const float k = key_at(c);
    for (int j = 0; j < group; ++j) partial[j] += qs[j * d + c] * k;
  }
  for (int j = 0; j < group; ++j) {
    float v = partial[j];
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    s[j] = v * scale;
  }
}

// Online (max, sum) of the group over keys [0, count), each warp a strided share, merged across
// warps; then mass[key] += sum_j exp(s_j - M_j) / L_j. key_at(t) returns a functor of the
// channel; mass_at(t) the mass address of key t.
template <class KeyFn, class MassFn>
__device__ void AccumulateMass(KeyFn key_fn, MassFn mass_at, int64_t count, const float* qs,
                               int group, int d, float scale, bool atomic) {
  __shared__ float warp_m[kWarps][kMaxGroup], warp_l[kWarps][kMaxGroup];
  __shared__ float final_m[kMaxGroup], final_inv_l[kMaxGroup];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  float m[kMaxGroup], l[kMaxGroup], s[kMaxGroup];
  for (int j = 0; j < kMaxGroup; ++j) {
    m[j] = -FLT_MAX;
    l[j] = 0.0f;
  }
  for (int64_t t = warp; t < count; t += kWarps) {
    WarpScores(key_fn(t), qs, group, d, scale, s);
    for (int j = 0; j < group; ++j) {
      if (s[j] > m[j]) {
        l[j] = l[j] * expf(m[j] - s[j]) + 1.0f;
        m[j] = s[j];
      } else {
        l[j] += expf(s[j] - m[j]);
      }
    }
  }
  if (lane == 0) {
    for (int j = 0; j < group; ++j) {
      warp_m[warp][j] = m[j];
      warp_l[warp][j] = l[j];
    }
  }
  __syncthreads();
  if (threadIdx.x < group) {
    const int j = threadIdx.x;
    float mm = -FLT_MAX;
    for (int w = 0; w < kWarps; ++w) mm = fmaxf(mm, warp_m[w][j]);
    float ll = 0.0f;
    for (int w = 0; w < kWarps; ++w) {
      if (warp_l[w][j] > 0.0f) ll += warp_l[w][j] * expf(warp_m[w][j] - mm);
    }
    final_m[j] = mm;
    final_inv_l[j] = ll > 0.0f ? 1.0f / ll : 0.0f;
  }
  __syncthreads();
  for (int64_t t = warp; t < count; t += kWarps) {
    WarpScores(key_fn(t), qs, group, d, scale, s);
    if (lane == 0) {
      float add = 0.0f;
      for (int j = 0; j < group; ++j) add += expf(s[j] - final_m[j]) * final_inv_l[j];
      float* mass = mass_at(t);
      if (atomic) {
        atomicAdd(mass, add);
      } else {
        *mass += add;
      }
    }
  }
  __syncthreads();
}

// Grid (num_seqs, kv_heads).
__global__ void DecodeMassKernel(EvictPool p, MassKeys keys, const int32_t* lens, const float* q,
                                 int group, int group_pad, float scale) {
  const int seq = blockIdx.x, head = blockIdx.y, d = p.head_dim;
  const int32_t* table = p.block_tables + int64_t{seq} * p.max_blocks;
  __shared__ float qs[kMaxGroup * kMaxHeadDim];
  const float* qh = q + (int64_t{seq} * p.num_kv_heads * group_pad + int64_t{head} * group_pad) * d;
  for (int e = threadIdx.x; e < group * d; e += kThreads) qs[e] = qh[e];
  __syncthreads();
  const float fp8_scale =
      keys.format == MassKeyFormat::kFp8
          ? keys.head_scales[(int64_t{keys.seq_slots[seq]} * p.num_kv_heads + head) * 2]
          : 0.0f;
  auto key_fn = [&](int64_t t) {
    const uint8_t* record = SlotRecord(p, table, head, t);
    return [=](int c) { return KeyElement(keys.format, record, c, d, fp8_scale); };
  };
  auto mass_at = [&](int64_t t) { return p.mass + SlotMeta(p, table, head, t); };
  AccumulateMass(key_fn, mass_at, lens[seq], qs, group, d, scale, /*atomic=*/false);
}

// Grid (max_chunk_tokens, num_chunks, kv_heads): one query token (all its group's heads) per CTA.
__global__ void PrefillMassKernel(EvictPool p, const PrefillMassChunk* chunks, const float* q,
                                  int group, int group_pad, const float* fresh_k,
                                  int64_t fresh_row_stride, const float* prefix_k,
                                  int64_t prefix_stride_tokens, float scale) {
  const PrefillMassChunk chunk = chunks[blockIdx.y];
  const int i = blockIdx.x, head = blockIdx.z, d = p.head_dim;
  if (i >= chunk.n) return;
  const int32_t* table = p.block_tables + int64_t{chunk.batch_index} * p.max_blocks;
  __shared__ float qs[kMaxGroup * kMaxHeadDim];
  const int64_t row = int64_t{chunk.first_row} + i;
  const float* qh = q + (row * p.num_kv_heads * group_pad + int64_t{head} * group_pad) * d;
  for (int e = threadIdx.x; e < group * d; e += kThreads) qs[e] = qh[e];
  __syncthreads();
  const float* prefix =
      chunk.prefix_index >= 0
          ? prefix_k + (int64_t{chunk.prefix_index} * p.num_kv_heads + head) * prefix_stride_tokens * d
          : nullptr;
  auto key_fn = [&](int64_t t) {
    const float* key = t < chunk.cached
                           ? prefix + t * d
                           : fresh_k + (int64_t{chunk.first_row} + (t - chunk.cached)) *
                                           fresh_row_stride +
                                 int64_t{head} * d;
    return [=](int c) { return key[c]; };
  };
  auto mass_at = [&](int64_t t) { return p.mass + SlotMeta(p, table, head, t); };
  AccumulateMass(key_fn, mass_at, int64_t{chunk.cached} + i + 1, qs, group, d, scale,
                 /*atomic=*/true);
}

}  // namespace

cudaError_t LaunchEvictCompact(const EvictPool& p, const EvictPlan* plans, cudaStream_t stream) {
  if (p.num_seqs == 0) return cudaSuccess;
  if (p.record_bytes % 4 != 0) return cudaErrorInvalidValue;
  const size_t smem = size_t{kCopySlots} * p.record_bytes;
  EvictCompactKernel<<<dim3(p.num_seqs, p.num_kv_heads), kThreads, smem, stream>>>(p, plans);
  return cudaGetLastError();
}

cudaError_t LaunchDecodeMass(const EvictPool& p, const MassKeys& keys, const int32_t* lens,
                             const float* q, int group, int group_pad, float scale,
                             cudaStream_t stream) {
  if (p.num_seqs == 0) return cudaSuccess;
  if (group > kMaxGroup || p.head_dim > kMaxHeadDim) return cudaErrorInvalidValue;
  DecodeMassKernel<<<dim3(p.num_seqs, p.num_kv_heads), kThreads, 0, stream>>>(
      p, keys, lens, q, group, group_pad, scale);
  return cudaGetLastError();
}

cudaError_t LaunchPrefillMass(const EvictPool& p, const PrefillMassChunk* chunks, int num_chunks,
                              int max_chunk_tokens, const float* q, int group, int group_pad,
                              const float* fresh_k, int64_t fresh_row_stride, const float* prefix_k,
                              int64_t prefix_stride_tokens, float scale, cudaStream_t stream) {
  if (num_chunks == 0 || max_chunk_tokens == 0) return cudaSuccess;
  if (group > kMaxGroup || p.head_dim > kMaxHeadDim) return cudaErrorInvalidValue;
  PrefillMassKernel<<<dim3(max_chunk_tokens, num_chunks, p.num_kv_heads), kThreads, 0, stream>>>(
      p, chunks, q, group, group_pad, fresh_k, fresh_row_stride, prefix_k, prefix_stride_tokens,
      scale);
  return cudaGetLastError();
}

}  // namespace kvgate::worker::cuda
