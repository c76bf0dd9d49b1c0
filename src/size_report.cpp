// What each part of a .solar file costs, and what the same adapter costs as a PEFT file.
#include "solar/container.hpp"

#include <set>

#include "passthrough_shape.hpp"
#include "solar/safetensors.hpp"

namespace solar {
namespace {

// The layers that restore a passthrough tensor (format v6) instead of a LoRA module.
std::set<size_t> head_layers(const Container& c) {
  std::set<size_t> out;
  for (const auto& entry : c.passthrough_layers) out.insert(entry.second);
  return out;
}

// A passthrough tensor with its data (layer-coded ones have none until restored: zeros stand in).
Tensor sized(const Tensor& t) {
  if (!t.data.empty()) return t;
  return Tensor{t.dtype, t.shape, std::vector<uint8_t>(passthrough_numel(t.shape, "size report") * dtype_size(t.dtype))};
}

// Size of adapter_model.safetensors holding this adapter with LoRA factors in `dtype`.
size_t peft_file_bytes(const Container& c, DType dtype) {
  const std::set<size_t> heads = head_layers(c);
  std::vector<std::pair<std::string, Tensor>> tensors;
  for (size_t i = 0; i < c.layers.size(); ++i) {
    const LayerRecord& l = c.layers[i];
    if (heads.contains(i)) continue;
    Tensor a{dtype, {l.shape.r, l.shape.n}, std::vector<uint8_t>(static_cast<size_t>(l.shape.r * l.shape.n) * dtype_size(dtype))};
    Tensor b{dtype, {l.shape.m, l.shape.r}, std::vector<uint8_t>(static_cast<size_t>(l.shape.m * l.shape.r) * dtype_size(dtype))};
    tensors.emplace_back(c.key_prefix + l.module + ".lora_A.weight", std::move(a));
    tensors.emplace_back(c.key_prefix + l.module + ".lora_B.weight", std::move(b));
  }
  for (const auto& [key, t] : c.passthrough) tensors.emplace_back(key, sized(t));
  return safetensors_bytes(tensors, c.file_metadata).size();
}

}  // namespace

SizeReport size_report(const Container& c, const std::vector<uint8_t>& bytes) {
  SizeReport r;
  r.file_bytes = bytes.size();
  r.version = c.version;
  const ContainerHeader h = parse_container_header(bytes.data(), bytes.size(), "<container>");
  r.header_bytes = h.header_bytes + kTrailerSize;
  r.metadata_bytes = h.metadata_stored;
  r.metadata_raw_bytes = h.metadata_raw;
  r.payload_bytes = h.payload_stored;
  r.payload_raw_bytes = h.payload_raw;
  const std::set<size_t> heads = head_layers(c);
  for (size_t i = 0; i < c.layers.size(); ++i) {
    const LayerRecord& l = c.layers[i];
    SizeReport::Layer L{l.module, l.mode, l.shape, l.encoded.params, 0, nullptr};
    for (const auto& b : l.encoded.blobs) L.payload_bytes += b.size();
    if (!heads.contains(i)) r.lora_params += static_cast<size_t>(l.shape.r * (l.shape.m + l.shape.n));
    r.layers.push_back(std::move(L));
  }
  for (const ModeStream& s : read_streams(c)) {
    const std::vector<nlohmann::json> summary = s.codec->stream_summary(s.stream_layers, s.symbols, c.version);
    for (size_t k = 0; k < s.layers.size(); ++k) r.layers[s.layers[k]].stream = summary[k];
  }
  for (const auto& [key, t] : c.passthrough) r.passthrough_raw_bytes += passthrough_numel(t.shape, key) * dtype_size(t.dtype);
  r.passthrough_int8_tensors = c.passthrough_int8.size();
  r.passthrough_layer_tensors = c.passthrough_layers.size();
  r.passthrough_magnitude_tensors = c.passthrough_magnitude.size();
  for (const auto& [key, code] : c.passthrough_magnitude)
    r.magnitudes.push_back({key, c.layers.at(code.layer).module, code.step_code, magnitude_blob(code).size()});
  std::set<std::string> modes;
  for (const LayerRecord& l : c.layers) modes.insert(l.mode);
  for (const std::string& mode : modes)
    if (make_decoder(mode, "size report")->needs_base()) r.needs_base += (r.needs_base.empty() ? "" : ", ") + mode + " layers";
  if (!c.passthrough_magnitude.empty()) r.needs_base += std::string(r.needs_base.empty() ? "" : ", ") + "DoRA magnitudes";
  r.peft_fp32_bytes = peft_file_bytes(c, DType::F32);
  r.peft_fp16_bytes = peft_file_bytes(c, DType::F16);
  return r;
}

nlohmann::json SizeReport::to_json() const {
  nlohmann::json L = nlohmann::json::array();
  for (const Layer& l : layers)
    L.push_back({{"module", l.module}, {"mode", l.mode}, {"shape", {l.shape.m, l.shape.n, l.shape.r}},
                 {"params", l.params}, {"payload_bytes", l.payload_bytes}, {"stream", l.stream}});
  nlohmann::json M = nlohmann::json::array();
  for (const Magnitude& m : magnitudes)
    M.push_back({{"key", m.key}, {"module", m.module}, {"step_code", m.step_code}, {"blob_bytes", m.blob_bytes}});
  return {{"version", version},
          {"file_bytes", file_bytes},
          {"header_bytes", header_bytes},
          {"metadata_bytes", metadata_bytes},
          {"metadata_raw_bytes", metadata_raw_bytes},
          {"payload_bytes", payload_bytes},
          {"payload_raw_bytes", payload_raw_bytes},
          {"passthrough_raw_bytes", passthrough_raw_bytes},
          {"passthrough_int8_tensors", passthrough_int8_tensors},
          {"passthrough_layer_tensors", passthrough_layer_tensors},
          {"passthrough_magnitude_tensors", passthrough_magnitude_tensors},
          {"lora_params", lora_params},
          {"peft_fp32_bytes", peft_fp32_bytes},
          {"peft_fp16_bytes", peft_fp16_bytes},
          {"ratio_vs_fp16", peft_fp16_bytes ? static_cast<double>(file_bytes) / static_cast<double>(peft_fp16_bytes) : 0.0},
          {"layers", L},
          {"magnitudes", M},
          {"needs_base", !needs_base.empty()},
          {"needs_base_for", needs_base}};
}

}  // namespace solar
