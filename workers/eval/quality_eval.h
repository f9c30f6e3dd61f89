// Quality evaluation of KV-cache settings (format + eviction) on a model: what `kvgate eval`
// measures and writes into a quality table (quality_table.h).
//
// For one setting at one context length C, over `windows` held-out windows (token ids of held-out
// files, each starting with BOS, at least C + 1 tokens):
//   - the first C - S tokens of a window are prefilled (their own attention sees fresh
//     full-precision K/V, as a worker's prefill does), then the next S tokens are fed one decode
//     step at a time, each attending to the whole cache THROUGH THE FORMAT (and its eviction); the
//     S next-token predictions (targets: window tokens C - S + 1 .. C) are scored;
//   - perplexity over those S x windows predictions, and per prediction: KL(fp16 || setting) of the
//     next-token distributions and whether the argmax equals fp16's (top-1 agreement);
//   - retrieval: `probes` synthetic probes of length C in Python syntax: a header assigning string
//     literals to four constants (`ZUKA_KEY = "morivite"`), held-out code as filler, and at the end
//     `\n\n\nZUKA_KEY = "` for one of them: everything up to the filler is prefilled, the query and
//     the value tokens are decoded (teacher-forced). Scores: top-1 accuracy over value tokens
//     (`retrieval`), fraction of probes with every value token top-1 (`retrieval_exact`), and the
//     mean probability of the value tokens (`retrieval_p`).
// fp16 is the baseline: its distributions are computed once per context and kept in memory
// (windows x S x vocab floats per context: 270 MB for 128 windows of 64 at a vocabulary of 8K).
// Statistical resolution: windows and probes are the independent units, so each entry carries the
// half-width of a 95% interval for its perplexity ratio (over per-window mean log ratios) and for
// its retrieval difference from fp16 (paired by probe); a difference smaller than that is not
// resolved by the run. Sequences run `batch` at a time (decode steps batched), which changes
// nothing but the speed.
//
//   ASSIGN_OR_RETURN(auto data, LoadEvalData("models/reference/eval/heldout_ids.json"));
//   ASSIGN_OR_RETURN(auto evaluator, QualityEvaluator::Create("models/reference", data, opts));
//   ASSIGN_OR_RETURN(EvalSetting s, ParseEvalSetting("tq3.5"));
//   ASSIGN_OR_RETURN(QualityEntry e, evaluator->Evaluate(s, 1024, progress));
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "kvgate/common/tokenizer.h"
#include "kvgate/kernels/kv_format.h"
#include "workers/backend/model_runner.h"

namespace kvgate::eval {

// Token ids of held-out files (each starts with BOS).
struct EvalData {
  std::vector<std::vector<int32_t>> files;
};

// Reads {"files": [{"ids": [...]}, ...]} (tools/train_reference_model.py writes it), or a folder of
// text files tokenized with `tokenizer` (BOS added), taken in name order.
absl::StatusOr<EvalData> LoadEvalData(const std::string& path, const Tokenizer* tokenizer);

// A KV setting under evaluation: a format with an optional eviction, named as the quality table
// names it ("tq3.5", "fp16+sink:sinks=4,window=256").
struct EvalSetting {
  std::string name;
  kernels::KvFormatSpec spec;
};

// "FORMAT" or "FORMAT+EVICTION" (kernels::ParseKvFormat / ParseEviction syntax).
absl::StatusOr<EvalSetting> ParseEvalSetting(const std::string& text);

struct QualityOptions {
  int windows = 8;        // held-out windows per context (file i gives window i)
  int score_tokens = 64;  // S: decode steps scored at the end of each window
  int probes = 8;         // retrieval probes per context
  int num_threads = 0;    // runner threads (0: hardware concurrency)
  uint64_t seed = 1;      // retrieval probe names and values
  int batch = 16;         // sequences evaluated together (the runner's pool holds this many)
  // Makes the runner of each (setting, context); empty: the CPU runner. The options it gets name
  // the model, the setting's format and a pool just large enough for the context.
  std::function<absl::StatusOr<std::unique_ptr<worker::ModelRunner>>(const worker::RunnerOptions&)>
      make_runner = nullptr;
};

struct QualityEntry {
  std::string setting;
  int context = 0;
  double ppl = 0;        // perplexity over the scored predictions
  double ppl_fp16 = 0;   // the baseline's on the same predictions
  double ppl_ratio = 0;  // ppl / ppl_fp16
  double ppl_ratio_ci95 = 0;   // half-width of its 95% interval (NaN with one window)
  double kl = 0;         // mean KL(fp16 || setting) in nats
  double top1 = 0;       // fraction of predictions whose argmax equals fp16's
  double retrieval = 0;        // top-1 accuracy over probe value tokens
  double retrieval_fp16 = 0;   // fp16's on the same probes
  double retrieval_ci95 = 0;   // half-width of the 95% interval of retrieval - retrieval_fp16
  double retrieval_exact = 0;  // fraction of probes with all value tokens top-1
  double retrieval_p = 0;      // mean probability of the value tokens
  int64_t scored_tokens = 0;
  int windows = 0;
  int probes = 0;
  double seconds = 0;
};

// Called after each window or probe: (done, total) for the current Evaluate call.
using ProgressFn = std::function<void(int done, int total)>;

class QualityEvaluator {
 public:
  virtual ~QualityEvaluator() = default;
  // Loads the model's config and tokenizer (probes are tokenized with it). InvalidArgumentError if
  // the data has fewer than options.windows files long enough for a window, or none for probes.
  static absl::StatusOr<std::unique_ptr<QualityEvaluator>> Create(const std::string& model_dir,
                                                                  EvalData data,
                                                                  const QualityOptions& options);
  // Measures one setting at one context (score_tokens < context <= max_position_embeddings; every
  // window file must hold context + 1 tokens: InvalidArgumentError otherwise). Runs the fp16
  // baseline for this context first if it is not cached yet.
  virtual absl::StatusOr<QualityEntry> Evaluate(const EvalSetting& setting, int context,
                                                const ProgressFn& progress) = 0;
};

}  // namespace kvgate::eval
