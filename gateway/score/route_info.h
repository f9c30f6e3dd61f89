// Conversion of a RouteDecision (plus what happened when it was carried out) into the public
// kvgate.v1.RouteInfo and RequestScore messages.
//
//   kvgate::v1::RouteInfo info;
//   FillRouteInfo(decision, {.pool = "full", .kv_format = "fp16", .worker = "10.0.0.7:50062",
//                            .fallbacks = tried_and_failed}, &info);
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "gateway/score/request_scorer.h"
#include "kvgate/v1/gateway.pb.h"

namespace kvgate::gateway {

// Where the request ended up. Empty `worker` for a dry run (Gateway.Route).
struct ServedBy {
  std::string pool;
  // As the worker reports it (the policy's declaration when unknown).
  std::string kv_format;
  std::string worker;
  // Pools tried and left at run time, after the decision's pre-filtered ones, in order.
  std::vector<SkippedPool> fallbacks;
};

// Fills every RouteInfo field. `fallbacks` lists decision.skipped first,
// then served.fallbacks.
void FillRouteInfo(const RouteDecision& decision, const ServedBy& served,
                   kvgate::v1::RouteInfo* info);

void FillRequestScore(const RouteDecision& decision, int64_t overhead_us,
                      kvgate::v1::RequestScore* score);

}  // namespace kvgate::gateway
