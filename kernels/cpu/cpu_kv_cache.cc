// CPU reference KvCache (kv_cache.h): block pool with a free list, block tables per sequence,
// append through the format's codec, prefill/decode attention with fp32 online softmax over
// chunks of the block table, the fp16 residual window (KIVI, TurboQuant), and H2O / sink eviction.
//
// Pool layout (bytes): [num_blocks][layer][kv_head][block_size][record_bytes(layer)], where a
// record is [key | value] of one token (kv_codec.h). Full-precision first/last layers use fp16
// records, so record_bytes varies by layer.
//
// Eviction (per (layer, kv-head), applied at the start of Append, i.e. after the evicted tokens
// were attended by the step that produced them): slots are compacted stably, so slot order stays
// position order; each slot remembers its position.
//   H2O, appending n tokens to reach length L: keep the old tokens among the newest
//   Recent(L) = floor(recent_fraction * L) positions, plus the Heavy(L) = floor(heavy_fraction * L)
//   other old tokens with the largest accumulated attention mass (ties keep the older token);
//   Recent is raised to 1 when both are 0. The mass of a slot is the sum, over every Prefill /
//   Decode call and over the group's query heads (and prefill's query tokens), of the softmax
//   probability it received.
//   Sink: keep the old tokens with position < sinks or position >= L - window. Keys stay as
//   appended (post-RoPE, original positions): positions are NOT re-assigned within the cache.
// The selection is the same for every format; what compaction does with the survivors depends on
// where they live:
//   - per-token records (fp16, bf16, fp8, int8, TurboQuant, KIVI solo keys): moved as they are;
//   - the fp16 residual window (KIVI, TurboQuant): rows moved within the window, which refills
//     from newer tokens and flushes as without eviction. The window is per kv-head (H2O keeps
//     different tokens per head, so heads hold different numbers of encoded slots);
//   - KIVI key groups (G tokens sharing per-channel (scale, min), spread over their records): a
//     group whose G tokens all survive moves as a unit, its codes and metadata untouched. A group
//     that loses some tokens cannot keep its metadata (the evicted records held part of it and
//     bytes per token stay fixed), so each survivor's key is re-encoded once, from its group
//     reconstruction, into a solo key (kv_codec.h: per token, (scale, min) per G channels, as KIVI
//     stores values); solo keys then move as per-token records and are never re-encoded. Every key
//     is thus quantized at most twice (its group's grid, then its own); values once. The cost: a
//     second rounding of those keys, per token rather than per channel (coarser for keys with
//     outlier channels), and a side flag per slot (LayerState::solo_keys) that the attention reads.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#include <mutex>
#include <numeric>
#include <shared_mutex>
#include <unordered_map>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "kernels/cpu/kv_codec.h"
#include "kernels/cpu/numeric.h"
#include "kvgate/kernels/kv_cache.h"

namespace kvgate::kernels {
namespace {

using cpu::HeadCodecState;
using cpu::KvCodec;

constexpr int kChunkTokens = 64;

template <class T>
T* Grow(std::vector<T>& v, size_t n) {
  if (v.size() < n) v.resize(n);
  return v.data();
}

// Per-thread scratch: grows to the largest call seen, then decode allocates nothing.
struct Scratch {
  std::vector<const uint8_t*> records;
  std::vector<float> keys, values, scores, straddle, prepared, sink_prepared, shifted, max, sum,
      acc, row;
};
Scratch& ThreadScratch() {
  thread_local Scratch scratch;
  return scratch;
}

// out = q rotated by -delta RoPE positions (rotate-half layout: pairs (j, j + d/2) at angle
// theta_j = inv_freq[j]): a post-RoPE query at position p becomes the same query at p - delta.
void ShiftRope(const float* q, const std::vector<double>& inv_freq, int64_t delta, int d,
               float* out) {
  const int half = d / 2;
  for (int j = 0; j < half; ++j) {
    const double angle = -static_cast<double>(delta) * inv_freq[j];
    const float c = static_cast<float>(std::cos(angle)), s = static_cast<float>(std::sin(angle));
    out[j] = q[j] * c - q[j + half] * s;
    out[j + half] = q[j + half] * c + q[j] * s;
  }
}

// One online-softmax step for one query: scores s[count] (already scaled, count <=
// 4 * kChunkTokens), values [count, d].
inline void SoftmaxUpdate(const float* s, int count, const float* values, int d, float* max,
                          float* sum, float* acc) {
  float chunk_max = -std::numeric_limits<float>::infinity();
  for (int i = 0; i < count; ++i) chunk_max = std::max(chunk_max, s[i]);
  if (chunk_max > *max) {
    const float factor = std::exp(*max - chunk_max);
    *sum *= factor;
    for (int c = 0; c < d; ++c) acc[c] *= factor;
    *max = chunk_max;
  }
  float p[kChunkTokens * 4];  // count <= chunk <= 4 * kChunkTokens (KIVI G <= 256)
  for (int i = 0; i < count; ++i) {
    p[i] = std::exp(s[i] - *max);
    *sum += p[i];
  }
  cpu::WeightedRowSum(p, values, count, d, acc);
}

class CpuKvCache final : public KvCache {
 public:
  static absl::StatusOr<std::unique_ptr<KvCache>> Create(const KvCacheConfig& config);

  const KvCacheConfig& config() const override { return config_; }
  const KvFormatDesc& desc() const override { return desc_; }
  int64_t free_blocks() const override {
    std::shared_lock lock(mu_);
    return static_cast<int64_t>(free_list_.size());
  }
  int64_t total_blocks() const override { return config_.num_blocks; }
  int64_t BlocksForTokens(int64_t num_tokens) const override {
    return num_tokens <= 0 ? 0 : (num_tokens + config_.block_size - 1) / config_.block_size;
  }
  int64_t bytes_per_token() const override { return bytes_per_token_; }
  int64_t allocated_bytes() const override { return static_cast<int64_t>(pool_.size()); }
  int64_t residual_bytes_per_sequence() const override { return residual_bytes_per_sequence_; }

  absl::Status AddSequence(SeqId seq, int64_t reserve_tokens) override;
  absl::Status Reserve(SeqId seq, int64_t num_tokens) override;
  void FreeSequence(SeqId seq) override;
  int64_t Length(SeqId seq, int layer) const override;
  int64_t StoredTokens(SeqId seq, int layer) const override;
  absl::Status Append(SeqId seq, int layer, int64_t n, const float* k, const float* v) override;
  absl::Status PrefillAttention(SeqId seq, int layer, int64_t n, int num_q_heads, const float* q,
                                const float* k, const float* v, float scale, float* out) override;
  absl::Status DecodeAttention(SeqId seq, int layer, int num_q_heads, const float* q, float scale,
                               float* out) override;
  absl::Status ReadStored(SeqId seq, int layer, int kv_head, float* k, float* v,
                          int64_t* positions) const override;
  absl::Status ReadAttentionMass(SeqId seq, int layer, int kv_head, float* mass) const override;

 private:
  struct LayerState {
    int64_t length = 0;  // logical tokens appended (positions 0 .. length-1)
    int64_t stored = 0;  // slots in use, the same for every kv-head
    // [kv_heads]: head h's slots [0, encoded[h]) live in blocks, [encoded[h], stored) in its fp16
    // residual window. Equal for every head unless eviction kept different tokens per head.
    std::vector<int64_t> encoded;
    std::vector<HeadCodecState> codec_state;       // [kv_heads]
    std::vector<uint16_t> residual_k, residual_v;  // [kv_heads, residual_capacity, head_dim] fp16
    std::vector<std::vector<int64_t>> positions;   // [kv_heads][stored] (eviction only)
    std::vector<std::vector<float>> mass;          // [kv_heads][stored] (H2O only)
    // [kv_heads][stored] (eviction with key groups of several tokens only): 1 where the slot's key
    // is solo (kv_codec.h); the other encoded slots form whole groups of G consecutive slots.
    std::vector<std::vector<uint8_t>> solo_keys;
  };
  struct Sequence {
    std::vector<int64_t> blocks;
    std::vector<LayerState> layers;
    int64_t reserved_length = 0;  // largest length asked for by AddSequence / Reserve
  };

  explicit CpuKvCache(const KvCacheConfig& config) : config_(config) {}

  bool evicting() const { return config_.format.eviction.kind != EvictionSpec::Kind::kNone; }
  bool h2o() const { return config_.format.eviction.kind == EvictionSpec::Kind::kH2O; }
  const KvCodec& codec(int layer) const { return *layer_codec_[layer]; }
  int residual_capacity(int layer) const {
    const KvCodec& c = codec(layer);
    return c.residual_tokens() > 0 ? c.residual_tokens() + c.residual_flush_tokens() : 0;
  }

  uint8_t* Record(const Sequence& s, int layer, int head, int64_t slot) const {
    const int bs = config_.block_size;
    return const_cast<uint8_t*>(pool_.data()) + s.blocks[slot / bs] * block_bytes_ +
           layer_offset_[layer] +
           (static_cast<int64_t>(head) * bs + slot % bs) * codec(layer).record_bytes();
  }

  int64_t KeepOld(int64_t length, int64_t n) const;
  int64_t ProjectedSlots(const LayerState& ls, int64_t length) const;
  int64_t SlotsNeeded(const Sequence& s, int64_t length) const;
  absl::Status GrowBlocks(Sequence& s, int64_t slots);  // mu_ held exclusively
  void TrimBlocks(Sequence& s);
  void Evict(Sequence& s, int layer, int64_t new_length, int64_t n);
  // Marks slots [0, stored) of head h to keep (H2O / sink selection).
  void SelectKept(const LayerState& ls, int head, int64_t new_length,
                  std::vector<char>* keep) const;
  // Encodes head h's oldest residual_flush_tokens() rows of its fp16 window (window_rows rows)
  // into blocks at slot encoded[head] and shifts the rest down.
  void FlushWindow(Sequence& s, int layer, int head, int64_t window_rows);
  void EncodeInto(Sequence& s, int layer, int64_t first_slot, int n, const float* k, const float* v,
                  int64_t stride_tokens);

  absl::StatusOr<Sequence*> Find(SeqId seq, int layer);
  absl::StatusOr<const Sequence*> Find(SeqId seq, int layer) const;

  // Calls fn(first_slot, count, scores, score_stride, values) over slots [0, end) of one head:
  // scores [num_queries][score_stride] (first `count` valid, multiplied by `scale`), values
  // [count, head_dim] (nullptr unless need_values; in the original basis if values_original).
  // Slots [0, sink_slots) are scored against sink_prepared instead of prepared (SinkShift).
  template <class Fn>
  void ForEachChunk(const Sequence& s, int layer, int head, int64_t end, int num_queries,
                    const float* prepared, float scale, bool need_values, bool values_original,
                    Fn&& fn, const float* sink_prepared = nullptr, int64_t sink_slots = 0) const;
  // Sink eviction with RoPE frequencies: the number of evicted tokens (the query shift for the
  // sink scores) and the sink slots; {0, 0} when nothing applies.
  struct SinkShift {
    int64_t delta = 0;
    int64_t slots = 0;
  };
  SinkShift SinkShiftFor(const LayerState& ls) const {
    const EvictionSpec& e = config_.format.eviction;
    if (e.kind != EvictionSpec::Kind::kSink || config_.rope_inv_freq.empty()) return {};
    const int64_t delta = ls.length - ls.stored;
    if (delta <= 0) return {};
    return {delta, std::min<int64_t>(e.sink_tokens, ls.stored)};
  }
  // Fills prepared [count, pq] with the prepared queries q_i (rows of q at q_stride, d floats
  // each) shifted back by `delta` RoPE positions.
  void PrepareShifted(const KvCodec& c, const float* q, int64_t q_stride, int count, int64_t delta,
                      float* prepared) const;

  KvCacheConfig config_;
  KvFormatDesc desc_;
  std::unique_ptr<KvCodec> format_codec_, fp16_codec_;
  std::vector<const KvCodec*> layer_codec_;  // [num_layers]
  std::vector<int64_t> layer_offset_;        // [num_layers] bytes into a block
  int64_t block_bytes_ = 0;
  int64_t bytes_per_token_ = 0;
  int64_t residual_bytes_per_sequence_ = 0;
  std::vector<uint8_t> pool_;

  mutable std::shared_mutex mu_;  // guards free_list_ and the sequence map's structure
  std::vector<int64_t> free_list_;
  std::unordered_map<SeqId, Sequence> seqs_;
};

absl::StatusOr<std::unique_ptr<KvCache>> CpuKvCache::Create(const KvCacheConfig& config) {
  if (config.num_layers <= 0 || config.num_kv_heads <= 0 || config.head_dim <= 0 ||
      config.block_size <= 0 || config.num_blocks < 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "KV cache config: num_layers, num_kv_heads, head_dim, block_size must be > 0 and "
        "num_blocks >= 0 (got ",
        config.num_layers, ", ", config.num_kv_heads, ", ", config.head_dim, ", ",
        config.block_size, ", ", config.num_blocks, ")"));
  }
  const auto& fmt = config.format;
  if (fmt.full_precision_first_layers < 0 || fmt.full_precision_last_layers < 0) {
    return absl::InvalidArgumentError("full-precision layer counts must be >= 0");
  }
  std::unique_ptr<CpuKvCache> cache(new CpuKvCache(config));
  auto desc = DescribeKvFormat(fmt, config.head_dim);
  if (!desc.ok()) return desc.status();
  cache->desc_ = *desc;
  auto format_codec = cpu::CreateKvCodec(fmt, config.head_dim);
  if (!format_codec.ok()) return format_codec.status();
  cache->format_codec_ = std::move(*format_codec);
  auto fp16 = cpu::CreateKvCodec(KvFormatSpec{}, config.head_dim);
  if (!fp16.ok()) return fp16.status();
  cache->fp16_codec_ = std::move(*fp16);

  int64_t offset = 0;
  for (int l = 0; l < config.num_layers; ++l) {
    const bool full = l < fmt.full_precision_first_layers ||
                      l >= config.num_layers - fmt.full_precision_last_layers;
    const KvCodec* c = full ? cache->fp16_codec_.get() : cache->format_codec_.get();
    cache->layer_codec_.push_back(c);
    cache->layer_offset_.push_back(offset);
    offset += static_cast<int64_t>(config.num_kv_heads) * config.block_size * c->record_bytes();
    cache->bytes_per_token_ += static_cast<int64_t>(config.num_kv_heads) * c->record_bytes();
    cache->residual_bytes_per_sequence_ += static_cast<int64_t>(config.num_kv_heads) *
                                           cache->residual_capacity(l) * config.head_dim * 2 * 2;
  }
  cache->block_bytes_ = offset;
  const double pool_bytes = static_cast<double>(offset) * static_cast<double>(config.num_blocks);
  if (pool_bytes > 1e12) {
    return absl::ResourceExhaustedError(absl::StrCat("KV pool of ", pool_bytes, " bytes"));
  }
  cache->pool_.assign(static_cast<size_t>(offset * config.num_blocks), 0);
  cache->free_list_.resize(config.num_blocks);
  // Pop from the back: hand out low block ids first.
  std::iota(cache->free_list_.rbegin(), cache->free_list_.rend(), 0);
  return std::unique_ptr<KvCache>(std::move(cache));
}

// ---- Block accounting ---------------------------------------------------------------------------

int64_t CpuKvCache::KeepOld(int64_t length, int64_t n) const {
  const EvictionSpec& e = config_.format.eviction;
  if (e.kind == EvictionSpec::Kind::kSink) {
    return e.sink_tokens + std::max<int64_t>(0, e.window_tokens - n);
  }
  int64_t heavy = static_cast<int64_t>(std::floor(e.heavy_fraction * length + 1e-9));
  int64_t recent = static_cast<int64_t>(std::floor(e.recent_fraction * length + 1e-9));
  if (heavy + recent == 0) recent = 1;
  return heavy + std::max<int64_t>(0, recent - n);
}

int64_t CpuKvCache::ProjectedSlots(const LayerState& ls, int64_t length) const {
  const int64_t n = std::max<int64_t>(0, length - ls.length);
  if (!evicting()) return ls.stored + n;
  // Eviction happens at the start of this layer's next append; until then every stored slot still
  // holds a token (a prompt's, or those of a layer that other layers' appends ran ahead of), so
  // TrimBlocks must keep at least the stored slots.
  return std::max(ls.stored, std::min(ls.stored, KeepOld(length, n)) + n);
}

int64_t CpuKvCache::SlotsNeeded(const Sequence& s, int64_t length) const {
  int64_t slots = 0;
  for (const LayerState& ls : s.layers) slots = std::max(slots, ProjectedSlots(ls, length));
  return slots;
}

absl::Status CpuKvCache::GrowBlocks(Sequence& s, int64_t slots) {
  const int64_t need = BlocksForTokens(slots) - static_cast<int64_t>(s.blocks.size());
  if (need <= 0) return absl::OkStatus();
  if (need > static_cast<int64_t>(free_list_.size())) {
    return absl::ResourceExhaustedError(
        absl::StrCat("KV cache: need ", need, " more blocks, ", free_list_.size(), " free"));
  }
  for (int64_t i = 0; i < need; ++i) {
    s.blocks.push_back(free_list_.back());
    free_list_.pop_back();
  }
  return absl::OkStatus();
}

void CpuKvCache::TrimBlocks(Sequence& s) {
  int64_t length = s.reserved_length;
  for (const LayerState& ls : s.layers) length = std::max(length, ls.length);
  const int64_t keep = BlocksForTokens(SlotsNeeded(s, length));
  if (keep >= static_cast<int64_t>(s.blocks.size())) return;
  std::unique_lock lock(mu_);
  while (static_cast<int64_t>(s.blocks.size()) > keep) {
    free_list_.push_back(s.blocks.back());
    s.blocks.pop_back();
  }
}

absl::Status CpuKvCache::AddSequence(SeqId seq, int64_t reserve_tokens) {
  if (reserve_tokens < 0) return absl::InvalidArgumentError("reserve_tokens < 0");
  std::unique_lock lock(mu_);
  if (seqs_.count(seq)) return absl::AlreadyExistsError(absl::StrCat("sequence ", seq));
  Sequence s;
  s.layers.resize(config_.num_layers);
  for (int l = 0; l < config_.num_layers; ++l) {
    LayerState& ls = s.layers[l];
    ls.encoded.assign(config_.num_kv_heads, 0);
    ls.codec_state.resize(config_.num_kv_heads);
    const size_t residual =
        static_cast<size_t>(config_.num_kv_heads) * residual_capacity(l) * config_.head_dim;
    ls.residual_k.resize(residual);
    ls.residual_v.resize(residual);
    if (evicting()) ls.positions.resize(config_.num_kv_heads);
    if (h2o()) ls.mass.resize(config_.num_kv_heads);
    if (evicting() && codec(l).key_group_tokens() > 1) ls.solo_keys.resize(config_.num_kv_heads);
  }
  s.reserved_length = reserve_tokens;
  absl::Status status = GrowBlocks(s, SlotsNeeded(s, reserve_tokens));
  if (!status.ok()) {
    for (int64_t b : s.blocks) free_list_.push_back(b);
    return status;
  }
  seqs_.emplace(seq, std::move(s));
  return absl::OkStatus();
}

absl::Status CpuKvCache::Reserve(SeqId seq, int64_t num_tokens) {
  std::unique_lock lock(mu_);
  auto it = seqs_.find(seq);
  if (it == seqs_.end()) return absl::NotFoundError(absl::StrCat("sequence ", seq));
  Sequence& s = it->second;
  absl::Status status = GrowBlocks(s, SlotsNeeded(s, num_tokens));
  if (status.ok()) s.reserved_length = std::max(s.reserved_length, num_tokens);
  return status;
}

void CpuKvCache::FreeSequence(SeqId seq) {
  std::unique_lock lock(mu_);
  auto it = seqs_.find(seq);
  if (it == seqs_.end()) return;
  for (int64_t b : it->second.blocks) free_list_.push_back(b);
  seqs_.erase(it);
}

absl::StatusOr<CpuKvCache::Sequence*> CpuKvCache::Find(SeqId seq, int layer) {
  std::shared_lock lock(mu_);
  auto it = seqs_.find(seq);
  if (it == seqs_.end()) return absl::NotFoundError(absl::StrCat("KV cache: sequence ", seq));
  if (layer < 0 || layer >= config_.num_layers) {
    return absl::InvalidArgumentError(absl::StrCat("KV cache: layer ", layer, " out of range"));
  }
  return &it->second;
}
absl::StatusOr<const CpuKvCache::Sequence*> CpuKvCache::Find(SeqId seq, int layer) const {
  auto found = const_cast<CpuKvCache*>(this)->Find(seq, layer);
  if (!found.ok()) return found.status();
  return *found;
}

int64_t CpuKvCache::Length(SeqId seq, int layer) const {
  auto s = Find(seq, layer);
  return s.ok() ? (*s)->layers[layer].length : -1;
}
int64_t CpuKvCache::StoredTokens(SeqId seq, int layer) const {
  auto s = Find(seq, layer);
  return s.ok() ? (*s)->layers[layer].stored : -1;
}

// ---- Append -------------------------------------------------------------------------------------

void CpuKvCache::EncodeInto(Sequence& s, int layer, int64_t first_slot, int n, const float* k,
                            const float* v, int64_t stride_tokens) {
  Scratch& scratch = ThreadScratch();
  const uint8_t** recs = Grow(scratch.records, n);
  const int d = config_.head_dim;
  LayerState& ls = s.layers[layer];
  for (int h = 0; h < config_.num_kv_heads; ++h) {
    for (int i = 0; i < n; ++i) recs[i] = Record(s, layer, h, first_slot + i);
    codec(layer).Encode(n, k + h * d, v + h * d, stride_tokens, ls.codec_state[h],
                        const_cast<uint8_t* const*>(recs));
  }
}

void CpuKvCache::FlushWindow(Sequence& s, int layer, int head, int64_t window_rows) {
  LayerState& ls = s.layers[layer];
  const KvCodec& c = codec(layer);
  const int flush = c.residual_flush_tokens(), d = config_.head_dim;
  const size_t base = static_cast<size_t>(head) * residual_capacity(layer) * d;
  uint16_t* rk = &ls.residual_k[base];
  uint16_t* rv = &ls.residual_v[base];
  Scratch& scratch = ThreadScratch();
  float* k = Grow(scratch.keys, static_cast<size_t>(flush) * d);
  float* v = Grow(scratch.values, static_cast<size_t>(flush) * d);
  for (size_t e = 0; e < static_cast<size_t>(flush) * d; ++e) {
    k[e] = cpu::HalfToFloat(rk[e]);
    v[e] = cpu::HalfToFloat(rv[e]);
  }
  const uint8_t** recs = Grow(scratch.records, flush);
  for (int i = 0; i < flush; ++i) recs[i] = Record(s, layer, head, ls.encoded[head] + i);
  c.Encode(flush, k, v, d, ls.codec_state[head], const_cast<uint8_t* const*>(recs));
  const size_t remaining = static_cast<size_t>(window_rows - flush) * d;
  std::memmove(rk, rk + static_cast<size_t>(flush) * d, sizeof(uint16_t) * remaining);
  std::memmove(rv, rv + static_cast<size_t>(flush) * d, sizeof(uint16_t) * remaining);
  ls.encoded[head] += flush;
}

void CpuKvCache::SelectKept(const LayerState& ls, int head, int64_t new_length,
                            std::vector<char>* keep) const {
  const EvictionSpec& e = config_.format.eviction;
  const std::vector<int64_t>& pos = ls.positions[head];
  if (e.kind == EvictionSpec::Kind::kSink) {
    for (int64_t i = 0; i < ls.stored; ++i) {
      (*keep)[i] = pos[i] < e.sink_tokens || pos[i] >= new_length - e.window_tokens;
    }
    return;
  }
  int64_t heavy = static_cast<int64_t>(std::floor(e.heavy_fraction * new_length + 1e-9));
  int64_t recent = static_cast<int64_t>(std::floor(e.recent_fraction * new_length + 1e-9));
  if (heavy + recent == 0) recent = 1;
  std::vector<int64_t> others;
  for (int64_t i = 0; i < ls.stored; ++i) {
    (*keep)[i] = pos[i] >= new_length - recent;
    if (!(*keep)[i]) others.push_back(i);
  }
  const std::vector<float>& mass = ls.mass[head];
  const int64_t take = std::min<int64_t>(heavy, static_cast<int64_t>(others.size()));
  std::partial_sort(others.begin(), others.begin() + take, others.end(), [&](int64_t a, int64_t b) {
    return mass[a] != mass[b] ? mass[a] > mass[b] : pos[a] < pos[b];
  });
  for (int64_t i = 0; i < take; ++i) (*keep)[others[i]] = 1;
}

void CpuKvCache::Evict(Sequence& s, int layer, int64_t new_length, int64_t n) {
  LayerState& ls = s.layers[layer];
  if (ls.stored <= 0) return;
  if (h2o() && ls.stored <= KeepOld(new_length, n)) return;
  const KvCodec& c = codec(layer);
  const int record_bytes = c.record_bytes(), group = c.key_group_tokens(), d = config_.head_dim;
  const int cap = residual_capacity(layer);
  const bool grouped = !ls.solo_keys.empty();
  std::vector<char> keep(ls.stored);
  std::vector<float> group_keys(grouped ? static_cast<size_t>(group) * d : 0);
  std::vector<const uint8_t*> group_records(grouped ? group : 0);
  int64_t kept = 0;
  for (int h = 0; h < config_.num_kv_heads; ++h) {
    SelectKept(ls, h, new_length, &keep);
    std::vector<int64_t>& pos = ls.positions[h];
    float* mass = h2o() ? ls.mass[h].data() : nullptr;
    uint8_t* solo = grouped ? ls.solo_keys[h].data() : nullptr;
    // Slots move down only (dst <= src), in order, so slot order stays position order.
    auto move_slot = [&](int64_t from, int64_t to) {
      pos[to] = pos[from];
      if (mass != nullptr) mass[to] = mass[from];
      if (solo != nullptr) solo[to] = solo[from];
    };
    auto move_record = [&](int64_t from, int64_t to) {
      if (from == to) return;
      std::memcpy(Record(s, layer, h, to), Record(s, layer, h, from), record_bytes);
      move_slot(from, to);
    };
    const int64_t encoded = ls.encoded[h];
    int64_t dst = 0;
    for (int64_t src = 0; src < encoded;) {
      if (solo == nullptr || solo[src]) {  // a per-token record
        if (keep[src]) move_record(src, dst++);
        ++src;
        continue;
      }
      // A whole key group [src, src + group).
      int survivors = 0;
      for (int i = 0; i < group; ++i) survivors += keep[src + i] ? 1 : 0;
      if (survivors == group) {
        for (int i = 0; i < group; ++i) move_record(src + i, dst++);
      } else if (survivors > 0) {
        // Decode the whole group before moving: a survivor may land on a member's slot.
        for (int i = 0; i < group; ++i) group_records[i] = Record(s, layer, h, src + i);
        c.DecodeKeys(group, group_records.data(), ls.codec_state[h], group_keys.data());
        for (int i = 0; i < group; ++i) {
          if (!keep[src + i]) continue;
          move_record(src + i, dst);
          uint8_t* record = Record(s, layer, h, dst);
          c.EncodeSoloKeys(1, group_keys.data() + static_cast<size_t>(i) * d, &record);
          solo[dst++] = 1;
        }
      }
      src += group;
    }
    ls.encoded[h] = dst;
    if (cap > 0) {  // the fp16 window: slot i is row i - encoded
      const size_t base = static_cast<size_t>(h) * cap * d;
      uint16_t* rk = &ls.residual_k[base];
      uint16_t* rv = &ls.residual_v[base];
      for (int64_t src = encoded; src < ls.stored; ++src) {
        if (!keep[src]) continue;
        const int64_t from = src - encoded, to = dst - ls.encoded[h];
        if (from != to) {
          std::memcpy(rk + to * d, rk + from * d, sizeof(uint16_t) * d);
          std::memcpy(rv + to * d, rv + from * d, sizeof(uint16_t) * d);
        }
        if (src != dst) move_slot(src, dst);
        ++dst;
      }
    }
    pos.resize(dst);
    if (mass != nullptr) ls.mass[h].resize(dst);
    if (solo != nullptr) ls.solo_keys[h].resize(dst);
    kept = dst;
  }
  ls.stored = kept;
}

absl::Status CpuKvCache::Append(SeqId seq, int layer, int64_t n, const float* k, const float* v) {
  auto found = Find(seq, layer);
  if (!found.ok()) return found.status();
  Sequence& s = **found;
  if (n < 0) return absl::InvalidArgumentError("Append: n < 0");
  if (n == 0) return absl::OkStatus();
  if (k == nullptr || v == nullptr) return absl::InvalidArgumentError("Append: null k or v");
  LayerState& ls = s.layers[layer];
  if (evicting()) Evict(s, layer, ls.length + n, n);
  const int64_t capacity = static_cast<int64_t>(s.blocks.size()) * config_.block_size;
  if (ls.stored + n > capacity) {
    return absl::FailedPreconditionError(absl::StrCat(
        "Append: sequence ", seq, " layer ", layer, " holds ", ls.stored,
        " tokens and has room for ", capacity, "; Reserve(", ls.length + n, ") first"));
  }
  const int heads = config_.num_kv_heads, d = config_.head_dim;
  const int64_t stride = static_cast<int64_t>(heads) * d;
  const KvCodec& c = codec(layer);
  for (int h = 0; h < heads; ++h)
    c.ChooseScales(n, k + h * d, v + h * d, stride, &ls.codec_state[h]);
  if (evicting()) {
    for (int h = 0; h < heads; ++h) {
      for (int64_t i = 0; i < n; ++i) ls.positions[h].push_back(ls.length + i);
      if (h2o()) ls.mass[h].resize(ls.stored + n, 0.0f);
      if (!ls.solo_keys.empty()) ls.solo_keys[h].resize(ls.stored + n, 0);
    }
  }
  if (c.residual_tokens() > 0) {
    // Each head's window takes the rows in order and flushes its oldest whenever it is full
    // (residual_tokens() + residual_flush_tokens() rows).
    const int cap = residual_capacity(layer), flush = c.residual_flush_tokens();
    for (int h = 0; h < heads; ++h) {
      const size_t base = static_cast<size_t>(h) * cap * d;
      int64_t window = ls.stored - ls.encoded[h];
      for (int64_t i = 0; i < n; ++i) {
        const float* src_k = k + i * stride + h * d;
        const float* src_v = v + i * stride + h * d;
        uint16_t* dst_k = &ls.residual_k[base + window * d];
        uint16_t* dst_v = &ls.residual_v[base + window * d];
        for (int e = 0; e < d; ++e) {
          dst_k[e] = cpu::FloatToHalf(src_k[e]);
          dst_v[e] = cpu::FloatToHalf(src_v[e]);
        }
        if (++window == cap) {
          // The flush writes slots [encoded, encoded + flush) < stored + n <= capacity.
          FlushWindow(s, layer, h, window);
          window -= flush;
        }
      }
    }
    ls.stored += n;
  } else {
    for (int64_t i0 = 0; i0 < n; i0 += kChunkTokens) {
      const int count = static_cast<int>(std::min<int64_t>(kChunkTokens, n - i0));
      EncodeInto(s, layer, ls.stored + i0, count, k + i0 * stride, v + i0 * stride, stride);
    }
    ls.stored += n;
    std::fill(ls.encoded.begin(), ls.encoded.end(), ls.stored);
  }
  ls.length += n;
  if (evicting()) TrimBlocks(s);
  return absl::OkStatus();
}

// ---- Attention ----------------------------------------------------------------------------------

void CpuKvCache::PrepareShifted(const KvCodec& c, const float* q, int64_t q_stride, int count,
                                int64_t delta, float* prepared) const {
  const int d = config_.head_dim;
  float* shifted = Grow(ThreadScratch().shifted, d);
  for (int i = 0; i < count; ++i) {
    ShiftRope(q + i * q_stride, config_.rope_inv_freq, delta, d, shifted);
    c.PrepareQuery(shifted, prepared + static_cast<int64_t>(i) * c.prepared_query_floats());
  }
}

template <class Fn>
void CpuKvCache::ForEachChunk(const Sequence& s, int layer, int head, int64_t end, int num_queries,
                              const float* prepared, float scale, bool need_values,
                              bool values_original, Fn&& fn, const float* sink_prepared,
                              int64_t sink_slots) const {
  const LayerState& ls = s.layers[layer];
  const KvCodec& c = codec(layer);
  const int d = config_.head_dim, pq = c.prepared_query_floats();
  const int group = c.key_group_tokens();
  const int chunk = ((kChunkTokens + group - 1) / group) * group;
  Scratch& scratch = ThreadScratch();
  const uint8_t** recs = Grow(scratch.records, chunk);
  float* keys = Grow(scratch.keys, static_cast<size_t>(chunk) * d);
  float* values = Grow(scratch.values, static_cast<size_t>(chunk) * d);
  float* scores = Grow(scratch.scores, static_cast<size_t>(num_queries) * chunk);
  const int64_t encoded = ls.encoded[head], encoded_end = std::min(end, encoded);
  const uint8_t* solo = ls.solo_keys.empty() ? nullptr : ls.solo_keys[head].data();
  auto is_solo = [&](int64_t slot) { return solo != nullptr && solo[slot] != 0; };
  const int64_t sink_end = sink_prepared != nullptr ? std::min(sink_slots, encoded_end) : 0;
  // Chunks of the encoded slots are homogeneous: a run of solo keys, or whole key groups (for
  // per-token formats, groups of one). They stop at sink_end, except that a key group may straddle
  // it (sink eviction with key groups: a group flushed from the window can hold sinks and later
  // tokens); such a chunk is scored against both query sets. A chunk may also decode a group past
  // `end` (prefill's fresh tokens), whose scores are left unused.
  for (int64_t c0 = 0; c0 < encoded_end;) {
    const bool sink = c0 < sink_end;
    const bool solo_run = is_solo(c0);
    int64_t c1 = c0;
    if (solo_run) {
      const int64_t limit = std::min<int64_t>(sink ? sink_end : encoded_end, c0 + chunk);
      while (c1 < limit && is_solo(c1)) ++c1;
    } else {
      do {
        c1 += group;
      } while (c1 < encoded_end && c1 + group - c0 <= chunk && !is_solo(c1) &&
               !(sink && c1 >= sink_end));
    }
    const int decode = static_cast<int>(c1 - c0);
    const int valid = static_cast<int>(std::min(c1, encoded_end) - c0);
    for (int i = 0; i < decode; ++i) recs[i] = Record(s, layer, head, c0 + i);
    auto score = [&](const float* queries, float* out) {
      if (!solo_run) {
        c.KeyScores(decode, recs, ls.codec_state[head], num_queries, queries, out, keys);
        return;
      }
      c.DecodeSoloKeys(decode, recs, ls.codec_state[head], keys);
      for (int j = 0; j < num_queries; ++j) {
        for (int i = 0; i < decode; ++i) {
          out[j * decode + i] = cpu::Dot(queries + j * pq, keys + i * d, d);
        }
      }
    };
    score(sink ? sink_prepared : prepared, scores);
    if (sink && c1 > sink_end) {  // the straddling group: slots >= sink_end use the plain queries
      float* plain = Grow(scratch.straddle, static_cast<size_t>(num_queries) * decode);
      score(prepared, plain);
      for (int j = 0; j < num_queries; ++j) {
        for (int i = static_cast<int>(sink_end - c0); i < decode; ++i) {
          scores[j * decode + i] = plain[j * decode + i];
        }
      }
    }
    for (int j = 0; j < num_queries; ++j) {
      for (int i = 0; i < valid; ++i) scores[j * decode + i] *= scale;
    }
    const float* vals = nullptr;
    if (need_values) {
      c.DecodeValues(valid, recs, ls.codec_state[head], values);
      if (values_original && c.rotated_values()) {
        for (int i = 0; i < valid; ++i) c.ValueToOriginal(values + i * d);
      }
      vals = values;
    }
    fn(c0, valid, scores, decode, vals);
    c0 += valid;
  }
  // The fp16 residual window (KIVI, TurboQuant), stored in the original basis: keys are mapped
  // into the key domain of the prepared queries (whose first d floats are the query in that
  // domain), values into the value domain unless the caller wants original values. Sink slots
  // still in the window are scored against the sink queries.
  const int cap = residual_capacity(layer);
  for (int64_t c0 = encoded; c0 < end; c0 += chunk) {
    const int valid = static_cast<int>(std::min<int64_t>(chunk, end - c0));
    const size_t base = (static_cast<size_t>(head) * cap + (c0 - encoded)) * d;
    for (int64_t e = 0; e < static_cast<int64_t>(valid) * d; ++e) {
      keys[e] = cpu::HalfToFloat(ls.residual_k[base + e]);
      values[e] = cpu::HalfToFloat(ls.residual_v[base + e]);
    }
    for (int i = 0; i < valid; ++i) {
      if (c.rotated_keys()) c.OriginalToKeyDomain(keys + i * d);
      if (need_values && !values_original && c.rotated_values()) {
        c.OriginalToValueDomain(values + i * d);
      }
    }
    for (int j = 0; j < num_queries; ++j) {
      for (int i = 0; i < valid; ++i) {
        const bool sink_row = sink_prepared != nullptr && c0 + i < sink_slots;
        const float* query = (sink_row ? sink_prepared : prepared) + j * pq;
        scores[j * valid + i] = scale * cpu::Dot(query, keys + i * d, d);
      }
    }
    fn(c0, valid, scores, valid, need_values ? values : nullptr);
  }
}

absl::Status CpuKvCache::DecodeAttention(SeqId seq, int layer, int num_q_heads, const float* q,
                                         float scale, float* out) {
  auto found = Find(seq, layer);
  if (!found.ok()) return found.status();
  const Sequence& s = **found;
  const int heads = config_.num_kv_heads, d = config_.head_dim;
  if (num_q_heads <= 0 || num_q_heads % heads != 0) {
    return absl::InvalidArgumentError(absl::StrCat("DecodeAttention: num_q_heads ", num_q_heads,
                                                   " is not a multiple of num_kv_heads ", heads));
  }
  if (q == nullptr || out == nullptr) return absl::InvalidArgumentError("null q or out");
  const LayerState& ls = s.layers[layer];
  const KvCodec& c = codec(layer);
  const int group = num_q_heads / heads, pq = c.prepared_query_floats();
  Scratch& scratch = ThreadScratch();
  float* prepared = Grow(scratch.prepared, static_cast<size_t>(group) * pq);
  const SinkShift sink = SinkShiftFor(ls);
  float* sink_prepared =
      sink.slots > 0 ? Grow(scratch.sink_prepared, static_cast<size_t>(group) * pq) : nullptr;
  float* max = Grow(scratch.max, group);
  float* sum = Grow(scratch.sum, group);
  float* acc = Grow(scratch.acc, static_cast<size_t>(group) * d);
  for (int h = 0; h < heads; ++h) {
    for (int j = 0; j < group; ++j) c.PrepareQuery(q + (h * group + j) * d, prepared + j * pq);
    if (sink_prepared != nullptr) {
      PrepareShifted(c, q + h * group * d, d, group, sink.delta, sink_prepared);
    }
    std::fill(max, max + group, -std::numeric_limits<float>::infinity());
    std::fill(sum, sum + group, 0.0f);
    std::fill(acc, acc + static_cast<size_t>(group) * d, 0.0f);
    ForEachChunk(
        s, layer, h, ls.stored, group, prepared, scale, /*need_values=*/true,
        /*values_original=*/false,
        [&](int64_t, int count, const float* scores, int stride, const float* values) {
          for (int j = 0; j < group; ++j) {
            SoftmaxUpdate(scores + j * stride, count, values, d, &max[j], &sum[j], acc + j * d);
          }
        },
        sink_prepared, sink.slots);
    for (int j = 0; j < group; ++j) {
      float* o = out + (h * group + j) * d;
      const float inv = sum[j] > 0 ? 1.0f / sum[j] : 0.0f;
      for (int e = 0; e < d; ++e) o[e] = acc[j * d + e] * inv;
      if (c.rotated_values()) c.ValueToOriginal(o);
    }
    if (h2o()) {  // second pass: add each key's final probability mass
      float* mass = const_cast<float*>(ls.mass[h].data());
      ForEachChunk(s, layer, h, ls.stored, group, prepared, scale, /*need_values=*/false, false,
                   [&](int64_t first, int count, const float* scores, int stride, const float*) {
                     for (int j = 0; j < group; ++j) {
                       if (!(sum[j] > 0)) continue;
                       const float inv = 1.0f / sum[j];
                       for (int i = 0; i < count; ++i) {
                         mass[first + i] += std::exp(scores[j * stride + i] - max[j]) * inv;
                       }
                     }
                   });
    }
  }
  return absl::OkStatus();
}

absl::Status CpuKvCache::PrefillAttention(SeqId seq, int layer, int64_t n, int num_q_heads,
                                          const float* q, const float* k, const float* v,
                                          float scale, float* out) {
  auto found = Find(seq, layer);
  if (!found.ok()) return found.status();
  const Sequence& s = **found;
  const int heads = config_.num_kv_heads, d = config_.head_dim;
  if (num_q_heads <= 0 || num_q_heads % heads != 0) {
    return absl::InvalidArgumentError(absl::StrCat("PrefillAttention: num_q_heads ", num_q_heads,
                                                   " is not a multiple of num_kv_heads ", heads));
  }
  if (n < 0) return absl::InvalidArgumentError("PrefillAttention: n < 0");
  if (n == 0) return absl::OkStatus();
  if (!q || !k || !v || !out) return absl::InvalidArgumentError("null q, k, v or out");
  const LayerState& ls = s.layers[layer];
  if (n > ls.stored) {
    return absl::FailedPreconditionError(absl::StrCat(
        "PrefillAttention: ", n, " fresh tokens but only ", ls.stored, " stored; Append first"));
  }
  const KvCodec& c = codec(layer);
  const int group = num_q_heads / heads, pq = c.prepared_query_floats();
  const int64_t queries = n * group, cached = ls.stored - n;
  const int64_t q_stride = static_cast<int64_t>(num_q_heads) * d;
  const int64_t kv_stride = static_cast<int64_t>(heads) * d;
  Scratch& scratch = ThreadScratch();
  float* prepared = Grow(scratch.prepared, static_cast<size_t>(queries) * pq);
  const SinkShift sink = SinkShiftFor(ls);
  float* sink_prepared =
      sink.slots > 0 ? Grow(scratch.sink_prepared, static_cast<size_t>(queries) * pq) : nullptr;
  float* max = Grow(scratch.max, queries);
  float* sum = Grow(scratch.sum, queries);
  float* acc = Grow(scratch.acc, static_cast<size_t>(queries) * d);
  float* row = Grow(scratch.row, n);
  for (int h = 0; h < heads; ++h) {
    // Query (i, j): token i, query head h * group + j; index i * group + j.
    auto query = [&](int64_t i, int j) { return q + i * q_stride + (h * group + j) * d; };
    for (int64_t i = 0; i < n; ++i) {
      for (int j = 0; j < group; ++j) c.PrepareQuery(query(i, j), prepared + (i * group + j) * pq);
      if (sink_prepared != nullptr) {
        PrepareShifted(c, query(i, 0), d, group, sink.delta, sink_prepared + i * group * pq);
      }
    }
    std::fill(max, max + queries, -std::numeric_limits<float>::infinity());
    std::fill(sum, sum + queries, 0.0f);
    std::fill(acc, acc + static_cast<size_t>(queries) * d, 0.0f);
    ForEachChunk(
        s, layer, h, cached, static_cast<int>(queries), prepared, scale, true,
        /*values_original=*/true,
        [&](int64_t, int count, const float* scores, int stride, const float* values) {
          for (int64_t x = 0; x < queries; ++x) {
            SoftmaxUpdate(scores + x * stride, count, values, d, &max[x], &sum[x], acc + x * d);
          }
        },
        sink_prepared, sink.slots);
    // Fresh tokens in full precision, causal.
    for (int64_t i = 0; i < n; ++i) {
      for (int j = 0; j < group; ++j) {
        const int64_t x = i * group + j;
        for (int64_t t = 0; t <= i; ++t) {
          row[t] = scale * cpu::Dot(query(i, j), k + t * kv_stride + h * d, d);
        }
        float chunk_max = max[x];
        for (int64_t t = 0; t <= i; ++t) chunk_max = std::max(chunk_max, row[t]);
        const float factor = std::exp(max[x] - chunk_max);
        sum[x] *= factor;
        for (int e = 0; e < d; ++e) acc[x * d + e] *= factor;
        max[x] = chunk_max;
        for (int64_t t = 0; t <= i; ++t) {
          const float p = std::exp(row[t] - chunk_max);
          sum[x] += p;
          cpu::Axpy(p, v + t * kv_stride + h * d, acc + x * d, d);
        }
        float* o = out + i * q_stride + (h * group + j) * d;
        const float inv = sum[x] > 0 ? 1.0f / sum[x] : 0.0f;
        for (int e = 0; e < d; ++e) o[e] = acc[x * d + e] * inv;
      }
    }
    if (h2o()) {
      float* mass = const_cast<float*>(ls.mass[h].data());
      ForEachChunk(s, layer, h, cached, static_cast<int>(queries), prepared, scale, false, false,
                   [&](int64_t first, int count, const float* scores, int stride, const float*) {
                     for (int64_t x = 0; x < queries; ++x) {
                       const float inv = 1.0f / sum[x];
                       for (int i = 0; i < count; ++i) {
                         mass[first + i] += std::exp(scores[x * stride + i] - max[x]) * inv;
                       }
                     }
                   });
      for (int64_t i = 0; i < n; ++i) {
        for (int j = 0; j < group; ++j) {
          const int64_t x = i * group + j;
          for (int64_t t = 0; t <= i; ++t) {
            const float score = scale * cpu::Dot(query(i, j), k + t * kv_stride + h * d, d);
            mass[cached + t] += std::exp(score - max[x]) / sum[x];
          }
        }
      }
    }
  }
  return absl::OkStatus();
}

absl::Status CpuKvCache::ReadStored(SeqId seq, int layer, int kv_head, float* k, float* v,
                                    int64_t* positions) const {
  auto found = Find(seq, layer);
  if (!found.ok()) return found.status();
  if (kv_head < 0 || kv_head >= config_.num_kv_heads) {
    return absl::InvalidArgumentError("ReadStored: kv_head out of range");
  }
  const Sequence& s = **found;
  const LayerState& ls = s.layers[layer];
  const KvCodec& c = codec(layer);
  const int d = config_.head_dim, group = c.key_group_tokens();
  const int64_t encoded = ls.encoded[kv_head];
  const uint8_t* solo = ls.solo_keys.empty() ? nullptr : ls.solo_keys[kv_head].data();
  std::vector<const uint8_t*> recs;
  for (int64_t i = 0; i < encoded; ++i) recs.push_back(Record(s, layer, kv_head, i));
  std::vector<float> keys(static_cast<size_t>(group) * d);
  for (int64_t i = 0; i < encoded;) {  // solo keys one by one, key groups whole
    const bool solo_key = solo != nullptr && solo[i] != 0;
    const int count = solo_key ? 1 : group;
    if (solo_key) {
      c.DecodeSoloKeys(1, recs.data() + i, ls.codec_state[kv_head], keys.data());
    } else {
      c.DecodeKeys(count, recs.data() + i, ls.codec_state[kv_head], keys.data());
    }
    for (int t = 0; t < count; ++t) {
      c.KeyToOriginal(keys.data() + t * d);
      std::memcpy(k + (i + t) * d, keys.data() + t * d, sizeof(float) * d);
    }
    i += count;
  }
  if (encoded > 0) {
    c.DecodeValues(static_cast<int>(encoded), recs.data(), ls.codec_state[kv_head], v);
  }
  for (int64_t i = 0; i < encoded; ++i) c.ValueToOriginal(v + i * d);
  const int cap = residual_capacity(layer);
  for (int64_t i = encoded; i < ls.stored; ++i) {
    const size_t base = (static_cast<size_t>(kv_head) * cap + (i - encoded)) * d;
    for (int e = 0; e < d; ++e) {
      k[i * d + e] = cpu::HalfToFloat(ls.residual_k[base + e]);
      v[i * d + e] = cpu::HalfToFloat(ls.residual_v[base + e]);
    }
  }
  for (int64_t i = 0; i < ls.stored; ++i) {
    positions[i] = evicting() ? ls.positions[kv_head][i] : i;
  }
  return absl::OkStatus();
}

absl::Status CpuKvCache::ReadAttentionMass(SeqId seq, int layer, int kv_head, float* mass) const {
  auto found = Find(seq, layer);
  if (!found.ok()) return found.status();
  if (kv_head < 0 || kv_head >= config_.num_kv_heads) {
    return absl::InvalidArgumentError("ReadAttentionMass: kv_head out of range");
  }
  if (!h2o()) {
    return absl::FailedPreconditionError(
        "ReadAttentionMass: attention mass is accumulated for H2O eviction only");
  }
  const std::vector<float>& m = (*found)->layers[layer].mass[kv_head];
  std::copy(m.begin(), m.end(), mass);
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<std::unique_ptr<KvCache>> CreateCpuKvCache(const KvCacheConfig& config) {
  return CpuKvCache::Create(config);
}

}  // namespace kvgate::kernels
