// Paged split-KV decode attention for every KV format (kvgate/kernels/cuda_attention.h).
// docs/GPU_NOTES.md has the design, the floors and the measured history of each version.
//
// Per call: PrepareQueryKernel (q * scale * log2(e), rotated for TurboQuant) -> split kernel ->
// ReduceSplitsKernel (combines the splits' (max, sum, acc) in parallel over splits, un-rotates
// TurboQuant outputs); the split and reduction kernels are programmatic dependent launches
// (GridDepWait). Split kernels, both writing the same partials:
//  - DecodeMmaKernel (v2/v3, default where an instance exists: fp16, bf16, fp8, int8, kivi2/4 with
//  a
//    power-of-two group, TurboQuant with equal key/value rates 4/3.5/3/2.5): tensor cores
//    (mma.sync m16n8k16) for Q K^T and P V with the GQA group as N, per-warp online softmax on
//    the fragments; its comment below has the fragment mapping. With attention sinks (sink
//    eviction) one more CTA per (sequence, kv-head) scores the sink slots against the RoPE-shifted
//    query (PrepareQueryKernel writes it next to the prepared one) and the block splits mask them.
//  - DecodeSplitKernel (v1: the other layouts, KIVI under eviction (key groups anywhere, solo
//    keys, sinks scored per token), and the fp16 residual window of KIVI and TurboQuant as one
//    extra split): a split is a range of whole tiles; a tile is `tile_blocks` blocks. Each block
//    segment (one kv-head of one layer: block_size * record_bytes contiguous bytes, 16-byte
//    aligned) is copied into shared memory with 16-byte cp.async, STAGES tiles in flight. A team
//    of D/8 lanes handles one token, each lane 8 channels: scores are reduced with shuffles inside
//    the team; the online softmax runs per tile (base 2); values accumulate into per-lane [G][8]
//    fp32 registers, summed over teams at the end of the split.
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <utility>

#include "kernels/cuda/decode_attention_internal.h"
#include "kvgate/kernels/kv_record_layout.h"

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

// Programmatic dependent launch (sm_90): the split and reduction kernels are launched with
// programmatic stream serialization, so that each starts while its predecessor finishes; a
// kernel calls GridDepWait() before it reads what the predecessor wrote (that waits for the
// predecessor grid's completion and memory flush), and GridDepLaunch() once the rest of its work
// no longer needs a resource the dependent grid could take. Inputs of the whole call (pool,
// tables, lengths, scales) may be read before the wait: the call's first kernel is launched
// normally, after all earlier work.
__device__ __forceinline__ void GridDepWait() {
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
}
__device__ __forceinline__ void GridDepLaunch() {
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
}

// Bulk copies (the copy engine, sm_90) completing on an mbarrier: one instruction per block
// segment, issued by one lane, instead of a 16-byte cp.async per thread and 16 bytes.
__device__ __forceinline__ uint32_t SmemAddr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
__device__ __forceinline__ void MbarInit(uint64_t* bar, int count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(SmemAddr(bar)), "r"(count));
}
// Makes the initialized mbarriers visible to the copy engine (the async proxy).
__device__ __forceinline__ void MbarInitFence() {
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
}
// Arrives once and expects `bytes` more bytes of bulk copies before the phase completes.
__device__ __forceinline__ void MbarArriveExpectTx(uint64_t* bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(SmemAddr(bar)),
               "r"(bytes)
               : "memory");
}
__device__ __forceinline__ void MbarWait(uint64_t* bar, uint32_t parity) {
  asm volatile(
      "{\n"
      ".reg .pred p;\n"
      "WAIT:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 p, [%0], %1;\n"
      "@!p bra WAIT;\n"
      "}\n" ::"r"(SmemAddr(bar)),
      "r"(parity)
      : "memory");
}
// bytes (a multiple of 16; both addresses 16-byte aligned) from global to shared memory.
__device__ __forceinline__ void BulkCopy(void* dst, const void* src, uint32_t bytes,
                                         uint64_t* bar) {
  asm volatile(
      "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n" ::
          "r"(SmemAddr(dst)),
      "l"(src), "r"(bytes), "r"(SmemAddr(bar))
      : "memory");
}
template <int N>
__device__ __forceinline__ void CpAsyncWait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

// Row of batch entry `seq` in the per-sequence state arrays (FP8 head_scales, KIVI residual
// window): seq_slots[seq] when the caller keeps state at fixed slots, else seq itself.
__device__ __forceinline__ size_t StateSlot(const SplitArgs& a, int seq) {
  return static_cast<size_t>(a.seq_slots != nullptr ? a.seq_slots[seq] : seq);
}

// Tokens (sequence, kv-head) holds in blocks and in its fp16 window: per head with
// SplitArgs::head_window, else the sequence's split.
__device__ __forceinline__ int HeadEncoded(const SplitArgs& a, int seq, int kvh, int num_kv_heads) {
  if (a.head_window == nullptr) return a.encoded_lens[seq];
  return a.encoded_lens[seq] + a.residual_lens[seq] -
         a.head_window[StateSlot(a, seq) * num_kv_heads + kvh];
}
__device__ __forceinline__ int HeadWindowLen(const SplitArgs& a, int seq, int kvh,
                                             int num_kv_heads) {
  if (a.head_window == nullptr) return a.residual_lens[seq];
  return a.head_window[StateSlot(a, seq) * num_kv_heads + kvh];
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
    const __nv_fp8x2_storage_t pair =
        static_cast<__nv_fp8x2_storage_t>(b[2 * i] | (b[2 * i + 1] << 8));
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
  const int off =
      hi ? lane * hi_bits : hi_channels * hi_bits / 8 + (lane - hi_channels / 8) * lo_bits;
  const uint32_t w = LoadBytes(rec + off, bits);
  const float* c = hi ? hi_c : lo_c;
  const uint32_t mask = (1u << bits) - 1;
#pragma unroll
  for (int i = 0; i < 8; ++i) o[i] = scale * c[(w >> (bits * i)) & mask];
}

// Channels [8 lane, 8 lane + 8) of the key (KEY) or the value of a per-token record `rec`:
// fp16, bf16, fp8 (the head scale is applied by the caller; the value at key_bytes), int8 (codes
// and fp16 scale where Int8Record puts them).
template <int KIND, int D, bool KEY>
__device__ __forceinline__ void PerTokenChunk(const uint8_t* rec, int key_bytes, int lane,
                                              float o[8]) {
  if constexpr (KIND == kKindInt8) {
    uint8_t b[8];
    Load8(rec + (KEY ? Int8Record::KeyCodes(D) : Int8Record::ValueCodes(D)) + 8 * lane, b);
    const float s = LoadHalfF(rec + (KEY ? Int8Record::KeyScale(D) : Int8Record::ValueScale(D)));
#pragma unroll
    for (int i = 0; i < 8; ++i) o[i] = static_cast<float>(static_cast<int8_t>(b[i])) * s;
  } else if constexpr (KIND == kKindFp16) {
    Half8(rec + (KEY ? 0 : key_bytes) + 16 * lane, o);
  } else if constexpr (KIND == kKindBf16) {
    Bf16x8(rec + (KEY ? 0 : key_bytes) + 16 * lane, o);
  } else {
    static_assert(KIND == kKindFp8, "per-token formats only");
    Fp8x8(rec + (KEY ? 0 : key_bytes) + 8 * lane, o);
  }
}

// Where a tile's tokens sit in the sequence, for the v1 kernel of KIVI under eviction
// (kKindKiviEvict): its key groups start anywhere (SplitArgs::key_offsets; the metadata of a
// group's members is read from the pool) and its first `sinks` tokens are attention sinks, scored
// against q_sink ([G][D] prepared shifted queries in shared memory). Unused by the other kinds.
struct TileSlots {
  const uint8_t* pool = nullptr;  // the layer's first record of block 0: pool + layer offset
  int64_t block_stride_bytes = 0;
  const int32_t* table = nullptr;        // the sequence's block table
  const uint8_t* key_offsets = nullptr;  // SplitArgs::key_offsets, at the kv-head's first slot
  int64_t key_offsets_block_stride = 0;
  int block_size = 0, kvh = 0;
  int first = 0;  // slot of the tile's token 0
  int sinks = 0;  // tokens [0, sinks) of the tile are sinks
  const float* q_sink = nullptr;
};

// Key (key domain) of token `tok` of a tile, channels [8 lane, 8 lane + 8).
template <int KIND, int D>
__device__ __forceinline__ void KeyChunk(const uint8_t* tile, int tok, int lane,
                                         const FormatParams& fp, const float* tables,
                                         const TileSlots& slots, float o[8]) {
  const uint8_t* rec = tile + static_cast<size_t>(tok) * fp.record_bytes;
  if constexpr (KIND == kKindFp16 || KIND == kKindBf16 || KIND == kKindFp8 || KIND == kKindInt8) {
    PerTokenChunk<KIND, D, true>(rec, fp.key_bytes, lane, o);
  } else if constexpr (KIND == kKindKiviEvict) {
    // A solo key has the value half's layout; a group member's (scale, min) of channel c are in
    // the record of the group's token c / (D / G), which may lie in another tile: read from the
    // pool.
    const int bits = fp.kivi_bits, group = fp.kivi_group, cpt = D / group, bs = slots.block_size;
    const int slot = slots.first + tok;
    const uint32_t w = LoadBytes(rec + lane * bits, bits);
    const uint32_t mask = (1u << bits) - 1;
    const uint8_t offset =
        slots.key_offsets[slots.table[slot / bs] * slots.key_offsets_block_stride + slot % bs];
    if (offset == kSoloKeyOffset) {
      const uint8_t* meta = rec + fp.kivi_codes_bytes + 4 * ((8 * lane) / group);
      const float sc = LoadHalfF(meta), mn = LoadHalfF(meta + 2);
#pragma unroll
      for (int i = 0; i < 8; ++i) o[i] = static_cast<float>((w >> (bits * i)) & mask) * sc + mn;
    } else {
      const int start = slot - offset;
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        const int c = 8 * lane + i, member = start + c / cpt;
        const uint8_t* meta =
            slots.pool + slots.table[member / bs] * slots.block_stride_bytes +
            (static_cast<int64_t>(slots.kvh) * bs + member % bs) * fp.record_bytes +
            fp.kivi_codes_bytes + 4 * (c % cpt);
        o[i] = static_cast<float>((w >> (bits * i)) & mask) * LoadHalfF(meta) + LoadHalfF(meta + 2);
      }
    }
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
  const uint8_t* record = tile + static_cast<size_t>(tok) * fp.record_bytes;
  const uint8_t* rec = record + fp.key_bytes;  // KIVI, TurboQuant: [key | value]
  if constexpr (KIND == kKindFp16 || KIND == kKindBf16 || KIND == kKindFp8 || KIND == kKindInt8) {
    PerTokenChunk<KIND, D, false>(record, fp.key_bytes, lane, o);
  } else if constexpr (KIND == kKindKivi || KIND == kKindKiviEvict) {
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
// SINKS (KIVI under eviction): the tile's first slots.sinks tokens are scored against
// slots.q_sink instead of q.
template <int KIND, int D, int G, bool SINKS = false>
__device__ __forceinline__ void ComputeTile(const uint8_t* tile, int ntok, const FormatParams& fp,
                                            const float* tables, float key_scale,
                                            const float (&q)[G][8], float (&acc)[G][8],
                                            const SoftmaxState& st, const TileSlots& slots = {}) {
  constexpr int kLanes = D / 8, kTeams = kThreads / kLanes;
  const int tid = threadIdx.x, team = tid / kLanes, lane = tid % kLanes;
  for (int base = 0; base < ntok; base += kTeams) {
    const int tok = base + team;
    const bool valid = tok < ntok;
    float k[8];
    if (valid) {
      KeyChunk<KIND, D>(tile, tok, lane, fp, tables, slots, k);
    } else {
#pragma unroll
      for (int i = 0; i < 8; ++i) k[i] = 0.f;
    }
    const bool sink = SINKS && tok < slots.sinks;
#pragma unroll
    for (int g = 0; g < G; ++g) {
      float s = 0.f;
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        s = fmaf(sink ? slots.q_sink[g * D + 8 * lane + i] : q[g][i], k[i], s);
      }
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

// In-place unnormalised Walsh-Hadamard transform of ROWS vectors x[ROWS][D] in shared memory
// (log2 D butterfly stages, all threads of the block; the caller scales by 1/sqrt(D)).
template <int D, int ROWS>
__device__ __forceinline__ void FwhtRows(float* x) {
  for (int h = 1; h < D; h <<= 1) {
    __syncthreads();
    for (int p = threadIdx.x; p < ROWS * D / 2; p += blockDim.x) {
      const int j = p % (D / 2);
      const int i = (p / (D / 2)) * D + (j / h) * 2 * h + j % h;
      const float u = x[i], w = x[i + h];
      x[i] = u + w;
      x[i + h] = u - w;
    }
  }
  __syncthreads();
}

// Stages tokens [t0, t0 + ntok) of one (sequence, kv-head)'s fp16 window (rk, rv: its key and
// value rows, D halves each) at smem as fp16 records [k | v] of 4 D bytes, by 16-byte cp.async
// from every thread (the caller commits and waits).
template <int D>
__device__ __forceinline__ void StageWindow(uint8_t* smem, const uint16_t* rk, const uint16_t* rv,
                                            int t0, int ntok) {
  constexpr int kRowChunks = 2 * D / 16;  // 16-byte chunks of one fp16 row
  for (int c = threadIdx.x; c < ntok * 2 * kRowChunks; c += blockDim.x) {
    const int tok = c / (2 * kRowChunks), part = (c / kRowChunks) % 2;
    const int off = (c % kRowChunks) * 16;
    const uint8_t* src = reinterpret_cast<const uint8_t*>(part ? rv : rk) +
                         static_cast<size_t>(t0 + tok) * 2 * D + off;
    CpAsync16(smem + tok * 4 * D + part * 2 * D + off, src);
  }
}

template <int KIND, int D, int G>
__global__ void __launch_bounds__(kThreads) DecodeSplitKernel(SplitArgs a, FormatParams fp) {
  constexpr int kLanes = D / 8, kTeams = kThreads / kLanes;
  extern __shared__ __align__(16) uint8_t smem[];
  __shared__ float s_scores[G * kMaxTileTokens];
  __shared__ float s_m[G], s_l[G], s_alpha[G];
  __shared__ float s_tables[64];
  const int split = blockIdx.x + a.split_offset, kvh = blockIdx.y, seq = blockIdx.z;
  const int tid = threadIdx.x, team = tid / kLanes, lane = tid % kLanes;
  const int num_kv_heads = gridDim.y;
  // The fp16 window's split (KIVI, TurboQuant with R > 0): the window is an input of the call,
  // so its first tile's copies go out before waiting for the previous kernel.
  const bool window_split = split >= a.num_splits;
  const uint16_t* win_k = nullptr;
  const uint16_t* win_v = nullptr;
  // The window rows [win_begin, win_end) this split reads. TurboQuant with attention sinks: two
  // window splits, the first over the sink rows still in the window (its first rows) with the
  // shifted query, the second over the rest.
  int win_begin = 0, win_end = 0;
  bool win_sink_rows = false;
  if constexpr (KIND == kKindKivi || KIND == kKindKiviEvict || KIND == kKindTurbo) {
    if (window_split) {
      const size_t window = (StateSlot(a, seq) * num_kv_heads + kvh) * a.residual_capacity * D;
      win_k = a.residual_k + window;
      win_v = a.residual_v + window;
      win_end = HeadWindowLen(a, seq, kvh, num_kv_heads);
      if constexpr (KIND == kKindTurbo) {
        if (a.sink_slots != nullptr) {
          const int sink_rows =
              min(max(a.sink_slots[seq] - HeadEncoded(a, seq, kvh, num_kv_heads), 0), win_end);
          win_sink_rows = split == a.split_offset;
          if (win_sink_rows) {
            win_end = sink_rows;
          } else {
            win_begin = sink_rows;
          }
        }
      }
      if (a.window_row_splits > 1) {  // this split's share of the rows (no sinks: host's rule)
        const int per = (win_end + a.window_row_splits - 1) / a.window_row_splits;
        win_begin = min((split - a.num_splits) * per, win_end);
        win_end = min(win_begin + per, win_end);
      }
      StageWindow<D>(smem, win_k, win_v, win_begin,
                     min(a.residual_tile_tokens, win_end - win_begin));
      CpAsyncCommit();
    }
  }
  GridDepWait();  // qprep
  if (tid < 64) s_tables[tid] = fp.tables[tid];
  // KIVI under eviction: the sinks' prepared shifted query, and where this sequence's slots are.
  constexpr bool kEvict = KIND == kKindKiviEvict;
  __shared__ float s_qsink[kEvict ? G * D : 1];
  TileSlots slots;
  if constexpr (kEvict) {
    if (a.sink_slots != nullptr) {
      for (int e = tid; e < G * D; e += kThreads) {
        s_qsink[e] = a.qprep_sink[(static_cast<size_t>(seq) * a.num_q_heads + kvh * G) * D + e];
      }
      slots.sinks = a.sink_slots[seq];
      slots.q_sink = s_qsink;
    }
    slots.pool = a.pool + a.layer_offset_bytes;
    slots.block_stride_bytes = a.block_stride_bytes;
    slots.table = a.block_tables + static_cast<size_t>(seq) * a.max_blocks_per_seq;
    slots.key_offsets = a.key_offsets + static_cast<int64_t>(kvh) * a.block_size;
    slots.key_offsets_block_stride = a.key_offsets_block_stride;
    slots.block_size = a.block_size;
    slots.kvh = kvh;
  }
  const int sink_slots = slots.sinks;
  if (tid < G) {
    s_m[tid] = -INFINITY;
    s_l[tid] = 0.f;
  }
  // TurboQuant's window split works in the original basis: the query as given (SplitArgs::query;
  // its sink rows' split: query_sink, the shifted one), its partial output rotated at the end.
  // Every other split: the prepared query.
  const bool tq_window = KIND == kKindTurbo && window_split;
  // One source and one factor (qprep * 1 is exact): the choice is made once, not per element.
  const float* q_src = tq_window ? (win_sink_rows ? a.query_sink : a.query) : a.qprep;
  const float q_mul = tq_window && !win_sink_rows ? a.query_scale : 1.f;
  float q[G][8], acc[G][8];
#pragma unroll
  for (int g = 0; g < G; ++g) {
    const size_t row = (static_cast<size_t>(seq) * a.num_q_heads + kvh * G + g) * D + 8 * lane;
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      if constexpr (KIND == kKindTurbo) {
        q[g][i] = q_src[row + i] * q_mul;
      } else {
        q[g][i] = a.qprep[row + i];
      }
      acc[g][i] = 0.f;
    }
  }
  float key_scale = 1.f, value_scale = 1.f;
  if constexpr (KIND == kKindFp8) {
    const float* hs = a.head_scales + (StateSlot(a, seq) * num_kv_heads + kvh) * 2;
    key_scale = hs[0];
    value_scale = hs[1];
  }
  const SoftmaxState st{s_scores, s_m, s_l, s_alpha};
  __syncthreads();

  if (split < a.num_splits) {
    const int enc = HeadEncoded(a, seq, kvh, num_kv_heads);
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
      slots.first = first_tok;
      slots.sinks = sink_slots - first_tok;
      ComputeTile<KIND, D, G, kEvict>(smem + (t % kStages) * stage_bytes, ntok, fp, s_tables,
                                      key_scale, q, acc, st, slots);
    }
    CpAsyncWait<0>();
  } else if constexpr (KIND == kKindKivi || KIND == kKindKiviEvict || KIND == kKindTurbo) {
    // The fp16 window (original basis) in tiles of fp16 records [k | v]; tile 0 was issued above.
    // KIVI under eviction: window rows below sink_slots are sinks too.
    const int win_first = kEvict ? HeadEncoded(a, seq, kvh, num_kv_heads) : 0;
    FormatParams half_fp = fp;
    half_fp.record_bytes = 4 * D;
    half_fp.key_bytes = 2 * D;
    const int tile_tokens = a.residual_tile_tokens;
    for (int t0 = win_begin; t0 < win_end; t0 += tile_tokens) {
      const int ntok = min(tile_tokens, win_end - t0);
      if (t0 > win_begin) {
        __syncthreads();  // every team is done with the previous tile
        StageWindow<D>(smem, win_k, win_v, t0, ntok);
        CpAsyncCommit();
      }
      CpAsyncWait<0>();
      __syncthreads();
      slots.sinks = sink_slots - (win_first + t0);
      ComputeTile<kKindFp16, D, G, kEvict>(smem, ntok, half_fp, s_tables, 1.f, q, acc, st, slots);
    }
  }
  GridDepLaunch();
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
  if (tq_window) {
    // sum_t p_t v_t in the original basis -> Rotate(.) = H (signs * .), the value domain of the
    // other splits (Rotate is linear, so this equals the CPU's sum of p_t Rotate(v_t)). The team
    // sums go in place into team 0's rows: entry idx is read and written by its thread only.
    for (int idx = tid; idx < G * D; idx += kThreads) {
      float sum = 0.f;
#pragma unroll
      for (int t = 0; t < kTeams; ++t) sum += red[t * G * D + idx];
      red[idx] = sum * a.signs[idx % D];
    }
    FwhtRows<D, G>(red);
    const float norm = rsqrtf(static_cast<float>(D));
    for (int idx = tid; idx < G * D; idx += kThreads) {
      a.part_acc[part * G * D + idx] = red[idx] * norm;
    }
  } else {
    for (int idx = tid; idx < G * D; idx += kThreads) {
      float sum = 0.f;
#pragma unroll
      for (int t = 0; t < kTeams; ++t) sum += red[t * G * D + idx];
      a.part_acc[part * G * D + idx] = sum;
    }
  }
  if (tid < G) {
    a.part_ml[(part * G + tid) * 2] = s_m[tid];
    a.part_ml[(part * G + tid) * 2 + 1] = s_l[tid];
  }
}

// In-place orthonormal Walsh-Hadamard transform of x[D] in shared memory; every thread of the
// block calls it (barriers), threads with active (c = channel < D) do the work.
template <int D>
__device__ void Fwht(float* x, bool active, int c) {
#pragma unroll
  for (int h = 1; h < D; h <<= 1) {
    __syncthreads();
    if (active && (c & h) == 0) {
      const float a = x[c], b = x[c + h];
      x[c] = a + b;
      x[c + h] = a - b;
    }
  }
  __syncthreads();
  if (active) x[c] *= rsqrtf(static_cast<float>(D));
  __syncthreads();
}

// grid [num_q_heads, num_seqs], D threads: qprep = (rotated) q * scale * log2(e). With sinks
// (qprep_sink non-null) also qprep_sink = the query rotated back by sink_shift[seq] RoPE
// positions (CpuKvCache's ShiftRope, angles -shift * inv_freq[j] in double, rotate-half pairs
// (j, j + D/2)), times scale * log2(e). ROTATED_SINKS (TurboQuant with sinks: signs non-null):
// qprep_sink is the shifted query rotated by the signs and Walsh-Hadamard like qprep
// (CpuKvCache's PrepareShifted), and query_sink (non-null: TurboQuant's window splits) the
// shifted query before that rotation; the instance without it is the kernel sinks never reach.
template <int D, bool ROTATED_SINKS>
__global__ void PrepareQueryKernel(const float* q, float* qprep, const float* signs,
                                   int num_q_heads, float scale, const int32_t* sink_shift,
                                   const double* inv_freq, float* qprep_sink, float* query_sink) {
  __shared__ float x[D];
  GridDepLaunch();  // the split kernel may start its loads; it waits for qprep itself
  const size_t row = static_cast<size_t>(blockIdx.y) * num_q_heads + blockIdx.x;
  const int c = threadIdx.x;
  float v = q[row * D + c];
  if (qprep_sink != nullptr) {
    constexpr int kHalf = D / 2;
    const float partner = q[row * D + (c < kHalf ? c + kHalf : c - kHalf)];
    double sn, cs;
    sincos(-static_cast<double>(sink_shift[blockIdx.y]) * inv_freq[c % kHalf], &sn, &cs);
    const float cf = static_cast<float>(cs), sf = static_cast<float>(sn);
    const float shifted = c < kHalf ? v * cf - partner * sf : v * cf + partner * sf;
    if constexpr (ROTATED_SINKS) {
      if (query_sink != nullptr) query_sink[row * D + c] = shifted * scale * kLog2e;
      x[c] = shifted * signs[c];
      Fwht<D>(x, true, c);  // ends with a barrier: x is free for the plain query below
      qprep_sink[row * D + c] = x[c] * scale * kLog2e;
    } else {
      qprep_sink[row * D + c] = shifted * scale * kLog2e;
    }
  }
  if (signs != nullptr) {
    x[c] = v * signs[c];
    Fwht<D>(x, true, c);
    v = x[c];
  }
  qprep[row * D + c] = v * scale * kLog2e;
}

constexpr int kReduceParts = 4;  // split groups per output row in ReduceSplitsKernel

// Block-wide reduction of one float (max or sum) over all threads of the block; every thread
// gets the result.
template <bool MAX>
__device__ float BlockReduce(float v, float* scratch) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    const float o = __shfl_xor_sync(0xffffffffu, v, off);
    v = MAX ? fmaxf(v, o) : v + o;
  }
  const int warp = threadIdx.x / 32, warps = blockDim.x / 32;
  __syncthreads();
  if (threadIdx.x % 32 == 0) scratch[warp] = v;
  __syncthreads();
  v = scratch[0];
  for (int w = 1; w < warps; ++w) v = MAX ? fmaxf(v, scratch[w]) : v + scratch[w];
  return v;
}

// grid [num_q_heads, num_seqs], kReduceParts * D threads. The splits' weights exp2(m_s - M) are
// computed once (in parallel over splits) into shared memory; each of the kReduceParts groups of
// D threads sums every kReduceParts-th split for its channel (many loads in flight), and the
// groups are added. total_splits <= kMaxReduceSplits.
template <int D>
__global__ void __launch_bounds__(kReduceParts* D)
    ReduceSplitsKernel(const float* part_acc, const float* part_ml, float* out, const float* signs,
                       int num_q_heads, int num_kv_heads, int total_splits) {
  __shared__ float s_w[kMaxReduceSplits];
  __shared__ float s_num[kReduceParts][D];
  __shared__ float scratch[kReduceParts * D / 32];
  const int qh = blockIdx.x, seq = blockIdx.y, tid = threadIdx.x;
  const int group = num_q_heads / num_kv_heads, kvh = qh / group, g = qh % group;
  GridDepWait();  // the split kernels' partials
  const size_t base = (static_cast<size_t>(seq) * num_kv_heads + kvh) * total_splits;
  float m = -INFINITY;
  for (int s = tid; s < total_splits; s += kReduceParts * D) {
    m = fmaxf(m, part_ml[((base + s) * group + g) * 2]);
  }
  m = BlockReduce<true>(m, scratch);
  float den = 0.f;
  for (int s = tid; s < total_splits; s += kReduceParts * D) {
    const float ms = part_ml[((base + s) * group + g) * 2];
    const float w = (m == -INFINITY || ms == -INFINITY) ? 0.f : exp2f(ms - m);
    s_w[s] = w;
    den += w * part_ml[((base + s) * group + g) * 2 + 1];
  }
  den = BlockReduce<false>(den, scratch);  // (its barriers also publish s_w)
  const int part = tid / D, c = tid % D;
  float num = 0.f;
#pragma unroll 8
  for (int s = part; s < total_splits; s += kReduceParts) {
    num += s_w[s] * part_acc[((base + s) * group + g) * D + c];
  }
  s_num[part][c] = num;
  __syncthreads();
  float v = 0.f;
  if (part == 0) {
#pragma unroll
    for (int p = 0; p < kReduceParts; ++p) v += s_num[p][c];
    v = den > 0.f ? v / den : 0.f;
  }
  if (signs != nullptr) {
    float* x = s_num[1];  // free after the sum above (every reader passed the barrier in Fwht)
    __syncthreads();
    if (part == 0) x[c] = v;
    Fwht<D>(x, part == 0, c);
    if (part == 0) v = x[c] * signs[c];
  }
  if (part == 0) out[(static_cast<size_t>(seq) * num_q_heads + qh) * D + c] = v;
}

// Launches kernel<<<grid, block, smem, stream>>>(args...) as a programmatic dependent of the
// stream's previous kernel (see GridDepWait).
template <class... Params, class... Args>
cudaError_t LaunchDependent(void (*kernel)(Params...), dim3 grid, dim3 block, int smem_bytes,
                            cudaStream_t stream, Args&&... args) {
  cudaLaunchConfig_t cfg{};
  cfg.gridDim = grid;
  cfg.blockDim = block;
  cfg.dynamicSmemBytes = static_cast<size_t>(smem_bytes);
  cfg.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  return cudaLaunchKernelEx(&cfg, kernel, std::forward<Args>(args)...);
}

template <int KIND, int D, int G>
cudaError_t LaunchSplit(const SplitArgs& a, const FormatParams& fp, dim3 grid, int smem_bytes,
                        cudaStream_t stream) {
  return LaunchDependent(DecodeSplitKernel<KIND, D, G>, grid, dim3(kThreads), smem_bytes, stream, a,
                         fp);
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
  if (d == 128)
    return DispatchG<KIND, 128>(setup, g, a, fp, grid, smem_bytes, stream, blocks_per_sm);
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
    case kKindKiviEvict:
      return DispatchD<kKindKiviEvict>(setup, d, g, a, fp, grid, smem_bytes, stream, blocks_per_sm);
    case kKindTurbo:
      return DispatchD<kKindTurbo>(setup, d, g, a, fp, grid, smem_bytes, stream, blocks_per_sm);
  }
  return cudaErrorInvalidValue;
}

// ---- v2/v3: tensor-core split kernel------------------------------------------------------------
//
// DecodeMmaKernel<FMT, D>: grid [splits, kv_heads, seqs], 128 threads (4 warps); the GQA group
// (G <= 8 query heads, zero-padded to 8) is the N dimension of mma.sync m16n8k16 (fp16 operands,
// bf16 for bf16 storage; fp32 accumulate). Tiles (64 or 128 tokens, whole blocks) arrive by bulk
// copies (one per block segment, on one mbarrier per stage), kStagesMma deep; each warp owns
// 16-token chunks of a tile and keeps its own online softmax, so the only barrier is the
// pipeline's one per tile. Per chunk and warp:
//   S^T[16 tok][8 heads] = K[16 tok][D] x Q^T      (D/16 mma; lane (g, t) holds the keys of
//                                                   tokens g and g+8 on its KeyChannel list; the
//                                                   k index is permuted, Q's fragment likewise)
//   per-token key factor (int8 scale, TurboQuant norm, FP8 head scale) on the scores
//   online softmax on the fragment (max: 3 shuffles per head pair; sums stay per lane)
//   P^T fragment = movmatrix.trans of the packed probabilities (x per-token value factor: the
//                  TurboQuant norm in fp16 after the transpose; the int8 scale in fp32 before
//                  it, with a power-of-two prescale, Int8Prescale)
//   O^T[D][8] += V^T[D][16 tok] x P^T              (D/16 mma; lane (g, t) holds the values of
//                                                   tokens 2t, 2t+1, 2t+8, 2t+9 on its
//                                                   ValueChannel list)
// int8 keys skip the decode: S comes from int8 mma (m16n8k32) of the stored codes with q in 16-bit
// fixed point (hi and lo int8 parts; QueryFixed4).
// Codes become fp16 in registers: fp8/int8 values exactly (cvt / 0x64XX magic), KIVI as
// code * scale + min (HFMA2; powers of two of the scale absorb the code's bit position),
// TurboQuant centroids by prmt lookups in tables held in registers (TurboTable).
// bf16: q and p are split into hi + lo bf16 parts (two mma each) so the result keeps fp32-level
// accuracy. At the end the 4 warps' (m, l, O) merge through shared memory into the v1 partial
// format (part_acc [G][D] unnormalised, part_ml (m, l)), so ReduceSplitsKernel is shared.
constexpr int kStagesMma = 3;

// Format ids of the v2 kernel: the kinds above, KIVI by bits, TurboQuant by (key = value) rate.
enum : int {
  kMmaKivi2 = 12,
  kMmaKivi4 = 14,
  kMmaTq4 = 20,   // 4 bits everywhere
  kMmaTq35 = 21,  // d/2 at 4 bits + d/2 at 3
  kMmaTq3 = 22,   // 3 bits everywhere
  kMmaTq25 = 23,  // d/4 at 3 bits + 3d/4 at 2
};

// Layout constants per format id. The family-specific ones are functions, so that an instance
// of another family does not instantiate (and nvcc does not flag) them.
template <int FMT>
struct MmaFmt {
  static constexpr bool kKivi = FMT == kMmaKivi2 || FMT == kMmaKivi4;
  static constexpr bool kTurbo = FMT >= kMmaTq4 && FMT <= kMmaTq25;
  static constexpr int KiviBits() { return FMT == kMmaKivi2 ? 2 : 4; }
  static constexpr int HiBits() { return FMT == kMmaTq3 || FMT == kMmaTq25 ? 3 : 4; }
  static constexpr int LoBits() {
    return FMT == kMmaTq35 || FMT == kMmaTq3 ? 3 : FMT == kMmaTq25 ? 2 : 4;
  }
  // hi = D / kHiDiv channels at HiBits(), the rest at LoBits() (1: all channels, other formats)
  static constexpr int kHiDiv = FMT == kMmaTq35 ? 2 : FMT == kMmaTq25 ? 4 : 1;
};

template <bool BF>
__device__ __forceinline__ void Mma16816(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2,
                                         uint32_t a3, uint32_t b0, uint32_t b1) {
  if constexpr (BF) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  }
}

// d += A B with int8 operands and int32 accumulators (exact).
__device__ __forceinline__ void Imma16832(int (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2,
                                          uint32_t a3, uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// int8 keys: Q K^T on the integer tensor cores, straight from the stored codes (no decode). The
// prepared query of each head is quantized to 16-bit fixed point, q ~ unit * (256 hi + lo) with
// unit = max|q| / kQueryFixedMax and hi, lo int8 (|q - unit (256 hi + lo)| <= unit / 2 =
// 1.5e-5 max|q|: finer than fp16's 2^-12 relative for every entry above 6% of max|q|), and
// S = unit * (256 K hi^T + K lo^T): two int8 mma per 32 channels, exact int32 sums.
constexpr float kQueryFixedMax = 127.f * 256.f;

// 4 consecutive query entries -> their packed (hi, lo) int8 words.
__device__ __forceinline__ void QueryFixed4(const float* v, float inv_unit, uint32_t& hi,
                                            uint32_t& lo) {
  hi = lo = 0;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int q =
        static_cast<int>(fminf(fmaxf(rintf(v[i] * inv_unit), -kQueryFixedMax), kQueryFixedMax));
    const int h = (q + 128) >> 8;  // floor((q + 128) / 256): h in [-127, 127], l in [-128, 127]
    const int l = q - 256 * h;
    hi |= (static_cast<uint32_t>(h) & 0xFFu) << (8 * i);
    lo |= (static_cast<uint32_t>(l) & 0xFFu) << (8 * i);
  }
}

// 2^x, flushing subnormal results to 0 (a single MUFU; exp2f adds a subnormal range fix-up).
// Probabilities under 2^-126 add nothing an fp32 sum of terms <= 1 could keep.
__device__ __forceinline__ float Exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

__device__ __forceinline__ uint32_t MovTrans(uint32_t x) {
  uint32_t y;
  asm volatile("movmatrix.sync.aligned.m8n8.trans.b16 %0, %1;\n" : "=r"(y) : "r"(x));
  return y;
}

__device__ __forceinline__ uint32_t PackHalf2(float lo, float hi) {
  const __half2 h = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&h);
}

// bf16 pair of (lo, hi) rounded to nearest, and the pair of residuals x - bf16(x).
__device__ __forceinline__ uint32_t PackBf162(float lo, float hi, float* rlo, float* rhi) {
  const __nv_bfloat162 b = __floats2bfloat162_rn(lo, hi);
  const float2 f = __bfloat1622float2(b);
  *rlo = lo - f.x;
  *rhi = hi - f.y;
  return *reinterpret_cast<const uint32_t*>(&b);
}
__device__ __forceinline__ uint32_t PackBf162(float lo, float hi) {
  const __nv_bfloat162 b = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&b);
}

__device__ __forceinline__ uint32_t HalfSub2(uint32_t x, uint32_t y) {
  __half2 r = __hsub2(*reinterpret_cast<const __half2*>(&x), *reinterpret_cast<const __half2*>(&y));
  return *reinterpret_cast<const uint32_t*>(&r);
}
__device__ __forceinline__ uint32_t HalfMul2(uint32_t x, uint32_t y) {
  __half2 r = __hmul2(*reinterpret_cast<const __half2*>(&x), *reinterpret_cast<const __half2*>(&y));
  return *reinterpret_cast<const uint32_t*>(&r);
}
__device__ __forceinline__ uint32_t HalfFma2(uint32_t x, uint32_t y, uint32_t z) {
  __half2 r = __hfma2(*reinterpret_cast<const __half2*>(&x), *reinterpret_cast<const __half2*>(&y),
                      *reinterpret_cast<const __half2*>(&z));
  return *reinterpret_cast<const uint32_t*>(&r);
}

// 4 fp8 E4M3 (one word) -> 2 half2 (exact).
__device__ __forceinline__ void Fp8x4ToHalf2(uint32_t w, uint32_t& lo, uint32_t& hi) {
  const __half2_raw a =
      __nv_cvt_fp8x2_to_halfraw2(static_cast<__nv_fp8x2_storage_t>(w & 0xFFFFu), __NV_E4M3);
  const __half2_raw b =
      __nv_cvt_fp8x2_to_halfraw2(static_cast<__nv_fp8x2_storage_t>(w >> 16), __NV_E4M3);
  lo = static_cast<uint32_t>(a.x) | (static_cast<uint32_t>(a.y) << 16);
  hi = static_cast<uint32_t>(b.x) | (static_cast<uint32_t>(b.y) << 16);
}

// 4 int8 (one word) -> 2 half2 (exact): fp16 0x64XX is 1024 + XX; bias the byte by 128.
__device__ __forceinline__ void Int8x4ToHalf2(uint32_t w, uint32_t& lo, uint32_t& hi) {
  const uint32_t u = w ^ 0x80808080u;
  constexpr uint32_t k1152 = 0x64806480u;  // half2(1152, 1152)
  lo = HalfSub2(__byte_perm(u, 0x64646464u, 0x4140), k1152);
  hi = HalfSub2(__byte_perm(u, 0x64646464u, 0x4342), k1152);
}

// N little-endian words starting at p (2-byte aligned at least). Pointer arithmetic only (no
// integer round trip), so that shared-memory pointers stay LDS and do not become generic loads.
template <int N>
__device__ __forceinline__ void LoadWords(const uint8_t* p, uint32_t (&w)[N]) {
  const uintptr_t a = reinterpret_cast<uintptr_t>(p);
  if ((a & 3) == 0) {
    const uint32_t* q = reinterpret_cast<const uint32_t*>(p);
#pragma unroll
    for (int i = 0; i < N; ++i) w[i] = q[i];
  } else {
    const uint32_t* q = reinterpret_cast<const uint32_t*>(p - 2);
    uint32_t prev = q[0];
#pragma unroll
    for (int i = 0; i < N; ++i) {
      const uint32_t next = q[i + 1];
      w[i] = __byte_perm(prev, next, 0x5432);
      prev = next;
    }
  }
}

// ---- TurboQuant codes -> fp16 without table loads ----
// A centroid table of up to 8 fp16 entries lives in 4 registers as byte planes (TurboTable: lo
// bytes of entries 0-3, 4-7, hi bytes of 0-3, 4-7), so that one `prmt` looks up 4 codes' lo (or
// hi) bytes with a selector of 4 nibbles, and two more interleave them into 2 half2. 4-bit codes
// use the symmetric Lloyd-Max table (level[c] = -level[15 - c]): a 3-bit magnitude index into the
// positive half and the sign from the code's top bit. 2- and 3-bit codes are first spread to one
// nibble each. Codes come out in their stored order, pair j = codes (2j, 2j + 1).
struct TurboTable {
  uint32_t p[4];
};

// Table of `n` (<= 8) entries of `levels` as byte planes.
__device__ __forceinline__ TurboTable MakeTurboTable(const float* levels, int n) {
  TurboTable t{};
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    const uint32_t h = i < n ? __half_as_ushort(__float2half_rn(levels[i])) : 0u;
    t.p[i / 4] |= (h & 0xFFu) << (8 * (i % 4));
    t.p[2 + i / 4] |= (h >> 8) << (8 * (i % 4));
  }
  return t;
}

// NP (1, 2 or 4) half2 of table[nibble j of sel] for codes 0 .. 2 NP - 1 (bit 3 of every nibble
// clear). kSigned: bit 7 of byte k of sign_lo (codes 0-3) / sign_hi (codes 4-7) flips code k's
// sign.
template <int NP, bool kSigned>
__device__ __forceinline__ void TurboLookup(uint32_t sel, const TurboTable& tb, uint32_t sign_lo,
                                            uint32_t sign_hi, uint32_t* out) {
  uint32_t lo = __byte_perm(tb.p[0], tb.p[1], sel);
  uint32_t hi = __byte_perm(tb.p[2], tb.p[3], sel);
  if constexpr (kSigned) hi ^= sign_lo & 0x80808080u;
  out[0] = __byte_perm(lo, hi, 0x5140);
  if constexpr (NP >= 2) out[1] = __byte_perm(lo, hi, 0x7362);
  if constexpr (NP == 4) {
    const uint32_t sel_hi = sel >> 16;
    lo = __byte_perm(tb.p[0], tb.p[1], sel_hi);
    hi = __byte_perm(tb.p[2], tb.p[3], sel_hi);
    if constexpr (kSigned) hi ^= sign_hi & 0x80808080u;
    out[2] = __byte_perm(lo, hi, 0x5140);
    out[3] = __byte_perm(lo, hi, 0x7362);
  }
}

// The 2 NP codes (NP = 1, 2 or 4) of B bits at the low end of x -> NP half2 of their centroids.
template <int B, int NP>
__device__ __forceinline__ void TurboDecode8(uint32_t x, const TurboTable& tb, uint32_t* out) {
  if constexpr (B == 4) {
    // c >= 8: +table[c - 8]; c < 8: -table[7 - c]. neg marks bit 3 of the nibbles with c < 8.
    const uint32_t neg = ~x & 0x88888888u;
    const uint32_t idx = (x ^ (neg - (neg >> 3))) & 0x77777777u;
    // Bit 7 of byte k = neg bit of code k: codes 0, 2 from neg << 4, codes 1, 3 from neg.
    const uint32_t neg4 = neg << 4;
    TurboLookup<NP, true>(idx, tb, __byte_perm(neg, neg4, 0x1504), __byte_perm(neg, neg4, 0x3726),
                          out);
  } else {
    uint32_t y;
    if constexpr (B == 3) {  // 8 x 3 bits -> 8 nibbles
      y = (x & 0xFFFu) | ((x << 4) & 0x0FFF0000u);
      y = (y & 0x003F003Fu) | ((y << 2) & 0x3F003F00u);
      y = (y & 0x07070707u) | ((y << 1) & 0x70707070u);
    } else {  // 8 x 2 bits -> 8 nibbles
      static_assert(B == 2, "TurboQuant codes of 2, 3 or 4 bits");
      y = (x & 0xFFu) | ((x << 8) & 0x00FF0000u);
      y = (y & 0x000F000Fu) | ((y << 4) & 0x0F000F00u);
      y = (y & 0x03030303u) | ((y << 2) & 0x30303030u);
    }
    TurboLookup<NP, false>(y, tb, 0u, 0u, out);
  }
}

// Where a lane's codes of one part start: 32-bit word index in the (4-byte aligned) record and
// the bit shift inside it. Loop-invariant per lane.
struct BitPos {
  int word, shift;
};
__device__ __forceinline__ BitPos MakeBitPos(int bit) { return BitPos{bit >> 5, bit & 31}; }

// Group K (8 codes, or the 2, 4 or 6 left) of the N codes held in 32-bit windows `win`, and the
// groups after it, -> half2 pairs from out[4 K] on.
template <int B, int N, int K = 0>
__device__ __forceinline__ void TurboGroups(const uint32_t* win, const TurboTable& tb,
                                            uint32_t* out) {
  if constexpr (8 * K < N) {
    constexpr int kWin = (N * B + 31) / 32, kBit = 8 * B * K, kWi = kBit / 32, kSh = kBit % 32;
    uint32_t x;
    if constexpr (kSh == 0) {
      x = win[kWi];
    } else if constexpr (kWi + 1 < kWin) {
      x = __funnelshift_r(win[kWi], win[kWi + 1], kSh);
    } else {
      x = win[kWi] >> kSh;
    }
    constexpr int kLeft = N - 8 * K;
    if constexpr (kLeft >= 8) {
      TurboDecode8<B, 4>(x, tb, out + 4 * K);
    } else if constexpr (kLeft == 6) {
      TurboDecode8<B, 2>(x, tb, out + 4 * K);
      TurboDecode8<B, 1>(x >> (4 * B), tb, out + 4 * K + 2);
    } else {
      TurboDecode8<B, kLeft / 2>(x, tb, out + 4 * K);
    }
    TurboGroups<B, N, K + 1>(win, tb, out);
  }
}

// N codes (N even) of B bits at `pos` of the record words `rw` -> N/2 half2. Loads the covering
// words (and one past the last: the shared buffers have slack), funnel-shifts them by the lane's
// shift into windows, then takes 8-code groups at compile-time offsets.
template <int B, int N>
__device__ __forceinline__ void TurboCodes(const uint32_t* rw, BitPos pos, const TurboTable& tb,
                                           uint32_t* out) {
  constexpr int kWin = (N * B + 31) / 32;
  uint32_t w[kWin + 1];
#pragma unroll
  for (int j = 0; j <= kWin; ++j) w[j] = rw[pos.word + j];
  uint32_t win[kWin];
#pragma unroll
  for (int j = 0; j < kWin; ++j) win[j] = __funnelshift_r(w[j], w[j + 1], pos.shift);
  TurboGroups<B, N>(win, tb, out);
}

// KIVI codes -> fp16 pairs. A lane's list of CH codes of B bits is read in units of U codes: a
// 32-bit word, or (CH * B = 16) 16 bits whose high byte is moved to bit 16. Pair k of a unit holds
// codes (k, k + U/2), which sit at the same bit position of the unit's two 16-bit halves, so one
// AND (after a byte shift) isolates both: position pos = k % (8 / B) inside a byte leaves each code
// multiplied by 2^(B pos), which the scale of the pair absorbs (KiviPairFactor); OR-ing 0x6400
// (fp16 1024) and subtracting 1024 gives the exact small integers.
template <int B, int CH>
struct KiviUnit {
  static constexpr int kCodes = 32 / B < CH ? 32 / B : CH;  // U
  static constexpr int kPairs = kCodes / 2;
  static constexpr int kPerByte = 8 / B;
};
// List offset (channel within the lane's CH) of entry m = 2 j + half.
template <int B, int CH>
__host__ __device__ constexpr int KiviListOffset(int m) {
  using U = KiviUnit<B, CH>;
  const int j = m / 2;
  return U::kCodes * (j / U::kPairs) + j % U::kPairs + (m % 2) * U::kPairs;
}
// half2 (f, f) with f = 2^-(B pos): divides a scale pair by pair j's position factor.
template <int B, int CH>
__device__ __forceinline__ uint32_t KiviPairFactor(int j) {
  using U = KiviUnit<B, CH>;
  const uint32_t pos = static_cast<uint32_t>((j % U::kPairs) % U::kPerByte);
  return 0x3C003C00u - pos * B * 0x04000400u;  // exponent of 1.0 minus B pos
}
template <int B, int CH>
__device__ __forceinline__ void KiviCodePairs(const uint32_t* units, uint32_t* out) {
  using U = KiviUnit<B, CH>;
  constexpr uint32_t kMask = ((1u << B) - 1) * 0x00010001u;
#pragma unroll
  for (int j = 0; j < CH / 2; ++j) {
    const int k = j % U::kPairs;
    const uint32_t w = units[j / U::kPairs] >> (8 * (k / U::kPerByte));
    const uint32_t x = (w & (kMask << (B * (k % U::kPerByte)))) | 0x64006400u;
    out[j] = HalfSub2(x, 0x64006400u);
  }
}

template <int FMT>
__device__ __forceinline__ int ChannelBytes() {
  return FMT == kKindFp16 || FMT == kKindBf16 ? 2 : 1;
}

// Word j (4 channels) of lane g's int8 value list: 32-bit word Int8ValueWord<D>(g, j) of the value
// codes (4-byte aligned, Int8Record). One load instruction reads word j of every lane, and the
// lanes of a warp read tokens 2t (+1, +8, +9) of records of 4 (D/2 + 1) bytes, so token 2t's words
// sit 2t banks further: a contiguous share per lane (words 4g + j at D = 128) would put lanes
// (g, t) and (g + 1, t - 2) on one bank. Interleaving the lanes' words in steps of 2 (lane g: the
// odd or even words, per g % 2, of an 8-word stretch, per g / 2) gives every lane its own bank at
// D = 128 (at D = 64 the 16 words cannot fill 32 banks; this halves the conflicts there).
template <int D>
__host__ __device__ constexpr int Int8ValueWord(int g, int j) {
  constexpr int kRun = D / 32 < 4 ? D / 32 : 4;  // words of a lane in one 8-word stretch
  return 32 * (j / kRun) + 2 * kRun * (g / 2) + g % 2 + 2 * (j % kRun);
}

// Channel of entry m of lane t's key list (KEY) or of lane g's value list: the lane's share of
// the hi channels [0, hi), then its share of [hi, D) (TurboQuant's split; other formats: hi = D,
// one contiguous share; int8 values: Int8ValueWord's words).
template <int FMT, int D, bool KEY>
__device__ __forceinline__ int ListChannel(int lane_part, int m) {
  constexpr int kLanes = KEY ? 4 : 8;
  if constexpr (FMT == kKindInt8 && !KEY) return 4 * Int8ValueWord<D>(lane_part, m / 4) + m % 4;
  if constexpr (MmaFmt<FMT>::kKivi) {  // KIVI: contiguous share, read in code pairs (KiviUnit)
    return lane_part * (D / kLanes) + KiviListOffset<MmaFmt<FMT>::KiviBits(), D / kLanes>(m);
  }
  constexpr int hi = D / MmaFmt<FMT>::kHiDiv, nhi = hi / kLanes, nlo = (D - hi) / kLanes;
  return m < nhi ? lane_part * nhi + m : hi + lane_part * nlo + (m - nhi);
}

// CH channels (the lane's list) of one key or value vector of a token -> CH/2 (b)f16x2.
// rec: the vector's first byte (key: record; value: record + key_bytes, int8: the value codes).
// part: t or g.
template <int FMT, int D, int CH, bool KEY>
__device__ __forceinline__ void LoadList(const uint8_t* rec, int part, const FormatParams& fp,
                                         uint32_t (&h)[CH / 2]) {
  static_assert(!MmaFmt<FMT>::kTurbo, "TurboQuant lists: TurboList");
  const uint8_t* p = rec + part * CH * ChannelBytes<FMT>();
  if constexpr (FMT == kKindFp16 || FMT == kKindBf16) {
#pragma unroll
    for (int j = 0; j < CH / 8; ++j) {
      const uint4 u = reinterpret_cast<const uint4*>(p)[j];
      h[4 * j] = u.x;
      h[4 * j + 1] = u.y;
      h[4 * j + 2] = u.z;
      h[4 * j + 3] = u.w;
    }
  } else if constexpr (FMT == kKindFp8) {
    if constexpr (CH % 16 == 0) {
#pragma unroll
      for (int j = 0; j < CH / 16; ++j) {
        const uint4 u = reinterpret_cast<const uint4*>(p)[j];
        Fp8x4ToHalf2(u.x, h[8 * j], h[8 * j + 1]);
        Fp8x4ToHalf2(u.y, h[8 * j + 2], h[8 * j + 3]);
        Fp8x4ToHalf2(u.z, h[8 * j + 4], h[8 * j + 5]);
        Fp8x4ToHalf2(u.w, h[8 * j + 6], h[8 * j + 7]);
      }
    } else {
      const uint2 u = *reinterpret_cast<const uint2*>(p);
      Fp8x4ToHalf2(u.x, h[0], h[1]);
      Fp8x4ToHalf2(u.y, h[2], h[3]);
    }
  } else if constexpr (FMT == kKindInt8) {
    // Values only (int8 keys go to the integer mma undecoded). Codes are 4-byte aligned
    // (Int8Record): one LDS.32 per 4 codes, no realignment.
    static_assert(!KEY, "int8 keys: Imma16832");
    const uint32_t* words = reinterpret_cast<const uint32_t*>(rec);
#pragma unroll
    for (int j = 0; j < CH / 4; ++j) {
      Int8x4ToHalf2(words[Int8ValueWord<D>(part, j)], h[2 * j], h[2 * j + 1]);
    }
  } else if constexpr (MmaFmt<FMT>::kKivi) {
    constexpr int B = MmaFmt<FMT>::KiviBits();
    uint32_t w[(CH * B + 31) / 32];
    const uint8_t* c = rec + part * CH * B / 8;
    if constexpr (CH * B >= 32) {
      LoadWords<CH * B / 32>(c, w);
    } else {  // 16 bits: high byte to bit 16 (KiviUnit)
      const uint32_t u = *reinterpret_cast<const uint16_t*>(c);
      w[0] = (u & 0xFFu) | ((u & 0xFF00u) << 8);
    }
    KiviCodePairs<B, CH>(w, h);
  }
}

// Where a lane's TurboQuant codes start in a record: its share of the hi-bit channels and of the
// lo-bit channels of the key (KEY, lane part t of 4) or of the value (lane part g of 8).
struct TurboLane {
  BitPos hi, lo;
};
template <int FMT, int D, bool KEY>
__device__ __forceinline__ TurboLane MakeTurboLane(int part, int key_bytes) {
  using F = MmaFmt<FMT>;
  constexpr int kLanes = KEY ? 4 : 8;
  constexpr int hi = D / F::kHiDiv, nhi = hi / kLanes, nlo = (D - hi) / kLanes;
  const int base = KEY ? 0 : 8 * key_bytes;
  return TurboLane{MakeBitPos(base + part * nhi * F::HiBits()),
                   MakeBitPos(base + hi * F::HiBits() + part * nlo * F::LoBits())};
}

// The lane's CH-entry list (hi part, then lo part) of a TurboQuant record (4-byte aligned) ->
// CH/2 half2 of centroids.
template <int FMT, int D, int CH, bool KEY>
__device__ __forceinline__ void TurboList(const uint8_t* rec, const TurboLane& lane,
                                          const TurboTable& hi_table, const TurboTable& lo_table,
                                          uint32_t (&h)[CH / 2]) {
  using F = MmaFmt<FMT>;
  constexpr int kLanes = KEY ? 4 : 8;
  constexpr int hi = D / F::kHiDiv, nhi = hi / kLanes, nlo = (D - hi) / kLanes;
  static_assert(nhi + nlo == CH && nhi % 2 == 0 && nlo % 2 == 0, "TurboQuant lane split");
  const uint32_t* rw = reinterpret_cast<const uint32_t*>(rec);
  if constexpr (nhi > 0) TurboCodes<F::HiBits(), nhi>(rw, lane.hi, hi_table, h);
  if constexpr (nlo > 0) TurboCodes<F::LoBits(), nlo>(rw, lane.lo, lo_table, h + nhi / 2);
}

// Per-token factor of a key / value vector (TurboQuant norm; 1 otherwise).
template <int FMT, int D, bool KEY>
__device__ __forceinline__ float TokenFactor(const uint8_t* vec, const FormatParams& fp) {
  if constexpr (MmaFmt<FMT>::kTurbo) {
    return LoadHalfF(vec + (KEY ? fp.tq_key_code_bytes : fp.tq_value_code_bytes));
  }
  return 1.f;
}

// int8 value scales fold into P in fp32, times a per-warp power of two `pre` chosen so that the
// largest scale seen times pre is in [2^14, 2^15): every p x scale x pre (p <= 1) is then an fp16
// below 2^15 (no overflow) and normal unless it is under 2^-28 of the largest term, so the fp16
// rounding of the folded probability is 2^-11 relative like fp16's p. The warp lowers pre (and
// rescales its accumulators by the exact power-of-two ratio) when a larger scale arrives, as the
// online softmax does with its max; the accumulators are divided by pre at the end.
constexpr float kInt8PreInit = 0x1p38f;  // fits the smallest fp16 scale, 2^-24
__device__ __forceinline__ float Int8Prescale(float max_scale) {
  // 2^(14 - floor(log2 max_scale)) from the exponent bits (max_scale in [2^-24, 65504]).
  return __uint_as_float((268u - (__float_as_uint(max_scale) >> 23)) << 23);
}

template <int FMT, int D>
__global__ void __launch_bounds__(kThreads) DecodeMmaKernel(SplitArgs a, FormatParams fp, int G) {
  using F = MmaFmt<FMT>;
  constexpr bool kBf = FMT == kKindBf16;
  constexpr int kKeySteps = D / 16;  // k-steps of Q K^T
  constexpr int kKeyCh = D / 4;      // key channels per lane
  constexpr int kValTiles = D / 16;  // m-tiles of V^T P^T
  constexpr int kValCh = D / 8;      // value channels per lane
  constexpr int kWarps = kThreads / 32;
  extern __shared__ __align__(16) uint8_t smem[];
  __shared__ __align__(8) uint64_t s_full[kStagesMma];  // stage s holds its tile (bulk copies)
  const int split = blockIdx.x, kvh = blockIdx.y, seq = blockIdx.z;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, g = lane / 4, t = lane % 4;
  const int num_kv_heads = gridDim.y;
  const int rb = fp.record_bytes, kb = fp.key_bytes;
  if (tid == 0) {
#pragma unroll
    for (int st = 0; st < kStagesMma; ++st) MbarInit(&s_full[st], 1);
    MbarInitFence();
  }
  // TurboQuant: centroid tables in registers (key and value rates are equal, so are the tables;
  // 4-bit: the 8 positive levels), and where this lane's codes start.
  TurboTable tq_hi{}, tq_lo{};
  TurboLane tq_key{}, tq_val{};
  if constexpr (F::kTurbo) {
    tq_hi = MakeTurboTable(fp.tables + (F::HiBits() == 4 ? 8 : 0),
                           F::HiBits() == 4 ? 8 : 1 << F::HiBits());
    tq_lo = MakeTurboTable(fp.tables + 16 + (F::LoBits() == 4 ? 8 : 0),
                           F::LoBits() == 4 ? 8 : 1 << F::LoBits());
    tq_key = MakeTurboLane<FMT, D, true>(t, kb);
    tq_val = MakeTurboLane<FMT, D, false>(g, kb);
  }

  float acc[kValTiles][4];
#pragma unroll
  for (int i = 0; i < kValTiles; ++i) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.f;
  float m0 = -INFINITY, m1 = -INFINITY, l0 = 0.f, l1 = 0.f;  // heads 2t, 2t+1
  float key_scale = 1.f, value_scale = 1.f;
  float int8_pre = kInt8PreInit;  // int8: power of two folded into P with the value scales
  if constexpr (FMT == kKindFp8) {
    const float* hs = a.head_scales + (StateSlot(a, seq) * num_kv_heads + kvh) * 2;
    key_scale = hs[0];
    value_scale = hs[1];
  }

  int enc = HeadEncoded(a, seq, kvh, num_kv_heads);
  const int bs = a.block_size;
  int b0 = split * a.blocks_per_split, span = a.blocks_per_split;
  // Attention sinks: the CTA at split num_splits scores slots [0, sinks) with the shifted query
  // (its blocks from the first), the block splits mask slots below `masked`.
  const float* qsrc = a.qprep;
  int masked = 0;
  if (a.sink_slots != nullptr) {
    const int sinks = min(a.sink_slots[seq], enc);
    if (split == a.num_splits) {
      enc = sinks;
      b0 = 0;
      span = (sinks + bs - 1) / bs;
      qsrc = a.qprep_sink;
    } else {
      masked = sinks;
    }
  }
  const int seq_blocks = (enc + bs - 1) / bs;
  const int b1 = min(b0 + span, seq_blocks);
  const int ntiles = b1 > b0 ? (b1 - b0 + a.tile_blocks - 1) / a.tile_blocks : 0;
  const int seg_bytes = bs * rb;
  const int stage_bytes = a.tile_blocks * seg_bytes;
  const int tile_tokens = a.tile_blocks * bs;
  const int32_t* table = a.block_tables + static_cast<size_t>(seq) * a.max_blocks_per_seq;
  // KIVI: key group of 2^lg_group tokens, cpt = D / group channels' metadata per record.
  const int lg_group = F::kKivi ? __ffs(fp.kivi_group) - 1 : 0;
  const int cpt = F::kKivi ? D >> lg_group : 1;
  const int lg_cpt = __ffs(cpt) - 1;
  const int kivi_meta_words = F::kKivi ? (tile_tokens >> lg_group) * D : 0;
  uint32_t* kivi_meta = reinterpret_cast<uint32_t*>(smem + kStagesMma * stage_bytes + 16);
  const int kivi_vgroup = F::kKivi ? (g * kValCh) >> lg_group : 0;  // value channel group
  // Tiles arrive by bulk copies, one per block segment: lane b of warp 0 copies block b of a
  // tile, lane 0 arms the stage's mbarrier with the tile's bytes. The block-table entries of the
  // next tile to issue are loaded one tile ahead, so the issuing warp never waits on them.
  const int64_t seg_offset = a.layer_offset_bytes + static_cast<int64_t>(kvh) * seg_bytes;
  auto table_entry = [&](int tt) {
    const int b = b0 + tt * a.tile_blocks + lane;
    return tt < ntiles && lane < a.tile_blocks && b < b1 ? table[b] : 0;
  };
  auto issue_tile = [&](int tt, int entry) {
    const int st = tt % kStagesMma;
    const int nb = min(a.tile_blocks, b1 - (b0 + tt * a.tile_blocks));
    if (lane == 0) MbarArriveExpectTx(&s_full[st], static_cast<uint32_t>(nb * seg_bytes));
    if (lane < nb) {
      BulkCopy(smem + st * stage_bytes + lane * seg_bytes,
               a.pool + static_cast<int64_t>(entry) * a.block_stride_bytes + seg_offset,
               static_cast<uint32_t>(seg_bytes), &s_full[st]);
    }
  };
  __syncthreads();  // mbarriers initialized
  int next_entry = 0;
  if (warp == 0) {
#pragma unroll
    for (int st = 0; st < kStagesMma - 1; ++st) {
      if (st < ntiles) issue_tile(st, table_entry(st));
    }
    next_entry = table_entry(kStagesMma - 1);
  }
  GridDepWait();  // qprep (PrepareQueryKernel); the first tiles are already on their way
  // Q fragments: head g (zero beyond G); pair j of k-step s = list entries 4s + 2j, 4s + 2j + 1.
  // int8: the int8 mma's B fragments instead, k-step s (32 channels) = words 2s, 2s + 1 of the
  // lane's key list (channels t D/4 + 8s + [0, 8)), hi and lo parts (QueryFixed4).
  constexpr bool kInt8 = FMT == kKindInt8;
  constexpr int kInt8Steps = D / 32;
  uint32_t qf[kInt8 ? 1 : kKeySteps][2];
  uint32_t qf_lo[kBf ? kKeySteps : 1][2];
  uint32_t qi_hi[kInt8 ? kInt8Steps : 1][2], qi_lo[kInt8 ? kInt8Steps : 1][2];
  float q_unit0 = 0.f, q_unit1 = 0.f;  // int8: the fixed-point unit of heads 2t, 2t + 1
  const float* qp = qsrc + (static_cast<size_t>(seq) * a.num_q_heads + kvh * G + min(g, G - 1)) * D;
  if constexpr (kInt8) {
    float v[kKeyCh];
    float mx = 0.f;
#pragma unroll
    for (int j = 0; j < kKeyCh / 4; ++j) {
      const float4 x = g < G ? reinterpret_cast<const float4*>(qp + t * kKeyCh)[j]
                             : make_float4(0.f, 0.f, 0.f, 0.f);
      v[4 * j] = x.x;
      v[4 * j + 1] = x.y;
      v[4 * j + 2] = x.z;
      v[4 * j + 3] = x.w;
      mx = fmaxf(mx, fmaxf(fmaxf(fabsf(x.x), fabsf(x.y)), fmaxf(fabsf(x.z), fabsf(x.w))));
    }
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));  // the head's 4 lanes
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
    const float inv_unit = mx > 0.f ? kQueryFixedMax / mx : 0.f;
#pragma unroll
    for (int st = 0; st < kInt8Steps; ++st) {
      QueryFixed4(v + 8 * st, inv_unit, qi_hi[st][0], qi_lo[st][0]);
      QueryFixed4(v + 8 * st + 4, inv_unit, qi_hi[st][1], qi_lo[st][1]);
    }
    const float unit = mx / kQueryFixedMax;
    q_unit0 = __shfl_sync(0xffffffffu, unit, 8 * t);  // lane (g = 2t, 0)
    q_unit1 = __shfl_sync(0xffffffffu, unit, 8 * t + 4);
  } else {
#pragma unroll
    for (int s = 0; s < kKeySteps; ++s) {
      // Entries 4s .. 4s + 3 of the lane's key list (not consecutive channels for KIVI's pairs).
      float4 v;
      v.x = qp[ListChannel<FMT, D, true>(t, 4 * s)];
      v.y = qp[ListChannel<FMT, D, true>(t, 4 * s + 1)];
      v.z = qp[ListChannel<FMT, D, true>(t, 4 * s + 2)];
      v.w = qp[ListChannel<FMT, D, true>(t, 4 * s + 3)];
      if constexpr (kBf) {
        float r[4];
        qf[s][0] = g < G ? PackBf162(v.x, v.y, &r[0], &r[1]) : 0u;
        qf[s][1] = g < G ? PackBf162(v.z, v.w, &r[2], &r[3]) : 0u;
        qf_lo[s][0] = g < G ? PackBf162(r[0], r[1]) : 0u;
        qf_lo[s][1] = g < G ? PackBf162(r[2], r[3]) : 0u;
      } else {
        qf[s][0] = g < G ? PackHalf2(v.x, v.y) : 0u;
        qf[s][1] = g < G ? PackHalf2(v.z, v.w) : 0u;
      }
    }
  }
  for (int tt = 0; tt < ntiles; ++tt) {
    MbarWait(&s_full[tt % kStagesMma], static_cast<uint32_t>(tt / kStagesMma) & 1u);
    __syncthreads();  // every warp is done with tile tt - 1, whose stage the next issue refills
    if (warp == 0 && tt + kStagesMma - 1 < ntiles) {
      issue_tile(tt + kStagesMma - 1, next_entry);
      next_entry = table_entry(tt + kStagesMma);
    }
    const uint8_t* tile = smem + (tt % kStagesMma) * stage_bytes;
    const int tile_first = (b0 + tt * a.tile_blocks) * bs;
    const int ntok = min(tile_tokens, enc - tile_first);
    const int skip = masked - tile_first;  // leading tokens of the tile that are sinks (<= 0: none)
    if constexpr (F::kKivi) {
      // Stage the tile's key-group metadata in the order of the lanes' key pairs (lane t's pair j
      // at t * kKeyCh / 2 + j): [group][D/2] (scale, scale) of the pair's two channels divided by
      // its code position factor, then [D/2] (min, min). Double-buffered: one extra barrier.
      uint32_t* meta = kivi_meta + (tt & 1) * kivi_meta_words;
      const int groups = (ntok + (1 << lg_group) - 1) >> lg_group;
      for (int idx = tid; idx < groups * (D / 2); idx += kThreads) {
        const int gi = idx / (D / 2), pr = idx % (D / 2);
        const int lt = pr / (kKeyCh / 2), j = pr % (kKeyCh / 2);
        const int c_lo = ListChannel<FMT, D, true>(lt, 2 * j);
        const int c_hi = ListChannel<FMT, D, true>(lt, 2 * j + 1);
        const uint8_t* base = tile + (gi << lg_group) * rb + fp.kivi_codes_bytes;
        const uint32_t w0 = *reinterpret_cast<const uint32_t*>(base + (c_lo >> lg_cpt) * rb +
                                                               4 * (c_lo & (cpt - 1)));
        const uint32_t w1 = *reinterpret_cast<const uint32_t*>(base + (c_hi >> lg_cpt) * rb +
                                                               4 * (c_hi & (cpt - 1)));
        meta[gi * D + pr] =
            HalfMul2(__byte_perm(w0, w1, 0x5410), KiviPairFactor<F::KiviBits(), kKeyCh>(j));
        meta[gi * D + D / 2 + pr] = __byte_perm(w0, w1, 0x7632);
      }
      __syncthreads();
    }
    for (int c0 = warp * 16; c0 < ntok; c0 += kWarps * 16) {
      const bool full = c0 + 16 <= ntok;
      // ---- scores S^T = K Q^T ----
      const uint8_t* rec_g = tile + (c0 + g) * rb;
      const uint8_t* rec_g8 = tile + (c0 + g + 8) * rb;
      float s[4] = {0.f, 0.f, 0.f, 0.f};
      if constexpr (kInt8) {
        // Codes 4-byte aligned (Int8Record): the A fragments are the stored words.
        const uint32_t* kg =
            reinterpret_cast<const uint32_t*>(rec_g + Int8Record::KeyCodes(D)) + t * (kKeyCh / 4);
        const uint32_t* kg8 =
            reinterpret_cast<const uint32_t*>(rec_g8 + Int8Record::KeyCodes(D)) + t * (kKeyCh / 4);
        int hi[4] = {0, 0, 0, 0}, lo[4] = {0, 0, 0, 0};
#pragma unroll
        for (int st = 0; st < kInt8Steps; ++st) {
          const uint32_t a0 = kg[2 * st], a1 = kg8[2 * st];
          const uint32_t a2 = kg[2 * st + 1], a3 = kg8[2 * st + 1];
          Imma16832(hi, a0, a1, a2, a3, qi_hi[st][0], qi_hi[st][1]);
          Imma16832(lo, a0, a1, a2, a3, qi_lo[st][0], qi_lo[st][1]);
        }
        // |256 hi + lo| <= 2^15 * 127 * D: exact in int32; one rounding to fp32.
        s[0] = static_cast<float>(256 * hi[0] + lo[0]) * q_unit0;
        s[1] = static_cast<float>(256 * hi[1] + lo[1]) * q_unit1;
        s[2] = static_cast<float>(256 * hi[2] + lo[2]) * q_unit0;
        s[3] = static_cast<float>(256 * hi[3] + lo[3]) * q_unit1;
      } else {
        uint32_t ka[kKeyCh / 2], kc[kKeyCh / 2];
        if constexpr (F::kTurbo) {
          TurboList<FMT, D, kKeyCh, true>(rec_g, tq_key, tq_hi, tq_lo, ka);
          TurboList<FMT, D, kKeyCh, true>(rec_g8, tq_key, tq_hi, tq_lo, kc);
        } else {
          LoadList<FMT, D, kKeyCh, true>(rec_g, t, fp, ka);
          LoadList<FMT, D, kKeyCh, true>(rec_g8, t, fp, kc);
        }
        if constexpr (F::kKivi) {
          // code * scale' + min per channel pair, from the tile's staged group metadata.
          const uint32_t* meta =
              kivi_meta + (tt & 1) * kivi_meta_words + (c0 >> lg_group) * D + t * (kKeyCh / 2);
#pragma unroll
          for (int q4 = 0; q4 < kKeyCh / 8; ++q4) {
            const uint4 sc = reinterpret_cast<const uint4*>(meta)[q4];
            const uint4 mn = reinterpret_cast<const uint4*>(meta + D / 2)[q4];
            const uint32_t scs[4] = {sc.x, sc.y, sc.z, sc.w}, mns[4] = {mn.x, mn.y, mn.z, mn.w};
#pragma unroll
            for (int k = 0; k < 4; ++k) {
              ka[4 * q4 + k] = HalfFma2(ka[4 * q4 + k], scs[k], mns[k]);
              kc[4 * q4 + k] = HalfFma2(kc[4 * q4 + k], scs[k], mns[k]);
            }
          }
        }
        // Two accumulator chains (even / odd k-steps) halve the dependent mma latency.
        float s_odd[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
        for (int st = 0; st < kKeySteps; ++st) {
          float(&sa)[4] = st % 2 ? s_odd : s;
          Mma16816<kBf>(sa, ka[2 * st], kc[2 * st], ka[2 * st + 1], kc[2 * st + 1], qf[st][0],
                        qf[st][1]);
          if constexpr (kBf) {
            Mma16816<kBf>(sa, ka[2 * st], kc[2 * st], ka[2 * st + 1], kc[2 * st + 1], qf_lo[st][0],
                          qf_lo[st][1]);
          }
        }
#pragma unroll
        for (int i = 0; i < 4; ++i) s[i] += s_odd[i];
      }
      float vs_g = 0.f, vs_g8 = 0.f;  // int8: value scales of tokens g, g + 8
      if constexpr (FMT == kKindFp8) {
#pragma unroll
        for (int i = 0; i < 4; ++i) s[i] *= key_scale;
      } else if constexpr (FMT == kKindInt8) {
        // Key and value scale of a token in one load (adjacent in Int8Record, key in the low half).
        const float2 sc_g =
            __half22float2(*reinterpret_cast<const __half2*>(rec_g + Int8Record::KeyScale(D)));
        const float2 sc_g8 =
            __half22float2(*reinterpret_cast<const __half2*>(rec_g8 + Int8Record::KeyScale(D)));
        s[0] *= sc_g.x;
        s[1] *= sc_g.x;
        s[2] *= sc_g8.x;
        s[3] *= sc_g8.x;
        vs_g = sc_g.y;
        vs_g8 = sc_g8.y;
      } else if constexpr (F::kTurbo) {
        const float sg = TokenFactor<FMT, D, true>(rec_g, fp);
        const float sg8 = TokenFactor<FMT, D, true>(rec_g8, fp);
        s[0] *= sg;
        s[1] *= sg;
        s[2] *= sg8;
        s[3] *= sg8;
      }
      if (!full || c0 < skip) {
        // Rows past the end hold stale or poisoned bytes (a NaN scale): no score, no scale.
        if (c0 + g >= ntok || c0 + g < skip) {
          s[0] = s[1] = -INFINITY;
          vs_g = 0.f;
        }
        if (c0 + g + 8 >= ntok || c0 + g + 8 < skip) {
          s[2] = s[3] = -INFINITY;
          vs_g8 = 0.f;
        }
      }
      if constexpr (FMT == kKindInt8) {
        // A scale above the prescale's range: lower it for the warp (the max over its 16 tokens;
        // lanes of one g hold the same tokens) and rescale the accumulators by the exact ratio.
        const float vmax = fmaxf(vs_g, vs_g8);
        if (__any_sync(0xffffffffu, vmax * int8_pre >= 0x1p15f)) {
          float mx = vmax;
#pragma unroll
          for (int off = 4; off < 32; off <<= 1) {
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, off));
          }
          const float pre = Int8Prescale(mx);
          const float ratio = pre / int8_pre;  // a power of two: exact
#pragma unroll
          for (int i = 0; i < kValTiles; ++i) {
#pragma unroll
            for (int k = 0; k < 4; ++k) acc[i][k] *= ratio;
          }
          int8_pre = pre;
        }
        vs_g *= int8_pre;
        vs_g8 *= int8_pre;
      }
      // ---- online softmax (heads 2t, 2t+1) ----
      // The running max moves only when a score of the chunk exceeds it, which gets rare after
      // the first chunks: one vote decides, and only then is the max taken over the warp's 16
      // tokens (shuffles) and the state rescaled. Every p stays <= 1.
      const float cm0 = fmaxf(s[0], s[2]), cm1 = fmaxf(s[1], s[3]);
      if (__any_sync(0xffffffffu, cm0 > m0 || cm1 > m1)) {
        float mx0 = cm0, mx1 = cm1;
#pragma unroll
        for (int off = 4; off < 32; off <<= 1) {
          mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, off));
          mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, off));
        }
        const float mn0 = fmaxf(m0, mx0), mn1 = fmaxf(m1, mx1);
        const float al0 = Exp2(m0 - (mn0 == -INFINITY ? 0.f : mn0));
        const float al1 = Exp2(m1 - (mn1 == -INFINITY ? 0.f : mn1));
        l0 *= al0;
        l1 *= al1;
#pragma unroll
        for (int i = 0; i < kValTiles; ++i) {
          acc[i][0] *= al0;
          acc[i][1] *= al1;
          acc[i][2] *= al0;
          acc[i][3] *= al1;
        }
        m0 = mn0;
        m1 = mn1;
      }
      const float mu0 = m0 == -INFINITY ? 0.f : m0, mu1 = m1 == -INFINITY ? 0.f : m1;
      float p0 = Exp2(s[0] - mu0), p1 = Exp2(s[1] - mu1);
      float p2 = Exp2(s[2] - mu0), p3 = Exp2(s[3] - mu1);
      l0 += p0 + p2;
      l1 += p1 + p3;
      // ---- O^T += V^T P^T ----
      // Rows past the end read the last valid token instead (finite data; its p is 0), which
      // masks garbage without touching the decoded registers.
      const int tv[4] = {2 * t, 2 * t + 1, 2 * t + 8, 2 * t + 9};
      uint32_t v[4][kValCh / 2];
      float vf[4];  // TurboQuant: per-token value factor (0 for tokens past the end)
#pragma unroll
      for (int r = 0; r < 4; ++r) {
        const bool valid = full || c0 + tv[r] < ntok;
        const int row = full ? c0 + tv[r] : min(c0 + tv[r], ntok - 1);
        const uint8_t* vec = tile + row * rb + (FMT == kKindInt8 ? Int8Record::ValueCodes(D) : kb);
        if constexpr (F::kTurbo) {
          TurboList<FMT, D, kValCh, false>(tile + row * rb, tq_val, tq_hi, tq_lo, v[r]);
        } else {
          LoadList<FMT, D, kValCh, false>(vec, g, fp, v[r]);
        }
        if constexpr (F::kKivi) {
          // The token's (scale, min) of this lane's channel group; the scale divided by each
          // pair's code position factor (KiviUnit::kPerByte distinct ones).
          using U = KiviUnit<F::KiviBits(), kValCh>;
          const uint32_t w =
              *reinterpret_cast<const uint32_t*>(vec + fp.kivi_codes_bytes + 4 * kivi_vgroup);
          const uint32_t sc = __byte_perm(w, w, 0x1010), mn = __byte_perm(w, w, 0x3232);
          uint32_t scp[U::kPerByte];
#pragma unroll
          for (int pos = 0; pos < U::kPerByte; ++pos) {
            scp[pos] = HalfMul2(sc, KiviPairFactor<F::KiviBits(), kValCh>(pos));
          }
#pragma unroll
          for (int j = 0; j < kValCh / 2; ++j) {
            v[r][j] = HalfFma2(v[r][j], scp[(j % U::kPairs) % U::kPerByte], mn);
          }
        }
        vf[r] = 1.f;
        if constexpr (F::kTurbo) vf[r] = valid ? TokenFactor<FMT, D, false>(vec, fp) : 0.f;
      }
      uint32_t pb0, pb1, pb0_lo = 0, pb1_lo = 0;
      if constexpr (kBf) {
        float r0, r1, r2, r3;
        pb0 = MovTrans(PackBf162(p0, p1, &r0, &r1));
        pb1 = MovTrans(PackBf162(p2, p3, &r2, &r3));
        pb0_lo = MovTrans(PackBf162(r0, r1));
        pb1_lo = MovTrans(PackBf162(r2, r3));
      } else if constexpr (FMT == kKindInt8) {
        // p x value scale x pre in fp32 on the token-major fragment (tokens g, g + 8), one
        // rounding to fp16 (Int8Prescale), then transposed.
        pb0 = MovTrans(PackHalf2(p0 * vs_g, p1 * vs_g));
        pb1 = MovTrans(PackHalf2(p2 * vs_g8, p3 * vs_g8));
      } else {
        pb0 = MovTrans(PackHalf2(p0, p1));  // P[tok 2t, 2t+1][head g]
        pb1 = MovTrans(PackHalf2(p2, p3));  // P[tok 2t+8, 2t+9][head g]
        if constexpr (F::kTurbo) {
          // Per-token value factors fold into P (p <= 1 times a norm, in fp16).
          pb0 = HalfMul2(pb0, PackHalf2(vf[0], vf[1]));
          pb1 = HalfMul2(pb1, PackHalf2(vf[2], vf[3]));
        }
      }
#pragma unroll
      for (int i = 0; i < kValTiles; ++i) {
        const uint32_t a0 = __byte_perm(v[0][i], v[1][i], 0x5410);
        const uint32_t a1 = __byte_perm(v[0][i], v[1][i], 0x7632);
        const uint32_t a2 = __byte_perm(v[2][i], v[3][i], 0x5410);
        const uint32_t a3 = __byte_perm(v[2][i], v[3][i], 0x7632);
        Mma16816<kBf>(acc[i], a0, a1, a2, a3, pb0, pb1);
        if constexpr (kBf) Mma16816<kBf>(acc[i], a0, a1, a2, a3, pb0_lo, pb1_lo);
      }
    }
  }
  GridDepLaunch();
  if constexpr (FMT == kKindInt8) {
    const float unscale = 1.f / int8_pre;  // a power of two: exact
#pragma unroll
    for (int i = 0; i < kValTiles; ++i) {
#pragma unroll
      for (int k = 0; k < 4; ++k) acc[i][k] *= unscale;
    }
  }
  // ---- merge the warps: (m, l, O) per head through shared memory ----
#pragma unroll
  for (int off = 4; off < 32; off <<= 1) {
    l0 += __shfl_xor_sync(0xffffffffu, l0, off);
    l1 += __shfl_xor_sync(0xffffffffu, l1, off);
  }
  __syncthreads();
  float* s_acc = reinterpret_cast<float*>(smem);  // [warps][8][D]
  float* s_ml = s_acc + kWarps * 8 * D;           // [warps][8][2]
#pragma unroll
  for (int i = 0; i < kValTiles; ++i) {
    const int ch0 = ListChannel<FMT, D, false>(g, 2 * i);
    const int ch1 = ListChannel<FMT, D, false>(g, 2 * i + 1);
    float* row0 = s_acc + (warp * 8 + 2 * t) * D;
    float* row1 = row0 + D;
    row0[ch0] = acc[i][0];
    row1[ch0] = acc[i][1];
    row0[ch1] = acc[i][2];
    row1[ch1] = acc[i][3];
  }
  if (g == 0) {
    s_ml[(warp * 8 + 2 * t) * 2] = m0;
    s_ml[(warp * 8 + 2 * t) * 2 + 1] = l0;
    s_ml[(warp * 8 + 2 * t + 1) * 2] = m1;
    s_ml[(warp * 8 + 2 * t + 1) * 2 + 1] = l1;
  }
  __syncthreads();
  const size_t part = (static_cast<size_t>(seq) * num_kv_heads + kvh) * a.total_splits + split;
  for (int idx = tid; idx < G * D; idx += kThreads) {
    const int h = idx / D, c = idx % D;
    float m = -INFINITY;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) m = fmaxf(m, s_ml[(w * 8 + h) * 2]);
    float sum = 0.f, l = 0.f;
    if (m != -INFINITY) {
#pragma unroll
      for (int w = 0; w < kWarps; ++w) {
        const float mw = s_ml[(w * 8 + h) * 2];
        const float wgt = mw == -INFINITY ? 0.f : exp2f(mw - m);
        sum += wgt * s_acc[(w * 8 + h) * D + c];
        l += wgt * s_ml[(w * 8 + h) * 2 + 1];
      }
    }
    a.part_acc[part * G * D + idx] = sum * value_scale;
    if (c == 0) {
      a.part_ml[(part * G + h) * 2] = m;
      a.part_ml[(part * G + h) * 2 + 1] = l;
    }
  }
}

template <int FMT, int D>
cudaError_t MmaOne(bool setup, const SplitArgs& a, const FormatParams& fp, int g, dim3 grid,
                   int smem_bytes, cudaStream_t stream, int* blocks_per_sm) {
  if (setup) {
    cudaError_t e = cudaFuncSetAttribute(DecodeMmaKernel<FMT, D>,
                                         cudaFuncAttributeMaxDynamicSharedMemorySize, smem_bytes);
    if (e != cudaSuccess) return e;
    return cudaOccupancyMaxActiveBlocksPerMultiprocessor(blocks_per_sm, DecodeMmaKernel<FMT, D>,
                                                         kThreads, smem_bytes);
  }
  return LaunchDependent(DecodeMmaKernel<FMT, D>, grid, dim3(kThreads), smem_bytes, stream, a, fp,
                         g);
}

template <int FMT>
cudaError_t DispatchMmaD(bool setup, int d, int g, const SplitArgs& a, const FormatParams& fp,
                         dim3 grid, int smem_bytes, cudaStream_t stream, int* blocks_per_sm) {
  if (d == 64) return MmaOne<FMT, 64>(setup, a, fp, g, grid, smem_bytes, stream, blocks_per_sm);
  if (d == 128) return MmaOne<FMT, 128>(setup, a, fp, g, grid, smem_bytes, stream, blocks_per_sm);
  return cudaErrorInvalidValue;
}

cudaError_t DispatchMma(bool setup, int fmt, int d, int g, const SplitArgs& a,
                        const FormatParams& fp, dim3 grid, int smem_bytes, cudaStream_t stream,
                        int* blocks_per_sm) {
#define KVGATE_MMA_CASE(F) \
  case F:                  \
    return DispatchMmaD<F>(setup, d, g, a, fp, grid, smem_bytes, stream, blocks_per_sm);
  switch (fmt) {
    KVGATE_MMA_CASE(kKindFp16)
    KVGATE_MMA_CASE(kKindBf16)
    KVGATE_MMA_CASE(kKindFp8)
    KVGATE_MMA_CASE(kKindInt8)
    KVGATE_MMA_CASE(kMmaKivi2)
    KVGATE_MMA_CASE(kMmaKivi4)
    KVGATE_MMA_CASE(kMmaTq4)
    KVGATE_MMA_CASE(kMmaTq35)
    KVGATE_MMA_CASE(kMmaTq3)
    KVGATE_MMA_CASE(kMmaTq25)
  }
#undef KVGATE_MMA_CASE
  return cudaErrorInvalidValue;
}

}  // namespace

int MaxStages() { return kStages; }
int MmaStages() { return kStagesMma; }
int ThreadsPerCta() { return kThreads; }

cudaError_t SetupSplitKernel(int kind, int d, int g, int smem_bytes, int* blocks_per_sm) {
  return Dispatch(true, kind, d, g, SplitArgs{}, FormatParams{}, dim3(), smem_bytes, nullptr,
                  blocks_per_sm);
}

cudaError_t SetupMmaKernel(int fmt, int d, int smem_bytes, int* blocks_per_sm) {
  return DispatchMma(true, fmt, d, 8, SplitArgs{}, FormatParams{}, dim3(), smem_bytes, nullptr,
                     blocks_per_sm);
}

cudaError_t LaunchDecode(int kind, int mma_fmt, int d, int g, const SplitArgs& a,
                         const FormatParams& fp, int num_kv_heads, int num_seqs, int smem_bytes,
                         int smem_v1_bytes, const float* q, float* out, const float* signs,
                         float scale, cudaStream_t stream) {
  const dim3 rows(a.num_q_heads, num_seqs);
  const bool rotated_sinks = signs != nullptr && a.qprep_sink != nullptr;
  auto prepare = [&](auto kernel, int threads) {
    kernel<<<rows, threads, 0, stream>>>(q, a.qprep, signs, a.num_q_heads, scale, a.sink_shift,
                                         a.rope_inv_freq, a.qprep_sink, a.query_sink);
  };
  if (d == 64) {
    if (rotated_sinks) {
      prepare(PrepareQueryKernel<64, true>, 64);
    } else {
      prepare(PrepareQueryKernel<64, false>, 64);
    }
  } else if (rotated_sinks) {
    prepare(PrepareQueryKernel<128, true>, 128);
  } else {
    prepare(PrepareQueryKernel<128, false>, 128);
  }
  cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess) return e;
  SplitArgs sa = a;
  sa.query = q;
  sa.query_scale = scale * kLog2e;
  sa.signs = signs;
  const dim3 grid(a.total_splits, num_kv_heads, num_seqs);
  if (mma_fmt < 0) {
    e = Dispatch(false, kind, d, g, sa, fp, grid, smem_bytes, stream, nullptr);
  } else {
    const int mma_splits = a.num_splits + (a.sink_slots != nullptr ? 1 : 0);
    e = DispatchMma(false, mma_fmt, d, g, sa, fp, dim3(mma_splits, num_kv_heads, num_seqs),
                    smem_bytes, stream, nullptr);
    if (e == cudaSuccess && a.residual_lens != nullptr) {  // the fp16 window: v1, the last splits
      SplitArgs r = sa;
      r.split_offset = mma_splits;
      e = Dispatch(false, kind, d, g, r, fp,
                   dim3(a.total_splits - mma_splits, num_kv_heads, num_seqs), smem_v1_bytes, stream,
                   nullptr);
    }
  }
  if (e != cudaSuccess) return e;
  const float* acc = a.part_acc;
  const float* ml = a.part_ml;
  if (d == 64) {
    return LaunchDependent(ReduceSplitsKernel<64>, rows, dim3(kReduceParts * 64), 0, stream, acc,
                           ml, out, signs, a.num_q_heads, num_kv_heads, a.total_splits);
  }
  return LaunchDependent(ReduceSplitsKernel<128>, rows, dim3(kReduceParts * 128), 0, stream, acc,
                         ml, out, signs, a.num_q_heads, num_kv_heads, a.total_splits);
}

}  // namespace kvgate::kernels::cuda::internal
