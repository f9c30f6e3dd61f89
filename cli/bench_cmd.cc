// kvgate bench engine: the CUDA engine at long context for each KV format, on a Llama-3-8B-shaped
// model with random bf16 weights made on the GPU (no download; Llama3_8BConfig), or on the model
// folder --model names (its own weights and shapes). Prints markdown tables (docs/BENCHMARKS.md,
// "Engine on H200").
//
//   kvgate bench engine [--formats fp16,fp8,int8,kivi4,kivi2,tq4,tq3.5,tq2.5]
//       (an entry FORMAT+EVICTION evicts, e.g. fp16+h2o:heavy=0.1,recent=0.1: H2O at a 20%
//       budget; a comma-separated key=value after an entry with ':' continues that entry)
//       [--contexts 32768,131072] [--decode-steps 8] [--warmup-steps 2]
//       [--prefill-prompts 8] [--prefill-tokens 2048] [--prefill-chunk 512]
//       [--gpu-memory-fraction 0.9] [--equal-batch N] [--max-batch N]
//       [--mixed-batch 32] [--mixed-context 8192] [--mixed-prompt 2048] [--mixed-chunk 512]
//       [--mixed-every 4] [--mixed-steps 48]   (--mixed-batch 0: no mixed trace)
//       [--sampling device|host] [--cuda-graphs on|off] [--model DIR]
//
// Per format:
//   capacity (with eviction: the blocks of the slots a sequence keeps at the context, as the cache
//     reserves them, plus one synthetic fill chunk of headroom): KV bytes per token (all layers) and the sequences of each context that fit: the
//     KV budget (gpu_memory_fraction of the memory free after weights and workspace) over the
//     blocks of one sequence plus its per-sequence state (KIVI's fp16 residual windows); then a
//     runner sized for exactly that many sequences admits them (the figure reported is what it
//     admitted).
//   decode at context C (workloads 1 and 2): the admitted sequences get SYNTHETIC keys and values
//     appended through the format's device append up to C minus the decode steps of both runs
//     (prefilling C x N tokens through the model would take far too long; attention cost depends
//     on the stored bytes, not on their values), then full-model decode steps for all of them
//     (warm-up steps, then timed steps): ms per step (= time per output token) and tokens/s; then
//     the same on the first B sequences, B = --equal-batch or fp16's batch at C (time per output
//     token at equal batch). Sequences end at C tokens.
//   prefill (workload 3): --prefill-prompts prompts of --prefill-tokens tokens through the real
//     model, in chunks of --prefill-chunk tokens per prompt per step (chunked prefill: every
//     chunk after the first attends to its cached prefix through the format).
//   mixed trace (workload 4): --mixed-batch sequences decode at --mixed-context (synthetic
//     prefix) while a prompt of --mixed-prompt tokens arrives every --mixed-every steps; each step
//     runs every decode token plus at most one --mixed-chunk-token prefill chunk (oldest prompt
//     first), as the engine's chunked prefill does, and a prompt whose prefill completes joins the
//     decoding batch. Reports
//     mean and p90 step time (the TPOT decoding sequences see under arrivals), decode and
//     prefill tokens/s. The same load for every format.
//   roofline: bytes one decode step must move (the weights but the embedding, once, plus every
//     stored KV byte of the batch) over the measured device-to-device copy bandwidth.
// Timed steps pick their tokens as the engine does: greedy on the GPU (ForwardSample: only token
// ids come back) with --sampling device (the default), or with the logits copied to the host
// (--sampling host). Warm-up steps always copy the logits and check that they are finite. The
// tokens fed are fixed ids, not the sampled ones (the KV contents are synthetic anyway).
// --cuda-graphs off makes every decode step launch its kernels instead of replaying a CUDA graph
// (CudaRunnerOptions::cuda_graphs; the same results).
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <ctime>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "cli/args.h"
#include "cli/command.h"
#include "cli/setting_list.h"
#include "kvgate/kernels/kv_format.h"
#include "workers/backend/model_runner.h"
#ifdef KVGATE_CLI_HAVE_CUDA
#include "workers/backend/cuda/cuda_model_runner.h"
#endif

namespace kvgate::cli {
namespace {

constexpr char kUsage[] =
    "usage: kvgate bench engine [--formats fp16,fp8,int8,kivi4,kivi2,tq4,tq3.5,tq2.5]\n"
    "    [--contexts 32768,131072] [--decode-steps 8] [--warmup-steps 2]\n"
    "    [--prefill-prompts 8] [--prefill-tokens 2048] [--prefill-chunk 512]\n"
    "    [--gpu-memory-fraction 0.9] [--equal-batch N] [--max-batch N]\n"
    "    [--mixed-batch 32] [--mixed-context 8192] [--mixed-prompt 2048] [--mixed-chunk 512]\n"
    "    [--mixed-every 4] [--mixed-steps 48] [--sampling device|host]\n"
    "    [--cuda-graphs on|off] [--model DIR]\n";

#ifdef KVGATE_CLI_HAVE_CUDA

constexpr char kDefaultFormats[] = "fp16,fp8,int8,kivi4,kivi2,tq4,tq3.5,tq2.5";

using worker::ForwardChunk;
using worker::ModelRunner;

double Seconds(std::chrono::steady_clock::time_point since) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - since).count();
}

struct BenchOptions {
  std::vector<std::string> formats;
  std::vector<int64_t> contexts;
  int decode_steps = 8;
  int warmup_steps = 2;
  int prefill_prompts = 8;
  int prefill_tokens = 2048;
  int prefill_chunk = 512;
  double gpu_memory_fraction = 0.9;
  int equal_batch = 0;  // 0: fp16's batch at each context
  int max_batch = 0;    // 0: no cap
  bool device_sampling = true;
  bool cuda_graphs = true;
  std::string model_dir;  // empty: random weights of Llama3_8BConfig's shapes
  // Mixed trace (0 sequences: off).
  int mixed_batch = 32;
  int64_t mixed_context = 8192;
  int mixed_prompt = 2048;
  int mixed_chunk = 512;
  int mixed_every = 4;
  int mixed_steps = 48;
};

struct MixedResult {
  int steps = 0;
  double mean_step_ms = 0;
  double p90_step_ms = 0;
  double decode_tokens_per_s = 0;
  double prefill_tokens_per_s = 0;
  int prompts_done = 0;
};

struct DecodeResult {
  int64_t context = 0;
  int fit = 0;         // sequences the budget holds
  int batch = 0;       // sequences admitted and decoded
  double step_ms = 0;  // full batch
  int equal_batch = 0;
  double equal_step_ms = 0;
  double bytes_per_step = 0;  // weights + KV read
  double fill_s = 0;
  double memory_used_gb = 0;
};

struct FormatResult {
  std::string format;
  int64_t bytes_per_token = 0;
  int64_t slot_bytes = 0;
  std::vector<DecodeResult> decode;
  double prefill_tokens_per_s = 0;
  double prefill_memory_gb = 0;
  MixedResult mixed;
};

// Bytes of the matrices a decode step streams once: every layer's projections and lm_head (the
// embedding is gathered row by row, not streamed).
double StreamedWeightBytes(const worker::LlamaConfig& c) {
  const double hidden = c.hidden_size, inter = c.intermediate_size;
  const double q_dim = static_cast<double>(c.num_attention_heads) * c.head_dim;
  const double kv_dim = static_cast<double>(c.num_key_value_heads) * c.head_dim;
  const double per_layer = hidden * (q_dim + 2 * kv_dim) + q_dim * hidden + 3 * inter * hidden;
  return 2.0 * (c.num_hidden_layers * per_layer + static_cast<double>(c.vocab_size) * hidden);
}

// A --formats entry: a KV format, optionally followed by "+" and an eviction.
absl::StatusOr<kernels::KvFormatSpec> ParseBenchFormat(const std::string& entry) {
  const size_t plus = entry.find('+');
  auto spec = kernels::ParseKvFormat(entry.substr(0, plus));
  if (!spec.ok() || plus == std::string::npos) return spec;
  auto eviction = kernels::ParseEviction(entry.substr(plus + 1));
  if (!eviction.ok()) return eviction.status();
  spec->eviction = *eviction;
  return spec;
}

// Slots a sequence holds once reserved to `tokens` with the last `n` of them still to come:
// CpuKvCache's rule (what the old tokens keep, plus the new ones), for a sequence that has
// already been evicted down to it (the synthetic fill appends far more than the kept budget).
int64_t ReservedSlots(const kernels::EvictionSpec& e, int64_t tokens, int64_t n) {
  switch (e.kind) {
    case kernels::EvictionSpec::Kind::kNone:
      return tokens;
    case kernels::EvictionSpec::Kind::kSink:
      return std::min<int64_t>(tokens, e.sink_tokens + std::max<int64_t>(e.window_tokens, n));
    case kernels::EvictionSpec::Kind::kH2O: {
      int64_t heavy = static_cast<int64_t>(std::floor(e.heavy_fraction * tokens + 1e-9));
      int64_t recent = static_cast<int64_t>(std::floor(e.recent_fraction * tokens + 1e-9));
      if (heavy + recent == 0) recent = 1;
      return std::min<int64_t>(tokens, heavy + std::max(recent, n));
    }
  }
  return tokens;
}

// Synthetic fill chunk of the CUDA cache (CudaKvCache::AppendSynthetic): an evicting sequence
// holds up to this many slots above its budget while it is filled.
constexpr int64_t kFillChunkTokens = 4096;

absl::StatusOr<std::unique_ptr<ModelRunner>> MakeRunner(const worker::LlamaConfig& config,
                                                        const std::string& format,
                                                        const BenchOptions& opts, int max_sequences,
                                                        int step_tokens) {
  worker::RunnerOptions options;
  auto spec = ParseBenchFormat(format);
  if (!spec.ok()) return spec.status();
  options.kv_format = *spec;
  options.kv_block_size = 16;
  const worker::CudaRunnerOptions cuda_options{.gpu_memory_fraction = opts.gpu_memory_fraction,
                                               .initial_step_tokens = step_tokens,
                                               .max_sequences = max_sequences,
                                               .cuda_graphs = opts.cuda_graphs};
  if (!opts.model_dir.empty()) {
    options.model_dir = opts.model_dir;
    return worker::CreateCudaModelRunner(options, cuda_options);
  }
  return worker::CreateCudaModelRunnerWithRandomWeights(config, options, cuda_options,
                                                        /*seed=*/20261129);
}

absl::Status CheckFinite(const std::vector<float>& logits, const std::string& what);

// One forward step; greedy sampling on the device when `device` and the runner supports it (the
// engine's path), else the logits rows come back to the host.
absl::Status Step(ModelRunner& runner, std::span<const ForwardChunk> chunks, bool device,
                  std::vector<float>& logits) {
  if (device && runner.supports_device_sampling()) {
    std::vector<worker::DeviceSampling> greedy(chunks.size());
    std::vector<int32_t> sampled(chunks.size());
    return runner.ForwardSample(chunks, greedy, sampled.data());
  }
  logits.resize(chunks.size() * static_cast<size_t>(runner.config().vocab_size));
  return runner.Forward(chunks, logits.data());
}

// Runs `steps` decode steps over the first `batch` sequences (ids 0..batch-1); returns seconds.
// timed: the sampling path of --sampling; else logits to the host, checked finite.
absl::StatusOr<double> DecodeSteps(ModelRunner& runner, int batch, int steps, bool timed,
                                   const BenchOptions& opts, std::vector<float>& logits) {
  const int vocab = runner.config().vocab_size;
  std::vector<int32_t> tokens(batch);
  std::vector<ForwardChunk> chunks(batch);
  const auto start = std::chrono::steady_clock::now();
  for (int s = 0; s < steps; ++s) {
    for (int b = 0; b < batch; ++b) {
      tokens[b] = static_cast<int32_t>((b * 7919 + s * 104729) % vocab);
      chunks[b] = {.seq = b, .tokens = std::span<const int32_t>(&tokens[b], 1)};
    }
    if (absl::Status st = Step(runner, chunks, timed && opts.device_sampling, logits); !st.ok()) {
      return st;
    }
  }
  const double seconds = Seconds(start);
  if (!timed && steps > 0) {
    if (absl::Status st = CheckFinite(logits, "decode"); !st.ok()) return st;
  }
  return seconds;
}

absl::Status CheckFinite(const std::vector<float>& logits, const std::string& what) {
  for (float x : logits) {
    if (!std::isfinite(x)) return absl::InternalError(absl::StrCat("non-finite logits in ", what));
  }
  return absl::OkStatus();
}

absl::StatusOr<double> MemoryUsedGb() {
  auto gpu = worker::QueryGpu();
  if (!gpu.ok()) return gpu.status();
  return static_cast<double>(gpu->total_bytes - gpu->free_bytes) / 1e9;
}

absl::StatusOr<DecodeResult> RunDecode(const worker::LlamaConfig& config, const std::string& format,
                                       const BenchOptions& opts,
                                       const worker::CudaKvCapacity& probe, int64_t context,
                                       int equal_batch) {
  DecodeResult r;
  r.context = context;
  // Every sequence ends at `context` tokens: synthetic tokens up to the start of the decode steps
  // of both runs (full batch, equal batch), then the decoded ones.
  const int64_t tokens = context;
  const int64_t filled = context - 2 * (opts.warmup_steps + opts.decode_steps);
  if (filled <= 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("context ", context, " is shorter than the decode steps"));
  }
  const kernels::EvictionSpec eviction = ParseBenchFormat(format)->eviction;
  const bool evicting = eviction.kind != kernels::EvictionSpec::Kind::kNone;
  const int64_t slots = ReservedSlots(eviction, tokens, tokens - filled);
  const int64_t blocks_per_seq = (slots + 15) / 16;
  const double budget =
      static_cast<double>(probe.blocks) * probe.block_bytes +
      static_cast<double>(probe.max_sequences) * probe.slot_bytes -
      (evicting ? static_cast<double>(kFillChunkTokens / 16) * probe.block_bytes : 0.0);
  r.fit = static_cast<int>(
      budget / (static_cast<double>(blocks_per_seq) * probe.block_bytes + probe.slot_bytes));
  int want = r.fit;
  if (opts.max_batch > 0) want = std::min(want, opts.max_batch);
  if (want < 1) {
    std::fprintf(stderr, "[bench] %s: no sequence of %lld tokens fits\n", format.c_str(),
                 static_cast<long long>(context));
    return r;
  }
  auto runner = MakeRunner(config, format, opts, want, want);
  if (!runner.ok()) return runner.status();
  ModelRunner& m = **runner;
  for (int s = 0; s < want; ++s) {
    // An evicting sequence grows as it is filled, then reserves what the decode steps need.
    absl::Status st = m.kv_cache().AddSequence(s, evicting ? 0 : tokens);
    if (absl::IsResourceExhausted(st)) break;  // block rounding: report what was admitted
    if (!st.ok()) return st;
    ++r.batch;
  }
  auto start = std::chrono::steady_clock::now();
  for (int s = 0; s < r.batch; ++s) {
    if (!evicting) {
      if (absl::Status st = worker::AppendSyntheticKv(m, s, filled, 1000 + s); !st.ok()) return st;
      continue;
    }
    // Evicting: the last token alone, so that the sequence ends the fill evicted down to its
    // budget as after a decode step (a sequence keeps its last append whole until the next one).
    for (const auto& [count, seed] : {std::pair{filled - 1, 1000 + s}, std::pair{int64_t{1}, 2000 + s}}) {
      if (absl::Status st = worker::AppendSyntheticKv(m, s, count, seed); !st.ok()) return st;
    }
    if (absl::Status st = m.kv_cache().Reserve(s, tokens); !st.ok()) return st;
  }
  r.fill_s = Seconds(start);
  std::vector<float> logits;
  auto warm = DecodeSteps(m, r.batch, std::max(opts.warmup_steps, 1), false, opts, logits);
  if (!warm.ok()) return warm.status();
  auto timed = DecodeSteps(m, r.batch, opts.decode_steps, true, opts, logits);
  if (!timed.ok()) return timed.status();
  r.step_ms = *timed * 1e3 / opts.decode_steps;
  auto used = MemoryUsedGb();
  if (!used.ok()) return used.status();
  r.memory_used_gb = *used;
  // Decode reads the stored tokens: the kept slots with eviction.
  r.bytes_per_step =
      StreamedWeightBytes(config) + static_cast<double>(r.batch) * static_cast<double>(slots) *
                                        static_cast<double>(m.kv_cache().bytes_per_token());
  r.equal_batch = std::min(equal_batch > 0 ? equal_batch : r.batch, r.batch);
  if (r.equal_batch < r.batch) {
    auto eq_warm = DecodeSteps(m, r.equal_batch, opts.warmup_steps, false, opts, logits);
    if (!eq_warm.ok()) return eq_warm.status();
    auto eq = DecodeSteps(m, r.equal_batch, opts.decode_steps, true, opts, logits);
    if (!eq.ok()) return eq.status();
    r.equal_step_ms = *eq * 1e3 / opts.decode_steps;
  } else {
    r.equal_step_ms = r.step_ms;
  }
  std::fprintf(stderr,
               "[bench] %s ctx %lld: fit %d, batch %d, fill %.1f s, step %.2f ms (%.0f tok/s), "
               "batch %d: %.2f ms, GPU memory used %.1f GB\n",
               format.c_str(), static_cast<long long>(context), r.fit, r.batch, r.fill_s, r.step_ms,
               r.batch * 1e3 / r.step_ms, r.equal_batch, r.equal_step_ms, r.memory_used_gb);
  return r;
}

absl::Status RunPrefill(const worker::LlamaConfig& config, const std::string& format,
                        const BenchOptions& opts, FormatResult& out) {
  const int prompts = opts.prefill_prompts, length = opts.prefill_tokens;
  const int chunk = std::min(opts.prefill_chunk, length);
  auto runner = MakeRunner(config, format, opts, 2 * prompts, prompts * chunk);
  if (!runner.ok()) return runner.status();
  ModelRunner& m = **runner;
  const int vocab = config.vocab_size;
  std::vector<std::vector<int32_t>> ids(prompts, std::vector<int32_t>(length));
  for (int p = 0; p < prompts; ++p) {
    // int64: i * 104729 overflows int32 from i = 20,505 (prompts of 32K and more).
    for (int i = 0; i < length; ++i) {
      ids[p][i] = static_cast<int32_t>((int64_t{p} * 7919 + int64_t{i} * 104729) % vocab);
    }
  }
  std::vector<float> logits(static_cast<size_t>(prompts) * vocab);
  // Pass 0 warms up (cuBLAS heuristics, workspaces); pass 1 is timed, on fresh sequences.
  double seconds = 0;
  for (int pass = 0; pass < 2; ++pass) {
    const int base = pass * prompts;
    for (int p = 0; p < prompts; ++p) {
      if (absl::Status st = m.kv_cache().AddSequence(base + p, length); !st.ok()) return st;
    }
    const auto start = std::chrono::steady_clock::now();
    for (int begin = 0; begin < length; begin += chunk) {
      const int n = std::min(chunk, length - begin);
      std::vector<ForwardChunk> chunks;
      for (int p = 0; p < prompts; ++p) {
        chunks.push_back(
            {.seq = base + p, .tokens = std::span<const int32_t>(ids[p].data() + begin, n)});
      }
      if (absl::Status st = Step(m, chunks, pass == 1 && opts.device_sampling, logits); !st.ok()) {
        return st;
      }
    }
    seconds = Seconds(start);
    if (pass == 0) {
      if (absl::Status st = CheckFinite(logits, format + " prefill"); !st.ok()) return st;
    }
    for (int p = 0; p < prompts; ++p) m.kv_cache().FreeSequence(base + p);
  }
  out.prefill_tokens_per_s = static_cast<double>(prompts) * length / seconds;
  auto used = MemoryUsedGb();
  if (!used.ok()) return used.status();
  out.prefill_memory_gb = *used;
  std::fprintf(stderr, "[bench] %s prefill: %d x %d tokens in chunks of %d: %.2f s (%.0f tok/s)\n",
               format.c_str(), prompts, length, chunk, seconds, out.prefill_tokens_per_s);
  return absl::OkStatus();
}

// Workload 4 (see the top of the file).
absl::Status RunMixed(const worker::LlamaConfig& config, const std::string& format,
                      const BenchOptions& opts, FormatResult& out) {
  const int batch = opts.mixed_batch, prompt = opts.mixed_prompt;
  const int arrivals = opts.mixed_steps / opts.mixed_every + 1;
  const int max_sequences = batch + arrivals;
  auto runner = MakeRunner(config, format, opts, max_sequences, batch + opts.mixed_chunk);
  if (!runner.ok()) return runner.status();
  ModelRunner& m = **runner;
  const int vocab = config.vocab_size;
  const int64_t filled = opts.mixed_context - opts.mixed_steps - 1;
  if (filled <= 0) return absl::InvalidArgumentError("--mixed-context is shorter than the steps");
  struct Live {
    kernels::SeqId id;
    int64_t prefilled = 0;  // prompt tokens computed (prompt: arriving; == prompt: decoding)
    bool prompt_seq = false;
    int32_t token = 0;
  };
  std::vector<Live> live;
  for (int s = 0; s < batch; ++s) {
    if (absl::Status st = m.kv_cache().AddSequence(s, opts.mixed_context); !st.ok()) return st;
    if (absl::Status st = worker::AppendSyntheticKv(m, s, filled, 3000 + s); !st.ok()) return st;
    live.push_back({.id = s, .prefilled = 0, .prompt_seq = false, .token = (s * 31) % vocab});
  }
  std::vector<int32_t> prompt_ids(prompt);
  for (int i = 0; i < prompt; ++i) {
    prompt_ids[i] = static_cast<int32_t>((int64_t{i} * 104729 + 17) % vocab);
  }
  std::vector<double> step_ms;
  std::vector<float> logits;
  int64_t decode_tokens = 0, prefill_tokens = 0;
  kernels::SeqId next_id = batch;
  double total_s = 0;
  for (int step = 0; step < opts.mixed_steps; ++step) {
    if (step % opts.mixed_every == 0) {
      if (absl::Status st = m.kv_cache().AddSequence(next_id, prompt + opts.mixed_steps);
          !st.ok()) {
        return st;
      }
      live.push_back({.id = next_id++, .prefilled = 0, .prompt_seq = true, .token = 0});
    }
    std::vector<ForwardChunk> chunks;
    std::vector<int32_t> tokens(live.size());
    bool chunk_taken = false;
    int64_t step_prefill = 0, step_decode = 0;
    for (size_t i = 0; i < live.size(); ++i) {
      Live& l = live[i];
      const bool decoding = !l.prompt_seq || l.prefilled == prompt;
      if (decoding) {
        const int64_t length = m.kv_cache().Length(l.id, 0);
        if (absl::Status st = m.kv_cache().Reserve(l.id, length + 1); !st.ok()) return st;
        tokens[i] = l.token;
        chunks.push_back({.seq = l.id, .tokens = std::span<const int32_t>(&tokens[i], 1)});
        ++step_decode;
      } else if (!chunk_taken) {
        const int n = static_cast<int>(std::min<int64_t>(opts.mixed_chunk, prompt - l.prefilled));
        chunks.push_back(
            {.seq = l.id, .tokens = std::span<const int32_t>(prompt_ids.data() + l.prefilled, n)});
        l.prefilled += n;
        step_prefill += n;
        chunk_taken = true;
      }
    }
    const auto start = std::chrono::steady_clock::now();
    const bool check = step == 0;  // the first step's logits come back and are checked
    if (absl::Status st = Step(m, chunks, !check && opts.device_sampling, logits); !st.ok()) {
      return st;
    }
    const double seconds = Seconds(start);
    total_s += seconds;
    step_ms.push_back(seconds * 1e3);
    decode_tokens += step_decode;
    prefill_tokens += step_prefill;
    for (Live& l : live) l.token = (l.token * 7 + 13) % vocab;
    if (check) {
      if (absl::Status st = CheckFinite(logits, format + " mixed"); !st.ok()) return st;
    }
  }
  MixedResult& r = out.mixed;
  r.steps = opts.mixed_steps;
  std::vector<double> sorted = step_ms;
  std::sort(sorted.begin(), sorted.end());
  r.mean_step_ms = total_s * 1e3 / r.steps;
  r.p90_step_ms = sorted[std::min<size_t>(sorted.size() - 1, sorted.size() * 9 / 10)];
  r.decode_tokens_per_s = decode_tokens / total_s;
  r.prefill_tokens_per_s = prefill_tokens / total_s;
  for (const Live& l : live) r.prompts_done += l.prompt_seq && l.prefilled == prompt ? 1 : 0;
  std::fprintf(stderr,
               "[bench] %s mixed: %d decoding at %lld + a %d-token prompt every %d steps: "
               "step %.2f ms (p90 %.2f), decode %.0f tok/s, prefill %.0f tok/s\n",
               format.c_str(), batch, static_cast<long long>(opts.mixed_context), prompt,
               opts.mixed_every, r.mean_step_ms, r.p90_step_ms, r.decode_tokens_per_s,
               r.prefill_tokens_per_s);
  return absl::OkStatus();
}

std::string ContextName(int64_t context) {
  return context % 1024 == 0 ? absl::StrCat(context / 1024, "K") : absl::StrCat(context);
}

void PrintTables(const std::vector<FormatResult>& results, const BenchOptions& opts,
                 double bandwidth, double weight_bytes) {
  const FormatResult* fp16 = nullptr;
  for (const FormatResult& r : results) {
    if (r.format == "fp16") fp16 = &r;
  }
  std::printf("\n| format | KV bytes/token | slot bytes |");
  for (int64_t c : opts.contexts) std::printf(" seqs @%s |", ContextName(c).c_str());
  std::printf(" prefill tok/s | GPU memory used (GB) |\n|---|---:|---:|");
  for (size_t i = 0; i < opts.contexts.size(); ++i) std::printf("---:|");
  std::printf("---:|---:|\n");
  for (const FormatResult& r : results) {
    std::printf("| %s | %lld | %lld |", r.format.c_str(), static_cast<long long>(r.bytes_per_token),
                static_cast<long long>(r.slot_bytes));
    for (size_t ci = 0; ci < r.decode.size(); ++ci) {
      std::printf(" %d", r.decode[ci].batch);
      if (fp16 != nullptr && ci < fp16->decode.size() && fp16->decode[ci].batch > 0) {
        std::printf(" (%.2fx)", static_cast<double>(r.decode[ci].batch) / fp16->decode[ci].batch);
      }
      std::printf(" |");
    }
    double memory = r.prefill_memory_gb;
    for (const DecodeResult& d : r.decode) memory = std::max(memory, d.memory_used_gb);
    std::printf(" %.0f | %.1f |\n", r.prefill_tokens_per_s, memory);
  }
  std::printf(
      "\nDecode (copy bandwidth %.0f GB/s; weights streamed per step %.2f GB):\n\n"
      "| format | context | batch | ms/step (TPOT) | decode tok/s | vs fp16 | bytes/step (GB) | "
      "roofline ms | %% of roofline | equal batch | TPOT at equal batch (ms) |\n"
      "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
      bandwidth / 1e9, weight_bytes / 1e9);
  for (size_t ci = 0; ci < opts.contexts.size(); ++ci) {
    for (const FormatResult& r : results) {
      if (ci >= r.decode.size()) continue;
      const DecodeResult& d = r.decode[ci];
      if (d.batch == 0) {
        std::printf("| %s | %s | 0 | - | - | - | - | - | - | - | - |\n", r.format.c_str(),
                    ContextName(d.context).c_str());
        continue;
      }
      const double tps = d.batch * 1e3 / d.step_ms;
      double vs = 0;
      if (fp16 != nullptr && ci < fp16->decode.size() && fp16->decode[ci].batch > 0) {
        vs = tps / (fp16->decode[ci].batch * 1e3 / fp16->decode[ci].step_ms);
      }
      const double floor_ms = d.bytes_per_step / bandwidth * 1e3;
      std::printf("| %s | %s | %d | %.2f | %.0f | %.2fx | %.1f | %.2f | %.0f%% | %d | %.2f |\n",
                  r.format.c_str(), ContextName(d.context).c_str(), d.batch, d.step_ms, tps, vs,
                  d.bytes_per_step / 1e9, floor_ms, 100 * floor_ms / d.step_ms, d.equal_batch,
                  d.equal_step_ms);
    }
  }
  if (opts.mixed_batch <= 0) return;
  std::printf(
      "\nMixed trace: %d sequences decoding at %s, a %d-token prompt arriving every %d steps "
      "(prefilled %d tokens per step), %d steps:\n\n"
      "| format | mean ms/step | p90 ms/step | decode tok/s | prefill tok/s | prompts done |\n"
      "|---|---:|---:|---:|---:|---:|\n",
      opts.mixed_batch, ContextName(opts.mixed_context).c_str(), opts.mixed_prompt,
      opts.mixed_every, opts.mixed_chunk, opts.mixed_steps);
  for (const FormatResult& r : results) {
    if (r.mixed.steps == 0) continue;
    std::printf("| %s | %.2f | %.2f | %.0f | %.0f | %d |\n", r.format.c_str(), r.mixed.mean_step_ms,
                r.mixed.p90_step_ms, r.mixed.decode_tokens_per_s, r.mixed.prefill_tokens_per_s,
                r.mixed.prompts_done);
  }
}

// Capacity, decode at every context and prefill for one format.
absl::Status BenchFormat(const worker::LlamaConfig& config, const std::string& format,
                         const BenchOptions& opts, std::map<int64_t, int>& fp16_batch,
                         FormatResult& result) {
  result.format = format;
  worker::CudaKvCapacity probe;
  {
    auto runner = MakeRunner(config, format, opts, /*max_sequences=*/1, /*step_tokens=*/512);
    if (!runner.ok()) return runner.status();
    auto capacity = worker::GetCudaKvCapacity(**runner);
    if (!capacity.ok()) return capacity.status();
    probe = *capacity;
    result.bytes_per_token = (*runner)->kv_cache().bytes_per_token();
    result.slot_bytes = probe.slot_bytes;
  }
  for (int64_t context : opts.contexts) {
    const int equal = opts.equal_batch > 0 ? opts.equal_batch : fp16_batch[context];
    auto decode = RunDecode(config, format, opts, probe, context, equal);
    if (!decode.ok()) return decode.status();
    if (format == "fp16") fp16_batch[context] = decode->batch;
    result.decode.push_back(*decode);
  }
  if (opts.prefill_prompts > 0) {
    if (absl::Status st = RunPrefill(config, format, opts, result); !st.ok()) return st;
  }
  if (opts.mixed_batch > 0) return RunMixed(config, format, opts, result);
  return absl::OkStatus();
}

int RunEngineBench(Args& args) {
  BenchOptions opts;
  opts.formats = SplitSettingList(args.Get("formats", kDefaultFormats));
  for (absl::string_view c :
       absl::StrSplit(args.Get("contexts", "32768,131072"), ',', absl::SkipEmpty())) {
    int64_t value = 0;
    if (!absl::SimpleAtoi(c, &value) || value <= 0) {
      std::fprintf(stderr, "kvgate bench engine: --contexts: bad context '%s'\n",
                   std::string(c).c_str());
      return 2;
    }
    opts.contexts.push_back(value);
  }
  opts.decode_steps = static_cast<int>(args.GetInt("decode-steps", opts.decode_steps));
  opts.warmup_steps = static_cast<int>(args.GetInt("warmup-steps", opts.warmup_steps));
  opts.prefill_prompts = static_cast<int>(args.GetInt("prefill-prompts", opts.prefill_prompts));
  opts.prefill_tokens = static_cast<int>(args.GetInt("prefill-tokens", opts.prefill_tokens));
  opts.prefill_chunk = static_cast<int>(args.GetInt("prefill-chunk", opts.prefill_chunk));
  opts.gpu_memory_fraction = args.GetDouble("gpu-memory-fraction", opts.gpu_memory_fraction);
  opts.equal_batch = static_cast<int>(args.GetInt("equal-batch", 0));
  opts.max_batch = static_cast<int>(args.GetInt("max-batch", 0));
  const std::string sampling = args.Get("sampling", "device");
  if (sampling != "device" && sampling != "host") {
    std::fprintf(stderr, "kvgate bench engine: --sampling must be device or host\n%s", kUsage);
    return 2;
  }
  opts.device_sampling = sampling == "device";
  const std::string graphs = args.Get("cuda-graphs", "on");
  if (graphs != "on" && graphs != "off") {
    std::fprintf(stderr, "kvgate bench engine: --cuda-graphs must be on or off\n%s", kUsage);
    return 2;
  }
  opts.cuda_graphs = graphs == "on";
  opts.model_dir = args.Get("model", "");
  opts.mixed_batch = static_cast<int>(args.GetInt("mixed-batch", opts.mixed_batch));
  opts.mixed_context = args.GetInt("mixed-context", opts.mixed_context);
  opts.mixed_prompt = static_cast<int>(args.GetInt("mixed-prompt", opts.mixed_prompt));
  opts.mixed_chunk = static_cast<int>(args.GetInt("mixed-chunk", opts.mixed_chunk));
  opts.mixed_every = static_cast<int>(args.GetInt("mixed-every", opts.mixed_every));
  opts.mixed_steps = static_cast<int>(args.GetInt("mixed-steps", opts.mixed_steps));
  if (!args.ok()) {
    std::fprintf(stderr, "kvgate bench engine: %s\n%s", args.error().c_str(), kUsage);
    return 2;
  }
  if (opts.formats.empty() || opts.decode_steps <= 0 || opts.warmup_steps < 0 ||
      opts.prefill_prompts < 0 || opts.prefill_tokens <= 0 || opts.prefill_chunk <= 0 ||
      opts.mixed_batch < 0 ||
      (opts.mixed_batch > 0 && (opts.mixed_prompt <= 0 || opts.mixed_chunk <= 0 ||
                                opts.mixed_every <= 0 || opts.mixed_steps <= 0))) {
    std::fprintf(stderr,
                 "kvgate bench engine: formats must be non-empty, steps and token "
                 "counts positive\n%s",
                 kUsage);
    return 2;
  }
  for (const std::string& f : opts.formats) {
    if (auto spec = ParseBenchFormat(f); !spec.ok()) {
      std::fprintf(stderr, "kvgate bench engine: --formats: %s\n",
                   std::string(spec.status().message()).c_str());
      return 2;
    }
  }
  auto gpu = worker::QueryGpu();
  if (!gpu.ok()) {
    std::fprintf(stderr, "kvgate bench engine: %s\n", std::string(gpu.status().message()).c_str());
    return 1;
  }
  auto bandwidth = worker::MeasureCopyBandwidth();
  if (!bandwidth.ok()) {
    std::fprintf(stderr, "kvgate bench engine: copy bandwidth: %s\n",
                 std::string(bandwidth.status().message()).c_str());
    return 1;
  }
  worker::LlamaConfig config = worker::Llama3_8BConfig();
  std::string model_name = "Llama-3-8B shapes, random bf16 weights";
  if (!opts.model_dir.empty()) {
    auto loaded = worker::LoadLlamaConfig(opts.model_dir + "/config.json");
    if (!loaded.ok()) {
      std::fprintf(stderr, "kvgate bench engine: --model: %s\n",
                   std::string(loaded.status().message()).c_str());
      return 2;
    }
    config = *loaded;
    model_name = absl::StrCat(opts.model_dir, " (", config.num_hidden_layers, " layers, hidden ",
                              config.hidden_size, "; bf16 compute)");
  }
  const std::time_t now = std::time(nullptr);
  char date[32];
  std::strftime(date, sizeof date, "%Y-%m-%dT%H:%MZ", std::gmtime(&now));
  std::fprintf(stderr, "[bench] %s on %s (%.1f GB), copy bandwidth %.0f GB/s\n", date,
               gpu->name.c_str(), gpu->total_bytes / 1e9, *bandwidth / 1e9);

  std::vector<FormatResult> results;
  std::map<int64_t, int> fp16_batch;
  absl::Status failed;
  std::string failed_format;
  for (const std::string& format : opts.formats) {
    FormatResult result;
    failed = BenchFormat(config, format, opts, fp16_batch, result);
    if (!failed.ok()) {
      failed_format = format;
      break;
    }
    results.push_back(std::move(result));
  }
  std::printf(
      "Engine bench: %s; %s, %s; block 16, "
      "gpu_memory_fraction %.2f, %d warm-up + %d timed decode steps; prefill %d x %d "
      "tokens in chunks of %d; sampling on the %s; CUDA graphs %s.\n",
      model_name.c_str(), gpu->name.c_str(), date, opts.gpu_memory_fraction, opts.warmup_steps,
      opts.decode_steps, opts.prefill_prompts, opts.prefill_tokens, opts.prefill_chunk,
      opts.device_sampling ? "GPU (greedy)" : "host (logits copied back)",
      opts.cuda_graphs ? "on" : "off");
  PrintTables(results, opts, *bandwidth, StreamedWeightBytes(config));
  if (!failed.ok()) {
    // A CUDA fault leaves the device context unusable: the formats after it are not run.
    std::printf("\n%s failed (%s); the formats after it were not run.\n", failed_format.c_str(),
                std::string(failed.message()).c_str());
    std::fprintf(stderr, "kvgate bench engine: %s: %s\n", failed_format.c_str(),
                 std::string(failed.message()).c_str());
    return 1;
  }
  return 0;
}

#endif  // KVGATE_CLI_HAVE_CUDA

int RunBench(int argc, char** argv) {
  Args args(argc, argv,
            {"formats", "contexts", "decode-steps", "warmup-steps", "prefill-prompts",
             "prefill-tokens", "prefill-chunk", "gpu-memory-fraction", "equal-batch", "max-batch",
             "mixed-batch", "mixed-context", "mixed-prompt", "mixed-chunk", "mixed-every",
             "mixed-steps", "sampling", "cuda-graphs", "model"},
            {});
  if (args.help()) {
    std::fprintf(stdout, "%s", kUsage);
    return 0;
  }
  if (!args.ok()) {
    std::fprintf(stderr, "kvgate bench: %s\n%s", args.error().c_str(), kUsage);
    return 2;
  }
  if (args.positional().size() != 1 || args.positional()[0] != "engine") {
    std::fprintf(stderr, "kvgate bench: expected the benchmark name 'engine'\n%s", kUsage);
    return 2;
  }
#ifdef KVGATE_CLI_HAVE_CUDA
  return RunEngineBench(args);
#else
  std::fprintf(stderr,
               "kvgate bench engine: this kvgate was built without CUDA (configure with "
               "-DKVGATE_CUDA=ON where nvcc is installed, and run it on a machine with a GPU)\n");
  return 1;
#endif
}

}  // namespace

KVGATE_COMMAND(bench, "benchmarks: 'engine' (the CUDA engine per KV format on an 8B model)",
               RunBench);

}  // namespace kvgate::cli
