// Hot reload: a good file swaps the policy in, a bad one is rejected and counted while the last
// good policy stays in force, and a snapshot held by a reader survives any swap.
#include "gateway/policy/policy_store.h"

#include <unistd.h>

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <string>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "gateway/policy/policy_loader.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace kvgate::gateway {
namespace {

std::string PolicyText(int max_context) {
  return absl::StrCat(R"(pools:
  - name: a
    endpoints: ["127.0.0.1:1"]
    kv_format: fp16
    precision: full
    max_context: )",
                      max_context, R"(
task_types: [{name: chat}]
default_task_type: chat
routes: [{name: all, pools: [a]}]
)");
}

class PolicyStoreTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = std::filesystem::temp_directory_path() /
           absl::StrCat("kvgate_policy_store_test_", getpid(), "_",
                        ::testing::UnitTest::GetInstance()->current_test_info()->name());
    std::filesystem::create_directories(dir_);
    path_ = (dir_ / "policy.yaml").string();
  }
  void TearDown() override { std::filesystem::remove_all(dir_); }

  // Writes through a temporary file and rename, as a ConfigMap update or an editor does, so a
  // watcher never sees a half-written file.
  void Write(const std::string& text) {
    std::string tmp = path_ + ".tmp";
    {
      std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
      out << text;
    }
    std::filesystem::rename(tmp, path_);
  }

  std::filesystem::path dir_;
  std::string path_;
};

TEST_F(PolicyStoreTest, LoadInstallsThePolicy) {
  Write(PolicyText(100));
  PolicyStore store(path_);
  EXPECT_EQ(store.Current(), nullptr);
  ASSERT_TRUE(store.Load().ok());
  ASSERT_NE(store.Current(), nullptr);
  EXPECT_EQ(store.Current()->pools[0].max_context, 100);
  EXPECT_EQ(store.current_hash(), Fnv1a64Hex(PolicyText(100)));
  EXPECT_EQ(store.reloads_ok(), 0u);  // the initial load is not a reload
}

TEST_F(PolicyStoreTest, InvalidInitialFileFailsWithPositions) {
  Write("pools: [\n");
  PolicyStore store(path_);
  absl::Status status = store.Load();
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(status.message()), ::testing::StartsWith(path_ + ":"));
  EXPECT_EQ(store.Current(), nullptr);
}

TEST_F(PolicyStoreTest, GoodReloadSwapsAndHeldSnapshotSurvives) {
  Write(PolicyText(100));
  PolicyStore store(path_);
  ASSERT_TRUE(store.Load().ok());
  std::shared_ptr<const Policy> held = store.Current();  // a request in flight

  Write(PolicyText(200));
  ASSERT_TRUE(store.Reload().ok());
  EXPECT_EQ(store.Current()->pools[0].max_context, 200);
  EXPECT_EQ(store.reloads_ok(), 1u);
  EXPECT_EQ(store.current_hash(), Fnv1a64Hex(PolicyText(200)));
  // The reader's snapshot is untouched and still complete.
  EXPECT_EQ(held->pools[0].max_context, 100);
  EXPECT_EQ(held->hash, Fnv1a64Hex(PolicyText(100)));
  EXPECT_NE(held.get(), store.Current().get());
}

TEST_F(PolicyStoreTest, BadReloadKeepsTheLastGoodPolicyAndCounts) {
  Write(PolicyText(100));
  PolicyStore store(path_);
  ASSERT_TRUE(store.Load().ok());
  const std::string good_hash = store.current_hash();

  Write(PolicyText(0));  // max_context must be > 0
  absl::Status status = store.Reload();
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(status.message()), ::testing::HasSubstr(path_ + ":6:18:"));
  EXPECT_EQ(store.reloads_failed(), 1u);
  EXPECT_EQ(store.reloads_ok(), 0u);
  EXPECT_EQ(store.current_hash(), good_hash);
  EXPECT_EQ(store.Current()->pools[0].max_context, 100);
  EXPECT_FALSE(store.last_error().ok());

  // A missing file is also rejected without losing the policy.
  std::filesystem::remove(path_);
  EXPECT_FALSE(store.Reload().ok());
  EXPECT_EQ(store.reloads_failed(), 2u);
  EXPECT_EQ(store.Current()->pools[0].max_context, 100);
}

TEST_F(PolicyStoreTest, PollReloadsOnlyOnContentChange) {
  Write(PolicyText(100));
  PolicyStore store(path_);
  ASSERT_TRUE(store.Load().ok());
  EXPECT_TRUE(store.PollOnce().ok());
  EXPECT_EQ(store.reloads_ok() + store.reloads_failed(), 0u);

  Write(PolicyText(100));  // same bytes, new inode and mtime: no reload
  EXPECT_TRUE(store.PollOnce().ok());
  EXPECT_EQ(store.reloads_ok(), 0u);

  Write(PolicyText(300));
  EXPECT_TRUE(store.PollOnce().ok());
  EXPECT_EQ(store.reloads_ok(), 1u);
  EXPECT_EQ(store.Current()->pools[0].max_context, 300);

  Write("routes: [\n");  // broken
  EXPECT_FALSE(store.PollOnce().ok());
  EXPECT_EQ(store.reloads_failed(), 1u);
  Write("routes: [\n");  // still the same broken bytes: not counted again
  EXPECT_TRUE(store.PollOnce().ok());
  EXPECT_EQ(store.reloads_failed(), 1u);
  EXPECT_EQ(store.Current()->pools[0].max_context, 300);
}

TEST_F(PolicyStoreTest, WatcherPicksUpChangesAndCallsBack) {
  Write(PolicyText(100));
  PolicyStore store(path_);
  std::atomic<int> installs{0};
  store.SetOnInstall([&](const std::shared_ptr<const Policy>&) { installs.fetch_add(1); });
  ASSERT_TRUE(store.Load().ok());
  EXPECT_EQ(installs.load(), 1);
  store.StartWatching(absl::Milliseconds(10));

  auto wait_for = [](auto condition) {
    absl::Time deadline = absl::Now() + absl::Seconds(10);
    while (!condition() && absl::Now() < deadline) absl::SleepFor(absl::Milliseconds(5));
    return condition();
  };
  Write(PolicyText(400));
  ASSERT_TRUE(wait_for([&] { return store.reloads_ok() == 1; }));
  EXPECT_EQ(store.Current()->pools[0].max_context, 400);
  EXPECT_EQ(installs.load(), 2);

  Write("pools: 3\n");
  ASSERT_TRUE(wait_for([&] { return store.reloads_failed() == 1; }));
  EXPECT_EQ(store.Current()->pools[0].max_context, 400);
  store.StopWatching();
  EXPECT_EQ(installs.load(), 2);
}

}  // namespace
}  // namespace kvgate::gateway
