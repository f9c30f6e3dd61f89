// Test support: runs a kvgate binary as a child process on loopback and waits for its port.
//
//   ASSERT_OK_AND_ASSIGN... (plain gtest):
//   auto worker = Subprocess::Start({WorkerBinary(), "--model", dir, "--port", "0"});
//   int port = worker->WaitForListening(std::chrono::seconds(30));  // parses "LISTENING <port>"
//   worker->Signal(SIGTERM); int code = worker->Wait();
#pragma once

#include <chrono>
#include <memory>
#include <optional>
#include <string>
#include <vector>

namespace kvgate::testing {

class Subprocess {
 public:
  // Starts argv[0] with the given arguments; stdout is captured (for the LISTENING line), stderr
  // goes to the test's stderr. Returns nullptr if fork/exec fails.
  static std::unique_ptr<Subprocess> Start(const std::vector<std::string>& argv);
  ~Subprocess();  // SIGKILLs the child if still running

  // Reads stdout until a line "LISTENING <port>"; -1 on timeout or exit.
  int WaitForListening(std::chrono::milliseconds timeout);
  // Port from a "<KEY> <port>" line printed before LISTENING (e.g. "METRICS"); -1 if none.
  int PrintedPort(const std::string& key) const;
  // Waits for the child to exit; returns the exit code (128+signal if killed), -1 on timeout.
  int Wait(std::chrono::milliseconds timeout = std::chrono::seconds(30));
  void Signal(int sig);
  bool Running();
  int pid() const { return pid_; }

 private:
  int pid_ = -1;
  int stdout_fd_ = -1;
  std::optional<int> exit_code_;
  std::string buffered_;
};

// Paths from the environment ctest sets (KVGATE_BINARY_DIR / KVGATE_SOURCE_DIR).
std::string BinaryDir();
std::string SourceDir();
// The tiny test model generated into the build tree by tools/make_tiny_model.py; empty if absent.
std::string TinyModelDir();

// Minimal HTTP/1.0 GET on 127.0.0.1:port; returns the body, or nullopt on failure.
std::optional<std::string> HttpGet(int port, const std::string& path);

}  // namespace kvgate::testing
