// `kvgate tokenize`: token ids of each stdin line with a Hugging Face tokenizer.json, or the text
// of each JSON id array with --decode.
//
//   echo 'Hello world' | kvgate tokenize --tokenizer model/tokenizer.json      -> [9906,1917]
//   echo '"two\nlines"' | kvgate tokenize --tokenizer t.json --jsonl --no-special
//   echo '[9906,1917]' | kvgate tokenize --tokenizer t.json --decode            -> "Hello world"
#include <cstdio>
#include <cstring>
#include <iostream>
#include <string>

#include "cli/command.h"
#include "kvgate/common/tokenizer.h"
#include "nlohmann/json.hpp"

namespace kvgate::cli {
namespace {

constexpr char kUsage[] =
    "usage: kvgate tokenize --tokenizer FILE [--no-special] [--jsonl] [--decode]\n"
    "          [--skip-special]\n"
    "  Reads stdin line by line and prints one JSON array of token ids per line.\n"
    "  --tokenizer FILE  Hugging Face tokenizer.json\n"
    "  --no-special      do not add the post-processor's special tokens (e.g. BOS)\n"
    "  --jsonl           each input line is a JSON string (so texts may hold newlines)\n"
    "  --decode          each input line is a JSON array of ids; prints a JSON string\n"
    "  --skip-special    with --decode: leave special tokens out of the text\n";

int RunTokenize(int argc, char** argv) {
  std::string path;
  bool add_special = true, jsonl = false, decode = false, skip_special = false;
  for (int i = 1; i < argc; ++i) {
    std::string arg = argv[i];
    if (arg == "--tokenizer" && i + 1 < argc) {
      path = argv[++i];
    } else if (arg.rfind("--tokenizer=", 0) == 0) {
      path = arg.substr(std::strlen("--tokenizer="));
    } else if (arg == "--no-special") {
      add_special = false;
    } else if (arg == "--jsonl") {
      jsonl = true;
    } else if (arg == "--decode") {
      decode = true;
    } else if (arg == "--skip-special") {
      skip_special = true;
    } else if (arg == "--help" || arg == "-h") {
      std::fputs(kUsage, stdout);
      return 0;
    } else {
      std::fprintf(stderr, "kvgate tokenize: unknown argument '%s'\n%s", arg.c_str(), kUsage);
      return 2;
    }
  }
  if (path.empty()) {
    std::fputs(kUsage, stderr);
    return 2;
  }
  auto tokenizer = Tokenizer::FromFile(path);
  if (!tokenizer.ok()) {
    std::fprintf(stderr, "kvgate tokenize: %s\n",
                 std::string(tokenizer.status().ToString()).c_str());
    return 1;
  }
  std::ios::sync_with_stdio(false);
  std::string line;
  int exit_code = 0;
  for (size_t line_number = 1; std::getline(std::cin, line); ++line_number) {
    if (decode) {
      auto parsed = nlohmann::json::parse(line, nullptr, /*allow_exceptions=*/false);
      if (!parsed.is_array()) {
        std::fprintf(stderr, "kvgate tokenize: line %zu is not a JSON array of ids\n", line_number);
        std::cout << "null\n";
        exit_code = 1;
        continue;
      }
      std::vector<int32_t> ids;
      for (const auto& id : parsed) {
        if (id.is_number_integer()) ids.push_back(static_cast<int32_t>(id.get<int64_t>()));
      }
      std::string text = (*tokenizer)->Decode(ids, {.skip_special_tokens = skip_special});
      std::cout << nlohmann::json(text).dump(-1, ' ', false,
                                             nlohmann::json::error_handler_t::replace)
                << '\n';
      continue;
    }
    std::string text;
    if (jsonl) {
      auto parsed = nlohmann::json::parse(line, nullptr, /*allow_exceptions=*/false);
      if (!parsed.is_string()) {
        std::fprintf(stderr, "kvgate tokenize: line %zu is not a JSON string\n", line_number);
        std::cout << "null\n";
        exit_code = 1;
        continue;
      }
      text = parsed.get<std::string>();
    } else {
      text = std::move(line);
    }
    auto ids = (*tokenizer)->Encode(text, {.add_special_tokens = add_special});
    if (!ids.ok()) {
      std::fprintf(stderr, "kvgate tokenize: line %zu: %s\n", line_number,
                   std::string(ids.status().message()).c_str());
      std::cout << "null\n";
      exit_code = 1;
      continue;
    }
    std::string out = "[";
    for (size_t i = 0; i < ids->size(); ++i) {
      if (i) out.push_back(',');
      out += std::to_string((*ids)[i]);
    }
    out += "]\n";
    std::cout << out;
  }
  std::cout.flush();
  return exit_code;
}

}  // namespace
}  // namespace kvgate::cli

KVGATE_COMMAND(tokenize, "print token ids of each stdin line (or decode ids)",
               kvgate::cli::RunTokenize);
