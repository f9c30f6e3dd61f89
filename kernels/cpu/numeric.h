// Scalar number formats used by the CPU KV cache: IEEE fp16, bfloat16 and OCP FP8 E4M3FN, with
// round-to-nearest-even conversions from float, plus a small deterministic random source.
//
// The fp16 conversions are the branch-light bit manipulations of the FP16 library (Marat
// Dukhan), correct for all inputs including subnormals, infinities and NaN; they vectorize.
//
//   uint16_t h = FloatToHalf(1.5f);   float x = HalfToFloat(h);     // x == 1.5f
//   uint8_t e = FloatToE4M3(300.f);   float y = E4M3ToFloat(e);     // y == 288.f (nearest)
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

namespace kvgate::kernels::cpu {

inline uint32_t FloatBits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
inline float BitsFloat(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// IEEE binary16 -> binary32 (exact).
inline float HalfToFloat(uint16_t h) {
  const uint32_t w = static_cast<uint32_t>(h) << 16;
  const uint32_t sign = w & 0x80000000u;
  const uint32_t two_w = w + w;
  const uint32_t exp_offset = 0xE0u << 23;
  const float exp_scale = 0x1.0p-112f;
  const float normalized = BitsFloat((two_w >> 4) + exp_offset) * exp_scale;
  const uint32_t magic_mask = 126u << 23;
  const float magic_bias = 0.5f;
  const float denormalized = BitsFloat((two_w >> 17) | magic_mask) - magic_bias;
  const uint32_t denormalized_cutoff = 1u << 27;
  const uint32_t result =
      sign | (two_w < denormalized_cutoff ? FloatBits(denormalized) : FloatBits(normalized));
  return BitsFloat(result);
}

// binary32 -> binary16, round to nearest even; overflow gives infinity, NaN stays NaN.
inline uint16_t FloatToHalf(float f) {
  const float scale_to_inf = 0x1.0p+112f;
  const float scale_to_zero = 0x1.0p-110f;
  float base = (std::fabs(f) * scale_to_inf) * scale_to_zero;
  const uint32_t w = FloatBits(f);
  const uint32_t shl1_w = w + w;
  const uint32_t sign = w & 0x80000000u;
  uint32_t bias = shl1_w & 0xFF000000u;
  if (bias < 0x71000000u) bias = 0x71000000u;
  base = BitsFloat((bias >> 1) + 0x07800000u) + base;
  const uint32_t bits = FloatBits(base);
  const uint32_t exp_bits = (bits >> 13) & 0x00007C00u;
  const uint32_t mantissa_bits = bits & 0x00000FFFu;
  const uint32_t nonsign = exp_bits + mantissa_bits;
  return static_cast<uint16_t>((sign >> 16) | (shl1_w > 0xFF000000u ? 0x7E00u : nonsign));
}

inline float RoundToHalf(float f) { return HalfToFloat(FloatToHalf(f)); }

// bfloat16: the upper half of a float, round to nearest even.
inline float Bf16ToFloat(uint16_t b) { return BitsFloat(static_cast<uint32_t>(b) << 16); }
inline uint16_t FloatToBf16(float f) {
  uint32_t u = FloatBits(f);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return static_cast<uint16_t>((u >> 16) | 0x40u);  // NaN
  u += 0x7FFFu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

// OCP FP8 E4M3FN: 1 sign, 4 exponent (bias 7), 3 mantissa bits; max finite 448, no infinities,
// 0x7F / 0xFF are NaN. Codes 0..126 are monotone in magnitude.
inline constexpr float kE4M3Max = 448.0f;
float E4M3ToFloat(uint8_t code);  // table lookup
// Saturating: |x| > 448 encodes as +-448; NaN encodes as 0x7F; round to nearest even.
uint8_t FloatToE4M3(float x);

// SplitMix64: the deterministic random source behind the TurboQuant sign vector and QJL matrix
// (portable across standard libraries, unlike std:: distributions).
class SplitMix64 {
 public:
  explicit SplitMix64(uint64_t seed) : state_(seed) {}
  uint64_t Next() {
    uint64_t z = (state_ += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
  }
  // Uniform in (0, 1).
  double Uniform() { return (static_cast<double>(Next() >> 11) + 0.5) * 0x1.0p-53; }
  // Standard normal (Box-Muller, one value per call).
  double Gaussian() {
    const double u1 = Uniform(), u2 = Uniform();
    return std::sqrt(-2.0 * std::log(u1)) * std::cos(6.283185307179586 * u2);
  }

 private:
  uint64_t state_;
};

}  // namespace kvgate::kernels::cpu
