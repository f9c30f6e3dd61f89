// CUDA backend of ModelRunner: the same forward as the CPU runner
// (workers/backend/cpu_model_runner.h) on one NVIDIA GPU, behind the same interface, so the engine
// and the gRPC server run unchanged on it, with the KV cache in any format the CPU reference stores
// (CudaKvCache, cuda_kv_cache.h).
//
// Compute modes (CudaRunnerOptions::compute). bf16 (the default): weights live on the GPU in bf16
// (converted from the loader's float32, or generated on the GPU by
// CreateCudaModelRunnerWithRandomWeights) and every GEMM input is bf16: the activations entering a
// GEMM are rounded to bf16 (about 3e-3 relative logit error against fp32 transformers on the
// reference model). fp32: weights in fp32 (bf16 checkpoints hold the same values), fp32 GEMM inputs
// and fp32 GEMMs without TF32 (the CPU runner's arithmetic: whole-prompt logits within ~1e-6 of it,
// the same keys and values to ~1e-6, so a quantized cache stores the same codes but at boundary
// ties; decode rows then differ by the decode kernel's fp16 operands, ~1e-4 on average:
// docs/BENCHMARKS.md); twice the weight memory and bandwidth. Norms, biases and RoPE frequencies
// are fp32/fp64 in both. All tokens of all chunks of a Forward call form one
// [tokens, hidden] batch, decode tokens first: one cuBLASLt matmul per projection (fp32
// accumulation and output, the algorithm chosen once per shape; o_proj and down_proj accumulate
// into the fp32 residual stream in place with beta = 1, o_proj's bias added in the epilogue), fused
// kernels for the embedding, RMSNorm (emitting the GEMM input), the q/k/v epilogue (bias, QK-norm,
// RoPE) and SwiGLU (cuda_kernels.h). Per layer, the step's fp32 keys and values are appended to the
// cache in one call for all sequences (CudaKvAppend); the decode tokens run one CudaDecodeAttention
// call over every decode sequence (every stored token read through the format); prefill chunks
// attend to their cached prefix, read out of the pool through the format (CudaKvAppend::Read) into
// an fp32 scratch, and to the step's own tokens (CpuKvCache::PrefillAttention's semantics; on the
// tensor cores with fp16 operands in bf16 mode, prefill_attention.h; fp32 in fp32 mode).
// The final norm and lm_head run only on the rows whose logits are returned. Forward copies the
// logits back to the host as fp32 rows; ForwardSample (supports_device_sampling() unless
// CudaRunnerOptions::device_sampling is off) samples on the GPU (LaunchSampleTokens,
// cuda_kernels.h) and copies back only the token ids. Its sort workspace (sampled rows x vocab x
// 24 bytes, allocated on first need and grown on demand) comes out of the memory the KV pool
// leaves free (1 - gpu_memory_fraction).
//
// CUDA graphs (CudaRunnerOptions::cuda_graphs): a step whose chunks are all decode tokens, on a
// cache without eviction, launches shapes that depend only on the batch size and the block-table
// width rounded up to 1/8 of its power of two (the split-KV attention is planned for that width;
// shorter sequences leave their last splits empty), with every per-step value (tokens,
// positions, block tables, lengths) in one device metadata buffer at a fixed address. Each such
// shape is captured into a CUDA graph on its second step (the first runs eagerly and grows the
// workspaces: nothing allocates during a capture) and replayed afterwards: one launch instead of
// ~13 per layer. Graphs are dropped when a buffer they use is reallocated, and at most 128 are
// kept (least recently used first out). Prefill and mixed steps, and caches that evict, launch
// eagerly. The decode shapes are the same with graphs off, so a replay gives the bits an eager
// launch gives. Sampling (ForwardSample) runs eagerly after the graph.
//
// Memory: the KV pool is options.kv_num_blocks blocks if > 0, else gpu_memory_fraction of the GPU
// memory free after the weights and the step workspace, less max_sequences x the per-sequence
// state outside the pool (the fp16 residual windows of KIVI and TurboQuant, FP8 scales).
// RunnerOptions::kv_cache_bytes is not used by this backend. The prefix scratch of prefill chunks ([chunks with a prefix,
// kv_heads, longest stored length, head_dim] fp32, keys and values) grows on demand. No managed
// memory; every CUDA / cuBLASLt call is checked and returned as a Status. A runner is used by one
// thread at a time; sequences must be fed through Forward only (not the cache's host methods).
//
//   ASSIGN_OR_RETURN(auto runner, CreateCudaModelRunner(options, {.gpu_memory_fraction = 0.85}));
//   RETURN_IF_ERROR(runner->kv_cache().AddSequence(seq, prompt.size()));
//   RETURN_IF_ERROR(runner->Forward({&chunk, 1}, logits.data()));
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "workers/backend/model_runner.h"
#include "workers/model/llama_config.h"

namespace kvgate::worker {

enum class CudaCompute { kBf16, kFp32 };

// "bf16" | "fp32"; InvalidArgumentError otherwise.
absl::StatusOr<CudaCompute> ParseCudaCompute(const std::string& name);
const char* CudaComputeName(CudaCompute compute);

struct CudaRunnerOptions {
  // Fraction (0, 1] of the GPU memory still free after weights and workspace that the KV pool and
  // the per-sequence state take, when RunnerOptions::kv_num_blocks is 0.
  double gpu_memory_fraction = 0.85;
  int device = 0;  // CUDA device ordinal
  // Token rows of the step workspace allocated up front (grown on demand by larger steps).
  int initial_step_tokens = 512;
  // Sequences the cache can hold at once (per-sequence device state is allocated for each); the
  // worker passes its --max_running. AddSequence beyond it is ResourceExhaustedError.
  int max_sequences = 256;
  // GEMM inputs and weights in bf16 (fast) or fp32 (parity with the CPU runner); see above.
  CudaCompute compute = CudaCompute::kBf16;
  // Whether ForwardSample is offered (the engine then samples on the GPU).
  bool device_sampling = true;
  // Whether decode-only steps replay CUDA graphs (see above); off: every step launches eagerly,
  // with the same results.
  bool cuda_graphs = true;
};

// FailedPreconditionError when no CUDA device is usable; UnimplementedError for eviction with
// formats other than fp16/bf16/fp8/int8 and for
// shapes without kernels (head_dim other than 64/128, GQA group above 8, block size not a multiple
// of 16, TurboQuant QJL keys); InvalidArgumentError for a bad model folder or options;
// ResourceExhaustedError when the weights or the pool do not fit.
absl::StatusOr<std::unique_ptr<ModelRunner>> CreateCudaModelRunner(
    const RunnerOptions& options, const CudaRunnerOptions& cuda_options = {});

// Llama-3.1-8B's shapes: 32 layers, hidden 4096, 32 query / 8 kv heads of 128, intermediate 14336,
// vocab 128256, untied lm_head, RoPE theta 500000 with Llama-3 scaling (factor 8, original 8192),
// 131072 positions.
LlamaConfig Llama3_8BConfig();

// A runner for `config` whose bf16 weights are generated on the GPU from `seed` (a counter-based
// hash: no host copy, no download): every matrix uniform with variance 1 / fan_in (so each
// projection keeps unit-scale activations and the residual stream stays finite through many
// layers), the embedding with unit variance, norms 1, biases 0. options.model_dir is ignored.
// Errors as CreateCudaModelRunner.
absl::StatusOr<std::unique_ptr<ModelRunner>> CreateCudaModelRunnerWithRandomWeights(
    const LlamaConfig& config, const RunnerOptions& options,
    const CudaRunnerOptions& cuda_options = {}, uint64_t seed = 1);

// Bytes of the runner's weights on the GPU (a CUDA runner; 0 for any other).
int64_t CudaRunnerWeightBytes(const ModelRunner& runner);

// The CUDA graphs of a runner's decode steps (all 0 for a runner that is not a CUDA one or has
// graphs off).
struct CudaGraphStats {
  int graphs = 0;         // held now
  int64_t captures = 0;   // captured so far
  int64_t replays = 0;    // steps launched from a graph (the capturing step included)
};
CudaGraphStats GetCudaGraphStats(const ModelRunner& runner);

// Appends `tokens` tokens of synthetic keys and values (a fixed pattern from `seed`, unit
// variance) to every layer of `seq` in a CUDA runner's cache, through the format's append as a
// forward would, without running the model: for benchmarks that need long contexts. The sequence
// must have room reserved. InvalidArgumentError for a runner that is not a CUDA one.
absl::Status AppendSyntheticKv(ModelRunner& runner, kernels::SeqId seq, int64_t tokens,
                               uint64_t seed);

// The KV pool of a CUDA runner: bytes per block, bytes of per-sequence state outside the pool
// (fp16 residual windows, FP8 scales) per slot, blocks and slots. InvalidArgumentError for a
// runner that is not a CUDA one.
struct CudaKvCapacity {
  int64_t block_bytes = 0;  // with eviction, plus the block's positions and masses
  int64_t slot_bytes = 0;
  int64_t blocks = 0;
  int max_sequences = 0;
};
absl::StatusOr<CudaKvCapacity> GetCudaKvCapacity(const ModelRunner& runner);

// Samples one token per row of host `logits` ([sampling.size(), vocab]) on the current GPU with the
// code ForwardSample runs: for tests and benchmarks of device sampling apart from a model.
// InvalidArgumentError for bad sizes or parameters (ValidateDeviceSampling's ranges).
absl::StatusOr<std::vector<int32_t>> SampleOnGpu(std::span<const float> logits, int vocab,
                                                 std::span<const DeviceSampling> sampling);

// The current device: its name and cudaMemGetInfo. FailedPreconditionError without a device.
struct GpuInfo {
  std::string name;
  int64_t free_bytes = 0;
  int64_t total_bytes = 0;
};
absl::StatusOr<GpuInfo> QueryGpu();

// Device-to-device copy bandwidth of the current device in bytes/s (bytes read + bytes written
// per second, the best of several cudaMemcpy calls of `bytes`): the roofline's memory ceiling.
absl::StatusOr<double> MeasureCopyBandwidth(int64_t bytes = int64_t{1} << 30);

}  // namespace kvgate::worker
