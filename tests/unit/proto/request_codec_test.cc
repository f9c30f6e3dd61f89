#include "proto/request_codec.h"

#include <string>

#include "google/protobuf/util/message_differencer.h"
#include "gtest/gtest.h"

namespace kvgate {
namespace {

grpc::ByteBuffer Wire(const std::string& bytes) {
  grpc::Slice slice(bytes);
  return grpc::ByteBuffer(&slice, 1);
}

TEST(Utf8Test, FindsTheFirstInvalidByte) {
  EXPECT_EQ(FirstInvalidUtf8Offset(""), -1);
  EXPECT_EQ(FirstInvalidUtf8Offset("plain ascii"), -1);
  EXPECT_EQ(FirstInvalidUtf8Offset("caf\xc3\xa9 \xe2\x82\xac \xf0\x9f\x98\x80"), -1);
  EXPECT_EQ(FirstInvalidUtf8Offset("ab\xff"), 2);
  EXPECT_EQ(FirstInvalidUtf8Offset("a\xc3"), 1);              // truncated
  EXPECT_EQ(FirstInvalidUtf8Offset("\xc0\xaf"), 0);           // overlong '/'
  EXPECT_EQ(FirstInvalidUtf8Offset("\xe0\x80\xaf"), 0);       // overlong 3-byte
  EXPECT_EQ(FirstInvalidUtf8Offset("x\xed\xa0\x80"), 1);      // surrogate U+D800
  EXPECT_EQ(FirstInvalidUtf8Offset("\xf4\x90\x80\x80"), 0);   // above U+10FFFF
  EXPECT_EQ(FirstInvalidUtf8Offset("\xe2\x82"), 0);           // truncated 3-byte
  EXPECT_EQ(FirstInvalidUtf8Offset("ok\xe2\x28\xa1"), 2);     // bad continuation
}

TEST(RequestCodecTest, LenientMirrorRoundTripsEveryField) {
  kvgate::v1::GenerateRequest req;
  req.set_prompt("héllo wörld");
  req.mutable_sampling()->set_max_tokens(7);
  req.mutable_sampling()->set_temperature(0.5f);
  req.mutable_sampling()->set_top_k(3);
  req.mutable_sampling()->set_top_p(0.9f);
  req.mutable_sampling()->set_seed(42);
  req.mutable_sampling()->add_stop_token_ids(9);
  req.mutable_sampling()->set_ignore_eos(true);
  req.set_task_type("legal");
  req.set_precision(kvgate::v1::PRECISION_FULL);
  req.set_tenant("acme");
  (*req.mutable_metadata())["team"] = "search";
  (*req.mutable_metadata())["tier"] = "gold";
  req.set_request_id("r-1");
  req.set_no_bos(true);
  auto decoded = DecodeGenerateRequest(Wire(req.SerializeAsString()));
  ASSERT_TRUE(decoded.ok()) << decoded.status();
  EXPECT_TRUE(google::protobuf::util::MessageDifferencer::Equals(*decoded, req))
      << decoded->DebugString();

  kvgate::v1::CountTokensRequest count;
  count.set_prompt("abc");
  count.set_no_bos(true);
  count.set_return_ids(true);
  auto decoded_count = DecodeCountTokensRequest(Wire(count.SerializeAsString()));
  ASSERT_TRUE(decoded_count.ok());
  EXPECT_TRUE(google::protobuf::util::MessageDifferencer::Equals(*decoded_count, count));
}

TEST(RequestCodecTest, InvalidUtf8AndGarbageAreInvalidArgument) {
  kvgate::v1::GenerateRequest req;
  req.set_prompt("ok");
  std::string wire = req.SerializeAsString();
  // Field 1 (prompt) with invalid UTF-8, written by hand: tag 0x0a, length 3.
  auto bad = DecodeGenerateRequest(Wire(std::string("\x0a\x03" "a\xff" "b", 5)));
  ASSERT_FALSE(bad.ok());
  EXPECT_EQ(bad.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(bad.status().message().find("prompt is not valid UTF-8 (invalid byte at offset 1)"),
            std::string::npos)
      << bad.status();
  // Tenant (field 5).
  auto bad_tenant = DecodeGenerateRequest(Wire(wire + std::string("\x2a\x01\x80", 3)));
  ASSERT_FALSE(bad_tenant.ok());
  EXPECT_NE(bad_tenant.status().message().find("tenant"), std::string::npos);
  // Truncated message.
  auto garbage = DecodeGenerateRequest(Wire(std::string("\x0a\x7f" "abc", 5)));
  EXPECT_EQ(garbage.status().code(), absl::StatusCode::kInvalidArgument);
  // Unknown precision value.
  auto bad_precision = DecodeGenerateRequest(Wire(std::string("\x20\x09", 2)));
  EXPECT_EQ(bad_precision.status().code(), absl::StatusCode::kInvalidArgument);
  // Unknown fields are ignored.
  auto extra = DecodeGenerateRequest(Wire(wire + std::string("\xa2\x06\x03xyz", 6)));
  ASSERT_TRUE(extra.ok());
  EXPECT_EQ(extra->prompt(), "ok");
}

}  // namespace
}  // namespace kvgate
