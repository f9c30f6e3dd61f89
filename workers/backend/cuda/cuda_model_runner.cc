#include "workers/backend/cuda/cuda_model_runner.h"

#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "kvgate/common/log.h"
#include "kvgate/common/status_macros.h"
#include "workers/backend/cuda/cublas_api.h"
#include "workers/backend/cuda/cuda_kernels.h"
#include "workers/backend/cuda/cuda_kv_cache.h"
#include "workers/backend/cuda/cuda_status.h"
#include "workers/model/llama_config.h"
#include "workers/model/llama_weights.h"

namespace kvgate::worker {
namespace {

using cuda::CudaKvCache;
using cuda::CudaStatus;

// Round-to-nearest-even float -> bf16 bits (NaN kept quiet).
uint16_t ToBf16(float x) {
  uint32_t bits;
  std::memcpy(&bits, &x, 4);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((bits >> 16) | 0x40);
  bits += 0x7fffu + ((bits >> 16) & 1u);
  return static_cast<uint16_t>(bits >> 16);
}

// Owns every device allocation of the runner (weights and workspace); freed together.
class DeviceArena {
 public:
  DeviceArena() = default;
  DeviceArena(const DeviceArena&) = delete;
  DeviceArena& operator=(const DeviceArena&) = delete;
  ~DeviceArena() {
    for (void* p : allocations_) cudaFree(p);
  }
  template <class T>
  absl::StatusOr<T*> Allocate(size_t count) {
    void* p = nullptr;
    const cudaError_t error = cudaMalloc(&p, std::max<size_t>(count, 1) * sizeof(T));
    if (error != cudaSuccess) {
      cudaGetLastError();
      return absl::ResourceExhaustedError(
          absl::StrCat("cudaMalloc of ", count * sizeof(T), " bytes: ", cudaGetErrorString(error)));
    }
    allocations_.push_back(p);
    bytes_ += count * sizeof(T);
    return static_cast<T*>(p);
  }
  void Free(void* p) {
    auto it = std::find(allocations_.begin(), allocations_.end(), p);
    if (it == allocations_.end()) return;
    cudaFree(p);
    allocations_.erase(it);
  }
  // Uploads fp32 host data as bf16 (nullptr for an empty vector).
  absl::StatusOr<uint16_t*> UploadBf16(const std::vector<float>& host) {
    if (host.empty()) return nullptr;
    std::vector<uint16_t> converted(host.size());
    for (size_t i = 0; i < host.size(); ++i) converted[i] = ToBf16(host[i]);
    ASSIGN_OR_RETURN(uint16_t * device, Allocate<uint16_t>(host.size()));
    RETURN_IF_ERROR(
        CudaStatus(cudaMemcpy(device, converted.data(), host.size() * 2, cudaMemcpyHostToDevice),
                   "cudaMemcpy (weights)"));
    return device;
  }
  template <class T>
  absl::StatusOr<T*> Upload(const std::vector<T>& host) {
    if (host.empty()) return static_cast<T*>(nullptr);
    ASSIGN_OR_RETURN(T * device, Allocate<T>(host.size()));
    RETURN_IF_ERROR(
        CudaStatus(cudaMemcpy(device, host.data(), host.size() * sizeof(T), cudaMemcpyHostToDevice),
                   "cudaMemcpy (weights)"));
    return device;
  }
  size_t bytes() const { return bytes_; }

 private:
  std::vector<void*> allocations_;
  size_t bytes_ = 0;
};

struct DeviceLayer {
  const float* input_norm = nullptr;
  const uint16_t* qkv = nullptr;  // bf16 [q_dim + 2 kv_dim, hidden]
  const float* qkv_bias = nullptr;
  const float* q_norm = nullptr;
  const float* k_norm = nullptr;
  const uint16_t* o_proj = nullptr;  // bf16 [hidden, q_dim]
  const float* o_bias = nullptr;
  const float* post_attention_norm = nullptr;
  const uint16_t* gate_up = nullptr;  // bf16 [2 inter, hidden]
  const uint16_t* down = nullptr;     // bf16 [hidden, inter]
};

class CudaModelRunner final : public ModelRunner {
 public:
  CudaModelRunner(LlamaConfig config, cudaStream_t stream, cublasHandle_t blas)
      : config_(std::move(config)), stream_(stream), blas_(blas) {}
  ~CudaModelRunner() override {
    cache_.reset();
    if (pinned_ != nullptr) cudaFreeHost(pinned_);
    if (blas_ != nullptr) (*cuda::LoadCublas())->destroy(blas_);
    if (stream_ != nullptr) cudaStreamDestroy(stream_);
  }

  const LlamaConfig& config() const override { return config_; }
  kernels::KvCache& kv_cache() override { return *cache_; }
  std::string backend_name() const override { return "cuda"; }
  absl::Status Forward(std::span<const ForwardChunk> chunks, float* logits) override;

  absl::Status UploadWeights(const LlamaWeights& weights);
  absl::Status EnsureWorkspace(int64_t rows);
  void SetCache(std::unique_ptr<CudaKvCache> cache) { cache_ = std::move(cache); }
  size_t device_bytes() const { return arena_.bytes(); }

 private:
  // y[m, n] (+)= x[m, k] * w[n, k]^T; x, w bf16 row-major, y fp32 row-major.
  absl::Status Gemm(const uint16_t* x, const uint16_t* w, float* y, int m, int n, int k,
                    float beta);
  absl::Status EnsurePinned(size_t int32s);

  LlamaConfig config_;
  cudaStream_t stream_ = nullptr;
  cublasHandle_t blas_ = nullptr;
  DeviceArena arena_;
  std::unique_ptr<CudaKvCache> cache_;

  // Weights.
  const uint16_t* embed_ = nullptr;    // bf16 [vocab, hidden]
  const uint16_t* lm_head_ = nullptr;  // bf16 [vocab, hidden] (== embed_ when tied)
  const float* final_norm_ = nullptr;
  const double* inv_freq_ = nullptr;  // [head_dim / 2]
  std::vector<DeviceLayer> layers_;

  // Step workspace for up to workspace_rows_ token rows.
  int64_t workspace_rows_ = 0;
  float *x_ = nullptr, *qkv_ = nullptr, *q_ = nullptr, *fresh_k_ = nullptr, *fresh_v_ = nullptr,
        *gate_up_ = nullptr, *logits_ = nullptr;
  uint16_t *normed_ = nullptr, *attn_ = nullptr, *act_ = nullptr;
  // Step metadata: pinned host staging and its device copy (int32s).
  int32_t* pinned_ = nullptr;
  size_t pinned_capacity_ = 0;
  int32_t* meta_ = nullptr;
  size_t meta_capacity_ = 0;
};

absl::Status CudaModelRunner::UploadWeights(const LlamaWeights& w) {
  ASSIGN_OR_RETURN(uint16_t * embed, arena_.UploadBf16(w.embed));
  embed_ = embed;
  if (w.lm_head.empty()) {
    lm_head_ = embed_;
  } else {
    ASSIGN_OR_RETURN(uint16_t * head, arena_.UploadBf16(w.lm_head));
    lm_head_ = head;
  }
  ASSIGN_OR_RETURN(float* final_norm, arena_.Upload(w.final_norm));
  final_norm_ = final_norm;
  ASSIGN_OR_RETURN(double* inv_freq, arena_.Upload(RopeInverseFrequencies(config_)));
  inv_freq_ = inv_freq;
  for (const LlamaLayerWeights& lw : w.layers) {
    DeviceLayer d;
    ASSIGN_OR_RETURN(d.input_norm, arena_.Upload(lw.input_norm));
    ASSIGN_OR_RETURN(d.qkv, arena_.UploadBf16(lw.qkv));
    ASSIGN_OR_RETURN(d.qkv_bias, arena_.Upload(lw.qkv_bias));
    ASSIGN_OR_RETURN(d.q_norm, arena_.Upload(lw.q_norm));
    ASSIGN_OR_RETURN(d.k_norm, arena_.Upload(lw.k_norm));
    ASSIGN_OR_RETURN(d.o_proj, arena_.UploadBf16(lw.o_proj));
    ASSIGN_OR_RETURN(d.o_bias, arena_.Upload(lw.o_bias));
    ASSIGN_OR_RETURN(d.post_attention_norm, arena_.Upload(lw.post_attention_norm));
    ASSIGN_OR_RETURN(d.gate_up, arena_.UploadBf16(lw.gate_up));
    ASSIGN_OR_RETURN(d.down, arena_.UploadBf16(lw.down));
    layers_.push_back(d);
  }
  return absl::OkStatus();
}

absl::Status CudaModelRunner::EnsureWorkspace(int64_t rows) {
  if (rows <= workspace_rows_) return absl::OkStatus();
  const LlamaConfig& c = config_;
  const int64_t q_dim = int64_t{c.num_attention_heads} * c.head_dim;
  const int64_t kv_dim = int64_t{c.num_key_value_heads} * c.head_dim;
  for (void* p :
       {static_cast<void*>(x_), static_cast<void*>(qkv_), static_cast<void*>(q_),
        static_cast<void*>(fresh_k_), static_cast<void*>(fresh_v_), static_cast<void*>(gate_up_),
        static_cast<void*>(logits_), static_cast<void*>(normed_), static_cast<void*>(attn_),
        static_cast<void*>(act_)}) {
    if (p != nullptr) arena_.Free(p);
  }
  workspace_rows_ = 0;
  ASSIGN_OR_RETURN(x_, arena_.Allocate<float>(rows * c.hidden_size));
  ASSIGN_OR_RETURN(qkv_, arena_.Allocate<float>(rows * (q_dim + 2 * kv_dim)));
  ASSIGN_OR_RETURN(q_, arena_.Allocate<float>(rows * q_dim));
  ASSIGN_OR_RETURN(fresh_k_, arena_.Allocate<float>(rows * kv_dim));
  ASSIGN_OR_RETURN(fresh_v_, arena_.Allocate<float>(rows * kv_dim));
  ASSIGN_OR_RETURN(gate_up_, arena_.Allocate<float>(rows * 2 * c.intermediate_size));
  ASSIGN_OR_RETURN(logits_, arena_.Allocate<float>(rows * c.vocab_size));
  ASSIGN_OR_RETURN(normed_, arena_.Allocate<uint16_t>(rows * c.hidden_size));
  ASSIGN_OR_RETURN(attn_, arena_.Allocate<uint16_t>(rows * q_dim));
  ASSIGN_OR_RETURN(act_, arena_.Allocate<uint16_t>(rows * c.intermediate_size));
  workspace_rows_ = rows;
  return absl::OkStatus();
}

absl::Status CudaModelRunner::EnsurePinned(size_t int32s) {
  if (int32s > pinned_capacity_) {
    if (pinned_ != nullptr) cudaFreeHost(pinned_);
    pinned_ = nullptr;
    pinned_capacity_ = 0;
    const size_t want = std::max(int32s, pinned_capacity_ * 2);
    CUDA_RETURN_IF_ERROR(cudaMallocHost(&pinned_, want * sizeof(int32_t)));
    pinned_capacity_ = want;
  }
  if (int32s > meta_capacity_) {
    if (meta_ != nullptr) arena_.Free(meta_);
    meta_ = nullptr;
    meta_capacity_ = 0;
    const size_t want = std::max<size_t>(int32s, 4096);
    ASSIGN_OR_RETURN(meta_, arena_.Allocate<int32_t>(want));
    meta_capacity_ = want;
  }
  return absl::OkStatus();
}

absl::Status CudaModelRunner::Gemm(const uint16_t* x, const uint16_t* w, float* y, int m, int n,
                                   int k, float beta) {
  // Row-major y[m, n] = x[m, k] w[n, k]^T is column-major y^T[n, m] = w^T... : C = op(A) B with
  // A = w (column-major [k, n], transposed), B = x (column-major [k, m]).
  const float alpha = 1.0f;
  CUBLAS_RETURN_IF_ERROR((*cuda::LoadCublas())->gemm_ex(blas_, CUBLAS_OP_T, CUBLAS_OP_N, n, m, k, &alpha, w,
                                      CUDA_R_16BF, k, x, CUDA_R_16BF, k, &beta, y, CUDA_R_32F, n,
                                      CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
  return absl::OkStatus();
}

absl::Status CudaModelRunner::Forward(std::span<const ForwardChunk> chunks, float* logits) {
  if (chunks.empty()) return absl::OkStatus();
  if (logits == nullptr) return absl::InvalidArgumentError("logits output is null");
  RETURN_IF_ERROR(ValidateForwardChunks(chunks, config_, *cache_));

  const LlamaConfig& c = config_;
  const int hidden = c.hidden_size;
  const int num_heads = c.num_attention_heads, num_kv_heads = c.num_key_value_heads;
  const int q_dim = num_heads * c.head_dim;
  const int kv_dim = num_kv_heads * c.head_dim;
  const int qkv_dim = q_dim + 2 * kv_dim;
  const int inter = c.intermediate_size;
  const float eps = static_cast<float>(c.rms_norm_eps);
  const float scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(c.head_dim)));

  // Host metadata of the step, checked against each sequence's reserved blocks first.
  const int num_chunks = static_cast<int>(chunks.size());
  std::vector<int64_t> past(num_chunks);
  int64_t rows = 0, out_rows = 0;
  int max_blocks = 1;
  for (int ci = 0; ci < num_chunks; ++ci) {
    const int64_t n = static_cast<int64_t>(chunks[ci].tokens.size());
    past[ci] = cache_->Length(chunks[ci].seq, 0);
    const int64_t capacity = cache_->Capacity(chunks[ci].seq);
    if (past[ci] + n > capacity) {
      return absl::FailedPreconditionError(absl::StrCat(
          "sequence ", chunks[ci].seq, " holds ", past[ci], " tokens and has room for ", capacity,
          "; Reserve(", past[ci] + n, ") first"));
    }
    rows += n;
    out_rows += chunks[ci].all_logits ? n : 1;
    max_blocks = std::max(max_blocks, static_cast<int>(cache_->BlockTable(chunks[ci].seq)->size()));
  }
  if (rows > INT32_MAX / std::max(qkv_dim, 2 * inter)) {
    return absl::InvalidArgumentError(absl::StrCat("step of ", rows, " tokens is too large"));
  }
  RETURN_IF_ERROR(EnsureWorkspace(rows));

  // Pinned layout (int32): tokens[rows], row_chunk[rows], row_position[rows],
  // row_begin[chunks + 1], chunk_past[chunks], chunk_all_cached[chunks], gather[out_rows],
  // block_tables[chunks * max_blocks].
  const size_t off_tokens = 0, off_row_chunk = rows, off_row_pos = 2 * rows;
  const size_t off_row_begin = 3 * rows;
  const size_t off_past = off_row_begin + num_chunks + 1;
  const size_t off_all_cached = off_past + num_chunks;
  const size_t off_gather = off_all_cached + num_chunks;
  const size_t off_tables = off_gather + out_rows;
  const size_t total = off_tables + size_t{static_cast<size_t>(num_chunks)} * max_blocks;
  RETURN_IF_ERROR(EnsurePinned(total));
  int32_t* h = pinned_;
  int64_t row = 0, out_row = 0;
  for (int ci = 0; ci < num_chunks; ++ci) {
    const ForwardChunk& chunk = chunks[ci];
    const int64_t n = static_cast<int64_t>(chunk.tokens.size());
    h[off_row_begin + ci] = static_cast<int32_t>(row);
    h[off_past + ci] = static_cast<int32_t>(past[ci]);
    h[off_all_cached + ci] = (n == 1 && past[ci] > 0) ? 1 : 0;
    for (int64_t i = 0; i < n; ++i, ++row) {
      h[off_tokens + row] = chunk.tokens[i];
      h[off_row_chunk + row] = ci;
      h[off_row_pos + row] = static_cast<int32_t>(past[ci] + i);
      if (chunk.all_logits || i == n - 1) h[off_gather + out_row++] = static_cast<int32_t>(row);
    }
    const std::vector<int32_t>& table = *cache_->BlockTable(chunk.seq);
    int32_t* dst = h + off_tables + size_t{static_cast<size_t>(ci)} * max_blocks;
    std::copy(table.begin(), table.end(), dst);
    std::fill(dst + table.size(), dst + max_blocks, 0);
  }
  h[off_row_begin + num_chunks] = static_cast<int32_t>(rows);
  CUDA_RETURN_IF_ERROR(
      cudaMemcpyAsync(meta_, pinned_, total * sizeof(int32_t), cudaMemcpyHostToDevice, stream_));
  const cuda::StepLayout step{.num_rows = static_cast<int>(rows),
                              .num_chunks = num_chunks,
                              .row_chunk = meta_ + off_row_chunk,
                              .row_position = meta_ + off_row_pos,
                              .row_begin = meta_ + off_row_begin,
                              .chunk_past = meta_ + off_past,
                              .chunk_all_cached = meta_ + off_all_cached,
                              .block_tables = meta_ + off_tables,
                              .max_blocks = max_blocks};
  const cuda::KvPoolLayout kv = cache_->layout();
  const int m = static_cast<int>(rows);

  CUDA_RETURN_IF_ERROR(cuda::LaunchEmbedding(embed_, meta_ + off_tokens, x_, m, hidden, stream_));
  for (int layer = 0; layer < c.num_hidden_layers; ++layer) {
    const DeviceLayer& w = layers_[layer];
    CUDA_RETURN_IF_ERROR(
        cuda::LaunchRmsNormToBf16(x_, w.input_norm, nullptr, normed_, m, hidden, eps, stream_));
    RETURN_IF_ERROR(Gemm(normed_, w.qkv, qkv_, m, qkv_dim, hidden, 0.0f));
    CUDA_RETURN_IF_ERROR(cuda::LaunchQkvEpilogue(qkv_, w.qkv_bias, w.q_norm, w.k_norm, inv_freq_,
                                                 eps, step, kv, layer, num_heads, q_, fresh_k_,
                                                 fresh_v_, stream_));
    CUDA_RETURN_IF_ERROR(cuda::LaunchPagedAttention(q_, fresh_k_, fresh_v_, step, kv, layer,
                                                    num_heads, scale, attn_, nullptr, stream_));
    if (w.o_bias != nullptr) {
      CUDA_RETURN_IF_ERROR(cuda::LaunchAddBias(x_, w.o_bias, m, hidden, stream_));
    }
    RETURN_IF_ERROR(Gemm(attn_, w.o_proj, x_, m, hidden, q_dim, 1.0f));
    CUDA_RETURN_IF_ERROR(cuda::LaunchRmsNormToBf16(x_, w.post_attention_norm, nullptr, normed_, m,
                                                   hidden, eps, stream_));
    RETURN_IF_ERROR(Gemm(normed_, w.gate_up, gate_up_, m, 2 * inter, hidden, 0.0f));
    CUDA_RETURN_IF_ERROR(cuda::LaunchSwiGlu(gate_up_, act_, m, inter, stream_));
    RETURN_IF_ERROR(Gemm(act_, w.down, x_, m, hidden, inter, 1.0f));
  }
  const int outs = static_cast<int>(out_rows);
  CUDA_RETURN_IF_ERROR(cuda::LaunchRmsNormToBf16(x_, final_norm_, meta_ + off_gather, normed_, outs,
                                                 hidden, eps, stream_));
  RETURN_IF_ERROR(Gemm(normed_, lm_head_, logits_, outs, c.vocab_size, hidden, 0.0f));
  CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(
      logits, logits_, size_t{static_cast<size_t>(outs)} * c.vocab_size * sizeof(float),
      cudaMemcpyDeviceToHost, stream_));
  CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream_));
  for (const ForwardChunk& chunk : chunks) {
    cache_->CommitAppend(chunk.seq, static_cast<int64_t>(chunk.tokens.size()));
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<std::unique_ptr<ModelRunner>> CreateCudaModelRunner(
    const RunnerOptions& options, const CudaRunnerOptions& cuda_options) {
  // Format checks first: they need no GPU and no model.
  if (options.kv_format.kind != kernels::KvFormatKind::kFp16 ||
      options.kv_format.eviction.kind != kernels::EvictionSpec::Kind::kNone) {
    return absl::UnimplementedError(absl::StrCat(
        "the CUDA backend supports only --kv fp16 without eviction in this phase (issue 5); got '",
        options.kv_format.name, "', eviction ",
        kernels::EvictionToString(options.kv_format.eviction),
        ". Use --backend cpu for compressed formats"));
  }
  if (!(cuda_options.gpu_memory_fraction > 0 && cuda_options.gpu_memory_fraction <= 1)) {
    return absl::InvalidArgumentError(absl::StrCat("gpu_memory_fraction must be in (0, 1], got ",
                                                   cuda_options.gpu_memory_fraction));
  }
  if (options.kv_block_size <= 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("kv_block_size must be positive, got ", options.kv_block_size));
  }
  int device_count = 0;
  if (cudaError_t e = cudaGetDeviceCount(&device_count); e != cudaSuccess || device_count == 0) {
    cudaGetLastError();
    return absl::FailedPreconditionError(
        absl::StrCat("no usable CUDA device: ",
                     e != cudaSuccess ? cudaGetErrorString(e) : "cudaGetDeviceCount returned 0"));
  }
  if (cuda_options.device < 0 || cuda_options.device >= device_count) {
    return absl::InvalidArgumentError(absl::StrCat("CUDA device ", cuda_options.device,
                                                   " out of range (", device_count, " devices)"));
  }
  CUDA_RETURN_IF_ERROR(cudaSetDevice(cuda_options.device));

  const std::filesystem::path dir(options.model_dir);
  ASSIGN_OR_RETURN(LlamaConfig config, LoadLlamaConfig((dir / "config.json").string()));
  if (config.head_dim % 32 != 0 || config.head_dim > 256) {
    return absl::UnimplementedError(absl::StrCat(
        "the CUDA backend needs head_dim a multiple of 32 and <= 256, got ", config.head_dim));
  }
  ASSIGN_OR_RETURN(LlamaWeights weights, LoadLlamaWeights(options.model_dir, config));

  ASSIGN_OR_RETURN(const cuda::CublasApi* cublas, cuda::LoadCublas());
  cudaStream_t stream = nullptr;
  CUDA_RETURN_IF_ERROR(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  cublasHandle_t blas = nullptr;
  if (cublasStatus_t s = cublas->create(&blas); s != CUBLAS_STATUS_SUCCESS) {
    cudaStreamDestroy(stream);
    return cuda::CublasStatus(s, "cublasCreate");
  }
  auto runner = std::make_unique<CudaModelRunner>(config, stream, blas);
  CUBLAS_RETURN_IF_ERROR(cublas->set_stream(blas, stream));
  RETURN_IF_ERROR(runner->UploadWeights(weights));
  weights = LlamaWeights();  // host copy no longer needed
  RETURN_IF_ERROR(runner->EnsureWorkspace(std::max(1, cuda_options.initial_step_tokens)));

  kernels::KvCacheConfig cache_config{.num_layers = config.num_hidden_layers,
                                      .num_kv_heads = config.num_key_value_heads,
                                      .head_dim = config.head_dim,
                                      .block_size = options.kv_block_size,
                                      .num_blocks = options.kv_num_blocks,
                                      .format = options.kv_format};
  const int64_t block_bytes = CudaKvCache::BytesPerToken(cache_config) * options.kv_block_size;
  size_t free_bytes = 0, total_bytes = 0;
  CUDA_RETURN_IF_ERROR(cudaMemGetInfo(&free_bytes, &total_bytes));
  if (cache_config.num_blocks <= 0) {
    cache_config.num_blocks =
        static_cast<int64_t>(static_cast<double>(free_bytes) * cuda_options.gpu_memory_fraction) /
        block_bytes;
    if (cache_config.num_blocks < 1) {
      return absl::ResourceExhaustedError(
          absl::StrCat("no GPU memory left for the KV pool: ", free_bytes,
                       " bytes free after weights, ", block_bytes, " bytes per block"));
    }
  }
  ASSIGN_OR_RETURN(std::unique_ptr<CudaKvCache> cache, CudaKvCache::Create(cache_config, stream));
  KVGATE_LOG(INFO) << "loaded " << config.model_type << " model from " << options.model_dir
                   << " on the GPU (bf16 weights, " << (runner->device_bytes() >> 20)
                   << " MiB with workspace): " << config.num_hidden_layers << " layers, hidden "
                   << config.hidden_size << ", heads " << config.num_attention_heads << "/"
                   << config.num_key_value_heads << ", vocab " << config.vocab_size << "; KV fp16, "
                   << cache_config.num_blocks << " blocks of " << options.kv_block_size
                   << " tokens (" << (cache->allocated_bytes() >> 20) << " MiB; "
                   << (free_bytes >> 20) << " MiB were free of " << (total_bytes >> 20) << ")";
  runner->SetCache(std::move(cache));
  return std::unique_ptr<ModelRunner>(std::move(runner));
}

}  // namespace kvgate::worker
