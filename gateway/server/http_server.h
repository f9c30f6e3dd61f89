// HttpEndpoints: the gateway's plain-HTTP port (civetweb, the server prometheus-cpp itself uses):
//   /metrics  Prometheus text format of the registry
//   /healthz  200 while the process runs (liveness)
//   /readyz   200 when `ready()` says so (a policy is in force and some worker is SERVING), else 503
//
//   HttpEndpoints http("0.0.0.0:9150", registry, [&] { return store.Current() && prober.AnyServing(); });
//   int port = http.port();
#pragma once

#include <functional>
#include <memory>
#include <string>

#include <prometheus/registry.h>

#include "absl/status/statusor.h"

class CivetServer;

namespace kvgate::gateway {

class HttpEndpoints {
 public:
  // Listens on "host:port" (port 0: a free one). Error if the port cannot be bound.
  static absl::StatusOr<std::unique_ptr<HttpEndpoints>> Start(
      const std::string& address, std::shared_ptr<prometheus::Registry> registry,
      std::function<bool()> ready);
  ~HttpEndpoints();
  int port() const { return port_; }

  struct Handlers;

 private:
  HttpEndpoints() = default;
  std::unique_ptr<CivetServer> server_;
  std::unique_ptr<Handlers> handlers_;
  int port_ = 0;
};

}  // namespace kvgate::gateway
