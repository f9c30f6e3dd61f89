#include "gateway/server/gateway_service.h"

#include <atomic>
#include <chrono>
#include <optional>
#include <utility>
#include <vector>

#include "absl/random/random.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/synchronization/mutex.h"
#include "gateway/score/request_scorer.h"
#include "gateway/score/route_info.h"
#include "kvgate/common/grpc_status.h"
#include "kvgate/common/log.h"
#include "kvgate/v1/worker.grpc.pb.h"
#include "proto/public_api.h"
#include "proto/request_codec.h"

namespace kvgate::gateway {
namespace {

namespace pb = ::kvgate::v1;
using SteadyClock = std::chrono::steady_clock;

constexpr size_t kMaxIdBytes = 128;
constexpr size_t kMaxMetadataBytes = 256;

double SecondsSince(SteadyClock::time_point t) {
  return std::chrono::duration<double>(SteadyClock::now() - t).count();
}

std::string LowerCodeName(grpc::StatusCode code) {
  std::string name = absl::StatusCodeToString(static_cast<absl::StatusCode>(code));
  for (char& c : name) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  return name;
}

std::string NewRequestId() {
  static std::atomic<uint64_t> counter{0};
  static const uint64_t prefix = absl::BitGen()() & 0xffffff;
  return absl::StrFormat("gw-%06x-%d", prefix, counter.fetch_add(1) + 1);
}

RequestedPrecision PrecisionOf(pb::Precision p) {
  switch (p) {
    case pb::PRECISION_FULL:
      return RequestedPrecision::kFull;
    case pb::PRECISION_COMPRESSED:
      return RequestedPrecision::kCompressed;
    default:
      return RequestedPrecision::kUnspecified;
  }
}

// Validation, tokenization and the routing decision: everything before forwarding.
struct Scored {
  std::shared_ptr<const Policy> policy;
  std::string request_id;
  std::vector<int32_t> ids;
  RouteDecision decision;
  int64_t overhead_us = 0;
};

// Request headers that policy `metadata:` rules can match: ASCII-valued client metadata, minus the
// transport's own (":authority", "grpc-*", "user-agent", "content-type", "te", binary "-bin").
bool IsRoutableHeader(const std::string& key) {
  if (key.empty() || key[0] == ':' || key.rfind("grpc-", 0) == 0) return false;
  if (key == "user-agent" || key == "content-type" || key == "te") return false;
  return !(key.size() > 4 && key.compare(key.size() - 4, 4, "-bin") == 0);
}

absl::StatusOr<Scored> ScoreAndRoute(const GatewayServiceOptions& opts,
                                     const grpc::CallbackServerContext& ctx,
                                     const pb::GenerateRequest& req) {
  const auto t0 = SteadyClock::now();
  Scored s;
  s.request_id = req.request_id().empty() ? NewRequestId() : req.request_id();
  auto invalid = [&](const std::string& what) {
    return absl::InvalidArgumentError(absl::StrCat("request ", s.request_id, ": ", what));
  };
  if (req.request_id().size() > kMaxIdBytes) return invalid("request_id longer than 128 bytes");
  if (req.prompt().empty()) return invalid("empty prompt");
  if (static_cast<int64_t>(req.prompt().size()) > opts.max_prompt_bytes) {
    return invalid(absl::StrFormat("prompt of %d bytes exceeds the limit of %d bytes",
                                   req.prompt().size(), opts.max_prompt_bytes));
  }
  if (req.tenant().size() > kMaxIdBytes) return invalid("tenant longer than 128 bytes");
  for (const auto& [k, v] : req.metadata()) {
    if (k.size() > kMaxMetadataBytes || v.size() > kMaxMetadataBytes) {
      return invalid("metadata keys and values must be at most 256 bytes");
    }
  }
  if (req.sampling().max_tokens() < 0) return invalid("max_tokens must be >= 0");
  s.policy = opts.policy();
  if (s.policy == nullptr) return absl::UnavailableError("gateway has no policy loaded");
  auto ids = opts.tokenizer->Encode(req.prompt(), {.add_special_tokens = !req.no_bos()});
  if (!ids.ok()) return invalid(std::string(ids.status().message()));
  s.ids = *std::move(ids);

  RouteRequest rr;
  rr.prompt_text = req.prompt();
  rr.prompt_tokens = static_cast<int64_t>(s.ids.size());
  rr.max_tokens = req.sampling().max_tokens() > 0 ? req.sampling().max_tokens()
                                                  : opts.default_max_tokens;
  rr.task_type = req.task_type();
  rr.precision = PrecisionOf(req.precision());
  rr.tenant = req.tenant();
  for (const auto& [k, v] : ctx.client_metadata()) {
    std::string key(k.data(), k.size());
    if (!IsRoutableHeader(key) || v.size() > kMaxMetadataBytes) continue;
    rr.metadata[key] = std::string(v.data(), v.size());
  }
  for (const auto& [k, v] : req.metadata()) rr.metadata[k] = v;  // the request's fields win
  auto decision = ScoreRequest(*s.policy, rr);
  if (!decision.ok()) {
    return absl::Status(decision.status().code(),
                        absl::StrCat("request ", s.request_id, ": ", decision.status().message()));
  }
  s.decision = *std::move(decision);
  s.overhead_us =
      std::chrono::duration_cast<std::chrono::microseconds>(SteadyClock::now() - t0).count();
  if (opts.metrics != nullptr) {
    opts.metrics->RoutingOverhead(s.overhead_us * 1e-6);
    opts.metrics->RouteDecision(s.decision.matched_route);
  }
  return s;
}

class ForwardReactor;

// One streaming call to a worker. Reads one chunk at a time: the next read starts only after the
// previous chunk reached the client (end-to-end backpressure).
class WorkerCall : public grpc::ClientReadReactor<pb::GenerateChunk> {
 public:
  WorkerCall(ForwardReactor* parent, std::string pool, std::string endpoint,
             std::string kv_format)
      : parent_(parent),
        pool_(std::move(pool)),
        endpoint_(std::move(endpoint)),
        kv_format_(std::move(kv_format)) {}

  void Start(pb::Worker::Stub* stub, const pb::WorkerGenerateRequest& request,
             std::chrono::system_clock::time_point deadline) {
    request_ = request;
    if (deadline != std::chrono::system_clock::time_point::max()) ctx_.set_deadline(deadline);
    stub->async()->Generate(&ctx_, &request_, this);
    StartRead(&chunk_);
    StartCall();
  }
  void ReadNext() { StartRead(&chunk_); }
  void Cancel() { ctx_.TryCancel(); }

  void OnReadDone(bool ok) override;
  void OnDone(const grpc::Status& status) override;

  const std::string& pool() const { return pool_; }
  const std::string& endpoint() const { return endpoint_; }
  const std::string& kv_format() const { return kv_format_; }

 private:
  ForwardReactor* parent_;
  std::string pool_, endpoint_, kv_format_;
  grpc::ClientContext ctx_;
  pb::WorkerGenerateRequest request_;
  pb::GenerateChunk chunk_;
};

class ForwardReactor : public grpc::ServerWriteReactor<grpc::ByteBuffer> {
 public:
  ForwardReactor(const GatewayServiceOptions& opts, std::atomic<int64_t>* active,
                 grpc::CallbackServerContext* ctx, const pb::GenerateRequest& req, Scored scored)
      : opts_(opts),
        active_streams_(active),
        deadline_(ctx->deadline()),
        scored_(std::move(scored)),
        decoder_(*opts.tokenizer, DecodeOptions{.skip_special_tokens = true}),
        arrival_(SteadyClock::now()) {
    worker_request_.set_request_id(scored_.request_id);
    *worker_request_.mutable_prompt_token_ids() = {scored_.ids.begin(), scored_.ids.end()};
    *worker_request_.mutable_sampling() = req.sampling();
    worker_request_.mutable_sampling()->set_max_tokens(
        static_cast<int32_t>(scored_.decision.max_tokens));
    worker_request_.set_return_text(false);
    record_.task_type = scored_.decision.task.task_type;
    record_.prompt_tokens = scored_.decision.prompt_tokens;
    active_streams_->fetch_add(1);
  }
  ~ForwardReactor() override { active_streams_->fetch_sub(1); }

  void Start() { TryNextPool(); }

  void OnCancel() override {
    absl::MutexLock lock(&mu_);
    cancelled_ = true;
    if (active_ != nullptr) active_->Cancel();
  }

  void OnWriteDone(bool ok) override {
    WorkerCall* call;
    std::optional<grpc::Status> worker_status;
    {
      absl::MutexLock lock(&mu_);
      write_in_flight_ = false;
      if (!ok) client_gone_ = true;
      call = active_;
      worker_status = std::move(deferred_worker_status_);
      deferred_worker_status_.reset();
    }
    if (worker_status) {
      // The worker stream ended while this write was in flight.
      HandleWorkerDone(deferred_call_, *worker_status);
      return;
    }
    if (!ok) call->Cancel();
    call->ReadNext();  // after a cancel it completes with ok=false, then OnDone follows
  }

  void OnDone() override { delete this; }

  // From WorkerCall.
  void OnWorkerChunk(WorkerCall* call, const pb::GenerateChunk& in) {
    const bool first = tokens_sent_ == 0 && in.token_ids_size() > 0;
    out_.Clear();
    for (int32_t t : in.token_ids()) {
      out_.add_token_ids(t);
      out_.mutable_text()->append(decoder_.Push(t));
    }
    tokens_sent_ += in.token_ids_size();
    if (first) {
      committed_ = true;
      first_token_ = SteadyClock::now();
      if (auto pool = opts_.pools->Find(call->pool())) pool->ReportSuccess(call->endpoint());
    }
    last_token_ = SteadyClock::now();
    if (in.finish_reason() != pb::FINISH_REASON_UNSPECIFIED) {
      out_.mutable_text()->append(decoder_.Finish());
      out_.set_finish_reason(in.finish_reason());
      *out_.mutable_usage() = in.usage();
      FillRouteInfo(scored_.decision,
                    ServedBy{.pool = call->pool(),
                             .kv_format = call->kv_format(),
                             .worker = call->endpoint(),
                             .fallbacks = fallbacks_},
                    out_.mutable_route());
    }
    {
      absl::MutexLock lock(&mu_);
      write_in_flight_ = true;
    }
    EncodeMessage(out_, &out_wire_);
    StartWrite(&out_wire_);
  }

  // The worker call's OnDone can arrive while the last chunk's write to the client is still in
  // flight (no read is pending then); its handling waits for OnWriteDone.
  void OnWorkerDone(WorkerCall* call, const grpc::Status& status) {
    {
      absl::MutexLock lock(&mu_);
      active_ = nullptr;
      if (write_in_flight_) {
        deferred_call_ = call;
        deferred_worker_status_ = status;
        return;
      }
    }
    HandleWorkerDone(call, status);
  }

  void HandleWorkerDone(WorkerCall* call, const grpc::Status& status) {
    bool client_gone;
    {
      absl::MutexLock lock(&mu_);
      client_gone = client_gone_;
    }
    if (status.ok()) {
      Complete(call->pool(), client_gone ? grpc::Status(grpc::StatusCode::CANCELLED,
                                                         "client went away")
                                          : grpc::Status::OK);
      return;
    }
    std::shared_ptr<EndpointPool> pool = opts_.pools->Find(call->pool());
    const grpc::StatusCode code = status.error_code();
    const bool worker_fault = code != grpc::StatusCode::CANCELLED &&
                              code != grpc::StatusCode::DEADLINE_EXCEEDED &&
                              code != grpc::StatusCode::INVALID_ARGUMENT &&
                              code != grpc::StatusCode::RESOURCE_EXHAUSTED &&
                              code != grpc::StatusCode::OUT_OF_RANGE;
    // Every pick gets exactly one report: success was reported at the first token; a worker that
    // answered with a well-formed refusal is healthy.
    if (pool != nullptr && !committed_) {
      if (worker_fault) {
        pool->ReportFailure(call->endpoint());
      } else {
        pool->ReportSuccess(call->endpoint());
      }
    }
    if (committed_) {
      if (worker_fault && pool != nullptr) pool->ReportFailure(call->endpoint());
      // Tokens already reached the client: never silently truncate.
      Complete(call->pool(),
               grpc::Status(grpc::StatusCode::ABORTED,
                            absl::StrFormat("request %s: worker %s (pool %s) failed after %d "
                                            "tokens were delivered: %s: %s",
                                            scored_.request_id, call->endpoint(), call->pool(),
                                            tokens_sent_, LowerCodeName(code),
                                            status.error_message())));
      return;
    }
    bool cancelled;
    {
      absl::MutexLock lock(&mu_);
      cancelled = cancelled_;
    }
    if (client_gone || cancelled || code == grpc::StatusCode::CANCELLED ||
        code == grpc::StatusCode::DEADLINE_EXCEEDED || code == grpc::StatusCode::INVALID_ARGUMENT) {
      Complete(call->pool(), status);
      return;
    }
    FallbackReason reason = code == grpc::StatusCode::RESOURCE_EXHAUSTED
                                ? FallbackReason::kPoolFull
                            : code == grpc::StatusCode::OUT_OF_RANGE
                                ? FallbackReason::kContextTooLong
                                : FallbackReason::kFailedBeforeFirstToken;
    std::string detail = absl::StrCat(call->endpoint(), ": ", LowerCodeName(code), ": ",
                                      status.error_message());
    if (!scored_.policy->fallback.Allows(reason)) {
      Complete(call->pool(), status);
      return;
    }
    AddFallback(call->pool(), reason, detail);
    last_error_ = status;
    TryNextPool();
  }

 private:
  void AddFallback(const std::string& pool, FallbackReason reason, const std::string& detail) {
    fallbacks_.push_back(SkippedPool{pool, reason, detail});
    KVGATE_LOG(INFO) << "request " << scored_.request_id << ": leaving pool " << pool << " ("
                     << FallbackReasonName(reason) << ": " << detail << ")";
    pending_fallback_from_.emplace_back(pool, std::string(FallbackReasonName(reason)));
  }

  // Tries the next pool of the decision; finishes when none is left.
  void TryNextPool() {
    const auto& viable = scored_.decision.viable_pools;
    while (next_pool_ < viable.size() &&
           attempts_ < static_cast<size_t>(scored_.decision.max_attempts)) {
      const std::string& name = viable[next_pool_++];
      ++attempts_;
      std::shared_ptr<EndpointPool> pool = opts_.pools->Find(name);
      if (pool == nullptr) {
        AddFallback(name, FallbackReason::kNoHealthyEndpoint, "pool not in the current policy");
        continue;
      }
      PickOutcome pick = pool->Pick({.total_tokens = scored_.decision.total_tokens});
      if (!pick.ok()) {
        if (!scored_.policy->fallback.Allows(*pick.failure)) {
          AddFallback(name, *pick.failure, pick.detail);
          break;
        }
        AddFallback(name, *pick.failure, pick.detail);
        continue;
      }
      for (auto& [from, reason] : pending_fallback_from_) {
        if (opts_.metrics != nullptr) opts_.metrics->Fallback(from, name, reason);
      }
      pending_fallback_from_.clear();
      auto call = std::make_unique<WorkerCall>(this, name, pick.endpoint, pick.kv_format);
      WorkerCall* raw = call.get();
      {
        absl::MutexLock lock(&mu_);
        if (cancelled_) break;
        calls_.push_back(std::move(call));
        active_ = raw;
      }
      auto stub = pb::Worker::NewStub(opts_.prober->Channel(pick.endpoint));
      raw->Start(stub.get(), worker_request_, deadline_);
      return;
    }
    for (auto& [from, reason] : pending_fallback_from_) {
      if (opts_.metrics != nullptr) opts_.metrics->Fallback(from, "none", reason);
    }
    pending_fallback_from_.clear();
    bool cancelled;
    {
      absl::MutexLock lock(&mu_);
      cancelled = cancelled_;
    }
    if (cancelled) {
      Complete("none", grpc::Status(grpc::StatusCode::CANCELLED, "cancelled by the client"));
      return;
    }
    // Nothing left: say why for every pool.
    std::string why;
    bool all_full = !fallbacks_.empty();
    for (const SkippedPool& f : fallbacks_) {
      absl::StrAppend(&why, why.empty() ? "" : "; ", f.pool, ": ", FallbackReasonName(f.reason),
                      f.detail.empty() ? "" : " (" + f.detail + ")");
      all_full = all_full && f.reason == FallbackReason::kPoolFull;
    }
    for (const SkippedPool& f : scored_.decision.skipped) {
      absl::StrAppend(&why, why.empty() ? "" : "; ", f.pool, ": ", FallbackReasonName(f.reason));
    }
    Complete("none", grpc::Status(all_full ? grpc::StatusCode::RESOURCE_EXHAUSTED
                                           : grpc::StatusCode::UNAVAILABLE,
                                  absl::StrFormat("request %s: no pool could serve it (%s)",
                                                  scored_.request_id, why)));
  }

  void Complete(const std::string& pool, const grpc::Status& status) {
    if (opts_.metrics != nullptr) {
      record_.pool = pool;
      record_.outcome = status.ok() ? "ok" : LowerCodeName(status.error_code());
      record_.completion_tokens = tokens_sent_;
      record_.duration_s = SecondsSince(arrival_);
      if (tokens_sent_ > 0) {
        record_.ttft_s = std::chrono::duration<double>(first_token_ - arrival_).count();
      }
      if (tokens_sent_ > 1) {
        record_.tpot_s =
            std::chrono::duration<double>(last_token_ - first_token_).count() / (tokens_sent_ - 1);
      }
      opts_.metrics->RequestDone(record_);
    }
    if (!status.ok() && status.error_code() != grpc::StatusCode::CANCELLED) {
      KVGATE_LOG(WARNING) << "request " << scored_.request_id << " failed: "
                          << LowerCodeName(status.error_code()) << ": " << status.error_message();
    }
    Finish(status);
  }

  const GatewayServiceOptions& opts_;
  std::atomic<int64_t>* const active_streams_;
  const std::chrono::system_clock::time_point deadline_;
  Scored scored_;
  pb::WorkerGenerateRequest worker_request_;
  StreamDecoder decoder_;
  pb::GenerateChunk out_;
  grpc::ByteBuffer out_wire_;  // out_ serialized, owned while its write is in flight
  RequestRecord record_;
  std::vector<SkippedPool> fallbacks_;
  std::vector<std::pair<std::string, std::string>> pending_fallback_from_;
  size_t next_pool_ = 0;
  size_t attempts_ = 0;
  int64_t tokens_sent_ = 0;
  bool committed_ = false;
  grpc::Status last_error_;
  SteadyClock::time_point arrival_, first_token_, last_token_;

  absl::Mutex mu_;
  bool cancelled_ ABSL_GUARDED_BY(mu_) = false;
  bool client_gone_ ABSL_GUARDED_BY(mu_) = false;
  bool write_in_flight_ ABSL_GUARDED_BY(mu_) = false;
  WorkerCall* active_ ABSL_GUARDED_BY(mu_) = nullptr;
  WorkerCall* deferred_call_ = nullptr;
  std::optional<grpc::Status> deferred_worker_status_ ABSL_GUARDED_BY(mu_);
  std::vector<std::unique_ptr<WorkerCall>> calls_;  // kept until the reactor dies
};

void WorkerCall::OnReadDone(bool ok) {
  if (ok) parent_->OnWorkerChunk(this, chunk_);
}

void WorkerCall::OnDone(const grpc::Status& status) { parent_->OnWorkerDone(this, status); }

template <typename Response>
class ImmediateFinish : public grpc::ServerWriteReactor<Response> {
 public:
  explicit ImmediateFinish(const grpc::Status& status) { this->Finish(status); }
  void OnDone() override { delete this; }
};

}  // namespace

GatewayService::GatewayService(GatewayServiceOptions options) : options_(std::move(options)) {}

grpc::ServerWriteReactor<grpc::ByteBuffer>* GatewayService::Generate(
    grpc::CallbackServerContext* ctx, const grpc::ByteBuffer* wire) {
  auto request = DecodeGenerateRequest(*wire);
  absl::StatusOr<Scored> scored =
      request.ok() ? ScoreAndRoute(options_, *ctx, *request) : absl::StatusOr<Scored>(request.status());
  if (!scored.ok()) {
    if (options_.metrics != nullptr) {
      options_.metrics->RequestDone(
          {.pool = "none",
           .task_type = request.ok() && !request->task_type().empty() ? request->task_type()
                                                                       : "unknown",
           .outcome = LowerCodeName(static_cast<grpc::StatusCode>(scored.status().code()))});
    }
    return new ImmediateFinish<grpc::ByteBuffer>(ToGrpcStatus(scored.status()));
  }
  auto* reactor = new ForwardReactor(options_, &active_streams_, ctx, *request, *std::move(scored));
  reactor->Start();
  return reactor;
}

grpc::ServerUnaryReactor* GatewayService::Route(grpc::CallbackServerContext* ctx,
                                                const grpc::ByteBuffer* wire,
                                                grpc::ByteBuffer* wire_response) {
  auto* reactor = ctx->DefaultReactor();
  auto request = DecodeGenerateRequest(*wire);
  if (!request.ok()) {
    reactor->Finish(ToGrpcStatus(request.status()));
    return reactor;
  }
  pb::RouteResponse response_message;
  pb::RouteResponse* response = &response_message;
  auto scored = ScoreAndRoute(options_, *ctx, *request);
  if (!scored.ok()) {
    reactor->Finish(ToGrpcStatus(scored.status()));
    return reactor;
  }
  // Predict the serving pool from current health, without touching picker state.
  ServedBy served;
  for (const std::string& name : scored->decision.viable_pools) {
    std::shared_ptr<EndpointPool> pool = options_.pools->Find(name);
    bool serving = false;
    if (pool != nullptr) {
      for (const auto& s : pool->Status()) serving |= s.health == HealthState::kServing;
    }
    if (serving || &name == &scored->decision.viable_pools.back()) {
      served.pool = name;
      const PoolSpec* spec = scored->policy->FindPool(name);
      served.kv_format = spec != nullptr ? spec->kv_format : "";
      break;
    }
    served.fallbacks.push_back({name, FallbackReason::kNoHealthyEndpoint, "no endpoint SERVING"});
  }
  FillRequestScore(scored->decision, scored->overhead_us, response->mutable_score());
  FillRouteInfo(scored->decision, served, response->mutable_route());
  EncodeMessage(response_message, wire_response);
  reactor->Finish(grpc::Status::OK);
  return reactor;
}

grpc::ServerUnaryReactor* GatewayService::CountTokens(grpc::CallbackServerContext* ctx,
                                                      const grpc::ByteBuffer* wire,
                                                      grpc::ByteBuffer* wire_response) {
  auto* reactor = ctx->DefaultReactor();
  auto response =
      AnswerCountTokens(*wire, *options_.tokenizer, options_.max_prompt_bytes, options_.model_name);
  if (response.ok()) EncodeMessage(*response, wire_response);
  reactor->Finish(ToGrpcStatus(response.status()));
  return reactor;
}

}  // namespace kvgate::gateway
