// PoolRegistry: the EndpointPools of the current policy, kept in step with policy reloads and DNS.
//
// ApplyPolicy() creates pools the policy adds, updates the options of pools it keeps (endpoint
// state - health, load, ejections - survives a reload) and drops pools it removes. Pools declared
// with `dns:` get their endpoints from RefreshDns(), which re-resolves each one when its
// dns_refresh_ms has elapsed (a failed resolution keeps the previous list).
//
//   PoolRegistry pools(RealClock::Get());
//   pools.ApplyPolicy(*store.Current());
//   pools.RefreshDns(resolver);                       // call every few hundred ms
//   std::shared_ptr<EndpointPool> pool = pools.Find("full");
#pragma once

#include <map>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "absl/synchronization/mutex.h"
#include "gateway/policy/policy.h"
#include "gateway/pool/endpoint_pool.h"
#include "gateway/pool/resolver.h"

namespace kvgate::gateway {

// Picker options for one pool of a policy.
EndpointPoolOptions PoolOptionsFromPolicy(const Policy& policy, const PoolSpec& pool);

class PoolRegistry {
 public:
  // `clock` must outlive the registry. `random` is passed to every pool (null: seeded BitGen).
  explicit PoolRegistry(const Clock* clock, RandomIndexFn random = nullptr);

  void ApplyPolicy(const Policy& policy);
  // Resolves the DNS pools that are due. Returns how many resolutions failed.
  int RefreshDns(EndpointResolver& resolver);

  // Null if the current policy has no such pool.
  std::shared_ptr<EndpointPool> Find(std::string_view name) const;
  std::vector<std::shared_ptr<EndpointPool>> All() const;

 private:
  struct DnsTarget {
    std::string name_and_port;
    absl::Duration refresh;
    absl::Time next_refresh = absl::InfinitePast();
  };
  const Clock* const clock_;
  RandomIndexFn random_;
  mutable absl::Mutex mutex_;
  std::map<std::string, std::shared_ptr<EndpointPool>, std::less<>> pools_ ABSL_GUARDED_BY(mutex_);
  std::map<std::string, DnsTarget, std::less<>> dns_ ABSL_GUARDED_BY(mutex_);
};

}  // namespace kvgate::gateway
