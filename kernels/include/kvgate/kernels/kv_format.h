// KV-cache formats: how keys and values of one token are stored in the paged cache.
//
// A format is parsed from the worker's `--kv` flag and described by a KvFormatSpec; the
// KvFormatDesc derived from it for a head_dim gives the exact bytes each token occupies, so that
// capacity planning (blocks per GPU, sequences that fit) is computed, never guessed.
//
//   ASSIGN_OR_RETURN(KvFormatSpec spec, ParseKvFormat("kivi2"));
//   ASSIGN_OR_RETURN(KvFormatDesc desc, DescribeKvFormat(spec, /*head_dim=*/128));
//   int64_t bytes = desc.bytes_per_token_per_head;   // keys + values + metadata, amortized
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace kvgate::kernels {

enum class KvFormatKind {
  kFp16,
  kBf16,
  kFp8,     // E4M3 (OCP, max 448), scale per (layer, kv-head)
  kInt8,    // symmetric, fp16 scale per (token, kv-head)
  kKivi,    // KIVI: keys per channel over G tokens, values per token over G channels
  kTurbo,   // TurboQuant: Hadamard rotation + Lloyd-Max codebook + fp16 norm
};

// Eviction combined with any format.
struct EvictionSpec {
  enum class Kind { kNone, kH2O, kSink } kind = Kind::kNone;
  double heavy_fraction = 0.1;   // H2O: fraction of tokens kept by accumulated attention
  double recent_fraction = 0.1;  // H2O: fraction kept as the newest tokens
  int sink_tokens = 4;           // StreamingLLM: first tokens kept
  int window_tokens = 1024;      // StreamingLLM: newest tokens kept
};

struct KvFormatSpec {
  KvFormatKind kind = KvFormatKind::kFp16;
  std::string name = "fp16";  // canonical name, e.g. "fp16", "kivi2", "tq3.5", "tq:k=4,v=3"
  // Bits per element for keys / values (fractional for TurboQuant outlier splits, e.g. 3.5).
  double key_bits = 16;
  double value_bits = 16;
  int group_size = 32;        // KIVI G
  int residual_tokens = 128;  // KIVI and TurboQuant R: newest tokens kept in fp16
  bool qjl_keys = false;      // TurboQuant_prod: 1-bit QJL residual on keys
  bool tq_debias = true;      // TurboQuant: stored norms unbias inner products (debias=0: off)
  int full_precision_first_layers = 0;  // layers kept in fp16 at the start
  int full_precision_last_layers = 0;   // and at the end
  EvictionSpec eviction;
};

// Parses "fp16", "bf16", "fp8", "int8", "kivi2", "kivi4", "tq4", "tq3.5", "tq3", "tq2.5",
// "tq:k=4,v=3[,qjl][,r=R][,debias=0]" (R: TurboQuant's fp16 window of the newest tokens, default
// 128; r=0 encodes every token; debias=0 stores the plain norm-corrected scale, which shrinks
// scores by ~sqrt(1 - D): kept to measure it), each optionally followed by "/fp16=F:L": the first F and the last L layers
// keep fp16 KV (e.g. "tq4/fp16=1:1"). The canonical name (spec.name) is what workers report and
// policies declare. InvalidArgumentError lists the accepted names otherwise.
absl::StatusOr<KvFormatSpec> ParseKvFormat(std::string_view text);
// Parses "none", "h2o:heavy=0.1,recent=0.1", "sink:sinks=4,window=1024".
absl::StatusOr<EvictionSpec> ParseEviction(std::string_view text);
std::string EvictionToString(const EvictionSpec& spec);

// Storage description of a format for one head_dim.
struct KvFormatDesc {
  KvFormatSpec spec;
  int head_dim = 0;
  // Bytes one token occupies for one kv-head in one layer, keys + values + per-token or amortized
  // per-group metadata (KIVI's fp16 residual window is accounted separately per sequence).
  double bytes_per_token_per_head = 0;
};

// UnimplementedError for a (format, head_dim) combination no kernel supports.
absl::StatusOr<KvFormatDesc> DescribeKvFormat(const KvFormatSpec& spec, int head_dim);

// How TurboQuant (without QJL) stores and scores a key, for kernels outside the codecs that score
// the stored codes (the CUDA H2O mass kernel): key record = codes | fp16 norm s at code_bytes;
// rotated channel c < hi_channels has a hi_bits code (LSB-first from bit c * hi_bits), channel
// c >= hi_channels a lo_bits code from bit hi_channels * hi_bits + (c - hi_channels) * lo_bits;
// the score of a prepared query qr = Pi q (signs, then the orthonormal Walsh-Hadamard transform)
// is s * sum_c qr[c] * centroid(c, code_c). Every value is the CPU codec's (kv_codec.cc).
struct TurboKeyLayout {
  int hi_channels = 0, hi_bits = 0, lo_bits = 0, code_bytes = 0;
  std::vector<float> hi_centroids, lo_centroids;  // 2^bits entries each
  std::vector<float> signs;                       // [head_dim] the rotation's +-1 diagonal
};
// InvalidArgumentError for a spec that is not TurboQuant, UnimplementedError for QJL keys.
absl::StatusOr<TurboKeyLayout> DescribeTurboKeys(const KvFormatSpec& spec, int head_dim);

// Which half of the cache a tensor is (formats treat keys and values differently).
enum class KvTensorRole { kKeys, kValues };

// Quantizes n rows in/out [n, head_dim] float32 as the CPU cache stores them and writes the
// reconstruction attention sees, in the original basis. Differences from a cache: FP8's scale comes
// from the amax of all n rows (they are the "first chunk"); KIVI quantizes every row (no fp16
// residual window), keys in groups of G consecutive rows (a short last group is padded by
// repeating its last row); TurboQuant keys with QJL return the TurboQuant_prod dequantization
// (x_mse + ||x|| ||r|| sqrt(pi/2)/d S^T sign(S r)). in and out may not alias.
absl::Status RoundTripKv(const KvFormatSpec& spec, int head_dim, KvTensorRole role, int64_t n,
                         const float* in, float* out);

}  // namespace kvgate::kernels
