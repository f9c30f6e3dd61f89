// Policy loader: reads a routing policy YAML file into a validated, immutable Policy.
//
// Every problem is reported with the place it was written, as "file:line:col: message"
// (1-based), and the loader keeps going after the first problem so that one run lists them all:
// YAML syntax errors, unknown keys (typos never pass silently), wrong types, duplicate names,
// references to unknown pools or task types, invalid regexes, bad ranges, bad kv_format names, a
// missing final catch-all route. Nothing in the file can crash the process.
//
//   PolicyParseResult result = ParsePolicyFile("policies/default.yaml");
//   for (const PolicyError& e : result.errors) std::cerr << e.ToString() << "\n";
//   ASSIGN_OR_RETURN(std::shared_ptr<const Policy> policy, LoadPolicyFile(path));  // Status form
#pragma once

#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "gateway/policy/policy.h"

namespace kvgate::gateway {

// Largest policy file accepted (bytes).
inline constexpr int64_t kMaxPolicyFileBytes = 4 << 20;

struct PolicyError {
  SourceLocation location;
  std::string message;
  // "file:line:col: message".
  std::string ToString() const;
};

struct PolicyParseResult {
  // Set if and only if `errors` is empty.
  std::shared_ptr<const Policy> policy;
  std::vector<PolicyError> errors;
  // FNV-1a 64 hex of the bytes read (set whenever the file could be read), so that a watcher can
  // tell an unchanged bad file from a new one.
  std::string content_hash;
};

// Parses `text`; `source` is the file name used in errors and kept in Policy::source.
PolicyParseResult ParsePolicyText(std::string_view text, std::string_view source);
// Reads and parses `path`. An unreadable or oversized file is one error located at the file.
PolicyParseResult ParsePolicyFile(const std::string& path);

// Status forms: InvalidArgumentError whose message lists every error, one per line.
absl::StatusOr<std::shared_ptr<const Policy>> LoadPolicyText(std::string_view text,
                                                             std::string_view source);
absl::StatusOr<std::shared_ptr<const Policy>> LoadPolicyFile(const std::string& path);

// Stable 64-bit FNV-1a hash of `bytes` as 16 lowercase hex digits (same value on every run and
// machine; used as the policy hash).
std::string Fnv1a64Hex(std::string_view bytes);

// Reads a whole file (at most `max_bytes`); NotFound / PermissionDenied / OutOfRange /
// Unavailable on failure.
absl::StatusOr<std::string> ReadFileBytes(const std::string& path, int64_t max_bytes);

}  // namespace kvgate::gateway
