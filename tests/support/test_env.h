// Test helpers: paths ctest passes in, the generated tiny model, a minimal HTTP GET.
#pragma once

#include <optional>
#include <string>

#include "kvgate/common/subprocess.h"

namespace kvgate::testing {

using ::kvgate::Subprocess;

// Paths from the environment ctest sets (KVGATE_BINARY_DIR / KVGATE_SOURCE_DIR).
std::string BinaryDir();
std::string SourceDir();
// The tiny test model generated into the build tree by tools/make_tiny_model.py; empty if absent.
std::string TinyModelDir();

// Minimal HTTP/1.0 GET on 127.0.0.1:port; returns the body, or nullopt on failure.
std::optional<std::string> HttpGet(int port, const std::string& path);

}  // namespace kvgate::testing
