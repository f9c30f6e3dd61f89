// ModelRunner: the backend interface of the worker engine. A runner owns a model's weights and its
// paged KV cache on one device (CPU or CUDA) and runs batched forward steps; the engine above it
// decides what to run (scheduling, admission, sampling) and never touches device memory.
//
//   ASSIGN_OR_RETURN(auto runner, CreateCpuModelRunner(opts));
//   RETURN_IF_ERROR(runner->kv_cache().AddSequence(seq, prompt.size()));
//   ForwardChunk chunk{.seq = seq, .tokens = prompt};
//   std::vector<float> logits(runner->config().vocab_size);
//   RETURN_IF_ERROR(runner->Forward({&chunk, 1}, logits.data()));
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "kvgate/kernels/kv_cache.h"
#include "workers/model/llama_config.h"

namespace kvgate::worker {

// A run of consecutive tokens of one sequence for one forward step: a whole prompt, a prefill
// chunk, or a single decode token. The tokens go at positions cache.Length(seq) ... onwards.
struct ForwardChunk {
  kernels::SeqId seq = 0;
  std::span<const int32_t> tokens;
  // If true, logits for every token of the chunk are written (evaluation); else only the last.
  bool all_logits = false;
};

// How ForwardSample picks one chunk's next token on the device: the host Sampler's algorithm
// (workers/engine/sampler.h, SampleWithUniform) with its random draw made on the host, so that a
// request's tokens stay reproducible from its seed whichever side samples.
struct DeviceSampling {
  float temperature = 0.0f;  // <= 0: greedy (argmax, the lowest id on ties)
  int top_k = 0;             // 0: off
  float top_p = 1.0f;        // outside (0, 1): off
  double uniform = 0.0;      // [0, 1): the request generator's draw (unused when greedy)
};

struct RunnerOptions {
  std::string model_dir;      // Hugging Face folder: config.json, *.safetensors, tokenizer.json
  kernels::KvFormatSpec kv_format;
  int kv_block_size = 16;
  // KV pool size: explicit block count if > 0, else from kv_cache_bytes.
  int64_t kv_num_blocks = 0;
  int64_t kv_cache_bytes = int64_t{1} << 30;
  int num_threads = 0;  // 0: hardware concurrency
};

class ModelRunner {
 public:
  virtual ~ModelRunner() = default;
  virtual const LlamaConfig& config() const = 0;
  virtual kernels::KvCache& kv_cache() = 0;
  virtual std::string backend_name() const = 0;  // "cpu" or "cuda"

  // Runs one forward step over `chunks` (each sequence at most once; its blocks must already be
  // reserved for the new tokens). Appends their K/V to the cache. Writes logits rows in chunk order:
  // one row [vocab_size] per chunk, or one per token for chunks with all_logits.
  // InvalidArgumentError for a token id outside the vocabulary or an unknown sequence.
  virtual absl::Status Forward(std::span<const ForwardChunk> chunks, float* logits) = 0;

  // Whether ForwardSample is implemented (the engine then samples on the device).
  virtual bool supports_device_sampling() const { return false; }
  // Forward, then one token per chunk picked on the device from the chunk's last logits row with
  // sampling[c]; only the token ids come back: tokens[c], chunks.size() of them. Chunks must not
  // ask for all_logits. InvalidArgumentError for that, for a sampling span of another size and
  // for parameters outside DeviceSampling's ranges; UnimplementedError where not supported.
  virtual absl::Status ForwardSample(std::span<const ForwardChunk> chunks,
                                     std::span<const DeviceSampling> sampling, int32_t* tokens);
};

// The checks of ForwardSample's arguments that every implementation makes (see above).
absl::Status ValidateDeviceSampling(std::span<const ForwardChunk> chunks,
                                    std::span<const DeviceSampling> sampling);

absl::StatusOr<std::unique_ptr<ModelRunner>> CreateCpuModelRunner(const RunnerOptions& options);

using KvCacheFactory =
    std::function<absl::StatusOr<std::unique_ptr<kernels::KvCache>>(const kernels::KvCacheConfig&)>;

// Makes the KV pool of a host-side cache for `config`: options.kv_num_blocks blocks if > 0, else
// options.kv_cache_bytes / (bytes_per_token * kv_block_size), with bytes_per_token read off a
// one-block cache of the same shape made by `make_cache` (exact for every format and layer mix).
// InvalidArgumentError for a non-positive block size or a pool smaller than one block.
absl::StatusOr<std::unique_ptr<kernels::KvCache>> CreateSizedKvCache(const LlamaConfig& config,
                                                                     const RunnerOptions& options,
                                                                     const KvCacheFactory& make_cache);

// The checks every backend's Forward makes before touching its cache: each chunk non-empty, each
// sequence known to `cache` and present once, positions within max_position_embeddings, token ids
// within the vocabulary. InvalidArgumentError naming the chunk, sequence or token otherwise.
absl::Status ValidateForwardChunks(std::span<const ForwardChunk> chunks, const LlamaConfig& config,
                                   const kernels::KvCache& cache);

}  // namespace kvgate::worker
