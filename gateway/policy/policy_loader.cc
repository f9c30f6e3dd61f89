#include "gateway/policy/policy_loader.h"

#include <cmath>

#include <yaml-cpp/yaml.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <exception>
#include <map>
#include <set>

#include "absl/status/status.h"
#include "absl/strings/ascii.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "gateway/internal/absl_string_view.h"
#include "gateway/policy/kv_format_name.h"

namespace kvgate::gateway {

std::string PolicyError::ToString() const {
  return absl::StrCat(location.ToString(), ": ", message);
}

std::string Fnv1a64Hex(std::string_view bytes) {
  uint64_t hash = 0xcbf29ce484222325ULL;
  for (unsigned char c : bytes) {
    hash ^= c;
    hash *= 0x100000001b3ULL;
  }
  char out[17];
  std::snprintf(out, sizeof(out), "%016llx", static_cast<unsigned long long>(hash));
  return out;
}

absl::StatusOr<std::string> ReadFileBytes(const std::string& path, int64_t max_bytes) {
  std::FILE* file = std::fopen(path.c_str(), "rb");
  if (file == nullptr) {
    int err = errno;
    std::string message = absl::StrCat("cannot open: ", std::strerror(err));
    if (err == ENOENT) return absl::NotFoundError(message);
    if (err == EACCES) return absl::PermissionDeniedError(message);
    return absl::UnavailableError(message);
  }
  std::string bytes;
  char buffer[65536];
  size_t n = 0;
  while ((n = std::fread(buffer, 1, sizeof(buffer), file)) > 0) {
    bytes.append(buffer, n);
    if (static_cast<int64_t>(bytes.size()) > max_bytes) {
      std::fclose(file);
      return absl::OutOfRangeError(absl::StrCat("file is larger than ", max_bytes, " bytes"));
    }
  }
  bool failed = std::ferror(file) != 0;
  std::fclose(file);
  if (failed) return absl::UnavailableError("read error");
  return bytes;
}

namespace {

// Levenshtein distance, for "did you mean" hints on unknown keys (short strings only).
size_t EditDistance(absl::string_view a, absl::string_view b) {
  std::vector<size_t> row(b.size() + 1);
  for (size_t j = 0; j <= b.size(); ++j) row[j] = j;
  for (size_t i = 1; i <= a.size(); ++i) {
    size_t diagonal = row[0];
    row[0] = i;
    for (size_t j = 1; j <= b.size(); ++j) {
      size_t above = row[j];
      row[j] = std::min({row[j] + 1, row[j - 1] + 1, diagonal + (a[i - 1] == b[j - 1] ? 0 : 1)});
      diagonal = above;
    }
  }
  return row[b.size()];
}

bool IsValidName(absl::string_view name) {
  if (name.empty() || name.size() > 128) return false;
  for (char c : name) {
    if (!absl::ascii_isalnum(c) && c != '_' && c != '-' && c != '.' && c != '/') return false;
  }
  return true;
}

// "host:port" or "[v6]:port" with port 1..65535.
bool IsValidHostPort(absl::string_view text) {
  size_t colon = text.rfind(':');
  if (colon == absl::string_view::npos || colon == 0) return false;
  absl::string_view host = text.substr(0, colon);
  int port = 0;
  if (!absl::SimpleAtoi(text.substr(colon + 1), &port) || port < 1 || port > 65535) return false;
  if (host.front() == '[') return host.size() > 2 && host.back() == ']';
  if (host.find(':') != absl::string_view::npos) return false;  // bare IPv6 needs brackets
  for (char c : host) {
    if (!absl::ascii_isalnum(c) && c != '-' && c != '.' && c != '_') return false;
  }
  return true;
}

// One key of a YAML map with its value.
struct Field {
  YAML::Node key;
  YAML::Node value;
};
using Fields = std::map<std::string, Field, std::less<>>;

class Parser {
 public:
  explicit Parser(absl::string_view source) : source_(std::string(source)) {}

  std::vector<PolicyError> TakeErrors() { return std::move(errors_); }
  bool ok() const { return errors_.empty(); }

  SourceLocation Loc(const YAML::Node& node) const {
    SourceLocation loc;
    loc.file = source_;
    if (node.IsDefined()) {
      YAML::Mark mark = node.Mark();
      if (!mark.is_null()) {
        loc.line = mark.line + 1;
        loc.column = mark.column + 1;
      }
    }
    return loc;
  }

  void Error(const SourceLocation& loc, std::string message) {
    errors_.push_back(PolicyError{loc, std::move(message)});
  }
  void Error(const YAML::Node& node, std::string message) { Error(Loc(node), std::move(message)); }

  // Reads a map, reporting non-map nodes, non-scalar keys, duplicate keys and keys not in
  // `allowed`. A null node (key written without a value) reads as an empty map.
  bool ReadMap(const YAML::Node& node, absl::string_view path,
               std::initializer_list<absl::string_view> allowed, Fields* out) {
    out->clear();
    if (node.IsNull()) return true;
    if (!node.IsMap()) {
      Error(node, absl::StrCat(path, ": expected a mapping, got ", Describe(node)));
      return false;
    }
    for (auto it = node.begin(); it != node.end(); ++it) {
      const YAML::Node key = it->first;  // a copy: the iterator yields a temporary pair
      if (!key.IsScalar()) {
        Error(key, absl::StrCat(path, ": keys must be plain names"));
        continue;
      }
      const std::string& name = key.Scalar();
      if (std::find(allowed.begin(), allowed.end(), name) == allowed.end()) {
        std::string hint;
        for (absl::string_view candidate : allowed) {
          if (EditDistance(name, candidate) <= 2)
            hint = absl::StrCat(" (did you mean '", candidate, "'?)");
        }
        Error(key, absl::StrCat("unknown key '", name, "' in ", path, hint,
                                "; expected one of: ", absl::StrJoin(allowed, ", ")));
        continue;
      }
      if (out->count(name) > 0) {
        Error(key, absl::StrCat("duplicate key '", name, "' in ", path));
        continue;
      }
      (*out)[name] = Field{key, it->second};
    }
    return true;
  }

  static std::string Describe(const YAML::Node& node) {
    if (node.IsNull()) return "nothing (null)";
    if (node.IsSequence()) return "a list";
    if (node.IsMap()) return "a mapping";
    if (node.IsScalar()) return absl::StrCat("'", node.Scalar(), "'");
    return "an undefined value";
  }

  bool ReadString(const Field& field, absl::string_view path, std::string* out) {
    if (!field.value.IsScalar()) {
      Error(field.value.IsNull() ? field.key : field.value,
            absl::StrCat(path, ": expected a string, got ", Describe(field.value)));
      return false;
    }
    *out = field.value.Scalar();
    return true;
  }

  bool ReadInt(const Field& field, absl::string_view path, int64_t* out) {
    int64_t value = 0;
    if (!field.value.IsScalar() || !absl::SimpleAtoi(field.value.Scalar(), &value)) {
      Error(field.value.IsNull() ? field.key : field.value,
            absl::StrCat(path, ": expected an integer, got ", Describe(field.value)));
      return false;
    }
    *out = value;
    return true;
  }

  bool ReadDouble(const Field& field, absl::string_view path, double* out) {
    double value = 0;
    if (!field.value.IsScalar() || !absl::SimpleAtod(field.value.Scalar(), &value) ||
        !std::isfinite(value)) {
      Error(field.value.IsNull() ? field.key : field.value,
            absl::StrCat(path, ": expected a number, got ", Describe(field.value)));
      return false;
    }
    *out = value;
    return true;
  }

  bool ReadBool(const Field& field, absl::string_view path, bool* out) {
    if (field.value.IsScalar()) {
      std::string lower = absl::AsciiStrToLower(field.value.Scalar());
      if (lower == "true" || lower == "yes" || lower == "on") {
        *out = true;
        return true;
      }
      if (lower == "false" || lower == "no" || lower == "off") {
        *out = false;
        return true;
      }
    }
    Error(field.value.IsNull() ? field.key : field.value,
          absl::StrCat(path, ": expected true or false, got ", Describe(field.value)));
    return false;
  }

  // A list of strings; each entry's node is appended to `nodes` when non-null.
  bool ReadStringList(const Field& field, absl::string_view path, std::vector<std::string>* out,
                      std::vector<YAML::Node>* nodes = nullptr) {
    out->clear();
    if (field.value.IsNull()) return true;
    if (!field.value.IsSequence()) {
      Error(field.value,
            absl::StrCat(path, ": expected a list of strings, got ", Describe(field.value)));
      return false;
    }
    bool ok = true;
    for (size_t i = 0; i < field.value.size(); ++i) {
      const YAML::Node item = field.value[i];
      if (!item.IsScalar()) {
        Error(item, absl::StrCat(path, "[", i, "]: expected a string, got ", Describe(item)));
        ok = false;
        continue;
      }
      out->push_back(item.Scalar());
      if (nodes != nullptr) nodes->push_back(item);
    }
    return ok;
  }

  void ParseRoot(const YAML::Node& root, Policy* policy);

 private:
  void ParsePools(const Field& field, Policy* policy);
  void ParseTaskTypes(const Field& field, Policy* policy);
  void ParseRule(const YAML::Node& node, absl::string_view path, const std::string& task_name,
                 size_t index, ClassificationRule* rule);
  void ParseRoutes(const Field& field, Policy* policy);
  bool ParseRange(const Field& field, absl::string_view path, TokenRange* range);
  void ParseFallback(const Field& field, Policy* policy);
  void ParsePrecisionRequests(const Field& field, Policy* policy);
  void ParseLoadBalancing(const Field& field, Policy* policy);
  void Validate(const Fields& root, Policy* policy);

  std::string source_;
  std::vector<PolicyError> errors_;
  // Where each route's `pools` entries and `when.task_types` entries were written.
  std::map<std::string, std::vector<YAML::Node>> route_pool_nodes_;
  std::map<std::string, std::vector<YAML::Node>> route_task_nodes_;
  YAML::Node default_task_node_;
};

void Parser::ParseRoot(const YAML::Node& root, Policy* policy) {
  if (!root.IsDefined() || root.IsNull()) {
    Error(SourceLocation{source_, 1, 1}, "the policy is empty");
    return;
  }
  Fields fields;
  if (!ReadMap(root, "the policy",
               {"version", "pools", "task_types", "default_task_type", "routes", "fallback",
                "precision_requests", "load_balancing"},
               &fields)) {
    return;
  }
  if (auto it = fields.find("version"); it != fields.end()) {
    if (ReadInt(it->second, "version", &policy->version) && policy->version != 1) {
      Error(it->second.value, absl::StrCat("version: unsupported version ", policy->version,
                                           " (this gateway reads version 1)"));
    }
  }
  for (absl::string_view required : {"pools", "task_types", "default_task_type", "routes"}) {
    if (fields.count(required) == 0) {
      Error(root, absl::StrCat("missing required key '", required, "'"));
    }
  }
  if (auto it = fields.find("pools"); it != fields.end()) ParsePools(it->second, policy);
  if (auto it = fields.find("task_types"); it != fields.end()) ParseTaskTypes(it->second, policy);
  if (auto it = fields.find("default_task_type"); it != fields.end()) {
    default_task_node_ = it->second.value;
    ReadString(it->second, "default_task_type", &policy->default_task_type);
  }
  if (auto it = fields.find("routes"); it != fields.end()) ParseRoutes(it->second, policy);
  if (auto it = fields.find("fallback"); it != fields.end()) ParseFallback(it->second, policy);
  if (auto it = fields.find("precision_requests"); it != fields.end()) {
    ParsePrecisionRequests(it->second, policy);
  }
  if (auto it = fields.find("load_balancing"); it != fields.end()) {
    ParseLoadBalancing(it->second, policy);
  }
  Validate(fields, policy);
}

void Parser::ParsePools(const Field& field, Policy* policy) {
  if (!field.value.IsSequence() || field.value.size() == 0) {
    Error(field.value.IsNull() ? field.key : field.value,
          absl::StrCat("pools: expected a non-empty list of pools, got ", Describe(field.value)));
    return;
  }
  std::set<std::string> names;
  for (size_t i = 0; i < field.value.size(); ++i) {
    const YAML::Node node = field.value[i];
    std::string path = absl::StrCat("pools[", i, "]");
    Fields fields;
    if (!ReadMap(node, path,
                 {"name", "endpoints", "dns", "dns_refresh_ms", "kv_format", "precision",
                  "max_context", "quality_table", "eviction", "max_queue"},
                 &fields)) {
      continue;
    }
    PoolSpec pool;
    pool.location = Loc(node);
    if (auto it = fields.find("name"); it != fields.end()) {
      if (ReadString(it->second, path + ".name", &pool.name)) {
        if (!IsValidName(pool.name)) {
          Error(it->second.value, absl::StrCat(path, ".name: '", pool.name,
                                               "' is not a valid name (letters, digits, _ - . /)"));
        } else if (!names.insert(pool.name).second) {
          Error(it->second.value, absl::StrCat("duplicate pool name '", pool.name, "'"));
        }
        path = absl::StrCat("pool '", pool.name, "'");
      }
    } else {
      Error(node, absl::StrCat(path, ": missing required key 'name'"));
    }
    auto endpoints = fields.find("endpoints");
    auto dns = fields.find("dns");
    if (endpoints != fields.end() && dns != fields.end()) {
      Error(dns->second.key, absl::StrCat(path, ": set either 'endpoints' or 'dns', not both"));
    } else if (endpoints == fields.end() && dns == fields.end()) {
      Error(node,
            absl::StrCat(path, ": missing 'endpoints' (host:port list) or 'dns' (name:port)"));
    }
    if (endpoints != fields.end()) {
      std::vector<YAML::Node> nodes;
      if (ReadStringList(endpoints->second, path + ".endpoints", &pool.endpoints, &nodes)) {
        if (pool.endpoints.empty()) {
          Error(endpoints->second.value.IsNull() ? endpoints->second.key : endpoints->second.value,
                absl::StrCat(path, ".endpoints: the list is empty"));
        }
        std::set<std::string> seen;
        for (size_t j = 0; j < pool.endpoints.size(); ++j) {
          if (!IsValidHostPort(pool.endpoints[j])) {
            Error(nodes[j], absl::StrCat(path, ".endpoints: '", pool.endpoints[j],
                                         "' is not host:port (IPv6 as [addr]:port)"));
          } else if (!seen.insert(pool.endpoints[j]).second) {
            Error(nodes[j],
                  absl::StrCat(path, ".endpoints: duplicate endpoint '", pool.endpoints[j], "'"));
          }
        }
      }
    }
    if (dns != fields.end() && ReadString(dns->second, path + ".dns", &pool.dns) &&
        !IsValidHostPort(pool.dns)) {
      Error(dns->second.value, absl::StrCat(path, ".dns: '", pool.dns, "' is not name:port"));
    }
    if (auto it = fields.find("dns_refresh_ms"); it != fields.end()) {
      if (dns == fields.end()) {
        Error(it->second.key, absl::StrCat(path, ": dns_refresh_ms needs 'dns'"));
      } else if (ReadInt(it->second, path + ".dns_refresh_ms", &pool.dns_refresh_ms) &&
                 pool.dns_refresh_ms <= 0) {
        Error(it->second.value, absl::StrCat(path, ".dns_refresh_ms: must be > 0"));
      }
    }
    if (auto it = fields.find("kv_format"); it != fields.end()) {
      std::string written;
      if (ReadString(it->second, path + ".kv_format", &written)) {
        absl::StatusOr<std::string> canonical = CanonicalKvFormatName(written);
        if (canonical.ok()) {
          pool.kv_format = *canonical;
        } else {
          Error(it->second.value, absl::StrCat(path, ".kv_format: ", canonical.status().message()));
        }
      }
    } else {
      Error(node, absl::StrCat(path, ": missing required key 'kv_format'"));
    }
    if (auto it = fields.find("precision"); it != fields.end()) {
      std::string written;
      if (ReadString(it->second, path + ".precision", &written)) {
        if (written == "full") {
          pool.precision = PoolPrecision::kFull;
        } else if (written == "compressed") {
          pool.precision = PoolPrecision::kCompressed;
        } else {
          Error(it->second.value,
                absl::StrCat(path, ".precision: expected full or compressed, got '", written, "'"));
        }
        if (pool.precision == PoolPrecision::kFull && !pool.kv_format.empty() &&
            pool.kv_format != "fp16" && pool.kv_format != "bf16") {
          Error(it->second.value,
                absl::StrCat(path, ": precision full needs kv_format fp16 or bf16, not '",
                             pool.kv_format, "'"));
        }
      }
    } else {
      Error(node, absl::StrCat(path, ": missing required key 'precision' (full or compressed)"));
    }
    if (auto it = fields.find("max_context"); it != fields.end()) {
      if (ReadInt(it->second, path + ".max_context", &pool.max_context) && pool.max_context <= 0) {
        Error(it->second.value,
              absl::StrCat(path, ".max_context: must be > 0, got ", pool.max_context));
      }
    } else {
      Error(node, absl::StrCat(path, ": missing required key 'max_context'"));
    }
    if (auto it = fields.find("quality_table"); it != fields.end()) {
      if (ReadString(it->second, path + ".quality_table", &pool.quality_table)) {
        if (pool.quality_table.empty()) {
          Error(it->second.value, absl::StrCat(path, ".quality_table: empty path"));
        } else {
          std::string file = pool.quality_table;
          const auto slash = source_.rfind('/');
          if (file[0] != '/' && slash != std::string::npos) {
            file = source_.substr(0, slash + 1) + file;
          }
          auto table = LoadQualityTable(file);
          if (table.ok()) {
            pool.quality = *std::move(table);
          } else {
            Error(it->second.value, absl::StrCat(path, ".quality_table: ", table.status().message()));
          }
        }
      }
    }
    if (auto it = fields.find("eviction"); it != fields.end()) {
      if (ReadString(it->second, path + ".eviction", &pool.eviction)) {
        absl::Status valid = ValidateEvictionName(pool.eviction);
        if (!valid.ok()) {
          Error(it->second.value, absl::StrCat(path, ".eviction: ", valid.message()));
        } else if (pool.precision == PoolPrecision::kFull &&
                   absl::AsciiStrToLower(pool.eviction) != "none") {
          Error(it->second.value,
                absl::StrCat(path, ": a full-precision pool cannot evict KV ('", pool.eviction,
                             "'); declare it precision: compressed"));
        }
      }
    }
    if (auto it = fields.find("max_queue"); it != fields.end()) {
      int64_t max_queue = 0;
      if (ReadInt(it->second, path + ".max_queue", &max_queue)) {
        if (max_queue < 0) {
          Error(it->second.value, absl::StrCat(path, ".max_queue: must be >= 0"));
        }
        pool.max_queue = max_queue;
      }
    }
    policy->pools.push_back(std::move(pool));
  }
}

void Parser::ParseTaskTypes(const Field& field, Policy* policy) {
  if (!field.value.IsSequence() || field.value.size() == 0) {
    Error(field.value.IsNull() ? field.key : field.value,
          absl::StrCat("task_types: expected a non-empty list of task types, got ",
                       Describe(field.value)));
    return;
  }
  std::set<std::string> names;
  std::map<std::string, SourceLocation> rule_names;
  for (size_t i = 0; i < field.value.size(); ++i) {
    const YAML::Node node = field.value[i];
    std::string path = absl::StrCat("task_types[", i, "]");
    Fields fields;
    if (!ReadMap(node, path, {"name", "description", "rules"}, &fields)) continue;
    TaskTypeSpec task;
    task.location = Loc(node);
    if (auto it = fields.find("name"); it != fields.end()) {
      if (ReadString(it->second, path + ".name", &task.name)) {
        if (!IsValidName(task.name)) {
          Error(it->second.value, absl::StrCat(path, ".name: '", task.name,
                                               "' is not a valid name (letters, digits, _ - . /)"));
        } else if (!names.insert(task.name).second) {
          Error(it->second.value, absl::StrCat("duplicate task type name '", task.name, "'"));
        }
        path = absl::StrCat("task type '", task.name, "'");
      }
    } else {
      Error(node, absl::StrCat(path, ": missing required key 'name'"));
    }
    if (auto it = fields.find("description"); it != fields.end()) {
      ReadString(it->second, path + ".description", &task.description);
    }
    if (auto it = fields.find("rules"); it != fields.end()) {
      const YAML::Node rules = it->second.value;
      if (!rules.IsNull() && !rules.IsSequence()) {
        Error(rules, absl::StrCat(path, ".rules: expected a list of rules, got ", Describe(rules)));
      } else if (rules.IsSequence()) {
        for (size_t r = 0; r < rules.size(); ++r) {
          ClassificationRule rule;
          ParseRule(rules[r], absl::StrCat(path, ".rules[", r, "]"), task.name, r, &rule);
          auto [where, inserted] = rule_names.emplace(rule.name, rule.location);
          if (!inserted) {
            Error(rule.location, absl::StrCat("duplicate rule name '", rule.name, "' (first at ",
                                              where->second.ToString(), ")"));
          }
          task.rules.push_back(std::move(rule));
        }
      }
    }
    policy->task_types.push_back(std::move(task));
  }
}

void Parser::ParseRule(const YAML::Node& node, absl::string_view path, const std::string& task_name,
                       size_t index, ClassificationRule* rule) {
  rule->location = Loc(node);
  rule->name = absl::StrCat(task_name, ".", index + 1);
  const size_t errors_before = errors_.size();
  Fields fields;
  if (!ReadMap(node, path, {"name", "keywords", "regex", "metadata", "tenants"}, &fields)) return;
  if (auto it = fields.find("name"); it != fields.end()) {
    if (ReadString(it->second, absl::StrCat(path, ".name"), &rule->name) &&
        !IsValidName(rule->name)) {
      Error(it->second.value, absl::StrCat(path, ".name: '", rule->name,
                                           "' is not a valid name (letters, digits, _ - . /)"));
    }
  }
  bool has_criterion = false;
  if (auto it = fields.find("keywords"); it != fields.end()) {
    std::vector<YAML::Node> nodes;
    if (ReadStringList(it->second, absl::StrCat(path, ".keywords"), &rule->keywords, &nodes)) {
      bool ok = true;
      for (size_t k = 0; k < rule->keywords.size(); ++k) {
        if (absl::StripAsciiWhitespace(rule->keywords[k]).empty()) {
          Error(nodes[k], absl::StrCat(path, ".keywords[", k, "]: empty keyword"));
          ok = false;
        }
      }
      if (ok && !rule->keywords.empty()) {
        absl::StatusOr<std::shared_ptr<const TextPattern>> pattern =
            TextPattern::ForKeywords(rule->keywords);
        if (pattern.ok()) {
          rule->keyword_pattern = *pattern;
        } else {
          Error(it->second.value, absl::StrCat(path, ".keywords: ", pattern.status().message()));
        }
      }
      has_criterion = has_criterion || !rule->keywords.empty();
    }
  }
  if (auto it = fields.find("regex"); it != fields.end()) {
    std::vector<YAML::Node> nodes;
    // A single regex may be written as a string instead of a one-entry list.
    if (it->second.value.IsScalar()) {
      rule->regexes = {it->second.value.Scalar()};
      nodes = {it->second.value};
    } else {
      ReadStringList(it->second, absl::StrCat(path, ".regex"), &rule->regexes, &nodes);
    }
    for (size_t k = 0; k < rule->regexes.size(); ++k) {
      PatternError error;
      absl::StatusOr<std::shared_ptr<const TextPattern>> pattern =
          TextPattern::FromRegex(rule->regexes[k], &error);
      if (pattern.ok()) {
        rule->regex_patterns.push_back(*pattern);
      } else {
        Error(nodes[k], absl::StrCat(path, ".regex: invalid regex '", rule->regexes[k],
                                     "': ", error.message, " at offset ", error.offset));
      }
    }
    has_criterion = has_criterion || !rule->regexes.empty();
  }
  if (auto it = fields.find("metadata"); it != fields.end()) {
    const YAML::Node metadata = it->second.value;
    if (!metadata.IsMap()) {
      Error(metadata.IsNull() ? it->second.key : metadata,
            absl::StrCat(path, ".metadata: expected a mapping of key: value, got ",
                         Describe(metadata)));
    } else {
      std::set<std::string> keys;
      for (auto m = metadata.begin(); m != metadata.end(); ++m) {
        if (!m->first.IsScalar() || !m->second.IsScalar()) {
          Error(m->first, absl::StrCat(path, ".metadata: keys and values must be strings"));
          continue;
        }
        if (!keys.insert(m->first.Scalar()).second) {
          Error(m->first, absl::StrCat(path, ".metadata: duplicate key '", m->first.Scalar(), "'"));
          continue;
        }
        rule->metadata.emplace_back(m->first.Scalar(), m->second.Scalar());
      }
      has_criterion = has_criterion || !rule->metadata.empty();
    }
  }
  if (auto it = fields.find("tenants"); it != fields.end()) {
    ReadStringList(it->second, absl::StrCat(path, ".tenants"), &rule->tenants);
    has_criterion = has_criterion || !rule->tenants.empty();
  }
  if (!has_criterion && errors_.size() == errors_before) {
    Error(node, absl::StrCat(path,
                             ": a rule needs at least one of keywords, regex, metadata, "
                             "tenants"));
  }
}

bool Parser::ParseRange(const Field& field, absl::string_view path, TokenRange* range) {
  Fields fields;
  if (!ReadMap(field.value, path, {"min", "max"}, &fields)) return false;
  bool ok = true;
  for (auto [name, bound] : {std::pair{"min", &range->min}, std::pair{"max", &range->max}}) {
    if (auto it = fields.find(name); it != fields.end()) {
      int64_t value = 0;
      if (!ReadInt(it->second, absl::StrCat(path, ".", name), &value)) {
        ok = false;
      } else if (value < 0) {
        Error(it->second.value, absl::StrCat(path, ".", name, ": must be >= 0, got ", value));
        ok = false;
      } else {
        *bound = value;
      }
    }
  }
  if (!range->IsSet() && ok) {
    Error(field.value.IsNull() ? field.key : field.value,
          absl::StrCat(path, ": give min, max or both"));
    return false;
  }
  if (range->min && range->max && *range->min > *range->max) {
    Error(field.value,
          absl::StrCat(path, ": min ", *range->min, " is greater than max ", *range->max));
    return false;
  }
  return ok;
}

void Parser::ParseRoutes(const Field& field, Policy* policy) {
  if (!field.value.IsSequence() || field.value.size() == 0) {
    Error(field.value.IsNull() ? field.key : field.value,
          absl::StrCat("routes: expected a non-empty list of routes, got ", Describe(field.value)));
    return;
  }
  std::set<std::string> names;
  for (size_t i = 0; i < field.value.size(); ++i) {
    const YAML::Node node = field.value[i];
    std::string path = absl::StrCat("routes[", i, "]");
    Fields fields;
    if (!ReadMap(node, path, {"name", "when", "pools", "reason", "quality"}, &fields)) continue;
    RouteSpec route;
    route.location = Loc(node);
    if (auto it = fields.find("name"); it != fields.end()) {
      if (ReadString(it->second, path + ".name", &route.name)) {
        if (!IsValidName(route.name)) {
          Error(it->second.value, absl::StrCat(path, ".name: '", route.name,
                                               "' is not a valid name (letters, digits, _ - . /)"));
        } else if (!names.insert(route.name).second) {
          Error(it->second.value, absl::StrCat("duplicate route name '", route.name, "'"));
        }
        path = absl::StrCat("route '", route.name, "'");
      }
    } else {
      Error(node, absl::StrCat(path, ": missing required key 'name'"));
      route.name = path;
    }
    if (auto it = fields.find("when"); it != fields.end()) {
      Fields when;
      std::string when_path = path + ".when";
      if (ReadMap(it->second.value, when_path,
                  {"task_types", "prompt_tokens", "total_tokens", "tenants", "precision"}, &when)) {
        if (auto w = when.find("task_types"); w != when.end()) {
          ReadStringList(w->second, when_path + ".task_types", &route.when.task_types,
                         &route_task_nodes_[route.name]);
          if (route.when.task_types.empty()) {
            Error(w->second.key, absl::StrCat(when_path, ".task_types: the list is empty"));
          }
        }
        if (auto w = when.find("prompt_tokens"); w != when.end()) {
          ParseRange(w->second, when_path + ".prompt_tokens", &route.when.prompt_tokens);
        }
        if (auto w = when.find("total_tokens"); w != when.end()) {
          ParseRange(w->second, when_path + ".total_tokens", &route.when.total_tokens);
        }
        if (auto w = when.find("tenants"); w != when.end()) {
          ReadStringList(w->second, when_path + ".tenants", &route.when.tenants);
          if (route.when.tenants.empty()) {
            Error(w->second.key, absl::StrCat(when_path, ".tenants: the list is empty"));
          }
        }
        if (auto w = when.find("precision"); w != when.end()) {
          std::string written;
          if (ReadString(w->second, when_path + ".precision", &written)) {
            if (written == "any") {
              route.when.precision = PrecisionCondition::kAny;
            } else if (written == "full") {
              route.when.precision = PrecisionCondition::kFull;
            } else if (written == "compressed") {
              route.when.precision = PrecisionCondition::kCompressed;
            } else if (written == "unspecified") {
              route.when.precision = PrecisionCondition::kUnspecified;
            } else {
              Error(w->second.value,
                    absl::StrCat(when_path,
                                 ".precision: expected full, compressed, unspecified "
                                 "or any, got '",
                                 written, "'"));
            }
          }
        }
      }
    }
    if (auto it = fields.find("pools"); it != fields.end()) {
      std::vector<YAML::Node>& nodes = route_pool_nodes_[route.name];
      nodes.clear();
      if (ReadStringList(it->second, path + ".pools", &route.pools, &nodes) &&
          route.pools.empty()) {
        Error(it->second.value.IsNull() ? it->second.key : it->second.value,
              absl::StrCat(path,
                           ".pools: the list is empty (give the primary pool, then "
                           "fallbacks)"));
      }
      std::set<std::string> seen;
      for (size_t p = 0; p < route.pools.size(); ++p) {
        if (!seen.insert(route.pools[p]).second) {
          Error(nodes[p], absl::StrCat(path, ".pools: pool '", route.pools[p], "' listed twice"));
        }
      }
    } else {
      Error(node, absl::StrCat(path, ": missing required key 'pools'"));
    }
    if (auto it = fields.find("reason"); it != fields.end()) {
      ReadString(it->second, path + ".reason", &route.reason);
    }
    if (auto it = fields.find("quality"); it != fields.end()) {
      Fields q;
      const std::string qpath = path + ".quality";
      if (ReadMap(it->second.value, qpath,
                  {"max_ppl_ratio", "max_kl", "min_top1", "min_retrieval"}, &q)) {
        QualityTolerance tolerance;
        for (auto [key, slot] : {std::pair{"max_ppl_ratio", &tolerance.max_ppl_ratio},
                                 std::pair{"max_kl", &tolerance.max_kl},
                                 std::pair{"min_top1", &tolerance.min_top1},
                                 std::pair{"min_retrieval", &tolerance.min_retrieval}}) {
          auto f = q.find(key);
          if (f == q.end()) continue;
          double value = 0;
          if (ReadDouble(f->second, absl::StrCat(qpath, ".", key), &value)) {
            if (value < 0) {
              Error(f->second.value, absl::StrCat(qpath, ".", key, ": must be >= 0"));
            }
            *slot = value;
          }
        }
        if (!tolerance.IsSet()) {
          Error(it->second.key, absl::StrCat(qpath, ": give at least one of max_ppl_ratio, max_kl, "
                                             "min_top1, min_retrieval"));
        }
        route.quality = tolerance;
      }
    }
    policy->routes.push_back(std::move(route));
  }
}

void Parser::ParseFallback(const Field& field, Policy* policy) {
  Fields fields;
  if (!ReadMap(field.value, "fallback",
               {"no_healthy_endpoint", "pool_full", "context_too_long", "failed_before_first_token",
                "format_mismatch", "max_attempts"},
               &fields)) {
    return;
  }
  FallbackSpec& spec = policy->fallback;
  for (auto [name, flag] : {std::pair{"no_healthy_endpoint", &spec.no_healthy_endpoint},
                            std::pair{"pool_full", &spec.pool_full},
                            std::pair{"context_too_long", &spec.context_too_long},
                            std::pair{"failed_before_first_token", &spec.failed_before_first_token},
                            std::pair{"format_mismatch", &spec.format_mismatch}}) {
    if (auto it = fields.find(name); it != fields.end()) {
      ReadBool(it->second, absl::StrCat("fallback.", name), flag);
    }
  }
  if (auto it = fields.find("max_attempts"); it != fields.end()) {
    if (ReadInt(it->second, "fallback.max_attempts", &spec.max_attempts) && spec.max_attempts < 1) {
      Error(it->second.value,
            absl::StrCat("fallback.max_attempts: must be >= 1, got ", spec.max_attempts));
    }
  }
}

void Parser::ParsePrecisionRequests(const Field& field, Policy* policy) {
  Fields fields;
  if (!ReadMap(field.value, "precision_requests", {"honour_full"}, &fields)) return;
  if (auto it = fields.find("honour_full"); it != fields.end()) {
    ReadBool(it->second, "precision_requests.honour_full", &policy->precision_requests.honour_full);
  }
}

void Parser::ParseLoadBalancing(const Field& field, Policy* policy) {
  Fields fields;
  if (!ReadMap(field.value, "load_balancing",
               {"max_queue", "eject_after_failures", "ejection_base_ms", "ejection_max_ms"},
               &fields)) {
    return;
  }
  LoadBalancingSpec& spec = policy->load_balancing;
  for (auto [name, value, minimum] :
       {std::tuple{"max_queue", &spec.max_queue, int64_t{0}},
        std::tuple{"eject_after_failures", &spec.eject_after_failures, int64_t{1}},
        std::tuple{"ejection_base_ms", &spec.ejection_base_ms, int64_t{1}},
        std::tuple{"ejection_max_ms", &spec.ejection_max_ms, int64_t{1}}}) {
    if (auto it = fields.find(name); it != fields.end()) {
      if (ReadInt(it->second, absl::StrCat("load_balancing.", name), value) && *value < minimum) {
        Error(it->second.value,
              absl::StrCat("load_balancing.", name, ": must be >= ", minimum, ", got ", *value));
      }
    }
  }
  if (spec.ejection_max_ms < spec.ejection_base_ms) {
    Error(field.value, absl::StrCat("load_balancing: ejection_max_ms ", spec.ejection_max_ms,
                                    " is below ejection_base_ms ", spec.ejection_base_ms));
  }
}

void Parser::Validate(const Fields& root, Policy* policy) {
  // Task type references.
  if (!policy->default_task_type.empty() && !policy->task_types.empty() &&
      policy->FindTaskType(policy->default_task_type) == nullptr) {
    Error(default_task_node_,
          absl::StrCat("default_task_type: unknown task type '", policy->default_task_type, "'"));
  }
  bool have_pools = !policy->pools.empty();
  for (const RouteSpec& route : policy->routes) {
    const std::vector<YAML::Node>& task_nodes = route_task_nodes_[route.name];
    for (size_t i = 0; i < route.when.task_types.size() && !policy->task_types.empty(); ++i) {
      if (policy->FindTaskType(route.when.task_types[i]) == nullptr) {
        Error(i < task_nodes.size() ? Loc(task_nodes[i]) : route.location,
              absl::StrCat("route '", route.name, "': unknown task type '",
                           route.when.task_types[i], "'"));
      }
    }
    const std::vector<YAML::Node>& pool_nodes = route_pool_nodes_[route.name];
    for (size_t i = 0; i < route.pools.size() && have_pools; ++i) {
      if (policy->FindPool(route.pools[i]) == nullptr) {
        Error(i < pool_nodes.size() ? Loc(pool_nodes[i]) : route.location,
              absl::StrCat("route '", route.name, "': unknown pool '", route.pools[i], "'"));
      }
    }
  }
  // Catch-all: the last route must match everything, and no earlier route may.
  if (!policy->routes.empty()) {
    for (size_t i = 0; i + 1 < policy->routes.size(); ++i) {
      const RouteSpec& route = policy->routes[i];
      if (route.when.IsCatchAll()) {
        Error(route.location,
              absl::StrCat("route '", route.name, "' has no conditions, so the ",
                           policy->routes.size() - i - 1,
                           " route(s) after it can never match; only the last route may be a "
                           "catch-all"));
      }
    }
    const RouteSpec& last = policy->routes.back();
    if (!last.when.IsCatchAll()) {
      Error(last.location,
            absl::StrCat("the last route '", last.name,
                         "' has conditions; the last route must be a catch-all (no 'when') so "
                         "that every request has a route"));
    }
  }
  if (policy->precision_requests.honour_full && have_pools) {
    bool any_full = std::any_of(policy->pools.begin(), policy->pools.end(), [](const PoolSpec& p) {
      return p.precision == PoolPrecision::kFull;
    });
    if (!any_full) {
      auto it = root.find("precision_requests");
      Error(it != root.end() ? Loc(it->second.key) : SourceLocation{source_, 1, 1},
            "precision_requests.honour_full is true but no pool has precision: full (set "
            "honour_full: false or add a full-precision pool)");
    }
  }
}

}  // namespace

PolicyParseResult ParsePolicyText(std::string_view text, std::string_view source_in) {
  const absl::string_view source = AsAbsl(source_in);
  PolicyParseResult result;
  result.content_hash = Fnv1a64Hex(text);
  auto policy = std::make_shared<Policy>();
  policy->source = std::string(source);
  policy->hash = result.content_hash;
  Parser parser(source);
  try {
    YAML::Node root = YAML::Load(std::string(text));
    parser.ParseRoot(root, policy.get());
    result.errors = parser.TakeErrors();
  } catch (const YAML::Exception& e) {
    result.errors = parser.TakeErrors();
    SourceLocation loc{std::string(source), 0, 0};
    if (!e.mark.is_null()) {
      loc.line = e.mark.line + 1;
      loc.column = e.mark.column + 1;
    }
    result.errors.push_back(PolicyError{loc, absl::StrCat("YAML syntax error: ", e.msg)});
  } catch (const std::exception& e) {
    result.errors = parser.TakeErrors();
    result.errors.push_back(PolicyError{SourceLocation{std::string(source), 0, 0},
                                        absl::StrCat("cannot parse: ", e.what())});
  }
  if (result.errors.empty()) result.policy = std::move(policy);
  return result;
}

PolicyParseResult ParsePolicyFile(const std::string& path) {
  absl::StatusOr<std::string> bytes = ReadFileBytes(path, kMaxPolicyFileBytes);
  if (!bytes.ok()) {
    PolicyParseResult result;
    result.errors.push_back(
        PolicyError{SourceLocation{path, 0, 0}, std::string(bytes.status().message())});
    return result;
  }
  return ParsePolicyText(*bytes, path);
}

namespace {
absl::StatusOr<std::shared_ptr<const Policy>> ToStatusOr(PolicyParseResult result) {
  if (result.policy != nullptr) return result.policy;
  std::vector<std::string> lines;
  for (const PolicyError& error : result.errors) lines.push_back(error.ToString());
  return absl::InvalidArgumentError(absl::StrJoin(lines, "\n"));
}
}  // namespace

absl::StatusOr<std::shared_ptr<const Policy>> LoadPolicyText(std::string_view text,
                                                             std::string_view source) {
  return ToStatusOr(ParsePolicyText(text, source));
}

absl::StatusOr<std::shared_ptr<const Policy>> LoadPolicyFile(const std::string& path) {
  return ToStatusOr(ParsePolicyFile(path));
}

}  // namespace kvgate::gateway
