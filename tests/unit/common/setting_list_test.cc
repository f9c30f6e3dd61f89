// SplitSettingList (cli/setting_list.h): the comma-separated KV setting lists of `kvgate eval`
// and `kvgate bench engine`, whose entries carry comma-separated parameters of their own.
#include "cli/setting_list.h"

#include "gtest/gtest.h"

namespace kvgate::cli {
namespace {

using List = std::vector<std::string>;

TEST(SplitSettingListTest, KeepsParametersWithTheirEntry) {
  EXPECT_EQ(SplitSettingList("fp16,fp8,kivi2"), (List{"fp16", "fp8", "kivi2"}));
  EXPECT_EQ(SplitSettingList("fp16,tq:k=4,v=3,qjl,tq:k=4,v=4,r=0,kivi2"),
            (List{"fp16", "tq:k=4,v=3,qjl", "tq:k=4,v=4,r=0", "kivi2"}));
  EXPECT_EQ(SplitSettingList("h2o:heavy=0.1,recent=0.1,sink:sinks=4,window=256,none"),
            (List{"h2o:heavy=0.1,recent=0.1", "sink:sinks=4,window=256", "none"}));
  EXPECT_EQ(SplitSettingList("fp16,fp16+h2o:heavy=0.1,recent=0.1,int8"),
            (List{"fp16", "fp16+h2o:heavy=0.1,recent=0.1", "int8"}));
}

TEST(SplitSettingListTest, EntriesThatLookLikeParametersStartNewEntries) {
  // A layer option or a keyed entry after a parametrized one is its own entry.
  EXPECT_EQ(SplitSettingList("tq:k=4,v=3,tq4/fp16=1:1"), (List{"tq:k=4,v=3", "tq4/fp16=1:1"}));
  // A bare parameter with nothing to continue stays an entry (and fails to parse later, loudly).
  EXPECT_EQ(SplitSettingList("k=4,fp16"), (List{"k=4", "fp16"}));
  EXPECT_EQ(SplitSettingList(",,fp16,,"), (List{"fp16"}));
  EXPECT_TRUE(SplitSettingList("").empty());
}

}  // namespace
}  // namespace kvgate::cli
