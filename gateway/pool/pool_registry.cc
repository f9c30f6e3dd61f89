#include "gateway/pool/pool_registry.h"

#include "kvgate/common/log.h"

namespace kvgate::gateway {

EndpointPoolOptions PoolOptionsFromPolicy(const Policy& policy, const PoolSpec& pool) {
  EndpointPoolOptions options;
  options.declared_kv_format = pool.kv_format;
  options.max_queue = policy.MaxQueue(pool);
  options.eject_after_failures = policy.load_balancing.eject_after_failures;
  options.ejection_base = absl::Milliseconds(policy.load_balancing.ejection_base_ms);
  options.ejection_max = absl::Milliseconds(policy.load_balancing.ejection_max_ms);
  return options;
}

PoolRegistry::PoolRegistry(const Clock* clock, RandomIndexFn random)
    : clock_(clock), random_(std::move(random)) {}

void PoolRegistry::ApplyPolicy(const Policy& policy) {
  absl::MutexLock lock(&mutex_);
  std::map<std::string, std::shared_ptr<EndpointPool>, std::less<>> next;
  std::map<std::string, DnsTarget, std::less<>> next_dns;
  for (const PoolSpec& spec : policy.pools) {
    EndpointPoolOptions options = PoolOptionsFromPolicy(policy, spec);
    std::shared_ptr<EndpointPool> pool;
    if (auto it = pools_.find(spec.name); it != pools_.end()) {
      pool = it->second;
      pool->SetOptions(std::move(options));
    } else {
      pool = std::make_shared<EndpointPool>(spec.name, std::move(options), clock_, random_);
    }
    if (spec.dns.empty()) {
      pool->SetEndpoints(spec.endpoints);
    } else {
      DnsTarget target{spec.dns, absl::Milliseconds(spec.dns_refresh_ms)};
      if (auto it = dns_.find(spec.name);
          it != dns_.end() && it->second.name_and_port == spec.dns) {
        target.next_refresh = it->second.next_refresh;
      } else {
        pool->SetEndpoints({});  // until the first resolution
      }
      next_dns[spec.name] = target;
    }
    next[spec.name] = std::move(pool);
  }
  pools_ = std::move(next);
  dns_ = std::move(next_dns);
}

int PoolRegistry::RefreshDns(EndpointResolver& resolver) {
  // Resolve outside the lock: getaddrinfo may block.
  std::vector<std::pair<std::string, std::string>> due;
  const absl::Time now = clock_->Now();
  {
    absl::MutexLock lock(&mutex_);
    for (auto& [pool, target] : dns_) {
      if (now >= target.next_refresh) {
        due.emplace_back(pool, target.name_and_port);
        target.next_refresh = now + target.refresh;
      }
    }
  }
  int failures = 0;
  for (const auto& [pool_name, name_and_port] : due) {
    absl::StatusOr<std::vector<std::string>> endpoints = resolver.Resolve(name_and_port);
    if (!endpoints.ok()) {
      ++failures;
      KVGATE_LOG(WARNING) << "pool " << pool_name << ": cannot resolve " << name_and_port << ": "
                          << endpoints.status() << " (keeping the previous endpoints)";
      continue;
    }
    std::shared_ptr<EndpointPool> pool = Find(pool_name);
    if (pool != nullptr) pool->SetEndpoints(*endpoints);
  }
  return failures;
}

std::shared_ptr<EndpointPool> PoolRegistry::Find(std::string_view name) const {
  absl::MutexLock lock(&mutex_);
  auto it = pools_.find(name);
  return it == pools_.end() ? nullptr : it->second;
}

std::vector<std::shared_ptr<EndpointPool>> PoolRegistry::All() const {
  absl::MutexLock lock(&mutex_);
  std::vector<std::shared_ptr<EndpointPool>> out;
  for (const auto& [name, pool] : pools_) out.push_back(pool);
  return out;
}

}  // namespace kvgate::gateway
