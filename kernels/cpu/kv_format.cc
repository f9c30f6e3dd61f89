// Parsing of KV format and eviction names (kv_format.h). DescribeKvFormat lives with the codec
// dispatch table in kv_codec.cc so that supported (format, head_dim) combinations are listed once.
#include "kvgate/kernels/kv_format.h"

#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"
#include "absl/strings/string_view.h"
#include "absl/strings/strip.h"

namespace kvgate::kernels {
namespace {

constexpr absl::string_view kAcceptedFormats =
    "fp16, bf16, fp8, int8, kivi2, kivi4, tq4, tq3.5, tq3, tq2.5, "
    "tq:k=A,v=B[,qjl][,r=R][,debias=0] (A, B in 1, 1.5, 2, 2.5, 3, 3.5, 4; R the fp16 window of "
    "newest tokens, default 128)";

bool IsTurboRate(double bits) {
  for (double r : {1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0}) {
    if (bits == r) return true;
  }
  return false;
}

std::string BitsName(double bits) { return absl::StrFormat("%g", bits); }

KvFormatSpec Turbo(double key_bits, double value_bits, bool qjl, std::string name) {
  KvFormatSpec spec;
  spec.kind = KvFormatKind::kTurbo;
  spec.key_bits = key_bits;
  spec.value_bits = value_bits;
  spec.qjl_keys = qjl;
  spec.name = std::move(name);
  return spec;
}

absl::StatusOr<KvFormatSpec> ParseTurboParams(absl::string_view text, absl::string_view params) {
  double key_bits = -1, value_bits = -1;
  bool qjl = false;
  int residual = KvFormatSpec{}.residual_tokens;
  bool debias = true;
  for (absl::string_view item : absl::StrSplit(params, ',')) {
    if (item == "qjl") {
      qjl = true;
      continue;
    }
    std::vector<absl::string_view> kv = absl::StrSplit(item, absl::MaxSplits('=', 1));
    if (kv.size() == 2 && kv[0] == "r") {
      if (!absl::SimpleAtoi(kv[1], &residual) || residual < 0 || residual > 65536) {
        return absl::InvalidArgumentError(absl::StrCat("KV format '", text, "': r='", kv[1],
                                                       "' is not a token count in [0, 65536]"));
      }
      continue;
    }
    if (kv.size() == 2 && kv[0] == "debias") {
      if (kv[1] != "0" && kv[1] != "1") {
        return absl::InvalidArgumentError(
            absl::StrCat("KV format '", text, "': debias='", kv[1], "' is not 0 or 1"));
      }
      debias = kv[1] == "1";
      continue;
    }
    double value = 0;
    if (kv.size() != 2 || !absl::SimpleAtod(kv[1], &value) || !IsTurboRate(value)) {
      return absl::InvalidArgumentError(absl::StrCat("KV format '", text, "': bad item '", item,
                                                     "'; expected k=A,v=B[,qjl] with A, B in "
                                                     "1, 1.5, 2, 2.5, 3, 3.5, 4"));
    }
    if (kv[0] == "k") {
      key_bits = value;
    } else if (kv[0] == "v") {
      value_bits = value;
    } else {
      return absl::InvalidArgumentError(
          absl::StrCat("KV format '", text, "': unknown key '", kv[0], "' (k, v, qjl, r, debias)"));
    }
  }
  if (key_bits < 0 || value_bits < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("KV format '", text, "': both k= and v= are required"));
  }
  if (qjl && key_bits < 2) {
    return absl::InvalidArgumentError(absl::StrCat(
        "KV format '", text, "': qjl spends 1 of the key bits on QJL; k must be >= 2"));
  }
  std::string name = absl::StrCat("tq:k=", BitsName(key_bits), ",v=", BitsName(value_bits));
  if (qjl) absl::StrAppend(&name, ",qjl");
  if (residual != KvFormatSpec{}.residual_tokens) absl::StrAppend(&name, ",r=", residual);
  if (!debias) absl::StrAppend(&name, ",debias=0");
  KvFormatSpec spec = Turbo(key_bits, value_bits, qjl, std::move(name));
  spec.residual_tokens = residual;
  spec.tq_debias = debias;
  return spec;
}

absl::StatusOr<double> ParseFraction(absl::string_view text, absl::string_view value) {
  double x = 0;
  if (!absl::SimpleAtod(value, &x) || !(x >= 0.0 && x <= 1.0)) {
    return absl::InvalidArgumentError(
        absl::StrCat("eviction '", text, "': '", value, "' is not a fraction in [0, 1]"));
  }
  return x;
}

absl::StatusOr<int> ParseCount(absl::string_view text, absl::string_view value) {
  int x = 0;
  if (!absl::SimpleAtoi(value, &x) || x < 0 || x > (1 << 30)) {
    return absl::InvalidArgumentError(
        absl::StrCat("eviction '", text, "': '", value, "' is not a token count"));
  }
  return x;
}

absl::StatusOr<KvFormatSpec> ParseBaseKvFormat(absl::string_view text);

}  // namespace

absl::StatusOr<KvFormatSpec> ParseKvFormat(std::string_view text_in) {
  const absl::string_view text(text_in.data(), text_in.size());
  // Optional "/fp16=F:L": the first F and the last L layers keep fp16 KV.
  const size_t slash = text.find('/');
  if (slash == absl::string_view::npos) return ParseBaseKvFormat(text);
  auto spec = ParseBaseKvFormat(text.substr(0, slash));
  if (!spec.ok()) return spec.status();
  absl::string_view suffix = text.substr(slash + 1);
  std::vector<absl::string_view> counts;
  if (absl::ConsumePrefix(&suffix, "fp16=")) counts = absl::StrSplit(suffix, ':');
  int first = -1, last = -1;
  if (counts.size() != 2 || !absl::SimpleAtoi(counts[0], &first) ||
      !absl::SimpleAtoi(counts[1], &last) || first < 0 || last < 0 || first > 1024 || last > 1024) {
    return absl::InvalidArgumentError(
        absl::StrCat("KV format '", text,
                     "': expected FORMAT/fp16=F:L (the first F and last L layers in fp16)"));
  }
  spec->full_precision_first_layers = first;
  spec->full_precision_last_layers = last;
  if (first > 0 || last > 0) absl::StrAppend(&spec->name, "/fp16=", first, ":", last);
  return spec;
}

namespace {

absl::StatusOr<KvFormatSpec> ParseBaseKvFormat(absl::string_view text) {
  KvFormatSpec spec;
  if (text == "fp16") return spec;
  if (text == "bf16") {
    spec.kind = KvFormatKind::kBf16;
    spec.name = "bf16";
    return spec;
  }
  if (text == "fp8") {
    spec.kind = KvFormatKind::kFp8;
    spec.name = "fp8";
    spec.key_bits = spec.value_bits = 8;
    return spec;
  }
  if (text == "int8") {
    spec.kind = KvFormatKind::kInt8;
    spec.name = "int8";
    spec.key_bits = spec.value_bits = 8;
    return spec;
  }
  if (text == "kivi2" || text == "kivi4") {
    spec.kind = KvFormatKind::kKivi;
    spec.name = std::string(text);
    spec.key_bits = spec.value_bits = text == "kivi2" ? 2 : 4;
    return spec;
  }
  if (text == "tq4") return Turbo(4, 4, false, "tq4");
  if (text == "tq3.5") return Turbo(3.5, 3.5, false, "tq3.5");
  if (text == "tq3") return Turbo(3, 3, false, "tq3");
  if (text == "tq2.5") return Turbo(2.5, 2.5, false, "tq2.5");
  absl::string_view params = text;
  if (absl::ConsumePrefix(&params, "tq:")) return ParseTurboParams(text, params);
  return absl::InvalidArgumentError(absl::StrCat("unknown KV format '", text,
                                                 "'; accepted: ", kAcceptedFormats,
                                                 ", each optionally followed by /fp16=F:L"));
}

}  // namespace

absl::StatusOr<EvictionSpec> ParseEviction(std::string_view text_in) {
  const absl::string_view text(text_in.data(), text_in.size());
  EvictionSpec spec;
  if (text == "none" || text.empty()) return spec;
  std::vector<absl::string_view> head_params = absl::StrSplit(text, absl::MaxSplits(':', 1));
  const absl::string_view kind = head_params[0];
  if (kind == "h2o") {
    spec.kind = EvictionSpec::Kind::kH2O;
  } else if (kind == "sink") {
    spec.kind = EvictionSpec::Kind::kSink;
  } else {
    return absl::InvalidArgumentError(
        absl::StrCat("unknown eviction '", text,
                     "'; accepted: none, h2o[:heavy=F,recent=F], sink[:sinks=N,window=N]"));
  }
  if (head_params.size() == 1) return spec;
  for (absl::string_view item : absl::StrSplit(head_params[1], ',')) {
    std::vector<absl::string_view> kv = absl::StrSplit(item, absl::MaxSplits('=', 1));
    if (kv.size() != 2) {
      return absl::InvalidArgumentError(
          absl::StrCat("eviction '", text, "': expected key=value, got '", item, "'"));
    }
    if (spec.kind == EvictionSpec::Kind::kH2O && kv[0] == "heavy") {
      auto v = ParseFraction(text, kv[1]);
      if (!v.ok()) return v.status();
      spec.heavy_fraction = *v;
    } else if (spec.kind == EvictionSpec::Kind::kH2O && kv[0] == "recent") {
      auto v = ParseFraction(text, kv[1]);
      if (!v.ok()) return v.status();
      spec.recent_fraction = *v;
    } else if (spec.kind == EvictionSpec::Kind::kSink && kv[0] == "sinks") {
      auto v = ParseCount(text, kv[1]);
      if (!v.ok()) return v.status();
      spec.sink_tokens = *v;
    } else if (spec.kind == EvictionSpec::Kind::kSink && kv[0] == "window") {
      auto v = ParseCount(text, kv[1]);
      if (!v.ok()) return v.status();
      spec.window_tokens = *v;
    } else {
      return absl::InvalidArgumentError(
          absl::StrCat("eviction '", text, "': unknown key '", kv[0], "' for ", kind,
                       kind == "h2o" ? " (heavy, recent)" : " (sinks, window)"));
    }
  }
  if (spec.kind == EvictionSpec::Kind::kH2O && spec.heavy_fraction + spec.recent_fraction <= 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("eviction '", text, "': heavy + recent must be > 0"));
  }
  if (spec.kind == EvictionSpec::Kind::kSink && spec.sink_tokens + spec.window_tokens <= 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("eviction '", text, "': sinks + window must be > 0"));
  }
  return spec;
}

std::string EvictionToString(const EvictionSpec& spec) {
  switch (spec.kind) {
    case EvictionSpec::Kind::kNone:
      return "none";
    case EvictionSpec::Kind::kH2O:
      return absl::StrFormat("h2o:heavy=%g,recent=%g", spec.heavy_fraction, spec.recent_fraction);
    case EvictionSpec::Kind::kSink:
      return absl::StrFormat("sink:sinks=%d,window=%d", spec.sink_tokens, spec.window_tokens);
  }
  return "none";
}

}  // namespace kvgate::kernels
