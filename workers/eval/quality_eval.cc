#include "workers/eval/quality_eval.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <span>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "kvgate/common/status_macros.h"
#include "nlohmann/json.hpp"
#include "workers/backend/model_runner.h"
#include "workers/model/llama_config.h"

namespace kvgate::eval {
namespace {

using worker::ForwardChunk;
using worker::ModelRunner;

absl::StatusOr<std::string> ReadFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat("cannot open ", path));
  std::stringstream text;
  text << in.rdbuf();
  return text.str();
}

// Log-softmax of one logits row, in double.
void LogSoftmax(const float* logits, int n, std::vector<double>& out) {
  out.resize(n);
  double top = -INFINITY;
  for (int i = 0; i < n; ++i) top = std::max(top, double{logits[i]});
  double sum = 0;
  for (int i = 0; i < n; ++i) sum += std::exp(double{logits[i]} - top);
  const double lse = top + std::log(sum);
  for (int i = 0; i < n; ++i) out[i] = logits[i] - lse;
}

int ArgMax(const float* row, int n) {
  return static_cast<int>(std::max_element(row, row + n) - row);
}

// Deterministic generator (splitmix64): the probes must be the same on every platform.
class SplitMix {
 public:
  explicit SplitMix(uint64_t seed) : state_(seed) {}
  uint64_t Next() {
    uint64_t z = (state_ += 0x9e3779b97f4a7c15ULL);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
  }
  int Below(int n) { return static_cast<int>(Next() % static_cast<uint64_t>(n)); }

 private:
  uint64_t state_;
};

constexpr const char* kSyllables[] = {"ka", "zu", "mo", "ri", "te", "lo", "vi", "na", "pe", "su",
                                      "do", "fa", "gu", "hi", "ja", "we", "xo", "yu", "be", "co"};

std::string Word(SplitMix& rng, int syllables) {
  std::string w;
  for (int i = 0; i < syllables; ++i) w += kSyllables[rng.Below(20)];
  return w;
}

std::string Upper(std::string s) {
  for (char& c : s) c = static_cast<char>(std::toupper(static_cast<unsigned char>(c)));
  return s;
}

// One retrieval probe: prefix (prefilled), query (decoded), value (teacher-forced targets).
struct Probe {
  std::vector<int32_t> prefix, query, value;
};

// Per-context fp16 baseline: log-probabilities of every scored prediction, and which probe value
// tokens it gets right (the paired comparisons of QualityEntry's *_ci95 fields).
struct Baseline {
  std::vector<std::vector<float>> logprobs;  // [windows][S * vocab]
  std::vector<std::vector<int>> argmax;      // [windows][S]
  std::vector<int> probe_hits;               // [probes]: value tokens top-1
};

// One sequence of an evaluation run: `prefill` is prefilled (its logits unused), then every token
// of `decode` is fed as one decode step; the step logits are the job's rows [decode.size(), vocab].
struct Job {
  std::span<const int32_t> prefill, decode;
};

// Half-width of a 95% normal interval for the mean of `xs` (NaN with fewer than 2 values).
double MeanCi95(const std::vector<double>& xs) {
  const size_t n = xs.size();
  if (n < 2) return std::nan("");
  double mean = 0;
  for (double x : xs) mean += x;
  mean /= n;
  double ss = 0;
  for (double x : xs) ss += (x - mean) * (x - mean);
  return 1.96 * std::sqrt(ss / (n - 1) / n);
}

class QualityEvaluatorImpl final : public QualityEvaluator {
 public:
  QualityEvaluatorImpl(std::string model_dir, EvalData data, QualityOptions options,
                       worker::LlamaConfig config, std::unique_ptr<Tokenizer> tokenizer)
      : model_dir_(std::move(model_dir)),
        data_(std::move(data)),
        options_(options),
        config_(std::move(config)),
        tokenizer_(std::move(tokenizer)) {}

  absl::StatusOr<QualityEntry> Evaluate(const EvalSetting& setting, int context,
                                        const ProgressFn& progress) override {
    const auto start = std::chrono::steady_clock::now();
    if (context <= options_.score_tokens || context > config_.max_position_embeddings) {
      return absl::InvalidArgumentError(
          absl::StrCat("context ", context, " must be in (score_tokens=", options_.score_tokens,
                       ", max_position_embeddings=", config_.max_position_embeddings, "]"));
    }
    ASSIGN_OR_RETURN(std::vector<const std::vector<int32_t>*> windows, Windows(context));
    ASSIGN_OR_RETURN(std::vector<Probe> probes, MakeProbes(context));
    const int total = 2 * static_cast<int>(windows.size() + probes.size());
    int done = 0;
    auto tick = [&] {
      ++done;
      if (progress) progress(done, total);
    };
    const int vocab = config_.vocab_size;
    const int prefill = context - options_.score_tokens;
    std::vector<Job> window_jobs, probe_jobs;
    std::vector<std::vector<int32_t>> probe_decode(probes.size());
    for (const auto* ids : windows) {
      window_jobs.push_back({std::span<const int32_t>(ids->data(), prefill),
                             std::span<const int32_t>(ids->data() + prefill, options_.score_tokens)});
    }
    for (size_t p = 0; p < probes.size(); ++p) {
      // The query, then every value token but the last (teacher-forced): the rows from the
      // query's last token on predict the value tokens.
      probe_decode[p] = probes[p].query;
      probe_decode[p].insert(probe_decode[p].end(), probes[p].value.begin(),
                             probes[p].value.end() - 1);
      probe_jobs.push_back({probes[p].prefix, probe_decode[p]});
    }
    // Value tokens that `rows` (a probe job's rows) gets right.
    auto probe_hits = [&](const Probe& probe, const float* rows, double* value_p) {
      const float* first = rows + (probe.query.size() - 1) * static_cast<size_t>(vocab);
      int hits = 0;
      std::vector<double> lp;
      for (size_t t = 0; t < probe.value.size(); ++t) {
        const float* row = first + t * static_cast<size_t>(vocab);
        hits += ArgMax(row, vocab) == probe.value[t];
        if (value_p != nullptr) {
          LogSoftmax(row, vocab, lp);
          *value_p += std::exp(lp[probe.value[t]]);
        }
      }
      return hits;
    };

    if (!baselines_.count(context)) {
      ASSIGN_OR_RETURN(auto fp16, MakeRunner("fp16", ParseEvalSetting("fp16")->spec, context));
      Baseline b;
      b.logprobs.resize(windows.size());
      b.argmax.resize(windows.size());
      RETURN_IF_ERROR(RunJobs(*fp16, window_jobs, [&](size_t w, const float* rows) {
        std::vector<double> lp;
        b.logprobs[w].resize(static_cast<size_t>(options_.score_tokens) * vocab);
        for (int s = 0; s < options_.score_tokens; ++s) {
          LogSoftmax(rows + int64_t{s} * vocab, vocab, lp);
          std::copy(lp.begin(), lp.end(), b.logprobs[w].begin() + int64_t{s} * vocab);
          b.argmax[w].push_back(ArgMax(rows + int64_t{s} * vocab, vocab));
        }
        tick();
      }));
      b.probe_hits.resize(probes.size());
      RETURN_IF_ERROR(RunJobs(*fp16, probe_jobs, [&](size_t p, const float* rows) {
        b.probe_hits[p] = probe_hits(probes[p], rows, nullptr);
        tick();
      }));
      baselines_[context] = std::move(b);
    } else {
      done += static_cast<int>(windows.size() + probes.size());
    }
    const Baseline& base = baselines_.at(context);

    ASSIGN_OR_RETURN(auto runner, MakeRunner(setting.name, setting.spec, context));
    double nll = 0, nll_base = 0, kl = 0;
    int64_t agree = 0, count = 0;
    std::vector<double> window_log_ratio(windows.size());  // mean nll - nll_base per window
    const int first_target = context - options_.score_tokens + 1;
    RETURN_IF_ERROR(RunJobs(*runner, window_jobs, [&](size_t w, const float* rows) {
      std::vector<double> lp;
      const auto& ids = *windows[w];
      double diff = 0;
      for (int s = 0; s < options_.score_tokens; ++s) {
        const float* row = rows + int64_t{s} * vocab;
        const float* base_lp = base.logprobs[w].data() + int64_t{s} * vocab;
        LogSoftmax(row, vocab, lp);
        const int32_t target = ids[first_target + s];
        nll -= lp[target];
        nll_base -= base_lp[target];
        diff += base_lp[target] - lp[target];
        double k = 0;
        for (int i = 0; i < vocab; ++i) {
          const double p = std::exp(double{base_lp[i]});
          if (p > 0) k += p * (base_lp[i] - lp[i]);
        }
        kl += std::max(0.0, k);
        agree += ArgMax(row, vocab) == base.argmax[w][s];
        ++count;
      }
      window_log_ratio[w] = diff / options_.score_tokens;
      tick();
    }));

    int64_t value_hits = 0, value_tokens = 0, base_hits = 0, exact = 0;
    double value_p = 0;
    std::vector<int> hits(probes.size());
    RETURN_IF_ERROR(RunJobs(*runner, probe_jobs, [&](size_t p, const float* rows) {
      hits[p] = probe_hits(probes[p], rows, &value_p);
      value_hits += hits[p];
      base_hits += base.probe_hits[p];
      value_tokens += static_cast<int64_t>(probes[p].value.size());
      exact += hits[p] == static_cast<int>(probes[p].value.size());
      tick();
    }));

    QualityEntry e;
    e.setting = setting.name;
    e.context = context;
    e.ppl = std::exp(nll / count);
    e.ppl_fp16 = std::exp(nll_base / count);
    e.ppl_ratio = e.ppl / e.ppl_fp16;
    // Windows are the independent units (predictions within one are correlated): the interval of
    // the mean per-window log ratio, mapped to the ratio (to first order).
    e.ppl_ratio_ci95 = e.ppl_ratio * MeanCi95(window_log_ratio);
    e.kl = kl / count;
    e.top1 = static_cast<double>(agree) / count;
    e.retrieval = value_tokens ? static_cast<double>(value_hits) / value_tokens : 0;
    e.retrieval_fp16 = value_tokens ? static_cast<double>(base_hits) / value_tokens : 0;
    if (probes.size() >= 2) {
      // Paired by probe: the difference from fp16 is a ratio of sums (hits over value tokens);
      // its standard error by the delta method over probes.
      const double delta = e.retrieval - e.retrieval_fp16;
      const double mean_tokens = static_cast<double>(value_tokens) / probes.size();
      std::vector<double> residual;
      for (size_t p = 0; p < probes.size(); ++p) {
        residual.push_back((hits[p] - base.probe_hits[p] - delta * probes[p].value.size()) /
                           mean_tokens);
      }
      e.retrieval_ci95 = MeanCi95(residual);
    } else {
      e.retrieval_ci95 = std::nan("");
    }
    e.retrieval_exact = probes.empty() ? 0 : static_cast<double>(exact) / probes.size();
    e.retrieval_p = value_tokens ? value_p / value_tokens : 0;
    e.scored_tokens = count;
    e.windows = static_cast<int>(windows.size());
    e.probes = static_cast<int>(probes.size());
    e.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    return e;
  }

 private:
  absl::StatusOr<std::unique_ptr<ModelRunner>> MakeRunner(const std::string& name,
                                                          const kernels::KvFormatSpec& spec,
                                                          int context) {
    worker::RunnerOptions opts;
    opts.model_dir = model_dir_;
    opts.kv_format = spec;
    opts.kv_block_size = 16;
    opts.kv_num_blocks = int64_t{options_.batch} * ((context + 1 + 15) / 16 + 2);
    opts.num_threads = options_.num_threads;
    auto runner = options_.make_runner ? options_.make_runner(opts)
                                       : worker::CreateCpuModelRunner(opts);
    if (!runner.ok()) {
      return absl::Status(runner.status().code(),
                          absl::StrCat("setting ", name, ": ", runner.status().message()));
    }
    return runner;
  }

  // The first options_.windows files with at least context + 1 tokens.
  absl::StatusOr<std::vector<const std::vector<int32_t>*>> Windows(int context) const {
    std::vector<const std::vector<int32_t>*> out;
    for (const auto& f : data_.files) {
      if (static_cast<int>(f.size()) >= context + 1) out.push_back(&f);
      if (static_cast<int>(out.size()) == options_.windows) break;
    }
    if (static_cast<int>(out.size()) < options_.windows) {
      return absl::InvalidArgumentError(
          absl::StrCat("evaluation data has ", out.size(), " files of at least ", context + 1,
                       " tokens; ", options_.windows, " windows requested"));
    }
    return out;
  }

  absl::StatusOr<std::vector<Probe>> MakeProbes(int context) const {
    std::vector<const std::vector<int32_t>*> fillers;
    for (const auto& f : data_.files) {
      if (static_cast<int>(f.size()) >= context) fillers.push_back(&f);
    }
    if (fillers.empty() && options_.probes > 0) {
      return absl::InvalidArgumentError(
          absl::StrCat("no evaluation file of ", context, " tokens for retrieval probes"));
    }
    std::vector<Probe> probes;
    for (int i = 0; i < options_.probes; ++i) {
      SplitMix rng(options_.seed * 1000003ULL + static_cast<uint64_t>(context) * 7919ULL + i);
      std::string names[4], values[4], header = "# Configuration constants.\n";
      for (int k = 0; k < 4; ++k) {
        names[k] = Upper(Word(rng, 2)) + "_KEY";
        values[k] = Word(rng, 4);
        header += absl::StrCat(names[k], " = \"", values[k], "\"\n");
      }
      header += "\n\n";
      const int q = rng.Below(4);
      Probe p;
      ASSIGN_OR_RETURN(p.prefix, tokenizer_->Encode(header, {.add_special_tokens = true}));
      ASSIGN_OR_RETURN(p.query, tokenizer_->Encode(absl::StrCat("\n\n\n", names[q], " = \""),
                                                   {.add_special_tokens = false}));
      ASSIGN_OR_RETURN(p.value, tokenizer_->Encode(values[q], {.add_special_tokens = false}));
      const auto& filler = *fillers[i % fillers.size()];
      const int fill = context - static_cast<int>(p.prefix.size() + p.query.size() +
                                                  p.value.size()) + 1;
      if (fill < 0 || fill + 1 > static_cast<int>(filler.size())) {
        return absl::InvalidArgumentError(absl::StrCat("context ", context, " too short for probes"));
      }
      p.prefix.insert(p.prefix.end(), filler.begin() + 1, filler.begin() + 1 + fill);
      probes.push_back(std::move(p));
    }
    return probes;
  }

  // Runs `jobs` on `runner`, options_.batch sequences at a time: each sequence's prefill is one
  // Forward call (so a batch's prompts never share one huge step), then the batch's decode steps
  // run together, one token per running sequence per Forward call. Sequences are independent, so
  // the rows are what one-at-a-time runs give (up to the order of floating-point sums in batched
  // products). done(job index, rows) is called once per job, in order, when its batch finishes.
  absl::Status RunJobs(ModelRunner& runner, std::span<const Job> jobs,
                       const std::function<void(size_t, const float*)>& done) {
    const int vocab = config_.vocab_size;
    auto& cache = runner.kv_cache();
    std::vector<float> step_rows, prefill_row(vocab);
    for (size_t first = 0; first < jobs.size(); first += options_.batch) {
      const size_t n = std::min<size_t>(options_.batch, jobs.size() - first);
      std::vector<kernels::SeqId> seqs;
      struct FreeAll {
        kernels::KvCache& cache;
        std::vector<kernels::SeqId>& seqs;
        ~FreeAll() {
          for (kernels::SeqId s : seqs) cache.FreeSequence(s);
        }
      } free_on_exit{cache, seqs};
      std::vector<std::vector<float>> rows(n);
      size_t steps = 0;
      for (size_t j = 0; j < n; ++j) {
        const Job& job = jobs[first + j];
        const kernels::SeqId seq = ++next_seq_;
        RETURN_IF_ERROR(cache.AddSequence(
            seq, static_cast<int64_t>(job.prefill.size() + job.decode.size())));
        seqs.push_back(seq);
        ForwardChunk chunk{.seq = seq, .tokens = job.prefill};
        RETURN_IF_ERROR(runner.Forward({&chunk, 1}, prefill_row.data()));
        rows[j].resize(job.decode.size() * static_cast<size_t>(vocab));
        steps = std::max(steps, job.decode.size());
      }
      std::vector<ForwardChunk> chunks;
      std::vector<size_t> who;
      for (size_t i = 0; i < steps; ++i) {
        chunks.clear();
        who.clear();
        for (size_t j = 0; j < n; ++j) {
          const Job& job = jobs[first + j];
          if (i >= job.decode.size()) continue;
          chunks.push_back({.seq = seqs[j], .tokens = job.decode.subspan(i, 1)});
          who.push_back(j);
        }
        step_rows.resize(chunks.size() * static_cast<size_t>(vocab));
        RETURN_IF_ERROR(runner.Forward(chunks, step_rows.data()));
        for (size_t c = 0; c < who.size(); ++c) {
          std::copy_n(step_rows.data() + c * vocab, vocab, rows[who[c]].data() + i * vocab);
        }
      }
      for (size_t j = 0; j < n; ++j) done(first + j, rows[j].data());
    }
    return absl::OkStatus();
  }

  std::string model_dir_;
  EvalData data_;
  QualityOptions options_;
  worker::LlamaConfig config_;
  std::unique_ptr<Tokenizer> tokenizer_;
  std::map<int, Baseline> baselines_;
  kernels::SeqId next_seq_ = 0;
};

}  // namespace

absl::StatusOr<EvalData> LoadEvalData(const std::string& path, const Tokenizer* tokenizer) {
  EvalData data;
  std::error_code ec;
  if (std::filesystem::is_directory(path, ec)) {
    if (tokenizer == nullptr) return absl::InvalidArgumentError("a text folder needs a tokenizer");
    std::vector<std::string> names;
    for (const auto& entry : std::filesystem::directory_iterator(path, ec)) {
      if (entry.is_regular_file()) names.push_back(entry.path().string());
    }
    std::sort(names.begin(), names.end());
    for (const auto& name : names) {
      ASSIGN_OR_RETURN(std::string text, ReadFile(name));
      auto ids = tokenizer->Encode(text, {.add_special_tokens = true});
      if (!ids.ok()) continue;  // not UTF-8: not a text file
      data.files.push_back(std::move(*ids));
    }
  } else {
    ASSIGN_OR_RETURN(std::string text, ReadFile(path));
    const nlohmann::json j = nlohmann::json::parse(text, nullptr, /*allow_exceptions=*/false);
    if (j.is_discarded() || !j.is_object() || !j.contains("files") || !j["files"].is_array()) {
      return absl::InvalidArgumentError(absl::StrCat(path, ": expected {\"files\": [...]}"));
    }
    for (const auto& f : j["files"]) {
      if (!f.is_object() || !f.contains("ids") || !f["ids"].is_array()) {
        return absl::InvalidArgumentError(absl::StrCat(path, ": a file entry has no \"ids\""));
      }
      std::vector<int32_t> ids;
      for (const auto& id : f["ids"]) {
        if (!id.is_number_integer()) {
          return absl::InvalidArgumentError(absl::StrCat(path, ": non-integer token id"));
        }
        ids.push_back(id.get<int32_t>());
      }
      data.files.push_back(std::move(ids));
    }
  }
  if (data.files.empty()) return absl::InvalidArgumentError(absl::StrCat(path, ": no files"));
  return data;
}

absl::StatusOr<EvalSetting> ParseEvalSetting(const std::string& text) {
  EvalSetting s;
  s.name = text;
  const size_t plus = text.find('+');
  ASSIGN_OR_RETURN(s.spec, kernels::ParseKvFormat(text.substr(0, plus)));
  if (plus != std::string::npos) {
    ASSIGN_OR_RETURN(s.spec.eviction, kernels::ParseEviction(text.substr(plus + 1)));
  }
  return s;
}

absl::StatusOr<std::unique_ptr<QualityEvaluator>> QualityEvaluator::Create(
    const std::string& model_dir, EvalData data, const QualityOptions& options) {
  if (options.windows < 1 || options.score_tokens < 1 || options.probes < 0 || options.batch < 1) {
    return absl::InvalidArgumentError("windows, score_tokens and batch must be >= 1, probes >= 0");
  }
  ASSIGN_OR_RETURN(worker::LlamaConfig config, worker::LoadLlamaConfig(model_dir + "/config.json"));
  ASSIGN_OR_RETURN(auto tokenizer, Tokenizer::FromFile(model_dir + "/tokenizer.json"));
  for (const auto& f : data.files) {
    for (int32_t id : f) {
      if (id < 0 || id >= config.vocab_size) {
        return absl::InvalidArgumentError(
            absl::StrCat("evaluation data: token id ", id, " outside the model's vocabulary"));
      }
    }
  }
  return std::unique_ptr<QualityEvaluator>(new QualityEvaluatorImpl(
      model_dir, std::move(data), options, std::move(config), std::move(tokenizer)));
}

}  // namespace kvgate::eval
