// Sampler: picks the next token from a row of logits: greedy (temperature 0), or temperature with
// optional top-k and top-p (nucleus) filtering, from a per-request seeded generator so that the
// same seed, prompt and parameters give the same tokens. The random draw is separate from the
// pick (SampleWithUniform), so a runner that samples on the device (ModelRunner::ForwardSample)
// gets the same draw from NextDeviceSampling and reproduces the same tokens.
//
//   Sampler sampler(params);                // one per request
//   int32_t next = sampler.Sample(logits);  // logits: [vocab_size]
//   DeviceSampling d = sampler.NextDeviceSampling();  // or: let the device pick with this draw
#pragma once

#include <cstdint>
#include <random>
#include <span>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "workers/backend/model_runner.h"

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

// The pick itself, given the draw `uniform` in [0, 1) (ignored when greedy):
//   greedy (temperature <= 0): argmax, the lowest id on ties;
//   otherwise the finite logits sorted descending (ties: lowest id first), the first top_k of them
//   (top_k > 0), softmax at temperature (in double), the smallest prefix whose mass reaches top_p
//   (top_p in (0, 1)), then the first candidate whose cumulative mass reaches uniform x the kept
//   mass (inverse CDF); 0 when no logit is finite.
// `scratch` (optional) is reused between calls to avoid allocations.
int32_t SampleWithUniform(std::span<const float> logits, float temperature, int top_k, float top_p,
                          double uniform,
                          std::vector<std::pair<float, int32_t>>* scratch = nullptr);

class Sampler {
 public:
  explicit Sampler(const SamplingConfig& config);
  // SampleWithUniform with the next draw of the generator (none when greedy).
  int32_t Sample(std::span<const float> logits);
  bool greedy() const { return config_.temperature <= 0.0f; }
  // The next draw of the request's generator, in [0, 1).
  double DrawUniform();
  // The parameters for ModelRunner::ForwardSample; draws the uniform unless greedy, exactly as
  // Sample would, so both paths consume the generator alike.
  DeviceSampling NextDeviceSampling();

 private:
  SamplingConfig config_;
  std::mt19937_64 rng_;
  std::vector<std::pair<float, int32_t>> scratch_;  // (logit, id) candidates
};

}  // namespace kvgate::worker
