// EndpointResolver: turns a pool's `dns: name:port` into the current "host:port" endpoint list.
// On Kubernetes a headless Service name resolves to one A/AAAA record per ready pod, so
// re-resolving it periodically follows scale-ups, scale-downs and restarts.
//
//   GetAddrInfoResolver resolver;
//   ASSIGN_OR_RETURN(std::vector<std::string> endpoints,
//                    resolver.Resolve("workers-full.kvgate.svc.cluster.local:50051"));
//   // e.g. {"10.0.3.7:50051", "10.0.4.2:50051"}; IPv6 as "[fd00::7]:50051"
#pragma once

#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"

namespace kvgate::gateway {

class EndpointResolver {
 public:
  virtual ~EndpointResolver() = default;
  // Resolves "name:port" to a sorted, duplicate-free list of "address:port". An empty list is a
  // valid answer (no ready pods); failures are Status errors (the caller keeps the old list).
  virtual absl::StatusOr<std::vector<std::string>> Resolve(std::string_view name_and_port) = 0;
};

// Blocking resolution through getaddrinfo (TCP addresses, IPv4 and IPv6).
class GetAddrInfoResolver : public EndpointResolver {
 public:
  absl::StatusOr<std::vector<std::string>> Resolve(std::string_view name_and_port) override;
};

// Splits "host:port" / "[v6]:port" into host (brackets removed) and port; InvalidArgumentError
// if malformed.
absl::Status SplitHostPort(std::string_view host_port, std::string* host, std::string* port);

}  // namespace kvgate::gateway
