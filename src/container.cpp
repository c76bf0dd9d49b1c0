// Serialisation of the .solar container, format v1 (docs/FORMAT.md).
#include "solar/container.hpp"

#include <bit>
#include <cstring>

#include <xxhash.h>
#include <zstd.h>

#include "solar/error.hpp"
#include "solar/io.hpp"

namespace solar {
namespace {

static_assert(std::endian::native == std::endian::little, "solar assumes a little-endian host");

constexpr uint8_t kMagic[8] = {0x89, 'S', 'O', 'L', 'A', 'R', '\r', '\n'};
constexpr uint32_t kFlagMetaZstd = 1u, kFlagPayloadZstd = 2u;
constexpr uint64_t kMaxMetadata = 64ull << 20;
constexpr uint64_t kMaxPayload = 2ull << 30;
constexpr int kZstdLevel = 19;

void put_u32(uint8_t* p, uint32_t v) { for (int i = 0; i < 4; ++i) p[i] = static_cast<uint8_t>(v >> (8 * i)); }
void put_u64(uint8_t* p, uint64_t v) { for (int i = 0; i < 8; ++i) p[i] = static_cast<uint8_t>(v >> (8 * i)); }
uint32_t get_u32(const uint8_t* p) { uint32_t v = 0; for (int i = 0; i < 4; ++i) v |= static_cast<uint32_t>(p[i]) << (8 * i); return v; }
uint64_t get_u64(const uint8_t* p) { uint64_t v = 0; for (int i = 0; i < 8; ++i) v |= static_cast<uint64_t>(p[i]) << (8 * i); return v; }

std::string hex64(uint64_t v) {
  static const char* digits = "0123456789abcdef";
  std::string s(16, '0');
  for (int i = 15; i >= 0; --i, v >>= 4) s[static_cast<size_t>(i)] = digits[v & 0xF];
  return s;
}

uint64_t parse_hex64(const std::string& s, const std::string& where) {
  if (s.size() != 16) throw Error(ErrorKind::Format, where, "fingerprint must be 16 hex digits");
  uint64_t v = 0;
  for (char c : s) {
    int d;
    if (c >= '0' && c <= '9') d = c - '0';
    else if (c >= 'a' && c <= 'f') d = c - 'a' + 10;
    else throw Error(ErrorKind::Format, where, "fingerprint must be lowercase hex");
    v = (v << 4) | static_cast<uint64_t>(d);
  }
  return v;
}

// Keeps zstd only when it is smaller; returns true if compressed.
bool maybe_compress(const std::vector<uint8_t>& raw, std::vector<uint8_t>& stored) {
  if (raw.empty()) { stored.clear(); return false; }
  std::vector<uint8_t> z(ZSTD_compressBound(raw.size()));
  const size_t n = ZSTD_compress(z.data(), z.size(), raw.data(), raw.size(), kZstdLevel);
  if (!ZSTD_isError(n) && n < raw.size()) {
    z.resize(n);
    stored = std::move(z);
    return true;
  }
  stored = raw;
  return false;
}

std::vector<uint8_t> inflate(const uint8_t* p, size_t n, uint64_t raw_size, const std::string& where, const char* part) {
  const unsigned long long declared = ZSTD_getFrameContentSize(p, n);
  if (declared == ZSTD_CONTENTSIZE_ERROR || declared == ZSTD_CONTENTSIZE_UNKNOWN || declared != raw_size)
    throw Error(ErrorKind::Format, where, std::string(part) + ": zstd frame does not declare the expected size");
  std::vector<uint8_t> out(static_cast<size_t>(raw_size));
  const size_t got = ZSTD_decompress(out.data(), out.size(), p, n);
  if (ZSTD_isError(got) || got != raw_size)
    throw Error(ErrorKind::Format, where, std::string(part) + ": zstd data is invalid");
  return out;
}

struct PayloadWriter {
  std::vector<uint8_t> bytes;
  nlohmann::json add(const std::vector<uint8_t>& blob) {
    nlohmann::json ref = {bytes.size(), blob.size()};
    bytes.insert(bytes.end(), blob.begin(), blob.end());
    return ref;
  }
};

template <class T>
T field(const nlohmann::json& j, const char* key, const std::string& where) {
  try {
    return j.at(key).get<T>();
  } catch (const nlohmann::json::exception&) {
    throw Error(ErrorKind::Format, where, std::string("metadata field '") + key + "' is missing or has the wrong type");
  }
}

std::vector<uint8_t> blob_at(const nlohmann::json& ref, const std::vector<uint8_t>& payload, const std::string& where) {
  if (!ref.is_array() || ref.size() != 2 || !ref[0].is_number_unsigned() || !ref[1].is_number_unsigned())
    throw Error(ErrorKind::Format, where, "blob reference must be [offset, length]");
  const uint64_t off = ref[0].get<uint64_t>(), len = ref[1].get<uint64_t>();
  if (off > payload.size() || len > payload.size() - off)
    throw Error(ErrorKind::Format, where, "blob [" + std::to_string(off) + ", +" + std::to_string(len) + "] lies outside the payload");
  return {payload.begin() + static_cast<ptrdiff_t>(off), payload.begin() + static_cast<ptrdiff_t>(off + len)};
}

Container from_metadata(const nlohmann::json& meta, const std::vector<uint8_t>& payload, const std::string& where);

}  // namespace

uint64_t fingerprint_f32(const std::vector<float>& values) {
  return XXH64(values.data(), values.size() * sizeof(float), 0);
}

std::vector<uint8_t> serialize_container(const Container& c) {
  PayloadWriter pw;
  nlohmann::json layers = nlohmann::json::array();
  for (const LayerRecord& l : c.layers) {
    nlohmann::json blobs = nlohmann::json::array();
    for (const auto& b : l.encoded.blobs) blobs.push_back(pw.add(b));
    layers.push_back({{"module", l.module},
                      {"base", l.base_key},
                      {"transpose", l.transpose_base},
                      {"shape", {l.shape.m, l.shape.n, l.shape.r}},
                      {"dtypes", {dtype_name(l.a_dtype), dtype_name(l.b_dtype)}},
                      {"fingerprint", hex64(l.base_fingerprint)},
                      {"mode", l.mode},
                      {"params", l.encoded.params},
                      {"blobs", blobs}});
  }
  nlohmann::json pass = nlohmann::json::array();
  for (const auto& [key, t] : c.passthrough)
    pass.push_back({{"key", key}, {"dtype", dtype_name(t.dtype)}, {"shape", t.shape}, {"blob", pw.add(t.data)}});
  nlohmann::json meta = {{"producer", c.producer},
                         {"seed", std::to_string(c.seed)},
                         {"peft_config", c.peft_config},
                         {"key_prefix", c.key_prefix},
                         {"file_metadata", c.file_metadata},
                         {"layers", layers},
                         {"passthrough", pass}};
  const std::string meta_text = meta.dump();
  const std::vector<uint8_t> meta_raw(meta_text.begin(), meta_text.end());
  std::vector<uint8_t> meta_stored, payload_stored;
  uint32_t flags = 0;
  if (maybe_compress(meta_raw, meta_stored)) flags |= kFlagMetaZstd;
  if (maybe_compress(pw.bytes, payload_stored)) flags |= kFlagPayloadZstd;

  std::vector<uint8_t> out(kHeaderSize);
  std::memcpy(out.data(), kMagic, 8);
  put_u32(out.data() + 8, kFormatVersion);
  put_u32(out.data() + 12, flags);
  put_u64(out.data() + 16, meta_stored.size());
  put_u64(out.data() + 24, meta_raw.size());
  put_u64(out.data() + 32, payload_stored.size());
  put_u64(out.data() + 40, pw.bytes.size());
  out.insert(out.end(), meta_stored.begin(), meta_stored.end());
  out.insert(out.end(), payload_stored.begin(), payload_stored.end());
  const uint64_t sum = XXH64(out.data(), out.size(), 0);
  out.resize(out.size() + kTrailerSize);
  put_u64(out.data() + out.size() - kTrailerSize, sum);
  return out;
}

Container parse_container(const uint8_t* data, size_t size, const std::string& where) {
  if (size < kHeaderSize + kTrailerSize) throw Error(ErrorKind::Format, where, "truncated: " + std::to_string(size) + " bytes is smaller than a .solar header");
  if (std::memcmp(data, kMagic, 8) != 0) throw Error(ErrorKind::Format, where, "not a .solar file (bad magic)");
  const uint32_t version = get_u32(data + 8);
  if (version != kFormatVersion)
    throw Error(ErrorKind::Unsupported, where, "format version " + std::to_string(version) + " (this build reads version " + std::to_string(kFormatVersion) + ")");
  const uint32_t flags = get_u32(data + 12);
  if (flags & ~(kFlagMetaZstd | kFlagPayloadZstd)) throw Error(ErrorKind::Format, where, "unknown header flags");
  const uint64_t meta_stored = get_u64(data + 16), meta_raw = get_u64(data + 24);
  const uint64_t pay_stored = get_u64(data + 32), pay_raw = get_u64(data + 40);
  const uint64_t body = size - kHeaderSize - kTrailerSize;
  if (meta_stored > body || pay_stored > body - meta_stored)
    throw Error(ErrorKind::Format, where, "truncated: header declares " + std::to_string(meta_stored + pay_stored) + " body bytes, file has " + std::to_string(body));
  if (meta_stored + pay_stored != body) throw Error(ErrorKind::Format, where, "trailing bytes after the payload");
  if (meta_raw > kMaxMetadata || pay_raw > kMaxPayload) throw Error(ErrorKind::Format, where, "declared sizes exceed the format's limits");
  if (!(flags & kFlagMetaZstd) && meta_raw != meta_stored) throw Error(ErrorKind::Format, where, "metadata sizes disagree");
  if (!(flags & kFlagPayloadZstd) && pay_raw != pay_stored) throw Error(ErrorKind::Format, where, "payload sizes disagree");
  const uint64_t expected = get_u64(data + size - kTrailerSize);
  if (XXH64(data, size - kTrailerSize, 0) != expected)
    throw Error(ErrorKind::Corrupt, where, "checksum mismatch: the file is damaged");

  const uint8_t* meta_p = data + kHeaderSize;
  const uint8_t* pay_p = meta_p + meta_stored;
  std::vector<uint8_t> meta_bytes = (flags & kFlagMetaZstd) ? inflate(meta_p, meta_stored, meta_raw, where, "metadata")
                                                             : std::vector<uint8_t>(meta_p, meta_p + meta_stored);
  std::vector<uint8_t> payload = (flags & kFlagPayloadZstd) ? inflate(pay_p, pay_stored, pay_raw, where, "payload")
                                                             : std::vector<uint8_t>(pay_p, pay_p + pay_stored);
  nlohmann::json meta;
  try {
    meta = nlohmann::json::parse(meta_bytes.begin(), meta_bytes.end());
  } catch (const nlohmann::json::exception& e) {
    throw Error(ErrorKind::Format, where, std::string("metadata is not valid JSON: ") + e.what());
  }
  if (!meta.is_object()) throw Error(ErrorKind::Format, where, "metadata must be a JSON object");
  try {
    return from_metadata(meta, payload, where);
  } catch (const nlohmann::json::exception& e) {
    throw Error(ErrorKind::Format, where, std::string("malformed metadata: ") + e.what());
  }
}

namespace {

Container from_metadata(const nlohmann::json& meta, const std::vector<uint8_t>& payload, const std::string& where) {
  Container c;
  c.producer = field<std::string>(meta, "producer", where);
  const std::string seed = field<std::string>(meta, "seed", where);
  try {
    size_t used = 0;
    c.seed = std::stoull(seed, &used);
    if (used != seed.size() || seed.empty() || seed[0] == '-') throw std::invalid_argument("seed");
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
    l.base_key = field<std::string>(j, "base", lw);
    l.transpose_base = field<bool>(j, "transpose", lw);
    const auto shape = field<std::vector<int64_t>>(j, "shape", lw);
    if (shape.size() != 3) throw Error(ErrorKind::Format, lw, "shape must be [out, in, rank]");
    l.shape = {shape[0], shape[1], shape[2]};
    if (l.shape.m < 1 || l.shape.n < 1 || l.shape.r < 1 || l.shape.m > (1 << 24) || l.shape.n > (1 << 24) || l.shape.r > (1 << 16))
      throw Error(ErrorKind::Format, lw, "shape out of range");
    const auto dts = field<std::vector<std::string>>(j, "dtypes", lw);
    if (dts.size() != 2) throw Error(ErrorKind::Format, lw, "dtypes must name A and B");
    l.a_dtype = parse_dtype(dts[0], lw);
    l.b_dtype = parse_dtype(dts[1], lw);
    if (!is_float(l.a_dtype) || !is_float(l.b_dtype)) throw Error(ErrorKind::Format, lw, "LoRA factors must be floating point");
    l.base_fingerprint = parse_hex64(field<std::string>(j, "fingerprint", lw), lw);
    l.mode = field<std::string>(j, "mode", lw);
    l.encoded.params = j.contains("params") ? j.at("params") : nlohmann::json::object();
    const auto& blobs = j.at("blobs");
    if (!blobs.is_array()) throw Error(ErrorKind::Format, lw, "blobs must be an array");
    for (const auto& ref : blobs) l.encoded.blobs.push_back(blob_at(ref, payload, lw));
    c.layers.push_back(std::move(l));
  }
  const auto& pass = meta.at("passthrough");
  if (!pass.is_array()) throw Error(ErrorKind::Format, where, "passthrough must be an array");
  for (const auto& j : pass) {
    Tensor t;
    const std::string key = field<std::string>(j, "key", where);
    const std::string pw = where + " (tensor " + key + ")";
    t.dtype = parse_dtype(field<std::string>(j, "dtype", pw), pw);
    t.shape = field<std::vector<int64_t>>(j, "shape", pw);
    t.data = blob_at(j.at("blob"), payload, pw);
    uint64_t numel = 1;
    for (int64_t d : t.shape) {
      if (d < 0 || (d > 0 && numel > (1ull << 40) / static_cast<uint64_t>(d))) throw Error(ErrorKind::Format, pw, "bad shape");
      numel *= static_cast<uint64_t>(d);
    }
    if (numel * dtype_size(t.dtype) != t.data.size()) throw Error(ErrorKind::Format, pw, "tensor size does not match its shape");
    c.passthrough.emplace_back(key, std::move(t));
  }
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
