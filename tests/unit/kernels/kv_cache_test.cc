// KvCache (CPU reference) against a float64 softmax-attention reference: decode and prefill over
// formats, head dims 64/128, GQA ratios 1/4/8, ragged lengths; block accounting; eviction, with
// every format (KIVI's key groups and the fp16 windows included).
#include "kvgate/kernels/kv_cache.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <initializer_list>
#include <map>
#include <ostream>
#include <string>
#include <tuple>
#include <vector>

#include "tests/unit/kernels/reference_attention.h"

namespace kvgate::kernels {
namespace {

using testing::MaxAbsDiff;
using testing::RandomVector;
using testing::ReferenceAttention;

KvCacheConfig Config(const std::string& format, int layers, int kv_heads, int d, int block_size,
                     int64_t blocks) {
  KvCacheConfig cfg;
  cfg.num_layers = layers;
  cfg.num_kv_heads = kv_heads;
  cfg.head_dim = d;
  cfg.block_size = block_size;
  cfg.num_blocks = blocks;
  auto spec = ParseKvFormat(format);
  EXPECT_TRUE(spec.ok()) << spec.status();
  cfg.format = *spec;
  return cfg;
}

// Reads back every stored token of (seq, layer) as [stored, kv_heads, d] (what attention sees).
void ReadAll(const KvCache& cache, SeqId seq, int layer, std::vector<float>* k,
             std::vector<float>* v) {
  const auto& cfg = cache.config();
  const int64_t n = cache.StoredTokens(seq, layer);
  const int d = cfg.head_dim, heads = cfg.num_kv_heads;
  k->assign(n * heads * d, 0);
  v->assign(n * heads * d, 0);
  std::vector<float> hk(n * d), hv(n * d);
  std::vector<int64_t> pos(n);
  for (int h = 0; h < heads; ++h) {
    ASSERT_TRUE(cache.ReadStored(seq, layer, h, hk.data(), hv.data(), pos.data()).ok());
    for (int64_t t = 0; t < n; ++t) {
      for (int e = 0; e < d; ++e) {
        (*k)[(t * heads + h) * d + e] = hk[t * d + e];
        (*v)[(t * heads + h) * d + e] = hv[t * d + e];
      }
    }
  }
}

// ---- fp16 / bf16 decode and prefill -------------------------------------------------------------

class DecodeTest : public ::testing::TestWithParam<std::tuple<std::string, int, int, int>> {};

TEST_P(DecodeTest, MatchesFloat64Reference) {
  const auto& [format, d, ratio, length] = GetParam();
  const int kv_heads = 2, q_heads = kv_heads * ratio, layers = 2;
  auto cache = CreateCpuKvCache(Config(format, layers, kv_heads, d, 16, 64));
  ASSERT_TRUE(cache.ok()) << cache.status();
  ASSERT_TRUE((*cache)->AddSequence(7, length).ok());
  const auto k = RandomVector(static_cast<size_t>(length) * kv_heads * d, 1);
  const auto v = RandomVector(static_cast<size_t>(length) * kv_heads * d, 2);
  const auto q = RandomVector(static_cast<size_t>(q_heads) * d, 3);
  // Append in uneven pieces across block boundaries.
  for (int layer = 0; layer < layers; ++layer) {
    int64_t done = 0, piece = 5;
    while (done < length) {
      const int64_t n = std::min<int64_t>(piece, length - done);
      ASSERT_TRUE(
          (*cache)->Append(7, layer, n, &k[done * kv_heads * d], &v[done * kv_heads * d]).ok());
      done += n;
      piece = piece * 2 + 1;
    }
    EXPECT_EQ((*cache)->Length(7, layer), length);
  }
  const float scale = 1.0f / std::sqrt(static_cast<float>(d));
  std::vector<float> out(q_heads * d);
  ASSERT_TRUE((*cache)->DecodeAttention(7, 1, q_heads, q.data(), scale, out.data()).ok());
  const auto ref =
      ReferenceAttention(q.data(), q_heads, k.data(), v.data(), kv_heads, d, length, scale);
  // fp16 keeps 11 significant bits (relative error <= 2^-11), bf16 8 (2^-8): the output error is
  // a small multiple of that times |v| (~3 for these N(0,1) inputs).
  const float bound = format == "fp16" ? 4e-3f : 3e-2f;
  EXPECT_LT(MaxAbsDiff(out, ref), bound);
  // Against the stored (rounded) keys and values the only difference is fp32 accumulation.
  std::vector<float> sk, sv;
  ReadAll(**cache, 7, 1, &sk, &sv);
  const auto ref_stored =
      ReferenceAttention(q.data(), q_heads, sk.data(), sv.data(), kv_heads, d, length, scale);
  EXPECT_LT(MaxAbsDiff(out, ref_stored), 2e-5f);
}

INSTANTIATE_TEST_SUITE_P(Formats, DecodeTest,
                         ::testing::Combine(::testing::Values("fp16", "bf16"),
                                            ::testing::Values(64, 128), ::testing::Values(1, 4, 8),
                                            ::testing::Values(1, 17, 130)));

TEST(PrefillTest, ChunkAfterCachedPrefixMatchesReference) {
  for (const char* format : {"fp16", "bf16"}) {
    const int d = 64, kv_heads = 2, q_heads = 8, prefix = 37, chunk = 23;
    auto cache = CreateCpuKvCache(Config(format, 1, kv_heads, d, 16, 16));
    ASSERT_TRUE(cache.ok());
    const int total = prefix + chunk;
    const auto k = RandomVector(total * kv_heads * d, 11);
    const auto v = RandomVector(total * kv_heads * d, 12);
    const auto q = RandomVector(total * q_heads * d, 13);
    const float scale = 0.125f;
    ASSERT_TRUE((*cache)->AddSequence(1, prefix).ok());
    ASSERT_TRUE((*cache)->Append(1, 0, prefix, k.data(), v.data()).ok());
    std::vector<float> out_prefix(prefix * q_heads * d);
    ASSERT_TRUE((*cache)
                    ->PrefillAttention(1, 0, prefix, q_heads, q.data(), k.data(), v.data(), scale,
                                       out_prefix.data())
                    .ok());
    ASSERT_TRUE((*cache)->Reserve(1, total).ok());
    const float* ck = &k[prefix * kv_heads * d];
    const float* cv = &v[prefix * kv_heads * d];
    const float* cq = &q[prefix * q_heads * d];
    ASSERT_TRUE((*cache)->Append(1, 0, chunk, ck, cv).ok());
    std::vector<float> out(chunk * q_heads * d);
    ASSERT_TRUE(
        (*cache)->PrefillAttention(1, 0, chunk, q_heads, cq, ck, cv, scale, out.data()).ok());
    // The cached prefix is read through the format, the fresh chunk in full precision.
    std::vector<float> sk, sv;
    ReadAll(**cache, 1, 0, &sk, &sv);
    std::vector<float> mixed_k = sk, mixed_v = sv;
    std::copy(ck, ck + chunk * kv_heads * d, mixed_k.begin() + prefix * kv_heads * d);
    std::copy(cv, cv + chunk * kv_heads * d, mixed_v.begin() + prefix * kv_heads * d);
    float err_exact = 0, err_orig = 0;
    for (int i = 0; i < chunk; ++i) {
      const auto ref = ReferenceAttention(cq + i * q_heads * d, q_heads, mixed_k.data(),
                                          mixed_v.data(), kv_heads, d, prefix + i + 1, scale);
      const auto ref_orig = ReferenceAttention(cq + i * q_heads * d, q_heads, k.data(), v.data(),
                                               kv_heads, d, prefix + i + 1, scale);
      std::vector<float> o(out.begin() + i * q_heads * d, out.begin() + (i + 1) * q_heads * d);
      err_exact = std::max(err_exact, MaxAbsDiff(o, ref));
      err_orig = std::max(err_orig, MaxAbsDiff(o, ref_orig));
    }
    EXPECT_LT(err_exact, 2e-5f) << format;
    EXPECT_LT(err_orig, std::string(format) == "fp16" ? 4e-3f : 3e-2f) << format;
    // First prefill (no cache): causal full precision.
    float err_first = 0;
    for (int i = 0; i < prefix; ++i) {
      const auto ref = ReferenceAttention(q.data() + i * q_heads * d, q_heads, k.data(), v.data(),
                                          kv_heads, d, i + 1, scale);
      std::vector<float> o(out_prefix.begin() + i * q_heads * d,
                           out_prefix.begin() + (i + 1) * q_heads * d);
      err_first = std::max(err_first, MaxAbsDiff(o, ref));
    }
    EXPECT_LT(err_first, 2e-5f) << format;
  }
}

// ---- Block accounting ---------------------------------------------------------------------------

TEST(BlockAccountingTest, AllocatedBytesMatchDescriptor) {
  for (const char* format : {"fp16", "bf16", "fp8", "int8", "kivi2", "kivi4", "tq4", "tq3.5", "tq3",
                             "tq2.5", "tq:k=4,v=3,qjl"}) {
    auto cfg = Config(format, 3, 4, 128, 16, 10);
    auto cache = CreateCpuKvCache(cfg);
    ASSERT_TRUE(cache.ok()) << format << ": " << cache.status();
    const auto& desc = (*cache)->desc();
    EXPECT_EQ((*cache)->allocated_bytes(),
              static_cast<int64_t>(10 * 16 * 3 * 4 * desc.bytes_per_token_per_head))
        << format;
    EXPECT_EQ((*cache)->bytes_per_token(),
              static_cast<int64_t>(3 * 4 * desc.bytes_per_token_per_head))
        << format;
  }
}

TEST(BlockAccountingTest, PoolShrinksWithTheFormat) {
  // Expected bytes per token per head at d = 128, computed from the format definitions.
  const std::vector<std::pair<std::string, int>> expected = {
      {"fp16", 2 * 128 * 2},
      {"bf16", 2 * 128 * 2},
      {"fp8", 2 * 128},
      {"int8", 2 * (128 + 2)},
      {"kivi2", 2 * (128 * 2 / 8 + 4 * 128 / 32)},
      {"kivi4", 2 * (128 * 4 / 8 + 4 * 128 / 32)},
      {"tq4", 2 * (128 * 4 / 8 + 2)},
      {"tq3.5", 2 * ((64 * 4 + 64 * 3) / 8 + 2)},
      {"tq3", 2 * (128 * 3 / 8 + 2)},
      {"tq2.5", 2 * ((32 * 3 + 96 * 2) / 8 + 2)},
      {"tq:k=4,v=3,qjl", (128 * 3 / 8 + 2 + 128 / 8 + 2) + (128 * 3 / 8 + 2)},
  };
  int64_t fp16_bytes = 0;
  for (const auto& [format, bytes] : expected) {
    auto cache = CreateCpuKvCache(Config(format, 1, 1, 128, 16, 4));
    ASSERT_TRUE(cache.ok()) << format;
    EXPECT_EQ((*cache)->desc().bytes_per_token_per_head, bytes) << format;
    EXPECT_EQ((*cache)->allocated_bytes(), 4 * 16 * bytes) << format;
    if (format == "fp16") fp16_bytes = (*cache)->allocated_bytes();
    if (format != "fp16" && format != "bf16") {
      EXPECT_LT((*cache)->allocated_bytes(), fp16_bytes) << format;
    }
  }
}

TEST(BlockAccountingTest, ExhaustionAllocatesNothingAndFreeReturnsBlocks) {
  auto cache = CreateCpuKvCache(Config("fp16", 2, 2, 64, 16, 10));
  ASSERT_TRUE(cache.ok());
  KvCache& c = **cache;
  EXPECT_EQ(c.total_blocks(), 10);
  EXPECT_EQ(c.BlocksForTokens(0), 0);
  EXPECT_EQ(c.BlocksForTokens(16), 1);
  EXPECT_EQ(c.BlocksForTokens(17), 2);
  ASSERT_TRUE(c.AddSequence(1, 100).ok());  // 7 blocks
  EXPECT_EQ(c.free_blocks(), 3);
  EXPECT_EQ(c.AddSequence(1, 1).code(), absl::StatusCode::kAlreadyExists);
  EXPECT_EQ(c.AddSequence(2, 49).code(), absl::StatusCode::kResourceExhausted);  // needs 4
  EXPECT_EQ(c.free_blocks(), 3);
  EXPECT_EQ(c.Length(2, 0), -1);
  EXPECT_EQ(c.Reserve(1, 161).code(), absl::StatusCode::kResourceExhausted);  // needs 11
  EXPECT_EQ(c.free_blocks(), 3);
  ASSERT_TRUE(c.Reserve(1, 112).ok());
  EXPECT_EQ(c.free_blocks(), 3);  // 7 blocks already hold 112 tokens
  ASSERT_TRUE(c.Reserve(1, 113).ok());
  EXPECT_EQ(c.free_blocks(), 2);
  ASSERT_TRUE(c.AddSequence(2, 32).ok());
  EXPECT_EQ(c.free_blocks(), 0);
  c.FreeSequence(1);
  EXPECT_EQ(c.free_blocks(), 8);
  c.FreeSequence(1);  // unknown: ignored
  c.FreeSequence(2);
  EXPECT_EQ(c.free_blocks(), 10);
}

TEST(BlockAccountingTest, BadCallsReturnErrorsNotCrashes) {
  auto cache = CreateCpuKvCache(Config("fp16", 1, 2, 64, 16, 4));
  ASSERT_TRUE(cache.ok());
  KvCache& c = **cache;
  std::vector<float> x(64 * 2 * 20, 0.5f), out(64 * 4);
  EXPECT_EQ(c.Append(9, 0, 1, x.data(), x.data()).code(), absl::StatusCode::kNotFound);
  ASSERT_TRUE(c.AddSequence(9, 16).ok());
  EXPECT_EQ(c.Append(9, 1, 1, x.data(), x.data()).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(c.Append(9, 0, 17, x.data(), x.data()).code(),
            absl::StatusCode::kFailedPrecondition);  // not reserved
  EXPECT_EQ(c.Length(9, 0), 0);
  ASSERT_TRUE(c.Append(9, 0, 3, x.data(), x.data()).ok());
  EXPECT_EQ(c.DecodeAttention(9, 0, 3, x.data(), 1.0f, out.data()).code(),
            absl::StatusCode::kInvalidArgument);  // 3 q heads, 2 kv heads
  EXPECT_EQ(c.PrefillAttention(9, 0, 4, 2, x.data(), x.data(), x.data(), 1.0f, out.data()).code(),
            absl::StatusCode::kFailedPrecondition);
  KvCacheConfig bad = c.config();
  bad.head_dim = 72;
  EXPECT_EQ(CreateCpuKvCache(bad).status().code(), absl::StatusCode::kUnimplemented);
  bad.head_dim = 64;
  bad.num_layers = 0;
  EXPECT_EQ(CreateCpuKvCache(bad).status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(BlockAccountingTest, FullPrecisionLayersUseFp16Records) {
  auto cfg = Config("tq:k=3,v=3,r=0", 6, 2, 128, 16, 4);  // no fp16 window: 4 tokens get encoded
  cfg.format.full_precision_first_layers = 1;
  cfg.format.full_precision_last_layers = 2;
  auto cache = CreateCpuKvCache(cfg);
  ASSERT_TRUE(cache.ok());
  const int64_t tq3 = 2 * (128 * 3 / 8 + 2), fp16 = 512;
  EXPECT_EQ((*cache)->bytes_per_token(), 2 * (3 * fp16 + 3 * tq3));
  EXPECT_EQ((*cache)->allocated_bytes(), 4 * 16 * (*cache)->bytes_per_token());
  // A full-precision layer reads back fp16-exact values; a compressed one does not.
  ASSERT_TRUE((*cache)->AddSequence(1, 4).ok());
  const auto k = RandomVector(4 * 2 * 128, 5), v = RandomVector(4 * 2 * 128, 6);
  for (int l = 0; l < 6; ++l) ASSERT_TRUE((*cache)->Append(1, l, 4, k.data(), v.data()).ok());
  std::vector<float> rk(4 * 128), rv(4 * 128);
  std::vector<int64_t> pos(4);
  ASSERT_TRUE((*cache)->ReadStored(1, 5, 1, rk.data(), rv.data(), pos.data()).ok());
  EXPECT_NEAR(rk[130], k[(1 * 2 + 1) * 128 + 2], 1e-3 * std::fabs(k[(1 * 2 + 1) * 128 + 2]));
  ASSERT_TRUE((*cache)->ReadStored(1, 2, 1, rk.data(), rv.data(), pos.data()).ok());
  float err = 0;
  for (int t = 0; t < 4; ++t) {
    for (int e = 0; e < 128; ++e)
      err = std::max(err, std::fabs(rk[t * 128 + e] - k[(t * 2 + 1) * 128 + e]));
  }
  EXPECT_GT(err, 1e-2f);
}

// ---- Every format: decode and prefill through the cache ----------------------------------------

struct FormatBound {
  std::string format;
  float bound;  // max |out - reference on the original K/V| for N(0,1) inputs, d = 128, len 300
};

class FormatAttentionTest : public ::testing::TestWithParam<FormatBound> {};

TEST_P(FormatAttentionTest, DecodeAndPrefillThroughTheFormat) {
  const auto& [format, bound] = GetParam();
  const int d = 128, kv_heads = 2, q_heads = 8, prefix = 250, chunk = 50, total = prefix + chunk;
  auto cache = CreateCpuKvCache(Config(format, 1, kv_heads, d, 16, 32));
  ASSERT_TRUE(cache.ok()) << cache.status();
  const auto k = RandomVector(total * kv_heads * d, 21);
  const auto v = RandomVector(total * kv_heads * d, 22);
  const auto q = RandomVector(total * q_heads * d, 23, 0.5f);
  const float scale = 1.0f / std::sqrt(static_cast<float>(d));
  ASSERT_TRUE((*cache)->AddSequence(3, total).ok());
  ASSERT_TRUE((*cache)->Append(3, 0, prefix, k.data(), v.data()).ok());
  const float* ck = &k[prefix * kv_heads * d];
  const float* cv = &v[prefix * kv_heads * d];
  const float* cq = &q[prefix * q_heads * d];
  // Prefill of a chunk after the cached prefix.
  ASSERT_TRUE((*cache)->Append(3, 0, chunk, ck, cv).ok());
  std::vector<float> out(chunk * q_heads * d);
  ASSERT_TRUE((*cache)->PrefillAttention(3, 0, chunk, q_heads, cq, ck, cv, scale, out.data()).ok());
  // The prefix as the format stores it (read after the append: KIVI may have encoded more of its
  // residual window), then the fresh chunk in full precision.
  std::vector<float> sk, sv;
  ReadAll(**cache, 3, 0, &sk, &sv);
  std::copy(ck, ck + chunk * kv_heads * d, sk.begin() + prefix * kv_heads * d);
  std::copy(cv, cv + chunk * kv_heads * d, sv.begin() + prefix * kv_heads * d);
  float err_exact = 0;
  for (int i = 0; i < chunk; i += 7) {
    const auto ref = ReferenceAttention(cq + i * q_heads * d, q_heads, sk.data(), sv.data(),
                                        kv_heads, d, prefix + i + 1, scale);
    std::vector<float> o(out.begin() + i * q_heads * d, out.begin() + (i + 1) * q_heads * d);
    err_exact = std::max(err_exact, MaxAbsDiff(o, ref));
  }
  EXPECT_LT(err_exact, 5e-5f) << "prefill vs reference on the stored prefix";
  // Decode over all 300 tokens.
  const auto qd = RandomVector(q_heads * d, 24, 0.5f);
  std::vector<float> dout(q_heads * d);
  ASSERT_TRUE((*cache)->DecodeAttention(3, 0, q_heads, qd.data(), scale, dout.data()).ok());
  ReadAll(**cache, 3, 0, &sk, &sv);
  const auto ref_stored =
      ReferenceAttention(qd.data(), q_heads, sk.data(), sv.data(), kv_heads, d, total, scale);
  // QJL scores are an unbiased estimate computed on codes: identical in exact arithmetic to the
  // dequantized reconstruction, float rounding differs a little more.
  EXPECT_LT(MaxAbsDiff(dout, ref_stored), 5e-5f) << "decode vs reference on stored K/V";
  const auto ref =
      ReferenceAttention(qd.data(), q_heads, k.data(), v.data(), kv_heads, d, total, scale);
  const float err = MaxAbsDiff(dout, ref);
  EXPECT_LT(err, bound) << "decode vs reference on the original K/V";
  RecordProperty("decode_max_abs_error", std::to_string(err));
  std::printf("[ format %-16s ] decode max |err| vs float64 on original K/V: %.5f\n",
              format.c_str(), err);
}

// Bounds: outputs are softmax averages of N(0,1) values (|out| ~ 0.1-0.3 with 300 keys). Each
// bound is about 2-3x the error measured at the time of writing, and ordered by format precision.
INSTANTIATE_TEST_SUITE_P(AllFormats, FormatAttentionTest,
                         ::testing::Values(FormatBound{"fp16", 2e-4f}, FormatBound{"bf16", 1.2e-3f},
                                           FormatBound{"fp8", 0.02f}, FormatBound{"int8", 0.005f},
                                           FormatBound{"kivi4", 0.04f}, FormatBound{"kivi2", 0.2f},
                                           FormatBound{"tq4", 0.06f}, FormatBound{"tq3.5", 0.1f},
                                           FormatBound{"tq3", 0.12f}, FormatBound{"tq2.5", 0.2f},
                                           FormatBound{"tq:k=4,v=3,qjl", 0.15f},
                                           FormatBound{"tq:k=4,v=4,r=0", 0.06f},
                                           FormatBound{"tq:k=2.5,v=2.5,r=0", 0.2f}),
                         [](const auto& info) {
                           std::string name = info.param.format;
                           for (char& ch : name) {
                             if (!std::isalnum(static_cast<unsigned char>(ch))) ch = '_';
                           }
                           return name;
                         });

// ---- KIVI residual window -----------------------------------------------------------------------

TEST(KiviTest, ResidualWindowKeepsNewestTokensInFp16) {
  auto cache = CreateCpuKvCache(Config("kivi2", 1, 1, 64, 16, 32));
  ASSERT_TRUE(cache.ok());
  EXPECT_EQ((*cache)->residual_bytes_per_sequence(), (128 + 32) * 64 * 2 * 2);
  ASSERT_TRUE((*cache)->AddSequence(1, 400).ok());
  const auto k = RandomVector(400 * 64, 31), v = RandomVector(400 * 64, 32);
  std::vector<float> rk(400 * 64), rv(400 * 64);
  std::vector<int64_t> pos(400);
  for (int t = 0; t < 400; ++t) {  // token by token, as decode does
    ASSERT_TRUE((*cache)->Append(1, 0, 1, &k[t * 64], &v[t * 64]).ok());
    const int len = t + 1;
    // Encoded: whole groups of 32 leaving 128..159 tokens in the residual.
    const int encoded = len >= 160 ? ((len - 128) / 32) * 32 : 0;
    if (len % 37 == 0 || len == 400 || len == 160 || len == 159) {
      ASSERT_TRUE((*cache)->ReadStored(1, 0, 0, rk.data(), rv.data(), pos.data()).ok());
      for (int i = 0; i < len; ++i) {
        for (int e = 0; e < 64; ++e) {
          const float x = k[i * 64 + e], y = rk[i * 64 + e];
          if (i >= encoded) {
            ASSERT_NEAR(y, x, std::fabs(x) * 1e-3f + 1e-7f) << "residual token " << i;
          }
        }
      }
      if (encoded > 0) {  // an encoded 2-bit key differs from its fp16 value somewhere
        float diff = 0;
        for (int e = 0; e < encoded * 64; ++e) diff = std::max(diff, std::fabs(rk[e] - k[e]));
        EXPECT_GT(diff, 0.05f) << "len " << len;
      }
    }
  }
}

// ---- TurboQuant residual window -----------------------------------------------------------------

TEST(TurboTest, ResidualWindowKeepsNewestTokensInFp16AndFlushesSixteenAtATime) {
  // R = 32 (r=32), flushes of 16: the window holds 32..47 tokens once 48 have arrived.
  auto cache = CreateCpuKvCache(Config("tq:k=3,v=3,r=32", 1, 2, 64, 16, 32));
  ASSERT_TRUE(cache.ok()) << cache.status();
  EXPECT_EQ((*cache)->residual_bytes_per_sequence(), 2 * (32 + 16) * 64 * 2 * 2);
  const int n = 200, kv_heads = 2, d = 64;
  ASSERT_TRUE((*cache)->AddSequence(1, n).ok());
  const auto k = RandomVector(n * kv_heads * d, 51), v = RandomVector(n * kv_heads * d, 52);
  std::vector<float> rk(n * d), rv(n * d);
  std::vector<int64_t> pos(n);
  int appended = 0;
  for (int step : {37, 1, 1, 1, 9, 1, 1, 40, 1, 1, 1, 1, 1, 1, 1, 1, 101}) {  // prefill, decode ...
    ASSERT_TRUE((*cache)
                    ->Append(1, 0, step, &k[appended * kv_heads * d], &v[appended * kv_heads * d])
                    .ok());
    appended += step;
    const int encoded = appended >= 48 ? ((appended - 32) / 16) * 16 : 0;
    for (int h = 0; h < kv_heads; ++h) {
      ASSERT_TRUE((*cache)->ReadStored(1, 0, h, rk.data(), rv.data(), pos.data()).ok());
      float encoded_diff = 0;
      for (int i = 0; i < appended; ++i) {
        for (int e = 0; e < d; ++e) {
          const float x = k[(i * kv_heads + h) * d + e], y = rk[i * d + e];
          if (i >= encoded) {
            ASSERT_NEAR(y, x, std::fabs(x) * 1e-3f + 1e-7f) << "window token " << i;
          } else {
            encoded_diff = std::max(encoded_diff, std::fabs(y - x));
          }
        }
      }
      if (encoded > 0) {
        EXPECT_GT(encoded_diff, 0.05f) << "3-bit codes are not exact";
      }
    }
  }
  // Decode attention over [encoded | window] equals exact attention over what ReadStored returns
  // (window keys and values are mapped into the rotated domain and back without loss).
  const auto q = RandomVector(4 * d, 53, 0.5f);
  std::vector<float> out(4 * d), sk(n * kv_heads * d), sv(n * kv_heads * d);
  ASSERT_TRUE((*cache)->DecodeAttention(1, 0, 4, q.data(), 0.125f, out.data()).ok());
  for (int h = 0; h < kv_heads; ++h) {
    ASSERT_TRUE((*cache)->ReadStored(1, 0, h, rk.data(), rv.data(), pos.data()).ok());
    for (int i = 0; i < n; ++i) {
      std::copy(&rk[i * d], &rk[i * d] + d, &sk[(i * kv_heads + h) * d]);
      std::copy(&rv[i * d], &rv[i * d] + d, &sv[(i * kv_heads + h) * d]);
    }
  }
  const auto ref = ReferenceAttention(q.data(), 4, sk.data(), sv.data(), kv_heads, d, n, 0.125f);
  EXPECT_LT(MaxAbsDiff(out, ref), 5e-5f);
}

// ---- Eviction -----------------------------------------------------------------------------------

std::vector<int64_t> StoredPositions(const KvCache& cache, SeqId seq, int layer, int head) {
  const int64_t n = cache.StoredTokens(seq, layer);
  const int d = cache.config().head_dim;
  std::vector<float> k(n * d), v(n * d);
  std::vector<int64_t> pos(n);
  EXPECT_TRUE(cache.ReadStored(seq, layer, head, k.data(), v.data(), pos.data()).ok());
  return pos;
}

TEST(EvictionTest, SinkKeepsFirstTokensAndWindow) {
  auto cfg = Config("fp16", 1, 1, 64, 4, 8);
  cfg.format.eviction = *ParseEviction("sink:sinks=2,window=5");
  auto cache = CreateCpuKvCache(cfg);
  ASSERT_TRUE(cache.ok());
  KvCache& c = **cache;
  ASSERT_TRUE(c.AddSequence(1, 6).ok());
  const auto k = RandomVector(40 * 64, 41);
  ASSERT_TRUE(c.Append(1, 0, 6, k.data(), k.data()).ok());  // prefill: nothing evicted
  EXPECT_EQ(StoredPositions(c, 1, 0, 0), (std::vector<int64_t>{0, 1, 2, 3, 4, 5}));
  for (int t = 6; t < 20; ++t) {
    ASSERT_TRUE(c.Reserve(1, t + 1).ok());
    ASSERT_TRUE(c.Append(1, 0, 1, &k[t * 64], &k[t * 64]).ok());
  }
  EXPECT_EQ(c.Length(1, 0), 20);
  EXPECT_EQ(StoredPositions(c, 1, 0, 0), (std::vector<int64_t>{0, 1, 15, 16, 17, 18, 19}));
  EXPECT_EQ(c.free_blocks(), 8 - 2);  // 7 slots in blocks of 4
  // Stored records are the right tokens (slot compaction moved them).
  std::vector<float> rk(7 * 64), rv(7 * 64);
  std::vector<int64_t> pos(7);
  ASSERT_TRUE(c.ReadStored(1, 0, 0, rk.data(), rv.data(), pos.data()).ok());
  EXPECT_NEAR(rk[2 * 64 + 3], k[15 * 64 + 3], 1e-2);
  // Decode attends exactly to the kept tokens.
  const auto q = RandomVector(64, 42);
  std::vector<float> out(64), kept_k;
  ASSERT_TRUE(c.DecodeAttention(1, 0, 1, q.data(), 0.125f, out.data()).ok());
  for (int64_t p : pos) kept_k.insert(kept_k.end(), &k[p * 64], &k[p * 64] + 64);
  const auto ref = ReferenceAttention(q.data(), 1, kept_k.data(), kept_k.data(), 1, 64, 7, 0.125f);
  EXPECT_LT(MaxAbsDiff(out, ref), 4e-3f);
}

// RoPE (rotate-half) of x [d] at position p, in place.
void Rope(float* x, const std::vector<double>& inv_freq, int64_t p, int d) {
  for (int j = 0; j < d / 2; ++j) {
    const double a = static_cast<double>(p) * inv_freq[j];
    const float c = static_cast<float>(std::cos(a)), s = static_cast<float>(std::sin(a));
    const float x0 = x[j], x1 = x[j + d / 2];
    x[j] = x0 * c - x1 * s;
    x[j + d / 2] = x1 * c + x0 * s;
  }
}

TEST(EvictionTest, SinkAttendsWithPositionsWithinTheCache) {
  // StreamingLLM: after eviction the kept tokens are numbered by their cache slots, so a query
  // sees the sinks just before the window, not L tokens back. Keys arrive post-RoPE at their
  // original positions; the cache must score the sinks as if they sat at slots 0 .. S-1 and the
  // query at slot stored - 1.
  const int d = 64, total = 30;
  auto cfg = Config("fp16", 1, 1, d, 4, 16);
  cfg.format.eviction = *ParseEviction("sink:sinks=2,window=5");
  for (int j = 0; j < d / 2; ++j) cfg.rope_inv_freq.push_back(std::pow(10000.0, -2.0 * j / d));
  auto cache = CreateCpuKvCache(cfg);
  ASSERT_TRUE(cache.ok());
  KvCache& c = **cache;
  const auto k0 = RandomVector(total * d, 61), v = RandomVector(total * d, 62);
  ASSERT_TRUE(c.AddSequence(1, total).ok());
  for (int t = 0; t < total; ++t) {  // token by token, post-RoPE keys at original positions
    std::vector<float> k(&k0[t * d], &k0[t * d] + d);
    Rope(k.data(), cfg.rope_inv_freq, t, d);
    ASSERT_TRUE(c.Reserve(1, t + 1).ok());
    ASSERT_TRUE(c.Append(1, 0, 1, k.data(), &v[t * d]).ok());
  }
  const std::vector<int64_t> kept = StoredPositions(c, 1, 0, 0);
  ASSERT_EQ(kept, (std::vector<int64_t>{0, 1, 25, 26, 27, 28, 29}));
  // Query at original position 29 (its token is the last stored); in the cache it is slot 6.
  std::vector<float> q0 = RandomVector(d, 63), q = q0;
  Rope(q.data(), cfg.rope_inv_freq, total - 1, d);
  std::vector<float> out(d);
  ASSERT_TRUE(c.DecodeAttention(1, 0, 1, q.data(), 0.125f, out.data()).ok());
  // Reference: every kept key rotated to its slot, the query to slot 6.
  std::vector<float> ks, vs, qs = q0;
  Rope(qs.data(), cfg.rope_inv_freq, static_cast<int64_t>(kept.size()) - 1, d);
  for (size_t slot = 0; slot < kept.size(); ++slot) {
    std::vector<float> k(&k0[kept[slot] * d], &k0[kept[slot] * d] + d);
    Rope(k.data(), cfg.rope_inv_freq, static_cast<int64_t>(slot), d);
    ks.insert(ks.end(), k.begin(), k.end());
    vs.insert(vs.end(), &v[kept[slot] * d], &v[kept[slot] * d] + d);
  }
  const auto ref = ReferenceAttention(qs.data(), 1, ks.data(), vs.data(), 1, d, 7, 0.125f);
  EXPECT_LT(MaxAbsDiff(out, ref), 4e-3f);
  // And it differs from attention at the original positions (the sinks 28-29 tokens back).
  std::vector<float> ko;
  for (int64_t p : kept) {
    std::vector<float> k(&k0[p * d], &k0[p * d] + d);
    Rope(k.data(), cfg.rope_inv_freq, p, d);
    ko.insert(ko.end(), k.begin(), k.end());
  }
  const auto orig = ReferenceAttention(q.data(), 1, ko.data(), vs.data(), 1, d, 7, 0.125f);
  EXPECT_GT(MaxAbsDiff(orig, ref), 1e-2f) << "the test must distinguish the two numberings";
}

TEST(EvictionTest, LayersNotYetEvictedKeepTheirBlocks) {
  // Blocks are shared by the layers: after layer 0's append evicted (and trimmed), layer 1 still
  // holds all 12 prompt tokens until its own append. Its blocks must not go back to the pool,
  // where another sequence would overwrite them.
  const int d = 64;
  auto cfg = Config("fp16", 2, 1, d, 4, 6);
  cfg.format.eviction = *ParseEviction("sink:sinks=2,window=5");
  auto cache = CreateCpuKvCache(cfg);
  ASSERT_TRUE(cache.ok());
  KvCache& c = **cache;
  const auto k = RandomVector(13 * d, 71);
  ASSERT_TRUE(c.AddSequence(1, 12).ok());
  for (int l = 0; l < 2; ++l) ASSERT_TRUE(c.Append(1, l, 12, k.data(), k.data()).ok());
  ASSERT_TRUE(c.Reserve(1, 13).ok());
  ASSERT_TRUE(c.Append(1, 0, 1, &k[12 * d], &k[12 * d]).ok());  // layer 0 keeps 2 + 4 + 1
  EXPECT_EQ(c.StoredTokens(1, 1), 12);
  // Another sequence takes every free block and fills it.
  const int64_t free_tokens = c.free_blocks() * 4;
  ASSERT_GT(free_tokens, 0);
  ASSERT_TRUE(c.AddSequence(2, free_tokens).ok());
  const std::vector<float> other(free_tokens * d, 7.0f);
  for (int l = 0; l < 2; ++l) {
    ASSERT_TRUE(c.Append(2, l, free_tokens, other.data(), other.data()).ok());
  }
  std::vector<float> rk(12 * d), rv(12 * d);
  std::vector<int64_t> pos(12);
  ASSERT_TRUE(c.ReadStored(1, 1, 0, rk.data(), rv.data(), pos.data()).ok());
  for (int i = 0; i < 12 * d; ++i) ASSERT_NEAR(rk[i], k[i], 1e-2f) << "layer 1 slot " << i / d;
}

TEST(EvictionTest, H2OKeepsHeavyHittersPerHeadAndRecentTokens) {
  // Two kv-heads, two query heads each. Keys are orthogonal one-hot directions scaled so that a
  // query aligned with a key gives it (almost) all the probability: we steer which tokens become
  // heavy hitters, differently per kv-head.
  const int d = 64, kv_heads = 2, q_heads = 4;
  auto cfg = Config("fp16", 1, kv_heads, d, 4, 16);
  cfg.format.eviction = *ParseEviction("h2o:heavy=0.2,recent=0.2");
  auto cache = CreateCpuKvCache(cfg);
  ASSERT_TRUE(cache.ok());
  KvCache& c = **cache;
  const int prompt = 10;
  std::vector<float> k(prompt * kv_heads * d, 0.0f), v(prompt * kv_heads * d, 0.0f);
  for (int t = 0; t < prompt; ++t) {
    for (int h = 0; h < kv_heads; ++h) k[(t * kv_heads + h) * d + t] = 1.0f;
  }
  ASSERT_TRUE(c.AddSequence(1, prompt).ok());
  ASSERT_TRUE(c.Append(1, 0, prompt, k.data(), v.data()).ok());
  // Decode-style attention steps with queries pointing at token 3 (head 0) and 6 (head 1),
  // repeated so their mass dominates.
  std::vector<float> q(q_heads * d, 0.0f), out(q_heads * d);
  for (int j = 0; j < 2; ++j) {
    q[(0 * 2 + j) * d + 3] = 20.0f;
    q[(1 * 2 + j) * d + 6] = 20.0f;
  }
  for (int step = 0; step < 3; ++step) {
    ASSERT_TRUE(c.DecodeAttention(1, 0, q_heads, q.data(), 1.0f, out.data()).ok());
  }
  // Token 7 gets the second-largest mass for head 0, token 1 for head 1 (weaker steering).
  std::fill(q.begin(), q.end(), 0.0f);
  for (int j = 0; j < 2; ++j) {
    q[(0 * 2 + j) * d + 7] = 10.0f;
    q[(1 * 2 + j) * d + 1] = 10.0f;
  }
  ASSERT_TRUE(c.DecodeAttention(1, 0, q_heads, q.data(), 1.0f, out.data()).ok());
  // Append token 10: L' = 11, heavy = floor(2.2) = 2, recent = 2 (tokens 9, 10).
  std::vector<float> k1(kv_heads * d, 0.0f);
  ASSERT_TRUE(c.Reserve(1, 11).ok());
  ASSERT_TRUE(c.Append(1, 0, 1, k1.data(), k1.data()).ok());
  EXPECT_EQ(StoredPositions(c, 1, 0, 0), (std::vector<int64_t>{3, 7, 9, 10}));
  EXPECT_EQ(StoredPositions(c, 1, 0, 1), (std::vector<int64_t>{1, 6, 9, 10}));
  EXPECT_EQ(c.StoredTokens(1, 0), 4);
  EXPECT_EQ(c.free_blocks(), 16 - 1);  // 4 slots: one block
}

// ---- Eviction with key groups and fp16 windows (KIVI, TurboQuant) ------------------------------

// A format under test: group / residual override the parser's KIVI G and R (0: keep), so that
// short runs go through many flushes and evictions.
struct WindowEvictCase {
  std::string format;
  int group = 0;
  int residual = 0;
  std::string eviction;
  std::vector<int> steps;  // Append sizes in order: > 1 prefill (PrefillAttention), 1 decode
};

void PrintTo(const WindowEvictCase& c, std::ostream* os) {
  *os << c.format << " G=" << c.group << " R=" << c.residual << " " << c.eviction << ", "
      << c.steps.size() << " appends";
}

std::vector<int> Steps(std::initializer_list<std::pair<int, int>> runs) {  // {size, repeat}
  std::vector<int> steps;
  for (const auto& [size, repeat] : runs) steps.insert(steps.end(), repeat, size);
  return steps;
}

// Rows of `x` [num_keys, kv_heads, d] for kv-head h, as [num_keys, 1, d].
std::vector<float> HeadRows(const std::vector<float>& x, int kv_heads, int h, int d) {
  const size_t n = x.size() / (static_cast<size_t>(kv_heads) * d);
  std::vector<float> out(n * d);
  for (size_t t = 0; t < n; ++t) {
    std::copy(&x[(t * kv_heads + h) * d], &x[(t * kv_heads + h) * d] + d, &out[t * d]);
  }
  return out;
}

// Float64 softmax attention of one query q [d] over keys, values [num_keys, d]; keys with index
// < sink_slots are scored against sink_q instead (StreamingLLM's positions within the cache).
// Adds each key's probability to mass[num_keys] when mass is not null.
std::vector<double> Attend(const float* q, const float* sink_q, int64_t sink_slots,
                           const float* keys, const float* values, int64_t num_keys, int d,
                           float scale, double* mass) {
  std::vector<double> s(num_keys);
  double mx = -1e300;
  for (int64_t t = 0; t < num_keys; ++t) {
    const float* query = t < sink_slots ? sink_q : q;
    double dot = 0;
    for (int e = 0; e < d; ++e) dot += static_cast<double>(query[e]) * keys[t * d + e];
    s[t] = dot * scale;
    mx = std::max(mx, s[t]);
  }
  double sum = 0;
  for (double& x : s) sum += (x = std::exp(x - mx));
  std::vector<double> out(d, 0.0);
  for (int64_t t = 0; t < num_keys; ++t) {
    if (mass != nullptr) mass[t] += s[t] / sum;
    for (int e = 0; e < d; ++e) out[e] += s[t] / sum * values[t * d + e];
  }
  return out;
}

// H2O's documented rule (kv_cache.h), independently: appending n tokens to reach length L keeps
// the old tokens among the newest floor(recent * L) positions plus the floor(heavy * L) others
// with the largest mass, ties to the older token.
std::vector<int64_t> ExpectedH2O(const EvictionSpec& e, const std::vector<int64_t>& pos,
                                 const std::vector<float>& mass, int64_t new_length) {
  int64_t heavy = static_cast<int64_t>(std::floor(e.heavy_fraction * new_length + 1e-9));
  int64_t recent = static_cast<int64_t>(std::floor(e.recent_fraction * new_length + 1e-9));
  if (heavy + recent == 0) recent = 1;
  std::vector<size_t> others;
  std::vector<char> keep(pos.size(), 0);
  for (size_t i = 0; i < pos.size(); ++i) {
    keep[i] = pos[i] >= new_length - recent;
    if (!keep[i]) others.push_back(i);
  }
  std::stable_sort(others.begin(), others.end(),
                   [&](size_t a, size_t b) { return mass[a] > mass[b]; });
  for (size_t i = 0; i < others.size() && static_cast<int64_t>(i) < heavy; ++i) {
    keep[others[i]] = 1;
  }
  std::vector<int64_t> kept;
  for (size_t i = 0; i < pos.size(); ++i) {
    if (keep[i]) kept.push_back(pos[i]);
  }
  return kept;
}

std::string FirstDifference(const std::vector<int64_t>& got, const std::vector<int64_t>& want) {
  size_t i = 0;
  while (i < got.size() && i < want.size() && got[i] == want[i]) ++i;
  return "sizes " + std::to_string(got.size()) + " / " + std::to_string(want.size()) +
         ", first difference at slot " + std::to_string(i) + ": " +
         (i < got.size() ? std::to_string(got[i]) : "-") + " / " +
         (i < want.size() ? std::to_string(want[i]) : "-");
}

bool CloseToFp16(const float* got, const float* original, int d) {
  for (int e = 0; e < d; ++e) {
    if (std::fabs(got[e] - original[e]) > std::fabs(original[e]) * 1e-3f + 1e-7f) return false;
  }
  return true;
}

class WindowEvictionTest : public ::testing::TestWithParam<WindowEvictCase> {};

// One sequence through prefill chunks and decode steps with eviction, checking after every call:
//   - the kept positions per kv-head: sinks + window as an fp16 cache with the same eviction keeps
//     them; H2O exactly the rule above applied to the cache's masses before the append;
//   - the masses equal float64 attention probabilities summed over the calls;
//   - decode / prefill output against float64 attention on the kept reconstructions (ReadStored),
//     fresh prefill tokens in full precision, sink slots scored at positions within the cache;
//   - blocks: the pool holds exactly the kept slots; bytes per token as without eviction;
//   - no token is re-quantized again and again: a key takes at most three values over its life
//     (fp16 window, its group's grid, its solo encoding; TurboQuant: two), a value two, and a
//     KIVI solo key lies within half a solo quantization step of its group reconstruction.
TEST_P(WindowEvictionTest, KeepsTheSelectionAttendsToItAndFreesBlocks) {
  const WindowEvictCase& tc = GetParam();
  const int d = 64, kv_heads = 2, q_heads = 4, block = 16;
  int64_t total = 0;
  for (int n : tc.steps) total += n;
  auto cfg = Config(tc.format, 1, kv_heads, d, block, (total + block - 1) / block + 1);
  if (tc.group > 0) cfg.format.group_size = tc.group;
  if (tc.residual > 0) cfg.format.residual_tokens = tc.residual;
  auto plain = CreateCpuKvCache(cfg);
  ASSERT_TRUE(plain.ok()) << plain.status();
  cfg.format.eviction = *ParseEviction(tc.eviction);
  const EvictionSpec& ev = cfg.format.eviction;
  const bool h2o = ev.kind == EvictionSpec::Kind::kH2O;
  if (!h2o) {
    for (int j = 0; j < d / 2; ++j) cfg.rope_inv_freq.push_back(std::pow(10000.0, -2.0 * j / d));
  }
  auto created = CreateCpuKvCache(cfg);
  ASSERT_TRUE(created.ok()) << created.status();
  KvCache& c = **created;
  EXPECT_EQ(c.bytes_per_token(), (*plain)->bytes_per_token());
  EXPECT_EQ(c.allocated_bytes(), (*plain)->allocated_bytes());
  // The fp16 twin with the same sink eviction: the positions every per-token format keeps.
  auto twin_cfg = Config("fp16", 1, kv_heads, d, block, cfg.num_blocks);
  twin_cfg.format.eviction = ev;
  auto twin = CreateCpuKvCache(twin_cfg);
  ASSERT_TRUE(twin.ok());
  const bool kivi = cfg.format.kind == KvFormatKind::kKivi;
  const int levels = (1 << static_cast<int>(cfg.format.key_bits)) - 1;
  const int group_channels = cfg.format.group_size;

  const auto k = RandomVector(total * kv_heads * d, 81), v = RandomVector(total * kv_heads * d, 82);
  const auto q = RandomVector(total * q_heads * d, 83, 0.7f);
  const float scale = 0.125f;
  ASSERT_TRUE(c.AddSequence(1, 0).ok());
  ASSERT_TRUE((*twin)->AddSequence(1, 0).ok());
  // Per kv-head: reconstructions seen per position, float64 masses per position.
  std::vector<std::map<int64_t, std::vector<std::vector<float>>>> key_history(kv_heads),
      value_history(kv_heads);
  std::vector<std::map<int64_t, double>> ref_mass(kv_heads);
  int solo_checks = 0, quantized_checks = 0;
  int64_t length = 0, evicted_total = 0;
  for (size_t step = 0; step < tc.steps.size(); ++step) {
    const int n = tc.steps[step];
    SCOPED_TRACE(::testing::Message() << "step " << step << " length " << length << " n " << n);
    std::vector<std::vector<int64_t>> expected(kv_heads);
    for (int h = 0; h < kv_heads && h2o; ++h) {
      const std::vector<int64_t> pos = StoredPositions(c, 1, 0, h);
      std::vector<float> mass(pos.size());
      ASSERT_TRUE(c.ReadAttentionMass(1, 0, h, mass.data()).ok());
      expected[h] = ExpectedH2O(ev, pos, mass, length + n);
    }
    ASSERT_TRUE(c.Reserve(1, length + n).ok());
    if (!h2o) {
      ASSERT_TRUE((*twin)->Reserve(1, length + n).ok());
    }
    const float* sk = &k[length * kv_heads * d];
    const float* sv = &v[length * kv_heads * d];
    const int64_t before = c.StoredTokens(1, 0);
    ASSERT_TRUE(c.Append(1, 0, n, sk, sv).ok());
    if (!h2o) {
      ASSERT_TRUE((*twin)->Append(1, 0, n, sk, sv).ok());
    }
    length += n;
    const int64_t stored = c.StoredTokens(1, 0);
    evicted_total += before + n - stored;
    // Kept positions, then the n new ones.
    for (int h = 0; h < kv_heads; ++h) {
      const std::vector<int64_t> pos = StoredPositions(c, 1, 0, h);
      ASSERT_EQ(static_cast<int64_t>(pos.size()), stored);
      if (h2o) {
        std::vector<int64_t> want = expected[h];
        for (int i = 0; i < n; ++i) want.push_back(length - n + i);
        ASSERT_EQ(pos, want) << "head " << h << ": " << FirstDifference(pos, want);
      } else {
        const std::vector<int64_t> twin_pos = StoredPositions(**twin, 1, 0, h);
        ASSERT_EQ(pos, twin_pos) << "head " << h << ": " << FirstDifference(pos, twin_pos);
      }
    }
    ASSERT_EQ(c.free_blocks(), c.total_blocks() - c.BlocksForTokens(stored));
    // Reconstructions: what attention reads, and their history.
    std::vector<float> rk, rv;
    ReadAll(c, 1, 0, &rk, &rv);
    std::vector<std::vector<int64_t>> positions;
    for (int h = 0; h < kv_heads; ++h) positions.push_back(StoredPositions(c, 1, 0, h));
    for (int h = 0; h < kv_heads; ++h) {
      for (int64_t slot = 0; slot < stored; ++slot) {
        const int64_t p = positions[h][slot];
        const float* key = &rk[(slot * kv_heads + h) * d];
        const float* value = &rv[(slot * kv_heads + h) * d];
        auto& kh = key_history[h][p];
        if (kh.empty() || !std::equal(key, key + d, kh.back().begin())) {
          const bool from_quantized =
              !kh.empty() && !CloseToFp16(kh.back().data(), &k[(p * kv_heads + h) * d], d);
          if (from_quantized) {  // a second quantization: KIVI's solo key, once
            ASSERT_TRUE(kivi) << "position " << p << " re-quantized";
            const std::vector<float>& grouped = kh.back();
            for (int g = 0; g < d / group_channels; ++g) {
              const auto [lo, hi] = std::minmax_element(&grouped[g * group_channels],
                                                        &grouped[(g + 1) * group_channels]);
              const float step_size =
                  (*hi - *lo + 2e-3f * std::max(std::fabs(*lo), std::fabs(*hi))) / levels;
              for (int e = g * group_channels; e < (g + 1) * group_channels; ++e) {
                ASSERT_LE(std::fabs(key[e] - grouped[e]), 0.5f * step_size * 1.002f + 1e-6f)
                    << "solo key of position " << p << " channel " << e;
              }
            }
            ++solo_checks;
          } else if (!kh.empty()) {
            ++quantized_checks;
          }
          kh.emplace_back(key, key + d);
          ASSERT_LE(kh.size(), kivi ? 3u : 2u) << "key of position " << p;
        }
        auto& vh = value_history[h][p];
        if (vh.empty() || !std::equal(value, value + d, vh.back().begin())) {
          vh.emplace_back(value, value + d);
          ASSERT_LE(vh.size(), 2u) << "value of position " << p;
        }
      }
    }
    // Attention through the cache against float64 on the reconstructions.
    const int64_t delta = h2o ? 0 : length - stored;
    const int64_t sink_slots = delta > 0 ? std::min<int64_t>(ev.sink_tokens, stored) : 0;
    const float* sq = &q[(length - n) * q_heads * d];
    std::vector<float> out(static_cast<size_t>(n) * q_heads * d);
    if (n == 1) {
      ASSERT_TRUE(c.DecodeAttention(1, 0, q_heads, sq, scale, out.data()).ok());
    } else {
      ASSERT_TRUE(c.PrefillAttention(1, 0, n, q_heads, sq, sk, sv, scale, out.data()).ok());
      // The fresh tokens are attended in full precision.
      for (int64_t t = 0; t < n; ++t) {
        for (int h = 0; h < kv_heads; ++h) {
          const size_t dst = ((stored - n + t) * kv_heads + h) * d;
          std::copy(&sk[(t * kv_heads + h) * d], &sk[(t * kv_heads + h) * d] + d, &rk[dst]);
          std::copy(&sv[(t * kv_heads + h) * d], &sv[(t * kv_heads + h) * d] + d, &rv[dst]);
        }
      }
    }
    float err = 0;
    std::vector<std::vector<double>> mass_add(kv_heads, std::vector<double>(stored, 0.0));
    for (int h = 0; h < kv_heads; ++h) {
      const std::vector<float> hk = HeadRows(rk, kv_heads, h, d), hv = HeadRows(rv, kv_heads, h, d);
      for (int i = 0; i < n; ++i) {
        const int64_t visible = stored - n + i + 1;  // causal
        for (int j = 0; j < q_heads / kv_heads; ++j) {
          const int qh = h * (q_heads / kv_heads) + j;
          const float* query = sq + (static_cast<size_t>(i) * q_heads + qh) * d;
          std::vector<float> shifted(query, query + d);
          if (sink_slots > 0) Rope(shifted.data(), cfg.rope_inv_freq, -delta, d);
          // Decode shifts every sink slot; prefill the cached ones (the fresh are unshifted).
          const int64_t shifted_slots = n == 1 ? sink_slots : std::min(sink_slots, stored - n);
          const auto ref = Attend(query, shifted.data(), shifted_slots, hk.data(), hv.data(),
                                  visible, d, scale, mass_add[h].data());
          const float* o = &out[(static_cast<size_t>(i) * q_heads + qh) * d];
          for (int e = 0; e < d; ++e) {
            err = std::max(err, static_cast<float>(std::fabs(o[e] - ref[e])));
          }
        }
      }
    }
    ASSERT_LT(err, 5e-5f) << "attention vs float64 on the kept reconstructions";
    if (h2o) {
      for (int h = 0; h < kv_heads; ++h) {
        std::vector<float> mass(stored);
        ASSERT_TRUE(c.ReadAttentionMass(1, 0, h, mass.data()).ok());
        for (int64_t slot = 0; slot < stored; ++slot) {
          double& m = ref_mass[h][positions[h][slot]];
          m += mass_add[h][slot];
          ASSERT_NEAR(mass[slot], m, 1e-4 * std::max(1.0, m))
              << "mass of position " << positions[h][slot];
        }
      }
    }
  }
  // The run went through evictions, flushes and (KIVI) solo keys, and reclaimed memory.
  EXPECT_GT(evicted_total, total / 3);
  EXPECT_GT(quantized_checks, 100) << "tokens must reach the quantized region";
  if (kivi) {
    EXPECT_GT(solo_checks, 10) << "groups must lose members";
  }
  EXPECT_LT(c.StoredTokens(1, 0), length);
  EXPECT_GT(c.free_blocks(), c.total_blocks() - c.BlocksForTokens(length));
}

// The step plans of WindowEvictionTest: chunks and single decode steps that flush small windows
// many times, and long runs past the default windows.
std::vector<int> ManyFlushes() {
  return Steps({{37, 1}, {1, 90}, {29, 1}, {1, 120}, {70, 1}, {1, 150}});
}
std::vector<int> LongRuns() { return Steps({{300, 1}, {1, 150}, {100, 1}, {1, 250}}); }

INSTANTIATE_TEST_SUITE_P(
    Formats, WindowEvictionTest,
    ::testing::Values(
        // Small G and R: many flushes per run.
        WindowEvictCase{"kivi4", 8, 16, "h2o:heavy=0.2,recent=0.15", ManyFlushes()},
        WindowEvictCase{"kivi2", 8, 16, "sink:sinks=3,window=40", ManyFlushes()},
        WindowEvictCase{"kivi4", 8, 8, "sink:sinks=5,window=30",
                        Steps({{12, 1}, {1, 40}, {45, 1}, {1, 200}})},
        WindowEvictCase{"tq:k=4,v=4,r=16", 0, 0, "h2o:heavy=0.2,recent=0.15", ManyFlushes()},
        WindowEvictCase{"tq:k=4,v=3,qjl,r=16", 0, 0, "sink:sinks=3,window=40", ManyFlushes()},
        // The formats' defaults (KIVI G = 32, R = 128; TurboQuant R = 128, flushes of 16).
        WindowEvictCase{"kivi2", 0, 0, "h2o:heavy=0.3,recent=0.3", LongRuns()},
        WindowEvictCase{"kivi4", 0, 0, "sink:sinks=4,window=256", LongRuns()},
        WindowEvictCase{"tq4", 0, 0, "h2o:heavy=0.3,recent=0.3", LongRuns()},
        WindowEvictCase{"tq4", 0, 0, "sink:sinks=4,window=256", LongRuns()}),
    [](const auto& info) {
      std::string name = info.param.format + "_" + info.param.eviction;
      if (info.param.group > 0) name += "_G" + std::to_string(info.param.group);
      if (info.param.residual > 0) name += "_R" + std::to_string(info.param.residual);
      for (char& ch : name) {
        if (!std::isalnum(static_cast<unsigned char>(ch))) ch = '_';
      }
      return name;
    });

TEST(WindowEvictionScenarioTest, SinksInsideAKeyGroupAreScoredAtCachePositions) {
  // KIVI G = 8, R = 8, sinks 3 + window 6. Prefill 5 tokens, then 20: the second append first
  // evicts positions 3, 4 (keeping the sinks in the window), then its rows flush the group
  // {0, 1, 2, 5, .., 9}: a key group holding the three sinks and five later tokens, with 2 tokens
  // evicted, so decode scores the group's first three slots with the query shifted back by 2 and
  // the other five unshifted.
  const int d = 64;
  auto cfg = Config("kivi4", 1, 1, d, 8, 8);
  cfg.format.group_size = 8;
  cfg.format.residual_tokens = 8;
  cfg.format.eviction = *ParseEviction("sink:sinks=3,window=6");
  for (int j = 0; j < d / 2; ++j) cfg.rope_inv_freq.push_back(std::pow(10000.0, -2.0 * j / d));
  auto cache = CreateCpuKvCache(cfg);
  ASSERT_TRUE(cache.ok()) << cache.status();
  KvCache& c = **cache;
  const auto k = RandomVector(25 * d, 91), v = RandomVector(25 * d, 92);
  ASSERT_TRUE(c.AddSequence(1, 25).ok());
  ASSERT_TRUE(c.Append(1, 0, 5, k.data(), v.data()).ok());
  ASSERT_TRUE(c.Append(1, 0, 20, &k[5 * d], &v[5 * d]).ok());
  std::vector<int64_t> want = {0, 1, 2};
  for (int64_t p = 5; p < 25; ++p) want.push_back(p);
  ASSERT_EQ(StoredPositions(c, 1, 0, 0), want);
  float mass[23];
  EXPECT_EQ(c.ReadAttentionMass(1, 0, 0, mass).code(), absl::StatusCode::kFailedPrecondition)
      << "masses are kept for H2O only";
  std::vector<float> rk(23 * d), rv(23 * d);
  std::vector<int64_t> pos(23);
  ASSERT_TRUE(c.ReadStored(1, 0, 0, rk.data(), rv.data(), pos.data()).ok());
  for (int slot = 0; slot < 8; ++slot) {  // encoded (4-bit), not the fp16 rows
    EXPECT_FALSE(CloseToFp16(&rk[slot * d], &k[pos[slot] * d], d)) << "slot " << slot;
  }
  const auto q = RandomVector(2 * d, 93);
  std::vector<float> out(2 * d), shifted(q);
  for (int j = 0; j < 2; ++j) Rope(&shifted[j * d], cfg.rope_inv_freq, -2, d);
  ASSERT_TRUE(c.DecodeAttention(1, 0, 2, q.data(), 0.125f, out.data()).ok());
  for (int j = 0; j < 2; ++j) {
    const auto ref =
        Attend(&q[j * d], &shifted[j * d], 3, rk.data(), rv.data(), 23, d, 0.125f, nullptr);
    const auto unshifted =
        Attend(&q[j * d], &q[j * d], 0, rk.data(), rv.data(), 23, d, 0.125f, nullptr);
    float err = 0, diff = 0;
    for (int e = 0; e < d; ++e) {
      err = std::max(err, static_cast<float>(std::fabs(out[j * d + e] - ref[e])));
      diff = std::max(diff, static_cast<float>(std::fabs(unshifted[e] - ref[e])));
    }
    EXPECT_LT(err, 5e-5f);
    EXPECT_GT(diff, 1e-3f) << "the test must distinguish shifted sink scores";
  }
}

TEST(WindowEvictionScenarioTest, PrefillAfterEvictionAndSeveralSequences) {
  // Two sequences share the pool; one evicts (KIVI-2, H2O), the other does not grow: after a
  // long decode the evicting one holds only its kept slots and returns everything on free.
  const int d = 64, kv_heads = 2;
  auto cfg = Config("kivi2", 2, kv_heads, d, 16, 64);
  cfg.format.eviction = *ParseEviction("h2o:heavy=0.1,recent=0.1");
  auto cache = CreateCpuKvCache(cfg);
  ASSERT_TRUE(cache.ok()) << cache.status();
  KvCache& c = **cache;
  const int total = 700;
  const auto k = RandomVector(total * kv_heads * d, 101),
             v = RandomVector(total * kv_heads * d, 102);
  const auto q = RandomVector(total * 4 * d, 103, 0.7f);
  ASSERT_TRUE(c.AddSequence(2, 200).ok());
  for (int l = 0; l < 2; ++l) ASSERT_TRUE(c.Append(2, l, 200, k.data(), v.data()).ok());
  const int64_t free_after_other = c.free_blocks();
  ASSERT_TRUE(c.AddSequence(1, 400).ok());
  std::vector<float> out(400 * 4 * d);
  int64_t length = 0;
  for (int n : {400, 1, 1, 1, 150, 1, 1, 120, 1, 1, 1, 1, 1}) {  // prefill chunks after evictions
    ASSERT_TRUE(c.Reserve(1, length + n).ok());
    for (int l = 0; l < 2; ++l) {
      ASSERT_TRUE(c.Append(1, l, n, &k[length * kv_heads * d], &v[length * kv_heads * d]).ok());
      ASSERT_TRUE(c.PrefillAttention(1, l, n, 4, &q[length * 4 * d], &k[length * kv_heads * d],
                                     &v[length * kv_heads * d], 0.125f, out.data())
                      .ok());
      for (size_t i = 0; i < static_cast<size_t>(n) * 4 * d; ++i) {
        ASSERT_TRUE(std::isfinite(out[i]));
      }
    }
    length += n;
  }
  ASSERT_EQ(c.Length(1, 0), length);
  // H2O at L = 680: the 67 old tokens among the newest 68 positions, the 67 heavy hitters kept at
  // L = 679 (68 allowed now, but no other token is left), and the new token.
  EXPECT_EQ(c.StoredTokens(1, 0), 67 + 67 + 1);
  EXPECT_EQ(c.StoredTokens(1, 1), 67 + 67 + 1);
  EXPECT_EQ(c.free_blocks(), free_after_other - c.BlocksForTokens(67 + 67 + 1));
  c.FreeSequence(1);
  EXPECT_EQ(c.free_blocks(), free_after_other);
  // The other sequence's blocks were not written: its encoded keys are within KIVI-2's step of
  // the originals (another token's N(0, 1) data would not be), its window is its fp16 rows.
  std::vector<float> rk(200 * d), rv(200 * d);
  std::vector<int64_t> pos(200);
  ASSERT_TRUE(c.ReadStored(2, 1, 1, rk.data(), rv.data(), pos.data()).ok());
  EXPECT_EQ(pos[199], 199);
  for (int t = 0; t < 64; ++t) {
    for (int e = 0; e < d; ++e) {
      ASSERT_NEAR(rk[t * d + e], k[(t * kv_heads + 1) * d + e], 1.0f) << "token " << t;
    }
  }
  EXPECT_TRUE(CloseToFp16(&rk[199 * d], &k[(199 * kv_heads + 1) * d], d));
}

}  // namespace
}  // namespace kvgate::kernels
