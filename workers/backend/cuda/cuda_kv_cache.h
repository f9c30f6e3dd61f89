// CudaKvCache: the paged KV cache of the CUDA ModelRunner, for every KV format the CPU reference
// stores (fp16, bf16, fp8, int8, KIVI, TurboQuant without QJL), with the "/fp16=F:L" layer option.
//
// The pool is one cudaMalloc'd byte array with the CPU cache's layout byte for byte
// (kernels/cpu/cpu_kv_cache.cc): [num_blocks][layer][kv_head][block_size][record_bytes(layer)],
// the first F and last L layers in fp16 records, the others in the format's. Blocks, block tables
// and token counts live on the host; per-sequence device state lives at a fixed SLOT per sequence
// (at most max_sequences slots): FP8's (key, value) scales per (layer, kv-head) and the fp16
// residual window per layer of KIVI and TurboQuant (unless r=0). Appends and reads go through
// kvgate_kernels_cuda's CudaKvAppend, decode attention through CudaDecodeAttention, one object of
// each per distinct layer format. The host knows each sequence's stored tokens per layer and
// derives the encoded/window split from it (kernels::cuda::SplitStoredTokens), so a step never
// reads counts back from the device.
//
// Semantics are CpuKvCache's: Append encodes through the format (FP8 scales chosen by the first
// append with a nonzero amax; KIVI's and TurboQuant's newest tokens in the fp16 window, flushed G
// or 16 at a time);
// DecodeAttention reads every stored token through the format; PrefillAttention reads the cached
// prefix through the format and the fresh tokens in fp32.
//
// Eviction (H2O, sink; every format) follows CpuKvCache: before
// each append of n tokens to a layer the cache keeps, per kv-head, the tokens CpuKvCache keeps in
// the first slots (cuda_kv_evict.h): sinks compact them in slot (= position) order, H2O refills the
// evicted tokens' slots with the newest kept ones, so its slots are in no particular order
// (ReadStored's positions say which token each holds); H2O masses accumulate after every decode
// and prefill attention. How many slots survive is a function of the stored count and the
// length (PlanAppend), so the host tracks stored tokens without reading anything back. With
// rope_inv_freq, sinks are scored at positions within the cache as CpuKvCache scores them: the
// query rotated back by the evicted count for the sink slots (SinkShiftAfter; the decode and
// prefill attention take it per sequence; TurboQuant with unequal key and value rates, whose
// decode runs the split-KV kernel, has no shifted query: UnimplementedError). KIVI keeps
// CpuKvCache's slot order instead (its key groups are runs of slots): the records compact in
// order, the survivors of a key group that loses tokens are re-encoded as solo keys, and a byte
// per slot (key_offsets_) tells the read and decode kernels where each key's group starts, or that
// it is solo; the decode then runs the CUDA-core kernel that reads them (with the sinks' shifted
// query). TurboQuant and KIVI with their fp16 windows: the kept set spans each head's
// records and window rows; the records compact as above, the window's kept rows move down in
// order after them, so each kv-head's window holds its own number of rows. Those counts live on
// the device only (head_window: per layer, slot and kv-head; the eviction and the appends update
// them, the append / decode / read kernels take each head's split from them), while the stored
// total stays a host function of the plan. H2O decode masses of TurboQuant layers are scored from
// the codes against the rotated query (and the window's rows against the query), as CpuKvCache
// scores them (DecodeMassLayer); those of KIVI layers come from keys read back in fp32 (the mass
// kernels do not decode KIVI's key groups): DecodeAttention and the runner score the decode query
// against them as a one-token prefill chunk (PrefillMassLayer).
//
// The CUDA runner drives the device methods (AppendLayer, DecodeLayer, ReadLayer) for whole steps
// with its own device metadata and then CommitAppend. The host-pointer KvCache methods stage
// through temporary device buffers and synchronize: for tests and tools, not for speed.
//
//   ASSIGN_OR_RETURN(auto cache, CudaKvCache::Create(config, stream, /*max_sequences=*/64));
//   RETURN_IF_ERROR(cache->AddSequence(seq, prompt_len));
//   ... runner: AppendLayer / DecodeLayer / ReadLayer for every layer, then CommitAppend(seq, n)
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <map>
#include <memory>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "kvgate/kernels/cuda_attention.h"
#include "kvgate/kernels/cuda_kv_append.h"
#include "kvgate/kernels/kv_cache.h"
#include "workers/backend/cuda/cuda_kv_evict.h"

namespace kvgate::worker::cuda {

// Sizes of a cache configuration, known before the pool is allocated.
struct KvCacheGeometry {
  int64_t block_bytes = 0;      // one pool block, all layers
  int64_t bytes_per_token = 0;  // block_bytes / block_size
  // The fp16 residual windows (KIVI, TurboQuant) of one sequence over all layers (KvCache's
  // residual_bytes_per_sequence).
  int64_t residual_bytes_per_sequence = 0;
  // Everything one sequence slot holds outside the pool: the residual windows, FP8's scales and
  // (H2O) the mass pass's scratch.
  int64_t slot_bytes = 0;
  // Eviction's per-slot positions and masses of one block (outside the pool), and (H2O) the
  // decode mass pass's scores of one layer for the block's slots; 0 without eviction.
  int64_t eviction_bytes_per_block = 0;
};

// Sink eviction's query shift for one sequence's attention (CpuKvCache's SinkShift): slots
// [0, slots) are scored against the query rotated back by `shift` RoPE positions.
struct SinkShift {
  int32_t slots = 0;
  int32_t shift = 0;  // evicted tokens: length - stored
};

// Sequences of a batch as the device kernels see them (device arrays).
struct DeviceSeqBatch {
  int num_seqs = 0;
  const int32_t* block_tables = nullptr;  // [num_seqs, max_blocks] pool block ids
  int max_blocks = 0;
  const int32_t* slots = nullptr;  // [num_seqs] state slot of each sequence
};

class CudaKvCache final : public kernels::KvCache {
 public:
  // UnimplementedError for sink eviction with rope_inv_freq and TurboQuant of unequal key and
  // value rates,
  // eviction with a window above kMaxEvictWindowRows rows, TurboQuant QJL keys, head_dim other than
  // 64/128 and block sizes that are not a multiple of 16 (no kernels; DecodeAttention also refuses
  // GQA groups above 8); InvalidArgumentError for rope_inv_freq of a size other than head_dim / 2.
  // ResourceExhausted when the pool or the slots cannot be allocated. `stream` (not owned) carries
  // every kernel and copy. max_sequences: sequences that can be registered at once (slots of
  // per-sequence state).
  static absl::StatusOr<std::unique_ptr<CudaKvCache>> Create(const kernels::KvCacheConfig& config,
                                                             cudaStream_t stream,
                                                             int max_sequences = 256);
  // The geometry of `config` (num_blocks ignored) without allocating a pool; needs a device (the
  // format objects are built to read their record sizes).
  static absl::StatusOr<KvCacheGeometry> Measure(const kernels::KvCacheConfig& config);
  ~CudaKvCache() override;

  const kernels::KvCacheConfig& config() const override { return config_; }
  const kernels::KvFormatDesc& desc() const override { return desc_; }
  int64_t free_blocks() const override { return static_cast<int64_t>(free_list_.size()); }
  int64_t total_blocks() const override { return config_.num_blocks; }
  int64_t BlocksForTokens(int64_t num_tokens) const override;
  int64_t bytes_per_token() const override { return geometry_.bytes_per_token; }
  int64_t allocated_bytes() const override { return geometry_.block_bytes * config_.num_blocks; }
  int64_t residual_bytes_per_sequence() const override {
    return geometry_.residual_bytes_per_sequence;
  }

  // ResourceExhaustedError also when all max_sequences slots are taken.
  absl::Status AddSequence(kernels::SeqId seq, int64_t reserve_tokens) override;
  absl::Status Reserve(kernels::SeqId seq, int64_t num_tokens) override;
  void FreeSequence(kernels::SeqId seq) override;
  int64_t Length(kernels::SeqId seq, int layer) const override;
  int64_t StoredTokens(kernels::SeqId seq, int layer) const override;

  absl::Status Append(kernels::SeqId seq, int layer, int64_t n, const float* k,
                      const float* v) override;
  absl::Status PrefillAttention(kernels::SeqId seq, int layer, int64_t n, int num_q_heads,
                                const float* q, const float* k, const float* v, float scale,
                                float* out) override;
  absl::Status DecodeAttention(kernels::SeqId seq, int layer, int num_q_heads, const float* q,
                               float scale, float* out) override;
  absl::Status ReadStored(kernels::SeqId seq, int layer, int kv_head, float* k, float* v,
                          int64_t* positions) const override;
  absl::Status ReadAttentionMass(kernels::SeqId seq, int layer, int kv_head,
                                 float* mass) const override;

  // ---- For the CUDA runner ----
  const KvCacheGeometry& geometry() const { return geometry_; }
  int max_sequences() const { return max_sequences_; }
  // Query heads per kv-head the decode kernel runs with: the GQA group rounded up to 1, 2, 4 or 8
  // (queries of the padding heads are zero and their outputs ignored).
  int group_pad(int num_q_heads) const;
  // Distinct layer formats (1, or 2 with the "/fp16=F:L" option), the index of a layer's, and
  // its spec (the configured format without the layer option, or fp16).
  int num_formats() const { return static_cast<int>(formats_.size()); }
  int format_index(int layer) const { return layer_format_[layer]; }
  const kernels::KvFormatSpec& format_spec(int index) const { return formats_[index].spec; }
  const kernels::KvFormatSpec& layer_spec(int layer) const { return format_of(layer).spec; }
  // Changes whenever a decode attention workspace is reallocated (CUDA graphs that captured
  // DecodeLayer are stale then).
  uint64_t decode_workspace_generation() const {
    uint64_t generation = 0;
    for (const Format& f : formats_) generation += f.decode->workspace_generation();
    return generation;
  }
  // Host block table of a known sequence (pool block ids, in logical order); nullptr if unknown.
  const std::vector<int32_t>* BlockTable(kernels::SeqId seq) const;
  // State slot of a known sequence; -1 if unknown.
  int Slot(kernels::SeqId seq) const;
  // Reserved slot capacity of a known sequence (blocks * block_size); -1 if unknown.
  int64_t Capacity(kernels::SeqId seq) const;
  bool evicting() const {
    return config_.format.eviction.kind != kernels::EvictionSpec::Kind::kNone;
  }
  bool h2o() const { return config_.format.eviction.kind == kernels::EvictionSpec::Kind::kH2O; }
  // What a known sequence keeps before an append of n tokens (the same for every layer when all
  // layers hold the same tokens, as the runner's steps keep them); plan.stored - evicted is
  // KeptBefore(plan). Without eviction: everything.
  EvictPlan PlanAppend(kernels::SeqId seq, int64_t n) const;
  static int64_t KeptBefore(const EvictPlan& plan) {
    return std::min<int64_t>(plan.stored, int64_t{plan.lead} + plan.trail + plan.heavy);
  }
  // Eviction with TurboQuant's window in format `index`: each kv-head's split between records and
  // window is on the device (DecodeLayer's encoded_lens + residual_lens: the stored total).
  bool head_windows(int index) const {
    return head_window_ != nullptr && formats_[index].append->residual_capacity() > 0;
  }
  // H2O: the mass kernels do not decode the layer's keys (KIVI): its decode masses
  // come from keys read back (ReadLayer) through PrefillMassLayer, as one-token chunks.
  bool layer_mass_reads_back(int layer) const { return MassReadsBack(layer_spec(layer)); }
  bool mass_reads_back() const {
    return std::any_of(formats_.begin(), formats_.end(),
                       [](const Format& f) { return MassReadsBack(f.spec); });
  }
  // Sink eviction with rope_inv_freq (else nullptr): the frequencies on the device [head_dim / 2],
  // for the prefill attention's sink shift.
  const double* sink_rope_inv_freq() const { return rope_inv_freq_; }
  // The sink shift of a sequence's attention right after the append `plan` describes (as
  // PlanAppend gave it): {0, 0} without sink_rope_inv_freq() or when nothing was evicted.
  SinkShift SinkShiftAfter(const EvictPlan& plan) const;
  // Records that `n` tokens were appended on the device to every layer of `seq` (after the
  // eviction PlanAppend(seq, n) describes) and frees the blocks eviction emptied.
  void CommitAppend(kernels::SeqId seq, int64_t n);

  // Eviction (evicting() only). Enqueues, before AppendLayer of `layer`, the eviction of plans[s]
  // (device) for each sequence of the batch and the positions of the slots the append fills.
  absl::Status EvictLayer(int layer, const DeviceSeqBatch& seqs, const EvictPlan* plans);
  // H2O: adds the decode queries' attention probabilities to the masses of `layer`: q as for
  // DecodeLayer, lens [num_seqs] (device) stored slots (with TurboQuant's per-head windows: the
  // stored total, records and window rows), max_len >= each of them.
  absl::Status DecodeMassLayer(int layer, const DeviceSeqBatch& seqs, const int32_t* lens,
                               int max_len, const float* q, int group, int group_pad, float scale);
  // H2O: the same for prefill chunks (cuda_kv_evict.h, LaunchPrefillMass); `seqs` holds the
  // block tables chunks[i].batch_index refers to; row_stats: scratch of
  // PrefillMassStatsFloatsPerRow(num_kv_heads) floats per row of q.
  absl::Status PrefillMassLayer(int layer, const DeviceSeqBatch& seqs,
                                const PrefillMassChunk* chunks, int num_chunks,
                                int max_chunk_tokens, int max_chunk_keys, const float* q, int group,
                                int group_pad, const float* fresh_k, int64_t fresh_row_stride,
                                const float* prefix_k, int64_t prefix_stride_tokens, float scale,
                                float* row_stats);

  // Enqueues the append of rows to `layer` for a batch: sequence s owns rows
  // [row_begin[s], row_begin[s + 1]) of k / v (device, row r and kv-head h at
  // k[r * row_stride + h * head_dim]) and holds stored_before[s] tokens of that layer already.
  absl::Status AppendLayer(int layer, const DeviceSeqBatch& seqs, const int32_t* row_begin,
                           const int32_t* stored_before, int num_rows, int max_rows_per_seq,
                           const float* k, const float* v, int64_t row_stride);
  // Enqueues decode attention of one query token per sequence over everything stored for
  // `layer`: encoded_lens / residual_lens [num_seqs] (device) as SplitStoredTokens gives them for
  // layer_spec(layer) (residual_lens may be null without a residual window), q / out
  // [num_seqs, num_kv_heads * group_pad, head_dim] fp32. sink_slots / sink_shift [num_seqs]
  // (device; both or neither): the SinkShiftAfter of each sequence.
  absl::Status DecodeLayer(int layer, const DeviceSeqBatch& seqs, const int32_t* encoded_lens,
                           int max_encoded_len, const int32_t* residual_lens, const float* q,
                           int num_q_heads_padded, float scale, float* out,
                           const int32_t* sink_slots = nullptr,
                           const int32_t* sink_shift = nullptr);
  // Enqueues the read of the first lens[s] (= stored) tokens of each sequence for `layer`, in the
  // original basis: out_k / out_v [num_seqs, kv_heads, stride_tokens, head_dim] fp32.
  absl::Status ReadLayer(int layer, const DeviceSeqBatch& seqs, const int32_t* lens, int max_len,
                         float* out_k, float* out_v, int64_t stride_tokens);

  // Appends `n` tokens of synthetic keys and values (uniform in [-sqrt 3, sqrt 3): unit variance,
  // a fixed pattern from `seed`) to every layer of `seq` through the format's append, as the
  // runner would append computed ones; the sequence must have room reserved (with eviction it
  // grows itself, chunk by chunk, evicting as appends do; no masses accumulate). For benchmarks
  // that need long contexts without prefilling them through the model. Synchronizes.
  absl::Status AppendSynthetic(kernels::SeqId seq, int64_t n, uint64_t seed);

 private:
  struct Sequence {
    int slot = -1;
    std::vector<int32_t> blocks;
    std::vector<int64_t> stored;  // per layer: slots in use
    std::vector<int64_t> length;  // per layer: tokens appended (== stored without eviction)
    int64_t reserved_length = 0;  // largest length asked for by AddSequence / Reserve
  };
  // One distinct layer format: its spec and device objects.
  struct Format {
    kernels::KvFormatSpec spec;
    std::unique_ptr<kernels::cuda::CudaKvAppend> append;
    std::unique_ptr<kernels::cuda::CudaDecodeAttention> decode;
  };
  CudaKvCache(const kernels::KvCacheConfig& config, cudaStream_t stream)
      : config_(config), stream_(stream) {}
  // Validates config_ and builds everything but the device allocations: formats, per-layer
  // offsets and residual capacities, geometry_.
  absl::Status InitLayout();
  // Grows the block table to hold the slots a length of num_tokens needs.
  absl::Status GrowTo(Sequence& s, int64_t num_tokens);
  EvictPlan Plan(const Sequence& s, int layer, int64_t n) const;
  // The sink shift of attention over `stored` slots of a sequence of `length` tokens.
  SinkShift SinkShiftFor(int64_t stored, int64_t length) const;
  // Slots `s` needs to reach `length` tokens (CpuKvCache::SlotsNeeded).
  int64_t SlotsNeeded(const Sequence& s, int64_t length) const;
  void TrimBlocks(Sequence& s);
  absl::Status AppendSyntheticEvicting(Sequence& s, int64_t n, uint64_t seed);
  EvictPool PoolFor(int layer, const DeviceSeqBatch& seqs) const;

  absl::StatusOr<Sequence*> Find(kernels::SeqId seq, int layer);
  absl::StatusOr<const Sequence*> Find(kernels::SeqId seq, int layer) const;
  const Format& format_of(int layer) const { return formats_[layer_format_[layer]]; }
  float* head_scales(int layer) const;
  static bool MassReadsBack(const kernels::KvFormatSpec& spec) {
    return spec.kind == kernels::KvFormatKind::kKivi;
  }
  // Eviction with KIVI layers: key_offsets_ is allocated.
  bool kivi_layers() const {
    return std::any_of(formats_.begin(), formats_.end(),
                       [](const Format& f) { return f.spec.kind == kernels::KvFormatKind::kKivi; });
  }
  // KIVI layers under eviction: the layer's key-group offsets (ReadBatch::key_offsets: at the
  // layer's first byte, rows of key_offsets_block_stride() bytes per block); else nullptr.
  uint8_t* key_offsets(int layer) const;
  int64_t key_offsets_block_stride() const {
    return int64_t{config_.num_layers} * config_.num_kv_heads * config_.block_size;
  }
  uint16_t* residual(int layer, bool values) const;
  // Evicting layers with a window: the per-head window counts [slots][kv_heads]; else nullptr.
  int32_t* head_window(int layer) const;
  template <class Batch>
  void FillPoolFields(int layer, const DeviceSeqBatch& seqs, Batch& b) const;
  // Copies a per-slot array (positions_, mass_) of (s, layer, kv_head)'s stored slots to out.
  template <class T>
  absl::Status ReadSlotMeta(const Sequence& s, int layer, int kv_head, const T* meta, T* out) const;
  // Reads every stored token of (seq, layer) to device buffers [kv_heads, stored, head_dim].
  absl::Status ReadAll(const Sequence& s, int layer, float* k, float* v) const;

  kernels::KvCacheConfig config_;
  kernels::KvFormatDesc desc_;
  KvCacheGeometry geometry_;
  cudaStream_t stream_ = nullptr;
  int max_sequences_ = 0;
  std::vector<Format> formats_;
  std::vector<int> layer_format_;         // [num_layers] index into formats_
  std::vector<int64_t> layer_offset_;     // [num_layers] bytes into a block
  std::vector<int> residual_capacity_;    // [num_layers] R + flush (KIVI, TurboQuant), else 0
  std::vector<int64_t> residual_offset_;  // [num_layers] halves into residual_k_ / residual_v_
  uint8_t* pool_ = nullptr;
  float* scales_ = nullptr;  // [layers][slots][kv_heads][2] (FP8 layers' scales)
  uint16_t* residual_k_ =
      nullptr;  // per windowed layer: [slots][kv_heads][capacity][head_dim] fp16
  uint16_t* residual_v_ = nullptr;
  std::vector<int32_t> free_list_;   // LIFO of free block ids
  std::vector<int> free_slots_;      // LIFO of free state slots
  int32_t* positions_ = nullptr;     // evicting: [num_blocks][layers][kv_heads][block_size]
  float* mass_ = nullptr;            // H2O: same layout
  float* mass_scratch_ = nullptr;    // H2O: DecodeMassScratchFloats(max_sequences_, kv_heads)
  double* rope_inv_freq_ = nullptr;  // sinks with rope_inv_freq: [head_dim / 2]
  TurboMassKeys turbo_mass_keys_;    // H2O with TurboQuant layers: their keys for the mass kernel
  float* mass_scores_ = nullptr;     // H2O: DecodeMassScoreFloatsPerBlock per block (one layer)
  // Evicting with a window (TurboQuant r > 0): rows in each head's fp16 window,
  // [layers][slots][kv_heads] (layers without a window unused). Eviction keeps different tokens
  // per kv-head under H2O, so the heads' splits between records and window differ; only the
  // device knows them (EvictCompact and the appends update them, the kernels read them).
  int32_t* head_window_ = nullptr;
  // Evicting with KIVI layers: each slot's key-group offset (kvgate/kernels/cuda_kv_append.h,
  // ReadBatch::key_offsets), [num_blocks][layers][kv_heads][block_size] like positions_ (layers
  // of other formats unused). EvictCompact keeps it.
  uint8_t* key_offsets_ = nullptr;
  std::map<kernels::SeqId, Sequence> seqs_;
};

}  // namespace kvgate::worker::cuda
