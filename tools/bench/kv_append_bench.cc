// kv_append_bench: device KV append (CudaKvAppend::Append, kvgate/kernels/cuda_kv_append.h) per KV
// format at Llama-3-8B head shapes (8 kv heads, head_dim 128, block 16), two calls:
//   decode:  256 sequences x 1 token, stored lengths staggered (1000 + i) and advancing by one
//            per call, so the fp16 windows flush as in a real decode loop (KIVI: each sequence
//            once every G calls; TurboQuant with R > 0: once every 16 calls, 16 tokens);
//   prefill: 1 sequence x 8192 tokens into an empty sequence (FP8 scales reset before each call,
//            so each call chooses them as a fresh prefill does).
// Rows come from a fused qkv buffer (row stride 4 x 8 x 128 floats). Time: CUDA events around each
// call, median of --iters calls after 5 warm-up calls. Prints a markdown table:
//   record bytes, us per call, tokens/s, GB/s of records written (with an fp16 window: encoded
//   records plus the window writes), GB/s of all traffic (fp32 rows read + bytes written).
//   TurboQuant runs with its default window (tq4: R = 128) and without ("tq:k=4,v=4,r=0").
//
//   kv_append_bench [--formats fp16,tq4,tq:k=4,v=4,r=0] [--iters 25]
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <numeric>
#include <random>
#include <string>
#include <tuple>
#include <vector>

#include "cli/setting_list.h"
#include "kvgate/kernels/cuda_attention.h"
#include "kvgate/kernels/cuda_kv_append.h"
#include "tools/bench/cuda_check.h"

namespace {

using kvgate::kernels::KvFormatKind;
using kvgate::kernels::KvFormatSpec;
using kvgate::kernels::ParseKvFormat;
using namespace kvgate::kernels::cuda;

#define CHECK_OK(expr)                                                               \
  do {                                                                               \
    absl::Status _s = (expr);                                                        \
    if (!_s.ok()) {                                                                  \
      std::fprintf(stderr, "%s:%d %s\n", __FILE__, __LINE__, _s.ToString().c_str()); \
      std::exit(1);                                                                  \
    }                                                                                \
  } while (0)

constexpr int kKvHeads = 8, kHeadDim = 128, kBlock = 16, kWarmup = 5;
constexpr int kDecodeSeqs = 256, kDecodeBase = 1000, kPrefillTokens = 8192;

template <class T>
T* Upload(const std::vector<T>& host) {
  T* p = nullptr;
  CHECK_CUDA(cudaMalloc(&p, std::max<size_t>(host.size(), 1) * sizeof(T)));
  CHECK_CUDA(cudaMemcpy(p, host.data(), host.size() * sizeof(T), cudaMemcpyHostToDevice));
  return p;
}

struct Result {
  double us = 0, tokens_per_s = 0, record_gbps = 0, traffic_gbps = 0;
};

// One case: `calls` append calls of `seqs` sequences x `rows_per_seq` rows; call i appends after
// stored[i][s] tokens. Returns the median call time and the bytes each call moved on average.
Result RunCase(const KvFormatSpec& spec, CudaKvAppend& append, int seqs, int rows_per_seq,
               const std::vector<std::vector<int32_t>>& stored, int iters) {
  const int d = kHeadDim, heads = kKvHeads, rb = append.record_bytes();
  const int cap = append.residual_capacity();
  const int calls = kWarmup + iters;
  int64_t max_len = 0;
  for (const auto& call : stored) {
    for (int32_t s : call) max_len = std::max<int64_t>(max_len, s + rows_per_seq);
  }
  const int max_blocks = static_cast<int>((max_len + kBlock - 1) / kBlock);
  const int64_t num_blocks = int64_t{seqs} * max_blocks;
  const int64_t block_bytes = int64_t{heads} * kBlock * rb;  // one layer
  std::vector<int32_t> perm(num_blocks);
  std::iota(perm.begin(), perm.end(), 0);
  std::shuffle(perm.begin(), perm.end(), std::mt19937_64(42));
  uint8_t* pool = nullptr;
  CHECK_CUDA(cudaMalloc(&pool, num_blocks * block_bytes));
  int32_t* tables = Upload(perm);
  std::vector<int32_t> begin(seqs + 1);
  for (int s = 0; s <= seqs; ++s) begin[s] = s * rows_per_seq;
  int32_t* d_begin = Upload(begin);
  std::vector<int32_t*> d_stored;
  for (const auto& call : stored) d_stored.push_back(Upload(call));
  const int rows = seqs * rows_per_seq;
  const int64_t row_stride = 4 * heads * d;
  // Uniform in [-2, 2) (the encode's cost does not depend on the distribution; 134 MB for the
  // prefill case, so a cheap generator).
  std::vector<float> qkv(size_t(rows) * row_stride);
  uint64_t state = 0x9E3779B97F4A7C15ull;
  for (float& x : qkv) {
    state = state * 6364136223846793005ull + 1442695040888963407ull;
    x = static_cast<float>(state >> 40) * 0x1.0p-22f - 2.0f;
  }
  float* d_qkv = Upload(qkv);
  float* scales = nullptr;
  CHECK_CUDA(cudaMalloc(&scales, sizeof(float) * seqs * heads * 2));
  CHECK_CUDA(cudaMemset(scales, 0, sizeof(float) * seqs * heads * 2));
  uint16_t *res_k = nullptr, *res_v = nullptr;
  const size_t window = size_t(seqs) * heads * std::max(cap, 1) * d;
  CHECK_CUDA(cudaMalloc(&res_k, window * 2));
  CHECK_CUDA(cudaMalloc(&res_v, window * 2));
  CHECK_CUDA(cudaMemset(res_k, 0, window * 2));
  CHECK_CUDA(cudaMemset(res_v, 0, window * 2));

  AppendBatch a;
  a.pool = pool;
  a.block_stride_bytes = block_bytes;
  a.block_tables = tables;
  a.max_blocks_per_seq = max_blocks;
  a.num_seqs = seqs;
  a.row_begin = d_begin;
  a.num_rows = rows;
  a.max_rows_per_seq = rows_per_seq;
  a.k = d_qkv + 2 * heads * d;
  a.v = d_qkv + 3 * heads * d;
  a.row_stride = row_stride;
  a.head_scales = scales;
  a.residual_k = res_k;
  a.residual_v = res_v;
  a.residual_capacity = cap;
  cudaEvent_t e0, e1;
  CHECK_CUDA(cudaEventCreate(&e0));
  CHECK_CUDA(cudaEventCreate(&e1));
  std::vector<float> ms;
  int64_t bytes_written = 0;
  const bool fresh_scales = spec.kind == KvFormatKind::kFp8 && rows_per_seq > 1;
  for (int i = 0; i < calls; ++i) {
    a.stored_before = d_stored[i];
    if (fresh_scales) CHECK_CUDA(cudaMemsetAsync(scales, 0, sizeof(float) * seqs * heads * 2));
    CHECK_CUDA(cudaEventRecord(e0));
    CHECK_OK(append.Append(a, nullptr));
    CHECK_CUDA(cudaEventRecord(e1));
    CHECK_CUDA(cudaEventSynchronize(e1));
    float t = 0;
    CHECK_CUDA(cudaEventElapsedTime(&t, e0, e1));
    if (i < kWarmup) continue;
    ms.push_back(t);
    for (int s = 0; s < seqs; ++s) {  // what this call wrote
      const StoredSplit before = SplitStoredTokens(spec, stored[i][s]);
      const StoredSplit after = SplitStoredTokens(spec, stored[i][s] + rows_per_seq);
      bytes_written += (after.encoded - before.encoded) * heads * rb;
      if (cap > 0) {  // window: new rows that stay, plus the tokens moved down
        const int64_t kept_new = std::min<int64_t>(after.residual, rows_per_seq);
        const int64_t moved = after.encoded > before.encoded ? after.residual - kept_new : 0;
        bytes_written += (kept_new + moved) * heads * d * 2 * 2;
      }
    }
  }
  std::sort(ms.begin(), ms.end());
  const double median_s = ms[ms.size() / 2] * 1e-3;
  const double written = static_cast<double>(bytes_written) / iters;
  const double read = double(rows) * heads * d * 4 * 2;  // fp32 keys and values
  Result r;
  r.us = median_s * 1e6;
  r.tokens_per_s = rows / median_s;
  r.record_gbps = written / median_s * 1e-9;
  r.traffic_gbps = (written + read) / median_s * 1e-9;
  for (int32_t* p : d_stored) cudaFree(p);
  for (void* p : {static_cast<void*>(pool), static_cast<void*>(tables), static_cast<void*>(d_begin),
                  static_cast<void*>(d_qkv), static_cast<void*>(scales), static_cast<void*>(res_k),
                  static_cast<void*>(res_v)}) {
    cudaFree(p);
  }
  cudaEventDestroy(e0);
  cudaEventDestroy(e1);
  return r;
}

}  // namespace

int main(int argc, char** argv) {
  std::string formats =
      "fp16,bf16,fp8,int8,kivi2,kivi4,tq4,tq3.5,tq3,tq2.5,tq:k=4,v=2.5,tq:k=4,v=4,r=0,"
      "tq:k=3.5,v=3.5,r=0";
  int iters = 25;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg == "--formats" && i + 1 < argc) {
      formats = argv[++i];
    } else if (arg == "--iters" && i + 1 < argc) {
      iters = std::max(20, std::atoi(argv[++i]));
    } else {
      std::fprintf(stderr, "usage: %s [--formats a,b,...] [--iters N>=20]\n", argv[0]);
      return 2;
    }
  }
  CHECK_OK(CudaDeviceStatus());
  cudaDeviceProp prop;
  CHECK_CUDA(cudaGetDeviceProperties(&prop, 0));
  std::printf("device: %s; %d kv heads, head_dim %d, block %d; median of %d calls\n\n", prop.name,
              kKvHeads, kHeadDim, kBlock, iters);
  std::printf(
      "| format | record B | call | rows | us/call | Mtokens/s | records GB/s | traffic GB/s |\n");
  std::printf("|---|---:|---|---:|---:|---:|---:|---:|\n");
  // Formats are split on ',' except inside "tq:k=A,v=B[,qjl][,r=R]".
  for (const std::string& name : kvgate::cli::SplitSettingList(formats)) {
    auto spec = ParseKvFormat(name);
    CHECK_OK(spec.status());
    auto append = CudaKvAppend::Create(*spec, kHeadDim, kKvHeads, kBlock);
    CHECK_OK(append.status());
    const int calls = kWarmup + iters;
    std::vector<std::vector<int32_t>> decode(calls, std::vector<int32_t>(kDecodeSeqs));
    for (int i = 0; i < calls; ++i) {
      for (int s = 0; s < kDecodeSeqs; ++s) decode[i][s] = kDecodeBase + s + i;
    }
    const std::vector<std::vector<int32_t>> prefill(calls, std::vector<int32_t>{0});
    const Result dr = RunCase(*spec, **append, kDecodeSeqs, 1, decode, iters);
    const Result pr = RunCase(*spec, **append, 1, kPrefillTokens, prefill, iters);
    for (const auto& [call, rows, r] : {std::tuple{"decode 256x1", kDecodeSeqs, dr},
                                        std::tuple{"prefill 1x8192", kPrefillTokens, pr}}) {
      std::printf("| %s | %d | %s | %d | %.1f | %.1f | %.1f | %.1f |\n", name.c_str(),
                  (*append)->record_bytes(), call, rows, r.us, r.tokens_per_s * 1e-6, r.record_gbps,
                  r.traffic_gbps);
    }
  }
  return 0;
}
