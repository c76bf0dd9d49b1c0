// Where base weights come from: a checkpoint on disk, or tensors a caller holds in memory.
#pragma once
#include <map>
#include <string>
#include <vector>

#include "solar/safetensors.hpp"

namespace solar {

class WeightSource {
 public:
  virtual ~WeightSource() = default;
  virtual std::vector<std::string> names() const = 0;
  virtual bool contains(const std::string& name) const = 0;
  virtual TensorView get(const std::string& name) const = 0;  // throws Mismatch if absent
  virtual std::string describe() const = 0;                    // for error messages
};

// Tensors owned by the caller (e.g. a PyTorch state dict exposed through the binding).
class InMemoryWeights final : public WeightSource {
 public:
  explicit InMemoryWeights(std::string label = "<in-memory weights>") : label_(std::move(label)) {}
  void add(const std::string& name, TensorView view) { views_[name] = std::move(view); }
  std::vector<std::string> names() const override;
  bool contains(const std::string& name) const override { return views_.count(name) != 0; }
  TensorView get(const std::string& name) const override;
  std::string describe() const override { return label_; }

 private:
  std::string label_;
  std::map<std::string, TensorView> views_;
};

// A view of caller-held bytes (the Python binding's arrays, the C API's buffers). Throws
// InvalidInput naming `where` when a dimension is negative or `nbytes` is not what the shape
// and dtype need.
TensorView checked_view(DType dtype, std::vector<int64_t> shape, const uint8_t* data, size_t nbytes,
                        const std::string& where);

// Finds the base weight for a PEFT module path: "<path>.weight" if present; else the path with
// leading components removed (a wrapper such as "bert." that the checkpoint lacks); else the
// unique checkpoint key ending in ".<path>.weight". Throws Mismatch naming the module otherwise.
std::string resolve_base_key(const WeightSource& base, const std::string& module_path);

}  // namespace solar
