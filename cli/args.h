// A small `--name value` / `--name=value` / `--flag` parser for CLI subcommands. Subcommands share
// one process, so they do not use global absl flags (names would collide across commands).
//
//   Args args(argc, argv, {"target", "max-tokens"}, {"quiet"});
//   if (!args.ok()) { fprintf(stderr, "%s\n", args.error().c_str()); return 2; }
//   std::string target = args.Get("target", "localhost:50051");
//   int n = args.GetInt("max-tokens", 64);  // sets error() on a malformed number
#pragma once

#include <cstdlib>
#include <map>
#include <set>
#include <string>
#include <vector>

namespace kvgate::cli {

class Args {
 public:
  Args(int argc, char** argv, std::set<std::string> value_flags, std::set<std::string> bool_flags)
      : value_flags_(std::move(value_flags)), bool_flags_(std::move(bool_flags)) {
    for (int i = 1; i < argc; ++i) {
      std::string a = argv[i];
      if (a == "--") {
        for (++i; i < argc; ++i) positional_.push_back(argv[i]);
        break;
      }
      if (a.size() < 3 || a.rfind("--", 0) != 0) {
        positional_.push_back(a);
        continue;
      }
      std::string name = a.substr(2), value;
      bool has_value = false;
      if (auto eq = name.find('='); eq != std::string::npos) {
        value = name.substr(eq + 1);
        name = name.substr(0, eq);
        has_value = true;
      }
      for (char& c : name) c = c == '_' ? '-' : c;
      if (bool_flags_.count(name)) {
        values_[name] = has_value ? value : "true";
      } else if (value_flags_.count(name)) {
        if (!has_value) {
          if (i + 1 >= argc) {
            error_ = "--" + name + " needs a value";
            return;
          }
          value = argv[++i];
        }
        values_[name] = value;
      } else if (name == "help") {
        help_ = true;
      } else {
        error_ = "unknown flag --" + name;
        return;
      }
    }
  }

  bool ok() const { return error_.empty(); }
  bool help() const { return help_; }
  const std::string& error() const { return error_; }
  const std::vector<std::string>& positional() const { return positional_; }
  bool Has(const std::string& name) const { return values_.count(name) > 0; }

  std::string Get(const std::string& name, const std::string& def = "") const {
    auto it = values_.find(name);
    return it == values_.end() ? def : it->second;
  }
  bool GetBool(const std::string& name) const {
    auto it = values_.find(name);
    return it != values_.end() && it->second != "false" && it->second != "0";
  }
  double GetDouble(const std::string& name, double def) {
    auto it = values_.find(name);
    if (it == values_.end()) return def;
    char* end = nullptr;
    double v = std::strtod(it->second.c_str(), &end);
    if (end == it->second.c_str() || *end != '\0') error_ = "--" + name + ": not a number";
    return v;
  }
  long long GetInt(const std::string& name, long long def) {
    auto it = values_.find(name);
    if (it == values_.end()) return def;
    char* end = nullptr;
    long long v = std::strtoll(it->second.c_str(), &end, 10);
    if (end == it->second.c_str() || *end != '\0') error_ = "--" + name + ": not an integer";
    return v;
  }

 private:
  std::set<std::string> value_flags_, bool_flags_;
  std::map<std::string, std::string> values_;
  std::vector<std::string> positional_;
  std::string error_;
  bool help_ = false;
};

}  // namespace kvgate::cli
