#include "gateway/score/request_scorer.h"
#include "gateway/policy/kv_format_name.h"

#include <algorithm>
#include <map>

#include <algorithm>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "gateway/internal/absl_string_view.h"

namespace kvgate::gateway {
namespace {

template <typename Container>
bool Contains(const Container& values, std::string_view value) {
  return std::find(values.begin(), values.end(), value) != values.end();
}

bool PrecisionMatches(PrecisionCondition condition, RequestedPrecision requested) {
  switch (condition) {
    case PrecisionCondition::kAny:
      return true;
    case PrecisionCondition::kUnspecified:
      return requested == RequestedPrecision::kUnspecified;
    case PrecisionCondition::kFull:
      return requested == RequestedPrecision::kFull;
    case PrecisionCondition::kCompressed:
      return requested == RequestedPrecision::kCompressed;
  }
  return false;
}

}  // namespace

bool RuleMatches(const ClassificationRule& rule, const RouteRequest& request) {
  // Cheap criteria first; the text scans run only if they pass.
  if (!rule.tenants.empty() && !Contains(rule.tenants, request.tenant)) return false;
  for (const auto& [key, value] : rule.metadata) {
    auto it = request.metadata.find(key);
    if (it == request.metadata.end() || it->second != value) return false;
  }
  if (rule.keyword_pattern != nullptr && !rule.keyword_pattern->Matches(request.prompt_text)) {
    return false;
  }
  if (!rule.regex_patterns.empty() &&
      std::none_of(rule.regex_patterns.begin(), rule.regex_patterns.end(),
                   [&](const auto& pattern) { return pattern->Matches(request.prompt_text); })) {
    return false;
  }
  return true;
}

absl::StatusOr<TaskClassification> ClassifyTask(const Policy& policy, const RouteRequest& request) {
  if (!request.task_type.empty()) {
    if (policy.FindTaskType(request.task_type) == nullptr) {
      std::vector<std::string> known;
      for (const TaskTypeSpec& task : policy.task_types) known.push_back(task.name);
      return absl::InvalidArgumentError(
          absl::StrCat("unknown task_type '", AsAbsl(request.task_type),
                       "'; this policy defines: ", absl::StrJoin(known, ", ")));
    }
    return TaskClassification{std::string(request.task_type), "request"};
  }
  for (const TaskTypeSpec& task : policy.task_types) {
    for (const ClassificationRule& rule : task.rules) {
      if (RuleMatches(rule, request)) {
        return TaskClassification{task.name, absl::StrCat("rule:", rule.name)};
      }
    }
  }
  return TaskClassification{policy.default_task_type, "default"};
}

const RouteSpec* MatchRoute(const Policy& policy, const RouteRequest& request,
                            std::string_view task_type) {
  const int64_t total = request.prompt_tokens + request.max_tokens;
  for (const RouteSpec& route : policy.routes) {
    const RouteConditions& when = route.when;
    if (!when.task_types.empty() && !Contains(when.task_types, task_type)) continue;
    if (!when.prompt_tokens.Contains(request.prompt_tokens)) continue;
    if (!when.total_tokens.Contains(total)) continue;
    if (!when.tenants.empty() && !Contains(when.tenants, request.tenant)) continue;
    if (!PrecisionMatches(when.precision, request.precision)) continue;
    return &route;
  }
  return nullptr;
}

std::vector<std::string> ApplyQualityTolerance(const Policy& policy,
                                               const QualityTolerance& tolerance,
                                               int64_t total_tokens,
                                               const std::vector<std::string>& candidates,
                                               std::vector<SkippedPool>* skipped,
                                               std::map<std::string, std::string>* basis) {
  std::vector<std::pair<double, std::string>> passing;  // (KV bits, pool), route order kept
  for (const std::string& name : candidates) {
    const PoolSpec* pool = policy.FindPool(name);
    if (pool == nullptr) continue;
    if (pool->precision == PoolPrecision::kFull) {
      passing.emplace_back(NominalKvBits(pool->kv_format), name);
      (*basis)[name] = absl::StrCat(pool->kv_format, " is full precision (no measured loss)");
      continue;
    }
    if (pool->quality == nullptr) {
      skipped->push_back({name, FallbackReason::kQuality,
                          "no quality_table: a compressed pool's loss must be measured"});
      continue;
    }
    int64_t measured_at = 0;
    const QualityMetrics* m =
        pool->quality->Find(pool->kv_format, pool->eviction, total_tokens, &measured_at);
    if (m == nullptr) {
      skipped->push_back({name, FallbackReason::kQuality,
                          absl::StrCat(pool->kv_format, " (eviction ", pool->eviction,
                                       ") is not in ", pool->quality->source)});
      continue;
    }
    std::string explanation;
    std::string failure = CheckTolerance(*m, tolerance, &explanation);
    std::string where = absl::StrCat(pool->kv_format, " at ", measured_at, " tokens (",
                                     pool->quality->source, ")");
    if (!failure.empty()) {
      skipped->push_back({name, FallbackReason::kQuality, absl::StrCat(where, ": ", failure)});
      continue;
    }
    passing.emplace_back(NominalKvBits(pool->kv_format), name);
    (*basis)[name] = absl::StrCat(where, ": ", explanation);
  }
  std::stable_sort(passing.begin(), passing.end(),
                   [](const auto& a, const auto& b) { return a.first < b.first; });
  std::vector<std::string> ordered;
  for (auto& [bits, name] : passing) ordered.push_back(name);
  return ordered;
}

absl::StatusOr<RouteDecision> ScoreRequest(const Policy& policy, const RouteRequest& request) {
  if (request.prompt_tokens < 0 || request.max_tokens < 0) {
    return absl::InvalidArgumentError(absl::StrCat("negative token count (prompt ",
                                                   request.prompt_tokens, ", max_tokens ",
                                                   request.max_tokens, ")"));
  }
  RouteDecision decision;
  decision.prompt_tokens = request.prompt_tokens;
  decision.max_tokens = request.max_tokens;
  decision.total_tokens = request.prompt_tokens + request.max_tokens;
  decision.policy_hash = policy.hash;
  decision.max_attempts = policy.fallback.max_attempts;

  absl::StatusOr<TaskClassification> task = ClassifyTask(policy, request);
  if (!task.ok()) return task.status();
  decision.task = *std::move(task);

  const RouteSpec* route = MatchRoute(policy, request, decision.task.task_type);
  if (route == nullptr) {
    // Unreachable for a validated policy; reported rather than assumed.
    return absl::InternalError(absl::StrCat(
        "policy ", policy.source, " has no route for task type '", decision.task.task_type, "'"));
  }
  decision.matched_route = route->name;
  decision.candidate_pools = route->pools;

  std::string precision_note;
  if (request.precision == RequestedPrecision::kFull && policy.precision_requests.honour_full) {
    std::vector<std::string> full;
    for (const std::string& name : route->pools) {
      const PoolSpec* pool = policy.FindPool(name);
      if (pool != nullptr && pool->precision == PoolPrecision::kFull) full.push_back(name);
    }
    if (full.empty()) {
      for (const PoolSpec& pool : policy.pools) {
        if (pool.precision == PoolPrecision::kFull) full.push_back(pool.name);
      }
      precision_note = "; full precision requested: route has no full pool, using all full pools";
    } else if (full.size() != route->pools.size()) {
      precision_note = "; full precision requested: compressed pools removed";
    } else {
      precision_note = "; full precision requested";
    }
    if (full.empty()) {
      return absl::UnavailableError(
          "full precision requested but the policy has no full-precision pool");
    }
    decision.candidate_pools = std::move(full);
  }

  std::map<std::string, std::string> quality_basis;
  std::vector<std::string> ordered = decision.candidate_pools;
  if (route->quality) {
    ordered = ApplyQualityTolerance(policy, *route->quality, decision.total_tokens,
                                    decision.candidate_pools, &decision.skipped, &quality_basis);
  }
  for (const std::string& name : ordered) {
    const PoolSpec* pool = policy.FindPool(name);
    if (pool == nullptr) {
      return absl::InternalError(
          absl::StrCat("route '", route->name, "' names unknown pool '", name, "'"));
    }
    if (pool->max_context < decision.total_tokens) {
      std::string detail = absl::StrCat(
          "needs ", decision.total_tokens, " tokens (prompt ", decision.prompt_tokens,
          " + max_tokens ", decision.max_tokens, "), pool max_context ", pool->max_context);
      if (!policy.fallback.context_too_long) {
        return absl::OutOfRangeError(
            absl::StrCat("pool '", name, "' ", detail, " (context_too_long fallback disabled)"));
      }
      decision.skipped.push_back(SkippedPool{name, FallbackReason::kContextTooLong, detail});
      continue;
    }
    decision.viable_pools.push_back(name);
  }
  if (decision.viable_pools.empty() && route->quality) {
    return absl::UnavailableError(absl::StrCat(
        "no candidate pool of route '", route->name,
        "' meets its quality tolerance and can hold the request (pools ",
        absl::StrJoin(decision.candidate_pools, ", "), ")"));
  }
  if (!decision.viable_pools.empty() && route->quality) {
    decision.quality_basis = quality_basis[decision.viable_pools.front()];
    decision.quality_basis_by_pool = quality_basis;
  }
  if (decision.viable_pools.empty()) {
    int64_t largest = 0;
    for (const std::string& name : decision.candidate_pools) {
      largest = std::max(largest, policy.FindPool(name)->max_context);
    }
    return absl::OutOfRangeError(absl::StrCat(
        "prompt ", decision.prompt_tokens, " + max_tokens ", decision.max_tokens, " = ",
        decision.total_tokens, " tokens exceeds the context of every candidate pool (largest ",
        largest, ", pools ", absl::StrJoin(decision.candidate_pools, ", "), ")"));
  }

  decision.reason = absl::StrCat(
      route->reason.empty() ? absl::StrCat("route '", route->name, "'") : route->reason, " [route ",
      route->name, "; task ", decision.task.task_type, " (", decision.task.source, "); ",
      decision.prompt_tokens, " prompt + ", decision.max_tokens, " output tokens", precision_note,
      "]");
  return decision;
}

std::string DescribeDecision(const RouteDecision& decision) {
  std::string out;
  absl::StrAppend(&out, "task type:       ", decision.task.task_type, " (", decision.task.source,
                  ")\n");
  absl::StrAppend(&out, "tokens:          ", decision.prompt_tokens, " prompt + ",
                  decision.max_tokens, " max output = ", decision.total_tokens, "\n");
  absl::StrAppend(&out, "matched route:   ", decision.matched_route, "\n");
  absl::StrAppend(&out, "candidate pools: ", absl::StrJoin(decision.candidate_pools, ", "), "\n");
  absl::StrAppend(&out, "viable pools:    ", absl::StrJoin(decision.viable_pools, ", "),
                  " (at most ", decision.max_attempts, " tried)\n");
  for (const SkippedPool& skipped : decision.skipped) {
    absl::StrAppend(&out, "skipped:         ", skipped.pool, ": ",
                    FallbackReasonName(skipped.reason), " (", skipped.detail, ")\n");
  }
  absl::StrAppend(&out, "reason:          ", decision.reason, "\n");
  if (!decision.quality_basis.empty()) {
    absl::StrAppend(&out, "quality basis:   ", decision.quality_basis, "\n");
  }
  absl::StrAppend(&out, "policy hash:     ", decision.policy_hash, "\n");
  return out;
}

}  // namespace kvgate::gateway
