#include "gateway/server/gateway_metrics.h"

namespace kvgate::gateway {
namespace {

prometheus::Histogram::BucketBoundaries LatencyBuckets() {
  return {0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120};
}

prometheus::Histogram::BucketBoundaries OverheadBuckets() {
  return {0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25};
}

}  // namespace

GatewayMetrics::GatewayMetrics(prometheus::Registry& registry)
    : registry_(registry),
      requests_(prometheus::BuildCounter()
                    .Name("kvgate_gateway_requests_total")
                    .Help("Requests that ended, by serving pool, task type and outcome")
                    .Register(registry)),
      route_decisions_(prometheus::BuildCounter()
                           .Name("kvgate_gateway_route_decisions_total")
                           .Help("Routing decisions by the policy route that matched")
                           .Register(registry)),
      fallbacks_(prometheus::BuildCounter()
                     .Name("kvgate_gateway_fallbacks_total")
                     .Help("Requests moved from one pool to the next, by reason")
                     .Register(registry)),
      prompt_tokens_(prometheus::BuildCounter()
                         .Name("kvgate_gateway_prompt_tokens_total")
                         .Help("Prompt tokens of requests that ended, by pool")
                         .Register(registry)),
      completion_tokens_(prometheus::BuildCounter()
                             .Name("kvgate_gateway_generation_tokens_total")
                             .Help("Tokens streamed to clients, by pool")
                             .Register(registry)),
      duration_(prometheus::BuildHistogram()
                    .Name("kvgate_gateway_request_duration_seconds")
                    .Help("Arrival to the end of the response, as the client sees it")
                    .Register(registry)),
      ttft_(prometheus::BuildHistogram()
                .Name("kvgate_gateway_time_to_first_token_seconds")
                .Help("Arrival to the first token sent to the client")
                .Register(registry)),
      tpot_(prometheus::BuildHistogram()
                .Name("kvgate_gateway_time_per_output_token_seconds")
                .Help("Mean time between tokens sent to the client after the first")
                .Register(registry)),
      overhead_(prometheus::BuildHistogram()
                    .Name("kvgate_gateway_routing_overhead_seconds")
                    .Help("Validation, tokenization, classification and routing per request")
                    .Register(registry)
                    .Add({}, OverheadBuckets())),
      reloads_(prometheus::BuildCounter()
                   .Name("kvgate_gateway_policy_reloads_total")
                   .Help("Policy loads by result (ok, failed)")
                   .Register(registry)),
      policy_info_(prometheus::BuildGauge()
                       .Name("kvgate_gateway_policy_info")
                       .Help("1 for the policy in force, labelled by its hash")
                       .Register(registry)),
      endpoint_healthy_(prometheus::BuildGauge()
                            .Name("kvgate_gateway_endpoint_healthy")
                            .Help("1 if the endpoint's last health check said SERVING")
                            .Register(registry)),
      endpoint_waiting_(prometheus::BuildGauge()
                            .Name("kvgate_gateway_endpoint_requests_waiting")
                            .Help("Waiting requests the endpoint last reported")
                            .Register(registry)),
      endpoint_running_(prometheus::BuildGauge()
                            .Name("kvgate_gateway_endpoint_requests_running")
                            .Help("Running requests the endpoint last reported")
                            .Register(registry)),
      endpoint_kv_util_(prometheus::BuildGauge()
                            .Name("kvgate_gateway_endpoint_kv_cache_utilization_ratio")
                            .Help("KV-cache blocks in use / total the endpoint last reported")
                            .Register(registry)),
      format_mismatch_(prometheus::BuildGauge()
                           .Name("kvgate_gateway_endpoint_kv_format_mismatch")
                           .Help("1 if the endpoint reports a KV format other than the policy's")
                           .Register(registry)) {
  reloads_.Add({{"result", "ok"}});
  reloads_.Add({{"result", "failed"}});
}

void GatewayMetrics::RequestDone(const RequestRecord& r) {
  requests_.Add({{"pool", r.pool}, {"task_type", r.task_type}, {"outcome", r.outcome}})
      .Increment();
  prompt_tokens_.Add({{"pool", r.pool}}).Increment(static_cast<double>(r.prompt_tokens));
  completion_tokens_.Add({{"pool", r.pool}}).Increment(static_cast<double>(r.completion_tokens));
  duration_.Add({{"pool", r.pool}}, LatencyBuckets()).Observe(r.duration_s);
  if (r.ttft_s >= 0) ttft_.Add({{"pool", r.pool}}, LatencyBuckets()).Observe(r.ttft_s);
  if (r.tpot_s >= 0) tpot_.Add({{"pool", r.pool}}, LatencyBuckets()).Observe(r.tpot_s);
}

void GatewayMetrics::RouteDecision(const std::string& route) {
  route_decisions_.Add({{"route", route}}).Increment();
}

void GatewayMetrics::Fallback(const std::string& from_pool, const std::string& to_pool,
                              const std::string& reason) {
  fallbacks_.Add({{"from_pool", from_pool}, {"to_pool", to_pool}, {"reason", reason}}).Increment();
}

void GatewayMetrics::RoutingOverhead(double seconds) { overhead_.Observe(seconds); }

void GatewayMetrics::PolicyReloads(uint64_t ok_total, uint64_t failed_total,
                                   const std::string& hash) {
  absl::MutexLock lock(&mu_);
  if (ok_total > reloads_ok_seen_) {
    reloads_.Add({{"result", "ok"}}).Increment(static_cast<double>(ok_total - reloads_ok_seen_));
    reloads_ok_seen_ = ok_total;
  }
  if (failed_total > reloads_failed_seen_) {
    reloads_.Add({{"result", "failed"}})
        .Increment(static_cast<double>(failed_total - reloads_failed_seen_));
    reloads_failed_seen_ = failed_total;
  }
  if (hash == current_hash_) return;
  if (current_policy_ != nullptr) policy_info_.Remove(current_policy_);
  current_policy_ = &policy_info_.Add({{"hash", hash}});
  current_policy_->Set(1);
  current_hash_ = hash;
}

void GatewayMetrics::Endpoints(const std::vector<std::shared_ptr<EndpointPool>>& pools) {
  absl::MutexLock lock(&mu_);
  for (auto& [family, gauge] : endpoint_series_) family->Remove(gauge);
  endpoint_series_.clear();
  auto set = [&](prometheus::Family<prometheus::Gauge>& family,
                 const std::map<std::string, std::string>& labels, double value) {
    prometheus::Gauge& g = family.Add(labels);
    g.Set(value);
    endpoint_series_.emplace_back(&family, &g);
  };
  for (const auto& pool : pools) {
    std::vector<FormatMismatch> mismatches = pool->FormatMismatches();
    for (const EndpointStatus& s : pool->Status()) {
      std::map<std::string, std::string> labels = {{"pool", pool->name()},
                                                   {"endpoint", s.endpoint}};
      set(endpoint_healthy_, labels, s.health == HealthState::kServing ? 1 : 0);
      if (s.load) {
        set(endpoint_waiting_, labels, static_cast<double>(s.load->waiting_requests));
        set(endpoint_running_, labels, static_cast<double>(s.load->running_requests));
        set(endpoint_kv_util_, labels,
            s.load->kv_blocks_total > 0
                ? 1.0 - static_cast<double>(s.load->kv_blocks_free) / s.load->kv_blocks_total
                : 0.0);
      }
      bool mismatch = false;
      for (const auto& m : mismatches) mismatch |= m.endpoint == s.endpoint;
      set(format_mismatch_, labels, mismatch ? 1 : 0);
    }
  }
}

}  // namespace kvgate::gateway
