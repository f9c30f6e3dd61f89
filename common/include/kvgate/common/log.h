// Minimal leveled logging to stderr (Abseil 20220623 on Debian 12 has no absl/log).
// One line per message: "I1129 01:02:03.456789 tid file:line] message". Thread-safe.
//
//   KVGATE_LOG(INFO) << "worker listening on " << addr;
//   KVGATE_LOG(WARNING) << "policy rejected: " << status;
#pragma once

#include <sstream>
#include <string_view>

namespace kvgate::log {

enum class Severity { kInfo = 0, kWarning = 1, kError = 2 };

// Messages below this severity are dropped (env KVGATE_LOG_LEVEL=info|warning|error).
Severity MinSeverity();

class Message {
 public:
  Message(Severity severity, const char* file, int line);
  ~Message();
  std::ostream& stream() { return stream_; }

 private:
  Severity severity_;
  std::ostringstream stream_;
};

}  // namespace kvgate::log

#define KVGATE_LOG_SEVERITY_INFO ::kvgate::log::Severity::kInfo
#define KVGATE_LOG_SEVERITY_WARNING ::kvgate::log::Severity::kWarning
#define KVGATE_LOG_SEVERITY_ERROR ::kvgate::log::Severity::kError

#define KVGATE_LOG(sev)                                             \
  if (KVGATE_LOG_SEVERITY_##sev < ::kvgate::log::MinSeverity()) {   \
  } else                                                            \
    ::kvgate::log::Message(KVGATE_LOG_SEVERITY_##sev, __FILE__, __LINE__).stream()
