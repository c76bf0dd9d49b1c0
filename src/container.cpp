// Serialisation of the .solar container (docs/FORMAT.md).
#include "solar/container.hpp"

#include <bit>
#include <cstring>
#include <set>

#include <xxhash.h>
#include <zstd.h>

#include "passthrough_shape.hpp"
#include "solar/error.hpp"
#include "solar/io.hpp"

namespace solar {
namespace {

static_assert(std::endian::native == std::endian::little, "solar assumes a little-endian host");

constexpr uint8_t kMagic[4] = {0x89, 'S', 'L', 'R'};
constexpr uint32_t kFlagMetaZstd = 1u, kFlagMetaDict = 2u, kFlagPayloadZstd = 4u;
constexpr uint32_t kKnownFlags = kFlagMetaZstd | kFlagMetaDict | kFlagPayloadZstd;
constexpr uint64_t kMaxMetadata = 64ull << 20;
constexpr uint64_t kMaxPayload = 2ull << 30;
constexpr int kZstdLevel = 19;

void put_u32(std::vector<uint8_t>& out, uint32_t v) { for (int i = 0; i < 4; ++i) out.push_back(static_cast<uint8_t>(v >> (8 * i))); }
uint32_t get_u32(const uint8_t* p) { uint32_t v = 0; for (int i = 0; i < 4; ++i) v |= static_cast<uint32_t>(p[i]) << (8 * i); return v; }

void put_varint(std::vector<uint8_t>& out, uint64_t v) {
  while (v >= 0x80) {
    out.push_back(static_cast<uint8_t>(v | 0x80));
    v >>= 7;
  }
  out.push_back(static_cast<uint8_t>(v));
}

// LEB128, at most 9 bytes (values below 2^63); advances `pos`.
uint64_t get_varint(const uint8_t* data, size_t size, size_t& pos, const std::string& where) {
  uint64_t v = 0;
  for (int shift = 0; shift < 63; shift += 7) {
    if (pos >= size) throw Error(ErrorKind::Format, where, "truncated header");
    const uint8_t b = data[pos++];
    v |= static_cast<uint64_t>(b & 0x7F) << shift;
    if (!(b & 0x80)) return v;
  }
  throw Error(ErrorKind::Format, where, "malformed size field in header");
}

// Every zstd frame starts with its magic number (4 bytes, little-endian); since v5 a container
// stores its frames without them.
constexpr uint8_t kZstdMagic[4] = {ZSTD_MAGICNUMBER & 0xFF, (ZSTD_MAGICNUMBER >> 8) & 0xFF, (ZSTD_MAGICNUMBER >> 16) & 0xFF,
                                   ZSTD_MAGICNUMBER >> 24};
bool frames_are_magicless(uint32_t version) { return version >= 5; }

std::vector<uint8_t> zstd_compress(const std::vector<uint8_t>& raw, const std::string* dict, bool magicless) {
  std::vector<uint8_t> z(ZSTD_compressBound(raw.size()));
  ZSTD_CCtx* cctx = ZSTD_createCCtx();
  const size_t n = dict ? ZSTD_compress_usingDict(cctx, z.data(), z.size(), raw.data(), raw.size(), dict->data(), dict->size(), kZstdLevel)
                        : ZSTD_compressCCtx(cctx, z.data(), z.size(), raw.data(), raw.size(), kZstdLevel);
  ZSTD_freeCCtx(cctx);
  if (ZSTD_isError(n) || n < 4 || std::memcmp(z.data(), kZstdMagic, 4) != 0) return {};
  z.resize(n);
  if (magicless) z.erase(z.begin(), z.begin() + 4);
  return z;
}

std::vector<uint8_t> inflate(const uint8_t* p, size_t n, uint64_t raw_size, const std::string* dict, bool magicless,
                             const std::string& where, const char* part) {
  std::vector<uint8_t> framed;
  if (magicless) {
    framed.assign(kZstdMagic, kZstdMagic + 4);
    framed.insert(framed.end(), p, p + n);
    p = framed.data();
    n = framed.size();
  }
  const unsigned long long declared = ZSTD_getFrameContentSize(p, n);
  if (declared == ZSTD_CONTENTSIZE_ERROR || declared == ZSTD_CONTENTSIZE_UNKNOWN || declared != raw_size)
    throw Error(ErrorKind::Format, where, std::string(part) + ": zstd frame does not declare the expected size");
  std::vector<uint8_t> out(static_cast<size_t>(raw_size));
  ZSTD_DCtx* dctx = ZSTD_createDCtx();
  const size_t got = dict ? ZSTD_decompress_usingDict(dctx, out.data(), out.size(), p, n, dict->data(), dict->size())
                          : ZSTD_decompressDCtx(dctx, out.data(), out.size(), p, n);
  ZSTD_freeDCtx(dctx);
  if (ZSTD_isError(got) || got != raw_size) throw Error(ErrorKind::Format, where, std::string(part) + ": zstd data is invalid");
  return out;
}

template <class T>
T field(const nlohmann::json& j, const char* key, const std::string& where) {
  try {
    return j.at(key).get<T>();
  } catch (const nlohmann::json::exception&) {
    throw Error(ErrorKind::Format, where, std::string("metadata field '") + key + "' is missing or has the wrong type");
  }
}

// Blobs are stored back to back in metadata order; the metadata lists their lengths.
class PayloadReader {
 public:
  PayloadReader(const std::vector<uint8_t>& p, const std::string& where) : p_(p), where_(where) {}
  std::vector<uint8_t> take(const nlohmann::json& len, const std::string& where) {
    if (!len.is_number_unsigned()) throw Error(ErrorKind::Format, where, "blob length must be an unsigned integer");
    const uint64_t n = len.get<uint64_t>();
    if (n > p_.size() - pos_) throw Error(ErrorKind::Format, where, "blob of " + std::to_string(n) + " bytes runs past the payload");
    std::vector<uint8_t> out(p_.begin() + static_cast<ptrdiff_t>(pos_), p_.begin() + static_cast<ptrdiff_t>(pos_ + n));
    pos_ += n;
    return out;
  }
  void finish() const {
    if (pos_ != p_.size()) throw Error(ErrorKind::Format, where_, "payload has " + std::to_string(p_.size() - pos_) + " bytes no blob accounts for");
  }

 private:
  const std::vector<uint8_t>& p_;
  std::string where_;
  size_t pos_ = 0;
};

Container from_metadata(const nlohmann::json& meta, const std::vector<uint8_t>& payload, uint32_t version, const std::string& where);

// The bytes of a rows x cols byte matrix, transposed.
std::vector<uint8_t> transpose_bytes(const std::vector<uint8_t>& v, size_t rows, size_t cols) {
  std::vector<uint8_t> out(v.size());
  for (size_t i = 0; i < rows; ++i)
    for (size_t j = 0; j < cols; ++j) out[j * rows + i] = v[i * cols + j];
  return out;
}

// v2 stores passthrough tensors as byte planes (byte 0 of every element, then byte 1, ...): the
// sign/exponent bytes of floats then sit together, where the payload's zstd frame finds them.
std::vector<uint8_t> byte_planes(const std::vector<uint8_t>& v, size_t width) {
  return transpose_bytes(v, v.size() / width, width);
}
std::vector<uint8_t> from_byte_planes(const std::vector<uint8_t>& v, size_t width) {
  return transpose_bytes(v, width, v.size() / width);
}

}  // namespace

uint64_t passthrough_numel(const std::vector<int64_t>& shape, const std::string& where) {
  uint64_t numel = 1;
  for (int64_t d : shape) {
    if (d < 0 || (d > 0 && numel > (1ull << 40) / static_cast<uint64_t>(d))) throw Error(ErrorKind::Format, where, "bad shape");
    numel *= static_cast<uint64_t>(d);
  }
  return numel;
}

uint32_t fingerprint_f32(const std::vector<float>& values) {
  return XXH32(values.data(), values.size() * sizeof(float), 0);
}

std::vector<uint8_t> serialize_container(const Container& c) {
  std::vector<uint8_t> payload;
  auto add = [&](const std::vector<uint8_t>& blob) {
    payload.insert(payload.end(), blob.begin(), blob.end());
    return blob.size();
  };
  nlohmann::json layers = nlohmann::json::array();
  for (const LayerRecord& l : c.layers) {
    nlohmann::json blobs = nlohmann::json::array();
    for (const auto& b : l.encoded.blobs) blobs.push_back(add(b));
    // Fields at their default value are left out: metadata is part of every adapter's bytes.
    nlohmann::json rec = {{"module", l.module}, {"shape", {l.shape.m, l.shape.n, l.shape.r}}, {"mode", l.mode}};
    if (c.version < 2 || !blobs.empty()) rec["blobs"] = blobs;  // v2: absent means none
    if (!l.base_key.empty()) rec["base"] = l.base_key;
    if (l.transpose_base) rec["transpose"] = true;
    if (l.a_dtype != DType::F32 || l.b_dtype != DType::F32) rec["dtypes"] = {dtype_name(l.a_dtype), dtype_name(l.b_dtype)};
    if (l.base_fingerprint != 0) rec["fingerprint"] = l.base_fingerprint;
    if (!l.encoded.params.empty()) rec["params"] = l.encoded.params;
    layers.push_back(std::move(rec));
  }
  nlohmann::json pass = nlohmann::json::array();
  for (const auto& [key, t] : c.passthrough) {
    if (const auto layer = c.passthrough_layers.find(key); layer != c.passthrough_layers.end()) {
      if (c.version < 6) throw Error(ErrorKind::InvalidInput, "container", "passthrough tensors coded as layers need format version 6");
      pass.push_back({{"key", key}, {"dtype", dtype_name(t.dtype)}, {"shape", t.shape}, {"coding", "layer"}, {"layer", layer->second}});
      continue;
    }
    if (const auto mag = c.passthrough_magnitude.find(key); mag != c.passthrough_magnitude.end()) {
      if (c.version < 7) throw Error(ErrorKind::InvalidInput, "container", "coded DoRA magnitudes need format version 7");
      pass.push_back({{"key", key}, {"dtype", dtype_name(t.dtype)}, {"shape", t.shape}, {"coding", "magnitude"},
                      {"layer", mag->second.layer}, {"blob", add(magnitude_blob(mag->second))}});
      continue;
    }
    const auto coded = c.passthrough_int8.find(key);
    if (coded != c.passthrough_int8.end()) {
      if (c.version < 4) throw Error(ErrorKind::InvalidInput, "container", "int8-coded passthrough tensors need format version 4");
      pass.push_back({{"key", key}, {"dtype", dtype_name(t.dtype)}, {"shape", t.shape}, {"blob", add(int8_rows_blob(coded->second))},
                      {"coding", "int8"}});
      continue;
    }
    const size_t blob = add(c.version >= 2 ? byte_planes(t.data, dtype_size(t.dtype)) : t.data);
    pass.push_back({{"key", key}, {"dtype", dtype_name(t.dtype)}, {"shape", t.shape}, {"blob", blob}});
  }
  const nlohmann::json fields = {{"producer", c.producer},   {"seed", std::to_string(c.seed)},
                                 {"peft_config", nullptr},     {"key_prefix", c.key_prefix},
                                 {"file_metadata", c.file_metadata}, {"layers", layers},
                                 {"passthrough", pass}};
  // Fields in sorted order, as ever; the adapter config in its own order (for configs PEFT wrote,
  // which sorts its keys, the same bytes as before).
  nlohmann::ordered_json meta;
  for (auto it = fields.begin(); it != fields.end(); ++it)
    meta[it.key()] = it.key() == "peft_config" ? c.peft_config : nlohmann::ordered_json(it.value());
  const std::string text = meta.dump();
  const std::vector<uint8_t> meta_raw(text.begin(), text.end());

  uint32_t flags = 0;
  std::vector<uint8_t> meta_stored = meta_raw;
  const std::vector<uint8_t> with_dict = zstd_compress(meta_raw, &metadata_dictionary_v1(), frames_are_magicless(c.version));
  if (!with_dict.empty() && with_dict.size() < meta_stored.size()) {
    meta_stored = with_dict;
    flags = kFlagMetaZstd | kFlagMetaDict;
  }
  std::vector<uint8_t> pay_stored = payload;
  if (!payload.empty()) {
    const std::vector<uint8_t> z = zstd_compress(payload, nullptr, frames_are_magicless(c.version));
    if (!z.empty() && z.size() < payload.size()) {
      pay_stored = z;
      flags |= kFlagPayloadZstd;
    }
  }
  std::vector<uint8_t> out(kMagic, kMagic + 4);
  if (c.version < kOldestReadableVersion || c.version > kFormatVersion)
    throw Error(ErrorKind::InvalidInput, "container", "cannot write format version " + std::to_string(c.version));
  out.push_back(static_cast<uint8_t>(c.version));
  out.push_back(static_cast<uint8_t>(flags));
  put_varint(out, meta_stored.size());
  put_varint(out, meta_raw.size());
  put_varint(out, pay_stored.size());
  put_varint(out, payload.size());
  out.insert(out.end(), meta_stored.begin(), meta_stored.end());
  out.insert(out.end(), pay_stored.begin(), pay_stored.end());
  put_u32(out, XXH32(out.data(), out.size(), 0));
  return out;
}

ContainerHeader parse_container_header(const uint8_t* data, size_t size, const std::string& where) {
  if (size < 4 || std::memcmp(data, kMagic, 4) != 0) {
    if (size < 4) throw Error(ErrorKind::Format, where, "truncated: " + std::to_string(size) + " bytes is too short for a .solar file");
    throw Error(ErrorKind::Format, where, "not a .solar file (bad magic)");
  }
  if (size < 6 + kTrailerSize) throw Error(ErrorKind::Format, where, "truncated header");
  ContainerHeader h;
  h.version = data[4];
  if (h.version < kOldestReadableVersion || h.version > kFormatVersion)
    throw Error(ErrorKind::Unsupported, where,
                "format version " + std::to_string(h.version) + " (this build reads versions " + std::to_string(kOldestReadableVersion) +
                    " to " + std::to_string(kFormatVersion) + ")");
  h.flags = data[5];
  size_t pos = 6;
  const size_t limit = size - kTrailerSize;
  h.metadata_stored = get_varint(data, limit, pos, where);
  h.metadata_raw = get_varint(data, limit, pos, where);
  h.payload_stored = get_varint(data, limit, pos, where);
  h.payload_raw = get_varint(data, limit, pos, where);
  h.header_bytes = pos;
  return h;
}

Container parse_container(const uint8_t* data, size_t size, const std::string& where) {
  const ContainerHeader h = parse_container_header(data, size, where);
  if (h.flags & ~kKnownFlags) throw Error(ErrorKind::Format, where, "unknown header flags");
  if ((h.flags & kFlagMetaDict) && !(h.flags & kFlagMetaZstd)) throw Error(ErrorKind::Format, where, "dictionary flag without zstd");
  const uint64_t body = size - h.header_bytes - kTrailerSize;
  if (h.metadata_stored > body || h.payload_stored > body - h.metadata_stored)
    throw Error(ErrorKind::Format, where, "truncated: header declares " + std::to_string(h.metadata_stored + h.payload_stored) +
                                              " body bytes, file has " + std::to_string(body));
  if (h.metadata_stored + h.payload_stored != body) throw Error(ErrorKind::Format, where, "trailing bytes after the payload");
  if (h.metadata_raw > kMaxMetadata || h.payload_raw > kMaxPayload) throw Error(ErrorKind::Format, where, "declared sizes exceed the format's limits");
  if (!(h.flags & kFlagMetaZstd) && h.metadata_raw != h.metadata_stored) throw Error(ErrorKind::Format, where, "metadata sizes disagree");
  if (!(h.flags & kFlagPayloadZstd) && h.payload_raw != h.payload_stored) throw Error(ErrorKind::Format, where, "payload sizes disagree");
  if (XXH32(data, size - kTrailerSize, 0) != get_u32(data + size - kTrailerSize))
    throw Error(ErrorKind::Corrupt, where, "checksum mismatch: the file is damaged");

  const uint8_t* meta_p = data + h.header_bytes;
  const uint8_t* pay_p = meta_p + h.metadata_stored;
  const std::string* dict = (h.flags & kFlagMetaDict) ? &metadata_dictionary_v1() : nullptr;
  const std::vector<uint8_t> meta_bytes = (h.flags & kFlagMetaZstd)
                                              ? inflate(meta_p, h.metadata_stored, h.metadata_raw, dict, frames_are_magicless(h.version), where, "metadata")
                                              : std::vector<uint8_t>(meta_p, meta_p + h.metadata_stored);
  const std::vector<uint8_t> payload = (h.flags & kFlagPayloadZstd)
                                           ? inflate(pay_p, h.payload_stored, h.payload_raw, nullptr, frames_are_magicless(h.version), where, "payload")
                                           : std::vector<uint8_t>(pay_p, pay_p + h.payload_stored);
  nlohmann::ordered_json ordered;
  try {
    ordered = nlohmann::ordered_json::parse(meta_bytes.begin(), meta_bytes.end());
  } catch (const nlohmann::json::exception& e) {
    throw Error(ErrorKind::Format, where, std::string("metadata is not valid JSON: ") + e.what());
  }
  if (!ordered.is_object()) throw Error(ErrorKind::Format, where, "metadata must be a JSON object");
  try {
    Container c = from_metadata(nlohmann::json(ordered), payload, h.version, where);
    c.peft_config = ordered.at("peft_config");  // its key order is the adapter's own: keep it
    return c;
  } catch (const nlohmann::json::exception& e) {
    throw Error(ErrorKind::Format, where, std::string("malformed metadata: ") + e.what());
  }
}

namespace {

Container from_metadata(const nlohmann::json& meta, const std::vector<uint8_t>& payload, uint32_t version, const std::string& where) {
  Container c;
  c.version = version;
  PayloadReader blobs_in(payload, where);
  c.producer = field<std::string>(meta, "producer", where);
  const std::string seed = field<std::string>(meta, "seed", where);
  try {
    size_t used = 0;
    if (seed.empty() || seed[0] == '-') throw std::invalid_argument("seed");
    c.seed = std::stoull(seed, &used);
    if (used != seed.size()) throw std::invalid_argument("seed");
  } catch (const std::exception&) {
    throw Error(ErrorKind::Format, where, "seed must be a decimal unsigned 64-bit integer");
  }
  c.peft_config = meta.at("peft_config");
  if (!c.peft_config.is_object()) throw Error(ErrorKind::Format, where, "peft_config must be an object");
  c.key_prefix = field<std::string>(meta, "key_prefix", where);
  c.file_metadata = field<std::map<std::string, std::string>>(meta, "file_metadata", where);
  const auto& layers = meta.at("layers");
  if (!layers.is_array()) throw Error(ErrorKind::Format, where, "layers must be an array");
  for (size_t i = 0; i < layers.size(); ++i) {
    const auto& j = layers[i];
    const std::string lw = where + " (layer " + std::to_string(i) + ")";
    if (!j.is_object()) throw Error(ErrorKind::Format, lw, "layer record must be an object");
    LayerRecord l;
    l.module = field<std::string>(j, "module", lw);
    l.base_key = j.contains("base") ? field<std::string>(j, "base", lw) : "";
    l.transpose_base = j.contains("transpose") && field<bool>(j, "transpose", lw);
    const auto shape = field<std::vector<int64_t>>(j, "shape", lw);
    if (shape.size() != 3) throw Error(ErrorKind::Format, lw, "shape must be [out, in, rank]");
    l.shape = {shape[0], shape[1], shape[2]};
    if (l.shape.m < 1 || l.shape.n < 1 || l.shape.r < 1 || l.shape.m > (1 << 24) || l.shape.n > (1 << 24) || l.shape.r > (1 << 16))
      throw Error(ErrorKind::Format, lw, "shape out of range");
    const auto dts = j.contains("dtypes") ? field<std::vector<std::string>>(j, "dtypes", lw) : std::vector<std::string>{"F32", "F32"};
    if (dts.size() != 2) throw Error(ErrorKind::Format, lw, "dtypes must name A and B");
    l.a_dtype = parse_dtype(dts[0], lw);
    l.b_dtype = parse_dtype(dts[1], lw);
    if (!is_float(l.a_dtype) || !is_float(l.b_dtype)) throw Error(ErrorKind::Format, lw, "LoRA factors must be floating point");
    l.base_fingerprint = j.contains("fingerprint") ? field<uint32_t>(j, "fingerprint", lw) : 0;
    l.mode = field<std::string>(j, "mode", lw);
    l.encoded.params = j.contains("params") ? j.at("params") : nlohmann::json::object();
    if (version >= 2 && !j.contains("blobs")) {
      c.layers.push_back(std::move(l));
      continue;
    }
    const auto& blobs = j.at("blobs");
    if (!blobs.is_array()) throw Error(ErrorKind::Format, lw, "blobs must be an array");
    for (const auto& len : blobs) l.encoded.blobs.push_back(blobs_in.take(len, lw));
    c.layers.push_back(std::move(l));
  }
  const auto& pass = meta.at("passthrough");
  if (!pass.is_array()) throw Error(ErrorKind::Format, where, "passthrough must be an array");
  std::set<std::string> keys;
  for (const auto& j : pass) {
    Tensor t;
    const std::string key = field<std::string>(j, "key", where);
    const std::string pw = where + " (tensor " + key + ")";
    if (!keys.insert(key).second) throw Error(ErrorKind::Format, pw, "tensor listed twice");
    t.dtype = parse_dtype(field<std::string>(j, "dtype", pw), pw);
    t.shape = field<std::vector<int64_t>>(j, "shape", pw);
    const uint64_t numel = passthrough_numel(t.shape, pw);
    const std::string coding = j.contains("coding") ? field<std::string>(j, "coding", pw) : "";
    if (coding == "layer") {  // v6: the tensor is B~ A~ of a layer of the spectral stream
      if (version < 6) throw Error(ErrorKind::Format, pw, "passthrough coding 'layer' needs format version 6");
      if (j.contains("blob")) throw Error(ErrorKind::Format, pw, "a tensor coded as a layer has no blob");
      if (!j.contains("layer") || !j.at("layer").is_number_unsigned())
        throw Error(ErrorKind::Format, pw, "metadata field 'layer' is missing or not an unsigned integer");
      const uint64_t index = j.at("layer").get<uint64_t>();
      if (index >= c.layers.size()) throw Error(ErrorKind::Format, pw, "layer " + std::to_string(index) + " does not exist");
      const LayerRecord& l = c.layers[index];
      if (l.mode != "spectral") throw Error(ErrorKind::Format, pw, "the layer coding it must be of mode spectral");
      if (!is_float(t.dtype) || t.shape.size() < 2 || t.shape[0] != l.shape.m || numel != static_cast<uint64_t>(l.shape.m * l.shape.n))
        throw Error(ErrorKind::Format, pw, "tensor does not match its layer's shape (rows = out, numel = out x in)");
      if (numel * dtype_size(t.dtype) > kMaxPayload) throw Error(ErrorKind::Format, pw, "tensor too large");
      for (const auto& [other, i] : c.passthrough_layers)
        if (i == index) throw Error(ErrorKind::Format, pw, "layer " + std::to_string(index) + " already codes tensor " + other);
      c.passthrough_layers.emplace(key, static_cast<size_t>(index));
      c.passthrough.emplace_back(key, std::move(t));  // no data until decompress_container restores it
      continue;
    }
    if (coding == "magnitude") {  // v7: a DoRA magnitude, the residual from a layer's base row norms
      if (version < 7) throw Error(ErrorKind::Format, pw, "passthrough coding 'magnitude' needs format version 7");
      if (!j.contains("layer") || !j.at("layer").is_number_unsigned())
        throw Error(ErrorKind::Format, pw, "metadata field 'layer' is missing or not an unsigned integer");
      const uint64_t index = j.at("layer").get<uint64_t>();
      if (index >= c.layers.size()) throw Error(ErrorKind::Format, pw, "layer " + std::to_string(index) + " does not exist");
      const LayerRecord& l = c.layers[index];
      if (l.base_key.empty()) throw Error(ErrorKind::Format, pw, "layer " + std::to_string(index) + " names no base weight");
      if (!is_float(t.dtype) || t.shape.size() != 1 || t.shape[0] != l.shape.m)
        throw Error(ErrorKind::Format, pw, "a coded magnitude is a floating-point vector of its layer's out features");
      for (const auto& [other, code] : c.passthrough_magnitude)
        if (code.layer == index) throw Error(ErrorKind::Format, pw, "layer " + std::to_string(index) + " already predicts magnitude " + other);
      c.passthrough_magnitude.emplace(key, magnitude_from_blob(blobs_in.take(j.at("blob"), pw), static_cast<size_t>(numel), index, pw));
      c.passthrough.emplace_back(key, std::move(t));  // no data until decompress_container restores it
      continue;
    }
    t.data = blobs_in.take(j.at("blob"), pw);
    if (j.contains("coding")) {  // v4
      if (version < 4) throw Error(ErrorKind::Format, pw, "passthrough coding needs format version 4");
      if (coding != "int8") throw Error(ErrorKind::Format, pw, "unknown passthrough coding '" + coding + "'");
      if (!is_float(t.dtype)) throw Error(ErrorKind::Format, pw, "int8 coding of a tensor that is not floating point");
      Int8Rows q = int8_rows_from_blob(t.data, t.shape, pw);
      t = dequantize_int8_rows(q, t.dtype, t.shape);
      c.passthrough_int8.emplace(key, std::move(q));
      c.passthrough.emplace_back(key, std::move(t));
      continue;
    }
    if (numel * dtype_size(t.dtype) != t.data.size()) throw Error(ErrorKind::Format, pw, "tensor size does not match its shape");
    if (version >= 2) t.data = from_byte_planes(t.data, dtype_size(t.dtype));
    c.passthrough.emplace_back(key, std::move(t));
  }
  blobs_in.finish();
  return c;
}

}  // namespace

Container read_container(const std::string& path) {
  const std::vector<uint8_t> bytes = read_file(path);
  return parse_container(bytes.data(), bytes.size(), path);
}

void write_container(const std::string& path, const Container& c) {
  write_file_atomic(path, serialize_container(c));
}

}  // namespace solar
