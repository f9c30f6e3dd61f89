#include "gateway/policy/kv_format_name.h"

#include <cstdio>

#include <cmath>

#include "absl/strings/ascii.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "gateway/internal/absl_string_view.h"

namespace kvgate::gateway {
namespace {

constexpr absl::string_view kAcceptedNames =
    "fp16, bf16, fp8, int8, kivi2, kivi4, tq4, tq3.5, tq3, tq2.5, tq:k=K,v=V[,qjl]";

// Bits for a TurboQuant component: 1..8 in steps of 0.5, printed without trailing zeros.
bool ParseBits(absl::string_view text, std::string* canonical) {
  double bits = 0;
  if (!absl::SimpleAtod(text, &bits) || !std::isfinite(bits)) return false;
  if (bits < 1 || bits > 8 || std::fmod(bits * 2, 1.0) != 0) return false;
  *canonical = std::fmod(bits, 1.0) == 0 ? absl::StrCat(static_cast<int>(bits))
                                         : absl::StrCat(static_cast<int>(bits), ".5");
  return true;
}

absl::Status BadFormat(absl::string_view name) {
  return absl::InvalidArgumentError(
      absl::StrCat("unknown kv_format '", name, "' (accepted: ", kAcceptedNames, ")"));
}

}  // namespace

absl::StatusOr<std::string> CanonicalKvFormatName(std::string_view name_in) {
  const absl::string_view name = AsAbsl(name_in);
  std::string lower = absl::AsciiStrToLower(absl::StripAsciiWhitespace(name));
  for (std::string_view known :
       {"fp16", "bf16", "fp8", "int8", "kivi2", "kivi4", "tq4", "tq3.5", "tq3", "tq2.5"}) {
    if (lower == known) return lower;
  }
  absl::string_view rest = lower;
  if (!absl::ConsumePrefix(&rest, "tq:")) return BadFormat(name);
  std::string key_bits, value_bits;
  bool qjl = false;
  for (absl::string_view part : absl::StrSplit(rest, ',')) {
    part = absl::StripAsciiWhitespace(part);
    if (part == "qjl" && !qjl) {
      qjl = true;
    } else if (absl::ConsumePrefix(&part, "k=") && key_bits.empty()) {
      if (!ParseBits(part, &key_bits)) return BadFormat(name);
    } else if (absl::ConsumePrefix(&part, "v=") && value_bits.empty()) {
      if (!ParseBits(part, &value_bits)) return BadFormat(name);
    } else {
      return BadFormat(name);
    }
  }
  if (key_bits.empty() || value_bits.empty()) return BadFormat(name);
  return absl::StrCat("tq:k=", key_bits, ",v=", value_bits, qjl ? ",qjl" : "");
}

absl::Status ValidateEvictionName(std::string_view eviction_in) {
  const absl::string_view eviction = AsAbsl(eviction_in);
  std::string lower = absl::AsciiStrToLower(absl::StripAsciiWhitespace(eviction));
  if (lower == "none") return absl::OkStatus();
  auto bad = [&](absl::string_view why) {
    return absl::InvalidArgumentError(
        absl::StrCat("invalid eviction '", eviction, "': ", why,
                     " (accepted: none, h2o:heavy=F,recent=F, sink:sinks=N,window=N)"));
  };
  absl::string_view rest = lower;
  bool h2o = absl::ConsumePrefix(&rest, "h2o");
  bool sink = !h2o && absl::ConsumePrefix(&rest, "sink");
  if (!h2o && !sink) return bad("unknown kind");
  if (rest.empty()) return absl::OkStatus();
  if (!absl::ConsumePrefix(&rest, ":")) return bad("expected ':' after the kind");
  for (absl::string_view part : absl::StrSplit(rest, ',')) {
    std::pair<absl::string_view, absl::string_view> kv =
        absl::StrSplit(part, absl::MaxSplits('=', 1));
    absl::string_view key = absl::StripAsciiWhitespace(kv.first);
    absl::string_view value = absl::StripAsciiWhitespace(kv.second);
    if (h2o) {
      double fraction = 0;
      if (key != "heavy" && key != "recent") return bad(absl::StrCat("unknown key '", key, "'"));
      if (!absl::SimpleAtod(value, &fraction) || !(fraction > 0 && fraction < 1)) {
        return bad(absl::StrCat(key, " must be a fraction in (0, 1)"));
      }
    } else {
      int64_t count = 0;
      if (key != "sinks" && key != "window") return bad(absl::StrCat("unknown key '", key, "'"));
      if (!absl::SimpleAtoi(value, &count) || count <= 0) {
        return bad(absl::StrCat(key, " must be a positive integer"));
      }
    }
  }
  return absl::OkStatus();
}

double NominalKvBits(std::string_view format) {
  if (format == "fp16" || format == "bf16") return 16;
  if (format == "fp8" || format == "int8") return 8;
  if (format == "kivi4") return 4;
  if (format == "kivi2") return 2;
  double k = 0, v = 0;
  if (format.rfind("tq:", 0) == 0) {
    // "tq:k=K,v=V[,qjl]"
    const std::string text(format);
    if (std::sscanf(text.c_str(), "tq:k=%lf,v=%lf", &k, &v) == 2) return (k + v) / 2;
    return 16;
  }
  if (format.rfind("tq", 0) == 0 && std::sscanf(std::string(format).c_str(), "tq%lf", &k) == 1) {
    return k;
  }
  return 16;
}

}  // namespace kvgate::gateway
