// Subcommands of the `kvgate` CLI register themselves here; main() dispatches on argv[1].
//
//   namespace { int RunTokenize(int argc, char** argv) { ... } }
//   KVGATE_COMMAND(tokenize, "print token ids for each stdin line", RunTokenize);
//
// A command gets argv with argv[0] = "kvgate <name>" and returns the process exit code
// (0 ok, 1 failure, 2 usage error).
#pragma once

#include <functional>
#include <map>
#include <string>

#include <grpcpp/support/status.h>

namespace kvgate::cli {

struct Command {
  std::string help;
  std::function<int(int, char**)> run;
};

std::map<std::string, Command>& Commands();

// Upper-case gRPC status code name ("INVALID_ARGUMENT") for messages.
const char* StatusCodeName(grpc::StatusCode code);

struct CommandRegistrar {
  CommandRegistrar(const std::string& name, const std::string& help,
                   std::function<int(int, char**)> run) {
    Commands()[name] = Command{help, std::move(run)};
  }
};

}  // namespace kvgate::cli

#define KVGATE_COMMAND(name, help, fn) \
  static ::kvgate::cli::CommandRegistrar kvgate_command_##name(#name, help, fn)
