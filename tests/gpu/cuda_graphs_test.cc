// CUDA graphs and cuBLASLt in the CUDA ModelRunner (workers/backend/cuda).
//
// LtGemm (cublas_api.h) against a float64 reference on the host: bf16 and fp32 inputs, with and
// without accumulation into y and the bias epilogue, at decode-like and prefill-like shapes. The
// bf16 case's products are exact in fp32 and the fp32 case's are rounded once, so what remains is
// fp32 summation: ~1e-7..1e-6 of the sum of |terms|. TF32 (inputs rounded to 10 mantissa bits,
// relative 2^-11 each) would put the fp32 case near 2e-5 on that scale, so the 4e-6 bound also
// checks that the fp32 compute mode stays full fp32.
//
// Graph replay against eager launches: two runners on the reference model, one with
// CudaRunnerOptions::cuda_graphs on and one off, fed the same schedule: prompts join (their
// prefill in a step mixed with the others' decode tokens, launched eagerly) and sequences finish
// while the others decode for 320 steps, so the batch size changes, the block-table width crosses
// many buckets and the step buffers grow (dropping the graphs). Every step's logits (Forward) must be bit-identical and every
// sampled token (ForwardSample, temperature 0.8 / top-p 0.95) equal, and the graph runner must
// have replayed graphs. Cases: bf16 with fp16, KIVI-4 (fp16 window), TurboQuant-4 with fp16 first
// and last layers (two layer formats), and fp32 compute with fp16 KV.
//
// Skipped with a reason when no GPU is present. Environment: KVGATE_REFERENCE_MODEL (default
// $KVGATE_SOURCE_DIR/models/reference, else models/reference).
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cctype>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <random>
#include <string>
#include <vector>

#include "kvgate/kernels/kv_format.h"
#include "workers/backend/cuda/cublas_api.h"
#include "workers/backend/cuda/cuda_model_runner.h"
#include "workers/backend/model_runner.h"
#include "tests/gpu/gpu_test_util.h"

namespace kvgate::worker {
namespace {

std::string ReferenceModelDir() {
  const char* env = std::getenv("KVGATE_REFERENCE_MODEL");
  std::string dir = env != nullptr ? env : "";
  if (dir.empty()) {
    const char* src = std::getenv("KVGATE_SOURCE_DIR");
    dir = std::string(src != nullptr ? src : ".") + "/models/reference";
  }
  std::error_code ec;
  return std::filesystem::exists(dir + "/config.json", ec) ? dir : "";
}

// ---- LtGemm -------------------------------------------------------------------------------------

float RoundToBf16(float x) {
  uint32_t bits;
  std::memcpy(&bits, &x, 4);
  bits += 0x7fffu + ((bits >> 16) & 1u);
  bits &= 0xffff0000u;
  std::memcpy(&x, &bits, 4);
  return x;
}

uint16_t Bf16Bits(float x) {  // x already bf16-representable
  uint32_t bits;
  std::memcpy(&bits, &x, 4);
  return static_cast<uint16_t>(bits >> 16);
}

template <class T>
T* ToDevice(const std::vector<T>& host) {
  T* p = nullptr;
  EXPECT_EQ(cudaMalloc(&p, host.size() * sizeof(T)), cudaSuccess);
  EXPECT_EQ(cudaMemcpy(p, host.data(), host.size() * sizeof(T), cudaMemcpyHostToDevice),
            cudaSuccess);
  return p;
}

struct GemmCase {
  int m, n, k;
  bool accumulate, bias;
};

TEST(LtGemm, MatchesFloat64Reference) {
  SKIP_WITHOUT_GPU();
  void* workspace = nullptr;
  const size_t workspace_bytes = size_t{32} << 20;
  ASSERT_EQ(cudaMalloc(&workspace, workspace_bytes), cudaSuccess);
  std::mt19937 rng(7);
  std::uniform_real_distribution<float> uniform(-1.0f, 1.0f);
  for (const bool fp32 : {false, true}) {
    auto gemm = cuda::LtGemm::Create(fp32 ? CUDA_R_32F : CUDA_R_16BF, workspace, workspace_bytes);
    ASSERT_TRUE(gemm.ok()) << gemm.status();
    for (const GemmCase c : {GemmCase{1, 1152, 384, false, false}, GemmCase{3, 384, 384, true, true},
                             GemmCase{16, 2048, 384, false, false},
                             GemmCase{37, 384, 1024, true, false},
                             GemmCase{128, 1536, 384, false, true}}) {
      SCOPED_TRACE(testing::Message() << (fp32 ? "fp32 " : "bf16 ") << c.m << "x" << c.n << "x"
                                      << c.k << (c.accumulate ? " accumulate" : "")
                                      << (c.bias ? " bias" : ""));
      std::vector<float> x(size_t(c.m) * c.k), w(size_t(c.n) * c.k), y0(size_t(c.m) * c.n),
          bias(c.n);
      // bf16 inputs hold bf16 values; fp32 inputs use all 24 bits (TF32 would round them).
      for (float& v : x) v = fp32 ? uniform(rng) : RoundToBf16(uniform(rng));
      for (float& v : w) v = fp32 ? uniform(rng) : RoundToBf16(uniform(rng));
      for (float& v : y0) v = uniform(rng);
      for (float& v : bias) v = uniform(rng);
      void* dx = nullptr;
      void* dw = nullptr;
      if (fp32) {
        dx = ToDevice(x);
        dw = ToDevice(w);
      } else {
        std::vector<uint16_t> xb(x.size()), wb(w.size());
        std::transform(x.begin(), x.end(), xb.begin(), Bf16Bits);
        std::transform(w.begin(), w.end(), wb.begin(), Bf16Bits);
        dx = ToDevice(xb);
        dw = ToDevice(wb);
      }
      float* dy = ToDevice(y0);
      float* dbias = ToDevice(bias);
      // Twice: the second call reuses the shape's plan.
      for (int call = 0; call < 2; ++call) {
        ASSERT_EQ(cudaMemcpy(dy, y0.data(), y0.size() * 4, cudaMemcpyHostToDevice), cudaSuccess);
        absl::Status st = (*gemm)->Run(dx, dw, dy, c.m, c.n, c.k, c.accumulate,
                                       c.bias ? dbias : nullptr, nullptr);
        ASSERT_TRUE(st.ok()) << st;
        std::vector<float> y(y0.size());
        ASSERT_EQ(cudaMemcpy(y.data(), dy, y.size() * 4, cudaMemcpyDeviceToHost), cudaSuccess);
        double worst = 0;
        for (int i = 0; i < c.m; ++i) {
          for (int j = 0; j < c.n; ++j) {
            double want = 0, magnitude = 0;
            for (int l = 0; l < c.k; ++l) {
              const double p = double{x[size_t(i) * c.k + l]} * w[size_t(j) * c.k + l];
              want += p;
              magnitude += std::abs(p);
            }
            if (c.accumulate) want += y0[size_t(i) * c.n + j];
            if (c.bias) want += bias[j];
            magnitude += 1.0;  // y0 and the bias are below 1 in magnitude
            worst = std::max(worst, std::abs(y[size_t(i) * c.n + j] - want) / magnitude);
          }
        }
        EXPECT_LT(worst, 4e-6);
      }
      EXPECT_GE((*gemm)->plans(), 1u);
      for (void* p : {dx, dw, static_cast<void*>(dy), static_cast<void*>(dbias)}) cudaFree(p);
    }
  }
  cudaFree(workspace);
}

// ---- Graph replay against eager launches ------------------------------------------------------

struct GraphCase {
  std::string format;
  CudaCompute compute;
};

class CudaGraphReplay : public ::testing::TestWithParam<GraphCase> {};

// Prompt of sequence `seq`: `length` token ids in [2, vocab).
std::vector<int32_t> Prompt(int seq, int length, int vocab) {
  std::vector<int32_t> ids(length);
  for (int i = 0; i < length; ++i) ids[i] = 2 + (seq * 131 + i * 17) % (vocab - 2);
  return ids;
}

TEST_P(CudaGraphReplay, BitIdenticalToEagerWithChangingBatchAndLengths) {
  SKIP_WITHOUT_GPU();
  const std::string dir = ReferenceModelDir();
  if (dir.empty()) GTEST_SKIP() << "models/reference not found";
  const GraphCase& param = GetParam();
  RunnerOptions options;
  options.model_dir = dir;
  options.kv_format = *kernels::ParseKvFormat(param.format);
  options.kv_block_size = 16;
  options.kv_num_blocks = 2048;
  // A small initial step workspace, so that a prompt joining grows it (the graphs are dropped).
  auto graphs = CreateCudaModelRunner(
      options, {.initial_step_tokens = 8, .max_sequences = 12, .compute = param.compute});
  auto eager = CreateCudaModelRunner(options, {.initial_step_tokens = 8,
                                               .max_sequences = 12,
                                               .compute = param.compute,
                                               .cuda_graphs = false});
  ASSERT_TRUE(graphs.ok()) << graphs.status();
  ASSERT_TRUE(eager.ok()) << eager.status();
  ModelRunner* runners[2] = {graphs->get(), eager->get()};
  const int vocab = runners[0]->config().vocab_size;

  struct Live {
    kernels::SeqId id;
    std::vector<int32_t> pending;  // tokens of the next step: a prompt, or one decode token
  };
  std::vector<Live> live;
  kernels::SeqId next_id = 0;
  auto join = [&](int prompt_len) {
    for (ModelRunner* r : runners) {
      ASSERT_TRUE(r->kv_cache().AddSequence(next_id, prompt_len).ok());
    }
    live.push_back({.id = next_id, .pending = Prompt(static_cast<int>(next_id), prompt_len, vocab)});
    ++next_id;
  };
  for (int len : {40, 75, 130}) join(len);

  int replayed_steps = 0, sampled_steps = 0;
  int64_t last_replays = 0;
  const int steps = 320;
  for (int step = 0; step < steps; ++step) {
    // A prompt joins (its prefill in the same step as the others' decode tokens: a mixed step,
    // launched eagerly); the oldest sequence finishes.
    if (step % 41 == 20) join(24 + step % 50);
    if (step % 57 == 56 && live.size() > 1) {
      for (ModelRunner* r : runners) r->kv_cache().FreeSequence(live.front().id);
      live.erase(live.begin());
    }
    std::vector<ForwardChunk> chunks;
    for (Live& l : live) {
      for (ModelRunner* r : runners) {
        const int64_t length = r->kv_cache().Length(l.id, 0);
        ASSERT_TRUE(r->kv_cache().Reserve(l.id, length + static_cast<int64_t>(l.pending.size()))
                        .ok());
      }
      chunks.push_back({.seq = l.id, .tokens = l.pending});
    }
    const bool decode_only = std::all_of(live.begin(), live.end(), [&](const Live& l) {
      return l.pending.size() == 1;
    });
    std::vector<int32_t> next(chunks.size());
    if (step % 2 == 0) {  // logits to the host: compared bit for bit
      std::vector<float> logits[2];
      for (int i = 0; i < 2; ++i) {
        logits[i].resize(chunks.size() * size_t(vocab));
        absl::Status st = runners[i]->Forward(chunks, logits[i].data());
        ASSERT_TRUE(st.ok()) << st;
      }
      ASSERT_EQ(std::memcmp(logits[0].data(), logits[1].data(), logits[0].size() * sizeof(float)),
                0)
          << "step " << step << ", batch " << chunks.size();
      for (size_t c = 0; c < chunks.size(); ++c) {
        const float* row = &logits[0][c * vocab];
        next[c] = static_cast<int32_t>(std::max_element(row, row + vocab) - row);
      }
    } else {  // sampled on the device: the same tokens
      std::vector<DeviceSampling> sampling(chunks.size());
      for (size_t c = 0; c < chunks.size(); ++c) {
        sampling[c] = {.temperature = 0.8f,
                       .top_p = 0.95f,
                       .uniform = std::fmod(0.618034 * (step * 31 + c * 7 + 1), 1.0)};
      }
      std::vector<int32_t> tokens[2];
      for (int i = 0; i < 2; ++i) {
        tokens[i].resize(chunks.size());
        absl::Status st = runners[i]->ForwardSample(chunks, sampling, tokens[i].data());
        ASSERT_TRUE(st.ok()) << st;
      }
      ASSERT_EQ(tokens[0], tokens[1]) << "step " << step;
      next = tokens[0];
      ++sampled_steps;
    }
    const int64_t replays = GetCudaGraphStats(*runners[0]).replays;
    if (replays > last_replays) {
      EXPECT_TRUE(decode_only) << "step " << step << " replayed a graph";
      ++replayed_steps;
    }
    last_replays = replays;
    for (size_t c = 0; c < live.size(); ++c) live[c].pending = {next[c]};
  }
  EXPECT_EQ(GetCudaGraphStats(*runners[1]).replays, 0);
  const CudaGraphStats stats = GetCudaGraphStats(*runners[0]);
  std::printf("[graphs] %s %s: %d of %d steps replayed, %lld captures, %d graphs held\n",
              param.format.c_str(), CudaComputeName(param.compute), replayed_steps, steps,
              static_cast<long long>(stats.captures), stats.graphs);
  // Most decode steps replay (each shape runs eagerly once and is captured on its second step).
  EXPECT_GT(replayed_steps, steps / 2);
  EXPECT_GT(sampled_steps, 0);
}

INSTANTIATE_TEST_SUITE_P(
    Formats, CudaGraphReplay,
    ::testing::Values(GraphCase{"fp16", CudaCompute::kBf16}, GraphCase{"kivi4", CudaCompute::kBf16},
                      GraphCase{"tq4/fp16=1:1", CudaCompute::kBf16},
                      GraphCase{"fp16", CudaCompute::kFp32}),
    [](const ::testing::TestParamInfo<GraphCase>& info) {
      std::string name = info.param.format + "_" + CudaComputeName(info.param.compute);
      for (char& ch : name) {
        if (!std::isalnum(static_cast<unsigned char>(ch))) ch = '_';
      }
      return name;
    });

}  // namespace
}  // namespace kvgate::worker
