// KV-format and eviction names a policy may declare for a pool, checked and canonicalized so
// that a pool's declaration compares equal to what its workers report in LoadReport.kv_format.
//
// The accepted names are those of kvgate::kernels::ParseKvFormat (kernels/include/kvgate/kernels/
// kv_format.h); this local copy keeps the gateway free of the kernels library.
//
//   ASSIGN_OR_RETURN(std::string canonical, CanonicalKvFormatName("TQ:k=4.0,v=3"));  //
//   "tq:k=4,v=3" RETURN_IF_ERROR(ValidateEvictionName("h2o:heavy=0.1,recent=0.1"));
#pragma once

#include <string>
#include <string_view>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace kvgate::gateway {

// Accepts fp16 bf16 fp8 int8 kivi2 kivi4 tq4 tq3.5 tq3 tq2.5 and "tq:k=K,v=V[,qjl]" with K, V in
// 1..8 in steps of 0.5 (case-insensitive, surrounding spaces ignored). Returns the canonical
// lowercase name; InvalidArgumentError listing the accepted names otherwise.
absl::StatusOr<std::string> CanonicalKvFormatName(std::string_view name);

// Average bits per stored K/V element of a canonical format name (fp16 16, fp8/int8 8, kivi4 4,
// tq3.5 3.5, tq:k=4,v=3 3.5); metadata not included. Used to order pools cheapest first.
double NominalKvBits(std::string_view canonical_format);

// Accepts "none", "h2o:heavy=F,recent=F" (fractions in (0, 1), either key optional) and
// "sink:sinks=N,window=N" (positive integers, either key optional).
absl::Status ValidateEvictionName(std::string_view eviction);

}  // namespace kvgate::gateway
