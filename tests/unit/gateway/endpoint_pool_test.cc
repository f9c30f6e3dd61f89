// Endpoint picking: power of two choices on load, health and acceptance filters, outlier ejection
// with exponential back-off and probe-back (fake clock), pool-full and format-mismatch detection,
// and the pool registry's policy reloads and DNS refresh (fake resolver).
#include "gateway/pool/endpoint_pool.h"

#include <deque>
#include <map>
#include <set>

#include "gateway/policy/policy_loader.h"
#include "gateway/pool/pool_registry.h"
#include "gateway/pool/resolver.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace kvgate::gateway {
namespace {

// A random source that replays a script of draws (each taken modulo n), then repeats the last.
class ScriptedRandom {
 public:
  explicit ScriptedRandom(std::deque<size_t> draws) : draws_(std::move(draws)) {}
  RandomIndexFn Fn() {
    return [this](size_t n) {
      size_t value = draws_.empty() ? last_ : draws_.front();
      if (!draws_.empty()) draws_.pop_front();
      last_ = value;
      return value % n;
    };
  }

 private:
  std::deque<size_t> draws_;
  size_t last_ = 0;
};

LoadSnapshot Load(int64_t waiting, int64_t running = 0, int64_t free_blocks = 100,
                  int64_t total_blocks = 100) {
  LoadSnapshot load;
  load.kv_format = "fp16";
  load.max_context = 4096;
  load.waiting_requests = waiting;
  load.running_requests = running;
  load.kv_blocks_free = free_blocks;
  load.kv_blocks_total = total_blocks;
  load.kv_block_tokens = 16;
  load.accepting = true;
  return load;
}

EndpointPoolOptions Options() {
  EndpointPoolOptions options;
  options.declared_kv_format = "fp16";
  options.max_queue = 8;
  options.eject_after_failures = 3;
  options.ejection_base = absl::Seconds(1);
  options.ejection_max = absl::Seconds(4);
  options.probe_timeout = absl::Seconds(30);
  return options;
}

class EndpointPoolTest : public ::testing::Test {
 protected:
  FakeClock clock_;
};

TEST(LoadScoreTest, OrdersByQueueThenKvThenRunning) {
  EXPECT_LT(LoadScore(Load(0)), LoadScore(Load(1)));
  EXPECT_LT(LoadScore(Load(0, 0, 100)), LoadScore(Load(0, 0, 10)));  // more KV in use
  EXPECT_LT(LoadScore(Load(0, 1)), LoadScore(Load(0, 2)));
  EXPECT_LT(LoadScore(Load(0, 3)), LoadScore(Load(1)));  // a queued request outweighs 3 running
}

TEST_F(EndpointPoolTest, PowerOfTwoPrefersTheLessLoadedOfTheTwoDrawn) {
  // Draws (0, 0): first = a, second = 0 -> skips a -> b. c (the least loaded) is not drawn, so
  // p2c picks the lesser of a and b, which is a.
  ScriptedRandom random({0, 0, 2, 1});
  EndpointPool pool("p", Options(), &clock_, random.Fn());
  pool.SetEndpoints({"a:1", "b:1", "c:1"});
  pool.ReportLoad("a:1", Load(1));
  pool.ReportLoad("b:1", Load(2));
  pool.ReportLoad("c:1", Load(0));
  EXPECT_EQ(pool.Pick({100}).endpoint, "a:1");
  // Draws (2, 1): c vs b -> c.
  EXPECT_EQ(pool.Pick({100}).endpoint, "c:1");
}

TEST_F(EndpointPoolTest, TwoEndpointsAlwaysGoToTheLessLoaded) {
  EndpointPool pool("p", Options(), &clock_);  // real random source
  pool.SetEndpoints({"a:1", "b:1"});
  pool.ReportLoad("a:1", Load(5));
  pool.ReportLoad("b:1", Load(0));
  for (int i = 0; i < 200; ++i) ASSERT_EQ(pool.Pick({100}).endpoint, "b:1");
}

TEST_F(EndpointPoolTest, RandomSpreadsAcrossEquallyLoadedEndpoints) {
  EndpointPool pool("p", Options(), &clock_);
  pool.SetEndpoints({"a:1", "b:1", "c:1", "d:1"});
  std::map<std::string, int> counts;
  for (int i = 0; i < 400; ++i) ++counts[pool.Pick({1}).endpoint];
  EXPECT_EQ(counts.size(), 4u);
  for (const auto& [endpoint, count] : counts) EXPECT_GT(count, 40) << endpoint;
}

TEST_F(EndpointPoolTest, SkipsUnhealthyAndNotAccepting) {
  EndpointPool pool("p", Options(), &clock_);
  pool.SetEndpoints({"a:1", "b:1", "c:1"});
  pool.ReportHealth("a:1", HealthState::kNotServing);
  pool.ReportHealth("b:1", HealthState::kServing);
  pool.ReportHealth("c:1", HealthState::kServing);
  LoadSnapshot draining = Load(0);
  draining.accepting = false;
  pool.ReportLoad("c:1", draining);
  pool.ReportLoad("b:1", Load(6));  // busier, but the only eligible one
  for (int i = 0; i < 50; ++i) ASSERT_EQ(pool.Pick({100}).endpoint, "b:1");
  pool.ReportHealth("b:1", HealthState::kNotServing);
  PickOutcome none = pool.Pick({100});
  ASSERT_FALSE(none.ok());
  EXPECT_EQ(*none.failure, FallbackReason::kNoHealthyEndpoint);
}

TEST_F(EndpointPoolTest, UnknownHealthEligibilityIsAnOption) {
  EndpointPoolOptions options = Options();
  options.unknown_health_eligible = false;
  EndpointPool pool("p", options, &clock_);
  pool.SetEndpoints({"a:1"});
  EXPECT_EQ(*pool.Pick({1}).failure, FallbackReason::kNoHealthyEndpoint);
  pool.ReportHealth("a:1", HealthState::kServing);
  EXPECT_EQ(pool.Pick({1}).endpoint, "a:1");

  EndpointPool empty("e", Options(), &clock_);
  PickOutcome outcome = empty.Pick({1});
  EXPECT_EQ(*outcome.failure, FallbackReason::kNoHealthyEndpoint);
  EXPECT_THAT(outcome.detail, ::testing::HasSubstr("no endpoints"));
}

TEST_F(EndpointPoolTest, EjectionBackoffAndProbeBack) {
  EndpointPool pool("p", Options(), &clock_);
  pool.SetEndpoints({"a:1", "b:1"});
  pool.ReportLoad("a:1", Load(0));
  pool.ReportLoad("b:1", Load(3));  // a preferred while healthy

  ASSERT_EQ(pool.Pick({1}).endpoint, "a:1");
  pool.ReportFailure("a:1");
  pool.ReportFailure("a:1");
  ASSERT_EQ(pool.Pick({1}).endpoint, "a:1");  // 2 failures < 3: still in
  pool.ReportFailure("a:1");                  // 3rd: ejected for 1 s
  for (int i = 0; i < 20; ++i) ASSERT_EQ(pool.Pick({1}).endpoint, "b:1");

  clock_.Advance(absl::Milliseconds(999));
  ASSERT_EQ(pool.Pick({1}).endpoint, "b:1");
  clock_.Advance(absl::Milliseconds(1));  // ejection over: one probe allowed
  ASSERT_EQ(pool.Pick({1}).endpoint, "a:1");
  EXPECT_TRUE(pool.Status()[0].probe_in_flight);
  ASSERT_EQ(pool.Pick({1}).endpoint, "b:1");  // no second request while the probe is out
  pool.ReportFailure("a:1");                  // probe failed: ejected again, 2 s
  clock_.Advance(absl::Milliseconds(1999));
  ASSERT_EQ(pool.Pick({1}).endpoint, "b:1");
  clock_.Advance(absl::Milliseconds(1));
  ASSERT_EQ(pool.Pick({1}).endpoint, "a:1");  // probe
  pool.ReportFailure("a:1");                  // 4 s
  clock_.Advance(absl::Seconds(4));
  ASSERT_EQ(pool.Pick({1}).endpoint, "a:1");  // probe
  pool.ReportFailure("a:1");                  // 8 s, capped at 4 s
  clock_.Advance(absl::Seconds(4));
  ASSERT_EQ(pool.Pick({1}).endpoint, "a:1");  // probe after the cap
  pool.ReportSuccess("a:1");                  // restored
  EndpointStatus a = pool.Status()[0];
  EXPECT_EQ(a.consecutive_failures, 0);
  EXPECT_EQ(a.ejections, 0);
  EXPECT_FALSE(a.ejected_until.has_value());
  for (int i = 0; i < 5; ++i) ASSERT_EQ(pool.Pick({1}).endpoint, "a:1");  // no probe gating
  // After the restore, one failure does not eject again (the count restarted).
  pool.ReportFailure("a:1");
  ASSERT_EQ(pool.Pick({1}).endpoint, "a:1");
}

TEST_F(EndpointPoolTest, LostProbeIsReleasedAfterTimeout) {
  EndpointPool pool("p", Options(), &clock_);
  pool.SetEndpoints({"a:1"});
  for (int i = 0; i < 3; ++i) pool.ReportFailure("a:1");
  clock_.Advance(absl::Seconds(1));
  ASSERT_EQ(pool.Pick({1}).endpoint, "a:1");  // the probe; its result never reported
  EXPECT_EQ(*pool.Pick({1}).failure, FallbackReason::kNoHealthyEndpoint);
  clock_.Advance(absl::Seconds(30));
  EXPECT_EQ(pool.Pick({1}).endpoint, "a:1");
}

TEST_F(EndpointPoolTest, PoolFullByKvBlocksOrQueue) {
  EndpointPool pool("p", Options(), &clock_);
  pool.SetEndpoints({"a:1", "b:1"});
  pool.ReportLoad("a:1", Load(0, 0, /*free_blocks=*/2));  // 32 tokens free
  pool.ReportLoad("b:1", Load(/*waiting=*/9));            // queue above max_queue 8
  PickOutcome full = pool.Pick({33});
  ASSERT_FALSE(full.ok());
  EXPECT_EQ(*full.failure, FallbackReason::kPoolFull);
  EXPECT_EQ(pool.Pick({32}).endpoint, "a:1");  // exactly fits
  pool.ReportLoad("b:1", Load(8));             // queue at the limit is fine
  EXPECT_EQ(pool.Pick({33}).endpoint, "b:1");
}

TEST_F(EndpointPoolTest, FormatMismatchIsFlaggedAndNotUsed) {
  EndpointPool pool("p", Options(), &clock_);
  pool.SetEndpoints({"a:1", "b:1"});
  LoadSnapshot wrong = Load(0);
  wrong.kv_format = "kivi2";
  pool.ReportLoad("a:1", wrong);
  LoadSnapshot right = Load(5);
  right.kv_format = "FP16";  // canonicalized: same format
  pool.ReportLoad("b:1", right);
  std::vector<FormatMismatch> mismatches = pool.FormatMismatches();
  ASSERT_EQ(mismatches.size(), 1u);
  EXPECT_EQ(mismatches[0].endpoint, "a:1");
  EXPECT_EQ(mismatches[0].reported, "kivi2");
  EXPECT_EQ(mismatches[0].declared, "fp16");
  for (int i = 0; i < 20; ++i) {
    PickOutcome pick = pool.Pick({1});
    ASSERT_EQ(pick.endpoint, "b:1");
    EXPECT_EQ(pick.kv_format, "fp16");
  }
  pool.ReportHealth("b:1", HealthState::kNotServing);
  PickOutcome none = pool.Pick({1});
  ASSERT_FALSE(none.ok());
  EXPECT_EQ(*none.failure, FallbackReason::kFormatMismatch);
}

TEST_F(EndpointPoolTest, ReportedContextTooShort) {
  EndpointPool pool("p", Options(), &clock_);
  pool.SetEndpoints({"a:1"});
  pool.ReportLoad("a:1", Load(0));  // max_context 4096, 100 blocks x 16 = 1600 tokens free
  EXPECT_EQ(*pool.Pick({5000}).failure, FallbackReason::kContextTooLong);
  EXPECT_EQ(*pool.Pick({2000}).failure, FallbackReason::kPoolFull);
  EXPECT_TRUE(pool.Pick({1600}).ok());
}

TEST_F(EndpointPoolTest, SetEndpointsKeepsStateOfRetainedEndpoints) {
  EndpointPool pool("p", Options(), &clock_);
  pool.SetEndpoints({"a:1", "b:1"});
  pool.ReportHealth("a:1", HealthState::kNotServing);
  pool.SetEndpoints({"a:1", "c:1"});
  EXPECT_EQ(pool.Endpoints(), (std::vector<std::string>{"a:1", "c:1"}));
  std::vector<EndpointStatus> status = pool.Status();
  EXPECT_EQ(status[0].health, HealthState::kNotServing);
  EXPECT_EQ(status[1].health, HealthState::kUnknown);
  pool.ReportHealth("zz:1", HealthState::kServing);  // unknown endpoint: ignored
  EXPECT_EQ(pool.Endpoints().size(), 2u);
}

// ---- Registry and DNS ----

class FakeResolver : public EndpointResolver {
 public:
  absl::StatusOr<std::vector<std::string>> Resolve(std::string_view name) override {
    ++calls[std::string(name)];
    auto it = answers.find(std::string(name));
    if (it == answers.end()) return absl::UnavailableError("no answer");
    return it->second;
  }
  std::map<std::string, std::vector<std::string>> answers;
  std::map<std::string, int> calls;
};

constexpr char kDnsPolicy[] = R"(pools:
  - name: fixed
    endpoints: ["10.0.0.1:1", "10.0.0.2:1"]
    kv_format: fp16
    precision: full
    max_context: 100
  - name: dyn
    dns: svc.ns:50051
    dns_refresh_ms: 500
    kv_format: kivi4
    precision: compressed
    max_context: 100
    max_queue: 3
task_types: [{name: chat}]
default_task_type: chat
routes: [{name: all, pools: [dyn, fixed]}]
load_balancing: {eject_after_failures: 2}
)";

TEST(PoolRegistryTest, AppliesPolicyAndRefreshesDns) {
  FakeClock clock;
  absl::StatusOr<std::shared_ptr<const Policy>> policy = LoadPolicyText(kDnsPolicy, "p.yaml");
  ASSERT_TRUE(policy.ok()) << policy.status();
  PoolRegistry registry(&clock);
  registry.ApplyPolicy(**policy);
  ASSERT_NE(registry.Find("fixed"), nullptr);
  EXPECT_EQ(registry.Find("fixed")->Endpoints(),
            (std::vector<std::string>{"10.0.0.1:1", "10.0.0.2:1"}));
  EXPECT_TRUE(registry.Find("dyn")->Endpoints().empty());
  EXPECT_EQ(registry.Find("nope"), nullptr);

  FakeResolver resolver;
  resolver.answers["svc.ns:50051"] = {"10.1.0.1:50051", "10.1.0.2:50051"};
  EXPECT_EQ(registry.RefreshDns(resolver), 0);
  EXPECT_EQ(registry.Find("dyn")->Endpoints().size(), 2u);
  EXPECT_EQ(resolver.calls["svc.ns:50051"], 1);
  registry.RefreshDns(resolver);  // not due yet
  EXPECT_EQ(resolver.calls["svc.ns:50051"], 1);

  // A failed resolution keeps the previous endpoints.
  resolver.answers.clear();
  clock.Advance(absl::Milliseconds(500));
  EXPECT_EQ(registry.RefreshDns(resolver), 1);
  EXPECT_EQ(resolver.calls["svc.ns:50051"], 2);
  EXPECT_EQ(registry.Find("dyn")->Endpoints().size(), 2u);

  // Scale-down.
  resolver.answers["svc.ns:50051"] = {"10.1.0.2:50051"};
  clock.Advance(absl::Milliseconds(500));
  registry.RefreshDns(resolver);
  EXPECT_EQ(registry.Find("dyn")->Endpoints(), std::vector<std::string>{"10.1.0.2:50051"});
}

TEST(PoolRegistryTest, ReloadKeepsEndpointStateAndAppliesNewOptions) {
  FakeClock clock;
  auto first = LoadPolicyText(kDnsPolicy, "p.yaml");
  ASSERT_TRUE(first.ok());
  PoolRegistry registry(&clock);
  registry.ApplyPolicy(**first);
  std::shared_ptr<EndpointPool> fixed = registry.Find("fixed");
  fixed->ReportHealth("10.0.0.1:1", HealthState::kNotServing);

  std::string text = kDnsPolicy;
  const std::string two = "[\"10.0.0.1:1\", \"10.0.0.2:1\"]";
  text.replace(text.find(two), two.size(), "[\"10.0.0.1:1\"]");
  const std::string queue = "max_queue: 3";
  text.replace(text.find(queue), queue.size(), "max_queue: 0");
  auto second = LoadPolicyText(text, "p.yaml");
  ASSERT_TRUE(second.ok()) << second.status();
  registry.ApplyPolicy(**second);
  EXPECT_EQ(registry.Find("fixed").get(), fixed.get());  // same pool object
  ASSERT_EQ(fixed->Endpoints(), std::vector<std::string>{"10.0.0.1:1"});
  EXPECT_EQ(fixed->Status()[0].health, HealthState::kNotServing);

  // max_queue 0 now applies to dyn: one waiting request makes it full.
  FakeResolver resolver;
  resolver.answers["svc.ns:50051"] = {"10.1.0.1:50051"};
  registry.RefreshDns(resolver);
  std::shared_ptr<EndpointPool> dyn = registry.Find("dyn");
  LoadSnapshot load = Load(1);
  load.kv_format = "kivi4";
  dyn->ReportLoad("10.1.0.1:50051", load);
  EXPECT_EQ(*dyn->Pick({1}).failure, FallbackReason::kPoolFull);
}

TEST(ResolverTest, NumericAddressesResolveWithoutNetwork) {
  GetAddrInfoResolver resolver;
  absl::StatusOr<std::vector<std::string>> v4 = resolver.Resolve("127.0.0.1:8080");
  ASSERT_TRUE(v4.ok()) << v4.status();
  EXPECT_EQ(*v4, std::vector<std::string>{"127.0.0.1:8080"});
  absl::StatusOr<std::vector<std::string>> v6 = resolver.Resolve("[::1]:9");
  ASSERT_TRUE(v6.ok()) << v6.status();
  EXPECT_EQ(*v6, std::vector<std::string>{"[::1]:9"});
  EXPECT_FALSE(resolver.Resolve("no-port").ok());
  EXPECT_FALSE(resolver.Resolve("host:99999").ok());
}

}  // namespace
}  // namespace kvgate::gateway
