// EndpointPool: the workers of one pool, their last known state, and the PoolPicker logic that
// chooses one of them for a request.
//
// State per endpoint: health (grpc.health.v1: unknown / SERVING / NOT_SERVING), the last load
// report (kvgate.v1.LoadReport fields), consecutive failures and ejection. Picking:
//   1. eligible = healthy (SERVING, or unknown when options allow), not ejected, not a probe
//      already in flight, accepting, reporting the declared kv_format (others are flagged, see
//      FormatMismatches()), reported max_context >= the request's total tokens;
//   2. with room = eligible endpoints whose free KV blocks hold the request
//      (kv_blocks_free * kv_block_tokens >= total tokens) and whose queue is at most max_queue
//      (an endpoint with no load report yet is assumed to have room);
//   3. power of two choices among those with room: two distinct endpoints drawn at random
//      (injectable source), the one with the lower LoadScore wins.
// When nothing can be picked, the failure says why, for the fallback decision: pool_full (some
// eligible endpoint exists but none has room), context_too_long, format_mismatch, else
// no_healthy_endpoint.
//
// Outlier ejection: after `eject_after_failures` consecutive failures an endpoint is ejected for
// ejection_base * 2^k (k = ejections since its last success), capped at ejection_max. When the
// ejection expires the endpoint is eligible for ONE probe request; success restores it, failure
// ejects it again with the next back-off. Every Pick that returns an endpoint must be followed by
// exactly one ReportSuccess or ReportFailure for it (a probe whose result never comes is released
// after probe_timeout).
//
//   EndpointPool pool("full", {.declared_kv_format = "fp16"}, RealClock::Get());
//   pool.SetEndpoints({"127.0.0.1:50062"});
//   pool.ReportHealth("127.0.0.1:50062", HealthState::kServing);
//   PickOutcome pick = pool.Pick({.total_tokens = 2048});
//   if (pick.ok()) { forward to pick.endpoint; pool.ReportSuccess(pick.endpoint); }
//
// Thread-safe; all methods may be called concurrently.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <map>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "gateway/policy/policy.h"
#include "gateway/pool/clock.h"

namespace kvgate::gateway {

enum class HealthState { kUnknown, kServing, kNotServing };
const char* HealthStateName(HealthState state);

// The fields of kvgate.v1.LoadReport the picker uses (the server copies them from the proto).
struct LoadSnapshot {
  std::string kv_format;    // as reported; compared with the pool's declaration after
                            // canonicalization
  int64_t max_context = 0;  // 0: unknown
  int64_t running_requests = 0;
  int64_t waiting_requests = 0;
  int64_t kv_blocks_free = 0;
  int64_t kv_blocks_total = 0;
  int64_t kv_block_tokens = 0;
  bool accepting = true;
};

// Lower is less loaded: waiting + 0.25 * running + 2 * (used KV fraction). A waiting request
// weighs most (it delays a new one by a whole admission), KV pressure predicts preemption, each
// running request slows every decode step a little. Endpoints without a load report score 0.
double LoadScore(const LoadSnapshot& load);

struct EndpointPoolOptions {
  // The pool's kv_format in the policy (canonical name).
  std::string declared_kv_format;
  int64_t max_queue = 64;
  int64_t eject_after_failures = 5;
  absl::Duration ejection_base = absl::Seconds(1);
  absl::Duration ejection_max = absl::Seconds(60);
  absl::Duration probe_timeout = absl::Seconds(30);
  // Whether an endpoint whose health has not been checked yet may be picked.
  bool unknown_health_eligible = true;
};

struct PickRequest {
  int64_t total_tokens = 0;  // prompt + max_tokens
};

struct PickOutcome {
  // Set on success.
  std::string endpoint;
  // KV format the picked endpoint reports (the declared one if it has not reported yet).
  std::string kv_format;
  // Set on failure.
  std::optional<FallbackReason> failure;
  std::string detail;
  bool ok() const { return !failure.has_value(); }
};

// An endpoint whose reported kv_format differs from the pool's declaration.
struct FormatMismatch {
  std::string endpoint;
  std::string reported;
  std::string declared;
};

// Read-only view of one endpoint, for status pages and tests.
struct EndpointStatus {
  std::string endpoint;
  HealthState health = HealthState::kUnknown;
  std::optional<LoadSnapshot> load;
  int64_t consecutive_failures = 0;
  int64_t ejections = 0;  // since the last success
  std::optional<absl::Time> ejected_until;
  bool probe_in_flight = false;
};

// Returns a uniformly random index in [0, n); n >= 1.
using RandomIndexFn = std::function<size_t(size_t n)>;

class EndpointPool {
 public:
  // `clock` must outlive the pool. `random` defaults to a seeded absl::BitGen.
  EndpointPool(std::string name, EndpointPoolOptions options, const Clock* clock,
               RandomIndexFn random = nullptr);

  const std::string& name() const { return name_; }

  // Replaces the endpoint set; endpoints present before keep their state.
  void SetEndpoints(const std::vector<std::string>& endpoints);
  std::vector<std::string> Endpoints() const;
  // Replaces the options (policy reload); endpoint state is kept.
  void SetOptions(EndpointPoolOptions options);

  // Reports for unknown endpoints are ignored.
  void ReportHealth(std::string_view endpoint, HealthState health);
  void ReportLoad(std::string_view endpoint, const LoadSnapshot& load);
  void ReportSuccess(std::string_view endpoint);
  void ReportFailure(std::string_view endpoint);

  PickOutcome Pick(const PickRequest& request);

  // Endpoints reporting a kv_format other than the declared one (they are never picked).
  std::vector<FormatMismatch> FormatMismatches() const;
  std::vector<EndpointStatus> Status() const;

 private:
  struct Endpoint {
    HealthState health = HealthState::kUnknown;
    std::optional<LoadSnapshot> load;
    std::string canonical_reported_format;  // empty until a load report names one
    int64_t consecutive_failures = 0;
    int64_t ejections = 0;
    std::optional<absl::Time> ejected_until;
    std::optional<absl::Time> probe_deadline;  // set while a probe is in flight
  };
  absl::Duration BackoffLocked(int64_t ejections) const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mutex_);

  const std::string name_;
  const Clock* const clock_;
  RandomIndexFn random_;
  mutable absl::Mutex mutex_;
  EndpointPoolOptions options_ ABSL_GUARDED_BY(mutex_);
  std::map<std::string, Endpoint, std::less<>> endpoints_ ABSL_GUARDED_BY(mutex_);
};

}  // namespace kvgate::gateway
