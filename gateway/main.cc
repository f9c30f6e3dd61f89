// kvgate-gateway: the public gRPC API. Scores each request with the served model's tokenizer,
// routes it by the YAML policy (hot-reloaded) to a worker pool, falls back across pools, and
// streams the completion back.
//
//   kvgate-gateway --policy policies/default.yaml --model models/reference --port 50051
//       --http_port 9150
//
// Refuses to start on an invalid policy (every error printed as file:line:col). SIGTERM/SIGINT:
// readiness goes 503, in-flight streams get up to --drain_timeout_s, then exit 0.
#include <signal.h>

#include <chrono>
#include <cstdio>
#include <memory>
#include <string>
#include <thread>

#include <grpcpp/ext/proto_server_reflection_plugin.h>
#include <grpcpp/grpcpp.h>
#include <grpcpp/health_check_service_interface.h>
#include <prometheus/registry.h>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/strings/str_cat.h"
#include "gateway/policy/policy_store.h"
#include "gateway/pool/clock.h"
#include "gateway/pool/pool_registry.h"
#include "gateway/pool/resolver.h"
#include "gateway/server/gateway_metrics.h"
#include "gateway/server/gateway_service.h"
#include "gateway/server/http_server.h"
#include "gateway/server/worker_prober.h"
#include "kvgate/common/log.h"
#include "kvgate/common/shutdown_signals.h"
#include "kvgate/common/tokenizer.h"

ABSL_FLAG(std::string, policy, "policies/default.yaml", "Routing policy YAML (watched for changes)");
ABSL_FLAG(std::string, tokenizer, "", "The served model's tokenizer.json");
ABSL_FLAG(std::string, model, "", "Model folder (its tokenizer.json is used if --tokenizer is unset)");
ABSL_FLAG(std::string, model_name, "", "Model name reported by CountTokens");
ABSL_FLAG(std::string, host, "0.0.0.0", "Address to listen on");
ABSL_FLAG(int, port, 50051, "gRPC port (0: pick a free one and print it)");
ABSL_FLAG(int, http_port, 9150, "HTTP port for /metrics, /healthz, /readyz (0: free; -1: none)");
ABSL_FLAG(int, policy_poll_ms, 1000, "How often the policy file is checked for changes");
ABSL_FLAG(int, probe_interval_ms, 500, "How often workers' health and load are probed");
ABSL_FLAG(int, default_max_tokens, 16, "max_tokens when a request leaves it unset");
ABSL_FLAG(int, drain_timeout_s, 30, "Seconds to let in-flight streams finish on SIGTERM");

namespace kvgate::gateway {
namespace {

int Main(int argc, char** argv) {
  // Before any thread starts, so that the wait below receives them.
  ShutdownSignals signals;

  absl::SetProgramUsageMessage("kvgate gateway: precision-aware routing of LLM requests.");
  absl::ParseCommandLine(argc, argv);

  std::string tokenizer_path = absl::GetFlag(FLAGS_tokenizer);
  if (tokenizer_path.empty() && !absl::GetFlag(FLAGS_model).empty()) {
    tokenizer_path = absl::GetFlag(FLAGS_model) + "/tokenizer.json";
  }
  if (tokenizer_path.empty()) {
    std::fprintf(stderr, "kvgate-gateway: --tokenizer or --model is required\n");
    return 2;
  }
  auto tokenizer = Tokenizer::FromFile(tokenizer_path);
  if (!tokenizer.ok()) {
    std::fprintf(stderr, "kvgate-gateway: cannot load tokenizer %s: %s\n", tokenizer_path.c_str(),
                 std::string(tokenizer.status().message()).c_str());
    return 1;
  }
  std::string model_name = absl::GetFlag(FLAGS_model_name);
  if (model_name.empty()) {
    std::string dir = absl::GetFlag(FLAGS_model);
    while (!dir.empty() && dir.back() == '/') dir.pop_back();
    model_name = dir.substr(dir.rfind('/') == std::string::npos ? 0 : dir.rfind('/') + 1);
  }

  auto registry = std::make_shared<prometheus::Registry>();
  GatewayMetrics metrics(*registry);
  PoolRegistry pools(RealClock::Get());
  PolicyStore store(absl::GetFlag(FLAGS_policy));
  store.SetOnInstall([&](const std::shared_ptr<const Policy>& policy) {
    pools.ApplyPolicy(*policy);
    KVGATE_LOG(INFO) << "policy " << policy->source << " in force (hash " << policy->hash << ", "
                     << policy->pools.size() << " pools, " << policy->routes.size() << " routes)";
  });
  if (absl::Status s = store.Load(); !s.ok()) {
    std::fprintf(stderr, "kvgate-gateway: invalid policy:\n%s\n", std::string(s.message()).c_str());
    return 1;
  }
  metrics.PolicyReloads(0, 0, store.current_hash());

  GetAddrInfoResolver resolver;
  WorkerProber prober(&pools, &resolver,
                      {.interval = absl::Milliseconds(absl::GetFlag(FLAGS_probe_interval_ms))});
  prober.SetObserver([&](const std::vector<std::shared_ptr<EndpointPool>>& all) {
    metrics.Endpoints(all);
    metrics.PolicyReloads(store.reloads_ok(), store.reloads_failed(), store.current_hash());
    for (const auto& pool : all) {
      for (const FormatMismatch& m : pool->FormatMismatches()) {
        KVGATE_LOG(WARNING) << "pool " << pool->name() << ": endpoint " << m.endpoint
                            << " reports kv_format " << m.reported << " but the policy declares "
                            << m.declared << "; not routing to it";
      }
    }
  });
  prober.ProbeAll();
  prober.Start();
  store.StartWatching(absl::Milliseconds(absl::GetFlag(FLAGS_policy_poll_ms)));

  GatewayService service({.policy = [&] { return store.Current(); },
                          .tokenizer = tokenizer->get(),
                          .pools = &pools,
                          .prober = &prober,
                          .metrics = &metrics,
                          .model_name = model_name,
                          .default_max_tokens = absl::GetFlag(FLAGS_default_max_tokens)});

  std::atomic<bool> draining{false};
  std::unique_ptr<HttpEndpoints> http;
  if (int hp = absl::GetFlag(FLAGS_http_port); hp >= 0) {
    auto started = HttpEndpoints::Start(absl::StrCat(absl::GetFlag(FLAGS_host), ":", hp), registry,
                                        [&] { return !draining && prober.AnyServing(); });
    if (!started.ok()) {
      std::fprintf(stderr, "kvgate-gateway: %s\n", std::string(started.status().message()).c_str());
      return 1;
    }
    http = *std::move(started);
  }

  grpc::EnableDefaultHealthCheckService(true);
  grpc::reflection::InitProtoReflectionServerBuilderPlugin();
  grpc::ServerBuilder builder;
  int bound_port = 0;
  builder.AddListeningPort(absl::StrCat(absl::GetFlag(FLAGS_host), ":", absl::GetFlag(FLAGS_port)),
                           grpc::InsecureServerCredentials(), &bound_port);
  builder.RegisterService(&service);
  std::unique_ptr<grpc::Server> server = builder.BuildAndStart();
  if (server == nullptr || bound_port == 0) {
    std::fprintf(stderr, "kvgate-gateway: cannot listen on %s:%d\n",
                 absl::GetFlag(FLAGS_host).c_str(), absl::GetFlag(FLAGS_port));
    return 1;
  }
  server->GetHealthCheckService()->SetServingStatus(true);
  KVGATE_LOG(INFO) << "kvgate-gateway listening on " << absl::GetFlag(FLAGS_host) << ":"
                   << bound_port << (http ? absl::StrCat(", http on ", http->port()) : "")
                   << ", policy " << absl::GetFlag(FLAGS_policy);
  if (http) std::printf("HTTP %d\n", http->port());
  std::printf("LISTENING %d\n", bound_port);
  std::fflush(stdout);

  const int sig = signals.Wait();
  KVGATE_LOG(INFO) << "signal " << sig << ": draining";
  draining = true;
  server->GetHealthCheckService()->SetServingStatus(false);
  // Let streams in flight finish (new calls keep being served meanwhile, as a load balancer takes
  // a moment to see readiness drop), then stop; whatever is left is cancelled.
  const auto drain_deadline = std::chrono::steady_clock::now() +
                              std::chrono::seconds(absl::GetFlag(FLAGS_drain_timeout_s));
  while (service.active_streams() > 0 && std::chrono::steady_clock::now() < drain_deadline) {
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  server->Shutdown(std::chrono::system_clock::now() + std::chrono::milliseconds(200));
  store.StopWatching();
  KVGATE_LOG(INFO) << "stopped";
  return 0;
}

}  // namespace
}  // namespace kvgate::gateway

int main(int argc, char** argv) { return kvgate::gateway::Main(argc, argv); }
