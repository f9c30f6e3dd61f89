// PolicyStore: the policy in force, swapped atomically on reload, with a file watcher.
//
// Readers call Current() once per request and keep the returned snapshot for the whole request:
// a reload never changes a policy a request is already using. Reload() re-reads the file; an
// invalid file is rejected (logged with file:line:col, counted) and the last good policy stays in
// force. The watcher polls the file's mtime, ctime, size and inode every `interval` and, when they
// change (and regardless, every 10th poll, for edits within one timestamp tick), reads it and
// reloads if its content hash differs from the last content it saw (so touching a file, or a bad
// file that stays bad, does not reload or count again).
//
//   PolicyStore store("policies/default.yaml");
//   RETURN_IF_ERROR(store.Load());                    // the gateway refuses to start on error
//   store.StartWatching(absl::Seconds(1));
//   std::shared_ptr<const Policy> policy = store.Current();   // per request
//
// Thread-safe.
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <thread>

#include "absl/status/status.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "gateway/policy/policy.h"

namespace kvgate::gateway {

class PolicyStore {
 public:
  explicit PolicyStore(std::string path);
  ~PolicyStore();  // stops the watcher
  PolicyStore(const PolicyStore&) = delete;
  PolicyStore& operator=(const PolicyStore&) = delete;

  // Initial load. On error nothing is in force (Current() stays null) and the error lists every
  // problem as file:line:col lines. Not counted as a reload.
  absl::Status Load();

  // Re-reads and re-validates the file now. OK: the new policy is in force (reloads_ok + 1).
  // Error: the previous policy stays (reloads_failed + 1), the error is logged and returned.
  absl::Status Reload();

  // Checks the file once (what the watcher does each interval): reloads only when the content
  // changed since the last check. Reads the file only if its stat changed, or always when
  // `always_hash`. Returns the reload's status, or OK when nothing changed.
  absl::Status PollOnce(bool always_hash = false);

  // Starts a thread calling PollOnce() every `interval`; a second call restarts it.
  void StartWatching(absl::Duration interval);
  void StopWatching();

  // The policy in force (null before a successful Load()).
  std::shared_ptr<const Policy> Current() const;

  // Called with each newly installed policy (Load and successful reloads), on the thread that
  // installed it, after it is in force. Set before Load()/StartWatching().
  void SetOnInstall(std::function<void(const std::shared_ptr<const Policy>&)> callback);

  const std::string& path() const { return path_; }
  uint64_t reloads_ok() const { return reloads_ok_.load(); }
  uint64_t reloads_failed() const { return reloads_failed_.load(); }
  // Hash of the policy in force ("" before Load()).
  std::string current_hash() const;
  // Status of the last failed load or reload (OK if the last one succeeded).
  absl::Status last_error() const;

 private:
  struct FileStamp {
    bool exists = false;
    int64_t mtime_ns = 0;
    int64_t ctime_ns = 0;
    int64_t size = 0;
    uint64_t inode = 0;
    bool operator==(const FileStamp&) const = default;
  };
  FileStamp Stat() const;
  absl::Status LoadAndInstall(bool count_as_reload);

  const std::string path_;
  std::atomic<uint64_t> reloads_ok_{0};
  std::atomic<uint64_t> reloads_failed_{0};

  mutable absl::Mutex mutex_;
  std::shared_ptr<const Policy> current_ ABSL_GUARDED_BY(mutex_);
  absl::Status last_error_ ABSL_GUARDED_BY(mutex_);
  std::function<void(const std::shared_ptr<const Policy>&)> on_install_ ABSL_GUARDED_BY(mutex_);

  // Serializes loads (watcher and on-demand Reload), and guards what the watcher last saw.
  absl::Mutex load_mutex_ ABSL_ACQUIRED_BEFORE(mutex_);
  FileStamp last_stamp_ ABSL_GUARDED_BY(load_mutex_);
  std::string last_content_hash_ ABSL_GUARDED_BY(load_mutex_);

  absl::Mutex watch_mutex_;
  bool stop_watching_ ABSL_GUARDED_BY(watch_mutex_) = false;
  std::thread watcher_;
};

}  // namespace kvgate::gateway
