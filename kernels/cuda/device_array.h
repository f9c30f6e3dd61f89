// An owning device array for host code that stages data on the GPU: the CUDA KV cache's
// host-pointer methods (workers/backend/cuda/cuda_kv_cache.cc) and the GPU tests
// (tests/gpu/gpu_test_util.h). Errors are returned as cudaError_t, never thrown or aborted on.
//
//   kernels::cuda::DeviceArray<float> x;
//   CUDA_RETURN_IF_ERROR(x.Upload(host.data(), host.size(), stream));   // enqueued on stream
//   Kernel<<<grid, block, 0, stream>>>(x.get());
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cstddef>
#include <vector>

namespace kvgate::kernels::cuda {

template <class T>
class DeviceArray {
 public:
  DeviceArray() = default;
  DeviceArray(const DeviceArray&) = delete;
  DeviceArray& operator=(const DeviceArray&) = delete;
  ~DeviceArray() {
    if (p_ != nullptr) cudaFree(p_);
  }
  // n elements (at least one is allocated, so get() is never null afterwards), uninitialised;
  // frees what was there.
  cudaError_t Allocate(size_t n) {
    if (p_ != nullptr) cudaFree(p_);
    p_ = nullptr;
    n_ = n;
    return cudaMalloc(&p_, std::max<size_t>(n, 1) * sizeof(T));
  }
  // Copies n host elements in, enqueued on stream (the source must stay valid until the copy
  // runs; pageable memory is staged before the call returns), growing the array if it is
  // smaller.
  cudaError_t Upload(const T* host, size_t n, cudaStream_t stream) {
    if (n > n_ || p_ == nullptr) {
      if (const cudaError_t e = Allocate(n); e != cudaSuccess) return e;
    }
    if (n == 0) return cudaSuccess;
    return cudaMemcpyAsync(p_, host, n * sizeof(T), cudaMemcpyHostToDevice, stream);
  }
  // The same, synchronous: the copy is complete when it returns.
  cudaError_t Upload(const std::vector<T>& host) {
    if (host.size() > n_ || p_ == nullptr) {
      if (const cudaError_t e = Allocate(host.size()); e != cudaSuccess) return e;
    }
    return cudaMemcpy(p_, host.data(), host.size() * sizeof(T), cudaMemcpyHostToDevice);
  }
  // All size() elements into *host (synchronous).
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

}  // namespace kvgate::kernels::cuda
