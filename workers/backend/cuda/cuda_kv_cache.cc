#include "workers/backend/cuda/cuda_kv_cache.h"

#include <algorithm>
#include <utility>

#include "absl/strings/str_cat.h"
#include "kvgate/common/status_macros.h"
#include "workers/backend/cuda/cuda_status.h"

namespace kvgate::worker::cuda {
namespace {

// A cudaMalloc'd array freed on scope exit (staging for the host-pointer methods).
template <class T>
class DeviceArray {
 public:
  DeviceArray() = default;
  DeviceArray(const DeviceArray&) = delete;
  DeviceArray& operator=(const DeviceArray&) = delete;
  ~DeviceArray() {
    if (ptr_ != nullptr) cudaFree(ptr_);
  }
  absl::Status Allocate(size_t count) {
    return CudaStatus(cudaMalloc(&ptr_, std::max<size_t>(count, 1) * sizeof(T)), "cudaMalloc");
  }
  absl::Status Upload(const T* host, size_t count, cudaStream_t stream) {
    RETURN_IF_ERROR(Allocate(count));
    if (count == 0) return absl::OkStatus();
    return CudaStatus(
        cudaMemcpyAsync(ptr_, host, count * sizeof(T), cudaMemcpyHostToDevice, stream),
        "cudaMemcpyAsync");
  }
  T* get() const { return ptr_; }

 private:
  T* ptr_ = nullptr;
};

}  // namespace

int64_t CudaKvCache::BytesPerToken(const kernels::KvCacheConfig& config) {
  return int64_t{config.num_layers} * 2 * config.num_kv_heads * config.head_dim * 2;
}

absl::StatusOr<std::unique_ptr<CudaKvCache>> CudaKvCache::Create(
    const kernels::KvCacheConfig& config, cudaStream_t stream) {
  if (config.format.kind != kernels::KvFormatKind::kFp16 ||
      config.format.eviction.kind != kernels::EvictionSpec::Kind::kNone) {
    return absl::UnimplementedError(absl::StrCat(
        "the CUDA backend stores KV in fp16 only for now (issue 5, phase 1); got '",
        config.format.name, "' with eviction ", kernels::EvictionToString(config.format.eviction),
        ": use --kv fp16 --evict none, or --backend cpu for other formats"));
  }
  if (config.head_dim % 32 != 0 || config.head_dim > 256) {
    return absl::UnimplementedError(
        absl::StrCat("the CUDA attention kernels need head_dim a multiple of 32 and <= 256, got ",
                     config.head_dim));
  }
  if (config.num_layers <= 0 || config.num_kv_heads <= 0 || config.block_size <= 0 ||
      config.num_blocks <= 0) {
    return absl::InvalidArgumentError(
        "KV cache config: layers, kv heads, block size and block "
        "count must be positive");
  }
  if (config.num_blocks > INT32_MAX) {
    return absl::InvalidArgumentError(absl::StrCat("too many KV blocks: ", config.num_blocks));
  }
  ASSIGN_OR_RETURN(kernels::KvFormatDesc desc,
                   kernels::DescribeKvFormat(config.format, config.head_dim));
  std::unique_ptr<CudaKvCache> cache(new CudaKvCache(config, std::move(desc), stream));
  const int64_t bytes = cache->allocated_bytes();
  void* pool = nullptr;
  const cudaError_t error = cudaMalloc(&pool, static_cast<size_t>(bytes));
  if (error != cudaSuccess) {
    cudaGetLastError();  // clear the sticky-free allocation error
    return absl::ResourceExhaustedError(absl::StrCat("cannot allocate the KV pool: ", bytes,
                                                     " bytes (", config.num_blocks,
                                                     " blocks): ", cudaGetErrorString(error)));
  }
  cache->pool_ = static_cast<uint16_t*>(pool);
  cache->free_list_.resize(config.num_blocks);
  for (int64_t b = 0; b < config.num_blocks; ++b) {
    cache->free_list_[b] = static_cast<int32_t>(config.num_blocks - 1 - b);  // pop 0 first
  }
  return cache;
}

CudaKvCache::~CudaKvCache() {
  if (pool_ != nullptr) cudaFree(pool_);
}

int64_t CudaKvCache::BlocksForTokens(int64_t num_tokens) const {
  return (num_tokens + config_.block_size - 1) / config_.block_size;
}

int64_t CudaKvCache::allocated_bytes() const {
  return bytes_per_token() * config_.block_size * config_.num_blocks;
}

KvPoolLayout CudaKvCache::layout() const {
  return KvPoolLayout{.pool = pool_,
                      .num_layers = config_.num_layers,
                      .num_kv_heads = config_.num_kv_heads,
                      .head_dim = config_.head_dim,
                      .block_size = config_.block_size};
}

absl::Status CudaKvCache::GrowTo(Sequence& s, int64_t num_tokens) {
  const int64_t need = BlocksForTokens(num_tokens) - static_cast<int64_t>(s.blocks.size());
  if (need <= 0) return absl::OkStatus();
  if (need > free_blocks()) {
    return absl::ResourceExhaustedError(
        absl::StrCat("KV cache: ", need, " blocks needed, ", free_blocks(), " free"));
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
  Sequence s;
  s.length.assign(config_.num_layers, 0);
  RETURN_IF_ERROR(GrowTo(s, reserve_tokens));
  seqs_.emplace(seq, std::move(s));
  return absl::OkStatus();
}

absl::Status CudaKvCache::Reserve(kernels::SeqId seq, int64_t num_tokens) {
  auto it = seqs_.find(seq);
  if (it == seqs_.end()) return absl::NotFoundError(absl::StrCat("sequence ", seq));
  return GrowTo(it->second, num_tokens);
}

void CudaKvCache::FreeSequence(kernels::SeqId seq) {
  auto it = seqs_.find(seq);
  if (it == seqs_.end()) return;
  for (int32_t b : it->second.blocks) free_list_.push_back(b);
  seqs_.erase(it);
}

int64_t CudaKvCache::Length(kernels::SeqId seq, int layer) const {
  auto it = seqs_.find(seq);
  if (it == seqs_.end() || layer < 0 || layer >= config_.num_layers) return -1;
  return it->second.length[layer];
}

const std::vector<int32_t>* CudaKvCache::BlockTable(kernels::SeqId seq) const {
  auto it = seqs_.find(seq);
  return it == seqs_.end() ? nullptr : &it->second.blocks;
}

int64_t CudaKvCache::Capacity(kernels::SeqId seq) const {
  auto it = seqs_.find(seq);
  if (it == seqs_.end()) return -1;
  return static_cast<int64_t>(it->second.blocks.size()) * config_.block_size;
}

void CudaKvCache::CommitAppend(kernels::SeqId seq, int64_t n) {
  auto it = seqs_.find(seq);
  if (it == seqs_.end()) return;
  for (int64_t& length : it->second.length) length += n;
}

absl::Status CudaKvCache::Append(kernels::SeqId seq, int layer, int64_t n, const float* k,
                                 const float* v) {
  auto it = seqs_.find(seq);
  if (it == seqs_.end()) return absl::NotFoundError(absl::StrCat("sequence ", seq));
  if (layer < 0 || layer >= config_.num_layers) {
    return absl::InvalidArgumentError(absl::StrCat("layer ", layer, " out of range"));
  }
  if (n < 0) return absl::InvalidArgumentError("Append: n < 0");
  if (n == 0) return absl::OkStatus();
  if (k == nullptr || v == nullptr) return absl::InvalidArgumentError("Append: null k or v");
  Sequence& s = it->second;
  const int64_t capacity = static_cast<int64_t>(s.blocks.size()) * config_.block_size;
  if (s.length[layer] + n > capacity) {
    return absl::FailedPreconditionError(absl::StrCat(
        "Append: sequence ", seq, " layer ", layer, " holds ", s.length[layer],
        " tokens and has room for ", capacity, "; Reserve(", s.length[layer] + n, ") first"));
  }
  const size_t elems = static_cast<size_t>(n) * config_.num_kv_heads * config_.head_dim;
  DeviceArray<float> dk, dv;
  DeviceArray<int32_t> table;
  RETURN_IF_ERROR(dk.Upload(k, elems, stream_));
  RETURN_IF_ERROR(dv.Upload(v, elems, stream_));
  RETURN_IF_ERROR(table.Upload(s.blocks.data(), s.blocks.size(), stream_));
  CUDA_RETURN_IF_ERROR(LaunchAppendKv(dk.get(), dv.get(), static_cast<int>(n), s.length[layer],
                                      table.get(), layout(), layer, stream_));
  CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream_));
  s.length[layer] += n;
  return absl::OkStatus();
}

absl::Status CudaKvCache::HostAttention(kernels::SeqId seq, int layer, int64_t n, int num_q_heads,
                                        const float* q, const float* k, const float* v, float scale,
                                        bool all_cached, float* out) {
  auto it = seqs_.find(seq);
  if (it == seqs_.end()) return absl::NotFoundError(absl::StrCat("sequence ", seq));
  if (layer < 0 || layer >= config_.num_layers) {
    return absl::InvalidArgumentError(absl::StrCat("layer ", layer, " out of range"));
  }
  if (num_q_heads <= 0 || num_q_heads % config_.num_kv_heads != 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "num_q_heads ", num_q_heads, " is not a multiple of num_kv_heads ", config_.num_kv_heads));
  }
  const Sequence& s = it->second;
  const int64_t length = s.length[layer];
  if (n <= 0 || n > length) {
    return absl::FailedPreconditionError(
        absl::StrCat("attention over ", n, " new tokens with ", length, " stored; Append first"));
  }
  if (q == nullptr || out == nullptr || (!all_cached && (k == nullptr || v == nullptr))) {
    return absl::InvalidArgumentError("null q, k, v or out");
  }
  const int64_t past = length - n;
  std::vector<int32_t> meta;  // row_chunk[n], row_position[n], row_begin[2], past, all_cached
  for (int64_t i = 0; i < n; ++i) meta.push_back(0);
  for (int64_t i = 0; i < n; ++i) meta.push_back(static_cast<int32_t>(past + i));
  meta.push_back(0);
  meta.push_back(static_cast<int32_t>(n));
  meta.push_back(static_cast<int32_t>(past));
  meta.push_back(all_cached ? 1 : 0);
  const size_t q_elems = static_cast<size_t>(n) * num_q_heads * config_.head_dim;
  const size_t kv_elems = static_cast<size_t>(n) * config_.num_kv_heads * config_.head_dim;
  DeviceArray<int32_t> dmeta, table;
  DeviceArray<float> dq, dk, dv, dout;
  RETURN_IF_ERROR(dmeta.Upload(meta.data(), meta.size(), stream_));
  RETURN_IF_ERROR(table.Upload(s.blocks.data(), s.blocks.size(), stream_));
  RETURN_IF_ERROR(dq.Upload(q, q_elems, stream_));
  if (!all_cached) {
    RETURN_IF_ERROR(dk.Upload(k, kv_elems, stream_));
    RETURN_IF_ERROR(dv.Upload(v, kv_elems, stream_));
  }
  RETURN_IF_ERROR(dout.Allocate(q_elems));
  StepLayout step{.num_rows = static_cast<int>(n),
                  .num_chunks = 1,
                  .row_chunk = dmeta.get(),
                  .row_position = dmeta.get() + n,
                  .row_begin = dmeta.get() + 2 * n,
                  .chunk_past = dmeta.get() + 2 * n + 2,
                  .chunk_all_cached = dmeta.get() + 2 * n + 3,
                  .block_tables = table.get(),
                  .max_blocks = static_cast<int>(s.blocks.size())};
  CUDA_RETURN_IF_ERROR(LaunchPagedAttention(dq.get(), dk.get(), dv.get(), step, layout(), layer,
                                            num_q_heads, scale, nullptr, dout.get(), stream_));
  CUDA_RETURN_IF_ERROR(
      cudaMemcpyAsync(out, dout.get(), q_elems * sizeof(float), cudaMemcpyDeviceToHost, stream_));
  CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream_));
  return absl::OkStatus();
}

absl::Status CudaKvCache::PrefillAttention(kernels::SeqId seq, int layer, int64_t n,
                                           int num_q_heads, const float* q, const float* k,
                                           const float* v, float scale, float* out) {
  if (n == 0) return absl::OkStatus();
  return HostAttention(seq, layer, n, num_q_heads, q, k, v, scale, /*all_cached=*/false, out);
}

absl::Status CudaKvCache::DecodeAttention(kernels::SeqId seq, int layer, int num_q_heads,
                                          const float* q, float scale, float* out) {
  return HostAttention(seq, layer, 1, num_q_heads, q, nullptr, nullptr, scale,
                       /*all_cached=*/true, out);
}

absl::Status CudaKvCache::ReadStored(kernels::SeqId seq, int layer, int kv_head, float* k, float* v,
                                     int64_t* positions) const {
  auto it = seqs_.find(seq);
  if (it == seqs_.end()) return absl::NotFoundError(absl::StrCat("sequence ", seq));
  if (layer < 0 || layer >= config_.num_layers || kv_head < 0 || kv_head >= config_.num_kv_heads) {
    return absl::InvalidArgumentError("ReadStored: layer or kv_head out of range");
  }
  const Sequence& s = it->second;
  const int64_t n = s.length[layer];
  if (n == 0) return absl::OkStatus();
  const size_t elems = static_cast<size_t>(n) * config_.head_dim;
  DeviceArray<int32_t> table;
  DeviceArray<float> dk, dv;
  RETURN_IF_ERROR(table.Upload(s.blocks.data(), s.blocks.size(), stream_));
  RETURN_IF_ERROR(dk.Allocate(elems));
  RETURN_IF_ERROR(dv.Allocate(elems));
  CUDA_RETURN_IF_ERROR(
      LaunchReadKv(table.get(), n, layout(), layer, kv_head, dk.get(), dv.get(), stream_));
  CUDA_RETURN_IF_ERROR(
      cudaMemcpyAsync(k, dk.get(), elems * sizeof(float), cudaMemcpyDeviceToHost, stream_));
  CUDA_RETURN_IF_ERROR(
      cudaMemcpyAsync(v, dv.get(), elems * sizeof(float), cudaMemcpyDeviceToHost, stream_));
  CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream_));
  for (int64_t i = 0; i < n; ++i) positions[i] = i;
  return absl::OkStatus();
}

}  // namespace kvgate::worker::cuda
