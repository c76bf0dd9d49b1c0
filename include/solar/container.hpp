// The .solar container (format v7, specified in docs/FORMAT.md; v1 to v6 files are still read).
//
//   magic "\x89SLR" | u8 version (7) | u8 flags | LEB128 sizes: metadata stored, metadata raw,
//   payload stored, payload raw | metadata (JSON, UTF-8; zstd with a built-in dictionary when
//   that is smaller) | payload (the blobs, concatenated; zstd when smaller) | u32 XXH32 of every
//   byte before it. Since v5 zstd frames are stored without their 4-byte magic number.
// Compact on purpose: per-adapter overhead matters for small adapters on the wire. Sizes are
// checked against the file size and fixed limits before any allocation; the checksum is verified
// before anything is parsed.
#pragma once
#include <cstdint>
#include <map>
#include <string>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "solar/codec.hpp"
#include "solar/dtype.hpp"
#include "solar/magnitude_coding.hpp"
#include "solar/passthrough_coding.hpp"

namespace solar {

inline constexpr uint32_t kFormatVersion = 7;       // what this build writes
inline constexpr uint32_t kOldestReadableVersion = 1;
inline constexpr size_t kTrailerSize = 4;

struct LayerRecord {
  std::string module;         // PEFT module path
  std::string base_key;       // tensor name of W in the base checkpoint
  bool transpose_base = false;  // W stored in x out (fan_in_fan_out)
  LayerShape shape;
  DType a_dtype = DType::F32, b_dtype = DType::F32;  // restored dtypes
  uint32_t base_fingerprint = 0;  // XXH32 of canonical W (m x n, float32 little-endian)
  std::string mode;
  EncodedLayer encoded;
};

struct Container {
  uint32_t version = kFormatVersion;  // as read; serialised as is (1 to 7)
  uint64_t seed = 0;
  std::string producer;  // "solar <version>"
  nlohmann::ordered_json peft_config;  // in its file's key order: PEFT resolves rank/alpha patterns in it
  std::string key_prefix = "base_model.model.";
  std::map<std::string, std::string> file_metadata;
  std::vector<LayerRecord> layers;
  std::vector<std::pair<std::string, Tensor>> passthrough;  // as restored (int8-coded ones dequantised)
  // v4: passthrough tensors stored as int8 rows, by key, with their codes (so that a file read
  // and written again keeps its bytes).
  std::map<std::string, Int8Rows> passthrough_int8;
  // v6: passthrough tensors coded as a layer of the spectral stream (a classifier head, say),
  // by key, with the index of that layer. Their entries in `passthrough` carry dtype and shape
  // but no data until decompress_container restores them; the layer restores no LoRA module.
  std::map<std::string, size_t> passthrough_layers;
  // v7: DoRA magnitudes coded as residuals from the row norms of a layer's base weight (that
  // layer's record names it), by key. Their entries in `passthrough` carry dtype and shape; the
  // data, once restored (compress_adapter fills it, decompress_container recomputes it from W).
  std::map<std::string, MagnitudeCode> passthrough_magnitude;
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
    nlohmann::json stream;     // streamed layers: LayerCodec::stream_summary's object, else null
  };
  uint32_t version = 0;           // format version of the file
  size_t file_bytes = 0;
  size_t header_bytes = 0;        // magic, version, flags, sizes and checksum
  size_t metadata_bytes = 0;      // as stored
  size_t metadata_raw_bytes = 0;
  size_t payload_bytes = 0;       // as stored
  size_t payload_raw_bytes = 0;
  size_t passthrough_raw_bytes = 0;    // as restored
  size_t passthrough_int8_tensors = 0;   // of them, stored as int8 rows (v4)
  size_t passthrough_layer_tensors = 0;  // of them, coded as layers of the spectral stream (v6)
  size_t passthrough_magnitude_tensors = 0;  // of them, DoRA magnitudes coded against the base (v7)
  size_t lora_params = 0;         // numbers in the original A and B factors
  size_t peft_fp32_bytes = 0;     // adapter_model.safetensors with LoRA factors in F32
  size_t peft_fp16_bytes = 0;     // ... in F16 (passthrough tensors as they are)
  std::vector<Layer> layers;
  struct Magnitude {  // v7: a DoRA magnitude coded against its layer's W
    std::string key;
    std::string module;    // its layer's
    int step_code = 0;     // 0: no residual (W's row norms)
    size_t blob_bytes = 0;
  };
  std::vector<Magnitude> magnitudes;
  // Restoring reads the base model: layers of a mode that uses W (paper, spectral-w) or coded
  // DoRA magnitudes; the reason, for people ("" when it does not).
  std::string needs_base;
  nlohmann::json to_json() const;
};
SizeReport size_report(const Container& c, const std::vector<uint8_t>& bytes);

// The shared streams of a v2 container (docs/FORMAT.md, "Shared streams"), read: for each
// streamed mode, its layers (indices into c.layers, in stream order) and their symbols. Empty for
// v1. Throws Format when the layout or a stream is wrong.
struct ModeStream {
  std::unique_ptr<LayerCodec> codec;
  std::vector<size_t> layers;              // indices into Container::layers, in stream order
  std::vector<StreamLayer> stream_layers;  // those layers' shapes and groups
  std::vector<std::vector<int32_t>> symbols;
};
std::vector<ModeStream> read_streams(const Container& c);

// The integers a decoder reads from a container's shared streams, by layer index (each layer's
// symbols in its mode's stream syntax, docs/FORMAT.md; empty for a layer no stream holds).
std::vector<std::vector<int32_t>> stream_symbols(const Container& c);
// The container with its streams re-coded from `symbols` (by layer index, as stream_symbols gives
// them), everything else kept: for an encoder that chooses the integers itself (solar.polish).
// Only for containers of this build's format version. Throws InvalidInput when a layer's symbols
// do not follow its stream's syntax, or a layer outside the streams has any.
Container with_stream_symbols(Container c, const std::vector<std::vector<int32_t>>& symbols);

uint32_t fingerprint_f32(const std::vector<float>& values);

// The parsed fixed part of a container (no allocation, no checksum check).
struct ContainerHeader {
  uint32_t version = 0, flags = 0;
  uint64_t metadata_stored = 0, metadata_raw = 0, payload_stored = 0, payload_raw = 0;
  size_t header_bytes = 0;  // bytes before the metadata
};
ContainerHeader parse_container_header(const uint8_t* data, size_t size, const std::string& where);

// The zstd dictionary that metadata is compressed with (docs/metadata-dictionary-v1.txt).
const std::string& metadata_dictionary_v1();

}  // namespace solar
