// `kvgate policy check FILE`: validates a routing policy and prints a summary, or every error as
// file:line:col: message (exit 1).
// `kvgate route explain --policy FILE --prompt-tokens N [--max-tokens M] [--task T] [--text S]
//  [--precision full|compressed] [--tenant T] [--meta key=value]...`: the routing decision for one
// request, offline (no gateway, no tokenizer: the token count is given).
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_join.h"
#include "cli/command.h"
#include "gateway/policy/policy_loader.h"
#include "gateway/score/request_scorer.h"

namespace {

using kvgate::gateway::Policy;
using kvgate::gateway::PolicyParseResult;

int RunPolicy(int argc, char** argv) {
  if (argc != 3 || std::strcmp(argv[1], "check") != 0) {
    std::fprintf(stderr, "usage: kvgate policy check FILE\n");
    return 2;
  }
  const std::string path = argv[2];
  PolicyParseResult result = kvgate::gateway::ParsePolicyFile(path);
  if (result.policy == nullptr) {
    for (const auto& error : result.errors) std::fprintf(stderr, "%s\n", error.ToString().c_str());
    std::fprintf(stderr, "%s: %zu error(s)\n", path.c_str(), result.errors.size());
    return 1;
  }
  const Policy& policy = *result.policy;
  std::printf("%s: OK (hash %s)\n", path.c_str(), policy.hash.c_str());
  std::printf("pools (%zu):\n", policy.pools.size());
  for (const auto& pool : policy.pools) {
    std::string where = pool.dns.empty() ? absl::StrJoin(pool.endpoints, ", ") : "dns " + pool.dns;
    std::printf("  %-16s %-10s kv_format=%-10s max_context=%-7lld %s\n", pool.name.c_str(),
                kvgate::gateway::PoolPrecisionName(pool.precision), pool.kv_format.c_str(),
                static_cast<long long>(pool.max_context), where.c_str());
  }
  std::printf("task types (%zu, default %s):\n", policy.task_types.size(),
              policy.default_task_type.c_str());
  for (const auto& task : policy.task_types) {
    std::printf("  %-16s %zu rule(s)\n", task.name.c_str(), task.rules.size());
  }
  std::printf("routes (%zu, first match wins):\n", policy.routes.size());
  for (const auto& route : policy.routes) {
    std::printf("  %-20s -> %s\n", route.name.c_str(), absl::StrJoin(route.pools, ", ").c_str());
  }
  return 0;
}

int RouteUsage() {
  std::fprintf(stderr,
               "usage: kvgate route explain --policy FILE --prompt-tokens N [--max-tokens M]\n"
               "         [--task T] [--text S] [--precision full|compressed] [--tenant T]\n"
               "         [--meta key=value]...\n");
  return 2;
}

int RunRoute(int argc, char** argv) {
  if (argc < 2 || std::strcmp(argv[1], "explain") != 0) return RouteUsage();
  std::string policy_path, task, text, tenant;
  kvgate::gateway::RouteRequest request;
  bool have_tokens = false;
  for (int i = 2; i < argc; ++i) {
    std::string flag = argv[i];
    if (i + 1 >= argc) return RouteUsage();
    std::string value = argv[++i];
    if (flag == "--policy") {
      policy_path = value;
    } else if (flag == "--prompt-tokens") {
      if (!absl::SimpleAtoi(value, &request.prompt_tokens)) return RouteUsage();
      have_tokens = true;
    } else if (flag == "--max-tokens") {
      if (!absl::SimpleAtoi(value, &request.max_tokens)) return RouteUsage();
    } else if (flag == "--task") {
      task = value;
    } else if (flag == "--text") {
      text = value;
    } else if (flag == "--tenant") {
      tenant = value;
    } else if (flag == "--precision") {
      if (value == "full") {
        request.precision = kvgate::gateway::RequestedPrecision::kFull;
      } else if (value == "compressed") {
        request.precision = kvgate::gateway::RequestedPrecision::kCompressed;
      } else {
        return RouteUsage();
      }
    } else if (flag == "--meta") {
      size_t eq = value.find('=');
      if (eq == std::string::npos) return RouteUsage();
      request.metadata[value.substr(0, eq)] = value.substr(eq + 1);
    } else {
      return RouteUsage();
    }
  }
  if (policy_path.empty() || !have_tokens) return RouteUsage();
  PolicyParseResult result = kvgate::gateway::ParsePolicyFile(policy_path);
  if (result.policy == nullptr) {
    for (const auto& error : result.errors) std::fprintf(stderr, "%s\n", error.ToString().c_str());
    return 1;
  }
  request.task_type = task;
  request.prompt_text = text;
  request.tenant = tenant;
  absl::StatusOr<kvgate::gateway::RouteDecision> decision =
      kvgate::gateway::ScoreRequest(*result.policy, request);
  if (!decision.ok()) {
    std::fprintf(stderr, "%s\n", decision.status().ToString().c_str());
    return 1;
  }
  std::printf("%s", kvgate::gateway::DescribeDecision(*decision).c_str());
  return 0;
}

}  // namespace

KVGATE_COMMAND(policy, "policy check FILE: validate a routing policy", RunPolicy);
KVGATE_COMMAND(route, "route explain --policy FILE --prompt-tokens N ...: offline decision",
               RunRoute);
