// PackPagedKv (paged_kv_host.h): the CPU cache's storage rules, applied through the CPU codecs.
#include "kernels/cuda/paged_kv_host.h"

#include <algorithm>
#include <numeric>
#include <random>

#include "absl/strings/str_cat.h"
#include "kernels/cpu/kv_codec.h"
#include "kernels/cpu/numeric.h"
#include "kvgate/kernels/cuda_kv_append.h"

namespace kvgate::kernels::cuda {

absl::StatusOr<HostPagedKv> PackPagedKv(const KvFormatSpec& spec, int d, int heads, int bs,
                                        const std::vector<std::vector<float>>& k,
                                        const std::vector<std::vector<float>>& v, uint64_t seed) {
  auto codec_or = cpu::CreateKvCodec(spec, d);
  if (!codec_or.ok()) return codec_or.status();
  const cpu::KvCodec& codec = **codec_or;
  if (k.size() != v.size() || bs <= 0 || heads <= 0) {
    return absl::InvalidArgumentError("PackPagedKv: k/v sequence counts differ or bad shape");
  }
  HostPagedKv out;
  out.head_dim = d;
  out.num_kv_heads = heads;
  out.block_size = bs;
  out.record_bytes = codec.record_bytes();
  out.block_bytes = int64_t{heads} * bs * out.record_bytes;
  out.num_seqs = static_cast<int>(k.size());
  // The window's split and capacity are CudaKvAppend's (SplitStoredTokens, R + flush), so packed
  // and device-appended caches are interchangeable.
  const int group = codec.key_group_tokens(), residual_r = codec.residual_tokens();
  out.residual_capacity = residual_r > 0 ? residual_r + codec.residual_flush_tokens() : 0;
  const int64_t row = int64_t{heads} * d;
  std::vector<int64_t> lens(out.num_seqs), enc(out.num_seqs);
  int64_t total_blocks = 0;
  for (int s = 0; s < out.num_seqs; ++s) {
    if (k[s].size() != v[s].size() || k[s].size() % row != 0) {
      return absl::InvalidArgumentError(absl::StrCat("PackPagedKv: sequence ", s, " shape"));
    }
    lens[s] = static_cast<int64_t>(k[s].size()) / row;
    enc[s] = SplitStoredTokens(spec, lens[s]).encoded;
    const int64_t blocks = (enc[s] + bs - 1) / bs;
    out.max_blocks_per_seq = std::max<int>(out.max_blocks_per_seq, static_cast<int>(blocks));
    out.max_encoded_len = std::max<int>(out.max_encoded_len, static_cast<int>(enc[s]));
    total_blocks += blocks;
  }
  out.max_blocks_per_seq = std::max(out.max_blocks_per_seq, 1);
  out.num_blocks = std::max<int64_t>(total_blocks, 1);
  out.pool.assign(static_cast<size_t>(out.num_blocks * out.block_bytes), 0);
  out.block_tables.assign(size_t(out.num_seqs) * out.max_blocks_per_seq, 0);
  out.encoded_lens.resize(out.num_seqs);
  out.residual_lens.assign(out.num_seqs, 0);
  out.head_scales.assign(size_t(out.num_seqs) * heads * 2, 0.f);
  if (out.residual_capacity > 0) {
    out.residual_k.assign(size_t(out.num_seqs) * heads * out.residual_capacity * d, 0);
    out.residual_v.assign(out.residual_k.size(), 0);
  }
  std::vector<int32_t> perm(out.num_blocks);
  std::iota(perm.begin(), perm.end(), 0);
  std::shuffle(perm.begin(), perm.end(), std::mt19937_64(seed));
  int64_t next_block = 0;
  std::vector<float> kk, vv;
  std::vector<uint8_t*> recs;
  for (int s = 0; s < out.num_seqs; ++s) {
    const int64_t n = lens[s], e = enc[s];
    out.encoded_lens[s] = static_cast<int32_t>(e);
    out.residual_lens[s] = static_cast<int32_t>(n - e);
    const int64_t blocks = (e + bs - 1) / bs;
    for (int64_t b = 0; b < blocks; ++b) {
      out.block_tables[size_t(s) * out.max_blocks_per_seq + b] = perm[next_block++];
    }
    const float* ks = k[s].data();
    const float* vs = v[s].data();
    if (residual_r > 0) {  // encoded out of the fp16 residual window: from the fp16 values
      kk.assign(ks, ks + e * row);
      vv.assign(vs, vs + e * row);
      for (float& x : kk) x = cpu::RoundToHalf(x);
      for (float& x : vv) x = cpu::RoundToHalf(x);
      ks = kk.data();
      vs = vv.data();
    }
    recs.resize(std::max<int64_t>(e, 1));
    for (int h = 0; h < heads; ++h) {
      cpu::HeadCodecState state;
      codec.ChooseScales(n, k[s].data() + h * d, v[s].data() + h * d, row, &state);
      out.head_scales[(size_t(s) * heads + h) * 2] = state.key_scale;
      out.head_scales[(size_t(s) * heads + h) * 2 + 1] = state.value_scale;
      for (int64_t t = 0; t < e; ++t) {
        const int64_t block = out.block_tables[size_t(s) * out.max_blocks_per_seq + t / bs];
        recs[t] = out.pool.data() + block * out.block_bytes +
                  (int64_t{h} * bs + t % bs) * out.record_bytes;
      }
      const int chunk = std::max(group, 64 / group * group);
      for (int64_t t0 = 0; t0 < e; t0 += chunk) {
        const int count = static_cast<int>(std::min<int64_t>(chunk, e - t0));
        codec.Encode(count, ks + t0 * row + h * d, vs + t0 * row + h * d, row, state,
                     recs.data() + t0);
      }
      for (int64_t t = e; t < n; ++t) {
        const size_t dst = ((size_t(s) * heads + h) * out.residual_capacity + (t - e)) * d;
        for (int c = 0; c < d; ++c) {
          out.residual_k[dst + c] = cpu::FloatToHalf(k[s][t * row + h * d + c]);
          out.residual_v[dst + c] = cpu::FloatToHalf(v[s][t * row + h * d + c]);
        }
      }
    }
    out.bytes_read += blocks * out.block_bytes + (n - e) * heads * d * 4;
  }
  return out;
}

}  // namespace kvgate::kernels::cuda
