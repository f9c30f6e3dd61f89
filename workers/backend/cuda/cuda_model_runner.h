// CUDA backend of ModelRunner (issue 5, phase 1): the same forward as the CPU runner
// (workers/backend/cpu_model_runner.h) on one NVIDIA GPU, behind the same interface, so the engine
// and the gRPC server run unchanged on it.
//
// Weights live on the GPU in bf16 (converted from the loader's float32; norms, biases and RoPE
// frequencies stay fp32/fp64). All tokens of all chunks of a Forward call (prefill chunks and
// decode tokens alike) form one [tokens, hidden] batch: one cuBLAS GEMM per projection (bf16
// inputs, fp32 accumulation and fp32 output; o_proj and down_proj accumulate into the fp32
// residual stream with beta = 1, which is the residual add), fused kernels for the embedding,
// RMSNorm (emitting the bf16 GEMM input), the q/k/v epilogue (bias, QK-norm, RoPE with the
// config's scaling, fp16 KV append) and SwiGLU, and one paged attention kernel for every row of
// the step (workers/backend/cuda/cuda_kernels.h). The final norm and lm_head run only on the rows
// whose logits are returned; logits are copied back to the host as fp32 rows: the engine samples
// on the host for now (GPU sampling is a later phase).
//
// KV: fp16 only in this phase (CudaKvCache); any other --kv format or eviction is
// UnimplementedError from CreateCudaModelRunner. The pool is options.kv_num_blocks blocks if > 0,
// else gpu_memory_fraction of the GPU memory free after the weights and the step workspace are
// allocated (RunnerOptions::kv_cache_bytes is not used by this backend). No managed memory; every
// CUDA / cuBLAS call is checked and returned as a Status. A runner is used by one thread at a time.
//
//   ASSIGN_OR_RETURN(auto runner, CreateCudaModelRunner(options, {.gpu_memory_fraction = 0.85}));
//   RETURN_IF_ERROR(runner->kv_cache().AddSequence(seq, prompt.size()));
//   RETURN_IF_ERROR(runner->Forward({&chunk, 1}, logits.data()));
#pragma once

#include <memory>

#include "absl/status/statusor.h"
#include "workers/backend/model_runner.h"

namespace kvgate::worker {

struct CudaRunnerOptions {
  // Fraction (0, 1] of the GPU memory still free after weights and workspace that the KV pool
  // takes, when RunnerOptions::kv_num_blocks is 0.
  double gpu_memory_fraction = 0.85;
  int device = 0;  // CUDA device ordinal
  // Token rows of the step workspace allocated up front (grown on demand by larger steps).
  int initial_step_tokens = 512;
};

// FailedPreconditionError when no CUDA device is usable; UnimplementedError for KV formats other
// than fp16 (and for eviction); InvalidArgumentError for a bad model folder or options;
// ResourceExhaustedError when the weights or the pool do not fit.
absl::StatusOr<std::unique_ptr<ModelRunner>> CreateCudaModelRunner(
    const RunnerOptions& options, const CudaRunnerOptions& cuda_options = {});

}  // namespace kvgate::worker
