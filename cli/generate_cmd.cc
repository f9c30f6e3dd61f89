// kvgate generate: streams a completion from a gateway or a worker (both serve kvgate.v1.Gateway).
//
//   kvgate generate --target localhost:50051 --max-tokens 64 "Write a haiku about caches"
//   echo "prompt from stdin" | kvgate generate --target localhost:50051 -
#include <cstdio>
#include <iostream>
#include <iterator>
#include <memory>
#include <string>

#include <grpcpp/grpcpp.h>

#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "cli/args.h"
#include "cli/command.h"
#include "kvgate/v1/gateway.grpc.pb.h"

namespace kvgate::cli {
namespace {

namespace pb = ::kvgate::v1;

void PrintRoute(const pb::RouteInfo& r) {
  std::fprintf(stderr, "route: pool=%s kv_format=%s worker=%s rule=%s task=%s (%s)\n",
               r.pool().c_str(), r.kv_format().c_str(), r.worker().c_str(),
               r.matched_route().c_str(), r.task_type().c_str(), r.task_type_source().c_str());
  if (!r.reason().empty()) std::fprintf(stderr, "reason: %s\n", r.reason().c_str());
  for (const auto& f : r.fallbacks()) {
    std::fprintf(stderr, "fallback: from %s: %s %s\n", f.from_pool().c_str(), f.reason().c_str(),
                 f.detail().c_str());
  }
  if (!r.quality_basis().empty()) std::fprintf(stderr, "quality: %s\n", r.quality_basis().c_str());
}

int RunGenerate(int argc, char** argv) {
  Args args(argc, argv,
            {"target", "max-tokens", "temperature", "top-k", "top-p", "seed", "task", "precision",
             "tenant", "request-id", "timeout-s"},
            {"route-only", "quiet"});
  if (args.help() || !args.ok() || args.positional().size() != 1) {
    if (!args.ok()) std::fprintf(stderr, "kvgate generate: %s\n", args.error().c_str());
    std::fprintf(stderr,
                 "usage: kvgate generate [--target HOST:PORT] [--max-tokens N] [--temperature T]\n"
                 "         [--top-k K] [--top-p P] [--seed S] [--task TYPE]\n"
                 "         [--precision full|compressed] [--tenant NAME] [--request-id ID]\n"
                 "         [--timeout-s S] [--route-only] [--quiet] \"prompt\" | -\n");
    return args.help() ? 0 : 2;
  }
  std::string prompt = args.positional()[0];
  if (prompt == "-") {
    prompt.assign(std::istreambuf_iterator<char>(std::cin), std::istreambuf_iterator<char>());
  }
  pb::GenerateRequest request;
  request.set_prompt(prompt);
  auto* s = request.mutable_sampling();
  s->set_max_tokens(static_cast<int>(args.GetInt("max-tokens", 64)));
  s->set_temperature(static_cast<float>(args.GetDouble("temperature", 0.0)));
  s->set_top_k(static_cast<int>(args.GetInt("top-k", 0)));
  s->set_top_p(static_cast<float>(args.GetDouble("top-p", 1.0)));
  s->set_seed(static_cast<uint64_t>(args.GetInt("seed", 0)));
  request.set_task_type(args.Get("task"));
  request.set_tenant(args.Get("tenant"));
  request.set_request_id(args.Get("request-id"));
  if (!args.ok()) {
    std::fprintf(stderr, "kvgate generate: %s\n", args.error().c_str());
    return 2;
  }
  const std::string precision = args.Get("precision");
  if (precision == "full") {
    request.set_precision(pb::PRECISION_FULL);
  } else if (precision == "compressed") {
    request.set_precision(pb::PRECISION_COMPRESSED);
  } else if (!precision.empty()) {
    std::fprintf(stderr, "kvgate generate: --precision must be full or compressed\n");
    return 2;
  }

  auto channel =
      grpc::CreateChannel(args.Get("target", "localhost:50051"), grpc::InsecureChannelCredentials());
  auto stub = pb::Gateway::NewStub(channel);
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() +
                   std::chrono::milliseconds(
                       static_cast<int64_t>(args.GetDouble("timeout-s", 300) * 1000)));
  const bool quiet = args.GetBool("quiet");

  if (args.GetBool("route-only")) {
    pb::RouteResponse response;
    grpc::Status status = stub->Route(&ctx, request, &response);
    if (!status.ok()) {
      std::fprintf(stderr, "error: %s: %s\n", StatusCodeName(status.error_code()),
                   status.error_message().c_str());
      return 1;
    }
    const auto& sc = response.score();
    std::fprintf(stderr, "score: prompt_tokens=%d max_tokens=%d total=%d task=%s overhead=%ldus\n",
                 sc.prompt_tokens(), sc.max_tokens(), sc.total_tokens(), sc.task_type().c_str(),
                 static_cast<long>(sc.overhead_us()));
    PrintRoute(response.route());
    return 0;
  }

  auto reader = stub->Generate(&ctx, request);
  pb::GenerateChunk chunk;
  pb::GenerateChunk last;
  int tokens = 0;
  while (reader->Read(&chunk)) {
    tokens += chunk.token_ids_size();
    std::fwrite(chunk.text().data(), 1, chunk.text().size(), stdout);
    std::fflush(stdout);
    if (chunk.finish_reason() != pb::FINISH_REASON_UNSPECIFIED) last = chunk;
  }
  grpc::Status status = reader->Finish();
  std::fputc('\n', stdout);
  if (!status.ok()) {
    std::fprintf(stderr, "error: %s: %s (%d tokens received)\n",
                 StatusCodeName(status.error_code()), status.error_message().c_str(), tokens);
    return 1;
  }
  if (!quiet) {
    const auto& u = last.usage();
    std::fprintf(stderr, "finish: %s, prompt_tokens=%d completion_tokens=%d ttft=%.1fms tpot=%.1fms\n",
                 pb::FinishReason_Name(last.finish_reason()).c_str(), u.prompt_tokens(),
                 u.completion_tokens(), u.time_to_first_token_us() / 1e3,
                 u.time_per_output_token_us() / 1e3);
    PrintRoute(last.route());
  }
  return 0;
}

}  // namespace

const char* StatusCodeName(grpc::StatusCode code) {
  static const char* kNames[] = {"OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT",
                                 "DEADLINE_EXCEEDED", "NOT_FOUND", "ALREADY_EXISTS",
                                 "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION",
                                 "ABORTED", "OUT_OF_RANGE", "UNIMPLEMENTED", "INTERNAL",
                                 "UNAVAILABLE", "DATA_LOSS", "UNAUTHENTICATED"};
  int i = static_cast<int>(code);
  return i >= 0 && i < 17 ? kNames[i] : "UNKNOWN";
}

}  // namespace kvgate::cli

KVGATE_COMMAND(generate, "stream a completion from a gateway or worker", kvgate::cli::RunGenerate);
