// Status helpers for kvgate_kernels_cuda's host code, which depends on Abseil only (not on
// kvgate_common's status macros).
#pragma once

#include <cuda_runtime.h>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"

namespace kvgate::kernels::cuda::internal {

// InternalError "<what>: <CUDA error string>".
inline absl::Status CudaError(cudaError_t e, const char* what) {
  return absl::InternalError(absl::StrCat(what, ": ", cudaGetErrorString(e)));
}

}  // namespace kvgate::kernels::cuda::internal

#define KVGATE_KERNELS_RETURN_IF_ERROR(expr) \
  do {                                       \
    absl::Status _st = (expr);               \
    if (!_st.ok()) return _st;               \
  } while (0)
