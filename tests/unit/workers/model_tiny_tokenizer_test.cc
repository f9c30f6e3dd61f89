// The tiny model's tokenizer.json (Llama-3-style byte-level BPE written by
// tools/make_tiny_model.py) loads in kvgate's Tokenizer and encodes/decodes exactly as Hugging Face
// `tokenizers` 0.22 does. Expected ids were produced by HF tokenizers (the @anush008/tokenizers
// node binding in tests/parity) on the generated file.

#include <string>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "kvgate/common/tokenizer.h"
#include "tests/unit/workers/model_test_util.h"

namespace kvgate::worker {
namespace {

using ::testing::ElementsAreArray;

struct Expected {
  std::string text;
  std::vector<int32_t> ids;  // HF encode(text) with add_special_tokens=True
};

TEST(TinyTokenizerTest, EncodesAndDecodesLikeHuggingFace) {
  const std::string dir = testing::TinyModelDir("llama");
  if (dir.empty()) GTEST_SKIP() << "tiny model was not generated (the build needs NumPy)";
  auto tokenizer = Tokenizer::FromFile(dir + "/tokenizer.json");
  ASSERT_TRUE(tokenizer.ok()) << tokenizer.status();
  const Tokenizer& tok = **tokenizer;
  EXPECT_EQ(tok.vocab_size(), 512);
  EXPECT_EQ(tok.bos_id(), 510);
  EXPECT_EQ(tok.TokenToId("<|end_of_text|>"), 511);
  EXPECT_TRUE(tok.IsSpecial(511));
  EXPECT_FALSE(tok.IsSpecial(300));

  const Expected cases[] = {
      {"The quick brown fox measured 12345 tokens!\n  def f(x):",
       {510, 308, 490, 117, 459, 107, 294, 327, 110, 503, 508, 32,  430, 51,
        52,  53,  273, 298, 115, 33,  10,  32,  499, 271, 40,  120, 41,  58}},
      {"Hello, world. It's 2026; we've   seen\ttabs.",
       {510, 72, 285, 357, 44,  369, 465, 46,  32,  73,  116, 39,  115, 32, 50,  48,
        50,  54, 59,  261, 101, 39,  400, 259, 321, 269, 9,   116, 97,  98, 115, 46}},
      {"<|begin_of_text|>caf\xc3\xa9 \xe6\x97\xa5\xe6\x9c\xac <|end_of_text|>",
       {510, 510, 99, 97, 102, 195, 169, 32, 230, 151, 165, 230, 156, 172, 32, 511}},
      {"", {510}},
  };
  for (const Expected& c : cases) {
    auto ids = tok.Encode(c.text);
    ASSERT_TRUE(ids.ok()) << ids.status();
    EXPECT_THAT(*ids, ElementsAreArray(c.ids)) << c.text;
    // HF decode(ids, skip_special_tokens=False) gives back the BOS marker and the text.
    EXPECT_EQ(tok.Decode(c.ids), "<|begin_of_text|>" + c.text) << c.text;
  }
}

}  // namespace
}  // namespace kvgate::worker
