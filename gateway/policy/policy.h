// RoutePolicy: the typed, validated form of a routing policy file (policies/*.yaml).
//
// A Policy is built once by the loader (policy_loader.h), never modified afterwards, and shared
// read-only between threads as std::shared_ptr<const Policy> (PolicyStore hands out snapshots).
// Every name it refers to has been checked to exist, every regex compiled, every range checked, so
// the scoring and picking code can use it without re-validating. docs/POLICY.md explains each key.
//
//   ASSIGN_OR_RETURN(std::shared_ptr<const Policy> policy,
//   LoadPolicyFile("policies/default.yaml")); const PoolSpec* full = policy->FindPool("full"); for
//   (const RouteSpec& route : policy->routes) { ... }   // first match wins
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "gateway/policy/quality_table.h"
#include "gateway/policy/text_pattern.h"

namespace kvgate::gateway {

// Where something was written: 1-based line and column in `file`.
struct SourceLocation {
  std::string file;
  int line = 0;
  int column = 0;
  // "file:line:col" (or just "file" when the position is unknown).
  std::string ToString() const;
};

// KV precision a pool serves.
enum class PoolPrecision { kFull, kCompressed };
const char* PoolPrecisionName(PoolPrecision precision);

// Precision a client asked for explicitly (mirrors kvgate.v1.Precision).
enum class RequestedPrecision { kUnspecified, kFull, kCompressed };
const char* RequestedPrecisionName(RequestedPrecision precision);

// A route's condition on the client's explicit precision.
enum class PrecisionCondition { kAny, kUnspecified, kFull, kCompressed };

// Why a request leaves a pool for the next one (the strings of kvgate.v1.Fallback.reason).
enum class FallbackReason {
  kNoHealthyEndpoint,
  kPoolFull,
  kContextTooLong,
  kFailedBeforeFirstToken,
  kFormatMismatch,
  // The pool's measured quality loss exceeds what the route tolerates (never a runtime fallback:
  // such pools are dropped when the decision is made).
  kQuality,
};
// "no_healthy_endpoint", "pool_full", "context_too_long", "failed_before_first_token",
// "format_mismatch".
const char* FallbackReasonName(FallbackReason reason);

struct PoolSpec {
  std::string name;
  // Static endpoints "host:port" (IPv6 as "[addr]:port"), as written. Empty when `dns` is set.
  std::vector<std::string> endpoints;
  // "name:port" re-resolved every dns_refresh_ms (Kubernetes headless Service). Empty when
  // `endpoints` is set; exactly one of the two is set.
  std::string dns;
  int64_t dns_refresh_ms = 5000;
  // KV format the pool's workers must report, canonical name ("fp16", "kivi2", "tq:k=4,v=3").
  std::string kv_format;
  PoolPrecision precision = PoolPrecision::kFull;
  // Largest prompt + output tokens one request may need in this pool. > 0.
  int64_t max_context = 0;
  // Path of a measured quality table as written (relative paths are relative to the policy
  // file's folder); empty if none. `quality` is that table, loaded with the policy.
  std::string quality_table;
  std::shared_ptr<const QualityTable> quality;
  // Eviction the workers run ("none", "h2o:...", "sink:..."), as written; "none" by default.
  std::string eviction = "none";
  // Queue depth above which an endpoint counts as full; unset: load_balancing.max_queue.
  std::optional<int64_t> max_queue;
  SourceLocation location;
};

// One classification rule. Each kind of criterion that is present must match (AND); within a
// kind: any keyword, any regex, all metadata pairs, any tenant. A rule has at least one criterion.
struct ClassificationRule {
  // Name used in the task_type_source "rule:<name>"; "<task_type>.<n>" (1-based) if not written.
  std::string name;
  std::vector<std::string> keywords;
  std::vector<std::string> regexes;
  std::vector<std::pair<std::string, std::string>> metadata;
  std::vector<std::string> tenants;
  // All keywords compiled into one case-insensitive whole-word pattern; null when no keywords.
  std::shared_ptr<const TextPattern> keyword_pattern;
  // One compiled pattern per entry of `regexes`, same order.
  std::vector<std::shared_ptr<const TextPattern>> regex_patterns;
  SourceLocation location;
};

struct TaskTypeSpec {
  std::string name;
  std::string description;
  std::vector<ClassificationRule> rules;
  SourceLocation location;
};

// Inclusive token-count range; an unset bound is open.
struct TokenRange {
  std::optional<int64_t> min;
  std::optional<int64_t> max;
  bool IsSet() const { return min.has_value() || max.has_value(); }
  bool Contains(int64_t value) const { return (!min || value >= *min) && (!max || value <= *max); }
  // "[min, max]" with "-inf"/"inf" for open bounds.
  std::string ToString() const;
};

// All present conditions must hold (AND). Empty conditions match every request.
struct RouteConditions {
  std::vector<std::string> task_types;  // any of
  TokenRange prompt_tokens;
  TokenRange total_tokens;           // prompt_tokens + max_tokens
  std::vector<std::string> tenants;  // any of
  PrecisionCondition precision = PrecisionCondition::kAny;
  bool IsCatchAll() const {
    return task_types.empty() && !prompt_tokens.IsSet() && !total_tokens.IsSet() &&
           tenants.empty() && precision == PrecisionCondition::kAny;
  }
};

struct RouteSpec {
  std::string name;
  RouteConditions when;
  // Primary pool first, then fallbacks. Non-empty; every name is a pool of the policy.
  std::vector<std::string> pools;
  // Human-readable why (empty if not written).
  std::string reason;
  // If set: the loss this route tolerates. Candidate pools are then ordered cheapest first (fewest
  // KV bits) and a compressed pool is kept only if its quality table shows a loss within the
  // tolerance at the request's context length; full-precision pools always qualify.
  std::optional<QualityTolerance> quality;
  SourceLocation location;
};

// Which failures move a request to the next candidate pool.
struct FallbackSpec {
  bool no_healthy_endpoint = true;
  bool pool_full = true;
  bool context_too_long = true;
  bool failed_before_first_token = true;
  bool format_mismatch = true;
  // Most pools one request is tried on (the first included). >= 1.
  int64_t max_attempts = 3;
  bool Allows(FallbackReason reason) const;
};

struct PrecisionRequestsSpec {
  // If true, a client's PRECISION_FULL is always served by a full-precision pool.
  bool honour_full = true;
};

// Endpoint picking and outlier ejection settings shared by all pools.
struct LoadBalancingSpec {
  int64_t max_queue = 64;            // waiting requests above this: endpoint counts as full
  int64_t eject_after_failures = 5;  // consecutive failures before ejection
  int64_t ejection_base_ms = 1000;   // first ejection; doubles each time, up to ejection_max_ms
  int64_t ejection_max_ms = 60000;
};

struct Policy {
  // Path (or name) the policy was loaded from; errors and logs name it.
  std::string source;
  // Stable hash of the file's bytes: 16 lowercase hex digits of FNV-1a 64.
  std::string hash;
  int64_t version = 1;
  std::vector<PoolSpec> pools;
  std::vector<TaskTypeSpec> task_types;
  std::string default_task_type;
  std::vector<RouteSpec> routes;  // ordered, first match wins, last one is a catch-all
  FallbackSpec fallback;
  PrecisionRequestsSpec precision_requests;
  LoadBalancingSpec load_balancing;

  const PoolSpec* FindPool(std::string_view name) const;
  const TaskTypeSpec* FindTaskType(std::string_view name) const;
  // Effective queue limit of a pool (its own max_queue or load_balancing.max_queue).
  int64_t MaxQueue(const PoolSpec& pool) const;
};

}  // namespace kvgate::gateway
