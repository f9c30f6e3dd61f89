// ScoreRequest: the pure routing decision for one request under one Policy snapshot.
//
// Given what the gateway knows before forwarding (prompt text, exact prompt token count from the
// served model's tokenizer, max_tokens, optional explicit task type and precision, tenant,
// metadata), it classifies the task type, picks the first matching route, orders the candidate
// pools (primary first) and drops, up front, pools that cannot hold prompt + max_tokens. No I/O,
// no clock, no locks: the same inputs always give the same decision. The decision carries
// everything kvgate.v1.RouteInfo needs except the serving worker and its reported kv_format,
// which the endpoint picker supplies.
//
//   RouteRequest request{.prompt_text = prompt, .prompt_tokens = 1800, .max_tokens = 200};
//   ASSIGN_OR_RETURN(RouteDecision decision, ScoreRequest(*policy, request));
//   for (const std::string& pool : decision.viable_pools) { /* try in order */ }
//
// Classification cost: one PCRE2 (JIT) scan of the prompt per rule that has keywords or regexes,
// in rule order, stopping at the first rule that matches.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <string_view>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/statusor.h"
#include "gateway/policy/policy.h"

namespace kvgate::gateway {

struct RouteRequest {
  std::string_view prompt_text;
  // Exact prompt token count (BOS included when added). >= 0.
  int64_t prompt_tokens = 0;
  // Requested output tokens after defaults. >= 0.
  int64_t max_tokens = 0;
  // Explicit task type; empty: the policy's rules decide. Must name a task type of the policy.
  std::string_view task_type;
  RequestedPrecision precision = RequestedPrecision::kUnspecified;
  std::string_view tenant;
  absl::flat_hash_map<std::string, std::string> metadata;
};

struct TaskClassification {
  std::string task_type;
  // "request" (explicit), "rule:<rule name>" or "default".
  std::string source;
};

// A pool dropped before any endpoint was tried, and why.
struct SkippedPool {
  std::string pool;
  FallbackReason reason;
  std::string detail;
};

struct RouteDecision {
  int64_t prompt_tokens = 0;
  int64_t max_tokens = 0;
  int64_t total_tokens = 0;  // prompt_tokens + max_tokens
  TaskClassification task;
  std::string matched_route;
  // Pools in the route's order, after honouring a full-precision request (RouteInfo's
  // candidate_pools).
  std::vector<std::string> candidate_pools;
  // The candidates left to try, in order, after pre-filtering; never empty in a returned
  // decision. The server tries at most `max_attempts` of them.
  std::vector<std::string> viable_pools;
  // Candidates dropped by pre-filtering (RouteInfo's fallbacks start with these).
  std::vector<SkippedPool> skipped;
  int64_t max_attempts = 1;
  // Human-readable explanation (RouteInfo's reason).
  std::string reason;
  // When the route states a quality tolerance: the measurement that qualified the first viable
  // pool (RouteInfo's quality_basis), e.g. "tq4 at 1024 tokens (quality.yaml): kl 0.002 <= 0.05".
  std::string quality_basis;
  // The same for every pool that qualified (the serving pool may be a fallback).
  std::map<std::string, std::string> quality_basis_by_pool;
  std::string policy_hash;
};

// Classifies the task type: the explicit one (InvalidArgumentError if the policy has no such task
// type), else the first rule in file order (task types in order, their rules in order) that
// matches, else the policy's default.
absl::StatusOr<TaskClassification> ClassifyTask(const Policy& policy, const RouteRequest& request);

// True if `rule` matches the request (see ClassificationRule for the semantics).
bool RuleMatches(const ClassificationRule& rule, const RouteRequest& request);

// First route whose conditions hold for the request with task type `task_type`. Never null for a
// validated policy (its last route is a catch-all).
const RouteSpec* MatchRoute(const Policy& policy, const RouteRequest& request,
                            std::string_view task_type);

// The full decision. Errors:
//   InvalidArgumentError: negative token counts, unknown explicit task type;
//   UnavailableError: full precision requested and honoured, but the policy has no full pool;
//   OutOfRangeError: prompt + max_tokens exceed every candidate pool's max_context (or the first
//     one's when the policy disables the context_too_long fallback).
absl::StatusOr<RouteDecision> ScoreRequest(const Policy& policy, const RouteRequest& request);

// Multi-line human-readable dump of a decision (for `kvgate route explain`).
std::string DescribeDecision(const RouteDecision& decision);

}  // namespace kvgate::gateway
