// Clock: the time source of endpoint picking and DNS refresh, injectable so that tests control
// time (outlier ejection, probe-back, refresh intervals) without sleeping.
//
//   FakeClock clock(absl::FromUnixSeconds(1000));
//   EndpointPool pool("full", options, &clock);
//   clock.Advance(absl::Seconds(2));            // ejections expire, probes become due
#pragma once

#include "absl/synchronization/mutex.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"

namespace kvgate::gateway {

class Clock {
 public:
  virtual ~Clock() = default;
  virtual absl::Time Now() const = 0;
};

// Wall-clock time (absl::Now()).
class RealClock : public Clock {
 public:
  absl::Time Now() const override { return absl::Now(); }
  // A process-wide instance.
  static const Clock* Get() {
    static const RealClock* clock = new RealClock();
    return clock;
  }
};

// Time that moves only when told to. Thread-safe.
class FakeClock : public Clock {
 public:
  explicit FakeClock(absl::Time start = absl::FromUnixSeconds(1'000'000)) : now_(start) {}
  absl::Time Now() const override {
    absl::MutexLock lock(&mutex_);
    return now_;
  }
  void Advance(absl::Duration delta) {
    absl::MutexLock lock(&mutex_);
    now_ += delta;
  }
  void Set(absl::Time now) {
    absl::MutexLock lock(&mutex_);
    now_ = now;
  }

 private:
  mutable absl::Mutex mutex_;
  absl::Time now_ ABSL_GUARDED_BY(mutex_);
};

}  // namespace kvgate::gateway
