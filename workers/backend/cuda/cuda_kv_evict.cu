#include "workers/backend/cuda/cuda_kv_evict.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>

#include <algorithm>
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

// Scores of one stored key (its record) for the group's queries qs [group][d] (shared memory),
// by one thread: the key decoded exactly as the CPU codec decodes it, dot products in fp32.
__device__ __forceinline__ void RecordScores(MassKeyFormat format, const uint8_t* record,
                                             const float* qs, int group, int d, float fp8_scale,
                                             float scale, float* s) {
  float acc[kMaxGroup];
  for (int j = 0; j < kMaxGroup; ++j) acc[j] = 0.0f;
  const uint32_t* words = reinterpret_cast<const uint32_t*>(record);
  auto add = [&](int c, float k) {
    for (int j = 0; j < group; ++j) acc[j] += qs[j * d + c] * k;
  };
  if (format == MassKeyFormat::kFp16 || format == MassKeyFormat::kBf16) {
    for (int w = 0; w < d / 2; ++w) {
      const uint32_t x = words[w];
      float lo, hi;
      if (format == MassKeyFormat::kFp16) {
        const __half2 h = *reinterpret_cast<const __half2*>(&x);
        lo = __low2float(h);
        hi = __high2float(h);
      } else {
        const __nv_bfloat162 h = *reinterpret_cast<const __nv_bfloat162*>(&x);
        lo = __low2float(h);
        hi = __high2float(h);
      }
      add(2 * w, lo);
      add(2 * w + 1, hi);
    }
  } else {
    const float int8_scale =
        format == MassKeyFormat::kInt8
            ? __half2float(*reinterpret_cast<const __half*>(record + d))
            : 0.0f;
    for (int w = 0; w < d / 4; ++w) {
      const uint32_t x = words[w];
      for (int b = 0; b < 4; ++b) {
        const uint8_t code = static_cast<uint8_t>(x >> (8 * b));
        float k;
        if (format == MassKeyFormat::kFp8) {
          __nv_fp8_e4m3 e;
          e.__x = code;
          k = static_cast<float>(e) * fp8_scale;
        } else {
          k = static_cast<float>(static_cast<int8_t>(code)) * int8_scale;
        }
        add(4 * w + b, k);
      }
    }
  }
  for (int j = 0; j < group; ++j) s[j] = acc[j] * scale;
}

// Merges softmax statistics (m, l) of two sets of scores.
__device__ __forceinline__ void MergeMl(float& m, float& l, float m2, float l2) {
  const float mm = fmaxf(m, m2);
  l = (l > 0.0f ? l * expf(m - mm) : 0.0f) + (l2 > 0.0f ? l2 * expf(m2 - mm) : 0.0f);
  m = mm;
}

struct DecodeMassArgs {
  EvictPool p;
  MassKeys keys;
  const int32_t* lens;
  const float* q;
  float* partial_ml;  // [num_seqs, kv_heads, max_splits, kMaxGroup, 2]
  int max_splits;
  int split_tokens;  // a multiple of kThreads
  int group, group_pad;
  float scale;
};

// Loads the group's queries of (seq, head) into qs and returns the FP8 key scale.
__device__ float LoadDecodeQueries(const DecodeMassArgs& a, int seq, int head, float* qs) {
  const int d = a.p.head_dim;
  const float* qh =
      a.q + (int64_t{seq} * a.p.num_kv_heads * a.group_pad + int64_t{head} * a.group_pad) * d;
  for (int e = threadIdx.x; e < a.group * d; e += kThreads) qs[e] = qh[e];
  __syncthreads();
  return a.keys.format == MassKeyFormat::kFp8
             ? a.keys.head_scales[(int64_t{a.keys.seq_slots[seq]} * a.p.num_kv_heads + head) * 2]
             : 0.0f;
}

// Grid (max_splits_used, kv_heads, num_seqs), one key per thread at a time. Pass 1: each split's
// softmax statistics per query head.
__global__ void DecodeMassPartialKernel(DecodeMassArgs a) {
  const int split = blockIdx.x, head = blockIdx.y, seq = blockIdx.z, d = a.p.head_dim;
  const int64_t len = a.lens[seq], begin = int64_t{split} * a.split_tokens;
  if (begin >= len) return;
  const int64_t end = len < begin + a.split_tokens ? len : begin + a.split_tokens;
  __shared__ float qs[kMaxGroup * kMaxHeadDim];
  __shared__ float warp_ml[kWarps][kMaxGroup][2];
  const float fp8_scale = LoadDecodeQueries(a, seq, head, qs);
  const int32_t* table = a.p.block_tables + int64_t{seq} * a.p.max_blocks;
  float m[kMaxGroup], l[kMaxGroup], sc[kMaxGroup];
  for (int j = 0; j < kMaxGroup; ++j) {
    m[j] = -FLT_MAX;
    l[j] = 0.0f;
  }
  for (int64_t t = begin + threadIdx.x; t < end; t += kThreads) {
    RecordScores(a.keys.format, SlotRecord(a.p, table, head, t), qs, a.group, d, fp8_scale,
                 a.scale, sc);
    for (int j = 0; j < a.group; ++j) MergeMl(m[j], l[j], sc[j], 1.0f);
  }
  for (int j = 0; j < a.group; ++j) {
    for (int o = 16; o > 0; o >>= 1) {
      const float m2 = __shfl_xor_sync(0xffffffffu, m[j], o);
      const float l2 = __shfl_xor_sync(0xffffffffu, l[j], o);
      MergeMl(m[j], l[j], m2, l2);
    }
  }
  const int warp = threadIdx.x >> 5;
  if ((threadIdx.x & 31) == 0) {
    for (int j = 0; j < a.group; ++j) {
      warp_ml[warp][j][0] = m[j];
      warp_ml[warp][j][1] = l[j];
    }
  }
  __syncthreads();
  if (threadIdx.x < a.group) {
    const int j = threadIdx.x;
    float mm = -FLT_MAX, ll = 0.0f;
    for (int w = 0; w < kWarps; ++w) MergeMl(mm, ll, warp_ml[w][j][0], warp_ml[w][j][1]);
    float* out = a.partial_ml +
                 (((int64_t{seq} * a.p.num_kv_heads + head) * a.max_splits + split) * kMaxGroup + j) * 2;
    out[0] = mm;
    out[1] = ll;
  }
}

// Pass 2, same grid: the statistics of every split of the sequence give (M, L) per query head;
// each thread adds sum_j exp(s_j - M_j) / L_j to its keys' masses (each key has one owner).
__global__ void DecodeMassAddKernel(DecodeMassArgs a) {
  const int split = blockIdx.x, head = blockIdx.y, seq = blockIdx.z, d = a.p.head_dim;
  const int64_t len = a.lens[seq], begin = int64_t{split} * a.split_tokens;
  if (begin >= len) return;
  const int64_t end = len < begin + a.split_tokens ? len : begin + a.split_tokens;
  __shared__ float qs[kMaxGroup * kMaxHeadDim];
  __shared__ float final_m[kMaxGroup], final_inv_l[kMaxGroup];
  const float fp8_scale = LoadDecodeQueries(a, seq, head, qs);
  if (threadIdx.x < a.group) {
    const int j = threadIdx.x;
    const int splits = static_cast<int>((len + a.split_tokens - 1) / a.split_tokens);
    const float* in =
        a.partial_ml + ((int64_t{seq} * a.p.num_kv_heads + head) * a.max_splits) * kMaxGroup * 2;
    float mm = -FLT_MAX, ll = 0.0f;
    for (int x = 0; x < splits; ++x) {
      MergeMl(mm, ll, in[(x * kMaxGroup + j) * 2], in[(x * kMaxGroup + j) * 2 + 1]);
    }
    final_m[j] = mm;
    final_inv_l[j] = ll > 0.0f ? 1.0f / ll : 0.0f;
  }
  __syncthreads();
  const int32_t* table = a.p.block_tables + int64_t{seq} * a.p.max_blocks;
  float sc[kMaxGroup];
  for (int64_t t = begin + threadIdx.x; t < end; t += kThreads) {
    RecordScores(a.keys.format, SlotRecord(a.p, table, head, t), qs, a.group, d, fp8_scale,
                 a.scale, sc);
    float add = 0.0f;
    for (int j = 0; j < a.group; ++j) add += expf(sc[j] - final_m[j]) * final_inv_l[j];
    a.p.mass[SlotMeta(a.p, table, head, t)] += add;
  }
}

// Scores of one fp32 key for `group` queries (qs [group][d] in shared memory), by one warp (the
// prefill mass: keys read back or fresh in fp32); every lane returns all scores.
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
// warps; then mass[key] += sum_j exp(s_j - M_j) / L_j. key_fn(t) returns a functor of the
// channel; mass_at(t) the mass address of key t.
template <class KeyFn, class MassFn>
__device__ void AccumulateMass(KeyFn key_fn, MassFn mass_at, int64_t count, const float* qs,
                               int group, int d, float scale) {
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
    for (int j = 0; j < group; ++j) MergeMl(m[j], l[j], s[j], 1.0f);
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
    float mm = -FLT_MAX, ll = 0.0f;
    for (int w = 0; w < kWarps; ++w) MergeMl(mm, ll, warp_m[w][j], warp_l[w][j]);
    final_m[j] = mm;
    final_inv_l[j] = ll > 0.0f ? 1.0f / ll : 0.0f;
  }
  __syncthreads();
  for (int64_t t = warp; t < count; t += kWarps) {
    WarpScores(key_fn(t), qs, group, d, scale, s);
    if (lane == 0) {
      float add = 0.0f;
      for (int j = 0; j < group; ++j) add += expf(s[j] - final_m[j]) * final_inv_l[j];
      atomicAdd(mass_at(t), add);  // the CTAs of a chunk's query tokens share the keys
    }
  }
  __syncthreads();
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
  AccumulateMass(key_fn, mass_at, int64_t{chunk.cached} + i + 1, qs, group, d, scale);
}

}  // namespace

cudaError_t LaunchEvictCompact(const EvictPool& p, const EvictPlan* plans, cudaStream_t stream) {
  if (p.num_seqs == 0) return cudaSuccess;
  if (p.record_bytes % 4 != 0) return cudaErrorInvalidValue;
  const size_t smem = size_t{kCopySlots} * p.record_bytes;
  EvictCompactKernel<<<dim3(p.num_seqs, p.num_kv_heads), kThreads, smem, stream>>>(p, plans);
  return cudaGetLastError();
}

int DecodeMassSplitTokens(int max_len) {
  const int per_split = (max_len + kMaxMassSplits - 1) / kMaxMassSplits;
  return std::max(kThreads, (per_split + kThreads - 1) / kThreads * kThreads);
}

cudaError_t LaunchDecodeMass(const EvictPool& p, const MassKeys& keys, const int32_t* lens,
                             int max_len, const float* q, int group, int group_pad, float scale,
                             float* partial_ml, cudaStream_t stream) {
  if (p.num_seqs == 0 || max_len <= 0) return cudaSuccess;
  if (group > kMaxGroup || p.head_dim > kMaxHeadDim) return cudaErrorInvalidValue;
  DecodeMassArgs a{.p = p,
                   .keys = keys,
                   .lens = lens,
                   .q = q,
                   .partial_ml = partial_ml,
                   .max_splits = kMaxMassSplits,
                   .split_tokens = DecodeMassSplitTokens(max_len),
                   .group = group,
                   .group_pad = group_pad,
                   .scale = scale};
  const dim3 grid((max_len + a.split_tokens - 1) / a.split_tokens, p.num_kv_heads, p.num_seqs);
  DecodeMassPartialKernel<<<grid, kThreads, 0, stream>>>(a);
  DecodeMassAddKernel<<<grid, kThreads, 0, stream>>>(a);
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
