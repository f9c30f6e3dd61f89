// kvgate: the command-line tool. Subcommands live in cli/*_cmd.cc and register themselves.
#include <cstdio>
#include <cstring>
#include <string>

#include "cli/command.h"

namespace kvgate::cli {
std::map<std::string, Command>& Commands() {
  static auto* commands = new std::map<std::string, Command>();
  return *commands;
}
}  // namespace kvgate::cli

static void PrintUsage() {
  std::fprintf(stderr, "usage: kvgate <command> [args]\n\ncommands:\n");
  for (const auto& [name, cmd] : kvgate::cli::Commands()) {
    std::fprintf(stderr, "  %-12s %s\n", name.c_str(), cmd.help.c_str());
  }
  std::fprintf(stderr, "\nRun 'kvgate <command> --help' for a command's options.\n");
}

int main(int argc, char** argv) {
  if (argc < 2 || !std::strcmp(argv[1], "--help") || !std::strcmp(argv[1], "-h") ||
      !std::strcmp(argv[1], "help")) {
    PrintUsage();
    return argc < 2 ? 2 : 0;
  }
  auto& commands = kvgate::cli::Commands();
  auto it = commands.find(argv[1]);
  if (it == commands.end()) {
    std::fprintf(stderr, "kvgate: unknown command '%s'\n\n", argv[1]);
    PrintUsage();
    return 2;
  }
  std::string name = std::string("kvgate ") + argv[1];
  argv[1] = name.data();
  return it->second.run(argc - 1, argv + 1);
}
