#include "solar/peft_adapter.hpp"

#include <cmath>
#include <filesystem>
#include <optional>
#include <regex>
#include <set>
#include <system_error>

#include "solar/error.hpp"
#include "solar/io.hpp"
#include "solar/safetensors.hpp"

namespace fs = std::filesystem;

namespace solar {
namespace {

constexpr const char* kPeftPrefix = "base_model.model.";
constexpr const char* kSuffixA = ".lora_A.weight";
constexpr const char* kSuffixB = ".lora_B.weight";

bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}
bool starts_with(const std::string& s, const std::string& prefix) { return s.compare(0, prefix.size(), prefix) == 0; }

// One rank_pattern / alpha_pattern key against a module path. Mirrors PEFT's
// peft.utils.other.get_pattern_key (peft 0.21):
//     re.match(rf"(.*\.)?({key})$", key_to_match)
// i.e. the key, as a regex, must match the whole path, optionally after a prefix ending in ".".
// std::regex (ECMAScript) stands in for Python's re; a key that is not a valid ECMAScript regex
// (e.g. Python-only syntax) falls back to literal matching: path == key or path ends with "." + key.
bool pattern_matches(const std::string& key, const std::string& path) {
  try {
    const std::regex re("(.*\\.)?(" + key + ")", std::regex::ECMAScript);
    return std::regex_match(path, re);
  } catch (const std::regex_error&) {
    return path == key || ends_with(path, "." + key);
  }
}

// The first key of `patterns`, in the object's order, that matches (PEFT iterates the dict in
// insertion order: with ordered_json that is the file's order).
template <class Json>
const Json* first_match(const Json& patterns, const std::string& path) {
  if (!patterns.is_object()) return nullptr;
  for (auto it = patterns.begin(); it != patterns.end(); ++it)
    if (pattern_matches(it.key(), path)) return &*it;
  return nullptr;
}

double number_or(const nlohmann::ordered_json& config, const char* key, double fallback, const std::string& where) {
  auto it = config.find(key);
  if (it == config.end() || it->is_null()) return fallback;
  if (!it->is_number()) throw Error(ErrorKind::Format, where, std::string("\"") + key + "\" is not a number");
  return it->get<double>();
}

void check_finite(const Tensor& t, const std::string& key, const std::string& where) {
  const std::vector<float> v = t.to_f32();
  for (size_t i = 0; i < v.size(); ++i)
    if (!std::isfinite(v[i]))
      throw Error(ErrorKind::InvalidInput, where,
                  "tensor '" + key + "' contains " + (std::isnan(v[i]) ? "NaN" : "Inf") + " (element " +
                      std::to_string(i) + ")");
}

void check_factor(const Tensor& t, const std::string& key, const std::string& where) {
  if (t.dtype != DType::F32 && t.dtype != DType::F16 && t.dtype != DType::BF16)
    throw Error(ErrorKind::Unsupported, where,
                "tensor '" + key + "' has dtype " + dtype_name(t.dtype) + "; LoRA factors must be F32, F16 or BF16");
  if (t.shape.size() != 2)
    throw Error(ErrorKind::Format, where,
                "tensor '" + key + "' has " + std::to_string(t.shape.size()) + " dimensions; LoRA factors are 2-D");
  if (t.data.size() != t.numel() * dtype_size(t.dtype))
    throw Error(ErrorKind::Format, where, "tensor '" + key + "' has a byte size that does not match its shape");
}

std::string shape_str(const std::vector<int64_t>& s) {
  std::string out = "[";
  for (size_t i = 0; i < s.size(); ++i) out += (i ? ", " : "") + std::to_string(s[i]);
  return out + "]";
}

PeftAdapter build_adapter(nlohmann::ordered_json config, std::vector<std::pair<std::string, Tensor>> tensors,
                          std::map<std::string, std::string> file_metadata, const std::string& config_where,
                          const std::string& tensors_where) {
  if (!config.is_object()) throw Error(ErrorKind::Format, config_where, "adapter config is not a JSON object");
  auto pt = config.find("peft_type");
  if (pt == config.end() || !pt->is_string())
    throw Error(ErrorKind::Format, config_where, "missing \"peft_type\" (expected \"LORA\")");
  if (pt->get<std::string>() != "LORA")
    throw Error(ErrorKind::Unsupported, config_where,
                "peft_type \"" + pt->get<std::string>() + "\" is not supported; only LORA adapters are");
  for (const char* k : {"rank_pattern", "alpha_pattern"}) {
    auto it = config.find(k);
    if (it != config.end() && !it->is_null() && !it->is_object())
      throw Error(ErrorKind::Format, config_where, std::string("\"") + k + "\" is not a JSON object");
  }
  if (auto it = config.find("use_rslora"); it != config.end() && !it->is_null() && !it->is_boolean())
    throw Error(ErrorKind::Format, config_where, "\"use_rslora\" is not a boolean");
  if (auto it = config.find("fan_in_fan_out"); it != config.end() && !it->is_null() && !it->is_boolean())
    throw Error(ErrorKind::Format, config_where, "\"fan_in_fan_out\" is not a boolean");

  PeftAdapter ad;
  ad.file_metadata = std::move(file_metadata);

  // The key prefix: "base_model.model." when every LoRA key has it, else none.
  bool any_lora = false, all_prefixed = true;
  for (const auto& [key, t] : tensors) {
    if (ends_with(key, kSuffixA) || ends_with(key, kSuffixB)) {
      any_lora = true;
      if (!starts_with(key, kPeftPrefix)) all_prefixed = false;
    }
  }
  ad.key_prefix = (!any_lora || all_prefixed) ? kPeftPrefix : "";

  struct Pair {
    std::optional<Tensor> A, B;
    std::string key_a, key_b;
  };
  std::map<std::string, Pair> pairs;
  std::set<std::string> seen;
  for (auto& [key, t] : tensors) {
    if (!seen.insert(key).second) throw Error(ErrorKind::Format, tensors_where, "duplicate tensor '" + key + "'");
    const bool is_a = ends_with(key, kSuffixA), is_b = ends_with(key, kSuffixB);
    if (!is_a && !is_b) {
      ad.passthrough.emplace_back(key, std::move(t));
      continue;
    }
    const size_t suffix_len = std::string(is_a ? kSuffixA : kSuffixB).size();
    const std::string path = key.substr(ad.key_prefix.size(), key.size() - ad.key_prefix.size() - suffix_len);
    if (path.empty()) throw Error(ErrorKind::Format, tensors_where, "tensor '" + key + "' names no module");
    Pair& p = pairs[path];
    if (is_a) {
      p.A = std::move(t);
      p.key_a = key;
    } else {
      p.B = std::move(t);
      p.key_b = key;
    }
  }

  const double r_config = number_or(config, "r", 8.0, config_where);
  const bool has_r = config.contains("r") && !config["r"].is_null();
  const nlohmann::ordered_json empty = nlohmann::ordered_json::object();
  const auto rp = config.find("rank_pattern");
  const nlohmann::ordered_json& rank_pattern = rp != config.end() && rp->is_object() ? *rp : empty;

  for (auto& [path, p] : pairs) {
    const std::string key_a = ad.key_prefix + path + kSuffixA, key_b = ad.key_prefix + path + kSuffixB;
    if (!p.A) throw Error(ErrorKind::Format, tensors_where, "module '" + path + "' has no '" + key_a + "'");
    if (!p.B) throw Error(ErrorKind::Format, tensors_where, "module '" + path + "' has no '" + key_b + "'");
    check_factor(*p.A, key_a, tensors_where);
    check_factor(*p.B, key_b, tensors_where);
    const int64_t rank = p.A->shape[0];
    if (rank <= 0) throw Error(ErrorKind::Format, tensors_where, "tensor '" + key_a + "' has rank 0");
    if (p.B->shape[1] != rank)
      throw Error(ErrorKind::Format, tensors_where,
                  "module '" + path + "': lora_A is " + shape_str(p.A->shape) + " but lora_B is " +
                      shape_str(p.B->shape) + " (ranks differ)");
    check_finite(*p.A, key_a, tensors_where);
    check_finite(*p.B, key_b, tensors_where);

    // The config's rank for this module must agree with the stored factors (when it states one).
    double r = r_config;
    bool stated = has_r;
    if (const nlohmann::ordered_json* m = first_match(rank_pattern, path)) {
      if (!m->is_number()) throw Error(ErrorKind::Format, config_where, "rank_pattern value is not a number");
      r = m->get<double>();
      stated = true;
    }
    if (stated) {
      if (r != static_cast<double>(rank))
        throw Error(ErrorKind::Mismatch, tensors_where,
                    "module '" + path + "': config gives rank " + nlohmann::json(r).dump() + " but '" + key_a +
                        "' has " + std::to_string(rank) + " rows");
    }
    LoraModule mod;
    mod.path = path;
    mod.A = std::move(*p.A);
    mod.B = std::move(*p.B);
    mod.rank = rank;
    set_lora_scaling(config, mod, config_where);
    ad.modules.push_back(std::move(mod));
  }
  ad.config = std::move(config);
  return ad;  // std::map iteration already sorted modules by path
}

}  // namespace

void set_lora_scaling(const nlohmann::ordered_json& config, LoraModule& module, const std::string& where) {
  double alpha = number_or(config, "lora_alpha", 8.0, where);
  if (const auto ap = config.find("alpha_pattern"); ap != config.end() && ap->is_object())
    if (const nlohmann::ordered_json* m = first_match(*ap, module.path)) {
      if (!m->is_number()) throw Error(ErrorKind::Format, where, "alpha_pattern value is not a number");
      alpha = m->get<double>();
    }
  const auto rs = config.find("use_rslora");
  const bool rslora = rs != config.end() && rs->is_boolean() && rs->get<bool>();
  const double r = static_cast<double>(module.rank);
  module.alpha = alpha;
  module.scaling = rslora ? alpha / std::sqrt(r) : alpha / r;
}

bool PeftAdapter::fan_in_fan_out() const {
  auto it = config.find("fan_in_fan_out");
  return it != config.end() && it->is_boolean() && it->get<bool>();
}

const nlohmann::json* match_pattern(const nlohmann::json& patterns, const std::string& path) {
  return first_match(patterns, path);
}
const nlohmann::ordered_json* match_pattern(const nlohmann::ordered_json& patterns, const std::string& path) {
  return first_match(patterns, path);
}

PeftAdapter read_peft_adapter(const std::string& dir) {
  const std::string config_path = (fs::path(dir) / "adapter_config.json").string();
  const std::string model_path = (fs::path(dir) / "adapter_model.safetensors").string();
  std::error_code ec;
  if (!fs::is_directory(dir, ec)) {
    if (fs::exists(dir, ec)) throw Error(ErrorKind::Io, dir, "not a directory (expected a PEFT adapter directory)");
    throw Error(ErrorKind::Io, dir, "no such file or directory");
  }
  if (!fs::exists(config_path, ec)) throw Error(ErrorKind::Io, config_path, "no such file (not a PEFT adapter directory?)");
  const std::string text = read_text_file(config_path);
  nlohmann::ordered_json config;  // the file's key order, as Python's json.load keeps it
  try {
    config = nlohmann::ordered_json::parse(text);
  } catch (const nlohmann::json::exception& e) {
    throw Error(ErrorKind::Format, config_path, std::string("not valid JSON: ") + e.what());
  }
  if (!config.is_object()) throw Error(ErrorKind::Format, config_path, "not a JSON object");

  if (!fs::exists(model_path, ec)) {
    if (fs::exists(fs::path(dir) / "adapter_model.bin", ec))
      throw Error(ErrorKind::Unsupported, (fs::path(dir) / "adapter_model.bin").string(),
                  "pickle .bin adapters are not supported; save with safe_serialization=True");
    throw Error(ErrorKind::Io, model_path, "no such file");
  }
  SafetensorsFile file(model_path);
  std::vector<std::pair<std::string, Tensor>> tensors;
  for (const auto& name : file.names()) tensors.emplace_back(name, file.get(name).copy());
  return build_adapter(std::move(config), std::move(tensors), file.metadata(), config_path, model_path);
}

PeftAdapter make_peft_adapter(nlohmann::ordered_json config, std::vector<std::pair<std::string, Tensor>> tensors,
                              std::map<std::string, std::string> file_metadata, const std::string& where) {
  return build_adapter(std::move(config), std::move(tensors), std::move(file_metadata), where, where);
}

std::vector<std::pair<std::string, const Tensor*>> peft_tensor_refs(const PeftAdapter& adapter) {
  std::vector<std::pair<std::string, const Tensor*>> out;
  out.reserve(adapter.modules.size() * 2 + adapter.passthrough.size());
  for (const auto& m : adapter.modules) {
    out.emplace_back(adapter.key_prefix + m.path + kSuffixA, &m.A);
    out.emplace_back(adapter.key_prefix + m.path + kSuffixB, &m.B);
  }
  for (const auto& [key, t] : adapter.passthrough) out.emplace_back(key, &t);
  return out;
}

std::vector<std::pair<std::string, Tensor>> peft_tensors(const PeftAdapter& adapter) {
  std::vector<std::pair<std::string, Tensor>> out;
  for (auto& [key, t] : peft_tensor_refs(adapter)) out.emplace_back(std::move(key), *t);
  return out;
}

void write_peft_adapter(const std::string& dir, const PeftAdapter& adapter) {
  const std::vector<std::pair<std::string, Tensor>> tensors = peft_tensors(adapter);
  const std::string config_text = adapter.config.dump(2);
  write_dir_atomic(dir, [&](const std::string& tmp) {
    write_file_atomic((fs::path(tmp) / "adapter_config.json").string(),
                      reinterpret_cast<const uint8_t*>(config_text.data()), config_text.size());
    write_safetensors((fs::path(tmp) / "adapter_model.safetensors").string(), tensors, adapter.file_metadata);
  });
}

}  // namespace solar
