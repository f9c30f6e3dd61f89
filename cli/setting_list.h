// Splits a comma-separated list of KV settings whose entries carry their own comma-separated
// parameters: "fp16,tq:k=4,v=3,qjl,fp16+h2o:heavy=0.1,recent=0.1" ->
// fp16 | tq:k=4,v=3,qjl | fp16+h2o:heavy=0.1,recent=0.1. A piece continues the previous entry when
// that entry has parameters (contains ':') and the piece is a bare parameter: "key=value" whose
// key is a lower-case word, or the flag "qjl". Everything else ("tq4/fp16=1:1", "sink:sinks=4",
// "kivi2") starts a new entry. Used by `kvgate
// eval` (--formats, --evict) and `kvgate bench engine` (--formats).
#pragma once

#include <string>
#include <string_view>
#include <vector>

namespace kvgate::cli {

inline std::vector<std::string> SplitSettingList(std::string_view text) {
  std::vector<std::string> out;
  size_t begin = 0;
  while (begin <= text.size()) {
    size_t end = text.find(',', begin);
    if (end == std::string_view::npos) end = text.size();
    const std::string_view piece = text.substr(begin, end - begin);
    begin = end + 1;
    if (piece.empty()) continue;
    const size_t eq = piece.find('=');
    const bool parameter =
        piece == "qjl" || (eq != std::string_view::npos && eq > 0 &&
                           piece.substr(0, eq).find_first_not_of("abcdefghijklmnopqrstuvwxyz_") ==
                               std::string_view::npos);
    if (parameter && !out.empty() && out.back().find(':') != std::string::npos) {
      out.back().append(",").append(piece);
    } else {
      out.emplace_back(piece);
    }
  }
  return out;
}

}  // namespace kvgate::cli
