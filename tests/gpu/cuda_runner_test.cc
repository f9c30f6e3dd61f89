// CUDA ModelRunner (workers/backend/cuda) against the CPU runner, both with fp16 KV: logits of
// batched prefill, chunked prefill and token-by-token decode steps on the tiny models (llama with
// Llama-3 RoPE scaling, qwen2 biases, qwen3 QK-norm; tools/make_tiny_model.py) and the committed
// reference model (models/reference); the CudaKvCache's host interface against CpuKvCache; greedy
// generations through the Engine on the reference model (issue 5 item 2: the first 16 tokens
// identical for >= 90% of 50 varied prompts, differences only at near-ties of the CPU's logits);
// and decode throughput at batch 1 and 32 (printed, for docs/BENCHMARKS.md).
//
// Tolerance: the GPU runs bf16 weights (the CPU fp32 weights; for bf16 checkpoints the weights are
// identical) and bf16 GEMM inputs (activations rounded to bf16 before each matrix product), so
// logits differ by bf16 rounding of activations: relative error max|gpu - cpu| / max|cpu| per row
// is expected around 1e-2; the bound checked is kLogitTolerance. Skipped with a reason when no
// GPU is present (the format check runs everywhere).
//
// Environment: KVGATE_TINY_MODELS (folder of generated variants), KVGATE_REFERENCE_MODEL (default
// $KVGATE_SOURCE_DIR/models/reference, else models/reference).
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <map>
#include <mutex>
#include <random>
#include <string>
#include <vector>

#include "kvgate/common/tokenizer.h"
#include "kvgate/kernels/kv_cache.h"
#include "workers/backend/cuda/cuda_kv_cache.h"
#include "workers/backend/cuda/cuda_model_runner.h"
#include "workers/backend/model_runner.h"
#include "workers/engine/engine.h"

namespace kvgate::worker {
namespace {

constexpr double kLogitTolerance = 5e-2;

std::string GpuUnavailableReason() {
  int count = 0;
  const cudaError_t e = cudaGetDeviceCount(&count);
  if (e != cudaSuccess) {
    cudaGetLastError();
    return std::string("no CUDA device: ") + cudaGetErrorString(e);
  }
  if (count == 0) return "no CUDA device";
  return "";
}

#define SKIP_WITHOUT_GPU()                                                           \
  do {                                                                               \
    if (std::string why = GpuUnavailableReason(); !why.empty()) GTEST_SKIP() << why; \
  } while (0)

std::string Env(const char* name) {
  const char* v = std::getenv(name);
  return v != nullptr ? v : "";
}

std::string ReferenceModelDir() {
  std::string dir = Env("KVGATE_REFERENCE_MODEL");
  if (dir.empty()) {
    const std::string src = Env("KVGATE_SOURCE_DIR");
    dir = (src.empty() ? std::string(".") : src) + "/models/reference";
  }
  std::error_code ec;
  return std::filesystem::exists(dir + "/config.json", ec) ? dir : "";
}

std::string ModelDir(const std::string& name) {
  if (name == "reference") return ReferenceModelDir();
  const std::string dir = Env("KVGATE_TINY_MODELS") + "/" + name;
  std::error_code ec;
  return std::filesystem::exists(dir + "/config.json", ec) ? dir : "";
}

RunnerOptions Options(const std::string& dir, int64_t blocks) {
  RunnerOptions o;
  o.model_dir = dir;
  o.kv_format = *kernels::ParseKvFormat("fp16");
  o.kv_block_size = 16;
  o.kv_num_blocks = blocks;
  o.num_threads = 4;
  return o;
}

// max |got - want| / max |want| over one row.
double RowError(const float* got, const float* want, int n) {
  double diff = 0, scale = 0;
  for (int i = 0; i < n; ++i) {
    diff = std::max(diff, std::abs(double{got[i]} - want[i]));
    scale = std::max(scale, std::abs(double{want[i]}));
  }
  return diff / scale;
}

int Argmax(const float* row, int n) {
  return static_cast<int>(std::max_element(row, row + n) - row);
}

TEST(CudaRunnerFormats, NonFp16FormatsAreUnimplemented) {
  // Checked before any GPU or model access: runs everywhere.
  for (const char* format : {"kivi2", "fp8", "int8", "tq3.5", "bf16"}) {
    RunnerOptions o = Options("/nonexistent", 16);
    o.kv_format = *kernels::ParseKvFormat(format);
    auto runner = CreateCudaModelRunner(o);
    ASSERT_FALSE(runner.ok()) << format;
    EXPECT_EQ(runner.status().code(), absl::StatusCode::kUnimplemented) << format;
    EXPECT_NE(runner.status().message().find("fp16"), std::string::npos) << runner.status();
  }
  RunnerOptions o = Options("/nonexistent", 16);
  o.kv_format.eviction.kind = kernels::EvictionSpec::Kind::kH2O;
  EXPECT_EQ(CreateCudaModelRunner(o).status().code(), absl::StatusCode::kUnimplemented);
}

// Runs the same steps through both runners and tracks the worst row error.
class Pair {
 public:
  Pair(ModelRunner& cpu, ModelRunner& gpu) : cpu_(cpu), gpu_(gpu) {}
  void Add(kernels::SeqId seq, int64_t tokens) {
    ASSERT_TRUE(cpu_.kv_cache().AddSequence(seq, tokens).ok());
    ASSERT_TRUE(gpu_.kv_cache().AddSequence(seq, tokens).ok());
  }
  void Reserve(kernels::SeqId seq, int64_t tokens) {
    ASSERT_TRUE(cpu_.kv_cache().Reserve(seq, tokens).ok());
    ASSERT_TRUE(gpu_.kv_cache().Reserve(seq, tokens).ok());
  }
  // Returns the CPU logits rows.
  std::vector<float> Step(const std::vector<ForwardChunk>& chunks, const char* what) {
    int rows = 0;
    for (const ForwardChunk& c : chunks) rows += c.all_logits ? c.tokens.size() : 1;
    const int vocab = cpu_.config().vocab_size;
    std::vector<float> want(size_t(rows) * vocab), got(want.size(), NAN);
    absl::Status cs = cpu_.Forward(chunks, want.data());
    EXPECT_TRUE(cs.ok()) << cs;
    absl::Status gs = gpu_.Forward(chunks, got.data());
    EXPECT_TRUE(gs.ok()) << gs;
    for (int r = 0; r < rows; ++r) {
      const double err = RowError(&got[size_t(r) * vocab], &want[size_t(r) * vocab], vocab);
      EXPECT_LT(err, kLogitTolerance) << what << " row " << r;
      EXPECT_TRUE(std::isfinite(err)) << what << " row " << r;
      worst_ = std::max(worst_, err);
      sum_ += err;
      ++rows_;
      same_argmax_ +=
          Argmax(&got[size_t(r) * vocab], vocab) == Argmax(&want[size_t(r) * vocab], vocab);
    }
    return want;
  }
  double worst() const { return worst_; }
  double mean() const { return rows_ ? sum_ / rows_ : 0; }
  int rows() const { return rows_; }
  int same_argmax() const { return same_argmax_; }

 private:
  ModelRunner& cpu_;
  ModelRunner& gpu_;
  double worst_ = 0, sum_ = 0;
  int rows_ = 0, same_argmax_ = 0;
};

class CudaRunnerParity : public ::testing::TestWithParam<std::string> {};

TEST_P(CudaRunnerParity, LogitsMatchCpuForPrefillChunksAndDecode) {
  SKIP_WITHOUT_GPU();
  const std::string dir = ModelDir(GetParam());
  if (dir.empty()) GTEST_SKIP() << "model " << GetParam() << " not found";
  auto cpu = CreateCpuModelRunner(Options(dir, 256));
  ASSERT_TRUE(cpu.ok()) << cpu.status();
  auto gpu = CreateCudaModelRunner(Options(dir, 256));
  ASSERT_TRUE(gpu.ok()) << gpu.status();
  EXPECT_EQ((*gpu)->backend_name(), "cuda");
  const int vocab = (*cpu)->config().vocab_size;
  Pair pair(**cpu, **gpu);

  std::mt19937 rng(17);
  std::uniform_int_distribution<int32_t> token(2, vocab - 1);
  auto random_tokens = [&](int n) {
    std::vector<int32_t> t(n);
    for (int32_t& x : t) x = token(rng);
    return t;
  };
  // Step 1: three prompts (5, 37, 70 tokens: not multiples of the block size) in one batched
  // step; every row's logits for the second.
  std::vector<std::vector<int32_t>> prompts = {random_tokens(5), random_tokens(37),
                                               random_tokens(70)};
  for (int s = 0; s < 3; ++s) pair.Add(s, prompts[s].size());
  std::vector<ForwardChunk> chunks;
  for (int s = 0; s < 3; ++s)
    chunks.push_back({.seq = s, .tokens = prompts[s], .all_logits = s == 1});
  std::vector<float> logits = pair.Step(chunks, "prefill");
  if (HasFailure()) return;
  // The next token of each sequence: the CPU's greedy choice (both runners get the same tokens).
  std::vector<int32_t> next = {Argmax(&logits[0], vocab),
                               Argmax(&logits[size_t(1 + 36) * vocab], vocab),
                               Argmax(&logits[size_t(1 + 37) * vocab], vocab)};
  std::vector<int64_t> length = {5, 37, 70};
  // Sequence 3 arrives later: its 29-token prompt is prefilled in two chunks (17 + 12) alongside
  // the decode tokens of the others (mixed steps; the second chunk has a cached prefix).
  const std::vector<int32_t> late = random_tokens(29);
  for (int step = 0; step < 16; ++step) {
    std::vector<ForwardChunk> batch;
    std::vector<std::vector<int32_t>> one(3);
    for (int s = 0; s < 3; ++s) {
      pair.Reserve(s, length[s] + 1);
      one[s] = {next[s]};
      batch.push_back({.seq = s, .tokens = one[s]});
    }
    if (step == 2) {
      pair.Add(3, 17);
      batch.push_back({.seq = 3, .tokens = std::span(late).subspan(0, 17)});
    } else if (step == 3) {
      pair.Reserve(3, 29);
      batch.push_back({.seq = 3, .tokens = std::span(late).subspan(17), .all_logits = true});
    }
    logits = pair.Step(batch, "decode");
    if (HasFailure()) return;
    for (int s = 0; s < 3; ++s) {
      next[s] = Argmax(&logits[size_t(s) * vocab], vocab);
      ++length[s];
    }
  }
  std::printf(
      "[cuda parity] %s: %d logits rows, relative error max %.3g mean %.3g, argmax equal "
      "%d/%d\n",
      GetParam().c_str(), pair.rows(), pair.worst(), pair.mean(), pair.same_argmax(), pair.rows());
  // A real check of the check: the error is not zero by accident of comparing a runner to itself.
  EXPECT_GT(pair.worst(), 0.0);
}

INSTANTIATE_TEST_SUITE_P(Models, CudaRunnerParity,
                         ::testing::Values("llama", "qwen2", "qwen3", "reference"));

TEST(CudaKvCache, HostInterfaceMatchesCpuFp16Cache) {
  SKIP_WITHOUT_GPU();
  const int layers = 2, kv_heads = 2, d = 64, q_heads = 8;
  kernels::KvCacheConfig cfg{.num_layers = layers,
                             .num_kv_heads = kv_heads,
                             .head_dim = d,
                             .block_size = 16,
                             .num_blocks = 32,
                             .format = *kernels::ParseKvFormat("fp16")};
  auto cpu = kernels::CreateCpuKvCache(cfg);
  ASSERT_TRUE(cpu.ok());
  auto gpu = cuda::CudaKvCache::Create(cfg, nullptr);
  ASSERT_TRUE(gpu.ok()) << gpu.status();
  EXPECT_EQ((*gpu)->bytes_per_token(), (*cpu)->bytes_per_token());
  EXPECT_EQ((*gpu)->allocated_bytes(), (*cpu)->allocated_bytes());
  std::mt19937 rng(3);
  std::normal_distribution<float> normal;
  auto randn = [&](size_t n) {
    std::vector<float> v(n);
    for (float& x : v) x = normal(rng);
    return v;
  };
  const int n = 45;
  ASSERT_TRUE((*cpu)->AddSequence(7, n + 1).ok());
  ASSERT_TRUE((*gpu)->AddSequence(7, n + 1).ok());
  EXPECT_EQ((*gpu)->free_blocks(), (*cpu)->free_blocks());
  EXPECT_EQ((*gpu)->AddSequence(7, 1).code(), absl::StatusCode::kAlreadyExists);
  EXPECT_EQ((*gpu)->AddSequence(8, 16 * 100).code(), absl::StatusCode::kResourceExhausted);
  for (int layer = 0; layer < layers; ++layer) {
    std::vector<float> k = randn(size_t(n) * kv_heads * d), v = randn(k.size());
    std::vector<float> q = randn(size_t(n) * q_heads * d);
    ASSERT_TRUE((*cpu)->Append(7, layer, n, k.data(), v.data()).ok());
    ASSERT_TRUE((*gpu)->Append(7, layer, n, k.data(), v.data()).ok());
    std::vector<float> want(q.size()), got(q.size());
    ASSERT_TRUE((*cpu)
                    ->PrefillAttention(7, layer, n, q_heads, q.data(), k.data(), v.data(), 0.125f,
                                       want.data())
                    .ok());
    ASSERT_TRUE((*gpu)
                    ->PrefillAttention(7, layer, n, q_heads, q.data(), k.data(), v.data(), 0.125f,
                                       got.data())
                    .ok());
    EXPECT_LT(RowError(got.data(), want.data(), got.size()), 1e-4) << "prefill layer " << layer;
    // One decode token through fp16.
    std::vector<float> k1 = randn(kv_heads * d), v1 = randn(kv_heads * d), q1 = randn(q_heads * d);
    ASSERT_TRUE((*cpu)->Append(7, layer, 1, k1.data(), v1.data()).ok());
    ASSERT_TRUE((*gpu)->Append(7, layer, 1, k1.data(), v1.data()).ok());
    std::vector<float> want1(q1.size()), got1(q1.size());
    ASSERT_TRUE((*cpu)->DecodeAttention(7, layer, q_heads, q1.data(), 0.125f, want1.data()).ok());
    ASSERT_TRUE((*gpu)->DecodeAttention(7, layer, q_heads, q1.data(), 0.125f, got1.data()).ok());
    EXPECT_LT(RowError(got1.data(), want1.data(), got1.size()), 1e-4) << "decode layer " << layer;
    // The stored bytes read back equal the CPU's (both fp16 round-to-nearest).
    std::vector<float> ck((n + 1) * d), cv(ck.size()), gk(ck.size()), gv(ck.size());
    std::vector<int64_t> cp(n + 1), gp(n + 1);
    ASSERT_TRUE((*cpu)->ReadStored(7, layer, 1, ck.data(), cv.data(), cp.data()).ok());
    ASSERT_TRUE((*gpu)->ReadStored(7, layer, 1, gk.data(), gv.data(), gp.data()).ok());
    EXPECT_EQ(ck, gk);
    EXPECT_EQ(cv, gv);
    EXPECT_EQ(cp, gp);
  }
  // Beyond the reserved blocks (46 tokens reserved -> 48 slots) is refused.
  std::vector<float> big(size_t(5) * kv_heads * d, 0.f);
  EXPECT_EQ((*gpu)->Append(7, 0, 5, big.data(), big.data()).code(),
            absl::StatusCode::kFailedPrecondition);
  (*gpu)->FreeSequence(7);
  EXPECT_EQ((*gpu)->free_blocks(), 32);
  EXPECT_EQ((*gpu)->Length(7, 0), -1);
}

// Greedy generations through the Engine: CPU vs CUDA on the reference model.
std::vector<std::vector<int32_t>> GenerateAll(std::unique_ptr<ModelRunner> runner,
                                              const std::vector<std::vector<int32_t>>& prompts,
                                              int max_tokens) {
  auto engine = Engine::Create(std::move(runner), EngineOptions{.max_running = 64});
  EXPECT_TRUE(engine.ok()) << engine.status();
  if (!engine.ok()) return {};
  std::mutex mu;
  std::condition_variable done_cv;
  int done = 0;
  std::vector<std::vector<int32_t>> out(prompts.size());
  for (size_t i = 0; i < prompts.size(); ++i) {
    GenerateParams p;
    p.request_id = std::to_string(i);
    p.prompt = prompts[i];
    p.max_tokens = max_tokens;
    p.ignore_eos = true;
    auto id = (*engine)->Submit(p, [&, i](const StepOutput& o) {
      std::lock_guard<std::mutex> lock(mu);
      out[i].insert(out[i].end(), o.token_ids.begin(), o.token_ids.end());
      if (o.finished) {
        EXPECT_TRUE(o.status.ok()) << o.status;
        ++done;
        done_cv.notify_all();
      }
    });
    EXPECT_TRUE(id.ok()) << id.status();
  }
  std::unique_lock<std::mutex> lock(mu);
  done_cv.wait_for(lock, std::chrono::seconds(120), [&] { return done == int(prompts.size()); });
  EXPECT_EQ(done, int(prompts.size()));
  return out;
}

TEST(CudaRunnerEngine, GreedyGenerationsMatchCpuOnReferenceModel) {
  SKIP_WITHOUT_GPU();
  const std::string dir = ReferenceModelDir();
  if (dir.empty()) GTEST_SKIP() << "models/reference not found";
  auto tok = Tokenizer::FromFile(dir + "/tokenizer.json");
  ASSERT_TRUE(tok.ok()) << tok.status();
  // 50 varied prompts: subjects x openings.
  const std::vector<std::string> subjects = {
      "the old lighthouse keeper", "a small robot", "the river",     "my grandmother",
      "the king of the north",     "a curious cat", "the scientist", "two friends",
      "the little town",           "the ship"};
  const std::vector<std::string> openings = {"Once upon a time, ", "Yesterday ", "In the morning ",
                                             "Nobody knew why ", "The story of "};
  std::vector<std::vector<int32_t>> prompts;
  for (const std::string& s : subjects) {
    for (const std::string& o : openings) {
      auto ids = (*tok)->Encode(o + s, {.add_special_tokens = true});
      ASSERT_TRUE(ids.ok());
      prompts.push_back(*ids);
    }
  }
  ASSERT_EQ(prompts.size(), 50u);
  const int kTokens = 16;
  auto cpu = CreateCpuModelRunner(Options(dir, 2048));
  ASSERT_TRUE(cpu.ok()) << cpu.status();
  auto gpu = CreateCudaModelRunner(Options(dir, 2048));
  ASSERT_TRUE(gpu.ok()) << gpu.status();
  auto cpu_out = GenerateAll(*std::move(cpu), prompts, kTokens);
  auto gpu_out = GenerateAll(*std::move(gpu), prompts, kTokens);
  ASSERT_EQ(cpu_out.size(), prompts.size());
  ASSERT_EQ(gpu_out.size(), prompts.size());

  // For each divergence: the CPU's logit gap between its token and the GPU's at that point.
  auto check = CreateCpuModelRunner(Options(dir, 256));
  ASSERT_TRUE(check.ok());
  const int vocab = (*check)->config().vocab_size;
  int identical = 0;
  double worst_gap = 0;
  for (size_t i = 0; i < prompts.size(); ++i) {
    ASSERT_EQ(cpu_out[i].size(), size_t(kTokens));
    ASSERT_EQ(gpu_out[i].size(), size_t(kTokens));
    size_t first = 0;
    while (first < size_t(kTokens) && cpu_out[i][first] == gpu_out[i][first]) ++first;
    if (first == size_t(kTokens)) {
      ++identical;
      continue;
    }
    std::vector<int32_t> context = prompts[i];
    context.insert(context.end(), cpu_out[i].begin(), cpu_out[i].begin() + first);
    const kernels::SeqId seq = 1000 + i;
    ASSERT_TRUE((*check)->kv_cache().AddSequence(seq, context.size()).ok());
    ForwardChunk chunk{.seq = seq, .tokens = context};
    std::vector<float> logits(vocab);
    ASSERT_TRUE((*check)->Forward({&chunk, 1}, logits.data()).ok());
    (*check)->kv_cache().FreeSequence(seq);
    const double gap = logits[cpu_out[i][first]] - logits[gpu_out[i][first]];
    const auto top = *std::max_element(logits.begin(), logits.end());
    worst_gap = std::max(worst_gap, gap);
    std::printf(
        "[cuda engine] prompt %zu diverges at token %zu: cpu %d gpu %d, cpu logit gap %.4f "
        "(top %.3f)\n",
        i, first, cpu_out[i][first], gpu_out[i][first], gap, top);
    // A near-tie: within the bf16 logit error measured by the parity test (~1e-2 relative).
    EXPECT_LT(gap, 0.02 * std::abs(top) + 0.05) << "prompt " << i;
  }
  std::printf(
      "[cuda engine] greedy 16 tokens identical for %d/50 prompts; worst divergence gap "
      "%.4f\n",
      identical, worst_gap);
  EXPECT_GE(identical, 45);
}

// Decode throughput at batch 1 and 32 (128-token prompts, 128 decode steps) on the reference
// model, through ModelRunner::Forward (host sampling excluded). Printed for docs/BENCHMARKS.md.
TEST(CudaRunnerBench, DecodeThroughputOnReferenceModel) {
  SKIP_WITHOUT_GPU();
  const std::string dir = ReferenceModelDir();
  if (dir.empty()) GTEST_SKIP() << "models/reference not found";
  auto gpu = CreateCudaModelRunner(Options(dir, 4096));
  ASSERT_TRUE(gpu.ok()) << gpu.status();
  ModelRunner& r = **gpu;
  const int vocab = r.config().vocab_size;
  for (int batch : {1, 32, 128}) {
    const int prompt_len = 128, steps = 128;
    std::vector<std::vector<int32_t>> prompts(batch, std::vector<int32_t>(prompt_len));
    for (int b = 0; b < batch; ++b) {
      for (int i = 0; i < prompt_len; ++i) prompts[b][i] = 2 + (b * 131 + i * 17) % (vocab - 2);
      ASSERT_TRUE(r.kv_cache().AddSequence(b, prompt_len + steps).ok());
    }
    std::vector<ForwardChunk> chunks;
    for (int b = 0; b < batch; ++b) chunks.push_back({.seq = b, .tokens = prompts[b]});
    std::vector<float> logits(size_t(batch) * vocab);
    auto t0 = std::chrono::steady_clock::now();
    ASSERT_TRUE(r.Forward(chunks, logits.data()).ok());
    const double prefill_s =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    std::vector<std::vector<int32_t>> next(batch, std::vector<int32_t>(1));
    t0 = std::chrono::steady_clock::now();
    for (int s = 0; s < steps; ++s) {
      chunks.clear();
      for (int b = 0; b < batch; ++b) {
        next[b][0] = Argmax(&logits[size_t(b) * vocab], vocab);
        chunks.push_back({.seq = b, .tokens = next[b]});
      }
      ASSERT_TRUE(r.Forward(chunks, logits.data()).ok());
    }
    const double decode_s =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    for (float x : logits) ASSERT_TRUE(std::isfinite(x));
    std::printf(
        "[cuda bench] reference model batch %d: prefill %d tokens in %.2f ms (%.0f tok/s); "
        "decode %d steps: %.3f ms/step, %.0f tok/s (context %d..%d, host argmax incl.)\n",
        batch, batch * prompt_len, prefill_s * 1e3, batch * prompt_len / prefill_s, steps,
        decode_s * 1e3 / steps, batch * steps / decode_s, prompt_len, prompt_len + steps);
    for (int b = 0; b < batch; ++b) r.kv_cache().FreeSequence(b);
  }
}

}  // namespace
}  // namespace kvgate::worker
