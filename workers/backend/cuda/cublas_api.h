// cuBLASLt, loaded at run time with dlopen the first time the CUDA backend needs it.
//
// Linking libcublas/libcublasLt into kvgate-worker would put their ~110 KB of static thread-local
// storage into every thread of the process, and threads created with small stacks (civetweb's, for
// the metrics port) then fail to start (pthread_create: EINVAL). A dlopen'ed library's TLS is
// allocated lazily instead, and a worker that runs on the CPU never loads cuBLAS at all.
//
// The runner's matrix products go through cublasLtMatmul (LtGemm below: one plan per shape, its
// heuristic chosen once, a workspace the caller allocates once), which takes a caller-owned
// workspace and so is safe to capture in a CUDA graph.
//
//   ASSIGN_OR_RETURN(const CublasLtApi* lt, LoadCublasLt());
//   CUBLAS_RETURN_IF_ERROR(lt->create(&handle));
#pragma once

#include <cublasLt.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <tuple>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace kvgate::worker::cuda {

struct CublasLtApi {
  decltype(&cublasLtCreate) create = nullptr;
  decltype(&cublasLtDestroy) destroy = nullptr;
  decltype(&cublasLtMatmulDescCreate) desc_create = nullptr;
  decltype(&cublasLtMatmulDescDestroy) desc_destroy = nullptr;
  decltype(&cublasLtMatmulDescSetAttribute) desc_set = nullptr;
  decltype(&cublasLtMatrixLayoutCreate) layout_create = nullptr;
  decltype(&cublasLtMatrixLayoutDestroy) layout_destroy = nullptr;
  decltype(&cublasLtMatmulPreferenceCreate) pref_create = nullptr;
  decltype(&cublasLtMatmulPreferenceDestroy) pref_destroy = nullptr;
  decltype(&cublasLtMatmulPreferenceSetAttribute) pref_set = nullptr;
  decltype(&cublasLtMatmulAlgoGetHeuristic) heuristic = nullptr;
  decltype(&cublasLtMatmul) matmul = nullptr;
};

// Loads libcublasLt.so.13 (or libcublasLt.so) once; UnavailableError naming what is missing.
absl::StatusOr<const CublasLtApi*> LoadCublasLt();

// Row-major products y[m, n] (+)= x[m, k] w[n, k]^T (+ bias[n]) through cublasLtMatmul: x and w
// bf16 or fp32 (the same type), y and bias fp32, fp32 accumulation (CUBLAS_COMPUTE_32F: fp32
// inputs stay full fp32, never TF32). One plan per (m, n, k, accumulate, bias): descriptors,
// layouts and the heuristic's first algorithm, made on the shape's first call and reused, so a
// shape always runs the same algorithm (a step gives the same bits however often it runs, eagerly
// or replayed from a CUDA graph). `accumulate` adds into y (beta = 1, C = D = y: the residual add
// of o_proj and down_proj); `bias` is added in the epilogue. Not thread-safe: one per stream.
//
//   ASSIGN_OR_RETURN(auto gemm, LtGemm::Create(CUDA_R_16BF, workspace, workspace_bytes));
//   RETURN_IF_ERROR(gemm->Run(x, w, y, m, n, k, /*accumulate=*/true, /*bias=*/nullptr, stream));
class LtGemm {
 public:
  // `input_type`: CUDA_R_16BF or CUDA_R_32F. `workspace` (device, not owned) lives as long as this.
  static absl::StatusOr<std::unique_ptr<LtGemm>> Create(cudaDataType input_type, void* workspace,
                                                        size_t workspace_bytes);
  ~LtGemm();
  LtGemm(const LtGemm&) = delete;
  LtGemm& operator=(const LtGemm&) = delete;

  // Enqueues the product on `stream`. InternalError naming the shape when cuBLASLt offers no
  // algorithm or the call fails.
  absl::Status Run(const void* x, const void* w, float* y, int m, int n, int k, bool accumulate,
                   const float* bias, cudaStream_t stream);
  // Plans made so far (one per distinct shape).
  size_t plans() const { return plans_.size(); }

 private:
  struct Plan {
    cublasLtMatmulDesc_t desc = nullptr;
    cublasLtMatrixLayout_t w = nullptr, x = nullptr, y = nullptr;
    cublasLtMatmulAlgo_t algo{};
  };
  using Key = std::tuple<int, int, int, bool, bool>;  // m, n, k, accumulate, bias
  LtGemm(const CublasLtApi* api, cublasLtHandle_t handle, cudaDataType input_type, void* workspace,
         size_t workspace_bytes)
      : api_(api),
        handle_(handle),
        input_type_(input_type),
        workspace_(workspace),
        workspace_bytes_(workspace_bytes) {}
  absl::StatusOr<Plan*> PlanFor(int m, int n, int k, bool accumulate, bool bias);
  void Destroy(Plan& plan);

  const CublasLtApi* api_;
  cublasLtHandle_t handle_;
  const cudaDataType input_type_;
  void* workspace_;
  const size_t workspace_bytes_;
  std::map<Key, Plan> plans_;
};

}  // namespace kvgate::worker::cuda
