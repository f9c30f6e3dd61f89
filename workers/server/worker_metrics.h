// Prometheus metrics of a worker (prometheus-cpp), fed by the engine's observer callbacks.
// Names follow Prometheus conventions with the `kvgate_worker_` prefix; the load gauges carry the
// same meaning as vLLM's num_requests_waiting / num_requests_running / kv_cache_usage_perc.
//
//   WorkerMetrics metrics(registry, {{"model", "tiny"}, {"kv_format", "fp16"}});
//   Engine::Create(std::move(runner), opts, &metrics);
#pragma once

#include <map>
#include <memory>
#include <string>

#include <prometheus/counter.h>
#include <prometheus/family.h>
#include <prometheus/gauge.h>
#include <prometheus/histogram.h>
#include <prometheus/registry.h>

#include "workers/engine/engine.h"

namespace kvgate::worker {

class WorkerMetrics : public EngineObserver {
 public:
  // `labels` are constant labels on every series (model, kv_format, backend).
  WorkerMetrics(prometheus::Registry& registry, const std::map<std::string, std::string>& labels);

  void OnRequestDone(const StepOutput& final_output) override;
  void OnLoad(const EngineLoad& load) override;
  void OnPreemption() override;
  // A request refused before it reached the engine (validation, draining): counted by code.
  void OnRejected(absl::StatusCode code);

 private:
  prometheus::Family<prometheus::Counter>& requests_;
  prometheus::Counter& prompt_tokens_;
  prometheus::Counter& generation_tokens_;
  prometheus::Counter& preemptions_;
  prometheus::Histogram& ttft_;
  prometheus::Histogram& tpot_;
  prometheus::Gauge& running_;
  prometheus::Gauge& waiting_;
  prometheus::Gauge& kv_blocks_used_;
  prometheus::Gauge& kv_blocks_total_;
  prometheus::Gauge& kv_utilization_;
  prometheus::Gauge& kv_bytes_per_token_;
  prometheus::Gauge& accepting_;
};

}  // namespace kvgate::worker
