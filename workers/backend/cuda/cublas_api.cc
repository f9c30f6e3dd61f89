#include "workers/backend/cuda/cublas_api.h"

#include <dlfcn.h>

#include <string>

#include "absl/strings/str_cat.h"

namespace kvgate::worker::cuda {

absl::StatusOr<const CublasApi*> LoadCublas() {
  static const absl::StatusOr<const CublasApi*> loaded = []() -> absl::StatusOr<const CublasApi*> {
    void* lib = nullptr;
    for (const char* name : {"libcublas.so.13", "libcublas.so"}) {
      lib = dlopen(name, RTLD_NOW | RTLD_LOCAL);
      if (lib != nullptr) break;
    }
    if (lib == nullptr) {
      return absl::UnavailableError(
          absl::StrCat("cannot load cuBLAS (libcublas.so.13): ", dlerror()));
    }
    auto* api = new CublasApi();
    auto bind = [&](auto* slot, const char* symbol) -> bool {
      *slot = reinterpret_cast<std::remove_pointer_t<decltype(slot)>>(dlsym(lib, symbol));
      return *slot != nullptr;
    };
    if (!bind(&api->create, "cublasCreate_v2") || !bind(&api->destroy, "cublasDestroy_v2") ||
        !bind(&api->set_stream, "cublasSetStream_v2") ||
        !bind(&api->set_math_mode, "cublasSetMathMode") || !bind(&api->gemm_ex, "cublasGemmEx")) {
      return absl::UnavailableError(
          "libcublas lacks a needed symbol (cublasCreate_v2, cublasDestroy_v2, cublasSetStream_v2, "
          "cublasSetMathMode, cublasGemmEx)");
    }
    return api;
  }();
  return loaded;
}

}  // namespace kvgate::worker::cuda
