#include "kvgate/common/log.h"

#include <sys/time.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <mutex>
#include <string>

namespace kvgate::log {

Severity MinSeverity() {
  static const Severity min = [] {
    const char* env = std::getenv("KVGATE_LOG_LEVEL");
    if (env == nullptr) return Severity::kInfo;
    if (!std::strcmp(env, "warning")) return Severity::kWarning;
    if (!std::strcmp(env, "error")) return Severity::kError;
    return Severity::kInfo;
  }();
  return min;
}

Message::Message(Severity severity, const char* file, int line) : severity_(severity) {
  timeval tv;
  gettimeofday(&tv, nullptr);
  tm local;
  localtime_r(&tv.tv_sec, &local);
  const char* base = std::strrchr(file, '/');
  char prefix[96];
  std::snprintf(prefix, sizeof(prefix), "%c%02d%02d %02d:%02d:%02d.%06ld %d %s:%d] ",
                "IWE"[static_cast<int>(severity)], local.tm_mon + 1, local.tm_mday, local.tm_hour,
                local.tm_min, local.tm_sec, static_cast<long>(tv.tv_usec),
                static_cast<int>(gettid()), base ? base + 1 : file, line);
  stream_ << prefix;
}

Message::~Message() {
  static std::mutex mu;
  stream_ << '\n';
  std::string text = stream_.str();
  std::lock_guard<std::mutex> lock(mu);
  std::fwrite(text.data(), 1, text.size(), stderr);
  std::fflush(stderr);
}

}  // namespace kvgate::log
