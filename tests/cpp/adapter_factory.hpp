// Builds PEFT-layout LoRA adapters for real base checkpoints (stories260K) in tests.
#pragma once
#include <string>
#include <vector>

#include "solar/checkpoint.hpp"
#include "solar/peft_adapter.hpp"
#include "test_support.hpp"

namespace solar::test {

inline std::string stories_checkpoint() {
  const std::string d = shared_data_dir();
  return d.empty() ? "" : d + "/models/stories260K/stories260K.safetensors";
}

// A LoRA of rank r on the given modules of every layer of stories260K, with random A and B
// (a trained adapter's B is non-zero; a random one exercises every direction).
inline PeftAdapter stories_adapter(const Checkpoint& base, int64_t r, const std::vector<std::string>& targets,
                                   uint64_t seed = 1, DType dtype = DType::F32, int layers = 5) {
  nlohmann::json cfg = {{"peft_type", "LORA"}, {"r", r}, {"lora_alpha", 2 * r}, {"target_modules", targets},
                        {"fan_in_fan_out", false}, {"use_rslora", false}, {"rank_pattern", nlohmann::json::object()},
                        {"alpha_pattern", nlohmann::json::object()}, {"bias", "none"}, {"task_type", nullptr}};
  std::vector<std::pair<std::string, Tensor>> tensors;
  for (int l = 0; l < layers; ++l)
    for (const auto& t : targets) {
      const std::string path = "layers." + std::to_string(l) + ".attention." + t;
      const TensorView w = base.get(path + ".weight");
      const int64_t m = w.shape[0], n = w.shape[1];
      tensors.emplace_back("base_model.model." + path + ".lora_A.weight", random_tensor({r, n}, seed++, dtype, 0.1f));
      tensors.emplace_back("base_model.model." + path + ".lora_B.weight", random_tensor({m, r}, seed++, dtype, 0.05f));
    }
  return make_peft_adapter(cfg, std::move(tensors), {{"format", "pt"}}, "<stories adapter>");
}

}  // namespace solar::test
