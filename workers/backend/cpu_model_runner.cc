#include "workers/backend/cpu_model_runner.h"

#include <cblas.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <filesystem>
#include <functional>
#include <mutex>
#include <set>
#include <thread>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "kvgate/common/log.h"
#include "kvgate/common/status_macros.h"
#include "workers/model/llama_config.h"
#include "workers/model/llama_weights.h"

namespace kvgate::worker {
namespace {

// y[m, n] = x[m, k] * w[n, k]^T + beta * y  (w row-major [out_features, in_features]).
void MatMulTransposed(const float* x, const float* w, float* y, int64_t m, int64_t n, int64_t k,
                      float beta) {
  if (m == 1) {
    cblas_sgemv(CblasRowMajor, CblasNoTrans, static_cast<blasint>(n), static_cast<blasint>(k), 1.0f,
                w, static_cast<blasint>(k), x, 1, beta, y, 1);
    return;
  }
  cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, static_cast<blasint>(m),
              static_cast<blasint>(n), static_cast<blasint>(k), 1.0f, x, static_cast<blasint>(k), w,
              static_cast<blasint>(k), beta, y, static_cast<blasint>(n));
}

// out[i, :] = x[i, :] / sqrt(mean(x[i, :]^2) + eps) * weight, for `rows` rows of `dim`.
void RmsNorm(const float* x, const float* weight, float* out, int64_t rows, int64_t dim,
             float eps) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* row = x + r * dim;
    double sum = 0;
    for (int64_t j = 0; j < dim; ++j) sum += static_cast<double>(row[j]) * row[j];
    const float inv = static_cast<float>(1.0 / std::sqrt(sum / dim + eps));
    float* dst = out + r * dim;
    for (int64_t j = 0; j < dim; ++j) dst[j] = row[j] * inv * weight[j];
  }
}

// Rotate-half RoPE on one head vector x[head_dim] with cos/sin[head_dim / 2].
void ApplyRope(float* x, const float* cos, const float* sin, int half) {
  for (int i = 0; i < half; ++i) {
    const float a = x[i];
    const float b = x[i + half];
    x[i] = a * cos[i] - b * sin[i];
    x[i + half] = b * cos[i] + a * sin[i];
  }
}

// A fixed set of threads running index loops with the caller: ParallelFor(n, fn) calls fn(0..n-1)
// across the workers and the calling thread and returns when all calls are done. Every worker
// takes part in every loop, so none can see a stale loop. One loop at a time (one caller).
class WorkerPool {
 public:
  explicit WorkerPool(int num_threads) {
    for (int i = 1; i < num_threads; ++i) threads_.emplace_back([this] { Work(); });
  }
  ~WorkerPool() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stop_ = true;
    }
    start_.notify_all();
    for (std::thread& t : threads_) t.join();
  }

  void ParallelFor(int64_t n, const std::function<void(int64_t)>& fn) {
    if (threads_.empty() || n <= 1) {
      for (int64_t i = 0; i < n; ++i) fn(i);
      return;
    }
    {
      std::lock_guard<std::mutex> lock(mu_);
      fn_ = &fn;
      n_ = n;
      next_.store(0);
      finished_ = 0;
      ++generation_;
    }
    start_.notify_all();
    for (int64_t i; (i = next_.fetch_add(1)) < n;) fn(i);
    std::unique_lock<std::mutex> lock(mu_);
    done_.wait(lock, [&] { return finished_ == threads_.size(); });
  }

 private:
  void Work() {
    uint64_t seen = 0;
    std::unique_lock<std::mutex> lock(mu_);
    while (true) {
      start_.wait(lock, [&] { return stop_ || generation_ != seen; });
      if (stop_) return;
      seen = generation_;
      const std::function<void(int64_t)>* fn = fn_;
      const int64_t n = n_;
      lock.unlock();
      for (int64_t i; (i = next_.fetch_add(1)) < n;) (*fn)(i);
      lock.lock();
      if (++finished_ == threads_.size()) done_.notify_one();
    }
  }

  std::mutex mu_;
  std::condition_variable start_, done_;
  const std::function<void(int64_t)>* fn_ = nullptr;
  int64_t n_ = 0;
  std::atomic<int64_t> next_{0};
  size_t finished_ = 0;
  uint64_t generation_ = 0;
  bool stop_ = false;
  std::vector<std::thread> threads_;
};

class CpuModelRunner final : public ModelRunner {
 public:
  CpuModelRunner(LlamaConfig config, LlamaWeights weights, std::unique_ptr<kernels::KvCache> cache,
                 int num_threads)
      : config_(std::move(config)),
        weights_(std::move(weights)),
        cache_(std::move(cache)),
        inv_freq_(RopeInverseFrequencies(config_)),
        pool_(num_threads) {}

  const LlamaConfig& config() const override { return config_; }
  kernels::KvCache& kv_cache() override { return *cache_; }
  std::string backend_name() const override { return "cpu"; }

  absl::Status Forward(std::span<const ForwardChunk> chunks, float* logits) override;

 private:
  absl::Status Validate(std::span<const ForwardChunk> chunks) const;

  LlamaConfig config_;
  LlamaWeights weights_;
  std::unique_ptr<kernels::KvCache> cache_;
  std::vector<double> inv_freq_;  // [head_dim / 2]
  WorkerPool pool_;               // attention of distinct sequences in parallel

  // Step buffers, grown as needed and reused ([tokens, ...] row-major).
  std::vector<float> x_, normed_, qkv_, q_, k_, v_, attn_, gate_up_, act_, rope_cos_, rope_sin_;
};

absl::Status CpuModelRunner::Validate(std::span<const ForwardChunk> chunks) const {
  return ValidateForwardChunks(chunks, config_, *cache_);
}

absl::Status CpuModelRunner::Forward(std::span<const ForwardChunk> chunks, float* logits) {
  if (chunks.empty()) return absl::OkStatus();
  if (logits == nullptr) return absl::InvalidArgumentError("logits output is null");
  RETURN_IF_ERROR(Validate(chunks));

  const LlamaConfig& c = config_;
  const int64_t hidden = c.hidden_size;
  const int64_t head_dim = c.head_dim;
  const int half = c.head_dim / 2;
  const int num_heads = c.num_attention_heads;
  const int num_kv_heads = c.num_key_value_heads;
  const int64_t q_dim = int64_t{num_heads} * head_dim;
  const int64_t kv_dim = int64_t{num_kv_heads} * head_dim;
  const int64_t qkv_dim = q_dim + 2 * kv_dim;
  const int64_t inter = c.intermediate_size;
  const float eps = static_cast<float>(c.rms_norm_eps);
  const float scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(head_dim)));

  // Token rows of the step: chunk c owns rows [row_begin[c], row_begin[c] + n_c).
  std::vector<int64_t> row_begin(chunks.size() + 1, 0);
  std::vector<int64_t> past(chunks.size());
  for (size_t i = 0; i < chunks.size(); ++i) {
    row_begin[i + 1] = row_begin[i] + static_cast<int64_t>(chunks[i].tokens.size());
    past[i] = cache_->Length(chunks[i].seq, 0);
  }
  const int64_t tokens = row_begin.back();

  x_.resize(tokens * hidden);
  normed_.resize(tokens * hidden);
  qkv_.resize(tokens * qkv_dim);
  q_.resize(tokens * q_dim);
  k_.resize(tokens * kv_dim);
  v_.resize(tokens * kv_dim);
  attn_.resize(tokens * q_dim);
  gate_up_.resize(tokens * 2 * inter);
  act_.resize(tokens * inter);
  rope_cos_.resize(tokens * half);
  rope_sin_.resize(tokens * half);

  // Embedding and the RoPE angles of every row (double precision angles, as the reference).
  for (size_t ci = 0; ci < chunks.size(); ++ci) {
    for (int64_t i = 0; i < static_cast<int64_t>(chunks[ci].tokens.size()); ++i) {
      const int64_t row = row_begin[ci] + i;
      const float* src = weights_.embed.data() + int64_t{chunks[ci].tokens[i]} * hidden;
      std::copy(src, src + hidden, x_.data() + row * hidden);
      const double position = static_cast<double>(past[ci] + i);
      for (int j = 0; j < half; ++j) {
        const double angle = position * inv_freq_[j];
        rope_cos_[row * half + j] = static_cast<float>(std::cos(angle));
        rope_sin_[row * half + j] = static_cast<float>(std::sin(angle));
      }
    }
  }

  for (int layer = 0; layer < c.num_hidden_layers; ++layer) {
    const LlamaLayerWeights& w = weights_.layers[layer];
    // Attention block.
    RmsNorm(x_.data(), w.input_norm.data(), normed_.data(), tokens, hidden, eps);
    MatMulTransposed(normed_.data(), w.qkv.data(), qkv_.data(), tokens, qkv_dim, hidden, 0.0f);
    for (int64_t row = 0; row < tokens; ++row) {
      float* src = qkv_.data() + row * qkv_dim;
      if (!w.qkv_bias.empty()) {
        for (int64_t j = 0; j < qkv_dim; ++j) src[j] += w.qkv_bias[j];
      }
      float* q = q_.data() + row * q_dim;
      float* k = k_.data() + row * kv_dim;
      std::copy(src, src + q_dim, q);
      std::copy(src + q_dim, src + q_dim + kv_dim, k);
      std::copy(src + q_dim + kv_dim, src + qkv_dim, v_.data() + row * kv_dim);
      if (!w.q_norm.empty()) {
        RmsNorm(q, w.q_norm.data(), q, num_heads, head_dim, eps);
        RmsNorm(k, w.k_norm.data(), k, num_kv_heads, head_dim, eps);
      }
      const float* cos = rope_cos_.data() + row * half;
      const float* sin = rope_sin_.data() + row * half;
      for (int h = 0; h < num_heads; ++h) ApplyRope(q + h * head_dim, cos, sin, half);
      for (int h = 0; h < num_kv_heads; ++h) ApplyRope(k + h * head_dim, cos, sin, half);
    }
    // Append + attention per sequence; distinct sequences run in parallel (KvCache allows it).
    std::vector<absl::Status> chunk_status(chunks.size());
    pool_.ParallelFor(static_cast<int64_t>(chunks.size()), [&](int64_t ci) {
      const kernels::SeqId seq = chunks[ci].seq;
      const int64_t row = row_begin[ci];
      const int64_t n = row_begin[ci + 1] - row;
      const float* q = q_.data() + row * q_dim;
      const float* k = k_.data() + row * kv_dim;
      const float* v = v_.data() + row * kv_dim;
      float* out = attn_.data() + row * q_dim;
      absl::Status status = cache_->Append(seq, layer, n, k, v);
      if (!status.ok()) {
        chunk_status[ci] = std::move(status);
      } else if (n == 1 && past[ci] > 0) {
        chunk_status[ci] = cache_->DecodeAttention(seq, layer, num_heads, q, scale, out);
      } else {
        chunk_status[ci] = cache_->PrefillAttention(seq, layer, n, num_heads, q, k, v, scale, out);
      }
    });
    for (absl::Status& status : chunk_status) RETURN_IF_ERROR(status);
    if (!w.o_bias.empty()) {
      for (int64_t row = 0; row < tokens; ++row) {
        float* dst = x_.data() + row * hidden;
        for (int64_t j = 0; j < hidden; ++j) dst[j] += w.o_bias[j];
      }
    }
    MatMulTransposed(attn_.data(), w.o_proj.data(), x_.data(), tokens, hidden, q_dim, 1.0f);

    // MLP block: x += down(silu(gate(h)) * up(h)).
    RmsNorm(x_.data(), w.post_attention_norm.data(), normed_.data(), tokens, hidden, eps);
    MatMulTransposed(normed_.data(), w.gate_up.data(), gate_up_.data(), tokens, 2 * inter, hidden,
                     0.0f);
    for (int64_t row = 0; row < tokens; ++row) {
      const float* gate = gate_up_.data() + row * 2 * inter;
      const float* up = gate + inter;
      float* dst = act_.data() + row * inter;
      for (int64_t j = 0; j < inter; ++j) dst[j] = gate[j] / (1.0f + std::exp(-gate[j])) * up[j];
    }
    MatMulTransposed(act_.data(), w.down.data(), x_.data(), tokens, hidden, inter, 1.0f);
  }

  // Final norm and lm_head only for the rows whose logits are requested, in chunk order.
  int64_t out_rows = 0;
  for (size_t ci = 0; ci < chunks.size(); ++ci) {
    const int64_t n = row_begin[ci + 1] - row_begin[ci];
    const int64_t first = chunks[ci].all_logits ? row_begin[ci] : row_begin[ci + 1] - 1;
    const int64_t count = chunks[ci].all_logits ? n : 1;
    RmsNorm(x_.data() + first * hidden, weights_.final_norm.data(),
            normed_.data() + out_rows * hidden, count, hidden, eps);
    out_rows += count;
  }
  MatMulTransposed(normed_.data(), weights_.lm_head_matrix(), logits, out_rows, c.vocab_size,
                   hidden, 0.0f);
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<std::unique_ptr<ModelRunner>> CreateCpuModelRunnerWithCache(
    const RunnerOptions& options, KvCacheFactory make_cache) {
  const std::filesystem::path dir(options.model_dir);
  ASSIGN_OR_RETURN(LlamaConfig config, LoadLlamaConfig((dir / "config.json").string()));
  if (options.num_threads < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("num_threads must be >= 0, got ", options.num_threads));
  }
  ASSIGN_OR_RETURN(LlamaWeights weights, LoadLlamaWeights(options.model_dir, config));
  ASSIGN_OR_RETURN(std::unique_ptr<kernels::KvCache> cache,
                   CreateSizedKvCache(config, options, make_cache));
  const int64_t num_blocks = cache->total_blocks();
  if (options.num_threads > 0) openblas_set_num_threads(options.num_threads);
  const int num_threads = options.num_threads > 0
                              ? options.num_threads
                              : static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  KVGATE_LOG(INFO) << "loaded " << config.model_type << " model from " << options.model_dir << ": "
                   << config.num_hidden_layers << " layers, hidden " << config.hidden_size
                   << ", heads " << config.num_attention_heads << "/" << config.num_key_value_heads
                   << ", vocab " << config.vocab_size << "; KV " << options.kv_format.name << ", "
                   << num_blocks << " blocks of " << options.kv_block_size << " tokens";
  return std::unique_ptr<ModelRunner>(
      new CpuModelRunner(std::move(config), std::move(weights), std::move(cache), num_threads));
}

absl::StatusOr<std::unique_ptr<ModelRunner>> CreateCpuModelRunner(const RunnerOptions& options) {
  return CreateCpuModelRunnerWithCache(options, [](const kernels::KvCacheConfig& config) {
    return kernels::CreateCpuKvCache(config);
  });
}

}  // namespace kvgate::worker
