// The .solar container (format v1, specified in docs/FORMAT.md).
//
//   offset 0   magic "\x89SOLAR\r\n"
//          8   u32 version (1)           12  u32 flags (bit 0: metadata zstd, bit 1: payload zstd)
//         16   u64 metadata stored size  24  u64 metadata raw size
//         32   u64 payload stored size   40  u64 payload raw size
//         48   metadata (JSON, UTF-8), payload (blobs), then u64 XXH64 of every byte before it.
// All integers little-endian. Sizes are checked against the file size and fixed limits before
// any allocation; the checksum is verified before anything is parsed.
#pragma once
#include <cstdint>
#include <map>
#include <string>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "solar/codec.hpp"
#include "solar/dtype.hpp"

namespace solar {

inline constexpr uint32_t kFormatVersion = 1;
inline constexpr size_t kHeaderSize = 48;
inline constexpr size_t kTrailerSize = 8;

struct LayerRecord {
  std::string module;         // PEFT module path
  std::string base_key;       // tensor name of W in the base checkpoint
  bool transpose_base = false;  // W stored in x out (fan_in_fan_out)
  LayerShape shape;
  DType a_dtype = DType::F32, b_dtype = DType::F32;  // restored dtypes
  uint64_t base_fingerprint = 0;  // XXH64 of canonical W (m x n, float32 little-endian)
  std::string mode;
  EncodedLayer encoded;
};

struct Container {
  uint64_t seed = 0;
  std::string producer;  // "solar <version>"
  nlohmann::json peft_config;
  std::string key_prefix = "base_model.model.";
  std::map<std::string, std::string> file_metadata;
  std::vector<LayerRecord> layers;
  std::vector<std::pair<std::string, Tensor>> passthrough;
};

std::vector<uint8_t> serialize_container(const Container& c);
// `where` names the source in errors (a path, or "<bytes>").
Container parse_container(const uint8_t* data, size_t size, const std::string& where);
Container read_container(const std::string& path);
void write_container(const std::string& path, const Container& c);

// What each part of a serialized container costs.
struct SizeReport {
  struct Layer {
    std::string module;
    std::string mode;
    LayerShape shape;
    nlohmann::json params;
    size_t payload_bytes = 0;  // raw bytes of its blobs
  };
  size_t file_bytes = 0;
  size_t header_bytes = 0;        // fixed header + checksum trailer
  size_t metadata_bytes = 0;      // as stored
  size_t metadata_raw_bytes = 0;
  size_t payload_bytes = 0;       // as stored
  size_t payload_raw_bytes = 0;
  size_t passthrough_raw_bytes = 0;
  size_t lora_params = 0;         // numbers in the original A and B factors
  size_t peft_fp32_bytes = 0;     // adapter_model.safetensors with LoRA factors in F32
  size_t peft_fp16_bytes = 0;     // ... in F16 (passthrough tensors as they are)
  std::vector<Layer> layers;
  nlohmann::json to_json() const;
};
SizeReport size_report(const Container& c, const std::vector<uint8_t>& bytes);

uint64_t fingerprint_f32(const std::vector<float>& values);

}  // namespace solar
