#include "kvgate/common/subprocess.h"

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdlib>
#include <cstring>
#include <thread>

namespace kvgate {

std::unique_ptr<Subprocess> Subprocess::Start(const std::vector<std::string>& argv) {
  int pipefd[2];
  if (pipe2(pipefd, O_CLOEXEC) != 0) return nullptr;
  pid_t pid = fork();
  if (pid < 0) return nullptr;
  if (pid == 0) {
    dup2(pipefd[1], STDOUT_FILENO);
    // Signals blocked by a parent that sigwaits must not stay blocked in the child; and the child
    // ends when its parent dies (a crashed test or `kvgate up` leaves nothing behind).
    sigset_t none;
    sigemptyset(&none);
    sigprocmask(SIG_SETMASK, &none, nullptr);
    prctl(PR_SET_PDEATHSIG, SIGTERM);
    std::vector<char*> args;
    for (const auto& a : argv) args.push_back(const_cast<char*>(a.c_str()));
    args.push_back(nullptr);
    execv(args[0], args.data());
    _exit(127);
  }
  close(pipefd[1]);
  auto p = std::unique_ptr<Subprocess>(new Subprocess());
  p->pid_ = pid;
  p->stdout_fd_ = pipefd[0];
  return p;
}

Subprocess::~Subprocess() {
  if (Running()) {
    kill(pid_, SIGKILL);
    Wait(std::chrono::seconds(5));
  }
  if (stdout_fd_ >= 0) close(stdout_fd_);
}

int Subprocess::WaitForListening(std::chrono::milliseconds timeout) {
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  for (;;) {
    auto pos = buffered_.find("LISTENING ");
    if (pos != std::string::npos) {
      auto eol = buffered_.find('\n', pos);
      if (eol != std::string::npos) {
        return std::atoi(buffered_.substr(pos + 10, eol - pos - 10).c_str());
      }
    }
    auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
                    deadline - std::chrono::steady_clock::now())
                    .count();
    if (left <= 0) return -1;
    pollfd pfd{stdout_fd_, POLLIN, 0};
    if (poll(&pfd, 1, static_cast<int>(std::min<long>(left, 100))) > 0) {
      char buf[4096];
      ssize_t n = read(stdout_fd_, buf, sizeof(buf));
      if (n <= 0) return -1;
      buffered_.append(buf, n);
    } else if (!Running()) {
      return -1;
    }
  }
}

int Subprocess::PrintedPort(const std::string& key) const {
  auto pos = buffered_.find(key + " ");
  if (pos == std::string::npos) return -1;
  return std::atoi(buffered_.c_str() + pos + key.size() + 1);
}

bool Subprocess::Running() {
  if (exit_code_) return false;
  int status = 0;
  pid_t r = waitpid(pid_, &status, WNOHANG);
  if (r == pid_) {
    exit_code_ = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
    return false;
  }
  return r == 0;
}

int Subprocess::Wait(std::chrono::milliseconds timeout) {
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  while (Running()) {
    if (std::chrono::steady_clock::now() > deadline) return -1;
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  return *exit_code_;
}

void Subprocess::Signal(int sig) {
  if (Running()) kill(pid_, sig);
}

}  // namespace kvgate
