// Mutation tests of every parser of untrusted input: request wire bytes, policy YAML, tokenizer
// JSON and text, safetensors files. Each round mutates a valid input (byte flips, insertions,
// deletions, truncation, splices of its own bytes, boundary integers) and feeds it to the parser,
// which must return a value or an error status with a message: never crash, hang or abort. Runs
// under ASan/UBSan with -DKVGATE_SANITIZE=ON. Seeds are fixed; KVGATE_FUZZ_ROUNDS scales the run.
#include <cstdint>
#include <cstdlib>
#include <fstream>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "gateway/policy/policy_loader.h"
#include "gtest/gtest.h"
#include "kvgate/common/tokenizer.h"
#include "proto/request_codec.h"
#include "workers/model/safetensors.h"

namespace kvgate {
namespace {

int Rounds(int base) {
  const char* env = std::getenv("KVGATE_FUZZ_ROUNDS");
  return env != nullptr ? std::atoi(env) : base;
}

std::string SourceDir() {
  const char* d = std::getenv("KVGATE_SOURCE_DIR");
  return d ? d : ".";
}

std::string ReadFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

// One random edit of `input`.
std::string Mutate(const std::string& input, std::mt19937_64& rng) {
  std::string s = input;
  auto pick = [&](size_t n) { return n == 0 ? 0 : static_cast<size_t>(rng() % n); };
  const int edits = 1 + static_cast<int>(rng() % 4);
  for (int e = 0; e < edits; ++e) {
    switch (rng() % 7) {
      case 0:  // flip a byte
        if (!s.empty()) s[pick(s.size())] ^= static_cast<char>(1 << (rng() % 8));
        break;
      case 1:  // random byte
        if (!s.empty()) s[pick(s.size())] = static_cast<char>(rng());
        break;
      case 2:  // insert bytes
        s.insert(pick(s.size() + 1), std::string(1 + rng() % 8, static_cast<char>(rng())));
        break;
      case 3:  // delete a run
        if (!s.empty()) {
          size_t at = pick(s.size());
          s.erase(at, 1 + rng() % 16);
        }
        break;
      case 4:  // truncate
        s.resize(pick(s.size() + 1));
        break;
      case 5:  // splice a piece of itself somewhere else
        if (s.size() > 4) {
          size_t from = pick(s.size()), len = 1 + pick(std::min<size_t>(64, s.size() - from));
          s.insert(pick(s.size() + 1), s.substr(from, len));
        }
        break;
      case 6: {  // boundary integers in text
        static const char* kNumbers[] = {"-1", "0", "4294967296", "-9223372036854775808",
                                         "99999999999999999999", "1e308", "nan"};
        s.insert(pick(s.size() + 1), kNumbers[rng() % 7]);
        break;
      }
    }
  }
  return s;
}

grpc::ByteBuffer Wire(const std::string& bytes) {
  grpc::Slice slice(bytes);
  return grpc::ByteBuffer(&slice, 1);
}

TEST(MutationTest, GenerateRequestDecoding) {
  kvgate::v1::GenerateRequest req;
  req.set_prompt("def f(x):\n    return x  # caf\xc3\xa9");
  req.mutable_sampling()->set_max_tokens(16);
  req.mutable_sampling()->set_temperature(0.7f);
  req.mutable_sampling()->add_stop_token_ids(3);
  req.set_task_type("legal");
  req.set_precision(kvgate::v1::PRECISION_FULL);
  req.set_tenant("acme");
  (*req.mutable_metadata())["k"] = "v";
  req.set_request_id("r");
  const std::string wire = req.SerializeAsString();
  std::mt19937_64 rng(1);
  int ok = 0, rejected = 0;
  for (int i = 0; i < Rounds(20000); ++i) {
    auto decoded = DecodeGenerateRequest(Wire(Mutate(wire, rng)));
    if (decoded.ok()) {
      ++ok;
      EXPECT_LT(FirstInvalidUtf8Offset(decoded->prompt()), 0);
    } else {
      ++rejected;
      EXPECT_EQ(decoded.status().code(), absl::StatusCode::kInvalidArgument);
      EXPECT_FALSE(decoded.status().message().empty());
    }
  }
  EXPECT_GT(ok, 0);
  EXPECT_GT(rejected, 0);
}

TEST(MutationTest, PolicyLoading) {
  const std::string path = SourceDir() + "/policies/default.yaml";
  const std::string text = ReadFile(path);
  ASSERT_FALSE(text.empty());
  std::mt19937_64 rng(2);
  int ok = 0, rejected = 0;
  for (int i = 0; i < Rounds(1500); ++i) {
    gateway::PolicyParseResult r = gateway::ParsePolicyText(Mutate(text, rng), path);
    if (r.errors.empty()) {
      ++ok;
      EXPECT_NE(r.policy, nullptr);
    } else {
      ++rejected;
      EXPECT_EQ(r.policy, nullptr);
      for (const auto& e : r.errors) EXPECT_FALSE(e.message.empty());
    }
  }
  EXPECT_GT(rejected, 0);
}

TEST(MutationTest, TokenizerJsonAndText) {
  const std::string json = ReadFile(SourceDir() + "/models/reference/tokenizer.json");
  ASSERT_FALSE(json.empty());
  auto tokenizer = Tokenizer::FromJson(json);
  ASSERT_TRUE(tokenizer.ok()) << tokenizer.status();
  std::mt19937_64 rng(3);
  // Mutated JSON: only the first 4 KB (the header, normalizer, pre-tokenizer and added tokens) and
  // a truncation point anywhere, so that each round stays cheap.
  for (int i = 0; i < Rounds(300); ++i) {
    std::string head = json.substr(0, 4096);
    std::string mutated = Mutate(head, rng) + json.substr(4096);
    if (rng() % 4 == 0) mutated.resize(rng() % mutated.size());
    auto t = Tokenizer::FromJson(mutated);
    if (!t.ok()) {
      EXPECT_FALSE(t.status().message().empty());
    }
  }
  // Arbitrary bytes as text: valid UTF-8 encodes and decodes back to itself (byte-level BPE, no
  // special tokens added), also when streamed; invalid UTF-8 is InvalidArgument.
  const std::string seed_text = "import os\n\tx = '\xf0\x9f\x98\x80' + \"\xe4\xb8\xad\" # <|begin_of_text|>";
  for (int i = 0; i < Rounds(3000); ++i) {
    std::string text = Mutate(seed_text, rng);
    auto ids = (*tokenizer)->Encode(text, {.add_special_tokens = false});
    if (FirstInvalidUtf8Offset(text) >= 0) {
      EXPECT_EQ(ids.status().code(), absl::StatusCode::kInvalidArgument);
      continue;
    }
    ASSERT_TRUE(ids.ok()) << ids.status();
    EXPECT_EQ((*tokenizer)->Decode(*ids), text);
    StreamDecoder stream(**tokenizer);
    std::string streamed;
    for (int32_t id : *ids) streamed += stream.Push(id);
    streamed += stream.Finish();
    EXPECT_EQ(streamed, text);
  }
}

// A small valid safetensors file: two F32 tensors and one BF16 tensor.
std::string SmallSafetensors() {
  const std::string header =
      R"({"a":{"dtype":"F32","shape":[2,3],"data_offsets":[0,24]},)"
      R"("b":{"dtype":"BF16","shape":[4],"data_offsets":[24,32]},)"
      R"("c":{"dtype":"F32","shape":[1],"data_offsets":[32,36]},"__metadata__":{"format":"pt"}})";
  std::string file(8, '\0');
  uint64_t n = header.size();
  for (int i = 0; i < 8; ++i) file[i] = static_cast<char>((n >> (8 * i)) & 0xff);
  file += header;
  for (int i = 0; i < 36; ++i) file += static_cast<char>(i * 7);
  return file;
}

TEST(MutationTest, SafetensorsFiles) {
  const std::string valid = SmallSafetensors();
  const std::string path = ::testing::TempDir() + "/mutation_" + std::to_string(getpid()) +
                           ".safetensors";
  {
    std::ofstream(path, std::ios::binary) << valid;
    auto f = worker::SafetensorsFile::Open(path);
    ASSERT_TRUE(f.ok()) << f.status();
    EXPECT_EQ((*f)->tensors().size(), 3u);
  }
  std::mt19937_64 rng(4);
  int ok = 0, rejected = 0;
  for (int i = 0; i < Rounds(2000); ++i) {
    std::string mutated = Mutate(valid, rng);
    if (rng() % 3 == 0 && mutated.size() >= 8) {  // a hostile header length
      uint64_t n = rng() % 5 == 0 ? ~uint64_t{0} : rng() % (mutated.size() * 2 + 1);
      for (int b = 0; b < 8; ++b) mutated[b] = static_cast<char>((n >> (8 * b)) & 0xff);
    }
    { std::ofstream(path, std::ios::binary | std::ios::trunc) << mutated; }
    auto f = worker::SafetensorsFile::Open(path);
    if (!f.ok()) {
      ++rejected;
      EXPECT_FALSE(f.status().message().empty());
      continue;
    }
    ++ok;
    for (const worker::TensorView& t : (*f)->tensors()) {
      std::vector<float> out(static_cast<size_t>(std::max<int64_t>(t.num_elements(), 0)));
      (void)worker::ConvertToFloat32(t, out.data());
    }
  }
  std::remove(path.c_str());
  EXPECT_GT(ok, 0);
  EXPECT_GT(rejected, 0);
}

}  // namespace
}  // namespace kvgate
