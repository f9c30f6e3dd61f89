#include "workers/eval/quality_table.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <string>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "yaml-cpp/yaml.h"

namespace kvgate::eval {
namespace {


// YAML's spelling of NaN (an interval that one window or probe cannot give) is ".nan".
std::string Num(double v) { return std::isnan(v) ? ".nan" : absl::StrFormat("%.6g", v); }

absl::Status Bad(const YAML::Node& node, const std::string& what) {
  const auto mark = node.Mark();
  return absl::InvalidArgumentError(
      absl::StrCat("quality table ", mark.line + 1, ":", mark.column + 1, ": ", what));
}

}  // namespace

const QualityEntry* QualityTable::Find(const std::string& setting, int context) const {
  auto it = entries.find(setting);
  if (it == entries.end()) return nullptr;
  auto jt = it->second.find(context);
  return jt == it->second.end() ? nullptr : &jt->second;
}

void QualityTable::Put(const QualityEntry& entry) {
  if (!entries.count(entry.setting)) settings.push_back(entry.setting);
  entries[entry.setting][entry.context] = entry;
}

std::string QualityTableToYaml(const QualityTable& table) {
  std::string out = "# KV-cache quality table written by `kvgate eval` (schema: docs/QUALITY.md).\n";
  absl::StrAppend(&out, "model: \"", table.model, "\"\n");
  if (!table.meta.empty()) {
    out += "meta:\n";
    for (const auto& [k, v] : table.meta) {
      YAML::Emitter e;
      e << YAML::DoubleQuoted << v;
      absl::StrAppend(&out, "  ", k, ": ", e.c_str(), "\n");
    }
  }
  out += "formats:\n";
  for (const auto& name : table.settings) {
    absl::StrAppend(&out, "  \"", name, "\":\n");
    for (const auto& [ctx, e] : table.entries.at(name)) {
      absl::StrAppend(&out, "    ", ctx, ": {ppl_ratio: ", Num(e.ppl_ratio),
                      ", ppl_ratio_ci95: ", Num(e.ppl_ratio_ci95), ", kl: ", Num(e.kl),
                      ", top1: ", Num(e.top1), ", retrieval: ", Num(e.retrieval),
                      ", retrieval_fp16: ", Num(e.retrieval_fp16),
                      ", retrieval_ci95: ", Num(e.retrieval_ci95),
                      ", retrieval_exact: ", Num(e.retrieval_exact),
                      ", retrieval_p: ", Num(e.retrieval_p), ", ppl: ", Num(e.ppl),
                      ", ppl_fp16: ", Num(e.ppl_fp16), ", scored_tokens: ", e.scored_tokens,
                      ", windows: ", e.windows, ", probes: ", e.probes,
                      ", seconds: ", absl::StrFormat("%.1f", e.seconds), "}\n");
    }
  }
  return out;
}

absl::StatusOr<QualityTable> LoadQualityTable(const std::string& path) {
  std::error_code ec;
  if (!std::filesystem::exists(path, ec)) {
    return absl::NotFoundError(absl::StrCat("no quality table at ", path));
  }
  YAML::Node root;
  try {
    root = YAML::LoadFile(path);
  } catch (const YAML::Exception& e) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": ", e.what()));
  }
  QualityTable table;
  try {
    if (!root.IsMap()) return Bad(root, "top level must be a map");
    if (root["model"]) table.model = root["model"].as<std::string>();
    if (const YAML::Node meta = root["meta"]) {
      if (!meta.IsMap()) return Bad(meta, "'meta' must be a map");
      for (const auto& kv : meta) table.meta[kv.first.as<std::string>()] = kv.second.as<std::string>();
    }
    const YAML::Node formats = root["formats"];
    if (!formats) return table;
    if (!formats.IsMap()) return Bad(formats, "'formats' must be a map");
    for (const auto& f : formats) {
      const std::string name = f.first.as<std::string>();
      if (!f.second.IsMap()) return Bad(f.second, "a format must map context lengths to entries");
      for (const auto& c : f.second) {
        QualityEntry e;
        e.setting = name;
        e.context = c.first.as<int>();
        const YAML::Node v = c.second;
        if (!v.IsMap()) return Bad(v, "an entry must be a map");
        for (const char* key : {"ppl_ratio", "kl", "top1", "retrieval"}) {
          if (!v[key]) return Bad(v, absl::StrCat("entry lacks '", key, "'"));
        }
        e.ppl_ratio = v["ppl_ratio"].as<double>();
        e.kl = v["kl"].as<double>();
        e.top1 = v["top1"].as<double>();
        e.retrieval = v["retrieval"].as<double>();
        // Tables written before the intervals existed lack them: unknown, not zero.
        e.ppl_ratio_ci95 = v["ppl_ratio_ci95"].as<double>(std::nan(""));
        e.retrieval_fp16 = v["retrieval_fp16"].as<double>(std::nan(""));
        e.retrieval_ci95 = v["retrieval_ci95"].as<double>(std::nan(""));
        e.retrieval_exact = v["retrieval_exact"].as<double>(0);
        e.retrieval_p = v["retrieval_p"].as<double>(0);
        e.ppl = v["ppl"].as<double>(0);
        e.ppl_fp16 = v["ppl_fp16"].as<double>(0);
        e.scored_tokens = v["scored_tokens"].as<int64_t>(0);
        e.windows = v["windows"].as<int>(0);
        e.probes = v["probes"].as<int>(0);
        e.seconds = v["seconds"].as<double>(0);
        table.Put(e);
      }
    }
  } catch (const YAML::Exception& e) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": ", e.what()));
  }
  return table;
}

absl::Status SaveQualityTable(const QualityTable& table, const std::string& path) {
  const std::string tmp = path + ".tmp";
  {
    std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
    if (!out) return absl::PermissionDeniedError(absl::StrCat("cannot write ", tmp));
    out << QualityTableToYaml(table);
    if (!out) return absl::DataLossError(absl::StrCat("write failed: ", tmp));
  }
  std::error_code ec;
  std::filesystem::rename(tmp, path, ec);
  if (ec) return absl::PermissionDeniedError(absl::StrCat("rename to ", path, ": ", ec.message()));
  return absl::OkStatus();
}

}  // namespace kvgate::eval
