#include "gateway/score/route_info.h"

namespace kvgate::gateway {
namespace {
void AddFallback(const SkippedPool& skipped, kvgate::v1::RouteInfo* info) {
  kvgate::v1::Fallback* fallback = info->add_fallbacks();
  fallback->set_from_pool(skipped.pool);
  fallback->set_reason(std::string(FallbackReasonName(skipped.reason)));
  fallback->set_detail(skipped.detail);
}
}  // namespace

void FillRouteInfo(const RouteDecision& decision, const ServedBy& served,
                   kvgate::v1::RouteInfo* info) {
  info->set_pool(served.pool);
  info->set_kv_format(served.kv_format);
  info->set_worker(served.worker);
  info->set_matched_route(decision.matched_route);
  info->set_task_type(decision.task.task_type);
  info->set_task_type_source(decision.task.source);
  info->set_reason(decision.reason);
  for (const SkippedPool& skipped : decision.skipped) AddFallback(skipped, info);
  for (const SkippedPool& skipped : served.fallbacks) AddFallback(skipped, info);
  info->set_policy_hash(decision.policy_hash);
  for (const std::string& pool : decision.candidate_pools) info->add_candidate_pools(pool);
  auto basis = decision.quality_basis_by_pool.find(served.pool);
  info->set_quality_basis(basis != decision.quality_basis_by_pool.end() ? basis->second
                                                                         : decision.quality_basis);
}

void FillRequestScore(const RouteDecision& decision, int64_t overhead_us,
                      kvgate::v1::RequestScore* score) {
  score->set_prompt_tokens(static_cast<int32_t>(decision.prompt_tokens));
  score->set_max_tokens(static_cast<int32_t>(decision.max_tokens));
  score->set_total_tokens(static_cast<int32_t>(decision.total_tokens));
  score->set_task_type(decision.task.task_type);
  score->set_task_type_source(decision.task.source);
  score->set_overhead_us(overhead_us);
}

}  // namespace kvgate::gateway
