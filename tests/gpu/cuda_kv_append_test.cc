// CUDA KV append / read-back (kvgate/kernels/cuda_kv_append.h) against the CPU reference cache
// (CpuKvCache) fed the same appends, for every KV format x head_dim {64, 128} x kv_heads {1, 8}.
// TurboQuant runs with its default fp16 window (R = 128), with r=0 (no window) and with small
// windows (r=32; r=1 and r=40 in TurboWindow below, whose calls mix decode rows and chunks and
// land on the flush boundaries).
//
// Each case runs three sequences through ~50 batched calls in a realistic order (prefill chunks of
// odd lengths, single-token decode steps for the whole batch, further chunks), with state slots
// that are not the identity, batch entries in varying order, random block tables, rows sliced out
// of a fused qkv buffer (row_stride > kv_heads * head_dim) and this layer at a nonzero offset of
// a two-layer pool. Then:
//  (a) record bytes of every stored token equal what the CPU codec writes under CpuKvCache's
//      rules (ReferenceSeq below). fp16 / bf16 / fp8 / int8: identical. KIVI / TurboQuant: the
//      kernels reproduce the CPU's float operations in order, so identical is expected too; the
//      test tolerates what a different summation order could legitimately change: codes off by
//      exactly one level (at most 0.1% of codes; a code one level off decodes one level off) and
//      TurboQuant's fp16 norm by one fp16 ulp. Metadata (KIVI scale/min) must be identical.
//      Bytes outside the stored records (other layer, unused slots, spare blocks) stay untouched.
//  (b) Read() equals CpuKvCache::ReadStored: to 1e-6 of the row's magnitude for tokens whose
//      records equal the reference (the same float operations: exact in practice), and within
//      relative L2 0.25 (one level of a few channels) for tokens with an off-by-one code.
//  (c) FP8 scales are the CPU's, bit for bit; fp16 residual windows (KIVI, TurboQuant R > 0)
//      hold the same fp16 bits, and residual_capacity() is the CPU cache's window size.
//  (d) the GPU-appended pool through CudaDecodeAttention::Run equals CpuKvCache::DecodeAttention
//      to relative L2 < 1e-3 (the decode kernel's own tolerance, cuda_decode_attention_test.cc).
//      Not for TurboQuant with R > 0: the decode kernel does not read its window yet (the r=0
//      variants cover TurboQuant's records there).
// Plus special values (fp16 overflow / subnormals / ties, NaN and infinities where the CPU's
// result is defined, zero rows, FP8 scales chosen after an all-zero first chunk), head_dim 256,
// a block size that is not a power of two with unaligned rows, and bad arguments.
// Skipped with a reason when no GPU is present (Create's argument checks and SplitStoredTokens
// run anyway).
#include "kvgate/kernels/cuda_kv_append.h"

#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cctype>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <functional>
#include <limits>
#include <memory>
#include <numeric>
#include <random>
#include <string>
#include <tuple>
#include <vector>

#include "kernels/cpu/kv_codec.h"
#include "kernels/cpu/numeric.h"
#include "kernels/cuda/paged_kv_host.h"
#include "kvgate/kernels/cuda_attention.h"
#include "kvgate/kernels/kv_cache.h"
#include "tests/gpu/gpu_test_util.h"

namespace kvgate::kernels::cuda {
namespace {

using gputest::DeviceArray;

constexpr uint8_t kPoison = 0xA5;

// ---- Reference: the CPU codec under CpuKvCache::Append's rules ---------------------------------
// Per appended call: FP8 ChooseScales over the call's rows (per kv-head), formats without a window
// encode the rows into their slots; KIVI and TurboQuant with R > 0 keep tokens [encoded, stored)
// in their fp16 window and encode them from their fp16 values, F at a time (KIVI: one key group
// of G; TurboQuant: 16 tokens), once SplitStoredTokens says so (any sequence of appends ends in
// the same state). Read() vs CpuKvCache::ReadStored checks that this model is the cache's
// behaviour.
class ReferenceSeq {
 public:
  ReferenceSeq(const KvFormatSpec& spec, const cpu::KvCodec& codec, int heads, int d)
      : spec_(spec), codec_(codec), heads_(heads), d_(d), state_(heads), records_(heads) {}

  void Append(int n, const float* k, const float* v) {
    const int64_t row = int64_t{heads_} * d_;
    for (int h = 0; h < heads_; ++h)
      codec_.ChooseScales(n, k + h * d_, v + h * d_, row, &state_[h]);
    const int64_t before = stored();
    k_.insert(k_.end(), k, k + n * row);
    v_.insert(v_.end(), v, v + n * row);
    for (auto& recs : records_) recs.resize(stored(), std::vector<uint8_t>(codec_.record_bytes()));
    if (codec_.residual_tokens() == 0) {
      Encode(before, n, k, v);
      encoded_ = stored();
      return;
    }
    const int g = codec_.residual_flush_tokens();
    const int64_t target = SplitStoredTokens(spec_, stored()).encoded;
    std::vector<float> gk(g * row), gv(g * row);
    for (; encoded_ < target; encoded_ += g) {
      for (int64_t i = 0; i < g * row; ++i) {
        gk[i] = cpu::RoundToHalf(k_[encoded_ * row + i]);
        gv[i] = cpu::RoundToHalf(v_[encoded_ * row + i]);
      }
      Encode(encoded_, g, gk.data(), gv.data());
    }
  }

  int64_t stored() const { return static_cast<int64_t>(k_.size()) / (int64_t{heads_} * d_); }
  int64_t encoded() const { return encoded_; }
  const std::vector<uint8_t>& record(int h, int64_t t) const { return records_[h][t]; }
  const cpu::HeadCodecState& state(int h) const { return state_[h]; }
  // Token t's input rows (fp32) for kv-head h.
  const float* k(int h, int64_t t) const { return &k_[(t * heads_ + h) * d_]; }
  const float* v(int h, int64_t t) const { return &v_[(t * heads_ + h) * d_]; }

 private:
  void Encode(int64_t first, int n, const float* k, const float* v) {
    std::vector<uint8_t*> recs(n);
    for (int h = 0; h < heads_; ++h) {
      for (int i = 0; i < n; ++i) recs[i] = records_[h][first + i].data();
      codec_.Encode(n, k + h * d_, v + h * d_, int64_t{heads_} * d_, state_[h], recs.data());
    }
  }

  KvFormatSpec spec_;
  const cpu::KvCodec& codec_;
  int heads_, d_;
  std::vector<cpu::HeadCodecState> state_;
  std::vector<std::vector<std::vector<uint8_t>>> records_;  // [head][token] record bytes
  std::vector<float> k_, v_;                                // [token][head][d]
  int64_t encoded_ = 0;
};

// ---- Record comparison
// ----------------------------------------------------------------------------

struct Region {  // codes of one channel class: `count` codes of `bits` at byte `offset`
  int offset, bits, count;
};

// TurboCodebook's split (kv_codec.cc) for one half.
void TurboRegions(int d, double rate, int base, std::vector<Region>* regions, int* code_bytes) {
  int hi = d, hb = static_cast<int>(rate), lb = hb;
  if (rate == 3.5) hi = d / 2, hb = 4, lb = 3;
  if (rate == 2.5) hi = d / 4, hb = 3, lb = 2;
  if (rate == 1.5) hi = d / 2, hb = 2, lb = 1;
  regions->push_back({base, hb, hi});
  if (hi < d) regions->push_back({base + hi * hb / 8, lb, d - hi});
  *code_bytes = (hi * hb + (d - hi) * lb) / 8;
}

struct CompareStats {
  int64_t records = 0, identical_records = 0;
  int64_t codes = 0, codes_off_by_one = 0, codes_off_more = 0;
  int64_t norms_off_one_ulp = 0, other_bytes_differ = 0;
};

// Compares one GPU record with the reference record; returns whether the bytes are identical.
class RecordComparer {
 public:
  RecordComparer(const KvFormatSpec& spec, const cpu::KvCodec& codec) : spec_(spec) {
    const int d = codec.head_dim();
    key_bytes_ = codec.key_bytes();
    record_bytes_ = codec.record_bytes();
    if (spec.kind == KvFormatKind::kKivi) {
      const int bits = static_cast<int>(spec.key_bits);
      code_regions_ = {{0, bits, d}, {key_bytes_, bits, d}};
      code_bytes_[0] = code_bytes_[1] = d * bits / 8;
    } else if (spec.kind == KvFormatKind::kTurbo) {
      TurboRegions(d, spec.key_bits, 0, &code_regions_, &code_bytes_[0]);
      TurboRegions(d, spec.value_bits, key_bytes_, &code_regions_, &code_bytes_[1]);
      norm_offsets_ = {code_bytes_[0], key_bytes_ + code_bytes_[1]};
    }
  }

  bool Compare(const uint8_t* gpu, const uint8_t* ref, CompareStats* stats) const {
    ++stats->records;
    if (std::memcmp(gpu, ref, record_bytes_) == 0) {
      ++stats->identical_records;
      for (const Region& r : code_regions_) stats->codes += r.count;
      return true;
    }
    std::vector<bool> code_byte(record_bytes_, false);
    std::vector<uint8_t> a(512), b(512);
    for (const Region& r : code_regions_) {
      cpu::UnpackCodes(gpu + r.offset, r.bits, r.count, a.data());
      cpu::UnpackCodes(ref + r.offset, r.bits, r.count, b.data());
      for (int i = 0; i < r.count; ++i) {
        const int diff = std::abs(int{a[i]} - int{b[i]});
        stats->codes_off_by_one += diff == 1;
        stats->codes_off_more += diff > 1;
      }
      stats->codes += r.count;
      for (int i = r.offset; i < r.offset + r.count * r.bits / 8; ++i) code_byte[i] = true;
    }
    for (int off : norm_offsets_) {
      uint16_t x, y;
      std::memcpy(&x, gpu + off, 2);
      std::memcpy(&y, ref + off, 2);
      if (x != y) {
        if ((x ^ y) < 0x8000 && std::abs(int{x} - int{y}) == 1) {
          ++stats->norms_off_one_ulp;
        } else {
          ++stats->other_bytes_differ;
        }
      }
      code_byte[off] = code_byte[off + 1] = true;
    }
    for (int i = 0; i < record_bytes_; ++i) {
      if (!code_byte[i] && gpu[i] != ref[i]) {
        ++stats->other_bytes_differ;
        break;
      }
    }
    return false;
  }

 private:
  KvFormatSpec spec_;
  int key_bytes_ = 0, record_bytes_ = 0, code_bytes_[2] = {0, 0};
  std::vector<Region> code_regions_;
  std::vector<int> norm_offsets_;
};

// ---- The harness
// ------------------------------------------------------------------------------------

// One batched call: (sequence, rows) entries in batch order.
using Call = std::vector<std::pair<int, int>>;
struct Scenario {
  int num_seqs = 0;
  std::vector<int> slots;  // state slot of each sequence
  int num_slots = 0;
  std::vector<Call> calls;
};

// The default pattern: A prefill 300 + B prefill 37 in one call, C prefill 1, 40 decode steps of
// {C, A, B}, then chunks (A 77 + C 300, B 150) and 6 decode steps of {B, A}. KIVI (R=128, G=32)
// sees windows that flush several groups in one call, one group per decode step, and none.
Scenario DefaultScenario() {
  Scenario sc;
  sc.num_seqs = 3;
  sc.slots = {4, 1, 6};
  sc.num_slots = 7;
  sc.calls.push_back({{0, 300}, {1, 37}});
  sc.calls.push_back({{2, 1}});
  for (int i = 0; i < 40; ++i) sc.calls.push_back({{2, 1}, {0, 1}, {1, 1}});
  sc.calls.push_back({{0, 77}, {2, 300}});
  sc.calls.push_back({{1, 150}});
  for (int i = 0; i < 6; ++i) sc.calls.push_back({{1, 1}, {0, 1}});
  return sc;
}

// Fills one token's d key and value channels for (sequence, position, kv-head).
using RowFn = std::function<void(int seq, int64_t pos, int head, float* k, float* v)>;

RowFn GaussianRows(int d, uint64_t seed) {
  // Per-channel key bias (the structure KIVI's per-channel key groups exploit).
  auto bias = std::make_shared<std::vector<float>>(256 * 16);
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> normal(0.f, 1.f);
  for (float& x : *bias) x = 0.7f * normal(rng);
  return [bias, d, seed](int seq, int64_t pos, int head, float* k, float* v) {
    std::mt19937_64 r(seed ^ (uint64_t(seq) << 48) ^ (uint64_t(pos) << 8) ^ uint64_t(head));
    std::normal_distribution<float> n(0.f, 1.f);
    for (int c = 0; c < d; ++c) {
      k[c] = n(r) + (*bias)[(head % 16) * 256 + c];
      v[c] = n(r);
    }
  };
}

struct CaseOptions {
  int block_size = 16;
  int row_pad = 0;  // extra floats per qkv row (odd: rows not vector-aligned)
  bool check_attention = true;
  bool nan_aware = false;  // special values: NaN == NaN in (b)
  uint64_t seed = 1;
};

struct CaseReport {
  CompareStats bytes;
  double max_read_err = 0;  // over tokens with identical records, relative to the row max
  int64_t tokens_with_flips = 0;
  double max_flip_rel_l2 = 0;
  double attn_rel_l2 = 0;
  bool attention_checked = false;  // (d) ran
};

bool SameFloat(float a, float b, float tol, bool nan_aware) {
  if (nan_aware && std::isnan(a) && std::isnan(b)) return true;
  if (std::isinf(a) || std::isinf(b)) return a == b;
  return std::fabs(a - b) <= tol;
}

void RunCase(const KvFormatSpec& spec, int d, int heads, const Scenario& sc, const RowFn& rows,
             const CaseOptions& opt, CaseReport* report) {
  const int bs = opt.block_size;
  auto codec_or = cpu::CreateKvCodec(spec, d);
  ASSERT_TRUE(codec_or.ok()) << codec_or.status();
  const cpu::KvCodec& codec = **codec_or;
  auto append_or = CudaKvAppend::Create(spec, d, heads, bs);
  ASSERT_TRUE(append_or.ok()) << append_or.status();
  CudaKvAppend& append = **append_or;
  ASSERT_EQ(append.record_bytes(), codec.record_bytes());
  const int rb = codec.record_bytes();
  const int cap = append.residual_capacity();
  const bool window = codec.residual_tokens() > 0;
  ASSERT_EQ(cap, window ? codec.residual_tokens() + codec.residual_flush_tokens() : 0);

  // Final lengths, blocks (random pool order, 3 spare blocks that must stay untouched).
  std::vector<int64_t> final_len(sc.num_seqs, 0);
  for (const Call& call : sc.calls) {
    for (auto [s, n] : call) final_len[s] += n;
  }
  int max_blocks = 1;
  int64_t total_blocks = 3;
  for (int64_t len : final_len) {
    max_blocks = std::max<int>(max_blocks, static_cast<int>((len + bs - 1) / bs));
    total_blocks += (len + bs - 1) / bs;
  }
  std::vector<int32_t> perm(total_blocks);
  std::iota(perm.begin(), perm.end(), 0);
  std::shuffle(perm.begin(), perm.end(), std::mt19937_64(opt.seed * 7919));
  std::vector<int32_t> tables(size_t(sc.num_seqs) * max_blocks, -1);
  int next = 0;
  for (int s = 0; s < sc.num_seqs; ++s) {
    for (int64_t b = 0; b < (final_len[s] + bs - 1) / bs; ++b)
      tables[s * max_blocks + b] = perm[next++];
  }
  // Two layers per block; ours is layer 1.
  const int64_t layer_bytes = int64_t{heads} * bs * rb;
  const int64_t block_stride = 2 * layer_bytes, layer_offset = layer_bytes;
  DeviceArray<uint8_t> pool;
  ASSERT_CUDA(pool.Upload(std::vector<uint8_t>(total_blocks * block_stride, kPoison)));
  DeviceArray<float> scales;
  ASSERT_CUDA(scales.Upload(std::vector<float>(size_t(sc.num_slots) * heads * 2, 0.f)));
  DeviceArray<uint16_t> res_k, res_v;
  const size_t window_values = size_t(sc.num_slots) * heads * std::max(cap, 1) * d;
  ASSERT_CUDA(res_k.Upload(std::vector<uint16_t>(window_values, 0)));
  ASSERT_CUDA(res_v.Upload(std::vector<uint16_t>(window_values, 0)));

  KvCacheConfig cfg{.num_layers = 1,
                    .num_kv_heads = heads,
                    .head_dim = d,
                    .block_size = bs,
                    .num_blocks = total_blocks,
                    .format = spec,
                    .rope_inv_freq = {}};
  auto cache_or = CreateCpuKvCache(cfg);
  ASSERT_TRUE(cache_or.ok()) << cache_or.status();
  KvCache& cache = **cache_or;
  // The CPU cache's windows (keys and values, fp16) are what residual_capacity() sizes.
  ASSERT_EQ(cache.residual_bytes_per_sequence(), int64_t{2} * cap * heads * d * 2);
  std::vector<ReferenceSeq> ref;
  for (int s = 0; s < sc.num_seqs; ++s) {
    ASSERT_TRUE(cache.AddSequence(s, final_len[s]).ok());
    ref.emplace_back(spec, codec, heads, d);
  }

  // Rows come from a fused [q (2 heads) | k | v | pad] buffer, as a runner's qkv projection.
  const int64_t kv_row = int64_t{heads} * d;
  const int64_t row_stride = 4 * kv_row + opt.row_pad;
  DeviceArray<float> qkv;
  DeviceArray<int32_t> d_tables, d_slots, d_begin, d_stored;
  for (const Call& call : sc.calls) {
    std::vector<int32_t> call_tables, call_slots, begin{0}, stored;
    int max_rows = 0;
    for (auto [s, n] : call) {
      call_tables.insert(call_tables.end(), tables.begin() + s * max_blocks,
                         tables.begin() + (s + 1) * max_blocks);
      call_slots.push_back(sc.slots[s]);
      stored.push_back(static_cast<int32_t>(ref[s].stored()));
      begin.push_back(begin.back() + n);
      max_rows = std::max(max_rows, n);
    }
    const int num_rows = begin.back();
    std::vector<float> host(size_t(num_rows) * row_stride, 0.f);
    for (size_t e = 0; e < call.size(); ++e) {
      const auto [s, n] = call[e];
      std::vector<float> k(n * kv_row), v(n * kv_row);
      for (int i = 0; i < n; ++i) {
        for (int h = 0; h < heads; ++h) {
          rows(s, ref[s].stored() + i, h, &k[(i * heads + h) * d], &v[(i * heads + h) * d]);
        }
        std::copy_n(&k[i * kv_row], kv_row, &host[(begin[e] + i) * row_stride + 2 * kv_row]);
        std::copy_n(&v[i * kv_row], kv_row, &host[(begin[e] + i) * row_stride + 3 * kv_row]);
      }
      ASSERT_TRUE(cache.Append(s, 0, n, k.data(), v.data()).ok());
      ref[s].Append(n, k.data(), v.data());
    }
    ASSERT_CUDA(qkv.Upload(host));
    ASSERT_CUDA(d_tables.Upload(call_tables));
    ASSERT_CUDA(d_slots.Upload(call_slots));
    ASSERT_CUDA(d_begin.Upload(begin));
    ASSERT_CUDA(d_stored.Upload(stored));
    AppendBatch a;
    a.pool = pool.get();
    a.block_stride_bytes = block_stride;
    a.layer_offset_bytes = layer_offset;
    a.block_tables = d_tables.get();
    a.max_blocks_per_seq = max_blocks;
    a.num_seqs = static_cast<int>(call.size());
    a.seq_slots = d_slots.get();
    a.row_begin = d_begin.get();
    a.stored_before = d_stored.get();
    a.num_rows = num_rows;
    a.max_rows_per_seq = max_rows;
    a.k = qkv.get() + 2 * kv_row;
    a.v = qkv.get() + 3 * kv_row;
    a.row_stride = row_stride;
    a.head_scales = scales.get();
    a.residual_k = res_k.get();
    a.residual_v = res_v.get();
    a.residual_capacity = cap;
    const absl::Status st = append.Append(a, nullptr);
    ASSERT_TRUE(st.ok()) << st;
    // The host buffers are reused by the next call: keep the call's inputs alive until done.
    ASSERT_CUDA(cudaDeviceSynchronize());
  }

  std::vector<uint8_t> gpu_pool;
  std::vector<float> gpu_scales;
  std::vector<uint16_t> gpu_wk, gpu_wv;
  ASSERT_CUDA(pool.Download(&gpu_pool));
  ASSERT_CUDA(scales.Download(&gpu_scales));
  ASSERT_CUDA(res_k.Download(&gpu_wk));
  ASSERT_CUDA(res_v.Download(&gpu_wv));

  // (a) record bytes, (c) scales and windows, and no stray writes.
  RecordComparer comparer(spec, codec);
  std::vector<bool> written(gpu_pool.size(), false);
  std::vector<std::vector<std::vector<bool>>> identical(sc.num_seqs);
  for (int s = 0; s < sc.num_seqs; ++s) {
    const ReferenceSeq& r = ref[s];
    ASSERT_EQ(cache.StoredTokens(s, 0), r.stored());
    const StoredSplit counts = SplitStoredTokens(spec, r.stored());
    ASSERT_EQ(counts.encoded, r.encoded());
    identical[s].assign(heads, std::vector<bool>(r.stored(), true));
    for (int h = 0; h < heads; ++h) {
      for (int64_t t = 0; t < r.encoded(); ++t) {
        const int64_t at = tables[s * max_blocks + t / bs] * block_stride + layer_offset +
                           (int64_t{h} * bs + t % bs) * rb;
        identical[s][h][t] = comparer.Compare(&gpu_pool[at], r.record(h, t).data(), &report->bytes);
        std::fill(written.begin() + at, written.begin() + at + rb, true);
      }
      const int64_t slot = sc.slots[s];
      if (spec.kind == KvFormatKind::kFp8) {
        const float* got = &gpu_scales[(slot * heads + h) * 2];
        EXPECT_EQ(std::memcmp(&got[0], &r.state(h).key_scale, 4), 0)
            << "key scale seq " << s << " head " << h << ": " << got[0] << " vs "
            << r.state(h).key_scale;
        EXPECT_EQ(std::memcmp(&got[1], &r.state(h).value_scale, 4), 0)
            << "value scale seq " << s << " head " << h << ": " << got[1] << " vs "
            << r.state(h).value_scale;
      }
      int64_t window_mismatch = 0;
      for (int64_t t = r.encoded(); t < r.stored(); ++t) {
        const size_t at = ((slot * heads + h) * cap + (t - r.encoded())) * d;
        for (int c = 0; c < d; ++c) {
          window_mismatch += gpu_wk[at + c] != cpu::FloatToHalf(r.k(h, t)[c]);
          window_mismatch += gpu_wv[at + c] != cpu::FloatToHalf(r.v(h, t)[c]);
        }
      }
      EXPECT_EQ(window_mismatch, 0) << "fp16 window of seq " << s << " head " << h;
    }
  }
  int64_t stray = 0;
  for (size_t i = 0; i < gpu_pool.size(); ++i) stray += !written[i] && gpu_pool[i] != kPoison;
  EXPECT_EQ(stray, 0) << "bytes written outside the stored tokens' records";
  const CompareStats& cs = report->bytes;
  EXPECT_EQ(cs.codes_off_more, 0) << "codes more than one level off";
  EXPECT_EQ(cs.other_bytes_differ, 0) << "non-code bytes differ (metadata, scales, norms > 1 ulp)";
  if (spec.kind == KvFormatKind::kKivi || spec.kind == KvFormatKind::kTurbo) {
    EXPECT_LE(cs.codes_off_by_one, cs.codes / 1000) << "more than 0.1% of codes off by one";
  } else {
    EXPECT_EQ(cs.identical_records, cs.records) << "records differ";
  }

  // (b) Read() vs CpuKvCache::ReadStored, all sequences in one call (entries in sequence order).
  int max_len = 0;
  std::vector<int32_t> lens, slots_by_seq(sc.slots.begin(), sc.slots.end());
  for (int s = 0; s < sc.num_seqs; ++s) {
    lens.push_back(static_cast<int32_t>(ref[s].stored()));
    max_len = std::max(max_len, lens.back());
  }
  const int64_t out_stride = max_len + 5;
  DeviceArray<float> out_k, out_v;
  const std::vector<float> nan_fill(size_t(sc.num_seqs) * heads * out_stride * d,
                                    std::numeric_limits<float>::quiet_NaN());
  ASSERT_CUDA(out_k.Upload(nan_fill));
  ASSERT_CUDA(out_v.Upload(nan_fill));
  ASSERT_CUDA(d_tables.Upload(tables));
  ASSERT_CUDA(d_slots.Upload(slots_by_seq));
  DeviceArray<int32_t> d_lens;
  ASSERT_CUDA(d_lens.Upload(lens));
  ReadBatch rd;
  rd.pool = pool.get();
  rd.block_stride_bytes = block_stride;
  rd.layer_offset_bytes = layer_offset;
  rd.block_tables = d_tables.get();
  rd.max_blocks_per_seq = max_blocks;
  rd.num_seqs = sc.num_seqs;
  rd.seq_slots = d_slots.get();
  rd.lens = d_lens.get();
  rd.max_len = max_len;
  rd.head_scales = scales.get();
  rd.residual_k = res_k.get();
  rd.residual_v = res_v.get();
  rd.residual_capacity = cap;
  rd.out_k = out_k.get();
  rd.out_v = out_v.get();
  rd.out_stride_tokens = out_stride;
  const absl::Status read_st = append.Read(rd, nullptr);
  ASSERT_TRUE(read_st.ok()) << read_st;
  std::vector<float> got_k, got_v;
  ASSERT_CUDA(out_k.Download(&got_k));
  ASSERT_CUDA(out_v.Download(&got_v));
  for (int s = 0; s < sc.num_seqs; ++s) {
    const int64_t n = ref[s].stored();
    std::vector<float> ek(n * d), ev(n * d);
    std::vector<int64_t> pos(n);
    for (int h = 0; h < heads; ++h) {
      ASSERT_TRUE(cache.ReadStored(s, 0, h, ek.data(), ev.data(), pos.data()).ok());
      for (int64_t t = 0; t < n; ++t) {
        const float* gk = &got_k[((int64_t{s} * heads + h) * out_stride + t) * d];
        const float* gv = &got_v[((int64_t{s} * heads + h) * out_stride + t) * d];
        const float* wk = &ek[t * d];
        const float* wv = &ev[t * d];
        if (identical[s][h][t]) {
          float row_max = 1e-30f;
          for (int c = 0; c < d; ++c) {
            if (std::isfinite(wk[c])) row_max = std::max(row_max, std::fabs(wk[c]));
            if (std::isfinite(wv[c])) row_max = std::max(row_max, std::fabs(wv[c]));
          }
          int bad = 0;
          for (int c = 0; c < d; ++c) {
            const bool ok = SameFloat(gk[c], wk[c], 1e-6f * row_max, opt.nan_aware) &&
                            SameFloat(gv[c], wv[c], 1e-6f * row_max, opt.nan_aware);
            if (!ok && bad++ == 0) {
              ADD_FAILURE() << "Read differs from ReadStored: seq " << s << " head " << h
                            << " token " << t << " channel " << c << ": k " << gk[c] << " vs "
                            << wk[c] << ", v " << gv[c] << " vs " << wv[c];
            }
            if (std::isfinite(wk[c]) && std::isfinite(wv[c])) {
              report->max_read_err = std::max<double>(
                  report->max_read_err,
                  std::max(std::fabs(gk[c] - wk[c]), std::fabs(gv[c] - wv[c])) / row_max);
            }
          }
          if (bad > 0) return;
        } else {
          double err = 0, norm = 0;
          for (int c = 0; c < d; ++c) {
            err +=
                double(gk[c] - wk[c]) * (gk[c] - wk[c]) + double(gv[c] - wv[c]) * (gv[c] - wv[c]);
            norm += double(wk[c]) * wk[c] + double(wv[c]) * wv[c];
          }
          ++report->tokens_with_flips;
          report->max_flip_rel_l2 =
              std::max(report->max_flip_rel_l2, std::sqrt(err / std::max(norm, 1e-30)));
        }
      }
    }
  }
  EXPECT_LE(report->max_flip_rel_l2, 0.25) << "a token with off-by-one codes reads too far off";

  // (d) the appended pool through the decode attention (state rearranged per batch entry: the
  // attention's seq_slots support is another change). The decode kernel reads KIVI's window but
  // not yet TurboQuant's.
  if (!opt.check_attention || (spec.kind == KvFormatKind::kTurbo && window)) return;
  report->attention_checked = true;
  auto attn_or = CudaDecodeAttention::Create(spec, d, heads, bs);
  ASSERT_TRUE(attn_or.ok()) << attn_or.status();
  const int ratio = 4, q_heads = heads * ratio;
  std::vector<int32_t> enc_lens, res_lens;
  std::vector<float> entry_scales;
  std::vector<uint16_t> entry_wk, entry_wv;
  int max_enc = 0;
  for (int s = 0; s < sc.num_seqs; ++s) {
    const StoredSplit c = SplitStoredTokens(spec, ref[s].stored());
    enc_lens.push_back(static_cast<int32_t>(c.encoded));
    res_lens.push_back(static_cast<int32_t>(c.residual));
    max_enc = std::max<int>(max_enc, static_cast<int>(c.encoded));
    const size_t slot = sc.slots[s];
    entry_scales.insert(entry_scales.end(), gpu_scales.begin() + slot * heads * 2,
                        gpu_scales.begin() + (slot + 1) * heads * 2);
    if (cap > 0) {
      entry_wk.insert(entry_wk.end(), gpu_wk.begin() + slot * heads * cap * d,
                      gpu_wk.begin() + (slot + 1) * heads * cap * d);
      entry_wv.insert(entry_wv.end(), gpu_wv.begin() + slot * heads * cap * d,
                      gpu_wv.begin() + (slot + 1) * heads * cap * d);
    }
  }
  std::mt19937_64 rng(opt.seed ^ 0xa77e);
  std::normal_distribution<float> normal(0.f, 1.f);
  std::vector<float> q(size_t(sc.num_seqs) * q_heads * d), expected(q.size());
  for (float& x : q) x = normal(rng);
  const float softmax_scale = 1.0f / std::sqrt(static_cast<float>(d));
  for (int s = 0; s < sc.num_seqs; ++s) {
    ASSERT_TRUE(cache
                    .DecodeAttention(s, 0, q_heads, &q[size_t(s) * q_heads * d], softmax_scale,
                                     &expected[size_t(s) * q_heads * d])
                    .ok());
  }
  DeviceArray<int32_t> d_enc, d_res;
  DeviceArray<float> d_entry_scales, d_q, d_out;
  DeviceArray<uint16_t> d_ewk, d_ewv;
  ASSERT_CUDA(d_enc.Upload(enc_lens));
  ASSERT_CUDA(d_res.Upload(res_lens));
  ASSERT_CUDA(d_entry_scales.Upload(entry_scales));
  ASSERT_CUDA(d_q.Upload(q));
  ASSERT_CUDA(d_out.Upload(std::vector<float>(q.size(), std::numeric_limits<float>::quiet_NaN())));
  DecodeBatch db;
  db.pool = pool.get();
  db.block_stride_bytes = block_stride;
  db.layer_offset_bytes = layer_offset;
  db.block_tables = d_tables.get();
  db.max_blocks_per_seq = max_blocks;
  db.encoded_lens = d_enc.get();
  db.max_encoded_len = max_enc;
  if (cap > 0) {
    ASSERT_CUDA(d_ewk.Upload(entry_wk));
    ASSERT_CUDA(d_ewv.Upload(entry_wv));
    db.residual_lens = d_res.get();
    db.residual_k = d_ewk.get();
    db.residual_v = d_ewv.get();
    db.residual_capacity = cap;
  }
  db.head_scales = d_entry_scales.get();
  db.num_seqs = sc.num_seqs;
  db.num_q_heads = q_heads;
  db.q = d_q.get();
  db.out = d_out.get();
  db.scale = softmax_scale;
  const absl::Status run_st = (*attn_or)->Run(db, nullptr);
  ASSERT_TRUE(run_st.ok()) << run_st;
  std::vector<float> got;
  ASSERT_CUDA(d_out.Download(&got));
  for (int s = 0; s < sc.num_seqs; ++s) {
    double err = 0, norm = 0;
    for (size_t i = size_t(s) * q_heads * d; i < size_t(s + 1) * q_heads * d; ++i) {
      err += (double(got[i]) - expected[i]) * (double(got[i]) - expected[i]);
      norm += double(expected[i]) * expected[i];
    }
    const double rel = std::sqrt(err / std::max(norm, 1e-30));
    report->attn_rel_l2 = std::max(report->attn_rel_l2, std::isnan(rel) ? 1e9 : rel);
  }
  EXPECT_LT(report->attn_rel_l2, 1e-3) << "decode attention over the GPU-appended pool";
}

void PrintReport(const std::string& name, const CaseReport& r) {
  const CompareStats& b = r.bytes;
  std::printf(
      "[ result ] %s records=%lld identical=%lld codes=%lld off_by_one=%lld norms_1ulp=%lld "
      "read_err=%.2g flip_tokens=%lld flip_rel_l2=%.3g attn_rel_l2=%s\n",
      name.c_str(), static_cast<long long>(b.records), static_cast<long long>(b.identical_records),
      static_cast<long long>(b.codes), static_cast<long long>(b.codes_off_by_one),
      static_cast<long long>(b.norms_off_one_ulp), r.max_read_err,
      static_cast<long long>(r.tokens_with_flips), r.max_flip_rel_l2,
      r.attention_checked ? std::to_string(r.attn_rel_l2).c_str() : "not-run");
}

std::string ParamName(std::string s) {
  for (char& c : s) {
    if (!std::isalnum(static_cast<unsigned char>(c))) c = '_';
  }
  return s;
}

// ---- The matrix
// -------------------------------------------------------------------------------------

const std::vector<std::string> kFormats = {
    "fp16", "bf16", "fp8", "int8", "kivi2", "kivi4",
    // TurboQuant with its default fp16 window (R = 128)
    "tq4", "tq3.5", "tq3", "tq2.5", "tq:k=2,v=2", "tq:k=1.5,v=1.5", "tq:k=1,v=1", "tq:k=4,v=2.5",
    "tq:k=2.5,v=3.5",
    // without a window (every token encoded directly; (d) runs) and with a small one
    "tq:k=4,v=4,r=0", "tq:k=2.5,v=3.5,r=0", "tq:k=1,v=1,r=0", "tq:k=3,v=3,r=32",
    "tq:k=4,v=2.5,r=32",
    // the plain norm correction (debias=0; the others multiply by TurboCodebook::norm_debias())
    "tq:k=4,v=3,debias=0", "tq:k=3.5,v=2.5,r=0,debias=0"};

class CudaKvAppendTest : public ::testing::TestWithParam<std::tuple<std::string, int, int>> {};

TEST_P(CudaKvAppendTest, MatchesCpuCache) {
  SKIP_WITHOUT_GPU();
  const auto& [format, d, heads] = GetParam();
  auto spec = ParseKvFormat(format);
  ASSERT_TRUE(spec.ok()) << spec.status();
  CaseOptions opt;
  opt.seed = 100 + d + heads;
  CaseReport report;
  RunCase(*spec, d, heads, DefaultScenario(), GaussianRows(d, opt.seed), opt, &report);
  PrintReport(format + " d=" + std::to_string(d) + " heads=" + std::to_string(heads), report);
}

INSTANTIATE_TEST_SUITE_P(AllFormats, CudaKvAppendTest,
                         ::testing::Combine(::testing::ValuesIn(kFormats),
                                            ::testing::Values(64, 128), ::testing::Values(1, 8)),
                         [](const auto& info) {
                           return ParamName(std::get<0>(info.param)) + "_d" +
                                  std::to_string(std::get<1>(info.param)) + "_h" +
                                  std::to_string(std::get<2>(info.param));
                         });

// head_dim 256 (no decode kernel: (d) is skipped), and a block size of 24 with qkv rows that are
// not 16-byte aligned (the kernels' scalar load path, narrower record stores).
TEST(CudaKvAppendShapes, HeadDim256) {
  SKIP_WITHOUT_GPU();
  for (const char* format : {"fp16", "fp8", "int8", "kivi4", "tq3.5", "tq:k=4,v=2.5"}) {
    auto spec = ParseKvFormat(format);
    ASSERT_TRUE(spec.ok());
    CaseOptions opt;
    opt.check_attention = false;
    CaseReport report;
    RunCase(*spec, 256, 2, DefaultScenario(), GaussianRows(256, 7), opt, &report);
    PrintReport(std::string(format) + " d=256 heads=2", report);
    if (HasFailure()) return;
  }
}

TEST(CudaKvAppendShapes, OddBlockSizeAndUnalignedRows) {
  SKIP_WITHOUT_GPU();
  // tq:k=3.5,v=2.5 at d=64: 30 + 20 = 50-byte records, so records are only 2-byte aligned.
  for (const char* format : {"fp16", "bf16", "int8", "fp8", "kivi2", "tq2.5", "tq:k=3.5,v=2.5"}) {
    auto spec = ParseKvFormat(format);
    ASSERT_TRUE(spec.ok());
    for (int d : {64, 128}) {
      CaseOptions opt;
      opt.block_size = 24;
      opt.row_pad = 1;
      opt.check_attention = false;
      CaseReport report;
      RunCase(*spec, d, 3, DefaultScenario(), GaussianRows(d, 11), opt, &report);
      PrintReport(std::string(format) + " d=" + std::to_string(d) + " bs=24 unaligned", report);
      if (HasFailure()) return;
    }
  }
}

// ---- TurboQuant's fp16 window -------------------------------------------------------------------

// Calls that land on TurboQuant's flush boundaries (window R, flushed 16 at a time once it holds
// R + 16) and mix decode rows with chunks, as continuous batching does: prefills of R + 15
// (no flush), R + 16 (one) and R + 17 tokens; decode steps crossing flushes (15 old window tokens
// and the new row flushed together); calls with 16, 17 and more rows for one sequence next to
// 1-row entries; a chunk longer than the window appended to a full window.
Scenario TurboWindowScenario(int r) {
  Scenario sc;
  sc.num_seqs = 4;
  sc.slots = {3, 0, 5, 1};
  sc.num_slots = 6;
  sc.calls.push_back({{0, r + 15}, {1, r + 16}, {2, 5}});
  sc.calls.push_back({{3, r + 17}});
  for (int i = 0; i < 20; ++i) sc.calls.push_back({{0, 1}, {1, 1}, {2, 1}, {3, 1}});
  sc.calls.push_back({{2, 16}, {0, 1}});
  sc.calls.push_back({{1, 1}, {3, 17}, {0, 2}});
  sc.calls.push_back({{2, 2 * r + 40}, {1, 1}});
  for (int i = 0; i < 17; ++i) sc.calls.push_back({{3, 1}, {2, 1}, {0, 1}, {1, 1}});
  sc.calls.push_back({{0, 100}, {3, 33}});
  for (int i = 0; i < 5; ++i) sc.calls.push_back({{1, 1}, {0, 1}, {3, 1}, {2, 1}});
  return sc;
}

TEST(CudaKvAppendTurboWindow, FlushBoundariesAndMixedCalls) {
  SKIP_WITHOUT_GPU();
  // R = 128 (tq4's default), small windows (32, 40: not a multiple of 16; 1), and r=0 (no window:
  // every token encoded directly, and (d) through the decode kernel).
  for (const char* format :
       {"tq4", "tq:k=3,v=3,r=32", "tq:k=2.5,v=3.5,r=40", "tq:k=4,v=3,r=1", "tq:k=4,v=4,r=0"}) {
    auto spec = ParseKvFormat(format);
    ASSERT_TRUE(spec.ok()) << spec.status();
    for (int d : {64, 128, 256}) {
      CaseOptions opt;
      opt.seed = 31 + d;
      opt.check_attention = d != 256;  // no decode kernel for head_dim 256
      CaseReport report;
      RunCase(*spec, d, 2, TurboWindowScenario(spec->residual_tokens), GaussianRows(d, opt.seed),
              opt, &report);
      PrintReport(std::string(format) + " d=" + std::to_string(d) + " window scenario", report);
      if (HasFailure()) return;
    }
  }
}

// ---- Special values -----------------------------------------------------------------------------

// Call 1: all-zero rows (FP8 chooses no scale: 0 stays 0; TurboQuant zero norms); call 2: normal
// rows (FP8 chooses here); later calls: special values (saturating FP8 beyond the chosen scale).
RowFn SpecialRows(int d, bool with_nonfinite) {
  std::vector<float> specials = {0.f,
                                 -0.f,
                                 1.f,
                                 -1.f,
                                 65504.f,
                                 -65504.f,
                                 6e-8f,
                                 -6e-8f,
                                 3e-8f,
                                 1.00048828125f,
                                 1.00146484375f,
                                 0x1.0p-14f,
                                 0x1.8p-24f,
                                 1e-3f,
                                 0.1f,
                                 3.f,
                                 -2.5f,
                                 1000.f,
                                 448.f,
                                 464.f,
                                 -0.0078125f,
                                 12345.678f};
  if (with_nonfinite) {
    specials.insert(
        specials.end(),
        {65520.f, 70000.f, -1e30f, std::numeric_limits<float>::infinity(),
         -std::numeric_limits<float>::infinity(), std::numeric_limits<float>::quiet_NaN()});
  }
  auto gaussian = GaussianRows(d, 3);
  return [specials, gaussian, d](int seq, int64_t pos, int head, float* k, float* v) {
    if (pos < 5) {
      std::fill_n(k, d, 0.f);
      std::fill_n(v, d, 0.f);
      return;
    }
    gaussian(seq, pos, head, k, v);
    if (pos < 40) return;
    const size_t n = specials.size();
    for (int c = 0; c < d; ++c) {
      if ((pos + c) % 3 == 0) k[c] = specials[(pos * 7 + c * 3 + head) % n];
      if ((pos + c) % 4 == 1) v[c] = specials[(pos * 5 + c * 11 + head) % n];
    }
    if (pos % 9 == 0) std::fill_n(k, d, 0.f);  // zero rows amid data
  };
}

Scenario SpecialScenario() {
  Scenario sc;
  sc.num_seqs = 2;
  sc.slots = {1, 0};
  sc.num_slots = 2;
  sc.calls.push_back({{0, 5}, {1, 5}});      // all zero
  sc.calls.push_back({{1, 35}, {0, 35}});    // gaussian: FP8 scales chosen here
  sc.calls.push_back({{0, 230}, {1, 160}});  // specials
  for (int i = 0; i < 40; ++i) sc.calls.push_back({{0, 1}, {1, 1}});
  return sc;
}

TEST(CudaKvAppendSpecialValues, BytesMatchCpu) {
  SKIP_WITHOUT_GPU();
  // NaN and infinities only where the CPU codec defines the result: fp16/bf16/fp8 conversions
  // (and int8's saturation, but not a NaN's int8 code, which is undefined behaviour in C++);
  // KIVI and TurboQuant get finite values within the fp16 range.
  const std::vector<std::pair<const char*, bool>> cases = {
      {"fp16", true},   {"bf16", true}, {"fp8", true},    {"int8", false},        {"kivi2", false},
      {"kivi4", false}, {"tq4", false}, {"tq2.5", false}, {"tq:k=1.5,v=1", false}};
  for (const auto& [format, nonfinite] : cases) {
    auto spec = ParseKvFormat(format);
    ASSERT_TRUE(spec.ok());
    for (int d : {64, 128}) {
      CaseOptions opt;
      opt.check_attention = false;
      opt.nan_aware = true;
      CaseReport report;
      RowFn rows = SpecialRows(d, nonfinite);
      if (std::string(format) == "int8") {
        // int8 saturation with infinities and huge values, but no NaN.
        auto base = SpecialRows(d, false);
        rows = [base, d](int seq, int64_t pos, int head, float* k, float* v) {
          base(seq, pos, head, k, v);
          if (pos >= 40 && pos % 5 == 0) k[pos % d] = std::numeric_limits<float>::infinity();
          if (pos >= 40 && pos % 7 == 0) v[pos % d] = -1e30f;
        };
      }
      RunCase(*spec, d, 2, SpecialScenario(), rows, opt, &report);
      PrintReport(std::string(format) + " d=" + std::to_string(d) + " specials", report);
      if (HasFailure()) return;
    }
  }
}

// ---- Arguments
// ------------------------------------------------------------------------------------

// Create's checks come before the device check: these run without a GPU.
TEST(CudaKvAppendCreate, RejectsUnsupportedOrMalformed) {
  auto expect = [](const std::string& format, int d, int heads, int bs, absl::StatusCode code,
                   std::function<void(KvFormatSpec&)> edit = nullptr) {
    auto spec = ParseKvFormat(format);
    ASSERT_TRUE(spec.ok()) << format;
    if (edit) edit(*spec);
    auto a = CudaKvAppend::Create(*spec, d, heads, bs);
    EXPECT_EQ(a.status().code(), code)
        << format << " d=" << d << " heads=" << heads << " bs=" << bs << ": " << a.status();
  };
  expect("fp16", 96, 8, 16, absl::StatusCode::kUnimplemented);
  expect("fp16", 128, 0, 16, absl::StatusCode::kInvalidArgument);
  expect("fp16", 128, 8, 0, absl::StatusCode::kInvalidArgument);
  expect("tq:k=4,v=4,qjl", 128, 8, 16, absl::StatusCode::kUnimplemented);
  expect("fp16", 128, 8, 16, absl::StatusCode::kUnimplemented,
         [](KvFormatSpec& s) { s.eviction.kind = EvictionSpec::Kind::kSink; });
  expect("kivi2", 128, 8, 16, absl::StatusCode::kUnimplemented,
         [](KvFormatSpec& s) { s.residual_tokens = 0; });
  expect("kivi2", 128, 8, 16, absl::StatusCode::kUnimplemented,
         [](KvFormatSpec& s) { s.group_size = 4, s.residual_tokens = 8; });
  expect("kivi2", 128, 8, 16, absl::StatusCode::kUnimplemented,  // the CPU codec: G must divide d
         [](KvFormatSpec& s) { s.group_size = 48, s.residual_tokens = 96; });
}

// SplitStoredTokens against the CPU cache (no GPU): after any appends, the tokens CpuKvCache
// still holds in its fp16 window read back as exactly the fp16-rounded input, while 2- or 3-bit
// codes of gaussian data practically never do. KIVI (G = 32) and TurboQuant (16 at a time) with
// the default window, a small one and none.
class CudaKvAppendSplit : public ::testing::TestWithParam<std::string> {};

TEST_P(CudaKvAppendSplit, MatchesCpuCacheWindow) {
  auto spec = ParseKvFormat(GetParam());
  ASSERT_TRUE(spec.ok());
  const int d = 64, heads = 1;
  KvCacheConfig cfg{.num_layers = 1,
                    .num_kv_heads = heads,
                    .head_dim = d,
                    .block_size = 16,
                    .num_blocks = 64,
                    .format = *spec,
                    .rope_inv_freq = {}};
  auto cache = CreateCpuKvCache(cfg);
  ASSERT_TRUE(cache.ok());
  ASSERT_TRUE((*cache)->AddSequence(0, 1000).ok());
  std::mt19937_64 rng(5);
  std::normal_distribution<float> normal;
  std::vector<float> all_k;
  for (int n : {37, 1, 1, 90, 1, 33, 64, 1, 1, 1, 200, 5}) {
    std::vector<float> k(n * d), v(n * d);
    for (float& x : k) x = normal(rng);
    for (float& x : v) x = normal(rng);
    all_k.insert(all_k.end(), k.begin(), k.end());
    ASSERT_TRUE((*cache)->Append(0, 0, n, k.data(), v.data()).ok());
    const int64_t stored = (*cache)->StoredTokens(0, 0);
    std::vector<float> rk(stored * d), rv(stored * d);
    std::vector<int64_t> pos(stored);
    ASSERT_TRUE((*cache)->ReadStored(0, 0, 0, rk.data(), rv.data(), pos.data()).ok());
    int64_t first_exact = stored;
    for (int64_t t = stored - 1; t >= 0; --t) {
      bool exact = true;
      for (int c = 0; c < d; ++c) exact &= rk[t * d + c] == cpu::RoundToHalf(all_k[t * d + c]);
      if (!exact) break;
      first_exact = t;
    }
    const StoredSplit counts = SplitStoredTokens(*spec, stored);
    EXPECT_EQ(counts.encoded, first_exact) << "after " << stored << " tokens";
    EXPECT_EQ(counts.encoded + counts.residual, stored);
  }
}

INSTANTIATE_TEST_SUITE_P(Windows, CudaKvAppendSplit,
                         ::testing::Values("kivi2", "tq3", "tq:k=2,v=2,r=32", "tq:k=3,v=3,r=0"),
                         [](const auto& info) { return ParamName(info.param); });

TEST(CudaKvAppendSplitRule, FormatsWithoutWindowEncodeEverything) {
  for (const char* format : {"fp16", "fp8", "int8", "tq:k=4,v=4,r=0"}) {
    auto spec = ParseKvFormat(format);
    ASSERT_TRUE(spec.ok());
    EXPECT_EQ(SplitStoredTokens(*spec, 77).encoded, 77) << format;
    EXPECT_EQ(SplitStoredTokens(*spec, 77).residual, 0) << format;
  }
  // TurboQuant R = 128: nothing encoded below R + 16, then multiples of 16.
  auto tq4 = ParseKvFormat("tq4");
  ASSERT_TRUE(tq4.ok());
  EXPECT_EQ(SplitStoredTokens(*tq4, 143).encoded, 0);
  EXPECT_EQ(SplitStoredTokens(*tq4, 144).encoded, 16);
  EXPECT_EQ(SplitStoredTokens(*tq4, 159).encoded, 16);
  EXPECT_EQ(SplitStoredTokens(*tq4, 160).encoded, 32);
  EXPECT_EQ(SplitStoredTokens(*tq4, 160).residual, 128);
}

// PackPagedKv (the host packer of the decode tests and kv_decode_bench; no GPU) holds what
// CpuKvCache holds after one Append of each sequence: the same split (SplitStoredTokens), the
// reference records (ReferenceSeq), FP8 scales, and the window's fp16 bits, which the cache reads
// back exactly.
TEST(PackPagedKvTest, MatchesCpuCacheAfterOneAppend) {
  const int d = 64, heads = 2, bs = 16;
  for (const char* format : {"fp8", "kivi2", "tq4", "tq:k=3,v=3,r=32", "tq:k=4,v=4,r=0"}) {
    auto spec = ParseKvFormat(format);
    ASSERT_TRUE(spec.ok());
    auto codec = cpu::CreateKvCodec(*spec, d);
    ASSERT_TRUE(codec.ok());
    const std::vector<int> lens = {1, 143, 144, 300, 37};
    std::vector<std::vector<float>> k, v;
    std::mt19937_64 rng(9);
    std::normal_distribution<float> normal;
    for (int n : lens) {
      k.emplace_back(size_t(n) * heads * d);
      v.emplace_back(size_t(n) * heads * d);
      for (float& x : k.back()) x = normal(rng);
      for (float& x : v.back()) x = normal(rng);
    }
    auto packed = PackPagedKv(*spec, d, heads, bs, k, v, 3);
    ASSERT_TRUE(packed.ok()) << packed.status();
    KvCacheConfig cfg{.num_layers = 1,
                      .num_kv_heads = heads,
                      .head_dim = d,
                      .block_size = bs,
                      .num_blocks = 64,
                      .format = *spec,
                      .rope_inv_freq = {}};
    auto cache = CreateCpuKvCache(cfg);
    ASSERT_TRUE(cache.ok());
    const int cap = packed->residual_capacity;
    EXPECT_EQ((*cache)->residual_bytes_per_sequence(), int64_t{2} * cap * heads * d * 2) << format;
    for (size_t s = 0; s < lens.size(); ++s) {
      const int n = lens[s];
      ASSERT_TRUE((*cache)->AddSequence(s, n).ok());
      ASSERT_TRUE((*cache)->Append(s, 0, n, k[s].data(), v[s].data()).ok());
      ReferenceSeq ref(*spec, **codec, heads, d);
      ref.Append(n, k[s].data(), v[s].data());
      const int64_t e = packed->encoded_lens[s];
      ASSERT_EQ(e, ref.encoded()) << format << " seq " << s;
      ASSERT_EQ(e + packed->residual_lens[s], n);
      std::vector<float> rk(size_t(n) * d), rv(rk.size());
      std::vector<int64_t> pos(n);
      for (int h = 0; h < heads; ++h) {
        ASSERT_TRUE((*cache)->ReadStored(s, 0, h, rk.data(), rv.data(), pos.data()).ok());
        int64_t differ = 0;
        for (int64_t t = 0; t < e; ++t) {
          const int64_t block = packed->block_tables[s * packed->max_blocks_per_seq + t / bs];
          const uint8_t* rec = packed->pool.data() + block * packed->block_bytes +
                               (int64_t{h} * bs + t % bs) * packed->record_bytes;
          differ += std::memcmp(rec, ref.record(h, t).data(), packed->record_bytes) != 0;
        }
        EXPECT_EQ(differ, 0) << format << " seq " << s << " head " << h << ": records";
        for (int64_t t = e; t < n; ++t) {
          const size_t at = ((s * heads + h) * size_t(cap) + (t - e)) * d;
          for (int c = 0; c < d; ++c) {
            ASSERT_EQ(packed->residual_k[at + c], cpu::FloatToHalf(ref.k(h, t)[c]));
            ASSERT_EQ(packed->residual_v[at + c], cpu::FloatToHalf(ref.v(h, t)[c]));
            ASSERT_EQ(rk[t * d + c], cpu::HalfToFloat(packed->residual_k[at + c])) << format;
            ASSERT_EQ(rv[t * d + c], cpu::HalfToFloat(packed->residual_v[at + c])) << format;
          }
        }
        if (spec->kind == KvFormatKind::kFp8) {
          EXPECT_EQ(packed->head_scales[(s * heads + h) * 2], ref.state(h).key_scale);
          EXPECT_EQ(packed->head_scales[(s * heads + h) * 2 + 1], ref.state(h).value_scale);
        }
      }
    }
  }
}

TEST(CudaKvAppendArgs, BadBatchesAreRejected) {
  SKIP_WITHOUT_GPU();
  const int d = 128, heads = 2, bs = 16;
  auto fp8 = ParseKvFormat("fp8");
  auto kivi = ParseKvFormat("kivi2");
  auto tq = ParseKvFormat("tq:k=4,v=4,r=32");
  auto tq_r0 = ParseKvFormat("tq:k=4,v=4,r=0");
  ASSERT_TRUE(fp8.ok() && kivi.ok() && tq.ok() && tq_r0.ok());
  auto a_fp8 = CudaKvAppend::Create(*fp8, d, heads, bs);
  auto a_kivi = CudaKvAppend::Create(*kivi, d, heads, bs);
  auto a_tq = CudaKvAppend::Create(*tq, d, heads, bs);
  auto a_tq_r0 = CudaKvAppend::Create(*tq_r0, d, heads, bs);
  ASSERT_TRUE(a_fp8.ok() && a_kivi.ok() && a_tq.ok() && a_tq_r0.ok());
  EXPECT_EQ((*a_kivi)->residual_capacity(), 128 + 32);
  EXPECT_EQ((*a_tq)->residual_capacity(), 32 + 16);
  EXPECT_EQ((*a_tq_r0)->residual_capacity(), 0);
  const int rb = (*a_fp8)->record_bytes(), rbk = (*a_kivi)->record_bytes();
  const int rbt = (*a_tq)->record_bytes();
  DeviceArray<uint8_t> pool;
  ASSERT_CUDA(pool.Allocate(size_t(8) * heads * bs * std::max({rb, rbk, rbt})));
  DeviceArray<int32_t> tables, begin, stored, slots;
  ASSERT_CUDA(tables.Upload({0, 1}));
  ASSERT_CUDA(begin.Upload({0, 3}));
  ASSERT_CUDA(stored.Upload({0}));
  ASSERT_CUDA(slots.Upload({0}));
  DeviceArray<float> rows, scales;
  ASSERT_CUDA(rows.Upload(std::vector<float>(3 * 2 * heads * d, 1.f)));
  ASSERT_CUDA(scales.Upload(std::vector<float>(2 * heads, 0.f)));
  DeviceArray<uint16_t> window;
  ASSERT_CUDA(window.Allocate(size_t(heads) * (*a_kivi)->residual_capacity() * d * 2));
  // A window large enough for KIVI's R + G (and TurboQuant's smaller R + 16).
  auto good = [&](int record_bytes, int capacity) {
    AppendBatch a;
    a.pool = pool.get();
    a.block_stride_bytes = int64_t{heads} * bs * record_bytes;
    a.block_tables = tables.get();
    a.max_blocks_per_seq = 2;
    a.num_seqs = 1;
    a.seq_slots = slots.get();
    a.row_begin = begin.get();
    a.stored_before = stored.get();
    a.num_rows = 3;
    a.max_rows_per_seq = 3;
    a.k = rows.get();
    a.v = rows.get() + heads * d;
    a.row_stride = 2 * heads * d;
    a.head_scales = scales.get();
    a.residual_k = window.get();
    a.residual_v = window.get() + heads * (*a_kivi)->residual_capacity() * d;
    a.residual_capacity = capacity;
    return a;
  };
  const int cap_kivi = (*a_kivi)->residual_capacity(), cap_tq = (*a_tq)->residual_capacity();
  ASSERT_TRUE((*a_fp8)->Append(good(rb, 0), nullptr).ok());
  ASSERT_TRUE((*a_kivi)->Append(good(rbk, cap_kivi), nullptr).ok());
  ASSERT_TRUE((*a_tq)->Append(good(rbt, cap_tq), nullptr).ok());
  {  // r=0 has no window: none needed.
    AppendBatch a = good(rbt, 0);
    a.residual_k = a.residual_v = nullptr;
    EXPECT_TRUE((*a_tq_r0)->Append(a, nullptr).ok());
  }
  ASSERT_CUDA(cudaDeviceSynchronize());
  auto bad = [&](CudaKvAppend& append, int record_bytes, const char* what,
                 std::function<void(AppendBatch&)> edit) {
    AppendBatch a = good(record_bytes, append.residual_capacity());
    edit(a);
    const absl::Status st = append.Append(a, nullptr);
    EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument) << what << ": " << st;
  };
  bad(**a_fp8, rb, "null pool", [](AppendBatch& a) { a.pool = nullptr; });
  bad(**a_fp8, rb, "null k", [](AppendBatch& a) { a.k = nullptr; });
  bad(**a_fp8, rb, "null stored_before", [](AppendBatch& a) { a.stored_before = nullptr; });
  bad(**a_fp8, rb, "negative rows", [](AppendBatch& a) { a.num_rows = -1; });
  bad(**a_fp8, rb, "too many sequences", [](AppendBatch& a) { a.num_seqs = 70000; });
  bad(**a_fp8, rb, "max_rows_per_seq 0", [](AppendBatch& a) { a.max_rows_per_seq = 0; });
  bad(**a_fp8, rb, "max_rows_per_seq > num_rows", [](AppendBatch& a) { a.max_rows_per_seq = 4; });
  bad(**a_fp8, rb, "row_stride", [](AppendBatch& a) { a.row_stride = 100; });
  bad(**a_fp8, rb, "misaligned k", [](AppendBatch& a) {
    a.k = reinterpret_cast<const float*>(reinterpret_cast<const char*>(a.k) + 1);
  });
  bad(**a_fp8, rb, "block stride", [](AppendBatch& a) { a.block_stride_bytes -= 1; });
  bad(**a_fp8, rb, "layer offset", [&](AppendBatch& a) { a.layer_offset_bytes = 16; });
  bad(**a_fp8, rb, "odd pool", [](AppendBatch& a) { a.pool += 1; });
  bad(**a_fp8, rb, "no blocks", [](AppendBatch& a) { a.max_blocks_per_seq = 0; });
  bad(**a_fp8, rb, "FP8 without scales", [](AppendBatch& a) { a.head_scales = nullptr; });
  bad(**a_kivi, rbk, "KIVI without window", [](AppendBatch& a) { a.residual_v = nullptr; });
  bad(**a_kivi, rbk, "KIVI capacity", [](AppendBatch& a) { a.residual_capacity -= 1; });
  bad(**a_kivi, rbk, "KIVI misaligned window", [](AppendBatch& a) { a.residual_k += 1; });
  bad(**a_tq, rbt, "TurboQuant without window", [](AppendBatch& a) { a.residual_k = nullptr; });
  bad(**a_tq, rbt, "TurboQuant capacity", [](AppendBatch& a) { a.residual_capacity = 64; });
  // Nothing to do is not an error.
  AppendBatch empty = good(rb, 0);
  empty.num_rows = 0;
  EXPECT_TRUE((*a_fp8)->Append(empty, nullptr).ok());

  DeviceArray<float> out;
  ASSERT_CUDA(out.Allocate(size_t(2) * heads * 4 * d));
  DeviceArray<int32_t> lens;
  ASSERT_CUDA(lens.Upload({3}));
  auto read = [&](std::function<void(ReadBatch&)> edit) {
    ReadBatch r;
    r.pool = pool.get();
    r.block_stride_bytes = int64_t{heads} * bs * rb;
    r.block_tables = tables.get();
    r.max_blocks_per_seq = 2;
    r.num_seqs = 1;
    r.lens = lens.get();
    r.max_len = 3;
    r.head_scales = scales.get();
    r.out_k = out.get();
    r.out_v = out.get() + heads * 4 * d;
    r.out_stride_tokens = 4;
    edit(r);
    return (*a_fp8)->Read(r, nullptr);
  };
  EXPECT_TRUE(read([](ReadBatch&) {}).ok());
  EXPECT_EQ(read([](ReadBatch& r) { r.lens = nullptr; }).code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(read([](ReadBatch& r) { r.out_stride_tokens = 2; }).code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(read([](ReadBatch& r) { r.head_scales = nullptr; }).code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(read([](ReadBatch& r) { r.max_len = -1; }).code(), absl::StatusCode::kInvalidArgument);
  ASSERT_CUDA(cudaDeviceSynchronize());
}

}  // namespace
}  // namespace kvgate::kernels::cuda
