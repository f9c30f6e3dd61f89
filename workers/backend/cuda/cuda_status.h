// CUDA and cuBLAS error checks as absl::Status for the CUDA runner: every CUDA call is checked and
// an error becomes InternalError naming the call and CUDA's message (never an abort).
//
//   CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, stream));
//   CUBLAS_RETURN_IF_ERROR(lt->matmul(...));
#pragma once

#include <cublas_v2.h>
#include <cuda_runtime.h>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"

namespace kvgate::worker::cuda {

inline absl::Status CudaStatus(cudaError_t error, const char* what) {
  if (error == cudaSuccess) return absl::OkStatus();
  if (error == cudaErrorMemoryAllocation) {
    return absl::ResourceExhaustedError(
        absl::StrCat(what, ": ", cudaGetErrorName(error), ": ", cudaGetErrorString(error)));
  }
  return absl::InternalError(
      absl::StrCat(what, ": ", cudaGetErrorName(error), ": ", cudaGetErrorString(error)));
}

inline absl::Status CublasStatus(cublasStatus_t status, const char* what) {
  if (status == CUBLAS_STATUS_SUCCESS) return absl::OkStatus();
  return absl::InternalError(absl::StrCat(what, ": cuBLAS status ", static_cast<int>(status)));
}

}  // namespace kvgate::worker::cuda

#define CUDA_RETURN_IF_ERROR(expr)                                                           \
  do {                                                                                       \
    if (absl::Status kvgate_cuda_status = ::kvgate::worker::cuda::CudaStatus((expr), #expr); \
        !kvgate_cuda_status.ok())                                                            \
      return kvgate_cuda_status;                                                             \
  } while (0)

#define CUBLAS_RETURN_IF_ERROR(expr)                                                             \
  do {                                                                                           \
    if (absl::Status kvgate_cublas_status = ::kvgate::worker::cuda::CublasStatus((expr), #expr); \
        !kvgate_cublas_status.ok())                                                              \
      return kvgate_cublas_status;                                                               \
  } while (0)
