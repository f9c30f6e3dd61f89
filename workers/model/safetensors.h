// Safetensors reader: memory-maps Hugging Face `.safetensors` files and gives typed, validated
// views of their tensors; SafetensorsModel joins the shards of a model folder (model.safetensors,
// or the files named by model.safetensors.index.json's weight_map) into one name -> tensor lookup.
//
// File layout: u64 little-endian header length N, N bytes of JSON header
// {"name": {"dtype": "BF16", "shape": [rows, cols], "data_offsets": [begin, end]}, ...,
//  "__metadata__": {...}}, then the data; offsets are relative to the first byte after the header.
// Everything is validated on open (header length within the file, JSON, dtype, shape * dtype size
// == byte range, ranges inside the data and not overlapping): a malformed file is an
// InvalidArgumentError naming the file (and tensor), never a crash.
//
//   ASSIGN_OR_RETURN(SafetensorsModel model, SafetensorsModel::Open("models/tiny"));
//   ASSIGN_OR_RETURN(const TensorView* t, model.Get("model.norm.weight", {hidden}));
//   std::vector<float> w(t->num_elements());
//   RETURN_IF_ERROR(ConvertToFloat32(*t, w.data()));
#pragma once

#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace kvgate::worker {

// Element types. Only F32, F16 and BF16 convert to float; the others are recognized (so that a file
// holding e.g. an int64 buffer still opens) and refused when used.
enum class TensorDtype {
  kF32,
  kF16,
  kBF16,
  kF64,
  kI64,
  kI32,
  kI16,
  kI8,
  kU8,
  kBool,
  kF8E4M3,
  kF8E5M2
};

std::string_view TensorDtypeName(TensorDtype dtype);

struct TensorView {
  std::string name;
  std::string file;  // path of the file holding it (for error messages)
  TensorDtype dtype = TensorDtype::kF32;
  std::vector<int64_t> shape;
  std::span<const std::byte> data;  // exactly num_elements() * element size bytes, unaligned

  int64_t num_elements() const;
};

// One memory-mapped .safetensors file. Views stay valid while the object lives.
class SafetensorsFile {
 public:
  // NotFoundError if the file cannot be opened; InvalidArgumentError if it is malformed.
  static absl::StatusOr<std::unique_ptr<SafetensorsFile>> Open(const std::string& path);
  ~SafetensorsFile();
  SafetensorsFile(const SafetensorsFile&) = delete;
  SafetensorsFile& operator=(const SafetensorsFile&) = delete;

  const std::string& path() const { return path_; }
  // nullptr when the file has no tensor of that name.
  const TensorView* Find(std::string_view name) const;
  const std::vector<TensorView>& tensors() const { return tensors_; }

 private:
  SafetensorsFile() = default;
  std::string path_;
  void* mapping_ = nullptr;
  size_t mapping_size_ = 0;
  std::vector<TensorView> tensors_;  // sorted by name
};

// All tensors of a Hugging Face model folder.
class SafetensorsModel {
 public:
  // Opens `model_dir`/model.safetensors.index.json if present (every shard it names, each once),
  // else `model_dir`/model.safetensors. NotFoundError when the folder has neither;
  // InvalidArgumentError for a malformed index, a shard that is missing or malformed, or a tensor
  // the index maps to a shard that does not hold it.
  static absl::StatusOr<SafetensorsModel> Open(const std::string& model_dir);

  // The tensor `name`; InvalidArgumentError naming the folder if it is missing, or naming the file
  // and tensor if `expected_shape` is non-empty and differs.
  absl::StatusOr<const TensorView*> Get(std::string_view name,
                                        std::span<const int64_t> expected_shape = {}) const;
  bool Contains(std::string_view name) const { return index_.count(std::string(name)) > 0; }
  size_t num_tensors() const { return index_.size(); }

 private:
  std::string model_dir_;
  std::vector<std::unique_ptr<SafetensorsFile>> files_;
  std::map<std::string, const TensorView*, std::less<>> index_;
};

// Converts a F32/F16/BF16 tensor to float32 into `out` (num_elements() floats).
// InvalidArgumentError naming the file and tensor for any other dtype.
absl::Status ConvertToFloat32(const TensorView& tensor, float* out);

}  // namespace kvgate::worker
