// Shared helpers of the GPU tests (tests/gpu): the visible skip without a GPU, CUDA status
// assertions, and the owning device array of kernels/cuda/device_array.h.
//
//   TEST(Foo, Bar) {
//     SKIP_WITHOUT_GPU();  // "[  SKIPPED ] no CUDA device: ..." on a machine without one
//     DeviceArray<float> x;
//     ASSERT_CUDA(x.Upload(host));
//     ...
//     std::vector<float> back;
//     ASSERT_CUDA(x.Download(&back));
//   }
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cstddef>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "kernels/cuda/device_array.h"

namespace kvgate::gputest {

// Why the GPU tests cannot run here ("" when a CUDA device is usable). The CMake entries of the
// GPU tests treat "no CUDA device" in the output as a skip (CI compiles them and skips them).
inline std::string GpuUnavailableReason() {
  int count = 0;
  const cudaError_t e = cudaGetDeviceCount(&count);
  if (e != cudaSuccess) {
    cudaGetLastError();
    return std::string("no CUDA device: ") + cudaGetErrorString(e);
  }
  return count == 0 ? "no CUDA device" : "";
}

using kernels::cuda::DeviceArray;  // kernels/cuda/device_array.h

}  // namespace kvgate::gputest

#define SKIP_WITHOUT_GPU()                                                           \
  do {                                                                               \
    if (std::string why_ = ::kvgate::gputest::GpuUnavailableReason(); !why_.empty()) \
      GTEST_SKIP() << why_;                                                          \
  } while (0)

#define ASSERT_CUDA(expr)                                                      \
  do {                                                                         \
    const cudaError_t err_ = (expr);                                           \
    ASSERT_EQ(err_, cudaSuccess) << #expr << ": " << cudaGetErrorString(err_); \
  } while (0)
