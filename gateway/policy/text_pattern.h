// TextPattern: a compiled PCRE2 pattern used by task-type classification rules.
//
// Compiled once when a policy loads (JIT when available), matched once per rule per request.
// Patterns are UTF-8 and Unicode-aware, and match safely on invalid UTF-8 input
// (PCRE2_MATCH_INVALID_UTF): a prompt never makes a match crash or throw. A matching error
// (match limit hit, JIT stack exhausted) counts as "no match" and is counted in match_errors().
//
//   ASSIGN_OR_RETURN(auto keywords, TextPattern::ForKeywords({"contract", "nda"}));
//   bool legal = keywords->Matches(prompt);          // case-insensitive, whole words
//   absl::StatusOr<std::shared_ptr<const TextPattern>> re = TextPattern::FromRegex("^diff --git");
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"

typedef struct pcre2_real_code_8 pcre2_code_8;
typedef struct pcre2_real_match_context_8 pcre2_match_context_8;

namespace kvgate::gateway {

// Why a pattern did not compile.
struct PatternError {
  std::string message;  // PCRE2's message
  int64_t offset = 0;   // byte offset in the pattern where PCRE2 stopped
};

class TextPattern {
 public:
  // Compiles a user regex (PCRE2 syntax, UTF, multiline: ^ and $ match at line boundaries).
  // On failure returns InvalidArgumentError and, if `error` is non-null, fills it.
  static absl::StatusOr<std::shared_ptr<const TextPattern>> FromRegex(
      std::string_view regex, PatternError* error = nullptr);
  // One pattern matching any of `keywords` case-insensitively as whole words: the characters
  // around a match are not letters, digits or '_'. Whitespace inside a keyword matches any run of
  // whitespace. Keywords must be non-empty.
  static absl::StatusOr<std::shared_ptr<const TextPattern>> ForKeywords(
      const std::vector<std::string>& keywords);

  ~TextPattern();
  TextPattern(const TextPattern&) = delete;
  TextPattern& operator=(const TextPattern&) = delete;

  // True if the pattern matches somewhere in `text`. Thread-safe.
  bool Matches(std::string_view text) const;

  const std::string& pattern() const { return pattern_; }
  bool jit() const { return jit_; }
  uint64_t match_errors() const { return match_errors_.load(std::memory_order_relaxed); }

 private:
  TextPattern() = default;
  static absl::StatusOr<std::shared_ptr<const TextPattern>> Compile(std::string pattern,
                                                                    uint32_t options,
                                                                    PatternError* error);

  std::string pattern_;
  pcre2_code_8* code_ = nullptr;
  pcre2_match_context_8* match_context_ = nullptr;
  bool jit_ = false;
  mutable std::atomic<uint64_t> match_errors_{0};
};

}  // namespace kvgate::gateway
