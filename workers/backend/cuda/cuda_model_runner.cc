#include "workers/backend/cuda/cuda_model_runner.h"

#include <cuda_runtime.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <compare>
#include <cstring>
#include <filesystem>
#include <map>
#include <set>
#include <span>
#include <utility>
#include <vector>

#include "absl/cleanup/cleanup.h"
#include "absl/strings/str_cat.h"
#include "kvgate/common/log.h"
#include "kvgate/common/status_macros.h"
#include "kvgate/kernels/cuda_kv_append.h"
#include "workers/backend/cuda/cublas_api.h"
#include "workers/backend/cuda/cuda_kernels.h"
#include "workers/backend/cuda/cuda_kv_cache.h"
#include "workers/backend/cuda/cuda_status.h"
#include "workers/backend/cuda/prefill_attention.h"
#include "workers/model/llama_config.h"
#include "workers/model/llama_weights.h"

namespace kvgate::worker {
namespace {

using cuda::CudaKvCache;
using cuda::CudaStatus;
using cuda::EvictPlan;
using cuda::PrefillMassChunk;

// Round-to-nearest-even float -> bf16 bits (NaN kept quiet).
uint16_t ToBf16(float x) {
  uint32_t bits;
  std::memcpy(&bits, &x, 4);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((bits >> 16) | 0x40);
  bits += 0x7fffu + ((bits >> 16) & 1u);
  return static_cast<uint16_t>(bits >> 16);
}

// Owns device allocations (weights and workspace); freed together.
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
    const size_t bytes = std::max<size_t>(count, 1) * sizeof(T);
    const cudaError_t error = cudaMalloc(&p, bytes);
    if (error != cudaSuccess) {
      cudaGetLastError();
      return absl::ResourceExhaustedError(
          absl::StrCat("cudaMalloc of ", bytes, " bytes: ", cudaGetErrorString(error)));
    }
    allocations_.push_back(p);
    sizes_.push_back(bytes);
    bytes_ += bytes;
    return static_cast<T*>(p);
  }
  void Free(void* p) {
    auto it = std::find(allocations_.begin(), allocations_.end(), p);
    if (it == allocations_.end()) return;
    const size_t i = static_cast<size_t>(it - allocations_.begin());
    cudaFree(p);
    bytes_ -= sizes_[i];
    allocations_.erase(it);
    sizes_.erase(sizes_.begin() + static_cast<std::ptrdiff_t>(i));
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
  std::vector<size_t> sizes_;
  size_t bytes_ = 0;
};

// Device sampling of logits rows already on the GPU (LaunchSampleTokens): the rows' parameters go
// up and the token ids come back through pinned memory; the sort workspace grows on demand. Owns
// its buffers; every Sample call ends with its stream synchronized, so they are idle between calls.
class DeviceSampler {
 public:
  DeviceSampler() = default;
  DeviceSampler(const DeviceSampler&) = delete;
  DeviceSampler& operator=(const DeviceSampler&) = delete;
  ~DeviceSampler() { Release(); }

  // tokens[r] (host) for each row r of logits [sampling.size(), vocab] (device), on `stream`.
  absl::Status Sample(const float* logits, int vocab, std::span<const DeviceSampling> sampling,
                      int32_t* tokens, cudaStream_t stream) {
    const int rows = static_cast<int>(sampling.size());
    if (rows == 0) return absl::OkStatus();
    RETURN_IF_ERROR(EnsureRows(rows));
    int sort_rows = 0;
    for (int r = 0; r < rows; ++r) {
      const DeviceSampling& s = sampling[r];
      const bool sampled = s.temperature > 0.0f;
      host_rows_[r] = {.temperature = s.temperature,
                       .top_k = s.top_k,
                       .top_p = s.top_p,
                       .sort_row = sampled ? sort_rows++ : -1,
                       .uniform = s.uniform};
    }
    size_t need = 0;
    RETURN_IF_ERROR(CudaStatus(cuda::SamplingWorkspaceBytes(sort_rows, vocab, &need),
                               "SamplingWorkspaceBytes"));
    if (need > workspace_bytes_) {
      if (workspace_ != nullptr) cudaFree(workspace_);
      workspace_ = nullptr;
      workspace_bytes_ = 0;
      RETURN_IF_ERROR(CudaStatus(cudaMalloc(&workspace_, need), "cudaMalloc (sampling sort)"));
      workspace_bytes_ = need;
    }
    CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(device_rows_, host_rows_, rows * sizeof(cuda::SampleRow),
                                         cudaMemcpyHostToDevice, stream));
    CUDA_RETURN_IF_ERROR(cuda::LaunchSampleTokens(logits, rows, vocab, device_rows_, sort_rows,
                                                  workspace_, workspace_bytes_, device_tokens_,
                                                  stream));
    CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(host_tokens_, device_tokens_, rows * sizeof(int32_t),
                                         cudaMemcpyDeviceToHost, stream));
    CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream));
    std::copy(host_tokens_, host_tokens_ + rows, tokens);
    return absl::OkStatus();
  }

 private:
  absl::Status EnsureRows(int rows) {
    if (static_cast<size_t>(rows) <= rows_capacity_) return absl::OkStatus();
    const size_t want = std::max<size_t>(rows, std::max<size_t>(64, 2 * rows_capacity_));
    ReleaseRows();
    CUDA_RETURN_IF_ERROR(cudaMallocHost(&host_rows_, want * sizeof(cuda::SampleRow)));
    CUDA_RETURN_IF_ERROR(cudaMallocHost(&host_tokens_, want * sizeof(int32_t)));
    CUDA_RETURN_IF_ERROR(cudaMalloc(&device_rows_, want * sizeof(cuda::SampleRow)));
    CUDA_RETURN_IF_ERROR(cudaMalloc(&device_tokens_, want * sizeof(int32_t)));
    rows_capacity_ = want;
    return absl::OkStatus();
  }
  void ReleaseRows() {
    if (host_rows_ != nullptr) cudaFreeHost(host_rows_);
    if (host_tokens_ != nullptr) cudaFreeHost(host_tokens_);
    if (device_rows_ != nullptr) cudaFree(device_rows_);
    if (device_tokens_ != nullptr) cudaFree(device_tokens_);
    host_rows_ = device_rows_ = nullptr;
    host_tokens_ = device_tokens_ = nullptr;
    rows_capacity_ = 0;
  }
  void Release() {
    ReleaseRows();
    if (workspace_ != nullptr) cudaFree(workspace_);
    workspace_ = nullptr;
    workspace_bytes_ = 0;
  }

  cuda::SampleRow* host_rows_ = nullptr;    // pinned [rows_capacity_]
  cuda::SampleRow* device_rows_ = nullptr;  // [rows_capacity_]
  int32_t* host_tokens_ = nullptr;          // pinned [rows_capacity_]
  int32_t* device_tokens_ = nullptr;        // [rows_capacity_]
  size_t rows_capacity_ = 0;
  void* workspace_ = nullptr;  // SamplingWorkspaceBytes
  size_t workspace_bytes_ = 0;
};

// Bytes of the cuBLASLt workspace (allocated once per runner): what NVIDIA recommends for Hopper.
constexpr size_t kGemmWorkspaceBytes = size_t{32} << 20;

// Instantiated CUDA graphs kept per runner; the least recently replayed one goes beyond this.
constexpr size_t kMaxDecodeGraphs = 128;

// Block-table width of a decode-only step: the widest table rounded up to 1/8 of its power of two
// (every width up to 16 blocks, then steps of 2, 4, 8, ... blocks: at most 12.5% more), so that
// the split-KV attention's grid (planned from the width) and the metadata layout change only every
// few hundred tokens, while the padding's idle splits stay a small fraction.
int DecodeTableWidth(int blocks) {
  if (blocks <= 16) return blocks;
  const int step = std::bit_floor(static_cast<unsigned>(blocks)) / 8;
  return (blocks + step - 1) / step * step;
}

// The CUDA graphs of decode-only steps, one per launch shape. A shape is captured on its second
// step (the first runs eagerly and grows every workspace it needs, since nothing may allocate
// during a capture) and replayed from then on. The graphs hold the addresses of the buffers their
// kernels use: when any of them is reallocated (the caller's generation changes), all are dropped
// and the shapes already seen are captured again on their next step.
class DecodeGraphs {
 public:
  struct Key {
    int batch = 0;        // decode rows
    int table_width = 0;  // DecodeTableWidth
    auto operator<=>(const Key&) const = default;
  };
  enum class Action { kEager, kCapture, kReplay };

  DecodeGraphs() = default;
  DecodeGraphs(const DecodeGraphs&) = delete;
  DecodeGraphs& operator=(const DecodeGraphs&) = delete;
  ~DecodeGraphs() { Clear(); }

  // What the step of `key` does, its buffers being at `generation`.
  Action Prepare(const Key& key, uint64_t generation) {
    if (generation != generation_) {
      Clear();
      generation_ = generation;
    }
    if (auto it = graphs_.find(key); it != graphs_.end()) {
      it->second.last_use = ++clock_;
      ++stats_.replays;
      return Action::kReplay;
    }
    return seen_.insert(key).second ? Action::kEager : Action::kCapture;
  }
  cudaGraphExec_t exec(const Key& key) const { return graphs_.at(key).exec; }
  // Instantiates the captured `graph` (destroyed here) for `key`.
  absl::StatusOr<cudaGraphExec_t> Add(const Key& key, cudaGraph_t graph) {
    cudaGraphExec_t exec = nullptr;
    const cudaError_t error = cudaGraphInstantiate(&exec, graph, 0);
    cudaGraphDestroy(graph);
    CUDA_RETURN_IF_ERROR(error);
    if (graphs_.size() >= kMaxDecodeGraphs) {
      auto oldest = std::min_element(graphs_.begin(), graphs_.end(), [](const auto& a, const auto& b) {
        return a.second.last_use < b.second.last_use;
      });
      cudaGraphExecDestroy(oldest->second.exec);
      graphs_.erase(oldest);
    }
    graphs_[key] = {.exec = exec, .last_use = ++clock_};
    ++stats_.captures;
    ++stats_.replays;
    return exec;
  }
  CudaGraphStats stats() const {
    CudaGraphStats s = stats_;
    s.graphs = static_cast<int>(graphs_.size());
    return s;
  }

 private:
  struct Entry {
    cudaGraphExec_t exec = nullptr;
    uint64_t last_use = 0;
  };
  void Clear() {
    for (auto& [key, entry] : graphs_) cudaGraphExecDestroy(entry.exec);
    graphs_.clear();
  }

  std::map<Key, Entry> graphs_;
  std::set<Key> seen_;
  uint64_t generation_ = 0;
  uint64_t clock_ = 0;
  CudaGraphStats stats_;
};

// Matrices are of the compute type: bf16 bits (uint16_t) or float (CudaCompute).
struct DeviceLayer {
  const float* input_norm = nullptr;
  const void* qkv = nullptr;  // [q_dim + 2 kv_dim, hidden]
  const float* qkv_bias = nullptr;
  const float* q_norm = nullptr;
  const float* k_norm = nullptr;
  const void* o_proj = nullptr;  // [hidden, q_dim]
  const float* o_bias = nullptr;
  const float* post_attention_norm = nullptr;
  const void* gate_up = nullptr;  // [2 inter, hidden]
  const void* down = nullptr;     // [hidden, inter]
};

class CudaModelRunner final : public ModelRunner {
 public:
  // config's query heads must be a multiple of its kv heads.
  CudaModelRunner(LlamaConfig config, cudaStream_t stream, const CudaRunnerOptions& options)
      : config_(std::move(config)),
        stream_(stream),
        compute_(options.compute),
        device_sampling_(options.device_sampling) {
    if (options.cuda_graphs) graphs_ = std::make_unique<DecodeGraphs>();
    const int group = config_.num_attention_heads / config_.num_key_value_heads;
    while (group_pad_ < group) group_pad_ *= 2;
  }
  ~CudaModelRunner() override {
    if (stream_ != nullptr) cudaStreamSynchronize(stream_);
    graphs_.reset();
    cache_.reset();
    gemm_.reset();
    if (pinned_ != nullptr) cudaFreeHost(pinned_);
    if (stream_ != nullptr) cudaStreamDestroy(stream_);
  }

  const LlamaConfig& config() const override { return config_; }
  kernels::KvCache& kv_cache() override { return *cache_; }
  std::string backend_name() const override { return "cuda"; }
  absl::Status Forward(std::span<const ForwardChunk> chunks, float* logits) override;
  bool supports_device_sampling() const override { return device_sampling_; }
  absl::Status ForwardSample(std::span<const ForwardChunk> chunks,
                             std::span<const DeviceSampling> sampling, int32_t* tokens) override;

  // The cuBLASLt workspace (part of the step workspace, sized before the KV pool) and its plans.
  absl::Status InitGemm();
  absl::Status UploadWeights(const LlamaWeights& weights);
  absl::Status GenerateWeights(uint64_t seed);
  absl::Status EnsureWorkspace(int64_t rows);
  // Sizes and creates the KV cache (after the weights and the initial workspace).
  absl::Status CreateCache(const RunnerOptions& options, const CudaRunnerOptions& cuda_options);
  CudaKvCache& cache() { return *cache_; }
  const CudaKvCache& cache() const { return *cache_; }
  int64_t weight_bytes() const { return weight_bytes_; }
  size_t device_bytes() const { return arena_.bytes(); }
  CudaGraphStats graph_stats() const {
    return graphs_ != nullptr ? graphs_->stats() : CudaGraphStats{};
  }

 private:
  // The forward of `chunks` up to their logits in logits_ (device; rows in chunk order, as
  // Forward returns them), enqueued on stream_; the cache appends are not committed yet.
  absl::Status Run(std::span<const ForwardChunk> chunks, int64_t* out_rows);
  // Run's work, for decode-only steps through DecodeGraphs; sets capture_failed_ when a graph
  // capture fails (nothing was launched then).
  absl::Status RunStep(std::span<const ForwardChunk> chunks, int64_t* out_rows);
  void CommitAppends(std::span<const ForwardChunk> chunks);
  // y[m, n] (+)= x[m, k] * w[n, k]^T (+ bias[n]); x, w of the compute type, row-major; y fp32
  // row-major; `accumulate` adds into y (the residual stream).
  absl::Status Gemm(const void* x, const void* w, float* y, int m, int n, int k, bool accumulate,
                    const float* bias = nullptr);
  // Changes whenever a buffer the step's kernels use is reallocated (DecodeGraphs).
  uint64_t BufferGeneration() const {
    return buffer_generation_ + cache_->decode_workspace_generation();
  }
  bool fp32() const { return compute_ == CudaCompute::kFp32; }
  size_t compute_bytes() const { return fp32() ? sizeof(float) : sizeof(uint16_t); }
  // f(T{}) with T the compute type's element (float, or uint16_t holding bf16 bits).
  template <class F>
  cudaError_t WithComputeType(F&& f) const {
    return fp32() ? f(float{}) : f(uint16_t{});
  }
  absl::StatusOr<const void*> UploadMatrix(const std::vector<float>& host);
  // The kernels whose output (or weight input) is of the compute type.
  absl::Status Embed(const int32_t* tokens, int rows);
  absl::Status RmsNorm(const float* weight, const int32_t* gather_rows, int rows);  // x_ -> normed_
  absl::Status GatherHeads(int rows);  // attn_f32_ -> attn_
  absl::Status SwiGlu(int rows);       // gate_up_ -> act_
  absl::Status EnsurePinned(size_t int32s);
  absl::Status EnsureLogits(int64_t rows);
  absl::Status EnsurePrefixScratch(int64_t floats);
  cuda::QkvShape shape() const {
    return {.num_q_heads = config_.num_attention_heads,
            .num_kv_heads = config_.num_key_value_heads,
            .head_dim = config_.head_dim,
            .group_pad = group_pad_};
  }

  LlamaConfig config_;
  cudaStream_t stream_ = nullptr;
  const CudaCompute compute_;
  const bool device_sampling_;
  DeviceArena arena_;
  DeviceSampler sampler_;
  std::unique_ptr<cuda::LtGemm> gemm_;
  std::unique_ptr<CudaKvCache> cache_;
  std::unique_ptr<DecodeGraphs> graphs_;  // null with CudaRunnerOptions::cuda_graphs off
  uint64_t buffer_generation_ = 0;        // reallocations of the step buffers below
  bool capture_failed_ = false;
  int group_pad_ = 1;  // query heads per kv-head in q_ (the GQA group rounded up; see QkvShape)

  // Weights (matrices of the compute type).
  const void* embed_ = nullptr;    // [vocab, hidden]
  const void* lm_head_ = nullptr;  // [vocab, hidden] (== embed_ when tied)
  const float* final_norm_ = nullptr;
  const double* inv_freq_ = nullptr;  // [head_dim / 2]
  std::vector<DeviceLayer> layers_;
  int64_t weight_bytes_ = 0;

  // Step workspace for up to workspace_rows_ token rows.
  int64_t workspace_rows_ = 0;
  float* x_ = nullptr;         // [rows, hidden] residual stream
  float* qkv_ = nullptr;       // [rows, (Hq + 2 Hkv) D]: GEMM output; k, v final after the epilogue
  float* q_ = nullptr;         // [rows, Hkv, group_pad, D]; padding heads stay zero
  float* attn_f32_ = nullptr;  // [rows, Hkv, group_pad, D] decode attention output
  float* mass_stats_ = nullptr;  // (H2O) [rows, PrefillMassStatsFloatsPerRow]: prefill mass
  float* gate_up_ = nullptr;   // [rows, 2 inter]
  // GEMM inputs, of the compute type.
  void* normed_ = nullptr;      // [rows, hidden]
  void* attn_ = nullptr;        // [rows, Hq D]
  void* act_ = nullptr;         // [rows, inter]
  float* logits_ = nullptr;     // [logits_rows_, vocab]
  int64_t logits_rows_ = 0;
  // Cached prefixes of prefill chunks read through the format: keys and values.
  float* prefix_k_ = nullptr;
  float* prefix_v_ = nullptr;
  int64_t prefix_floats_ = 0;
  // Step metadata: pinned host staging and its device copy (int32s).
  int32_t* pinned_ = nullptr;
  size_t pinned_capacity_ = 0;
  int32_t* meta_ = nullptr;
  size_t meta_capacity_ = 0;
};

// A seed per tensor, so that tensors are independent whatever their sizes.
uint64_t TensorSeed(uint64_t seed, uint64_t index) {
  uint64_t z = seed * 0x9e3779b97f4a7c15ull + index * 0xd1b54a32d192ed03ull + 1;
  z = (z ^ (z >> 31)) * 0xbf58476d1ce4e5b9ull;
  return z ^ (z >> 29);
}

absl::StatusOr<const void*> CudaModelRunner::UploadMatrix(const std::vector<float>& host) {
  if (fp32()) {
    ASSIGN_OR_RETURN(float* device, arena_.Upload(host));
    return device;
  }
  ASSIGN_OR_RETURN(uint16_t * device, arena_.UploadBf16(host));
  return device;
}

absl::Status CudaModelRunner::UploadWeights(const LlamaWeights& w) {
  ASSIGN_OR_RETURN(embed_, UploadMatrix(w.embed));
  if (w.lm_head.empty()) {
    lm_head_ = embed_;
  } else {
    ASSIGN_OR_RETURN(lm_head_, UploadMatrix(w.lm_head));
  }
  ASSIGN_OR_RETURN(float* final_norm, arena_.Upload(w.final_norm));
  final_norm_ = final_norm;
  ASSIGN_OR_RETURN(double* inv_freq, arena_.Upload(RopeInverseFrequencies(config_)));
  inv_freq_ = inv_freq;
  for (const LlamaLayerWeights& lw : w.layers) {
    DeviceLayer d;
    ASSIGN_OR_RETURN(d.input_norm, arena_.Upload(lw.input_norm));
    ASSIGN_OR_RETURN(d.qkv, UploadMatrix(lw.qkv));
    ASSIGN_OR_RETURN(d.qkv_bias, arena_.Upload(lw.qkv_bias));
    ASSIGN_OR_RETURN(d.q_norm, arena_.Upload(lw.q_norm));
    ASSIGN_OR_RETURN(d.k_norm, arena_.Upload(lw.k_norm));
    ASSIGN_OR_RETURN(d.o_proj, UploadMatrix(lw.o_proj));
    ASSIGN_OR_RETURN(d.o_bias, arena_.Upload(lw.o_bias));
    ASSIGN_OR_RETURN(d.post_attention_norm, arena_.Upload(lw.post_attention_norm));
    ASSIGN_OR_RETURN(d.gate_up, UploadMatrix(lw.gate_up));
    ASSIGN_OR_RETURN(d.down, UploadMatrix(lw.down));
    layers_.push_back(d);
  }
  weight_bytes_ = static_cast<int64_t>(arena_.bytes());
  return absl::OkStatus();
}

absl::Status CudaModelRunner::GenerateWeights(uint64_t seed) {
  const LlamaConfig& c = config_;
  const int64_t hidden = c.hidden_size, inter = c.intermediate_size;
  const int64_t q_dim = int64_t{c.num_attention_heads} * c.head_dim;
  const int64_t qkv_dim = q_dim + 2 * int64_t{c.num_key_value_heads} * c.head_dim;
  uint64_t tensor = 0;
  // Uniform in [-b, b) has variance b^2 / 3: b = sqrt(3 / fan_in) gives variance 1 / fan_in. The
  // values are bf16 in both compute modes (the same model either way).
  auto matrix = [&](int64_t rows, int64_t cols, double variance) -> absl::StatusOr<const void*> {
    ASSIGN_OR_RETURN(char* p, arena_.Allocate<char>(rows * cols * compute_bytes()));
    const uint64_t tensor_seed = TensorSeed(seed, tensor++);
    const float bound = static_cast<float>(std::sqrt(3 * variance));
    CUDA_RETURN_IF_ERROR(WithComputeType([&](auto tag) {
      using T = decltype(tag);
      return cuda::LaunchFillUniformBf16<T>(reinterpret_cast<T*>(p), rows * cols, tensor_seed,
                                            bound, stream_);
    }));
    return static_cast<const void*>(p);
  };
  auto constant = [&](int64_t n, float value) -> absl::StatusOr<float*> {
    ASSIGN_OR_RETURN(float* p, arena_.Allocate<float>(n));
    CUDA_RETURN_IF_ERROR(cuda::LaunchFillFloat(p, n, value, stream_));
    return p;
  };
  ASSIGN_OR_RETURN(embed_, matrix(c.vocab_size, hidden, 1.0));
  if (c.tie_word_embeddings) {
    lm_head_ = embed_;
  } else {
    ASSIGN_OR_RETURN(lm_head_, matrix(c.vocab_size, hidden, 1.0 / hidden));
  }
  ASSIGN_OR_RETURN(float* final_norm, constant(hidden, 1.0f));
  final_norm_ = final_norm;
  ASSIGN_OR_RETURN(double* inv_freq, arena_.Upload(RopeInverseFrequencies(config_)));
  inv_freq_ = inv_freq;
  for (int l = 0; l < c.num_hidden_layers; ++l) {
    DeviceLayer d;
    ASSIGN_OR_RETURN(d.input_norm, constant(hidden, 1.0f));
    ASSIGN_OR_RETURN(d.qkv, matrix(qkv_dim, hidden, 1.0 / hidden));
    if (c.attention_bias) {
      ASSIGN_OR_RETURN(d.qkv_bias, constant(qkv_dim, 0.0f));
    }
    if (c.qk_norm) {
      ASSIGN_OR_RETURN(d.q_norm, constant(c.head_dim, 1.0f));
      ASSIGN_OR_RETURN(d.k_norm, constant(c.head_dim, 1.0f));
    }
    ASSIGN_OR_RETURN(d.o_proj, matrix(hidden, q_dim, 1.0 / q_dim));
    if (c.o_proj_bias) {
      ASSIGN_OR_RETURN(d.o_bias, constant(hidden, 0.0f));
    }
    ASSIGN_OR_RETURN(d.post_attention_norm, constant(hidden, 1.0f));
    ASSIGN_OR_RETURN(d.gate_up, matrix(2 * inter, hidden, 1.0 / hidden));
    ASSIGN_OR_RETURN(d.down, matrix(hidden, inter, 1.0 / inter));
    layers_.push_back(d);
  }
  CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream_));
  weight_bytes_ = static_cast<int64_t>(arena_.bytes());
  return absl::OkStatus();
}

absl::Status CudaModelRunner::EnsureWorkspace(int64_t rows) {
  if (rows <= workspace_rows_) return absl::OkStatus();
  const LlamaConfig& c = config_;
  const int64_t q_dim = int64_t{c.num_attention_heads} * c.head_dim;
  const int64_t padded_q_dim = int64_t{c.num_key_value_heads} * group_pad_ * c.head_dim;
  const int64_t kv_dim = int64_t{c.num_key_value_heads} * c.head_dim;
  CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream_));
  for (void* p : {static_cast<void*>(x_), static_cast<void*>(qkv_), static_cast<void*>(q_),
                  static_cast<void*>(attn_f32_), static_cast<void*>(mass_stats_),
                  static_cast<void*>(gate_up_), static_cast<void*>(normed_),
                  static_cast<void*>(attn_), static_cast<void*>(act_)}) {
    if (p != nullptr) arena_.Free(p);
  }
  workspace_rows_ = 0;
  ++buffer_generation_;
  ASSIGN_OR_RETURN(x_, arena_.Allocate<float>(rows * c.hidden_size));
  ASSIGN_OR_RETURN(qkv_, arena_.Allocate<float>(rows * (q_dim + 2 * kv_dim)));
  ASSIGN_OR_RETURN(q_, arena_.Allocate<float>(rows * padded_q_dim));
  CUDA_RETURN_IF_ERROR(cudaMemsetAsync(q_, 0, rows * padded_q_dim * sizeof(float), stream_));
  ASSIGN_OR_RETURN(attn_f32_, arena_.Allocate<float>(rows * padded_q_dim));
  ASSIGN_OR_RETURN(
      mass_stats_,
      arena_.Allocate<float>(rows * cuda::PrefillMassStatsFloatsPerRow(c.num_key_value_heads)));
  ASSIGN_OR_RETURN(gate_up_, arena_.Allocate<float>(rows * 2 * c.intermediate_size));
  const int64_t bytes = static_cast<int64_t>(compute_bytes());
  ASSIGN_OR_RETURN(normed_, arena_.Allocate<char>(rows * c.hidden_size * bytes));
  ASSIGN_OR_RETURN(attn_, arena_.Allocate<char>(rows * q_dim * bytes));
  ASSIGN_OR_RETURN(act_, arena_.Allocate<char>(rows * c.intermediate_size * bytes));
  workspace_rows_ = rows;
  return absl::OkStatus();
}

absl::Status CudaModelRunner::EnsureLogits(int64_t rows) {
  if (rows <= logits_rows_) return absl::OkStatus();
  CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream_));
  if (logits_ != nullptr) arena_.Free(logits_);
  logits_ = nullptr;
  logits_rows_ = 0;
  ++buffer_generation_;
  ASSIGN_OR_RETURN(logits_, arena_.Allocate<float>(rows * config_.vocab_size));
  logits_rows_ = rows;
  return absl::OkStatus();
}

absl::Status CudaModelRunner::EnsurePrefixScratch(int64_t floats) {
  if (floats <= prefix_floats_) return absl::OkStatus();
  CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream_));
  for (float* p : {prefix_k_, prefix_v_}) {
    if (p != nullptr) arena_.Free(p);
  }
  prefix_k_ = prefix_v_ = nullptr;
  prefix_floats_ = 0;
  ++buffer_generation_;
  ASSIGN_OR_RETURN(prefix_k_, arena_.Allocate<float>(floats));
  ASSIGN_OR_RETURN(prefix_v_, arena_.Allocate<float>(floats));
  prefix_floats_ = floats;
  return absl::OkStatus();
}

absl::Status CudaModelRunner::EnsurePinned(size_t int32s) {
  if (int32s > pinned_capacity_) {
    const size_t want = std::max(int32s, pinned_capacity_ * 2);
    if (pinned_ != nullptr) cudaFreeHost(pinned_);
    pinned_ = nullptr;
    pinned_capacity_ = 0;
    CUDA_RETURN_IF_ERROR(cudaMallocHost(&pinned_, want * sizeof(int32_t)));
    pinned_capacity_ = want;
  }
  if (int32s > meta_capacity_) {
    const size_t want = std::max<size_t>(int32s, 4096);
    if (meta_ != nullptr) arena_.Free(meta_);
    meta_ = nullptr;
    meta_capacity_ = 0;
    ++buffer_generation_;
    ASSIGN_OR_RETURN(meta_, arena_.Allocate<int32_t>(want));
    meta_capacity_ = want;
  }
  return absl::OkStatus();
}

absl::Status CudaModelRunner::CreateCache(const RunnerOptions& options,
                                          const CudaRunnerOptions& cuda_options) {
  const LlamaConfig& c = config_;
  kernels::KvCacheConfig cache_config{.num_layers = c.num_hidden_layers,
                                      .num_kv_heads = c.num_key_value_heads,
                                      .head_dim = c.head_dim,
                                      .block_size = options.kv_block_size,
                                      .num_blocks = options.kv_num_blocks,
                                      .format = options.kv_format,
                                      // As the CPU runner's (CreateSizedKvCache): sink eviction
                                      // shifts the sinks' query by these.
                                      .rope_inv_freq = RopeInverseFrequencies(c)};
  ASSIGN_OR_RETURN(const cuda::KvCacheGeometry geometry, CudaKvCache::Measure(cache_config));
  size_t free_bytes = 0, total_bytes = 0;
  CUDA_RETURN_IF_ERROR(cudaMemGetInfo(&free_bytes, &total_bytes));
  if (cache_config.num_blocks <= 0) {
    const double budget = static_cast<double>(free_bytes) * cuda_options.gpu_memory_fraction -
                          static_cast<double>(geometry.slot_bytes) * cuda_options.max_sequences;
    cache_config.num_blocks =
        static_cast<int64_t>(budget / static_cast<double>(geometry.block_bytes +
                                                          geometry.eviction_bytes_per_block));
    if (cache_config.num_blocks < 1) {
      return absl::ResourceExhaustedError(absl::StrCat(
          "no GPU memory left for the KV pool: ", free_bytes, " bytes free after the weights, ",
          cuda_options.max_sequences, " sequence slots of ", geometry.slot_bytes, " bytes, ",
          geometry.block_bytes, " bytes per block"));
    }
  }
  ASSIGN_OR_RETURN(cache_, CudaKvCache::Create(cache_config, stream_, cuda_options.max_sequences));
  KVGATE_LOG(INFO) << c.model_type << " model on the GPU (" << CudaComputeName(compute_)
                   << " compute, weights " << (weight_bytes_ >> 20) << " MiB, "
                   << (arena_.bytes() >> 20) << " MiB with workspace): " << c.num_hidden_layers
                   << " layers, hidden " << c.hidden_size << ", heads " << c.num_attention_heads
                   << "/" << c.num_key_value_heads << ", vocab " << c.vocab_size << "; KV "
                   << options.kv_format.name << ", " << cache_config.num_blocks << " blocks of "
                   << options.kv_block_size << " tokens (" << (cache_->allocated_bytes() >> 20)
                   << " MiB, " << geometry.bytes_per_token << " bytes/token; "
                   << cuda_options.max_sequences << " sequence slots of " << geometry.slot_bytes
                   << " bytes; " << (free_bytes >> 20) << " MiB were free of "
                   << (total_bytes >> 20) << ")";
  return absl::OkStatus();
}

absl::Status CudaModelRunner::InitGemm() {
  ASSIGN_OR_RETURN(void* workspace, arena_.Allocate<char>(kGemmWorkspaceBytes));
  ASSIGN_OR_RETURN(gemm_, cuda::LtGemm::Create(fp32() ? CUDA_R_32F : CUDA_R_16BF, workspace,
                                               kGemmWorkspaceBytes));
  return absl::OkStatus();
}

absl::Status CudaModelRunner::Gemm(const void* x, const void* w, float* y, int m, int n, int k,
                                   bool accumulate, const float* bias) {
  return gemm_->Run(x, w, y, m, n, k, accumulate, bias, stream_);
}

absl::Status CudaModelRunner::Embed(const int32_t* tokens, int rows) {
  return CudaStatus(WithComputeType([&](auto tag) {
                      using T = decltype(tag);
                      return cuda::LaunchEmbedding<T>(static_cast<const T*>(embed_), tokens, x_,
                                                      rows, config_.hidden_size, stream_);
                    }),
                    "LaunchEmbedding");
}

absl::Status CudaModelRunner::RmsNorm(const float* weight, const int32_t* gather_rows, int rows) {
  return CudaStatus(WithComputeType([&](auto tag) {
                      using T = decltype(tag);
                      return cuda::LaunchRmsNorm<T>(
                          x_, weight, gather_rows, static_cast<T*>(normed_), rows,
                          config_.hidden_size, static_cast<float>(config_.rms_norm_eps), stream_);
                    }),
                    "LaunchRmsNorm");
}

absl::Status CudaModelRunner::GatherHeads(int rows) {
  return CudaStatus(WithComputeType([&](auto tag) {
                      using T = decltype(tag);
                      return cuda::LaunchGatherHeads<T>(attn_f32_, static_cast<T*>(attn_), rows,
                                                        shape(), stream_);
                    }),
                    "LaunchGatherHeads");
}

absl::Status CudaModelRunner::SwiGlu(int rows) {
  return CudaStatus(WithComputeType([&](auto tag) {
                      using T = decltype(tag);
                      return cuda::LaunchSwiGlu<T>(gate_up_, static_cast<T*>(act_), rows,
                                                   config_.intermediate_size, stream_);
                    }),
                    "LaunchSwiGlu");
}

absl::Status CudaModelRunner::Forward(std::span<const ForwardChunk> chunks, float* logits) {
  if (chunks.empty()) return absl::OkStatus();
  if (logits == nullptr) return absl::InvalidArgumentError("logits output is null");
  int64_t out_rows = 0;
  RETURN_IF_ERROR(Run(chunks, &out_rows));
  CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(
      logits, logits_, static_cast<size_t>(out_rows) * config_.vocab_size * sizeof(float),
      cudaMemcpyDeviceToHost, stream_));
  CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream_));
  CommitAppends(chunks);
  return absl::OkStatus();
}

absl::Status CudaModelRunner::ForwardSample(std::span<const ForwardChunk> chunks,
                                            std::span<const DeviceSampling> sampling,
                                            int32_t* tokens) {
  if (!device_sampling_) {
    return absl::UnimplementedError("this CUDA runner was made with device_sampling off");
  }
  if (chunks.empty()) return absl::OkStatus();
  if (tokens == nullptr) return absl::InvalidArgumentError("tokens output is null");
  RETURN_IF_ERROR(ValidateDeviceSampling(chunks, sampling));
  int64_t out_rows = 0;
  RETURN_IF_ERROR(Run(chunks, &out_rows));  // one logits row per chunk (no all_logits)
  RETURN_IF_ERROR(sampler_.Sample(logits_, config_.vocab_size, sampling, tokens, stream_));
  CommitAppends(chunks);
  return absl::OkStatus();
}

void CudaModelRunner::CommitAppends(std::span<const ForwardChunk> chunks) {
  for (const ForwardChunk& chunk : chunks) {
    cache_->CommitAppend(chunk.seq, static_cast<int64_t>(chunk.tokens.size()));
  }
}

absl::Status CudaModelRunner::Run(std::span<const ForwardChunk> chunks, int64_t* out_rows) {
  capture_failed_ = false;
  absl::Status status = RunStep(chunks, out_rows);
  if (status.ok() || !capture_failed_) return status;
  // A capture launches nothing, and the cache is only committed after Run: the step can run again
  // eagerly. Graphs stay off for this runner from then on.
  KVGATE_LOG(WARNING) << "CUDA graph capture failed (" << status
                      << "); decode steps launch their kernels eagerly from now on";
  graphs_.reset();
  return RunStep(chunks, out_rows);
}

absl::Status CudaModelRunner::RunStep(std::span<const ForwardChunk> chunks,
                                      int64_t* out_rows_result) {
  RETURN_IF_ERROR(ValidateForwardChunks(chunks, config_, *cache_));

  const LlamaConfig& c = config_;
  const int hidden = c.hidden_size;
  const int num_heads = c.num_attention_heads, num_kv_heads = c.num_key_value_heads;
  const int d = c.head_dim;
  const int q_dim = num_heads * d;
  const int kv_dim = num_kv_heads * d;
  const int qkv_dim = q_dim + 2 * kv_dim;
  const int inter = c.intermediate_size;
  const float eps = static_cast<float>(c.rms_norm_eps);
  const float scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(d)));
  CudaKvCache& cache = *cache_;

  // Chunk order of the step: decode tokens (one token after a cached prefix: attention reads every
  // token through the format), then prefill chunks with a cached prefix, then fresh prompts. Rows
  // follow that order, so the decode rows are rows [0, num_decode).
  const int num_chunks = static_cast<int>(chunks.size());
  std::vector<int64_t> past(num_chunks);
  // Slots each chunk's sequence keeps before its append (== past without eviction).
  std::vector<int64_t> kept(num_chunks);
  std::vector<EvictPlan> plans(num_chunks);
  std::vector<int> order;
  order.reserve(num_chunks);
  int num_decode = 0, num_prefix = 0;
  int64_t rows = 0, out_rows = 0;
  int max_blocks = 1, max_rows = 1;
  for (int pass = 0; pass < 3; ++pass) {
    for (int ci = 0; ci < num_chunks; ++ci) {
      const int64_t n = static_cast<int64_t>(chunks[ci].tokens.size());
      const int64_t p = cache.Length(chunks[ci].seq, 0);
      const int kind = (n == 1 && p > 0) ? 0 : (p > 0 ? 1 : 2);
      if (kind != pass) continue;
      past[ci] = p;
      plans[ci] = cache.PlanAppend(chunks[ci].seq, n);
      kept[ci] = CudaKvCache::KeptBefore(plans[ci]);
      order.push_back(ci);
      num_decode += kind == 0;
      num_prefix += kind == 1;
      const int64_t capacity = cache.Capacity(chunks[ci].seq);
      if (kept[ci] + n > capacity) {
        return absl::FailedPreconditionError(absl::StrCat("sequence ", chunks[ci].seq, " holds ",
                                                          kept[ci],
                                                          " tokens and has room for ", capacity,
                                                          "; Reserve(", p + n, ") first"));
      }
      rows += n;
      out_rows += chunks[ci].all_logits ? n : 1;
      max_rows = std::max(max_rows, static_cast<int>(n));
      max_blocks = std::max(max_blocks, static_cast<int>(cache.BlockTable(chunks[ci].seq)->size()));
    }
  }
  // Decode-only steps on a cache without eviction launch shapes that depend only on the batch and
  // a bucketed block-table width (the split-KV attention is planned for the table's whole width),
  // so that one CUDA graph serves many steps; they do so with graphs off too, so that turning
  // graphs off changes the timing, never the results.
  const bool graph_shape = num_decode == num_chunks && !cache.evicting();
  if (graph_shape) max_blocks = DecodeTableWidth(max_blocks);
  if (rows > INT32_MAX / std::max(qkv_dim, 2 * inter)) {
    return absl::InvalidArgumentError(absl::StrCat("step of ", rows, " tokens is too large"));
  }
  RETURN_IF_ERROR(EnsureWorkspace(rows));
  RETURN_IF_ERROR(EnsureLogits(out_rows));

  // Prefill query tiles (chunks after the decode ones): 32 queries for the fp32 kernel, 64 for
  // the tensor-core one of the bf16 mode (prefill_attention.h).
  const int64_t tile_rows = fp32() ? cuda::kPrefillTileRows : cuda::kPrefillMmaTileRows;
  // H2O with KIVI layers: the mass kernel does not decode KIVI's key groups, so the decode rows'
  // masses come from their read-back keys, as one-token prefill chunks: the decode chunks'
  // stored tokens are read with the prefixes (read entries from chunk 0, not num_decode) and get
  // mass chunks too (mass chunks from chunk 0).
  const bool mass_read_back = cache.h2o() && cache.mass_reads_back();
  const int first_read = mass_read_back ? 0 : num_decode;
  const int num_read = num_decode + num_prefix - first_read;
  const int first_mass = first_read;
  int64_t num_tiles = 0, max_read = 0, max_keys = 0;
  for (int oi = first_read; oi < num_chunks; ++oi) {
    const int64_t n = static_cast<int64_t>(chunks[order[oi]].tokens.size());
    if (oi >= num_decode) num_tiles += (n + tile_rows - 1) / tile_rows;
    if (oi < num_decode + num_prefix) max_read = std::max(max_read, kept[order[oi]] + n);
    max_keys = std::max(max_keys, kept[order[oi]] + n);
  }
  const int num_formats = cache.num_formats();

  // Pinned layout (int32): tokens[rows], positions[rows], gather[out_rows],
  // tables[chunks * max_blocks], slots[chunks], row_begin[chunks + 1], stored_before[chunks],
  // per format: encoded[num_decode], residual[num_decode]; read_lens[num_read],
  // tiles[num_tiles * 5].
  const size_t off_tokens = 0, off_pos = rows, off_gather = 2 * rows;
  const size_t off_tables = off_gather + out_rows;
  const size_t off_slots = off_tables + size_t{static_cast<size_t>(num_chunks)} * max_blocks;
  const size_t off_row_begin = off_slots + num_chunks;
  const size_t off_stored = off_row_begin + num_chunks + 1;
  const size_t off_lens = off_stored + num_chunks;
  const size_t off_read = off_lens + size_t{2} * num_formats * num_decode;
  const size_t off_tiles = off_read + num_read;
  // Eviction: plans[chunks * 6]; H2O prefill masses: mass_chunks[(chunks - first_mass) * 5].
  const size_t off_plans = off_tiles + size_t{5} * num_tiles;
  const size_t off_mass = off_plans + size_t{6} * num_chunks;
  const int num_mass = num_chunks - first_mass;
  // Sink eviction's shift (CudaKvCache::SinkShiftAfter) of the chunks with a cached prefix:
  // sink_slots[num_shifted] then sink_shift[num_shifted], decode chunks first.
  const int num_shifted = cache.sink_rope_inv_freq() != nullptr ? num_decode + num_prefix : 0;
  const size_t off_sinks = off_mass + size_t{5} * num_mass;
  const size_t total = off_sinks + size_t{2} * num_shifted;
  RETURN_IF_ERROR(EnsurePinned(total));
  int32_t* h = pinned_;
  std::vector<int64_t> first_row(num_chunks);
  int64_t row = 0;
  for (int oi = 0; oi < num_chunks; ++oi) {
    const int ci = order[oi];
    const ForwardChunk& chunk = chunks[ci];
    const int64_t n = static_cast<int64_t>(chunk.tokens.size());
    first_row[ci] = row;
    h[off_row_begin + oi] = static_cast<int32_t>(row);
    h[off_stored + oi] = static_cast<int32_t>(kept[ci]);
    std::copy_n(reinterpret_cast<const int32_t*>(&plans[ci]), 6, h + off_plans + size_t{6} * oi);
    h[off_slots + oi] = cache.Slot(chunk.seq);
    if (oi < num_shifted) {
      const cuda::SinkShift sink = cache.SinkShiftAfter(plans[ci]);
      h[off_sinks + oi] = sink.slots;
      h[off_sinks + num_shifted + oi] = sink.shift;
    }
    for (int64_t i = 0; i < n; ++i, ++row) {
      h[off_tokens + row] = chunk.tokens[i];
      h[off_pos + row] = static_cast<int32_t>(past[ci] + i);
    }
    const std::vector<int32_t>& table = *cache.BlockTable(chunk.seq);
    int32_t* dst = h + off_tables + size_t{static_cast<size_t>(oi)} * max_blocks;
    std::copy(table.begin(), table.end(), dst);
    std::fill(dst + table.size(), dst + max_blocks, 0);
  }
  h[off_row_begin + num_chunks] = static_cast<int32_t>(rows);
  int64_t out_row = 0;
  for (int ci = 0; ci < num_chunks; ++ci) {  // logits rows in the caller's chunk order
    const int64_t n = static_cast<int64_t>(chunks[ci].tokens.size());
    for (int64_t i = chunks[ci].all_logits ? 0 : n - 1; i < n; ++i) {
      h[off_gather + out_row++] = static_cast<int32_t>(first_row[ci] + i);
    }
  }
  // Decode rows after this step's append: stored = past + 1, split per layer format.
  std::vector<int> max_encoded(num_formats, 0);
  for (int f = 0; f < num_formats; ++f) {
    int32_t* encoded = h + off_lens + size_t{2} * f * num_decode;
    int32_t* residual = encoded + num_decode;
    for (int oi = 0; oi < num_decode; ++oi) {
      // Per-head windows (eviction with TurboQuant's window): each head's split is on the
      // device; the stored total plans the splits.
      const int64_t stored = kept[order[oi]] + 1;
      const kernels::cuda::KiviCounts counts =
          cache.head_windows(f) ? kernels::cuda::KiviCounts{stored, 0}
                                : kernels::cuda::SplitStoredTokens(cache.format_spec(f), stored);
      encoded[oi] = static_cast<int32_t>(counts.encoded);
      residual[oi] = static_cast<int32_t>(counts.residual);
      max_encoded[f] = std::max(max_encoded[f], encoded[oi]);
    }
    if (graph_shape) max_encoded[f] = max_blocks * cache.config().block_size;
  }
  // Prefill chunks with a prefix read their whole stored length after the append (the prefix
  // then is what CpuKvCache::PrefillAttention reads: e.g. KIVI tokens flushed by this append are
  // read quantized); tiles.
  auto* tiles = reinterpret_cast<cuda::PrefillTile*>(h + off_tiles);
  static_assert(sizeof(cuda::PrefillTile) == 5 * sizeof(int32_t));
  int64_t tile = 0;
  for (int oi = first_read; oi < num_chunks; ++oi) {
    const int ci = order[oi];
    const int64_t n = static_cast<int64_t>(chunks[ci].tokens.size());
    const bool has_prefix = oi < num_decode + num_prefix;
    if (has_prefix) h[off_read + (oi - first_read)] = static_cast<int32_t>(kept[ci] + n);
    auto* mass_chunk = reinterpret_cast<PrefillMassChunk*>(h + off_mass) + (oi - first_mass);
    *mass_chunk = {.batch_index = oi,
                   .first_row = static_cast<int32_t>(first_row[ci]),
                   .n = static_cast<int32_t>(n),
                   .cached = static_cast<int32_t>(kept[ci]),
                   .prefix_index = has_prefix ? oi - first_read : -1};
    if (oi < num_decode) continue;  // decode rows: attention by DecodeLayer, no tiles
    for (int64_t t = 0; t < n; t += tile_rows) {
      tiles[tile++] = {
          .first_row = static_cast<int32_t>(first_row[ci]),
          .tile_begin = static_cast<int32_t>(t),
          .tile_rows = static_cast<int32_t>(std::min<int64_t>(tile_rows, n - t)),
          .past = static_cast<int32_t>(kept[ci]),
          .prefix_index = has_prefix ? oi - first_read : -1};
    }
  }
  CUDA_RETURN_IF_ERROR(
      cudaMemcpyAsync(meta_, pinned_, total * sizeof(int32_t), cudaMemcpyHostToDevice, stream_));
  RETURN_IF_ERROR(EnsurePrefixScratch(int64_t{num_read} * num_kv_heads * max_read * d));

  const cuda::DeviceSeqBatch all{.num_seqs = num_chunks,
                                 .block_tables = meta_ + off_tables,
                                 .max_blocks = max_blocks,
                                 .slots = meta_ + off_slots};
  const cuda::DeviceSeqBatch decode{.num_seqs = num_decode,
                                    .block_tables = all.block_tables,
                                    .max_blocks = max_blocks,
                                    .slots = all.slots};
  const cuda::DeviceSeqBatch prefix{
      .num_seqs = num_read,
      .block_tables = all.block_tables + size_t{static_cast<size_t>(first_read)} * max_blocks,
      .max_blocks = max_blocks,
      .slots = all.slots + first_read};
  cuda::PrefillAttentionArgs prefill;
  prefill.tiles = reinterpret_cast<const cuda::PrefillTile*>(meta_ + off_tiles);
  prefill.num_tiles = static_cast<int>(num_tiles);
  prefill.shape = shape();
  prefill.q = q_;
  prefill.fresh_k = qkv_ + q_dim;
  prefill.fresh_v = qkv_ + q_dim + kv_dim;
  prefill.fresh_row_stride = qkv_dim;
  prefill.prefix_k = prefix_k_;
  prefill.prefix_v = prefix_v_;
  prefill.prefix_stride_tokens = max_read;
  if (num_shifted > 0) {  // indexed by prefix entry (first_read = num_decode: no H2O)
    prefill.sink_slots = meta_ + off_sinks + num_decode;
    prefill.sink_shift = meta_ + off_sinks + num_shifted + num_decode;
    prefill.rope_inv_freq = cache.sink_rope_inv_freq();
  }
  prefill.scale = scale;
  if (fp32()) {
    prefill.out_f32 = static_cast<float*>(attn_);
  } else {
    prefill.out_bf16 = static_cast<uint16_t*>(attn_);
  }
  const int m = static_cast<int>(rows);
  const int padded_heads = num_kv_heads * group_pad_;

  // Decode-only steps: replay this shape's graph, capture it, or run eagerly (DecodeGraphs). The
  // metadata went to meta_ above, where the graph's kernels read it.
  const DecodeGraphs::Key graph_key{.batch = num_decode, .table_width = max_blocks};
  bool capturing = false;
  if (graph_shape && graphs_ != nullptr) {
    switch (graphs_->Prepare(graph_key, BufferGeneration())) {
      case DecodeGraphs::Action::kReplay:
        CUDA_RETURN_IF_ERROR(cudaGraphLaunch(graphs_->exec(graph_key), stream_));
        *out_rows_result = out_rows;
        return absl::OkStatus();
      case DecodeGraphs::Action::kCapture:
        CUDA_RETURN_IF_ERROR(cudaStreamBeginCapture(stream_, cudaStreamCaptureModeThreadLocal));
        capturing = true;
        break;
      case DecodeGraphs::Action::kEager:
        break;
    }
  }
  // An error while capturing ends the capture (its graph dropped) before the error returns.
  absl::Cleanup abandon_capture = [&] {
    if (!capturing) return;
    capture_failed_ = true;
    cudaGraph_t graph = nullptr;
    if (cudaStreamEndCapture(stream_, &graph) == cudaSuccess && graph != nullptr) {
      cudaGraphDestroy(graph);
    }
    cudaGetLastError();
  };
  RETURN_IF_ERROR(Embed(meta_ + off_tokens, m));
  for (int layer = 0; layer < c.num_hidden_layers; ++layer) {
    const DeviceLayer& w = layers_[layer];
    RETURN_IF_ERROR(RmsNorm(w.input_norm, nullptr, m));
    RETURN_IF_ERROR(Gemm(normed_, w.qkv, qkv_, m, qkv_dim, hidden, false));
    CUDA_RETURN_IF_ERROR(cuda::LaunchQkvEpilogue(qkv_, w.qkv_bias, w.q_norm, w.k_norm, inv_freq_,
                                                 eps, meta_ + off_pos, m, shape(), q_, stream_));
    if (cache.evicting()) {
      RETURN_IF_ERROR(
          cache.EvictLayer(layer, all, reinterpret_cast<const EvictPlan*>(meta_ + off_plans)));
    }
    RETURN_IF_ERROR(cache.AppendLayer(layer, all, meta_ + off_row_begin, meta_ + off_stored, m,
                                      max_rows, qkv_ + q_dim, qkv_ + q_dim + kv_dim, qkv_dim));
    if (num_decode > 0) {
      const int f = cache.format_index(layer);
      const int32_t* encoded = meta_ + off_lens + size_t{2} * f * num_decode;
      RETURN_IF_ERROR(cache.DecodeLayer(
          layer, decode, encoded, max_encoded[f], encoded + num_decode, q_, padded_heads, scale,
          attn_f32_, num_shifted > 0 ? meta_ + off_sinks : nullptr,
          num_shifted > 0 ? meta_ + off_sinks + num_shifted : nullptr));
      if (cache.h2o() && !cache.layer_mass_reads_back(layer)) {
        RETURN_IF_ERROR(cache.DecodeMassLayer(layer, decode, encoded, max_encoded[f], q_,
                                              num_heads / num_kv_heads, group_pad_, scale));
      }
      RETURN_IF_ERROR(GatherHeads(num_decode));
    }
    if (num_read > 0) {
      RETURN_IF_ERROR(cache.ReadLayer(layer, prefix, meta_ + off_read, static_cast<int>(max_read),
                                      prefix_k_, prefix_v_, max_read));
    }
    if (fp32()) {
      CUDA_RETURN_IF_ERROR(cuda::LaunchPrefillAttention(prefill, stream_));
    } else {
      CUDA_RETURN_IF_ERROR(
          cuda::LaunchPrefillAttentionMma(prefill, cuda::kRunnerPrefillOperands, stream_));
    }
    // H2O masses of the prefill chunks, and of the decode rows where the layer's keys are read
    // back (their mass chunks come first).
    const int mass_from = cache.h2o() && cache.layer_mass_reads_back(layer) ? 0 : num_decode;
    if (cache.h2o() && num_chunks > mass_from) {
      RETURN_IF_ERROR(cache.PrefillMassLayer(
          layer, all,
          reinterpret_cast<const PrefillMassChunk*>(meta_ + off_mass) + (mass_from - first_mass),
          num_chunks - mass_from, max_rows, static_cast<int>(max_keys), q_,
          num_heads / num_kv_heads, group_pad_, qkv_ + q_dim, qkv_dim, prefix_k_, max_read, scale,
          mass_stats_));
    }
    RETURN_IF_ERROR(Gemm(attn_, w.o_proj, x_, m, hidden, q_dim, true, w.o_bias));
    RETURN_IF_ERROR(RmsNorm(w.post_attention_norm, nullptr, m));
    RETURN_IF_ERROR(Gemm(normed_, w.gate_up, gate_up_, m, 2 * inter, hidden, false));
    RETURN_IF_ERROR(SwiGlu(m));
    RETURN_IF_ERROR(Gemm(act_, w.down, x_, m, hidden, inter, true));
  }
  const int outs = static_cast<int>(out_rows);
  RETURN_IF_ERROR(RmsNorm(final_norm_, meta_ + off_gather, outs));
  RETURN_IF_ERROR(Gemm(normed_, lm_head_, logits_, outs, c.vocab_size, hidden, false));
  if (capturing) {
    capturing = false;  // nothing left for abandon_capture
    cudaGraph_t graph = nullptr;
    const cudaError_t ended = cudaStreamEndCapture(stream_, &graph);
    absl::StatusOr<cudaGraphExec_t> exec =
        ended == cudaSuccess ? graphs_->Add(graph_key, graph)
                             : CudaStatus(ended, "cudaStreamEndCapture (decode step)");
    if (!exec.ok()) {
      capture_failed_ = true;
      return exec.status();
    }
    CUDA_RETURN_IF_ERROR(cudaGraphLaunch(*exec, stream_));
  }
  *out_rows_result = out_rows;
  return absl::OkStatus();
}

// The checks that need neither a GPU nor a model.
absl::Status CheckOptions(const RunnerOptions& options, const CudaRunnerOptions& cuda_options) {
  const kernels::KvFormatSpec& format = options.kv_format;
  if (format.kind == kernels::KvFormatKind::kTurbo && format.qjl_keys) {
    return absl::UnimplementedError(
        absl::StrCat("the CUDA backend has no kernel for TurboQuant QJL keys (", format.name,
                     "): use a tq format without qjl, or --backend cpu"));
  }
  if (!(cuda_options.gpu_memory_fraction > 0 && cuda_options.gpu_memory_fraction <= 1)) {
    return absl::InvalidArgumentError(absl::StrCat("gpu_memory_fraction must be in (0, 1], got ",
                                                   cuda_options.gpu_memory_fraction));
  }
  if (cuda_options.max_sequences <= 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("max_sequences must be positive, got ", cuda_options.max_sequences));
  }
  if (options.kv_block_size <= 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("kv_block_size must be positive, got ", options.kv_block_size));
  }
  return absl::OkStatus();
}

// Checks the device and the model's shapes; makes the runner without weights or cache.
absl::StatusOr<std::unique_ptr<CudaModelRunner>> NewRunner(const LlamaConfig& config,
                                                           const RunnerOptions& options,
                                                           const CudaRunnerOptions& cuda_options) {
  RETURN_IF_ERROR(CheckOptions(options, cuda_options));
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
  if (config.head_dim != 64 && config.head_dim != 128) {
    return absl::UnimplementedError(absl::StrCat(
        "the CUDA backend's attention kernels need head_dim 64 or 128, got ", config.head_dim));
  }
  const int group = config.num_attention_heads / config.num_key_value_heads;
  if (group > 8) {
    return absl::UnimplementedError(absl::StrCat(
        "the CUDA backend's decode kernel runs GQA groups of at most 8 query heads, got ", group));
  }
  RETURN_IF_ERROR(cuda::LoadCublasLt().status());
  cudaStream_t stream = nullptr;
  CUDA_RETURN_IF_ERROR(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  return std::make_unique<CudaModelRunner>(config, stream, cuda_options);
}

absl::StatusOr<std::unique_ptr<ModelRunner>> Finish(std::unique_ptr<CudaModelRunner> runner,
                                                    const RunnerOptions& options,
                                                    const CudaRunnerOptions& cuda_options) {
  RETURN_IF_ERROR(runner->InitGemm());
  RETURN_IF_ERROR(runner->EnsureWorkspace(std::max(1, cuda_options.initial_step_tokens)));
  RETURN_IF_ERROR(runner->CreateCache(options, cuda_options));
  return std::unique_ptr<ModelRunner>(std::move(runner));
}

}  // namespace

absl::StatusOr<CudaCompute> ParseCudaCompute(const std::string& name) {
  if (name == "bf16") return CudaCompute::kBf16;
  if (name == "fp32") return CudaCompute::kFp32;
  return absl::InvalidArgumentError(
      absl::StrCat("CUDA compute mode must be bf16 or fp32, got '", name, "'"));
}

const char* CudaComputeName(CudaCompute compute) {
  return compute == CudaCompute::kFp32 ? "fp32" : "bf16";
}

absl::StatusOr<std::unique_ptr<ModelRunner>> CreateCudaModelRunner(
    const RunnerOptions& options, const CudaRunnerOptions& cuda_options) {
  RETURN_IF_ERROR(CheckOptions(options, cuda_options));  // before touching the model or a GPU
  const std::filesystem::path dir(options.model_dir);
  ASSIGN_OR_RETURN(LlamaConfig config, LoadLlamaConfig((dir / "config.json").string()));
  ASSIGN_OR_RETURN(std::unique_ptr<CudaModelRunner> runner,
                   NewRunner(config, options, cuda_options));
  {
    ASSIGN_OR_RETURN(LlamaWeights weights, LoadLlamaWeights(options.model_dir, config));
    RETURN_IF_ERROR(runner->UploadWeights(weights));
  }  // the host copy is freed here
  return Finish(std::move(runner), options, cuda_options);
}

LlamaConfig Llama3_8BConfig() {
  LlamaConfig c;
  c.model_type = "llama";
  c.vocab_size = 128256;
  c.hidden_size = 4096;
  c.intermediate_size = 14336;
  c.num_hidden_layers = 32;
  c.num_attention_heads = 32;
  c.num_key_value_heads = 8;
  c.head_dim = 128;
  c.rms_norm_eps = 1e-5;
  c.rope_theta = 500000.0;
  c.rope_scaling = {.type = "llama3",
                    .factor = 8.0,
                    .low_freq_factor = 1.0,
                    .high_freq_factor = 4.0,
                    .original_max_position_embeddings = 8192};
  c.max_position_embeddings = 131072;
  c.tie_word_embeddings = false;
  c.bos_token_id = 128000;
  c.eos_token_ids = {128001};
  c.torch_dtype = "bfloat16";
  return c;
}

absl::StatusOr<std::unique_ptr<ModelRunner>> CreateCudaModelRunnerWithRandomWeights(
    const LlamaConfig& config, const RunnerOptions& options, const CudaRunnerOptions& cuda_options,
    uint64_t seed) {
  if (config.num_hidden_layers <= 0 || config.hidden_size <= 0 || config.vocab_size <= 0 ||
      config.intermediate_size <= 0 || config.num_key_value_heads <= 0 ||
      config.num_attention_heads % config.num_key_value_heads != 0) {
    return absl::InvalidArgumentError(
        "random-weight model: layers, hidden, vocab and intermediate sizes must be positive and "
        "the kv heads must divide the query heads");
  }
  ASSIGN_OR_RETURN(std::unique_ptr<CudaModelRunner> runner,
                   NewRunner(config, options, cuda_options));
  RETURN_IF_ERROR(runner->GenerateWeights(seed));
  return Finish(std::move(runner), options, cuda_options);
}

int64_t CudaRunnerWeightBytes(const ModelRunner& runner) {
  const auto* cuda_runner = dynamic_cast<const CudaModelRunner*>(&runner);
  return cuda_runner != nullptr ? cuda_runner->weight_bytes() : 0;
}

CudaGraphStats GetCudaGraphStats(const ModelRunner& runner) {
  const auto* cuda_runner = dynamic_cast<const CudaModelRunner*>(&runner);
  return cuda_runner != nullptr ? cuda_runner->graph_stats() : CudaGraphStats{};
}

absl::Status AppendSyntheticKv(ModelRunner& runner, kernels::SeqId seq, int64_t tokens,
                               uint64_t seed) {
  auto* cuda_runner = dynamic_cast<CudaModelRunner*>(&runner);
  if (cuda_runner == nullptr) {
    return absl::InvalidArgumentError(
        absl::StrCat("AppendSyntheticKv needs a CUDA runner, got ", runner.backend_name()));
  }
  return cuda_runner->cache().AppendSynthetic(seq, tokens, seed);
}

absl::StatusOr<CudaKvCapacity> GetCudaKvCapacity(const ModelRunner& runner) {
  const auto* cuda_runner = dynamic_cast<const CudaModelRunner*>(&runner);
  if (cuda_runner == nullptr) {
    return absl::InvalidArgumentError(
        absl::StrCat("GetCudaKvCapacity needs a CUDA runner, got ", runner.backend_name()));
  }
  const CudaKvCache& cache = cuda_runner->cache();
  // A block's share of the budget: its records and, with eviction, its positions and masses.
  return CudaKvCapacity{.block_bytes = cache.geometry().block_bytes +
                                       cache.geometry().eviction_bytes_per_block,
                        .slot_bytes = cache.geometry().slot_bytes,
                        .blocks = cache.total_blocks(),
                        .max_sequences = cache.max_sequences()};
}

absl::StatusOr<std::vector<int32_t>> SampleOnGpu(std::span<const float> logits, int vocab,
                                                 std::span<const DeviceSampling> sampling) {
  if (vocab <= 0 || logits.size() != sampling.size() * static_cast<size_t>(vocab)) {
    return absl::InvalidArgumentError(absl::StrCat("SampleOnGpu: ", logits.size(), " logits for ",
                                                   sampling.size(), " rows of vocab ", vocab));
  }
  std::vector<ForwardChunk> rows(sampling.size());  // only their count and all_logits matter
  RETURN_IF_ERROR(ValidateDeviceSampling(rows, sampling));
  std::vector<int32_t> tokens(sampling.size());
  if (sampling.empty()) return tokens;
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess || count == 0) {
    cudaGetLastError();
    return absl::FailedPreconditionError("SampleOnGpu: no usable CUDA device");
  }
  cudaStream_t stream = nullptr;
  float* device_logits = nullptr;
  absl::Status status = [&]() -> absl::Status {
    CUDA_RETURN_IF_ERROR(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
    CUDA_RETURN_IF_ERROR(cudaMalloc(&device_logits, logits.size() * sizeof(float)));
    CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(device_logits, logits.data(),
                                         logits.size() * sizeof(float), cudaMemcpyHostToDevice,
                                         stream));
    DeviceSampler sampler;
    return sampler.Sample(device_logits, vocab, sampling, tokens.data(), stream);
  }();
  if (stream != nullptr) cudaStreamSynchronize(stream);
  if (device_logits != nullptr) cudaFree(device_logits);
  if (stream != nullptr) cudaStreamDestroy(stream);
  if (!status.ok()) return status;
  return tokens;
}

absl::StatusOr<GpuInfo> QueryGpu() {
  int device = 0, count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess || count == 0) {
    cudaGetLastError();
    return absl::FailedPreconditionError("no usable CUDA device");
  }
  CUDA_RETURN_IF_ERROR(cudaGetDevice(&device));
  cudaDeviceProp prop{};
  CUDA_RETURN_IF_ERROR(cudaGetDeviceProperties(&prop, device));
  size_t free_bytes = 0, total_bytes = 0;
  CUDA_RETURN_IF_ERROR(cudaMemGetInfo(&free_bytes, &total_bytes));
  return GpuInfo{.name = prop.name,
                 .free_bytes = static_cast<int64_t>(free_bytes),
                 .total_bytes = static_cast<int64_t>(total_bytes)};
}

absl::StatusOr<double> MeasureCopyBandwidth(int64_t bytes) {
  if (bytes <= 0) return absl::InvalidArgumentError("MeasureCopyBandwidth: bytes <= 0");
  void* src = nullptr;
  void* dst = nullptr;
  cudaEvent_t start = nullptr, stop = nullptr;
  auto release = [&] {
    if (src != nullptr) cudaFree(src);
    if (dst != nullptr) cudaFree(dst);
    if (start != nullptr) cudaEventDestroy(start);
    if (stop != nullptr) cudaEventDestroy(stop);
  };
  absl::Status status = [&]() -> absl::Status {
    CUDA_RETURN_IF_ERROR(cudaMalloc(&src, static_cast<size_t>(bytes)));
    CUDA_RETURN_IF_ERROR(cudaMalloc(&dst, static_cast<size_t>(bytes)));
    CUDA_RETURN_IF_ERROR(cudaMemset(src, 1, static_cast<size_t>(bytes)));
    CUDA_RETURN_IF_ERROR(cudaEventCreate(&start));
    CUDA_RETURN_IF_ERROR(cudaEventCreate(&stop));
    return absl::OkStatus();
  }();
  if (!status.ok()) {
    release();
    return status;
  }
  float best_ms = 0;
  for (int i = 0; i < 6 && status.ok(); ++i) {  // the first copy warms up
    status = [&]() -> absl::Status {
      CUDA_RETURN_IF_ERROR(cudaEventRecord(start));
      CUDA_RETURN_IF_ERROR(
          cudaMemcpy(dst, src, static_cast<size_t>(bytes), cudaMemcpyDeviceToDevice));
      CUDA_RETURN_IF_ERROR(cudaEventRecord(stop));
      CUDA_RETURN_IF_ERROR(cudaEventSynchronize(stop));
      float ms = 0;
      CUDA_RETURN_IF_ERROR(cudaEventElapsedTime(&ms, start, stop));
      if (i > 0 && (best_ms == 0 || ms < best_ms)) best_ms = ms;
      return absl::OkStatus();
    }();
  }
  release();
  if (!status.ok()) return status;
  return 2.0 * static_cast<double>(bytes) / (best_ms * 1e-3);
}

}  // namespace kvgate::worker
