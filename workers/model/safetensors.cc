#include "workers/model/safetensors.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <set>
#include <sstream>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "kvgate/common/status_macros.h"
#include "nlohmann/json.hpp"

namespace kvgate::worker {
namespace {

using Json = nlohmann::json;

// Header sizes above this are refused (the safetensors library's own limit is 100 MB).
constexpr uint64_t kMaxHeaderBytes = uint64_t{100} << 20;

struct DtypeInfo {
  std::string_view name;
  TensorDtype dtype;
  int64_t bytes;
};

constexpr DtypeInfo kDtypes[] = {
    {"F32", TensorDtype::kF32, 4},        {"F16", TensorDtype::kF16, 2},
    {"BF16", TensorDtype::kBF16, 2},      {"F64", TensorDtype::kF64, 8},
    {"I64", TensorDtype::kI64, 8},        {"I32", TensorDtype::kI32, 4},
    {"I16", TensorDtype::kI16, 2},        {"I8", TensorDtype::kI8, 1},
    {"U8", TensorDtype::kU8, 1},          {"BOOL", TensorDtype::kBool, 1},
    {"F8_E4M3", TensorDtype::kF8E4M3, 1}, {"F8_E5M2", TensorDtype::kF8E5M2, 1},
};

const DtypeInfo& Info(TensorDtype dtype) {
  for (const DtypeInfo& info : kDtypes) {
    if (info.dtype == dtype) return info;
  }
  return kDtypes[0];
}

std::string ShapeString(std::span<const int64_t> shape) {
  return absl::StrCat("[", absl::StrJoin(shape, ", "), "]");
}

float HalfToFloat(uint16_t h) {
  const uint32_t sign = (h & 0x8000u) << 16;
  const uint32_t exponent = (h >> 10) & 0x1f;
  const uint32_t mantissa = h & 0x3ff;
  float magnitude;
  if (exponent == 0) {
    magnitude = std::ldexp(static_cast<float>(mantissa), -24);  // zero or subnormal
  } else if (exponent == 31) {
    magnitude = mantissa == 0 ? INFINITY : NAN;
  } else {
    magnitude = std::ldexp(static_cast<float>(mantissa | 0x400), static_cast<int>(exponent) - 25);
  }
  uint32_t bits;
  std::memcpy(&bits, &magnitude, 4);
  bits |= sign;
  float out;
  std::memcpy(&out, &bits, 4);
  return out;
}

// Parses one header entry into `view` (data span relative to `data`, checked against its size).
absl::Status ParseEntry(const std::string& path, const std::string& name, const Json& entry,
                        std::span<const std::byte> data, TensorView& view) {
  auto bad = [&](const std::string& what) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": tensor '", name, "': ", what));
  };
  if (!entry.is_object()) return bad("header entry is not an object");
  auto dtype = entry.find("dtype");
  auto shape = entry.find("shape");
  auto offsets = entry.find("data_offsets");
  if (dtype == entry.end() || !dtype->is_string()) return bad("missing or non-string 'dtype'");
  if (shape == entry.end() || !shape->is_array()) return bad("missing or non-array 'shape'");
  if (offsets == entry.end() || !offsets->is_array() || offsets->size() != 2 ||
      !(*offsets)[0].is_number_unsigned() || !(*offsets)[1].is_number_unsigned()) {
    return bad("'data_offsets' must be two non-negative integers");
  }
  const std::string dtype_name = dtype->get<std::string>();
  const DtypeInfo* info = nullptr;
  for (const DtypeInfo& d : kDtypes) {
    if (d.name == dtype_name) info = &d;
  }
  if (info == nullptr) {
    return bad(absl::StrCat("unknown dtype '", dtype_name, "'"));
  }
  view.name = name;
  view.file = path;
  view.dtype = info->dtype;
  // Element count with overflow checks: every dimension and the product stay below 2^62.
  int64_t elements = 1;
  for (const Json& dim : *shape) {
    if (!dim.is_number_unsigned()) return bad(absl::StrCat("bad shape ", shape->dump()));
    const uint64_t d = dim.get<uint64_t>();
    if (d > (uint64_t{1} << 40) ||
        (d != 0 && static_cast<uint64_t>(elements) > (uint64_t{1} << 62) / d)) {
      return bad(absl::StrCat("shape ", shape->dump(), " is too large"));
    }
    view.shape.push_back(static_cast<int64_t>(d));
    elements *= static_cast<int64_t>(d);
  }
  const uint64_t begin = (*offsets)[0].get<uint64_t>();
  const uint64_t end = (*offsets)[1].get<uint64_t>();
  if (begin > end || end > data.size()) {
    return bad(absl::StrCat("data_offsets [", begin, ", ", end, "] outside the data section of ",
                            data.size(), " bytes"));
  }
  const uint64_t expected = static_cast<uint64_t>(elements) * info->bytes;
  if (end - begin != expected) {
    return bad(absl::StrCat("shape ", ShapeString(view.shape), " of ", dtype_name, " needs ",
                            expected, " bytes but data_offsets span ", end - begin));
  }
  view.data = data.subspan(begin, end - begin);
  return absl::OkStatus();
}

}  // namespace

std::string_view TensorDtypeName(TensorDtype dtype) { return Info(dtype).name; }

int64_t TensorView::num_elements() const {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

absl::StatusOr<std::unique_ptr<SafetensorsFile>> SafetensorsFile::Open(const std::string& path) {
  std::unique_ptr<SafetensorsFile> file(new SafetensorsFile());
  file->path_ = path;
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    return absl::NotFoundError(absl::StrCat("cannot open ", path, ": ", std::strerror(errno)));
  }
  struct stat st {};
  if (::fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
    ::close(fd);
    return absl::InvalidArgumentError(absl::StrCat(path, ": not a regular file"));
  }
  const uint64_t size = static_cast<uint64_t>(st.st_size);
  if (size < 8) {
    ::close(fd);
    return absl::InvalidArgumentError(absl::StrCat(
        path, ": ", size, " bytes is too small for a safetensors file (8-byte header length)"));
  }
  void* mapping = ::mmap(nullptr, size, PROT_READ, MAP_PRIVATE, fd, 0);
  ::close(fd);
  if (mapping == MAP_FAILED) {
    return absl::InternalError(absl::StrCat("cannot mmap ", path, ": ", std::strerror(errno)));
  }
  file->mapping_ = mapping;
  file->mapping_size_ = size;
  const auto* bytes = static_cast<const std::byte*>(mapping);

  uint64_t header_len = 0;
  for (int i = 7; i >= 0; --i) header_len = (header_len << 8) | static_cast<uint8_t>(bytes[i]);
  if (header_len > size - 8) {
    return absl::InvalidArgumentError(
        absl::StrCat(path, ": header length ", header_len, " goes beyond the file size ", size));
  }
  if (header_len > kMaxHeaderBytes) {
    return absl::InvalidArgumentError(
        absl::StrCat(path, ": header length ", header_len, " exceeds ", kMaxHeaderBytes));
  }
  const char* header_begin = reinterpret_cast<const char*>(bytes + 8);
  Json header = Json::parse(header_begin, header_begin + header_len, nullptr,
                            /*allow_exceptions=*/false);
  if (header.is_discarded()) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": header is not valid JSON"));
  }
  if (!header.is_object()) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": header is not a JSON object"));
  }
  const std::span<const std::byte> data(bytes + 8 + header_len, size - 8 - header_len);
  for (const auto& [name, entry] : header.items()) {
    if (name == "__metadata__") continue;
    TensorView view;
    RETURN_IF_ERROR(ParseEntry(path, name, entry, data, view));
    file->tensors_.push_back(std::move(view));
  }
  std::sort(file->tensors_.begin(), file->tensors_.end(),
            [](const TensorView& a, const TensorView& b) { return a.name < b.name; });

  // No two tensors may share bytes.
  std::vector<const TensorView*> by_offset;
  for (const TensorView& t : file->tensors_) {
    if (!t.data.empty()) by_offset.push_back(&t);
  }
  std::sort(by_offset.begin(), by_offset.end(), [](const TensorView* a, const TensorView* b) {
    return a->data.data() < b->data.data();
  });
  for (size_t i = 1; i < by_offset.size(); ++i) {
    const TensorView* prev = by_offset[i - 1];
    if (by_offset[i]->data.data() < prev->data.data() + prev->data.size()) {
      return absl::InvalidArgumentError(absl::StrCat(path, ": tensors '", prev->name, "' and '",
                                                     by_offset[i]->name,
                                                     "' have overlapping data_offsets"));
    }
  }
  return file;
}

SafetensorsFile::~SafetensorsFile() {
  if (mapping_ != nullptr) ::munmap(mapping_, mapping_size_);
}

const TensorView* SafetensorsFile::Find(std::string_view name) const {
  auto it = std::lower_bound(tensors_.begin(), tensors_.end(), name,
                             [](const TensorView& t, std::string_view n) { return t.name < n; });
  return it != tensors_.end() && it->name == name ? &*it : nullptr;
}

absl::StatusOr<SafetensorsModel> SafetensorsModel::Open(const std::string& model_dir) {
  namespace fs = std::filesystem;
  SafetensorsModel model;
  model.model_dir_ = model_dir;
  const fs::path dir(model_dir);
  const fs::path index_path = dir / "model.safetensors.index.json";
  std::error_code ec;
  if (!fs::exists(index_path, ec)) {
    const fs::path single = dir / "model.safetensors";
    if (!fs::exists(single, ec)) {
      return absl::NotFoundError(absl::StrCat(
          model_dir, ": neither model.safetensors nor model.safetensors.index.json found"));
    }
    ASSIGN_OR_RETURN(auto file, SafetensorsFile::Open(single.string()));
    for (const TensorView& t : file->tensors()) model.index_[t.name] = &t;
    model.files_.push_back(std::move(file));
    return model;
  }

  const std::string index_name = index_path.string();
  std::ifstream in(index_path, std::ios::binary);
  std::stringstream text;
  text << in.rdbuf();
  Json index = Json::parse(text.str(), nullptr, /*allow_exceptions=*/false);
  if (!in || index.is_discarded() || !index.is_object()) {
    return absl::InvalidArgumentError(absl::StrCat(index_name, ": not a valid JSON object"));
  }
  auto weight_map = index.find("weight_map");
  if (weight_map == index.end() || !weight_map->is_object() || weight_map->empty()) {
    return absl::InvalidArgumentError(
        absl::StrCat(index_name, ": missing or empty 'weight_map' object"));
  }
  std::map<std::string, SafetensorsFile*> shards;
  for (const auto& [tensor, shard] : weight_map->items()) {
    if (!shard.is_string()) {
      return absl::InvalidArgumentError(
          absl::StrCat(index_name, ": weight_map entry for '", tensor, "' is not a file name"));
    }
    const std::string shard_name = shard.get<std::string>();
    if (shard_name.empty() || shard_name.find('/') != std::string::npos || shard_name == "." ||
        shard_name == "..") {
      return absl::InvalidArgumentError(absl::StrCat(index_name, ": weight_map entry for '", tensor,
                                                     "' names an invalid file '", shard_name,
                                                     "' (must be a file in the model folder)"));
    }
    auto it = shards.find(shard_name);
    if (it == shards.end()) {
      absl::StatusOr<std::unique_ptr<SafetensorsFile>> file =
          SafetensorsFile::Open((dir / shard_name).string());
      if (!file.ok()) {
        return absl::InvalidArgumentError(absl::StrCat(index_name, ": shard '", shard_name,
                                                       "' (holding '", tensor,
                                                       "'): ", file.status().message()));
      }
      it = shards.emplace(shard_name, file->get()).first;
      model.files_.push_back(std::move(*file));
    }
    const TensorView* view = it->second->Find(tensor);
    if (view == nullptr) {
      return absl::InvalidArgumentError(absl::StrCat(index_name, ": weight_map puts '", tensor,
                                                     "' in '", shard_name,
                                                     "' but that file has no such tensor"));
    }
    model.index_[tensor] = view;
  }
  return model;
}

absl::StatusOr<const TensorView*> SafetensorsModel::Get(
    std::string_view name, std::span<const int64_t> expected_shape) const {
  auto it = index_.find(name);
  if (it == index_.end()) {
    return absl::InvalidArgumentError(
        absl::StrCat(model_dir_, ": missing tensor '", std::string(name), "'"));
  }
  const TensorView* view = it->second;
  if (!expected_shape.empty() && !std::equal(view->shape.begin(), view->shape.end(),
                                             expected_shape.begin(), expected_shape.end())) {
    return absl::InvalidArgumentError(absl::StrCat(
        view->file, ": tensor '", std::string(name), "' has shape ", ShapeString(view->shape),
        " but the config needs ", ShapeString(expected_shape)));
  }
  return view;
}

absl::Status ConvertToFloat32(const TensorView& tensor, float* out) {
  const int64_t n = tensor.num_elements();
  const std::byte* src = tensor.data.data();
  switch (tensor.dtype) {
    case TensorDtype::kF32:
      std::memcpy(out, src, static_cast<size_t>(n) * 4);
      return absl::OkStatus();
    case TensorDtype::kBF16:
      for (int64_t i = 0; i < n; ++i) {
        uint16_t h;
        std::memcpy(&h, src + 2 * i, 2);
        const uint32_t bits = static_cast<uint32_t>(h) << 16;
        std::memcpy(&out[i], &bits, 4);
      }
      return absl::OkStatus();
    case TensorDtype::kF16:
      for (int64_t i = 0; i < n; ++i) {
        uint16_t h;
        std::memcpy(&h, src + 2 * i, 2);
        out[i] = HalfToFloat(h);
      }
      return absl::OkStatus();
    default:
      return absl::InvalidArgumentError(
          absl::StrCat(tensor.file, ": tensor '", tensor.name, "' has dtype ",
                       std::string(TensorDtypeName(tensor.dtype)),
                       "; only F32, F16 and BF16 weights are supported"));
  }
}

}  // namespace kvgate::worker
