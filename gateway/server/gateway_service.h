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

class GatewayService : public kvgate::v1::Gateway::CallbackService {
 public:
  explicit GatewayService(GatewayServiceOptions options);

  grpc::ServerWriteReactor<kvgate::v1::GenerateChunk>* Generate(
      grpc::CallbackServerContext* ctx, const kvgate::v1::GenerateRequest* request) override;
  grpc::ServerUnaryReactor* Route(grpc::CallbackServerContext* ctx,
                                  const kvgate::v1::GenerateRequest* request,
                                  kvgate::v1::RouteResponse* response) override;
  grpc::ServerUnaryReactor* CountTokens(grpc::CallbackServerContext* ctx,
                                        const kvgate::v1::CountTokensRequest* request,
                                        kvgate::v1::CountTokensResponse* response) override;

  const GatewayServiceOptions& options() const { return options_; }

 private:
  GatewayServiceOptions options_;
};

}  // namespace kvgate::gateway
