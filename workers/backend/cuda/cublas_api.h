// cuBLAS, loaded at run time with dlopen the first time the CUDA backend needs it.
//
// Linking libcublas/libcublasLt into kvgate-worker would put their ~110 KB of static thread-local
// storage into every thread of the process, and threads created with small stacks (civetweb's, for
// the metrics port) then fail to start (pthread_create: EINVAL). A dlopen'ed library's TLS is
// allocated lazily instead, and a worker that runs on the CPU never loads cuBLAS at all.
//
//   ASSIGN_OR_RETURN(const CublasApi* blas, LoadCublas());
//   CUBLAS_RETURN_IF_ERROR(blas->create(&handle));
#pragma once

#include <cublas_v2.h>

#include "absl/status/statusor.h"

namespace kvgate::worker::cuda {

struct CublasApi {
  decltype(&cublasCreate_v2) create = nullptr;
  decltype(&cublasDestroy_v2) destroy = nullptr;
  decltype(&cublasSetStream_v2) set_stream = nullptr;
  // Math mode of a handle: CUBLAS_DEFAULT_MATH keeps fp32 GEMMs (CUBLAS_COMPUTE_32F on fp32
  // inputs) in full fp32, never TF32 tensor cores.
  decltype(&cublasSetMathMode) set_math_mode = nullptr;
  // The C entry point (cublas_api.h also declares C++ overloads of the name).
  cublasStatus_t (*gemm_ex)(cublasHandle_t, cublasOperation_t, cublasOperation_t, int, int, int,
                            const void*, const void*, cudaDataType, int, const void*, cudaDataType,
                            int, const void*, void*, cudaDataType, int, cublasComputeType_t,
                            cublasGemmAlgo_t) = nullptr;
};

// Loads libcublas.so.13 (or libcublas.so) once; UnavailableError naming what is missing.
absl::StatusOr<const CublasApi*> LoadCublas();

}  // namespace kvgate::worker::cuda
