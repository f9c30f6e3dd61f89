// Byte layout of the INT8 KV record (one token of one kv-head in the paged pool), the one
// definition for every backend that writes or reads it: the CPU codec (kernels/cpu/kv_codec.cc,
// the reference), the CUDA append / read-back and decode attention (kernels/cuda), and the CUDA
// H2O mass kernel (workers/backend/cuda/cuda_kv_evict.cu). Header-only, no dependencies, usable
// in host and device code.
//
//   [key codes: d x int8][value codes: d x int8][key scale: fp16][value scale: fp16]
//
// d + 2 bytes per key and per value as before (2d + 4 = 260 bytes at d = 128), so capacity, block
// sizes and record-granular compaction do not depend on the order. The codes come first so that
// both code vectors start 4-byte aligned whenever the record does (records are 2d + 4 = 4 (d/2 + 1)
// bytes, so every record of a 16-byte aligned block segment is): decode reads them with aligned
// 32-bit loads. The two scales are adjacent: one 32-bit load reads both (key scale in the low
// half).
//
//   const uint8_t* rec = ...;  // a record of head_dim d
//   const int8_t* value_codes = reinterpret_cast<const int8_t*>(rec + Int8Record::ValueCodes(d));
//   uint16_t key_scale_fp16; std::memcpy(&key_scale_fp16, rec + Int8Record::KeyScale(d), 2);
#pragma once

#if defined(__CUDACC__)
#define KVGATE_RECORD_LAYOUT_FN __host__ __device__ __forceinline__ constexpr
#else
#define KVGATE_RECORD_LAYOUT_FN inline constexpr
#endif

namespace kvgate::kernels {

// Offsets (bytes from the record's start) of an INT8 record with head_dim d (a multiple of 4).
struct Int8Record {
  static KVGATE_RECORD_LAYOUT_FN int KeyCodes(int /*d*/) { return 0; }
  static KVGATE_RECORD_LAYOUT_FN int ValueCodes(int d) { return d; }
  static KVGATE_RECORD_LAYOUT_FN int KeyScale(int d) { return 2 * d; }
  static KVGATE_RECORD_LAYOUT_FN int ValueScale(int d) { return 2 * d + 2; }
  static KVGATE_RECORD_LAYOUT_FN int Bytes(int d) { return 2 * d + 4; }
};

// KIVI under eviction: the key-group offset byte (kvgate/kernels/cuda_kv_append.h, key_offsets)
// of a solo key, whose (scale, min) per G channels sit in its own record as a value's do.
inline constexpr unsigned char kSoloKeyOffset = 0xFF;

}  // namespace kvgate::kernels

#undef KVGATE_RECORD_LAYOUT_FN
