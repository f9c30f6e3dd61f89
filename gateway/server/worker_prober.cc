#include "gateway/server/worker_prober.h"

#include <chrono>

#include "grpc/health/v1/health.grpc.pb.h"
#include "kvgate/v1/worker.grpc.pb.h"

namespace kvgate::gateway {

WorkerProber::WorkerProber(PoolRegistry* registry, EndpointResolver* resolver,
                           WorkerProberOptions options)
    : registry_(registry), resolver_(resolver), options_(options) {}

WorkerProber::~WorkerProber() {
  {
    absl::MutexLock lock(&mu_);
    stopping_ = true;
  }
  if (thread_.joinable()) thread_.join();
}

void WorkerProber::Start() {
  thread_ = std::thread([this] {
    for (;;) {
      ProbeAll();
      absl::MutexLock lock(&mu_);
      if (mu_.AwaitWithTimeout(absl::Condition(&stopping_), options_.interval)) return;
    }
  });
}

std::shared_ptr<grpc::Channel> WorkerProber::Channel(const std::string& endpoint) {
  absl::MutexLock lock(&mu_);
  auto& channel = channels_[endpoint];
  if (channel == nullptr) {
    channel = grpc::CreateChannel(endpoint, grpc::InsecureChannelCredentials());
  }
  return channel;
}

void WorkerProber::SetObserver(
    std::function<void(const std::vector<std::shared_ptr<EndpointPool>>&)> fn) {
  absl::MutexLock lock(&mu_);
  observer_ = std::move(fn);
}

bool WorkerProber::AnyServing() const {
  for (const auto& pool : registry_->All()) {
    for (const auto& s : pool->Status()) {
      if (s.health == HealthState::kServing) return true;
    }
  }
  return false;
}

void WorkerProber::ProbeAll() {
  if (resolver_ != nullptr) registry_->RefreshDns(*resolver_);
  const auto pools = registry_->All();
  for (const auto& pool : pools) {
    for (const std::string& endpoint : pool->Endpoints()) {
      auto channel = Channel(endpoint);
      const auto deadline =
          std::chrono::system_clock::now() + absl::ToChronoMilliseconds(options_.timeout);
      grpc::health::v1::HealthCheckResponse health;
      grpc::ClientContext hctx;
      hctx.set_deadline(deadline);
      grpc::Status hs = grpc::health::v1::Health::NewStub(channel)->Check(
          &hctx, grpc::health::v1::HealthCheckRequest(), &health);
      if (!hs.ok()) {
        pool->ReportHealth(endpoint, HealthState::kNotServing);
        continue;
      }
      const bool serving = health.status() == grpc::health::v1::HealthCheckResponse::SERVING;
      pool->ReportHealth(endpoint, serving ? HealthState::kServing : HealthState::kNotServing);
      kvgate::v1::LoadReport report;
      grpc::ClientContext lctx;
      lctx.set_deadline(deadline);
      if (!kvgate::v1::Worker::NewStub(channel)
               ->GetLoad(&lctx, kvgate::v1::LoadRequest(), &report)
               .ok()) {
        continue;
      }
      LoadSnapshot load;
      load.kv_format = report.kv_format();
      load.max_context = report.max_context();
      load.running_requests = report.running_requests();
      load.waiting_requests = report.waiting_requests();
      load.kv_blocks_free = report.kv_blocks_free();
      load.kv_blocks_total = report.kv_blocks_total();
      load.kv_block_tokens = report.kv_block_tokens();
      load.accepting = report.accepting();
      pool->ReportLoad(endpoint, load);
    }
  }
  std::function<void(const std::vector<std::shared_ptr<EndpointPool>>&)> observer;
  {
    absl::MutexLock lock(&mu_);
    observer = observer_;
  }
  if (observer) observer(pools);
}

}  // namespace kvgate::gateway
