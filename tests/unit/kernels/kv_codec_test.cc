// Codec-level checks against independent references: number format conversions, bit packing,
// TurboQuant distortion vs the paper's figures, QJL unbiasedness, and the analytic error bounds of
// FP8 / INT8 / KIVI (and of KIVI's solo keys under eviction).
#include "kernels/cpu/kv_codec.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <random>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "kernels/cpu/numeric.h"
#include "kvgate/kernels/kv_format.h"
#include "kvgate/kernels/kv_record_layout.h"
#include "tests/unit/kernels/reference_attention.h"

namespace kvgate::kernels::cpu {
namespace {

using kvgate::kernels::testing::RandomVector;

std::vector<float> RandomUnitVectors(int n, int d, uint32_t seed) {
  auto x = RandomVector(static_cast<size_t>(n) * d, seed);
  for (int i = 0; i < n; ++i) {
    double norm = 0;
    for (int e = 0; e < d; ++e) norm += x[i * d + e] * x[i * d + e];
    for (int e = 0; e < d; ++e) x[i * d + e] /= std::sqrt(norm);
  }
  return x;
}

// ---- Number formats -----------------------------------------------------------------------------

TEST(NumericTest, HalfConversionMatchesCompilerFloat16) {
  for (uint32_t h = 0; h < 65536; ++h) {
    const _Float16 ref = std::bit_cast<_Float16>(static_cast<uint16_t>(h));
    const float x = HalfToFloat(static_cast<uint16_t>(h));
    if (std::isnan(static_cast<float>(ref))) {
      EXPECT_TRUE(std::isnan(x));
      continue;
    }
    ASSERT_EQ(x, static_cast<float>(ref)) << h;
    ASSERT_EQ(FloatToHalf(x), h) << h;
  }
  std::mt19937 rng(1);
  std::uniform_int_distribution<uint32_t> bits;
  for (int i = 0; i < 200000; ++i) {  // random floats, incl. ties, subnormals, overflow
    const float x = BitsFloat(bits(rng));
    if (std::isnan(x)) continue;
    const _Float16 ref = static_cast<_Float16>(x);  // round to nearest even
    ASSERT_EQ(FloatToHalf(x), std::bit_cast<uint16_t>(ref)) << x;
  }
}

TEST(NumericTest, Bf16RoundsToNearestEven) {
  EXPECT_EQ(FloatToBf16(1.0f), 0x3F80);
  EXPECT_EQ(FloatToBf16(BitsFloat(0x3F808000u)), 0x3F80);  // tie -> even
  EXPECT_EQ(FloatToBf16(BitsFloat(0x3F818000u)), 0x3F82);  // tie -> even (up)
  EXPECT_EQ(FloatToBf16(BitsFloat(0x3F808001u)), 0x3F81);
  EXPECT_TRUE(std::isnan(Bf16ToFloat(FloatToBf16(NAN))));
}

TEST(NumericTest, E4M3IsNearestOcpCode) {
  EXPECT_EQ(E4M3ToFloat(0x7E), 448.0f);
  EXPECT_EQ(E4M3ToFloat(0x08), 0x1.0p-6f);
  EXPECT_EQ(E4M3ToFloat(0x01), 0x1.0p-9f);
  EXPECT_EQ(E4M3ToFloat(0xFE), -448.0f);
  EXPECT_TRUE(std::isnan(E4M3ToFloat(0x7F)));
  EXPECT_EQ(FloatToE4M3(1e9f), 0x7E);  // saturates
  EXPECT_EQ(FloatToE4M3(-1e9f), 0xFE);
  std::mt19937 rng(2);
  std::uniform_real_distribution<float> exponent(-12.0f, 9.5f);
  for (int i = 0; i < 20000; ++i) {
    const float x = std::exp2(exponent(rng)) * (i % 2 ? -1.0f : 1.0f);
    const float got = E4M3ToFloat(FloatToE4M3(x));
    float best = INFINITY;
    for (int c = 0; c < 256; ++c) {
      const float y = E4M3ToFloat(static_cast<uint8_t>(c));
      if (!std::isnan(y)) best = std::min(best, std::fabs(y - std::clamp(x, -448.0f, 448.0f)));
    }
    ASSERT_EQ(std::fabs(got - std::clamp(x, -448.0f, 448.0f)), best) << x;
  }
}

TEST(BitPackingTest, RoundTripsEveryWidth) {
  std::mt19937 rng(3);
  for (int bits = 1; bits <= 4; ++bits) {
    std::vector<uint8_t> codes(128), back(128), packed(128 * bits / 8);
    for (auto& c : codes) c = rng() & ((1 << bits) - 1);
    PackCodes(codes.data(), bits, 128, packed.data());
    UnpackCodes(packed.data(), bits, 128, back.data());
    EXPECT_EQ(codes, back) << bits;
  }
}

TEST(HadamardTest, RotationIsOrthonormalAndInvertible) {
  HadamardRotation rot(128);
  auto x = RandomVector(128, 4);
  auto y = x;
  rot.Rotate(y.data());
  EXPECT_NEAR(Dot(y.data(), y.data(), 128), Dot(x.data(), x.data(), 128), 1e-3);
  rot.Unrotate(y.data());
  for (int i = 0; i < 128; ++i) EXPECT_NEAR(y[i], x[i], 1e-5);
}

// ---- TurboQuant distortion ----------------------------------------------------------------------

// Mean squared error per vector of x ([n, d] unit vectors) through a format's round trip.
double RoundTripMse(const std::string& format, KvTensorRole role, int n, int d,
                    const std::vector<float>& x) {
  std::vector<float> out(x.size());
  EXPECT_TRUE(RoundTripKv(*ParseKvFormat(format), d, role, n, x.data(), out.data()).ok()) << format;
  double sum = 0;
  for (size_t e = 0; e < x.size(); ++e) sum += (x[e] - out[e]) * (x[e] - out[e]);
  return sum / n;
}

TEST(TurboQuantTest, MsePerBitWidthMatchesPaper) {
  // Paper (and Lloyd-Max on N(0,1)): D_mse = 0.3634, 0.1175, 0.0345, 0.0095 for b = 1..4 on unit
  // vectors. With norm correction (stored scale ||x|| / ||uhat||, debias=0) the reconstruction
  // has unit norm and, by the centroid condition <u, uhat> = ||uhat||^2 = 1 - D, its MSE is
  // 2 - 2 sqrt(1 - D). Debiased (the default: the scale divided by c = sqrt(1 - D) more), its norm
  // is 1 / c and its MSE 1 / c^2 - 2 c / c + 1 = D / (1 - D).
  const double paper[5] = {0, 0.3634, 0.1175, 0.0345, 0.0095};
  const int d = 128, n = 4000;
  const auto x = RandomUnitVectors(n, d, 5);
  HadamardRotation rot(d);
  for (int b = 1; b <= 4; ++b) {
    auto cb = TurboCodebook::Create(d, b);
    ASSERT_TRUE(cb.ok());
    std::vector<uint8_t> codes(cb->code_bytes());
    std::vector<float> u(d), uhat(d);
    double mse = 0;
    for (int i = 0; i < n; ++i) {
      std::copy(&x[i * d], &x[i * d] + d, u.begin());
      rot.Rotate(u.data());
      cb->Quantize(u.data(), codes.data(), uhat.data());
      for (int e = 0; e < d; ++e) mse += (u[e] - uhat[e]) * (u[e] - uhat[e]);
    }
    mse /= n;
    // Through the format (RoundTripKv: rotation, codes, fp16 corrected norm, un-rotation).
    const std::string format = absl::StrCat("tq:k=", b, ",v=", b);
    const double mse_corrected = RoundTripMse(format + ",debias=0", KvTensorRole::kKeys, n, d, x);
    const double mse_debiased = RoundTripMse(format, KvTensorRole::kKeys, n, d, x);
    const double expected_corrected = 2 - 2 * std::sqrt(1 - paper[b]);
    const double expected_debiased = paper[b] / (1 - paper[b]);
    std::printf(
        "[ turboquant b=%d ] MSE %.5f (paper %.4f), norm-corrected %.5f (expected %.5f), "
        "debiased %.5f (expected %.5f), c = 1 / norm_debias %.5f (sqrt(1 - D) %.5f)\n",
        b, mse, paper[b], mse_corrected, expected_corrected, mse_debiased, expected_debiased,
        1.0 / cb->norm_debias(), std::sqrt(1 - paper[b]));
    EXPECT_NEAR(mse, paper[b], 0.05 * paper[b]) << b;
    EXPECT_NEAR(mse_corrected, expected_corrected, 0.05 * expected_corrected) << b;
    EXPECT_NEAR(mse_debiased, expected_debiased, 0.05 * expected_debiased) << b;
    EXPECT_NEAR(1.0 / cb->norm_debias(), std::sqrt(1 - paper[b]), 0.01 * std::sqrt(1 - paper[b]));
    // Shannon lower bound and the paper's upper bound.
    EXPECT_GT(mse, std::pow(4.0, -b));
    EXPECT_LT(mse, 2.72 * std::pow(4.0, -b));
  }
}

TEST(TurboQuantTest, FractionalRatesSitBetweenIntegerRates) {
  const int d = 128, n = 2000;
  const auto x = RandomUnitVectors(n, d, 6);
  auto mse_of = [&](const char* format) {
    return RoundTripMse(format, KvTensorRole::kValues, n, d, x);
  };
  const double m4 = mse_of("tq4"), m35 = mse_of("tq3.5"), m3 = mse_of("tq3"), m25 = mse_of("tq2.5"),
               m2 = mse_of("tq:k=2,v=2");
  std::printf("[ turboquant ] debiased MSE tq4 %.5f tq3.5 %.5f tq3 %.5f tq2.5 %.5f tq2 %.5f\n", m4,
              m35, m3, m25, m2);
  EXPECT_LT(m4, m35);
  EXPECT_LT(m35, m3);
  EXPECT_LT(m3, m25);
  EXPECT_LT(m25, m2);
  // A channel split mixes the two codebooks' per-coordinate distortion in proportion.
  EXPECT_NEAR(m35, 0.5 * (m4 + m3), 0.1 * m35);
  EXPECT_NEAR(m25, 0.25 * m3 + 0.75 * m2, 0.1 * m25);
}

// DescribeTurboKeys (the layout the CUDA H2O mass kernel scores codes with) reproduces the codec:
// unpacking a key's codes by its bit offsets, looking them up in its centroids and scoring them
// against the query rotated with its signs (then the orthonormal Walsh-Hadamard transform) gives
// the codec's KeyScores bit for bit when summed in the same order, for every rate's channel split.
TEST(TurboQuantTest, DescribedKeyLayoutReproducesKeyScores) {
  for (const char* format : {"tq4", "tq3.5", "tq3", "tq2.5", "tq:k=2,v=4", "tq:k=1.5,v=1"}) {
    for (int d : {64, 128}) {
      auto spec = ParseKvFormat(format);
      ASSERT_TRUE(spec.ok()) << spec.status();
      auto layout = DescribeTurboKeys(*spec, d);
      ASSERT_TRUE(layout.ok()) << layout.status();
      auto codec = CreateKvCodec(*spec, d);
      ASSERT_TRUE(codec.ok()) << codec.status();
      const int n = 16;
      const auto k = RandomVector(static_cast<size_t>(n) * d, 21 + d);
      const auto q = RandomVector(d, 22 + d);
      std::vector<uint8_t> storage(static_cast<size_t>(n) * (*codec)->record_bytes());
      std::vector<uint8_t*> records(n);
      for (int i = 0; i < n; ++i) records[i] = storage.data() + i * (*codec)->record_bytes();
      HeadCodecState state;
      (*codec)->Encode(n, k.data(), k.data(), d, state, records.data());
      std::vector<float> prepared((*codec)->prepared_query_floats()), scores(n), scratch(n * d);
      (*codec)->PrepareQuery(q.data(), prepared.data());
      (*codec)->KeyScores(n, records.data(), state, 1, prepared.data(), scores.data(),
                          scratch.data());
      // The rotation from the described signs.
      std::vector<float> qr(q);
      for (int c = 0; c < d; ++c) qr[c] *= layout->signs[c];
      FastWalshHadamard(qr.data(), d);
      EXPECT_EQ(qr, std::vector<float>(prepared.begin(), prepared.begin() + d)) << format;
      for (int i = 0; i < n; ++i) {
        std::vector<float> uhat(d);
        int bit = 0;
        for (int c = 0; c < d; ++c) {
          const bool hi = c < layout->hi_channels;
          const int bits = hi ? layout->hi_bits : layout->lo_bits;
          uint32_t w = 0;
          for (int b = 0; b < 3; ++b) {
            const int byte = bit / 8 + b;
            if (byte < layout->code_bytes) w |= uint32_t{records[i][byte]} << (8 * b);
          }
          const uint32_t code = (w >> (bit % 8)) & ((1u << bits) - 1);
          uhat[c] = (hi ? layout->hi_centroids : layout->lo_centroids)[code];
          bit += bits;
        }
        EXPECT_EQ(bit, 8 * layout->code_bytes) << format;
        const float norm = HalfToFloat(static_cast<uint16_t>(
            records[i][layout->code_bytes] | (records[i][layout->code_bytes + 1] << 8)));
        EXPECT_EQ(norm * Dot(qr.data(), uhat.data(), d), scores[i])
            << format << " d=" << d << " key " << i;
      }
    }
  }
  auto fp16 = ParseKvFormat("fp16");
  ASSERT_TRUE(fp16.ok());
  EXPECT_EQ(DescribeTurboKeys(*fp16, 128).status().code(), absl::StatusCode::kInvalidArgument);
}

// Errors of the scores a TurboQuant format computes on codes, score - <y, x>, over n = 3000 pairs
// at d = 128: keys x unit vectors (seed), queries y = 0.8 x + 0.6 z with z unit vectors (seed + 1),
// so that <y, x> ~ 0.8 and a bias proportional to it shows. Absolute and relative to <y, x>.
struct ScoreErrors {
  double mean = 0, sd = 0;                    // of score - <y, x>
  double relative_mean = 0, relative_se = 0;  // of (score - <y, x>) / <y, x>; standard error
};
ScoreErrors MeasureScoreErrors(const std::string& format, uint32_t seed) {
  const int d = 128, n = 3000;
  const auto x = RandomUnitVectors(n, d, seed);
  const auto z = RandomUnitVectors(n, d, seed + 1);
  std::vector<float> y(z.size());
  for (size_t e = 0; e < z.size(); ++e) y[e] = 0.8f * x[e] + 0.6f * z[e];
  auto codec = CreateKvCodec(*ParseKvFormat(format), d);
  EXPECT_TRUE(codec.ok()) << format;
  if (!codec.ok()) return {};
  std::vector<uint8_t> rec((*codec)->record_bytes());
  uint8_t* recs[1] = {rec.data()};
  std::vector<float> prepared((*codec)->prepared_query_floats()), scratch(d);
  HeadCodecState state;
  double sum = 0, sum_sq = 0, rel_sum = 0, rel_sq = 0;
  for (int i = 0; i < n; ++i) {
    (*codec)->Encode(1, &x[i * d], &x[i * d], d, state, recs);
    (*codec)->PrepareQuery(&y[i * d], prepared.data());
    float score;
    (*codec)->KeyScores(1, recs, state, 1, prepared.data(), &score, scratch.data());
    const double truth = Dot(&y[i * d], &x[i * d], d), err = score - truth;
    sum += err, sum_sq += err * err;
    rel_sum += err / truth, rel_sq += (err / truth) * (err / truth);
  }
  ScoreErrors out;
  out.mean = sum / n;
  out.sd = std::sqrt(sum_sq / n - out.mean * out.mean);
  out.relative_mean = rel_sum / n;
  out.relative_se = std::sqrt((rel_sq / n - out.relative_mean * out.relative_mean) / n);
  return out;
}

TEST(TurboQuantTest, QjlInnerProductIsUnbiased) {
  // TurboQuant_prod at 3 bits (2-bit MSE + 1-bit QJL): E[<y, x~>] = <y, x>. The plain 3-bit MSE
  // quantizer without norm correction shrinks inner products by (1 - D) on average; QJL's
  // estimate must show no such bias.
  const int n = 3000;
  const ScoreErrors e = MeasureScoreErrors("tq:k=3,v=3,qjl", 7);
  std::printf("[ qjl ] mean error %.5f, sd %.5f, n %d (true <y,x> ~ 0.8)\n", e.mean, e.sd, n);
  EXPECT_LT(std::fabs(e.mean), 4 * e.sd / std::sqrt(n) + 2e-3);  // fp16 norms add ~1e-3 relative
  EXPECT_GT(e.sd, 0.0);
}

// The default TurboQuant scores (norms times TurboCodebook::norm_debias()) are unbiased at every
// rate; debias=0 (plain norm correction) shrinks them by c = E[<u, uhat> / ||uhat||] ~ sqrt(1 - D),
// which this test must detect (at tq2.5, 1 - c ~ 5%), or it could not fail.
TEST(TurboQuantTest, DebiasedScoresAreUnbiased) {
  for (const char* rate : {"4", "3.5", "3", "2.5"}) {
    const std::string format = absl::StrCat("tq:k=", rate, ",v=", rate);
    const ScoreErrors debiased = MeasureScoreErrors(format, 17);
    const ScoreErrors plain = MeasureScoreErrors(format + ",debias=0", 17);
    std::printf("[ turboquant %s ] relative score bias: debiased %+.5f (se %.5f), plain %+.5f\n",
                rate, debiased.relative_mean, debiased.relative_se, plain.relative_mean);
    // fp16 norms: ~5e-4 relative
    EXPECT_LT(std::fabs(debiased.relative_mean), 4 * debiased.relative_se + 1e-3) << rate;
    EXPECT_LT(plain.relative_mean, -(4 * plain.relative_se + 1e-3)) << rate;  // shrunk, detectably
  }
}

// ---- Uniform quantizers: analytic bounds -------------------------------------------------------

TEST(UniformQuantizerTest, Int8ErrorWithinHalfStep) {
  const int d = 128, n = 500;
  const auto x = RandomVector(n * d, 9, 2.0f);
  std::vector<float> out(x.size());
  ASSERT_TRUE(
      RoundTripKv(*ParseKvFormat("int8"), d, KvTensorRole::kKeys, n, x.data(), out.data()).ok());
  for (int i = 0; i < n; ++i) {
    float amax = 0;
    for (int e = 0; e < d; ++e) amax = std::max(amax, std::fabs(x[i * d + e]));
    const float step = RoundToHalf(amax / 127.0f);
    for (int e = 0; e < d; ++e) {
      ASSERT_LE(std::fabs(x[i * d + e] - out[i * d + e]), step / 2 * (1 + 1e-5f)) << i;
    }
  }
}

// The INT8 record's byte layout is shared with the CUDA kernels
// (kvgate/kernels/kv_record_layout.h): key codes, value codes, key scale, value scale. Keys and
// values with different amax and known codes must land at exactly those offsets.
TEST(UniformQuantizerTest, Int8RecordLayout) {
  for (int d : {64, 128}) {
    auto codec = CreateKvCodec(*ParseKvFormat("int8"), d);
    ASSERT_TRUE(codec.ok());
    ASSERT_EQ((*codec)->record_bytes(), Int8Record::Bytes(d));
    // key[c] = (c % 9 - 4) / 4 * 2 (amax 2: scale fp16(2/127)); value[c] = -3 at c = 5, else 0.
    std::vector<float> k(d), v(d, 0.0f);
    for (int c = 0; c < d; ++c) k[c] = (c % 9 - 4) * 0.5f;
    v[5] = -3.0f;
    std::vector<uint8_t> rec((*codec)->record_bytes(), 0xA5);
    uint8_t* recs[1] = {rec.data()};
    HeadCodecState state;
    (*codec)->Encode(1, k.data(), v.data(), d, state, recs);
    const uint16_t key_scale = FloatToHalf(2.0f / 127.0f), value_scale = FloatToHalf(3.0f / 127.0f);
    EXPECT_EQ(rec[Int8Record::KeyScale(d)] | rec[Int8Record::KeyScale(d) + 1] << 8, key_scale);
    EXPECT_EQ(rec[Int8Record::ValueScale(d)] | rec[Int8Record::ValueScale(d) + 1] << 8,
              value_scale);
    for (int c = 0; c < d; ++c) {
      const int key_code = static_cast<int>(std::nearbyint(k[c] / HalfToFloat(key_scale)));
      EXPECT_EQ(static_cast<int8_t>(rec[Int8Record::KeyCodes(d) + c]), key_code) << d << " " << c;
      EXPECT_EQ(static_cast<int8_t>(rec[Int8Record::ValueCodes(d) + c]), c == 5 ? -127 : 0)
          << d << " " << c;
    }
  }
}

TEST(UniformQuantizerTest, Fp8ErrorWithinHalfUlp) {
  const int d = 128, n = 200;
  const auto x = RandomVector(n * d, 10, 3.0f);
  std::vector<float> out(x.size());
  ASSERT_TRUE(
      RoundTripKv(*ParseKvFormat("fp8"), d, KvTensorRole::kKeys, n, x.data(), out.data()).ok());
  float amax = 0;
  for (float v : x) amax = std::max(amax, std::fabs(v));
  const float scale = amax / 192.0f;  // documented key rule
  double sq = 0;
  for (size_t e = 0; e < x.size(); ++e) {
    // 3 mantissa bits: half an ulp is 2^-4 relative in the normal range, 2^-10 * scale below.
    const float bound = std::max(std::fabs(x[e]) * 0x1.0p-4f, scale * 0x1.0p-10f) * 1.0001f;
    ASSERT_LE(std::fabs(x[e] - out[e]), bound) << x[e];
    sq += (x[e] - out[e]) * (x[e] - out[e]);
  }
  std::printf("[ fp8 ] rms error %.5f for N(0, 3^2) inputs\n", std::sqrt(sq / x.size()));
}

TEST(UniformQuantizerTest, KiviErrorWithinHalfStep) {
  const int d = 128, n = 96, group = 32;
  const auto x = RandomVector(n * d, 11);
  for (int bits : {2, 4}) {
    const std::string format = "kivi" + std::to_string(bits);
    const float levels = (1 << bits) - 1;
    std::vector<float> keys(x.size()), values(x.size());
    ASSERT_TRUE(
        RoundTripKv(*ParseKvFormat(format), d, KvTensorRole::kKeys, n, x.data(), keys.data()).ok());
    ASSERT_TRUE(
        RoundTripKv(*ParseKvFormat(format), d, KvTensorRole::kValues, n, x.data(), values.data())
            .ok());
    // Step of a group with range [lo, hi]: fp16 rounding of min (down) and scale (up) widens the
    // ideal (hi - lo) / levels by at most 2^-10 relative plus |lo| 2^-11.
    auto step = [&](float lo, float hi) {
      return ((hi - lo) + std::fabs(lo) * 0x1.0p-10f) / levels * (1 + 0x1.0p-9f);
    };
    for (int g = 0; g < n / group; ++g) {  // keys: per channel over 32 tokens
      for (int c = 0; c < d; ++c) {
        float lo = INFINITY, hi = -INFINITY;
        for (int t = g * group; t < (g + 1) * group; ++t) {
          lo = std::min(lo, x[t * d + c]);
          hi = std::max(hi, x[t * d + c]);
        }
        for (int t = g * group; t < (g + 1) * group; ++t) {
          ASSERT_LE(std::fabs(x[t * d + c] - keys[t * d + c]), step(lo, hi) / 2) << format;
        }
      }
    }
    for (int t = 0; t < n; ++t) {  // values: per token over 32 channels
      for (int g = 0; g < d / group; ++g) {
        float lo = INFINITY, hi = -INFINITY;
        for (int c = g * group; c < (g + 1) * group; ++c) {
          lo = std::min(lo, x[t * d + c]);
          hi = std::max(hi, x[t * d + c]);
        }
        for (int c = g * group; c < (g + 1) * group; ++c) {
          ASSERT_LE(std::fabs(x[t * d + c] - values[t * d + c]), step(lo, hi) / 2) << format;
        }
      }
    }
  }
}

TEST(UniformQuantizerTest, KiviSoloKeysWithinHalfStepOfTheGroupReconstruction) {
  // Eviction re-encodes the surviving keys of a partial KIVI group once, per token (solo keys,
  // kv_codec.h). Each element lies within half a per-token step of the group reconstruction it was
  // encoded from, and the key error relative to the original grows by a bounded factor: the cost
  // docs/QUALITY.md quotes. Keys with a per-channel bias and every 16th channel 10x larger (the
  // outlier channels of real keys, which per-channel grouping handles and per-token does not).
  const int d = 128, group = 32, groups = 200;
  for (int bits : {2, 4}) {
    const std::string format = "kivi" + std::to_string(bits);
    const float levels = (1 << bits) - 1;
    auto codec = CreateKvCodec(*ParseKvFormat(format), d);
    ASSERT_TRUE(codec.ok());
    const KvCodec& c = **codec;
    for (bool outliers : {false, true}) {
      auto x = RandomVector(static_cast<size_t>(groups) * group * d, 31);
      const auto bias = RandomVector(d, 32);
      for (size_t i = 0; i < x.size(); ++i) {
        const int ch = static_cast<int>(i % d);
        if (outliers) x[i] = bias[ch] + (ch % 16 == 0 ? 10.0f : 1.0f) * x[i];
      }
      std::vector<uint8_t> storage(static_cast<size_t>(group) * c.record_bytes());
      std::vector<uint8_t*> records(group);
      for (int i = 0; i < group; ++i) records[i] = storage.data() + i * c.record_bytes();
      std::vector<float> y(group * d), z(group * d);
      double err_group = 0, err_solo = 0, norm = 0;
      HeadCodecState state;
      for (int g = 0; g < groups; ++g) {
        const float* xg = &x[static_cast<size_t>(g) * group * d];
        c.Encode(group, xg, xg, d, state, records.data());
        c.DecodeKeys(group, records.data(), state, y.data());
        c.EncodeSoloKeys(group, y.data(), records.data());
        c.DecodeSoloKeys(group, records.data(), state, z.data());
        for (int t = 0; t < group; ++t) {
          for (int cg = 0; cg < d / group; ++cg) {  // per token over G channels, like values
            const float* yt = &y[t * d + cg * group];
            const auto [lo, hi] = std::minmax_element(yt, yt + group);
            const float step =
                ((*hi - *lo) + std::fabs(*lo) * 0x1.0p-10f) / levels * (1 + 0x1.0p-9f);
            for (int e = 0; e < group; ++e) {
              ASSERT_LE(std::fabs(z[t * d + cg * group + e] - yt[e]), step / 2) << format;
            }
          }
        }
        for (int i = 0; i < group * d; ++i) {
          err_group += (y[i] - xg[i]) * (y[i] - xg[i]);
          err_solo += (z[i] - xg[i]) * (z[i] - xg[i]);
          norm += static_cast<double>(xg[i]) * xg[i];
        }
      }
      const double group_rel = std::sqrt(err_group / norm), solo_rel = std::sqrt(err_solo / norm);
      std::printf("[ %s %-16s ] relative RMS key error: group %.4f, solo %.4f (x%.2f)\n",
                  format.c_str(), outliers ? "outlier channels" : "iid N(0,1)", group_rel, solo_rel,
                  solo_rel / group_rel);
      EXPECT_LT(solo_rel, 2.2 * group_rel) << format;
    }
  }
}

TEST(DispatchTest, UnsupportedCombinationsAreUnimplemented) {
  EXPECT_EQ(CreateKvCodec(*ParseKvFormat("tq4"), 96).status().code(),
            absl::StatusCode::kUnimplemented);
  EXPECT_EQ(CreateKvCodec(*ParseKvFormat("fp16"), 0).status().code(),
            absl::StatusCode::kUnimplemented);
  KvFormatSpec kivi3 = *ParseKvFormat("kivi2");
  kivi3.key_bits = kivi3.value_bits = 3;
  EXPECT_EQ(CreateKvCodec(kivi3, 128).status().code(), absl::StatusCode::kUnimplemented);
}

TEST(DispatchTest, KiviWithoutResidualWindowIsUnimplemented) {
  // KIVI's key groups of G tokens are gathered in the fp16 window: without one (R = 0) the cache
  // would encode each append's rows directly, and Encode would read a whole group past the end of
  // a call whose length is not a multiple of G. The codec refuses the format up front.
  KvFormatSpec spec = *ParseKvFormat("kivi2");
  spec.residual_tokens = 0;
  const absl::Status status = CreateKvCodec(spec, 128).status();
  EXPECT_EQ(status.code(), absl::StatusCode::kUnimplemented);
  EXPECT_NE(status.message().find("R > 0"), absl::string_view::npos) << status;
  EXPECT_EQ(DescribeKvFormat(spec, 128).status().code(), absl::StatusCode::kUnimplemented);
  spec.residual_tokens = spec.group_size;  // the smallest window is fine
  auto codec = CreateKvCodec(spec, 128);
  ASSERT_TRUE(codec.ok()) << codec.status();
  EXPECT_EQ((*codec)->residual_tokens(), spec.group_size);
}

}  // namespace
}  // namespace kvgate::kernels::cpu
