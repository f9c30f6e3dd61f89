#include "workers/server/worker_metrics.h"

#include <string>

namespace kvgate::worker {
namespace {

std::string OutcomeName(const absl::Status& status) {
  if (status.ok()) return "ok";
  std::string name = absl::StatusCodeToString(status.code());
  for (char& c : name) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  return name;
}

prometheus::Histogram::BucketBoundaries LatencyBuckets() {
  return {0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60};
}

}  // namespace

WorkerMetrics::WorkerMetrics(prometheus::Registry& registry,
                             const std::map<std::string, std::string>& labels)
    : requests_(prometheus::BuildCounter()
                    .Name("kvgate_worker_requests_total")
                    .Help("Requests that ended, by outcome (ok or a gRPC status code name)")
                    .Labels(labels)
                    .Register(registry)),
      prompt_tokens_(prometheus::BuildCounter()
                         .Name("kvgate_worker_prompt_tokens_total")
                         .Help("Prompt tokens of requests that ended")
                         .Labels(labels)
                         .Register(registry)
                         .Add({})),
      generation_tokens_(prometheus::BuildCounter()
                             .Name("kvgate_worker_generation_tokens_total")
                             .Help("Tokens generated")
                             .Labels(labels)
                             .Register(registry)
                             .Add({})),
      preemptions_(prometheus::BuildCounter()
                       .Name("kvgate_worker_preemptions_total")
                       .Help("Sequences preempted for lack of KV blocks (recomputed later)")
                       .Labels(labels)
                       .Register(registry)
                       .Add({})),
      ttft_(prometheus::BuildHistogram()
                .Name("kvgate_worker_time_to_first_token_seconds")
                .Help("Arrival at the worker to the first generated token")
                .Labels(labels)
                .Register(registry)
                .Add({}, LatencyBuckets())),
      tpot_(prometheus::BuildHistogram()
                .Name("kvgate_worker_time_per_output_token_seconds")
                .Help("Mean time between generated tokens after the first, per request")
                .Labels(labels)
                .Register(registry)
                .Add({}, LatencyBuckets())),
      running_(prometheus::BuildGauge()
                   .Name("kvgate_worker_requests_running")
                   .Help("Requests admitted and decoding")
                   .Labels(labels)
                   .Register(registry)
                   .Add({})),
      waiting_(prometheus::BuildGauge()
                   .Name("kvgate_worker_requests_waiting")
                   .Help("Requests queued for KV blocks or a batch slot")
                   .Labels(labels)
                   .Register(registry)
                   .Add({})),
      kv_blocks_used_(prometheus::BuildGauge()
                          .Name("kvgate_worker_kv_blocks_used")
                          .Help("KV-cache blocks in use")
                          .Labels(labels)
                          .Register(registry)
                          .Add({})),
      kv_blocks_total_(prometheus::BuildGauge()
                           .Name("kvgate_worker_kv_blocks_total")
                           .Help("KV-cache blocks in the pool")
                           .Labels(labels)
                           .Register(registry)
                           .Add({})),
      kv_utilization_(prometheus::BuildGauge()
                          .Name("kvgate_worker_kv_cache_utilization_ratio")
                          .Help("Fraction of KV-cache blocks in use, 0..1")
                          .Labels(labels)
                          .Register(registry)
                          .Add({})),
      kv_bytes_per_token_(prometheus::BuildGauge()
                              .Name("kvgate_worker_kv_bytes_per_token")
                              .Help("KV-cache bytes one token occupies, all layers and heads")
                              .Labels(labels)
                              .Register(registry)
                              .Add({})),
      accepting_(prometheus::BuildGauge()
                     .Name("kvgate_worker_accepting")
                     .Help("1 while the worker accepts new requests, 0 while loading or draining")
                     .Labels(labels)
                     .Register(registry)
                     .Add({})) {}

void WorkerMetrics::OnRequestDone(const StepOutput& out) {
  requests_.Add({{"outcome", OutcomeName(out.status)}}).Increment();
  prompt_tokens_.Increment(out.prompt_tokens);
  generation_tokens_.Increment(out.completion_tokens);
  if (out.completion_tokens > 0) ttft_.Observe(out.ttft_us * 1e-6);
  if (out.completion_tokens > 1) tpot_.Observe(out.tpot_us * 1e-6);
}

void WorkerMetrics::OnLoad(const EngineLoad& load) {
  running_.Set(load.running);
  waiting_.Set(load.waiting);
  kv_blocks_used_.Set(static_cast<double>(load.kv_blocks_total - load.kv_blocks_free));
  kv_blocks_total_.Set(static_cast<double>(load.kv_blocks_total));
  kv_utilization_.Set(load.kv_blocks_total > 0 ? 1.0 - static_cast<double>(load.kv_blocks_free) /
                                                           load.kv_blocks_total
                                               : 0.0);
  kv_bytes_per_token_.Set(static_cast<double>(load.kv_bytes_per_token));
  accepting_.Set(load.accepting ? 1 : 0);
}

void WorkerMetrics::OnPreemption() { preemptions_.Increment(); }

void WorkerMetrics::OnRejected(absl::StatusCode code) {
  StepOutput rejected;
  rejected.status = absl::Status(code, "");
  OnRequestDone(rejected);
}

}  // namespace kvgate::worker
