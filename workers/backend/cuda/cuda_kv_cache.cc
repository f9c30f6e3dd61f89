#include "workers/backend/cuda/cuda_kv_cache.h"

#include <algorithm>
#include <cmath>
#include <utility>

#include "absl/strings/str_cat.h"
#include "kernels/cuda/device_array.h"
#include "kvgate/common/status_macros.h"
#include "kvgate/kernels/kv_format.h"
#include "workers/backend/cuda/cuda_kernels.h"
#include "workers/backend/cuda/cuda_status.h"

namespace kvgate::worker::cuda {
namespace {

using kernels::cuda::SplitStoredTokens;

using kernels::cuda::DeviceArray;

// The decode kernels run GQA groups of 1, 2, 4 or 8 query heads per kv-head.
int PadGroup(int group) {
  int pad = 1;
  while (pad < group) pad *= 2;
  return pad;
}

constexpr int kMaxDecodeGroup = 8;
// Tokens per append call of AppendSynthetic (its random K/V source: 32 MiB at 8 x 128 heads).
constexpr int64_t kSyntheticChunk = 4096;

// AppendSynthetic's K/V source: `rows` rows of `row_floats` uniform values of unit variance in k
// and v (seeds `seed` and ~seed), enqueued on `stream`.
absl::Status FillSyntheticKv(int64_t rows, int64_t row_floats, uint64_t seed, cudaStream_t stream,
                             DeviceArray<float>& k, DeviceArray<float>& v) {
  CUDA_RETURN_IF_ERROR(k.Allocate(rows * row_floats));
  CUDA_RETURN_IF_ERROR(v.Allocate(rows * row_floats));
  const float bound = std::sqrt(3.0f);
  CUDA_RETURN_IF_ERROR(LaunchFillUniformFloat(k.get(), rows * row_floats, seed, bound, stream));
  CUDA_RETURN_IF_ERROR(LaunchFillUniformFloat(v.get(), rows * row_floats, ~seed, bound, stream));
  return absl::OkStatus();
}

}  // namespace

absl::Status CudaKvCache::InitLayout() {
  const kernels::KvCacheConfig& c = config_;
  if (c.num_layers <= 0 || c.num_kv_heads <= 0 || c.head_dim <= 0 || c.block_size <= 0 ||
      c.num_blocks < 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "KV cache config: num_layers, num_kv_heads, head_dim, block_size must be > 0 and "
        "num_blocks >= 0 (got ",
        c.num_layers, ", ", c.num_kv_heads, ", ", c.head_dim, ", ", c.block_size, ", ",
        c.num_blocks, ")"));
  }
  const kernels::KvFormatSpec& fmt = c.format;
  if (fmt.eviction.kind != kernels::EvictionSpec::Kind::kNone) {
    const kernels::KvFormatKind k = fmt.kind;
    // The sinks' shifted query runs on the tensor-core decode kernel, which TurboQuant has for
    // equal key and value rates only (KIVI under eviction scores sinks on its own kernel).
    if (k == kernels::KvFormatKind::kTurbo && fmt.key_bits != fmt.value_bits &&
        fmt.eviction.kind == kernels::EvictionSpec::Kind::kSink && !c.rope_inv_freq.empty()) {
      return absl::UnimplementedError(absl::StrCat(
          "the CUDA KV cache shifts the sinks' query (sink eviction with RoPE frequencies) for "
          "TurboQuant with equal key and value rates only, got ",
          fmt.name, ": use --backend cpu"));
    }
    if (!c.rope_inv_freq.empty() &&
        2 * static_cast<int64_t>(c.rope_inv_freq.size()) != c.head_dim) {
      return absl::InvalidArgumentError(absl::StrCat("KV cache config: rope_inv_freq has ",
                                                     c.rope_inv_freq.size(),
                                                     " entries, head_dim / 2 = ", c.head_dim / 2));
    }
  }
  if (fmt.full_precision_first_layers < 0 || fmt.full_precision_last_layers < 0) {
    return absl::InvalidArgumentError("full-precision layer counts must be >= 0");
  }
  if (c.head_dim != 64 && c.head_dim != 128) {
    return absl::UnimplementedError(absl::StrCat(
        "the CUDA KV cache and attention kernels support head_dim 64 and 128, got ", c.head_dim));
  }
  ASSIGN_OR_RETURN(desc_, kernels::DescribeKvFormat(fmt, c.head_dim));
  // The format of the quantized layers without the layer option (a per-layer codec), and fp16.
  kernels::KvFormatSpec quantized = fmt;
  quantized.full_precision_first_layers = quantized.full_precision_last_layers = 0;
  quantized.eviction = {};  // the cache evicts; the encoders and decoders see plain records
  const kernels::KvFormatSpec fp16;
  int quantized_index = -1, fp16_index = -1;
  auto add_format = [&](const kernels::KvFormatSpec& spec) -> absl::StatusOr<int> {
    Format f;
    f.spec = spec;
    ASSIGN_OR_RETURN(f.append, kernels::cuda::CudaKvAppend::Create(spec, c.head_dim, c.num_kv_heads,
                                                                   c.block_size));
    ASSIGN_OR_RETURN(f.decode, kernels::cuda::CudaDecodeAttention::Create(
                                   spec, c.head_dim, c.num_kv_heads, c.block_size));
    if (f.append->record_bytes() != f.decode->record_bytes()) {
      return absl::InternalError(
          absl::StrCat("KV format ", spec.name, ": append writes ", f.append->record_bytes(),
                       "-byte records, decode reads ", f.decode->record_bytes()));
    }
    formats_.push_back(std::move(f));
    return static_cast<int>(formats_.size()) - 1;
  };
  int64_t offset = 0, residual_halves = 0;
  for (int l = 0; l < c.num_layers; ++l) {
    const bool full =
        l < fmt.full_precision_first_layers || l >= c.num_layers - fmt.full_precision_last_layers;
    int& index = full ? fp16_index : quantized_index;
    if (index < 0) {
      ASSIGN_OR_RETURN(index, add_format(full ? fp16 : quantized));
    }
    const Format& f = formats_[index];
    layer_format_.push_back(index);
    layer_offset_.push_back(offset);
    offset += int64_t{c.num_kv_heads} * c.block_size * f.append->record_bytes();
    geometry_.bytes_per_token += int64_t{c.num_kv_heads} * f.append->record_bytes();
    const int capacity = f.append->residual_capacity();
    residual_capacity_.push_back(capacity);
    // Per-slot halves for now; Create scales them by the slot count.
    residual_offset_.push_back(residual_halves);
    residual_halves += int64_t{c.num_kv_heads} * capacity * c.head_dim;
  }
  if (evicting() && *std::max_element(residual_capacity_.begin(), residual_capacity_.end()) >
                        kMaxEvictWindowRows) {
    return absl::UnimplementedError(
        absl::StrCat("the CUDA KV cache evicts with fp16 windows of at most ", kMaxEvictWindowRows,
                     " rows (R + 16), got ", fmt.name, ": use a smaller r or --backend cpu"));
  }
  geometry_.block_bytes = offset;
  geometry_.residual_bytes_per_sequence = residual_halves * 2 * 2;  // k and v, 2 bytes each
  geometry_.slot_bytes = geometry_.residual_bytes_per_sequence +
                         int64_t{c.num_layers} * c.num_kv_heads * 2 * int64_t{sizeof(float)};
  if (evicting()) {
    // Positions, (H2O) masses and (KIVI) key-group offsets per slot.
    const int64_t per_slot = int64_t{sizeof(int32_t)} + (h2o() ? int64_t{sizeof(float)} : 0) +
                             (kivi_layers() ? int64_t{sizeof(uint8_t)} : 0);
    geometry_.eviction_bytes_per_block =
        int64_t{c.num_layers} * c.num_kv_heads * c.block_size * per_slot;
    if (h2o()) {  // the decode mass pass's scores of one layer
      geometry_.eviction_bytes_per_block +=
          DecodeMassScoreFloatsPerBlock(c.num_kv_heads, c.block_size) * int64_t{sizeof(float)};
    }
  }
  if (h2o()) {  // the decode mass pass's per-split statistics
    geometry_.slot_bytes += DecodeMassScratchFloats(1, c.num_kv_heads) * int64_t{sizeof(float)};
  }
  if (h2o() && fmt.kind == kernels::KvFormatKind::kTurbo) {  // the mass kernel scores the codes
    ASSIGN_OR_RETURN(const kernels::TurboKeyLayout layout,
                     kernels::DescribeTurboKeys(quantized, c.head_dim));
    TurboMassKeys& tk = turbo_mass_keys_;
    if (layout.hi_centroids.size() > 16 || layout.lo_centroids.size() > 16 ||
        layout.signs.size() > 128) {
      return absl::InternalError("TurboQuant key layout exceeds the mass kernel's tables");
    }
    tk.hi_channels = layout.hi_channels;
    tk.hi_bits = layout.hi_bits;
    tk.lo_bits = layout.lo_bits;
    tk.code_bytes = layout.code_bytes;
    std::copy(layout.hi_centroids.begin(), layout.hi_centroids.end(), tk.hi_centroids);
    std::copy(layout.lo_centroids.begin(), layout.lo_centroids.end(), tk.lo_centroids);
    std::copy(layout.signs.begin(), layout.signs.end(), tk.signs);
  }
  return absl::OkStatus();
}

absl::StatusOr<KvCacheGeometry> CudaKvCache::Measure(const kernels::KvCacheConfig& config) {
  CudaKvCache probe(config, nullptr);
  RETURN_IF_ERROR(probe.InitLayout());
  return probe.geometry_;
}

absl::StatusOr<std::unique_ptr<CudaKvCache>> CudaKvCache::Create(
    const kernels::KvCacheConfig& config, cudaStream_t stream, int max_sequences) {
  if (max_sequences <= 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("max_sequences must be positive, got ", max_sequences));
  }
  std::unique_ptr<CudaKvCache> cache(new CudaKvCache(config, stream));
  RETURN_IF_ERROR(cache->InitLayout());
  if (config.num_blocks <= 0 || config.num_blocks > INT32_MAX) {
    return absl::InvalidArgumentError(
        absl::StrCat("KV pool block count must be in [1, 2^31), got ", config.num_blocks));
  }
  cache->max_sequences_ = max_sequences;
  auto allocate = [](void** p, int64_t bytes, const char* what) -> absl::Status {
    const cudaError_t error = cudaMalloc(p, static_cast<size_t>(std::max<int64_t>(bytes, 1)));
    if (error == cudaSuccess) return absl::OkStatus();
    cudaGetLastError();  // clear the allocation error
    *p = nullptr;
    return absl::ResourceExhaustedError(
        absl::StrCat("cannot allocate ", what, ": ", bytes, " bytes: ", cudaGetErrorString(error)));
  };
  RETURN_IF_ERROR(
      allocate(reinterpret_cast<void**>(&cache->pool_), cache->allocated_bytes(), "the KV pool"));
  const int64_t scale_floats = int64_t{config.num_layers} * max_sequences * config.num_kv_heads * 2;
  RETURN_IF_ERROR(allocate(reinterpret_cast<void**>(&cache->scales_),
                           scale_floats * int64_t{sizeof(float)}, "the FP8 scale slots"));
  CUDA_RETURN_IF_ERROR(
      cudaMemsetAsync(cache->scales_, 0, scale_floats * sizeof(float), cache->stream_));
  if (cache->evicting() && cache->geometry_.residual_bytes_per_sequence > 0) {
    const int64_t counts = int64_t{config.num_layers} * max_sequences * config.num_kv_heads;
    RETURN_IF_ERROR(allocate(reinterpret_cast<void**>(&cache->head_window_),
                             counts * int64_t{sizeof(int32_t)}, "the per-head window counts"));
    CUDA_RETURN_IF_ERROR(
        cudaMemsetAsync(cache->head_window_, 0, counts * sizeof(int32_t), cache->stream_));
  }
  const int64_t residual_halves =
      cache->geometry_.residual_bytes_per_sequence / 4 * int64_t{max_sequences};
  if (residual_halves > 0) {
    RETURN_IF_ERROR(allocate(reinterpret_cast<void**>(&cache->residual_k_), residual_halves * 2,
                             "the fp16 residual windows"));
    RETURN_IF_ERROR(allocate(reinterpret_cast<void**>(&cache->residual_v_), residual_halves * 2,
                             "the fp16 residual windows"));
  }
  for (int64_t& offset : cache->residual_offset_) offset *= max_sequences;
  if (cache->evicting()) {
    const int64_t slots =
        int64_t{config.num_blocks} * config.num_layers * config.num_kv_heads * config.block_size;
    RETURN_IF_ERROR(allocate(reinterpret_cast<void**>(&cache->positions_),
                             slots * int64_t{sizeof(int32_t)}, "the eviction positions"));
    if (cache->kivi_layers()) {
      RETURN_IF_ERROR(allocate(reinterpret_cast<void**>(&cache->key_offsets_), slots,
                               "the KIVI key-group offsets"));
    }
    if (cache->h2o()) {
      RETURN_IF_ERROR(allocate(reinterpret_cast<void**>(&cache->mass_),
                               slots * int64_t{sizeof(float)}, "the H2O masses"));
      RETURN_IF_ERROR(allocate(
          reinterpret_cast<void**>(&cache->mass_scratch_),
          DecodeMassScratchFloats(max_sequences, config.num_kv_heads) * int64_t{sizeof(float)},
          "the H2O mass scratch"));
      RETURN_IF_ERROR(
          allocate(reinterpret_cast<void**>(&cache->mass_scores_),
                   int64_t{config.num_blocks} *
                       DecodeMassScoreFloatsPerBlock(config.num_kv_heads, config.block_size) *
                       int64_t{sizeof(float)},
                   "the H2O decode scores"));
    }
  }
  if (config.format.eviction.kind == kernels::EvictionSpec::Kind::kSink &&
      !config.rope_inv_freq.empty()) {
    const size_t bytes = config.rope_inv_freq.size() * sizeof(double);
    RETURN_IF_ERROR(allocate(reinterpret_cast<void**>(&cache->rope_inv_freq_),
                             static_cast<int64_t>(bytes), "the RoPE frequencies"));
    CUDA_RETURN_IF_ERROR(cudaMemcpy(cache->rope_inv_freq_, config.rope_inv_freq.data(), bytes,
                                    cudaMemcpyHostToDevice));
  }
  cache->free_list_.resize(config.num_blocks);
  for (int64_t b = 0; b < config.num_blocks; ++b) {
    cache->free_list_[b] = static_cast<int32_t>(config.num_blocks - 1 - b);  // pop 0 first
  }
  cache->free_slots_.resize(max_sequences);
  for (int s = 0; s < max_sequences; ++s) cache->free_slots_[s] = max_sequences - 1 - s;
  return cache;
}

CudaKvCache::~CudaKvCache() {
  if (pool_ != nullptr) cudaStreamSynchronize(stream_);  // no kernel may still use the buffers
  for (void* p :
       {static_cast<void*>(pool_), static_cast<void*>(scales_), static_cast<void*>(residual_k_),
        static_cast<void*>(residual_v_), static_cast<void*>(positions_), static_cast<void*>(mass_),
        static_cast<void*>(mass_scratch_), static_cast<void*>(mass_scores_),
        static_cast<void*>(rope_inv_freq_), static_cast<void*>(head_window_),
        static_cast<void*>(key_offsets_)}) {
    if (p != nullptr) cudaFree(p);
  }
}

int64_t CudaKvCache::BlocksForTokens(int64_t num_tokens) const {
  return num_tokens <= 0 ? 0 : (num_tokens + config_.block_size - 1) / config_.block_size;
}

int CudaKvCache::group_pad(int num_q_heads) const {
  return PadGroup(num_q_heads / config_.num_kv_heads);
}

float* CudaKvCache::head_scales(int layer) const {
  return scales_ + int64_t{layer} * max_sequences_ * config_.num_kv_heads * 2;
}

int32_t* CudaKvCache::head_window(int layer) const {
  if (head_window_ == nullptr || residual_capacity_[layer] == 0) return nullptr;
  return head_window_ + int64_t{layer} * max_sequences_ * config_.num_kv_heads;
}

uint8_t* CudaKvCache::key_offsets(int layer) const {
  if (key_offsets_ == nullptr || layer_spec(layer).kind != kernels::KvFormatKind::kKivi) {
    return nullptr;
  }
  return key_offsets_ + int64_t{layer} * config_.num_kv_heads * config_.block_size;
}

uint16_t* CudaKvCache::residual(int layer, bool values) const {
  if (residual_capacity_[layer] == 0) return nullptr;
  return (values ? residual_v_ : residual_k_) + residual_offset_[layer];
}

EvictPlan CudaKvCache::Plan(const Sequence& s, int layer, int64_t n) const {
  const int64_t stored = s.stored[layer], length = s.length[layer];
  EvictPlan plan{.stored = static_cast<int32_t>(stored),
                 .lead = static_cast<int32_t>(stored),
                 .length = static_cast<int32_t>(length),
                 .n = static_cast<int32_t>(n)};
  const kernels::EvictionSpec& e = config_.format.eviction;
  const int64_t new_length = length + n;
  if (n == 0) return plan;  // eviction runs at the start of an append: none, nothing evicted
  if (e.kind == kernels::EvictionSpec::Kind::kSink) {
    // Old tokens at positions < sinks (the first slots: never evicted) or >= new_length - window
    // (the last slots: every such position is still stored, the window only slides forward).
    plan.lead = static_cast<int32_t>(std::min<int64_t>(e.sink_tokens, stored));
    const int64_t window_old = std::max<int64_t>(
        0, length - std::max<int64_t>(e.sink_tokens, new_length - e.window_tokens));
    plan.trail = static_cast<int32_t>(std::min<int64_t>(window_old, stored - plan.lead));
  } else if (e.kind == kernels::EvictionSpec::Kind::kH2O) {
    // The same floors as CpuKvCache::Evict.
    int64_t heavy = static_cast<int64_t>(std::floor(e.heavy_fraction * new_length + 1e-9));
    int64_t recent = static_cast<int64_t>(std::floor(e.recent_fraction * new_length + 1e-9));
    if (heavy + recent == 0) recent = 1;
    plan.lead = 0;
    plan.trail = static_cast<int32_t>(std::min<int64_t>(stored, std::max<int64_t>(0, recent - n)));
    plan.heavy = static_cast<int32_t>(std::min<int64_t>(heavy, stored - plan.trail));
  }
  return plan;
}

SinkShift CudaKvCache::SinkShiftFor(int64_t stored, int64_t length) const {
  // CpuKvCache::SinkShiftFor: nothing evicted, nothing shifted.
  if (rope_inv_freq_ == nullptr || length <= stored) return {};
  return {
      .slots = static_cast<int32_t>(std::min<int64_t>(config_.format.eviction.sink_tokens, stored)),
      .shift = static_cast<int32_t>(length - stored)};
}

SinkShift CudaKvCache::SinkShiftAfter(const EvictPlan& plan) const {
  return SinkShiftFor(KeptBefore(plan) + plan.n, int64_t{plan.length} + plan.n);
}

EvictPlan CudaKvCache::PlanAppend(kernels::SeqId seq, int64_t n) const {
  auto it = seqs_.find(seq);
  if (it == seqs_.end()) return {};
  return Plan(it->second, 0, n);
}

int64_t CudaKvCache::SlotsNeeded(const Sequence& s, int64_t length) const {
  int64_t slots = 0;
  for (int l = 0; l < config_.num_layers; ++l) {
    const int64_t n = std::max<int64_t>(0, length - s.length[l]);
    // At least what the layer stores now: it evicts only at the start of its own next append (the
    // host-pointer Append runs layer by layer; a prompt stays whole until the next append).
    slots = std::max({slots, s.stored[l], KeptBefore(Plan(s, l, n)) + n});
  }
  return slots;
}

void CudaKvCache::TrimBlocks(Sequence& s) {
  int64_t length = s.reserved_length;
  for (int64_t l : s.length) length = std::max(length, l);
  const int64_t keep = BlocksForTokens(SlotsNeeded(s, length));
  while (static_cast<int64_t>(s.blocks.size()) > keep) {
    free_list_.push_back(s.blocks.back());
    s.blocks.pop_back();
  }
}

absl::Status CudaKvCache::GrowTo(Sequence& s, int64_t num_tokens) {
  const int64_t need =
      BlocksForTokens(SlotsNeeded(s, num_tokens)) - static_cast<int64_t>(s.blocks.size());
  if (need <= 0) return absl::OkStatus();
  if (need > free_blocks()) {
    return absl::ResourceExhaustedError(
        absl::StrCat("KV cache: need ", need, " more blocks, ", free_blocks(), " free"));
  }
  for (int64_t i = 0; i < need; ++i) {
    s.blocks.push_back(free_list_.back());
    free_list_.pop_back();
  }
  return absl::OkStatus();
}

absl::Status CudaKvCache::AddSequence(kernels::SeqId seq, int64_t reserve_tokens) {
  if (reserve_tokens < 0) return absl::InvalidArgumentError("reserve_tokens < 0");
  if (seqs_.count(seq)) return absl::AlreadyExistsError(absl::StrCat("sequence ", seq));
  if (free_slots_.empty()) {
    return absl::ResourceExhaustedError(absl::StrCat("KV cache: all ", max_sequences_,
                                                     " sequence slots are in use (max_sequences)"));
  }
  Sequence s;
  s.stored.assign(config_.num_layers, 0);
  s.length.assign(config_.num_layers, 0);
  s.reserved_length = reserve_tokens;
  if (absl::Status status = GrowTo(s, reserve_tokens); !status.ok()) {
    for (int32_t b : s.blocks) free_list_.push_back(b);
    return status;
  }
  s.slot = free_slots_.back();
  free_slots_.pop_back();
  // FP8 scales of the slot back to "not chosen": [layers][slots][kv_heads][2], one row per layer.
  const size_t row = size_t{static_cast<size_t>(config_.num_kv_heads)} * 2 * sizeof(float);
  CUDA_RETURN_IF_ERROR(cudaMemset2DAsync(scales_ + int64_t{s.slot} * config_.num_kv_heads * 2,
                                         row * max_sequences_, 0, row, config_.num_layers,
                                         stream_));
  if (head_window_ != nullptr) {  // every head's window empty: [layers][slots][kv_heads]
    const size_t counts = static_cast<size_t>(config_.num_kv_heads) * sizeof(int32_t);
    CUDA_RETURN_IF_ERROR(cudaMemset2DAsync(head_window_ + int64_t{s.slot} * config_.num_kv_heads,
                                           counts * max_sequences_, 0, counts, config_.num_layers,
                                           stream_));
  }
  seqs_.emplace(seq, std::move(s));
  return absl::OkStatus();
}

absl::Status CudaKvCache::Reserve(kernels::SeqId seq, int64_t num_tokens) {
  auto it = seqs_.find(seq);
  if (it == seqs_.end()) return absl::NotFoundError(absl::StrCat("sequence ", seq));
  RETURN_IF_ERROR(GrowTo(it->second, num_tokens));
  it->second.reserved_length = std::max(it->second.reserved_length, num_tokens);
  return absl::OkStatus();
}

void CudaKvCache::FreeSequence(kernels::SeqId seq) {
  auto it = seqs_.find(seq);
  if (it == seqs_.end()) return;
  for (int32_t b : it->second.blocks) free_list_.push_back(b);
  free_slots_.push_back(it->second.slot);
  seqs_.erase(it);
}

int64_t CudaKvCache::Length(kernels::SeqId seq, int layer) const {
  auto it = seqs_.find(seq);
  if (it == seqs_.end() || layer < 0 || layer >= config_.num_layers) return -1;
  return it->second.length[layer];
}

int64_t CudaKvCache::StoredTokens(kernels::SeqId seq, int layer) const {
  auto it = seqs_.find(seq);
  if (it == seqs_.end() || layer < 0 || layer >= config_.num_layers) return -1;
  return it->second.stored[layer];
}

const std::vector<int32_t>* CudaKvCache::BlockTable(kernels::SeqId seq) const {
  auto it = seqs_.find(seq);
  return it == seqs_.end() ? nullptr : &it->second.blocks;
}

int CudaKvCache::Slot(kernels::SeqId seq) const {
  auto it = seqs_.find(seq);
  return it == seqs_.end() ? -1 : it->second.slot;
}

int64_t CudaKvCache::Capacity(kernels::SeqId seq) const {
  auto it = seqs_.find(seq);
  if (it == seqs_.end()) return -1;
  return static_cast<int64_t>(it->second.blocks.size()) * config_.block_size;
}

void CudaKvCache::CommitAppend(kernels::SeqId seq, int64_t n) {
  auto it = seqs_.find(seq);
  if (it == seqs_.end()) return;
  Sequence& s = it->second;
  for (int l = 0; l < config_.num_layers; ++l) {
    s.stored[l] = KeptBefore(Plan(s, l, n)) + n;
    s.length[l] += n;
  }
  if (evicting()) TrimBlocks(s);
}

EvictPool CudaKvCache::PoolFor(int layer, const DeviceSeqBatch& seqs) const {
  return EvictPool{.pool = pool_,
                   .block_stride_bytes = geometry_.block_bytes,
                   .layer_offset_bytes = layer_offset_[layer],
                   .record_bytes = format_of(layer).append->record_bytes(),
                   .positions = positions_,
                   .mass = mass_,
                   .num_layers = config_.num_layers,
                   .layer = layer,
                   .num_kv_heads = config_.num_kv_heads,
                   .block_size = config_.block_size,
                   .head_dim = config_.head_dim,
                   .block_tables = seqs.block_tables,
                   .max_blocks = seqs.max_blocks,
                   .num_seqs = seqs.num_seqs,
                   .head_window = head_window(layer),
                   .residual_k = residual(layer, false),
                   .residual_v = residual(layer, true),
                   .residual_capacity = residual_capacity_[layer],
                   .seq_slots = seqs.slots,
                   // The array's base: the eviction kernels index it like the positions.
                   .key_offsets = key_offsets(layer) != nullptr ? key_offsets_ : nullptr,
                   .kivi_bits = static_cast<int>(layer_spec(layer).key_bits),
                   .kivi_group = layer_spec(layer).group_size};
}

absl::Status CudaKvCache::EvictLayer(int layer, const DeviceSeqBatch& seqs,
                                     const EvictPlan* plans) {
  if (!evicting()) return absl::FailedPreconditionError("EvictLayer: the cache does not evict");
  CUDA_RETURN_IF_ERROR(LaunchEvictCompact(PoolFor(layer, seqs), plans, stream_));
  return absl::OkStatus();
}

namespace {
MassKeyFormat MassFormat(kernels::KvFormatKind kind) {
  switch (kind) {
    case kernels::KvFormatKind::kBf16:
      return MassKeyFormat::kBf16;
    case kernels::KvFormatKind::kFp8:
      return MassKeyFormat::kFp8;
    case kernels::KvFormatKind::kInt8:
      return MassKeyFormat::kInt8;
    case kernels::KvFormatKind::kTurbo:
      return MassKeyFormat::kTurbo;
    default:
      return MassKeyFormat::kFp16;
  }
}
}  // namespace

absl::Status CudaKvCache::DecodeMassLayer(int layer, const DeviceSeqBatch& seqs,
                                          const int32_t* lens, int max_len, const float* q,
                                          int group, int group_pad, float scale) {
  if (!h2o()) return absl::FailedPreconditionError("DecodeMassLayer: the cache is not H2O");
  if (layer_mass_reads_back(layer)) {
    return absl::UnimplementedError(
        "DecodeMassLayer: KIVI keys are not decoded by the mass kernel (DecodeAttention and the "
        "runner take the masses from the read-back keys)");
  }
  if (seqs.num_seqs > max_sequences_) {
    return absl::InvalidArgumentError(
        absl::StrCat("DecodeMassLayer: ", seqs.num_seqs, " sequences, at most ", max_sequences_));
  }
  const MassKeys keys{.format = MassFormat(layer_spec(layer).kind),
                      .head_scales = head_scales(layer),
                      .seq_slots = seqs.slots,
                      .turbo = turbo_mass_keys_};
  CUDA_RETURN_IF_ERROR(LaunchDecodeMass(PoolFor(layer, seqs), keys, lens, max_len, q, group,
                                        group_pad, scale, mass_scratch_, mass_scores_, stream_));
  return absl::OkStatus();
}

absl::Status CudaKvCache::PrefillMassLayer(int layer, const DeviceSeqBatch& seqs,
                                           const PrefillMassChunk* chunks, int num_chunks,
                                           int max_chunk_tokens, int max_chunk_keys, const float* q,
                                           int group, int group_pad, const float* fresh_k,
                                           int64_t fresh_row_stride, const float* prefix_k,
                                           int64_t prefix_stride_tokens, float scale,
                                           float* row_stats) {
  if (!h2o()) return absl::FailedPreconditionError("PrefillMassLayer: the cache is not H2O");
  CUDA_RETURN_IF_ERROR(LaunchPrefillMass(PoolFor(layer, seqs), chunks, num_chunks, max_chunk_tokens,
                                         max_chunk_keys, q, group, group_pad, fresh_k,
                                         fresh_row_stride, prefix_k, prefix_stride_tokens, scale,
                                         row_stats, stream_));
  return absl::OkStatus();
}

// ---- Device methods -----------------------------------------------------------------------------

// The fields AppendBatch, DecodeBatch and ReadBatch share: where a layer's records live, the
// sequences' block tables and state slots, the FP8 scales and the fp16 windows (null and 0 for
// layers without them).
template <class Batch>
void CudaKvCache::FillPoolFields(int layer, const DeviceSeqBatch& seqs, Batch& b) const {
  b.pool = pool_;
  b.block_stride_bytes = geometry_.block_bytes;
  b.layer_offset_bytes = layer_offset_[layer];
  b.block_tables = seqs.block_tables;
  b.max_blocks_per_seq = seqs.max_blocks;
  b.num_seqs = seqs.num_seqs;
  b.seq_slots = seqs.slots;
  b.head_scales = head_scales(layer);
  b.residual_k = residual(layer, false);
  b.residual_v = residual(layer, true);
  b.residual_capacity = residual_capacity_[layer];
  b.head_window = head_window(layer);
}

absl::Status CudaKvCache::AppendLayer(int layer, const DeviceSeqBatch& seqs,
                                      const int32_t* row_begin, const int32_t* stored_before,
                                      int num_rows, int max_rows_per_seq, const float* k,
                                      const float* v, int64_t row_stride) {
  kernels::cuda::AppendBatch b;
  FillPoolFields(layer, seqs, b);
  b.row_begin = row_begin;
  b.stored_before = stored_before;
  b.num_rows = num_rows;
  b.max_rows_per_seq = max_rows_per_seq;
  b.k = k;
  b.v = v;
  b.row_stride = row_stride;
  return format_of(layer).append->Append(b, stream_);
}

absl::Status CudaKvCache::DecodeLayer(int layer, const DeviceSeqBatch& seqs,
                                      const int32_t* encoded_lens, int max_encoded_len,
                                      const int32_t* residual_lens, const float* q,
                                      int num_q_heads_padded, float scale, float* out,
                                      const int32_t* sink_slots, const int32_t* sink_shift) {
  kernels::cuda::DecodeBatch b;
  FillPoolFields(layer, seqs, b);
  if (sink_slots != nullptr) {
    if (rope_inv_freq_ == nullptr || sink_shift == nullptr) {
      return absl::FailedPreconditionError(
          "DecodeLayer: sink shifts need sink eviction with rope_inv_freq and both arrays");
    }
    b.sink_slots = sink_slots;
    b.sink_shift = sink_shift;
    b.rope_inv_freq = rope_inv_freq_;
  }
  b.key_offsets = key_offsets(layer);
  b.key_offsets_block_stride = key_offsets_block_stride();
  b.encoded_lens = encoded_lens;
  b.max_encoded_len = max_encoded_len;
  if (residual_capacity_[layer] > 0) b.residual_lens = residual_lens;
  b.num_q_heads = num_q_heads_padded;
  b.q = q;
  b.out = out;
  b.scale = scale;
  return format_of(layer).decode->Run(b, stream_);
}

absl::Status CudaKvCache::ReadLayer(int layer, const DeviceSeqBatch& seqs, const int32_t* lens,
                                    int max_len, float* out_k, float* out_v,
                                    int64_t stride_tokens) {
  kernels::cuda::ReadBatch b;
  FillPoolFields(layer, seqs, b);
  b.key_offsets = key_offsets(layer);
  b.key_offsets_block_stride = key_offsets_block_stride();
  b.lens = lens;
  b.max_len = max_len;
  b.out_k = out_k;
  b.out_v = out_v;
  b.out_stride_tokens = stride_tokens;
  return format_of(layer).append->Read(b, stream_);
}

absl::Status CudaKvCache::AppendSynthetic(kernels::SeqId seq, int64_t n, uint64_t seed) {
  ASSIGN_OR_RETURN(Sequence * s, Find(seq, 0));
  if (n < 0) return absl::InvalidArgumentError("AppendSynthetic: n < 0");
  if (n == 0) return absl::OkStatus();
  const int64_t capacity = static_cast<int64_t>(s->blocks.size()) * config_.block_size;
  if (evicting()) return AppendSyntheticEvicting(*s, n, seed);
  for (int l = 0; l < config_.num_layers; ++l) {
    if (s->stored[l] + n > capacity || s->stored[l] + n > INT32_MAX) {
      return absl::FailedPreconditionError(absl::StrCat(
          "AppendSynthetic: sequence ", seq, " layer ", l, " holds ", s->stored[l],
          " tokens and has room for ", capacity, "; Reserve(", s->stored[l] + n, ") first"));
    }
  }
  const int64_t chunk = std::min(n, kSyntheticChunk);
  const int64_t row_floats = int64_t{config_.num_kv_heads} * config_.head_dim;
  DeviceArray<float> k, v;
  RETURN_IF_ERROR(FillSyntheticKv(chunk, row_floats, seed, stream_, k, v));
  // Per (layer, chunk): {row_begin = 0, row_end, stored_before}.
  const int64_t chunks = (n + chunk - 1) / chunk;
  std::vector<int32_t> meta;
  meta.reserve(static_cast<size_t>(config_.num_layers * chunks * 3));
  for (int l = 0; l < config_.num_layers; ++l) {
    for (int64_t c = 0; c < chunks; ++c) {
      meta.push_back(0);
      meta.push_back(static_cast<int32_t>(std::min(chunk, n - c * chunk)));
      meta.push_back(static_cast<int32_t>(s->stored[l] + c * chunk));
    }
  }
  DeviceArray<int32_t> dmeta, table, slot;
  CUDA_RETURN_IF_ERROR(dmeta.Upload(meta.data(), meta.size(), stream_));
  CUDA_RETURN_IF_ERROR(table.Upload(s->blocks.data(), s->blocks.size(), stream_));
  CUDA_RETURN_IF_ERROR(slot.Upload(&s->slot, 1, stream_));
  const DeviceSeqBatch batch{.num_seqs = 1,
                             .block_tables = table.get(),
                             .max_blocks = static_cast<int>(s->blocks.size()),
                             .slots = slot.get()};
  for (int l = 0; l < config_.num_layers; ++l) {
    for (int64_t c = 0; c < chunks; ++c) {
      const int32_t* m = dmeta.get() + (l * chunks + c) * 3;
      const int rows = meta[(l * chunks + c) * 3 + 1];
      RETURN_IF_ERROR(AppendLayer(l, batch, m, m + 2, rows, rows, k.get(), v.get(), row_floats));
    }
  }
  CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream_));
  for (int64_t& stored : s->stored) stored += n;
  for (int64_t& length : s->length) length += n;
  return absl::OkStatus();
}

absl::Status CudaKvCache::AppendSyntheticEvicting(Sequence& s, int64_t n, uint64_t seed) {
  // Chunk by chunk as a prefill without attention would append: evict, then append, to every
  // layer (no masses accumulate: H2O keeps the oldest of the equal-mass tokens).
  const int64_t chunk = std::min(n, kSyntheticChunk);
  const int64_t row_floats = int64_t{config_.num_kv_heads} * config_.head_dim;
  DeviceArray<float> k, v;
  RETURN_IF_ERROR(FillSyntheticKv(chunk, row_floats, seed, stream_, k, v));
  DeviceArray<int32_t> dmeta, slot;
  CUDA_RETURN_IF_ERROR(dmeta.Allocate(9));
  CUDA_RETURN_IF_ERROR(slot.Upload(&s.slot, 1, stream_));
  for (int64_t done = 0; done < n; done += chunk) {
    const int64_t rows = std::min(chunk, n - done);
    const EvictPlan plan = Plan(s, 0, rows);
    const int64_t kept = KeptBefore(plan);
    // Grows chunk by chunk (TrimBlocks frees what each eviction empties), so that a long fill
    // never holds more than the kept budget plus one chunk.
    RETURN_IF_ERROR(GrowTo(s, s.length[0] + rows));
    // {row_begin = 0, row_end, stored_before} then the plan; synchronous: staged from the stack.
    int32_t meta[9] = {0, static_cast<int32_t>(rows), static_cast<int32_t>(kept)};
    std::copy_n(reinterpret_cast<const int32_t*>(&plan), 6, meta + 3);
    CUDA_RETURN_IF_ERROR(
        cudaMemcpyAsync(dmeta.get(), meta, sizeof(meta), cudaMemcpyHostToDevice, stream_));
    DeviceArray<int32_t> step_table;
    CUDA_RETURN_IF_ERROR(step_table.Upload(s.blocks.data(), s.blocks.size(), stream_));
    const DeviceSeqBatch batch{.num_seqs = 1,
                               .block_tables = step_table.get(),
                               .max_blocks = static_cast<int>(s.blocks.size()),
                               .slots = slot.get()};
    for (int l = 0; l < config_.num_layers; ++l) {
      RETURN_IF_ERROR(EvictLayer(l, batch, reinterpret_cast<const EvictPlan*>(dmeta.get() + 3)));
      RETURN_IF_ERROR(AppendLayer(l, batch, dmeta.get(), dmeta.get() + 2, static_cast<int>(rows),
                                  static_cast<int>(rows), k.get(), v.get(), row_floats));
    }
    CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream_));
    for (int l = 0; l < config_.num_layers; ++l) {
      s.stored[l] = KeptBefore(Plan(s, l, rows)) + rows;
      s.length[l] += rows;
    }
    TrimBlocks(s);
  }
  return absl::OkStatus();
}

// ---- Host-pointer KvCache methods ---------------------------------------------------------------

absl::StatusOr<CudaKvCache::Sequence*> CudaKvCache::Find(kernels::SeqId seq, int layer) {
  auto it = seqs_.find(seq);
  if (it == seqs_.end()) return absl::NotFoundError(absl::StrCat("sequence ", seq));
  if (layer < 0 || layer >= config_.num_layers) {
    return absl::InvalidArgumentError(absl::StrCat("layer ", layer, " out of range"));
  }
  return &it->second;
}

absl::StatusOr<const CudaKvCache::Sequence*> CudaKvCache::Find(kernels::SeqId seq,
                                                               int layer) const {
  return const_cast<CudaKvCache*>(this)->Find(seq, layer);
}

absl::Status CudaKvCache::Append(kernels::SeqId seq, int layer, int64_t n, const float* k,
                                 const float* v) {
  ASSIGN_OR_RETURN(Sequence * s, Find(seq, layer));
  if (n < 0) return absl::InvalidArgumentError("Append: n < 0");
  if (n == 0) return absl::OkStatus();
  if (k == nullptr || v == nullptr) return absl::InvalidArgumentError("Append: null k or v");
  const int64_t capacity = static_cast<int64_t>(s->blocks.size()) * config_.block_size;
  const EvictPlan plan = Plan(*s, layer, n);
  const int64_t stored = KeptBefore(plan);
  if (stored + n > capacity) {
    return absl::FailedPreconditionError(absl::StrCat(
        "Append: sequence ", seq, " layer ", layer, " holds ", stored, " tokens and has room for ",
        capacity, "; Reserve(", s->length[layer] + n, ") first"));
  }
  const int64_t row_floats = int64_t{config_.num_kv_heads} * config_.head_dim;
  const std::vector<int32_t> meta = {0, static_cast<int32_t>(n), static_cast<int32_t>(stored)};
  DeviceArray<float> dk, dv;
  DeviceArray<int32_t> dmeta, table, slot;
  CUDA_RETURN_IF_ERROR(dk.Upload(k, n * row_floats, stream_));
  CUDA_RETURN_IF_ERROR(dv.Upload(v, n * row_floats, stream_));
  CUDA_RETURN_IF_ERROR(dmeta.Upload(meta.data(), meta.size(), stream_));
  CUDA_RETURN_IF_ERROR(table.Upload(s->blocks.data(), s->blocks.size(), stream_));
  CUDA_RETURN_IF_ERROR(slot.Upload(&s->slot, 1, stream_));
  const DeviceSeqBatch batch{.num_seqs = 1,
                             .block_tables = table.get(),
                             .max_blocks = static_cast<int>(s->blocks.size()),
                             .slots = slot.get()};
  DeviceArray<int32_t> dplan;
  if (evicting()) {
    CUDA_RETURN_IF_ERROR(dplan.Upload(reinterpret_cast<const int32_t*>(&plan), 6, stream_));
    RETURN_IF_ERROR(EvictLayer(layer, batch, reinterpret_cast<const EvictPlan*>(dplan.get())));
  }
  RETURN_IF_ERROR(AppendLayer(layer, batch, dmeta.get(), dmeta.get() + 2, static_cast<int>(n),
                              static_cast<int>(n), dk.get(), dv.get(), row_floats));
  CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream_));
  s->stored[layer] = stored + n;
  s->length[layer] += n;
  if (evicting()) TrimBlocks(*s);
  return absl::OkStatus();
}

absl::Status CudaKvCache::ReadAll(const Sequence& s, int layer, float* k, float* v) const {
  const int32_t len = static_cast<int32_t>(s.stored[layer]);
  DeviceArray<int32_t> lens, table, slot;
  CUDA_RETURN_IF_ERROR(lens.Upload(&len, 1, stream_));
  CUDA_RETURN_IF_ERROR(table.Upload(s.blocks.data(), s.blocks.size(), stream_));
  CUDA_RETURN_IF_ERROR(slot.Upload(&s.slot, 1, stream_));
  const DeviceSeqBatch batch{.num_seqs = 1,
                             .block_tables = table.get(),
                             .max_blocks = static_cast<int>(s.blocks.size()),
                             .slots = slot.get()};
  RETURN_IF_ERROR(
      const_cast<CudaKvCache*>(this)->ReadLayer(layer, batch, lens.get(), len, k, v, len));
  // The staging arrays die with this scope: finish with them first.
  CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream_));
  return absl::OkStatus();
}

absl::Status CudaKvCache::PrefillAttention(kernels::SeqId seq, int layer, int64_t n,
                                           int num_q_heads, const float* q, const float* k,
                                           const float* v, float scale, float* out) {
  ASSIGN_OR_RETURN(Sequence * s, Find(seq, layer));
  const int hkv = config_.num_kv_heads, d = config_.head_dim;
  if (num_q_heads <= 0 || num_q_heads % hkv != 0) {
    return absl::InvalidArgumentError(absl::StrCat("PrefillAttention: num_q_heads ", num_q_heads,
                                                   " is not a multiple of num_kv_heads ", hkv));
  }
  if (n < 0) return absl::InvalidArgumentError("PrefillAttention: n < 0");
  if (n == 0) return absl::OkStatus();
  if (!q || !k || !v || !out) return absl::InvalidArgumentError("null q, k, v or out");
  const int64_t stored = s->stored[layer];
  if (n > stored) {
    return absl::FailedPreconditionError(absl::StrCat(
        "PrefillAttention: ", n, " fresh tokens but only ", stored, " stored; Append first"));
  }
  const int64_t past = stored - n;
  DeviceArray<float> prefix_k, prefix_v, dq, dk, dv, dout;
  if (past > 0) {
    CUDA_RETURN_IF_ERROR(prefix_k.Allocate(stored * hkv * d));
    CUDA_RETURN_IF_ERROR(prefix_v.Allocate(stored * hkv * d));
    RETURN_IF_ERROR(ReadAll(*s, layer, prefix_k.get(), prefix_v.get()));
  }
  std::vector<PrefillTile> tiles;
  for (int64_t t = 0; t < n; t += kPrefillTileRows) {
    tiles.push_back({.first_row = 0,
                     .tile_begin = static_cast<int32_t>(t),
                     .tile_rows = static_cast<int32_t>(std::min<int64_t>(kPrefillTileRows, n - t)),
                     .past = static_cast<int32_t>(past),
                     .prefix_index = past > 0 ? 0 : -1});
  }
  const SinkShift sink = SinkShiftFor(stored, s->length[layer]);
  const int32_t sink_meta[2] = {sink.slots, sink.shift};
  DeviceArray<int32_t> dtiles, dsink;
  static_assert(sizeof(PrefillTile) == 5 * sizeof(int32_t));
  CUDA_RETURN_IF_ERROR(
      dtiles.Upload(reinterpret_cast<const int32_t*>(tiles.data()), tiles.size() * 5, stream_));
  const size_t q_floats = static_cast<size_t>(n) * num_q_heads * d;
  CUDA_RETURN_IF_ERROR(dq.Upload(q, q_floats, stream_));
  CUDA_RETURN_IF_ERROR(dk.Upload(k, static_cast<size_t>(n) * hkv * d, stream_));
  CUDA_RETURN_IF_ERROR(dv.Upload(v, static_cast<size_t>(n) * hkv * d, stream_));
  CUDA_RETURN_IF_ERROR(dout.Allocate(q_floats));
  PrefillAttentionArgs args;
  args.tiles = reinterpret_cast<const PrefillTile*>(dtiles.get());
  args.num_tiles = static_cast<int>(tiles.size());
  args.shape = {.num_q_heads = num_q_heads,
                .num_kv_heads = hkv,
                .head_dim = d,
                .group_pad = num_q_heads / hkv};
  args.q = dq.get();
  args.fresh_k = dk.get();
  args.fresh_v = dv.get();
  args.fresh_row_stride = int64_t{hkv} * d;
  args.prefix_k = prefix_k.get();
  args.prefix_v = prefix_v.get();
  args.prefix_stride_tokens = stored;
  if (sink.slots > 0) {
    CUDA_RETURN_IF_ERROR(dsink.Upload(sink_meta, 2, stream_));
    args.sink_slots = dsink.get();
    args.sink_shift = dsink.get() + 1;
    args.rope_inv_freq = rope_inv_freq_;
  }
  args.scale = scale;
  args.out_f32 = dout.get();
  CUDA_RETURN_IF_ERROR(LaunchPrefillAttention(args, stream_));
  DeviceArray<int32_t> dchunk, table, slot;
  DeviceArray<float> row_stats;
  if (h2o()) {
    const PrefillMassChunk chunk{.batch_index = 0,
                                 .first_row = 0,
                                 .n = static_cast<int32_t>(n),
                                 .cached = static_cast<int32_t>(past),
                                 .prefix_index = past > 0 ? 0 : -1};
    CUDA_RETURN_IF_ERROR(dchunk.Upload(reinterpret_cast<const int32_t*>(&chunk), 5, stream_));
    CUDA_RETURN_IF_ERROR(table.Upload(s->blocks.data(), s->blocks.size(), stream_));
    CUDA_RETURN_IF_ERROR(slot.Upload(&s->slot, 1, stream_));
    const DeviceSeqBatch batch{.num_seqs = 1,
                               .block_tables = table.get(),
                               .max_blocks = static_cast<int>(s->blocks.size()),
                               .slots = slot.get()};
    const int group = num_q_heads / hkv;
    CUDA_RETURN_IF_ERROR(row_stats.Allocate(n * PrefillMassStatsFloatsPerRow(hkv)));
    RETURN_IF_ERROR(PrefillMassLayer(
        layer, batch, reinterpret_cast<const PrefillMassChunk*>(dchunk.get()), 1,
        static_cast<int>(n), static_cast<int>(stored), dq.get(), group, group, dk.get(),
        int64_t{hkv} * d, prefix_k.get(), stored, scale, row_stats.get()));
  }
  CUDA_RETURN_IF_ERROR(
      cudaMemcpyAsync(out, dout.get(), q_floats * sizeof(float), cudaMemcpyDeviceToHost, stream_));
  CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream_));
  return absl::OkStatus();
}

absl::Status CudaKvCache::DecodeAttention(kernels::SeqId seq, int layer, int num_q_heads,
                                          const float* q, float scale, float* out) {
  ASSIGN_OR_RETURN(Sequence * s, Find(seq, layer));
  const int hkv = config_.num_kv_heads, d = config_.head_dim;
  if (num_q_heads <= 0 || num_q_heads % hkv != 0) {
    return absl::InvalidArgumentError(absl::StrCat("DecodeAttention: num_q_heads ", num_q_heads,
                                                   " is not a multiple of num_kv_heads ", hkv));
  }
  const int group = num_q_heads / hkv, pad = PadGroup(group);
  if (pad > kMaxDecodeGroup) {
    return absl::UnimplementedError(
        absl::StrCat("CUDA decode attention: GQA group ", group, " (at most 8)"));
  }
  if (q == nullptr || out == nullptr) return absl::InvalidArgumentError("null q or out");
  const int64_t stored = s->stored[layer];
  if (stored == 0) {
    return absl::FailedPreconditionError("DecodeAttention: nothing stored; Append first");
  }
  // Queries in padded groups: head j of group h at h * pad + j; padding heads zero.
  std::vector<float> padded(static_cast<size_t>(hkv) * pad * d, 0.0f);
  for (int h = 0; h < num_q_heads; ++h) {
    std::copy(q + int64_t{h} * d, q + int64_t{h + 1} * d,
              padded.begin() + ((h / group) * pad + h % group) * int64_t{d});
  }
  // Per-head windows: each head's split comes from its count on the device; the sequence's
  // stored total as encoded_lens (the splits plan over it).
  const kernels::cuda::KiviCounts counts = head_window(layer) != nullptr
                                               ? kernels::cuda::KiviCounts{stored, 0}
                                               : SplitStoredTokens(layer_spec(layer), stored);
  const SinkShift sink = SinkShiftFor(stored, s->length[layer]);
  const std::vector<int32_t> lens = {static_cast<int32_t>(counts.encoded),
                                     static_cast<int32_t>(counts.residual), sink.slots, sink.shift};
  DeviceArray<float> dq, dout;
  DeviceArray<int32_t> dlens, table, slot;
  CUDA_RETURN_IF_ERROR(dq.Upload(padded.data(), padded.size(), stream_));
  CUDA_RETURN_IF_ERROR(dout.Allocate(padded.size()));
  CUDA_RETURN_IF_ERROR(dlens.Upload(lens.data(), lens.size(), stream_));
  CUDA_RETURN_IF_ERROR(table.Upload(s->blocks.data(), s->blocks.size(), stream_));
  CUDA_RETURN_IF_ERROR(slot.Upload(&s->slot, 1, stream_));
  const DeviceSeqBatch batch{.num_seqs = 1,
                             .block_tables = table.get(),
                             .max_blocks = static_cast<int>(s->blocks.size()),
                             .slots = slot.get()};
  RETURN_IF_ERROR(DecodeLayer(
      layer, batch, dlens.get(), lens[0], dlens.get() + 1, dq.get(), hkv * pad, scale, dout.get(),
      sink.slots > 0 ? dlens.get() + 2 : nullptr, sink.slots > 0 ? dlens.get() + 3 : nullptr));
  DeviceArray<float> keys, values, last_key, row_stats;
  DeviceArray<int32_t> dchunk;
  if (h2o() && layer_mass_reads_back(layer)) {
    // KIVI: the masses of the read-back keys (fp32, the codec's reconstruction), as a prefill
    // chunk of one query token whose fresh key is the newest slot's.
    CUDA_RETURN_IF_ERROR(keys.Allocate(stored * hkv * d));
    CUDA_RETURN_IF_ERROR(values.Allocate(stored * hkv * d));
    RETURN_IF_ERROR(ReadAll(*s, layer, keys.get(), values.get()));
    CUDA_RETURN_IF_ERROR(last_key.Allocate(int64_t{hkv} * d));
    CUDA_RETURN_IF_ERROR(cudaMemcpy2DAsync(
        last_key.get(), d * sizeof(float), keys.get() + (stored - 1) * d,
        stored * d * sizeof(float), d * sizeof(float), hkv, cudaMemcpyDeviceToDevice, stream_));
    const PrefillMassChunk chunk{.batch_index = 0,
                                 .first_row = 0,
                                 .n = 1,
                                 .cached = static_cast<int32_t>(stored - 1),
                                 .prefix_index = stored > 1 ? 0 : -1};
    CUDA_RETURN_IF_ERROR(dchunk.Upload(reinterpret_cast<const int32_t*>(&chunk), 5, stream_));
    CUDA_RETURN_IF_ERROR(row_stats.Allocate(PrefillMassStatsFloatsPerRow(hkv)));
    RETURN_IF_ERROR(PrefillMassLayer(layer, batch,
                                     reinterpret_cast<const PrefillMassChunk*>(dchunk.get()), 1, 1,
                                     static_cast<int>(stored), dq.get(), group, pad, last_key.get(),
                                     int64_t{hkv} * d, keys.get(), stored, scale, row_stats.get()));
  } else if (h2o()) {  // lens[0]: the stored total (records, and TurboQuant's window rows per head)
    RETURN_IF_ERROR(
        DecodeMassLayer(layer, batch, dlens.get(), lens[0], dq.get(), group, pad, scale));
  }
  CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(padded.data(), dout.get(), padded.size() * sizeof(float),
                                       cudaMemcpyDeviceToHost, stream_));
  CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream_));
  for (int h = 0; h < num_q_heads; ++h) {
    const float* src = padded.data() + ((h / group) * pad + h % group) * int64_t{d};
    std::copy(src, src + d, out + int64_t{h} * d);
  }
  return absl::OkStatus();
}

absl::Status CudaKvCache::ReadStored(kernels::SeqId seq, int layer, int kv_head, float* k, float* v,
                                     int64_t* positions) const {
  ASSIGN_OR_RETURN(const Sequence* s, Find(seq, layer));
  if (kv_head < 0 || kv_head >= config_.num_kv_heads) {
    return absl::InvalidArgumentError("ReadStored: kv_head out of range");
  }
  const int64_t n = s->stored[layer];
  if (n == 0) return absl::OkStatus();
  const int64_t head_floats = n * config_.head_dim;
  DeviceArray<float> dk, dv;
  CUDA_RETURN_IF_ERROR(dk.Allocate(head_floats * config_.num_kv_heads));
  CUDA_RETURN_IF_ERROR(dv.Allocate(head_floats * config_.num_kv_heads));
  RETURN_IF_ERROR(ReadAll(*s, layer, dk.get(), dv.get()));
  CUDA_RETURN_IF_ERROR(cudaMemcpy(k, dk.get() + kv_head * head_floats, head_floats * sizeof(float),
                                  cudaMemcpyDeviceToHost));
  CUDA_RETURN_IF_ERROR(cudaMemcpy(v, dv.get() + kv_head * head_floats, head_floats * sizeof(float),
                                  cudaMemcpyDeviceToHost));
  if (!evicting()) {
    for (int64_t i = 0; i < n; ++i) positions[i] = i;
    return absl::OkStatus();
  }
  std::vector<int32_t> pos(static_cast<size_t>(n));
  RETURN_IF_ERROR(ReadSlotMeta(*s, layer, kv_head, positions_, pos.data()));
  std::copy(pos.begin(), pos.end(), positions);
  return absl::OkStatus();
}

absl::Status CudaKvCache::ReadAttentionMass(kernels::SeqId seq, int layer, int kv_head,
                                            float* mass) const {
  ASSIGN_OR_RETURN(const Sequence* s, Find(seq, layer));
  if (kv_head < 0 || kv_head >= config_.num_kv_heads) {
    return absl::InvalidArgumentError("ReadAttentionMass: kv_head out of range");
  }
  if (!h2o()) {
    return absl::FailedPreconditionError(
        "ReadAttentionMass: attention mass is accumulated for H2O eviction only");
  }
  CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream_));
  return ReadSlotMeta(*s, layer, kv_head, mass_, mass);
}

template <class T>
absl::Status CudaKvCache::ReadSlotMeta(const Sequence& s, int layer, int kv_head, const T* meta,
                                       T* out) const {
  // Block by block ([block][layer][kv_head][block_size]).
  const int bs = config_.block_size;
  const int64_t n = s.stored[layer];
  std::vector<T> block(static_cast<size_t>(bs));
  for (int64_t b = 0; b * bs < n; ++b) {
    const int64_t index =
        ((int64_t{s.blocks[b]} * config_.num_layers + layer) * config_.num_kv_heads + kv_head) * bs;
    CUDA_RETURN_IF_ERROR(
        cudaMemcpy(block.data(), meta + index, bs * sizeof(T), cudaMemcpyDeviceToHost));
    for (int64_t i = b * bs; i < std::min<int64_t>(n, (b + 1) * bs); ++i) {
      out[i] = block[i - b * bs];
    }
  }
  return absl::OkStatus();
}

}  // namespace kvgate::worker::cuda
