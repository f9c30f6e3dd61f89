// kvgate eval: measures every KV setting (format, optionally with eviction) on a model at several
// context lengths and writes the quality table (YAML) the gateway routes on. Resumable: entries
// already in --out are skipped (unless --rerun), and the table is saved after every entry.
//
//   kvgate eval --model models/reference --formats fp16,fp8,tq3.5
//       --evict 'h2o:heavy=0.1,recent=0.1,sink:sinks=4,window=256' --contexts 512,1024,2048
//       --out models/reference/quality.yaml
#include <sys/utsname.h>

#include <chrono>
#include <cstdio>
#include <ctime>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"
#include "cli/args.h"
#include "cli/command.h"
#include "cli/setting_list.h"
#include "kvgate/common/tokenizer.h"
#include "workers/eval/quality_eval.h"
#include "workers/eval/quality_table.h"
#ifdef KVGATE_CLI_HAVE_CUDA
#include "workers/backend/cuda/cuda_model_runner.h"
#endif

namespace kvgate::cli {
namespace {

constexpr char kDefaultFormats[] = "fp16,fp8,int8,kivi4,kivi2,tq4,tq3.5,tq3,tq2.5";

std::string Machine() {
  utsname u{};
  std::string m = uname(&u) == 0 ? absl::StrCat(u.sysname, " ", u.release, " ", u.machine) : "?";
  return absl::StrCat(m, ", ", std::thread::hardware_concurrency(), " hardware threads");
}

std::string Today() {
  const std::time_t now = std::time(nullptr);
  char buf[32];
  std::strftime(buf, sizeof buf, "%Y-%m-%d", std::gmtime(&now));
  return buf;
}

void PrintTable(const eval::QualityTable& table, const std::vector<int>& contexts) {
  // "+-": half-widths of 95% intervals (ppl_ratio; retrieval's difference from fp16, "d_retr").
  std::printf("%-34s %6s %9s %10s %8s %7s %7s %7s %8s %7s %7s %8s\n", "setting", "ctx", "ppl",
              "ppl_ratio", "+-", "kl", "top1", "retr", "d_retr", "+-", "exact", "retr_p");
  for (const auto& name : table.settings) {
    for (int ctx : contexts) {
      const eval::QualityEntry* e = table.Find(name, ctx);
      if (e == nullptr) continue;
      std::printf("%-34s %6d %9.4f %10.4f %8.4f %7.4f %7.4f %7.3f %+8.3f %7.3f %7.3f %8.3f\n",
                  name.c_str(), ctx, e->ppl, e->ppl_ratio, e->ppl_ratio_ci95, e->kl, e->top1,
                  e->retrieval, e->retrieval - e->retrieval_fp16, e->retrieval_ci95,
                  e->retrieval_exact, e->retrieval_p);
    }
  }
}

int RunEval(int argc, char** argv) {
  Args args(argc, argv,
            {"model", "data", "formats", "evict", "evict-format", "contexts", "windows",
             "score-tokens", "probes", "threads", "seed", "batch", "out", "backend", "cuda-compute"},
            {"rerun", "quiet"});
  if (args.help() || !args.ok() || args.Get("model").empty()) {
    if (!args.ok()) std::fprintf(stderr, "kvgate eval: %s\n", args.error().c_str());
    std::fprintf(
        stderr,
        "usage: kvgate eval --model DIR [--data FILE|DIR] [--formats %s]\n"
        "         [--evict 'h2o:heavy=0.1,recent=0.1,sink:sinks=4,window=256'] [--evict-format fp16]\n"
        "         [--contexts 512,1024,2048] [--windows 8] [--score-tokens 64] [--probes 8]\n"
        "         [--threads N] [--seed 1] [--batch 16] [--out DIR/quality.yaml]\n"
        "         [--backend cpu|cuda] [--cuda-compute bf16|fp32] [--rerun] [--quiet]\n"
        "Measures perplexity (and its ratio to fp16), KL divergence and top-1 agreement with\n"
        "fp16, and retrieval of early context, for each KV setting at each context length.\n"
        "--data: {\"files\":[{\"ids\":[...]}]} JSON or a folder of text files (default\n"
        "DIR/eval/heldout_ids.json). Entries already in --out are kept unless --rerun.\n",
        kDefaultFormats);
    return args.help() ? 0 : 2;
  }
  const std::string model = args.Get("model");
  const std::string out = args.Get("out", model + "/quality.yaml");
  eval::QualityOptions opts;
  opts.windows = static_cast<int>(args.GetInt("windows", 8));
  opts.score_tokens = static_cast<int>(args.GetInt("score-tokens", 64));
  opts.probes = static_cast<int>(args.GetInt("probes", 8));
  opts.num_threads = static_cast<int>(args.GetInt("threads", 0));
  opts.seed = static_cast<uint64_t>(args.GetInt("seed", 1));
  opts.batch = static_cast<int>(args.GetInt("batch", 16));
  const std::string backend = args.Get("backend", "cpu");
  if (backend == "cuda") {
#ifdef KVGATE_CLI_HAVE_CUDA
    // bf16 GEMMs by default (the worker's default); fp32 for figures free of the bf16 rounding.
    const absl::StatusOr<worker::CudaCompute> compute =
        worker::ParseCudaCompute(args.Get("cuda-compute", "bf16"));
    if (!compute.ok()) {
      std::fprintf(stderr, "kvgate eval: --cuda-compute: %s\n",
                   std::string(compute.status().message()).c_str());
      return 2;
    }
    opts.make_runner = [compute = *compute](const worker::RunnerOptions& runner_options) {
      return worker::CreateCudaModelRunner(runner_options, {.compute = compute});
    };
#else
    std::fprintf(stderr, "kvgate eval: --backend cuda: this kvgate was built without CUDA\n");
    return 2;
#endif
  } else if (backend != "cpu") {
    std::fprintf(stderr, "kvgate eval: --backend must be cpu or cuda (got '%s')\n",
                 backend.c_str());
    return 2;
  }
  std::vector<int> contexts;
  for (absl::string_view c : absl::StrSplit(args.Get("contexts", "512,1024,2048"), ',',
                                            absl::SkipEmpty())) {
    int v = 0;
    if (!absl::SimpleAtoi(c, &v) || v <= 0) {
      std::fprintf(stderr, "kvgate eval: bad context length '%s'\n", std::string(c).c_str());
      return 2;
    }
    contexts.push_back(v);
  }
  if (!args.ok()) {
    std::fprintf(stderr, "kvgate eval: %s\n", args.error().c_str());
    return 2;
  }

  std::vector<eval::EvalSetting> settings;
  for (const std::string& f : SplitSettingList(args.Get("formats", kDefaultFormats))) {
    auto s = eval::ParseEvalSetting(f);
    if (!s.ok()) {
      std::fprintf(stderr, "kvgate eval: %s\n", std::string(s.status().message()).c_str());
      return 2;
    }
    settings.push_back(*s);
  }
  for (const std::string& e : SplitSettingList(args.Get("evict"))) {
    auto s = eval::ParseEvalSetting(args.Get("evict-format", "fp16") + "+" + e);
    if (!s.ok()) {
      std::fprintf(stderr, "kvgate eval: %s\n", std::string(s.status().message()).c_str());
      return 2;
    }
    settings.push_back(*s);
  }

  auto tokenizer = Tokenizer::FromFile(model + "/tokenizer.json");
  if (!tokenizer.ok()) {
    std::fprintf(stderr, "kvgate eval: %s\n", std::string(tokenizer.status().message()).c_str());
    return 1;
  }
  auto data = eval::LoadEvalData(args.Get("data", model + "/eval/heldout_ids.json"),
                                 tokenizer->get());
  if (!data.ok()) {
    std::fprintf(stderr, "kvgate eval: %s\n", std::string(data.status().message()).c_str());
    return 1;
  }
  auto evaluator = eval::QualityEvaluator::Create(model, std::move(*data), opts);
  if (!evaluator.ok()) {
    std::fprintf(stderr, "kvgate eval: %s\n", std::string(evaluator.status().message()).c_str());
    return 1;
  }

  eval::QualityTable table;
  if (!args.GetBool("rerun")) {
    auto loaded = eval::LoadQualityTable(out);
    if (loaded.ok()) {
      table = std::move(*loaded);
    } else if (loaded.status().code() != absl::StatusCode::kNotFound) {
      std::fprintf(stderr, "kvgate eval: %s\n", std::string(loaded.status().message()).c_str());
      return 1;
    }
  }
  table.model = model;
  table.meta["date"] = Today();
  table.meta["machine"] = Machine();
  table.meta["backend"] =
      backend == "cuda" ? absl::StrCat("cuda (", args.Get("cuda-compute", "bf16"), " compute)")
                        : backend;
  table.meta["options"] =
      absl::StrFormat("windows=%d score_tokens=%d probes=%d seed=%d batch=%d", opts.windows,
                      opts.score_tokens, opts.probes, static_cast<int>(opts.seed), opts.batch);

  const bool quiet = args.GetBool("quiet");
  int index = 0;
  const int total = static_cast<int>(settings.size() * contexts.size());
  for (const auto& setting : settings) {
    for (int ctx : contexts) {
      ++index;
      if (table.Find(setting.name, ctx) != nullptr) {
        if (!quiet) {
          std::fprintf(stderr, "[%d/%d] %s @ %d: already in %s, skipped\n", index, total,
                       setting.name.c_str(), ctx, out.c_str());
        }
        continue;
      }
      const auto start = std::chrono::steady_clock::now();
      auto progress = [&](int done, int all) {
        if (quiet) return;
        const int width = 30;
        const int filled = all > 0 ? done * width / all : width;
        const double secs =
            std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
        std::fprintf(stderr, "\r[%d/%d] %-30s ctx %5d [%s%s] %3d/%-3d %6.1fs", index, total,
                     setting.name.c_str(), ctx, std::string(filled, '#').c_str(),
                     std::string(width - filled, '.').c_str(), done, all, secs);
        std::fflush(stderr);
      };
      auto entry = (*evaluator)->Evaluate(setting, ctx, progress);
      if (!quiet) std::fputc('\n', stderr);
      if (!entry.ok()) {
        std::fprintf(stderr, "kvgate eval: %s @ %d: %s\n", setting.name.c_str(), ctx,
                     std::string(entry.status().message()).c_str());
        return 1;
      }
      table.Put(*entry);
      if (auto st = eval::SaveQualityTable(table, out); !st.ok()) {
        std::fprintf(stderr, "kvgate eval: %s\n", std::string(st.message()).c_str());
        return 1;
      }
    }
  }
  PrintTable(table, contexts);
  std::fprintf(stderr, "wrote %s\n", out.c_str());
  return 0;
}

}  // namespace

KVGATE_COMMAND(eval, "measure KV-format quality on a model (perplexity, KL, top-1, retrieval)",
               RunEval);

}  // namespace kvgate::cli
