// kv_decode_bench: decode attention on the GPU for every KV format at Llama-3-8B head shapes
// (32 query / 8 kv heads, head_dim 128, paged block 16), table-driven cases, one CSV row each:
//   format,case,batch,context,us_per_call,bytes_read,gb_per_s,splits
// plus a device-to-device copy row (format "d2d_copy", bytes read + written) as the ceiling.
// Time: CUDA graph of `iters` calls cycling over `rotations` disjoint copies of the KV data (so L2
// never serves repeated reads), replayed 15 times after warm-up; the median replay / iters.
// Data: a real 4096-token sequence encoded by the CPU codecs (PackPagedKv), its blocks tiled over
// the pool; block tables are random permutations. KIVI and TurboQuant (R > 0) keep each
// sequence's newest tokens in their fp16 window, as the cache would (SplitStoredTokens).
//
//   kv_decode_bench [--formats fp16,tq4] [--cases B1_L32K,B16_L32K] > decode.csv
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "cli/setting_list.h"
#include "kernels/cuda/paged_kv_host.h"
#include "kvgate/kernels/cuda_attention.h"
#include "kvgate/kernels/cuda_kv_append.h"
#include "tools/bench/cuda_check.h"

namespace {

using kvgate::kernels::KvFormatSpec;
using kvgate::kernels::ParseKvFormat;
using namespace kvgate::kernels::cuda;

struct Case {
  const char* name;
  int batch;
  int context;
};
constexpr Case kCases[] = {
    {"B1_L32K", 1, 32768}, {"B1_L128K", 1, 131072}, {"B16_L32K", 16, 32768}, {"B64_L4K", 64, 4096}};
constexpr int kQHeads = 32, kKvHeads = 8, kHeadDim = 128, kBlock = 16;

float Median(std::vector<float> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

void CopyCeiling() {
  const size_t bytes = size_t{2} << 30;
  void *a = nullptr, *b = nullptr;
  CHECK_CUDA(cudaMalloc(&a, bytes));
  CHECK_CUDA(cudaMalloc(&b, bytes));
  CHECK_CUDA(cudaMemset(a, 1, bytes));
  cudaEvent_t e0, e1;
  cudaEventCreate(&e0);
  cudaEventCreate(&e1);
  std::vector<float> ms;
  for (int i = 0; i < 12; ++i) {
    cudaEventRecord(e0);
    CHECK_CUDA(cudaMemcpyAsync(b, a, bytes, cudaMemcpyDeviceToDevice));
    cudaEventRecord(e1);
    cudaEventSynchronize(e1);
    float t = 0;
    cudaEventElapsedTime(&t, e0, e1);
    if (i >= 2) ms.push_back(t);
  }
  const float t = Median(ms);
  std::printf("d2d_copy,2GiB,1,0,%.2f,%zu,%.1f,0\n", t * 1e3f, 2 * bytes, 2 * bytes / (t * 1e6));
  cudaFree(a);
  cudaFree(b);
}

void RunFormat(const std::string& format, const std::vector<std::string>& cases) {
  auto spec = ParseKvFormat(format);
  if (!spec.ok()) {
    std::fprintf(stderr, "%s: %s\n", format.c_str(), spec.status().ToString().c_str());
    return;
  }
  // Template: one real 4096-token sequence.
  const int tmpl_len = 4096;
  std::mt19937_64 rng(7);
  std::normal_distribution<float> normal(0.f, 1.f);
  std::vector<std::vector<float>> k(1), v(1);
  k[0].resize(size_t(tmpl_len) * kKvHeads * kHeadDim);
  v[0].resize(k[0].size());
  for (size_t i = 0; i < k[0].size(); ++i) {
    k[0][i] = normal(rng) + 0.3f * float(i % kHeadDim) / kHeadDim;
    v[0][i] = normal(rng);
  }
  auto tmpl = PackPagedKv(*spec, kHeadDim, kKvHeads, kBlock, k, v, 11);
  if (!tmpl.ok()) {
    std::fprintf(stderr, "%s: %s\n", format.c_str(), tmpl.status().ToString().c_str());
    return;
  }
  auto attn_or = CudaDecodeAttention::Create(*spec, kHeadDim, kKvHeads, kBlock);
  if (!attn_or.ok()) {
    std::fprintf(stderr, "%s: %s\n", format.c_str(), attn_or.status().ToString().c_str());
    return;
  }
  auto& attn = *attn_or;
  const int cap = tmpl->residual_capacity;
  for (const Case& c : kCases) {
    if (std::find(cases.begin(), cases.end(), c.name) == cases.end()) continue;
    // Blocks / fp16 window as the cache leaves them (KIVI, TurboQuant with R > 0: the newest
    // R..R+F-1 tokens in the window).
    const StoredSplit split = SplitStoredTokens(*spec, c.context);
    const int enc = static_cast<int>(split.encoded), res = static_cast<int>(split.residual);
    const int blocks_per_seq = (enc + kBlock - 1) / kBlock;
    const int64_t n_blocks = int64_t{c.batch} * blocks_per_seq;
    const int64_t bytes_call = n_blocks * tmpl->block_bytes +
                               int64_t{c.batch} * kKvHeads * res * kHeadDim * 4 +
                               2LL * c.batch * kQHeads * kHeadDim * 4;
    const int rot = std::clamp<int>(static_cast<int>((512LL << 20) / bytes_call) + 1, 2, 32);
    const int64_t pool_blocks = rot * n_blocks;
    uint8_t* pool = nullptr;
    CHECK_CUDA(cudaMalloc(&pool, pool_blocks * tmpl->block_bytes));
    const int64_t tb = tmpl->num_blocks;
    CHECK_CUDA(cudaMemcpy(pool, tmpl->pool.data(), std::min(tb, pool_blocks) * tmpl->block_bytes,
                          cudaMemcpyHostToDevice));
    for (int64_t done = tb; done < pool_blocks;) {
      const int64_t n = std::min(done, pool_blocks - done);
      CHECK_CUDA(cudaMemcpy(pool + done * tmpl->block_bytes, pool, n * tmpl->block_bytes,
                            cudaMemcpyDeviceToDevice));
      done += n;
    }
    std::vector<int32_t> perm(pool_blocks);
    std::iota(perm.begin(), perm.end(), 0);
    std::shuffle(perm.begin(), perm.end(), rng);
    int32_t* tables = nullptr;
    CHECK_CUDA(cudaMalloc(&tables, perm.size() * 4));
    CHECK_CUDA(cudaMemcpy(tables, perm.data(), perm.size() * 4, cudaMemcpyHostToDevice));
    std::vector<int32_t> enc_lens(c.batch, enc), res_lens(c.batch, res);
    int32_t *d_enc = nullptr, *d_res = nullptr;
    CHECK_CUDA(cudaMalloc(&d_enc, c.batch * 4));
    CHECK_CUDA(cudaMalloc(&d_res, c.batch * 4));
    CHECK_CUDA(cudaMemcpy(d_enc, enc_lens.data(), c.batch * 4, cudaMemcpyHostToDevice));
    CHECK_CUDA(cudaMemcpy(d_res, res_lens.data(), c.batch * 4, cudaMemcpyHostToDevice));
    uint16_t *rk = nullptr, *rv = nullptr;
    if (cap > 0) {
      std::vector<uint16_t> host(size_t(rot) * c.batch * kKvHeads * cap * kHeadDim);
      for (size_t i = 0; i < host.size(); ++i)
        host[i] = tmpl->residual_k[i % tmpl->residual_k.size()];
      CHECK_CUDA(cudaMalloc(&rk, host.size() * 2));
      CHECK_CUDA(cudaMalloc(&rv, host.size() * 2));
      CHECK_CUDA(cudaMemcpy(rk, host.data(), host.size() * 2, cudaMemcpyHostToDevice));
      for (size_t i = 0; i < host.size(); ++i)
        host[i] = tmpl->residual_v[i % tmpl->residual_v.size()];
      CHECK_CUDA(cudaMemcpy(rv, host.data(), host.size() * 2, cudaMemcpyHostToDevice));
    }
    std::vector<float> scales(size_t(c.batch) * kKvHeads * 2);
    for (size_t i = 0; i < scales.size(); ++i)
      scales[i] = tmpl->head_scales[i % tmpl->head_scales.size()];
    float* d_scales = nullptr;
    CHECK_CUDA(cudaMalloc(&d_scales, scales.size() * 4));
    CHECK_CUDA(cudaMemcpy(d_scales, scales.data(), scales.size() * 4, cudaMemcpyHostToDevice));
    std::vector<float> q(size_t(rot) * c.batch * kQHeads * kHeadDim);
    for (float& x : q) x = normal(rng);
    float *d_q = nullptr, *d_out = nullptr;
    CHECK_CUDA(cudaMalloc(&d_q, q.size() * 4));
    CHECK_CUDA(cudaMalloc(&d_out, q.size() * 4));
    CHECK_CUDA(cudaMemcpy(d_q, q.data(), q.size() * 4, cudaMemcpyHostToDevice));
    auto batch_for = [&](int r) {
      DecodeBatch b;
      b.pool = pool;
      b.block_stride_bytes = tmpl->block_bytes;
      b.block_tables = tables + int64_t{r} * n_blocks;
      b.max_blocks_per_seq = std::max(blocks_per_seq, 1);
      b.encoded_lens = d_enc;
      b.max_encoded_len = enc;
      if (cap > 0) {
        b.residual_lens = d_res;
        b.residual_k = rk + size_t(r) * c.batch * kKvHeads * cap * kHeadDim;
        b.residual_v = rv + size_t(r) * c.batch * kKvHeads * cap * kHeadDim;
        b.residual_capacity = cap;
      }
      b.head_scales = d_scales;
      b.num_seqs = c.batch;
      b.num_q_heads = kQHeads;
      b.q = d_q + size_t(r) * c.batch * kQHeads * kHeadDim;
      b.out = d_out + size_t(r) * c.batch * kQHeads * kHeadDim;
      b.scale = 1.0f / std::sqrt(float(kHeadDim));
      return b;
    };
    cudaStream_t stream;
    CHECK_CUDA(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
    for (int r = 0; r < rot; ++r) {
      auto st = attn->Run(batch_for(r), stream);
      if (!st.ok()) {
        std::fprintf(stderr, "%s %s: %s\n", format.c_str(), c.name, st.ToString().c_str());
        std::exit(1);
      }
    }
    CHECK_CUDA(cudaStreamSynchronize(stream));
    const int iters = rot * std::max(1, (40 + rot - 1) / rot);
    cudaGraph_t graph;
    cudaGraphExec_t exec;
    CHECK_CUDA(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal));
    for (int i = 0; i < iters; ++i) (void)attn->Run(batch_for(i % rot), stream);
    CHECK_CUDA(cudaStreamEndCapture(stream, &graph));
    CHECK_CUDA(cudaGraphInstantiate(&exec, graph, 0));
    cudaEvent_t e0, e1;
    cudaEventCreate(&e0);
    cudaEventCreate(&e1);
    std::vector<float> per_call_us;
    for (int rep = 0; rep < 17; ++rep) {
      cudaEventRecord(e0, stream);
      CHECK_CUDA(cudaGraphLaunch(exec, stream));
      cudaEventRecord(e1, stream);
      CHECK_CUDA(cudaEventSynchronize(e1));
      float ms = 0;
      cudaEventElapsedTime(&ms, e0, e1);
      if (rep >= 2) per_call_us.push_back(ms * 1e3f / iters);
    }
    const float us = Median(per_call_us);
    std::printf("%s,%s,%d,%d,%.2f,%lld,%.1f,%d\n", format.c_str(), c.name, c.batch, c.context, us,
                static_cast<long long>(bytes_call), bytes_call / (us * 1e3),
                attn->last_num_splits());
    std::fflush(stdout);
    cudaGraphExecDestroy(exec);
    cudaGraphDestroy(graph);
    cudaStreamDestroy(stream);
    for (void* p :
         {static_cast<void*>(pool), static_cast<void*>(tables), static_cast<void*>(d_enc),
          static_cast<void*>(d_res), static_cast<void*>(rk), static_cast<void*>(rv),
          static_cast<void*>(d_scales), static_cast<void*>(d_q), static_cast<void*>(d_out)}) {
      if (p) cudaFree(p);
    }
  }
}

}  // namespace

int main(int argc, char** argv) {
  std::string formats = "fp16,bf16,fp8,int8,kivi4,kivi2,tq4,tq3.5,tq3,tq2.5";
  std::string cases = "B1_L32K,B1_L128K,B16_L32K,B64_L4K";
  for (int i = 1; i + 1 < argc; i += 2) {
    if (!std::strcmp(argv[i], "--formats")) formats = argv[i + 1];
    if (!std::strcmp(argv[i], "--cases")) cases = argv[i + 1];
  }
  auto st = CudaDeviceStatus();
  if (!st.ok()) {
    std::fprintf(stderr, "kv_decode_bench: %s\n", st.ToString().c_str());
    return 77;
  }
  cudaDeviceProp prop;
  CHECK_CUDA(cudaGetDeviceProperties(&prop, 0));
  std::fprintf(stderr, "device: %s, %d SMs, L2 %d MiB\n", prop.name, prop.multiProcessorCount,
               prop.l2CacheSize >> 20);
  std::printf("format,case,batch,context,us_per_call,bytes_read,gb_per_s,splits\n");
  CopyCeiling();
  const auto case_list = kvgate::cli::SplitSettingList(cases);
  for (const auto& f : kvgate::cli::SplitSettingList(formats)) RunFormat(f, case_list);
  return 0;
}
