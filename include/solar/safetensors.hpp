// Reading (memory-mapped) and writing safetensors files.
// Spec: 8-byte LE header length, JSON header {name: {dtype, shape, data_offsets}, "__metadata__"},
// then the byte buffer. Every offset is validated before use.
#pragma once
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "solar/dtype.hpp"

namespace solar {

struct TensorView {
  DType dtype;
  std::vector<int64_t> shape;
  const uint8_t* data;  // points into the mapping; valid while the file is open
  size_t nbytes;

  size_t numel() const;
  Tensor copy() const;
  std::vector<float> to_f32() const;
};

class SafetensorsFile {
 public:
  // Maps `path` read-only and validates its header; throws Error naming the file.
  explicit SafetensorsFile(const std::string& path);
  ~SafetensorsFile();
  SafetensorsFile(const SafetensorsFile&) = delete;
  SafetensorsFile& operator=(const SafetensorsFile&) = delete;

  const std::string& path() const { return path_; }
  std::vector<std::string> names() const;  // in file order of offsets
  bool contains(const std::string& name) const;
  TensorView get(const std::string& name) const;  // throws Mismatch if absent
  const std::map<std::string, std::string>& metadata() const { return metadata_; }

 private:
  struct Entry { DType dtype; std::vector<int64_t> shape; uint64_t begin, end; };
  std::string path_;
  const uint8_t* map_ = nullptr;
  size_t map_size_ = 0;
  const uint8_t* buffer_ = nullptr;  // start of the data buffer
  std::map<std::string, Entry> entries_;
  std::map<std::string, std::string> metadata_;
};

// Serialises tensors (in the given order) to safetensors bytes.
std::vector<uint8_t> safetensors_bytes(const std::vector<std::pair<std::string, Tensor>>& tensors,
                                       const std::map<std::string, std::string>& metadata = {});
// Writes atomically (temp file in the same directory, then rename).
void write_safetensors(const std::string& path,
                       const std::vector<std::pair<std::string, Tensor>>& tensors,
                       const std::map<std::string, std::string>& metadata = {});

}  // namespace solar
