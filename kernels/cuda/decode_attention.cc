// Host side of the CUDA decode attention: format tables, split planning, workspace, launch.
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <memory>
#include <vector>

#include "absl/strings/str_cat.h"
#include "kernels/cpu/kv_codec.h"
#include "kernels/cpu/numeric.h"
#include "kernels/cuda/decode_attention_internal.h"
#include "kernels/cuda/host_status.h"
#include "kvgate/kernels/cuda_attention.h"

namespace kvgate::kernels::cuda {
namespace {

using internal::CudaError;
using internal::FormatParams;

// Splits the fp16 window's rows may take at small batches (SplitArgs::window_row_splits).
constexpr int kMaxWindowRowSplits = 4;

void Centroids(int bits, int d, float* out) {
  const float inv_sqrt_d = 1.0f / std::sqrt(static_cast<float>(d));
  const std::vector<float>& levels = cpu::LloydMaxLevels(bits);
  for (size_t i = 0; i < levels.size(); ++i) out[i] = levels[i] * inv_sqrt_d;
}

// The v2 kernel's format id for a spec (decode_attention_internal.h), or -1 (v1 only): KIVI needs
// a power-of-two group in [16, d] dividing the 128-token tile; TurboQuant equal key and value
// rates of 4, 3.5, 3 or 2.5 bits and no QJL.
int MmaFormat(const KvFormatSpec& spec, int d, int bs) {
  switch (spec.kind) {
    case KvFormatKind::kFp16:
      return internal::kKindFp16;
    case KvFormatKind::kBf16:
      return internal::kKindBf16;
    case KvFormatKind::kFp8:
      return internal::kKindFp8;
    case KvFormatKind::kInt8:
      return internal::kKindInt8;
    case KvFormatKind::kKivi: {
      const int gs = spec.group_size;
      const int tile = std::max(128, bs);
      if ((gs & (gs - 1)) != 0 || gs < 16 || gs > d || tile % gs != 0 || 128 % bs != 0) return -1;
      if (spec.key_bits == 2 && spec.value_bits == 2) return 12;
      if (spec.key_bits == 4 && spec.value_bits == 4) return 14;
      return -1;
    }
    case KvFormatKind::kTurbo:
      // Equal key and value rates share one centroid table (Make also needs records of a
      // multiple of 4 bytes: the code reader loads aligned 32-bit words).
      if (spec.qjl_keys || spec.key_bits != spec.value_bits) return -1;
      if (spec.key_bits == 4) return 20;
      if (spec.key_bits == 3.5) return 21;
      if (spec.key_bits == 3) return 22;
      if (spec.key_bits == 2.5) return 23;
      return -1;
  }
  return -1;
}

class CudaDecodeAttentionImpl final : public CudaDecodeAttention {
 public:
  ~CudaDecodeAttentionImpl() override {
    for (void* p : {static_cast<void*>(signs_), static_cast<void*>(qprep_),
                    static_cast<void*>(part_acc_), static_cast<void*>(part_ml_)}) {
      if (p != nullptr) cudaFree(p);
    }
  }

  static absl::StatusOr<std::unique_ptr<CudaDecodeAttention>> Make(const KvFormatSpec& spec, int d,
                                                                   int num_kv_heads, int bs) {
    KVGATE_KERNELS_RETURN_IF_ERROR(CudaDeviceStatus());
    if (d != 64 && d != 128) {
      return absl::UnimplementedError(absl::StrCat("CUDA decode: head_dim ", d, " (64 or 128)"));
    }
    if (bs <= 0 || bs % 16 != 0) {
      return absl::UnimplementedError(
          absl::StrCat("CUDA decode: block_size ", bs, " (a multiple of 16)"));
    }
    if (num_kv_heads <= 0) return absl::InvalidArgumentError("num_kv_heads <= 0");
    auto codec = cpu::CreateKvCodec(spec, d);
    if (!codec.ok()) return codec.status();
    std::unique_ptr<CudaDecodeAttentionImpl> a(new CudaDecodeAttentionImpl());
    a->d_ = d;
    a->num_kv_heads_ = num_kv_heads;
    a->block_size_ = bs;
    // KIVI and TurboQuant keep their newest tokens in an fp16 window (R > 0); TurboQuant r=0 has
    // none.
    a->has_window_ = (spec.kind == KvFormatKind::kKivi || spec.kind == KvFormatKind::kTurbo) &&
                     spec.residual_tokens > 0;
    a->per_token_ = spec.kind == KvFormatKind::kFp16 || spec.kind == KvFormatKind::kBf16 ||
                    spec.kind == KvFormatKind::kFp8 || spec.kind == KvFormatKind::kInt8;
    FormatParams& fp = a->fp_;
    fp.record_bytes = (*codec)->record_bytes();
    fp.key_bytes = (*codec)->key_bytes();
    switch (spec.kind) {
      case KvFormatKind::kFp16:
        a->kind_ = internal::kKindFp16;
        break;
      case KvFormatKind::kBf16:
        a->kind_ = internal::kKindBf16;
        break;
      case KvFormatKind::kFp8:
        a->kind_ = internal::kKindFp8;
        break;
      case KvFormatKind::kInt8:
        a->kind_ = internal::kKindInt8;
        break;
      case KvFormatKind::kKivi: {
        a->kind_ = internal::kKindKivi;
        fp.kivi_bits = static_cast<int>(spec.key_bits);
        fp.kivi_group = spec.group_size;
        fp.kivi_codes_bytes = d * fp.kivi_bits / 8;
        if (fp.kivi_group % 8 != 0 || (fp.kivi_group % bs != 0 && bs % fp.kivi_group != 0) ||
            spec.residual_tokens <= 0) {
          return absl::UnimplementedError(absl::StrCat(
              "CUDA decode: KIVI needs 8 | G, G and block_size multiples of one another and R > 0 "
              "(G=",
              fp.kivi_group, ", bs=", bs, ", R=", spec.residual_tokens, ")"));
        }
        break;
      }
      case KvFormatKind::kTurbo: {
        a->kind_ = internal::kKindTurbo;
        if (spec.qjl_keys) {
          return absl::UnimplementedError("CUDA decode: TurboQuant QJL keys have no kernel");
        }
        KVGATE_KERNELS_RETURN_IF_ERROR(cpu::TurboChannelSplit(
            d, spec.key_bits, &fp.tq_key_hi_channels, &fp.tq_key_hi_bits, &fp.tq_key_lo_bits));
        KVGATE_KERNELS_RETURN_IF_ERROR(
            cpu::TurboChannelSplit(d, spec.value_bits, &fp.tq_value_hi_channels,
                                   &fp.tq_value_hi_bits, &fp.tq_value_lo_bits));
        fp.tq_key_code_bytes = (fp.tq_key_hi_channels * fp.tq_key_hi_bits +
                                (d - fp.tq_key_hi_channels) * fp.tq_key_lo_bits) /
                               8;
        fp.tq_value_code_bytes = (fp.tq_value_hi_channels * fp.tq_value_hi_bits +
                                  (d - fp.tq_value_hi_channels) * fp.tq_value_lo_bits) /
                                 8;
        if (fp.tq_key_code_bytes + 2 != fp.key_bytes ||
            fp.tq_value_code_bytes + 2 + fp.key_bytes != fp.record_bytes) {
          return absl::InternalError(
              "CUDA decode: TurboQuant record layout disagrees with the CPU");
        }
        Centroids(fp.tq_key_hi_bits, d, fp.tables);
        Centroids(fp.tq_key_lo_bits, d, fp.tables + 16);
        Centroids(fp.tq_value_hi_bits, d, fp.tables + 32);
        Centroids(fp.tq_value_lo_bits, d, fp.tables + 48);
        std::vector<float> signs(d);
        cpu::SplitMix64 rng(cpu::kTurboSignSeed ^ static_cast<uint64_t>(d));
        for (int i = 0; i < d; ++i) signs[i] = (rng.Next() >> 63) ? -1.0f : 1.0f;
        cudaError_t e = cudaMalloc(&a->signs_, sizeof(float) * d);
        if (e != cudaSuccess) return CudaError(e, "cudaMalloc");
        e = cudaMemcpy(a->signs_, signs.data(), sizeof(float) * d, cudaMemcpyHostToDevice);
        if (e != cudaSuccess) return CudaError(e, "cudaMemcpy");
        break;
      }
    }
    // Tile: whole blocks, <= kMaxTileTokens tokens, ~16 KB of records; KIVI: whole key groups.
    const int seg = bs * fp.record_bytes;
    int tile_blocks = std::max(1, std::min(internal::kMaxTileTokens / bs, 16384 / seg));
    if (a->kind_ == internal::kKindKivi && fp.kivi_group > bs) {
      const int per_group = fp.kivi_group / bs;
      tile_blocks = std::max(per_group, tile_blocks / per_group * per_group);
      if (tile_blocks * bs > internal::kMaxTileTokens) {
        return absl::UnimplementedError("CUDA decode: KIVI group larger than a tile");
      }
    }
    // v1 (DecodeSplitKernel): every format; the fp16 window's split always runs on it, in tiles
    // of fp16 [k | v] records (4 d bytes) that fit its shared memory.
    const int stage_bytes = tile_blocks * seg;
    const int teams = internal::ThreadsPerCta() / (d / 8);
    int smem = std::max(internal::MaxStages() * stage_bytes, teams * 8 * d * 4);  // reduction
    if (a->has_window_) {
      a->residual_tile_tokens_ = std::min(internal::kMaxTileTokens, smem / (4 * d));
    }
    a->smem_v1_bytes_ = smem;
    a->tile_blocks_ = a->tile_blocks_v1_ = tile_blocks;
    a->smem_bytes_ = smem;
    int dev = 0;
    cudaGetDevice(&dev);
    cudaDeviceGetAttribute(&a->num_sms_, cudaDevAttrMultiProcessorCount, dev);
    for (int gi = 0; gi < 4; ++gi) {
      cudaError_t e = internal::SetupSplitKernel(a->kind_, d, 1 << gi, smem, &a->ctas_per_sm_[gi]);
      if (e != cudaSuccess) return CudaError(e, "kernel setup");
      a->ctas_per_sm_[gi] = std::max(1, a->ctas_per_sm_[gi]);
      if (a->kind_ == internal::kKindKivi) {  // KIVI under eviction: v1 (DecodeBatch::key_offsets)
        e = internal::SetupSplitKernel(internal::kKindKiviEvict, d, 1 << gi, smem,
                                       &a->evict_ctas_per_sm_[gi]);
        if (e != cudaSuccess) return CudaError(e, "kernel setup");
        a->evict_ctas_per_sm_[gi] = std::max(1, a->evict_ctas_per_sm_[gi]);
      }
    }
    // v2 (DecodeMmaKernel, tensor cores) where it has an instance: tiles of 64 tokens (records of
    // >= 256 bytes) or 128, kStagesMma deep.
    int fmt = MmaFormat(spec, d, bs);
    if (a->kind_ == internal::kKindTurbo && fp.record_bytes % 4 != 0) fmt = -1;
    if (fmt >= 0) {
      const int mma_tile_tokens = fp.record_bytes >= 256 ? 64 : 128;
      const int mma_tile_blocks = std::max(1, mma_tile_tokens / bs);
      int mma_smem = internal::MmaStages() * mma_tile_blocks * seg + 16;
      if (a->kind_ == internal::kKindKivi) {
        mma_smem += 2 * (mma_tile_blocks * bs / fp.kivi_group) * d * 4;
      }
      mma_smem = std::max(mma_smem, internal::MmaMergeBytes(d));
      int ctas = 0;
      if (mma_smem <= 160 * 1024 &&
          internal::SetupMmaKernel(fmt, d, mma_smem, &ctas) == cudaSuccess) {
        a->mma_fmt_ = fmt;
        a->tile_blocks_ = mma_tile_blocks;
        a->smem_bytes_ = mma_smem;
        for (int gi = 0; gi < 4; ++gi) a->ctas_per_sm_[gi] = std::max(1, ctas);
      }
      cudaGetLastError();  // a refused setup leaves v1 in place
    }
    return std::unique_ptr<CudaDecodeAttention>(std::move(a));
  }

  int record_bytes() const override { return fp_.record_bytes; }
  int last_num_splits() const override { return last_splits_; }
  void set_forced_splits(int splits) override { forced_splits_ = splits; }
  uint64_t workspace_generation() const override { return workspace_generation_; }

  absl::Status Run(const DecodeBatch& b, void* stream_ptr) override {
    const int d = d_, hkv = num_kv_heads_;
    if (b.num_seqs <= 0) return absl::OkStatus();
    if (b.num_q_heads <= 0 || b.num_q_heads % hkv != 0) {
      return absl::InvalidArgumentError(
          absl::StrCat("num_q_heads ", b.num_q_heads, " not a multiple of kv heads ", hkv));
    }
    const int g = b.num_q_heads / hkv;
    if (g != 1 && g != 2 && g != 4 && g != 8) {
      return absl::UnimplementedError(absl::StrCat("CUDA decode: GQA group ", g, " (1/2/4/8)"));
    }
    if (!b.pool || !b.block_tables || !b.encoded_lens || !b.q || !b.out || b.max_encoded_len < 0 ||
        b.max_blocks_per_seq * block_size_ < b.max_encoded_len) {
      return absl::InvalidArgumentError("DecodeBatch: missing pointers or inconsistent sizes");
    }
    // Block segments are copied in 16-byte units (bulk copies / cp.async): every segment start
    // must be 16-byte aligned.
    if (reinterpret_cast<uintptr_t>(b.pool) % 16 != 0 || b.block_stride_bytes % 16 != 0 ||
        b.layer_offset_bytes % 16 != 0) {
      return absl::InvalidArgumentError(absl::StrCat(
          "DecodeBatch: pool, block_stride_bytes (", b.block_stride_bytes,
          ") and layer_offset_bytes (", b.layer_offset_bytes, ") must be 16-byte aligned"));
    }
    if (kind_ == internal::kKindFp8 && !b.head_scales) {
      return absl::InvalidArgumentError("DecodeBatch: FP8 needs head_scales");
    }
    // Formats without a window (TurboQuant r=0 included) ignore the residual fields.
    const bool residual = has_window_ && b.residual_lens != nullptr;
    if (residual && (!b.residual_k || !b.residual_v || b.residual_capacity <= 0)) {
      return absl::InvalidArgumentError("DecodeBatch: residual window pointers missing");
    }
    if (b.head_window != nullptr && !residual) {
      return absl::InvalidArgumentError(
          "DecodeBatch: head_window needs a format with a window and residual_lens");
    }
    // KIVI under eviction: key groups anywhere and solo keys, on the v1 kernel (kKindKiviEvict),
    // which also scores the sinks itself. The KIVI call without key_offsets is unchanged.
    const bool evicted = b.key_offsets != nullptr;
    if (evicted &&
        (kind_ != internal::kKindKivi || b.key_offsets_block_stride < int64_t{hkv} * block_size_)) {
      return absl::InvalidArgumentError(
          "DecodeBatch: key_offsets need KIVI and a block stride of at least kv_heads * "
          "block_size");
    }
    const int kind = evicted ? internal::kKindKiviEvict : kind_;
    const int mma_fmt = evicted ? -1 : mma_fmt_;
    const int tile_blocks = evicted ? tile_blocks_v1_ : tile_blocks_;
    // Sinks: one more split per (sequence, kv-head) on the tensor-core kernel (before the fp16
    // window's splits: with sinks two, the sink rows still in the window, then the rest), for the
    // formats sink eviction runs with: the per-token ones and TurboQuant on the tensor cores
    // (equal key and value rates). KIVI under eviction scores its sinks inside its own splits.
    const bool sinks = b.sink_slots != nullptr;
    const bool turbo = kind_ == internal::kKindTurbo;
    if (sinks && !(evicted || ((per_token_ || turbo) && mma_fmt_ >= 0))) {
      return absl::UnimplementedError(
          "CUDA decode: attention sinks (sink eviction's shifted query) are implemented for fp16, "
          "bf16, fp8, int8, TurboQuant with equal key and value rates, and KIVI under eviction "
          "only");
    }
    const bool sink_split = sinks && !evicted;
    if (sinks && (!b.sink_shift || !b.rope_inv_freq)) {
      return absl::InvalidArgumentError(
          "DecodeBatch: sink_slots needs sink_shift and rope_inv_freq");
    }
    // Split planning: whole tiles per split. Automatic: the split count whose estimated time is
    // least, time = waves of CTAs (ceil(CTAs / resident CTA slots)) x (tiles per split + 1 for
    // the pipeline's fill), so that the last wave is not a small tail; ties go to fewer splits.
    const int max_blocks = (b.max_encoded_len + block_size_ - 1) / block_size_;
    const int max_tiles = std::max(1, (max_blocks + tile_blocks - 1) / tile_blocks);
    const int gi = g == 1 ? 0 : g == 2 ? 1 : g == 4 ? 2 : 3;
    const int64_t slots = int64_t{num_sms_} * (evicted ? evict_ctas_per_sm_[gi] : ctas_per_sm_[gi]);
    const int64_t pairs = int64_t{b.num_seqs} * hkv;
    // Splits left for the window's and the sinks' splits.
    // Without sinks the window's rows go to up to kMaxWindowRowSplits splits when the pairs are
    // too few to fill the GPU with one window CTA each (B1: 8 pairs on 132 SMs).
    const int window_row_splits =
        residual && !sinks && !evicted
            ? static_cast<int>(std::clamp<int64_t>(num_sms_ / pairs, 1, kMaxWindowRowSplits))
            : 1;
    const int window_splits = residual ? (sink_split ? 2 : window_row_splits) : 0;
    const int split_cap =
        internal::kMaxReduceSplits - std::max(1, window_splits + (sink_split ? 1 : 0));
    int splits = 1;
    if (forced_splits_ > 0) {
      splits = forced_splits_;
    } else {
      const int64_t most = std::min<int64_t>(
          {max_tiles, split_cap, std::max<int64_t>(1, (8 * slots + pairs - 1) / pairs)});
      int64_t best_time = -1;
      for (int64_t s = 1; s <= most; ++s) {
        const int64_t tps = (max_tiles + s - 1) / s;
        const int64_t used = (max_tiles + tps - 1) / tps;
        const int64_t time = (pairs * used + slots - 1) / slots * (tps + 1);
        if (best_time < 0 || time < best_time) {
          best_time = time;
          splits = static_cast<int>(used);
        }
      }
    }
    splits = std::clamp(splits, 1, std::min(max_tiles, split_cap));
    const int tiles_per_split = (max_tiles + splits - 1) / splits;
    splits = (max_tiles + tiles_per_split - 1) / tiles_per_split;
    last_splits_ = splits;
    internal::SplitArgs a;
    a.pool = b.pool;
    a.block_stride_bytes = b.block_stride_bytes;
    a.layer_offset_bytes = b.layer_offset_bytes;
    a.block_tables = b.block_tables;
    a.max_blocks_per_seq = b.max_blocks_per_seq;
    a.encoded_lens = b.encoded_lens;
    a.residual_lens = residual ? b.residual_lens : nullptr;
    a.residual_k = b.residual_k;
    a.residual_v = b.residual_v;
    a.residual_capacity = b.residual_capacity;
    a.residual_tile_tokens = residual_tile_tokens_;
    a.head_window = b.head_window;
    a.head_scales = b.head_scales;
    a.seq_slots = b.seq_slots;
    a.num_q_heads = b.num_q_heads;
    a.block_size = block_size_;
    a.key_offsets = b.key_offsets;
    a.key_offsets_block_stride = b.key_offsets_block_stride;
    a.tile_blocks = tile_blocks;
    a.blocks_per_split = tiles_per_split * tile_blocks;
    a.num_splits = splits;
    a.total_splits = splits + (sink_split ? 1 : 0) + window_splits;
    a.window_row_splits = window_row_splits;
    // Workspace (with sinks: the shifted prepared query after the prepared one, and for
    // TurboQuant's window split the shifted query in the original basis after that).
    const size_t q_floats = size_t(b.num_seqs) * b.num_q_heads * d;
    const size_t acc_floats = size_t(b.num_seqs) * hkv * a.total_splits * g * d;
    const size_t ml_floats = size_t(b.num_seqs) * hkv * a.total_splits * g * 2;
    const bool window_sinks = sinks && turbo && residual;
    const size_t qprep_floats = q_floats * (window_sinks ? 3 : sinks ? 2 : 1);
    if (qprep_floats > qprep_cap_ || acc_floats > part_acc_cap_ || ml_floats > part_ml_cap_) {
      ++workspace_generation_;  // buffers move: captured CUDA graphs are stale
    }
    KVGATE_KERNELS_RETURN_IF_ERROR(Grow(&qprep_, &qprep_cap_, qprep_floats));
    KVGATE_KERNELS_RETURN_IF_ERROR(Grow(&part_acc_, &part_acc_cap_, acc_floats));
    KVGATE_KERNELS_RETURN_IF_ERROR(Grow(&part_ml_, &part_ml_cap_, ml_floats));
    a.qprep = qprep_;
    if (sinks) {
      a.sink_slots = b.sink_slots;
      a.sink_shift = b.sink_shift;
      a.rope_inv_freq = b.rope_inv_freq;
      a.qprep_sink = qprep_ + q_floats;
      if (window_sinks) a.query_sink = qprep_ + 2 * q_floats;
    }
    a.part_acc = part_acc_;
    a.part_ml = part_ml_;
    cudaError_t e = internal::LaunchDecode(
        kind, mma_fmt, d, g, a, fp_, hkv, b.num_seqs, evicted ? smem_v1_bytes_ : smem_bytes_,
        smem_v1_bytes_, b.q, b.out, signs_, b.scale, static_cast<cudaStream_t>(stream_ptr));
    if (e != cudaSuccess) return CudaError(e, "decode attention launch");
    return absl::OkStatus();
  }

 private:
  CudaDecodeAttentionImpl() = default;

  static absl::Status Grow(float** p, size_t* cap, size_t floats) {
    if (floats <= *cap) return absl::OkStatus();
    if (*p != nullptr) {
      cudaDeviceSynchronize();
      cudaFree(*p);
      *p = nullptr;
      *cap = 0;
    }
    cudaError_t e = cudaMalloc(p, floats * sizeof(float));
    if (e != cudaSuccess) return CudaError(e, "cudaMalloc workspace");
    *cap = floats;
    return absl::OkStatus();
  }

  int kind_ = 0, d_ = 0, num_kv_heads_ = 0, block_size_ = 0, tile_blocks_ = 1;
  int residual_tile_tokens_ = 0, smem_bytes_ = 0, num_sms_ = 1;
  bool has_window_ = false;  // KIVI, TurboQuant with R > 0
  bool per_token_ = false;   // fp16, bf16, fp8, int8 (sinks: these and TurboQuant)
  int ctas_per_sm_[4] = {1, 1, 1, 1};
  int evict_ctas_per_sm_[4] = {1, 1, 1, 1};  // KIVI: the v1 kernel under eviction
  int tile_blocks_v1_ = 1;
  int forced_splits_ = 0, last_splits_ = 0;
  uint64_t workspace_generation_ = 0;
  int mma_fmt_ = -1;  // DecodeMmaKernel (v2) format id; -1: DecodeSplitKernel (v1)
  int smem_v1_bytes_ = 0;
  FormatParams fp_;
  float* signs_ = nullptr;
  float* qprep_ = nullptr;
  float* part_acc_ = nullptr;
  float* part_ml_ = nullptr;
  size_t qprep_cap_ = 0, part_acc_cap_ = 0, part_ml_cap_ = 0;
};

}  // namespace

absl::Status CudaDeviceStatus() {
  int count = 0;
  const cudaError_t e = cudaGetDeviceCount(&count);
  if (e != cudaSuccess) {
    return absl::UnavailableError(absl::StrCat("no CUDA device: ", cudaGetErrorString(e)));
  }
  if (count == 0) return absl::UnavailableError("no CUDA device: cudaGetDeviceCount returned 0");
  return absl::OkStatus();
}

absl::StatusOr<std::unique_ptr<CudaDecodeAttention>> CudaDecodeAttention::Create(
    const KvFormatSpec& spec, int head_dim, int num_kv_heads, int block_size) {
  return CudaDecodeAttentionImpl::Make(spec, head_dim, num_kv_heads, block_size);
}

}  // namespace kvgate::kernels::cuda
