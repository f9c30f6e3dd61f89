// WorkerProber: keeps the picker's view of every worker current. In the background it re-resolves
// DNS pools (PoolRegistry::RefreshDns) and probes every endpoint of every pool with the standard
// grpc.health.v1 Check and the worker's GetLoad, reporting health and load to its EndpointPool.
// It also owns the gRPC channels to workers (one per endpoint, reused by forwarding).
//
//   WorkerProber prober(&registry, &resolver, {.interval = absl::Milliseconds(500)});
//   prober.ProbeAll();   // once, synchronously, before serving
//   prober.Start();      // then in the background
//   auto channel = prober.Channel("127.0.0.1:50062");
#pragma once

#include <functional>
#include <map>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include <grpcpp/grpcpp.h>

#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "gateway/pool/pool_registry.h"
#include "gateway/pool/resolver.h"

namespace kvgate::gateway {

struct WorkerProberOptions {
  absl::Duration interval = absl::Milliseconds(500);
  absl::Duration timeout = absl::Milliseconds(1000);
};

class WorkerProber {
 public:
  WorkerProber(PoolRegistry* registry, EndpointResolver* resolver, WorkerProberOptions options);
  ~WorkerProber();  // stops the background thread

  void Start();
  void ProbeAll();
  std::shared_ptr<grpc::Channel> Channel(const std::string& endpoint);
  // Called after each probe round (metrics).
  void SetObserver(std::function<void(const std::vector<std::shared_ptr<EndpointPool>>&)> fn);
  // True when some endpoint of some pool is SERVING.
  bool AnyServing() const;

 private:
  PoolRegistry* const registry_;
  EndpointResolver* const resolver_;
  const WorkerProberOptions options_;

  mutable absl::Mutex mu_;
  std::map<std::string, std::shared_ptr<grpc::Channel>> channels_ ABSL_GUARDED_BY(mu_);
  std::function<void(const std::vector<std::shared_ptr<EndpointPool>>&)> observer_
      ABSL_GUARDED_BY(mu_);
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  std::thread thread_;
};

}  // namespace kvgate::gateway
