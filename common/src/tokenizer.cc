// Tokenizer: loads a Hugging Face tokenizer.json and runs the same pipeline as HF `tokenizers`:
// added-token split -> normalizer -> (normalized added tokens) -> pre-tokenizer -> BPE ->
// post-processor; decoding runs the decoder chain on the token strings.
#define PCRE2_CODE_UNIT_WIDTH 8
#include "kvgate/common/tokenizer.h"

#include <pcre2.h>

#include <deque>
#include <fstream>
#include <sstream>

#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_replace.h"
#include "common/src/tokenizer_internal.h"
#include "kvgate/common/status_macros.h"
#include "nlohmann/json.hpp"

namespace kvgate {
namespace {

using json = nlohmann::json;
using tokenizer_internal::AsAbsl;
using tokenizer_internal::BpeConfig;
using tokenizer_internal::BpeModel;

// Ids above this are refused: a hostile file must not make us allocate gigabytes.
constexpr int64_t kMaxTokenId = 1 << 24;

absl::Status Invalid(std::string_view what) {
  return absl::InvalidArgumentError(absl::StrCat("tokenizer.json: ", AsAbsl(what)));
}

// ---- Regex (PCRE2, UTF + UCP, JIT when available)
// ------------------------------------------------

// Oniguruma's \s (what HF uses) is [\t\n\v\f\r\x85\p{Z}]; PCRE2's UCP \s differs (it includes
// U+180E). Rewrites \s and \S to that explicit set so both engines agree.
std::string RewriteWhitespaceClasses(std::string_view pattern) {
  constexpr std::string_view kSpace = "\\t\\n\\x0B\\f\\r\\x{85}\\p{Z}";
  std::string out;
  bool in_class = false;
  for (size_t i = 0; i < pattern.size(); ++i) {
    char c = pattern[i];
    if (c == '\\' && i + 1 < pattern.size()) {
      char e = pattern[++i];
      if (e == 's') {
        absl::StrAppend(&out, in_class ? "" : "[", AsAbsl(kSpace), in_class ? "" : "]");
      } else if (e == 'S' && !in_class) {
        absl::StrAppend(&out, "[^", AsAbsl(kSpace), "]");
      } else {
        out.push_back('\\');
        out.push_back(e);
      }
      continue;
    }
    if (!in_class && c == '[') {
      in_class = true;
      out.push_back(c);
      // A ']' right after '[' or '[^' is a literal.
      if (i + 1 < pattern.size() && pattern[i + 1] == '^') out.push_back(pattern[++i]);
      if (i + 1 < pattern.size() && pattern[i + 1] == ']') out.push_back(pattern[++i]);
      continue;
    }
    if (in_class && c == ']') in_class = false;
    out.push_back(c);
  }
  return out;
}

class Regex {
 public:
  static absl::StatusOr<std::unique_ptr<Regex>> Compile(std::string_view pattern) {
    std::string rewritten = RewriteWhitespaceClasses(pattern);
    int error = 0;
    PCRE2_SIZE error_offset = 0;
    pcre2_code* code =
        pcre2_compile(reinterpret_cast<PCRE2_SPTR>(rewritten.data()), rewritten.size(),
                      PCRE2_UTF | PCRE2_UCP, &error, &error_offset, nullptr);
    if (code == nullptr) {
      PCRE2_UCHAR message[256];
      pcre2_get_error_message(error, message, sizeof(message));
      return Invalid(absl::StrCat("cannot compile regex '", AsAbsl(pattern), "': ",
                                  reinterpret_cast<char*>(message), " at offset ", error_offset));
    }
    auto regex = std::unique_ptr<Regex>(new Regex(code));
    regex->jit_ = pcre2_jit_compile(code, PCRE2_JIT_COMPLETE) == 0;
    return regex;
  }
  ~Regex() { pcre2_code_free(code_); }

  // Appends [start, end) of every non-overlapping match in `subject` (valid UTF-8), as
  // Oniguruma's find_iter: after an empty match the search resumes one character later.
  absl::Status FindAll(std::string_view subject,
                       std::vector<std::pair<size_t, size_t>>* out) const {
    thread_local std::unique_ptr<pcre2_match_data, decltype(&pcre2_match_data_free)> match_data(
        pcre2_match_data_create(4, nullptr), &pcre2_match_data_free);
    auto* data = reinterpret_cast<PCRE2_SPTR>(subject.data());
    size_t offset = 0;
    while (offset <= subject.size()) {
      int rc = jit_ ? pcre2_jit_match(code_, data, subject.size(), offset, PCRE2_NO_UTF_CHECK,
                                      match_data.get(), nullptr)
                    : PCRE2_ERROR_JIT_BADOPTION;
      if (rc == PCRE2_ERROR_JIT_STACKLIMIT || rc == PCRE2_ERROR_JIT_BADOPTION) {
        rc = pcre2_match(code_, data, subject.size(), offset, PCRE2_NO_UTF_CHECK | PCRE2_NO_JIT,
                         match_data.get(), nullptr);
      }
      if (rc == PCRE2_ERROR_NOMATCH) break;
      if (rc < 0) {
        return absl::ResourceExhaustedError(
            absl::StrCat("pre-tokenizer regex failed with PCRE2 error ", rc));
      }
      PCRE2_SIZE* ovector = pcre2_get_ovector_pointer(match_data.get());
      size_t start = ovector[0], end = ovector[1];
      out->emplace_back(start, end);
      if (end > start) {
        offset = end;
      } else {
        if (end >= subject.size()) break;
        offset = end + tokenizer_internal::Utf8SequenceLength(static_cast<uint8_t>(subject[end]));
      }
    }
    return absl::OkStatus();
  }

 private:
  explicit Regex(pcre2_code* code) : code_(code) {}
  pcre2_code* code_;
  bool jit_ = false;
};

// ---- Pipeline pieces
// -----------------------------------------------------------------------------

struct AddedToken {
  int32_t id = 0;
  std::string content;
  bool special = false, lstrip = false, rstrip = false, single_word = false, normalized = false;
};

// Leftmost-longest matcher over added-token contents (HF uses aho-corasick LeftmostLongest).
class AddedTokenMatcher {
 public:
  void Add(const AddedToken* token) {
    if (token->content.empty()) return;
    int node = 0;
    for (unsigned char c : token->content) {
      auto& kids = nodes_[node].children;
      auto it = kids.find(c);
      if (it == kids.end()) {
        kids[c] = static_cast<int>(nodes_.size());
        node = static_cast<int>(nodes_.size());
        nodes_.emplace_back();
      } else {
        node = it->second;
      }
    }
    nodes_[node].token = token;
    first_byte_[static_cast<unsigned char>(token->content[0])] = true;
    empty_ = false;
  }
  bool empty() const { return empty_; }

  struct Match {
    size_t start, end;
    const AddedToken* token;
  };
  // Non-overlapping leftmost-longest matches with single_word/lstrip/rstrip applied as HF does.
  void FindAll(std::string_view text, std::vector<Match>* out) const {
    size_t pos = 0, last_stop = 0;
    while (pos < text.size()) {
      if (!first_byte_[static_cast<unsigned char>(text[pos])]) {
        ++pos;
        continue;
      }
      const AddedToken* best = nullptr;
      size_t best_end = 0;
      int node = 0;
      for (size_t i = pos; i < text.size(); ++i) {
        auto it = nodes_[node].children.find(static_cast<unsigned char>(text[i]));
        if (it == nodes_[node].children.end()) break;
        node = it->second;
        if (nodes_[node].token) best = nodes_[node].token, best_end = i + 1;
      }
      if (best == nullptr) {
        ++pos;
        continue;
      }
      size_t start = pos, stop = best_end;
      pos = best_end;
      if (best->single_word) {
        bool start_ok = start == 0 || !IsWordCharBefore(text, start);
        bool stop_ok = stop == text.size() || !IsWordCharAt(text, stop);
        if (!start_ok || !stop_ok) continue;
      }
      if (best->lstrip) {
        while (start > last_stop && IsSpaceByteBefore(text, start)) --start;
      }
      if (best->rstrip) {
        while (stop < text.size() && IsAsciiSpace(text[stop])) ++stop;
        pos = stop;
      }
      out->push_back({start, stop, best});
      last_stop = stop;
    }
  }

 private:
  struct Node {
    absl::flat_hash_map<unsigned char, int> children;
    const AddedToken* token = nullptr;
  };
  static bool IsAsciiSpace(char c) { return c == ' ' || (c >= '\t' && c <= '\r'); }
  static bool IsSpaceByteBefore(std::string_view text, size_t pos) {
    return IsAsciiSpace(text[pos - 1]);
  }
  // Word characters as HF's single_word check (alphanumeric or '_'); approximated on ASCII, any
  // non-ASCII byte counts as a word character.
  static bool IsWordByte(unsigned char c) { return c >= 0x80 || std::isalnum(c) || c == '_'; }
  static bool IsWordCharBefore(std::string_view text, size_t pos) {
    return IsWordByte(static_cast<unsigned char>(text[pos - 1]));
  }
  static bool IsWordCharAt(std::string_view text, size_t pos) {
    return IsWordByte(static_cast<unsigned char>(text[pos]));
  }

  std::vector<Node> nodes_ = std::vector<Node>(1);
  bool first_byte_[256] = {};
  bool empty_ = true;
};

struct NormalizerStep {
  enum Kind { kNfc, kPrepend, kReplace } kind;
  std::string a, b;  // Prepend: a = prefix. Replace: a -> b.
};

enum class SplitBehavior { kRemoved, kIsolated, kMergedWithPrevious, kMergedWithNext, kContiguous };

struct PreTokenizerStep {
  enum Kind { kSplit, kByteLevel, kMetaspace } kind;
  std::unique_ptr<Regex> regex;  // Split, ByteLevel with use_regex
  std::string literal;           // Split on a String pattern / Metaspace replacement
  SplitBehavior behavior = SplitBehavior::kIsolated;
  bool invert = false;
  bool add_prefix_space = false;                                              // ByteLevel
  enum class Prepend { kAlways, kFirst, kNever } prepend = Prepend::kAlways;  // Metaspace
  bool metaspace_split = true;
};

struct DecoderStep {
  enum Kind { kByteLevel, kReplace, kByteFallback, kFuse, kStrip, kMetaspace } kind;
  std::string a, b;  // Replace: a -> b; Strip: a = content; Metaspace: a = replacement
  int start = 0, stop = 0;
  bool prepend_first = true;  // Metaspace: strip the space it prepended to the first token
};

// A piece of text on its way through the pre-tokenizer. `at_start`: begins at offset 0 of the
// original input (HF's offsets_original().0 == 0, used by Metaspace's "first" scheme).
struct Piece {
  std::string_view text;
  bool at_start;
};

const char* const kGpt2Pattern =
    R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)";

class HfTokenizer final : public Tokenizer {
 public:
  absl::Status Load(const json& root);

  absl::StatusOr<std::vector<int32_t>> Encode(std::string_view text,
                                              const EncodeOptions& options) const override;
  std::string Decode(const std::vector<int32_t>& ids, const DecodeOptions& options) const override;
  std::string TokenBytes(int32_t id) const override;
  int32_t vocab_size() const override { return static_cast<int32_t>(id_to_token_.size()); }
  std::optional<int32_t> TokenToId(std::string_view token) const override {
    auto it = token_to_id_.find(tokenizer_internal::AsAbsl(token));
    if (it == token_to_id_.end()) return std::nullopt;
    return it->second;
  }
  std::optional<int32_t> bos_id() const override { return bos_id_; }
  bool IsSpecial(int32_t id) const override {
    return id >= 0 && id < vocab_size() && token_kind_[id] == kAddedSpecial;
  }

 private:
  enum TokenKind : uint8_t { kAbsent, kModel, kAddedSpecial, kAddedPlain };

  absl::Status LoadModel(const json& model);
  absl::Status LoadAddedTokens(const json& added);
  absl::Status LoadNormalizer(const json& normalizer);
  absl::Status LoadPreTokenizer(const json& pre_tokenizer);
  absl::Status LoadPostProcessor(const json& post_processor);
  absl::Status LoadDecoder(const json& decoder);
  absl::Status SetToken(int64_t id, const std::string& token, TokenKind kind);

  // Encodes one piece of text that contains no (raw-matched) added token.
  absl::Status EncodeSegment(std::string_view text, bool at_start, std::vector<int32_t>* ids) const;
  absl::Status PreTokenizeAndEncode(std::string_view text, bool at_start,
                                    std::vector<int32_t>* ids) const;
  std::vector<std::string> DecodeChain(std::vector<std::string> tokens) const;

  std::vector<std::string> id_to_token_;  // HF token strings ("Ġthe", "<0x0A>", "<|im_start|>")
  std::vector<uint8_t> token_kind_;
  absl::flat_hash_map<std::string, int32_t> token_to_id_;
  std::vector<std::string> decoded_bytes_;  // byte-level: raw bytes of each token

  std::deque<AddedToken> added_tokens_;
  AddedTokenMatcher raw_added_, normalized_added_;
  std::vector<NormalizerStep> normalizer_;
  std::vector<PreTokenizerStep> pre_tokenizer_;
  std::vector<DecoderStep> decoder_;
  bool has_decoder_ = false;
  bool byte_level_ = false;
  std::unique_ptr<BpeModel> bpe_;
  std::vector<int32_t> prefix_ids_, suffix_ids_;  // post-processor (add_special_tokens)
  std::optional<int32_t> bos_id_;
};

absl::Status HfTokenizer::SetToken(int64_t id, const std::string& token, TokenKind kind) {
  if (id < 0 || id >= kMaxTokenId) return Invalid(absl::StrCat("token id out of range: ", id));
  if (id >= static_cast<int64_t>(id_to_token_.size())) {
    id_to_token_.resize(id + 1);
    token_kind_.resize(id + 1, kAbsent);
  }
  id_to_token_[id] = token;
  if (kind != kModel || token_kind_[id] == kAbsent) token_kind_[id] = kind;
  // Added tokens take precedence over the model's vocab for TokenToId, as in HF.
  if (kind != kModel) {
    token_to_id_[token] = static_cast<int32_t>(id);
  } else {
    token_to_id_.try_emplace(token, static_cast<int32_t>(id));
  }
  return absl::OkStatus();
}

absl::Status HfTokenizer::Load(const json& root) {
  if (!root.is_object()) return Invalid("top level is not an object");
  if (!root.contains("model") || !root["model"].is_object()) return Invalid("missing 'model'");
  // The pre-tokenizer decides whether the model works on bytes (byte-level BPE).
  const json null_json;
  auto field = [&](const char* name) -> const json& {
    return root.contains(name) ? root[name] : null_json;
  };
  RETURN_IF_ERROR(LoadPreTokenizer(field("pre_tokenizer")));
  RETURN_IF_ERROR(LoadModel(root["model"]));
  RETURN_IF_ERROR(LoadAddedTokens(field("added_tokens")));
  RETURN_IF_ERROR(LoadNormalizer(field("normalizer")));
  RETURN_IF_ERROR(LoadPostProcessor(field("post_processor")));
  RETURN_IF_ERROR(LoadDecoder(field("decoder")));
  if (byte_level_) {
    decoded_bytes_.resize(id_to_token_.size());
    for (size_t id = 0; id < id_to_token_.size(); ++id) {
      auto bytes = tokenizer_internal::ByteLevelToBytes(id_to_token_[id]);
      decoded_bytes_[id] = bytes ? *bytes : id_to_token_[id];
    }
  }
  return absl::OkStatus();
}

absl::Status HfTokenizer::LoadModel(const json& model) {
  std::string type = model.value("type", std::string("BPE"));
  if (type != "BPE") return Invalid(absl::StrCat("unsupported model type '", type, "' (only BPE)"));
  if (!model.contains("vocab") || !model["vocab"].is_object()) {
    return Invalid("model.vocab is missing or not an object");
  }
  if (!model.contains("merges") || !model["merges"].is_array()) {
    return Invalid("model.merges is missing or not an array");
  }
  if (model.contains("dropout") && !model["dropout"].is_null() &&
      model["dropout"].get<double>() > 0) {
    return Invalid("BPE dropout is not supported");
  }
  for (const char* affix : {"continuing_subword_prefix", "end_of_word_suffix"}) {
    if (model.contains(affix) && !model[affix].is_null() &&
        !model[affix].get<std::string>().empty()) {
      return Invalid(absl::StrCat("model.", affix, " is not supported"));
    }
  }
  BpeConfig config;
  config.byte_units = byte_level_;
  config.ignore_merges = model.value("ignore_merges", false);
  config.byte_fallback = model.value("byte_fallback", false);
  config.fuse_unk = model.value("fuse_unk", false);
  config.byte_fallback_ids.fill(-1);
  // Vocab strings in HF form; the model's unit space (raw bytes for byte-level).
  absl::flat_hash_map<std::string, int32_t> hf_vocab;
  hf_vocab.reserve(model["vocab"].size());
  config.vocab.reserve(model["vocab"].size());
  for (const auto& [token, id_json] : model["vocab"].items()) {
    if (!id_json.is_number_integer())
      return Invalid(absl::StrCat("vocab id of '", token, "' is not an integer"));
    int64_t id = id_json.get<int64_t>();
    RETURN_IF_ERROR(SetToken(id, token, kModel));
    hf_vocab[token] = static_cast<int32_t>(id);
    if (byte_level_) {
      if (auto bytes = tokenizer_internal::ByteLevelToBytes(token)) {
        config.vocab[*bytes] = static_cast<int32_t>(id);
      }
    } else {
      config.vocab[token] = static_cast<int32_t>(id);
    }
    if (token.size() == 6 && token.compare(0, 3, "<0x") == 0 && token[5] == '>') {
      int byte = 0;
      if (std::sscanf(token.c_str() + 3, "%2X", &byte) == 1 && std::isxdigit(token[3]) &&
          std::isxdigit(token[4]) && !std::islower(token[3]) && !std::islower(token[4])) {
        config.byte_fallback_ids[byte] = static_cast<int32_t>(id);
      }
    }
  }
  if (model.contains("unk_token") && !model["unk_token"].is_null()) {
    std::string unk = model["unk_token"].get<std::string>();
    auto it = hf_vocab.find(unk);
    if (it == hf_vocab.end())
      return Invalid(absl::StrCat("unk_token '", unk, "' is not in the vocab"));
    config.unk_id = it->second;
  }
  const json& merges = model["merges"];
  config.merges.reserve(merges.size());
  for (size_t rank = 0; rank < merges.size(); ++rank) {
    const json& m = merges[rank];
    std::string left, right;
    if (m.is_string()) {
      const std::string& line = m.get_ref<const std::string&>();
      size_t space = line.find(' ');
      if (space == std::string::npos) {
        return Invalid(absl::StrCat("merge ", rank, " '", line, "' is not 'a b'"));
      }
      left = line.substr(0, space);
      right = line.substr(space + 1);
    } else if (m.is_array() && m.size() == 2 && m[0].is_string() && m[1].is_string()) {
      left = m[0].get<std::string>();
      right = m[1].get<std::string>();
    } else {
      return Invalid(absl::StrCat("merge ", rank, " is neither \"a b\" nor [\"a\", \"b\"]"));
    }
    auto l = hf_vocab.find(left), r = hf_vocab.find(right), merged = hf_vocab.find(left + right);
    if (l == hf_vocab.end() || r == hf_vocab.end() || merged == hf_vocab.end()) {
      return Invalid(absl::StrCat("merge ", rank, " ('", left, "', '", right,
                                  "') uses a token that is not in the vocab"));
    }
    config.merges.push_back({l->second, r->second, merged->second});
  }
  bpe_ = std::make_unique<BpeModel>(std::move(config));
  return absl::OkStatus();
}

absl::Status HfTokenizer::LoadAddedTokens(const json& added) {
  if (added.is_null()) return absl::OkStatus();
  if (!added.is_array()) return Invalid("added_tokens is not an array");
  for (const json& t : added) {
    if (!t.is_object() || !t.contains("id") || !t.contains("content") ||
        !t["id"].is_number_integer() || !t["content"].is_string()) {
      return Invalid("an added token lacks an integer 'id' or a string 'content'");
    }
    AddedToken& token = added_tokens_.emplace_back();
    token.id = static_cast<int32_t>(std::clamp<int64_t>(t["id"].get<int64_t>(), -1, kMaxTokenId));
    token.content = t["content"].get<std::string>();
    token.special = t.value("special", false);
    token.lstrip = t.value("lstrip", false);
    token.rstrip = t.value("rstrip", false);
    token.single_word = t.value("single_word", false);
    token.normalized = t.value("normalized", !token.special);
    if (!tokenizer_internal::IsValidUtf8(token.content)) return Invalid("added token is not UTF-8");
    RETURN_IF_ERROR(SetToken(t["id"].get<int64_t>(), token.content,
                             token.special ? kAddedSpecial : kAddedPlain));
    (token.normalized ? normalized_added_ : raw_added_).Add(&token);
  }
  return absl::OkStatus();
}

absl::Status HfTokenizer::LoadNormalizer(const json& normalizer) {
  if (normalizer.is_null()) return absl::OkStatus();
  std::string type = normalizer.value("type", "");
  if (type == "Sequence") {
    for (const json& step : normalizer.at("normalizers")) RETURN_IF_ERROR(LoadNormalizer(step));
  } else if (type == "NFC") {
    normalizer_.push_back({NormalizerStep::kNfc, "", ""});
  } else if (type == "Prepend") {
    normalizer_.push_back(
        {NormalizerStep::kPrepend, normalizer.at("prepend").get<std::string>(), ""});
  } else if (type == "Replace") {
    const json& pattern = normalizer.at("pattern");
    if (!pattern.contains("String")) return Invalid("Replace normalizer: only String patterns");
    normalizer_.push_back({NormalizerStep::kReplace, pattern["String"].get<std::string>(),
                           normalizer.at("content").get<std::string>()});
    if (normalizer_.back().a.empty()) return Invalid("Replace normalizer with an empty pattern");
  } else {
    return Invalid(absl::StrCat("unsupported normalizer type '", type, "'"));
  }
  return absl::OkStatus();
}

absl::StatusOr<SplitBehavior> ParseBehavior(const std::string& name) {
  if (name == "Removed") return SplitBehavior::kRemoved;
  if (name == "Isolated") return SplitBehavior::kIsolated;
  if (name == "MergedWithPrevious") return SplitBehavior::kMergedWithPrevious;
  if (name == "MergedWithNext") return SplitBehavior::kMergedWithNext;
  if (name == "Contiguous") return SplitBehavior::kContiguous;
  return Invalid(absl::StrCat("unknown split behavior '", name, "'"));
}

std::string EscapeRegex(std::string_view literal) {
  std::string out;
  for (char c : literal) {
    if (std::strchr("\\^$.|?*+()[]{}-/#", c) != nullptr && c != '\0') out.push_back('\\');
    out.push_back(c);
  }
  return out;
}

absl::Status HfTokenizer::LoadPreTokenizer(const json& pre) {
  if (pre.is_null()) return absl::OkStatus();
  std::string type = pre.value("type", "");
  PreTokenizerStep step;
  if (type == "Sequence") {
    for (const json& s : pre.at("pretokenizers")) RETURN_IF_ERROR(LoadPreTokenizer(s));
    return absl::OkStatus();
  } else if (type == "Split") {
    step.kind = PreTokenizerStep::kSplit;
    const json& pattern = pre.at("pattern");
    std::string regex;
    if (pattern.contains("Regex")) {
      regex = pattern["Regex"].get<std::string>();
    } else if (pattern.contains("String")) {
      regex = EscapeRegex(pattern["String"].get<std::string>());
    } else {
      return Invalid("Split pattern is neither Regex nor String");
    }
    ASSIGN_OR_RETURN(step.regex, Regex::Compile(regex));
    ASSIGN_OR_RETURN(step.behavior, ParseBehavior(pre.at("behavior").get<std::string>()));
    step.invert = pre.value("invert", false);
  } else if (type == "ByteLevel") {
    step.kind = PreTokenizerStep::kByteLevel;
    step.add_prefix_space = pre.value("add_prefix_space", true);
    if (pre.value("use_regex", true)) {
      ASSIGN_OR_RETURN(step.regex, Regex::Compile(kGpt2Pattern));
    }
    byte_level_ = true;
  } else if (type == "Metaspace") {
    step.kind = PreTokenizerStep::kMetaspace;
    step.literal = pre.value("replacement", std::string("\xE2\x96\x81"));
    if (tokenizer_internal::Utf8SequenceLength(static_cast<uint8_t>(step.literal[0])) !=
        static_cast<int>(step.literal.size())) {
      return Invalid("Metaspace replacement must be one character");
    }
    std::string scheme = pre.value("prepend_scheme", std::string());
    if (scheme.empty()) scheme = pre.value("add_prefix_space", true) ? "always" : "never";
    if (scheme == "always") {
      step.prepend = PreTokenizerStep::Prepend::kAlways;
    } else if (scheme == "first") {
      step.prepend = PreTokenizerStep::Prepend::kFirst;
    } else if (scheme == "never") {
      step.prepend = PreTokenizerStep::Prepend::kNever;
    } else {
      return Invalid(absl::StrCat("unknown Metaspace prepend_scheme '", scheme, "'"));
    }
    step.metaspace_split = pre.value("split", true);
  } else {
    return Invalid(absl::StrCat("unsupported pre_tokenizer type '", type, "'"));
  }
  pre_tokenizer_.push_back(std::move(step));
  return absl::OkStatus();
}

absl::Status HfTokenizer::LoadPostProcessor(const json& post) {
  if (post.is_null()) return absl::OkStatus();
  std::string type = post.value("type", "");
  auto lookup = [&](const std::string& token) -> absl::StatusOr<int32_t> {
    auto id = TokenToId(token);
    if (!id) return Invalid(absl::StrCat("post_processor token '", token, "' is not in the vocab"));
    return *id;
  };
  if (type == "Sequence") {
    for (const json& p : post.at("processors")) RETURN_IF_ERROR(LoadPostProcessor(p));
  } else if (type == "ByteLevel") {
    // Offsets only; ids unchanged.
  } else if (type == "TemplateProcessing") {
    const json& special = post.at("special_tokens");
    bool seen_sequence = false;
    for (const json& piece : post.at("single")) {
      if (piece.contains("Sequence")) {
        if (piece["Sequence"].at("id").get<std::string>() != "A") {
          return Invalid("TemplateProcessing single template uses a sequence other than $A");
        }
        seen_sequence = true;
      } else if (piece.contains("SpecialToken")) {
        std::string name = piece["SpecialToken"].at("id").get<std::string>();
        if (!special.contains(name)) {
          return Invalid(absl::StrCat("TemplateProcessing special token '", name, "' undefined"));
        }
        std::vector<int32_t>& target = seen_sequence ? suffix_ids_ : prefix_ids_;
        for (const json& id : special[name].at("ids")) {
          int64_t value = id.get<int64_t>();
          if (value < 0 || value >= kMaxTokenId) return Invalid("template id out of range");
          target.push_back(static_cast<int32_t>(value));
        }
      } else {
        return Invalid("TemplateProcessing piece is neither Sequence nor SpecialToken");
      }
    }
  } else if (type == "BertProcessing" || type == "RobertaProcessing") {
    ASSIGN_OR_RETURN(int32_t cls, lookup(post.at("cls").at(0).get<std::string>()));
    ASSIGN_OR_RETURN(int32_t sep, lookup(post.at("sep").at(0).get<std::string>()));
    prefix_ids_.push_back(cls);
    suffix_ids_.push_back(sep);
  } else {
    return Invalid(absl::StrCat("unsupported post_processor type '", type, "'"));
  }
  if (!prefix_ids_.empty()) bos_id_ = prefix_ids_.front();
  return absl::OkStatus();
}

absl::Status HfTokenizer::LoadDecoder(const json& decoder) {
  if (decoder.is_null()) return absl::OkStatus();
  has_decoder_ = true;
  std::string type = decoder.value("type", "");
  DecoderStep step;
  if (type == "Sequence") {
    for (const json& d : decoder.at("decoders")) RETURN_IF_ERROR(LoadDecoder(d));
    return absl::OkStatus();
  } else if (type == "ByteLevel") {
    step.kind = DecoderStep::kByteLevel;
  } else if (type == "Replace") {
    const json& pattern = decoder.at("pattern");
    if (!pattern.contains("String")) return Invalid("Replace decoder: only String patterns");
    step.kind = DecoderStep::kReplace;
    step.a = pattern["String"].get<std::string>();
    step.b = decoder.at("content").get<std::string>();
    if (step.a.empty()) return Invalid("Replace decoder with an empty pattern");
  } else if (type == "ByteFallback") {
    step.kind = DecoderStep::kByteFallback;
  } else if (type == "Fuse") {
    step.kind = DecoderStep::kFuse;
  } else if (type == "Strip") {
    step.kind = DecoderStep::kStrip;
    step.a = decoder.at("content").get<std::string>();
    step.start = decoder.value("start", 0);
    step.stop = decoder.value("stop", 0);
  } else if (type == "Metaspace") {
    step.kind = DecoderStep::kMetaspace;
    step.a = decoder.value("replacement", std::string("\xE2\x96\x81"));
    std::string scheme = decoder.value("prepend_scheme", std::string());
    if (scheme.empty()) scheme = decoder.value("add_prefix_space", true) ? "always" : "never";
    step.prepend_first = scheme != "never";
  } else {
    return Invalid(absl::StrCat("unsupported decoder type '", type, "'"));
  }
  decoder_.push_back(std::move(step));
  return absl::OkStatus();
}

// ---- Encoding
// ------------------------------------------------------------------------------------

// Splits `pieces` by regex matches following HF's NormalizedString::split behaviors.
absl::Status SplitPieces(const PreTokenizerStep& step, std::vector<Piece>* pieces) {
  std::vector<Piece> out;
  out.reserve(pieces->size() * 2);
  std::vector<std::pair<size_t, size_t>> matches;
  struct Range {
    size_t start, end;
    bool is_match;
  };
  std::vector<Range> ranges, merged;
  for (const Piece& piece : *pieces) {
    matches.clear();
    RETURN_IF_ERROR(step.regex->FindAll(piece.text, &matches));
    ranges.clear();
    size_t prev = 0;
    for (auto [start, end] : matches) {
      if (prev != start) ranges.push_back({prev, start, false});
      ranges.push_back({start, end, true});
      prev = end;
    }
    if (prev != piece.text.size()) ranges.push_back({prev, piece.text.size(), false});
    if (step.invert) {
      for (Range& r : ranges) r.is_match = !r.is_match;
    }
    merged.clear();
    switch (step.behavior) {
      case SplitBehavior::kIsolated:
        merged = ranges;
        break;
      case SplitBehavior::kRemoved:
        for (const Range& r : ranges) {
          if (!r.is_match) merged.push_back(r);
        }
        break;
      case SplitBehavior::kMergedWithPrevious: {
        bool previous_match = false;
        for (const Range& r : ranges) {
          if (r.is_match && !previous_match && !merged.empty()) {
            merged.back().end = r.end;
          } else {
            merged.push_back(r);
          }
          previous_match = r.is_match;
        }
        break;
      }
      case SplitBehavior::kContiguous: {
        bool previous_match = false;
        for (const Range& r : ranges) {
          if (r.is_match == previous_match && !merged.empty()) {
            merged.back().end = r.end;
          } else {
            merged.push_back(r);
          }
          previous_match = r.is_match;
        }
        break;
      }
      case SplitBehavior::kMergedWithNext: {
        bool previous_match = false;
        for (auto it = ranges.rbegin(); it != ranges.rend(); ++it) {
          if (it->is_match && !previous_match && !merged.empty()) {
            merged.back().start = it->start;
          } else {
            merged.push_back(*it);
          }
          previous_match = it->is_match;
        }
        std::reverse(merged.begin(), merged.end());
        break;
      }
    }
    for (const Range& r : merged) {
      if (r.end > r.start) {
        out.push_back(
            {piece.text.substr(r.start, r.end - r.start), piece.at_start && r.start == 0});
      }
    }
  }
  *pieces = std::move(out);
  return absl::OkStatus();
}

absl::Status HfTokenizer::PreTokenizeAndEncode(std::string_view text, bool at_start,
                                               std::vector<int32_t>* ids) const {
  std::vector<Piece> pieces = {{text, at_start}};
  std::deque<std::string> arena;  // owns text the steps create
  for (const PreTokenizerStep& step : pre_tokenizer_) {
    switch (step.kind) {
      case PreTokenizerStep::kSplit:
        RETURN_IF_ERROR(SplitPieces(step, &pieces));
        break;
      case PreTokenizerStep::kByteLevel:
        if (step.add_prefix_space) {
          for (Piece& piece : pieces) {
            if (!piece.text.empty() && piece.text[0] != ' ') {
              piece.text = arena.emplace_back(absl::StrCat(" ", AsAbsl(piece.text)));
            }
          }
        }
        if (step.regex) RETURN_IF_ERROR(SplitPieces(step, &pieces));
        break;
      case PreTokenizerStep::kMetaspace: {
        std::vector<Piece> out;
        for (Piece& piece : pieces) {
          std::string replaced = absl::StrReplaceAll(AsAbsl(piece.text), {{" ", step.literal}});
          bool prepend = step.prepend == PreTokenizerStep::Prepend::kAlways ||
                         (step.prepend == PreTokenizerStep::Prepend::kFirst && piece.at_start);
          if (prepend && !absl::StartsWith(replaced, step.literal)) {
            replaced.insert(0, step.literal);
          }
          std::string_view s = arena.emplace_back(std::move(replaced));
          if (!step.metaspace_split) {
            out.push_back({s, piece.at_start});
            continue;
          }
          // MergedWithNext on the replacement character: each piece starts at one.
          size_t begin = 0;
          for (size_t pos = s.find(step.literal, 1); pos != std::string_view::npos;
               pos = s.find(step.literal, pos + step.literal.size())) {
            out.push_back({s.substr(begin, pos - begin), piece.at_start && begin == 0});
            begin = pos;
          }
          if (begin < s.size()) out.push_back({s.substr(begin), piece.at_start && begin == 0});
        }
        pieces = std::move(out);
        break;
      }
    }
  }
  for (const Piece& piece : pieces) bpe_->EncodeWord(piece.text, ids);
  return absl::OkStatus();
}

absl::Status HfTokenizer::EncodeSegment(std::string_view text, bool at_start,
                                        std::vector<int32_t>* ids) const {
  std::string normalized;
  std::string_view current = text;
  for (const NormalizerStep& step : normalizer_) {
    std::string next;
    switch (step.kind) {
      case NormalizerStep::kNfc:
        if (tokenizer_internal::TriviallyNfc(current)) continue;
        if (!tokenizer_internal::NormalizeNfc(current, &next)) {
          return absl::InternalError("NFC normalization failed");
        }
        break;
      case NormalizerStep::kPrepend:
        if (current.empty()) continue;
        next = absl::StrCat(step.a, AsAbsl(current));
        break;
      case NormalizerStep::kReplace:
        next = absl::StrReplaceAll(AsAbsl(current), {{step.a, step.b}});
        break;
    }
    normalized = std::move(next);
    current = normalized;
  }
  if (normalized_added_.empty()) return PreTokenizeAndEncode(current, at_start, ids);
  std::vector<AddedTokenMatcher::Match> matches;
  normalized_added_.FindAll(current, &matches);
  size_t prev = 0;
  for (const auto& m : matches) {
    if (m.start > prev) {
      RETURN_IF_ERROR(
          PreTokenizeAndEncode(current.substr(prev, m.start - prev), at_start && prev == 0, ids));
    }
    ids->push_back(m.token->id);
    prev = m.end;
  }
  if (prev < current.size()) {
    RETURN_IF_ERROR(PreTokenizeAndEncode(current.substr(prev), at_start && prev == 0, ids));
  }
  return absl::OkStatus();
}

absl::StatusOr<std::vector<int32_t>> HfTokenizer::Encode(std::string_view text,
                                                         const EncodeOptions& options) const {
  size_t bad = 0;
  if (!tokenizer_internal::IsValidUtf8(text, &bad)) {
    return absl::InvalidArgumentError(absl::StrCat("text is not valid UTF-8 (byte ", bad, ")"));
  }
  std::vector<int32_t> ids;
  ids.reserve(text.size() / 3 + 4);
  if (options.add_special_tokens) ids.insert(ids.end(), prefix_ids_.begin(), prefix_ids_.end());
  std::vector<AddedTokenMatcher::Match> matches;
  raw_added_.FindAll(text, &matches);
  size_t prev = 0;
  for (const auto& m : matches) {
    if (m.start > prev)
      RETURN_IF_ERROR(EncodeSegment(text.substr(prev, m.start - prev), prev == 0, &ids));
    ids.push_back(m.token->id);
    prev = m.end;
  }
  if (prev < text.size()) RETURN_IF_ERROR(EncodeSegment(text.substr(prev), prev == 0, &ids));
  if (options.add_special_tokens) ids.insert(ids.end(), suffix_ids_.begin(), suffix_ids_.end());
  return ids;
}

// ---- Decoding
// ------------------------------------------------------------------------------------

std::vector<std::string> HfTokenizer::DecodeChain(std::vector<std::string> tokens) const {
  for (const DecoderStep& step : decoder_) {
    std::vector<std::string> out;
    switch (step.kind) {
      case DecoderStep::kByteLevel: {
        std::string bytes;
        for (const std::string& t : tokens) {
          auto raw = tokenizer_internal::ByteLevelToBytes(t);
          bytes += raw ? *raw : t;
        }
        out.push_back(tokenizer_internal::Utf8Lossy(bytes));
        break;
      }
      case DecoderStep::kReplace:
        for (std::string& t : tokens) out.push_back(absl::StrReplaceAll(t, {{step.a, step.b}}));
        break;
      case DecoderStep::kByteFallback: {
        std::string pending;
        int pending_count = 0;
        auto flush = [&] {
          if (pending_count == 0) return;
          if (tokenizer_internal::IsValidUtf8(pending)) {
            out.push_back(pending);
          } else {
            for (int i = 0; i < pending_count; ++i) out.push_back("\xEF\xBF\xBD");
          }
          pending.clear();
          pending_count = 0;
        };
        for (std::string& t : tokens) {
          unsigned int byte = 0;
          if (t.size() == 6 && t.compare(0, 3, "<0x") == 0 && t[5] == '>' &&
              std::isxdigit(static_cast<unsigned char>(t[3])) &&
              std::isxdigit(static_cast<unsigned char>(t[4])) &&
              std::sscanf(t.c_str() + 3, "%2x", &byte) == 1) {
            pending.push_back(static_cast<char>(byte));
            ++pending_count;
          } else {
            flush();
            out.push_back(std::move(t));
          }
        }
        flush();
        break;
      }
      case DecoderStep::kFuse: {
        std::string all;
        for (const std::string& t : tokens) all += t;
        out.push_back(std::move(all));
        break;
      }
      case DecoderStep::kStrip:
        // Removes up to `start` leading and `stop` trailing copies of `content` (a character).
        for (std::string& t : tokens) {
          std::string_view s = t;
          for (int i = 0; i < step.start && s.starts_with(step.a); ++i)
            s.remove_prefix(step.a.size());
          for (int i = 0; i < step.stop && s.ends_with(step.a); ++i) s.remove_suffix(step.a.size());
          out.emplace_back(s);
        }
        break;
      case DecoderStep::kMetaspace:
        for (size_t i = 0; i < tokens.size(); ++i) {
          std::string t = absl::StrReplaceAll(tokens[i], {{step.a, " "}});
          if (i == 0 && step.prepend_first && absl::StartsWith(t, " ")) t.erase(0, 1);
          out.push_back(std::move(t));
        }
        break;
    }
    tokens = std::move(out);
  }
  return tokens;
}

std::string HfTokenizer::Decode(const std::vector<int32_t>& ids,
                                const DecodeOptions& options) const {
  auto keep = [&](int32_t id) {
    return id >= 0 && id < vocab_size() && token_kind_[id] != kAbsent &&
           !(options.skip_special_tokens && token_kind_[id] == kAddedSpecial);
  };
  // Fast path: a lone ByteLevel decoder is "concatenate raw bytes, then lossy UTF-8".
  if (byte_level_ && decoder_.size() == 1 && decoder_[0].kind == DecoderStep::kByteLevel) {
    std::string bytes;
    for (int32_t id : ids) {
      if (keep(id)) bytes += decoded_bytes_[id];
    }
    return tokenizer_internal::Utf8Lossy(bytes);
  }
  std::vector<std::string> tokens;
  for (int32_t id : ids) {
    if (keep(id)) tokens.push_back(id_to_token_[id]);
  }
  if (!has_decoder_) {
    std::string joined;
    for (size_t i = 0; i < tokens.size(); ++i) absl::StrAppend(&joined, i ? " " : "", tokens[i]);
    return joined;
  }
  std::string text;
  for (const std::string& piece : DecodeChain(std::move(tokens))) text += piece;
  return text;
}

std::string HfTokenizer::TokenBytes(int32_t id) const {
  if (id < 0 || id >= vocab_size() || token_kind_[id] == kAbsent) return "";
  if (byte_level_) return decoded_bytes_[id];
  const std::string& token = id_to_token_[id];
  unsigned int byte = 0;
  if (token.size() == 6 && token.compare(0, 3, "<0x") == 0 && token[5] == '>' &&
      std::sscanf(token.c_str() + 3, "%2x", &byte) == 1) {
    return std::string(1, static_cast<char>(byte));
  }
  return absl::StrReplaceAll(token, {{"\xE2\x96\x81", " "}});
}

}  // namespace

absl::StatusOr<std::unique_ptr<Tokenizer>> Tokenizer::FromJson(std::string_view text) {
  auto tokenizer = std::make_unique<HfTokenizer>();
  try {
    json root = json::parse(text);
    RETURN_IF_ERROR(tokenizer->Load(root));
  } catch (const json::exception& e) {
    return Invalid(e.what());
  } catch (const std::exception& e) {
    return Invalid(absl::StrCat("cannot load: ", e.what()));
  }
  return std::unique_ptr<Tokenizer>(std::move(tokenizer));
}

absl::StatusOr<std::unique_ptr<Tokenizer>> Tokenizer::FromFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat("cannot open tokenizer file ", path));
  std::stringstream buffer;
  buffer << in.rdbuf();
  auto tokenizer = FromJson(buffer.str());
  if (!tokenizer.ok()) {
    return absl::Status(tokenizer.status().code(),
                        absl::StrCat(path, ": ", tokenizer.status().message()));
  }
  return tokenizer;
}

// ---- StreamDecoder
// -------------------------------------------------------------------------------

StreamDecoder::StreamDecoder(const Tokenizer& tokenizer, DecodeOptions options)
    : tokenizer_(tokenizer), options_(options) {}

// As HF's DecodeStream: decode the held ids plus the new one; emit what extends past the text
// already emitted unless it ends in U+FFFD (an incomplete character); then keep only the ids
// from the last emission point as context.
std::string StreamDecoder::Push(int32_t id) {
  ids_.push_back(id);
  std::string text = tokenizer_.Decode(ids_, options_);
  if (text.size() <= emitted_bytes_ || absl::EndsWith(text, "\xEF\xBF\xBD")) return "";
  std::string piece = text.substr(emitted_bytes_);
  ids_.erase(ids_.begin(), ids_.begin() + prefix_index_);
  prefix_index_ = ids_.size();
  emitted_bytes_ = tokenizer_.Decode(ids_, options_).size();
  return piece;
}

std::string StreamDecoder::Finish() {
  std::string text = tokenizer_.Decode(ids_, options_);
  std::string piece = text.size() > emitted_bytes_ ? text.substr(emitted_bytes_) : "";
  ids_.clear();
  prefix_index_ = 0;
  emitted_bytes_ = 0;
  return piece;
}

}  // namespace kvgate
