// Task classification, route matching and the routing decision, as tables over one policy.
#include "gateway/score/request_scorer.h"

#include <chrono>
#include <cstdio>
#include <string>

#include "gateway/policy/policy_loader.h"
#include "gateway/score/route_info.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace kvgate::gateway {
namespace {

constexpr char kPolicy[] = R"(version: 1
pools:
  - name: small
    endpoints: ["127.0.0.1:1"]
    kv_format: kivi2
    precision: compressed
    max_context: 1000
  - name: big
    endpoints: ["127.0.0.1:2"]
    kv_format: tq3.5
    precision: compressed
    max_context: 8000
  - name: full
    endpoints: ["127.0.0.1:3"]
    kv_format: fp16
    precision: full
    max_context: 4000
default_task_type: chat
task_types:
  - name: chat
  - name: code_review
    rules:
      - name: diff
        regex: ['^diff --git ', '^\+\+\+ b/']
      - name: ide
        metadata: {client: ide, feature: review}
  - name: legal
    rules:
      - name: law_tenant
        tenants: [lawfirm]
      - name: legal_words
        keywords: [contract, governing law, c++]
  - name: extraction
    rules:
      - name: extract_for_acme
        keywords: [extract]
        tenants: [acme]
routes:
  - name: explicit_full
    when: {precision: full}
    pools: [full]
  - name: accuracy
    when: {task_types: [code_review, legal]}
    pools: [full, big]
    reason: accuracy matters
  - name: mid_prompt
    when:
      prompt_tokens: {min: 500, max: 1999}
    pools: [big, full]
  - name: long_total
    when:
      total_tokens: {min: 2000}
    pools: [small, big, full]
  - name: acme_compressed
    when:
      tenants: [acme]
      precision: compressed
    pools: [small]
  - name: default
    pools: [small, full]
)";

std::shared_ptr<const Policy> TestPolicy() {
  static const std::shared_ptr<const Policy> policy = [] {
    absl::StatusOr<std::shared_ptr<const Policy>> loaded = LoadPolicyText(kPolicy, "test.yaml");
    EXPECT_TRUE(loaded.ok()) << loaded.status();
    return loaded.ok() ? *loaded : nullptr;
  }();
  return policy;
}

struct ClassifyCase {
  const char* label;
  std::string text;
  std::string tenant;
  std::vector<std::pair<std::string, std::string>> metadata;
  std::string explicit_task;
  std::string want_task;
  std::string want_source;
};

TEST(ClassifyTaskTest, Table) {
  auto policy = TestPolicy();
  ASSERT_NE(policy, nullptr);
  const std::vector<ClassifyCase> cases = {
      {"nothing matches: default", "tell me a joke", "", {}, "", "chat", "default"},
      {"regex at a line start",
       "please look\ndiff --git a/x b/x\n",
       "",
       {},
       "",
       "code_review",
       "rule:diff"},
      {"second regex of the rule", "--- a/f\n+++ b/f\n", "", {}, "", "code_review", "rule:diff"},
      {"regex not at a line start", "the diff --git command", "", {}, "", "chat", "default"},
      {"keyword, case-insensitive",
       "Review this CONTRACT please",
       "",
       {},
       "",
       "legal",
       "rule:legal_words"},
      {"keyword with a space matches across whitespace",
       "which governing\n  law applies?",
       "",
       {},
       "",
       "legal",
       "rule:legal_words"},
      {"keyword inside a word does not match",
       "the contractor arrived",
       "",
       {},
       "",
       "chat",
       "default"},
      {"keyword with symbols as a whole word",
       "I write C++ daily",
       "",
       {},
       "",
       "legal",
       "rule:legal_words"},
      {"symbol keyword followed by a letter", "I write C++x daily", "", {}, "", "chat", "default"},
      {"unicode letters are word characters", "écontract", "", {}, "", "chat", "default"},
      {"tenant rule", "hello", "lawfirm", {}, "", "legal", "rule:law_tenant"},
      {"metadata rule needs every pair", "hello", "", {{"client", "ide"}}, "", "chat", "default"},
      {"metadata rule all pairs",
       "hello",
       "",
       {{"client", "ide"}, {"feature", "review"}},
       "",
       "code_review",
       "rule:ide"},
      {"metadata value must be equal",
       "hello",
       "",
       {{"client", "ide"}, {"feature", "Review"}},
       "",
       "chat",
       "default"},
      {"keyword AND tenant: both",
       "extract the dates",
       "acme",
       {},
       "",
       "extraction",
       "rule:extract_for_acme"},
      {"keyword AND tenant: keyword only", "extract the dates", "other", {}, "", "chat", "default"},
      {"rule order: code_review rules come before legal",
       "diff --git a/contract b/contract",
       "",
       {},
       "",
       "code_review",
       "rule:diff"},
      {"explicit task wins over rules",
       "diff --git a b",
       "",
       {},
       "extraction",
       "extraction",
       "request"},
      {"invalid UTF-8 does not break matching",
       std::string("\xff\xfe contract \xc3"),
       "",
       {},
       "",
       "legal",
       "rule:legal_words"},
  };
  for (const ClassifyCase& c : cases) {
    RouteRequest request;
    request.prompt_text = c.text;
    request.tenant = c.tenant;
    request.task_type = c.explicit_task;
    for (const auto& [k, v] : c.metadata) request.metadata[k] = v;
    absl::StatusOr<TaskClassification> got = ClassifyTask(*policy, request);
    ASSERT_TRUE(got.ok()) << c.label << ": " << got.status();
    EXPECT_EQ(got->task_type, c.want_task) << c.label;
    EXPECT_EQ(got->source, c.want_source) << c.label;
  }
}

TEST(TextPatternTest, KeywordsFoldUnicodeCaseAndRespectWordEdges) {
  auto pattern = TextPattern::ForKeywords({"système", "naïve bayes"});
  ASSERT_TRUE(pattern.ok());
  EXPECT_TRUE((*pattern)->Matches("LE SYSTÈME EST"));
  EXPECT_TRUE((*pattern)->Matches("a Naïve\tBayes model"));
  EXPECT_FALSE((*pattern)->Matches("écosystème"));  // preceded by a letter
  EXPECT_FALSE((*pattern)->Matches("systèmes"));    // followed by a letter
  EXPECT_FALSE(TextPattern::ForKeywords({}).ok());
  EXPECT_FALSE(TextPattern::ForKeywords({""}).ok());
}

TEST(TextPatternTest, RegexIsMultilineAndReportsErrors) {
  auto pattern = TextPattern::FromRegex("^b$");
  ASSERT_TRUE(pattern.ok());
  EXPECT_TRUE((*pattern)->Matches("a\nb\nc"));
  PatternError error;
  EXPECT_FALSE(TextPattern::FromRegex("x{2,1}", &error).ok());
  EXPECT_FALSE(error.message.empty());
  EXPECT_FALSE(TextPattern::FromRegex("").ok());
}

TEST(ClassifyTaskTest, UnknownExplicitTaskIsInvalidArgument) {
  RouteRequest request;
  request.task_type = "poetry";
  absl::StatusOr<TaskClassification> got = ClassifyTask(*TestPolicy(), request);
  ASSERT_FALSE(got.ok());
  EXPECT_EQ(got.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(got.status().message()), ::testing::HasSubstr("poetry"));
}

struct RouteCase {
  const char* label;
  std::string task;  // explicit
  int64_t prompt_tokens;
  int64_t max_tokens;
  RequestedPrecision precision;
  std::string tenant;
  std::string want_route;
  std::vector<std::string> want_candidates;
  std::vector<std::string> want_viable;
};

TEST(ScoreRequestTest, RouteTable) {
  auto policy = TestPolicy();
  using P = RequestedPrecision;
  const std::vector<RouteCase> cases = {
      {"default",
       "chat",
       10,
       10,
       P::kUnspecified,
       "",
       "default",
       {"small", "full"},
       {"small", "full"}},
      {"explicit full precision",
       "chat",
       10,
       10,
       P::kFull,
       "",
       "explicit_full",
       {"full"},
       {"full"}},
      {"accuracy task",
       "legal",
       10,
       10,
       P::kUnspecified,
       "",
       "accuracy",
       {"full", "big"},
       {"full", "big"}},
      {"full precision honoured on an accuracy route drops compressed pools",
       "legal",
       10,
       10,
       P::kFull,
       "",
       "explicit_full",
       {"full"},
       {"full"}},
      {"prompt range lower bound inclusive",
       "chat",
       500,
       0,
       P::kUnspecified,
       "",
       "mid_prompt",
       {"big", "full"},
       {"big", "full"}},
      {"prompt range upper bound inclusive",
       "chat",
       1999,
       0,
       P::kUnspecified,
       "",
       "mid_prompt",
       {"big", "full"},
       {"big", "full"}},
      {"just below the prompt range",
       "chat",
       499,
       0,
       P::kUnspecified,
       "",
       "default",
       {"small", "full"},
       {"small", "full"}},
      {"total range, small pool skipped as too short",
       "chat",
       100,
       1900,
       P::kUnspecified,
       "",
       "long_total",
       {"small", "big", "full"},
       {"big", "full"}},
      {"total beyond full, only big holds it",
       "chat",
       2000,
       3000,
       P::kUnspecified,
       "",
       "long_total",
       {"small", "big", "full"},
       {"big"}},
      {"tenant + compressed precision",
       "chat",
       10,
       10,
       P::kCompressed,
       "acme",
       "acme_compressed",
       {"small"},
       {"small"}},
      {"tenant without the precision",
       "chat",
       10,
       10,
       P::kUnspecified,
       "acme",
       "default",
       {"small", "full"},
       {"small", "full"}},
      {"default route, small too short: fall to full",
       "chat",
       300,
       800,
       P::kUnspecified,
       "",
       "default",
       {"small", "full"},
       {"full"}},
  };
  for (const RouteCase& c : cases) {
    RouteRequest request;
    request.task_type = c.task;
    request.prompt_tokens = c.prompt_tokens;
    request.max_tokens = c.max_tokens;
    request.precision = c.precision;
    request.tenant = c.tenant;
    absl::StatusOr<RouteDecision> decision = ScoreRequest(*policy, request);
    ASSERT_TRUE(decision.ok()) << c.label << ": " << decision.status();
    EXPECT_EQ(decision->matched_route, c.want_route) << c.label;
    EXPECT_EQ(decision->candidate_pools, c.want_candidates) << c.label;
    EXPECT_EQ(decision->viable_pools, c.want_viable) << c.label;
    EXPECT_EQ(decision->total_tokens, c.prompt_tokens + c.max_tokens) << c.label;
    EXPECT_EQ(decision->policy_hash, policy->hash);
    // Every candidate that is not viable is reported as skipped for context.
    EXPECT_EQ(decision->skipped.size(), c.want_candidates.size() - c.want_viable.size()) << c.label;
    for (const SkippedPool& s : decision->skipped) {
      EXPECT_EQ(s.reason, FallbackReason::kContextTooLong) << c.label;
    }
  }
}

TEST(ScoreRequestTest, ReasonAndRouteInfo) {
  RouteRequest request;
  request.prompt_text = "diff --git a/x b/x";
  request.prompt_tokens = 100;
  request.max_tokens = 3950;  // 4050: beyond full (4000), within big (8000)
  absl::StatusOr<RouteDecision> decision = ScoreRequest(*TestPolicy(), request);
  ASSERT_TRUE(decision.ok()) << decision.status();
  EXPECT_EQ(decision->task.task_type, "code_review");
  EXPECT_EQ(decision->task.source, "rule:diff");
  EXPECT_EQ(decision->matched_route, "accuracy");
  EXPECT_THAT(decision->reason, ::testing::StartsWith("accuracy matters"));
  ASSERT_EQ(decision->skipped.size(), 1u);
  EXPECT_EQ(decision->skipped[0].pool, "full");

  kvgate::v1::RouteInfo info;
  FillRouteInfo(*decision, {"big", "tq3.5", "127.0.0.1:2", {}}, &info);
  EXPECT_EQ(info.pool(), "big");
  EXPECT_EQ(info.kv_format(), "tq3.5");
  EXPECT_EQ(info.worker(), "127.0.0.1:2");
  EXPECT_EQ(info.matched_route(), "accuracy");
  EXPECT_EQ(info.task_type(), "code_review");
  EXPECT_EQ(info.task_type_source(), "rule:diff");
  ASSERT_EQ(info.fallbacks_size(), 1);
  EXPECT_EQ(info.fallbacks(0).from_pool(), "full");
  EXPECT_EQ(info.fallbacks(0).reason(), "context_too_long");
  EXPECT_EQ(info.candidate_pools_size(), 2);
  EXPECT_EQ(info.policy_hash(), TestPolicy()->hash);
}

TEST(ScoreRequestTest, Errors) {
  auto policy = TestPolicy();
  RouteRequest too_long;
  too_long.task_type = "chat";
  too_long.prompt_tokens = 8000;
  too_long.max_tokens = 1;  // 8001 > every pool
  absl::StatusOr<RouteDecision> d = ScoreRequest(*policy, too_long);
  EXPECT_EQ(d.status().code(), absl::StatusCode::kOutOfRange);

  RouteRequest negative;
  negative.prompt_tokens = -1;
  EXPECT_EQ(ScoreRequest(*policy, negative).status().code(), absl::StatusCode::kInvalidArgument);

  RouteRequest unknown;
  unknown.task_type = "nope";
  EXPECT_EQ(ScoreRequest(*policy, unknown).status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(ScoreRequestTest, ContextFallbackDisabledStopsAtFirstPool) {
  std::string text = std::string(kPolicy) + "fallback:\n  context_too_long: false\n";
  absl::StatusOr<std::shared_ptr<const Policy>> policy = LoadPolicyText(text, "t.yaml");
  ASSERT_TRUE(policy.ok()) << policy.status();
  RouteRequest request;
  request.prompt_tokens = 300;
  request.max_tokens = 800;  // 1100 > small (1000), fits full
  absl::StatusOr<RouteDecision> d = ScoreRequest(**policy, request);
  EXPECT_EQ(d.status().code(), absl::StatusCode::kOutOfRange);
}

TEST(ScoreRequestTest, FullRequestNotHonoured) {
  std::string text = std::string(kPolicy) + "precision_requests:\n  honour_full: false\n";
  // Without honouring, `precision: full` is only a route condition: drop the explicit_full route
  // so the request falls through to default.
  size_t start = text.find("  - name: explicit_full");
  size_t end = text.find("  - name: accuracy");
  text.erase(start, end - start);
  absl::StatusOr<std::shared_ptr<const Policy>> policy = LoadPolicyText(text, "t.yaml");
  ASSERT_TRUE(policy.ok()) << policy.status();
  RouteRequest request;
  request.prompt_tokens = 10;
  request.precision = RequestedPrecision::kFull;
  absl::StatusOr<RouteDecision> d = ScoreRequest(**policy, request);
  ASSERT_TRUE(d.ok());
  EXPECT_EQ(d->candidate_pools, (std::vector<std::string>{"small", "full"}));
}

TEST(ScoreRequestTest, HonouredFullOnRouteWithoutFullPoolUsesAllFullPools) {
  std::string text = kPolicy;
  size_t start = text.find("  - name: explicit_full");
  size_t end = text.find("  - name: accuracy");
  text.erase(start, end - start);
  // The default route gets no full pool.
  const std::string default_pools = "    pools: [small, full]\n";
  size_t at = text.rfind(default_pools);
  ASSERT_NE(at, std::string::npos);
  text.replace(at, default_pools.size(), "    pools: [small]\n");
  absl::StatusOr<std::shared_ptr<const Policy>> policy = LoadPolicyText(text, "t.yaml");
  ASSERT_TRUE(policy.ok()) << policy.status();
  RouteRequest request;
  request.tenant = "acme";
  request.prompt_tokens = 10;
  request.precision = RequestedPrecision::kFull;  // default route [small] -> every full pool
  absl::StatusOr<RouteDecision> d = ScoreRequest(**policy, request);
  ASSERT_TRUE(d.ok());
  EXPECT_EQ(d->matched_route, "default");
  EXPECT_EQ(d->candidate_pools, std::vector<std::string>{"full"});
}

// Classification cost on a 200 KB prompt (about 50K tokens) where no rule matches, so every
// rule's patterns scan the whole text: the worst case.
TEST(ClassifyTaskTest, CostOn200KBPrompt) {
  absl::StatusOr<std::shared_ptr<const Policy>> policy = LoadPolicyFile(
      std::string(std::getenv("KVGATE_SOURCE_DIR") ? std::getenv("KVGATE_SOURCE_DIR") : ".") +
      "/policies/default.yaml");
  ASSERT_TRUE(policy.ok()) << policy.status();
  std::string prompt;
  const char* words[] = {"the", "quick", "brown",   "fox",       "jumps",       "over",   "lazy",
                         "dog", "while", "système", "reviewing", "contractors", "lawful", "json"};
  for (size_t i = 0; prompt.size() < 200 * 1024; ++i) {
    prompt += words[(i * 7919) % 14];
    prompt += (i % 17 == 16) ? "\n" : " ";
  }
  RouteRequest request;
  request.prompt_text = prompt;
  request.prompt_tokens = 50000;
  absl::StatusOr<TaskClassification> warm = ClassifyTask(**policy, request);
  ASSERT_TRUE(warm.ok());
  EXPECT_EQ(warm->source, "default");  // nothing matched: every rule scanned the whole prompt
  constexpr int kRuns = 20;
  auto start = std::chrono::steady_clock::now();
  for (int i = 0; i < kRuns; ++i) ASSERT_TRUE(ClassifyTask(**policy, request).ok());
  double ms =
      std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count() /
      kRuns;
  size_t rules = 0;
  for (const TaskTypeSpec& task : (*policy)->task_types) rules += task.rules.size();
  std::printf("classification of a %zu-byte prompt (default.yaml, %zu rules, no match): %.3f ms\n",
              prompt.size(), rules, ms);
  // Generous bound for a loaded 2-core CI machine; the measured figure is printed above.
  EXPECT_LT(ms, 100.0);
}

}  // namespace
}  // namespace kvgate::gateway
