// CudaKvCache: the paged KV cache of the CUDA ModelRunner, fp16 only (phase 1 of issue 5). The
// block allocator and block tables live on the host; the pool is one cudaMalloc'd array
// [num_blocks][layers][2 (k, v)][kv_heads][block_size][head_dim] fp16 (cuda_kernels.h,
// KvPoolLayout). It implements kernels::KvCache with the CPU reference's fp16 semantics: keys and
// values are rounded to fp16 when appended; PrefillAttention reads the cached prefix through fp16
// and the fresh tokens in fp32; DecodeAttention reads every token through fp16.
//
// The CUDA runner bypasses the host-pointer methods: it appends inside its fused q/k/v kernel and
// runs attention for a whole step (BlockTable, layout, CommitAppend). The host-pointer methods
// (Append, PrefillAttention, DecodeAttention, ReadStored) stage through device buffers and
// synchronize: for tests and tools, not for speed.
//
//   ASSIGN_OR_RETURN(auto cache, CudaKvCache::Create(config, stream));
//   RETURN_IF_ERROR(cache->AddSequence(seq, prompt_len));
//   ... runner appends on the device for every layer, then cache->CommitAppend(seq, n);
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <map>
#include <memory>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "kvgate/kernels/kv_cache.h"
#include "workers/backend/cuda/cuda_kernels.h"

namespace kvgate::worker::cuda {

class CudaKvCache final : public kernels::KvCache {
 public:
  // UnimplementedError for any format but fp16 without eviction (other formats on the GPU are
  // later phases of issue 5), head_dim not a multiple of 32 or above 256. ResourceExhaustedError
  // when the pool cannot be allocated. `stream` is used for every kernel and copy (not owned).
  static absl::StatusOr<std::unique_ptr<CudaKvCache>> Create(const kernels::KvCacheConfig& config,
                                                             cudaStream_t stream);
  // Bytes one token occupies for this config (all layers, k and v, fp16), without allocating.
  static int64_t BytesPerToken(const kernels::KvCacheConfig& config);
  ~CudaKvCache() override;

  const kernels::KvCacheConfig& config() const override { return config_; }
  const kernels::KvFormatDesc& desc() const override { return desc_; }
  int64_t free_blocks() const override { return static_cast<int64_t>(free_list_.size()); }
  int64_t total_blocks() const override { return config_.num_blocks; }
  int64_t BlocksForTokens(int64_t num_tokens) const override;
  int64_t bytes_per_token() const override { return BytesPerToken(config_); }
  int64_t allocated_bytes() const override;

  absl::Status AddSequence(kernels::SeqId seq, int64_t reserve_tokens) override;
  absl::Status Reserve(kernels::SeqId seq, int64_t num_tokens) override;
  void FreeSequence(kernels::SeqId seq) override;
  int64_t Length(kernels::SeqId seq, int layer) const override;

  absl::Status Append(kernels::SeqId seq, int layer, int64_t n, const float* k,
                      const float* v) override;
  absl::Status PrefillAttention(kernels::SeqId seq, int layer, int64_t n, int num_q_heads,
                                const float* q, const float* k, const float* v, float scale,
                                float* out) override;
  absl::Status DecodeAttention(kernels::SeqId seq, int layer, int num_q_heads, const float* q,
                               float scale, float* out) override;
  absl::Status ReadStored(kernels::SeqId seq, int layer, int kv_head, float* k, float* v,
                          int64_t* positions) const override;

  // ---- For the CUDA runner ----
  KvPoolLayout layout() const;
  // Host block table of a known sequence (pool block ids, in logical order); nullptr if unknown.
  const std::vector<int32_t>* BlockTable(kernels::SeqId seq) const;
  // Reserved token capacity of a known sequence (blocks * block_size); -1 if unknown.
  int64_t Capacity(kernels::SeqId seq) const;
  // Records that `n` tokens were appended on the device to every layer of `seq`.
  void CommitAppend(kernels::SeqId seq, int64_t n);

 private:
  struct Sequence {
    std::vector<int32_t> blocks;
    std::vector<int64_t> length;  // per layer
  };
  CudaKvCache(const kernels::KvCacheConfig& config, kernels::KvFormatDesc desc, cudaStream_t stream)
      : config_(config), desc_(std::move(desc)), stream_(stream) {}
  absl::Status GrowTo(Sequence& s, int64_t num_tokens);
  // Runs the attention kernel for one sequence's n queries (host pointers), fp32 out.
  absl::Status HostAttention(kernels::SeqId seq, int layer, int64_t n, int num_q_heads,
                             const float* q, const float* k, const float* v, float scale,
                             bool all_cached, float* out);

  kernels::KvCacheConfig config_;
  kernels::KvFormatDesc desc_;
  cudaStream_t stream_ = nullptr;
  uint16_t* pool_ = nullptr;
  std::vector<int32_t> free_list_;  // LIFO of free block ids
  std::map<kernels::SeqId, Sequence> seqs_;
};

}  // namespace kvgate::worker::cuda
