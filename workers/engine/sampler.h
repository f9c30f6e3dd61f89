// Sampler: picks the next token from a row of logits: greedy (temperature 0), or temperature with
// optional top-k and top-p (nucleus) filtering, from a per-request seeded generator so that the
// same seed, prompt and parameters give the same tokens.
//
//   Sampler sampler(params);                // one per request
//   int32_t next = sampler.Sample(logits);  // logits: [vocab_size]
#pragma once

#include <cstdint>
#include <random>
#include <span>
#include <vector>

#include "absl/status/status.h"

namespace kvgate::worker {

struct SamplingConfig {
  float temperature = 0.0f;  // 0: greedy
  int top_k = 0;             // 0: off
  float top_p = 1.0f;        // 1: off
  uint64_t seed = 0;
};

// InvalidArgumentError for values outside the documented ranges (temperature 0..2, top_k >= 0,
// top_p in [0, 1]; top_p 0 is read as "off").
absl::Status ValidateSamplingConfig(const SamplingConfig& config, int vocab_size);

class Sampler {
 public:
  explicit Sampler(const SamplingConfig& config);
  int32_t Sample(std::span<const float> logits);

 private:
  SamplingConfig config_;
  std::mt19937_64 rng_;
  std::vector<std::pair<float, int32_t>> scratch_;  // (logit, id) candidates
};

}  // namespace kvgate::worker
