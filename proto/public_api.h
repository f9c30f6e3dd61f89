// Pieces of the public kvgate.v1.Gateway API that the gateway and a worker serving it directly
// implement identically.
//
//   auto response = AnswerCountTokens(*wire, *tokenizer, max_prompt_bytes, "reference");
//   if (response.ok()) EncodeMessage(*response, wire_response);
#pragma once

#include <cstdint>
#include <string>

#include <grpcpp/support/byte_buffer.h>

#include "absl/status/statusor.h"
#include "kvgate/common/tokenizer.h"
#include "kvgate/v1/gateway.pb.h"

namespace kvgate {

// CountTokens on a raw request: lenient decoding (invalid UTF-8 is INVALID_ARGUMENT), a size limit,
// and the exact count with the served model's tokenizer (BOS added unless no_bos).
absl::StatusOr<kvgate::v1::CountTokensResponse> AnswerCountTokens(const grpc::ByteBuffer& wire,
                                                                  const Tokenizer& tokenizer,
                                                                  int64_t max_prompt_bytes,
                                                                  const std::string& model);

}  // namespace kvgate
