#include "gateway/pool/endpoint_pool.h"

#include <algorithm>
#include <memory>
#include <set>

#include "absl/random/random.h"
#include "absl/random/uniform_int_distribution.h"
#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "gateway/policy/kv_format_name.h"

namespace kvgate::gateway {

const char* HealthStateName(HealthState state) {
  switch (state) {
    case HealthState::kServing:
      return "SERVING";
    case HealthState::kNotServing:
      return "NOT_SERVING";
    case HealthState::kUnknown:
      break;
  }
  return "UNKNOWN";
}

double LoadScore(const LoadSnapshot& load) {
  double used_fraction = 0;
  if (load.kv_blocks_total > 0) {
    used_fraction = 1.0 - static_cast<double>(
                              std::clamp<int64_t>(load.kv_blocks_free, 0, load.kv_blocks_total)) /
                              static_cast<double>(load.kv_blocks_total);
  }
  return static_cast<double>(load.waiting_requests) + 0.25 * load.running_requests +
         2.0 * used_fraction;
}

EndpointPool::EndpointPool(std::string name, EndpointPoolOptions options, const Clock* clock,
                           RandomIndexFn random)
    : name_(std::move(name)),
      clock_(clock),
      random_(std::move(random)),
      options_(std::move(options)) {
  if (!random_) {
    auto generator = std::make_shared<absl::BitGen>();
    // Called only under mutex_, so the generator needs no lock of its own.
    random_ = [generator](size_t n) {
      return absl::uniform_int_distribution<size_t>(0, n - 1)(*generator);
    };
  }
}

void EndpointPool::SetEndpoints(const std::vector<std::string>& endpoints) {
  absl::MutexLock lock(&mutex_);
  std::set<std::string, std::less<>> wanted(endpoints.begin(), endpoints.end());
  for (auto it = endpoints_.begin(); it != endpoints_.end();) {
    it = wanted.count(it->first) > 0 ? std::next(it) : endpoints_.erase(it);
  }
  for (const std::string& endpoint : wanted) endpoints_.try_emplace(endpoint);
}

std::vector<std::string> EndpointPool::Endpoints() const {
  absl::MutexLock lock(&mutex_);
  std::vector<std::string> out;
  for (const auto& [endpoint, state] : endpoints_) out.push_back(endpoint);
  return out;
}

void EndpointPool::SetOptions(EndpointPoolOptions options) {
  absl::MutexLock lock(&mutex_);
  options_ = std::move(options);
}

void EndpointPool::ReportHealth(std::string_view endpoint, HealthState health) {
  absl::MutexLock lock(&mutex_);
  auto it = endpoints_.find(endpoint);
  if (it != endpoints_.end()) it->second.health = health;
}

void EndpointPool::ReportLoad(std::string_view endpoint, const LoadSnapshot& load) {
  absl::MutexLock lock(&mutex_);
  auto it = endpoints_.find(endpoint);
  if (it == endpoints_.end()) return;
  it->second.load = load;
  if (load.kv_format.empty()) {
    it->second.canonical_reported_format.clear();
  } else {
    absl::StatusOr<std::string> canonical = CanonicalKvFormatName(load.kv_format);
    it->second.canonical_reported_format =
        canonical.ok() ? *canonical : absl::AsciiStrToLower(load.kv_format);
  }
}

absl::Duration EndpointPool::BackoffLocked(int64_t ejections) const {
  absl::Duration backoff = options_.ejection_base;
  for (int64_t i = 0; i < ejections && backoff < options_.ejection_max; ++i) backoff *= 2;
  return std::min(backoff, options_.ejection_max);
}

void EndpointPool::ReportSuccess(std::string_view endpoint) {
  absl::MutexLock lock(&mutex_);
  auto it = endpoints_.find(endpoint);
  if (it == endpoints_.end()) return;
  Endpoint& state = it->second;
  state.consecutive_failures = 0;
  state.ejections = 0;
  state.ejected_until.reset();
  state.probe_deadline.reset();
}

void EndpointPool::ReportFailure(std::string_view endpoint) {
  const absl::Time now = clock_->Now();
  absl::MutexLock lock(&mutex_);
  auto it = endpoints_.find(endpoint);
  if (it == endpoints_.end()) return;
  Endpoint& state = it->second;
  ++state.consecutive_failures;
  const bool ejected_now = state.ejected_until.has_value() && now < *state.ejected_until;
  const bool probing = state.probe_deadline.has_value() ||
                       (state.ejected_until.has_value() && now >= *state.ejected_until);
  if (ejected_now) return;  // a request picked before the ejection failing late
  if (probing || state.consecutive_failures >= options_.eject_after_failures) {
    state.ejected_until = now + BackoffLocked(state.ejections);
    ++state.ejections;
    state.probe_deadline.reset();
  }
}

PickOutcome EndpointPool::Pick(const PickRequest& request) {
  const absl::Time now = clock_->Now();
  absl::MutexLock lock(&mutex_);
  std::vector<std::pair<const std::string*, Endpoint*>> with_room;
  int64_t unhealthy = 0, format_mismatch = 0, too_short = 0, full = 0;
  for (auto& [endpoint, state] : endpoints_) {
    if (state.probe_deadline.has_value() && now >= *state.probe_deadline) {
      state.probe_deadline.reset();  // the probe's result never came: allow another
    }
    const bool health_ok =
        state.health == HealthState::kServing ||
        (state.health == HealthState::kUnknown && options_.unknown_health_eligible);
    const bool ejected = state.ejected_until.has_value() && now < *state.ejected_until;
    if (!health_ok || ejected || state.probe_deadline.has_value() ||
        (state.load.has_value() && !state.load->accepting)) {
      ++unhealthy;
      continue;
    }
    if (!state.canonical_reported_format.empty() &&
        state.canonical_reported_format != options_.declared_kv_format) {
      ++format_mismatch;
      continue;
    }
    if (state.load.has_value()) {
      const LoadSnapshot& load = *state.load;
      if (load.max_context > 0 && load.max_context < request.total_tokens) {
        ++too_short;
        continue;
      }
      const bool queue_full = load.waiting_requests > options_.max_queue;
      const bool kv_full = load.kv_block_tokens > 0 &&
                           load.kv_blocks_free * load.kv_block_tokens < request.total_tokens;
      if (queue_full || kv_full) {
        ++full;
        continue;
      }
    }
    with_room.emplace_back(&endpoint, &state);
  }

  PickOutcome outcome;
  if (with_room.empty()) {
    const int64_t total = static_cast<int64_t>(endpoints_.size());
    if (full > 0) {
      outcome.failure = FallbackReason::kPoolFull;
      outcome.detail = absl::StrCat(full, " of ", total, " endpoint(s) of pool '", name_,
                                    "' have no KV room for ", request.total_tokens,
                                    " tokens or a queue above ", options_.max_queue);
    } else if (too_short > 0) {
      outcome.failure = FallbackReason::kContextTooLong;
      outcome.detail = absl::StrCat(too_short, " endpoint(s) of pool '", name_,
                                    "' report a max_context below ", request.total_tokens);
    } else if (format_mismatch > 0) {
      outcome.failure = FallbackReason::kFormatMismatch;
      outcome.detail = absl::StrCat(format_mismatch, " endpoint(s) of pool '", name_,
                                    "' report a kv_format other than the declared '",
                                    options_.declared_kv_format, "'");
    } else {
      outcome.failure = FallbackReason::kNoHealthyEndpoint;
      outcome.detail = total == 0 ? absl::StrCat("pool '", name_, "' has no endpoints")
                                  : absl::StrCat("none of the ", total, " endpoint(s) of pool '",
                                                 name_, "' is healthy and accepting");
    }
    return outcome;
  }

  size_t chosen = 0;
  if (with_room.size() > 1) {
    const size_t n = with_room.size();
    size_t first = std::min(random_(n), n - 1);
    size_t second = std::min(random_(n - 1), n - 2);
    if (second >= first) ++second;
    auto score = [&](size_t i) {
      const Endpoint& state = *with_room[i].second;
      return state.load.has_value() ? LoadScore(*state.load) : 0.0;
    };
    chosen = score(second) < score(first) ? second : first;
  }
  Endpoint& state = *with_room[chosen].second;
  if (state.ejected_until.has_value()) {
    // Ejection expired: this request is the probe.
    state.probe_deadline = now + options_.probe_timeout;
  }
  outcome.endpoint = *with_room[chosen].first;
  outcome.kv_format = state.canonical_reported_format.empty() ? options_.declared_kv_format
                                                              : state.canonical_reported_format;
  return outcome;
}

std::vector<FormatMismatch> EndpointPool::FormatMismatches() const {
  absl::MutexLock lock(&mutex_);
  std::vector<FormatMismatch> out;
  for (const auto& [endpoint, state] : endpoints_) {
    if (!state.canonical_reported_format.empty() &&
        state.canonical_reported_format != options_.declared_kv_format) {
      out.push_back(
          {endpoint, state.load ? state.load->kv_format : "", options_.declared_kv_format});
    }
  }
  return out;
}

std::vector<EndpointStatus> EndpointPool::Status() const {
  absl::MutexLock lock(&mutex_);
  std::vector<EndpointStatus> out;
  for (const auto& [endpoint, state] : endpoints_) {
    EndpointStatus status;
    status.endpoint = endpoint;
    status.health = state.health;
    status.load = state.load;
    status.consecutive_failures = state.consecutive_failures;
    status.ejections = state.ejections;
    status.ejected_until = state.ejected_until;
    status.probe_in_flight = state.probe_deadline.has_value();
    out.push_back(std::move(status));
  }
  return out;
}

}  // namespace kvgate::gateway
