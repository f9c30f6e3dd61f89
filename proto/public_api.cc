#include "proto/public_api.h"

#include "absl/strings/str_cat.h"
#include "proto/request_codec.h"

namespace kvgate {

absl::StatusOr<kvgate::v1::CountTokensResponse> AnswerCountTokens(const grpc::ByteBuffer& wire,
                                                                  const Tokenizer& tokenizer,
                                                                  int64_t max_prompt_bytes,
                                                                  const std::string& model) {
  auto request = DecodeCountTokensRequest(wire);
  if (!request.ok()) return request.status();
  if (static_cast<int64_t>(request->prompt().size()) > max_prompt_bytes) {
    return absl::InvalidArgumentError(absl::StrCat("prompt of ", request->prompt().size(),
                                                   " bytes exceeds the limit of ",
                                                   max_prompt_bytes, " bytes"));
  }
  auto ids = tokenizer.Encode(request->prompt(), {.add_special_tokens = !request->no_bos()});
  if (!ids.ok()) return ids.status();
  kvgate::v1::CountTokensResponse response;
  response.set_count(static_cast<int32_t>(ids->size()));
  if (request->return_ids()) *response.mutable_token_ids() = {ids->begin(), ids->end()};
  response.set_model(model);
  return response;
}

}  // namespace kvgate
