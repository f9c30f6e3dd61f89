// Tokenizer throughput, one thread: encodes every text of a JSONL corpus (one JSON string per
// line) and prints one table row per (tokenizer, mode): MB/s of UTF-8 input, tokens/s and, when
// --hf FILE gives Hugging Face's numbers (tools/bench/tokenizer_bench_hf.js), the ratio.
//
//   tokenizer_bench --corpus tests/parity/corpus.jsonl --tokenizer llama3=path/tokenizer.json
//       [--tokenizer qwen3=...] [--hf hf.jsonl] [--seconds 3]
//
// Modes: "per-text" encodes each corpus text by itself; "joined" encodes the corpus joined by
// "\n" as one document. "cold" is the first pass on a freshly loaded tokenizer (empty word
// cache); the other rows are the steady state over --seconds.
#include <chrono>
#include <cstdio>
#include <fstream>
#include <map>
#include <string>
#include <vector>

#include "kvgate/common/tokenizer.h"
#include "nlohmann/json.hpp"

namespace {

using Clock = std::chrono::steady_clock;

struct Result {
  double mb_per_s = 0, tokens_per_s = 0;
};

// Encodes `docs` repeatedly for at least `seconds` (at least once); returns throughput.
Result Measure(const kvgate::Tokenizer& tok, const std::vector<std::string>& docs, double seconds,
               bool single_pass) {
  size_t bytes = 0, tokens = 0;
  auto start = Clock::now();
  double elapsed = 0;
  do {
    for (const std::string& doc : docs) {
      auto ids = tok.Encode(doc, {.add_special_tokens = false});
      if (!ids.ok()) {
        std::fprintf(stderr, "encode failed: %s\n", std::string(ids.status().message()).c_str());
        std::exit(1);
      }
      tokens += ids->size();
      bytes += doc.size();
    }
    elapsed = std::chrono::duration<double>(Clock::now() - start).count();
  } while (!single_pass && elapsed < seconds);
  return {bytes / elapsed / 1e6, tokens / elapsed};
}

}  // namespace

int main(int argc, char** argv) {
  std::string corpus_path, hf_path;
  std::vector<std::pair<std::string, std::string>> tokenizers;
  double seconds = 3;
  for (int i = 1; i + 1 < argc; i += 2) {
    std::string flag = argv[i], value = argv[i + 1];
    if (flag == "--corpus") {
      corpus_path = value;
    } else if (flag == "--hf") {
      hf_path = value;
    } else if (flag == "--seconds") {
      seconds = std::stod(value);
    } else if (flag == "--tokenizer" && value.find('=') != std::string::npos) {
      tokenizers.emplace_back(value.substr(0, value.find('=')), value.substr(value.find('=') + 1));
    } else {
      std::fprintf(stderr, "unknown flag %s\n", flag.c_str());
      return 2;
    }
  }
  if (corpus_path.empty() || tokenizers.empty()) {
    std::fprintf(stderr,
                 "usage: tokenizer_bench --corpus FILE --tokenizer NAME=FILE... [--hf FILE] "
                 "[--seconds S]\n");
    return 2;
  }
  std::vector<std::string> texts;
  std::ifstream corpus(corpus_path);
  std::string line, joined;
  while (std::getline(corpus, line)) {
    auto parsed = nlohmann::json::parse(line, nullptr, false);
    if (parsed.is_string()) texts.push_back(parsed.get<std::string>());
  }
  for (size_t i = 0; i < texts.size(); ++i) joined += (i ? "\n" : "") + texts[i];
  std::map<std::string, Result> hf;  // key "name/mode"
  if (!hf_path.empty()) {
    std::ifstream in(hf_path);
    while (std::getline(in, line)) {
      auto r = nlohmann::json::parse(line, nullptr, false);
      if (!r.is_object()) continue;
      hf[r.value("tokenizer", "") + "/" + r.value("mode", "")] = {r.value("mb_per_s", 0.0),
                                                                  r.value("tokens_per_s", 0.0)};
    }
  }
  std::printf("corpus: %zu texts, %.2f MB; one thread\n\n", texts.size(), joined.size() / 1e6);
  std::printf(
      "| tokenizer | mode | kvgate MB/s | kvgate tokens/s | HF MB/s | HF tokens/s | ratio vs HF "
      "|\n");
  std::printf("|---|---|---:|---:|---:|---:|---:|\n");
  for (const auto& [name, path] : tokenizers) {
    auto tok = kvgate::Tokenizer::FromFile(path);
    if (!tok.ok()) {
      std::fprintf(stderr, "%s\n", std::string(tok.status().message()).c_str());
      return 1;
    }
    std::vector<std::pair<std::string, Result>> rows;
    rows.emplace_back("per-text cold", Measure(**tok, texts, 0, true));
    rows.emplace_back("per-text", Measure(**tok, texts, seconds, false));
    auto fresh = kvgate::Tokenizer::FromFile(path);
    rows.emplace_back("joined cold", Measure(**fresh, {joined}, 0, true));
    rows.emplace_back("joined", Measure(**fresh, {joined}, seconds, false));
    for (const auto& [mode, r] : rows) {
      auto it = hf.find(name + "/" + mode);
      if (it != hf.end() && it->second.mb_per_s > 0) {
        std::printf("| %s | %s | %.2f | %.0f | %.2f | %.0f | %.2fx |\n", name.c_str(), mode.c_str(),
                    r.mb_per_s, r.tokens_per_s, it->second.mb_per_s, it->second.tokens_per_s,
                    r.mb_per_s / it->second.mb_per_s);
      } else {
        std::printf("| %s | %s | %.2f | %.0f | - | - | - |\n", name.c_str(), mode.c_str(),
                    r.mb_per_s, r.tokens_per_s);
      }
    }
  }
  return 0;
}
