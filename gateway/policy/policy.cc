#include "gateway/policy/policy.h"

#include "absl/strings/str_cat.h"

namespace kvgate::gateway {

std::string SourceLocation::ToString() const {
  if (line <= 0) return file;
  return absl::StrCat(file, ":", line, ":", column);
}

const char* PoolPrecisionName(PoolPrecision precision) {
  return precision == PoolPrecision::kFull ? "full" : "compressed";
}

const char* RequestedPrecisionName(RequestedPrecision precision) {
  switch (precision) {
    case RequestedPrecision::kFull:
      return "full";
    case RequestedPrecision::kCompressed:
      return "compressed";
    case RequestedPrecision::kUnspecified:
      break;
  }
  return "unspecified";
}

const char* FallbackReasonName(FallbackReason reason) {
  switch (reason) {
    case FallbackReason::kNoHealthyEndpoint:
      return "no_healthy_endpoint";
    case FallbackReason::kPoolFull:
      return "pool_full";
    case FallbackReason::kContextTooLong:
      return "context_too_long";
    case FallbackReason::kFailedBeforeFirstToken:
      return "failed_before_first_token";
    case FallbackReason::kFormatMismatch:
      return "format_mismatch";
    case FallbackReason::kQuality:
      return "quality";
  }
  return "unknown";
}

std::string TokenRange::ToString() const {
  return absl::StrCat("[", min ? absl::StrCat(*min) : "-inf", ", ",
                      max ? absl::StrCat(*max) : "inf", "]");
}

bool FallbackSpec::Allows(FallbackReason reason) const {
  switch (reason) {
    case FallbackReason::kNoHealthyEndpoint:
      return no_healthy_endpoint;
    case FallbackReason::kPoolFull:
      return pool_full;
    case FallbackReason::kContextTooLong:
      return context_too_long;
    case FallbackReason::kFailedBeforeFirstToken:
      return failed_before_first_token;
    case FallbackReason::kFormatMismatch:
      return format_mismatch;
    case FallbackReason::kQuality:
      return true;
  }
  return false;
}

const PoolSpec* Policy::FindPool(std::string_view name) const {
  for (const PoolSpec& pool : pools) {
    if (pool.name == name) return &pool;
  }
  return nullptr;
}

const TaskTypeSpec* Policy::FindTaskType(std::string_view name) const {
  for (const TaskTypeSpec& task : task_types) {
    if (task.name == name) return &task;
  }
  return nullptr;
}

int64_t Policy::MaxQueue(const PoolSpec& pool) const {
  return pool.max_queue.value_or(load_balancing.max_queue);
}

}  // namespace kvgate::gateway
