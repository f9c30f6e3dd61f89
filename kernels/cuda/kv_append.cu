// Device append (encode) and read-back of the paged KV cache for every KV format
// (kvgate/kernels/cuda_kv_append.h). The records must be the bytes kernels/cpu/kv_codec.cc writes,
// so every step reproduces the CPU codec's arithmetic operation by operation:
//  - conversions are bit-exact ports of kernels/cpu/numeric.h (fp16 and bf16 round to nearest
//    even, NaN patterns included; FP8 E4M3 with FloatToE4M3's saturation and rounding), KIVI's
//    min/scale use HalfRoundDown/HalfRoundUp;
//  - arithmetic uses the explicit IEEE intrinsics (__fadd_rn, __fmul_rn, __fdiv_rn, ...) so that
//    nvcc never contracts a multiply and an add the CPU rounds separately;
//  - TurboQuant's norms follow cpu::Dot's summation order: 16 accumulators over channels c = 16i+j
//    updated with FMA (the x86-64-v3 clone the CPU runs on every AVX2 machine), then summed in
//    order j = 0..15; the Walsh-Hadamard transform does the CPU's butterflies stage by stage
//    (h = 1, 2, 4, ...), each output an exact a + b or a - b of the same operands.
// min/max reductions keep the CPU's sequential semantics (the first of equal values wins, NaN
// only if first), so even signed zeros match.
//
// Kernels (128 threads = 4 warps each):
//  - EncodeRowsKernel<format, D> (fp16, bf16, fp8, int8, TurboQuant with r=0): one warp per
//    (row, kv-head), lane l owning channels [l*D/32, (l+1)*D/32) of the key and value rows; the
//    record is built in the warp's shared-memory stage and written with the widest stores its
//    alignment allows.
//    The row's loads are issued first, so that they overlap the dependent loads that find its
//    sequence (a 32-ary warp search of row_begin) and its block.
//  - FP8 scales: with at most kFusedAmaxRows rows per sequence (decode), each warp takes the
//    amax of its sequence's rows itself while a scale is unset. Otherwise Fp8AmaxKernel runs
//    first: per (sequence, kv-head, 64-row chunk), the amax for scales still unset, combined with
//    atomicMax into head_scales as a PROVISIONAL value (sign bit set: -amax), which
//    EncodeRowsKernel turns into amax/192 (keys) or amax/96 (values) or 0 (kv_codec.cc's rule). Either way the warp
//    of the sequence's first row writes the final scale back.
//  - KiviGroupKernel (KIVI): one CTA per (key group flushed by this call, kv-head, sequence);
//    the group's G tokens (from the fp16 window, or the new rows rounded to fp16) are loaded into
//    [G][D] fp16 tiles all at once; then every key channel's and every (token, value group)'s
//    (min, scale) in parallel, then every 32-bit word of codes, then the records go out as
//    contiguous runs (a block's share of the group).
//  - TurboFlushKernel (TurboQuant with its fp16 window, R > 0): the tokens a call encodes out of
//    the windows, a warp per token from its fp16 value, with EncodeRowsKernel's TurboQuant code.
//  - WindowKernel (KIVI, TurboQuant, after the above): one CTA per (kv-head,
//    sequence) shifts the window down by the tokens just encoded (in place, in rounds of 16 KB of
//    keys and values) and writes the new rows that stay in it.
//  - ReadKernel<format, D>: one warp per (token, kv-head, sequence), decoding into fp32 in the
//    original basis, operation for operation as CpuKvCache::ReadStored.
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "kernels/cuda/kv_append_internal.h"
#include "kernels/cuda/kv_numeric.cuh"
#include "kvgate/kernels/kv_record_layout.h"

namespace kvgate::kernels::cuda::internal {
namespace {

constexpr int kWarps = 4;
constexpr int kThreads = 32 * kWarps;
constexpr unsigned kFull = 0xFFFFFFFFu;
constexpr int kAmaxRows = 64;      // rows per CTA of Fp8AmaxKernel
constexpr int kMaxGrid = 1 << 16;  // CTAs of the grid-stride row kernel
constexpr int kTurboTableBytes = (kTurboTableFloats + kTurboSignWords) * 4;

// ---- Addressing, bits, copies ----------------------------------------------------------------

__device__ __forceinline__ int64_t StateSlot(const int32_t* seq_slots, int s) {
  return seq_slots != nullptr ? seq_slots[s] : s;
}

// SplitStoredTokens' encoded count.
__device__ __forceinline__ int64_t EncodedCount(const AppendFormat& f, int64_t stored) {
  if (f.window_tokens == 0) return stored;
  const int64_t r = f.window_tokens, g = f.flush_tokens;
  return stored < r + g ? 0 : (stored - r) / g * g;
}

// Tokens (batch entry s, kv-head h) holds in blocks before and after an append of n rows to the
// stored_before tokens sb: from sb and n, or with per-head windows from the head's window rows w
// (a window of w < R + flush rows flushes as a sequence of w tokens without encoded ones would).
struct EncodedSplit {
  int64_t before = 0, after = 0;
};
__device__ __forceinline__ EncodedSplit AppendSplit(const AppendFormat& f, const AppendArgs& a,
                                                    int s, int h, int64_t sb, int64_t n) {
  if (a.head_window == nullptr) return {EncodedCount(f, sb), EncodedCount(f, sb + n)};
  const int64_t w = a.head_window[StateSlot(a.seq_slots, s) * f.num_kv_heads + h];
  return {sb - w, sb - w + EncodedCount(f, w + n)};
}

// Record of token t of batch entry s, kv-head h; nullptr when the block table has no block there.
template <class Byte>
__device__ __forceinline__ Byte* RecordPtr(const AppendFormat& f, Byte* pool, int64_t block_stride,
                                           int64_t layer_offset, const int32_t* tables,
                                           int max_blocks, int s, int h, int64_t t) {
  const int64_t logical = t / f.block_size;
  if (t < 0 || logical >= max_blocks) return nullptr;
  const int32_t block = tables[static_cast<int64_t>(s) * max_blocks + logical];
  if (block < 0) return nullptr;
  return pool + block * block_stride + layer_offset +
         (static_cast<int64_t>(h) * f.block_size + t % f.block_size) * f.record_bytes;
}

// ORs the low `nbits` (<= 32) bits of `value` into the LSB-first bit string `words` (shared
// memory) at bit offset `bit`: PackCodes' order, since the words are little-endian.
__device__ __forceinline__ void OrBits(uint32_t* words, int bit, uint32_t value, int nbits) {
  const int w = bit >> 5, o = bit & 31;
  atomicOr(&words[w], value << o);
  if (o + nbits > 32) atomicOr(&words[w + 1], value >> (32 - o));
}
__device__ __forceinline__ uint32_t GetBits(const uint32_t* words, int bit, int nbits) {
  const int w = bit >> 5, o = bit & 31;
  uint64_t v = words[w];
  if (o + nbits > 32) v |= static_cast<uint64_t>(words[w + 1]) << 32;
  return static_cast<uint32_t>(v >> o) & (nbits == 32 ? kFull : (1u << nbits) - 1);
}

template <class T>
__device__ __forceinline__ void CopyAs(T* dst, const T* src, int bytes, int lane) {
  for (int i = lane; i < bytes / static_cast<int>(sizeof(T)); i += 32) dst[i] = src[i];
}
// The warp copies `bytes` (a multiple of width) between two buffers whose addresses are multiples
// of width (2, 4, 8 or 16), width bytes per lane and instruction.
__device__ __forceinline__ void WarpCopy(void* dst, const void* src, int bytes, int width,
                                         int lane) {
  switch (width) {
    case 16:
      CopyAs(static_cast<uint4*>(dst), static_cast<const uint4*>(src), bytes, lane);
      break;
    case 8:
      CopyAs(static_cast<uint2*>(dst), static_cast<const uint2*>(src), bytes, lane);
      break;
    case 4:
      CopyAs(static_cast<uint32_t*>(dst), static_cast<const uint32_t*>(src), bytes, lane);
      break;
    default:
      CopyAs(static_cast<uint16_t*>(dst), static_cast<const uint16_t*>(src), bytes, lane);
  }
}

// V consecutive floats at p (vec: p is 16-byte aligned).
template <int V>
__device__ __forceinline__ void LoadFloats(const float* p, bool vec, float (&x)[V]) {
  if constexpr (V % 4 == 0) {
    if (vec) {
#pragma unroll
      for (int i = 0; i < V / 4; ++i) {
        const float4 q = reinterpret_cast<const float4*>(p)[i];
        x[4 * i] = q.x, x[4 * i + 1] = q.y, x[4 * i + 2] = q.z, x[4 * i + 3] = q.w;
      }
      return;
    }
  } else if constexpr (V == 2) {
    if (vec) {
      const float2 q = *reinterpret_cast<const float2*>(p);
      x[0] = q.x, x[1] = q.y;
      return;
    }
  }
#pragma unroll
  for (int i = 0; i < V; ++i) x[i] = p[i];
}
template <int V>
__device__ __forceinline__ void StoreFloats(float* p, bool vec, const float (&x)[V]) {
  if constexpr (V % 4 == 0) {
    if (vec) {
#pragma unroll
      for (int i = 0; i < V / 4; ++i) {
        reinterpret_cast<float4*>(p)[i] =
            make_float4(x[4 * i], x[4 * i + 1], x[4 * i + 2], x[4 * i + 3]);
      }
      return;
    }
  } else if constexpr (V == 2) {
    if (vec) {
      *reinterpret_cast<float2*>(p) = make_float2(x[0], x[1]);
      return;
    }
  }
#pragma unroll
  for (int i = 0; i < V; ++i) p[i] = x[i];
}
// V consecutive fp16 values (2V bytes, aligned to that).
template <int V>
__device__ __forceinline__ void LoadHalves(const uint16_t* p, uint16_t (&h)[V]) {
  if constexpr (V % 8 == 0) {
#pragma unroll
    for (int i = 0; i < V / 8; ++i) {
      const uint4 q = reinterpret_cast<const uint4*>(p)[i];
      const uint32_t w[4] = {q.x, q.y, q.z, q.w};
#pragma unroll
      for (int j = 0; j < 8; ++j) h[8 * i + j] = static_cast<uint16_t>(w[j / 2] >> (16 * (j & 1)));
    }
  } else if constexpr (V == 4) {
    const uint2 q = *reinterpret_cast<const uint2*>(p);
    h[0] = q.x & 0xFFFF, h[1] = q.x >> 16, h[2] = q.y & 0xFFFF, h[3] = q.y >> 16;
  } else {
#pragma unroll
    for (int i = 0; i < V; ++i) h[i] = p[i];
  }
}
template <int V>
__device__ __forceinline__ void StoreHalves(uint16_t* p, const uint16_t (&h)[V]) {
  if constexpr (V % 8 == 0) {
#pragma unroll
    for (int i = 0; i < V / 8; ++i) {
      uint32_t w[4];
#pragma unroll
      for (int j = 0; j < 4; ++j)
        w[j] = h[8 * i + 2 * j] | (static_cast<uint32_t>(h[8 * i + 2 * j + 1]) << 16);
      reinterpret_cast<uint4*>(p)[i] = make_uint4(w[0], w[1], w[2], w[3]);
    }
  } else if constexpr (V == 4) {
    *reinterpret_cast<uint2*>(p) = make_uint2(h[0] | (static_cast<uint32_t>(h[1]) << 16),
                                              h[2] | (static_cast<uint32_t>(h[3]) << 16));
  } else {
#pragma unroll
    for (int i = 0; i < V; ++i) p[i] = h[i];
  }
}

// 4 bytes at p (a multiple of 4 when width >= 4, else of 2).
__device__ __forceinline__ uint32_t LoadWord(const uint8_t* p, int width) {
  if (width >= 4) return *reinterpret_cast<const uint32_t*>(p);
  const uint16_t* h = reinterpret_cast<const uint16_t*>(p);
  return h[0] | (static_cast<uint32_t>(h[1]) << 16);
}

__device__ __forceinline__ float WarpMax(float x) {
#pragma unroll
  for (int m = 16; m > 0; m >>= 1) x = fmaxf(x, __shfl_xor_sync(kFull, x, m));
  return x;
}

// ---- TurboQuant building blocks ----------------------------------------------------------------

// cpu::Dot(x, x, D) of the warp's key row (bufk) and value row (bufv) at once: lanes 0-15 run
// the key's 16 accumulator chains, lanes 16-31 the value's, then every lane sums both in order.
template <int D>
__device__ __forceinline__ float2 WarpSquaredNorms(const float* bufk, const float* bufv,
                                                   float* accs, int lane) {
  const float* buf = lane < 16 ? bufk : bufv;
  const int j = lane & 15;
  float acc = 0.0f;
#pragma unroll
  for (int i = 0; i < D / 16; ++i) acc = __fmaf_rn(buf[16 * i + j], buf[16 * i + j], acc);
  accs[lane] = acc;
  __syncwarp();
  float sk = 0.0f, sv = 0.0f;
  const float4* acc4 = reinterpret_cast<const float4*>(accs);  // 16-byte aligned
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float4 qk = acc4[i], qv = acc4[4 + i];
    sk = __fadd_rn(__fadd_rn(__fadd_rn(__fadd_rn(sk, qk.x), qk.y), qk.z), qk.w);
    sv = __fadd_rn(__fadd_rn(__fadd_rn(__fadd_rn(sv, qv.x), qv.y), qv.z), qv.w);
  }
  __syncwarp();
  return make_float2(sk, sv);
}

// FastWalshHadamard over the warp's row (lane l holds channels [lV, (l+1)V)): the CPU's stages in
// its order, in registers for h < V and across lanes for h >= V, then the 1/sqrt(D) scaling.
template <int V>
__device__ __forceinline__ void WarpWht(float (&u)[V], int lane, float scale) {
#pragma unroll
  for (int h = 1; h < V; h <<= 1) {
#pragma unroll
    for (int r = 0; r < V; ++r) {
      if ((r & h) == 0) {
        const float a = u[r], b = u[r + h];
        u[r] = __fadd_rn(a, b);
        u[r + h] = __fsub_rn(a, b);
      }
    }
  }
#pragma unroll
  for (int m = 1; m < 32; m <<= 1) {
    const bool upper = (lane & m) != 0;
#pragma unroll
    for (int r = 0; r < V; ++r) {
      const float p = __shfl_xor_sync(kFull, u[r], m);
      u[r] = upper ? __fsub_rn(p, u[r]) : __fadd_rn(u[r], p);
    }
  }
#pragma unroll
  for (int r = 0; r < V; ++r) u[r] = __fmul_rn(u[r], scale);
}

// The lane's channel class of one half: centroid/bound table, bits, bit offset of its codes.
struct TurboLane {
  const float* table;  // centroids [16] then bounds [16]
  int bits;
  int bit;  // offset of the lane's first code inside the half's code bytes
};
template <int V>
__device__ __forceinline__ TurboLane TurboLaneOf(const AppendFormat& f, const float* table,
                                                 int half, int lane) {
  const int c0 = lane * V, hi = f.tq_hi_channels[half];
  TurboLane t;
  if (c0 < hi) {
    t.table = table + (2 * half) * 32;
    t.bits = f.tq_hi_bits[half];
    t.bit = c0 * t.bits;
  } else {
    t.table = table + (2 * half + 1) * 32;
    t.bits = f.tq_lo_bits[half];
    t.bit = hi * f.tq_hi_bits[half] + (c0 - hi) * t.bits;
  }
  return t;
}
// Lane's V sign flips (bit r: channel lane*V + r has sign -1).
template <int V>
__device__ __forceinline__ uint32_t TurboSigns(const float* table, int lane) {
  const uint32_t* words = reinterpret_cast<const uint32_t*>(table + kTurboTableFloats);
  return (words[(lane * V) >> 5] >> ((lane * V) & 31)) & ((1u << V) - 1);
}

// ---- Encode: one warp per (row, kv-head) -------------------------------------------------------

__host__ __device__ constexpr int RoundUp16(int x) { return (x + 15) & ~15; }
// Shared memory of one warp of EncodeRowsKernel / ReadKernel: the record stage, and for
// TurboQuant encode the key and value rows (bank-offset by 16 words) and 32 accumulators.
__host__ __device__ constexpr int RowWarpBytes(int kind, int d, int record_bytes, bool encode) {
  return RoundUp16(record_bytes) + (kind == kAppendTurbo && encode ? (2 * d + 16 + 32) * 4 : 0);
}
__host__ __device__ constexpr int RowSmemBytes(int kind, int d, int record_bytes, bool encode) {
  return (kind == kAppendTurbo ? kTurboTableBytes : 0) +
         kWarps * RowWarpBytes(kind, d, record_bytes, encode);
}

// Largest s with row_begin[s] <= row: the batch entry owning `row`. A 32-ary search by the whole
// warp (one load per lane and round): 2 dependent loads for up to 1024 sequences.
__device__ __forceinline__ int WarpFindSeq(const int32_t* row_begin, int num_seqs, int row,
                                           int lane) {
  int lo = 0, count = num_seqs;  // the answer is in [lo, lo + count); row_begin[lo] <= row
  while (count > 1) {
    const int step = (count + 31) / 32;
    const int idx = lo + lane * step;
    const bool below = lane > 0 && idx < lo + count && row_begin[idx] <= row;
    const int k = 31 - __clz(__ballot_sync(kFull, below) | 1u);
    lo += k * step;
    count = min(step, count - k * step);
  }
  return lo;
}

// A scale ChooseScales fixes from amax, or 0 (amax zero or not finite: not chosen yet).
__device__ __forceinline__ float ChosenScale(float amax, float divisor) {
  return amax > 0 && isfinite(amax) ? __fdiv_rn(amax, divisor) : 0.0f;
}

// TurboQuant's Encode of one token by the warp: its key and value rows x (lane l holds channels
// [lV, (l+1)V)) become the record in the stage at the start of `mine` (the warp's shared memory,
// RowWarpBytes of it). The caller syncs the warp before (the stage is free) and after (to copy
// the record out).
template <int D>
__device__ __forceinline__ void TurboEncodeWarp(const AppendFormat& f, const float* table,
                                                uint8_t* mine, const float (&x)[2][D / 32],
                                                int lane) {
  constexpr int V = D / 32;
  const int c0 = lane * V;
  uint32_t* stage = reinterpret_cast<uint32_t*>(mine);
  const int stage_words = RoundUp16(f.record_bytes) / 4;
  float* bufk = reinterpret_cast<float*>(mine + RoundUp16(f.record_bytes));
  float* bufv = bufk + D + 16;
  float* accs = bufv + D;
  for (int i = lane; i < stage_words; i += 32) stage[i] = 0;
#pragma unroll
  for (int r = 0; r < V; ++r) {
    bufk[c0 + r] = x[0][r];
    bufv[c0 + r] = x[1][r];
  }
  __syncwarp();
  const float2 sq = WarpSquaredNorms<D>(bufk, bufv, accs, lane);
  const float norm[2] = {__fsqrt_rn(sq.x), __fsqrt_rn(sq.y)};
  const uint32_t signs = TurboSigns<V>(table, lane);
  uint32_t codes[2];
  TurboLane tl[2];
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    // Normalize: u = Pi (x / ||x||), Pi = H D / sqrt(d).
    const float inv = norm[half] > 0 ? __fdiv_rn(1.0f, norm[half]) : 0.0f;
    float u[V];
#pragma unroll
    for (int r = 0; r < V; ++r) {
      u[r] = __fmul_rn(x[half][r], inv);
      if ((signs >> r) & 1) u[r] = -u[r];
    }
    WarpWht<V>(u, lane, f.tq_wht_scale);
    // Quantize: k = number of bounds below u (binary search over the sorted bounds).
    tl[half] = TurboLaneOf<V>(f, table, half, lane);
    const float* bounds = tl[half].table + 16;
    float* uhat = half == 0 ? bufk : bufv;
    codes[half] = 0;
#pragma unroll
    for (int r = 0; r < V; ++r) {
      int k = 0;
      for (int step = 1 << (tl[half].bits - 1); step > 0; step >>= 1) {
        if (bounds[k + step - 1] < u[r]) k += step;
      }
      codes[half] |= static_cast<uint32_t>(k) << (r * tl[half].bits);
      uhat[c0 + r] = tl[half].table[k];
    }
  }
  __syncwarp();
  const float2 recon_sq = WarpSquaredNorms<D>(bufk, bufv, accs, lane);
  const float recon[2] = {__fsqrt_rn(recon_sq.x), __fsqrt_rn(recon_sq.y)};
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int base = half == 0 ? 0 : 8 * f.key_bytes;
    OrBits(stage, base + tl[half].bit, codes[half], V * tl[half].bits);
    if (lane == half) {  // CorrectedScale: ||x|| / ||uhat|| * debias, capped at the fp16 maximum
      const float q = __fmul_rn(__fdiv_rn(norm[half], recon[half]), f.tq_debias[half]);
      const float s = recon[half] > 0 ? (65504.0f < q ? 65504.0f : q) : 0.0f;
      OrBits(stage, base + 8 * f.tq_code_bytes[half], FloatToHalf(s), 16);
    }
  }
}

template <int KIND, int D>
__global__ void __launch_bounds__(kThreads) EncodeRowsKernel(AppendFormat f, AppendArgs a) {
  constexpr int V = D / 32;
  extern __shared__ __align__(16) uint8_t smem[];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  float* table = reinterpret_cast<float*>(smem);
  if constexpr (KIND == kAppendTurbo) {
    for (int i = threadIdx.x; i < kTurboTableFloats + kTurboSignWords; i += kThreads) {
      table[i] = f.tq_table[i];
    }
    __syncthreads();
  }
  uint8_t* mine = smem + (KIND == kAppendTurbo ? kTurboTableBytes : 0) +
                  warp * RowWarpBytes(KIND, D, f.record_bytes, true);
  uint32_t* stage = reinterpret_cast<uint32_t*>(mine);
  const int heads = f.num_kv_heads, c0 = lane * V;
  const int64_t tasks = static_cast<int64_t>(a.num_rows) * heads;
  for (int64_t task = static_cast<int64_t>(blockIdx.x) * kWarps + warp; task < tasks;
       task += static_cast<int64_t>(gridDim.x) * kWarps) {
    const int row = static_cast<int>(task / heads), h = static_cast<int>(task % heads);
    // The row's loads first: they overlap the dependent loads that locate its record.
    float x[2][V];
    const int64_t offset = static_cast<int64_t>(row) * a.row_stride + h * D + c0;
    LoadFloats<V>(a.k + offset, a.vec_loads, x[0]);
    LoadFloats<V>(a.v + offset, a.vec_loads, x[1]);
    const int s = WarpFindSeq(a.row_begin, a.num_seqs, row, lane);
    const int first_row = a.row_begin[s];
    const int64_t t = a.stored_before[s] + (row - first_row);
    float scale_k = 0.0f, scale_v = 0.0f;
    if constexpr (KIND == kAppendFp8) {
      float* scales = a.head_scales + (StateSlot(a.seq_slots, s) * heads + h) * 2;
      scale_k = scales[0];
      scale_v = scales[1];
      bool set_k = false, set_v = false;
      if (a.fuse_amax) {
        // Few rows per sequence (no Fp8AmaxKernel): each warp takes the amax of its sequence's
        // rows itself while a scale is unset. Every warp of the sequence derives the same scale.
        set_k = !(scale_k > 0);
        set_v = !(scale_v > 0);
        if (set_k || set_v) {
          float mk = 0.0f, mv = 0.0f;  // fmaxf skips NaN like std::max(amax, NaN) does
          for (int r = first_row; r < a.row_begin[s + 1]; ++r) {
            float yk[V], yv[V];
            const int64_t at = static_cast<int64_t>(r) * a.row_stride + h * D + c0;
            LoadFloats<V>(a.k + at, a.vec_loads, yk);
            LoadFloats<V>(a.v + at, a.vec_loads, yv);
#pragma unroll
            for (int i = 0; i < V; ++i) {
              mk = fmaxf(mk, fabsf(yk[i]));
              mv = fmaxf(mv, fabsf(yv[i]));
            }
          }
          mk = WarpMax(mk);
          mv = WarpMax(mv);
          if (set_k) scale_k = ChosenScale(mk, 192.0f);
          if (set_v) scale_v = ChosenScale(mv, 96.0f);
        }
      } else {
        // Provisional amax from Fp8AmaxKernel (sign bit set): every warp derives the same scale.
        set_k = signbit(scale_k);
        set_v = signbit(scale_v);
        if (set_k) scale_k = ChosenScale(-scale_k, 192.0f);
        if (set_v) scale_v = ChosenScale(-scale_v, 96.0f);
      }
      // The warp of the sequence's first row publishes the scales (another warp reads either
      // the old or the new value: both give the same scale).
      if (row == first_row && lane == 0) {
        if (set_k) scales[0] = scale_k;
        if (set_v) scales[1] = scale_v;
      }
    }
    uint8_t* dst = RecordPtr(f, a.pool, a.block_stride_bytes, a.layer_offset_bytes, a.block_tables,
                             a.max_blocks_per_seq, s, h, t);
    if (dst == nullptr) continue;  // no reserved block: the caller's contract was broken
    __syncwarp();                  // the previous task's copy-out has read the stage
    if constexpr (KIND == kAppendFp16 || KIND == kAppendBf16) {
      uint16_t* out = reinterpret_cast<uint16_t*>(stage);
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        uint16_t hv[V];
#pragma unroll
        for (int r = 0; r < V; ++r) {
          hv[r] = KIND == kAppendFp16 ? FloatToHalf(x[half][r]) : FloatToBf16(x[half][r]);
        }
        StoreHalves<V>(out + half * D + c0, hv);
      }
    } else if constexpr (KIND == kAppendFp8) {
      uint8_t* out = reinterpret_cast<uint8_t*>(stage);
      const float inv_k = scale_k > 0 ? __fdiv_rn(1.0f, scale_k) : 0.0f;
      const float inv_v = scale_v > 0 ? __fdiv_rn(1.0f, scale_v) : 0.0f;
#pragma unroll
      for (int r = 0; r < V; ++r) {
        out[c0 + r] = FloatToE4M3(__fmul_rn(x[0][r], inv_k));
        out[D + c0 + r] = FloatToE4M3(__fmul_rn(x[1][r], inv_v));
      }
    } else if constexpr (KIND == kAppendInt8) {
      uint8_t* out = reinterpret_cast<uint8_t*>(stage);
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        float amax = 0.0f;
#pragma unroll
        for (int r = 0; r < V; ++r) amax = fmaxf(amax, fabsf(x[half][r]));
        amax = WarpMax(amax);
        const float q = __fdiv_rn(amax, 127.0f);
        const uint16_t scale_half = FloatToHalf(65504.0f < q ? 65504.0f : q);
        const float scale = HalfToFloat(scale_half);
        const float inv = scale > 0 ? __fdiv_rn(1.0f, scale) : 0.0f;
        uint8_t* codes = out + (half == 0 ? Int8Record::KeyCodes(D) : Int8Record::ValueCodes(D));
#pragma unroll
        for (int r = 0; r < V; ++r) {
          const float c = rintf(__fmul_rn(x[half][r], inv));
          codes[c0 + r] = static_cast<uint8_t>(static_cast<int8_t>(
              static_cast<int>(c < -127.0f ? -127.0f : (127.0f < c ? 127.0f : c))));
        }
        if (lane == 0) {
          uint8_t* sc = out + (half == 0 ? Int8Record::KeyScale(D) : Int8Record::ValueScale(D));
          sc[0] = static_cast<uint8_t>(scale_half & 0xFF);
          sc[1] = static_cast<uint8_t>(scale_half >> 8);
        }
      }
    } else {  // TurboQuant
      static_assert(KIND == kAppendTurbo, "unhandled format");
      TurboEncodeWarp<D>(f, table, mine, x, lane);
    }
    __syncwarp();
    WarpCopy(dst, stage, f.record_bytes, a.store_width, lane);
  }
}

// ---- FP8 scales
// ----------------------------------------------------------------------------------

template <int D>
__global__ void __launch_bounds__(kThreads) Fp8AmaxKernel(AppendFormat f, AppendArgs a) {
  const int s = blockIdx.z, h = blockIdx.y;
  float* scales = a.head_scales + (StateSlot(a.seq_slots, s) * f.num_kv_heads + h) * 2;
  // Scales already chosen are final (> 0); 0 or a provisional value (sign set) is not.
  const bool need_k = !(scales[0] > 0), need_v = !(scales[1] > 0);
  const int r0 = a.row_begin[s] + blockIdx.x * kAmaxRows;
  const int r1 = min(a.row_begin[s + 1], r0 + kAmaxRows);
  if ((!need_k && !need_v) || r0 >= r1) return;
  float mk = 0.0f, mv = 0.0f;  // fmaxf skips NaN like std::max(amax, NaN) does
  for (int e = threadIdx.x; e < (r1 - r0) * D; e += kThreads) {
    const int64_t off = static_cast<int64_t>(r0 + e / D) * a.row_stride + h * D + e % D;
    mk = fmaxf(mk, fabsf(a.k[off]));
    mv = fmaxf(mv, fabsf(a.v[off]));
  }
  mk = WarpMax(mk);
  mv = WarpMax(mv);
  __shared__ float partial[2][kWarps];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) {
    partial[0][warp] = mk;
    partial[1][warp] = mv;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int w = 1; w < kWarps; ++w) {
      mk = fmaxf(mk, partial[0][w]);
      mv = fmaxf(mv, partial[1][w]);
    }
    // Provisional value -amax: as unsigned bits, 0x80000000 | bits(amax) orders by amax and is
    // above the 0 of an unset scale.
    unsigned* bits = reinterpret_cast<unsigned*>(scales);
    if (need_k) atomicMax(&bits[0], 0x80000000u | __float_as_uint(mk));
    if (need_v) atomicMax(&bits[1], 0x80000000u | __float_as_uint(mv));
  }
}

// ---- KIVI
// ------------------------------------------------------------------------------------------

__host__ __device__ constexpr int KiviTileStride(int d) { return d + 4; }  // fp16 values per row

// A CTA copies `bytes` (a multiple of width) between buffers aligned to width (2, 4, 8 or 16).
__device__ __forceinline__ void CtaCopy(void* dst, const void* src, int bytes, int width) {
  const int n = bytes / width;
  for (int i = threadIdx.x; i < n; i += kThreads) {
    switch (width) {
      case 16:
        static_cast<uint4*>(dst)[i] = static_cast<const uint4*>(src)[i];
        break;
      case 8:
        static_cast<uint2*>(dst)[i] = static_cast<const uint2*>(src)[i];
        break;
      case 4:
        static_cast<uint32_t*>(dst)[i] = static_cast<const uint32_t*>(src)[i];
        break;
      default:
        static_cast<uint16_t*>(dst)[i] = static_cast<const uint16_t*>(src)[i];
    }
  }
}

// 4 consecutive channels of token t of a group, as fp16 bits packed in a uint2: from the window
// when t was held before this call, else from the new rows (rounded as the window would hold them).
__device__ __forceinline__ void KiviLoad4(const AppendFormat& f, const AppendArgs& a,
                                          const uint16_t* wk, const uint16_t* wv, int64_t t,
                                          int64_t rb, int64_t sb, int64_t eb, int h, int c,
                                          uint2* hk, uint2* hv) {
  const int d = f.head_dim;
  if (t < sb) {
    *hk = *reinterpret_cast<const uint2*>(wk + (t - eb) * d + c);
    *hv = *reinterpret_cast<const uint2*>(wv + (t - eb) * d + c);
  } else {
    const int64_t at = (rb + t - sb) * a.row_stride + h * d + c;
    float xk[4], xv[4];
    LoadFloats<4>(a.k + at, a.vec_loads, xk);
    LoadFloats<4>(a.v + at, a.vec_loads, xv);
    *hk = make_uint2(FloatToHalf(xk[0]) | (static_cast<uint32_t>(FloatToHalf(xk[1])) << 16),
                     FloatToHalf(xk[2]) | (static_cast<uint32_t>(FloatToHalf(xk[3])) << 16));
    *hv = make_uint2(FloatToHalf(xv[0]) | (static_cast<uint32_t>(FloatToHalf(xv[1])) << 16),
                     FloatToHalf(xv[2]) | (static_cast<uint32_t>(FloatToHalf(xv[3])) << 16));
  }
}

template <int D>
__global__ void __launch_bounds__(kThreads) KiviGroupKernel(AppendFormat f, AppendArgs a) {
  constexpr int TS = KiviTileStride(D);  // padded rows: fewer bank conflicts in the value pass
  const int s = blockIdx.z, h = blockIdx.y, G = f.kivi_group, bits = f.kivi_bits;
  const int levels = (1 << bits) - 1;
  const int64_t rb = a.row_begin[s], n = a.row_begin[s + 1] - rb, sb = a.stored_before[s];
  const EncodedSplit split = AppendSplit(f, a, s, h, sb, n);
  const int64_t eb = split.before, ea = split.after;
  const int64_t g0 = eb + static_cast<int64_t>(blockIdx.x) * G;  // first token of the group
  if (n <= 0 || g0 >= ea) return;
  extern __shared__ __align__(16) uint8_t smem[];
  const int rec_words = f.record_bytes / 4, groups = D / G;
  uint32_t* stage = reinterpret_cast<uint32_t*>(smem);  // [G] records, every word written below
  uint16_t* tile_k = reinterpret_cast<uint16_t*>(smem + G * f.record_bytes);  // [G][TS] fp16
  uint16_t* tile_v = tile_k + G * TS;
  float* key_min = reinterpret_cast<float*>(tile_v + G * TS);  // [D] per channel
  float* key_scale = key_min + D;
  float* value_min = key_scale + D;  // [G][D/G] per (token, group of G channels)
  float* value_scale = value_min + D;
  const int64_t window = (StateSlot(a.seq_slots, s) * f.num_kv_heads + h) * a.residual_capacity * D;
  const uint16_t* wk = a.residual_k + window;
  const uint16_t* wv = a.residual_v + window;

  // 1. The group's keys and values into the tiles, kBatch loads in flight per thread.
  constexpr int kBatch = 4;
  const int quads = G * (D / 4);
  for (int base = threadIdx.x; base < quads; base += kThreads * kBatch) {
    uint2 hk[kBatch], hv[kBatch];
#pragma unroll
    for (int b = 0; b < kBatch; ++b) {
      const int i = base + b * kThreads;
      if (i < quads) {
        KiviLoad4(f, a, wk, wv, g0 + i / (D / 4), rb, sb, eb, h, (i % (D / 4)) * 4, &hk[b], &hv[b]);
      }
    }
#pragma unroll
    for (int b = 0; b < kBatch; ++b) {
      const int i = base + b * kThreads;
      if (i < quads) {
        const int at = (i / (D / 4)) * TS + (i % (D / 4)) * 4;
        *reinterpret_cast<uint2*>(tile_k + at) = hk[b];
        *reinterpret_cast<uint2*>(tile_v + at) = hv[b];
      }
    }
  }
  __syncthreads();
  // 2. (min, scale): keys per channel over the G tokens (token j's record holds the metadata of
  // channels [j * D/G, (j + 1) * D/G)), values per token over each group of G channels. Each is
  // the CPU's sequential min/max over the same order.
  const int per_token = D / G;
  for (int item = threadIdx.x; item < 2 * D; item += kThreads) {
    if (item < D) {
      const int c = item;
      float lo = HalfToFloat(tile_k[c]), hi = lo;
      for (int j = 1; j < G; ++j) {
        const float x = HalfToFloat(tile_k[j * TS + c]);
        lo = MinFirst(lo, x);
        hi = MaxFirst(hi, x);
      }
      const MinScaleResult ms = KiviMinScale(lo, hi, levels);
      key_min[c] = ms.min;
      key_scale[c] = ms.scale;
      stage[(c / per_token) * rec_words + f.kivi_codes_bytes / 4 + c % per_token] = ms.packed;
    } else {
      const int j = (item - D) / groups, g = (item - D) % groups;
      const uint16_t* x = tile_v + j * TS + g * G;
      float lo = HalfToFloat(x[0]), hi = lo;
      for (int i = 1; i < G; ++i) {
        const float y = HalfToFloat(x[i]);
        lo = MinFirst(lo, y);
        hi = MaxFirst(hi, y);
      }
      const MinScaleResult ms = KiviMinScale(lo, hi, levels);
      value_min[item - D] = ms.min;
      value_scale[item - D] = ms.scale;
      stage[j * rec_words + (f.key_bytes + f.kivi_codes_bytes) / 4 + g] = ms.packed;
    }
  }
  __syncthreads();
  // 3. Codes, one 32-bit word (32 / bits channels of one token) per item: keys, then values.
  const int per_word = 32 / bits, words = f.kivi_codes_bytes / 4;
  for (int item = threadIdx.x; item < 2 * G * words; item += kThreads) {
    const bool value = item >= G * words;
    const int j = (item % (G * words)) / words, w = item % words;
    const uint16_t* x = (value ? tile_v : tile_k) + j * TS + w * per_word;
    uint32_t packed = 0;
    for (int i = 0; i < per_word; ++i) {
      const int c = w * per_word + i;
      const int m = value ? j * groups + c / G : c;
      const float* mins = value ? value_min : key_min;
      const float* scales = value ? value_scale : key_scale;
      packed |= KiviCode(HalfToFloat(x[i]), mins[m], scales[m], levels) << (i * bits);
    }
    stage[j * rec_words + (value ? f.key_bytes / 4 : 0) + w] = packed;
  }
  __syncthreads();
  // 4. Out: the group's tokens that share a block are consecutive records there and here.
  const uint8_t* staged = reinterpret_cast<const uint8_t*>(stage);
  for (int j0 = 0; j0 < G;) {
    const int64_t t0 = g0 + j0;
    const int run =
        static_cast<int>(min(static_cast<int64_t>(G - j0), f.block_size - t0 % f.block_size));
    uint8_t* dst = RecordPtr(f, a.pool, a.block_stride_bytes, a.layer_offset_bytes, a.block_tables,
                             a.max_blocks_per_seq, s, h, t0);
    if (dst != nullptr) {
      CtaCopy(dst, staged + j0 * f.record_bytes, run * f.record_bytes, a.store_width);
    }
    j0 += run;
  }
}

// ---- The fp16 residual window (KIVI, TurboQuant) -----------------------------------------------

// The CTA moves the window of (batch entry s, kv-head h) on, once the tokens this call encodes
// have been read out of it: the window becomes tokens [encoded_after, stored_after) at positions
// t - encoded_after. Called by every thread of the CTA.
template <int D>
__device__ __forceinline__ void WindowUpdate(const AppendFormat& f, const AppendArgs& a, int s,
                                             int h) {
  const int64_t rb = a.row_begin[s], n = a.row_begin[s + 1] - rb, sb = a.stored_before[s];
  if (n <= 0) return;
  const EncodedSplit split = AppendSplit(f, a, s, h, sb, n);
  const int64_t sa = sb + n, eb = split.before, ea = split.after;
  const int64_t window = (StateSlot(a.seq_slots, s) * f.num_kv_heads + h) * a.residual_capacity * D;
  uint16_t* wk = a.residual_k + window;
  uint16_t* wv = a.residual_v + window;
  // Old tokens that stay, [ea, sb), move down by ea - eb, in place: each round reads up to
  // kBatch x 16 bytes of keys and of values per thread, then writes them (dst < src, so a round
  // never overwrites what a later round reads).
  constexpr int kPer = 8, kBatch = 8;  // fp16 values per uint4; uint4 per thread and round
  const int64_t shift = (ea - eb) * D, count = (sb - ea) * D;
  if (shift > 0 && count > 0) {
    for (int64_t base = 0; base < count; base += int64_t{kThreads} * kPer * kBatch) {
      uint4 k8[kBatch], v8[kBatch];
#pragma unroll
      for (int b = 0; b < kBatch; ++b) {
        const int64_t i = base + (int64_t{b} * kThreads + threadIdx.x) * kPer;
        if (i < count) {
          k8[b] = *reinterpret_cast<const uint4*>(wk + shift + i);
          v8[b] = *reinterpret_cast<const uint4*>(wv + shift + i);
        }
      }
      __syncthreads();
#pragma unroll
      for (int b = 0; b < kBatch; ++b) {
        const int64_t i = base + (int64_t{b} * kThreads + threadIdx.x) * kPer;
        if (i < count) {
          *reinterpret_cast<uint4*>(wk + i) = k8[b];
          *reinterpret_cast<uint4*>(wv + i) = v8[b];
        }
      }
      __syncthreads();
    }
  }
  // New rows that stay in the window. Their positions follow the moved tokens' new ones, but may
  // overlap where those were read from: hence after the moves. 4 channels per item.
  const int64_t first = sb > ea ? sb : ea;
  const int64_t quads = (sa - first) * (D / 4);
  constexpr int kRowBatch = 4;
  for (int64_t base = threadIdx.x; base < quads; base += int64_t{kThreads} * kRowBatch) {
    float xk[kRowBatch][4], xv[kRowBatch][4];
#pragma unroll
    for (int b = 0; b < kRowBatch; ++b) {
      const int64_t i = base + int64_t{b} * kThreads;
      if (i < quads) {
        const int64_t at =
            (rb + first - sb + i / (D / 4)) * a.row_stride + h * D + (i % (D / 4)) * 4;
        LoadFloats<4>(a.k + at, a.vec_loads, xk[b]);
        LoadFloats<4>(a.v + at, a.vec_loads, xv[b]);
      }
    }
#pragma unroll
    for (int b = 0; b < kRowBatch; ++b) {
      const int64_t i = base + int64_t{b} * kThreads;
      if (i < quads) {
        const int64_t at = (first - ea + i / (D / 4)) * D + (i % (D / 4)) * 4;
        *reinterpret_cast<uint2*>(wk + at) = make_uint2(
            FloatToHalf(xk[b][0]) | (static_cast<uint32_t>(FloatToHalf(xk[b][1])) << 16),
            FloatToHalf(xk[b][2]) | (static_cast<uint32_t>(FloatToHalf(xk[b][3])) << 16));
        *reinterpret_cast<uint2*>(wv + at) = make_uint2(
            FloatToHalf(xv[b][0]) | (static_cast<uint32_t>(FloatToHalf(xv[b][1])) << 16),
            FloatToHalf(xv[b][2]) | (static_cast<uint32_t>(FloatToHalf(xv[b][3])) << 16));
      }
    }
  }
  if (a.head_window != nullptr) {
    __syncthreads();  // every thread has read the old count
    if (threadIdx.x == 0) {
      a.head_window[StateSlot(a.seq_slots, s) * f.num_kv_heads + h] = static_cast<int32_t>(sa - ea);
    }
  }
}

// After KiviGroupKernel or TurboFlushKernel (which read the old window): one CTA per (kv-head,
// sequence).
template <int D>
__global__ void __launch_bounds__(kThreads) WindowKernel(AppendFormat f, AppendArgs a) {
  WindowUpdate<D>(f, a, blockIdx.y, blockIdx.x);
}

// TurboQuant with a window: the tokens [eb, ea) this call encodes out of each sequence's window
// (encoded before and after the call), each by one warp from its fp16 value (the old window's
// for tokens held before the call, the new row rounded to fp16 as the window would hold it
// otherwise), as CpuKvCache::FlushResidual does: one CTA per (kWarps tokens, kv-head, sequence),
// a token per warp. A sequence appending n rows flushes at most flush * ceil(n / flush) tokens,
// its window having held fewer than R + flush. WindowKernel moves the windows on afterwards.
// (Moving the window in the same CTA for decode-sized calls, which flush at most 16 tokens, was
// no faster on the H200: 34.8 vs 31.0 us for kv_append_bench's decode call.)
template <int D>
__global__ void __launch_bounds__(kThreads) TurboFlushKernel(AppendFormat f, AppendArgs a) {
  constexpr int V = D / 32;
  extern __shared__ __align__(16) uint8_t smem[];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, c0 = lane * V;
  const int s = blockIdx.z, h = blockIdx.y;
  const int64_t rb = a.row_begin[s], n = a.row_begin[s + 1] - rb, sb = a.stored_before[s];
  if (n <= 0) return;
  const EncodedSplit split = AppendSplit(f, a, s, h, sb, n);
  const int64_t eb = split.before, ea = split.after;
  const int64_t first = eb + static_cast<int64_t>(blockIdx.x) * kWarps;  // the CTA's first token
  if (first >= ea) return;
  float* table = reinterpret_cast<float*>(smem);
  for (int i = threadIdx.x; i < kTurboTableFloats + kTurboSignWords; i += kThreads) {
    table[i] = f.tq_table[i];
  }
  __syncthreads();
  const int64_t t = first + warp;
  if (t >= ea) return;
  float x[2][V];
  if (t < sb) {
    const int64_t at =
        ((StateSlot(a.seq_slots, s) * f.num_kv_heads + h) * a.residual_capacity + (t - eb)) * D +
        c0;
    uint16_t hk[V], hv[V];
    LoadHalves<V>(a.residual_k + at, hk);
    LoadHalves<V>(a.residual_v + at, hv);
#pragma unroll
    for (int r = 0; r < V; ++r) {
      x[0][r] = HalfToFloat(hk[r]);
      x[1][r] = HalfToFloat(hv[r]);
    }
  } else {
    const int64_t at = (rb + t - sb) * a.row_stride + h * D + c0;
    LoadFloats<V>(a.k + at, a.vec_loads, x[0]);
    LoadFloats<V>(a.v + at, a.vec_loads, x[1]);
#pragma unroll
    for (int r = 0; r < V; ++r) {
      x[0][r] = HalfToFloat(FloatToHalf(x[0][r]));
      x[1][r] = HalfToFloat(FloatToHalf(x[1][r]));
    }
  }
  uint8_t* dst = RecordPtr(f, a.pool, a.block_stride_bytes, a.layer_offset_bytes, a.block_tables,
                           a.max_blocks_per_seq, s, h, t);
  if (dst == nullptr) return;  // no reserved block: the caller's contract was broken
  uint8_t* mine =
      smem + kTurboTableBytes + warp * RowWarpBytes(kAppendTurbo, D, f.record_bytes, true);
  TurboEncodeWarp<D>(f, table, mine, x, lane);
  __syncwarp();
  WarpCopy(dst, mine, f.record_bytes, a.store_width, lane);
}

// ---- Read: one warp per (token, kv-head, sequence)
// ------------------------------------------------

template <int KIND, int D>
__global__ void __launch_bounds__(kThreads) ReadKernel(AppendFormat f, ReadArgs a) {
  constexpr int V = D / 32;
  extern __shared__ __align__(16) uint8_t smem[];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, c0 = lane * V;
  const int s = blockIdx.z, h = blockIdx.y;
  float* table = reinterpret_cast<float*>(smem);
  if constexpr (KIND == kAppendTurbo) {
    for (int i = threadIdx.x; i < kTurboTableFloats + kTurboSignWords; i += kThreads) {
      table[i] = f.tq_table[i];
    }
    __syncthreads();
  }
  const int64_t t = static_cast<int64_t>(blockIdx.x) * kWarps + warp;
  const int64_t len = a.lens[s];
  if (t >= len) return;
  float out[2][V];
  const int64_t encoded =
      a.head_window != nullptr
          ? len - a.head_window[StateSlot(a.seq_slots, s) * f.num_kv_heads + h]
          : EncodedCount(f, len);
  if (t >= encoded) {  // the fp16 window (KIVI, TurboQuant with R > 0)
    const int64_t at =
        ((StateSlot(a.seq_slots, s) * f.num_kv_heads + h) * a.residual_capacity + (t - encoded)) *
            D +
        c0;
    uint16_t hk[V], hv[V];
    LoadHalves<V>(a.residual_k + at, hk);
    LoadHalves<V>(a.residual_v + at, hv);
#pragma unroll
    for (int r = 0; r < V; ++r) {
      out[0][r] = HalfToFloat(hk[r]);
      out[1][r] = HalfToFloat(hv[r]);
    }
  } else {
    const uint8_t* rec = RecordPtr(f, a.pool, a.block_stride_bytes, a.layer_offset_bytes,
                                   a.block_tables, a.max_blocks_per_seq, s, h, t);
    if (rec == nullptr) return;
    uint8_t* mine = smem + (KIND == kAppendTurbo ? kTurboTableBytes : 0) +
                    warp * RowWarpBytes(KIND, D, f.record_bytes, false);
    const uint32_t* stage = reinterpret_cast<const uint32_t*>(mine);
    WarpCopy(mine, rec, f.record_bytes, a.load_width, lane);
    __syncwarp();
    if constexpr (KIND == kAppendFp16 || KIND == kAppendBf16) {
      const uint16_t* in = reinterpret_cast<const uint16_t*>(mine);
#pragma unroll
      for (int half = 0; half < 2; ++half) {
#pragma unroll
        for (int r = 0; r < V; ++r) {
          const uint16_t b = in[half * D + c0 + r];
          out[half][r] = KIND == kAppendFp16 ? HalfToFloat(b)
                                             : __uint_as_float(static_cast<uint32_t>(b) << 16);
        }
      }
    } else if constexpr (KIND == kAppendFp8) {
      const float* scales = a.head_scales + (StateSlot(a.seq_slots, s) * f.num_kv_heads + h) * 2;
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const float scale = scales[half];
#pragma unroll
        for (int r = 0; r < V; ++r) {
          out[half][r] = __fmul_rn(E4M3ToFloat(mine[half * D + c0 + r]), scale);
        }
      }
    } else if constexpr (KIND == kAppendInt8) {
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const uint8_t* in =
            mine + (half == 0 ? Int8Record::KeyCodes(D) : Int8Record::ValueCodes(D));
        const uint8_t* sc =
            mine + (half == 0 ? Int8Record::KeyScale(D) : Int8Record::ValueScale(D));
        const float scale = HalfToFloat(static_cast<uint16_t>(sc[0] | (sc[1] << 8)));
#pragma unroll
        for (int r = 0; r < V; ++r) {
          out[half][r] = __fmul_rn(static_cast<float>(static_cast<int8_t>(in[c0 + r])), scale);
        }
      }
    } else if constexpr (KIND == kAppendKivi) {
      const int G = f.kivi_group, bits = f.kivi_bits, per_token = D / G;
      const uint32_t keys = GetBits(stage, c0 * bits, V * bits);
      const uint32_t values = GetBits(stage, 8 * f.key_bytes + c0 * bits, V * bits);
      const uint32_t mask = (1u << bits) - 1;
      int64_t group_start = t - t % G;
      if (a.key_offsets != nullptr) {  // under eviction: the slot's offset in its group, or solo
        const int32_t block = a.block_tables[static_cast<int64_t>(s) * a.max_blocks_per_seq +
                                             t / f.block_size];
        const uint8_t offset = a.key_offsets[block * a.key_offsets_block_stride +
                                             int64_t{h} * f.block_size + t % f.block_size];
        group_start = offset == kSoloKeyOffset ? -1 : t - offset;
      }
#pragma unroll
      for (int r = 0; r < V; ++r) {
        const int c = c0 + r;
        // The key group's (scale, min) of channel c live in the record of token c / per_token;
        // a solo key's of channels [c - c % G, ...) in its own record, as a value's.
        uint32_t km;
        if (group_start < 0) {
          km = stage[f.kivi_codes_bytes / 4 + c / G];
        } else {
          const uint8_t* meta_rec =
              RecordPtr(f, a.pool, a.block_stride_bytes, a.layer_offset_bytes, a.block_tables,
                        a.max_blocks_per_seq, s, h, group_start + c / per_token);
          km = meta_rec == nullptr
                   ? 0
                   : LoadWord(meta_rec + f.kivi_codes_bytes + 4 * (c % per_token), a.load_width);
        }
        out[0][r] = __fadd_rn(
            __fmul_rn(static_cast<float>((keys >> (r * bits)) & mask), HalfToFloat(km & 0xFFFF)),
            HalfToFloat(km >> 16));
        const uint32_t vm = stage[(f.key_bytes + f.kivi_codes_bytes) / 4 + c / G];
        out[1][r] = __fadd_rn(
            __fmul_rn(static_cast<float>((values >> (r * bits)) & mask), HalfToFloat(vm & 0xFFFF)),
            HalfToFloat(vm >> 16));
      }
    } else {  // TurboQuant: centroids * s, then Pi^T = D H / sqrt(d)
      static_assert(KIND == kAppendTurbo, "unhandled format");
      const uint32_t signs = TurboSigns<V>(table, lane);
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const TurboLane tl = TurboLaneOf<V>(f, table, half, lane);
        const int base = half == 0 ? 0 : 8 * f.key_bytes;
        const uint32_t codes = GetBits(stage, base + tl.bit, V * tl.bits);
        const float norm = HalfToFloat(
            static_cast<uint16_t>(GetBits(stage, base + 8 * f.tq_code_bytes[half], 16)));
        const uint32_t mask = (1u << tl.bits) - 1;
#pragma unroll
        for (int r = 0; r < V; ++r) {
          out[half][r] = __fmul_rn(tl.table[(codes >> (r * tl.bits)) & mask], norm);
        }
        WarpWht<V>(out[half], lane, f.tq_wht_scale);
#pragma unroll
        for (int r = 0; r < V; ++r) {
          if ((signs >> r) & 1) out[half][r] = -out[half][r];
        }
      }
    }
  }
  const int64_t at =
      ((static_cast<int64_t>(s) * f.num_kv_heads + h) * a.out_stride_tokens + t) * D + c0;
  StoreFloats<V>(a.out_k + at, a.vec_stores, out[0]);
  StoreFloats<V>(a.out_v + at, a.vec_stores, out[1]);
}

// ---- Launch
// ----------------------------------------------------------------------------------------

// Calls launch(std::integral_constant<int, K>{}) for the format kind K == kind (one template
// instance per kind), then returns the launch error.
template <class Launch>
cudaError_t WithKind(int kind, Launch&& launch) {
  switch (kind) {
    case kAppendFp16:
      launch(std::integral_constant<int, kAppendFp16>{});
      break;
    case kAppendBf16:
      launch(std::integral_constant<int, kAppendBf16>{});
      break;
    case kAppendFp8:
      launch(std::integral_constant<int, kAppendFp8>{});
      break;
    case kAppendInt8:
      launch(std::integral_constant<int, kAppendInt8>{});
      break;
    case kAppendKivi:
      launch(std::integral_constant<int, kAppendKivi>{});
      break;
    case kAppendTurbo:
      launch(std::integral_constant<int, kAppendTurbo>{});
      break;
    default:
      return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

// Calls launch(std::integral_constant<int, D>{}) for the head dimension D == head_dim.
template <class Launch>
cudaError_t WithHeadDim(int head_dim, Launch&& launch) {
  switch (head_dim) {
    case 64:
      return launch(std::integral_constant<int, 64>{});
    case 128:
      return launch(std::integral_constant<int, 128>{});
    case 256:
      return launch(std::integral_constant<int, 256>{});
  }
  return cudaErrorInvalidValue;
}

template <int D>
cudaError_t LaunchAppendD(const AppendFormat& f, const AppendArgs& a, cudaStream_t stream) {
  const int heads = f.num_kv_heads;
  if (f.kind == kAppendKivi) {
    // A call of n rows flushes at most floor(n / G) + 1 groups of a sequence.
    const dim3 groups(a.max_rows_per_seq / f.kivi_group + 1, heads, a.num_seqs);
    KiviGroupKernel<D><<<groups, kThreads, KiviGroupSmemBytes(f), stream>>>(f, a);
    cudaError_t e = cudaGetLastError();
    if (e != cudaSuccess) return e;
    WindowKernel<D><<<dim3(heads, a.num_seqs), kThreads, 0, stream>>>(f, a);
    return cudaGetLastError();
  }
  if (f.kind == kAppendTurbo && f.window_tokens > 0) {
    const int64_t max_flush =
        int64_t{f.flush_tokens} * ((a.max_rows_per_seq + f.flush_tokens - 1) / f.flush_tokens);
    const dim3 grid(static_cast<unsigned>((max_flush + kWarps - 1) / kWarps), heads, a.num_seqs);
    TurboFlushKernel<D>
        <<<grid, kThreads, RowSmemBytes(kAppendTurbo, D, f.record_bytes, true), stream>>>(f, a);
    cudaError_t e = cudaGetLastError();
    if (e != cudaSuccess) return e;
    WindowKernel<D><<<dim3(heads, a.num_seqs), kThreads, 0, stream>>>(f, a);
    return cudaGetLastError();
  }
  if (f.kind == kAppendFp8 && !a.fuse_amax) {
    const dim3 chunks((a.max_rows_per_seq + kAmaxRows - 1) / kAmaxRows, heads, a.num_seqs);
    Fp8AmaxKernel<D><<<chunks, kThreads, 0, stream>>>(f, a);
    cudaError_t e = cudaGetLastError();
    if (e != cudaSuccess) return e;
  }
  const int64_t tasks = static_cast<int64_t>(a.num_rows) * heads;
  const int grid = static_cast<int>(std::min<int64_t>(kMaxGrid, (tasks + kWarps - 1) / kWarps));
  const int smem = RowSmemBytes(f.kind, D, f.record_bytes, true);
  // KIVI encodes whole key groups (above), never row by row.
  if (f.kind == kAppendKivi) return cudaErrorInvalidValue;
  return WithKind(f.kind, [&](auto kind) {
    constexpr int kKind = decltype(kind)::value;
    if constexpr (kKind != kAppendKivi) {
      EncodeRowsKernel<kKind, D><<<grid, kThreads, smem, stream>>>(f, a);
    }
  });
}

template <int D>
cudaError_t LaunchReadD(const AppendFormat& f, const ReadArgs& a, cudaStream_t stream) {
  const dim3 grid((a.max_len + kWarps - 1) / kWarps, f.num_kv_heads, a.num_seqs);
  const int smem = RowSmemBytes(f.kind, D, f.record_bytes, false);
  return WithKind(f.kind, [&](auto kind) {
    ReadKernel<decltype(kind)::value, D><<<grid, kThreads, smem, stream>>>(f, a);
  });
}

}  // namespace

int KiviGroupSmemBytes(const AppendFormat& f) {
  // Staged records, the key and value tiles, and four [D] float arrays.
  return f.kivi_group * f.record_bytes + 2 * f.kivi_group * KiviTileStride(f.head_dim) * 2 +
         4 * f.head_dim * 4;
}

cudaError_t SetupAppendKernels(const AppendFormat& f) {
  if (f.kind != kAppendKivi) return cudaSuccess;  // the row kernels stay under 48 KB
  const int bytes = KiviGroupSmemBytes(f);
  if (bytes <= 48 * 1024) return cudaSuccess;
  return WithHeadDim(f.head_dim, [&](auto d) {
    return cudaFuncSetAttribute(KiviGroupKernel<decltype(d)::value>,
                                cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
  });
}

cudaError_t LaunchAppend(const AppendFormat& f, const AppendArgs& a, cudaStream_t stream) {
  return WithHeadDim(f.head_dim,
                     [&](auto d) { return LaunchAppendD<decltype(d)::value>(f, a, stream); });
}

cudaError_t LaunchRead(const AppendFormat& f, const ReadArgs& a, cudaStream_t stream) {
  return WithHeadDim(f.head_dim,
                     [&](auto d) { return LaunchReadD<decltype(d)::value>(f, a, stream); });
}

}  // namespace kvgate::kernels::cuda::internal
