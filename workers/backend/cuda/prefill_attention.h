// Tensor-core prefill attention of the CUDA ModelRunner's bf16 compute mode: the semantics of
// LaunchPrefillAttention (cuda_kernels.h: causal attention of each chunk's fresh queries over its
// cached prefix, read back as fp32 arrays, plus the step's fresh fp32 keys/values; GQA with
// group_pad; sinks' RoPE shift) computed FlashAttention-2 style with mma.sync m16n8k16: Q, K and V
// are rounded to 16-bit operands, the scores and the output accumulate in fp32, the online softmax
// runs in fp32 (GPU_NOTES.md, "Tensor-core prefill attention", has the design and the errors).
// The fp32 CUDA-core kernel (LaunchPrefillAttention, in prefill_attention.cu too) stays the
// reference and serves CudaCompute::kFp32.
//
//   // tiles of at most kPrefillMmaTileRows queries each (PrefillTile, cuda_kernels.h)
//   PrefillAttentionArgs args = ...;  // out_bf16 or out_f32 set
//   CUDA_RETURN_IF_ERROR(LaunchPrefillAttentionMma(args, PrefillOperands::kFp16, stream));
#pragma once

#include <cuda_runtime.h>

#include "workers/backend/cuda/cuda_kernels.h"

namespace kvgate::worker::cuda {

// Query rows per tile of LaunchPrefillAttentionMma: one block of 4 warps, 16 rows each.
inline constexpr int kPrefillMmaTileRows = 64;

// The 16-bit type Q, K, V and the probabilities are rounded to before each mma. fp16 keeps 11
// significant bits (relative rounding 2^-11), bf16 8 (2^-8) but the fp32 exponent range; fp16
// overflows (inf, then NaN in the output) on |q * scale|, |k| or |v| above 65504.
enum class PrefillOperands { kFp16, kBf16 };

// The operands the runner's bf16 mode uses (the test's measured errors: GPU_NOTES.md).
inline constexpr PrefillOperands kRunnerPrefillOperands = PrefillOperands::kFp16;

// LaunchPrefillAttention's contract (cuda_kernels.h) with tiles of up to kPrefillMmaTileRows
// queries, on the tensor cores with `operands`. D must be 64 or 128 (else cudaErrorInvalidValue).
cudaError_t LaunchPrefillAttentionMma(const PrefillAttentionArgs& args, PrefillOperands operands,
                                      cudaStream_t stream);

}  // namespace kvgate::worker::cuda
