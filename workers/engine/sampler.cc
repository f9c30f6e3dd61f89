#include "workers/engine/sampler.h"

#include <algorithm>
#include <cmath>
#include <limits>

#include "absl/strings/str_format.h"

namespace kvgate::worker {

absl::Status ValidateSamplingConfig(const SamplingConfig& config, int vocab_size) {
  if (!(config.temperature >= 0.0f && config.temperature <= 2.0f)) {
    return absl::InvalidArgumentError(
        absl::StrFormat("temperature must be in [0, 2], got %g", config.temperature));
  }
  if (config.top_k < 0 || config.top_k > vocab_size) {
    return absl::InvalidArgumentError(
        absl::StrFormat("top_k must be in [0, %d], got %d", vocab_size, config.top_k));
  }
  if (!(config.top_p >= 0.0f && config.top_p <= 1.0f)) {
    return absl::InvalidArgumentError(
        absl::StrFormat("top_p must be in [0, 1], got %g", config.top_p));
  }
  return absl::OkStatus();
}

int32_t SampleWithUniform(std::span<const float> logits, float temperature, int top_k, float top_p,
                          double uniform, std::vector<std::pair<float, int32_t>>* scratch) {
  const int32_t vocab = static_cast<int32_t>(logits.size());
  if (temperature <= 0.0f) {
    // Greedy; the lowest id wins a tie so results do not depend on scan order.
    return static_cast<int32_t>(std::max_element(logits.begin(), logits.end()) - logits.begin());
  }
  std::vector<std::pair<float, int32_t>> local;
  std::vector<std::pair<float, int32_t>>& candidates = scratch != nullptr ? *scratch : local;
  candidates.clear();
  candidates.reserve(vocab);
  for (int32_t i = 0; i < vocab; ++i) {
    if (std::isfinite(logits[i])) candidates.emplace_back(logits[i], i);
  }
  if (candidates.empty()) return 0;
  auto by_logit_desc = [](const auto& a, const auto& b) {
    return a.first != b.first ? a.first > b.first : a.second < b.second;
  };
  size_t keep = candidates.size();
  if (top_k > 0 && static_cast<size_t>(top_k) < keep) {
    keep = top_k;
    std::partial_sort(candidates.begin(), candidates.begin() + keep, candidates.end(),
                      by_logit_desc);
    candidates.resize(keep);
  } else {
    std::sort(candidates.begin(), candidates.end(), by_logit_desc);
  }
  // Softmax at temperature over the kept candidates (sorted, descending).
  const double inv_t = 1.0 / temperature;
  const double max_logit = candidates.front().first;
  std::vector<double> probs(candidates.size());
  double total = 0;
  for (size_t i = 0; i < candidates.size(); ++i) {
    probs[i] = std::exp((candidates[i].first - max_logit) * inv_t);
    total += probs[i];
  }
  // Nucleus: smallest prefix whose mass reaches top_p.
  size_t n = candidates.size();
  if (top_p > 0.0f && top_p < 1.0f) {
    double mass = 0;
    for (size_t i = 0; i < candidates.size(); ++i) {
      mass += probs[i] / total;
      if (mass >= top_p) {
        n = i + 1;
        break;
      }
    }
  }
  double kept_total = 0;
  for (size_t i = 0; i < n; ++i) kept_total += probs[i];
  double r = uniform * kept_total;
  for (size_t i = 0; i < n; ++i) {
    r -= probs[i];
    if (r <= 0) return candidates[i].second;
  }
  return candidates[n - 1].second;
}

Sampler::Sampler(const SamplingConfig& config) : config_(config), rng_(config.seed) {
  if (config_.top_p <= 0.0f) config_.top_p = 1.0f;
}

double Sampler::DrawUniform() {
  // What std::uniform_real_distribution<double>(0, 1) draws; clamped below 1 (older libstdc++
  // could round generate_canonical up to 1.0).
  const double u = std::generate_canonical<double, std::numeric_limits<double>::digits>(rng_);
  return std::min(u, std::nextafter(1.0, 0.0));
}

int32_t Sampler::Sample(std::span<const float> logits) {
  if (greedy()) return SampleWithUniform(logits, config_.temperature, 0, 1.0f, 0.0, &scratch_);
  return SampleWithUniform(logits, config_.temperature, config_.top_k, config_.top_p, DrawUniform(),
                           &scratch_);
}

DeviceSampling Sampler::NextDeviceSampling() {
  return {.temperature = config_.temperature,
          .top_k = config_.top_k,
          .top_p = config_.top_p,
          .uniform = greedy() ? 0.0 : DrawUniform()};
}

}  // namespace kvgate::worker
