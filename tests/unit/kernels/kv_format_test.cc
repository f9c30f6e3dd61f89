// ParseKvFormat / ParseEviction / DescribeKvFormat: names, canonical forms, errors, dispatch table.
#include "kvgate/kernels/kv_format.h"

#include <gtest/gtest.h>

namespace kvgate::kernels {
namespace {

TEST(KvFormatTest, ParsesEveryDocumentedName) {
  struct Case {
    const char* text;
    KvFormatKind kind;
    double key_bits, value_bits;
    bool qjl;
    const char* canonical;
  };
  const Case cases[] = {
      {"fp16", KvFormatKind::kFp16, 16, 16, false, "fp16"},
      {"bf16", KvFormatKind::kBf16, 16, 16, false, "bf16"},
      {"fp8", KvFormatKind::kFp8, 8, 8, false, "fp8"},
      {"int8", KvFormatKind::kInt8, 8, 8, false, "int8"},
      {"kivi2", KvFormatKind::kKivi, 2, 2, false, "kivi2"},
      {"kivi4", KvFormatKind::kKivi, 4, 4, false, "kivi4"},
      {"tq4", KvFormatKind::kTurbo, 4, 4, false, "tq4"},
      {"tq3.5", KvFormatKind::kTurbo, 3.5, 3.5, false, "tq3.5"},
      {"tq3", KvFormatKind::kTurbo, 3, 3, false, "tq3"},
      {"tq2.5", KvFormatKind::kTurbo, 2.5, 2.5, false, "tq2.5"},
      {"tq:k=4,v=3", KvFormatKind::kTurbo, 4, 3, false, "tq:k=4,v=3"},
      {"tq:v=2.5,k=3.5,qjl", KvFormatKind::kTurbo, 3.5, 2.5, true, "tq:k=3.5,v=2.5,qjl"},
  };
  for (const Case& c : cases) {
    auto spec = ParseKvFormat(c.text);
    ASSERT_TRUE(spec.ok()) << c.text << ": " << spec.status();
    EXPECT_EQ(spec->kind, c.kind) << c.text;
    EXPECT_EQ(spec->key_bits, c.key_bits) << c.text;
    EXPECT_EQ(spec->value_bits, c.value_bits) << c.text;
    EXPECT_EQ(spec->qjl_keys, c.qjl) << c.text;
    EXPECT_EQ(spec->name, c.canonical) << c.text;
    auto again = ParseKvFormat(spec->name);  // canonical names parse to the same spec
    ASSERT_TRUE(again.ok());
    EXPECT_EQ(again->key_bits, spec->key_bits);
  }
  EXPECT_EQ(ParseKvFormat("kivi2")->group_size, 32);
  EXPECT_EQ(ParseKvFormat("kivi2")->residual_tokens, 128);
  // TurboQuant's fp16 window: 128 newest tokens by default, r= sets it (and names it).
  EXPECT_EQ(ParseKvFormat("tq4")->residual_tokens, 128);
  auto r0 = ParseKvFormat("tq:k=4,v=4,r=0");
  ASSERT_TRUE(r0.ok()) << r0.status();
  EXPECT_EQ(r0->residual_tokens, 0);
  EXPECT_EQ(r0->name, "tq:k=4,v=4,r=0");
  EXPECT_EQ(ParseKvFormat(r0->name)->residual_tokens, 0);
  EXPECT_EQ(ParseKvFormat("tq:k=4,v=4,r=128")->name, "tq:k=4,v=4");
  // Debiased norms by default; debias=0 keeps the plain norm correction (and names it).
  EXPECT_TRUE(ParseKvFormat("tq3.5")->tq_debias);
  auto plain = ParseKvFormat("tq:k=4,v=3,debias=0");
  ASSERT_TRUE(plain.ok()) << plain.status();
  EXPECT_FALSE(plain->tq_debias);
  EXPECT_EQ(plain->name, "tq:k=4,v=3,debias=0");
  EXPECT_FALSE(ParseKvFormat(plain->name)->tq_debias);
  EXPECT_EQ(ParseKvFormat("tq:k=4,v=3,debias=1")->name, "tq:k=4,v=3");
}

TEST(KvFormatTest, RejectsUnknownNamesWithTheAcceptedList) {
  for (const char* bad :
       {"", "fp32", "tq5", "tq:k=4", "tq:k=4,v=9", "tq:k=1,v=2,qjl", "tq:k=4,v=3,x=1",
        "tq:k=4,v=4,r=-1", "tq:k=4,v=4,r=x", "tq:k=4,v=4,debias=2", "kivi3", "TQ4"}) {
    auto spec = ParseKvFormat(bad);
    ASSERT_FALSE(spec.ok()) << bad;
    EXPECT_EQ(spec.status().code(), absl::StatusCode::kInvalidArgument) << bad;
  }
  EXPECT_NE(ParseKvFormat("fp32").status().message().find("kivi2"), std::string::npos);
}

TEST(KvFormatTest, ParsesEviction) {
  auto none = ParseEviction("none");
  ASSERT_TRUE(none.ok());
  EXPECT_EQ(none->kind, EvictionSpec::Kind::kNone);
  auto h2o = ParseEviction("h2o:heavy=0.05,recent=0.15");
  ASSERT_TRUE(h2o.ok());
  EXPECT_EQ(h2o->kind, EvictionSpec::Kind::kH2O);
  EXPECT_DOUBLE_EQ(h2o->heavy_fraction, 0.05);
  EXPECT_DOUBLE_EQ(h2o->recent_fraction, 0.15);
  EXPECT_EQ(EvictionToString(*h2o), "h2o:heavy=0.05,recent=0.15");
  auto sink = ParseEviction("sink:sinks=4,window=1024");
  ASSERT_TRUE(sink.ok());
  EXPECT_EQ(sink->kind, EvictionSpec::Kind::kSink);
  EXPECT_EQ(sink->sink_tokens, 4);
  EXPECT_EQ(sink->window_tokens, 1024);
  EXPECT_EQ(EvictionToString(*sink), "sink:sinks=4,window=1024");
  EXPECT_EQ(ParseEviction("h2o")->heavy_fraction, 0.1);  // defaults
  EXPECT_EQ(EvictionToString(*ParseEviction(EvictionToString(*h2o))), EvictionToString(*h2o));
  for (const char* bad : {"lru", "h2o:heavy=2", "h2o:sinks=4", "sink:window=-1", "sink:window",
                          "h2o:heavy=0,recent=0"}) {
    EXPECT_EQ(ParseEviction(bad).status().code(), absl::StatusCode::kInvalidArgument) << bad;
  }
}

TEST(KvFormatTest, DescribeUsesTheDispatchTable) {
  EXPECT_EQ(DescribeKvFormat(*ParseKvFormat("fp16"), 128)->bytes_per_token_per_head, 512);
  EXPECT_EQ(DescribeKvFormat(*ParseKvFormat("fp16"), 80)->bytes_per_token_per_head, 320);
  EXPECT_EQ(DescribeKvFormat(*ParseKvFormat("tq3"), 80).status().code(),
            absl::StatusCode::kUnimplemented);  // Hadamard needs a power of two
  EXPECT_EQ(DescribeKvFormat(*ParseKvFormat("kivi2"), 80).status().code(),
            absl::StatusCode::kUnimplemented);  // G = 32 must divide head_dim
  EXPECT_EQ(DescribeKvFormat(*ParseKvFormat("fp8"), 7).status().code(),
            absl::StatusCode::kUnimplemented);
  KvFormatSpec odd_kivi = *ParseKvFormat("kivi2");
  odd_kivi.residual_tokens = 100;  // not a multiple of G
  EXPECT_EQ(DescribeKvFormat(odd_kivi, 128).status().code(), absl::StatusCode::kUnimplemented);
}

TEST(KvFormatTest, FullPrecisionLayersSuffix) {
  auto spec = ParseKvFormat("tq4/fp16=2:1");
  ASSERT_TRUE(spec.ok()) << spec.status();
  EXPECT_EQ(spec->kind, KvFormatKind::kTurbo);
  EXPECT_EQ(spec->full_precision_first_layers, 2);
  EXPECT_EQ(spec->full_precision_last_layers, 1);
  EXPECT_EQ(spec->name, "tq4/fp16=2:1");
  // No layers kept: the plain name (what the worker reports and the policy compares).
  EXPECT_EQ(ParseKvFormat("kivi4/fp16=0:0")->name, "kivi4");
  EXPECT_EQ(ParseKvFormat("tq:k=4,v=3/fp16=1:1")->name, "tq:k=4,v=3/fp16=1:1");
  for (const char* bad : {"tq4/fp16=1", "tq4/fp16=1,1", "tq4/fp16=a:1", "tq4/fp16=-1:0",
                          "tq4/bf16=1:1", "nope/fp16=1:1"}) {
    EXPECT_EQ(ParseKvFormat(bad).status().code(), absl::StatusCode::kInvalidArgument) << bad;
  }
}

}  // namespace
}  // namespace kvgate::kernels
