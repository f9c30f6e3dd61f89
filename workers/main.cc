// kvgate-worker: serves one Llama-family model with one KV-cache format over gRPC.
//
//   kvgate-worker --model models/tiny --kv fp16 --port 50061 --metrics-port 9161
//
// Starts listening at once with health NOT_SERVING, loads the model, then turns SERVING.
// SIGTERM/SIGINT drain: health NOT_SERVING, new requests UNAVAILABLE, in-flight requests finish
// (up to --drain-timeout-s), then exit 0. A model that fails to load exits 1 with the reason.
#include <signal.h>

#include <chrono>
#include <cstdio>
#include <fstream>
#include <memory>
#include <string>
#include <thread>

#include <grpcpp/ext/proto_server_reflection_plugin.h>
#include <grpcpp/grpcpp.h>
#include <grpcpp/health_check_service_interface.h>
#include <CivetServer.h>
#include <prometheus/exposer.h>
#include <prometheus/registry.h>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/strings/str_cat.h"
#include "kvgate/common/log.h"
#include "kvgate/common/shutdown_signals.h"
#include "kvgate/common/tokenizer.h"
#include "kvgate/kernels/kv_format.h"
#include "workers/backend/model_runner.h"
#include "workers/backend/null_model_runner.h"
#include "workers/engine/engine.h"
#include "workers/server/worker_metrics.h"
#include "workers/server/worker_service.h"
#ifdef KVGATE_WORKER_HAVE_CUDA
#include "workers/backend/cuda/cuda_model_runner.h"
#endif

ABSL_FLAG(std::string, model, "", "Hugging Face model folder (config.json, *.safetensors, "
                                  "tokenizer.json)");
ABSL_FLAG(std::string, model_name, "", "Model name reported to clients (default: folder name)");
ABSL_FLAG(std::string, kv, "fp16", "KV-cache format: fp16 bf16 fp8 int8 kivi2 kivi4 tq4 tq3.5 tq3 "
                                   "tq2.5 tq:k=A,v=B");
ABSL_FLAG(std::string, evict, "none", "KV eviction: none, h2o:heavy=F,recent=F, sink:sinks=N,window=N");
ABSL_FLAG(std::string, host, "0.0.0.0", "Address to listen on");
ABSL_FLAG(int, port, 50061, "gRPC port (0: pick a free one and print it)");
ABSL_FLAG(int, metrics_port, -1, "HTTP port for /metrics (0: pick a free one and print it; -1: none)");
ABSL_FLAG(std::string, port_file, "", "If set, write the bound gRPC port to this file once listening");
ABSL_FLAG(int64_t, kv_cache_mb, 256, "KV-cache pool size in MiB (ignored if --kv_blocks is set)");
ABSL_FLAG(int64_t, kv_blocks, 0, "KV-cache pool size in blocks (0: from --kv_cache_mb)");
ABSL_FLAG(int, block_size, 16, "Tokens per KV block");
ABSL_FLAG(int, max_running, 64, "Maximum sequences decoding at once");
ABSL_FLAG(int, max_waiting, 1024, "Maximum queued requests before RESOURCE_EXHAUSTED");
ABSL_FLAG(int, max_batch_tokens, 512, "Tokens per forward step (decode + prefill chunks)");
ABSL_FLAG(int64_t, max_context, 0, "Maximum tokens per sequence (0: the model's)");
ABSL_FLAG(int, threads, 0, "CPU threads for the model (0: all cores)");
ABSL_FLAG(int, drain_timeout_s, 30, "Seconds to let in-flight requests finish on SIGTERM");
#ifdef KVGATE_WORKER_HAVE_CPU
constexpr char kDefaultBackend[] = "cpu";
#else
constexpr char kDefaultBackend[] = "cuda";
#endif
ABSL_FLAG(std::string, backend, kDefaultBackend,
          "Model backend: cpu (kvgate-worker), cuda (kvgate-worker-cuda; eviction for the "
          "per-token formats, KIVI and TurboQuant + H2O), or "
          "null (benchmark/test tool: no model math, placeholder tokens; --max_context may exceed "
          "the model's)");
ABSL_FLAG(double, gpu_memory_fraction, 0.85, "cuda backend: fraction of the GPU memory free after "
                                             "the weights that the KV pool and the per-sequence "
                                             "KV state of --max_running sequences take (pool "
                                             "size ignored if --kv_blocks is set; --kv_cache_mb "
                                             "is not used)");

ABSL_FLAG(std::string, cuda_compute, "bf16",
          "cuda backend: bf16 (bf16 weights and GEMM inputs; fast) or fp32 (fp32 weights and "
          "GEMMs: logits as the CPU backend computes them, twice the weight memory)");
ABSL_FLAG(bool, cuda_graphs, true,
          "cuda backend: replay decode steps from CUDA graphs, one per batch size and context "
          "bucket (false: launch every kernel of every step; the same results)");

namespace kvgate::worker {
namespace {

std::string FolderName(std::string path) {
  while (!path.empty() && path.back() == '/') path.pop_back();
  auto slash = path.rfind('/');
  return slash == std::string::npos ? path : path.substr(slash + 1);
}

int Main(int argc, char** argv) {
  // Before any thread starts, so that the wait below receives them.
  ShutdownSignals signals;

  absl::SetProgramUsageMessage("Serves a Llama-family model with a chosen KV-cache format.");
  absl::ParseCommandLine(argc, argv);
  const std::string model_dir = absl::GetFlag(FLAGS_model);
  if (model_dir.empty()) {
    std::fprintf(stderr, "kvgate-worker: --model is required\n");
    return 2;
  }
  const std::string backend = absl::GetFlag(FLAGS_backend);
  if (backend != "cpu" && backend != "cuda" && backend != "null") {
    std::fprintf(stderr, "kvgate-worker: --backend must be cpu, cuda or null, got %s\n",
                 backend.c_str());
    return 2;
  }
#ifndef KVGATE_WORKER_HAVE_CUDA
  if (backend == "cuda") {
    std::fprintf(stderr, "kvgate-worker: --backend cuda: use kvgate-worker-cuda (built when the "
                         "CUDA toolkit is present: configure with -DKVGATE_CUDA=ON)\n");
    return 2;
  }
#endif
#ifndef KVGATE_WORKER_HAVE_CPU
  if (backend == "cpu") {
    std::fprintf(stderr, "kvgate-worker-cuda: --backend cpu: use kvgate-worker\n");
    return 2;
  }
#endif
  auto kv_spec = kernels::ParseKvFormat(absl::GetFlag(FLAGS_kv));
  if (!kv_spec.ok()) {
    std::fprintf(stderr, "kvgate-worker: --kv: %s\n", std::string(kv_spec.status().message()).c_str());
    return 2;
  }
  auto eviction = kernels::ParseEviction(absl::GetFlag(FLAGS_evict));
  if (!eviction.ok()) {
    std::fprintf(stderr, "kvgate-worker: --evict: %s\n",
                 std::string(eviction.status().message()).c_str());
    return 2;
  }
  kv_spec->eviction = *eviction;
#ifdef KVGATE_WORKER_HAVE_CUDA
  const absl::StatusOr<CudaCompute> cuda_compute =
      ParseCudaCompute(absl::GetFlag(FLAGS_cuda_compute));
  if (!cuda_compute.ok()) {
    std::fprintf(stderr, "kvgate-worker-cuda: --cuda_compute: %s\n",
                 std::string(cuda_compute.status().message()).c_str());
    return 2;
  }
#endif
  std::string model_name = absl::GetFlag(FLAGS_model_name);
  if (model_name.empty()) model_name = FolderName(model_dir);

  // Metrics.
  auto registry = std::make_shared<prometheus::Registry>();
  std::unique_ptr<prometheus::Exposer> exposer;
  int metrics_port = -1;
  if (int mport = absl::GetFlag(FLAGS_metrics_port); mport >= 0) {
    try {
      // civetweb's own errors (e.g. why a port cannot be served) go to our log.
      static CivetCallbacks callbacks{};
      callbacks.log_message = [](const mg_connection*, const char* message) {
        KVGATE_LOG(WARNING) << "metrics HTTP server: " << message;
        return 1;
      };
      exposer = std::make_unique<prometheus::Exposer>(
          absl::StrCat(absl::GetFlag(FLAGS_host), ":", mport), 2, &callbacks);
    } catch (const std::exception& e) {
      std::fprintf(stderr, "kvgate-worker: cannot serve metrics on port %d: %s\n", mport, e.what());
      return 1;
    }
    exposer->RegisterCollectable(registry);
    metrics_port = exposer->GetListeningPorts().empty() ? mport : exposer->GetListeningPorts()[0];
  }
  WorkerMetrics metrics(*registry, {{"model", model_name},
                                    {"kv_format", kv_spec->name},
                                    {"eviction", kernels::EvictionToString(*eviction)}});

  // Server first (health NOT_SERVING while loading).
  WorkerService service({.model_name = model_name,
                         .kv_format_name = kv_spec->name,
                         .eviction_name = kernels::EvictionToString(*eviction)},
                        &metrics);
  grpc::EnableDefaultHealthCheckService(true);
  grpc::reflection::InitProtoReflectionServerBuilderPlugin();
  grpc::ServerBuilder builder;
  int bound_port = 0;
  builder.AddListeningPort(absl::StrCat(absl::GetFlag(FLAGS_host), ":", absl::GetFlag(FLAGS_port)),
                           grpc::InsecureServerCredentials(), &bound_port);
  builder.RegisterService(service.worker_service());
  builder.RegisterService(service.gateway_service());
  std::unique_ptr<grpc::Server> server = builder.BuildAndStart();
  if (server == nullptr || bound_port == 0) {
    std::fprintf(stderr, "kvgate-worker: cannot listen on %s:%d\n",
                 absl::GetFlag(FLAGS_host).c_str(), absl::GetFlag(FLAGS_port));
    return 1;
  }
  auto* health = server->GetHealthCheckService();
  health->SetServingStatus(false);
  KVGATE_LOG(INFO) << "kvgate-worker listening on " << absl::GetFlag(FLAGS_host) << ":"
                   << bound_port << " (loading " << model_dir << ", kv " << kv_spec->name << ")";
  if (metrics_port >= 0) std::printf("METRICS %d\n", metrics_port);
  std::printf("LISTENING %d\n", bound_port);
  std::fflush(stdout);
  if (const std::string pf = absl::GetFlag(FLAGS_port_file); !pf.empty()) {
    std::ofstream(pf + ".tmp") << bound_port << "\n";
    std::rename((pf + ".tmp").c_str(), pf.c_str());
  }

  // Load.
  const auto t0 = std::chrono::steady_clock::now();
  auto tokenizer = Tokenizer::FromFile(model_dir + "/tokenizer.json");
  if (!tokenizer.ok()) {
    KVGATE_LOG(ERROR) << "cannot load tokenizer: " << tokenizer.status();
    server->Shutdown();
    return 1;
  }
  RunnerOptions ropts;
  ropts.model_dir = model_dir;
  ropts.kv_format = *kv_spec;
  ropts.kv_block_size = absl::GetFlag(FLAGS_block_size);
  ropts.kv_num_blocks = absl::GetFlag(FLAGS_kv_blocks);
  ropts.kv_cache_bytes = absl::GetFlag(FLAGS_kv_cache_mb) << 20;
  ropts.num_threads = absl::GetFlag(FLAGS_threads);
  const NullRunnerOptions null_options{.runner = ropts,
                                       .max_position_embeddings = absl::GetFlag(FLAGS_max_context)};
  absl::StatusOr<std::unique_ptr<ModelRunner>> runner =
      absl::UnimplementedError("backend " + backend + " is not built in");
  if (backend == "null") {
    runner = CreateNullModelRunner(null_options);
  }
#ifdef KVGATE_WORKER_HAVE_CPU
  if (backend == "cpu") runner = CreateCpuModelRunner(ropts);
#endif
#ifdef KVGATE_WORKER_HAVE_CUDA
  if (backend == "cuda") {
    // One sequence slot of per-sequence KV state (KIVI windows, FP8 scales) per running sequence.
    runner = CreateCudaModelRunner(ropts,
                                   {.gpu_memory_fraction = absl::GetFlag(FLAGS_gpu_memory_fraction),
                                    .max_sequences = absl::GetFlag(FLAGS_max_running),
                                    .compute = *cuda_compute,
                                    .cuda_graphs = absl::GetFlag(FLAGS_cuda_graphs)});
  }
#endif
  if (!runner.ok()) {
    KVGATE_LOG(ERROR) << "cannot load model from " << model_dir << ": " << runner.status();
    server->Shutdown();
    return 1;
  }
  EngineOptions eopts;
  eopts.max_running = absl::GetFlag(FLAGS_max_running);
  eopts.max_waiting = absl::GetFlag(FLAGS_max_waiting);
  eopts.max_batch_tokens = absl::GetFlag(FLAGS_max_batch_tokens);
  eopts.max_context = absl::GetFlag(FLAGS_max_context);
  auto engine = Engine::Create(*std::move(runner), eopts, &metrics);
  if (!engine.ok()) {
    KVGATE_LOG(ERROR) << "cannot start engine: " << engine.status();
    server->Shutdown();
    return 1;
  }
  metrics.OnLoad((*engine)->Load());
  service.SetEngine(engine->get(), tokenizer->get());
  health->SetServingStatus(true);
  const auto& cache_desc = (*engine)->kv_desc();
  EngineLoad load = (*engine)->Load();
  KVGATE_LOG(INFO) << "serving " << model_name << " on " << (*engine)->backend_name() << ": kv "
                   << cache_desc.spec.name << ", " << load.kv_bytes_per_token
                   << " bytes/token, " << load.kv_blocks_total << " blocks of "
                   << load.kv_block_tokens << " tokens, max context " << (*engine)->max_context()
                   << " (loaded in "
                   << std::chrono::duration_cast<std::chrono::milliseconds>(
                          std::chrono::steady_clock::now() - t0)
                          .count()
                   << " ms)";

  // Wait for SIGTERM / SIGINT, then drain.
  const int sig = signals.Wait();
  KVGATE_LOG(INFO) << "signal " << sig << ": draining";
  health->SetServingStatus(false);
  service.StopAccepting();
  (*engine)->StopAccepting();
  const auto drain_deadline =
      std::chrono::steady_clock::now() + std::chrono::seconds(absl::GetFlag(FLAGS_drain_timeout_s));
  while (!(*engine)->Idle() && std::chrono::steady_clock::now() < drain_deadline) {
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  // In-flight requests are done (or the drain timed out): cancel whatever is left at once.
  server->Shutdown(std::chrono::system_clock::now() + std::chrono::milliseconds(200));
  engine->reset();  // fails anything left with UNAVAILABLE
  KVGATE_LOG(INFO) << "stopped";
  return 0;
}

}  // namespace
}  // namespace kvgate::worker

int main(int argc, char** argv) { return kvgate::worker::Main(argc, argv); }
