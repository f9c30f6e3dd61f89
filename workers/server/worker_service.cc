#include "workers/server/worker_service.h"

#include <deque>
#include <optional>
#include <utility>

#include "absl/strings/str_format.h"
#include "absl/synchronization/mutex.h"
#include "kvgate/common/grpc_status.h"
#include "kvgate/common/log.h"
#include "proto/public_api.h"
#include "proto/request_codec.h"

namespace kvgate::worker {
namespace {

namespace pb = ::kvgate::v1;

constexpr size_t kMaxRequestIdBytes = 128;
constexpr int64_t kMaxPromptBytes = 8 << 20;  // as the gateway's default

pb::FinishReason ToProto(FinishReason reason) {
  switch (reason) {
    case FinishReason::kLength:
      return pb::FINISH_REASON_LENGTH;
    case FinishReason::kStop:
      return pb::FINISH_REASON_STOP;
    case FinishReason::kContext:
      return pb::FINISH_REASON_CONTEXT;
    case FinishReason::kNone:
      break;
  }
  return pb::FINISH_REASON_UNSPECIFIED;
}

absl::StatusOr<GenerateParams> ParamsFromProto(const std::string& request_id,
                                               const pb::SamplingParams& s) {
  if (request_id.size() > kMaxRequestIdBytes) {
    return absl::InvalidArgumentError("request_id longer than 128 bytes");
  }
  GenerateParams params;
  params.request_id = request_id;
  params.max_tokens = s.max_tokens();
  params.sampling.temperature = s.temperature();
  params.sampling.top_k = s.top_k();
  params.sampling.top_p = s.top_p();
  params.sampling.seed = s.seed();
  params.stop_token_ids.assign(s.stop_token_ids().begin(), s.stop_token_ids().end());
  params.ignore_eos = s.ignore_eos();
  return params;
}

}  // namespace

struct WorkerService::Impl {
  WorkerServiceOptions options;
  WorkerMetrics* metrics = nullptr;
  std::atomic<Engine*> engine{nullptr};
  std::atomic<const Tokenizer*> tokenizer{nullptr};
  std::atomic<bool> accepting{true};

  class WorkerApi;
  class GatewayApi;
  std::unique_ptr<WorkerApi> worker_api;
  std::unique_ptr<GatewayApi> gateway_api;

  // Returns the engine when it can take work, else the status to answer with.
  absl::StatusOr<Engine*> LiveEngine() const {
    Engine* e = engine.load();
    if (e == nullptr) return absl::UnavailableError("worker is loading its model");
    if (!accepting.load()) return absl::UnavailableError("worker is draining");
    return e;
  }
  void Rejected(const absl::Status& s) {
    if (metrics != nullptr) metrics->OnRejected(s.code());
  }
};

namespace {

// Streams one request's engine outputs to the client (as GenerateChunk messages, or serialized
// into ByteBuffers for the raw public API). Writes one chunk at a time (backpressure:
// tokens that arrive while a write is in flight are merged into the next chunk), and finishes only
// after the engine's final output, so the engine never calls into a deleted reactor.
template <typename OUT>
class GenerateReactor : public grpc::ServerWriteReactor<OUT> {
 public:
  GenerateReactor(Engine* engine, const Tokenizer* tokenizer, bool return_text,
                  std::optional<pb::RouteInfo> route)
      : engine_(engine), route_(std::move(route)) {
    if (return_text && tokenizer != nullptr) decoder_.emplace(*tokenizer, DecodeOptions{.skip_special_tokens = true});
  }

  // Submits to the engine; on a validation error finishes at once.
  void Start(GenerateParams params) {
    params_prompt_tokens_ = static_cast<int>(params.prompt.size());
    auto id = engine_->Submit(std::move(params), [this](const StepOutput& out) { OnOutput(out); });
    if (!id.ok()) {
      this->Finish(ToGrpcStatus(id.status()));
      return;
    }
    absl::MutexLock lock(&mu_);
    id_ = *id;
    if (cancel_pending_) engine_->Cancel(id_);
  }

  void OnCancel() override {
    absl::MutexLock lock(&mu_);
    if (id_ != 0) {
      engine_->Cancel(id_);
    } else {
      cancel_pending_ = true;
    }
  }

  void OnWriteDone(bool ok) override {
    {
      absl::MutexLock lock(&mu_);
      writing_ = false;
      if (!ok && !broken_) {
        broken_ = true;  // client gone: stop the generation, then finish
        if (id_ != 0) engine_->Cancel(id_);
      }
    }
    Pump();
  }

  void OnDone() override { delete this; }

 private:
  // Engine thread.
  void OnOutput(const StepOutput& out) {
    {
      absl::MutexLock lock(&mu_);
      if (pending_ == nullptr) pending_ = std::make_unique<pb::GenerateChunk>();
      for (int32_t t : out.token_ids) {
        pending_->add_token_ids(t);
        if (decoder_) pending_->mutable_text()->append(decoder_->Push(t));
      }
      if (out.finished) {
        if (out.status.ok()) {
          if (decoder_) pending_->mutable_text()->append(decoder_->Finish());
          pending_->set_finish_reason(ToProto(out.finish_reason));
          auto* usage = pending_->mutable_usage();
          usage->set_prompt_tokens(out.prompt_tokens);
          usage->set_completion_tokens(out.completion_tokens);
          usage->set_time_to_first_token_us(out.ttft_us);
          usage->set_time_per_output_token_us(out.tpot_us);
          if (route_) *pending_->mutable_route() = *route_;
          final_status_ = grpc::Status::OK;
        } else {
          final_status_ = ToGrpcStatus(out.status);
          if (out.completion_tokens > 0 && out.status.code() != absl::StatusCode::kCancelled) {
            final_status_ = grpc::Status(
                final_status_->error_code(),
                absl::StrFormat("%s (after %d generated tokens)", out.status.message(),
                                out.completion_tokens));
          }
          pending_.reset();  // an error ends the stream without a final chunk
        }
      }
    }
    Pump();
  }

  // Starts the next write, or the finish, if nothing is in flight.
  void Pump() {
    std::optional<grpc::Status> to_finish;
    {
      absl::MutexLock lock(&mu_);
      if (writing_ || finished_) return;
      if (pending_ != nullptr && !broken_) {
        current_ = std::move(pending_);
        writing_ = true;
      } else if (final_status_) {
        finished_ = true;
        to_finish = broken_ && final_status_->ok()
                        ? grpc::Status(grpc::StatusCode::CANCELLED, "client went away")
                        : *final_status_;
      } else {
        return;
      }
    }
    if (to_finish) {
      this->Finish(*to_finish);
    } else if constexpr (std::is_same_v<OUT, grpc::ByteBuffer>) {
      EncodeMessage(*current_, &current_wire_);
      this->StartWrite(&current_wire_);
    } else {
      this->StartWrite(current_.get());
    }
  }

  Engine* engine_;
  std::optional<pb::RouteInfo> route_;
  std::optional<StreamDecoder> decoder_;
  int params_prompt_tokens_ = 0;

  absl::Mutex mu_;
  uint64_t id_ ABSL_GUARDED_BY(mu_) = 0;
  bool cancel_pending_ ABSL_GUARDED_BY(mu_) = false;
  bool writing_ ABSL_GUARDED_BY(mu_) = false;
  bool broken_ ABSL_GUARDED_BY(mu_) = false;
  bool finished_ ABSL_GUARDED_BY(mu_) = false;
  std::unique_ptr<pb::GenerateChunk> pending_ ABSL_GUARDED_BY(mu_);
  std::unique_ptr<pb::GenerateChunk> current_;  // owned while its write is in flight
  grpc::ByteBuffer current_wire_;               // its serialized form (raw API)
  std::optional<grpc::Status> final_status_ ABSL_GUARDED_BY(mu_);
};

template <typename Response>
class ImmediateFinish : public grpc::ServerWriteReactor<Response> {
 public:
  explicit ImmediateFinish(const grpc::Status& status) { this->Finish(status); }
  void OnDone() override { delete this; }
};

void FillLoad(const Engine& engine, const WorkerServiceOptions& options, bool accepting,
              pb::LoadReport* report) {
  EngineLoad load = engine.Load();
  report->set_model(options.model_name);
  report->set_kv_format(options.kv_format_name);
  report->set_kv_eviction(options.eviction_name);
  report->set_max_context(static_cast<int32_t>(engine.max_context()));
  report->set_running_requests(load.running);
  report->set_waiting_requests(load.waiting);
  report->set_kv_blocks_free(load.kv_blocks_free);
  report->set_kv_blocks_total(load.kv_blocks_total);
  report->set_kv_block_tokens(load.kv_block_tokens);
  report->set_kv_bytes_per_token(load.kv_bytes_per_token);
  report->set_kv_utilization(load.kv_blocks_total > 0
                                 ? 1.0 - static_cast<double>(load.kv_blocks_free) /
                                             load.kv_blocks_total
                                 : 0.0);
  report->set_accepting(load.accepting && accepting);
  report->set_backend(engine.backend_name());
  report->set_vocab_size(engine.model_config().vocab_size);
}

std::optional<Clock::time_point> DeadlineOf(grpc::CallbackServerContext* ctx) {
  auto deadline = ctx->deadline();
  if (deadline == std::chrono::system_clock::time_point::max()) return std::nullopt;
  auto remaining = deadline - std::chrono::system_clock::now();
  return Clock::now() + std::chrono::duration_cast<Clock::duration>(remaining);
}

}  // namespace

class WorkerService::Impl::WorkerApi : public pb::Worker::CallbackService {
 public:
  explicit WorkerApi(Impl* impl) : impl_(impl) {}

  grpc::ServerWriteReactor<pb::GenerateChunk>* Generate(
      grpc::CallbackServerContext* ctx, const pb::WorkerGenerateRequest* request) override {
    auto engine = impl_->LiveEngine();
    if (!engine.ok()) {
      impl_->Rejected(engine.status());
      return new ImmediateFinish<pb::GenerateChunk>(ToGrpcStatus(engine.status()));
    }
    auto params = ParamsFromProto(request->request_id(), request->sampling());
    if (!params.ok()) {
      impl_->Rejected(params.status());
      return new ImmediateFinish<pb::GenerateChunk>(ToGrpcStatus(params.status()));
    }
    params->prompt.assign(request->prompt_token_ids().begin(), request->prompt_token_ids().end());
    params->deadline = DeadlineOf(ctx);
    auto* reactor = new GenerateReactor<pb::GenerateChunk>(
        *engine, impl_->tokenizer.load(), request->return_text(), std::nullopt);
    reactor->Start(*std::move(params));
    return reactor;
  }

  grpc::ServerUnaryReactor* GetLoad(grpc::CallbackServerContext* ctx, const pb::LoadRequest*,
                                    pb::LoadReport* report) override {
    auto* reactor = ctx->DefaultReactor();
    Engine* engine = impl_->engine.load();
    if (engine == nullptr) {
      report->set_model(impl_->options.model_name);
      report->set_kv_format(impl_->options.kv_format_name);
      report->set_kv_eviction(impl_->options.eviction_name);
      report->set_accepting(false);
    } else {
      FillLoad(*engine, impl_->options, impl_->accepting.load(), report);
    }
    reactor->Finish(grpc::Status::OK);
    return reactor;
  }

 private:
  Impl* impl_;
};

// The public text API, on raw ByteBuffers so that untrusted requests are decoded leniently
// (proto/request_codec.h): invalid UTF-8 is INVALID_ARGUMENT naming the field.
class WorkerService::Impl::GatewayApi
    : public pb::Gateway::WithRawCallbackMethod_Generate<pb::Gateway::WithRawCallbackMethod_Route<
          pb::Gateway::WithRawCallbackMethod_CountTokens<pb::Gateway::Service>>> {
 public:
  explicit GatewayApi(Impl* impl) : impl_(impl) {}

  grpc::ServerWriteReactor<grpc::ByteBuffer>* Generate(grpc::CallbackServerContext* ctx,
                                                       const grpc::ByteBuffer* wire) override {
    auto engine = impl_->LiveEngine();
    if (!engine.ok()) {
      impl_->Rejected(engine.status());
      return new ImmediateFinish<grpc::ByteBuffer>(ToGrpcStatus(engine.status()));
    }
    auto decoded = DecodeGenerateRequest(*wire);
    if (!decoded.ok()) {
      impl_->Rejected(decoded.status());
      return new ImmediateFinish<grpc::ByteBuffer>(ToGrpcStatus(decoded.status()));
    }
    const pb::GenerateRequest* request = &*decoded;
    auto params = ParamsFromProto(request->request_id(), request->sampling());
    absl::Status status = params.status();
    if (status.ok()) {
      auto ids = Tokenize(request->prompt(), request->no_bos());
      if (ids.ok()) {
        params->prompt = *std::move(ids);
      } else {
        status = ids.status();
      }
    }
    if (!status.ok()) {
      impl_->Rejected(status);
      return new ImmediateFinish<grpc::ByteBuffer>(ToGrpcStatus(status));
    }
    params->deadline = DeadlineOf(ctx);
    auto* reactor = new GenerateReactor<grpc::ByteBuffer>(*engine, impl_->tokenizer.load(),
                                                          /*return_text=*/true, DirectRoute());
    reactor->Start(*std::move(params));
    return reactor;
  }

  grpc::ServerUnaryReactor* Route(grpc::CallbackServerContext* ctx, const grpc::ByteBuffer* wire,
                                  grpc::ByteBuffer* wire_response) override {
    auto* reactor = ctx->DefaultReactor();
    auto decoded = DecodeGenerateRequest(*wire);
    if (!decoded.ok()) {
      reactor->Finish(ToGrpcStatus(decoded.status()));
      return reactor;
    }
    const pb::GenerateRequest* request = &*decoded;
    pb::RouteResponse response_message;
    pb::RouteResponse* response = &response_message;
    auto engine = impl_->LiveEngine();
    if (!engine.ok()) {
      reactor->Finish(ToGrpcStatus(engine.status()));
      return reactor;
    }
    auto ids = Tokenize(request->prompt(), request->no_bos());
    if (!ids.ok()) {
      reactor->Finish(ToGrpcStatus(ids.status()));
      return reactor;
    }
    int max_tokens = request->sampling().max_tokens() > 0 ? request->sampling().max_tokens() : 16;
    auto* score = response->mutable_score();
    score->set_prompt_tokens(static_cast<int32_t>(ids->size()));
    score->set_max_tokens(max_tokens);
    score->set_total_tokens(static_cast<int32_t>(ids->size()) + max_tokens);
    *response->mutable_route() = DirectRoute();
    EncodeMessage(response_message, wire_response);
    reactor->Finish(grpc::Status::OK);
    return reactor;
  }

  grpc::ServerUnaryReactor* CountTokens(grpc::CallbackServerContext* ctx,
                                        const grpc::ByteBuffer* wire,
                                        grpc::ByteBuffer* wire_response) override {
    auto* reactor = ctx->DefaultReactor();
    const Tokenizer* tok = impl_->tokenizer.load();
    if (tok == nullptr) {
      reactor->Finish(grpc::Status(grpc::StatusCode::UNAVAILABLE, "worker is loading its model"));
      return reactor;
    }
    auto response = AnswerCountTokens(*wire, *tok, kMaxPromptBytes, impl_->options.model_name);
    if (response.ok()) EncodeMessage(*response, wire_response);
    reactor->Finish(ToGrpcStatus(response.status()));
    return reactor;
  }

 private:
  absl::StatusOr<std::vector<int32_t>> Tokenize(const std::string& prompt, bool no_bos) {
    if (prompt.empty()) return absl::InvalidArgumentError("empty prompt");
    const Tokenizer* tok = impl_->tokenizer.load();
    if (tok == nullptr) return absl::UnavailableError("worker is loading its model");
    return tok->Encode(prompt, EncodeOptions{.add_special_tokens = !no_bos});
  }

  pb::RouteInfo DirectRoute() const {
    pb::RouteInfo route;
    route.set_pool("direct");
    route.set_kv_format(impl_->options.kv_format_name);
    route.set_reason("served directly by the worker (no gateway)");
    route.set_task_type("");
    return route;
  }

  Impl* impl_;
};

WorkerService::WorkerService(WorkerServiceOptions options, WorkerMetrics* metrics)
    : impl_(std::make_unique<Impl>()) {
  impl_->options = std::move(options);
  impl_->metrics = metrics;
  impl_->worker_api = std::make_unique<Impl::WorkerApi>(impl_.get());
  impl_->gateway_api = std::make_unique<Impl::GatewayApi>(impl_.get());
}

WorkerService::~WorkerService() = default;

grpc::Service* WorkerService::worker_service() { return impl_->worker_api.get(); }
grpc::Service* WorkerService::gateway_service() { return impl_->gateway_api.get(); }

void WorkerService::SetEngine(Engine* engine, const Tokenizer* tokenizer) {
  impl_->tokenizer.store(tokenizer);
  impl_->engine.store(engine);
}

void WorkerService::StopAccepting() { impl_->accepting.store(false); }

}  // namespace kvgate::worker
