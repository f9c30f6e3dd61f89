// KV format codecs (kv_codec.h), the (format, head_dim) dispatch table, DescribeKvFormat and
// RoundTripKv.
#include "kernels/cpu/kv_codec.h"

#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "kernels/cpu/numeric.h"
#include "kvgate/kernels/kv_record_layout.h"

namespace kvgate::kernels::cpu {

// ---- Vector primitives (the hot inner loops; cloned for AVX2+FMA when the CPU has it) ---------

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define KVGATE_HOT __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define KVGATE_HOT
#endif

KVGATE_HOT float Dot(const float* a, const float* b, int n) {
  float acc[16] = {};
  int i = 0;
  for (; i + 16 <= n; i += 16) {
    for (int j = 0; j < 16; ++j) acc[j] += a[i + j] * b[i + j];
  }
  float sum = 0;
  for (; i < n; ++i) sum += a[i] * b[i];
  for (int j = 0; j < 16; ++j) sum += acc[j];
  return sum;
}

KVGATE_HOT void Axpy(float alpha, const float* x, float* y, int n) {
  for (int i = 0; i < n; ++i) y[i] += alpha * x[i];
}

KVGATE_HOT void WeightedRowSum(const float* weights, const float* rows, int count, int n,
                               float* acc) {
  // Channel blocks of 32 stay in registers while the rows stream through.
  int c0 = 0;
  for (; c0 + 32 <= n; c0 += 32) {
    float block[32];
    for (int c = 0; c < 32; ++c) block[c] = acc[c0 + c];
    for (int i = 0; i < count; ++i) {
      const float w = weights[i];
      const float* row = rows + static_cast<size_t>(i) * n + c0;
      for (int c = 0; c < 32; ++c) block[c] += w * row[c];
    }
    for (int c = 0; c < 32; ++c) acc[c0 + c] = block[c];
  }
  for (int i = 0; i < count; ++i) {
    for (int c = c0; c < n; ++c) acc[c] += weights[i] * rows[static_cast<size_t>(i) * n + c];
  }
}

namespace {

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
// F16C path (vcvtph2ps): exact, like the portable bit manipulation below.
__attribute__((target("arch=x86-64-v3"))) void HalfRowToFloatF16c(const uint16_t* in, float* out,
                                                                  int n) {
  const _Float16* h = reinterpret_cast<const _Float16*>(in);
  for (int i = 0; i < n; ++i) out[i] = static_cast<float>(h[i]);
}
void HalfRowToFloatPortable(const uint16_t* in, float* out, int n) {
  for (int i = 0; i < n; ++i) out[i] = HalfToFloat(in[i]);
}
void HalfRowToFloat(const uint16_t* in, float* out, int n) {
  static const bool f16c = __builtin_cpu_supports("f16c") && __builtin_cpu_supports("avx2");
  if (f16c) {
    HalfRowToFloatF16c(in, out, n);
  } else {
    HalfRowToFloatPortable(in, out, n);
  }
}
#else
void HalfRowToFloat(const uint16_t* in, float* out, int n) {
  for (int i = 0; i < n; ++i) out[i] = HalfToFloat(in[i]);
}
#endif
KVGATE_HOT void Bf16RowToFloat(const uint16_t* in, float* out, int n) {
  for (int i = 0; i < n; ++i) out[i] = Bf16ToFloat(in[i]);
}

float LoadHalf(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  return HalfToFloat(h);
}
void StoreHalf(uint8_t* p, float x) {
  const uint16_t h = FloatToHalf(x);
  std::memcpy(p, &h, 2);
}
uint16_t HalfNextDown(uint16_t h) {
  if ((h & 0x7FFF) == 0) return 0x8001;
  return (h & 0x8000) ? h + 1 : h - 1;
}
uint16_t HalfNextUp(uint16_t h) {
  if ((h & 0x7FFF) == 0) return 0x0001;
  return (h & 0x8000) ? h - 1 : h + 1;
}

}  // namespace

uint16_t HalfRoundDown(float x) {
  uint16_t h = FloatToHalf(x);
  while (HalfToFloat(h) > x) h = HalfNextDown(h);
  return h;
}
uint16_t HalfRoundUp(float x) {
  uint16_t h = FloatToHalf(std::min(x, 65504.0f));
  while (HalfToFloat(h) < x && h != 0x7BFF) h = HalfNextUp(h);
  return h;
}

// ---- FP8 E4M3FN -------------------------------------------------------------------------------

namespace {
std::array<float, 256> BuildE4M3Table() {
  std::array<float, 256> table{};
  for (int code = 0; code < 256; ++code) {
    const int exponent = (code >> 3) & 0xF, mantissa = code & 7;
    float magnitude;
    if ((code & 0x7F) == 0x7F) {
      magnitude = std::numeric_limits<float>::quiet_NaN();
    } else if (exponent == 0) {
      magnitude = std::ldexp(static_cast<float>(mantissa), -9);
    } else {
      magnitude = std::ldexp(1.0f + mantissa / 8.0f, exponent - 7);
    }
    table[code] = (code & 0x80) ? -magnitude : magnitude;
  }
  return table;
}
const std::array<float, 256>& E4M3Table() {
  static const std::array<float, 256> table = BuildE4M3Table();
  return table;
}
}  // namespace

float E4M3ToFloat(uint8_t code) { return E4M3Table()[code]; }

uint8_t FloatToE4M3(float x) {
  if (std::isnan(x)) return 0x7F;
  const uint8_t sign = std::signbit(x) ? 0x80 : 0;
  float a = std::min(std::fabs(x), kE4M3Max);
  uint8_t code;
  if (a < 0x1.0p-6f) {  // subnormal range: step 2^-9; code m means m * 2^-9 (m = 8: 2^-6)
    code = static_cast<uint8_t>(std::nearbyint(a * 512.0f));
  } else {
    int e;
    std::frexp(a, &e);           // a = f * 2^e, f in [0.5, 1)
    const int exponent = e - 1;  // a in [2^exponent, 2^(exponent+1))
    int q = static_cast<int>(std::nearbyint(std::ldexp(a, 3 - exponent)));  // 8..16
    int biased = exponent + 7;
    if (q == 16) {
      q = 8;
      ++biased;
    }
    code = static_cast<uint8_t>((biased << 3) | (q - 8));
    if (code > 0x7E) code = 0x7E;
  }
  return code | sign;
}

// ---- Bit packing --------------------------------------------------------------------------------

void PackCodes(const uint8_t* codes, int bits, int count, uint8_t* out) {
  std::memset(out, 0, static_cast<size_t>(count) * bits / 8);
  for (int i = 0; i < count; ++i) {
    const int bit = i * bits;
    const uint32_t value = codes[i] & ((1u << bits) - 1);
    out[bit >> 3] |= static_cast<uint8_t>(value << (bit & 7));
    if ((bit & 7) + bits > 8) out[(bit >> 3) + 1] |= static_cast<uint8_t>(value >> (8 - (bit & 7)));
  }
}

void UnpackCodes(const uint8_t* packed, int bits, int count, uint8_t* codes) {
  switch (bits) {
    case 1:
      for (int i = 0; i < count; ++i) codes[i] = (packed[i >> 3] >> (i & 7)) & 1;
      return;
    case 2:
      for (int i = 0; i < count; ++i) codes[i] = (packed[i >> 2] >> ((i & 3) * 2)) & 3;
      return;
    case 4:
      for (int i = 0; i < count; ++i) codes[i] = (packed[i >> 1] >> ((i & 1) * 4)) & 15;
      return;
    case 3:
      for (int i = 0; i < count; i += 8) {  // 8 codes in 3 bytes
        const uint8_t* p = packed + (i / 8) * 3;
        const uint32_t w = p[0] | (p[1] << 8) | (p[2] << 16);
        for (int j = 0; j < 8; ++j) codes[i + j] = (w >> (3 * j)) & 7;
      }
      return;
    default:
      for (int i = 0; i < count; ++i) {
        const int bit = i * bits;
        uint32_t w = packed[bit >> 3];
        if ((bit & 7) + bits > 8) w |= static_cast<uint32_t>(packed[(bit >> 3) + 1]) << 8;
        codes[i] = (w >> (bit & 7)) & ((1u << bits) - 1);
      }
  }
}

// ---- Hadamard rotation, Lloyd-Max codebooks -----------------------------------------------------

void FastWalshHadamard(float* x, int n) {
  for (int h = 1; h < n; h <<= 1) {
    for (int i = 0; i < n; i += 2 * h) {
      for (int j = i; j < i + h; ++j) {
        const float a = x[j], b = x[j + h];
        x[j] = a + b;
        x[j + h] = a - b;
      }
    }
  }
  const float norm = 1.0f / std::sqrt(static_cast<float>(n));
  for (int i = 0; i < n; ++i) x[i] *= norm;
}

HadamardRotation::HadamardRotation(int d) : d_(d), signs_(d) {
  SplitMix64 rng(kTurboSignSeed ^ static_cast<uint64_t>(d));
  for (int i = 0; i < d; ++i) signs_[i] = (rng.Next() >> 63) ? -1.0f : 1.0f;
}
void HadamardRotation::Rotate(float* x) const {
  for (int i = 0; i < d_; ++i) x[i] *= signs_[i];
  FastWalshHadamard(x, d_);
}
void HadamardRotation::Unrotate(float* x) const {
  FastWalshHadamard(x, d_);
  for (int i = 0; i < d_; ++i) x[i] *= signs_[i];
}

const std::vector<float>& LloydMaxLevels(int bits) {
  static const std::array<std::vector<float>, 5> levels = [] {
    const std::array<std::vector<float>, 5> halves = {
        std::vector<float>{},
        {0.7979f},
        {0.4528f, 1.5104f},
        {0.2451f, 0.7560f, 1.3439f, 2.1519f},
        {0.1284f, 0.3880f, 0.6568f, 0.9423f, 1.2562f, 1.6180f, 2.0690f, 2.7326f}};
    std::array<std::vector<float>, 5> out;
    for (int b = 1; b <= 4; ++b) {
      for (auto it = halves[b].rbegin(); it != halves[b].rend(); ++it) out[b].push_back(-*it);
      for (float g : halves[b]) out[b].push_back(g);
    }
    return out;
  }();
  return levels[std::clamp(bits, 1, 4)];
}

absl::Status TurboChannelSplit(int d, double rate, int* hi_channels, int* hi_bits, int* lo_bits) {
  if (rate == 4 || rate == 3 || rate == 2 || rate == 1) {
    *hi_channels = d, *hi_bits = *lo_bits = static_cast<int>(rate);
  } else if (rate == 3.5) {
    *hi_channels = d / 2, *hi_bits = 4, *lo_bits = 3;
  } else if (rate == 2.5) {
    *hi_channels = d / 4, *hi_bits = 3, *lo_bits = 2;
  } else if (rate == 1.5) {
    *hi_channels = d / 2, *hi_bits = 2, *lo_bits = 1;
  } else {
    return absl::InvalidArgumentError(absl::StrFormat("TurboQuant rate %g not supported", rate));
  }
  return absl::OkStatus();
}

absl::StatusOr<TurboCodebook> TurboCodebook::Create(int d, double rate) {
  TurboCodebook cb;
  cb.d_ = d;
  if (absl::Status st = TurboChannelSplit(d, rate, &cb.hi_channels_, &cb.hi_bits_, &cb.lo_bits_);
      !st.ok()) {
    return st;
  }
  if (cb.hi_channels_ % 8 != 0 || (d - cb.hi_channels_) % 8 != 0) {
    return absl::UnimplementedError(absl::StrFormat(
        "TurboQuant rate %g needs head_dim with 8 | split sizes (got %d)", rate, d));
  }
  cb.code_bytes_ = (cb.hi_channels_ * cb.hi_bits_ + (d - cb.hi_channels_) * cb.lo_bits_) / 8;
  const float inv_sqrt_d = 1.0f / std::sqrt(static_cast<float>(d));
  auto build = [&](int bits, std::vector<float>* centroids, std::vector<float>* bounds) {
    for (float g : LloydMaxLevels(bits)) centroids->push_back(g * inv_sqrt_d);
    for (size_t i = 0; i + 1 < centroids->size(); ++i) {
      bounds->push_back(0.5f * ((*centroids)[i] + (*centroids)[i + 1]));
    }
  };
  build(cb.hi_bits_, &cb.hi_centroids_, &cb.hi_bounds_);
  build(cb.lo_bits_, &cb.lo_centroids_, &cb.lo_bounds_);
  // c = E[<u, uhat> / ||uhat||] over uniform unit vectors (normalized Gaussians; the rotation
  // maps the sphere to itself, so it is not needed here). 4096 samples: standard error < 1e-4.
  constexpr int kSamples = 4096;
  SplitMix64 rng(kTurboDebiasSeed ^ static_cast<uint64_t>(d));
  std::vector<float> u(d), uhat(d);
  std::vector<uint8_t> codes(cb.code_bytes_);
  double sum = 0;
  for (int i = 0; i < kSamples; ++i) {
    double sq = 0;
    for (float& x : u) {
      x = static_cast<float>(rng.Gaussian());
      sq += double{x} * x;
    }
    const float inv = static_cast<float>(1.0 / std::sqrt(sq));
    for (float& x : u) x *= inv;
    cb.Quantize(u.data(), codes.data(), uhat.data());
    double dot = 0, recon = 0;
    for (int c = 0; c < d; ++c) dot += double{u[c]} * uhat[c], recon += double{uhat[c]} * uhat[c];
    if (recon > 0) sum += dot / std::sqrt(recon);
  }
  cb.norm_debias_ = static_cast<float>(kSamples / sum);
  return cb;
}

double TurboCodebook::code_bits_per_channel() const { return code_bytes_ * 8.0 / d_; }

void TurboCodebook::Quantize(const float* u, uint8_t* codes, float* uhat) const {
  uint8_t idx[512];
  for (int i = 0; i < d_; ++i) {
    const auto& bounds = i < hi_channels_ ? hi_bounds_ : lo_bounds_;
    const auto& centroids = i < hi_channels_ ? hi_centroids_ : lo_centroids_;
    int k = 0;
    for (float b : bounds) k += u[i] > b;
    idx[i] = static_cast<uint8_t>(k);
    uhat[i] = centroids[k];
  }
  PackCodes(idx, hi_bits_, hi_channels_, codes);
  PackCodes(idx + hi_channels_, lo_bits_, d_ - hi_channels_, codes + hi_channels_ * hi_bits_ / 8);
}

void TurboCodebook::Dequantize(const uint8_t* codes, float* uhat) const {
  uint8_t idx[512];
  UnpackCodes(codes, hi_bits_, hi_channels_, idx);
  UnpackCodes(codes + hi_channels_ * hi_bits_ / 8, lo_bits_, d_ - hi_channels_, idx + hi_channels_);
  for (int i = 0; i < hi_channels_; ++i) uhat[i] = hi_centroids_[idx[i]];
  for (int i = hi_channels_; i < d_; ++i) uhat[i] = lo_centroids_[idx[i]];
}

// ---- KvCodec defaults ---------------------------------------------------------------------------

void KvCodec::PrepareQuery(const float* q, float* prepared) const {
  std::memcpy(prepared, q, sizeof(float) * head_dim_);
}

void KvCodec::KeyScores(int n, const uint8_t* const* records, const HeadCodecState& state,
                        int num_queries, const float* prepared_q, float* scores,
                        float* scratch) const {
  DecodeKeys(n, records, state, scratch);
  const int d = head_dim_, pq = prepared_query_floats();
  for (int j = 0; j < num_queries; ++j) {
    for (int i = 0; i < n; ++i) scores[j * n + i] = Dot(prepared_q + j * pq, scratch + i * d, d);
  }
}

namespace {

// ---- fp16 / bf16 --------------------------------------------------------------------------------
// Record: keys [d] then values [d], 16-bit each.
template <bool BF16>
class Half16Codec final : public KvCodec {
 public:
  explicit Half16Codec(int d) : KvCodec(d, 2 * d, 2 * d) {}
  void Encode(int n, const float* k, const float* v, int64_t stride, const HeadCodecState&,
              uint8_t* const* records) const override {
    const int d = head_dim();
    for (int i = 0; i < n; ++i) {
      uint16_t* out = reinterpret_cast<uint16_t*>(records[i]);
      for (int c = 0; c < d; ++c) {
        out[c] = BF16 ? FloatToBf16(k[i * stride + c]) : FloatToHalf(k[i * stride + c]);
        out[d + c] = BF16 ? FloatToBf16(v[i * stride + c]) : FloatToHalf(v[i * stride + c]);
      }
    }
  }
  void DecodeKeys(int n, const uint8_t* const* records, const HeadCodecState&,
                  float* keys) const override {
    Decode(n, records, 0, keys);
  }
  void DecodeValues(int n, const uint8_t* const* records, const HeadCodecState&,
                    float* values) const override {
    Decode(n, records, head_dim(), values);
  }

 private:
  void Decode(int n, const uint8_t* const* records, int offset, float* out) const {
    const int d = head_dim();
    for (int i = 0; i < n; ++i) {
      const uint16_t* in = reinterpret_cast<const uint16_t*>(records[i]) + offset;
      if (BF16) {
        Bf16RowToFloat(in, out + i * d, d);
      } else {
        HalfRowToFloat(in, out + i * d, d);
      }
    }
  }
};

// ---- FP8 E4M3, scale per (sequence, layer, kv-head) ---------------------------------------------
// Record: keys [d] then values [d] E4M3 codes of x / scale. Scale rule (vLLM's dynamic mode):
// fixed by the first appended chunk with a nonzero amax, key_scale = amax_k / 200,
// value_scale = amax_v / 100 (headroom 2.24x / 4.48x below E4M3's 448); later values beyond
// 448 * scale saturate to +-448 * scale.
class Fp8Codec final : public KvCodec {
 public:
  explicit Fp8Codec(int d) : KvCodec(d, d, d) {}
  void ChooseScales(int64_t n, const float* k, const float* v, int64_t stride,
                    HeadCodecState* state) const override {
    float amax_k = 0, amax_v = 0;
    for (int64_t i = 0; i < n; ++i) {
      for (int c = 0; c < head_dim(); ++c) {
        amax_k = std::max(amax_k, std::fabs(k[i * stride + c]));
        amax_v = std::max(amax_v, std::fabs(v[i * stride + c]));
      }
    }
    // The first chunk's amax lands on 192 (keys) / 96 (values): exact E4M3 values (1.5 x 2^7,
    // 1.5 x 2^6), so the largest element is never a rounding tie that a last-bit difference in
    // amax could flip (200 and 100 sit halfway between codes), leaving 448/192 = 2.3x (keys) and
    // 4.7x (values) headroom for later tokens larger than the first chunk's.
    if (state->key_scale == 0 && amax_k > 0 && std::isfinite(amax_k)) {
      state->key_scale = amax_k / 192.0f;
    }
    if (state->value_scale == 0 && amax_v > 0 && std::isfinite(amax_v)) {
      state->value_scale = amax_v / 96.0f;
    }
  }
  void Encode(int n, const float* k, const float* v, int64_t stride, const HeadCodecState& state,
              uint8_t* const* records) const override {
    const int d = head_dim();
    const float inv_k = state.key_scale > 0 ? 1.0f / state.key_scale : 0.0f;
    const float inv_v = state.value_scale > 0 ? 1.0f / state.value_scale : 0.0f;
    for (int i = 0; i < n; ++i) {
      for (int c = 0; c < d; ++c) {
        records[i][c] = FloatToE4M3(k[i * stride + c] * inv_k);
        records[i][d + c] = FloatToE4M3(v[i * stride + c] * inv_v);
      }
    }
  }
  void DecodeKeys(int n, const uint8_t* const* records, const HeadCodecState& state,
                  float* keys) const override {
    Decode(n, records, 0, state.key_scale, keys);
  }
  void DecodeValues(int n, const uint8_t* const* records, const HeadCodecState& state,
                    float* values) const override {
    Decode(n, records, head_dim(), state.value_scale, values);
  }

 private:
  void Decode(int n, const uint8_t* const* records, int offset, float scale, float* out) const {
    const auto& table = E4M3Table();
    const int d = head_dim();
    for (int i = 0; i < n; ++i) {
      const uint8_t* in = records[i] + offset;
      for (int c = 0; c < d; ++c) out[i * d + c] = table[in[c]] * scale;
    }
  }
};

// ---- INT8, symmetric, fp16 scale per (token, kv-head) -------------------------------------------
// Record (kvgate/kernels/kv_record_layout.h, Int8Record): key codes [d] int8, value codes [d] int8,
// key scale fp16, value scale fp16; key_bytes() = value_bytes() = d + 2 count each vector's codes
// and scale, but the two are interleaved so that the codes stay 4-byte aligned.
// scale = fp16(amax / 127); q = clamp(round(x / scale), -127, 127); x^ = q * scale.
class Int8Codec final : public KvCodec {
 public:
  explicit Int8Codec(int d) : KvCodec(d, d + 2, d + 2) {}
  void Encode(int n, const float* k, const float* v, int64_t stride, const HeadCodecState&,
              uint8_t* const* records) const override {
    const int d = head_dim();
    for (int i = 0; i < n; ++i) {
      EncodeRow(k + i * stride, records[i] + Int8Record::KeyCodes(d),
                records[i] + Int8Record::KeyScale(d));
      EncodeRow(v + i * stride, records[i] + Int8Record::ValueCodes(d),
                records[i] + Int8Record::ValueScale(d));
    }
  }
  void DecodeKeys(int n, const uint8_t* const* records, const HeadCodecState&,
                  float* keys) const override {
    const int d = head_dim();
    for (int i = 0; i < n; ++i) {
      DecodeRow(records[i] + Int8Record::KeyCodes(d), records[i] + Int8Record::KeyScale(d),
                keys + i * d);
    }
  }
  void DecodeValues(int n, const uint8_t* const* records, const HeadCodecState&,
                    float* values) const override {
    const int d = head_dim();
    for (int i = 0; i < n; ++i) {
      DecodeRow(records[i] + Int8Record::ValueCodes(d), records[i] + Int8Record::ValueScale(d),
                values + i * d);
    }
  }

 private:
  void EncodeRow(const float* x, uint8_t* codes, uint8_t* scale_out) const {
    const int d = head_dim();
    float amax = 0;
    for (int c = 0; c < d; ++c) amax = std::max(amax, std::fabs(x[c]));
    const uint16_t scale_half = FloatToHalf(std::min(amax / 127.0f, 65504.0f));
    const float scale = HalfToFloat(scale_half);
    const float inv = scale > 0 ? 1.0f / scale : 0.0f;
    for (int c = 0; c < d; ++c) {
      const float q = std::clamp(std::nearbyint(x[c] * inv), -127.0f, 127.0f);
      codes[c] = static_cast<uint8_t>(static_cast<int8_t>(q));
    }
    std::memcpy(scale_out, &scale_half, 2);
  }
  void DecodeRow(const uint8_t* codes, const uint8_t* scale_in, float* out) const {
    const float scale = LoadHalf(scale_in);
    for (int c = 0; c < head_dim(); ++c) out[c] = static_cast<int8_t>(codes[c]) * scale;
  }
};

// ---- KIVI ---------------------------------------------------------------------------------------
// Asymmetric min/max, b bits: x^ = q * scale + min with q in [0, 2^b - 1]; min rounded toward -inf
// and scale toward +inf in fp16 so that no code clamps and |x - x^| <= scale / 2.
// Keys per channel over groups of G consecutive tokens; values per token over groups of G channels.
// Record: key codes [d*b/8] | key meta [d/G channels x (scale, min) fp16] | value codes [d*b/8] |
// value meta [d/G groups x (scale, min) fp16]. Token j of a key group stores the (scale, min) of
// channels [j*d/G, (j+1)*d/G), so the per-group metadata is amortized exactly over the group's
// records (requires G | d). The newest R tokens live in the cache's fp16 residual window. Under
// eviction a key whose group lost members becomes a solo key (kv_codec.h): the key half then has
// the value half's layout.
class KiviCodec final : public KvCodec {
 public:
  KiviCodec(int d, int bits, int group, int residual)
      : KvCodec(d, d * bits / 8 + 4 * d / group, d * bits / 8 + 4 * d / group),
        bits_(bits),
        group_(group),
        residual_(residual) {}
  int key_group_tokens() const override { return group_; }
  int residual_tokens() const override { return residual_; }

  void Encode(int n, const float* k, const float* v, int64_t stride, const HeadCodecState&,
              uint8_t* const* records) const override {
    const int d = head_dim(), codes_bytes = d * bits_ / 8, levels = (1 << bits_) - 1;
    const int channels_per_token = d / group_;
    uint8_t codes[512];
    float scales[512], mins[512];
    // Keys: one group of G tokens at a time, per channel.
    for (int g0 = 0; g0 < n; g0 += group_) {
      for (int c = 0; c < d; ++c) {
        float lo = k[g0 * stride + c], hi = lo;
        for (int t = 1; t < group_; ++t) {
          lo = std::min(lo, k[(g0 + t) * stride + c]);
          hi = std::max(hi, k[(g0 + t) * stride + c]);
        }
        MinScale(lo, hi, levels, &mins[c], &scales[c]);
      }
      for (int t = 0; t < group_; ++t) {
        const float* x = k + (g0 + t) * stride;
        for (int c = 0; c < d; ++c) codes[c] = Code(x[c], mins[c], scales[c], levels);
        uint8_t* rec = records[g0 + t];
        PackCodes(codes, bits_, d, rec);
        for (int j = 0; j < channels_per_token; ++j) {
          const int c = t * channels_per_token + j;
          StoreHalf(rec + codes_bytes + 4 * j, scales[c]);
          StoreHalf(rec + codes_bytes + 4 * j + 2, mins[c]);
        }
      }
    }
    // Values: per token, groups of G channels.
    for (int i = 0; i < n; ++i) EncodeTokenRow(v + i * stride, records[i] + key_bytes());
  }

  // A solo key is stored like a value: per token, (scale, min) per G channels.
  void EncodeSoloKeys(int n, const float* keys, uint8_t* const* records) const override {
    for (int i = 0; i < n; ++i) EncodeTokenRow(keys + i * head_dim(), records[i]);
  }
  void DecodeSoloKeys(int n, const uint8_t* const* records, const HeadCodecState&,
                      float* keys) const override {
    for (int i = 0; i < n; ++i) DecodeTokenRow(records[i], keys + i * head_dim());
  }

  void DecodeKeys(int n, const uint8_t* const* records, const HeadCodecState&,
                  float* keys) const override {
    const int d = head_dim(), codes_bytes = d * bits_ / 8, channels_per_token = d / group_;
    float scales[512], mins[512];
    uint8_t codes[512];
    for (int g0 = 0; g0 < n; g0 += group_) {
      for (int t = 0; t < group_; ++t) {
        const uint8_t* rec = records[g0 + t];
        for (int j = 0; j < channels_per_token; ++j) {
          scales[t * channels_per_token + j] = LoadHalf(rec + codes_bytes + 4 * j);
          mins[t * channels_per_token + j] = LoadHalf(rec + codes_bytes + 4 * j + 2);
        }
      }
      for (int t = 0; t < group_ && g0 + t < n; ++t) {
        UnpackCodes(records[g0 + t], bits_, d, codes);
        float* out = keys + (g0 + t) * d;
        for (int c = 0; c < d; ++c) out[c] = codes[c] * scales[c] + mins[c];
      }
    }
  }

  void DecodeValues(int n, const uint8_t* const* records, const HeadCodecState&,
                    float* values) const override {
    for (int i = 0; i < n; ++i) DecodeTokenRow(records[i] + key_bytes(), values + i * head_dim());
  }

 private:
  // x [d] -> b-bit codes [d*b/8] | (scale, min) fp16 per group of G channels, at out.
  void EncodeTokenRow(const float* x, uint8_t* out) const {
    const int d = head_dim(), codes_bytes = d * bits_ / 8, levels = (1 << bits_) - 1;
    uint8_t codes[512];
    for (int g = 0; g < d / group_; ++g) {
      float lo = x[g * group_], hi = lo;
      for (int c = g * group_; c < (g + 1) * group_; ++c) {
        lo = std::min(lo, x[c]);
        hi = std::max(hi, x[c]);
      }
      float mn, sc;
      MinScale(lo, hi, levels, &mn, &sc);
      for (int c = g * group_; c < (g + 1) * group_; ++c) codes[c] = Code(x[c], mn, sc, levels);
      StoreHalf(out + codes_bytes + 4 * g, sc);
      StoreHalf(out + codes_bytes + 4 * g + 2, mn);
    }
    PackCodes(codes, bits_, d, out);
  }
  void DecodeTokenRow(const uint8_t* in, float* out) const {
    const int d = head_dim(), codes_bytes = d * bits_ / 8;
    uint8_t codes[512];
    UnpackCodes(in, bits_, d, codes);
    for (int g = 0; g < d / group_; ++g) {
      const float sc = LoadHalf(in + codes_bytes + 4 * g);
      const float mn = LoadHalf(in + codes_bytes + 4 * g + 2);
      for (int c = g * group_; c < (g + 1) * group_; ++c) out[c] = codes[c] * sc + mn;
    }
  }
  static void MinScale(float lo, float hi, int levels, float* min_out, float* scale_out) {
    const float mn = HalfToFloat(HalfRoundDown(lo));
    *min_out = mn;
    *scale_out = hi > mn ? HalfToFloat(HalfRoundUp((hi - mn) / levels)) : 0.0f;
  }
  static uint8_t Code(float x, float mn, float scale, int levels) {
    if (!(scale > 0)) return 0;
    return static_cast<uint8_t>(
        std::clamp(std::nearbyint((x - mn) / scale), 0.0f, static_cast<float>(levels)));
  }
  int bits_, group_, residual_;
};

// ---- TurboQuant ---------------------------------------------------------------------------------
// Per vector x: u = Pi x / ||x||, codes = TurboCodebook(u), uhat = centroids.
//   MSE part (keys without QJL, values): stores fp16 s = ||x|| / ||uhat|| (norm correction) times
//   the codebook's norm_debias() (unless debias=0), so the key-domain reconstruction is s * uhat:
//   its norm is ||x|| / c and its mean inner product with any fixed vector is exact.
//   QJL keys (TurboQuant_prod): MSE codebook at key_bits - 1, s = ||x|| (no correction, keeps the
//   estimator unbiased), r = u - uhat, stores sign(S r) (d bits) and fp16 ||r||; the estimate of
//   <q, x> is ||x|| * (<Pi q, uhat> + ||r|| sqrt(pi/2) / d * <S Pi q, sign(S r)>).
// Record: key codes | key s (fp16) | [QJL: sign bits d/8 | ||r|| fp16] | value codes | value s.
// Scores run on codes against the rotated query; values accumulate in the rotated domain and the
// output is un-rotated once.
class TurboCodec final : public KvCodec {
 public:
  static absl::StatusOr<std::unique_ptr<TurboCodec>> Create(const KvFormatSpec& spec, int d) {
    auto key_cb = TurboCodebook::Create(d, spec.qjl_keys ? spec.key_bits - 1 : spec.key_bits);
    if (!key_cb.ok()) return key_cb.status();
    auto value_cb = TurboCodebook::Create(d, spec.value_bits);
    if (!value_cb.ok()) return value_cb.status();
    return std::unique_ptr<TurboCodec>(new TurboCodec(d, *std::move(key_cb), *std::move(value_cb),
                                                      spec.qjl_keys, spec.tq_debias,
                                                      spec.residual_tokens));
  }

  int residual_tokens() const override { return residual_; }
  int residual_flush_tokens() const override { return kTurboResidualFlushTokens; }
  bool rotated_keys() const override { return true; }
  bool rotated_values() const override { return true; }
  int prepared_query_floats() const override { return qjl_ ? 2 * head_dim() : head_dim(); }

  void PrepareQuery(const float* q, float* prepared) const override {
    const int d = head_dim();
    std::memcpy(prepared, q, sizeof(float) * d);
    rotation_.Rotate(prepared);
    if (qjl_) {
      for (int i = 0; i < d; ++i) prepared[d + i] = Dot(&qjl_matrix_[i * d], prepared, d);
    }
  }

  void Encode(int n, const float* k, const float* v, int64_t stride, const HeadCodecState&,
              uint8_t* const* records) const override {
    const int d = head_dim();
    float u[512], uhat[512];
    for (int i = 0; i < n; ++i) {
      uint8_t* rec = records[i];
      const float key_norm = Normalize(k + i * stride, u);
      key_cb_.Quantize(u, rec, uhat);
      if (!qjl_) {
        StoreHalf(rec + key_cb_.code_bytes(), CorrectedScale(key_norm, uhat, key_cb_, debias_, d));
      } else {
        StoreHalf(rec + key_cb_.code_bytes(), std::min(key_norm, 65504.0f));
        for (int c = 0; c < d; ++c) u[c] -= uhat[c];  // residual r
        const float r_norm = std::sqrt(Dot(u, u, d));
        uint8_t* signs = rec + key_cb_.code_bytes() + 2;
        std::memset(signs, 0, d / 8);
        for (int row = 0; row < d; ++row) {
          if (Dot(&qjl_matrix_[row * d], u, d) >= 0) signs[row >> 3] |= 1 << (row & 7);
        }
        StoreHalf(signs + d / 8, r_norm);
      }
      uint8_t* vrec = rec + key_bytes();
      const float value_norm = Normalize(v + i * stride, u);
      value_cb_.Quantize(u, vrec, uhat);
      StoreHalf(vrec + value_cb_.code_bytes(),
                CorrectedScale(value_norm, uhat, value_cb_, debias_, d));
    }
  }

  void DecodeKeys(int n, const uint8_t* const* records, const HeadCodecState&,
                  float* keys) const override {
    const int d = head_dim();
    for (int i = 0; i < n; ++i) {
      float* out = keys + i * d;
      key_cb_.Dequantize(records[i], out);
      const float s = LoadHalf(records[i] + key_cb_.code_bytes());
      if (qjl_) {  // dequantized TurboQuant_prod: uhat + ||r|| sqrt(pi/2)/d S^T sign
        const uint8_t* signs = records[i] + key_cb_.code_bytes() + 2;
        const float coef = LoadHalf(signs + d / 8) * kSqrtHalfPi / d;
        for (int row = 0; row < d; ++row) {
          const float sign = (signs[row >> 3] >> (row & 7)) & 1 ? coef : -coef;
          Axpy(sign, &qjl_matrix_[row * d], out, d);
        }
      }
      for (int c = 0; c < d; ++c) out[c] *= s;
    }
  }

  void KeyScores(int n, const uint8_t* const* records, const HeadCodecState& state, int num_queries,
                 const float* prepared_q, float* scores, float* scratch) const override {
    const int d = head_dim(), pq = prepared_query_floats();
    for (int i = 0; i < n; ++i) key_cb_.Dequantize(records[i], scratch + i * d);
    for (int i = 0; i < n; ++i) {
      const float s = LoadHalf(records[i] + key_cb_.code_bytes());
      const uint8_t* signs = records[i] + key_cb_.code_bytes() + 2;
      const float coef = qjl_ ? LoadHalf(signs + d / 8) * kSqrtHalfPi / d : 0.0f;
      for (int j = 0; j < num_queries; ++j) {
        const float* q = prepared_q + j * pq;
        float score = Dot(q, scratch + i * d, d);
        if (qjl_) {
          float proj = 0;
          for (int row = 0; row < d; ++row) {
            proj += (signs[row >> 3] >> (row & 7)) & 1 ? q[d + row] : -q[d + row];
          }
          score += coef * proj;
        }
        scores[j * n + i] = s * score;
      }
    }
  }

  void DecodeValues(int n, const uint8_t* const* records, const HeadCodecState&,
                    float* values) const override {
    const int d = head_dim();
    for (int i = 0; i < n; ++i) {
      const uint8_t* vrec = records[i] + key_bytes();
      value_cb_.Dequantize(vrec, values + i * d);
      const float s = LoadHalf(vrec + value_cb_.code_bytes());
      for (int c = 0; c < d; ++c) values[i * d + c] *= s;
    }
  }

  void KeyToOriginal(float* row) const override { rotation_.Unrotate(row); }
  void ValueToOriginal(float* row) const override { rotation_.Unrotate(row); }
  void OriginalToKeyDomain(float* row) const override { rotation_.Rotate(row); }
  void OriginalToValueDomain(float* row) const override { rotation_.Rotate(row); }

 private:
  static constexpr float kSqrtHalfPi = 1.2533141373155003f;

  TurboCodec(int d, TurboCodebook key_cb, TurboCodebook value_cb, bool qjl, bool debias,
             int residual)
      : KvCodec(d, key_cb.code_bytes() + 2 + (qjl ? d / 8 + 2 : 0), value_cb.code_bytes() + 2),
        key_cb_(std::move(key_cb)),
        value_cb_(std::move(value_cb)),
        qjl_(qjl),
        debias_(debias),
        residual_(residual),
        rotation_(d) {
    if (qjl_) {
      SplitMix64 rng(kQjlSeed ^ static_cast<uint64_t>(d));
      qjl_matrix_.resize(static_cast<size_t>(d) * d);
      for (float& s : qjl_matrix_) s = static_cast<float>(rng.Gaussian());
    }
  }

  // u <- Pi x / ||x|| (zero vector stays zero); returns ||x||.
  float Normalize(const float* x, float* u) const {
    const int d = head_dim();
    std::memcpy(u, x, sizeof(float) * d);
    const float norm = std::sqrt(Dot(u, u, d));
    const float inv = norm > 0 ? 1.0f / norm : 0.0f;
    for (int c = 0; c < d; ++c) u[c] *= inv;
    rotation_.Rotate(u);
    return norm;
  }
  // ||x|| / ||uhat|| (norm correction) times the codebook's debias factor (1 without debias),
  // capped at the fp16 maximum. The CUDA encoder (kernels/cuda/kv_append.cu) computes the same
  // float expression: division, then multiplication, each rounded.
  static float CorrectedScale(float norm, const float* uhat, const TurboCodebook& cb, bool debias,
                              int d) {
    const float recon = std::sqrt(Dot(uhat, uhat, d));
    if (!(recon > 0)) return 0.0f;
    const float corrected = norm / recon;
    return std::min(debias ? corrected * cb.norm_debias() : corrected, 65504.0f);
  }

  TurboCodebook key_cb_, value_cb_;
  bool qjl_;
  bool debias_;   // norms times the codebook's norm_debias() (QJL keys: never, already unbiased)
  int residual_;  // R: newest tokens the cache keeps in fp16
  HadamardRotation rotation_;
  std::vector<float> qjl_matrix_;  // [d, d] row-major
};

// ---- The dispatch table -------------------------------------------------------------------------

struct SupportedCombination {
  KvFormatKind kind;
  std::vector<int> head_dims;
};

const std::vector<SupportedCombination>& SupportedTable() {
  static const auto* table = new std::vector<SupportedCombination>{
      {KvFormatKind::kFp16, {32, 64, 80, 96, 128, 256}},
      {KvFormatKind::kBf16, {32, 64, 80, 96, 128, 256}},
      {KvFormatKind::kFp8, {32, 64, 80, 96, 128, 256}},
      {KvFormatKind::kInt8, {32, 64, 80, 96, 128, 256}},
      {KvFormatKind::kKivi, {32, 64, 128, 256}},  // G | head_dim
      {KvFormatKind::kTurbo, {64, 128, 256}},     // power of two (Hadamard)
  };
  return *table;
}

std::string KindName(KvFormatKind kind) {
  switch (kind) {
    case KvFormatKind::kFp16:
      return "fp16";
    case KvFormatKind::kBf16:
      return "bf16";
    case KvFormatKind::kFp8:
      return "fp8";
    case KvFormatKind::kInt8:
      return "int8";
    case KvFormatKind::kKivi:
      return "kivi";
    case KvFormatKind::kTurbo:
      return "turboquant";
  }
  return "?";
}

}  // namespace

absl::StatusOr<std::unique_ptr<KvCodec>> CreateKvCodec(const KvFormatSpec& spec, int head_dim) {
  bool supported = false;
  for (const auto& row : SupportedTable()) {
    if (row.kind != spec.kind) continue;
    supported =
        std::find(row.head_dims.begin(), row.head_dims.end(), head_dim) != row.head_dims.end();
  }
  if (!supported) {
    return absl::UnimplementedError(absl::StrCat("KV format ", spec.name, " (", KindName(spec.kind),
                                                 ") has no CPU kernel for head_dim ", head_dim));
  }
  switch (spec.kind) {
    case KvFormatKind::kFp16:
      return std::unique_ptr<KvCodec>(new Half16Codec<false>(head_dim));
    case KvFormatKind::kBf16:
      return std::unique_ptr<KvCodec>(new Half16Codec<true>(head_dim));
    case KvFormatKind::kFp8:
      return std::unique_ptr<KvCodec>(new Fp8Codec(head_dim));
    case KvFormatKind::kInt8:
      return std::unique_ptr<KvCodec>(new Int8Codec(head_dim));
    case KvFormatKind::kKivi: {
      const int bits = static_cast<int>(spec.key_bits);
      const int group = spec.group_size;
      if ((bits != 2 && bits != 4) || spec.value_bits != spec.key_bits) {
        return absl::UnimplementedError(
            absl::StrFormat("KIVI supports 2 or 4 bits for keys and values alike (got k=%g v=%g)",
                            spec.key_bits, spec.value_bits));
      }
      // R = 0 would leave no window to gather whole key groups in: the cache would encode each
      // append's rows directly, in groups that run past the end of a call that is not a multiple
      // of G.
      if (spec.residual_tokens <= 0) {
        return absl::UnimplementedError(absl::StrFormat(
            "KIVI needs an fp16 residual window of R > 0 tokens to gather its key groups of G "
            "tokens in (got R=%d, G=%d)",
            spec.residual_tokens, group));
      }
      if (group <= 0 || head_dim % group != 0 || spec.residual_tokens % group != 0) {
        return absl::UnimplementedError(
            absl::StrFormat("KIVI needs G | head_dim and G | R (G=%d, R=%d, head_dim=%d)", group,
                            spec.residual_tokens, head_dim));
      }
      return std::unique_ptr<KvCodec>(new KiviCodec(head_dim, bits, group, spec.residual_tokens));
    }
    case KvFormatKind::kTurbo: {
      if (spec.residual_tokens < 0) {
        return absl::InvalidArgumentError(absl::StrCat(
            "TurboQuant residual window must be >= 0 (got ", spec.residual_tokens, ")"));
      }
      auto codec = TurboCodec::Create(spec, head_dim);
      if (!codec.ok()) return codec.status();
      return std::unique_ptr<KvCodec>(std::move(*codec));
    }
  }
  return absl::UnimplementedError("unknown KV format kind");
}

}  // namespace kvgate::kernels::cpu

namespace kvgate::kernels {

absl::StatusOr<KvFormatDesc> DescribeKvFormat(const KvFormatSpec& spec, int head_dim) {
  auto codec = cpu::CreateKvCodec(spec, head_dim);
  if (!codec.ok()) return codec.status();
  KvFormatDesc desc;
  desc.spec = spec;
  desc.head_dim = head_dim;
  desc.bytes_per_token_per_head = (*codec)->record_bytes();
  return desc;
}

absl::StatusOr<TurboKeyLayout> DescribeTurboKeys(const KvFormatSpec& spec, int head_dim) {
  if (spec.kind != KvFormatKind::kTurbo) {
    return absl::InvalidArgumentError(
        absl::StrCat("DescribeTurboKeys: ", spec.name, " is not TurboQuant"));
  }
  if (spec.qjl_keys) return absl::UnimplementedError("DescribeTurboKeys: QJL keys");
  auto codebook = cpu::TurboCodebook::Create(head_dim, spec.key_bits);
  if (!codebook.ok()) return codebook.status();
  TurboKeyLayout layout;
  if (absl::Status st = cpu::TurboChannelSplit(head_dim, spec.key_bits, &layout.hi_channels,
                                               &layout.hi_bits, &layout.lo_bits);
      !st.ok()) {
    return st;
  }
  layout.code_bytes = codebook->code_bytes();
  // TurboCodebook::Create's centroids and HadamardRotation's signs, computed the same way.
  const float inv_sqrt_d = 1.0f / std::sqrt(static_cast<float>(head_dim));
  for (float g : cpu::LloydMaxLevels(layout.hi_bits)) layout.hi_centroids.push_back(g * inv_sqrt_d);
  for (float g : cpu::LloydMaxLevels(layout.lo_bits)) layout.lo_centroids.push_back(g * inv_sqrt_d);
  cpu::SplitMix64 rng(cpu::kTurboSignSeed ^ static_cast<uint64_t>(head_dim));
  layout.signs.resize(head_dim);
  for (float& sign : layout.signs) sign = (rng.Next() >> 63) ? -1.0f : 1.0f;
  return layout;
}

absl::Status RoundTripKv(const KvFormatSpec& spec, int head_dim, KvTensorRole role, int64_t n,
                         const float* in, float* out) {
  if (n < 0) return absl::InvalidArgumentError("RoundTripKv: negative row count");
  auto codec_or = cpu::CreateKvCodec(spec, head_dim);
  if (!codec_or.ok()) return codec_or.status();
  const cpu::KvCodec& codec = **codec_or;
  const int d = head_dim, group = codec.key_group_tokens();
  cpu::HeadCodecState state;
  codec.ChooseScales(n, in, in, d, &state);
  std::vector<float> rows(static_cast<size_t>(group) * d), decoded(static_cast<size_t>(group) * d);
  std::vector<uint8_t> storage(static_cast<size_t>(group) * codec.record_bytes());
  std::vector<uint8_t*> records(group);
  for (int i = 0; i < group; ++i) records[i] = storage.data() + i * codec.record_bytes();
  for (int64_t start = 0; start < n; start += group) {
    const int count = static_cast<int>(std::min<int64_t>(group, n - start));
    for (int i = 0; i < group; ++i) {  // a short last group repeats its last row
      std::memcpy(&rows[i * d], in + (start + std::min(i, count - 1)) * d, sizeof(float) * d);
    }
    codec.Encode(group, rows.data(), rows.data(), d, state, records.data());
    if (role == KvTensorRole::kKeys) {
      codec.DecodeKeys(group, records.data(), state, decoded.data());
    } else {
      codec.DecodeValues(group, records.data(), state, decoded.data());
    }
    for (int i = 0; i < count; ++i) {
      float* row = &decoded[i * d];
      if (role == KvTensorRole::kKeys) {
        codec.KeyToOriginal(row);
      } else {
        codec.ValueToOriginal(row);
      }
      std::memcpy(out + (start + i) * d, row, sizeof(float) * d);
    }
  }
  return absl::OkStatus();
}

}  // namespace kvgate::kernels
