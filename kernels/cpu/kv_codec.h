// KvCodec: how one KV format stores the keys and values of one token of one kv-head in a fixed-size
// record of the paged pool, and how attention reads them back. Internal to kvgate_kernels_cpu
// (and its tests); workers use kv_cache.h.
//
// Every format is one KvCodec subclass; CreateKvCodec() is the ONE dispatch point over
// (format, head_dim), driven by a table of supported combinations (UnimplementedError otherwise).
//
//   ASSIGN_OR_RETURN(std::unique_ptr<KvCodec> codec, CreateKvCodec(spec, /*head_dim=*/128));
//   codec->Encode(n, k, v, /*stride=*/128, state, records);         // records[i]: token i's record
//   codec->KeyScores(n, records, state, nq, prepared_q, scores);    // <q, k_i> for nq queries
//
// Domains: a codec may store keys and/or values in a rotated basis (TurboQuant: y = Pi x, with
// Pi = H D / sqrt(d) orthonormal). Scores are computed against PrepareQuery(q), which is in the
// key domain; DecodeValues returns rows in the value domain, and ValueToOriginal maps an
// accumulated output row back. For every other format both domains are the original one.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "absl/status/statusor.h"
#include "kvgate/kernels/kv_format.h"

namespace kvgate::kernels::cpu {

// Per (sequence, layer, kv-head) metadata that is not per token: FP8's dynamic scales.
struct HeadCodecState {
  float key_scale = 0;  // 0: not chosen yet
  float value_scale = 0;
};

class KvCodec {
 public:
  KvCodec(int head_dim, int key_bytes, int value_bytes)
      : head_dim_(head_dim), key_bytes_(key_bytes), value_bytes_(value_bytes) {}
  virtual ~KvCodec() = default;

  int head_dim() const { return head_dim_; }
  // A token's record holds key_bytes of key and value_bytes of value: [key | value] for every
  // format but INT8, whose codes precede both scales (kvgate/kernels/kv_record_layout.h).
  int key_bytes() const { return key_bytes_; }
  int value_bytes() const { return value_bytes_; }
  int record_bytes() const { return key_bytes_ + value_bytes_; }

  // Keys are encoded this many consecutive tokens at a time (KIVI: G; others 1). Encode()'s n is
  // a multiple of it and DecodeKeys/KeyScores read whole groups.
  virtual int key_group_tokens() const { return 1; }
  // Tokens the cache keeps in an fp16 residual window before encoding them (KIVI and TurboQuant:
  // R; others 0). The window holds the newest tokens in the original basis.
  virtual int residual_tokens() const { return 0; }
  // Tokens the cache encodes at a time out of its residual window, once the window holds
  // residual_tokens() + this many (a multiple of key_group_tokens(); KIVI: G, TurboQuant: 16, so
  // that the window shifts once per 16 decode steps rather than at every step).
  virtual int residual_flush_tokens() const { return key_group_tokens(); }
  virtual bool rotated_keys() const { return false; }
  virtual bool rotated_values() const { return false; }

  // FP8 only: fixes state's scales from the first chunk with a nonzero amax (no-op otherwise).
  // k, v: [n, stride] rows, head_dim used.
  virtual void ChooseScales(int64_t n, const float* k, const float* v, int64_t stride,
                            HeadCodecState* state) const {}

  // Encodes n tokens (rows of k and v at `stride` floats) into records[i] (record_bytes each).
  virtual void Encode(int n, const float* k, const float* v, int64_t stride,
                      const HeadCodecState& state, uint8_t* const* records) const = 0;

  // Floats of a prepared query (PrepareQuery output).
  virtual int prepared_query_floats() const { return head_dim_; }
  // q [head_dim] original domain -> prepared [prepared_query_floats()] key domain.
  virtual void PrepareQuery(const float* q, float* prepared) const;

  // keys [n, head_dim] in the key domain.
  virtual void DecodeKeys(int n, const uint8_t* const* records, const HeadCodecState& state,
                          float* keys) const = 0;
  // values [n, head_dim] in the value domain.
  virtual void DecodeValues(int n, const uint8_t* const* records, const HeadCodecState& state,
                            float* values) const = 0;
  // Solo keys: a token whose key group lost members to eviction. A group's metadata is spread over
  // its records (KIVI: token j holds the (scale, min) of channels [j*d/G, (j+1)*d/G)), so an
  // evicted member takes part of it along; the cache re-encodes each survivor's key once, from its
  // group reconstruction, into a self-contained form in the same key bytes (KIVI: b-bit codes with
  // a (scale, min) per G channels, the layout of its values) and moves it like a per-token record
  // from then on. keys [n, head_dim] key domain -> the key part of records[i] (value part kept).
  // Only called for codecs with key_group_tokens() > 1; for the others every key is solo already.
  virtual void EncodeSoloKeys(int n, const float* keys, uint8_t* const* records) const {}
  // Keys of records written by EncodeSoloKeys -> keys [n, head_dim] in the key domain; for codecs
  // with key groups of one token, DecodeKeys.
  virtual void DecodeSoloKeys(int n, const uint8_t* const* records, const HeadCodecState& state,
                              float* keys) const {
    DecodeKeys(n, records, state, keys);
  }
  // scores [num_queries, n] = <prepared_q[j], k_i> (unscaled). scratch: n * head_dim floats.
  virtual void KeyScores(int n, const uint8_t* const* records, const HeadCodecState& state,
                         int num_queries, const float* prepared_q, float* scores,
                         float* scratch) const;

  // In-place maps of one row from the key / value domain back to the original basis, and from the
  // original basis into the domain (attention over the residual window uses the latter).
  virtual void KeyToOriginal(float* row) const {}
  virtual void ValueToOriginal(float* row) const {}
  virtual void OriginalToKeyDomain(float* row) const {}
  virtual void OriginalToValueDomain(float* row) const {}

 private:
  int head_dim_;
  int key_bytes_;
  int value_bytes_;
};

// The dispatch point. UnimplementedError for combinations outside the supported table,
// InvalidArgumentError for malformed specs.
absl::StatusOr<std::unique_ptr<KvCodec>> CreateKvCodec(const KvFormatSpec& spec, int head_dim);

// ---- Building blocks, exposed for tests -------------------------------------------------------

float Dot(const float* a, const float* b, int n);
void Axpy(float alpha, const float* x, float* y, int n);  // y += alpha * x
// acc[n] += sum_i weights[i] * rows[i, :], rows [count, n].
void WeightedRowSum(const float* weights, const float* rows, int count, int n, float* acc);

// In-place orthonormal Walsh-Hadamard transform of x[n] (n a power of two), scaled by 1/sqrt(n).
void FastWalshHadamard(float* x, int n);

// TurboQuant rotation Pi = H D / sqrt(d): D a fixed +-1 diagonal drawn from SplitMix64 seeded
// with kTurboSignSeed ^ d (so every process and every backend uses the same Pi for a head_dim).
inline constexpr uint64_t kTurboSignSeed = 0x6b76676174650001ull;
// Tokens the cache encodes at a time out of TurboQuant's fp16 window (residual_flush_tokens()):
// the window shifts once per 16 decode steps rather than at every step.
inline constexpr int kTurboResidualFlushTokens = 16;
// QJL Gaussian matrix S [d, d], i.i.d. N(0, 1), SplitMix64 seeded with kQjlSeed ^ d.
inline constexpr uint64_t kQjlSeed = 0x6b76676174650002ull;
// The unit vectors behind TurboCodebook::norm_debias(), SplitMix64 seeded with kTurboDebiasSeed ^
// d.
inline constexpr uint64_t kTurboDebiasSeed = 0x6b76676174650003ull;

class HadamardRotation {
 public:
  explicit HadamardRotation(int d);
  void Rotate(float* x) const;    // x <- Pi x
  void Unrotate(float* x) const;  // x <- Pi^T x
 private:
  int d_;
  std::vector<float> signs_;
};

// Unit-Gaussian Lloyd-Max levels (REFERENCES.md), sorted ascending, 2^bits entries, bits 1..4.
const std::vector<float>& LloydMaxLevels(int bits);

// TurboQuant_mse for the rotated coordinates of one vector: channel split [0, hi_channels) at
// hi_bits, [hi_channels, d) at lo_bits; centroids are levels / sqrt(d). Rates and splits:
//   4 / 3 / 2 / 1: every channel at that width;   3.5: d/2 at 4 bits + d/2 at 3;
//   2.5: d/4 at 3 bits + 3d/4 at 2 (the paper's 32 + 96 of 128; 2.25 code bits per channel);
//   1.5: d/2 at 2 bits + d/2 at 1.
// The split is by fixed channel index after rotation: the random-sign Hadamard rotation spreads
// energy (and outliers) evenly over coordinates, so any fixed set is as good as any other.
// The channel split of a TurboQuant rate (the table above): the first *hi_channels rotated
// channels at *hi_bits, the rest at *lo_bits. InvalidArgumentError for another rate. The CUDA
// encoder and decoder take their layout from it too.
absl::Status TurboChannelSplit(int d, double rate, int* hi_channels, int* hi_bits, int* lo_bits);

class TurboCodebook {
 public:
  static absl::StatusOr<TurboCodebook> Create(int d, double rate);
  int code_bytes() const { return code_bytes_; }
  double code_bits_per_channel() const;
  // u [d] rotated coordinates -> packed codes; uhat [d] = the centroid vector.
  void Quantize(const float* u, uint8_t* codes, float* uhat) const;
  void Dequantize(const uint8_t* codes, float* uhat) const;
  // 1 / c, c = E[<u, uhat> / ||uhat||] over unit vectors u: the mean factor by which the
  // norm-corrected reconstruction ||x|| uhat / ||uhat|| shrinks inner products (about
  // sqrt(1 - D_mse): 0.9955 at 4 bits, 0.99 at 3.5, 0.80 at 1, d = 64). The codecs multiply the
  // stored norm by it so that scores and values are unbiased (docs/QUALITY.md, "Why TurboQuant
  // loses retrieval"). Computed once in Create by a fixed-seed Monte Carlo (deterministic).
  float norm_debias() const { return norm_debias_; }

 private:
  int d_ = 0, hi_channels_ = 0, hi_bits_ = 0, lo_bits_ = 0, code_bytes_ = 0;
  float norm_debias_ = 1.0f;
  std::vector<float> hi_centroids_, lo_centroids_, hi_bounds_, lo_bounds_;
};

// Packs count b-bit codes (b in 1..4, count a multiple of 8) LSB-first; and back.
void PackCodes(const uint8_t* codes, int bits, int count, uint8_t* out);
void UnpackCodes(const uint8_t* packed, int bits, int count, uint8_t* codes);

// fp16 rounding of x toward -inf / +inf (KIVI's min and scale, so that no code clamps).
uint16_t HalfRoundDown(float x);
uint16_t HalfRoundUp(float x);

}  // namespace kvgate::kernels::cpu
