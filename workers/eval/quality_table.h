// Quality table: the measured quality of KV settings on one model, as `kvgate eval` writes it and
// the gateway's policy reads it (YAML; schema in docs/QUALITY.md).
//
//   formats:
//     tq3.5:                       # setting name: format, or format+eviction
//       1024: {ppl_ratio: 1.004, kl: 0.0021, top1: 0.985, retrieval: 0.92, ...}
//
//   ASSIGN_OR_RETURN(QualityTable t, LoadQualityTable("models/reference/quality.yaml"));
//   const QualityEntry* e = t.Find("tq3.5", 1024);   // nullptr if not measured
//   t.Put(entry); RETURN_IF_ERROR(SaveQualityTable(t, path));
#pragma once

#include <map>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "workers/eval/quality_eval.h"

namespace kvgate::eval {

struct QualityTable {
  std::string model;  // model folder as given to `kvgate eval`
  // Free-form provenance: date, machine, command, options (written as given, in key order).
  std::map<std::string, std::string> meta;
  // Entries in insertion order of settings; contexts ascending within a setting.
  std::vector<std::string> settings;
  std::map<std::string, std::map<int, QualityEntry>> entries;

  const QualityEntry* Find(const std::string& setting, int context) const;
  void Put(const QualityEntry& entry);
};

// NotFoundError if the file does not exist; InvalidArgumentError (with line:col) if it is not a
// quality table.
absl::StatusOr<QualityTable> LoadQualityTable(const std::string& path);
std::string QualityTableToYaml(const QualityTable& table);
// Writes atomically (temporary file + rename), so an interrupted run keeps the previous table.
absl::Status SaveQualityTable(const QualityTable& table, const std::string& path);

}  // namespace kvgate::eval
