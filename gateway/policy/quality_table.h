// QualityTable: what each KV format (and eviction setting) measurably costs in accuracy on a
// model, per context length, as `kvgate eval` writes it (models/<model>/quality.yaml; schema in
// docs/QUALITY.md). A policy pool names its table with `quality_table:`, and a route that states a
// `quality:` tolerance sends a request to the cheapest pool whose measured loss at the request's
// context length is within it.
//
//   ASSIGN_OR_RETURN(auto table, LoadQualityTable("models/reference/quality.yaml"));
//   int64_t measured_at = 0;
//   const QualityMetrics* m = table->Find("tq4", "none", /*context=*/1500, &measured_at);
//   // m: the row measured at the smallest context >= 1500 (else the largest one measured)
#pragma once

#include <cmath>
#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <string>

#include "absl/status/statusor.h"

namespace kvgate::gateway {

// One measurement against the full-precision baseline. NaN: not measured.
struct QualityMetrics {
  double ppl_ratio = NAN;  // perplexity / fp16 perplexity (1.0 = no loss)
  double kl = NAN;         // mean KL divergence from fp16's next-token distribution (nats)
  double top1 = NAN;       // fraction of positions whose argmax equals fp16's
  double retrieval = NAN;  // early-context retrieval score, 0..1
};

struct QualityTable {
  std::string source;  // file it was read from
  std::string model;   // model the table was measured on
  // "<format>|<eviction>" (canonical names, eviction "none" when absent) -> context -> metrics.
  std::map<std::string, std::map<int64_t, QualityMetrics>> entries;

  // The row for (format, eviction) measured at the smallest context >= `context`, else at the
  // largest context measured; null when the setting was not measured. `measured_context` receives
  // the context of the row returned.
  const QualityMetrics* Find(const std::string& format, const std::string& eviction,
                             int64_t context, int64_t* measured_context) const;
};

// What a route tolerates; unset bounds are not checked.
struct QualityTolerance {
  std::optional<double> max_ppl_ratio;
  std::optional<double> max_kl;
  std::optional<double> min_top1;
  std::optional<double> min_retrieval;
  bool IsSet() const { return max_ppl_ratio || max_kl || min_top1 || min_retrieval; }
};

// Checks `metrics` against `tolerance`. Returns "" when within it, else which bound failed
// ("kl 0.31 > 0.05"); a bound on a metric the table did not measure fails ("retrieval not
// measured"). `*explanation` receives the comparisons made ("kl 0.002 <= 0.05, ...").
std::string CheckTolerance(const QualityMetrics& metrics, const QualityTolerance& tolerance,
                           std::string* explanation);

// Reads a quality table YAML file as `kvgate eval` writes it:
//   model: reference
//   formats:
//     tq3.5:                          # "FORMAT" or "FORMAT+EVICTION"
//       1024: {ppl_ratio: 1.004, kl: 0.0021, top1: 0.985, retrieval: 0.92}
// Other keys are ignored. InvalidArgumentError names file:line:col of the problem.
absl::StatusOr<std::shared_ptr<const QualityTable>> LoadQualityTable(const std::string& path);

}  // namespace kvgate::gateway
