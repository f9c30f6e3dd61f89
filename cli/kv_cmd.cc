// `kvgate kv`: run tensors through a KV format on the CPU reference, for outside checks.
//
//   kvgate kv roundtrip --format tq3 --in X.npy --out Y.npy [--role keys|values]
//       X: [N, head_dim] float32 -> Y: the reconstruction attention sees (RoundTripKv).
//   kvgate kv attention --format kivi2 --q Q.npy --k K.npy --v V.npy --out O.npy [--scale S]
//       Q: [num_q_heads, d]; K, V: [N, num_kv_heads, d] or [N, d]; O: [num_q_heads, d], one decode
//       step through a CPU KvCache holding the N tokens (default scale 1/sqrt(d)).
// .npy files: little-endian float32 ('<f4'), C order, format versions 1-3; anything else is
// rejected with a message naming the file.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <map>
#include <sstream>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "cli/command.h"
#include "kvgate/kernels/kv_cache.h"
#include "kvgate/kernels/kv_format.h"

namespace kvgate::cli {
namespace {

struct NpyArray {
  std::vector<int64_t> shape;
  std::vector<float> data;
};

absl::StatusOr<NpyArray> ReadNpy(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat(path, ": cannot open"));
  std::string bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  auto bad = [&](const std::string& why) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": not a supported .npy file: ", why));
  };
  if (bytes.size() < 10 || bytes.compare(0, 6, "\x93NUMPY") != 0) return bad("bad magic");
  const int major = static_cast<unsigned char>(bytes[6]);
  size_t header_len, offset;
  if (major == 1) {
    header_len = static_cast<unsigned char>(bytes[8]) | (static_cast<unsigned char>(bytes[9]) << 8);
    offset = 10;
  } else if (major == 2 || major == 3) {
    if (bytes.size() < 12) return bad("truncated header");
    header_len = 0;
    for (int i = 0; i < 4; ++i)
      header_len |= static_cast<size_t>(static_cast<unsigned char>(bytes[8 + i])) << (8 * i);
    offset = 12;
  } else {
    return bad(absl::StrCat("format version ", major));
  }
  if (bytes.size() < offset + header_len) return bad("truncated header");
  const std::string header = bytes.substr(offset, header_len);
  auto field = [&](const std::string& key) -> std::string {
    const size_t at = header.find("'" + key + "'");
    if (at == std::string::npos) return "";
    size_t colon = header.find(':', at);
    if (colon == std::string::npos) return "";
    size_t start = header.find_first_not_of(' ', colon + 1);
    if (start == std::string::npos) return "";
    if (header[start] == '(') {
      const size_t end = header.find(')', start);
      return end == std::string::npos ? "" : header.substr(start, end - start + 1);
    }
    const size_t end = header.find_first_of(",}", start);
    return end == std::string::npos ? "" : header.substr(start, end - start);
  };
  const std::string descr = field("descr");
  if (descr != "'<f4'")
    return bad(absl::StrCat("dtype ", descr.empty() ? "?" : descr, ", want '<f4'"));
  if (field("fortran_order") != "False") return bad("fortran_order must be False");
  std::string shape_text = field("shape");
  if (shape_text.size() < 2) return bad("no shape");
  NpyArray array;
  int64_t count = 1;
  std::stringstream items(shape_text.substr(1, shape_text.size() - 2));
  for (std::string item; std::getline(items, item, ',');) {
    item.erase(0, item.find_first_not_of(' '));
    item.erase(item.find_last_not_of(' ') + 1);
    if (item.empty()) continue;
    int64_t dim;
    if (!absl::SimpleAtoi(item, &dim) || dim < 0 || dim > (int64_t{1} << 32)) {
      return bad(absl::StrCat("shape entry '", item, "'"));
    }
    array.shape.push_back(dim);
    count *= dim;
    if (count > (int64_t{1} << 32)) return bad("too large");
  }
  const size_t data_offset = offset + header_len;
  if (bytes.size() - data_offset != static_cast<size_t>(count) * 4) {
    return bad(absl::StrCat("shape ", shape_text, " needs ", count * 4, " data bytes, file has ",
                            bytes.size() - data_offset));
  }
  array.data.resize(count);
  std::memcpy(array.data.data(), bytes.data() + data_offset, count * 4);
  return array;
}

absl::Status WriteNpy(const std::string& path, const std::vector<int64_t>& shape,
                      const std::vector<float>& data) {
  std::string header = absl::StrCat("{'descr': '<f4', 'fortran_order': False, 'shape': (",
                                    absl::StrJoin(shape, ", "), shape.size() == 1 ? ",)" : ")",
                                    ", }");
  while ((10 + header.size() + 1) % 64 != 0) header += ' ';
  header += '\n';
  std::ofstream out(path, std::ios::binary);
  if (!out) return absl::PermissionDeniedError(absl::StrCat(path, ": cannot write"));
  const char magic[8] = {'\x93', 'N', 'U', 'M', 'P', 'Y', 1, 0};
  out.write(magic, 8);
  const uint16_t len = static_cast<uint16_t>(header.size());
  const char len_bytes[2] = {static_cast<char>(len & 0xFF), static_cast<char>(len >> 8)};
  out.write(len_bytes, 2);
  out.write(header.data(), header.size());
  out.write(reinterpret_cast<const char*>(data.data()), data.size() * 4);
  if (!out) return absl::DataLossError(absl::StrCat(path, ": write failed"));
  return absl::OkStatus();
}

// --name value pairs after the subcommand.
absl::StatusOr<std::map<std::string, std::string>> ParseOptions(int argc, char** argv, int first) {
  std::map<std::string, std::string> options;
  for (int i = first; i < argc; ++i) {
    std::string name = argv[i];
    if (name.rfind("--", 0) != 0 || i + 1 >= argc) {
      return absl::InvalidArgumentError(absl::StrCat("expected --option value, got '", name, "'"));
    }
    options[name.substr(2)] = argv[++i];
  }
  return options;
}

absl::Status RunRoundTrip(std::map<std::string, std::string>& opt) {
  for (const char* required : {"format", "in", "out"}) {
    if (!opt.count(required))
      return absl::InvalidArgumentError(absl::StrCat("--", required, " is required"));
  }
  auto spec = kernels::ParseKvFormat(opt["format"]);
  if (!spec.ok()) return spec.status();
  const std::string role_name = opt.count("role") ? opt["role"] : "keys";
  if (role_name != "keys" && role_name != "values") {
    return absl::InvalidArgumentError("--role must be keys or values");
  }
  auto in = ReadNpy(opt["in"]);
  if (!in.ok()) return in.status();
  if (in->shape.size() != 2 || in->shape[1] <= 0 || in->shape[1] > 4096) {
    return absl::InvalidArgumentError(absl::StrCat(opt["in"], ": want shape [N, head_dim]"));
  }
  std::vector<float> out(in->data.size());
  absl::Status status = kernels::RoundTripKv(
      *spec, static_cast<int>(in->shape[1]),
      role_name == "keys" ? kernels::KvTensorRole::kKeys : kernels::KvTensorRole::kValues,
      in->shape[0], in->data.data(), out.data());
  if (!status.ok()) return status;
  return WriteNpy(opt["out"], in->shape, out);
}

absl::Status RunAttention(std::map<std::string, std::string>& opt) {
  for (const char* required : {"format", "q", "k", "v", "out"}) {
    if (!opt.count(required))
      return absl::InvalidArgumentError(absl::StrCat("--", required, " is required"));
  }
  auto spec = kernels::ParseKvFormat(opt["format"]);
  if (!spec.ok()) return spec.status();
  auto q = ReadNpy(opt["q"]);
  if (!q.ok()) return q.status();
  auto k = ReadNpy(opt["k"]);
  if (!k.ok()) return k.status();
  auto v = ReadNpy(opt["v"]);
  if (!v.ok()) return v.status();
  if (q->shape.size() != 2) return absl::InvalidArgumentError("q: want [num_q_heads, d]");
  const int64_t q_heads = q->shape[0], d = q->shape[1];
  if (k->shape != v->shape) return absl::InvalidArgumentError("k and v shapes differ");
  if (k->shape.size() == 2) k->shape.insert(k->shape.begin() + 1, 1);
  if (k->shape.size() != 3 || k->shape[2] != d) {
    return absl::InvalidArgumentError("k, v: want [N, num_kv_heads, d] or [N, d] with q's d");
  }
  const int64_t n = k->shape[0], kv_heads = k->shape[1];
  if (n <= 0 || kv_heads <= 0 || q_heads <= 0 || q_heads % kv_heads != 0) {
    return absl::InvalidArgumentError("need N > 0 and num_q_heads a multiple of num_kv_heads");
  }
  float scale = 1.0f / std::sqrt(static_cast<float>(d));
  if (opt.count("scale") && !absl::SimpleAtof(opt["scale"], &scale)) {
    return absl::InvalidArgumentError("--scale: not a number");
  }
  kernels::KvCacheConfig cfg;
  cfg.num_layers = 1;
  cfg.num_kv_heads = static_cast<int>(kv_heads);
  cfg.head_dim = static_cast<int>(d);
  cfg.block_size = 16;
  cfg.num_blocks = (n + 15) / 16;
  cfg.format = *spec;
  auto cache = kernels::CreateCpuKvCache(cfg);
  if (!cache.ok()) return cache.status();
  absl::Status status = (*cache)->AddSequence(0, n);
  if (status.ok()) status = (*cache)->Append(0, 0, n, k->data.data(), v->data.data());
  std::vector<float> out(q_heads * d);
  if (status.ok()) {
    status = (*cache)->DecodeAttention(0, 0, static_cast<int>(q_heads), q->data.data(), scale,
                                       out.data());
  }
  if (!status.ok()) return status;
  return WriteNpy(opt["out"], {q_heads, d}, out);
}

int RunKv(int argc, char** argv) {
  const char* usage =
      "usage: kvgate kv roundtrip --format F --in X.npy --out Y.npy [--role keys|values]\n"
      "       kvgate kv attention --format F --q Q.npy --k K.npy --v V.npy --out O.npy "
      "[--scale S]\n";
  if (argc < 2 || !std::strcmp(argv[1], "--help")) {
    std::fputs(usage, argc < 2 ? stderr : stdout);
    return argc < 2 ? 2 : 0;
  }
  auto options = ParseOptions(argc, argv, 2);
  if (!options.ok()) {
    std::fprintf(stderr, "kvgate kv: %s\n%s", std::string(options.status().message()).c_str(),
                 usage);
    return 2;
  }
  absl::Status status;
  const std::string sub = argv[1];
  if (sub == "roundtrip") {
    status = RunRoundTrip(*options);
  } else if (sub == "attention") {
    status = RunAttention(*options);
  } else {
    std::fprintf(stderr, "kvgate kv: unknown subcommand '%s'\n%s", sub.c_str(), usage);
    return 2;
  }
  if (!status.ok()) {
    std::fprintf(stderr, "kvgate kv %s: %s\n", sub.c_str(), status.ToString().c_str());
    return 1;
  }
  return 0;
}

}  // namespace
}  // namespace kvgate::cli

KVGATE_COMMAND(kv, "run .npy tensors through a KV format (roundtrip, attention)",
               kvgate::cli::RunKv);
