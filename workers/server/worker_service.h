// gRPC services of a worker (callback API):
//   - kvgate.v1.Worker: Generate on token ids (what the gateway calls) and GetLoad;
//   - kvgate.v1.Gateway: the public text API served directly by this worker, so that a worker can
//     be used on its own by the same clients (`kvgate generate --target worker`); its RouteInfo
//     names the pool "direct".
// Until SetEngine() is called (model loading) every RPC but GetLoad answers UNAVAILABLE.
//
//   WorkerService service(options);
//   builder.RegisterService(service.worker_service()); builder.RegisterService(service.gateway_service());
//   ... load ... service.SetEngine(engine.get(), tokenizer.get());
#pragma once

#include <atomic>
#include <memory>
#include <string>

#include "kvgate/common/tokenizer.h"
#include "kvgate/v1/gateway.grpc.pb.h"
#include "kvgate/v1/worker.grpc.pb.h"
#include "workers/engine/engine.h"
#include "workers/server/worker_metrics.h"

namespace kvgate::worker {

struct WorkerServiceOptions {
  std::string model_name;
  std::string kv_format_name;
  std::string eviction_name = "none";
};

class WorkerService {
 public:
  explicit WorkerService(WorkerServiceOptions options, WorkerMetrics* metrics = nullptr);
  ~WorkerService();

  grpc::Service* worker_service();
  grpc::Service* gateway_service();

  // Makes the services live. Both pointers must outlive the server.
  void SetEngine(Engine* engine, const Tokenizer* tokenizer);
  // Refuse new work with UNAVAILABLE (draining); in-flight requests continue.
  void StopAccepting();

  // Internal: shared by both services.
  struct Impl;

 private:
  std::unique_ptr<Impl> impl_;
};

}  // namespace kvgate::worker
