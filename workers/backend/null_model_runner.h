// Null backend of ModelRunner: a BENCHMARK AND TEST TOOL, never the default backend. It does no
// model math, so that what remains of a request's latency is the serving path around the model:
// gRPC, tokenization, the engine's scheduling and block accounting, streaming, and (through the
// gateway) scoring, routing and forwarding. tools/bench/gateway_bench.cc uses it to measure the
// gateway's added latency on long prompts without the CPU forward dominating.
//
//   kvgate-worker --backend null --model build/models/tiny --max_context 65536 --port 0
//
//   NullRunnerOptions opts{.runner = ropts, .max_position_embeddings = 65536};
//   ASSIGN_OR_RETURN(auto runner, CreateNullModelRunner(opts));
//
// What it keeps from a real runner:
//   - the model folder's config.json (vocabulary size, EOS, layer shapes for the cache); the
//     context limit (max_position_embeddings) may be raised, e.g. to 65536 for a tiny model;
//   - a real kernels::KvCache (the CPU reference cache, in options.kv_format, sized as the CPU
//     runner sizes it) for admission: AddSequence / Reserve / FreeSequence, free_blocks() are real;
//   - Forward's validation: empty chunk, repeated or unknown sequence, positions beyond the
//     context, token ids outside the vocabulary (InvalidArgumentError), tokens beyond the blocks
//     reserved for the sequence (FailedPreconditionError, as an Append past the reservation is).
// What it skips: the weights (never loaded) and Append (no K/V is stored). The cache it exposes
// counts the tokens run through Forward per sequence, so Length() behaves as after real Appends.
//
// Logits: each row is 0 except a 1 at (last_token * 31 + 7) % vocab_size, where last_token is the
// row's input token: greedy decoding is deterministic and varies with the prompt.
#pragma once

#include <cstdint>
#include <memory>

#include "absl/status/statusor.h"
#include "workers/backend/model_runner.h"

namespace kvgate::worker {

struct NullRunnerOptions {
  // model_dir (its config.json), kv_format, kv_block_size, kv_num_blocks / kv_cache_bytes are used
  // as by the CPU runner; num_threads is ignored.
  RunnerOptions runner;
  // If > 0, replaces config.json's max_position_embeddings (the engine's context limit).
  int64_t max_position_embeddings = 0;
};

// The token the null runner's logits make most likely after `last_token`.
int32_t NullRunnerNextToken(int32_t last_token, int vocab_size);

// InvalidArgumentError for a bad model folder, config.json or options.
absl::StatusOr<std::unique_ptr<ModelRunner>> CreateNullModelRunner(
    const NullRunnerOptions& options);

}  // namespace kvgate::worker
