// Device scalar conversions and KIVI quantization steps, bit-identical to kernels/cpu/numeric.h
// and kernels/cpu/kv_codec.cc: the device append (kv_append.cu) and the KV cache's eviction
// (workers/backend/cuda/cuda_kv_evict.cu, which re-encodes KIVI solo keys) write the CPU codec's
// bytes with them.
//
//   const MinScaleResult ms = KiviMinScale(lo, hi, /*levels=*/15);
//   const uint32_t code = KiviCode(x, ms.min, ms.scale, 15);
#pragma once

#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace kvgate::kernels::cuda::internal {

// ---- Scalar conversions, bit-identical to kernels/cpu/numeric.h and kv_codec.cc ---------------

__device__ __forceinline__ float HalfToFloat(uint16_t h) {
  return __half2float(__ushort_as_half(h));
}

// FloatToHalf: round to nearest even (cvt.rn is IEEE), NaN as sign | 0x7E00.
__device__ __forceinline__ uint16_t FloatToHalf(float x) {
  if (isnan(x)) return static_cast<uint16_t>(((__float_as_uint(x) >> 16) & 0x8000u) | 0x7E00u);
  return __half_as_ushort(__float2half_rn(x));
}

__device__ __forceinline__ uint16_t FloatToBf16(float x) {
  uint32_t u = __float_as_uint(x);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return static_cast<uint16_t>((u >> 16) | 0x40u);
  u += 0x7FFFu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

// FloatToE4M3: saturating to +-448, round to nearest even, NaN -> 0x7F.
__device__ __forceinline__ uint8_t FloatToE4M3(float x) {
  if (isnan(x)) return 0x7F;
  const uint32_t sign = (__float_as_uint(x) >> 24) & 0x80u;
  const float a = fminf(fabsf(x), 448.0f);
  uint32_t code;
  if (a < 0x1.0p-6f) {  // subnormal range: step 2^-9
    code = __float2uint_rn(__fmul_rn(a, 512.0f));
  } else {
    const int exponent = static_cast<int>(__float_as_uint(a) >> 23) - 127;  // a is normal
    // a * 2^(3 - exponent) in [8, 16]: an exact scaling, then round half to even.
    int q =
        __float2int_rn(__fmul_rn(a, __uint_as_float(static_cast<uint32_t>(130 - exponent) << 23)));
    int biased = exponent + 7;
    if (q == 16) {
      q = 8;
      ++biased;
    }
    code = static_cast<uint32_t>((biased << 3) | (q - 8));
    if (code > 0x7E) code = 0x7E;
  }
  return static_cast<uint8_t>(code | sign);
}

__device__ __forceinline__ float E4M3ToFloat(uint32_t code) {
  const uint32_t exponent = (code >> 3) & 0xF, mantissa = code & 7;
  float magnitude;
  if ((code & 0x7F) == 0x7F) {
    magnitude = __uint_as_float(0x7FC00000u);
  } else if (exponent == 0) {
    magnitude = __fmul_rn(static_cast<float>(mantissa), 0x1.0p-9f);
  } else {
    magnitude = __uint_as_float(((exponent + 120) << 23) | (mantissa << 20));
  }
  return (code & 0x80) ? -magnitude : magnitude;
}

__device__ __forceinline__ uint16_t HalfNextDown(uint16_t h) {
  if ((h & 0x7FFF) == 0) return 0x8001;
  return (h & 0x8000) ? h + 1 : h - 1;
}
__device__ __forceinline__ uint16_t HalfNextUp(uint16_t h) {
  if ((h & 0x7FFF) == 0) return 0x0001;
  return (h & 0x8000) ? h - 1 : h + 1;
}
__device__ __forceinline__ uint16_t HalfRoundDown(float x) {
  uint16_t h = FloatToHalf(x);
  while (HalfToFloat(h) > x) h = HalfNextDown(h);
  return h;
}
__device__ __forceinline__ uint16_t HalfRoundUp(float x) {
  uint16_t h = FloatToHalf(65504.0f < x ? 65504.0f : x);  // std::min(x, 65504.0f)
  while (HalfToFloat(h) < x && h != 0x7BFF) h = HalfNextUp(h);
  return h;
}

// std::min(a, b) / std::max(a, b) with a the earlier value: the first of equals wins.
__device__ __forceinline__ float MinFirst(float a, float b) { return b < a ? b : a; }
__device__ __forceinline__ float MaxFirst(float a, float b) { return a < b ? b : a; }

// KIVI's MinScale and Code (kv_codec.cc). Outputs the fp16 bits stored in the record too.
struct MinScaleResult {
  float min, scale;
  uint32_t packed;  // fp16 scale | fp16 min << 16, the record's 4 metadata bytes
};
__device__ __forceinline__ MinScaleResult KiviMinScale(float lo, float hi, int levels) {
  MinScaleResult r;
  r.min = HalfToFloat(HalfRoundDown(lo));
  r.scale =
      hi > r.min
          ? HalfToFloat(HalfRoundUp(__fdiv_rn(__fsub_rn(hi, r.min), static_cast<float>(levels))))
          : 0.0f;
  r.packed = FloatToHalf(r.scale) | (static_cast<uint32_t>(FloatToHalf(r.min)) << 16);
  return r;
}
__device__ __forceinline__ uint32_t KiviCode(float x, float mn, float scale, int levels) {
  if (!(scale > 0)) return 0;
  const float q = rintf(__fdiv_rn(__fsub_rn(x, mn), scale));
  const float top = static_cast<float>(levels);
  return static_cast<uint32_t>(q < 0.0f ? 0.0f : (top < q ? top : q));
}

}  // namespace kvgate::kernels::cuda::internal
