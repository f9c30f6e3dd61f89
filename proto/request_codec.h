// Decoding of untrusted public requests and encoding of responses for the raw (ByteBuffer)
// callback methods of kvgate.v1.Gateway. Requests are parsed through the `bytes` mirrors of
// kvgate/internal/lenient.proto so that invalid UTF-8 becomes INVALID_ARGUMENT with the field and
// offset, and a malformed message becomes INVALID_ARGUMENT too (never a crash, never a vague code).
//
//   absl::StatusOr<kvgate::v1::GenerateRequest> req = DecodeGenerateRequest(*byte_buffer);
//   grpc::ByteBuffer out; EncodeMessage(chunk, &out);
#pragma once

#include <string_view>

#include <grpcpp/support/byte_buffer.h>

#include "absl/status/statusor.h"
#include "google/protobuf/message.h"
#include "kvgate/v1/gateway.pb.h"

namespace kvgate {

absl::StatusOr<kvgate::v1::GenerateRequest> DecodeGenerateRequest(const grpc::ByteBuffer& buffer);
absl::StatusOr<kvgate::v1::CountTokensRequest> DecodeCountTokensRequest(
    const grpc::ByteBuffer& buffer);

// Serializes `message` into `buffer` (replacing its contents).
void EncodeMessage(const google::protobuf::Message& message, grpc::ByteBuffer* buffer);

// Offset of the first byte that is not part of a valid UTF-8 sequence (overlongs, surrogates and
// code points above U+10FFFF are invalid), or -1 when all of `text` is valid.
long FirstInvalidUtf8Offset(std::string_view text);

}  // namespace kvgate
