#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>

#include <algorithm>
#include <cfloat>
#include <cstdint>
#include <type_traits>

#include "kernels/cuda/kv_numeric.cuh"
#include "kvgate/kernels/kv_record_layout.h"
#include "workers/backend/cuda/cuda_kv_evict.h"

namespace kvgate::worker::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr uint32_t kFullMask = 0xffffffffu;
constexpr int kMaxGroup = kMaxMassGroup;
constexpr int kMaxHeadDim = 128;
// Sinks (ordered compaction): records staged per step.
constexpr int kCopySlots = 32;
// H2O: up to this many evicted tokens are found by repeated minimum searches (one pass each over
// the stored slots: a decode step evicts at most one); more (a prefill chunk's append) by a radix
// select (8 passes).
constexpr int kFewEvictions = 8;
// H2O, radix path: (hole, source) pairs per round.
constexpr int kPairChunk = 1024;
constexpr uint64_t kNoKey = ~uint64_t{0};
// Decode mass: keys per tile, one per thread.
constexpr int kMassThreads = 128;

__device__ __forceinline__ int64_t MetaIndex(const EvictPool& p, int32_t block, int head,
                                             int slot_in_block) {
  return ((int64_t{block} * p.num_layers + p.layer) * p.num_kv_heads + head) * p.block_size +
         slot_in_block;
}

__device__ __forceinline__ int64_t SlotMeta(const EvictPool& p, const int32_t* table, int head,
                                            int64_t slot) {
  const int s = static_cast<int>(slot);  // a sequence's slots fit int32 (block tables do)
  return MetaIndex(p, table[s / p.block_size], head, s % p.block_size);
}

__device__ __forceinline__ uint8_t* SlotRecord(const EvictPool& p, const int32_t* table, int head,
                                               int64_t slot) {
  const int s = static_cast<int>(slot);
  return p.pool + int64_t{table[s / p.block_size]} * p.block_stride_bytes + p.layer_offset_bytes +
         (int64_t{head} * p.block_size + s % p.block_size) * p.record_bytes;
}

// ---- Eviction -----------------------------------------------------------------------------------

// H2O eviction order of a slot (smaller leaves first). Tokens older than the window order by
// mass, then newer position first (CpuKvCache's partial_sort keeps the older of equal masses);
// masses are >= 0, so their bits order like the floats. Tokens of the window come after all of
// them (the plan never evicts one). Keys are unique: positions are.
__device__ __forceinline__ uint64_t EvictKey(const EvictPool& p, const int32_t* table, int head,
                                             int slot, int32_t window) {
  const int64_t m = SlotMeta(p, table, head, slot);
  const int32_t pos = p.positions[m];
  const uint32_t high = pos < window ? __float_as_uint(p.mass[m]) : 0xffffffffu;
  return (uint64_t{high} << 32) | static_cast<uint32_t>(INT32_MAX - pos);
}

// Block-wide minimum of (key, slot); every thread gets it. `keys`, `slots`: kWarps entries.
__device__ void BlockMinKey(uint64_t& key, int& slot, uint64_t* keys, int* slots) {
  for (int o = 16; o > 0; o >>= 1) {
    const uint64_t k2 = __shfl_xor_sync(kFullMask, key, o);
    const int s2 = __shfl_xor_sync(kFullMask, slot, o);
    if (k2 < key) {
      key = k2;
      slot = s2;
    }
  }
  __syncthreads();  // the previous call's readers are done
  if ((threadIdx.x & 31) == 0) {
    keys[threadIdx.x >> 5] = key;
    slots[threadIdx.x >> 5] = slot;
  }
  __syncthreads();
  for (int w = 0; w < kWarps; ++w) {
    if (keys[w] < key) {
      key = keys[w];
      slot = slots[w];
    }
  }
}

// Exclusive count of `flag` over the block's threads in thread order; *total gets the sum.
__device__ int BlockExclusiveCount(bool flag, int* warp_counts, int* total) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const uint32_t ballot = __ballot_sync(kFullMask, flag);
  __syncthreads();  // the previous call's readers are done
  if (lane == 0) warp_counts[warp] = __popc(ballot);
  __syncthreads();
  int before = 0, all = 0;
  for (int w = 0; w < kWarps; ++w) {
    before += w < warp ? warp_counts[w] : 0;
    all += warp_counts[w];
  }
  *total = all;
  return before + __popc(ballot & ((1u << lane) - 1u));
}

// The rank-th smallest (from 0) EvictKey of slots [0, stored): radix select, 8 bits per pass.
__device__ uint64_t SelectKey(const EvictPool& p, const int32_t* table, int head, int stored,
                              int32_t window, int rank) {
  __shared__ uint32_t hist[256];
  __shared__ int found[2];  // digit, rank within it
  const int lane = threadIdx.x & 31;
  uint64_t prefix = 0;
  for (int shift = 56; shift >= 0; shift -= 8) {
    for (int b = threadIdx.x; b < 256; b += kThreads) hist[b] = 0;
    __syncthreads();
    const uint64_t above = shift == 56 ? 0 : ~uint64_t{0} << (shift + 8);
    for (int i = threadIdx.x; i < stored; i += kThreads) {
      const uint64_t key = EvictKey(p, table, head, i, window);
      if ((key & above) == prefix) atomicAdd(&hist[(key >> shift) & 255], 1u);
    }
    __syncthreads();
    if (threadIdx.x < 32) {  // lane l scans bins [8l, 8l + 8)
      uint32_t own = 0;
      for (int b = 0; b < 8; ++b) own += hist[8 * lane + b];
      uint32_t inclusive = own;
      for (int o = 1; o < 32; o <<= 1) {
        const uint32_t v = __shfl_up_sync(kFullMask, inclusive, o);
        if (lane >= o) inclusive += v;
      }
      uint32_t below = inclusive - own;
      if (below <= static_cast<uint32_t>(rank) && static_cast<uint32_t>(rank) < inclusive) {
        int b = 8 * lane;
        while (below + hist[b] <= static_cast<uint32_t>(rank)) below += hist[b++];
        found[0] = b;
        found[1] = rank - static_cast<int>(below);
      }
    }
    __syncthreads();
    prefix |= uint64_t(found[0]) << shift;
    rank = found[1];
  }
  return prefix;
}

// Slots i of [lo, hi) with pred(i), in slot order: those of rank [first, first + kPairChunk) go
// to out[rank - first]. Returns how many there are.
template <class Pred>
__device__ int CollectWhere(const Pred& pred, int lo, int hi, int first, int* out,
                            int* warp_counts) {
  int running = 0;
  for (int c = lo; c < hi; c += kThreads) {
    const int i = c + static_cast<int>(threadIdx.x);
    const bool flag = i < hi && pred(i);
    int total;
    const int rank = running + BlockExclusiveCount(flag, warp_counts, &total);
    if (flag && rank >= first && rank < first + kPairChunk) out[rank - first] = i;
    running += total;
  }
  return running;
}

// Copies the records, positions and (H2O) masses of slots src[k] into slots dst[k], k < count (no
// slot is both a source and a destination); records of any byte size.
__device__ void MoveRecords(const EvictPool& p, const int32_t* table, int head, const int* dst,
                            const int* src, int count) {
  if (p.record_bytes % 4 == 0) {
    const int words = p.record_bytes / 4;
    for (int e = threadIdx.x; e < count * words; e += kThreads) {
      const int k = e / words, w = e - k * words;
      reinterpret_cast<uint32_t*>(SlotRecord(p, table, head, dst[k]))[w] =
          reinterpret_cast<const uint32_t*>(SlotRecord(p, table, head, src[k]))[w];
    }
  } else {
    for (int e = threadIdx.x; e < count * p.record_bytes; e += kThreads) {
      const int k = e / p.record_bytes, b = e - k * p.record_bytes;
      SlotRecord(p, table, head, dst[k])[b] = SlotRecord(p, table, head, src[k])[b];
    }
  }
  for (int k = threadIdx.x; k < count; k += kThreads) {
    const int64_t to = SlotMeta(p, table, head, dst[k]), from = SlotMeta(p, table, head, src[k]);
    p.positions[to] = p.positions[from];
    if (p.mass != nullptr) p.mass[to] = p.mass[from];
  }
}

// Grid (num_seqs, kv_heads): H2O. The evicted tokens' slots below `kept` are refilled with the
// kept tokens of the slots at and above it, so that the append writes at [kept, kept + n).
__global__ void EvictH2oKernel(EvictPool p, const EvictPlan* plans) {
  const EvictPlan plan = plans[blockIdx.x];
  const int head = blockIdx.y;
  const int32_t* table = p.block_tables + int64_t{blockIdx.x} * p.max_blocks;
  const int stored = plan.stored;
  const int kept = min(stored, plan.lead + plan.trail + plan.heavy);
  const int evict = stored - kept;
  const int32_t window = plan.length - plan.trail;
  __shared__ uint64_t warp_keys[kWarps];
  __shared__ int warp_ints[kWarps];
  __shared__ int pair_dst[kPairChunk], pair_src[kPairChunk];
  __shared__ int num_pairs;
  if (evict > 0 && evict <= kFewEvictions) {
    // One minimum search per evicted token; the winners' slots are the holes or leave the tail.
    __shared__ int gone[kFewEvictions];
    uint64_t last = 0;
    for (int r = 0; r < evict; ++r) {
      uint64_t best = kNoKey;
      int best_slot = -1;
#pragma unroll 4
      for (int i = threadIdx.x; i < stored; i += kThreads) {
        const uint64_t key = EvictKey(p, table, head, i, window);
        if ((r == 0 || key > last) && key < best) {
          best = key;
          best_slot = i;
        }
      }
      BlockMinKey(best, best_slot, warp_keys, warp_ints);
      last = best;
      if (threadIdx.x == 0) gone[r] = best_slot;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      int holes = 0, sources = 0;
      for (int r = 0; r < evict; ++r) {  // holes in slot order (insertion sort of <= 8)
        if (gone[r] >= kept) continue;
        int k = holes++;
        for (; k > 0 && pair_dst[k - 1] > gone[r]; --k) pair_dst[k] = pair_dst[k - 1];
        pair_dst[k] = gone[r];
      }
      for (int i = kept; i < stored; ++i) {
        bool left = false;
        for (int r = 0; r < evict; ++r) left |= gone[r] == i;
        if (!left) pair_src[sources++] = i;
      }
      num_pairs = holes;  // == sources: both count the evicted tokens below `kept`
    }
    __syncthreads();
    MoveRecords(p, table, head, pair_dst, pair_src, num_pairs);
  } else if (evict > 0) {
    const uint64_t threshold = SelectKey(p, table, head, stored, window, evict - 1);
    // Rounds of kPairChunk pairs: a filled hole holds a kept key, so the holes still open rank
    // from 0 every round, while the sources (copied, not cleared) keep their ranks.
    for (int first = 0;; first += kPairChunk) {
      auto evicted = [&](int i) { return EvictKey(p, table, head, i, window) <= threshold; };
      const int sources = CollectWhere([&](int i) { return !evicted(i); }, kept, stored, first,
                                       pair_src, warp_ints);
      CollectWhere(evicted, 0, kept, 0, pair_dst, warp_ints);
      __syncthreads();
      MoveRecords(p, table, head, pair_dst, pair_src, min(kPairChunk, sources - first));
      __syncthreads();
      if (first + kPairChunk >= sources) break;
    }
  }
  __syncthreads();  // the tail's positions were read before the new slots' are written
  for (int i = threadIdx.x; i < plan.n; i += kThreads) {
    const int64_t m = SlotMeta(p, table, head, kept + i);
    p.positions[m] = plan.length + i;
    p.mass[m] = 0.0f;
  }
}

// Grid (num_seqs, kv_heads): sinks (no heavy tokens). Keeps the first `lead` and the last `trail`
// slots in slot order: the trail moves down over the evicted middle, kCopySlots at a time; a
// destination never exceeds its source, so staging a step before writing it keeps unread sources
// intact.
__global__ void EvictOrderedKernel(EvictPool p, const EvictPlan* plans) {
  const EvictPlan plan = plans[blockIdx.x];
  const int head = blockIdx.y;
  const int32_t* table = p.block_tables + int64_t{blockIdx.x} * p.max_blocks;
  __shared__ int32_t dst_of[kCopySlots];
  __shared__ int32_t pos_stage[kCopySlots];
  extern __shared__ uint32_t record_stage[];  // [kCopySlots][record_bytes / 4]
  const int stored = plan.stored;
  const int kept = min(stored, plan.lead + plan.trail);
  if (kept < stored) {
    // Slots [lead, stored - trail) leave: [stored - trail, stored) moves down to [lead, kept).
    const int words = p.record_bytes / 4, shift = stored - kept;
    for (int c0 = stored - plan.trail; c0 < stored; c0 += kCopySlots) {
      const int count = min(kCopySlots, stored - c0);
      if (threadIdx.x < count) {
        dst_of[threadIdx.x] = c0 + threadIdx.x - shift;
        pos_stage[threadIdx.x] = p.positions[SlotMeta(p, table, head, c0 + threadIdx.x)];
      }
      for (int e = threadIdx.x; e < count * words; e += kThreads) {
        const int s = e / words, w = e - s * words;
        record_stage[e] = reinterpret_cast<const uint32_t*>(SlotRecord(p, table, head, c0 + s))[w];
      }
      __syncthreads();
      for (int e = threadIdx.x; e < count * words; e += kThreads) {
        const int s = e / words, w = e - s * words;
        reinterpret_cast<uint32_t*>(SlotRecord(p, table, head, dst_of[s]))[w] = record_stage[e];
      }
      if (threadIdx.x < count) {
        p.positions[SlotMeta(p, table, head, dst_of[threadIdx.x])] = pos_stage[threadIdx.x];
      }
      __syncthreads();
    }
  }
  for (int i = threadIdx.x; i < plan.n; i += kThreads) {
    p.positions[SlotMeta(p, table, head, kept + i)] = plan.length + i;
  }
}

// ---- Eviction with a per-head fp16 window (TurboQuant with r > 0, KIVI) -------------------------

// Window rows staged per step of the window's compaction.
constexpr int kWindowStep = 32;
// KIVI: records staged per step of the ordered compaction.
constexpr int kOrderedStep = 128;
// KIVI: channels per (scale, min) pair of a solo key is G >= 8, so a key has at most this many.
constexpr int kMaxKiviPairs = kMaxHeadDim / 8;

// Dynamic shared memory of EvictWindowedKernel: the window's staged metadata, and for KIVI the
// re-encoded keys of one broken group and the records of one ordered-compaction step.
__host__ __device__ inline int WindowedEvictSmemBytes(const EvictPool& p) {
  int bytes = 3 * p.residual_capacity * static_cast<int>(sizeof(int32_t));
  if (p.key_offsets != nullptr) {
    bytes += p.kivi_group * (p.record_bytes / 2) + kOrderedStep * p.record_bytes;
  }
  return bytes;
}

// KIVI: the survivors of every key group in [0, encoded) that loses some but not all of its
// tokens become solo keys, as CpuKvCache::Evict re-encodes them: each survivor's key decoded from
// its group (code * scale + min, the CPU's DecodeKeys) and encoded per token with a (scale, min)
// per G channels (KiviCodec::EncodeTokenRow: the first of equal min / max wins), in place (the
// value half untouched), its key offset set to kSoloKeyOffset. Runs before any record moves;
// every thread calls it. `stage`: G x key_bytes bytes of dynamic shared memory; `broken`:
// kPairChunk ints of shared memory (the broken groups' first slots, a round at a time).
template <class Leaves>
__device__ void KiviSoloKeys(const EvictPool& p, const int32_t* table, int head, int encoded,
                             const Leaves& leaves, uint32_t* stage, int* broken, int* warp_ints) {
  namespace ki = kernels::cuda::internal;
  __shared__ float key_rows[kWarps][kMaxHeadDim];
  __shared__ float pair_min[kWarps][kMaxKiviPairs], pair_scale[kWarps][kMaxKiviPairs];
  const int d = p.head_dim, G = p.kivi_group, bits = p.kivi_bits, levels = (1 << bits) - 1;
  const int codes_bytes = d * bits / 8, key_words = p.record_bytes / 8, cpt = d / G;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  auto offset_of = [&](int slot) { return p.key_offsets[SlotMeta(p, table, head, slot)]; };
  auto is_broken = [&](int slot) {  // slot starts a group that some, not all, members leave
    if (offset_of(slot) != 0) return false;
    int gone = 0;
    for (int j = 0; j < G; ++j) gone += leaves(slot + j) ? 1 : 0;
    return gone > 0 && gone < G;
  };
  // Groups re-encoded in a round are no longer broken (their survivors are solo): the next round
  // collects from rank 0 again.
  for (;;) {
    __syncthreads();  // the previous round's readers of `broken` are done
    const int found = CollectWhere(is_broken, 0, encoded, 0, broken, warp_ints);
    __syncthreads();
    for (int b = 0; b < min(kPairChunk, found); ++b) {
      const int start = broken[b];
      // Each warp re-encodes the survivors j = warp, warp + kWarps, ... into stage[j].
      for (int j = warp; j < G; j += kWarps) {
        if (leaves(start + j)) continue;
        const uint8_t* rec = SlotRecord(p, table, head, start + j);
        for (int c = lane; c < d; c += 32) {
          const int bit = c * bits;
          const uint32_t code = (rec[bit >> 3] >> (bit & 7)) & levels;
          const uint8_t* meta =
              SlotRecord(p, table, head, start + c / cpt) + codes_bytes + 4 * (c % cpt);
          const float scale = ki::HalfToFloat(static_cast<uint16_t>(meta[0] | (meta[1] << 8)));
          const float min = ki::HalfToFloat(static_cast<uint16_t>(meta[2] | (meta[3] << 8)));
          key_rows[warp][c] = __fadd_rn(__fmul_rn(static_cast<float>(code), scale), min);
        }
        __syncwarp();
        uint32_t* out = stage + j * key_words;
        for (int g = lane; g < cpt; g += 32) {  // (scale, min) of channels [g G, (g + 1) G)
          const float* x = key_rows[warp] + g * G;
          float lo = x[0], hi = lo;
          for (int c = 1; c < G; ++c) {
            lo = ki::MinFirst(lo, x[c]);
            hi = ki::MaxFirst(hi, x[c]);
          }
          const ki::MinScaleResult ms = ki::KiviMinScale(lo, hi, levels);
          pair_min[warp][g] = ms.min;
          pair_scale[warp][g] = ms.scale;
          out[codes_bytes / 4 + g] = ms.packed;
        }
        __syncwarp();
        const int per_word = 32 / bits;
        for (int w = lane; w < codes_bytes / 4; w += 32) {  // codes packed LSB-first
          uint32_t packed = 0;
          for (int i = 0; i < per_word; ++i) {
            const int c = w * per_word + i;
            packed |= ki::KiviCode(key_rows[warp][c], pair_min[warp][c / G],
                                   pair_scale[warp][c / G], levels)
                      << (i * bits);
          }
          out[w] = packed;
        }
        __syncwarp();
      }
      __syncthreads();  // every survivor decoded from the group's records: now overwrite them
      for (int e = threadIdx.x; e < G * key_words; e += kThreads) {
        const int j = e / key_words, w = e - j * key_words;
        if (leaves(start + j)) continue;
        reinterpret_cast<uint32_t*>(SlotRecord(p, table, head, start + j))[w] = stage[e];
      }
      // Every member solo: the survivors are, the others leave (and the group is done).
      for (int j = threadIdx.x; j < G; j += kThreads) {
        p.key_offsets[SlotMeta(p, table, head, start + j)] = kernels::kSoloKeyOffset;
      }
      __syncthreads();
    }
    if (found <= kPairChunk) break;
  }
}

// KIVI: the records of [0, encoded) that stay move down in slot order (CpuKvCache::Evict's
// compaction: whole key groups stay contiguous, their offsets valid), with their positions,
// masses and key offsets; kOrderedStep slots at a time (a destination never exceeds its source,
// so staging a step before writing it keeps later sources intact). Returns the kept count; every
// thread calls it. `stage`: kOrderedStep records of dynamic shared memory.
template <class Leaves>
__device__ int CompactOrdered(const EvictPool& p, const int32_t* table, int head, int encoded,
                              const Leaves& leaves, uint32_t* stage, int* warp_ints) {
  __shared__ int dst_of[kOrderedStep], src_of[kOrderedStep];
  __shared__ int32_t pos_of[kOrderedStep];
  __shared__ float mass_of[kOrderedStep];
  __shared__ uint8_t offset_of[kOrderedStep];
  const int words = p.record_bytes / 4;
  int kept = 0;
  for (int c0 = 0; c0 < encoded; c0 += kOrderedStep) {
    const int i = c0 + static_cast<int>(threadIdx.x);
    const bool stays = threadIdx.x < kOrderedStep && i < encoded && !leaves(i);
    int total;
    const int rank = BlockExclusiveCount(stays, warp_ints, &total);
    if (stays) {
      const int64_t m = SlotMeta(p, table, head, i);
      dst_of[rank] = kept + rank;
      src_of[rank] = i;
      pos_of[rank] = p.positions[m];
      mass_of[rank] = p.mass != nullptr ? p.mass[m] : 0.0f;
      offset_of[rank] = p.key_offsets[m];
    }
    __syncthreads();
    for (int e = threadIdx.x; e < total * words; e += kThreads) {
      const int k = e / words, w = e - k * words;
      stage[e] = reinterpret_cast<const uint32_t*>(SlotRecord(p, table, head, src_of[k]))[w];
    }
    __syncthreads();
    for (int e = threadIdx.x; e < total * words; e += kThreads) {
      const int k = e / words, w = e - k * words;
      reinterpret_cast<uint32_t*>(SlotRecord(p, table, head, dst_of[k]))[w] = stage[e];
    }
    for (int k = threadIdx.x; k < total; k += kThreads) {
      const int64_t m = SlotMeta(p, table, head, dst_of[k]);
      p.positions[m] = pos_of[k];
      if (p.mass != nullptr) p.mass[m] = mass_of[k];
      p.key_offsets[m] = offset_of[k];
    }
    kept += total;
    __syncthreads();
  }
  return kept;
}

// Grid (num_seqs, kv_heads), H2O or sinks, layers with a per-head fp16 window: head h's slots
// [0, encoded) are records, [encoded, stored) its window's rows (slot encoded + row), encoded =
// stored - head_window. The kept set is chosen over all of them, as CpuKvCache::Evict does (H2O:
// the recent positions plus the heavy tokens of largest mass; sinks: positions < lead or >=
// length - trail). The records compact as the per-token formats' do (H2O's holes below the kept
// record count refilled from above it, unordered; sinks' holes lie above the sink slots, which
// never move), the window's surviving rows move down in order (its oldest rows flush first) to
// the slots after the kept records, and head_window becomes their count. Dynamic shared memory:
// WindowedEvictSmemBytes, starting with residual_capacity x (position, mass, source row) staged
// before any row moves.
// KIVI (EvictPool::key_offsets): the records keep CpuKvCache's slot order instead, key groups
// being runs of consecutive slots: the survivors of groups that lose members become solo keys
// (KiviSoloKeys), then the kept records compact in order (CompactOrdered); every append then
// finds the window's rows (and the new ones) at the key offsets their flush gives them.
template <bool KIVI>
__global__ void EvictWindowedKernel(EvictPool p, const EvictPlan* plans) {
  const EvictPlan plan = plans[blockIdx.x];
  const int head = blockIdx.y, d = p.head_dim;
  const int32_t* table = p.block_tables + int64_t{blockIdx.x} * p.max_blocks;
  const int stored = plan.stored;
  const int kept = min(stored, plan.lead + plan.trail + plan.heavy);
  const int evict = stored - kept;
  const int32_t recent = plan.length - plan.trail;
  const int64_t state = int64_t{p.seq_slots[blockIdx.x]} * p.num_kv_heads + head;
  __shared__ int warp_ints[kWarps];
  __shared__ int pair_dst[kPairChunk], pair_src[kPairChunk];
  __shared__ uint32_t row_stage[2][kWindowStep][kMaxHeadDim / 2];  // fp16 pairs: keys, values
  extern __shared__ int32_t window_meta[];  // [capacity] positions, masses, kept rows' sources
  const int rows = p.head_window[state];
  int kept_records = stored - rows;  // the records' count after eviction
  if (evict > 0) {
    const int encoded = stored - rows;
    const uint64_t threshold =
        p.mass != nullptr ? SelectKey(p, table, head, stored, recent, evict - 1) : 0;
    auto leaves = [&](int slot) {
      if (p.mass != nullptr) return EvictKey(p, table, head, slot, recent) <= threshold;
      const int32_t pos = p.positions[SlotMeta(p, table, head, slot)];
      return !(pos < plan.lead || pos >= recent);
    };
    // The window's kept rows, their positions and masses staged first: they land on the slots
    // after the kept records, which the record moves read from and later rows still occupy.
    int32_t* row_pos = window_meta;
    float* row_mass = reinterpret_cast<float*>(window_meta + p.residual_capacity);
    int32_t* row_src = window_meta + 2 * p.residual_capacity;
    int kept_rows = 0;
    for (int c = 0; c < rows; c += kThreads) {
      const int r = c + static_cast<int>(threadIdx.x);
      const bool stays = r < rows && !leaves(encoded + r);
      int total;
      const int rank = kept_rows + BlockExclusiveCount(stays, warp_ints, &total);
      if (stays) {
        const int64_t m = SlotMeta(p, table, head, encoded + r);
        row_src[rank] = r;
        row_pos[rank] = p.positions[m];
        row_mass[rank] = p.mass != nullptr ? p.mass[m] : 0.0f;
      }
      kept_rows += total;
    }
    kept_records = kept - kept_rows;
    __syncthreads();
    if constexpr (KIVI) {
      uint32_t* stage = reinterpret_cast<uint32_t*>(window_meta + 3 * p.residual_capacity);
      KiviSoloKeys(p, table, head, encoded, leaves, stage, pair_src, warp_ints);
      CompactOrdered(p, table, head, encoded, leaves, stage + p.kivi_group * (p.record_bytes / 8),
                     warp_ints);
    } else {
      // Records: the holes below kept_records take the kept records above it, in rounds of
      // kPairChunk (a filled hole holds a kept token, so the open holes rank from 0 every round).
      auto stays_record = [&](int slot) { return !leaves(slot); };
      for (int first = 0;; first += kPairChunk) {
        const int sources =
            CollectWhere(stays_record, kept_records, encoded, first, pair_src, warp_ints);
        CollectWhere(leaves, 0, kept_records, 0, pair_dst, warp_ints);
        __syncthreads();
        MoveRecords(p, table, head, pair_dst, pair_src, max(0, min(kPairChunk, sources - first)));
        __syncthreads();
        if (first + kPairChunk >= sources) break;
      }
    }
    // The window's kept rows move down in order, kWindowStep at a time (a destination row never
    // exceeds its source, and later steps' sources lie above this step's destinations).
    const size_t window = size_t(state) * p.residual_capacity * d;
    const int words = d / 2;
    for (int r0 = 0; r0 < kept_rows; r0 += kWindowStep) {
      const int count = min(kWindowStep, kept_rows - r0);
      for (int e = threadIdx.x; e < count * words; e += kThreads) {
        const int k = e / words, w = e - k * words;
        const size_t at = window + size_t(row_src[r0 + k]) * d;
        row_stage[0][k][w] = reinterpret_cast<const uint32_t*>(p.residual_k + at)[w];
        row_stage[1][k][w] = reinterpret_cast<const uint32_t*>(p.residual_v + at)[w];
      }
      __syncthreads();
      for (int e = threadIdx.x; e < count * words; e += kThreads) {
        const int k = e / words, w = e - k * words;
        const size_t at = window + size_t(r0 + k) * d;
        reinterpret_cast<uint32_t*>(p.residual_k + at)[w] = row_stage[0][k][w];
        reinterpret_cast<uint32_t*>(p.residual_v + at)[w] = row_stage[1][k][w];
      }
      __syncthreads();
    }
    for (int r = threadIdx.x; r < kept_rows; r += kThreads) {
      const int64_t m = SlotMeta(p, table, head, kept_records + r);
      p.positions[m] = row_pos[r];
      if (p.mass != nullptr) p.mass[m] = row_mass[r];
    }
    if (threadIdx.x == 0) p.head_window[state] = kept_rows;
  }
  __syncthreads();
  for (int i = threadIdx.x; i < plan.n; i += kThreads) {
    const int64_t m = SlotMeta(p, table, head, kept + i);
    p.positions[m] = plan.length + i;
    if (p.mass != nullptr) p.mass[m] = 0.0f;
  }
  if constexpr (KIVI) {  // the window's rows and the new ones, as their flushes will group them
    for (int i = kept_records + static_cast<int>(threadIdx.x); i < kept + plan.n; i += kThreads) {
      p.key_offsets[SlotMeta(p, table, head, i)] =
          static_cast<uint8_t>((i - kept_records) % p.kivi_group);
    }
  }
}

// ---- Decode masses ------------------------------------------------------------------------------

// Merges softmax statistics (m, l) of two sets of scores.
__device__ __forceinline__ void MergeMl(float& m, float& l, float m2, float l2) {
  const float mm = fmaxf(m, m2);
  l = (l > 0.0f ? l * expf(m - mm) : 0.0f) + (l2 > 0.0f ? l2 * expf(m2 - mm) : 0.0f);
  m = mm;
}

// Adds one score to online softmax statistics (m, l): one exp per score.
__device__ __forceinline__ void AddScore(float& m, float& l, float s) {
  if (s > m) {
    l = l * expf(m - s) + 1.0f;
    m = s;
  } else {
    l += expf(s - m);
  }
}

// 32-bit words of a key in the mass kernels' smem tiles: the key codes, and for int8 the record's
// word holding the key scale (kernels::Int8Record) after them.
__host__ __device__ constexpr int KeyWords(MassKeyFormat format, int d) {
  return format == MassKeyFormat::kFp16 || format == MassKeyFormat::kBf16 ? d / 2
         : format == MassKeyFormat::kFp8                                  ? d / 4
                                                                          : d / 4 + 1;
}

struct DecodeMassArgs {
  EvictPool p;
  MassKeys keys;
  const int32_t* lens;
  const float* q;
  float* partial_ml;  // [num_seqs, kv_heads, kMaxMassSplits, kMaxGroup, 2]
  float* scores;      // [num_blocks, kv_heads, kMaxGroup, block_size]
  int split_tokens;   // a multiple of kMassThreads
  int group, group_pad;
  float scale;
};

// Score j of `slot` is ScoreBase(slot)[j * block_size].
__device__ __forceinline__ float* ScoreBase(const DecodeMassArgs& a, const int32_t* table, int head,
                                            int slot) {
  const int bs = a.p.block_size;
  return a.scores + (int64_t{table[slot / bs]} * a.p.num_kv_heads + head) * kMaxGroup * bs +
         slot % bs;
}

// Loads the group's queries of (seq, head) into qs [group][d] (smem).
__device__ void LoadDecodeQueries(const DecodeMassArgs& a, int seq, int head, float* qs) {
  const int d = a.p.head_dim;
  const float* qh =
      a.q + (int64_t{seq} * a.p.num_kv_heads * a.group_pad + int64_t{head} * a.group_pad) * d;
  for (int e = threadIdx.x; e < a.group * d; e += blockDim.x) qs[e] = qh[e];
}

__device__ __forceinline__ void CpAsync4(void* smem, const void* gmem) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4;\n" ::"r"(s), "l"(gmem));
}

// GROUP > 0: the group size, fixed at compile time; 0: a.group (<= kMaxGroup) at run time.
template <int GROUP>
struct Group {
  static constexpr int kCap = GROUP > 0 ? GROUP : kMaxGroup;
  __device__ __forceinline__ static bool Has(int j, int group) { return GROUP > 0 || j < group; }
};

// Adds word w of a key (2 fp16/bf16 or 4 fp8/int8 channels, decoded as the CPU codec decodes
// them) times the group's queries qs [group][d] to acc, in fp32.
template <MassKeyFormat FORMAT, int GROUP>
__device__ __forceinline__ void AddKeyWord(uint32_t x, int w, const float* qs, int group, int d,
                                           float code_scale, float* acc) {
  using G = Group<GROUP>;
  if constexpr (FORMAT == MassKeyFormat::kFp16 || FORMAT == MassKeyFormat::kBf16) {
    float2 k;
    if constexpr (FORMAT == MassKeyFormat::kFp16) {
      k = __half22float2(*reinterpret_cast<const __half2*>(&x));
    } else {
      k = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&x));
    }
#pragma unroll
    for (int j = 0; j < G::kCap; ++j) {
      if (G::Has(j, group)) {
        const float2 qv = *reinterpret_cast<const float2*>(qs + j * d + 2 * w);
        acc[j] = fmaf(qv.y, k.y, fmaf(qv.x, k.x, acc[j]));
      }
    }
  } else {
    float k[4];
#pragma unroll
    for (int b = 0; b < 4; ++b) {
      const uint8_t code = static_cast<uint8_t>(x >> (8 * b));
      if constexpr (FORMAT == MassKeyFormat::kFp8) {
        __nv_fp8_e4m3 e;
        e.__x = code;
        k[b] = static_cast<float>(e) * code_scale;
      } else {
        k[b] = static_cast<float>(static_cast<int8_t>(code)) * code_scale;
      }
    }
#pragma unroll
    for (int j = 0; j < G::kCap; ++j) {
      if (G::Has(j, group)) {
        const float4 qv = *reinterpret_cast<const float4*>(qs + j * d + 4 * w);
        acc[j] = fmaf(qv.w, k[3], fmaf(qv.z, k[2], fmaf(qv.y, k[1], fmaf(qv.x, k[0], acc[j]))));
      }
    }
  }
}

// Scores of one key (its words in smem; VEC: 16-byte aligned, read 16 bytes at a time) for the
// group's queries qs [group][d], dot products in fp32 (unscaled).
template <MassKeyFormat FORMAT, int GROUP, bool VEC>
__device__ __forceinline__ void KeyScores(const uint32_t* key, const float* qs, int group, int d,
                                          float fp8_scale, float* acc) {
#pragma unroll
  for (int j = 0; j < Group<GROUP>::kCap; ++j) acc[j] = 0.0f;
  const bool wide = FORMAT == MassKeyFormat::kFp16 || FORMAT == MassKeyFormat::kBf16;
  const int words = wide ? d / 2 : d / 4;
  const float code_scale =
      FORMAT == MassKeyFormat::kInt8
          ? __half2float(__ushort_as_half(static_cast<unsigned short>(key[d / 4] & 0xffffu)))
          : fp8_scale;
  if constexpr (VEC) {
    for (int w = 0; w < words; w += 4) {
      const uint4 x = *reinterpret_cast<const uint4*>(key + w);
      AddKeyWord<FORMAT, GROUP>(x.x, w, qs, group, d, code_scale, acc);
      AddKeyWord<FORMAT, GROUP>(x.y, w + 1, qs, group, d, code_scale, acc);
      AddKeyWord<FORMAT, GROUP>(x.z, w + 2, qs, group, d, code_scale, acc);
      AddKeyWord<FORMAT, GROUP>(x.w, w + 3, qs, group, d, code_scale, acc);
    }
  } else {
    for (int w = 0; w < words; ++w)
      AddKeyWord<FORMAT, GROUP>(key[w], w, qs, group, d, code_scale, acc);
  }
}

__device__ __forceinline__ void CpAsync16(void* smem, const void* gmem) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(s), "l"(gmem));
}

// Words between the smem rows of a tile's keys. VEC (16-byte copies and reads): an odd number of
// 16-byte units, so that the 8 threads of a 16-byte read phase hit distinct banks; otherwise an
// odd number of words, so that the 32 threads of a 4-byte read do.
__host__ __device__ constexpr int TileRowWords(int key_words, bool vec) {
  return vec ? ((key_words / 4) | 1) * 4 : key_words | 1;
}

// Key t's scores for the group's query heads, times the scale, into the per-slot scratch, and
// merged into this thread's softmax statistics (pass 1 of both score kernels).
template <int GROUP>
__device__ __forceinline__ void StoreScores(const DecodeMassArgs& a, const int32_t* table, int head,
                                            int t, int group, float (&s)[Group<GROUP>::kCap],
                                            float (&m)[Group<GROUP>::kCap],
                                            float (&l)[Group<GROUP>::kCap]) {
  using G = Group<GROUP>;
  float* out = ScoreBase(a, table, head, t);
#pragma unroll
  for (int j = 0; j < G::kCap; ++j) {
    if (G::Has(j, group)) {
      s[j] *= a.scale;
      out[j * a.p.block_size] = s[j];
      AddScore(m[j], l[j], s[j]);
    }
  }
}

// Merges each thread's per-head statistics over the CTA and writes the split's (M, L) per head
// (the end of pass 1 of both score kernels).
template <int GROUP>
__device__ __forceinline__ void WriteSplitMl(const DecodeMassArgs& a, int seq, int head, int split,
                                             int group, float (&m)[Group<GROUP>::kCap],
                                             float (&l)[Group<GROUP>::kCap],
                                             float (*warp_ml)[kMaxGroup][2]) {
  using G = Group<GROUP>;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
#pragma unroll
  for (int j = 0; j < G::kCap; ++j) {
    if (!G::Has(j, group)) break;
    for (int o = 16; o > 0; o >>= 1) {
      const float m2 = __shfl_xor_sync(kFullMask, m[j], o);
      const float l2 = __shfl_xor_sync(kFullMask, l[j], o);
      MergeMl(m[j], l[j], m2, l2);
    }
    if (lane == 0) {
      warp_ml[warp][j][0] = m[j];
      warp_ml[warp][j][1] = l[j];
    }
  }
  __syncthreads();
  if (static_cast<int>(threadIdx.x) < group) {
    const int j = threadIdx.x;
    float mm = -FLT_MAX, ll = 0.0f;
    for (int w = 0; w < kMassThreads / 32; ++w) MergeMl(mm, ll, warp_ml[w][j][0], warp_ml[w][j][1]);
    float* out =
        a.partial_ml +
        (((int64_t{seq} * a.p.num_kv_heads + head) * kMaxMassSplits + split) * kMaxGroup + j) * 2;
    out[0] = mm;
    out[1] = ll;
  }
}

// Pass 1. Grid (splits, kv_heads, num_seqs), kMassThreads threads: the split's keys in tiles of
// kMassThreads, each copied into smem (coalesced, cp.async: 16 bytes per copy with VEC, else a
// warp per record and 4 bytes per lane) and scored by one thread per key, which writes its scores
// and merges them into its split's softmax statistics per query head. Several CTAs per SM overlap
// one's copies with another's arithmetic.
template <MassKeyFormat FORMAT, int GROUP, bool VEC>
__global__ void __launch_bounds__(kMassThreads) DecodeMassScoreKernel(DecodeMassArgs a) {
  using G = Group<GROUP>;
  const int split = blockIdx.x, head = blockIdx.y, seq = blockIdx.z, d = a.p.head_dim;
  const int len = a.lens[seq], begin = split * a.split_tokens;
  if (begin >= len) return;
  const int end = min(len, begin + a.split_tokens);
  const int group = GROUP > 0 ? GROUP : a.group;
  __shared__ __align__(16) float qs[kMaxGroup * kMaxHeadDim];
  __shared__ float warp_ml[kMassThreads / 32][kMaxGroup][2];
  extern __shared__ __align__(16) uint32_t tile[];  // [kMassThreads][row_words]
  const int key_words = KeyWords(FORMAT, d), row_words = TileRowWords(key_words, VEC);
  LoadDecodeQueries(a, seq, head, qs);
  const float fp8_scale =
      FORMAT == MassKeyFormat::kFp8
          ? a.keys.head_scales[(int64_t{a.keys.seq_slots[seq]} * a.p.num_kv_heads + head) * 2]
          : 0.0f;
  const int32_t* table = a.p.block_tables + int64_t{seq} * a.p.max_blocks;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  float m[G::kCap], l[G::kCap];
#pragma unroll
  for (int j = 0; j < G::kCap; ++j) {
    m[j] = -FLT_MAX;
    l[j] = 0.0f;
  }
  for (int t0 = begin; t0 < end; t0 += kMassThreads) {
    const int count = min(kMassThreads, end - t0);
    if constexpr (VEC) {
      const int chunks = key_words / 4;
      for (int e = threadIdx.x; e < count * chunks; e += kMassThreads) {
        const int r = e / chunks, c = e - r * chunks;
        CpAsync16(tile + r * row_words + 4 * c, SlotRecord(a.p, table, head, t0 + r) + 16 * c);
      }
    } else {  // a warp per record, lanes over its words
      for (int r = warp; r < count; r += kMassThreads / 32) {
        const uint32_t* src =
            reinterpret_cast<const uint32_t*>(SlotRecord(a.p, table, head, t0 + r));
        for (int w = lane; w < key_words; w += 32) {
          // int8: the word after the key codes is the one holding the key scale (low half).
          const int from = FORMAT == MassKeyFormat::kInt8 && w == d / 4
                               ? kernels::Int8Record::KeyScale(d) / 4
                               : w;
          CpAsync4(tile + r * row_words + w, src + from);
        }
      }
    }
    asm volatile("cp.async.commit_group;\n" ::);
    asm volatile("cp.async.wait_group 0;\n" ::);
    __syncthreads();
    if (static_cast<int>(threadIdx.x) < count) {
      const int t = t0 + threadIdx.x;
      float s[G::kCap];
      KeyScores<FORMAT, GROUP, VEC>(tile + threadIdx.x * row_words, qs, group, d, fp8_scale, s);
      StoreScores<GROUP>(a, table, head, t, group, s, m, l);
    }
    __syncthreads();  // the tile is read before the next one lands
  }
  WriteSplitMl<GROUP>(a, seq, head, split, group, m, l, warp_ml);
}

// 32-bit words of a TurboQuant key's smem row: its bytes from the word holding its first byte
// (records are 2-byte aligned: the first byte sits 0 or 2 bytes into that word), plus one word
// for the code reader's two-word window.
__host__ __device__ constexpr int TurboKeyWords(int code_bytes) {
  return (code_bytes + 2 + 2 + 3) / 4;
}
__host__ __device__ constexpr int TurboRowWords(int code_bytes) {
  return (TurboKeyWords(code_bytes) + 1) | 1;  // odd: the 32 threads of a read hit distinct banks
}

// Pass 1 for TurboQuant keys, grid and statistics as DecodeMassScoreKernel. Each CTA rotates the
// group's queries once (signs, then the orthonormal Walsh-Hadamard transform, butterflies in
// CpuKvCache's order: the CPU's PrepareQuery bit for bit); a thread scores one key: its records'
// codes (staged in smem, 4 bytes per copy) looked up in the centroids against the rotated query,
// times the key's norm, in fp32 (KeyScores of the CPU codec, up to the summation order); the
// head's fp16 window rows (EvictPool::head_window) against the query as given (equal to the
// CPU's rotated-domain score up to rounding: the rotation is orthonormal).
template <int GROUP>
__global__ void __launch_bounds__(kMassThreads) DecodeMassTurboScoreKernel(DecodeMassArgs a) {
  using G = Group<GROUP>;
  const int split = blockIdx.x, head = blockIdx.y, seq = blockIdx.z, d = a.p.head_dim;
  const int len = a.lens[seq], begin = split * a.split_tokens;
  if (begin >= len) return;
  const int end = min(len, begin + a.split_tokens);
  const int group = GROUP > 0 ? GROUP : a.group;
  const TurboMassKeys& tk = a.keys.turbo;
  __shared__ __align__(16) float qs[kMaxGroup * kMaxHeadDim];  // the queries as given
  __shared__ __align__(16) float qr[kMaxGroup * kMaxHeadDim];  // rotated
  __shared__ float centroids[32];                              // hi [0, 16), lo [16, 32)
  __shared__ float warp_ml[kMassThreads / 32][kMaxGroup][2];
  extern __shared__ __align__(16) uint32_t tile[];  // [kMassThreads][row_words]
  const int key_words = TurboKeyWords(tk.code_bytes), row_words = TurboRowWords(tk.code_bytes);
  LoadDecodeQueries(a, seq, head, qs);
  if (threadIdx.x < 16) {
    centroids[threadIdx.x] = tk.hi_centroids[threadIdx.x];
    centroids[16 + threadIdx.x] = tk.lo_centroids[threadIdx.x];
  }
  __syncthreads();
  for (int e = threadIdx.x; e < group * d; e += blockDim.x) qr[e] = qs[e] * tk.signs[e % d];
  for (int h = 1; h < d; h <<= 1) {
    __syncthreads();
    for (int pr = threadIdx.x; pr < group * d / 2; pr += blockDim.x) {
      const int row = pr / (d / 2), j = pr % (d / 2);
      const int i = row * d + (j / h) * 2 * h + j % h;
      const float u = qr[i], w = qr[i + h];
      qr[i] = u + w;
      qr[i + h] = u - w;
    }
  }
  __syncthreads();
  const float inv_sqrt_d = 1.0f / sqrtf(static_cast<float>(d));
  for (int e = threadIdx.x; e < group * d; e += blockDim.x) qr[e] *= inv_sqrt_d;
  // Records below enc; the head's fp16 window rows from enc on.
  int enc = len;
  const uint16_t* window = nullptr;
  if (a.p.head_window != nullptr) {
    const int64_t state = int64_t{a.p.seq_slots[seq]} * a.p.num_kv_heads + head;
    enc = len - a.p.head_window[state];
    window = a.p.residual_k + state * a.p.residual_capacity * d;
  }
  const int32_t* table = a.p.block_tables + int64_t{seq} * a.p.max_blocks;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int hi_channels = tk.hi_channels, hi_bits = tk.hi_bits, lo_bits = tk.lo_bits;
  const uint32_t hi_mask = (1u << hi_bits) - 1, lo_mask = (1u << lo_bits) - 1;
  float m[G::kCap], l[G::kCap];
#pragma unroll
  for (int j = 0; j < G::kCap; ++j) {
    m[j] = -FLT_MAX;
    l[j] = 0.0f;
  }
  __syncthreads();  // qr complete
  for (int t0 = begin; t0 < end; t0 += kMassThreads) {
    const int count = min(kMassThreads, end - t0);
    const int coded = min(count, max(enc - t0, 0));
    for (int r = warp; r < coded; r += kMassThreads / 32) {  // a warp per record
      const uintptr_t rec = reinterpret_cast<uintptr_t>(SlotRecord(a.p, table, head, t0 + r));
      const uint32_t* src = reinterpret_cast<const uint32_t*>(rec & ~uintptr_t{3});
      for (int w = lane; w < key_words; w += 32) CpAsync4(tile + r * row_words + w, src + w);
    }
    asm volatile("cp.async.commit_group;\n" ::);
    asm volatile("cp.async.wait_group 0;\n" ::);
    __syncthreads();
    if (static_cast<int>(threadIdx.x) < count) {
      const int t = t0 + threadIdx.x;
      float s[G::kCap];
#pragma unroll
      for (int j = 0; j < G::kCap; ++j) s[j] = 0.0f;
      if (t < enc) {
        const uint32_t* row = tile + threadIdx.x * row_words;
        const int first = static_cast<int>(
            reinterpret_cast<uintptr_t>(SlotRecord(a.p, table, head, t)) & 3);  // 0 or 2
        int bit = 8 * first;
        for (int c = 0; c < d; ++c) {
          const bool hi = c < hi_channels;
          const uint32_t code = __funnelshift_r(row[bit >> 5], row[(bit >> 5) + 1], bit & 31) &
                                (hi ? hi_mask : lo_mask);
          bit += hi ? hi_bits : lo_bits;
          const float k = centroids[(hi ? 0 : 16) + code];
#pragma unroll
          for (int j = 0; j < G::kCap; ++j) {
            if (G::Has(j, group)) s[j] = fmaf(qr[j * d + c], k, s[j]);
          }
        }
        const int nb = first + tk.code_bytes;  // the fp16 norm, 2-byte aligned
        const uint32_t nw = row[nb >> 2];
        const float norm = __half2float(
            __ushort_as_half(static_cast<unsigned short>((nb & 2) ? nw >> 16 : nw & 0xffffu)));
#pragma unroll
        for (int j = 0; j < G::kCap; ++j) s[j] *= norm;
      } else {
        const __half2* k = reinterpret_cast<const __half2*>(window + int64_t{t - enc} * d);
        for (int w = 0; w < d / 2; ++w) {
          const float2 kv = __half22float2(k[w]);
#pragma unroll
          for (int j = 0; j < G::kCap; ++j) {
            if (G::Has(j, group)) {
              const float2 qv = *reinterpret_cast<const float2*>(qs + j * d + 2 * w);
              s[j] = fmaf(qv.y, kv.y, fmaf(qv.x, kv.x, s[j]));
            }
          }
        }
      }
      StoreScores<GROUP>(a, table, head, t, group, s, m, l);
    }
    __syncthreads();  // the tile is read before the next one lands
  }
  WriteSplitMl<GROUP>(a, seq, head, split, group, m, l, warp_ml);
}

// Pass 2, same grid: the statistics of every split of the sequence give (M, L) per query head (a
// warp per head, lanes over splits); each thread adds sum_j exp(s_j - M_j) / L_j to its keys'
// masses (each key has one owner).
template <int GROUP>
__global__ void __launch_bounds__(kMassThreads) DecodeMassAddKernel(DecodeMassArgs a) {
  using G = Group<GROUP>;
  const int split = blockIdx.x, head = blockIdx.y, seq = blockIdx.z;
  const int len = a.lens[seq], begin = split * a.split_tokens;
  if (begin >= len) return;
  const int end = min(len, begin + a.split_tokens);
  const int group = GROUP > 0 ? GROUP : a.group;
  __shared__ float final_m[kMaxGroup], final_inv_l[kMaxGroup];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int splits = (len + a.split_tokens - 1) / a.split_tokens;
  const float* in =
      a.partial_ml + ((int64_t{seq} * a.p.num_kv_heads + head) * kMaxMassSplits) * kMaxGroup * 2;
  for (int j = warp; j < group; j += kMassThreads / 32) {
    float mm = -FLT_MAX, ll = 0.0f;
    for (int x = lane; x < splits; x += 32) {
      MergeMl(mm, ll, in[(x * kMaxGroup + j) * 2], in[(x * kMaxGroup + j) * 2 + 1]);
    }
    for (int o = 16; o > 0; o >>= 1) {
      const float m2 = __shfl_xor_sync(kFullMask, mm, o);
      const float l2 = __shfl_xor_sync(kFullMask, ll, o);
      MergeMl(mm, ll, m2, l2);
    }
    if (lane == 0) {
      final_m[j] = mm;
      final_inv_l[j] = ll > 0.0f ? 1.0f / ll : 0.0f;
    }
  }
  __syncthreads();
  float fm[G::kCap], fil[G::kCap];
#pragma unroll
  for (int j = 0; j < G::kCap; ++j) {
    fm[j] = G::Has(j, group) ? final_m[j] : 0.0f;
    fil[j] = G::Has(j, group) ? final_inv_l[j] : 0.0f;
  }
  const int32_t* table = a.p.block_tables + int64_t{seq} * a.p.max_blocks;
  const int bs = a.p.block_size;
  float* __restrict__ mass = a.p.mass;
  const float* __restrict__ scores = a.scores;
#pragma unroll 2
  for (int t = begin + threadIdx.x; t < end; t += kMassThreads) {
    const int32_t block = table[t / bs];
    const int in_block = t % bs;
    const float* sc =
        scores + (int64_t{block} * a.p.num_kv_heads + head) * kMaxGroup * bs + in_block;
    float add = 0.0f;
#pragma unroll
    for (int j = 0; j < G::kCap; ++j) {
      if (G::Has(j, group)) add += expf(sc[j * bs] - fm[j]) * fil[j];
    }
    mass[MetaIndex(a.p, block, head, in_block)] += add;
  }
}

// ---- Prefill masses -----------------------------------------------------------------------------

// Tiles of kPmRows query rows (kPmRows / group tokens x the group's heads) against kPmKeys keys,
// kPmThreads threads: thread (tr, tk) = (tid / 16, tid % 16) scores rows 4 tr .. 4 tr + 3 against
// keys tk + 16 c, c < 4. Rows and keys sit in smem in fp32 with a stride of d + 4 floats
// (float4 reads, conflict-free).
constexpr int kPmRows = 64;
constexpr int kPmKeys = 64;
constexpr int kPmThreads = 256;

struct PrefillMassArgs {
  EvictPool p;
  const PrefillMassChunk* chunks;
  const float* q;  // [rows, kv_heads * group_pad, d]
  int group, group_pad;
  const float* fresh_k;  // row r, kv-head h at fresh_k[r * fresh_row_stride + h * d]
  int64_t fresh_row_stride;
  const float* prefix_k;  // [prefix chunks, kv_heads, prefix_stride_tokens, d]
  int64_t prefix_stride_tokens;
  float scale;
  float* row_stats;  // [rows, kv_heads, kMaxGroup, 2]: (M, L) of each query row
};

__host__ __device__ constexpr int PrefillMassSmemFloats(int d) {
  return (kPmRows + kPmKeys) * (d + 4);
}

// Key t (< cached + n) of a chunk for kv-head `head`: the read-back prefix, then the fresh rows.
__device__ __forceinline__ const float* PrefillKey(const PrefillMassArgs& a,
                                                   const PrefillMassChunk& chunk, int head, int t) {
  const int d = a.p.head_dim;
  if (t < chunk.cached) {
    return a.prefix_k +
           ((int64_t{chunk.prefix_index} * a.p.num_kv_heads + head) * a.prefix_stride_tokens + t) *
               d;
  }
  return a.fresh_k + (int64_t{chunk.first_row} + (t - chunk.cached)) * a.fresh_row_stride +
         int64_t{head} * d;
}

// Loads keys [k0, k0 + kPmKeys) (zeros past `keys`) into ks [kPmKeys][d + 4].
__device__ void LoadPrefillKeys(const PrefillMassArgs& a, const PrefillMassChunk& chunk, int head,
                                int k0, int keys, float* ks) {
  const int d = a.p.head_dim, vecs = d / 4;
  for (int e = threadIdx.x; e < kPmKeys * vecs; e += kPmThreads) {
    const int r = e / vecs, c = (e - r * vecs) * 4;
    float4 v = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    if (k0 + r < keys) v = *reinterpret_cast<const float4*>(PrefillKey(a, chunk, head, k0 + r) + c);
    *reinterpret_cast<float4*>(ks + r * (d + 4) + c) = v;
  }
}

// Loads the query rows of tokens [i0, i0 + tokens) (row r: token i0 + r / group, head r % group;
// zeros past them) into qs [kPmRows][d + 4].
__device__ void LoadPrefillQueries(const PrefillMassArgs& a, const PrefillMassChunk& chunk,
                                   int head, int i0, int tokens, float* qs) {
  const int d = a.p.head_dim, vecs = d / 4, rows = tokens * a.group;
  for (int e = threadIdx.x; e < kPmRows * vecs; e += kPmThreads) {
    const int r = e / vecs, c = (e - r * vecs) * 4;
    float4 v = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    if (r < rows) {
      const int64_t row = int64_t{chunk.first_row} + i0 + r / a.group;
      v = *reinterpret_cast<const float4*>(
          a.q +
          (row * a.p.num_kv_heads * a.group_pad + int64_t{head} * a.group_pad + r % a.group) * d +
          c);
    }
    *reinterpret_cast<float4*>(qs + r * (d + 4) + c) = v;
  }
}

// s[a][c] = scale * q(row 4 tr + a) . k(key tk + 16 c), fp32.
__device__ __forceinline__ void PrefillTileScores(const float* qs, const float* ks, int d,
                                                  float scale, float (&s)[4][4]) {
  const int tr = threadIdx.x >> 4, tk = threadIdx.x & 15;
#pragma unroll
  for (int x = 0; x < 4; ++x) {
#pragma unroll
    for (int c = 0; c < 4; ++c) s[x][c] = 0.0f;
  }
  for (int ch = 0; ch < d; ch += 4) {
    float4 qv[4], kv[4];
#pragma unroll
    for (int x = 0; x < 4; ++x) {
      qv[x] = *reinterpret_cast<const float4*>(qs + (4 * tr + x) * (d + 4) + ch);
      kv[x] = *reinterpret_cast<const float4*>(ks + (tk + 16 * x) * (d + 4) + ch);
    }
#pragma unroll
    for (int x = 0; x < 4; ++x) {
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        s[x][c] =
            fmaf(qv[x].w, kv[c].w,
                 fmaf(qv[x].z, kv[c].z, fmaf(qv[x].y, kv[c].y, fmaf(qv[x].x, kv[c].x, s[x][c]))));
      }
    }
  }
#pragma unroll
  for (int x = 0; x < 4; ++x) {
#pragma unroll
    for (int c = 0; c < 4; ++c) s[x][c] *= scale;
  }
}

// Pass 1. Grid (query tiles, chunks, kv_heads): the softmax statistics (M, L) of each query row
// over the keys it sees (t <= cached + i for token i), online over key tiles.
__global__ void __launch_bounds__(kPmThreads) PrefillMassStatsKernel(PrefillMassArgs a) {
  const PrefillMassChunk chunk = a.chunks[blockIdx.y];
  const int head = blockIdx.z, d = a.p.head_dim, group = a.group;
  const int tokens_per_tile = kPmRows / group, i0 = blockIdx.x * tokens_per_tile;
  if (i0 >= chunk.n) return;
  const int tokens = min(tokens_per_tile, chunk.n - i0), rows = tokens * group;
  extern __shared__ __align__(16) float pm_smem[];
  float* qs = pm_smem;
  float* ks = pm_smem + kPmRows * (d + 4);
  LoadPrefillQueries(a, chunk, head, i0, tokens, qs);
  const int tr = threadIdx.x >> 4, tk = threadIdx.x & 15;
  const int keys = chunk.cached + i0 + tokens;  // the tile's last token sees all of them
  float m[4], l[4];
  int sees[4];  // keys [0, sees) are visible to the row
#pragma unroll
  for (int x = 0; x < 4; ++x) {
    m[x] = -FLT_MAX;
    l[x] = 0.0f;
    const int r = 4 * tr + x;
    sees[x] = r < rows ? chunk.cached + i0 + r / group + 1 : 0;
  }
  for (int k0 = 0; k0 < keys; k0 += kPmKeys) {
    __syncthreads();  // the previous tile's keys are read
    LoadPrefillKeys(a, chunk, head, k0, keys, ks);
    __syncthreads();
    float s[4][4];
    PrefillTileScores(qs, ks, d, a.scale, s);
#pragma unroll
    for (int x = 0; x < 4; ++x) {
      float tile_max = -FLT_MAX;
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        if (k0 + tk + 16 * c < sees[x]) tile_max = fmaxf(tile_max, s[x][c]);
      }
      for (int o = 8; o > 0; o >>= 1) {
        tile_max = fmaxf(tile_max, __shfl_xor_sync(kFullMask, tile_max, o));
      }
      const float new_m = fmaxf(m[x], tile_max);
      float sum = 0.0f;
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        if (k0 + tk + 16 * c < sees[x]) sum += expf(s[x][c] - new_m);
      }
      for (int o = 8; o > 0; o >>= 1) sum += __shfl_xor_sync(kFullMask, sum, o);
      l[x] = l[x] * expf(m[x] - new_m) + sum;
      m[x] = new_m;
    }
  }
  if (tk == 0) {
#pragma unroll
    for (int x = 0; x < 4; ++x) {
      const int r = 4 * tr + x;
      if (r >= rows) continue;
      const int64_t row = int64_t{chunk.first_row} + i0 + r / group;
      float* out = a.row_stats + ((row * a.p.num_kv_heads + head) * kMaxGroup + r % group) * 2;
      out[0] = m[x];
      out[1] = l[x];
    }
  }
}

// Pass 2. Grid (key tiles, chunks, kv_heads): for each key of the tile, the sum over the query
// rows that see it of exp(s - M) / L, added to its slot's mass (one CTA per key: no atomics).
__global__ void __launch_bounds__(kPmThreads) PrefillMassAddKernel(PrefillMassArgs a) {
  const PrefillMassChunk chunk = a.chunks[blockIdx.y];
  const int head = blockIdx.z, d = a.p.head_dim, group = a.group;
  const int keys = chunk.cached + chunk.n, k0 = blockIdx.x * kPmKeys;
  if (k0 >= keys) return;
  extern __shared__ __align__(16) float pm_smem[];
  float* qs = pm_smem;
  float* ks = pm_smem + kPmRows * (d + 4);
  __shared__ float row_m[kPmRows], row_inv_l[kPmRows];
  __shared__ float key_sum[kPmThreads / 32][kPmKeys];
  LoadPrefillKeys(a, chunk, head, k0, keys, ks);
  const int tr = threadIdx.x >> 4, tk = threadIdx.x & 15;
  const int tokens_per_tile = kPmRows / group;
  float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
  // Token i sees key t when t <= cached + i: the first token that sees k0.
  for (int i0 = max(0, k0 - chunk.cached); i0 < chunk.n; i0 += tokens_per_tile) {
    const int tokens = min(tokens_per_tile, chunk.n - i0), rows = tokens * group;
    __syncthreads();  // the previous rows are read
    LoadPrefillQueries(a, chunk, head, i0, tokens, qs);
    for (int r = threadIdx.x; r < kPmRows; r += kPmThreads) {
      float mm = 0.0f, inv_l = 0.0f;
      if (r < rows) {
        const int64_t row = int64_t{chunk.first_row} + i0 + r / group;
        const float* st =
            a.row_stats + ((row * a.p.num_kv_heads + head) * kMaxGroup + r % group) * 2;
        mm = st[0];
        inv_l = st[1] > 0.0f ? 1.0f / st[1] : 0.0f;
      }
      row_m[r] = mm;
      row_inv_l[r] = inv_l;
    }
    __syncthreads();
    float s[4][4];
    PrefillTileScores(qs, ks, d, a.scale, s);
#pragma unroll
    for (int x = 0; x < 4; ++x) {
      const int r = 4 * tr + x;
      if (r >= rows) continue;
      const int sees = chunk.cached + i0 + r / group + 1;
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        const int t = k0 + tk + 16 * c;
        if (t < sees) acc[c] += expf(s[x][c] - row_m[r]) * row_inv_l[r];
      }
    }
  }
  // Sum over the 16 row groups: the two of a warp by a shuffle, then the warps through smem.
#pragma unroll
  for (int c = 0; c < 4; ++c) acc[c] += __shfl_xor_sync(kFullMask, acc[c], 16);
  if ((threadIdx.x & 31) < 16) {
#pragma unroll
    for (int c = 0; c < 4; ++c) key_sum[threadIdx.x >> 5][tk + 16 * c] = acc[c];
  }
  __syncthreads();
  if (threadIdx.x < kPmKeys && k0 + static_cast<int>(threadIdx.x) < keys) {
    float total = 0.0f;
    for (int w = 0; w < kPmThreads / 32; ++w) total += key_sum[w][threadIdx.x];
    const int32_t* table = a.p.block_tables + int64_t{chunk.batch_index} * a.p.max_blocks;
    a.p.mass[SlotMeta(a.p, table, head, k0 + threadIdx.x)] += total;
  }
}

// Calls launch(std::integral_constant<int, G>{}) with the kernel instance G for a GQA group: 1, 2,
// 4 and 8 have their own (unrolled) instances, any other size runs instance 0.
template <class Launch>
void WithGroupInstance(int group, Launch&& launch) {
  switch (group) {
    case 1:
      launch(std::integral_constant<int, 1>{});
      break;
    case 2:
      launch(std::integral_constant<int, 2>{});
      break;
    case 4:
      launch(std::integral_constant<int, 4>{});
      break;
    case 8:
      launch(std::integral_constant<int, 8>{});
      break;
    default:
      launch(std::integral_constant<int, 0>{});
      break;
  }
}

template <MassKeyFormat FORMAT, bool VEC>
void LaunchDecodeMassScores(const DecodeMassArgs& a, dim3 grid, cudaStream_t stream) {
  const size_t smem =
      size_t{kMassThreads} * TileRowWords(KeyWords(FORMAT, a.p.head_dim), VEC) * sizeof(uint32_t);
  WithGroupInstance(a.group, [&](auto g) {
    DecodeMassScoreKernel<FORMAT, decltype(g)::value, VEC><<<grid, kMassThreads, smem, stream>>>(a);
  });
}

// 16-byte copies and reads of the keys when every key starts 16-byte aligned and is a whole number
// of 16-byte units (fp16, bf16 and fp8 at head_dim % 16 == 0; not int8: its 2d + 4 byte records
// start only 4-byte aligned, and its key scale sits after the value codes).
template <MassKeyFormat FORMAT>
void LaunchDecodeMassScores(const DecodeMassArgs& a, dim3 grid, cudaStream_t stream) {
  const EvictPool& p = a.p;
  const bool vec = FORMAT != MassKeyFormat::kInt8 && p.head_dim % 16 == 0 &&
                   p.record_bytes % 16 == 0 && p.block_stride_bytes % 16 == 0 &&
                   p.layer_offset_bytes % 16 == 0 && reinterpret_cast<uintptr_t>(p.pool) % 16 == 0;
  if constexpr (FORMAT != MassKeyFormat::kInt8) {
    if (vec) {
      LaunchDecodeMassScores<FORMAT, true>(a, grid, stream);
      return;
    }
  }
  LaunchDecodeMassScores<FORMAT, false>(a, grid, stream);
}

void LaunchDecodeMassTurboScores(const DecodeMassArgs& a, dim3 grid, cudaStream_t stream) {
  const size_t smem =
      size_t{kMassThreads} * TurboRowWords(a.keys.turbo.code_bytes) * sizeof(uint32_t);
  WithGroupInstance(a.group, [&](auto g) {
    DecodeMassTurboScoreKernel<decltype(g)::value><<<grid, kMassThreads, smem, stream>>>(a);
  });
}

}  // namespace

cudaError_t LaunchEvictCompact(const EvictPool& p, const EvictPlan* plans, cudaStream_t stream) {
  if (p.num_seqs == 0) return cudaSuccess;
  const dim3 grid(p.num_seqs, p.num_kv_heads);
  if (p.head_window != nullptr) {
    if (p.seq_slots == nullptr || p.residual_k == nullptr || p.residual_v == nullptr ||
        p.residual_capacity <= 0 || p.head_dim > kMaxHeadDim || p.head_dim % 2 != 0) {
      return cudaErrorInvalidValue;
    }
    if (p.residual_capacity > kMaxEvictWindowRows) return cudaErrorInvalidValue;
    const int smem = WindowedEvictSmemBytes(p);
    if (p.key_offsets != nullptr) {
      if (p.kivi_group < 8 || p.kivi_group % 8 != 0 || p.head_dim % p.kivi_group != 0 ||
          p.record_bytes % 8 != 0) {
        return cudaErrorInvalidValue;
      }
      if (cudaError_t e = cudaFuncSetAttribute(EvictWindowedKernel<true>,
                                               cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
          e != cudaSuccess) {
        return e;
      }
      EvictWindowedKernel<true><<<grid, kThreads, smem, stream>>>(p, plans);
    } else {
      EvictWindowedKernel<false><<<grid, kThreads, smem, stream>>>(p, plans);
    }
    return cudaGetLastError();
  }
  if (p.record_bytes % 4 != 0) return cudaErrorInvalidValue;
  if (p.mass != nullptr) {
    EvictH2oKernel<<<grid, kThreads, 0, stream>>>(p, plans);
  } else {
    const size_t smem = size_t{kCopySlots} * p.record_bytes;
    EvictOrderedKernel<<<grid, kThreads, smem, stream>>>(p, plans);
  }
  return cudaGetLastError();
}

cudaError_t LaunchDecodeMass(const EvictPool& p, const MassKeys& keys, const int32_t* lens,
                             int max_len, const float* q, int group, int group_pad, float scale,
                             float* partial_ml, float* scores, cudaStream_t stream) {
  if (p.num_seqs == 0 || max_len <= 0) return cudaSuccess;
  if (group < 1 || group > kMaxGroup || p.head_dim > kMaxHeadDim || p.head_dim % 4 != 0) {
    return cudaErrorInvalidValue;
  }
  if (keys.format == MassKeyFormat::kTurbo) {
    // Records are read from the 4-byte word holding their first byte (they are 2-byte aligned);
    // the window's rows by half2.
    const TurboMassKeys& tk = keys.turbo;
    if (reinterpret_cast<uintptr_t>(p.pool) % 4 != 0 || p.block_stride_bytes % 4 != 0 ||
        p.layer_offset_bytes % 4 != 0 || p.record_bytes % 2 != 0 || tk.hi_bits < 1 ||
        tk.hi_bits > 4 || tk.lo_bits < 1 || tk.lo_bits > 4 || tk.hi_channels < 0 ||
        tk.hi_channels > p.head_dim || tk.code_bytes % 2 != 0 ||
        tk.code_bytes + 2 > p.record_bytes ||
        (p.head_window != nullptr && (p.residual_k == nullptr || p.seq_slots == nullptr))) {
      return cudaErrorInvalidValue;
    }
  }
  // Splits per (sequence, kv-head): enough CTAs for a few waves of the GPU (several tiles per CTA
  // at large batches, so that loading the queries and merging statistics stay small), at most
  // one per tile and kMaxMassSplits.
  int device = 0, sms = 0;
  if (cudaError_t e = cudaGetDevice(&device); e != cudaSuccess) return e;
  if (cudaError_t e = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
      e != cudaSuccess) {
    return e;
  }
  const int64_t pairs = int64_t{p.num_seqs} * p.num_kv_heads;
  const int tiles = (max_len + kMassThreads - 1) / kMassThreads;
  const int64_t wanted = (int64_t{sms} * 24 + pairs - 1) / pairs;  // ~4 waves of 6 CTAs per SM
  const int splits =
      static_cast<int>(std::clamp<int64_t>(wanted, 1, std::min(tiles, kMaxMassSplits)));
  const int split_tokens = (tiles + splits - 1) / splits * kMassThreads;
  DecodeMassArgs a{.p = p,
                   .keys = keys,
                   .lens = lens,
                   .q = q,
                   .partial_ml = partial_ml,
                   .scores = scores,
                   .split_tokens = split_tokens,
                   .group = group,
                   .group_pad = group_pad,
                   .scale = scale};
  const dim3 grid((max_len + split_tokens - 1) / split_tokens, p.num_kv_heads, p.num_seqs);
  switch (keys.format) {
    case MassKeyFormat::kFp16:
      LaunchDecodeMassScores<MassKeyFormat::kFp16>(a, grid, stream);
      break;
    case MassKeyFormat::kBf16:
      LaunchDecodeMassScores<MassKeyFormat::kBf16>(a, grid, stream);
      break;
    case MassKeyFormat::kFp8:
      LaunchDecodeMassScores<MassKeyFormat::kFp8>(a, grid, stream);
      break;
    case MassKeyFormat::kInt8:
      LaunchDecodeMassScores<MassKeyFormat::kInt8>(a, grid, stream);
      break;
    case MassKeyFormat::kTurbo:
      LaunchDecodeMassTurboScores(a, grid, stream);
      break;
  }
  WithGroupInstance(group, [&](auto g) {
    DecodeMassAddKernel<decltype(g)::value><<<grid, kMassThreads, 0, stream>>>(a);
  });
  return cudaGetLastError();
}

cudaError_t LaunchPrefillMass(const EvictPool& p, const PrefillMassChunk* chunks, int num_chunks,
                              int max_chunk_tokens, int max_chunk_keys, const float* q, int group,
                              int group_pad, const float* fresh_k, int64_t fresh_row_stride,
                              const float* prefix_k, int64_t prefix_stride_tokens, float scale,
                              float* row_stats, cudaStream_t stream) {
  if (num_chunks == 0 || max_chunk_tokens == 0) return cudaSuccess;
  if (group < 1 || group > kMaxGroup || p.head_dim > kMaxHeadDim || p.head_dim % 4 != 0) {
    return cudaErrorInvalidValue;
  }
  PrefillMassArgs a{.p = p,
                    .chunks = chunks,
                    .q = q,
                    .group = group,
                    .group_pad = group_pad,
                    .fresh_k = fresh_k,
                    .fresh_row_stride = fresh_row_stride,
                    .prefix_k = prefix_k,
                    .prefix_stride_tokens = prefix_stride_tokens,
                    .scale = scale,
                    .row_stats = row_stats};
  const size_t smem = static_cast<size_t>(PrefillMassSmemFloats(p.head_dim)) * sizeof(float);
  for (const void* kernel : {reinterpret_cast<const void*>(PrefillMassStatsKernel),
                             reinterpret_cast<const void*>(PrefillMassAddKernel)}) {
    if (cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                             static_cast<int>(smem));
        e != cudaSuccess) {
      return e;
    }
  }
  const int tokens_per_tile = kPmRows / group;
  PrefillMassStatsKernel<<<dim3((max_chunk_tokens + tokens_per_tile - 1) / tokens_per_tile,
                                num_chunks, p.num_kv_heads),
                           kPmThreads, smem, stream>>>(a);
  PrefillMassAddKernel<<<dim3((max_chunk_keys + kPmKeys - 1) / kPmKeys, num_chunks, p.num_kv_heads),
                         kPmThreads, smem, stream>>>(a);
  return cudaGetLastError();
}

}  // namespace kvgate::worker::cuda
