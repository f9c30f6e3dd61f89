// kvgate up: the local stack. Reads the policy, starts one CPU worker for every loopback endpoint
// of every pool (with the pool's KV format), then the gateway; prints where to send requests;
// Ctrl-C (or SIGTERM) drains and stops everything.
//
//   kvgate up --model build/models/tiny --policy policies/default.yaml --bin-dir build
#include <signal.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <memory>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "cli/args.h"
#include "cli/command.h"
#include "gateway/policy/policy_loader.h"
#include "gateway/pool/resolver.h"
#include "kvgate/common/shutdown_signals.h"
#include "kvgate/common/subprocess.h"

namespace kvgate::cli {
namespace {

struct Child {
  std::string name;
  std::unique_ptr<Subprocess> process;
  int port = 0;
};

bool IsLoopback(const std::string& host) {
  return host == "127.0.0.1" || host == "localhost" || host == "::1";
}

void StopAll(std::vector<Child>& children) {
  // Gateway first (it is last in the list), so that no request is sent to a stopping worker.
  for (auto it = children.rbegin(); it != children.rend(); ++it) it->process->Signal(SIGTERM);
  for (auto it = children.rbegin(); it != children.rend(); ++it) {
    if (it->process->Wait(std::chrono::seconds(15)) < 0) {
      std::fprintf(stderr, "kvgate up: %s did not stop in 15 s; killing it\n", it->name.c_str());
      it->process->Signal(SIGKILL);
      it->process->Wait(std::chrono::seconds(5));
    }
  }
}

int RunUp(int argc, char** argv) {
  Args args(argc, argv,
            {"model", "policy", "bin-dir", "port", "http-port", "kv-cache-mb", "threads"}, {});
  if (args.help() || !args.ok() || !args.Has("model")) {
    if (!args.ok()) std::fprintf(stderr, "kvgate up: %s\n", args.error().c_str());
    std::fprintf(stderr,
                 "usage: kvgate up --model DIR [--policy policies/default.yaml] [--bin-dir build]\n"
                 "                 [--port 50051] [--http-port 9150] [--kv-cache-mb 64]\n"
                 "                 [--threads 1]\n"
                 "Starts a CPU worker for each loopback endpoint of each pool of the policy, then\n"
                 "the gateway. Ctrl-C stops everything.\n");
    return args.help() ? 0 : 2;
  }
  const std::string model = args.Get("model");
  const std::string policy_path = args.Get("policy", "policies/default.yaml");
  const std::string bin_dir = args.Get("bin-dir", "build");
  const std::string port = args.Get("port", "50051");
  const std::string http_port = args.Get("http-port", "9150");
  const std::string kv_cache_mb = args.Get("kv-cache-mb", "64");
  const std::string threads = args.Get("threads", "1");

  auto policy = gateway::LoadPolicyFile(policy_path);
  if (!policy.ok()) {
    std::fprintf(stderr, "kvgate up: %s\n", std::string(policy.status().message()).c_str());
    return 1;
  }


  std::vector<Child> children;
  int metrics_port = 9161;
  for (const auto& pool : (*policy)->pools) {
    for (const std::string& endpoint : pool.endpoints) {
      std::string host, wport;
      if (!gateway::SplitHostPort(endpoint, &host, &wport).ok() || !IsLoopback(host)) {
        std::fprintf(stderr, "kvgate up: pool %s: %s is not a loopback endpoint; not started\n",
                     pool.name.c_str(), endpoint.c_str());
        continue;
      }
      std::string name = absl::StrCat("worker ", pool.name, " (", pool.kv_format, ") ", endpoint);
      std::vector<std::string> argv = {bin_dir + "/bin/kvgate-worker",
                                       "--model", model,
                                       "--kv", pool.kv_format,
                                       "--evict", pool.eviction,
                                       "--host", host,
                                       "--port", wport,
                                       "--metrics_port", std::to_string(metrics_port++),
                                       "--kv_cache_mb", kv_cache_mb,
                                       "--threads", threads};
      auto process = Subprocess::Start(argv);
      if (process == nullptr) {
        std::fprintf(stderr, "kvgate up: cannot start %s\n", argv[0].c_str());
        StopAll(children);
        return 1;
      }
      children.push_back({name, std::move(process), 0});
    }
  }
  for (Child& c : children) {
    c.port = c.process->WaitForListening(std::chrono::seconds(120));
    if (c.port <= 0) {
      std::fprintf(stderr, "kvgate up: %s failed to start\n", c.name.c_str());
      StopAll(children);
      return 1;
    }
    std::fprintf(stderr, "kvgate up: started %s, metrics on :%d\n", c.name.c_str(),
                 c.process->PrintedPort("METRICS"));
  }
  auto gateway_process = Subprocess::Start(
      {bin_dir + "/bin/kvgate-gateway", "--policy", policy_path, "--model", model, "--port",
       port, "--http_port", http_port, "--host", "127.0.0.1"});
  if (gateway_process == nullptr) {
    StopAll(children);
    return 1;
  }
  children.push_back({"gateway", std::move(gateway_process), 0});
  int gport = children.back().process->WaitForListening(std::chrono::seconds(60));
  if (gport <= 0) {
    std::fprintf(stderr, "kvgate up: the gateway failed to start\n");
    StopAll(children);
    return 1;
  }
  std::printf(
      "\nkvgate is up: gateway on 127.0.0.1:%d (metrics http://127.0.0.1:%d/metrics)\n"
      "  try:  %s/bin/kvgate generate --target 127.0.0.1:%d \"def fibonacci(n):\"\n"
      "        %s/bin/kvgate generate --target 127.0.0.1:%d --task code_review "
      "\"def parse(text):\"\n"
      "Ctrl-C stops the stack.\n\n",
      gport, children.back().process->PrintedPort("HTTP"), bin_dir.c_str(), gport,
      bin_dir.c_str(), gport);
  std::fflush(stdout);

  // Children unblock signals themselves (Subprocess::Start), so blocking them here is safe.
  ShutdownSignals signals;
  // Wait for a signal, or for a child to die.
  for (;;) {
    if (signals.WaitFor(std::chrono::milliseconds(200)) > 0) {
      std::fprintf(stderr, "\nkvgate up: stopping\n");
      break;
    }
    bool died = false;
    for (Child& c : children) {
      if (!c.process->Running()) {
        std::fprintf(stderr, "kvgate up: %s exited (code %d); stopping the stack\n",
                     c.name.c_str(), c.process->Wait());
        died = true;
      }
    }
    if (died) {
      StopAll(children);
      return 1;
    }
  }
  StopAll(children);
  return 0;
}

}  // namespace
}  // namespace kvgate::cli

KVGATE_COMMAND(up, "start the local stack: gateway + one CPU worker per policy endpoint", kvgate::cli::RunUp);
