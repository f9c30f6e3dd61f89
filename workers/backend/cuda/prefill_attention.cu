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

  const PrefillTile tile = a.tiles[blockIdx.x];
  const int head = blockIdx.y;
  const int hkv = a.shape.num_kv_heads, group = a.shape.num_q_heads / hkv;
  const int kv_head = head / group;
  const int q_slot = kv_head * a.shape.group_pad + head % group;
  const int64_t q_row_floats = int64_t{hkv} * a.shape.group_pad * D;
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int g = lane >> 2, t4 = lane & 3;  // mma fragment row group and column pair

  const float q_scale = a.scale * 1.4426950408889634f;  // log2(e): exp2 in the softmax
  for (int i = tid; i < kRows * V4; i += kThreads) {
    const int r = i / V4, c = (i % V4) * 4;
    float4 val = make_float4(0.f, 0.f, 0.f, 0.f);
    if (r < tile.tile_rows) {
      const int64_t row = int64_t{tile.first_row} + tile.tile_begin + r;
      val = Load4(a.q + row * q_row_floats + int64_t{q_slot} * D + c);
      val.x *= q_scale, val.y *= q_scale, val.z *= q_scale, val.w *= q_scale;
    }
    Store4<T>(q_s + r * LD + c, val);
  }

  const int64_t pos0 = int64_t{tile.past} + tile.tile_begin;  // position of the first query
  const int64_t num_keys = pos0 + tile.tile_rows;
  const int64_t past = tile.past;
  const float* prefix_k = nullptr;
  const float* prefix_v = nullptr;
  int64_t sinks = 0;  // cached slots scored with the shifted query (attention sinks)
  int32_t shift = 0;
  if (tile.prefix_index >= 0) {
    const int64_t base = (int64_t{tile.prefix_index} * hkv + kv_head) * a.prefix_stride_tokens * D;
    prefix_k = a.prefix_k + base;
    prefix_v = a.prefix_v + base;
    if (a.sink_slots != nullptr) {
      sinks = a.sink_slots[tile.prefix_index] < past ? a.sink_slots[tile.prefix_index] : past;
      shift = a.sink_shift[tile.prefix_index];
    }
  }
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
      float4 kv = make_float4(0.f, 0.f, 0.f, 0.f), vv = kv;  // zeros past the end: 0 x V stays 0
      if (t < num_keys) {
        const float* ks;
        const float* vs;
        if (t < past) {
          ks = prefix_k + t * D + c;
          vs = prefix_v + t * D + c;
        } else {
          const int64_t off =
              (tile.first_row + (t - past)) * a.fresh_row_stride + int64_t{kv_head} * D + c;
          ks = a.fresh_k + off;
          vs = a.fresh_v + off;
        }
        kv = Load4(ks);
        vv = Load4(vs);
      }
      if (t >= sinks) Store4<T>(k_s + kk * LD + c, kv);  // sink keys are stored rotated below
      Store4<T>(v_s + kk * LD + c, vv);
    }
    if (k0 < sinks) {
      // Sink keys rotated forward by `shift` positions in fp32 before the rounding to T:
      // q . R(shift) k = R(-shift) q . k, the CPU's shifted-query score.
      constexpr int kHalf = D / 2;
      const int rows = static_cast<int>(sinks - k0 < kKeys ? sinks - k0 : kKeys);
      for (int i = tid; i < rows * kHalf; i += kThreads) {
        const int kk = i / kHalf, j = i % kHalf;
        double sn, cs;
        sincos(static_cast<double>(shift) * a.rope_inv_freq[j], &sn, &cs);
        const float cf = static_cast<float>(cs), sf = static_cast<float>(sn);
        const float* key = prefix_k + (k0 + kk) * D;
        const float x0 = key[j], x1 = key[j + kHalf];
        k_s[kk * LD + j] = Bits<T>(x0 * cf - x1 * sf);
        k_s[kk * LD + j + kHalf] = Bits<T>(x1 * cf + x0 * sf);
      }
    }
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
    const int64_t out = (row * hq + head) * D + 2 * t4;
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

}  // namespace kvgate::worker::cuda
