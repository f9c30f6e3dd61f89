// Routing by measured quality: a route that states a tolerance goes to the cheapest pool whose
// measured loss at the request's context length is within it, ending at full precision, and the
// decision names the measurement that decided.
#include <fstream>
#include <string>

#include "gateway/policy/policy_loader.h"
#include "gateway/policy/quality_table.h"
#include "gateway/score/request_scorer.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace kvgate::gateway {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;

constexpr char kTable[] = R"(model: test
formats:
  tq4:
    512: {ppl_ratio: 1.002, kl: 0.004, top1: 0.98, retrieval: 1.0}
    1024: {ppl_ratio: 1.004, kl: 0.006, top1: 0.97, retrieval: 0.95}
    2048: {ppl_ratio: 1.01, kl: 0.02, top1: 0.95, retrieval: 0.80}
  kivi2:
    512: {ppl_ratio: 1.2, kl: 0.30, top1: 0.80, retrieval: 0.40}
    2048: {ppl_ratio: 1.3, kl: 0.35, top1: 0.78, retrieval: 0.20}
  fp8:
    2048: {ppl_ratio: 1.001, kl: 0.001, top1: 0.99}
  fp16+h2o:heavy=0.1,recent=0.1:
    512: {ppl_ratio: 1.05, kl: 0.04, top1: 0.9, retrieval: 0.5}
)";

constexpr char kPolicy[] = R"(version: 1
pools:
  - {name: full, endpoints: ["127.0.0.1:1"], kv_format: fp16, precision: full, max_context: 4096}
  - {name: kivi2, endpoints: ["127.0.0.1:2"], kv_format: kivi2, precision: compressed,
     max_context: 4096, quality_table: TABLE}
  - {name: tq4, endpoints: ["127.0.0.1:3"], kv_format: tq4, precision: compressed,
     max_context: 4096, quality_table: TABLE}
  - {name: fp8, endpoints: ["127.0.0.1:4"], kv_format: fp8, precision: compressed,
     max_context: 4096, quality_table: TABLE}
  - {name: unmeasured, endpoints: ["127.0.0.1:5"], kv_format: int8, precision: compressed,
     max_context: 4096}
default_task_type: chat
task_types:
  - name: chat
  - name: retrieval
routes:
  - name: recall
    when: {task_types: [retrieval]}
    pools: [full, fp8, unmeasured, kivi2, tq4]
    quality: {max_kl: 0.05, min_retrieval: 0.9}
  - name: tolerant
    pools: [kivi2, full]
)";

class QualityRoutingTest : public ::testing::Test {
 protected:
  void SetUp() override {
    const std::string dir = ::testing::TempDir();
    std::ofstream(dir + "/quality_routing_table.yaml") << kTable;
    std::string policy = kPolicy;
    for (size_t at; (at = policy.find("TABLE")) != std::string::npos;) {
      policy.replace(at, 5, "quality_routing_table.yaml");  // relative to the policy's folder
    }
    std::ofstream(dir + "/quality_routing_policy.yaml") << policy;
    auto loaded = LoadPolicyFile(dir + "/quality_routing_policy.yaml");
    ASSERT_TRUE(loaded.ok()) << loaded.status();
    policy_ = *loaded;
  }

  RouteDecision Decide(int64_t prompt_tokens, int64_t max_tokens, std::string task = "retrieval") {
    RouteRequest req;
    req.prompt_text = "x";
    req.prompt_tokens = prompt_tokens;
    req.max_tokens = max_tokens;
    req.task_type = task;
    auto d = ScoreRequest(*policy_, req);
    EXPECT_TRUE(d.ok()) << d.status();
    return d.ok() ? *d : RouteDecision{};
  }

  std::shared_ptr<const Policy> policy_;
};

TEST_F(QualityRoutingTest, CheapestPoolWithinToleranceComesFirst) {
  RouteDecision d = Decide(400, 100);  // 500 tokens: tq4 measured at 512 qualifies
  EXPECT_THAT(d.viable_pools, ElementsAre("tq4", "full"));
  EXPECT_THAT(d.quality_basis, HasSubstr("tq4 at 512 tokens"));
  EXPECT_THAT(d.quality_basis, HasSubstr("kl 0.004 <= 0.05"));
  EXPECT_THAT(d.quality_basis, HasSubstr("retrieval 1 >= 0.9"));
  // kivi2 fails on its measurement; the int8 pool has no table; fp8 has no retrieval figure, so it
  // cannot be shown to meet min_retrieval.
  std::map<std::string, std::string> skipped;
  for (const SkippedPool& s : d.skipped) {
    EXPECT_EQ(s.reason, FallbackReason::kQuality);
    skipped[s.pool] = s.detail;
  }
  EXPECT_THAT(skipped["kivi2"], HasSubstr("kl 0.3 > 0.05"));
  EXPECT_THAT(skipped["unmeasured"], HasSubstr("no quality_table"));
  EXPECT_THAT(skipped["fp8"], HasSubstr("retrieval not measured"));
}

TEST_F(QualityRoutingTest, LongerContextUsesTheMeasurementAtThatLength) {
  // 1500 tokens: tq4's row at 2048 has retrieval 0.80 < 0.9, so only full precision qualifies.
  RouteDecision d = Decide(1400, 100);
  EXPECT_THAT(d.viable_pools, ElementsAre("full"));
  EXPECT_THAT(d.quality_basis, HasSubstr("full precision"));
  bool tq4_skipped = false;
  for (const SkippedPool& s : d.skipped) {
    if (s.pool == "tq4") {
      tq4_skipped = true;
      EXPECT_THAT(s.detail, HasSubstr("at 2048 tokens"));
      EXPECT_THAT(s.detail, HasSubstr("retrieval 0.8 < 0.9"));
    }
  }
  EXPECT_TRUE(tq4_skipped);
  // 900 tokens: the row at 1024 (retrieval 0.95) qualifies tq4 again.
  EXPECT_EQ(Decide(800, 100).viable_pools.front(), "tq4");
}

TEST_F(QualityRoutingTest, RoutesWithoutToleranceAreUnchanged) {
  RouteDecision d = Decide(400, 100, "chat");
  EXPECT_THAT(d.viable_pools, ElementsAre("kivi2", "full"));
  EXPECT_TRUE(d.quality_basis.empty());
}

TEST(QualityTableTest, FindPicksTheSmallestContextAtLeastTheRequest) {
  const std::string path = ::testing::TempDir() + "/quality_find.yaml";
  std::ofstream(path) << kTable;
  auto table = LoadQualityTable(path);
  ASSERT_TRUE(table.ok()) << table.status();
  int64_t at = 0;
  ASSERT_NE((*table)->Find("tq4", "none", 1, &at), nullptr);
  EXPECT_EQ(at, 512);
  ASSERT_NE((*table)->Find("tq4", "none", 513, &at), nullptr);
  EXPECT_EQ(at, 1024);
  ASSERT_NE((*table)->Find("tq4", "none", 100000, &at), nullptr);
  EXPECT_EQ(at, 2048);  // beyond every measurement: the longest one
  EXPECT_EQ((*table)->Find("tq3", "none", 10, &at), nullptr);
  EXPECT_EQ((*table)->Find("tq4", "h2o:heavy=0.1,recent=0.1", 10, &at), nullptr);
  EXPECT_NE((*table)->Find("fp16", "h2o:heavy=0.1,recent=0.1", 10, &at), nullptr);
}

TEST(QualityTableTest, BadTablesAreErrorsWithAPosition) {
  const std::string path = ::testing::TempDir() + "/quality_bad.yaml";
  std::ofstream(path) << "model: m\nformats:\n  tq4:\n    512: {kl: 0.1}\n  nope:\n    1: {}\n";
  auto bad = LoadQualityTable(path);
  ASSERT_FALSE(bad.ok());
  EXPECT_THAT(std::string(bad.status().message()), HasSubstr(path + ":5:"));
  std::ofstream(path) << "formats: { tq4: [\n";
  EXPECT_FALSE(LoadQualityTable(path).ok());
  EXPECT_FALSE(LoadQualityTable(::testing::TempDir() + "/does_not_exist.yaml").ok());
  // A policy naming a missing table is rejected at load, with the position of the key.
  auto policy = LoadPolicyText(
      "version: 1\npools:\n  - {name: a, endpoints: [\"h:1\"], kv_format: tq4, precision: "
      "compressed, max_context: 10, quality_table: /nonexistent/q.yaml}\ndefault_task_type: "
      "chat\ntask_types: [{name: chat}]\nroutes: [{name: r, pools: [a]}]\n",
      "p.yaml");
  ASSERT_FALSE(policy.ok());
  EXPECT_THAT(std::string(policy.status().message()), HasSubstr("p.yaml:3:"));
  EXPECT_THAT(std::string(policy.status().message()), HasSubstr("quality_table"));
}

}  // namespace
}  // namespace kvgate::gateway
