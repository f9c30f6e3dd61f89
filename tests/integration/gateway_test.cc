// Integration tests of kvgate-gateway with real worker processes on loopback: routing by the
// policy, precision fallback when a pool is down or full, mid-stream failure, hot reload, bad
// input, metrics.
#include <signal.h>

#include <atomic>
#include <chrono>
#include <fstream>
#include <regex>
#include <string>
#include <thread>
#include <vector>

#include <grpcpp/grpcpp.h>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "kvgate/v1/gateway.grpc.pb.h"
#include "tests/support/test_env.h"

namespace kvgate {
namespace {

namespace pb = ::kvgate::v1;
using ::kvgate::testing::Subprocess;
using ::testing::HasSubstr;

constexpr char kPolicyTemplate[] = R"(version: 1
pools:
  - name: compressed
    endpoints: ["127.0.0.1:COMPRESSED_PORT"]
    kv_format: COMPRESSED_FORMAT
    precision: compressed
    max_context: 2048
  - name: full
    endpoints: ["127.0.0.1:FULL_PORT"]
    kv_format: fp16
    precision: full
    max_context: 2048
default_task_type: chat
task_types:
  - name: chat
  - name: legal
    rules:
      - name: contract_terms
        keywords: [contract, governing law, indemnify]
      - name: legal_team_header
        metadata: {x-team: legal}
routes:
  - name: explicit_full
    when: {precision: full}
    pools: [full]
  - name: accuracy_sensitive
    when: {task_types: [legal]}
    pools: [full, compressed]
  - name: long_prompt
    when: {prompt_tokens: {min: 600}}
    pools: [full, compressed]
  - name: default
    pools: [DEFAULT_POOLS]
fallback:
  max_attempts: 2
load_balancing:
  eject_after_failures: 1
)";

struct Stream {
  std::vector<int32_t> ids;
  std::string text;
  pb::GenerateChunk last;
  grpc::Status status;
};

class GatewayTest : public ::testing::Test {
 protected:
  void SetUp() override {
    model_ = testing::TinyModelDir();
    if (model_.empty()) GTEST_SKIP() << "tiny model not generated (needs python3-numpy)";
    // The compressed worker's cache holds 8 blocks x 16 tokens = 128 tokens: easy to fill.
    compressed_ = StartWorker("8", "tq4");
    full_ = StartWorker("256", "fp16");
    ASSERT_TRUE(compressed_ && full_);
    policy_path_ = ::testing::TempDir() + "/gateway_test_policy_" + std::to_string(getpid()) +
                   "_" + ::testing::UnitTest::GetInstance()->current_test_info()->name() + ".yaml";
    WritePolicy("compressed, full");
    gateway_ = Subprocess::Start({testing::BinaryDir() + "/bin/kvgate-gateway", "--policy",
                                  policy_path_, "--model", model_, "--host", "127.0.0.1",
                                  "--port", "0", "--http_port", "0", "--policy_poll_ms", "100",
                                  "--probe_interval_ms", "100"});
    ASSERT_NE(gateway_, nullptr);
    int port = gateway_->WaitForListening(std::chrono::seconds(30));
    ASSERT_GT(port, 0);
    http_port_ = gateway_->PrintedPort("HTTP");
    stub_ = pb::Gateway::NewStub(grpc::CreateChannel("127.0.0.1:" + std::to_string(port),
                                                     grpc::InsecureChannelCredentials()));
    // Ready once both workers are probed SERVING (/readyz is "ok" as soon as one pool is).
    for (int i = 0; i < 100; ++i) {
      auto ready = testing::HttpGet(http_port_, "/readyz");
      if (ready && *ready == "ok\n" && RouteOf(Chat()).route().pool() == "compressed" &&
          HealthyEndpoints() == 2) {
        break;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(100));
    }
  }

  // Endpoints the gateway's prober currently sees SERVING (its kvgate_gateway_endpoint_healthy).
  int HealthyEndpoints() {
    const std::string m = Metrics();
    int healthy = 0;
    for (size_t at = m.find("\nkvgate_gateway_endpoint_healthy{"); at != std::string::npos;
         at = m.find("\nkvgate_gateway_endpoint_healthy{", at + 1)) {
      const size_t end = m.find('\n', at + 1);
      if (m.compare(end - 2, 2, " 1") == 0) ++healthy;
    }
    return healthy;
  }

  std::unique_ptr<Subprocess> StartWorker(const std::string& blocks, const std::string& kv) {
    auto w = Subprocess::Start({testing::BinaryDir() + "/bin/kvgate-worker", "--model",
                                model_, "--port", "0", "--host", "127.0.0.1", "--kv_blocks",
                                blocks, "--kv", kv, "--threads", "1"});
    if (w == nullptr || w->WaitForListening(std::chrono::seconds(60)) <= 0) return nullptr;
    return w;
  }
  int PortOf(Subprocess& p) { return p.PrintedPort("LISTENING"); }

  void WritePolicy(const std::string& default_pools, const std::string& compressed_format = "tq4") {
    std::string text = kPolicyTemplate;
    text = std::regex_replace(text, std::regex("COMPRESSED_FORMAT"), compressed_format);
    text = std::regex_replace(text, std::regex("COMPRESSED_PORT"),
                              std::to_string(PortOf(*compressed_)));
    text = std::regex_replace(text, std::regex("FULL_PORT"), std::to_string(PortOf(*full_)));
    text = std::regex_replace(text, std::regex("DEFAULT_POOLS"), default_pools);
    WriteFile(text);
  }
  void WriteFile(const std::string& text) {
    std::string tmp = policy_path_ + ".tmp";
    std::ofstream(tmp) << text;
    std::rename(tmp.c_str(), policy_path_.c_str());
  }

  static pb::GenerateRequest Chat(int max_tokens = 8) {
    pb::GenerateRequest req;
    req.set_prompt("Hello there, how are you today?");
    req.mutable_sampling()->set_max_tokens(max_tokens);
    req.mutable_sampling()->set_ignore_eos(true);
    return req;
  }

  Stream Generate(const pb::GenerateRequest& req) {
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(60));
    auto reader = stub_->Generate(&ctx, req);
    Stream s;
    pb::GenerateChunk chunk;
    while (reader->Read(&chunk)) {
      s.ids.insert(s.ids.end(), chunk.token_ids().begin(), chunk.token_ids().end());
      s.text += chunk.text();
      s.last = chunk;
    }
    s.status = reader->Finish();
    return s;
  }

  pb::RouteResponse RouteOf(const pb::GenerateRequest& req) {
    grpc::ClientContext ctx;
    pb::RouteResponse resp;
    stub_->Route(&ctx, req, &resp);
    return resp;
  }

  std::string Metrics() { return testing::HttpGet(http_port_, "/metrics").value_or(""); }

  std::string model_;
  std::string policy_path_;
  std::unique_ptr<Subprocess> compressed_, full_, gateway_;
  int http_port_ = 0;
  std::unique_ptr<pb::Gateway::Stub> stub_;
};

TEST_F(GatewayTest, ShortChatIsServedByTheCompressedPool) {
  Stream s = Generate(Chat());
  ASSERT_TRUE(s.status.ok()) << s.status.error_message();
  EXPECT_EQ(s.ids.size(), 8u);
  const auto& r = s.last.route();
  EXPECT_EQ(r.pool(), "compressed");
  EXPECT_EQ(r.kv_format(), "tq4");
  EXPECT_EQ(r.worker(), "127.0.0.1:" + std::to_string(PortOf(*compressed_)));
  EXPECT_EQ(r.matched_route(), "default");
  EXPECT_EQ(r.task_type(), "chat");
  EXPECT_EQ(r.task_type_source(), "default");
  EXPECT_THAT(r.candidate_pools(), ::testing::ElementsAre("compressed", "full"));
  EXPECT_TRUE(r.fallbacks().empty());
  EXPECT_FALSE(r.policy_hash().empty());
  EXPECT_EQ(s.last.usage().completion_tokens(), 8);
}

TEST_F(GatewayTest, ContractReviewIsServedByTheFullPool) {
  pb::GenerateRequest req = Chat();
  req.set_prompt("Please review this contract: the governing law is that of Delaware.");
  Stream s = Generate(req);
  ASSERT_TRUE(s.status.ok()) << s.status.error_message();
  EXPECT_EQ(s.last.route().pool(), "full");
  EXPECT_EQ(s.last.route().matched_route(), "accuracy_sensitive");
  EXPECT_EQ(s.last.route().task_type(), "legal");
  EXPECT_EQ(s.last.route().task_type_source(), "rule:contract_terms");
}

TEST_F(GatewayTest, RequestHeadersAndMetadataFeedClassification) {
  // A gRPC request header matches a policy `metadata:` rule...
  grpc::ClientContext ctx;
  ctx.AddMetadata("x-team", "legal");
  pb::RouteResponse by_header;
  ASSERT_TRUE(stub_->Route(&ctx, Chat(), &by_header).ok());
  EXPECT_EQ(by_header.route().task_type(), "legal");
  EXPECT_EQ(by_header.route().task_type_source(), "rule:legal_team_header");
  EXPECT_EQ(by_header.route().pool(), "full");
  // ... and so does the request's own metadata field, which wins over a header of the same name.
  pb::GenerateRequest req = Chat();
  (*req.mutable_metadata())["x-team"] = "legal";
  EXPECT_EQ(RouteOf(req).route().task_type(), "legal");
  grpc::ClientContext ctx2;
  ctx2.AddMetadata("x-team", "legal");
  pb::GenerateRequest overridden = Chat();
  (*overridden.mutable_metadata())["x-team"] = "search";
  pb::RouteResponse resp;
  ASSERT_TRUE(stub_->Route(&ctx2, overridden, &resp).ok());
  EXPECT_EQ(resp.route().task_type(), "chat");
}

TEST_F(GatewayTest, LongPromptIsServedByTheFullPool) {
  pb::GenerateRequest req = Chat(4);
  std::string prompt;
  for (int i = 0; i < 40; ++i) prompt += "The quick brown fox jumps over the lazy dog. ";
  req.set_prompt(prompt);
  pb::RouteResponse route = RouteOf(req);
  ASSERT_GE(route.score().prompt_tokens(), 600);
  Stream s = Generate(req);
  ASSERT_TRUE(s.status.ok()) << s.status.error_message();
  EXPECT_EQ(s.last.route().pool(), "full");
  EXPECT_EQ(s.last.route().matched_route(), "long_prompt");
  EXPECT_EQ(s.last.usage().prompt_tokens(), route.score().prompt_tokens());
}

TEST_F(GatewayTest, ExplicitFullPrecisionIsHonoured) {
  pb::GenerateRequest req = Chat();
  req.set_precision(pb::PRECISION_FULL);
  Stream s = Generate(req);
  ASSERT_TRUE(s.status.ok()) << s.status.error_message();
  EXPECT_EQ(s.last.route().pool(), "full");
  EXPECT_EQ(s.last.route().matched_route(), "explicit_full");
}

TEST_F(GatewayTest, RouteDryRunAgreesWithGenerate) {
  pb::RouteResponse route = RouteOf(Chat());
  EXPECT_EQ(route.route().pool(), "compressed");
  EXPECT_EQ(route.route().worker(), "");
  EXPECT_EQ(route.score().max_tokens(), 8);
  EXPECT_EQ(route.score().total_tokens(), route.score().prompt_tokens() + 8);
  EXPECT_EQ(route.score().task_type(), "chat");
  // The count is the model tokenizer's exact count: CountTokens agrees.
  grpc::ClientContext ctx;
  pb::CountTokensRequest count_req;
  count_req.set_prompt(Chat().prompt());
  pb::CountTokensResponse count;
  ASSERT_TRUE(stub_->CountTokens(&ctx, count_req, &count).ok());
  EXPECT_EQ(count.count(), route.score().prompt_tokens());
}

TEST_F(GatewayTest, KilledCompressedWorkerFallsBackToFull) {
  compressed_->Signal(SIGKILL);
  compressed_->Wait();
  Stream s = Generate(Chat());
  ASSERT_TRUE(s.status.ok()) << s.status.error_message();
  EXPECT_EQ(s.last.route().pool(), "full");
  ASSERT_EQ(s.last.route().fallbacks_size(), 1);
  EXPECT_EQ(s.last.route().fallbacks(0).from_pool(), "compressed");
  EXPECT_THAT(s.last.route().fallbacks(0).reason(),
              ::testing::AnyOf("failed_before_first_token", "no_healthy_endpoint"));
  // Later requests keep moving (the endpoint is ejected or unhealthy by then).
  for (int i = 0; i < 3; ++i) {
    Stream again = Generate(Chat());
    ASSERT_TRUE(again.status.ok()) << again.status.error_message();
    EXPECT_EQ(again.last.route().pool(), "full");
  }
  EXPECT_THAT(Metrics(), HasSubstr("kvgate_gateway_fallbacks_total{from_pool=\"compressed\""));
}

TEST_F(GatewayTest, FullCompressedPoolFallsBackToFull) {
  // 30-ish prompt tokens + 120 output tokens needs 10 blocks; the compressed worker has 8.
  pb::GenerateRequest req = Chat(120);
  Stream s = Generate(req);
  ASSERT_TRUE(s.status.ok()) << s.status.error_message();
  EXPECT_EQ(s.last.route().pool(), "full");
  ASSERT_GE(s.last.route().fallbacks_size(), 1);
  EXPECT_EQ(s.last.route().fallbacks(0).from_pool(), "compressed");
  EXPECT_EQ(s.last.route().fallbacks(0).reason(), "pool_full");
  EXPECT_EQ(s.ids.size(), 120u);
}

TEST_F(GatewayTest, WorkerKilledMidStreamIsAClearErrorNotATruncation) {
  pb::GenerateRequest req = Chat(1900);
  req.set_precision(pb::PRECISION_FULL);  // only the full pool
  grpc::ClientContext ctx;
  auto reader = stub_->Generate(&ctx, req);
  pb::GenerateChunk chunk;
  int tokens = 0;
  ASSERT_TRUE(reader->Read(&chunk));
  tokens += chunk.token_ids_size();
  full_->Signal(SIGKILL);
  while (reader->Read(&chunk)) tokens += chunk.token_ids_size();
  grpc::Status status = reader->Finish();
  EXPECT_EQ(status.error_code(), grpc::StatusCode::ABORTED) << status.error_message();
  EXPECT_THAT(status.error_message(), HasSubstr("tokens were delivered"));
  EXPECT_LT(tokens, 1900);
  EXPECT_THAT(Metrics(), HasSubstr("outcome=\"aborted\""));
}

TEST_F(GatewayTest, HotReloadAppliesGoodPoliciesAndKeepsTheLastGoodOne) {
  std::atomic<bool> stop{false};
  std::atomic<int> failures{0}, served{0};
  std::thread load([&] {
    while (!stop) {
      Stream s = Generate(Chat(4));
      if (s.status.ok()) {
        ++served;
      } else {
        ++failures;
      }
    }
  });
  // Good edit: chat now prefers the full pool.
  WritePolicy("full, compressed");
  bool switched = false;
  for (int i = 0; i < 50 && !switched; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
    switched = RouteOf(Chat()).route().pool() == "full";
  }
  EXPECT_TRUE(switched) << "the good policy never took effect";
  std::string hash_after_good = RouteOf(Chat()).route().policy_hash();

  // Bad edit: an unknown pool. Nothing changes but an error metric.
  WriteFile("version: 1\npools: []\nroutes:\n  - name: x\n    pools: [nowhere]\n");
  std::this_thread::sleep_for(std::chrono::milliseconds(600));
  pb::RouteResponse after_bad = RouteOf(Chat());
  EXPECT_EQ(after_bad.route().pool(), "full");
  EXPECT_EQ(after_bad.route().policy_hash(), hash_after_good);
  stop = true;
  load.join();
  EXPECT_EQ(failures.load(), 0) << "requests failed during reloads";
  EXPECT_GT(served.load(), 0);
  std::string metrics = Metrics();
  EXPECT_THAT(metrics, HasSubstr("kvgate_gateway_policy_reloads_total{result=\"failed\"} 1"));
  EXPECT_THAT(metrics, HasSubstr("kvgate_gateway_policy_reloads_total{result=\"ok\"} 1"));
  EXPECT_THAT(metrics, HasSubstr("kvgate_gateway_policy_info{hash=\"" + hash_after_good + "\"} 1"));
  EXPECT_TRUE(gateway_->Running());
}

TEST_F(GatewayTest, PoolWhoseWorkerReportsAnotherFormatIsNotUsed) {
  // The policy now says the compressed pool serves int8, but its worker reports tq4.
  WritePolicy("compressed, full", "int8");
  pb::GenerateChunk last;
  for (int i = 0; i < 50; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
    Stream s = Generate(Chat());
    ASSERT_TRUE(s.status.ok()) << s.status.error_message();
    last = s.last;
    if (last.route().pool() == "full") break;
  }
  EXPECT_EQ(last.route().pool(), "full");
  ASSERT_GE(last.route().fallbacks_size(), 1);
  EXPECT_EQ(last.route().fallbacks(0).from_pool(), "compressed");
  EXPECT_EQ(last.route().fallbacks(0).reason(), "format_mismatch");
  EXPECT_THAT(Metrics(), HasSubstr("kvgate_gateway_endpoint_kv_format_mismatch{endpoint=\"127.0.0.1:" +
                                   std::to_string(PortOf(*compressed_)) +
                                   "\",pool=\"compressed\"} 1"));
}

TEST_F(GatewayTest, BadInputGetsTheRightCode) {
  struct Case {
    std::string name;
    pb::GenerateRequest req;
    grpc::StatusCode code;
  };
  std::vector<Case> cases;
  {
    pb::GenerateRequest r = Chat();
    r.set_prompt("");
    cases.push_back({"empty prompt", r, grpc::StatusCode::INVALID_ARGUMENT});
  }
  {
    pb::GenerateRequest r = Chat();
    r.set_task_type("no_such_task");
    cases.push_back({"unknown task type", r, grpc::StatusCode::INVALID_ARGUMENT});
  }
  {
    pb::GenerateRequest r = Chat(4000);
    cases.push_back({"beyond every pool's context", r, grpc::StatusCode::OUT_OF_RANGE});
  }
  {
    pb::GenerateRequest r = Chat(-5);
    cases.push_back({"negative max_tokens", r, grpc::StatusCode::INVALID_ARGUMENT});
  }
  {
    pb::GenerateRequest r = Chat();
    r.mutable_sampling()->set_temperature(7);
    cases.push_back({"temperature out of range", r, grpc::StatusCode::INVALID_ARGUMENT});
  }
  {
    pb::GenerateRequest r = Chat();
    r.set_request_id(std::string(200, 'r'));
    cases.push_back({"request id too long", r, grpc::StatusCode::INVALID_ARGUMENT});
  }
  {
    pb::GenerateRequest r = Chat();
    (*r.mutable_metadata())["k"] = std::string(1000, 'v');
    cases.push_back({"metadata value too long", r, grpc::StatusCode::INVALID_ARGUMENT});
  }
  {
    pb::GenerateRequest r = Chat();
    r.set_prompt("caf\xc3 au lait \xff");
    cases.push_back({"invalid UTF-8 prompt", r, grpc::StatusCode::INVALID_ARGUMENT});
  }
  {
    pb::GenerateRequest r = Chat();
    r.set_tenant("\xed\xa0\x80");  // an encoded surrogate
    cases.push_back({"invalid UTF-8 tenant", r, grpc::StatusCode::INVALID_ARGUMENT});
  }
  for (const auto& c : cases) {
    Stream s = Generate(c.req);
    EXPECT_EQ(s.status.error_code(), c.code) << c.name << ": " << s.status.error_message();
  }
  Stream bad_utf8 = Generate(cases[cases.size() - 2].req);
  EXPECT_THAT(bad_utf8.status.error_message(), HasSubstr("prompt is not valid UTF-8"));
  // Nothing crashed and the gateway still serves.
  EXPECT_TRUE(Generate(Chat()).status.ok());
}

TEST_F(GatewayTest, MetricsAndHealthEndpoints) {
  ASSERT_TRUE(Generate(Chat()).status.ok());
  EXPECT_EQ(testing::HttpGet(http_port_, "/healthz").value_or(""), "ok\n");
  EXPECT_EQ(testing::HttpGet(http_port_, "/readyz").value_or(""), "ok\n");
  std::string m = Metrics();
  for (const char* family :
       {"kvgate_gateway_requests_total", "kvgate_gateway_route_decisions_total",
        "kvgate_gateway_prompt_tokens_total",
        "kvgate_gateway_generation_tokens_total", "kvgate_gateway_request_duration_seconds",
        "kvgate_gateway_time_to_first_token_seconds",
        "kvgate_gateway_time_per_output_token_seconds", "kvgate_gateway_routing_overhead_seconds",
        "kvgate_gateway_endpoint_healthy", "kvgate_gateway_endpoint_requests_waiting",
        "kvgate_gateway_endpoint_kv_cache_utilization_ratio",
        "kvgate_gateway_endpoint_kv_format_mismatch", "kvgate_gateway_policy_reloads_total",
        "kvgate_gateway_policy_info"}) {
    EXPECT_THAT(m, HasSubstr(family));
  }
  EXPECT_THAT(m, HasSubstr(
                     "kvgate_gateway_requests_total{outcome=\"ok\",pool=\"compressed\","
                     "task_type=\"chat\"} 1"));
  EXPECT_THAT(m, HasSubstr("kvgate_gateway_route_decisions_total{route=\"default\"}"));
}

}  // namespace
}  // namespace kvgate
