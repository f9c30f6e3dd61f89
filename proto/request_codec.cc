#include "proto/request_codec.h"

#include <string>
#include <vector>

#include <grpcpp/support/proto_buffer_writer.h>

#include "absl/strings/str_cat.h"
#include "kvgate/internal/lenient.pb.h"

namespace kvgate {
namespace {

absl::StatusOr<std::string> Flatten(const grpc::ByteBuffer& buffer) {
  std::vector<grpc::Slice> slices;
  if (!buffer.Dump(&slices).ok()) return absl::InvalidArgumentError("unreadable request");
  std::string bytes;
  bytes.reserve(buffer.Length());
  for (const auto& s : slices) bytes.append(reinterpret_cast<const char*>(s.begin()), s.size());
  return bytes;
}

absl::Status CheckText(const char* field, const std::string& value) {
  long bad = FirstInvalidUtf8Offset(value);
  if (bad < 0) return absl::OkStatus();
  return absl::InvalidArgumentError(
      absl::StrCat(field, " is not valid UTF-8 (invalid byte at offset ", bad, ")"));
}

}  // namespace

long FirstInvalidUtf8Offset(std::string_view text) {
  const auto* s = reinterpret_cast<const unsigned char*>(text.data());
  const size_t n = text.size();
  size_t i = 0;
  while (i < n) {
    unsigned char c = s[i];
    if (c < 0x80) {
      ++i;
      continue;
    }
    int len;
    uint32_t cp;
    if (c >= 0xC2 && c <= 0xDF) {
      len = 2;
      cp = c & 0x1F;
    } else if (c >= 0xE0 && c <= 0xEF) {
      len = 3;
      cp = c & 0x0F;
    } else if (c >= 0xF0 && c <= 0xF4) {
      len = 4;
      cp = c & 0x07;
    } else {
      return static_cast<long>(i);
    }
    if (i + len > n) return static_cast<long>(i);
    for (int k = 1; k < len; ++k) {
      if ((s[i + k] & 0xC0) != 0x80) return static_cast<long>(i);
      cp = (cp << 6) | (s[i + k] & 0x3F);
    }
    if ((len == 3 && cp < 0x800) || (len == 4 && (cp < 0x10000 || cp > 0x10FFFF)) ||
        (cp >= 0xD800 && cp <= 0xDFFF)) {
      return static_cast<long>(i);
    }
    i += len;
  }
  return -1;
}

absl::StatusOr<kvgate::v1::GenerateRequest> DecodeGenerateRequest(const grpc::ByteBuffer& buffer) {
  auto bytes = Flatten(buffer);
  if (!bytes.ok()) return bytes.status();
  kvgate::internal::LenientGenerateRequest lenient;
  if (!lenient.ParseFromString(*bytes)) {
    return absl::InvalidArgumentError("malformed GenerateRequest (not a valid protobuf message)");
  }
  for (auto [field, value] : {std::pair<const char*, const std::string*>{"prompt", &lenient.prompt()},
                              {"task_type", &lenient.task_type()},
                              {"tenant", &lenient.tenant()},
                              {"request_id", &lenient.request_id()}}) {
    if (absl::Status s = CheckText(field, *value); !s.ok()) return s;
  }
  kvgate::v1::GenerateRequest req;
  for (const auto& entry : lenient.metadata()) {
    if (absl::Status s = CheckText("metadata key", entry.key()); !s.ok()) return s;
    if (absl::Status s = CheckText("metadata value", entry.value()); !s.ok()) return s;
    (*req.mutable_metadata())[entry.key()] = entry.value();
  }
  req.set_prompt(lenient.prompt());
  *req.mutable_sampling() = lenient.sampling();
  req.set_task_type(lenient.task_type());
  if (!kvgate::v1::Precision_IsValid(lenient.precision())) {
    return absl::InvalidArgumentError(absl::StrCat("unknown precision ", lenient.precision()));
  }
  req.set_precision(static_cast<kvgate::v1::Precision>(lenient.precision()));
  req.set_tenant(lenient.tenant());
  req.set_request_id(lenient.request_id());
  req.set_no_bos(lenient.no_bos());
  return req;
}

absl::StatusOr<kvgate::v1::CountTokensRequest> DecodeCountTokensRequest(
    const grpc::ByteBuffer& buffer) {
  auto bytes = Flatten(buffer);
  if (!bytes.ok()) return bytes.status();
  kvgate::internal::LenientCountTokensRequest lenient;
  if (!lenient.ParseFromString(*bytes)) {
    return absl::InvalidArgumentError("malformed CountTokensRequest (not a valid protobuf message)");
  }
  if (absl::Status s = CheckText("prompt", lenient.prompt()); !s.ok()) return s;
  kvgate::v1::CountTokensRequest req;
  req.set_prompt(lenient.prompt());
  req.set_no_bos(lenient.no_bos());
  req.set_return_ids(lenient.return_ids());
  return req;
}

void EncodeMessage(const google::protobuf::Message& message, grpc::ByteBuffer* buffer) {
  std::string bytes = message.SerializeAsString();
  grpc::Slice slice(bytes);
  *buffer = grpc::ByteBuffer(&slice, 1);
}

}  // namespace kvgate
