// Debian 12's Abseil 20220623 is built with its own absl::string_view (ABSL_OPTION_USE_STD_STRING_
// VIEW 0), which does not convert from std::string_view. The gateway's interfaces take
// std::string_view; implementations convert with AsAbsl() where they call absl string functions.
//
//   absl::StrCat("unknown pool '", AsAbsl(name), "'");
#pragma once

#include <string_view>

#include "absl/strings/string_view.h"

namespace kvgate::gateway {

inline absl::string_view AsAbsl(std::string_view s) {
  return absl::string_view(s.data(), s.size());
}
inline std::string_view AsStd(absl::string_view s) { return std::string_view(s.data(), s.size()); }

}  // namespace kvgate::gateway
