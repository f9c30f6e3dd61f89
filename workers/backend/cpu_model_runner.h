// CPU backend of ModelRunner: float32 weights in host memory, OpenBLAS GEMMs over all tokens of a
// step at once, attention through a kernels::KvCache (the CPU reference cache by default).
//
// CreateCpuModelRunner (declared in model_runner.h) builds it with kernels::CreateCpuKvCache. This
// header adds a variant that takes the cache factory, so that tests and tools can run the same
// forward over another KvCache implementation (e.g. an exact float32 cache).
//
// Forward step: all tokens of all chunks form one [tokens, hidden] matrix for every projection
// (one sgemm each for qkv, o_proj, gate+up, down); per layer, each chunk appends its post-RoPE K/V
// and runs PrefillAttention (several tokens, or the first token of a sequence) or DecodeAttention
// (one token after a cached prefix); distinct sequences run on a small thread pool
// (RunnerOptions::num_threads, also given to OpenBLAS). lm_head runs only on the rows whose logits
// are returned. Matches the Hugging Face forward to < 1e-4 relative error while attention reads
// float32 K/V (tests/unit/workers/model_forward_test.cc).
//
// Everything in a step is validated before the cache is touched (unknown or repeated sequence,
// empty chunk, token id outside the vocabulary, positions past max_position_embeddings). An error
// from the cache itself (e.g. an Append beyond the reserved blocks) can leave the step's sequences
// partly appended: free them. A runner is used by one thread at a time.
//
//   ASSIGN_OR_RETURN(auto runner, CreateCpuModelRunnerWithCache(opts, [](const auto& cfg) {
//     return MyCache::Create(cfg);
//   }));
#pragma once

#include <functional>
#include <memory>

#include "absl/status/statusor.h"
#include "kvgate/kernels/kv_cache.h"
#include "workers/backend/model_runner.h"

namespace kvgate::worker {

// Loads config.json and the safetensors of options.model_dir, then sizes the KV pool:
// options.kv_num_blocks if > 0, else options.kv_cache_bytes / (bytes_per_token * kv_block_size),
// where bytes_per_token comes from a one-block cache made by `make_cache` for the same config.
// InvalidArgumentError for a bad model folder or options (e.g. a pool smaller than one block).
absl::StatusOr<std::unique_ptr<ModelRunner>> CreateCpuModelRunnerWithCache(
    const RunnerOptions& options, KvCacheFactory make_cache);

}  // namespace kvgate::worker
