// The tensor-core prefill attention (workers/backend/cuda/prefill_attention.h) against a float64
// host reference and against the fp32 CUDA-core kernel (LaunchPrefillAttention, cuda_kernels.h),
// on random inputs laid out as the CUDA runner lays them out: queries with padded GQA groups
// (padding slots hold NaN, so reading them fails the test), fresh keys/values as rows of a fused
// qkv buffer, the cached prefix as per-entry fp32 arrays with NaN past each entry's length, and
// attention sinks (keys rotated by their RoPE shift). Cases: chunk lengths that are not multiples
// of the 64-row tile, with and without a prefix, several chunks in one launch, GQA 1 / 4 / 8,
// head_dim 64 / 128, sinks, and a prefix longer than one key tile.
//
// Bounds (relative L2 over every output of the case): the fp32 kernel 2e-6 (fp32 arithmetic);
// the tensor-core kernel rounds q, k, v and the probabilities to its 16-bit operand once each
// (unit roundoff u = 2^-12 for fp16, 2^-9 for bf16) and accumulates in fp32, so its error is a few
// u: bound 8u (fp16 2.0e-3, bf16 1.6e-2). Outputs are poisoned with NaN first: every output must
// be written and finite. The bf16 output path must equal bf16(fp32 output) bit for bit.
//
// Timing (PrefillMmaTiming): Llama-3-8B heads (32 q / 8 kv, d 128), one 8K-token prompt and the
// last 512-token chunk of a 32K prompt: both kernels, ms and TFLOP/s (causal FLOPs), printed; the
// tensor-core output must match the fp32 kernel's within the bound above.
//
// Skipped with a reason when no GPU is present.
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "workers/backend/cuda/cuda_kernels.h"
#include "workers/backend/cuda/prefill_attention.h"
#include "tests/gpu/gpu_test_util.h"

namespace kvgate::worker::cuda {
namespace {

using gputest::DeviceArray;

// The array's contents; on a copy error, a test failure and every element at T's maximum (which
// no comparison below accepts).
template <class T>
std::vector<T> Fetch(const DeviceArray<T>& array) {
  std::vector<T> host;
  if (const cudaError_t e = array.Download(&host); e != cudaSuccess) {
    ADD_FAILURE() << "download: " << cudaGetErrorString(e);
    host.assign(array.size(), std::numeric_limits<T>::max());
  }
  return host;
}

constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();
constexpr double kFp16Bound = 8.0 / 4096.0;  // 8 u, u = 2^-12
constexpr double kBf16Bound = 8.0 / 512.0;   // 8 u, u = 2^-9
constexpr double kFp32Bound = 2e-6;

uint16_t HostBf16(float x) {
  uint32_t bits;
  std::memcpy(&bits, &x, 4);
  bits += 0x7fffu + ((bits >> 16) & 1u);
  return static_cast<uint16_t>(bits >> 16);
}

struct Chunk {
  int n = 0;           // fresh tokens
  int past = 0;        // cached tokens before them
  int sink_slots = 0;  // with a prefix: slots [0, sink_slots) scored at the sinks' shift
  int sink_shift = 0;
};

struct Case {
  const char* name;
  int hq, hkv, group_pad, d;
  std::vector<Chunk> chunks;
  uint32_t seed;
};

// The inputs of one case on the host, in the runner's layouts (PrefillAttentionArgs).
struct Inputs {
  int rows = 0, entries = 0, stride_tokens = 0;
  int64_t qkv_stride = 0;
  std::vector<int> first_row, prefix_index;
  std::vector<float> q, qkv, prefix_k, prefix_v;
  std::vector<int32_t> sink_slots, sink_shift;
  std::vector<double> inv_freq;
  bool sinks = false;
};

Inputs MakeInputs(const Case& c) {
  Inputs in;
  std::mt19937 rng(c.seed);
  std::uniform_real_distribution<float> uni(-1.0f, 1.0f);
  const int d = c.d, group = c.hq / c.hkv;
  for (const Chunk& ch : c.chunks) {
    in.first_row.push_back(in.rows);
    in.rows += ch.n;
    in.prefix_index.push_back(ch.past > 0 ? in.entries++ : -1);
    in.stride_tokens = std::max(in.stride_tokens, ch.past + 3);
    in.sinks = in.sinks || ch.sink_slots > 0;
  }
  // Queries of magnitude up to 4: scores of a few units, a softmax that is neither flat nor
  // one-hot.
  in.q.assign(static_cast<size_t>(in.rows) * c.hkv * c.group_pad * d, kNaN);
  for (int r = 0; r < in.rows; ++r) {
    for (int h = 0; h < c.hkv; ++h) {
      for (int j = 0; j < group; ++j) {
        float* dst = &in.q[((static_cast<size_t>(r) * c.hkv + h) * c.group_pad + j) * d];
        for (int e = 0; e < d; ++e) dst[e] = 4.0f * uni(rng);
      }
    }
  }
  // Fused rows [q | k | v] as the runner's qkv buffer; the q part is not attention's input.
  in.qkv_stride = int64_t{c.hq + 2 * c.hkv} * d;
  in.qkv.assign(static_cast<size_t>(in.rows) * in.qkv_stride, kNaN);
  for (int r = 0; r < in.rows; ++r) {
    for (int64_t e = int64_t{c.hq} * d; e < in.qkv_stride; ++e)
      in.qkv[r * in.qkv_stride + e] = uni(rng);
  }
  const size_t prefix_floats = static_cast<size_t>(in.entries) * c.hkv * in.stride_tokens * d;
  in.prefix_k.assign(std::max<size_t>(prefix_floats, 1), kNaN);
  in.prefix_v.assign(std::max<size_t>(prefix_floats, 1), kNaN);
  in.sink_slots.assign(std::max(in.entries, 1), 0);
  in.sink_shift.assign(std::max(in.entries, 1), 0);
  for (size_t ci = 0; ci < c.chunks.size(); ++ci) {
    const int e = in.prefix_index[ci];
    if (e < 0) continue;
    in.sink_slots[e] = c.chunks[ci].sink_slots;
    in.sink_shift[e] = c.chunks[ci].sink_shift;
    for (int h = 0; h < c.hkv; ++h) {
      for (int t = 0; t < c.chunks[ci].past; ++t) {
        const size_t base = ((static_cast<size_t>(e) * c.hkv + h) * in.stride_tokens + t) * d;
        for (int j = 0; j < d; ++j) {
          in.prefix_k[base + j] = uni(rng);
          in.prefix_v[base + j] = uni(rng);
        }
      }
    }
  }
  for (int j = 0; j < d / 2; ++j) in.inv_freq.push_back(std::pow(500000.0, -2.0 * j / d));
  return in;
}

// out[r, h, :] in float64 (CpuKvCache::PrefillAttention's semantics, sinks included).
std::vector<double> Reference(const Case& c, const Inputs& in, float scale) {
  const int d = c.d, group = c.hq / c.hkv, half = d / 2;
  std::vector<double> out(static_cast<size_t>(in.rows) * c.hq * d, 0.0);
  std::vector<double> k_rot(d), scores;
  for (size_t ci = 0; ci < c.chunks.size(); ++ci) {
    const Chunk& ch = c.chunks[ci];
    const int e = in.prefix_index[ci];
    for (int h = 0; h < c.hq; ++h) {
      const int kvh = h / group;
      auto key = [&](int t, int j) -> double {
        if (t < ch.past) {
          return in
              .prefix_k[((static_cast<size_t>(e) * c.hkv + kvh) * in.stride_tokens + t) * d + j];
        }
        return in.qkv[(in.first_row[ci] + t - ch.past) * in.qkv_stride + (c.hq + kvh) * d + j];
      };
      auto value = [&](int t, int j) -> double {
        if (t < ch.past) {
          return in
              .prefix_v[((static_cast<size_t>(e) * c.hkv + kvh) * in.stride_tokens + t) * d + j];
        }
        return in
            .qkv[(in.first_row[ci] + t - ch.past) * in.qkv_stride + (c.hq + c.hkv + kvh) * d + j];
      };
      const int sinks = e >= 0 ? std::min(ch.sink_slots, ch.past) : 0;
      for (int i = 0; i < ch.n; ++i) {
        const int row = in.first_row[ci] + i, pos = ch.past + i;
        const float* q =
            &in.q[((static_cast<size_t>(row) * c.hkv + kvh) * c.group_pad + h % group) * d];
        scores.assign(pos + 1, 0.0);
        double mx = -INFINITY;
        for (int t = 0; t <= pos; ++t) {
          for (int j = 0; j < d; ++j) k_rot[j] = key(t, j);
          if (t < sinks) {  // q . R(shift) k
            for (int j = 0; j < half; ++j) {
              const double a = ch.sink_shift * in.inv_freq[j];
              const double x0 = k_rot[j], x1 = k_rot[j + half];
              k_rot[j] = x0 * std::cos(a) - x1 * std::sin(a);
              k_rot[j + half] = x1 * std::cos(a) + x0 * std::sin(a);
            }
          }
          double s = 0;
          for (int j = 0; j < d; ++j) s += static_cast<double>(q[j]) * k_rot[j];
          scores[t] = s * scale;
          mx = std::max(mx, scores[t]);
        }
        double sum = 0;
        for (double& s : scores) sum += (s = std::exp(s - mx));
        double* dst = &out[(static_cast<size_t>(row) * c.hq + h) * d];
        for (int t = 0; t <= pos; ++t) {
          for (int j = 0; j < d; ++j) dst[j] += scores[t] / sum * value(t, j);
        }
      }
    }
  }
  return out;
}

struct Error {
  double rel_l2 = INFINITY;
  bool all_finite = false;
};

template <class A, class B>
Error Compare(const std::vector<A>& got, const std::vector<B>& want) {
  Error err;
  double num = 0, den = 0;
  err.all_finite = got.size() == want.size();
  for (size_t i = 0; i < got.size() && i < want.size(); ++i) {
    if (!std::isfinite(static_cast<double>(got[i]))) err.all_finite = false;
    const double diff = static_cast<double>(got[i]) - static_cast<double>(want[i]);
    num += diff * diff;
    den += static_cast<double>(want[i]) * want[i];
  }
  err.rel_l2 = den > 0 ? std::sqrt(num / den) : std::sqrt(num);
  return err;
}

// The device copies of a case's inputs and the launch arguments over them.
struct DeviceCase {
  DeviceArray<float> q, qkv, prefix_k, prefix_v;
  DeviceArray<int32_t> tiles, sink_slots, sink_shift;
  DeviceArray<double> inv_freq;
};

std::vector<int32_t> Tiles(const Case& c, const Inputs& in, int tile_rows) {
  std::vector<int32_t> tiles;
  for (size_t ci = 0; ci < c.chunks.size(); ++ci) {
    for (int t = 0; t < c.chunks[ci].n; t += tile_rows) {
      const PrefillTile tile{.first_row = in.first_row[ci],
                             .tile_begin = t,
                             .tile_rows = std::min(tile_rows, c.chunks[ci].n - t),
                             .past = c.chunks[ci].past,
                             .prefix_index = in.prefix_index[ci]};
      const auto* fields = reinterpret_cast<const int32_t*>(&tile);
      tiles.insert(tiles.end(), fields, fields + 5);
    }
  }
  return tiles;
}

class PrefillMma : public ::testing::TestWithParam<Case> {};

TEST_P(PrefillMma, MatchesFloat64AndFp32Kernel) {
  SKIP_WITHOUT_GPU();
  const Case& c = GetParam();
  const Inputs in = MakeInputs(c);
  const float scale = 1.0f / std::sqrt(static_cast<float>(c.d));
  const std::vector<double> ref = Reference(c, in, scale);

  DeviceCase dev;
  ASSERT_CUDA(dev.q.Upload(in.q));
  ASSERT_CUDA(dev.qkv.Upload(in.qkv));
  ASSERT_CUDA(dev.prefix_k.Upload(in.prefix_k));
  ASSERT_CUDA(dev.prefix_v.Upload(in.prefix_v));
  ASSERT_CUDA(dev.sink_slots.Upload(in.sink_slots));
  ASSERT_CUDA(dev.sink_shift.Upload(in.sink_shift));
  ASSERT_CUDA(dev.inv_freq.Upload(in.inv_freq));
  PrefillAttentionArgs args;
  args.shape = {
      .num_q_heads = c.hq, .num_kv_heads = c.hkv, .head_dim = c.d, .group_pad = c.group_pad};
  args.q = dev.q.get();
  args.fresh_k = dev.qkv.get() + int64_t{c.hq} * c.d;
  args.fresh_v = dev.qkv.get() + int64_t{c.hq + c.hkv} * c.d;
  args.fresh_row_stride = in.qkv_stride;
  args.prefix_k = dev.prefix_k.get();
  args.prefix_v = dev.prefix_v.get();
  args.prefix_stride_tokens = in.stride_tokens;
  if (in.sinks) {
    args.sink_slots = dev.sink_slots.get();
    args.sink_shift = dev.sink_shift.get();
    args.rope_inv_freq = dev.inv_freq.get();
  }
  args.scale = scale;
  const size_t out_floats = static_cast<size_t>(in.rows) * c.hq * c.d;

  // Runs one kernel into a NaN-poisoned fp32 output (or bf16 when `bf16`); returns it as floats.
  auto run = [&](bool mma, PrefillOperands operands, bool bf16) -> std::vector<float> {
    const std::vector<int32_t> tiles = Tiles(c, in, mma ? kPrefillMmaTileRows : kPrefillTileRows);
    DeviceArray<int32_t> dtiles;
    DeviceArray<float> out_f32;
    DeviceArray<uint16_t> out_bf16;
    PrefillAttentionArgs a = args;
    EXPECT_EQ(dtiles.Upload(tiles), cudaSuccess);
    a.tiles = reinterpret_cast<const PrefillTile*>(dtiles.get());
    a.num_tiles = static_cast<int>(tiles.size() / 5);
    if (bf16) {
      EXPECT_EQ(out_bf16.Allocate(out_floats), cudaSuccess);
      EXPECT_EQ(cudaMemset(out_bf16.get(), 0xff, out_floats * 2), cudaSuccess);  // NaN
      a.out_bf16 = out_bf16.get();
    } else {
      EXPECT_EQ(out_f32.Allocate(out_floats), cudaSuccess);
      EXPECT_EQ(cudaMemset(out_f32.get(), 0xff, out_floats * 4), cudaSuccess);  // NaN
      a.out_f32 = out_f32.get();
    }
    const cudaError_t launch =
        mma ? LaunchPrefillAttentionMma(a, operands, nullptr) : LaunchPrefillAttention(a, nullptr);
    EXPECT_EQ(launch, cudaSuccess) << cudaGetErrorString(launch);
    EXPECT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    if (!bf16) return Fetch(out_f32);
    std::vector<float> out;
    for (uint16_t b : Fetch(out_bf16)) {
      const uint32_t bits = static_cast<uint32_t>(b) << 16;
      float x;
      std::memcpy(&x, &bits, 4);
      out.push_back(x);
    }
    return out;
  };

  const std::vector<float> fp32 = run(false, PrefillOperands::kFp16, false);
  const std::vector<float> fp16 = run(true, PrefillOperands::kFp16, false);
  const std::vector<float> bf16 = run(true, PrefillOperands::kBf16, false);
  const std::vector<float> fp16_bf16_out = run(true, PrefillOperands::kFp16, true);
  const Error e32 = Compare(fp32, ref), e16 = Compare(fp16, ref), eb16 = Compare(bf16, ref);
  const Error e16_vs_32 = Compare(fp16, fp32), eb16_vs_32 = Compare(bf16, fp32);
  std::printf(
      "[prefill] %-22s rel L2 vs float64: fp32 kernel %.2e, mma fp16 %.2e, mma bf16 %.2e;"
      " vs fp32 kernel: fp16 %.2e, bf16 %.2e\n",
      c.name, e32.rel_l2, e16.rel_l2, eb16.rel_l2, e16_vs_32.rel_l2, eb16_vs_32.rel_l2);
  EXPECT_TRUE(e32.all_finite && e16.all_finite && eb16.all_finite) << "unwritten or NaN outputs";
  EXPECT_LT(e32.rel_l2, kFp32Bound);
  EXPECT_LT(e16.rel_l2, kFp16Bound);
  EXPECT_LT(eb16.rel_l2, kBf16Bound);
  EXPECT_LT(e16_vs_32.rel_l2, kFp16Bound);
  EXPECT_LT(eb16_vs_32.rel_l2, kBf16Bound);
  // The bf16 output store rounds the same fp32 results.
  size_t mismatched = 0;
  for (size_t i = 0; i < fp16.size(); ++i) {
    uint32_t bits = static_cast<uint32_t>(HostBf16(fp16[i])) << 16;
    float want;
    std::memcpy(&want, &bits, 4);
    if (std::memcmp(&want, &fp16_bf16_out[i], 4) != 0) ++mismatched;
  }
  EXPECT_EQ(mismatched, 0u) << "bf16 outputs differ from bf16(fp32 output)";
}

INSTANTIATE_TEST_SUITE_P(
    Cases, PrefillMma,
    ::testing::Values(
        Case{"mha_d64_fresh", 4, 4, 1, 64, {{.n = 100}}, 11},
        Case{"gqa4_d128_prefix", 8, 2, 4, 128, {{.n = 45, .past = 77}}, 12},
        Case{"gqa8_d128_chunks",
             16,
             2,
             8,
             128,
             {{.n = 130}, {.n = 3, .past = 200}, {.n = 64, .past = 33}, {.n = 1}},
             13},
        Case{"gqa4pad8_d64_chunks", 8, 2, 8, 64, {{.n = 70, .past = 5}, {.n = 129}}, 14},
        Case{"gqa4_d128_sinks",
             8,
             2,
             4,
             128,
             {{.n = 70, .past = 150, .sink_slots = 4, .sink_shift = 37},
              {.n = 20, .past = 90},
              {.n = 65, .past = 70, .sink_slots = 70, .sink_shift = 1000}},
             15},
        Case{"gqa4_d64_sinks",
             4,
             1,
             4,
             64,
             {{.n = 33, .past = 300, .sink_slots = 8, .sink_shift = 5}},
             16},
        Case{"gqa4_d128_long", 8, 2, 4, 128, {{.n = 300, .past = 1000}}, 17}),
    [](const ::testing::TestParamInfo<Case>& info) { return std::string(info.param.name); });

// Bad arguments are errors, not launches.
TEST(PrefillMmaArgs, Rejected) {
  PrefillAttentionArgs a;
  a.num_tiles = 1;
  a.shape = {.num_q_heads = 8, .num_kv_heads = 2, .head_dim = 96, .group_pad = 4};
  float out = 0;
  a.out_f32 = &out;
  EXPECT_EQ(LaunchPrefillAttentionMma(a, PrefillOperands::kFp16, nullptr), cudaErrorInvalidValue);
  a.shape.head_dim = 128;
  a.shape.group_pad = 2;  // < G
  EXPECT_EQ(LaunchPrefillAttentionMma(a, PrefillOperands::kFp16, nullptr), cudaErrorInvalidValue);
  a.shape.group_pad = 4;
  a.out_f32 = nullptr;
  EXPECT_EQ(LaunchPrefillAttentionMma(a, PrefillOperands::kBf16, nullptr), cudaErrorInvalidValue);
  a.num_tiles = 0;
  EXPECT_EQ(LaunchPrefillAttentionMma(a, PrefillOperands::kBf16, nullptr), cudaSuccess);
}

// Llama-3-8B heads at prefill lengths: both kernels timed (events, median of 5 after a warm-up),
// and the tensor-core output checked against the fp32 kernel's.
TEST(PrefillMmaTiming, Llama3_8BHeads) {
  SKIP_WITHOUT_GPU();
  constexpr int kHq = 32, kHkv = 8, kD = 128;
  struct Shape {
    const char* name;
    int n, past;
  };
  for (const Shape& s : {Shape{"8K prompt, one chunk", 8192, 0},
                         Shape{"32K prompt, last 512-chunk", 512, 32768 - 512}}) {
    const int64_t stride = int64_t{kHq + 2 * kHkv} * kD;
    DeviceArray<float> q, qkv, prefix_k, prefix_v, out32, out_mma;
    ASSERT_CUDA(q.Allocate(static_cast<size_t>(s.n) * kHq * kD));
    ASSERT_CUDA(qkv.Allocate(static_cast<size_t>(s.n) * stride));
    const size_t prefix = std::max<size_t>(static_cast<size_t>(s.past) * kHkv * kD, 1);
    ASSERT_CUDA(prefix_k.Allocate(prefix));
    ASSERT_CUDA(prefix_v.Allocate(prefix));
    ASSERT_CUDA(out32.Allocate(static_cast<size_t>(s.n) * kHq * kD));
    ASSERT_CUDA(out_mma.Allocate(static_cast<size_t>(s.n) * kHq * kD));
    ASSERT_CUDA(
        LaunchFillUniformFloat(q.get(), static_cast<int64_t>(s.n) * kHq * kD, 1, 4.0f, nullptr));
    ASSERT_CUDA(LaunchFillUniformFloat(qkv.get(), s.n * stride, 2, 1.0f, nullptr));
    ASSERT_CUDA(LaunchFillUniformFloat(prefix_k.get(), prefix, 3, 1.0f, nullptr));
    ASSERT_CUDA(LaunchFillUniformFloat(prefix_v.get(), prefix, 4, 1.0f, nullptr));
    PrefillAttentionArgs a;
    a.shape = {.num_q_heads = kHq, .num_kv_heads = kHkv, .head_dim = kD, .group_pad = kHq / kHkv};
    a.q = q.get();
    a.fresh_k = qkv.get() + kHq * kD;
    a.fresh_v = qkv.get() + (kHq + kHkv) * kD;
    a.fresh_row_stride = stride;
    a.prefix_k = prefix_k.get();
    a.prefix_v = prefix_v.get();
    a.prefix_stride_tokens = s.past;
    a.scale = 1.0f / std::sqrt(static_cast<float>(kD));
    const double flops =
        4.0 * kD * kHq * (static_cast<double>(s.n) * s.past + 0.5 * s.n * (s.n + 1.0));
    cudaEvent_t start, stop;
    ASSERT_CUDA(cudaEventCreate(&start));
    ASSERT_CUDA(cudaEventCreate(&stop));
    double ms[2] = {0, 0};
    for (int mma = 0; mma < 2; ++mma) {
      const Case c{"", kHq, kHkv, kHq / kHkv, kD, {{.n = s.n, .past = s.past}}, 0};
      Inputs layout;
      layout.first_row = {0};
      layout.prefix_index = {s.past > 0 ? 0 : -1};
      const std::vector<int32_t> tiles =
          Tiles(c, layout, mma ? kPrefillMmaTileRows : kPrefillTileRows);
      DeviceArray<int32_t> dtiles;
      ASSERT_CUDA(dtiles.Upload(tiles));
      a.tiles = reinterpret_cast<const PrefillTile*>(dtiles.get());
      a.num_tiles = static_cast<int>(tiles.size() / 5);
      a.out_f32 = mma ? out_mma.get() : out32.get();
      auto launch = [&] {
        return mma ? LaunchPrefillAttentionMma(a, kRunnerPrefillOperands, nullptr)
                   : LaunchPrefillAttention(a, nullptr);
      };
      ASSERT_CUDA(launch());  // warm-up
      std::vector<float> times;
      for (int rep = 0; rep < 5; ++rep) {
        ASSERT_CUDA(cudaEventRecord(start));
        ASSERT_CUDA(launch());
        ASSERT_CUDA(cudaEventRecord(stop));
        ASSERT_CUDA(cudaEventSynchronize(stop));
        float t = 0;
        ASSERT_CUDA(cudaEventElapsedTime(&t, start, stop));
        times.push_back(t);
      }
      std::sort(times.begin(), times.end());
      ms[mma] = times[2];
    }
    ASSERT_CUDA(cudaEventDestroy(start));
    ASSERT_CUDA(cudaEventDestroy(stop));
    const Error err = Compare(Fetch(out_mma), Fetch(out32));
    std::printf(
        "[prefill timing] %-28s fp32 kernel %8.3f ms (%6.1f TFLOP/s) | mma %8.3f ms "
        "(%6.1f TFLOP/s) | x%.1f | rel L2 vs fp32 %.2e\n",
        s.name, ms[0], flops / ms[0] * 1e-9, ms[1], flops / ms[1] * 1e-9, ms[0] / ms[1],
        err.rel_l2);
    EXPECT_TRUE(err.all_finite);
    EXPECT_LT(err.rel_l2,
              kRunnerPrefillOperands == PrefillOperands::kFp16 ? kFp16Bound : kBf16Bound);
  }
}

}  // namespace
}  // namespace kvgate::worker::cuda
