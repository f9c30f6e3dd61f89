// Tensor-core prefill attention (contract in prefill_attention.h; design in docs/GPU_NOTES.md,
// "Tensor-core prefill attention").
//
// PrefillMmaKernel<T, D>: grid (num_tiles, Hq), 128 threads = 4 warps; a block owns one tile of up
// to 64 queries of one query head, warp w its rows [16 w, 16 w + 16). Q is rounded to T once
// (scaled by scale * log2 e, so the scores are in log2 units) and each warp keeps its 16 x D
// fragment in registers; K and V stream through shared memory in tiles of 64 keys, converted from
// their fp32 sources (the prefix arrays, or the step's fresh rows) as they are stored. Per key tile
// and warp:
//   S[16][64] = Q[16][D] K^T       (8 x D/16 mma m16n8k16; K fragments by ldmatrix)
//   causal / length mask on the tiles that cross the diagonal or the end
//   online softmax in fp32 on the accumulator fragment (row max: 2 shuffles; sums stay per lane)
//   O[16][D] += P[16][64] V        (P reuses S's fragment layout as the A operand, rounded to T;
//                                   V fragments by ldmatrix.trans)
// A warp skips the tiles wholly after its last query (the causal early exit); the block stops at
// the tile's last key. Shared rows are padded by 16 bytes so that the 8 row addresses of each
// ldmatrix phase fall into distinct bank groups.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>
#include <cstdint>
#include <type_traits>

#include "workers/backend/cuda/prefill_attention.h"

namespace kvgate::worker::cuda {
namespace {

constexpr int kThreads = 128;
constexpr int kKeys = 64;  // keys per shared-memory tile
constexpr int kRows = kPrefillMmaTileRows;
static_assert(kRows == 16 * (kThreads / 32), "one 16-row mma slab per warp");

// Shared row stride in 16-bit elements.
template <int D>
constexpr int kRowStride = D + 8;
template <int D>
constexpr int kSmemBytes = (kRows + 2 * kKeys) * kRowStride<D> * 2;

// Two floats rounded to T (to nearest even), `lo` in the low half.
template <class T>
__device__ __forceinline__ uint32_t Pack2(float lo, float hi);
template <>
__device__ __forceinline__ uint32_t Pack2<__half>(float lo, float hi) {
  const __half2 h = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&h);
}
template <>
__device__ __forceinline__ uint32_t Pack2<__nv_bfloat16>(float lo, float hi) {
  const __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&h);
}
template <class T>
__device__ __forceinline__ uint16_t Bits(float x) {
  return static_cast<uint16_t>(Pack2<T>(x, 0.0f) & 0xffffu);
}

template <class T>
__device__ __forceinline__ void Store4(uint16_t* dst, float4 v) {
  *reinterpret_cast<uint2*>(dst) = make_uint2(Pack2<T>(v.x, v.y), Pack2<T>(v.z, v.w));
}

__device__ __forceinline__ float4 Load4(const float* p) {
  return *reinterpret_cast<const float4*>(p);
}

__device__ __forceinline__ uint32_t SmemAddr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void LdMatrixX4(uint32_t (&r)[4], const uint16_t* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(SmemAddr(p)));
}
__device__ __forceinline__ void LdMatrixX4Trans(uint32_t (&r)[4], const uint16_t* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(SmemAddr(p)));
}

// d += a b, m16n8k16, fp32 accumulators.
template <class T>
__device__ __forceinline__ void Mma(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                    uint32_t b1) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}

// One block's share of PrefillAttentionArgs in both kernels (grid (num_tiles, Hq)): its tile and
// query head, the cached prefix of the head's kv-head, and the attention sinks in it.
template <int D>
struct PrefillCta {
  PrefillTile tile;
  int head, kv_head;
  int64_t q_row_floats;             // between consecutive query rows
  const float* q;                   // the head's query of the tile's first row
  int64_t pos0, num_keys;           // position of the first query; keys visible to the last one
  const float* prefix_k = nullptr;  // [past][D] of this kv-head (CudaKvAppend::Read)
  const float* prefix_v = nullptr;
  const float* fresh_k;  // this kv-head's fresh keys / values of the tile's first row
  const float* fresh_v;
  int64_t fresh_row_stride;
  int64_t sinks = 0;  // cached slots scored with the shifted query (attention sinks)
  int32_t shift = 0;
  const double* rope_inv_freq;

  // Copies what it needs (no reference to the kernel parameter, which would be spilled).
  __device__ explicit PrefillCta(const PrefillAttentionArgs& a)
      : tile(a.tiles[blockIdx.x]),
        head(static_cast<int>(blockIdx.y)),
        fresh_row_stride(a.fresh_row_stride),
        rope_inv_freq(a.rope_inv_freq) {
    const int hkv = a.shape.num_kv_heads, group = a.shape.num_q_heads / hkv;
    kv_head = head / group;
    q_row_floats = int64_t{hkv} * a.shape.group_pad * D;
    q = a.q + (int64_t{tile.first_row} + tile.tile_begin) * q_row_floats +
        int64_t{kv_head * a.shape.group_pad + head % group} * D;
    pos0 = int64_t{tile.past} + tile.tile_begin;
    num_keys = pos0 + tile.tile_rows;
    const int64_t fresh = int64_t{tile.first_row} * fresh_row_stride + int64_t{kv_head} * D;
    fresh_k = a.fresh_k + fresh;
    fresh_v = a.fresh_v + fresh;
    if (tile.prefix_index >= 0) {
      const int64_t base =
          (int64_t{tile.prefix_index} * hkv + kv_head) * a.prefix_stride_tokens * D;
      prefix_k = a.prefix_k + base;
      prefix_v = a.prefix_v + base;
      if (a.sink_slots != nullptr) {
        sinks = a.sink_slots[tile.prefix_index] < tile.past ? a.sink_slots[tile.prefix_index]
                                                            : tile.past;
        shift = a.sink_shift[tile.prefix_index];
      }
    }
  }

  // Channels [c, c + 4) of query row r of the tile times scale; zeros past the tile's rows.
  __device__ float4 Query4(int r, int c, float scale) const {
    if (r >= tile.tile_rows) return make_float4(0.f, 0.f, 0.f, 0.f);
    float4 val = Load4(q + r * q_row_floats + c);
    val.x *= scale, val.y *= scale, val.z *= scale, val.w *= scale;
    return val;
  }

  // Channels [c, c + 4) of key and value t: the prefix's below past, the step's fresh rows from
  // there, zeros from num_keys (0 x V stays 0).
  __device__ void KeyValue4(int64_t t, int c, float4* k, float4* v) const {
    if (t >= num_keys) {
      *k = *v = make_float4(0.f, 0.f, 0.f, 0.f);
    } else if (t < tile.past) {
      *k = Load4(prefix_k + t * D + c);
      *v = Load4(prefix_v + t * D + c);
    } else {
      const int64_t off = (t - tile.past) * fresh_row_stride + c;
      *k = Load4(fresh_k + off);
      *v = Load4(fresh_v + off);
    }
  }

  // The sink keys among [k0, k0 + tile_keys) rotated forward by `shift` positions in fp32 (q .
  // R(shift) k = R(-shift) q . k: the CPU's shifted-query score, one rotation per key instead of
  // one per query): store(kk, j, x0, x1) for each rotated pair (j, j + D/2) of key k0 + kk, the
  // block's threads striding over them. The kernels store sink keys only through it.
  template <class Store>
  __device__ void RotateSinkKeys(int64_t k0, int tile_keys, Store store) const {
    if (k0 >= sinks) return;
    constexpr int kHalf = D / 2;
    const int rows = static_cast<int>(sinks - k0 < tile_keys ? sinks - k0 : tile_keys);
    for (int i = threadIdx.x; i < rows * kHalf; i += blockDim.x) {
      const int kk = i / kHalf, j = i % kHalf;
      double sn, cs;
      sincos(static_cast<double>(shift) * rope_inv_freq[j], &sn, &cs);
      const float cf = static_cast<float>(cs), sf = static_cast<float>(sn);
      const float* key = prefix_k + (k0 + kk) * D;
      const float x0 = key[j], x1 = key[j + kHalf];
      store(kk, j, x0 * cf - x1 * sf, x1 * cf + x0 * sf);
    }
  }
};

// 2^x with subnormal results flushed to 0 (one MUFU op): a probability under 2^-126 adds nothing
// to an fp32 sum whose largest term is 1.
__device__ __forceinline__ float Exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

template <class T, int D>
__global__ void __launch_bounds__(kThreads) PrefillMmaKernel(PrefillAttentionArgs a) {
  constexpr int LD = kRowStride<D>;
  constexpr int KC = D / 16;     // k-steps of Q K^T
  constexpr int NT = kKeys / 8;  // n-tiles of S
  constexpr int DT = D / 8;      // n-tiles of O
  constexpr int V4 = D / 4;      // float4 per row
  extern __shared__ uint4 smem_u4[];
  uint16_t* q_s = reinterpret_cast<uint16_t*>(smem_u4);  // [kRows][LD]
  uint16_t* k_s = q_s + kRows * LD;                      // [kKeys][LD]
  uint16_t* v_s = k_s + kKeys * LD;                      // [kKeys][LD]

  const PrefillCta<D> cta(a);
  const PrefillTile& tile = cta.tile;
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int g = lane >> 2, t4 = lane & 3;  // mma fragment row group and column pair

  const float q_scale = a.scale * 1.4426950408889634f;  // log2(e): exp2 in the softmax
  for (int i = tid; i < kRows * V4; i += kThreads) {
    const int r = i / V4, c = (i % V4) * 4;
    Store4<T>(q_s + r * LD + c, cta.Query4(r, c, q_scale));
  }

  const int64_t pos0 = cta.pos0, num_keys = cta.num_keys;
  // This warp's rows; a warp past the tile's rows computes nothing.
  const int row0 = 16 * warp;
  const int64_t warp_last =
      row0 < tile.tile_rows ? pos0 + (row0 + 15 < tile.tile_rows ? row0 + 15 : tile.tile_rows - 1)
                            : -1;
  const int64_t warp_first = pos0 + row0;

  __syncthreads();  // q_s is stored
  uint32_t qf[KC][4];
#pragma unroll
  for (int kc = 0; kc < KC; ++kc) {
    LdMatrixX4(qf[kc], q_s + (row0 + (lane & 15)) * LD + kc * 16 + (lane >> 4) * 8);
  }

  float o[DT][4];
#pragma unroll
  for (int j = 0; j < DT; ++j) o[j][0] = o[j][1] = o[j][2] = o[j][3] = 0.0f;
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f};  // rows g and g + 8

  for (int64_t k0 = 0; k0 < num_keys; k0 += kKeys) {
    __syncthreads();  // every warp is done with the previous tile
#pragma unroll 4
    for (int it = 0; it < kKeys * V4 / kThreads; ++it) {
      const int i = tid + it * kThreads;
      const int kk = i / V4, c = (i % V4) * 4;
      const int64_t t = k0 + kk;
      float4 kv, vv;
      cta.KeyValue4(t, c, &kv, &vv);
      if (t >= cta.sinks) Store4<T>(k_s + kk * LD + c, kv);  // sink keys: rotated below
      Store4<T>(v_s + kk * LD + c, vv);
    }
    // Rotated in fp32, then rounded to T.
    cta.RotateSinkKeys(k0, kKeys, [&](int kk, int j, float x0, float x1) {
      k_s[kk * LD + j] = Bits<T>(x0);
      k_s[kk * LD + j + D / 2] = Bits<T>(x1);
    });
    __syncthreads();
    if (k0 > warp_last) continue;  // every key of the tile is after this warp's queries

    float s[NT][4];
#pragma unroll
    for (int j = 0; j < NT; ++j) s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.0f;
#pragma unroll
    for (int kc = 0; kc < KC; ++kc) {
#pragma unroll
      for (int nj = 0; nj < NT / 2; ++nj) {
        uint32_t b[4];
        LdMatrixX4(b, k_s + (nj * 16 + (lane & 7) + (lane >> 4) * 8) * LD + kc * 16 +
                          ((lane >> 3) & 1) * 8);
        Mma<T>(s[2 * nj], qf[kc], b[0], b[1]);
        Mma<T>(s[2 * nj + 1], qf[kc], b[2], b[3]);
      }
    }
    if (k0 + kKeys - 1 > warp_first || k0 + kKeys > num_keys) {
      // Key t is visible to the query at position p when t <= p and t < num_keys.
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int64_t p = warp_first + g + 8 * h;
        const int64_t last = p < num_keys - 1 ? p : num_keys - 1;
#pragma unroll
        for (int j = 0; j < NT; ++j) {
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            if (k0 + 8 * j + 2 * t4 + e > last) s[j][2 * h + e] = -INFINITY;
          }
        }
      }
    }
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      float mx = -INFINITY;
#pragma unroll
      for (int j = 0; j < NT; ++j) mx = fmaxf(mx, fmaxf(s[j][2 * h], s[j][2 * h + 1]));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
      const float m_new = fmaxf(m[h], mx);
      // A row with no visible key yet keeps m = -inf; subtracting 0 then keeps exp2 at 0, not NaN.
      const float m_use = m_new == -INFINITY ? 0.0f : m_new;
      const float corr = Exp2(m[h] - m_use);
      float sum = 0.0f;
#pragma unroll
      for (int j = 0; j < NT; ++j) {
        s[j][2 * h] = Exp2(s[j][2 * h] - m_use);
        s[j][2 * h + 1] = Exp2(s[j][2 * h + 1] - m_use);
        sum += s[j][2 * h] + s[j][2 * h + 1];
      }
      l[h] = l[h] * corr + sum;
      m[h] = m_new;
#pragma unroll
      for (int j = 0; j < DT; ++j) {
        o[j][2 * h] *= corr;
        o[j][2 * h + 1] *= corr;
      }
    }
#pragma unroll
    for (int kk = 0; kk < kKeys / 16; ++kk) {
      // S's accumulator fragment of n-tiles 2 kk, 2 kk + 1 is P's A fragment of k-step kk.
      const uint32_t p[4] = {Pack2<T>(s[2 * kk][0], s[2 * kk][1]),
                             Pack2<T>(s[2 * kk][2], s[2 * kk][3]),
                             Pack2<T>(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                             Pack2<T>(s[2 * kk + 1][2], s[2 * kk + 1][3])};
#pragma unroll
      for (int dn = 0; dn < DT / 2; ++dn) {
        uint32_t b[4];
        LdMatrixX4Trans(b, v_s + (kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * LD + dn * 16 +
                               (lane >> 4) * 8);
        Mma<T>(o[2 * dn], p, b[0], b[1]);
        Mma<T>(o[2 * dn + 1], p, b[2], b[3]);
      }
    }
  }

  const int hq = a.shape.num_q_heads;
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    float sum = l[h];
    sum += __shfl_xor_sync(0xffffffffu, sum, 1);
    sum += __shfl_xor_sync(0xffffffffu, sum, 2);
    const int r = row0 + g + 8 * h;
    if (r >= tile.tile_rows) continue;
    const float inv = sum > 0.0f ? 1.0f / sum : 0.0f;
    const int64_t row = int64_t{tile.first_row} + tile.tile_begin + r;
    const int64_t out = (row * hq + cta.head) * D + 2 * t4;
#pragma unroll
    for (int j = 0; j < DT; ++j) {
      const float x0 = o[j][2 * h] * inv, x1 = o[j][2 * h + 1] * inv;
      if (a.out_f32 != nullptr) {
        *reinterpret_cast<float2*>(a.out_f32 + out + 8 * j) = make_float2(x0, x1);
      } else {
        *reinterpret_cast<uint32_t*>(a.out_bf16 + out + 8 * j) = Pack2<__nv_bfloat16>(x0, x1);
      }
    }
  }
}

template <class T, int D>
cudaError_t LaunchFor(const PrefillAttentionArgs& args, cudaStream_t stream) {
  constexpr int smem = kSmemBytes<D>;
  // Above 48 KB a kernel's dynamic shared memory must be opted into, once per kernel.
  static const cudaError_t setup = cudaFuncSetAttribute(
      PrefillMmaKernel<T, D>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (setup != cudaSuccess) return setup;
  const dim3 grid(args.num_tiles, args.shape.num_q_heads);
  PrefillMmaKernel<T, D><<<grid, kThreads, smem, stream>>>(args);
  return cudaGetLastError();
}

template <class T>
cudaError_t LaunchForType(const PrefillAttentionArgs& args, cudaStream_t stream) {
  switch (args.shape.head_dim) {
    case 64:
      return LaunchFor<T, 64>(args, stream);
    case 128:
      return LaunchFor<T, 128>(args, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

// ---- The fp32 CUDA-core kernel (LaunchPrefillAttention: the runner's fp32 mode, the reference)
// ---

__device__ __forceinline__ float Dot4(float4 a, float4 b) {
  return a.x * b.x + a.y * b.y + a.z * b.z + a.w * b.w;
}
__device__ __forceinline__ void Fma4(float p, float4 v, float4& acc) {
  acc.x += p * v.x;
  acc.y += p * v.y;
  acc.z += p * v.z;
  acc.w += p * v.w;
}

constexpr int kPrefillThreads = 128;
constexpr int kPrefillKeys = 32;  // keys per shared-memory tile

template <int D>
constexpr int PrefillSmemFloats() {
  return (kPrefillTileRows + 2 * kPrefillKeys) * (D + 4) + kPrefillTileRows * (kPrefillKeys + 1);
}

// grid (num_tiles, Hq), 128 threads. Thread t owns query rows 2 (t / 8) and 2 (t / 8) + 1 of the
// tile; for scores the keys t % 8 + 8 j (j < 4) of each 32-key tile, for the output the columns
// 4 (t % 8) + 32 c (c < D / 32, float4 each). The 8 lanes sharing a row pair are one aligned
// group of a warp: row max and sum reduce over them with three shuffles, and the probabilities go
// through shared memory rows that only that group writes and reads. Rows of shared arrays are
// padded to D + 4 floats so that the float4 accesses of a quarter-warp hit distinct banks.
template <int D>
__global__ void __launch_bounds__(kPrefillThreads) PrefillAttentionKernel(PrefillAttentionArgs a) {
  constexpr int QT = kPrefillTileRows, KT = kPrefillKeys, LD = D + 4, PL = KT + 1;
  constexpr int C4 = D / 32;  // output float4 columns per thread
  extern __shared__ float4 smem4[];
  float* q_s = reinterpret_cast<float*>(smem4);  // [QT][LD]
  float* k_s = q_s + QT * LD;                    // [KT][LD]
  float* v_s = k_s + KT * LD;                    // [KT][LD]
  float* p_s = v_s + KT * LD;                    // [QT][PL]

  const PrefillCta<D> cta(a);
  const PrefillTile& tile = cta.tile;
  const int tid = threadIdx.x, rg = tid >> 3, kl = tid & 7;

  for (int i = tid; i < QT * D / 4; i += kPrefillThreads) {
    const int r = i / (D / 4), c = (i % (D / 4)) * 4;
    *reinterpret_cast<float4*>(q_s + r * LD + c) = cta.Query4(r, c, a.scale);
  }

  const int64_t pos0 = cta.pos0, num_keys = cta.num_keys;
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};
  float4 acc[2][C4];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
#pragma unroll
    for (int c = 0; c < C4; ++c) acc[r][c] = make_float4(0.f, 0.f, 0.f, 0.f);
  }

  for (int64_t k0 = 0; k0 < num_keys; k0 += KT) {
    __syncthreads();  // the previous tile's values are consumed (first pass: q_s is stored)
    for (int i = tid; i < KT * D / 4; i += kPrefillThreads) {
      const int kk = i / (D / 4), c = (i % (D / 4)) * 4;
      const int64_t t = k0 + kk;
      float4 kval, vval;
      cta.KeyValue4(t, c, &kval, &vval);
      if (t >= cta.sinks) *reinterpret_cast<float4*>(k_s + kk * LD + c) = kval;  // sinks: below
      *reinterpret_cast<float4*>(v_s + kk * LD + c) = vval;
    }
    cta.RotateSinkKeys(k0, KT, [&](int kk, int j, float x0, float x1) {
      k_s[kk * LD + j] = x0;
      k_s[kk * LD + j + D / 2] = x1;
    });
    __syncthreads();

    float s[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
    const float* q0 = q_s + (2 * rg) * LD;
    const float* q1 = q0 + LD;
#pragma unroll 4
    for (int c = 0; c < D; c += 4) {
      const float4 a0 = Load4(q0 + c), a1 = Load4(q1 + c);
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const float4 b = Load4(k_s + (kl + 8 * j) * LD + c);
        s[0][j] += Dot4(a0, b);
        s[1][j] += Dot4(a1, b);
      }
    }
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int qr = 2 * rg + r;
      const int64_t pos = pos0 + qr;
      float mx = -INFINITY;
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int64_t t = k0 + kl + 8 * j;
        if (qr >= tile.tile_rows || t > pos) s[r][j] = -INFINITY;
        mx = fmaxf(mx, s[r][j]);
      }
#pragma unroll
      for (int o = 1; o < 8; o <<= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
      const float m_new = fmaxf(m[r], mx);
      float corr = 1.0f, sum = 0.0f;
      if (m_new != -INFINITY) {
        corr = expf(m[r] - m_new);
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          s[r][j] = expf(s[r][j] - m_new);
          sum += s[r][j];
        }
      } else {
#pragma unroll
        for (int j = 0; j < 4; ++j) s[r][j] = 0.0f;
      }
#pragma unroll
      for (int o = 1; o < 8; o <<= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
      l[r] = l[r] * corr + sum;
      m[r] = m_new;
#pragma unroll
      for (int c = 0; c < C4; ++c) {
        acc[r][c].x *= corr, acc[r][c].y *= corr, acc[r][c].z *= corr, acc[r][c].w *= corr;
      }
#pragma unroll
      for (int j = 0; j < 4; ++j) p_s[qr * PL + kl + 8 * j] = s[r][j];
    }
    __syncwarp();  // p_s rows of this lane group are written by the group itself
#pragma unroll 4
    for (int kk = 0; kk < KT; ++kk) {
      const float p0 = p_s[(2 * rg) * PL + kk], p1 = p_s[(2 * rg + 1) * PL + kk];
#pragma unroll
      for (int c = 0; c < C4; ++c) {
        const float4 v = Load4(v_s + kk * LD + kl * 4 + 32 * c);
        Fma4(p0, v, acc[0][c]);
        Fma4(p1, v, acc[1][c]);
      }
    }
    __syncwarp();  // the next tile's p_s writes come after these reads
  }

  const int hq = a.shape.num_q_heads;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int qr = 2 * rg + r;
    if (qr >= tile.tile_rows) continue;
    const float inv = l[r] > 0 ? 1.0f / l[r] : 0.0f;
    const int64_t row = int64_t{tile.first_row} + tile.tile_begin + qr;
    const int64_t out = (row * hq + cta.head) * D;
#pragma unroll
    for (int c = 0; c < C4; ++c) {
      const int col = kl * 4 + 32 * c;
      const float4 o =
          make_float4(acc[r][c].x * inv, acc[r][c].y * inv, acc[r][c].z * inv, acc[r][c].w * inv);
      if (a.out_f32 != nullptr) {
        *reinterpret_cast<float4*>(a.out_f32 + out + col) = o;
      } else {
        Store4<__nv_bfloat16>(a.out_bf16 + out + col, o);
      }
    }
  }
}

template <int D>
cudaError_t LaunchPrefillFor(const PrefillAttentionArgs& args, cudaStream_t stream) {
  constexpr int smem = PrefillSmemFloats<D>() * static_cast<int>(sizeof(float));
  // Above 48 KB a kernel's dynamic shared memory must be opted into, once per kernel.
  static const cudaError_t setup = cudaFuncSetAttribute(
      PrefillAttentionKernel<D>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (setup != cudaSuccess) return setup;
  const dim3 grid(args.num_tiles, args.shape.num_q_heads);
  PrefillAttentionKernel<D><<<grid, kPrefillThreads, smem, stream>>>(args);
  return cudaGetLastError();
}

}  // namespace

cudaError_t LaunchPrefillAttentionMma(const PrefillAttentionArgs& args, PrefillOperands operands,
                                      cudaStream_t stream) {
  if (args.num_tiles <= 0) return cudaSuccess;
  const QkvShape& shape = args.shape;
  if (shape.num_kv_heads <= 0 || shape.num_q_heads % shape.num_kv_heads != 0 ||
      shape.group_pad < shape.num_q_heads / shape.num_kv_heads ||
      (args.out_f32 == nullptr && args.out_bf16 == nullptr)) {
    return cudaErrorInvalidValue;
  }
  return operands == PrefillOperands::kFp16 ? LaunchForType<__half>(args, stream)
                                            : LaunchForType<__nv_bfloat16>(args, stream);
}

cudaError_t LaunchPrefillAttention(const PrefillAttentionArgs& args, cudaStream_t stream) {
  if (args.num_tiles <= 0) return cudaSuccess;
  if (args.shape.num_kv_heads <= 0 || args.shape.num_q_heads % args.shape.num_kv_heads != 0) {
    return cudaErrorInvalidValue;
  }
  switch (args.shape.head_dim) {
    case 64:
      return LaunchPrefillFor<64>(args, stream);
    case 128:
      return LaunchPrefillFor<128>(args, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

}  // namespace kvgate::worker::cuda
