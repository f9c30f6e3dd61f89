#include "gateway/policy/kv_format_name.h"

#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "gateway/internal/absl_string_view.h"
#include "kvgate/kernels/kv_format.h"

// The grammar of format and eviction names lives in one place, the kernels library
// (kernels/include/kvgate/kernels/kv_format.h); the gateway only normalizes case and spaces.
namespace kvgate::gateway {

absl::StatusOr<std::string> CanonicalKvFormatName(std::string_view name_in) {
  const std::string lower = absl::AsciiStrToLower(absl::StripAsciiWhitespace(AsAbsl(name_in)));
  auto spec = kernels::ParseKvFormat(lower);
  if (!spec.ok()) {
    return absl::InvalidArgumentError(absl::StrCat("unknown kv_format '", AsAbsl(name_in), "': ",
                                                   spec.status().message()));
  }
  return spec->name;
}

absl::Status ValidateEvictionName(std::string_view eviction_in) {
  const std::string lower =
      absl::AsciiStrToLower(absl::StripAsciiWhitespace(AsAbsl(eviction_in)));
  auto spec = kernels::ParseEviction(lower);
  if (!spec.ok()) {
    return absl::InvalidArgumentError(absl::StrCat("invalid eviction '", AsAbsl(eviction_in),
                                                   "': ", spec.status().message()));
  }
  return absl::OkStatus();
}

double NominalKvBits(std::string_view format) {
  auto spec = kernels::ParseKvFormat(format);
  if (!spec.ok()) return 16;
  return (spec->key_bits + spec->value_bits) / 2;
}

}  // namespace kvgate::gateway
