// Prometheus metrics of the gateway (prometheus-cpp). Latencies are as the client sees them.
//
//   GatewayMetrics metrics(registry);
//   metrics.RequestDone({.pool = "full", .task_type = "legal", .outcome = "ok", ...});
#pragma once

#include <memory>
#include <string>
#include <vector>

#include <prometheus/counter.h>
#include <prometheus/family.h>
#include <prometheus/gauge.h>
#include <prometheus/histogram.h>
#include <prometheus/registry.h>

#include "absl/synchronization/mutex.h"
#include "gateway/pool/endpoint_pool.h"

namespace kvgate::gateway {

struct RequestRecord {
  std::string pool;       // serving pool ("none" if none)
  std::string task_type;  // "unknown" before classification
  std::string outcome;    // "ok", or a lowercase status code name ("aborted", "unavailable", ...)
  int64_t prompt_tokens = 0;
  int64_t completion_tokens = 0;
  double duration_s = 0;  // arrival to last byte
  double ttft_s = -1;     // arrival to first token (<0: none)
  double tpot_s = -1;     // mean gap after the first token (<0: fewer than 2 tokens)
};

class GatewayMetrics {
 public:
  explicit GatewayMetrics(prometheus::Registry& registry);

  void RequestDone(const RequestRecord& record);
  void RouteDecision(const std::string& route);
  void Fallback(const std::string& from_pool, const std::string& to_pool,
                const std::string& reason);
  void RoutingOverhead(double seconds);
  // Brings the reload counters up to the store's totals and labels the policy in force.
  void PolicyReloads(uint64_t ok_total, uint64_t failed_total, const std::string& hash);
  // Replaces the per-endpoint gauges with the pools' current state.
  void Endpoints(const std::vector<std::shared_ptr<EndpointPool>>& pools);

 private:
  prometheus::Registry& registry_;
  prometheus::Family<prometheus::Counter>& requests_;
  prometheus::Family<prometheus::Counter>& route_decisions_;
  prometheus::Family<prometheus::Counter>& fallbacks_;
  prometheus::Family<prometheus::Counter>& prompt_tokens_;
  prometheus::Family<prometheus::Counter>& completion_tokens_;
  prometheus::Family<prometheus::Histogram>& duration_;
  prometheus::Family<prometheus::Histogram>& ttft_;
  prometheus::Family<prometheus::Histogram>& tpot_;
  prometheus::Histogram& overhead_;
  prometheus::Family<prometheus::Counter>& reloads_;
  prometheus::Family<prometheus::Gauge>& policy_info_;
  prometheus::Family<prometheus::Gauge>& endpoint_healthy_;
  prometheus::Family<prometheus::Gauge>& endpoint_waiting_;
  prometheus::Family<prometheus::Gauge>& endpoint_running_;
  prometheus::Family<prometheus::Gauge>& endpoint_kv_util_;
  prometheus::Family<prometheus::Gauge>& format_mismatch_;

  absl::Mutex mu_;
  prometheus::Gauge* current_policy_ ABSL_GUARDED_BY(mu_) = nullptr;
  std::string current_hash_ ABSL_GUARDED_BY(mu_);
  uint64_t reloads_ok_seen_ ABSL_GUARDED_BY(mu_) = 0;
  uint64_t reloads_failed_seen_ ABSL_GUARDED_BY(mu_) = 0;
  std::vector<std::pair<prometheus::Family<prometheus::Gauge>*, prometheus::Gauge*>> endpoint_series_
      ABSL_GUARDED_BY(mu_);
};

}  // namespace kvgate::gateway
