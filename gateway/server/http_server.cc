#include "gateway/server/http_server.h"

#include <CivetServer.h>
#include <prometheus/text_serializer.h>

#include <string>
#include <vector>

#include "absl/strings/str_cat.h"

namespace kvgate::gateway {
namespace {

void Reply(mg_connection* conn, int code, const char* reason, const std::string& content_type,
           const std::string& body) {
  mg_printf(conn,
            "HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %zu\r\nConnection: close\r\n\r\n",
            code, reason, content_type.c_str(), body.size());
  mg_write(conn, body.data(), body.size());
}

class MetricsHandler : public CivetHandler {
 public:
  explicit MetricsHandler(std::shared_ptr<prometheus::Registry> registry)
      : registry_(std::move(registry)) {}
  bool handleGet(CivetServer*, mg_connection* conn) override {
    prometheus::TextSerializer serializer;
    Reply(conn, 200, "OK", "text/plain; version=0.0.4", serializer.Serialize(registry_->Collect()));
    return true;
  }

 private:
  std::shared_ptr<prometheus::Registry> registry_;
};

class StatusHandler : public CivetHandler {
 public:
  explicit StatusHandler(std::function<bool()> ok) : ok_(std::move(ok)) {}
  bool handleGet(CivetServer*, mg_connection* conn) override {
    if (ok_()) {
      Reply(conn, 200, "OK", "text/plain", "ok\n");
    } else {
      Reply(conn, 503, "Service Unavailable", "text/plain", "not ready\n");
    }
    return true;
  }

 private:
  std::function<bool()> ok_;
};

}  // namespace

struct HttpEndpoints::Handlers {
  std::unique_ptr<MetricsHandler> metrics;
  std::unique_ptr<StatusHandler> healthz;
  std::unique_ptr<StatusHandler> readyz;
};

absl::StatusOr<std::unique_ptr<HttpEndpoints>> HttpEndpoints::Start(
    const std::string& address, std::shared_ptr<prometheus::Registry> registry,
    std::function<bool()> ready) {
  auto http = std::unique_ptr<HttpEndpoints>(new HttpEndpoints());
  std::vector<std::string> options = {"listening_ports", address, "num_threads", "2"};
  try {
    http->server_ = std::make_unique<CivetServer>(options);
  } catch (const std::exception& e) {
    return absl::UnavailableError(absl::StrCat("cannot serve HTTP on ", address, ": ", e.what()));
  }
  http->handlers_ = std::make_unique<Handlers>();
  http->handlers_->metrics = std::make_unique<MetricsHandler>(std::move(registry));
  http->handlers_->healthz = std::make_unique<StatusHandler>([] { return true; });
  http->handlers_->readyz = std::make_unique<StatusHandler>(std::move(ready));
  http->server_->addHandler("/metrics", http->handlers_->metrics.get());
  http->server_->addHandler("/healthz", http->handlers_->healthz.get());
  http->server_->addHandler("/readyz", http->handlers_->readyz.get());
  auto ports = http->server_->getListeningPorts();
  http->port_ = ports.empty() ? 0 : ports[0];
  return http;
}

HttpEndpoints::~HttpEndpoints() {
  if (server_) server_->close();
}

}  // namespace kvgate::gateway
