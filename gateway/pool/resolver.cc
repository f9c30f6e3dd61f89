#include "gateway/pool/resolver.h"

#include <arpa/inet.h>
#include <netdb.h>
#include <netinet/in.h>
#include <sys/socket.h>

#include <algorithm>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "gateway/internal/absl_string_view.h"

namespace kvgate::gateway {

absl::Status SplitHostPort(std::string_view host_port_in, std::string* host, std::string* port) {
  const absl::string_view host_port = AsAbsl(host_port_in);
  size_t colon = host_port.rfind(':');
  int port_number = 0;
  if (colon == absl::string_view::npos || colon == 0 ||
      !absl::SimpleAtoi(host_port.substr(colon + 1), &port_number) || port_number < 1 ||
      port_number > 65535) {
    return absl::InvalidArgumentError(absl::StrCat("'", host_port, "' is not host:port"));
  }
  absl::string_view name = host_port.substr(0, colon);
  if (name.front() == '[') {
    if (name.size() < 3 || name.back() != ']') {
      return absl::InvalidArgumentError(absl::StrCat("'", host_port, "': unbalanced brackets"));
    }
    name = name.substr(1, name.size() - 2);
  }
  *host = std::string(name);
  *port = std::string(host_port.substr(colon + 1));
  return absl::OkStatus();
}

absl::StatusOr<std::vector<std::string>> GetAddrInfoResolver::Resolve(
    std::string_view name_and_port) {
  std::string host, port;
  absl::Status split = SplitHostPort(name_and_port, &host, &port);
  if (!split.ok()) return split;
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  addrinfo* results = nullptr;
  int rc = getaddrinfo(host.c_str(), port.c_str(), &hints, &results);
  if (rc == EAI_NONAME || rc == EAI_NODATA) return std::vector<std::string>{};
  if (rc != 0) {
    return absl::UnavailableError(
        absl::StrCat("resolving '", AsAbsl(name_and_port), "': ", gai_strerror(rc)));
  }
  std::vector<std::string> endpoints;
  for (addrinfo* ai = results; ai != nullptr; ai = ai->ai_next) {
    char address[INET6_ADDRSTRLEN] = {0};
    if (ai->ai_family == AF_INET) {
      auto* v4 = reinterpret_cast<sockaddr_in*>(ai->ai_addr);
      inet_ntop(AF_INET, &v4->sin_addr, address, sizeof(address));
      endpoints.push_back(absl::StrCat(address, ":", port));
    } else if (ai->ai_family == AF_INET6) {
      auto* v6 = reinterpret_cast<sockaddr_in6*>(ai->ai_addr);
      inet_ntop(AF_INET6, &v6->sin6_addr, address, sizeof(address));
      endpoints.push_back(absl::StrCat("[", address, "]:", port));
    }
  }
  freeaddrinfo(results);
  std::sort(endpoints.begin(), endpoints.end());
  endpoints.erase(std::unique(endpoints.begin(), endpoints.end()), endpoints.end());
  return endpoints;
}

}  // namespace kvgate::gateway
