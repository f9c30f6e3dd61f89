// Policy loader: valid files parse into the expected structs; every kind of invalid file is
// rejected with the exact file:line:col of the offending text.
#include "gateway/policy/policy_loader.h"

#include <fstream>

#include <cstdlib>
#include <string>

#include "absl/strings/str_replace.h"
#include "gateway/policy/kv_format_name.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace kvgate::gateway {
namespace {

using ::testing::HasSubstr;

std::string SourceDir() {
  const char* dir = std::getenv("KVGATE_SOURCE_DIR");
  return dir != nullptr ? dir : ".";
}

// A minimal valid policy; line numbers are given in the comments of the tests below.
//  1 version: 1
//  2 pools:
//  3   - name: a
//  4     endpoints: ["127.0.0.1:1"]
//  5     kv_format: fp16
//  6     precision: full
//  7     max_context: 100
//  8 task_types:
//  9   - name: chat
// 10 default_task_type: chat
// 11 routes:
// 12   - name: all
// 13     pools: [a]
constexpr char kMinimal[] = R"(version: 1
pools:
  - name: a
    endpoints: ["127.0.0.1:1"]
    kv_format: fp16
    precision: full
    max_context: 100
task_types:
  - name: chat
default_task_type: chat
routes:
  - name: all
    pools: [a]
)";

std::string Replace(std::string_view from, std::string_view to) {
  std::string text = kMinimal;
  size_t at = text.find(from);
  EXPECT_NE(at, std::string::npos) << from;
  if (at != std::string::npos) text.replace(at, from.size(), to);
  return text;
}

std::vector<std::string> Errors(const std::string& text) {
  PolicyParseResult result = ParsePolicyText(text, "t.yaml");
  EXPECT_EQ(result.policy == nullptr, !result.errors.empty());
  std::vector<std::string> out;
  for (const PolicyError& error : result.errors) out.push_back(error.ToString());
  return out;
}

// True if some error starts with `prefix` ("t.yaml:L:C: message start").
::testing::Matcher<std::vector<std::string>> HasErrorStartingWith(const std::string& prefix) {
  return ::testing::Contains(::testing::StartsWith(prefix));
}

TEST(PolicyLoaderTest, MinimalPolicyParses) {
  PolicyParseResult result = ParsePolicyText(kMinimal, "t.yaml");
  ASSERT_TRUE(result.errors.empty()) << result.errors[0].ToString();
  const Policy& policy = *result.policy;
  ASSERT_EQ(policy.pools.size(), 1u);
  EXPECT_EQ(policy.pools[0].name, "a");
  EXPECT_EQ(policy.pools[0].endpoints, std::vector<std::string>{"127.0.0.1:1"});
  EXPECT_EQ(policy.pools[0].kv_format, "fp16");
  EXPECT_EQ(policy.pools[0].precision, PoolPrecision::kFull);
  EXPECT_EQ(policy.pools[0].max_context, 100);
  EXPECT_EQ(policy.pools[0].eviction, "none");
  EXPECT_EQ(policy.pools[0].location.ToString(), "t.yaml:3:5");
  EXPECT_EQ(policy.default_task_type, "chat");
  ASSERT_EQ(policy.routes.size(), 1u);
  EXPECT_TRUE(policy.routes[0].when.IsCatchAll());
  // Defaults.
  EXPECT_TRUE(policy.fallback.no_healthy_endpoint);
  EXPECT_TRUE(policy.fallback.pool_full);
  EXPECT_TRUE(policy.fallback.context_too_long);
  EXPECT_TRUE(policy.fallback.failed_before_first_token);
  EXPECT_EQ(policy.fallback.max_attempts, 3);
  EXPECT_TRUE(policy.precision_requests.honour_full);
  EXPECT_EQ(policy.MaxQueue(policy.pools[0]), 64);
  EXPECT_EQ(policy.hash, Fnv1a64Hex(kMinimal));
  EXPECT_EQ(policy.source, "t.yaml");
}

TEST(PolicyLoaderTest, DefaultPolicyParses) {
  PolicyParseResult result = ParsePolicyFile(SourceDir() + "/policies/default.yaml");
  ASSERT_TRUE(result.errors.empty()) << result.errors[0].ToString();
  const Policy& policy = *result.policy;
  const PoolSpec* compressed = policy.FindPool("compressed");
  const PoolSpec* full = policy.FindPool("full");
  ASSERT_NE(compressed, nullptr);
  ASSERT_NE(full, nullptr);
  EXPECT_EQ(compressed->precision, PoolPrecision::kCompressed);
  EXPECT_EQ(compressed->kv_format, "kivi4");
  ASSERT_NE(compressed->quality, nullptr);  // models/reference/quality.yaml, loaded with the policy
  EXPECT_NE(compressed->quality->Find("kivi4", "none", 1000, nullptr), nullptr);
  EXPECT_EQ(full->kv_format, "fp16");
  EXPECT_EQ(compressed->endpoints, std::vector<std::string>{"127.0.0.1:50061"});
  EXPECT_EQ(full->precision, PoolPrecision::kFull);
  EXPECT_EQ(full->endpoints, std::vector<std::string>{"127.0.0.1:50062"});
  EXPECT_EQ(policy.default_task_type, "chat");
  for (const char* task : {"chat", "code_review", "legal", "extraction", "multi_hop"}) {
    EXPECT_NE(policy.FindTaskType(task), nullptr) << task;
  }
  EXPECT_EQ(policy.routes.back().pools, (std::vector<std::string>{"compressed", "full"}));
}

TEST(PolicyLoaderTest, ExamplePoliciesParse) {
  for (const char* name : {"kubernetes.yaml", "multi_tier.yaml"}) {
    PolicyParseResult result = ParsePolicyFile(SourceDir() + "/policies/examples/" + name);
    EXPECT_TRUE(result.errors.empty()) << name << ": " << result.errors[0].ToString();
  }
  PolicyParseResult k8s = ParsePolicyFile(SourceDir() + "/policies/examples/kubernetes.yaml");
  ASSERT_NE(k8s.policy, nullptr);
  EXPECT_EQ(k8s.policy->pools[0].dns, "kvgate-worker-tq35.kvgate.svc.cluster.local:50051");
  EXPECT_TRUE(k8s.policy->pools[0].endpoints.empty());
  EXPECT_EQ(k8s.policy->pools[0].kv_format, "tq3.5");
}

TEST(PolicyLoaderTest, FullSchemaParses) {
  const std::string quality = ::testing::TempDir() + "/full_schema_quality.yaml";
  std::ofstream(quality) << "model: m\nformats:\n  tq:k=4,v=3+h2o:heavy=0.1,recent=0.2:\n"
                            "    512: {kl: 0.01}\n";
  std::string text = R"(version: 1
pools:
  - name: small
    dns: workers.ns.svc:50051
    dns_refresh_ms: 250
    kv_format: TQ:k=4.0,v=3
    precision: compressed
    max_context: 4096
    eviction: h2o:heavy=0.1,recent=0.2
    max_queue: 7
    quality_table: QUALITY
  - name: big
    endpoints: ["[::1]:9", "h:8"]
    kv_format: bf16
    precision: full
    max_context: 8192
task_types:
  - name: chat
    description: plain
  - name: legal
    rules:
      - name: by_tenant
        tenants: [law]
      - keywords: [contract]
        regex: '^Section \d+'
        metadata: {app: docs}
default_task_type: chat
routes:
  - name: r1
    when:
      task_types: [legal]
      prompt_tokens: {min: 10, max: 20}
      total_tokens: {max: 30}
      tenants: [x, y]
      precision: compressed
    pools: [big, small]
    reason: because
    quality: {max_kl: 0.05, min_retrieval: 0.9}
  - name: rest
    pools: [small]
fallback:
  pool_full: false
  max_attempts: 1
precision_requests:
  honour_full: false
load_balancing:
  max_queue: 9
  eject_after_failures: 2
  ejection_base_ms: 10
  ejection_max_ms: 20
)";
  text.replace(text.find("QUALITY"), 7, quality);
  PolicyParseResult result = ParsePolicyText(text, "full.yaml");
  ASSERT_TRUE(result.errors.empty()) << result.errors[0].ToString();
  const Policy& p = *result.policy;
  ASSERT_NE(p.pools[0].quality, nullptr);
  EXPECT_EQ(p.pools[0].quality->model, "m");
  ASSERT_TRUE(p.routes[0].quality.has_value());
  EXPECT_EQ(p.routes[0].quality->max_kl, 0.05);
  EXPECT_EQ(p.routes[0].quality->min_retrieval, 0.9);
  EXPECT_FALSE(p.routes[0].quality->max_ppl_ratio.has_value());
  const PoolSpec& small = p.pools[0];
  EXPECT_EQ(small.dns, "workers.ns.svc:50051");
  EXPECT_EQ(small.dns_refresh_ms, 250);
  EXPECT_EQ(small.kv_format, "tq:k=4,v=3");
  EXPECT_EQ(small.eviction, "h2o:heavy=0.1,recent=0.2");
  EXPECT_EQ(p.MaxQueue(small), 7);
  EXPECT_EQ(p.MaxQueue(p.pools[1]), 9);
  EXPECT_EQ(small.quality_table, quality);
  EXPECT_EQ(p.pools[1].endpoints, (std::vector<std::string>{"[::1]:9", "h:8"}));
  const TaskTypeSpec* legal = p.FindTaskType("legal");
  ASSERT_NE(legal, nullptr);
  ASSERT_EQ(legal->rules.size(), 2u);
  EXPECT_EQ(legal->rules[0].name, "by_tenant");
  EXPECT_EQ(legal->rules[1].name, "legal.2");  // unnamed: <task>.<1-based index>
  EXPECT_EQ(legal->rules[1].regexes, std::vector<std::string>{"^Section \\d+"});
  ASSERT_EQ(legal->rules[1].metadata.size(), 1u);
  EXPECT_EQ(legal->rules[1].metadata[0], (std::pair<std::string, std::string>{"app", "docs"}));
  const RouteSpec& r1 = p.routes[0];
  EXPECT_EQ(r1.when.task_types, std::vector<std::string>{"legal"});
  EXPECT_EQ(r1.when.prompt_tokens.min, 10);
  EXPECT_EQ(r1.when.prompt_tokens.max, 20);
  EXPECT_FALSE(r1.when.total_tokens.min.has_value());
  EXPECT_EQ(r1.when.total_tokens.max, 30);
  EXPECT_EQ(r1.when.precision, PrecisionCondition::kCompressed);
  EXPECT_EQ(r1.reason, "because");
  EXPECT_FALSE(p.fallback.pool_full);
  EXPECT_TRUE(p.fallback.no_healthy_endpoint);
  EXPECT_EQ(p.fallback.max_attempts, 1);
  EXPECT_FALSE(p.precision_requests.honour_full);
  EXPECT_EQ(p.load_balancing.eject_after_failures, 2);
  EXPECT_EQ(p.load_balancing.ejection_max_ms, 20);
}

// ---- Each invalid kind, with its exact position ----

TEST(PolicyLoaderErrorsTest, UnknownKey) {
  auto errors = Errors(Replace("    kv_format: fp16", "    kv_fromat: fp16"));
  EXPECT_THAT(errors,
              HasErrorStartingWith("t.yaml:5:5: unknown key 'kv_fromat' in pools[0] (did you mean "
                                   "'kv_format'?)"));
  EXPECT_THAT(errors,
              HasErrorStartingWith("t.yaml:3:5: pool 'a': missing required key 'kv_format'"));
}

TEST(PolicyLoaderErrorsTest, UnknownTopLevelKey) {
  auto errors = Errors(std::string(kMinimal) + "fallbacks:\n  max_attempts: 2\n");
  EXPECT_THAT(errors, HasErrorStartingWith(
                          "t.yaml:14:1: unknown key 'fallbacks' in the policy (did you mean "
                          "'fallback'?)"));
}

TEST(PolicyLoaderErrorsTest, WrongType) {
  EXPECT_THAT(Errors(Replace("max_context: 100", "max_context: lots")),
              HasErrorStartingWith("t.yaml:7:18: pool 'a'.max_context: expected an integer, got "
                                   "'lots'"));
  EXPECT_THAT(Errors(Replace("pools: [a]", "pools: a")),
              HasErrorStartingWith("t.yaml:13:12: route 'all'.pools: expected a list of strings"));
  EXPECT_THAT(Errors(std::string(kMinimal) + "fallback:\n  pool_full: maybe\n"),
              HasErrorStartingWith("t.yaml:15:14: fallback.pool_full: expected true or false"));
}

TEST(PolicyLoaderErrorsTest, UnknownPoolReference) {
  EXPECT_THAT(Errors(Replace("pools: [a]", "pools: [a, b]")),
              HasErrorStartingWith("t.yaml:13:16: route 'all': unknown pool 'b'"));
}

TEST(PolicyLoaderErrorsTest, UnknownTaskTypeReference) {
  EXPECT_THAT(Errors(Replace("default_task_type: chat", "default_task_type: chit")),
              HasErrorStartingWith("t.yaml:10:20: default_task_type: unknown task type 'chit'"));
  const std::string text = Replace("routes:\n", R"(routes:
  - name: legal_route
    when: {task_types: [legal]}
    pools: [a]
)");
  EXPECT_THAT(Errors(text),
              HasErrorStartingWith("t.yaml:13:25: route 'legal_route': unknown task type 'legal'"));
}

TEST(PolicyLoaderErrorsTest, BadRegex) {
  const std::string text = Replace("  - name: chat\n", R"(  - name: chat
    rules:
      - regex: ['ok', 'a(b']
)");
  auto errors = Errors(text);
  ASSERT_EQ(errors.size(), 1u);
  // The second list entry starts at column 23; PCRE2 reports the missing ')' at pattern offset 3.
  EXPECT_THAT(
      errors[0],
      ::testing::StartsWith("t.yaml:11:23: task type 'chat'.rules[0].regex: invalid regex 'a(b':"));
  EXPECT_THAT(errors[0], HasSubstr("at offset 3"));
}

TEST(PolicyLoaderErrorsTest, DuplicateNames) {
  const std::string text = Replace("task_types:\n", R"(  - name: a
    endpoints: ["127.0.0.1:2"]
    kv_format: fp16
    precision: full
    max_context: 100
task_types:
)");
  EXPECT_THAT(Errors(text), HasErrorStartingWith("t.yaml:8:11: duplicate pool name 'a'"));
  EXPECT_THAT(Errors(Replace("  - name: chat\n", "  - name: chat\n  - name: chat\n")),
              HasErrorStartingWith("t.yaml:10:11: duplicate task type name 'chat'"));
  EXPECT_THAT(Errors(Replace("    max_context: 100", "    max_context: 100\n    max_context: 5")),
              HasErrorStartingWith("t.yaml:8:5: duplicate key 'max_context' in pools[0]"));
}

TEST(PolicyLoaderErrorsTest, MissingCatchAll) {
  EXPECT_THAT(Errors(Replace("    pools: [a]", "    when: {tenants: [x]}\n    pools: [a]")),
              HasErrorStartingWith("t.yaml:12:5: the last route 'all' has conditions"));
}

TEST(PolicyLoaderErrorsTest, UnreachableRouteAfterCatchAll) {
  const std::string text = std::string(kMinimal) + "  - name: late\n    pools: [a]\n";
  EXPECT_THAT(Errors(text),
              HasErrorStartingWith("t.yaml:12:5: route 'all' has no conditions, so the 1 route(s) "
                                   "after it can never match"));
}

TEST(PolicyLoaderErrorsTest, BadRange) {
  const std::string text = Replace("routes:\n", R"(routes:
  - name: r
    when:
      prompt_tokens: {min: 10, max: 5}
    pools: [a]
  - name: s
    when:
      total_tokens: {min: -1}
    pools: [a]
)");
  auto errors = Errors(text);
  EXPECT_THAT(errors, HasErrorStartingWith("t.yaml:14:22: route 'r'.when.prompt_tokens: min 10 is "
                                           "greater than max 5"));
  EXPECT_THAT(errors, HasErrorStartingWith("t.yaml:18:27: route 's'.when.total_tokens.min: must "
                                           "be >= 0, got -1"));
}

TEST(PolicyLoaderErrorsTest, BadKvFormat) {
  EXPECT_THAT(Errors(Replace("kv_format: fp16", "kv_format: fp17")),
              HasErrorStartingWith("t.yaml:5:16: pool 'a'.kv_format: unknown kv_format 'fp17'"));
  // A full-precision pool must store fp16/bf16.
  EXPECT_THAT(Errors(Replace("kv_format: fp16", "kv_format: kivi2")),
              HasErrorStartingWith("t.yaml:6:16: pool 'a': precision full needs kv_format fp16"));
}

TEST(PolicyLoaderErrorsTest, BadMaxContextAndEmptyPools) {
  EXPECT_THAT(Errors(Replace("max_context: 100", "max_context: 0")),
              HasErrorStartingWith("t.yaml:7:18: pool 'a'.max_context: must be > 0, got 0"));
  EXPECT_THAT(Errors(Replace("pools: [a]", "pools: []")),
              HasErrorStartingWith("t.yaml:13:12: route 'all'.pools: the list is empty"));
  EXPECT_THAT(Errors(Replace(R"(endpoints: ["127.0.0.1:1"])", R"(endpoints: ["127.0.0.1"])")),
              HasErrorStartingWith("t.yaml:4:17: pool 'a'.endpoints: '127.0.0.1' is not "
                                   "host:port"));
}

TEST(PolicyLoaderErrorsTest, YamlSyntaxError) {
  // A flow sequence closed with '}': the position is that of the '}'.
  auto errors = Errors(Replace("pools: [a]", "pools: [a, b}"));
  ASSERT_EQ(errors.size(), 1u);
  EXPECT_EQ(errors[0], "t.yaml:13:17: YAML syntax error: illegal flow end");
  // A second ':' in a plain scalar: the position is that of the second ':'.
  errors = Errors(Replace("  - name: all", "  - name: all: x"));
  ASSERT_EQ(errors.size(), 1u);
  EXPECT_EQ(errors[0], "t.yaml:12:14: YAML syntax error: illegal map value");
  // An unterminated flow sequence is detected at the end of the input.
  errors = Errors(Replace("pools: [a]", "pools: [a"));
  ASSERT_EQ(errors.size(), 1u);
  EXPECT_EQ(errors[0], "t.yaml:14:1: YAML syntax error: end of sequence flow not found");
}

TEST(PolicyLoaderErrorsTest, ManyErrorsReportedTogether) {
  std::string text = Replace("max_context: 100", "max_context: -3");
  text = absl::StrReplaceAll(
      text, {{"kv_format: fp16", "kv_format: nope"}, {"pools: [a]", "pools: [zz]"}});
  auto errors = Errors(text);
  EXPECT_EQ(errors.size(), 3u);
  EXPECT_THAT(errors, HasErrorStartingWith("t.yaml:5:16:"));
  EXPECT_THAT(errors, HasErrorStartingWith("t.yaml:7:18:"));
  EXPECT_THAT(errors, HasErrorStartingWith("t.yaml:13:13:"));
}

TEST(PolicyLoaderErrorsTest, HonourFullNeedsAFullPool) {
  EXPECT_THAT(Errors(Replace("precision: full", "precision: compressed")),
              HasErrorStartingWith("t.yaml:1:1: precision_requests.honour_full is true but no pool "
                                   "has precision: full"));
  std::string ok = Replace("precision: full", "precision: compressed") +
                   "precision_requests:\n  honour_full: false\n";
  EXPECT_TRUE(Errors(ok).empty());
}

TEST(PolicyLoaderErrorsTest, EmptyAndNonMapFiles) {
  EXPECT_THAT(Errors(""), HasErrorStartingWith("t.yaml:1:1: the policy is empty"));
  EXPECT_THAT(Errors("- 1\n- 2\n"), HasErrorStartingWith("t.yaml:1:1: the policy: expected a "
                                                         "mapping"));
  PolicyParseResult missing = ParsePolicyFile("/nonexistent/policy.yaml");
  ASSERT_EQ(missing.errors.size(), 1u);
  EXPECT_THAT(missing.errors[0].ToString(),
              ::testing::StartsWith("/nonexistent/policy.yaml: cannot open"));
}

TEST(PolicyLoaderErrorsTest, StatusFormListsEveryErrorLine) {
  absl::StatusOr<std::shared_ptr<const Policy>> policy =
      LoadPolicyText(Replace("max_context: 100", "max_context: x"), "t.yaml");
  ASSERT_FALSE(policy.ok());
  EXPECT_EQ(policy.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(policy.status().message()), HasSubstr("t.yaml:7:18:"));
}

TEST(PolicyHashTest, Fnv1a64KnownVectors) {
  // Reference values from the FNV specification's test suite.
  EXPECT_EQ(Fnv1a64Hex(""), "cbf29ce484222325");
  EXPECT_EQ(Fnv1a64Hex("a"), "af63dc4c8601ec8c");
  EXPECT_EQ(Fnv1a64Hex("foobar"), "85944171f73967e8");
}

TEST(KvFormatNameTest, CanonicalNames) {
  for (const char* name :
       {"fp16", "bf16", "fp8", "int8", "kivi2", "kivi4", "tq4", "tq3.5", "tq3", "tq2.5"}) {
    absl::StatusOr<std::string> canonical = CanonicalKvFormatName(name);
    ASSERT_TRUE(canonical.ok()) << name;
    EXPECT_EQ(*canonical, name);
  }
  EXPECT_EQ(*CanonicalKvFormatName(" FP16 "), "fp16");
  EXPECT_EQ(*CanonicalKvFormatName("tq:k=4.0,v=3"), "tq:k=4,v=3");
  EXPECT_EQ(*CanonicalKvFormatName("tq:v=2.5,k=4,qjl"), "tq:k=4,v=2.5,qjl");
  EXPECT_EQ(*CanonicalKvFormatName("TQ4/fp16=1:1"), "tq4/fp16=1:1");
  EXPECT_EQ(*CanonicalKvFormatName("kivi2/fp16=0:0"), "kivi2");
  for (const char* bad : {"", "fp32", "kivi3", "tq:k=4", "tq:k=4,v=3.3", "tq:k=9,v=4",
                          "tq:k=8,v=4", "tq:k=4,v=4,zz", "tq4/fp16=1", "tq4/bf16=1:1",
                          "tq4/fp16=1,1", "tq4/fp16=-1:0"}) {
    EXPECT_FALSE(CanonicalKvFormatName(bad).ok()) << bad;
  }
}

TEST(KvFormatNameTest, Eviction) {
  for (const char* ok : {"none", "h2o", "h2o:heavy=0.1,recent=0.1", "sink:sinks=4,window=1024"}) {
    EXPECT_TRUE(ValidateEvictionName(ok).ok()) << ok;
  }
  for (const char* bad : {"lru", "h2o:heavy=2", "sink:sinks=-1", "h2o:foo=0.1", "h2o;"}) {
    EXPECT_FALSE(ValidateEvictionName(bad).ok()) << bad;
  }
}

}  // namespace
}  // namespace kvgate::gateway
