#include "workers/engine/sampler.h"

#include <algorithm>
#include <cmath>

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

Sampler::Sampler(const SamplingConfig& config) : config_(config), rng_(config.seed) {
  if (config_.top_p <= 0.0f) config_.top_p = 1.0f;
}

int32_t Sampler::Sample(std::span<const float> logits) {
  const int32_t vocab = static_cast<int32_t>(logits.size());
  if (config_.temperature <= 0.0f) {
    // Greedy; the lowest id wins a tie so results do not depend on scan order.
    return static_cast<int32_t>(std::max_element(logits.begin(), logits.end()) - logits.begin());
  }
  scratch_.clear();
  scratch_.reserve(vocab);
  for (int32_t i = 0; i < vocab; ++i) {
    if (std::isfinite(logits[i])) scratch_.emplace_back(logits[i], i);
  }
  if (scratch_.empty()) return 0;
  auto by_logit_desc = [](const auto& a, const auto& b) {
    return a.first != b.first ? a.first > b.first : a.second < b.second;
  };
  size_t keep = scratch_.size();
  if (config_.top_k > 0 && static_cast<size_t>(config_.top_k) < keep) {
    keep = config_.top_k;
    std::partial_sort(scratch_.begin(), scratch_.begin() + keep, scratch_.end(), by_logit_desc);
    scratch_.resize(keep);
  } else {
    std::sort(scratch_.begin(), scratch_.end(), by_logit_desc);
  }
  // Softmax at temperature over the kept candidates (sorted, descending).
  const double inv_t = 1.0 / config_.temperature;
  const double max_logit = scratch_.front().first;
  std::vector<double> probs(scratch_.size());
  double total = 0;
  for (size_t i = 0; i < scratch_.size(); ++i) {
    probs[i] = std::exp((scratch_[i].first - max_logit) * inv_t);
    total += probs[i];
  }
  // Nucleus: smallest prefix whose mass reaches top_p.
  size_t n = scratch_.size();
  if (config_.top_p < 1.0f) {
    double mass = 0;
    for (size_t i = 0; i < scratch_.size(); ++i) {
      mass += probs[i] / total;
      if (mass >= config_.top_p) {
        n = i + 1;
        break;
      }
    }
  }
  double kept_total = 0;
  for (size_t i = 0; i < n; ++i) kept_total += probs[i];
  std::uniform_real_distribution<double> uniform(0.0, kept_total);
  double r = uniform(rng_);
  for (size_t i = 0; i < n; ++i) {
    r -= probs[i];
    if (r <= 0) return scratch_[i].second;
  }
  return scratch_[n - 1].second;
}

}  // namespace kvgate::worker
