#include "workers/backend/cuda/cublas_api.h"

#include <dlfcn.h>

#include <string>
#include <type_traits>

#include "absl/strings/str_cat.h"
#include "kvgate/common/status_macros.h"
#include "workers/backend/cuda/cuda_status.h"

namespace kvgate::worker::cuda {

absl::StatusOr<const CublasLtApi*> LoadCublasLt() {
  static const absl::StatusOr<const CublasLtApi*> loaded =
      []() -> absl::StatusOr<const CublasLtApi*> {
    void* lib = nullptr;
    for (const char* name : {"libcublasLt.so.13", "libcublasLt.so"}) {
      lib = dlopen(name, RTLD_NOW | RTLD_LOCAL);
      if (lib != nullptr) break;
    }
    if (lib == nullptr) {
      return absl::UnavailableError(
          absl::StrCat("cannot load cuBLASLt (libcublasLt.so.13): ", dlerror()));
    }
    auto* api = new CublasLtApi();
    std::string missing;
    auto bind = [&](auto* slot, const char* symbol) {
      *slot = reinterpret_cast<std::remove_pointer_t<decltype(slot)>>(dlsym(lib, symbol));
      if (*slot == nullptr) absl::StrAppend(&missing, missing.empty() ? "" : ", ", symbol);
    };
    bind(&api->create, "cublasLtCreate");
    bind(&api->destroy, "cublasLtDestroy");
    bind(&api->desc_create, "cublasLtMatmulDescCreate");
    bind(&api->desc_destroy, "cublasLtMatmulDescDestroy");
    bind(&api->desc_set, "cublasLtMatmulDescSetAttribute");
    bind(&api->layout_create, "cublasLtMatrixLayoutCreate");
    bind(&api->layout_destroy, "cublasLtMatrixLayoutDestroy");
    bind(&api->pref_create, "cublasLtMatmulPreferenceCreate");
    bind(&api->pref_destroy, "cublasLtMatmulPreferenceDestroy");
    bind(&api->pref_set, "cublasLtMatmulPreferenceSetAttribute");
    bind(&api->heuristic, "cublasLtMatmulAlgoGetHeuristic");
    bind(&api->matmul, "cublasLtMatmul");
    if (!missing.empty()) {
      delete api;
      return absl::UnavailableError(absl::StrCat("libcublasLt lacks ", missing));
    }
    return api;
  }();
  return loaded;
}

absl::StatusOr<std::unique_ptr<LtGemm>> LtGemm::Create(cudaDataType input_type, void* workspace,
                                                       size_t workspace_bytes) {
  if (input_type != CUDA_R_16BF && input_type != CUDA_R_32F) {
    return absl::InvalidArgumentError("LtGemm: inputs must be bf16 or fp32");
  }
  ASSIGN_OR_RETURN(const CublasLtApi* api, LoadCublasLt());
  cublasLtHandle_t handle = nullptr;
  CUBLAS_RETURN_IF_ERROR(api->create(&handle));
  return std::unique_ptr<LtGemm>(new LtGemm(api, handle, input_type, workspace, workspace_bytes));
}

LtGemm::~LtGemm() {
  for (auto& [key, plan] : plans_) Destroy(plan);
  api_->destroy(handle_);
}

void LtGemm::Destroy(Plan& plan) {
  if (plan.desc != nullptr) api_->desc_destroy(plan.desc);
  for (cublasLtMatrixLayout_t layout : {plan.w, plan.x, plan.y}) {
    if (layout != nullptr) api_->layout_destroy(layout);
  }
  plan = Plan{};
}

absl::StatusOr<LtGemm::Plan*> LtGemm::PlanFor(int m, int n, int k, bool accumulate, bool bias) {
  const Key key{m, n, k, accumulate, bias};
  if (auto it = plans_.find(key); it != plans_.end()) return &it->second;
  // Row-major y[m, n] = x[m, k] w[n, k]^T is column-major y^T[n, m] = w^T x^T: A = w (stored
  // column-major [k, n], transposed), B = x (column-major [k, m]), C = D = y (column-major [n, m]).
  Plan plan;
  auto made = [&]() -> absl::Status {
    CUBLAS_RETURN_IF_ERROR(api_->desc_create(&plan.desc, CUBLAS_COMPUTE_32F, CUDA_R_32F));
    const cublasOperation_t transpose = CUBLAS_OP_T;
    CUBLAS_RETURN_IF_ERROR(api_->desc_set(plan.desc, CUBLASLT_MATMUL_DESC_TRANSA, &transpose,
                                          sizeof(transpose)));
    if (bias) {
      const cublasLtEpilogue_t epilogue = CUBLASLT_EPILOGUE_BIAS;
      CUBLAS_RETURN_IF_ERROR(api_->desc_set(plan.desc, CUBLASLT_MATMUL_DESC_EPILOGUE, &epilogue,
                                            sizeof(epilogue)));
      const int32_t bias_type = CUDA_R_32F;
      CUBLAS_RETURN_IF_ERROR(api_->desc_set(plan.desc, CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE,
                                            &bias_type, sizeof(bias_type)));
    }
    CUBLAS_RETURN_IF_ERROR(api_->layout_create(&plan.w, input_type_, k, n, k));
    CUBLAS_RETURN_IF_ERROR(api_->layout_create(&plan.x, input_type_, k, m, k));
    CUBLAS_RETURN_IF_ERROR(api_->layout_create(&plan.y, CUDA_R_32F, n, m, n));
    cublasLtMatmulPreference_t preference = nullptr;
    CUBLAS_RETURN_IF_ERROR(api_->pref_create(&preference));
    cublasLtMatmulHeuristicResult_t result{};
    int found = 0;
    cublasStatus_t status = api_->pref_set(preference, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                                           &workspace_bytes_, sizeof(workspace_bytes_));
    if (status == CUBLAS_STATUS_SUCCESS) {
      status = api_->heuristic(handle_, plan.desc, plan.w, plan.x, plan.y, plan.y, preference, 1,
                               &result, &found);
    }
    api_->pref_destroy(preference);
    CUBLAS_RETURN_IF_ERROR(status);
    if (found == 0 || result.state != CUBLAS_STATUS_SUCCESS) {
      return absl::InternalError(absl::StrCat("cuBLASLt offers no algorithm for ", m, "x", n, "x",
                                              k, input_type_ == CUDA_R_32F ? " fp32" : " bf16",
                                              accumulate ? " accumulating" : "",
                                              bias ? " with bias" : ""));
    }
    plan.algo = result.algo;
    return absl::OkStatus();
  }();
  if (!made.ok()) {
    Destroy(plan);
    return made;
  }
  return &plans_.emplace(key, plan).first->second;
}

absl::Status LtGemm::Run(const void* x, const void* w, float* y, int m, int n, int k,
                         bool accumulate, const float* bias, cudaStream_t stream) {
  ASSIGN_OR_RETURN(Plan * plan, PlanFor(m, n, k, accumulate, bias != nullptr));
  if (bias != nullptr) {
    CUBLAS_RETURN_IF_ERROR(
        api_->desc_set(plan->desc, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &bias, sizeof(bias)));
  }
  const float alpha = 1.0f, beta = accumulate ? 1.0f : 0.0f;
  CUBLAS_RETURN_IF_ERROR(api_->matmul(handle_, plan->desc, &alpha, w, plan->w, x, plan->x, &beta,
                                      y, plan->y, y, plan->y, &plan->algo, workspace_,
                                      workspace_bytes_, stream));
  return absl::OkStatus();
}

}  // namespace kvgate::worker::cuda
