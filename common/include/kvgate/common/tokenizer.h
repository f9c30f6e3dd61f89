// Tokenizer: loads a Hugging Face `tokenizer.json` and encodes/decodes exactly as the Hugging Face
// `tokenizers` library does, for the two model families kvgate serves:
//   - byte-level BPE (Llama 3, Qwen2/3, GPT-2): pre-tokenizer regex (PCRE2), byte-to-unicode map,
//     merges by rank, added/special tokens matched before pre-tokenization;
//   - SentencePiece-style BPE with byte fallback (Llama 2, Mistral): "▁" replaces spaces,
//     merges by rank, <0xNN> byte tokens for unknown characters.
//
//   ASSIGN_OR_RETURN(auto tok, Tokenizer::FromFile("model/tokenizer.json"));
//   std::vector<int32_t> ids = tok->Encode("Hello world", {.add_special_tokens = true});
//   std::string text = tok->Decode(ids);
//
// A Tokenizer is immutable after loading and safe to use from many threads at once.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"

namespace kvgate {

struct EncodeOptions {
  // Apply the post-processor's template (e.g. prepend <|begin_of_text|> for Llama 3), as HF's
  // `add_special_tokens=True`.
  bool add_special_tokens = true;
};

struct DecodeOptions {
  // Leave special tokens (added tokens marked "special") out of the text, as HF's
  // `skip_special_tokens=True`.
  bool skip_special_tokens = false;
};

class Tokenizer {
 public:
  virtual ~Tokenizer() = default;

  // Parses a tokenizer.json. InvalidArgumentError names what is malformed or unsupported.
  static absl::StatusOr<std::unique_ptr<Tokenizer>> FromFile(const std::string& path);
  static absl::StatusOr<std::unique_ptr<Tokenizer>> FromJson(std::string_view json);

  // Encodes UTF-8 text. Invalid UTF-8 input is an InvalidArgumentError (HF refuses it too: it
  // takes Rust strings). Special-token strings in the text are matched as special tokens.
  virtual absl::StatusOr<std::vector<int32_t>> Encode(std::string_view text,
                                                      const EncodeOptions& options = {}) const = 0;

  // Decodes ids to text as HF's `decode` does. Ids out of range are skipped. Byte sequences that
  // are not valid UTF-8 decode to U+FFFD as in HF.
  virtual std::string Decode(const std::vector<int32_t>& ids,
                             const DecodeOptions& options = {}) const = 0;

  // Raw bytes of one token after the decoder (byte-level: the original bytes; SentencePiece: "▁"
  // mapped to a space, <0xNN> to byte NN). Empty for an id out of range.
  virtual std::string TokenBytes(int32_t id) const = 0;

  virtual int32_t vocab_size() const = 0;  // largest id + 1, added tokens included
  virtual std::optional<int32_t> TokenToId(std::string_view token) const = 0;
  // Id of the beginning-of-sequence token the post-processor adds, if any.
  virtual std::optional<int32_t> bos_id() const = 0;
  // True if the id is an added token marked special.
  virtual bool IsSpecial(int32_t id) const = 0;
};

// Turns a stream of token ids into UTF-8 text pieces for streaming. Never emits a broken UTF-8
// sequence: bytes of an incomplete character are held until completed; Finish() flushes what is
// left (invalid leftovers become U+FFFD). Concatenating all pieces equals Decode(all ids) for
// byte-level tokenizers.
//
//   StreamDecoder dec(*tok);
//   for (int32_t id : ids) out += dec.Push(id);
//   out += dec.Finish();
class StreamDecoder {
 public:
  explicit StreamDecoder(const Tokenizer& tokenizer, DecodeOptions options = {});
  std::string Push(int32_t id);
  std::string Finish();

 private:
  const Tokenizer& tokenizer_;
  DecodeOptions options_;
  std::vector<int32_t> ids_;  // context ids: those since the previous emission point, then new ones
  size_t prefix_index_ = 0;   // ids_[0, prefix_index_) were decoded before the last emission
  size_t emitted_bytes_ = 0;  // bytes of Decode(ids_[0, prefix_index_)) already emitted
};

}  // namespace kvgate
