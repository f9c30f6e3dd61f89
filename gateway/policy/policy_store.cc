#include "gateway/policy/policy_store.h"

#include <sys/stat.h>

#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "gateway/policy/policy_loader.h"
#include "kvgate/common/log.h"

namespace kvgate::gateway {

PolicyStore::PolicyStore(std::string path) : path_(std::move(path)) {}

PolicyStore::~PolicyStore() { StopWatching(); }

PolicyStore::FileStamp PolicyStore::Stat() const {
  struct stat info;
  if (::stat(path_.c_str(), &info) != 0) return FileStamp{};
  FileStamp stamp;
  stamp.exists = true;
  stamp.mtime_ns = static_cast<int64_t>(info.st_mtim.tv_sec) * 1'000'000'000 + info.st_mtim.tv_nsec;
  stamp.ctime_ns = static_cast<int64_t>(info.st_ctim.tv_sec) * 1'000'000'000 + info.st_ctim.tv_nsec;
  stamp.size = static_cast<int64_t>(info.st_size);
  stamp.inode = static_cast<uint64_t>(info.st_ino);
  return stamp;
}

absl::Status PolicyStore::Load() { return LoadAndInstall(/*count_as_reload=*/false); }

absl::Status PolicyStore::Reload() { return LoadAndInstall(/*count_as_reload=*/true); }

absl::Status PolicyStore::LoadAndInstall(bool count_as_reload) {
  absl::MutexLock load_lock(&load_mutex_);
  // Stat before reading: if the file changes in between, the next poll sees a new stamp, reads
  // the new bytes and compares hashes, so no change is lost.
  last_stamp_ = Stat();
  PolicyParseResult result = ParsePolicyFile(path_);
  if (!result.content_hash.empty()) last_content_hash_ = result.content_hash;
  if (result.policy == nullptr) {
    std::vector<std::string> lines;
    for (const PolicyError& error : result.errors) lines.push_back(error.ToString());
    absl::Status status = absl::InvalidArgumentError(absl::StrJoin(lines, "\n"));
    if (count_as_reload) reloads_failed_.fetch_add(1);
    {
      absl::MutexLock lock(&mutex_);
      last_error_ = status;
    }
    KVGATE_LOG(WARNING) << "policy " << path_ << " rejected"
                        << (count_as_reload ? " (keeping the policy in force)" : "") << ":\n"
                        << absl::StrJoin(lines, "\n");
    return status;
  }
  std::function<void(const std::shared_ptr<const Policy>&)> on_install;
  std::string previous_hash;
  {
    absl::MutexLock lock(&mutex_);
    previous_hash = current_ != nullptr ? current_->hash : "";
    current_ = result.policy;
    last_error_ = absl::OkStatus();
    on_install = on_install_;
  }
  KVGATE_LOG(INFO) << "policy " << path_ << " in force: hash " << result.policy->hash
                   << (previous_hash.empty() ? "" : absl::StrCat(" (was ", previous_hash, ")"))
                   << ", " << result.policy->pools.size() << " pools, "
                   << result.policy->routes.size() << " routes";
  if (on_install) on_install(result.policy);
  // Counted after the callback, so that a reload counted is a reload fully applied.
  if (count_as_reload) reloads_ok_.fetch_add(1);
  return absl::OkStatus();
}

absl::Status PolicyStore::PollOnce(bool always_hash) {
  {
    absl::MutexLock load_lock(&load_mutex_);
    FileStamp stamp = Stat();
    if (stamp == last_stamp_ && !always_hash) return absl::OkStatus();
    if (!stamp.exists && !last_stamp_.exists) return absl::OkStatus();  // still missing, logged
    last_stamp_ = stamp;
    if (!stamp.exists) {
      KVGATE_LOG(WARNING) << "policy " << path_
                          << " cannot be read (removed?); keeping the policy in force";
      return absl::NotFoundError(absl::StrCat(path_, ": cannot stat"));
    }
    absl::StatusOr<std::string> bytes = ReadFileBytes(path_, kMaxPolicyFileBytes);
    if (bytes.ok() && Fnv1a64Hex(*bytes) == last_content_hash_) return absl::OkStatus();
  }
  return Reload();
}

void PolicyStore::StartWatching(absl::Duration interval) {
  StopWatching();
  {
    absl::MutexLock lock(&watch_mutex_);
    stop_watching_ = false;
  }
  watcher_ = std::thread([this, interval] {
    for (uint64_t poll = 1;; ++poll) {
      {
        absl::MutexLock lock(&watch_mutex_);
        watch_mutex_.AwaitWithTimeout(absl::Condition(&stop_watching_), interval);
        if (stop_watching_) return;
      }
      PollOnce(/*always_hash=*/poll % 10 == 0).IgnoreError();  // logged and counted inside
    }
  });
}

void PolicyStore::StopWatching() {
  {
    absl::MutexLock lock(&watch_mutex_);
    stop_watching_ = true;
  }
  if (watcher_.joinable()) watcher_.join();
}

std::shared_ptr<const Policy> PolicyStore::Current() const {
  absl::MutexLock lock(&mutex_);
  return current_;
}

void PolicyStore::SetOnInstall(std::function<void(const std::shared_ptr<const Policy>&)> callback) {
  absl::MutexLock lock(&mutex_);
  on_install_ = std::move(callback);
}

std::string PolicyStore::current_hash() const {
  absl::MutexLock lock(&mutex_);
  return current_ != nullptr ? current_->hash : "";
}

absl::Status PolicyStore::last_error() const {
  absl::MutexLock lock(&mutex_);
  return last_error_;
}

}  // namespace kvgate::gateway
