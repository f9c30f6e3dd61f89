// Subprocess: runs a kvgate binary as a child process and waits for the port it prints
// ("LISTENING <port>"). Used by `kvgate up` (the local stack) and by the integration tests.
//
//   auto worker = Subprocess::Start({WorkerBinary(), "--model", dir, "--port", "0"});
//   int port = worker->WaitForListening(std::chrono::seconds(30));  // parses "LISTENING <port>"
//   worker->Signal(SIGTERM); int code = worker->Wait();
#pragma once

#include <chrono>
#include <memory>
#include <optional>
#include <string>
#include <vector>

namespace kvgate {

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

}  // namespace kvgate
