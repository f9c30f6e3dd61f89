// Integration tests of kvgate-worker: a real worker process on a free loopback port, real gRPC
// clients, the tiny bundled model.
#include <signal.h>

#include <atomic>
#include <chrono>
#include <string>
#include <thread>
#include <vector>

#include <grpcpp/generic/generic_stub.h>
#include <grpcpp/grpcpp.h>

#include "gmock/gmock.h"
#include "grpc/health/v1/health.grpc.pb.h"
#include "gtest/gtest.h"
#include "kvgate/v1/gateway.grpc.pb.h"
#include "kvgate/v1/worker.grpc.pb.h"
#include "tests/support/test_env.h"

namespace kvgate {
namespace {

namespace pb = ::kvgate::v1;
using ::kvgate::testing::Subprocess;
using ::testing::HasSubstr;

struct StreamResult {
  std::vector<int32_t> ids;
  std::string text;
  pb::GenerateChunk last;
  grpc::Status status;
  int chunks = 0;
};

StreamResult Drain(std::unique_ptr<grpc::ClientReader<pb::GenerateChunk>> reader) {
  StreamResult r;
  pb::GenerateChunk chunk;
  while (reader->Read(&chunk)) {
    ++r.chunks;
    r.ids.insert(r.ids.end(), chunk.token_ids().begin(), chunk.token_ids().end());
    r.text += chunk.text();
    r.last = chunk;
  }
  r.status = reader->Finish();
  return r;
}

class WorkerTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    model_dir_ = new std::string(testing::TinyModelDir());
    if (model_dir_->empty()) return;
    StartWorker({});
  }
  static void TearDownTestSuite() {
    delete worker_;
    worker_ = nullptr;
  }
  static void StartWorker(std::vector<std::string> extra) {
    std::vector<std::string> argv = {testing::BinaryDir() + "/bin/kvgate-worker",
                                     "--model", *model_dir_, "--port", "0", "--host", "127.0.0.1",
                                     "--metrics_port", "0",
                                     "--kv_blocks", "256", "--threads", "1"};
    argv.insert(argv.end(), extra.begin(), extra.end());
    worker_ = Subprocess::Start(argv).release();
    port_ = worker_->WaitForListening(std::chrono::seconds(60));
    ASSERT_GT(port_, 0) << "worker did not start";
    metrics_port_ = worker_->PrintedPort("METRICS");
    channel_ = new std::shared_ptr<grpc::Channel>(grpc::CreateChannel(
        "127.0.0.1:" + std::to_string(port_), grpc::InsecureChannelCredentials()));
    WaitServing();
  }
  static void WaitServing() {
    auto health = grpc::health::v1::Health::NewStub(*channel_);
    for (int i = 0; i < 600; ++i) {
      grpc::ClientContext ctx;
      grpc::health::v1::HealthCheckRequest req;
      grpc::health::v1::HealthCheckResponse resp;
      if (health->Check(&ctx, req, &resp).ok() &&
          resp.status() == grpc::health::v1::HealthCheckResponse::SERVING) {
        return;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(100));
    }
    FAIL() << "worker never became SERVING";
  }
  void SetUp() override {
    if (model_dir_->empty()) GTEST_SKIP() << "tiny model not generated (needs python3-numpy)";
    worker_stub_ = pb::Worker::NewStub(*channel_);
    gateway_stub_ = pb::Gateway::NewStub(*channel_);
  }

  StreamResult GenerateIds(const std::vector<int32_t>& prompt, int max_tokens,
                           float temperature = 0, uint64_t seed = 0) {
    pb::WorkerGenerateRequest req;
    for (int32_t id : prompt) req.add_prompt_token_ids(id);
    req.mutable_sampling()->set_max_tokens(max_tokens);
    req.mutable_sampling()->set_temperature(temperature);
    req.mutable_sampling()->set_seed(seed);
    req.mutable_sampling()->set_ignore_eos(true);
    req.set_return_text(true);
    grpc::ClientContext ctx;
    return Drain(worker_stub_->Generate(&ctx, req));
  }

  static std::string* model_dir_;
  static Subprocess* worker_;
  static int port_;
  static int metrics_port_;
  static std::shared_ptr<grpc::Channel>* channel_;
  std::unique_ptr<pb::Worker::Stub> worker_stub_;
  std::unique_ptr<pb::Gateway::Stub> gateway_stub_;
};

std::string* WorkerTest::model_dir_ = nullptr;
Subprocess* WorkerTest::worker_ = nullptr;
int WorkerTest::port_ = 0;
int WorkerTest::metrics_port_ = 0;
std::shared_ptr<grpc::Channel>* WorkerTest::channel_ = nullptr;

TEST_F(WorkerTest, StreamsExactlyMaxTokensWithUsage) {
  StreamResult r = GenerateIds({1, 5, 9, 13, 17}, 12);
  ASSERT_TRUE(r.status.ok()) << r.status.error_message();
  EXPECT_EQ(r.ids.size(), 12u);
  EXPECT_EQ(r.last.finish_reason(), pb::FINISH_REASON_LENGTH);
  EXPECT_EQ(r.last.usage().prompt_tokens(), 5);
  EXPECT_EQ(r.last.usage().completion_tokens(), 12);
  EXPECT_GT(r.last.usage().time_to_first_token_us(), 0);
  EXPECT_GE(r.chunks, 2);  // streamed, not one final blob
}

TEST_F(WorkerTest, GreedyIsDeterministicAndSeededSamplingRepeats) {
  std::vector<int32_t> prompt = {1, 40, 41, 42, 43, 44, 45};
  StreamResult a = GenerateIds(prompt, 10);
  StreamResult b = GenerateIds(prompt, 10);
  ASSERT_TRUE(a.status.ok() && b.status.ok());
  EXPECT_EQ(a.ids, b.ids);
  StreamResult s1 = GenerateIds(prompt, 10, 1.0f, 1234);
  StreamResult s2 = GenerateIds(prompt, 10, 1.0f, 1234);
  ASSERT_TRUE(s1.status.ok() && s2.status.ok());
  EXPECT_EQ(s1.ids, s2.ids);
}

TEST_F(WorkerTest, ConcurrentRequestsMatchTheirSoloResults) {
  // Continuous batching must not change what each sequence computes.
  constexpr int kRequests = 8;
  std::vector<std::vector<int32_t>> prompts;
  std::vector<std::vector<int32_t>> solo;
  for (int i = 0; i < kRequests; ++i) {
    std::vector<int32_t> p = {1};
    for (int j = 0; j < 3 + 5 * i; ++j) p.push_back(10 + (i * 37 + j * 11) % 200);
    prompts.push_back(p);
    StreamResult r = GenerateIds(p, 16);
    ASSERT_TRUE(r.status.ok()) << r.status.error_message();
    solo.push_back(r.ids);
  }
  std::vector<StreamResult> batched(kRequests);
  std::vector<std::thread> threads;
  for (int i = 0; i < kRequests; ++i) {
    threads.emplace_back([&, i] { batched[i] = GenerateIds(prompts[i], 16); });
  }
  for (auto& t : threads) t.join();
  for (int i = 0; i < kRequests; ++i) {
    ASSERT_TRUE(batched[i].status.ok()) << batched[i].status.error_message();
    EXPECT_EQ(batched[i].ids, solo[i]) << "request " << i;
  }
}

TEST_F(WorkerTest, TextApiTokenizesAndStreamsText) {
  pb::GenerateRequest req;
  req.set_prompt("def hello(name):\n    return");
  req.mutable_sampling()->set_max_tokens(8);
  req.mutable_sampling()->set_ignore_eos(true);
  grpc::ClientContext ctx;
  StreamResult r = Drain(gateway_stub_->Generate(&ctx, req));
  ASSERT_TRUE(r.status.ok()) << r.status.error_message();
  EXPECT_EQ(r.ids.size(), 8u);
  EXPECT_EQ(r.last.route().pool(), "direct");
  EXPECT_EQ(r.last.route().kv_format(), "fp16");

  pb::CountTokensRequest count_req;
  count_req.set_prompt("def hello(name):\n    return");
  count_req.set_return_ids(true);
  pb::CountTokensResponse count;
  grpc::ClientContext ctx2;
  ASSERT_TRUE(gateway_stub_->CountTokens(&ctx2, count_req, &count).ok());
  EXPECT_EQ(count.count(), r.last.usage().prompt_tokens());
  EXPECT_EQ(count.token_ids_size(), count.count());
}

TEST_F(WorkerTest, BadInputGetsTheRightCode) {
  struct Case {
    std::string name;
    pb::WorkerGenerateRequest req;
    grpc::StatusCode code;
  };
  std::vector<Case> cases;
  auto base = [] {
    pb::WorkerGenerateRequest r;
    r.add_prompt_token_ids(1);
    r.add_prompt_token_ids(2);
    r.mutable_sampling()->set_max_tokens(4);
    return r;
  };
  {
    pb::WorkerGenerateRequest r = base();
    r.clear_prompt_token_ids();
    cases.push_back({"empty prompt", r, grpc::StatusCode::INVALID_ARGUMENT});
  }
  {
    pb::WorkerGenerateRequest r = base();
    r.add_prompt_token_ids(1 << 30);
    cases.push_back({"token out of vocabulary", r, grpc::StatusCode::INVALID_ARGUMENT});
  }
  {
    pb::WorkerGenerateRequest r = base();
    r.add_prompt_token_ids(-3);
    cases.push_back({"negative token", r, grpc::StatusCode::INVALID_ARGUMENT});
  }
  {
    pb::WorkerGenerateRequest r = base();
    r.mutable_sampling()->set_max_tokens(1 << 20);
    cases.push_back({"max_tokens beyond context", r, grpc::StatusCode::OUT_OF_RANGE});
  }
  {
    pb::WorkerGenerateRequest r = base();
    r.mutable_sampling()->set_max_tokens(-1);
    cases.push_back({"negative max_tokens", r, grpc::StatusCode::INVALID_ARGUMENT});
  }
  {
    pb::WorkerGenerateRequest r = base();
    r.mutable_sampling()->set_temperature(-1);
    cases.push_back({"negative temperature", r, grpc::StatusCode::INVALID_ARGUMENT});
  }
  {
    pb::WorkerGenerateRequest r = base();
    r.mutable_sampling()->set_top_p(1.5);
    cases.push_back({"top_p above 1", r, grpc::StatusCode::INVALID_ARGUMENT});
  }
  {
    pb::WorkerGenerateRequest r = base();
    r.set_request_id(std::string(300, 'x'));
    cases.push_back({"request id too long", r, grpc::StatusCode::INVALID_ARGUMENT});
  }
  for (auto& c : cases) {
    grpc::ClientContext ctx;
    StreamResult r = Drain(worker_stub_->Generate(&ctx, c.req));
    EXPECT_EQ(r.status.error_code(), c.code) << c.name << ": " << r.status.error_message();
    EXPECT_FALSE(r.status.error_message().empty()) << c.name;
  }
}

TEST_F(WorkerTest, TextApiRejectsEmptyAndInvalidUtf8) {
  for (std::string prompt : {std::string(""), std::string("abc\xff\xfe"), std::string("\xc3")}) {
    pb::GenerateRequest req;
    req.set_prompt(prompt);
    grpc::ClientContext ctx;
    StreamResult r = Drain(gateway_stub_->Generate(&ctx, req));
    EXPECT_EQ(r.status.error_code(), grpc::StatusCode::INVALID_ARGUMENT)
        << r.status.error_message();
  }
}

TEST_F(WorkerTest, UnknownFieldsAreIgnored) {
  // A newer client may send fields this worker does not know: proto3 ignores them.
  pb::WorkerGenerateRequest req;
  req.add_prompt_token_ids(1);
  req.add_prompt_token_ids(2);
  req.mutable_sampling()->set_max_tokens(3);
  req.mutable_sampling()->set_ignore_eos(true);
  std::string wire = req.SerializeAsString();
  wire += std::string("\xa2\x06\x03xyz", 6);  // field 100, length-delimited "xyz"
  pb::WorkerGenerateRequest reparsed;
  ASSERT_TRUE(reparsed.ParseFromString(wire));
  grpc::ClientContext ctx;
  StreamResult r = Drain(worker_stub_->Generate(&ctx, reparsed));
  ASSERT_TRUE(r.status.ok()) << r.status.error_message();
  EXPECT_EQ(r.ids.size(), 3u);
}

TEST_F(WorkerTest, CancelledStreamFreesItsSlot) {
  pb::WorkerGenerateRequest req;
  req.add_prompt_token_ids(1);
  req.add_prompt_token_ids(7);
  req.mutable_sampling()->set_max_tokens(1500);
  req.mutable_sampling()->set_ignore_eos(true);
  grpc::ClientContext ctx;
  auto reader = worker_stub_->Generate(&ctx, req);
  pb::GenerateChunk chunk;
  ASSERT_TRUE(reader->Read(&chunk));
  ctx.TryCancel();
  while (reader->Read(&chunk)) {
  }
  EXPECT_EQ(reader->Finish().error_code(), grpc::StatusCode::CANCELLED);
  // The worker must free the sequence: running drops back to 0 and all blocks are free.
  pb::LoadReport load;
  for (int i = 0; i < 100; ++i) {
    grpc::ClientContext lctx;
    ASSERT_TRUE(worker_stub_->GetLoad(&lctx, pb::LoadRequest(), &load).ok());
    if (load.running_requests() == 0 && load.kv_blocks_free() == load.kv_blocks_total()) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  EXPECT_EQ(load.running_requests(), 0);
  EXPECT_EQ(load.kv_blocks_free(), load.kv_blocks_total());
}

TEST_F(WorkerTest, DeadlineEndsTheRequest) {
  pb::WorkerGenerateRequest req;
  req.add_prompt_token_ids(1);
  req.mutable_sampling()->set_max_tokens(1800);
  req.mutable_sampling()->set_ignore_eos(true);
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::milliseconds(200));
  StreamResult r = Drain(worker_stub_->Generate(&ctx, req));
  EXPECT_EQ(r.status.error_code(), grpc::StatusCode::DEADLINE_EXCEEDED);
}

TEST_F(WorkerTest, LoadReportDescribesTheWorker) {
  pb::LoadReport load;
  grpc::ClientContext ctx;
  ASSERT_TRUE(worker_stub_->GetLoad(&ctx, pb::LoadRequest(), &load).ok());
  EXPECT_EQ(load.kv_format(), "fp16");
  EXPECT_EQ(load.model(), "tiny");
  EXPECT_EQ(load.kv_blocks_total(), 256);
  EXPECT_EQ(load.kv_block_tokens(), 16);
  EXPECT_GT(load.kv_bytes_per_token(), 0);
  EXPECT_GT(load.max_context(), 0);
  EXPECT_GT(load.vocab_size(), 0);
  EXPECT_TRUE(load.accepting());
  EXPECT_EQ(load.backend(), "cpu");
}

TEST_F(WorkerTest, MetricsExposeEveryFamily) {
  GenerateIds({1, 2, 3}, 4);
  auto body = testing::HttpGet(metrics_port_, "/metrics");
  ASSERT_TRUE(body.has_value()) << "metrics endpoint not reachable on port " << metrics_port_;
  for (const char* family :
       {"kvgate_worker_requests_total", "kvgate_worker_prompt_tokens_total",
        "kvgate_worker_generation_tokens_total", "kvgate_worker_time_to_first_token_seconds",
        "kvgate_worker_time_per_output_token_seconds", "kvgate_worker_requests_running",
        "kvgate_worker_requests_waiting", "kvgate_worker_kv_blocks_used",
        "kvgate_worker_kv_blocks_total", "kvgate_worker_kv_cache_utilization_ratio",
        "kvgate_worker_kv_bytes_per_token", "kvgate_worker_preemptions_total"}) {
    EXPECT_THAT(*body, HasSubstr(family));
  }
  EXPECT_THAT(*body, HasSubstr("outcome=\"ok\""));
  EXPECT_THAT(*body, HasSubstr("kv_format=\"fp16\""));
}

// Runs last (alphabetical suites run in order of definition): drains and stops the worker.
TEST_F(WorkerTest, ZzSigtermDrainsInFlightRequests) {
  pb::WorkerGenerateRequest req;
  req.add_prompt_token_ids(1);
  req.mutable_sampling()->set_max_tokens(300);
  req.mutable_sampling()->set_ignore_eos(true);
  grpc::ClientContext ctx;
  auto reader = worker_stub_->Generate(&ctx, req);
  pb::GenerateChunk chunk;
  ASSERT_TRUE(reader->Read(&chunk));  // in flight
  worker_->Signal(SIGTERM);
  // Health turns NOT_SERVING while the in-flight request drains.
  auto health = grpc::health::v1::Health::NewStub(*channel_);
  bool not_serving = false;
  for (int i = 0; i < 100 && !not_serving; ++i) {
    grpc::ClientContext hctx;
    grpc::health::v1::HealthCheckResponse resp;
    not_serving = health->Check(&hctx, grpc::health::v1::HealthCheckRequest(), &resp).ok() &&
                  resp.status() == grpc::health::v1::HealthCheckResponse::NOT_SERVING;
    if (!not_serving) std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  EXPECT_TRUE(not_serving);
  // New work is refused while draining.
  bool refused = false;
  for (int i = 0; i < 50 && !refused; ++i) {
    StreamResult r = GenerateIds({1, 2}, 2);
    refused = r.status.error_code() == grpc::StatusCode::UNAVAILABLE;
    if (!refused) std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  int tokens = chunk.token_ids_size();
  while (reader->Read(&chunk)) tokens += chunk.token_ids_size();
  grpc::Status status = reader->Finish();
  EXPECT_TRUE(status.ok()) << status.error_message();
  EXPECT_EQ(tokens, 300);
  EXPECT_TRUE(refused);
  EXPECT_EQ(worker_->Wait(std::chrono::seconds(20)), 0);
}

TEST(WorkerStartupTest, CorruptModelExitsWithAClearError) {
  std::string model = testing::TinyModelDir();
  if (model.empty()) GTEST_SKIP() << "tiny model not generated (needs python3-numpy)";
  std::string dir = ::testing::TempDir() + "/corrupt_model";
  std::system(("rm -rf " + dir + " && cp -r " + model + " " + dir).c_str());
  // Truncate the weights to 100 bytes.
  ASSERT_EQ(truncate((dir + "/model.safetensors").c_str(), 100), 0);
  auto worker = Subprocess::Start({testing::BinaryDir() + "/bin/kvgate-worker",
                                   "--model", dir, "--port", "0", "--host", "127.0.0.1"});
  ASSERT_NE(worker, nullptr);
  EXPECT_EQ(worker->Wait(std::chrono::seconds(30)), 1);
}

}  // namespace
}  // namespace kvgate

namespace kvgate {
namespace {

// Every KV format (and eviction) the worker accepts serves a generation end to end, and the worker
// reports the format and its bytes per token (model: 3 layers x 2 kv-heads, head_dim 64).
struct FormatCase {
  std::string kv;
  std::string evict;
  std::string reported;
};

class WorkerFormatTest : public ::testing::TestWithParam<FormatCase> {};

TEST_P(WorkerFormatTest, ServesAndReportsTheFormat) {
  std::string model = testing::TinyModelDir();
  if (model.empty()) GTEST_SKIP() << "tiny model not generated (needs python3-numpy)";
  const FormatCase& c = GetParam();
  auto worker = Subprocess::Start({testing::BinaryDir() + "/bin/kvgate-worker", "--model", model,
                                   "--port", "0", "--host", "127.0.0.1", "--kv", c.kv, "--evict",
                                   c.evict, "--kv_blocks", "64", "--threads", "1"});
  ASSERT_NE(worker, nullptr);
  int port = worker->WaitForListening(std::chrono::seconds(30));
  ASSERT_GT(port, 0);
  auto channel = grpc::CreateChannel("127.0.0.1:" + std::to_string(port),
                                     grpc::InsecureChannelCredentials());
  auto stub = pb::Worker::NewStub(channel);
  pb::LoadReport load;
  for (int i = 0; i < 100; ++i) {
    grpc::ClientContext ctx;
    if (stub->GetLoad(&ctx, pb::LoadRequest(), &load).ok() && load.accepting()) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  ASSERT_TRUE(load.accepting());
  EXPECT_EQ(load.kv_format(), c.reported);
  EXPECT_GT(load.kv_bytes_per_token(), 0);
  // fp16 stores 3 layers x 2 heads x 64 x 2 (K and V) x 2 bytes = 1536 bytes per token; every
  // compressed format stores fewer.
  if (c.kv == "fp16" || c.kv == "bf16") {
    EXPECT_EQ(load.kv_bytes_per_token(), 1536);
  } else {
    EXPECT_LT(load.kv_bytes_per_token(), 1536);
  }
  pb::WorkerGenerateRequest req;
  for (int i = 0; i < 150; ++i) req.add_prompt_token_ids(3 + (i * 37) % 400);
  req.mutable_sampling()->set_max_tokens(40);
  req.mutable_sampling()->set_ignore_eos(true);
  grpc::ClientContext ctx;
  StreamResult r = Drain(stub->Generate(&ctx, req));
  ASSERT_TRUE(r.status.ok()) << r.status.error_message();
  EXPECT_EQ(r.ids.size(), 40u);
  worker->Signal(SIGTERM);
  EXPECT_EQ(worker->Wait(std::chrono::seconds(20)), 0);
}

INSTANTIATE_TEST_SUITE_P(
    AllFormats, WorkerFormatTest,
    ::testing::Values(FormatCase{"fp16", "none", "fp16"}, FormatCase{"bf16", "none", "bf16"},
                      FormatCase{"fp8", "none", "fp8"}, FormatCase{"int8", "none", "int8"},
                      FormatCase{"kivi4", "none", "kivi4"}, FormatCase{"kivi2", "none", "kivi2"},
                      FormatCase{"tq4", "none", "tq4"}, FormatCase{"tq3.5", "none", "tq3.5"},
                      FormatCase{"tq3", "none", "tq3"}, FormatCase{"tq2.5", "none", "tq2.5"},
                      FormatCase{"tq:k=4,v=3", "none", "tq:k=4,v=3"},
                      FormatCase{"fp16", "h2o:heavy=0.1,recent=0.1", "fp16"},
                      // Eviction with every format: KIVI's key groups and fp16 windows included.
                      FormatCase{"kivi4", "h2o:heavy=0.1,recent=0.1", "kivi4"},
                      FormatCase{"tq4", "sink:sinks=4,window=64", "tq4"},
                      FormatCase{"tq:k=4,v=4,r=0", "sink:sinks=4,window=64", "tq:k=4,v=4,r=0"}),
    [](const ::testing::TestParamInfo<FormatCase>& info) {
      std::string name = info.param.kv + "_" + info.param.evict;
      for (char& ch : name) {
        if (!std::isalnum(static_cast<unsigned char>(ch))) ch = '_';
      }
      return name;
    });

}  // namespace
}  // namespace kvgate
