// Host side of the device KV append / read-back (kvgate/kernels/cuda_kv_append.h): the format
// tables (from the CPU codec's definitions), argument checks, launch.
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "kernels/cpu/kv_codec.h"
#include "kernels/cpu/numeric.h"
#include "kernels/cuda/host_status.h"
#include "kernels/cuda/kv_append_internal.h"
#include "kvgate/kernels/cuda_attention.h"
#include "kvgate/kernels/cuda_kv_append.h"

namespace kvgate::kernels::cuda {
namespace {

using internal::AppendFormat;

// InternalError "CUDA KV append: <what>: <CUDA error string>".
absl::Status CudaError(cudaError_t e, const char* what) {
  return internal::CudaError(e, absl::StrCat("CUDA KV append: ", what).c_str());
}

// The TurboQuant table (kv_append_internal.h), with TurboCodebook's and HadamardRotation's
// float expressions so that centroids, bounds and signs are the CPU's bit for bit.
std::vector<float> TurboTable(const AppendFormat& f) {
  std::vector<float> table(internal::kTurboTableFloats + internal::kTurboSignWords, 0.0f);
  const float inv_sqrt_d = 1.0f / std::sqrt(static_cast<float>(f.head_dim));
  for (int half = 0; half < 2; ++half) {
    for (int cls = 0; cls < 2; ++cls) {
      const int bits = cls == 0 ? f.tq_hi_bits[half] : f.tq_lo_bits[half];
      float* centroids = table.data() + (2 * half + cls) * 32;
      const std::vector<float>& levels = cpu::LloydMaxLevels(bits);
      for (size_t i = 0; i < levels.size(); ++i) centroids[i] = levels[i] * inv_sqrt_d;
      for (size_t i = 0; i + 1 < levels.size(); ++i) {
        centroids[16 + i] = 0.5f * (centroids[i] + centroids[i + 1]);
      }
    }
  }
  std::vector<uint32_t> signs(internal::kTurboSignWords, 0);
  cpu::SplitMix64 rng(cpu::kTurboSignSeed ^ static_cast<uint64_t>(f.head_dim));
  for (int c = 0; c < f.head_dim; ++c) {
    if (rng.Next() >> 63) signs[c / 32] |= 1u << (c % 32);
  }
  std::memcpy(table.data() + internal::kTurboTableFloats, signs.data(), 4 * signs.size());
  return table;
}

// Largest power of two <= 16 dividing every term of a record address.
int AddressAlignment(uintptr_t base, int64_t block_stride, int64_t layer_offset, int record_bytes) {
  const uint64_t x = static_cast<uint64_t>(base) | static_cast<uint64_t>(block_stride) |
                     static_cast<uint64_t>(layer_offset) | static_cast<uint64_t>(record_bytes) |
                     16u;
  return static_cast<int>(x & (~x + 1));
}

bool Aligned(const void* p, int bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

// Tokens the CPU cache encodes out of a format's fp16 window at a time; 0 without a window.
int WindowFlushTokens(const KvFormatSpec& spec) {
  if (spec.residual_tokens <= 0) return 0;
  if (spec.kind == KvFormatKind::kKivi) return spec.group_size;
  if (spec.kind == KvFormatKind::kTurbo) return cpu::kTurboResidualFlushTokens;
  return 0;
}

class CudaKvAppendImpl final : public CudaKvAppend {
 public:
  ~CudaKvAppendImpl() override {
    if (table_ != nullptr) cudaFree(table_);
  }

  static absl::StatusOr<std::unique_ptr<CudaKvAppend>> Make(const KvFormatSpec& spec, int d,
                                                            int heads, int bs) {
    if (d != 64 && d != 128 && d != 256) {
      return absl::UnimplementedError(
          absl::StrCat("CUDA KV append: head_dim ", d, " (64, 128 or 256)"));
    }
    if (heads <= 0 || bs <= 0) {
      return absl::InvalidArgumentError(absl::StrCat(
          "CUDA KV append: num_kv_heads and block_size must be > 0 (got ", heads, ", ", bs, ")"));
    }
    if (spec.eviction.kind != EvictionSpec::Kind::kNone) {
      return absl::UnimplementedError(
          "CUDA KV append: eviction is the cache's job, not the encoder's (no device eviction)");
    }
    auto codec = cpu::CreateKvCodec(spec, d);
    if (!codec.ok()) return codec.status();
    std::unique_ptr<CudaKvAppendImpl> a(new CudaKvAppendImpl());
    AppendFormat& f = a->f_;
    f.head_dim = d;
    f.num_kv_heads = heads;
    f.block_size = bs;
    f.record_bytes = (*codec)->record_bytes();
    f.key_bytes = (*codec)->key_bytes();
    f.window_tokens = (*codec)->residual_tokens();
    f.flush_tokens = f.window_tokens > 0 ? (*codec)->residual_flush_tokens() : 0;
    if (f.flush_tokens != WindowFlushTokens(spec) ||
        (f.flush_tokens > 0 && f.window_tokens != spec.residual_tokens)) {
      return absl::InternalError(absl::StrCat(
          "CUDA KV append: the CPU codec's fp16 window (R=", f.window_tokens, ", flushed ",
          f.flush_tokens, " at a time) disagrees with SplitStoredTokens for ", spec.name));
    }
    switch (spec.kind) {
      case KvFormatKind::kFp16:
        f.kind = internal::kAppendFp16;
        break;
      case KvFormatKind::kBf16:
        f.kind = internal::kAppendBf16;
        break;
      case KvFormatKind::kFp8:
        f.kind = internal::kAppendFp8;
        break;
      case KvFormatKind::kInt8:
        f.kind = internal::kAppendInt8;
        break;
      case KvFormatKind::kKivi:
        f.kind = internal::kAppendKivi;
        f.kivi_bits = static_cast<int>(spec.key_bits);
        f.kivi_group = spec.group_size;
        f.kivi_codes_bytes = d * f.kivi_bits / 8;
        // (The CPU codec has already refused R = 0 and G not dividing R or head_dim.)
        if (f.kivi_group % 8 != 0) {
          return absl::UnimplementedError(
              absl::StrCat("CUDA KV append: KIVI needs 8 | G (G=", f.kivi_group, ")"));
        }
        if (internal::KiviGroupSmemBytes(f) > 200 * 1024) {
          return absl::UnimplementedError(absl::StrCat("CUDA KV append: KIVI group ", f.kivi_group,
                                                       " x head_dim ", d,
                                                       " does not fit in shared memory"));
        }
        break;
      case KvFormatKind::kTurbo: {
        f.kind = internal::kAppendTurbo;
        if (spec.qjl_keys) {
          return absl::UnimplementedError("CUDA KV append: TurboQuant QJL keys have no encoder");
        }
        const double rates[2] = {spec.key_bits, spec.value_bits};
        for (int half = 0; half < 2; ++half) {
          absl::Status st = cpu::TurboChannelSplit(d, rates[half], &f.tq_hi_channels[half],
                                                   &f.tq_hi_bits[half], &f.tq_lo_bits[half]);
          if (!st.ok()) return st;
          f.tq_code_bytes[half] = (f.tq_hi_channels[half] * f.tq_hi_bits[half] +
                                   (d - f.tq_hi_channels[half]) * f.tq_lo_bits[half]) /
                                  8;
          if (spec.tq_debias) {
            absl::StatusOr<cpu::TurboCodebook> cb = cpu::TurboCodebook::Create(d, rates[half]);
            if (!cb.ok()) return cb.status();
            f.tq_debias[half] = cb->norm_debias();
          }
        }
        if (f.tq_code_bytes[0] + 2 != f.key_bytes ||
            f.key_bytes + f.tq_code_bytes[1] + 2 != f.record_bytes) {
          return absl::InternalError(
              "CUDA KV append: TurboQuant record layout disagrees with the CPU");
        }
        f.tq_wht_scale = 1.0f / std::sqrt(static_cast<float>(d));
        break;
      }
    }
    absl::Status device = CudaDeviceStatus();
    if (!device.ok()) return device;
    if (f.kind == internal::kAppendTurbo) {
      const std::vector<float> table = TurboTable(f);
      cudaError_t e = cudaMalloc(&a->table_, sizeof(float) * table.size());
      if (e != cudaSuccess) return CudaError(e, "cudaMalloc");
      e = cudaMemcpy(a->table_, table.data(), sizeof(float) * table.size(), cudaMemcpyHostToDevice);
      if (e != cudaSuccess) return CudaError(e, "cudaMemcpy");
      f.tq_table = a->table_;
    }
    const cudaError_t e = internal::SetupAppendKernels(f);
    if (e != cudaSuccess) return CudaError(e, "kernel setup");
    return std::unique_ptr<CudaKvAppend>(std::move(a));
  }

  int record_bytes() const override { return f_.record_bytes; }
  int residual_capacity() const override {
    return f_.window_tokens > 0 ? f_.window_tokens + f_.flush_tokens : 0;
  }

  absl::Status Append(const AppendBatch& b, void* stream) override {
    if (b.num_seqs < 0 || b.num_rows < 0) {
      return absl::InvalidArgumentError("AppendBatch: negative num_seqs or num_rows");
    }
    if (b.num_seqs == 0 || b.num_rows == 0) return absl::OkStatus();
    if (b.num_seqs > 65535) {
      return absl::InvalidArgumentError(
          absl::StrCat("AppendBatch: ", b.num_seqs, " sequences (at most 65535 per call)"));
    }
    if (!b.pool || !b.block_tables || !b.row_begin || !b.stored_before || !b.k || !b.v) {
      return absl::InvalidArgumentError(
          "AppendBatch: pool, block_tables, row_begin, stored_before, k and v are required");
    }
    if (b.max_rows_per_seq <= 0 || b.max_rows_per_seq > b.num_rows) {
      return absl::InvalidArgumentError(absl::StrCat("AppendBatch: max_rows_per_seq ",
                                                     b.max_rows_per_seq, " not in [1, num_rows ",
                                                     b.num_rows, "]"));
    }
    const int d = f_.head_dim, heads = f_.num_kv_heads;
    if (b.row_stride < int64_t{heads} * d) {
      return absl::InvalidArgumentError(absl::StrCat("AppendBatch: row_stride ", b.row_stride,
                                                     " < num_kv_heads * head_dim ", heads * d));
    }
    if (!Aligned(b.k, 4) || !Aligned(b.v, 4)) {
      return absl::InvalidArgumentError("AppendBatch: k and v must be float-aligned");
    }
    KVGATE_KERNELS_RETURN_IF_ERROR(CheckPool(b.pool, b.block_stride_bytes, b.layer_offset_bytes,
                                             b.max_blocks_per_seq, "AppendBatch"));
    if (f_.kind == internal::kAppendFp8 && b.head_scales == nullptr) {
      return absl::InvalidArgumentError("AppendBatch: FP8 needs head_scales");
    }
    if (residual_capacity() > 0) {
      KVGATE_KERNELS_RETURN_IF_ERROR(
          CheckWindow(b.residual_k, b.residual_v, b.residual_capacity, "AppendBatch"));
    }
    if (b.head_window != nullptr && f_.window_tokens == 0) {
      return absl::UnimplementedError(
          "AppendBatch: per-head windows (head_window) need a format with a window");
    }
    internal::AppendArgs a;
    CopySharedFields(b, a);
    a.row_begin = b.row_begin;
    a.stored_before = b.stored_before;
    a.num_rows = b.num_rows;
    a.max_rows_per_seq = b.max_rows_per_seq;
    a.k = b.k;
    a.v = b.v;
    a.row_stride = b.row_stride;
    a.store_width = AddressAlignment(reinterpret_cast<uintptr_t>(b.pool), b.block_stride_bytes,
                                     b.layer_offset_bytes, f_.record_bytes);
    // 16-byte row alignment: lanes load d/32 floats at once, KIVI's kernels 4 floats.
    a.vec_loads = Aligned(b.k, 16) && Aligned(b.v, 16) && b.row_stride % 4 == 0;
    a.fuse_amax = b.max_rows_per_seq <= internal::kFusedAmaxRows;
    const cudaError_t e = internal::LaunchAppend(f_, a, static_cast<cudaStream_t>(stream));
    if (e != cudaSuccess) return CudaError(e, "append launch");
    return absl::OkStatus();
  }

  absl::Status Read(const ReadBatch& b, void* stream) override {
    if (b.num_seqs < 0 || b.max_len < 0) {
      return absl::InvalidArgumentError("ReadBatch: negative num_seqs or max_len");
    }
    if (b.num_seqs == 0 || b.max_len == 0) return absl::OkStatus();
    if (b.num_seqs > 65535) {
      return absl::InvalidArgumentError(
          absl::StrCat("ReadBatch: ", b.num_seqs, " sequences (at most 65535 per call)"));
    }
    if (!b.pool || !b.block_tables || !b.lens || !b.out_k || !b.out_v) {
      return absl::InvalidArgumentError(
          "ReadBatch: pool, block_tables, lens, out_k and out_v are required");
    }
    if (b.out_stride_tokens < b.max_len) {
      return absl::InvalidArgumentError(absl::StrCat(
          "ReadBatch: out_stride_tokens ", b.out_stride_tokens, " < max_len ", b.max_len));
    }
    if (!Aligned(b.out_k, 4) || !Aligned(b.out_v, 4)) {
      return absl::InvalidArgumentError("ReadBatch: out_k and out_v must be float-aligned");
    }
    KVGATE_KERNELS_RETURN_IF_ERROR(CheckPool(b.pool, b.block_stride_bytes, b.layer_offset_bytes,
                                             b.max_blocks_per_seq, "ReadBatch"));
    if (f_.kind == internal::kAppendFp8 && b.head_scales == nullptr) {
      return absl::InvalidArgumentError("ReadBatch: FP8 needs head_scales");
    }
    if (residual_capacity() > 0) {
      KVGATE_KERNELS_RETURN_IF_ERROR(
          CheckWindow(b.residual_k, b.residual_v, b.residual_capacity, "ReadBatch"));
    }
    if (b.head_window != nullptr && f_.window_tokens == 0) {
      return absl::UnimplementedError(
          "ReadBatch: per-head windows (head_window) need a format with a window");
    }
    if (b.key_offsets != nullptr &&
        (f_.kind != internal::kAppendKivi ||
         b.key_offsets_block_stride < f_.num_kv_heads * int64_t{f_.block_size})) {
      return absl::InvalidArgumentError(
          "ReadBatch: key_offsets need KIVI and a block stride of at least kv_heads * block_size");
    }
    internal::ReadArgs a;
    CopySharedFields(b, a);
    a.lens = b.lens;
    a.max_len = b.max_len;
    a.out_k = b.out_k;
    a.out_v = b.out_v;
    a.out_stride_tokens = b.out_stride_tokens;
    a.key_offsets = b.key_offsets;
    a.key_offsets_block_stride = b.key_offsets_block_stride;
    a.load_width = AddressAlignment(reinterpret_cast<uintptr_t>(b.pool), b.block_stride_bytes,
                                    b.layer_offset_bytes, f_.record_bytes);
    const int vec = VectorBytes();
    a.vec_stores = Aligned(b.out_k, vec) && Aligned(b.out_v, vec);
    const cudaError_t e = internal::LaunchRead(f_, a, static_cast<cudaStream_t>(stream));
    if (e != cudaSuccess) return CudaError(e, "read launch");
    return absl::OkStatus();
  }

 private:
  CudaKvAppendImpl() = default;

  // The fields AppendBatch and ReadBatch share with the kernels' argument structs: the pool and
  // where the layer lives, the sequences' block tables and state slots, FP8 scales and windows.
  template <class Batch, class Args>
  static void CopySharedFields(const Batch& b, Args& a) {
    a.pool = b.pool;
    a.block_stride_bytes = b.block_stride_bytes;
    a.layer_offset_bytes = b.layer_offset_bytes;
    a.block_tables = b.block_tables;
    a.max_blocks_per_seq = b.max_blocks_per_seq;
    a.num_seqs = b.num_seqs;
    a.seq_slots = b.seq_slots;
    a.head_scales = b.head_scales;
    a.residual_k = b.residual_k;
    a.residual_v = b.residual_v;
    a.residual_capacity = b.residual_capacity;
    a.head_window = b.head_window;
  }

  // Bytes of the d/32 floats a lane of ReadKernel stores at once.
  int VectorBytes() const { return std::min(16, 4 * (f_.head_dim / 32)); }

  absl::Status CheckPool(const void* pool, int64_t block_stride, int64_t layer_offset,
                         int max_blocks, const char* what) const {
    const int64_t layer_bytes = int64_t{f_.num_kv_heads} * f_.block_size * f_.record_bytes;
    if (layer_offset < 0 || block_stride < layer_offset + layer_bytes) {
      return absl::InvalidArgumentError(absl::StrCat(what, ": block_stride_bytes ", block_stride,
                                                     " cannot hold this layer at offset ",
                                                     layer_offset, " (", layer_bytes, " bytes)"));
    }
    if (max_blocks <= 0) {
      return absl::InvalidArgumentError(absl::StrCat(what, ": max_blocks_per_seq must be > 0"));
    }
    if (AddressAlignment(reinterpret_cast<uintptr_t>(pool), block_stride, layer_offset,
                         f_.record_bytes) < 2) {
      return absl::InvalidArgumentError(
          absl::StrCat(what, ": pool, block_stride_bytes and layer_offset_bytes must be even"));
    }
    return absl::OkStatus();
  }

  absl::Status CheckWindow(const void* residual_k, const void* residual_v, int capacity,
                           const char* what) const {
    if (residual_k == nullptr || residual_v == nullptr) {
      return absl::InvalidArgumentError(
          absl::StrCat(what, ": the fp16 residual window needs residual_k/residual_v"));
    }
    if (capacity != residual_capacity()) {
      return absl::InvalidArgumentError(absl::StrCat(
          what, ": residual_capacity ", capacity, " != residual_capacity() ", residual_capacity()));
    }
    if (!Aligned(residual_k, 16) || !Aligned(residual_v, 16)) {
      return absl::InvalidArgumentError(
          absl::StrCat(what, ": residual_k/residual_v must be 16-byte aligned"));
    }
    return absl::OkStatus();
  }

  AppendFormat f_;
  float* table_ = nullptr;  // TurboQuant table (device)
};

}  // namespace

StoredSplit SplitStoredTokens(const KvFormatSpec& spec, int64_t stored) {
  StoredSplit counts;
  if (stored <= 0) return counts;
  counts.encoded = stored;
  const int64_t g = WindowFlushTokens(spec);
  if (g > 0) {
    const int64_t r = spec.residual_tokens;
    counts.encoded = stored < r + g ? 0 : (stored - r) / g * g;
  }
  counts.residual = stored - counts.encoded;
  return counts;
}

absl::StatusOr<std::unique_ptr<CudaKvAppend>> CudaKvAppend::Create(const KvFormatSpec& spec,
                                                                   int head_dim, int num_kv_heads,
                                                                   int block_size) {
  return CudaKvAppendImpl::Make(spec, head_dim, num_kv_heads, block_size);
}

}  // namespace kvgate::kernels::cuda
