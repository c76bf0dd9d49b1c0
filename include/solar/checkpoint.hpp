// A base model checkpoint: one safetensors file, a directory holding model.safetensors,
// or a directory with a sharded model.safetensors.index.json.
#pragma once
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "solar/safetensors.hpp"
#include "solar/weights.hpp"

namespace solar {

class Checkpoint final : public WeightSource {
 public:
  explicit Checkpoint(const std::string& path);
  const std::string& path() const { return path_; }
  std::vector<std::string> names() const override;
  bool contains(const std::string& name) const override;
  TensorView get(const std::string& name) const override;  // throws Mismatch naming the checkpoint
  std::string describe() const override { return path_; }
  const std::string& file_of(const std::string& name) const;

 private:
  std::string path_;
  std::vector<std::unique_ptr<SafetensorsFile>> shards_;
  std::map<std::string, size_t> index_;  // tensor name -> shard
};

}  // namespace solar
