// GatewayService: the public kvgate.v1.Gateway API (gRPC callback API).
//
// Generate: validate -> tokenize once with the served model's tokenizer -> ScoreRequest under the
// current policy snapshot -> try the decision's pools in order: pick an endpoint, stream from its
// worker (token ids in, token ids out; the gateway decodes text). A pool is left for the next when
// it has no eligible endpoint, is full, cannot hold the context, or its worker fails before the
// first token (as the policy's fallback triggers allow). Once a token has reached the client, a
// worker failure ends the stream with ABORTED naming how many tokens were delivered. The last chunk
// carries RouteInfo: pool, KV format, worker, matched rule, fallbacks and why.
//
//   GatewayService service({.policy = [&] { return store.Current(); }, .tokenizer = tok.get(),
//                           .pools = &registry, .prober = &prober, .metrics = &metrics, .model_name = "tiny"});
//   builder.RegisterService(&service);
#pragma once

#include <atomic>
#include <functional>
#include <memory>
#include <string>

#include "gateway/policy/policy.h"
#include "gateway/server/gateway_metrics.h"
#include "gateway/pool/pool_registry.h"
#include "gateway/server/worker_prober.h"
#include "kvgate/common/tokenizer.h"
#include "kvgate/v1/gateway.grpc.pb.h"

namespace kvgate::gateway {

struct GatewayServiceOptions {
  // Current policy snapshot (never null once the gateway serves).
  std::function<std::shared_ptr<const Policy>()> policy;
  const Tokenizer* tokenizer = nullptr;
  PoolRegistry* pools = nullptr;
  WorkerProber* prober = nullptr;  // channels to workers
  GatewayMetrics* metrics = nullptr;  // optional
  std::string model_name;
  int default_max_tokens = 16;
  int64_t max_prompt_bytes = 8 << 20;
};

// Served on raw ByteBuffers: requests are decoded leniently (proto/request_codec.h) so that a
// malformed message or invalid UTF-8 in any text field is INVALID_ARGUMENT naming the field.
class GatewayService
    : public kvgate::v1::Gateway::WithRawCallbackMethod_Generate<
          kvgate::v1::Gateway::WithRawCallbackMethod_Route<
              kvgate::v1::Gateway::WithRawCallbackMethod_CountTokens<kvgate::v1::Gateway::Service>>> {
 public:
  explicit GatewayService(GatewayServiceOptions options);

  grpc::ServerWriteReactor<grpc::ByteBuffer>* Generate(grpc::CallbackServerContext* ctx,
                                                       const grpc::ByteBuffer* request) override;
  grpc::ServerUnaryReactor* Route(grpc::CallbackServerContext* ctx,
                                  const grpc::ByteBuffer* request,
                                  grpc::ByteBuffer* response) override;
  grpc::ServerUnaryReactor* CountTokens(grpc::CallbackServerContext* ctx,
                                        const grpc::ByteBuffer* request,
                                        grpc::ByteBuffer* response) override;

  const GatewayServiceOptions& options() const { return options_; }
  // Generate streams in progress (for draining).
  int64_t active_streams() const { return active_streams_.load(); }

 private:
  GatewayServiceOptions options_;
  std::atomic<int64_t> active_streams_{0};
};

}  // namespace kvgate::gateway
