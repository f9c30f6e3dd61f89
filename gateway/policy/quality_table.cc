#include "gateway/policy/quality_table.h"

#include <yaml-cpp/yaml.h>

#include <vector>

#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "gateway/policy/kv_format_name.h"

namespace kvgate::gateway {
namespace {

std::string Where(const std::string& path, const YAML::Node& node) {
  const YAML::Mark mark = node.Mark();
  if (mark.line < 0) return path;
  return absl::StrCat(path, ":", mark.line + 1, ":", mark.column + 1);
}

std::string Key(const std::string& format, const std::string& eviction) {
  return absl::StrCat(format, "|", eviction.empty() ? "none" : eviction);
}

}  // namespace

const QualityMetrics* QualityTable::Find(const std::string& format, const std::string& eviction,
                                         int64_t context, int64_t* measured_context) const {
  auto it = entries.find(Key(format, absl::AsciiStrToLower(eviction)));
  if (it == entries.end() || it->second.empty()) return nullptr;
  auto row = it->second.lower_bound(context);
  if (row == it->second.end()) row = std::prev(it->second.end());
  if (measured_context != nullptr) *measured_context = row->first;
  return &row->second;
}

std::string CheckTolerance(const QualityMetrics& m, const QualityTolerance& t,
                           std::string* explanation) {
  std::vector<std::string> checks;
  std::string failure;
  auto check = [&](const char* name, double value, std::optional<double> bound, bool is_max) {
    if (!bound) return;
    if (std::isnan(value)) {
      checks.push_back(absl::StrCat(name, " not measured"));
      if (failure.empty()) failure = absl::StrCat(name, " not measured");
      return;
    }
    const bool ok = is_max ? value <= *bound : value >= *bound;
    std::string text = absl::StrFormat("%s %.4g %s %.4g", name, value,
                                       ok ? (is_max ? "<=" : ">=") : (is_max ? ">" : "<"), *bound);
    checks.push_back(text);
    if (!ok && failure.empty()) failure = text;
  };
  check("ppl_ratio", m.ppl_ratio, t.max_ppl_ratio, true);
  check("kl", m.kl, t.max_kl, true);
  check("top1", m.top1, t.min_top1, false);
  check("retrieval", m.retrieval, t.min_retrieval, false);
  if (explanation != nullptr) *explanation = absl::StrJoin(checks, ", ");
  return failure;
}

absl::StatusOr<std::shared_ptr<const QualityTable>> LoadQualityTable(const std::string& path) {
  YAML::Node root;
  try {
    root = YAML::LoadFile(path);
  } catch (const YAML::BadFile&) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": cannot read the quality table"));
  } catch (const YAML::ParserException& e) {
    return absl::InvalidArgumentError(absl::StrCat(path, ":", e.mark.line + 1, ":",
                                                   e.mark.column + 1, ": ", e.msg));
  }
  auto table = std::make_shared<QualityTable>();
  table->source = path;
  if (!root.IsMap()) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": expected a map with 'formats'"));
  }
  try {
    if (root["model"] && root["model"].IsScalar()) table->model = root["model"].Scalar();
    const YAML::Node formats = root["formats"];
    if (!formats || !formats.IsMap()) {
      return absl::InvalidArgumentError(absl::StrCat(
          Where(path, root), ": 'formats' must map each setting to its measurements by context"));
    }
    for (const auto& setting : formats) {
      // "FORMAT" or "FORMAT+EVICTION", as `kvgate eval` names settings.
      const std::string name = setting.first.Scalar();
      const auto plus = name.find('+');
      auto format = CanonicalKvFormatName(name.substr(0, plus));
      if (!format.ok()) {
        return absl::InvalidArgumentError(
            absl::StrCat(Where(path, setting.first), ": ", format.status().message()));
      }
      const std::string eviction =
          plus == std::string::npos ? "none" : absl::AsciiStrToLower(name.substr(plus + 1));
      if (!setting.second.IsMap()) {
        return absl::InvalidArgumentError(absl::StrCat(
            Where(path, setting.second), ": expected context lengths mapped to measurements"));
      }
      for (const auto& row : setting.second) {
        const int64_t context = row.first.as<int64_t>();
        if (context <= 0 || !row.second.IsMap()) {
          return absl::InvalidArgumentError(absl::StrCat(
              Where(path, row.first), ": expected a positive context length and its metrics"));
        }
        QualityMetrics m;
        auto read = [&](const char* key, double* out) {
          if (row.second[key] && !row.second[key].IsNull()) *out = row.second[key].as<double>();
        };
        read("ppl_ratio", &m.ppl_ratio);
        read("kl", &m.kl);
        read("top1", &m.top1);
        read("retrieval", &m.retrieval);
        table->entries[Key(*format, eviction)][context] = m;
      }
    }
  } catch (const YAML::Exception& e) {
    return absl::InvalidArgumentError(absl::StrCat(path, ":", e.mark.line + 1, ":",
                                                   e.mark.column + 1, ": ", e.msg));
  }
  return std::shared_ptr<const QualityTable>(std::move(table));
}

}  // namespace kvgate::gateway
