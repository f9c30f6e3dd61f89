// Gateway overhead benchmark: what the gateway adds to a request's latency, and the CPU time it
// spends per request, for short and long prompts. Prints one Markdown table.
//
//   gateway_bench [--bin build/bin] [--model build/models/tiny]
//                 [--tokenizer name=path/tokenizer.json ...] [--requests_1k 200] [--requests_50k
//                 50]
//
// For every tokenizer (the model folder's, plus each --tokenizer, served by a synthetic config),
// it starts on loopback a kvgate-worker with the NULL backend (no model math: the worker's own
// cost is tokenization, scheduling and streaming; see workers/backend/null_model_runner.h) and a
// kvgate-gateway routing to it, then for each case (prompt of ~1K or ~50K tokens, max_tokens 16,
// greedy, ignore_eos) sends N requests one at a time, alternating:
//   (a) direct: the worker's own kvgate.v1.Gateway API (the worker tokenizes the text);
//   (b) gateway: the gateway tokenizes, scores, routes and forwards token ids to the worker.
// Latencies are client-observed: to the first chunk with a token ("TTFT") and to the end of the
// stream. The added latency is (b) - (a) per percentile. Gateway CPU per request is the change of
// utime+stime in /proc/<gateway>/stat over the case, less its idle rate (health/load probing) for
// the same wall time, divided by the gateway requests. "Route" rows time the Route dry run (score
// and policy only), client-observed, with the gateway's own overhead_us field.
// Both paths must stream the same token ids (the null runner is deterministic): checked.
#include <grpcpp/grpcpp.h>
#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <memory>
#include <random>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "kvgate/common/subprocess.h"
#include "kvgate/common/tokenizer.h"
#include "kvgate/v1/gateway.grpc.pb.h"

ABSL_FLAG(std::string, bin, KVGATE_BENCH_BIN_DIR, "Folder of kvgate-worker and kvgate-gateway");
ABSL_FLAG(std::string, model, KVGATE_BENCH_MODEL_DIR,
          "Model folder (config.json, tokenizer.json) served by the null worker");
ABSL_FLAG(std::vector<std::string>, tokenizer, {},
          "Extra NAME=tokenizer.json setups, each served with a synthetic config");
ABSL_FLAG(int, requests_1k, 200, "Requests per path for the ~1K-token prompt");
ABSL_FLAG(int, requests_50k, 50, "Requests per path for the ~50K-token prompt");
ABSL_FLAG(int, max_tokens, 16, "Tokens generated per request");
ABSL_FLAG(int, warmup, 3, "Unmeasured requests per path before each case");

namespace kvgate::bench {
namespace {

namespace pb = ::kvgate::v1;
using Clock = std::chrono::steady_clock;

struct Case {
  const char* name;
  int target_tokens;
  int requests;
};

struct Setup {
  std::string name;
  std::string model_dir;
};

double Ms(Clock::duration d) { return std::chrono::duration<double, std::milli>(d).count(); }

// Nearest-rank percentile of `values` (copied and sorted).
double Percentile(std::vector<double> values, double p) {
  if (values.empty()) return NAN;
  std::sort(values.begin(), values.end());
  size_t rank = static_cast<size_t>(std::ceil(p / 100.0 * values.size()));
  return values[std::clamp<size_t>(rank, 1, values.size()) - 1];
}

// utime + stime of a process, in seconds (all its threads, dead ones included).
double ProcessCpuSeconds(int pid) {
  std::ifstream in(absl::StrCat("/proc/", pid, "/stat"));
  std::string stat((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  auto paren = stat.rfind(')');
  if (paren == std::string::npos) return NAN;
  std::istringstream fields(stat.substr(paren + 2));
  std::string field;
  long utime = 0, stime = 0;
  for (int i = 3; i <= 15 && fields >> field; ++i) {  // field 3 is the state
    if (i == 14) utime = std::stol(field);
    if (i == 15) stime = std::stol(field);
  }
  return static_cast<double>(utime + stime) / sysconf(_SC_CLK_TCK);
}

// Varied text: prose from a word list, made-up words and numbers, punctuation, some code, some
// non-ASCII.
std::string Paragraph(std::mt19937& rng) {
  static const char* kWords[] = {
      "the",       "contract",  "shall",   "be",        "governed",  "by",       "laws",
      "of",        "state",     "parties", "agree",     "that",      "any",      "dispute",
      "arising",   "from",      "this",    "agreement", "cache",     "token",    "gateway",
      "latency",   "precision", "memory",  "quantized", "attention", "keys",     "values",
      "request",   "policy",    "worker",  "pool",      "river",     "mountain", "quickly",
      "silver",    "orange",    "window",  "history",   "between",   "although", "notwithstanding",
      "indemnify", "warranty",  "München", "café",      "naïve",     "日本語",   "数据",
      "Привет",    "مرحبا",     "🙂",    "über",      "façade"};
  static const char* kCode[] = {
      "for (int i = 0; i < n; ++i) { sum += values[i] * weights[i]; }\n",
      "def route(request):\n    return policy.match(request.score)\n",
      "SELECT id, name FROM users WHERE created_at > '2024-01-01' ORDER BY id;\n",
      "if (status.ok()) { return *result; } else { LOG(ERROR) << status; }\n"};
  static const char* kSyllables[] = {"ka",  "ro",  "mi", "tel", "vun", "shi", "pra", "dor", "ex",
                                     "qua", "lin", "zo", "ber", "gha", "nu",  "tri", "som", "ve"};
  std::uniform_int_distribution<int> word(0, std::size(kWords) - 1);
  std::uniform_int_distribution<int> syllable(0, std::size(kSyllables) - 1);
  std::uniform_int_distribution<int> len(6, 20), num(0, 99999), pick(0, 9);
  std::string out;
  for (int s = 0; s < 5; ++s) {
    int n = len(rng);
    for (int w = 0; w < n; ++w) {
      if (w > 0) out += ' ';
      const int kind = pick(rng);
      if (kind == 0) {
        out += std::to_string(num(rng));
      } else if (kind <= 3) {  // a made-up word, so that the tokenizer's word cache misses
        for (int syllables = 1 + pick(rng) % 4; syllables > 0; --syllables) {
          out += kSyllables[syllable(rng)];
        }
      } else {
        out += kWords[word(rng)];
      }
    }
    out += pick(rng) < 7 ? ". " : (pick(rng) < 5 ? "? " : "; ");
  }
  if (pick(rng) < 3) {
    out += '\n';
    out += kCode[pick(rng) % std::size(kCode)];
  }
  return out + "\n\n";
}

// A prompt of at least `target` tokens (BOS included) with this tokenizer; `*count` gets the count.
std::string BuildPrompt(const Tokenizer& tok, int target, int* count) {
  std::mt19937 rng(target);
  std::string prompt;
  int estimate = 1;
  while (true) {
    while (estimate < target) {
      std::string p = Paragraph(rng);
      auto ids = tok.Encode(p, {.add_special_tokens = false});
      estimate += ids.ok() ? static_cast<int>(ids->size()) : 0;
      prompt += p;
    }
    auto ids = tok.Encode(prompt);
    *count = ids.ok() ? static_cast<int>(ids->size()) : 0;
    if (*count >= target) return prompt;
    estimate = *count;
  }
}

struct StreamTiming {
  double first_token_ms = NAN;
  double total_ms = NAN;
  std::vector<int32_t> ids;
  grpc::Status status;
};

StreamTiming TimeGenerate(pb::Gateway::Stub& stub, const pb::GenerateRequest& req) {
  StreamTiming t;
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(120));
  const auto start = Clock::now();
  auto reader = stub.Generate(&ctx, req);
  pb::GenerateChunk chunk;
  while (reader->Read(&chunk)) {
    if (chunk.token_ids_size() > 0 && t.ids.empty()) t.first_token_ms = Ms(Clock::now() - start);
    t.ids.insert(t.ids.end(), chunk.token_ids().begin(), chunk.token_ids().end());
  }
  t.status = reader->Finish();
  t.total_ms = Ms(Clock::now() - start);
  return t;
}

std::unique_ptr<pb::Gateway::Stub> Connect(int port) {
  grpc::ChannelArguments args;
  args.SetMaxReceiveMessageSize(64 << 20);
  args.SetMaxSendMessageSize(64 << 20);
  return pb::Gateway::NewStub(grpc::CreateCustomChannel(absl::StrCat("127.0.0.1:", port),
                                                        grpc::InsecureChannelCredentials(), args));
}

void Fail(const std::string& what) {
  std::fprintf(stderr, "gateway_bench: %s\n", what.c_str());
  std::exit(1);
}

// A model folder for a tokenizer without a model: its tokenizer.json and a small synthetic
// Llama config (the null runner reads only the vocabulary, EOS and cache shapes from it).
std::string SyntheticModelDir(const std::string& name, const std::string& tokenizer_path,
                              const Tokenizer& tok) {
  auto dir =
      std::filesystem::temp_directory_path() / absl::StrCat("kvgate_bench_", name, "_", getpid());
  std::filesystem::create_directories(dir);
  std::filesystem::copy_file(tokenizer_path, dir / "tokenizer.json",
                             std::filesystem::copy_options::overwrite_existing);
  std::ofstream(dir / "config.json") << absl::StrFormat(
      R"({"model_type": "llama", "vocab_size": %d, "hidden_size": 256, "intermediate_size": 512,
          "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2,
          "max_position_embeddings": 65536, "bos_token_id": %d, "eos_token_id": %d})",
      tok.vocab_size(), tok.bos_id().value_or(0), tok.vocab_size() - 1);
  return dir.string();
}

struct Row {
  std::string setup, prompt, path;
  int tokens = 0, n = 0;
  double ttft_p50 = NAN, ttft_p99 = NAN, total_p50 = NAN, total_p99 = NAN;
  double cpu_ms_per_request = NAN;
  std::string note;
};

std::string Cell(double v) { return std::isnan(v) ? "" : absl::StrFormat("%.2f", v); }

void RunSetup(const Setup& setup, const std::vector<Case>& cases, std::vector<Row>& rows) {
  const std::string bin = absl::GetFlag(FLAGS_bin);
  auto tok = Tokenizer::FromFile(setup.model_dir + "/tokenizer.json");
  if (!tok.ok()) Fail(absl::StrCat("tokenizer: ", tok.status().message()));

  auto worker = Subprocess::Start({bin + "/kvgate-worker", "--backend", "null", "--model",
                                   setup.model_dir, "--max_context", "65536", "--port", "0",
                                   "--host", "127.0.0.1", "--threads", "1"});
  const int worker_port = worker ? worker->WaitForListening(std::chrono::seconds(60)) : -1;
  if (worker_port <= 0) Fail("the worker did not start");
  const std::string policy = (std::filesystem::temp_directory_path() /
                              absl::StrCat("kvgate_bench_policy_", getpid(), ".yaml"))
                                 .string();
  std::ofstream(policy) << absl::StrFormat(R"(version: 1
pools:
  - name: bench
    endpoints: ["127.0.0.1:%d"]
    kv_format: fp16
    precision: full
    max_context: 65536
default_task_type: chat
task_types:
  - name: chat
routes:
  - name: default
    pools: [bench]
)",
                                           worker_port);
  auto gateway =
      Subprocess::Start({bin + "/kvgate-gateway", "--policy", policy, "--model", setup.model_dir,
                         "--port", "0", "--http_port", "-1", "--host", "127.0.0.1"});
  const int gateway_port = gateway ? gateway->WaitForListening(std::chrono::seconds(60)) : -1;
  if (gateway_port <= 0) Fail("the gateway did not start");
  auto direct = Connect(worker_port);
  auto via_gateway = Connect(gateway_port);

  // Ready: the gateway has probed the worker and a request goes through.
  pb::GenerateRequest probe;
  probe.set_prompt("ready?");
  probe.mutable_sampling()->set_max_tokens(1);
  bool ready = false;
  for (int i = 0; i < 300 && !ready; ++i) {
    ready = TimeGenerate(*via_gateway, probe).status.ok();
    if (!ready) std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  if (!ready) Fail("the gateway never served a request");

  // The gateway's idle CPU rate (health and load probing), subtracted below.
  const double idle_cpu0 = ProcessCpuSeconds(gateway->pid());
  const auto idle_t0 = Clock::now();
  std::this_thread::sleep_for(std::chrono::seconds(5));
  const double idle_cpu_per_s =
      (ProcessCpuSeconds(gateway->pid()) - idle_cpu0) / (Ms(Clock::now() - idle_t0) / 1e3);
  std::fprintf(stderr, "[%s] gateway idle CPU: %.2f ms/s\n", setup.name.c_str(),
               idle_cpu_per_s * 1e3);

  for (const Case& c : cases) {
    int tokens = 0;
    const std::string prompt = BuildPrompt(**tok, c.target_tokens, &tokens);
    pb::GenerateRequest req;
    req.mutable_sampling()->set_max_tokens(absl::GetFlag(FLAGS_max_tokens));
    req.mutable_sampling()->set_ignore_eos(true);

    // Warm-up, and the check that both paths produce the same stream.
    std::vector<int32_t> reference;
    for (int i = 0; i < absl::GetFlag(FLAGS_warmup); ++i) {
      req.set_prompt(absl::StrCat(i, " ", prompt));
      StreamTiming a = TimeGenerate(*direct, req), b = TimeGenerate(*via_gateway, req);
      if (!a.status.ok() || !b.status.ok()) {
        Fail(absl::StrCat(c.name, ": warm-up failed: direct ", a.status.error_message(),
                          "; gateway ", b.status.error_message()));
      }
      if (a.ids != b.ids || static_cast<int>(a.ids.size()) != absl::GetFlag(FLAGS_max_tokens)) {
        Fail(absl::StrCat(c.name, ": direct and gateway streams differ"));
      }
    }

    std::vector<double> ttft[2], total[2];
    const double cpu0 = ProcessCpuSeconds(gateway->pid());
    const auto t0 = Clock::now();
    for (int i = 0; i < c.requests; ++i) {
      req.set_prompt(absl::StrCat(i, " ", prompt));  // distinct prompts, same length class
      for (int path = 0; path < 2; ++path) {
        StreamTiming t = TimeGenerate(path == 0 ? *direct : *via_gateway, req);
        if (!t.status.ok()) {
          Fail(absl::StrCat(c.name,
                            path == 0 ? " direct: " : " gateway: ", t.status.error_message()));
        }
        ttft[path].push_back(t.first_token_ms);
        total[path].push_back(t.total_ms);
      }
    }
    const double wall_s = Ms(Clock::now() - t0) / 1e3;
    const double cpu_s = ProcessCpuSeconds(gateway->pid()) - cpu0 - idle_cpu_per_s * wall_s;

    // Route dry run: scoring and policy only.
    std::vector<double> route_ms, route_overhead_ms;
    for (int i = 0; i < c.requests; ++i) {
      req.set_prompt(absl::StrCat(i, " ", prompt));
      grpc::ClientContext ctx;
      pb::RouteResponse resp;
      const auto start = Clock::now();
      grpc::Status s = via_gateway->Route(&ctx, req, &resp);
      route_ms.push_back(Ms(Clock::now() - start));
      if (!s.ok()) Fail(absl::StrCat(c.name, " Route: ", s.error_message()));
      route_overhead_ms.push_back(resp.score().overhead_us() / 1e3);
    }

    auto row = [&](const char* path) {
      Row r;
      r.setup = setup.name;
      r.prompt = c.name;
      r.path = path;
      r.tokens = tokens;
      r.n = c.requests;
      return r;
    };
    Row a = row("(a) direct to worker"), b = row("(b) through gateway");
    for (auto [r, p] : {std::pair{&a, 0}, std::pair{&b, 1}}) {
      r->ttft_p50 = Percentile(ttft[p], 50);
      r->ttft_p99 = Percentile(ttft[p], 99);
      r->total_p50 = Percentile(total[p], 50);
      r->total_p99 = Percentile(total[p], 99);
    }
    b.cpu_ms_per_request = cpu_s * 1e3 / c.requests;
    Row added = row("**added (b) - (a)**");
    added.ttft_p50 = b.ttft_p50 - a.ttft_p50;
    added.ttft_p99 = b.ttft_p99 - a.ttft_p99;
    added.total_p50 = b.total_p50 - a.total_p50;
    added.total_p99 = b.total_p99 - a.total_p99;
    Row route = row("Route dry run");
    route.total_p50 = Percentile(route_ms, 50);
    route.total_p99 = Percentile(route_ms, 99);
    route.note =
        absl::StrFormat("server-side scoring p50 %.2f ms, p99 %.2f ms",
                        Percentile(route_overhead_ms, 50), Percentile(route_overhead_ms, 99));
    rows.insert(rows.end(), {a, b, added, route});
    std::fprintf(stderr, "[%s] %s done (%d tokens)\n", setup.name.c_str(), c.name, tokens);
  }
  gateway->Signal(SIGTERM);
  gateway->Wait();
  worker->Signal(SIGTERM);
  worker->Wait();
  std::filesystem::remove(policy);
}

int Main(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
  const std::vector<Case> cases = {
      {"~1K", 1024, absl::GetFlag(FLAGS_requests_1k)},
      {"~50K", 50000, absl::GetFlag(FLAGS_requests_50k)},
  };
  std::vector<Setup> setups = {{"tiny (model folder)", absl::GetFlag(FLAGS_model)}};
  for (const std::string& spec : absl::GetFlag(FLAGS_tokenizer)) {
    auto eq = spec.find('=');
    if (eq == std::string::npos) Fail("--tokenizer wants NAME=PATH");
    const std::string name = spec.substr(0, eq), path = spec.substr(eq + 1);
    auto tok = Tokenizer::FromFile(path);
    if (!tok.ok()) Fail(absl::StrCat(path, ": ", tok.status().message()));
    setups.push_back({name, SyntheticModelDir(name, path, **tok)});
  }

  auto load_average = [] {
    std::ifstream in("/proc/loadavg");
    std::string line;
    std::getline(in, line);
    return line;
  };
  std::fprintf(stderr, "load average before: %s\n", load_average().c_str());
  std::vector<Row> rows;
  for (const Setup& setup : setups) RunSetup(setup, cases, rows);
  std::fprintf(stderr, "load average after: %s\n", load_average().c_str());
  for (size_t i = 1; i < setups.size(); ++i) std::filesystem::remove_all(setups[i].model_dir);

  std::printf(
      "| tokenizer | prompt | tokens | path | n | TTFT p50 ms | TTFT p99 ms | total p50 ms "
      "| total p99 ms | gateway CPU ms/req | note |\n");
  std::printf("|---|---|---:|---|---:|---:|---:|---:|---:|---:|---|\n");
  for (const Row& r : rows) {
    std::printf("| %s | %s | %d | %s | %d | %s | %s | %s | %s | %s | %s |\n", r.setup.c_str(),
                r.prompt.c_str(), r.tokens, r.path.c_str(), r.n, Cell(r.ttft_p50).c_str(),
                Cell(r.ttft_p99).c_str(), Cell(r.total_p50).c_str(), Cell(r.total_p99).c_str(),
                Cell(r.cpu_ms_per_request).c_str(), r.note.c_str());
  }
  return 0;
}

}  // namespace
}  // namespace kvgate::bench

int main(int argc, char** argv) { return kvgate::bench::Main(argc, argv); }
