// KV-format and eviction names a policy may declare for a pool, checked and canonicalized so
// that a pool's declaration compares equal to what its workers report in LoadReport.kv_format.
//
// The grammar is kvgate::kernels::ParseKvFormat / ParseEviction (kernels/include/kvgate/kernels/
// kv_format.h, a small library with no server dependencies): one grammar for workers and policies.
//
//   ASSIGN_OR_RETURN(std::string canonical, CanonicalKvFormatName("TQ:k=4.0,v=3"));  // tq:k=4,v=3
//   RETURN_IF_ERROR(ValidateEvictionName("h2o:heavy=0.1,recent=0.1"));
#pragma once

#include <string>
#include <string_view>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace kvgate::gateway {

// Accepts what kernels::ParseKvFormat accepts (fp16 bf16 fp8 int8 kivi2 kivi4 tq4 tq3.5 tq3 tq2.5,
// "tq:k=K,v=V[,qjl]", each optionally "/fp16=F:L"), case-insensitive, surrounding spaces ignored.
// Returns the canonical name; InvalidArgumentError listing the accepted names otherwise.
absl::StatusOr<std::string> CanonicalKvFormatName(std::string_view name);

// Average bits per stored K/V element of a canonical format name (fp16 16, fp8/int8 8, kivi4 4,
// tq3.5 3.5, tq:k=4,v=3 3.5); metadata not included. Used to order pools cheapest first.
double NominalKvBits(std::string_view canonical_format);

// Accepts what kernels::ParseEviction accepts: "none", "h2o:heavy=F,recent=F",
// "sink:sinks=N,window=N".
absl::Status ValidateEvictionName(std::string_view eviction);

}  // namespace kvgate::gateway
