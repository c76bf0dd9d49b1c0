// Hugging Face PEFT LoRA adapter directories: adapter_config.json + adapter_model.safetensors.
#pragma once
#include <map>
#include <string>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "solar/dtype.hpp"

namespace solar {

// One LoRA-adapted module. A is r x in, B is out x r (as stored by PEFT for nn.Linear and
// for GPT-2 Conv1D alike); the update PEFT applies is scaling * B @ A.
struct LoraModule {
  std::string path;      // module path without the key prefix, e.g. "layers.0.attention.wq"
  Tensor A;              // key <prefix><path>.lora_A.weight
  Tensor B;              // key <prefix><path>.lora_B.weight
  int64_t rank = 0;      // rows of A
  double alpha = 0.0;    // lora_alpha after alpha_pattern
  double scaling = 1.0;  // alpha / rank, or alpha / sqrt(rank) with use_rslora
};

struct PeftAdapter {
  // adapter_config.json, verbatim and in its key order (PEFT resolves rank_pattern and
  // alpha_pattern keys in that order: the first that matches wins).
  nlohmann::ordered_json config;
  std::string key_prefix = "base_model.model.";
  std::vector<LoraModule> modules;                          // sorted by path
  std::vector<std::pair<std::string, Tensor>> passthrough;  // every other tensor, by full key
  std::map<std::string, std::string> file_metadata;         // safetensors __metadata__

  bool fan_in_fan_out() const;
};

// Reads and validates `dir` (errors name the file and the problem; NaN/Inf are refused).
PeftAdapter read_peft_adapter(const std::string& dir);
// Parses an adapter already in memory (used by the Python binding); `where` names it in errors.
PeftAdapter make_peft_adapter(nlohmann::ordered_json config,
                              std::vector<std::pair<std::string, Tensor>> tensors,
                              std::map<std::string, std::string> file_metadata,
                              const std::string& where);
// Sets module.alpha and module.scaling from `config` as PEFT does for a module of module.rank
// (lora_alpha, the first alpha_pattern key that matches module.path, use_rslora).
void set_lora_scaling(const nlohmann::ordered_json& config, LoraModule& module, const std::string& where);
// Tensors in PEFT's key layout, modules first (A then B), then passthrough.
std::vector<std::pair<std::string, Tensor>> peft_tensors(const PeftAdapter& adapter);
// The same keys, pointing into `adapter` instead of copying it.
std::vector<std::pair<std::string, const Tensor*>> peft_tensor_refs(const PeftAdapter& adapter);
// Writes adapter_config.json and adapter_model.safetensors into `dir`, atomically.
void write_peft_adapter(const std::string& dir, const PeftAdapter& adapter);

// PEFT's pattern lookup for rank_pattern / alpha_pattern: a key matches a module path when the
// path equals it or ends with "." + key, or when the key as a regex fully matches the path
// (optionally after a dotted prefix). Returns nullptr when no key matches.
// Keys are tried in the object's order: use ordered_json for PEFT's own order.
const nlohmann::json* match_pattern(const nlohmann::json& patterns, const std::string& path);
const nlohmann::ordered_json* match_pattern(const nlohmann::ordered_json& patterns, const std::string& path);

}  // namespace solar
