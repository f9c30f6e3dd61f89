// SIGTERM/SIGINT handling for kvgate's servers: block both in every thread before any thread
// starts, then wait for one synchronously (no async-signal handler to get wrong).
//
//   ShutdownSignals signals;            // first thing in main(), before gRPC starts threads
//   ... start serving ...
//   int sig = signals.Wait();           // or WaitFor(timeout) in a polling loop
#pragma once

#include <signal.h>

#include <chrono>

namespace kvgate {

class ShutdownSignals {
 public:
  ShutdownSignals() {
    sigemptyset(&set_);
    sigaddset(&set_, SIGTERM);
    sigaddset(&set_, SIGINT);
    pthread_sigmask(SIG_BLOCK, &set_, nullptr);
  }
  // Blocks until SIGTERM or SIGINT arrives; returns it.
  int Wait() {
    int sig = 0;
    sigwait(&set_, &sig);
    return sig;
  }
  // The signal if one arrived within `timeout`, else 0.
  int WaitFor(std::chrono::milliseconds timeout) {
    timespec ts{static_cast<time_t>(timeout.count() / 1000),
                static_cast<long>((timeout.count() % 1000) * 1000000)};
    int sig = sigtimedwait(&set_, nullptr, &ts);
    return sig > 0 ? sig : 0;
  }

 private:
  sigset_t set_;
};

}  // namespace kvgate
