// Shared helpers of the GPU tests (tests/gpu): the visible skip without a GPU, CUDA status
// assertions and an owning device array.
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

// Device array owning its memory (at least one element, so get() is never null once allocated).
template <class T>
class DeviceArray {
 public:
  DeviceArray() = default;
  DeviceArray(const DeviceArray&) = delete;
  DeviceArray& operator=(const DeviceArray&) = delete;
  ~DeviceArray() {
    if (p_ != nullptr) cudaFree(p_);
  }
  // n elements, uninitialised; frees what was there.
  cudaError_t Allocate(size_t n) {
    if (p_ != nullptr) cudaFree(p_);
    p_ = nullptr;
    n_ = n;
    return cudaMalloc(&p_, std::max<size_t>(n, 1) * sizeof(T));
  }
  // Copies host into the array, growing it to host.size() elements if it is smaller.
  cudaError_t Upload(const std::vector<T>& host) {
    if (host.size() > n_ || p_ == nullptr) {
      if (const cudaError_t e = Allocate(host.size()); e != cudaSuccess) return e;
    }
    return cudaMemcpy(p_, host.data(), host.size() * sizeof(T), cudaMemcpyHostToDevice);
  }
  // All size() elements into *host.
  cudaError_t Download(std::vector<T>* host) const {
    host->resize(n_);
    return cudaMemcpy(host->data(), p_, n_ * sizeof(T), cudaMemcpyDeviceToHost);
  }
  T* get() const { return p_; }
  size_t size() const { return n_; }

 private:
  T* p_ = nullptr;
  size_t n_ = 0;
};

}  // namespace kvgate::gputest

#define SKIP_WITHOUT_GPU()                                                          \
  do {                                                                              \
    if (std::string why_ = ::kvgate::gputest::GpuUnavailableReason(); !why_.empty()) \
      GTEST_SKIP() << why_;                                                         \
  } while (0)

#define ASSERT_CUDA(expr)                                                      \
  do {                                                                         \
    const cudaError_t err_ = (expr);                                           \
    ASSERT_EQ(err_, cudaSuccess) << #expr << ": " << cudaGetErrorString(err_); \
  } while (0)
