// Safetensors reading: dtype conversion, and every kind of malformed file or index giving an
// InvalidArgumentError that names the file (and tensor) instead of a crash. Files are written by
// hand into a temporary folder.

#include <cmath>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "workers/model/safetensors.h"

namespace kvgate::worker {
namespace {

namespace fs = std::filesystem;
using ::testing::HasSubstr;

std::string Bytes(const void* data, size_t n) {
  return std::string(static_cast<const char*>(data), n);
}

// u64 LE header length + header + data.
std::string SafetensorsBlob(const std::string& header, const std::string& data) {
  std::string blob;
  uint64_t n = header.size();
  for (int i = 0; i < 8; ++i) blob.push_back(static_cast<char>((n >> (8 * i)) & 0xff));
  return blob + header + data;
}

class SafetensorsTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = fs::path(::testing::TempDir()) /
           ("kvgate_st_" +
            std::string(::testing::UnitTest::GetInstance()->current_test_info()->name()));
    fs::remove_all(dir_);
    fs::create_directories(dir_);
  }
  std::string Write(const std::string& name, const std::string& contents) {
    const fs::path path = dir_ / name;
    std::ofstream(path, std::ios::binary) << contents;
    return path.string();
  }
  // Opens `contents` as one file and returns the error (OK if it opened).
  absl::Status OpenError(const std::string& contents) {
    return SafetensorsFile::Open(Write("t.safetensors", contents)).status();
  }
  void ExpectInvalid(const std::string& contents, const std::string& message) {
    absl::Status status = OpenError(contents);
    EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument) << status;
    EXPECT_THAT(status.message(), HasSubstr("t.safetensors")) << status;
    EXPECT_THAT(status.message(), HasSubstr(message)) << status;
  }

  fs::path dir_;
};

TEST_F(SafetensorsTest, ConvertsF32F16AndBf16) {
  const float f32[3] = {1.5f, -2.25f, 3e-5f};
  // F16: 1.0, -2.0, 65504 (max), smallest subnormal 2^-24, +inf.
  const uint16_t f16[5] = {0x3c00, 0xc000, 0x7bff, 0x0001, 0x7c00};
  // BF16: 1.0, -0.5, 3.140625.
  const uint16_t bf16[3] = {0x3f80, 0xbf00, 0x4049};
  const std::string data = Bytes(f32, 12) + Bytes(f16, 10) + Bytes(bf16, 6);
  const std::string header =
      R"({"__metadata__": {"format": "pt"},
          "a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 12]},
          "b": {"dtype": "F16", "shape": [5, 1], "data_offsets": [12, 22]},
          "c": {"dtype": "BF16", "shape": [1, 3], "data_offsets": [22, 28]}})";
  auto file = SafetensorsFile::Open(Write("ok.safetensors", SafetensorsBlob(header, data)));
  ASSERT_TRUE(file.ok()) << file.status();
  ASSERT_EQ((*file)->tensors().size(), 3u);
  const TensorView* a = (*file)->Find("a");
  const TensorView* b = (*file)->Find("b");
  const TensorView* c = (*file)->Find("c");
  ASSERT_TRUE(a && b && c);
  EXPECT_EQ((*file)->Find("d"), nullptr);
  EXPECT_EQ(b->shape, (std::vector<int64_t>{5, 1}));
  std::vector<float> out(5);
  ASSERT_TRUE(ConvertToFloat32(*a, out.data()).ok());
  EXPECT_EQ(out[0], 1.5f);
  EXPECT_EQ(out[1], -2.25f);
  EXPECT_EQ(out[2], 3e-5f);
  ASSERT_TRUE(ConvertToFloat32(*b, out.data()).ok());
  EXPECT_EQ(out[0], 1.0f);
  EXPECT_EQ(out[1], -2.0f);
  EXPECT_EQ(out[2], 65504.0f);
  EXPECT_EQ(out[3], std::ldexp(1.0f, -24));
  EXPECT_TRUE(std::isinf(out[4]) && out[4] > 0);
  ASSERT_TRUE(ConvertToFloat32(*c, out.data()).ok());
  EXPECT_EQ(out[0], 1.0f);
  EXPECT_EQ(out[1], -0.5f);
  EXPECT_EQ(out[2], 3.140625f);
}

TEST_F(SafetensorsTest, TooSmallForTheHeaderLength) {
  ExpectInvalid("", "too small");
  ExpectInvalid("\x10\x00\x00", "too small");
}

TEST_F(SafetensorsTest, HeaderLengthBeyondTheFile) {
  std::string blob = SafetensorsBlob("{}", "");
  blob[0] = 100;
  ExpectInvalid(blob, "header length 100 goes beyond the file size 10");
  blob = std::string(7, '\xff') + '\x7f' + "{}";  // 2^63 - 1
  ExpectInvalid(blob, "goes beyond the file size");
}

TEST_F(SafetensorsTest, HeaderNotJsonOrNotAnObject) {
  ExpectInvalid(SafetensorsBlob("{\"a\": {\"dtype\": ", ""), "header is not valid JSON");
  ExpectInvalid(SafetensorsBlob("[1, 2]", ""), "not a JSON object");
  ExpectInvalid(SafetensorsBlob(R"({"a": 5})", ""), "tensor 'a': header entry is not an object");
}

TEST_F(SafetensorsTest, TruncatedData) {
  const std::string header = R"({"w": {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 64]}})";
  ExpectInvalid(SafetensorsBlob(header, std::string(40, '\0')),
                "tensor 'w': data_offsets [0, 64] outside the data section of 40 bytes");
}

TEST_F(SafetensorsTest, BadOffsets) {
  ExpectInvalid(SafetensorsBlob(R"({"w": {"dtype": "F32", "shape": [1], "data_offsets": [8, 4]}})",
                                std::string(16, '\0')),
                "outside the data section");
  ExpectInvalid(SafetensorsBlob(R"({"w": {"dtype": "F32", "shape": [1], "data_offsets": [-4, 0]}})",
                                std::string(16, '\0')),
                "'data_offsets' must be two non-negative integers");
  ExpectInvalid(SafetensorsBlob(R"({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0]}})",
                                std::string(16, '\0')),
                "'data_offsets' must be two non-negative integers");
  ExpectInvalid(
      SafetensorsBlob(
          R"({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 18446744073709551615]}})",
          std::string(16, '\0')),
      "outside the data section");
}

TEST_F(SafetensorsTest, OverlappingTensors) {
  ExpectInvalid(SafetensorsBlob(R"({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                                    "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}})",
                                std::string(16, '\0')),
                "tensors 'a' and 'b' have overlapping data_offsets");
}

TEST_F(SafetensorsTest, ShapeDisagreesWithByteRange) {
  ExpectInvalid(
      SafetensorsBlob(R"({"w": {"dtype": "BF16", "shape": [3, 2], "data_offsets": [0, 8]}})",
                      std::string(16, '\0')),
      "tensor 'w': shape [3, 2] of BF16 needs 12 bytes but data_offsets span 8");
  ExpectInvalid(
      SafetensorsBlob(R"({"w": {"dtype": "F32", "shape": [4294967296, 4294967296, 4294967296],
                                "data_offsets": [0, 8]}})",
                      std::string(16, '\0')),
      "too large");
  ExpectInvalid(SafetensorsBlob(R"({"w": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}})",
                                std::string(16, '\0')),
                "bad shape");
}

TEST_F(SafetensorsTest, UnknownAndUnsupportedDtypes) {
  ExpectInvalid(SafetensorsBlob(R"({"w": {"dtype": "Q4_K", "shape": [2], "data_offsets": [0, 2]}})",
                                std::string(8, '\0')),
                "tensor 'w': unknown dtype 'Q4_K'");
  // A known non-float dtype opens (files may hold integer buffers) but cannot be used as weights.
  auto file = SafetensorsFile::Open(
      Write("i64.safetensors",
            SafetensorsBlob(R"({"ids": {"dtype": "I64", "shape": [2], "data_offsets": [0, 16]}})",
                            std::string(16, '\0'))));
  ASSERT_TRUE(file.ok()) << file.status();
  std::vector<float> out(2);
  absl::Status status = ConvertToFloat32(*(*file)->Find("ids"), out.data());
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(status.message(), HasSubstr("i64.safetensors: tensor 'ids' has dtype I64"));
}

TEST_F(SafetensorsTest, MissingFile) {
  auto file = SafetensorsFile::Open((dir_ / "absent.safetensors").string());
  EXPECT_EQ(file.status().code(), absl::StatusCode::kNotFound);
  auto model = SafetensorsModel::Open(dir_.string());
  EXPECT_EQ(model.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(model.status().message(), HasSubstr("neither model.safetensors"));
}

TEST_F(SafetensorsTest, ModelGetChecksPresenceAndShape) {
  Write("model.safetensors",
        SafetensorsBlob(R"({"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}})",
                        std::string(16, '\0')));
  auto model = SafetensorsModel::Open(dir_.string());
  ASSERT_TRUE(model.ok()) << model.status();
  const int64_t good[] = {2, 2};
  const int64_t bad[] = {4};
  EXPECT_TRUE(model->Get("w", good).ok());
  auto wrong = model->Get("w", bad);
  EXPECT_EQ(wrong.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(wrong.status().message(),
              HasSubstr("model.safetensors: tensor 'w' has shape [2, 2] but the config needs [4]"));
  auto missing = model->Get("lm_head.weight");
  EXPECT_EQ(missing.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(missing.status().message(), HasSubstr("missing tensor 'lm_head.weight'"));
}

class ShardedTest : public SafetensorsTest {
 protected:
  void WriteShards() {
    const float a[2] = {1, 2};
    const float b[3] = {3, 4, 5};
    Write("model-00001-of-00002.safetensors",
          SafetensorsBlob(R"({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}})",
                          Bytes(a, 8)));
    Write("model-00002-of-00002.safetensors",
          SafetensorsBlob(R"({"b": {"dtype": "F32", "shape": [3], "data_offsets": [0, 12]}})",
                          Bytes(b, 12)));
  }
  absl::Status IndexError(const std::string& index) {
    Write("model.safetensors.index.json", index);
    return SafetensorsModel::Open(dir_.string()).status();
  }
};

TEST_F(ShardedTest, JoinsShardsThroughTheIndex) {
  WriteShards();
  Write("model.safetensors.index.json",
        R"({"metadata": {"total_size": 20}, "weight_map": {
            "a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}})");
  auto model = SafetensorsModel::Open(dir_.string());
  ASSERT_TRUE(model.ok()) << model.status();
  EXPECT_EQ(model->num_tensors(), 2u);
  auto b = model->Get("b");
  ASSERT_TRUE(b.ok());
  std::vector<float> out(3);
  ASSERT_TRUE(ConvertToFloat32(**b, out.data()).ok());
  EXPECT_EQ(out, (std::vector<float>{3, 4, 5}));
}

TEST_F(ShardedTest, IndexPointingToAMissingFile) {
  WriteShards();
  absl::Status status = IndexError(R"({"weight_map": {"a": "model-00001-of-00002.safetensors",
                                                       "c": "model-00003-of-00003.safetensors"}})");
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(status.message(), HasSubstr("model.safetensors.index.json: shard "
                                          "'model-00003-of-00003.safetensors' (holding 'c')"));
}

TEST_F(ShardedTest, IndexPointingToTheWrongShard) {
  WriteShards();
  absl::Status status = IndexError(R"({"weight_map": {"a": "model-00002-of-00002.safetensors"}})");
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(status.message(),
              HasSubstr("puts 'a' in 'model-00002-of-00002.safetensors' but that file has no "
                        "such tensor"));
}

TEST_F(ShardedTest, MalformedIndexes) {
  WriteShards();
  const std::pair<const char*, const char*> cases[] = {
      {"{not json", "not a valid JSON object"},
      {R"({"metadata": {}})", "missing or empty 'weight_map'"},
      {R"({"weight_map": {"a": 3}})", "is not a file name"},
      {R"({"weight_map": {"a": "../model-00001-of-00002.safetensors"}})", "invalid file"},
      {R"({"weight_map": {"a": "/etc/passwd"}})", "invalid file"},
  };
  for (const auto& [index, message] : cases) {
    absl::Status status = IndexError(index);
    EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument) << index;
    EXPECT_THAT(status.message(), HasSubstr(message)) << index;
  }
}

TEST_F(ShardedTest, CorruptShardIsNamed) {
  WriteShards();
  Write("model-00002-of-00002.safetensors", SafetensorsBlob("{\"b\": ", ""));
  absl::Status status = IndexError(R"({"weight_map": {"a": "model-00001-of-00002.safetensors",
                                                       "b": "model-00002-of-00002.safetensors"}})");
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(status.message(), HasSubstr("model-00002-of-00002.safetensors: header is not valid"));
}

}  // namespace
}  // namespace kvgate::worker
