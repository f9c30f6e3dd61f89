#include "gateway/policy/text_pattern.h"

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>

#include <cctype>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "kvgate/common/log.h"

namespace kvgate::gateway {
namespace {

// Bounds the work one match may do, so that a pathological regex on a long prompt fails (counted
// as no match) instead of spinning.
constexpr uint32_t kMatchLimit = 50'000'000;

// Escapes `keyword` for use inside a PCRE2 pattern; whitespace runs become \s+.
std::string EscapeKeyword(std::string_view keyword) {
  std::string out;
  bool in_space = false;
  for (unsigned char c : keyword) {
    if (c == ' ' || c == '\t' || c == '\n' || c == '\r') {
      if (!in_space) out += "\\s+";
      in_space = true;
      continue;
    }
    in_space = false;
    if (c < 0x80 && !std::isalnum(c)) out += '\\';
    out += static_cast<char>(c);
  }
  return out;
}

}  // namespace

absl::StatusOr<std::shared_ptr<const TextPattern>> TextPattern::Compile(std::string pattern,
                                                                        uint32_t options,
                                                                        PatternError* error) {
  int error_code = 0;
  PCRE2_SIZE error_offset = 0;
  pcre2_code* code = pcre2_compile(reinterpret_cast<PCRE2_SPTR>(pattern.data()), pattern.size(),
                                   options | PCRE2_UTF | PCRE2_MATCH_INVALID_UTF, &error_code,
                                   &error_offset, nullptr);
  if (code == nullptr) {
    PCRE2_UCHAR buffer[256];
    pcre2_get_error_message(error_code, buffer, sizeof(buffer));
    PatternError local{reinterpret_cast<const char*>(buffer), static_cast<int64_t>(error_offset)};
    if (error != nullptr) *error = local;
    return absl::InvalidArgumentError(
        absl::StrCat(local.message, " at offset ", local.offset, " of '", pattern, "'"));
  }
  std::shared_ptr<TextPattern> result(new TextPattern());
  result->pattern_ = std::move(pattern);
  result->code_ = code;
  result->jit_ = pcre2_jit_compile(code, PCRE2_JIT_COMPLETE) == 0;
  result->match_context_ = pcre2_match_context_create(nullptr);
  if (result->match_context_ != nullptr) {
    pcre2_set_match_limit(result->match_context_, kMatchLimit);
  }
  return std::shared_ptr<const TextPattern>(std::move(result));
}

absl::StatusOr<std::shared_ptr<const TextPattern>> TextPattern::FromRegex(std::string_view regex,
                                                                          PatternError* error) {
  if (regex.empty()) {
    if (error != nullptr) *error = {"empty regex", 0};
    return absl::InvalidArgumentError("empty regex");
  }
  return Compile(std::string(regex), PCRE2_MULTILINE, error);
}

absl::StatusOr<std::shared_ptr<const TextPattern>> TextPattern::ForKeywords(
    const std::vector<std::string>& keywords) {
  if (keywords.empty()) return absl::InvalidArgumentError("no keywords");
  // Lookarounds instead of \b so that keywords that start or end with a non-word character
  // ("c++", ".env") still match as whole words.
  std::string pattern = "(?<![\\p{L}\\p{N}_])(?:";
  for (size_t i = 0; i < keywords.size(); ++i) {
    if (keywords[i].empty()) return absl::InvalidArgumentError("empty keyword");
    if (i > 0) pattern += '|';
    pattern += EscapeKeyword(keywords[i]);
  }
  pattern += ")(?![\\p{L}\\p{N}_])";
  return Compile(std::move(pattern), PCRE2_CASELESS, nullptr);
}

TextPattern::~TextPattern() {
  if (match_context_ != nullptr) pcre2_match_context_free(match_context_);
  if (code_ != nullptr) pcre2_code_free(code_);
}

bool TextPattern::Matches(std::string_view text) const {
  pcre2_match_data* data = pcre2_match_data_create(1, nullptr);
  if (data == nullptr) {
    match_errors_.fetch_add(1, std::memory_order_relaxed);
    return false;
  }
  int rc = pcre2_match(code_, reinterpret_cast<PCRE2_SPTR>(text.data()), text.size(), 0, 0, data,
                       match_context_);
  pcre2_match_data_free(data);
  if (rc >= 0) return true;
  if (rc != PCRE2_ERROR_NOMATCH) {
    if (match_errors_.fetch_add(1, std::memory_order_relaxed) == 0) {
      PCRE2_UCHAR buffer[256];
      pcre2_get_error_message(rc, buffer, sizeof(buffer));
      KVGATE_LOG(WARNING) << "pattern '" << pattern_ << "' failed to match (counted as no match): "
                          << reinterpret_cast<const char*>(buffer);
    }
  }
  return false;
}

}  // namespace kvgate::gateway
