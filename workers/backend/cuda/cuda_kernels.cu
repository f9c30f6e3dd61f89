// Device kernels of the CUDA ModelRunner; contracts in cuda_kernels.h. fp32 arithmetic throughout
// (fp64 for the sampling probabilities); the matrix products are cuBLAS's (cuda_model_runner.cc)
// and the KV pool belongs to kvgate_kernels_cuda.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <climits>
#include <cstdint>
#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>
#include <cub/device/device_radix_sort.cuh>

#include "workers/backend/cuda/cuda_kernels.h"

namespace kvgate::worker::cuda {
namespace {

__device__ __forceinline__ float Bf16ToFloat(uint16_t bits) {
  return __uint_as_float(static_cast<uint32_t>(bits) << 16);
}
__device__ __forceinline__ uint16_t FloatToBf16(float x) {
  return __bfloat16_as_ushort(__float2bfloat16_rn(x));
}

// The compute type T of weights and GEMM inputs: uint16_t holds bf16 bits, float is itself.
template <class T>
__device__ __forceinline__ float ToFloat(T x);
template <>
__device__ __forceinline__ float ToFloat<uint16_t>(uint16_t x) {
  return Bf16ToFloat(x);
}
template <>
__device__ __forceinline__ float ToFloat<float>(float x) {
  return x;
}
template <class T>
__device__ __forceinline__ T FromFloat(float x);
template <>
__device__ __forceinline__ uint16_t FromFloat<uint16_t>(float x) {
  return FloatToBf16(x);
}
template <>
__device__ __forceinline__ float FromFloat<float>(float x) {
  return x;
}

__device__ __forceinline__ float WarpSum(float x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

template <class T>
__global__ void EmbeddingKernel(const T* embed, const int32_t* tokens, float* x, int hidden) {
  const int64_t row = blockIdx.x;
  const T* src = embed + int64_t{tokens[row]} * hidden;
  float* dst = x + row * hidden;
  for (int j = threadIdx.x; j < hidden; j += blockDim.x) dst[j] = ToFloat(src[j]);
}

template <class T>
__global__ void RmsNormKernel(const float* x, const float* weight, const int32_t* gather_rows,
                              T* out, int hidden, float eps) {
  __shared__ float partial[32];
  const int64_t row = blockIdx.x;
  const int64_t src_row = gather_rows != nullptr ? gather_rows[row] : row;
  const float* src = x + src_row * hidden;
  float sum = 0;
  for (int j = threadIdx.x; j < hidden; j += blockDim.x) sum += src[j] * src[j];
  sum = WarpSum(sum);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) partial[warp] = sum;
  __syncthreads();
  if (warp == 0) {
    float s = lane < static_cast<int>(blockDim.x / 32) ? partial[lane] : 0.0f;
    s = WarpSum(s);
    if (lane == 0) partial[0] = s;
  }
  __syncthreads();
  const float inv = rsqrtf(partial[0] / hidden + eps);
  T* dst = out + row * hidden;
  for (int j = threadIdx.x; j < hidden; j += blockDim.x) {
    dst[j] = FromFloat<T>(src[j] * inv * weight[j]);
  }
}

constexpr int kEpilogueWarps = 4;

// grid (rows, ceil((Hq + 2 Hkv) / kEpilogueWarps)); each warp one head vector of one row.
__global__ void __launch_bounds__(kEpilogueWarps * 32)
    QkvEpilogueKernel(float* qkv, const float* bias, const float* q_norm, const float* k_norm,
                      const double* inv_freq, float norm_eps, const int32_t* row_position,
                      QkvShape shape, float* q_out) {
  const int row = blockIdx.x;
  const int head = blockIdx.y * kEpilogueWarps + threadIdx.x / 32;  // [0, Hq): q; then k; then v
  const int lane = threadIdx.x % 32;
  const int hq = shape.num_q_heads, hkv = shape.num_kv_heads;
  if (head >= hq + 2 * hkv) return;
  const int d = shape.head_dim, half = d / 2;
  const int64_t qkv_dim = int64_t{hq + 2 * hkv} * d;
  float* src = qkv + row * qkv_dim + int64_t{head} * d;
  const float* b = bias != nullptr ? bias + int64_t{head} * d : nullptr;
  const bool is_q = head < hq;
  const bool is_k = !is_q && head < hq + hkv;
  const float* norm = is_q ? q_norm : (is_k ? k_norm : nullptr);
  constexpr int kMaxPairs = 4;  // half <= 128
  float lo[kMaxPairs], hi[kMaxPairs];
  float sumsq = 0;
#pragma unroll
  for (int i = 0; i < kMaxPairs; ++i) {
    const int j = lane + 32 * i;
    lo[i] = hi[i] = 0;
    if (j < half) {
      lo[i] = src[j] + (b ? b[j] : 0.0f);
      hi[i] = src[j + half] + (b ? b[j + half] : 0.0f);
      sumsq += lo[i] * lo[i] + hi[i] * hi[i];
    }
  }
  if (norm != nullptr) {
    const float inv = rsqrtf(WarpSum(sumsq) / d + norm_eps);
#pragma unroll
    for (int i = 0; i < kMaxPairs; ++i) {
      const int j = lane + 32 * i;
      if (j < half) {
        lo[i] = lo[i] * inv * norm[j];
        hi[i] = hi[i] * inv * norm[j + half];
      }
    }
  }
  if (is_q || is_k) {
    const double position = row_position[row];
#pragma unroll
    for (int i = 0; i < kMaxPairs; ++i) {
      const int j = lane + 32 * i;
      if (j < half) {
        double s, c;
        sincos(position * inv_freq[j], &s, &c);
        const float cf = static_cast<float>(c), sf = static_cast<float>(s);
        const float x0 = lo[i], x1 = hi[i];
        lo[i] = x0 * cf - x1 * sf;
        hi[i] = x1 * cf + x0 * sf;
      }
    }
  }
  float* dst = src;  // k and v stay in place
  if (is_q) {
    const int group = hq / hkv;
    const int slot = (head / group) * shape.group_pad + head % group;
    dst = q_out + (int64_t{row} * hkv * shape.group_pad + slot) * d;
  }
#pragma unroll
  for (int i = 0; i < kMaxPairs; ++i) {
    const int j = lane + 32 * i;
    if (j < half) {
      dst[j] = lo[i];
      dst[j + half] = hi[i];
    }
  }
}

template <class T>
__global__ void GatherHeadsKernel(const float* in, T* out, int64_t total, QkvShape shape) {
  const int d = shape.head_dim, hq = shape.num_q_heads;
  const int group = hq / shape.num_kv_heads;
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < total;
       i += int64_t{gridDim.x} * blockDim.x) {
    const int64_t row = i / (int64_t{hq} * d);
    const int head = static_cast<int>((i / d) % hq), e = static_cast<int>(i % d);
    const int slot = (head / group) * shape.group_pad + head % group;
    out[i] = FromFloat<T>(in[(row * shape.num_kv_heads * shape.group_pad + slot) * int64_t{d} + e]);
  }
}

template <class T>
__global__ void SwiGluKernel(const float* gate_up, T* act, int num_rows, int inter) {
  const int64_t total = int64_t{num_rows} * inter;
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < total;
       i += int64_t{gridDim.x} * blockDim.x) {
    const int64_t row = i / inter, j = i % inter;
    const float gate = gate_up[row * 2 * inter + j];
    const float up = gate_up[row * 2 * inter + inter + j];
    act[i] = FromFloat<T>(gate / (1.0f + __expf(-gate)) * up);
  }
}

// SplitMix64's output function over the counter seed + (i + 1) * golden ratio: a stateless hash,
// so every element is independent of the launch shape.
__device__ __forceinline__ float UniformAt(uint64_t seed, int64_t i) {
  uint64_t z = seed + (static_cast<uint64_t>(i) + 1) * 0x9e3779b97f4a7c15ull;
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  z ^= z >> 31;
  return static_cast<float>(z >> 40) * (2.0f / 16777216.0f) - 1.0f;  // [-1, 1)
}

template <class T>
__global__ void FillUniformBf16Kernel(T* dst, int64_t n, uint64_t seed, float bound) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n;
       i += int64_t{gridDim.x} * blockDim.x) {
    dst[i] = FromFloat<T>(Bf16ToFloat(FloatToBf16(bound * UniformAt(seed, i))));
  }
}

__global__ void FillUniformFloatKernel(float* dst, int64_t n, uint64_t seed, float bound) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n;
       i += int64_t{gridDim.x} * blockDim.x) {
    dst[i] = bound * UniformAt(seed, i);
  }
}

__global__ void FillFloatKernel(float* dst, int64_t n, float value) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n;
       i += int64_t{gridDim.x} * blockDim.x) {
    dst[i] = value;
  }
}

// ---- Sampling ----------------------------------------------------------------------------------

constexpr int kSampleThreads = 512;
constexpr int kSampleItems = 4;  // scan items per thread per chunk
constexpr uint32_t kNonFiniteKey = 0xffffffffu;

// Sort key of a logit: ascending keys are descending logits; every non-finite logit gets the
// largest key (sorted after all candidates); -0.0 and +0.0 share one key (the host compares them
// equal, so their ids stay ascending).
__device__ __forceinline__ uint32_t DescendingKey(float x) {
  if (!isfinite(x)) return kNonFiniteKey;
  uint32_t bits = __float_as_uint(x);
  if ((bits << 1) == 0) bits = 0;
  const uint32_t ascending = (bits & 0x80000000u) != 0 ? ~bits : (bits | 0x80000000u);
  return ~ascending;
}

// grid (ceil(vocab / 256), rows): keys [sort_rows, vocab] = (sort_row << 32) | DescendingKey and
// ids = column, for the rows that sample.
__global__ void SortKeysKernel(const float* logits, int vocab, const SampleRow* params,
                               uint64_t* keys, int32_t* ids) {
  const int row = blockIdx.y;
  const int s = params[row].sort_row;
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (s < 0 || i >= vocab) return;
  const int64_t at = int64_t{s} * vocab + i;
  keys[at] = (static_cast<uint64_t>(s) << 32) | DescendingKey(logits[int64_t{row} * vocab + i]);
  ids[at] = i;
}

struct ArgMax {
  float value;
  int32_t index;
};
struct ArgMaxOp {
  __device__ __forceinline__ ArgMax operator()(const ArgMax& a, const ArgMax& b) const {
    return (b.value > a.value || (b.value == a.value && b.index < a.index)) ? b : a;
  }
};

// Running prefix of a chunked block scan.
struct RunningSum {
  double total;
  __device__ double operator()(double chunk_total) {
    const double before = total;
    total += chunk_total;
    return before;
  }
};

// grid (rows), kSampleThreads threads: one token per row (the contract in cuda_kernels.h).
// sorted_ids: [sort_rows, vocab], the ids of each sampled row in descending logit order.
__global__ void __launch_bounds__(kSampleThreads)
    SampleKernel(const float* logits, int vocab, const SampleRow* params, const int32_t* sorted_ids,
                 int32_t* tokens) {
  using Scan = cub::BlockScan<double, kSampleThreads>;
  using SumD = cub::BlockReduce<double, kSampleThreads>;
  using SumI = cub::BlockReduce<int, kSampleThreads>;
  using Max = cub::BlockReduce<ArgMax, kSampleThreads>;
  __shared__ union {
    typename Scan::TempStorage scan;
    typename SumD::TempStorage sum_d;
    typename SumI::TempStorage sum_i;
    typename Max::TempStorage max;
  } temp;
  __shared__ double shared_d;
  __shared__ int shared_i;

  const int row = blockIdx.x, tid = threadIdx.x;
  const float* x = logits + int64_t{row} * vocab;
  const SampleRow p = params[row];
  if (p.temperature <= 0.0f || p.sort_row < 0) {
    // Greedy: the lowest id among the maxima (a NaN is never taken).
    ArgMax best{-INFINITY, INT_MAX};
    for (int i = tid; i < vocab; i += kSampleThreads) {
      const float v = x[i];
      if (v > best.value || (v == best.value && i < best.index)) best = {v, i};
    }
    best = Max(temp.max).Reduce(best, ArgMaxOp());
    if (tid == 0) tokens[row] = best.index == INT_MAX ? 0 : best.index;
    return;
  }

  int finite = 0;
  for (int i = tid; i < vocab; i += kSampleThreads) finite += isfinite(x[i]) ? 1 : 0;
  finite = SumI(temp.sum_i).Sum(finite);
  if (tid == 0) shared_i = finite;
  __syncthreads();
  finite = shared_i;
  if (finite == 0) {
    if (tid == 0) tokens[row] = 0;
    return;
  }
  const int keep = p.top_k > 0 && p.top_k < finite ? p.top_k : finite;
  const int32_t* ids = sorted_ids + int64_t{p.sort_row} * vocab;
  const double max_logit = x[ids[0]];
  const double inv_t = 1.0 / static_cast<double>(p.temperature);
  auto prob = [&](int i) { return exp((static_cast<double>(x[ids[i]]) - max_logit) * inv_t); };

  double part = 0;
  for (int i = tid; i < keep; i += kSampleThreads) part += prob(i);
  __syncthreads();  // temp.sum_i was read by every thread above
  part = SumD(temp.sum_d).Sum(part);
  if (tid == 0) shared_d = part;
  __syncthreads();
  const double total = shared_d;

  // The first index i < limit whose cumulative mass / divisor reaches threshold, or -1; *cum_at
  // gets that cumulative mass. Uniform across the block.
  __shared__ int found;
  __shared__ double found_cum;
  auto first_reaching = [&](int limit, double threshold, double divisor, double* cum_at) {
    RunningSum running{0.0};
    if (tid == 0) found = INT_MAX;
    for (int base = 0; base < limit; base += kSampleThreads * kSampleItems) {
      double items[kSampleItems];
#pragma unroll
      for (int j = 0; j < kSampleItems; ++j) {
        const int i = base + tid * kSampleItems + j;
        items[j] = i < limit ? prob(i) : 0.0;
      }
      __syncthreads();  // temp and `found` are free
      Scan(temp.scan).InclusiveSum(items, items, running);
#pragma unroll
      for (int j = 0; j < kSampleItems; ++j) {
        const int i = base + tid * kSampleItems + j;
        if (i < limit && items[j] / divisor >= threshold) {
          atomicMin(&found, i);
          break;
        }
      }
      __syncthreads();
      const int f = found;
      if (f != INT_MAX) {
#pragma unroll
        for (int j = 0; j < kSampleItems; ++j) {
          if (base + tid * kSampleItems + j == f) found_cum = items[j];
        }
        __syncthreads();
        *cum_at = found_cum;
        return f;
      }
    }
    return -1;
  };

  int n = keep;
  double kept_total = total;
  if (p.top_p > 0.0f && p.top_p < 1.0f) {
    double cum = 0;
    const int last = first_reaching(keep, static_cast<double>(p.top_p), total, &cum);
    if (last >= 0) {
      n = last + 1;
      kept_total = cum;
    }
  }
  double unused = 0;
  const int pick = first_reaching(n, p.uniform * kept_total, 1.0, &unused);
  if (tid == 0) tokens[row] = ids[pick >= 0 ? pick : n - 1];
}

// Workspace of LaunchSampleTokens: sort keys and ids (in, out), then CUB's temporary storage.
struct SortLayout {
  int end_bit = 32;
  size_t keys_in = 0, keys_out = 0, ids_in = 0, ids_out = 0, temp = 0, temp_bytes = 0, total = 0;
};

size_t Align256(size_t x) { return (x + 255) / 256 * 256; }

cudaError_t ComputeSortLayout(int sort_rows, int vocab, SortLayout* l) {
  if (sort_rows < 0 || vocab <= 0 || int64_t{sort_rows} * vocab > INT32_MAX) {
    return cudaErrorInvalidValue;
  }
  *l = SortLayout{};
  if (sort_rows == 0) return cudaSuccess;
  int row_bits = 0;
  while ((1 << row_bits) < sort_rows) ++row_bits;
  l->end_bit = 32 + row_bits;
  const size_t n = static_cast<size_t>(sort_rows) * vocab;
  l->keys_in = 0;
  l->keys_out = Align256(n * sizeof(uint64_t));
  l->ids_in = l->keys_out + Align256(n * sizeof(uint64_t));
  l->ids_out = l->ids_in + Align256(n * sizeof(int32_t));
  l->temp = l->ids_out + Align256(n * sizeof(int32_t));
  const cudaError_t e = cub::DeviceRadixSort::SortPairs(
      nullptr, l->temp_bytes, static_cast<const uint64_t*>(nullptr),
      static_cast<uint64_t*>(nullptr), static_cast<const int32_t*>(nullptr),
      static_cast<int32_t*>(nullptr), static_cast<int>(n), 0, l->end_bit);
  if (e != cudaSuccess) return e;
  l->total = l->temp + Align256(l->temp_bytes);
  return cudaSuccess;
}

int GridFor(int64_t n, int threads) {
  const int64_t blocks = (n + threads - 1) / threads;
  return static_cast<int>(blocks < 65535 * 16 ? (blocks > 0 ? blocks : 1) : 65535 * 16);
}

}  // namespace

template <class T>
cudaError_t LaunchEmbedding(const T* embed, const int32_t* tokens, float* x, int num_rows,
                            int hidden, cudaStream_t stream) {
  if (num_rows <= 0) return cudaSuccess;
  EmbeddingKernel<T><<<num_rows, 256, 0, stream>>>(embed, tokens, x, hidden);
  return cudaGetLastError();
}

template <class T>
cudaError_t LaunchRmsNorm(const float* x, const float* weight, const int32_t* gather_rows, T* out,
                          int num_rows, int hidden, float eps, cudaStream_t stream) {
  if (num_rows <= 0) return cudaSuccess;
  RmsNormKernel<T><<<num_rows, 256, 0, stream>>>(x, weight, gather_rows, out, hidden, eps);
  return cudaGetLastError();
}

cudaError_t LaunchQkvEpilogue(float* qkv, const float* bias, const float* q_norm,
                              const float* k_norm, const double* inv_freq, float norm_eps,
                              const int32_t* row_position, int num_rows, const QkvShape& shape,
                              float* q_out, cudaStream_t stream) {
  if (num_rows <= 0) return cudaSuccess;
  if (shape.head_dim % 2 != 0 || shape.head_dim > 256 || shape.num_kv_heads <= 0 ||
      shape.num_q_heads % shape.num_kv_heads != 0 ||
      shape.group_pad < shape.num_q_heads / shape.num_kv_heads) {
    return cudaErrorInvalidValue;
  }
  const int heads = shape.num_q_heads + 2 * shape.num_kv_heads;
  const dim3 grid(num_rows, (heads + kEpilogueWarps - 1) / kEpilogueWarps);
  QkvEpilogueKernel<<<grid, kEpilogueWarps * 32, 0, stream>>>(qkv, bias, q_norm, k_norm, inv_freq,
                                                              norm_eps, row_position, shape, q_out);
  return cudaGetLastError();
}

template <class T>
cudaError_t LaunchGatherHeads(const float* in, T* out, int num_rows, const QkvShape& shape,
                              cudaStream_t stream) {
  if (num_rows <= 0) return cudaSuccess;
  const int64_t total = int64_t{num_rows} * shape.num_q_heads * shape.head_dim;
  GatherHeadsKernel<T><<<GridFor(total, 256), 256, 0, stream>>>(in, out, total, shape);
  return cudaGetLastError();
}

template <class T>
cudaError_t LaunchSwiGlu(const float* gate_up, T* act, int num_rows, int inter,
                         cudaStream_t stream) {
  if (num_rows <= 0) return cudaSuccess;
  SwiGluKernel<T>
      <<<GridFor(int64_t{num_rows} * inter, 256), 256, 0, stream>>>(gate_up, act, num_rows, inter);
  return cudaGetLastError();
}

template <class T>
cudaError_t LaunchFillUniformBf16(T* dst, int64_t n, uint64_t seed, float bound,
                                  cudaStream_t stream) {
  if (n <= 0) return cudaSuccess;
  FillUniformBf16Kernel<T><<<GridFor(n, 256), 256, 0, stream>>>(dst, n, seed, bound);
  return cudaGetLastError();
}

cudaError_t LaunchFillUniformFloat(float* dst, int64_t n, uint64_t seed, float bound,
                                   cudaStream_t stream) {
  if (n <= 0) return cudaSuccess;
  FillUniformFloatKernel<<<GridFor(n, 256), 256, 0, stream>>>(dst, n, seed, bound);
  return cudaGetLastError();
}

cudaError_t LaunchFillFloat(float* dst, int64_t n, float value, cudaStream_t stream) {
  if (n <= 0) return cudaSuccess;
  FillFloatKernel<<<GridFor(n, 256), 256, 0, stream>>>(dst, n, value);
  return cudaGetLastError();
}

cudaError_t SamplingWorkspaceBytes(int sort_rows, int vocab, size_t* bytes) {
  SortLayout layout;
  const cudaError_t e = ComputeSortLayout(sort_rows, vocab, &layout);
  *bytes = layout.total;
  return e;
}

cudaError_t LaunchSampleTokens(const float* logits, int rows, int vocab, const SampleRow* params,
                               int sort_rows, void* workspace, size_t workspace_bytes,
                               int32_t* tokens, cudaStream_t stream) {
  if (rows <= 0) return cudaSuccess;
  if (vocab <= 0 || rows > 65535 || sort_rows < 0 || sort_rows > rows) return cudaErrorInvalidValue;
  const int32_t* sorted_ids = nullptr;
  if (sort_rows > 0) {
    SortLayout l;
    if (const cudaError_t e = ComputeSortLayout(sort_rows, vocab, &l); e != cudaSuccess) return e;
    if (workspace == nullptr || workspace_bytes < l.total) return cudaErrorInvalidValue;
    char* base = static_cast<char*>(workspace);
    auto* keys_in = reinterpret_cast<uint64_t*>(base + l.keys_in);
    auto* keys_out = reinterpret_cast<uint64_t*>(base + l.keys_out);
    auto* ids_in = reinterpret_cast<int32_t*>(base + l.ids_in);
    auto* ids_out = reinterpret_cast<int32_t*>(base + l.ids_out);
    SortKeysKernel<<<dim3((vocab + 255) / 256, rows), 256, 0, stream>>>(logits, vocab, params,
                                                                        keys_in, ids_in);
    if (const cudaError_t e = cudaGetLastError(); e != cudaSuccess) return e;
    size_t temp_bytes = l.temp_bytes;
    if (const cudaError_t e =
            cub::DeviceRadixSort::SortPairs(base + l.temp, temp_bytes, keys_in, keys_out, ids_in,
                                            ids_out, sort_rows * vocab, 0, l.end_bit, stream);
        e != cudaSuccess) {
      return e;
    }
    sorted_ids = ids_out;
  }
  SampleKernel<<<rows, kSampleThreads, 0, stream>>>(logits, vocab, params, sorted_ids, tokens);
  return cudaGetLastError();
}

// The compute types of the runner (cuda_kernels.h): bf16 bits and fp32.
#define KVGATE_INSTANTIATE_COMPUTE_TYPE(T)                                                         \
  template cudaError_t LaunchEmbedding<T>(const T*, const int32_t*, float*, int, int,              \
                                          cudaStream_t);                                           \
  template cudaError_t LaunchRmsNorm<T>(const float*, const float*, const int32_t*, T*, int, int,  \
                                        float, cudaStream_t);                                      \
  template cudaError_t LaunchGatherHeads<T>(const float*, T*, int, const QkvShape&, cudaStream_t); \
  template cudaError_t LaunchSwiGlu<T>(const float*, T*, int, int, cudaStream_t);                  \
  template cudaError_t LaunchFillUniformBf16<T>(T*, int64_t, uint64_t, float, cudaStream_t);
KVGATE_INSTANTIATE_COMPUTE_TYPE(uint16_t)
KVGATE_INSTANTIATE_COMPUTE_TYPE(float)
#undef KVGATE_INSTANTIATE_COMPUTE_TYPE

}  // namespace kvgate::worker::cuda
