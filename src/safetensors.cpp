#include "solar/safetensors.hpp"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <limits>
#include <set>
#include <tuple>

#include <nlohmann/json.hpp>

#include "solar/error.hpp"
#include "solar/io.hpp"

namespace solar {
namespace {

constexpr uint64_t kMaxHeaderBytes = 100ull * 1024 * 1024;

// dtype names the safetensors format defines that this version does not handle.
bool is_spec_dtype_we_lack(const std::string& s) {
  static const char* const kOther[] = {"U16", "U32", "U64", "F8_E4M3", "F8_E5M2", "F8_E8M0",
                                       "F6_E2M3", "F6_E3M2", "F4", "C64", "F8_E4M3FNUZ",
                                       "F8_E5M2FNUZ"};
  for (const char* n : kOther)
    if (s == n) return true;
  return false;
}

bool known_dtype(const std::string& s, DType* out) {
  static const struct { const char* name; DType t; } kTable[] = {
      {"F64", DType::F64}, {"F32", DType::F32}, {"F16", DType::F16}, {"BF16", DType::BF16},
      {"I64", DType::I64}, {"I32", DType::I32}, {"I16", DType::I16}, {"I8", DType::I8},
      {"U8", DType::U8},   {"BOOL", DType::BOOL},
  };
  for (const auto& e : kTable)
    if (s == e.name) {
      *out = e.t;
      return true;
    }
  return false;
}

bool json_to_u64(const nlohmann::json& v, uint64_t* out) {
  if (v.is_number_unsigned()) {
    *out = v.get<uint64_t>();
    return true;
  }
  if (v.is_number_integer()) {
    int64_t i = v.get<int64_t>();
    if (i < 0) return false;
    *out = static_cast<uint64_t>(i);
    return true;
  }
  return false;
}

}  // namespace

size_t TensorView::numel() const {
  size_t n = 1;
  for (int64_t d : shape) n *= static_cast<size_t>(d);
  return n;
}

Tensor TensorView::copy() const {
  Tensor t;
  t.dtype = dtype;
  t.shape = shape;
  if (nbytes) t.data.assign(data, data + nbytes);
  return t;
}

std::vector<float> TensorView::to_f32() const {
  const size_t n = numel();
  std::vector<float> out(n);
  solar::to_f32(dtype, data, n, out.data());
  return out;
}

SafetensorsFile::SafetensorsFile(const std::string& path) : path_(path) {
  auto fail = [&](const std::string& msg) -> void { throw Error(ErrorKind::Format, path_, msg); };

  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) throw Error(ErrorKind::Io, path, std::string("cannot open: ") + std::strerror(errno));
  struct stat st {};
  if (::fstat(fd, &st) != 0) {
    int err = errno;
    ::close(fd);
    throw Error(ErrorKind::Io, path, std::string("cannot stat: ") + std::strerror(err));
  }
  if (S_ISDIR(st.st_mode)) {
    ::close(fd);
    throw Error(ErrorKind::Io, path, "is a directory, not a safetensors file");
  }
  const uint64_t file_size = static_cast<uint64_t>(st.st_size);
  if (file_size < 8) {
    ::close(fd);
    fail("truncated header: file is " + std::to_string(file_size) +
         " bytes, too small for a safetensors header");
  }
  void* m = ::mmap(nullptr, static_cast<size_t>(file_size), PROT_READ, MAP_PRIVATE, fd, 0);
  int map_err = errno;
  ::close(fd);
  if (m == MAP_FAILED) throw Error(ErrorKind::Io, path, std::string("cannot mmap: ") + std::strerror(map_err));
  map_ = static_cast<const uint8_t*>(m);
  map_size_ = static_cast<size_t>(file_size);

  try {
    uint64_t header_len = 0;
    for (int i = 0; i < 8; ++i) header_len |= static_cast<uint64_t>(map_[i]) << (8 * i);
    if (header_len > file_size - 8)
      fail("truncated header: header length " + std::to_string(header_len) + " exceeds the " +
           std::to_string(file_size - 8) + " bytes after the length field");
    if (header_len > kMaxHeaderBytes)
      fail("header length " + std::to_string(header_len) + " exceeds the 100 MB limit");
    const char* hp = reinterpret_cast<const char*>(map_ + 8);
    nlohmann::json header;
    try {
      header = nlohmann::json::parse(hp, hp + header_len);
    } catch (const nlohmann::json::exception& e) {
      fail(std::string("header is not valid JSON: ") + e.what());
    }
    if (!header.is_object()) fail("header is not a JSON object");

    buffer_ = map_ + 8 + header_len;
    const uint64_t buffer_size = file_size - 8 - header_len;

    for (auto it = header.begin(); it != header.end(); ++it) {
      const std::string& name = it.key();
      const nlohmann::json& v = it.value();
      if (name == "__metadata__") {
        if (!v.is_object()) fail("__metadata__ is not a JSON object");
        for (auto mit = v.begin(); mit != v.end(); ++mit) {
          if (!mit.value().is_string()) fail("__metadata__ value for '" + mit.key() + "' is not a string");
          metadata_[mit.key()] = mit.value().get<std::string>();
        }
        continue;
      }
      const std::string t = "tensor '" + name + "': ";
      if (!v.is_object()) fail(t + "entry is not a JSON object");
      auto dt = v.find("dtype");
      auto sh = v.find("shape");
      auto off = v.find("data_offsets");
      if (dt == v.end() || !dt->is_string()) fail(t + "missing or non-string dtype");
      if (sh == v.end() || !sh->is_array()) fail(t + "missing or non-array shape");
      if (off == v.end() || !off->is_array()) fail(t + "missing or non-array data_offsets");
      Entry e{};
      const std::string dname = dt->get<std::string>();
      if (!known_dtype(dname, &e.dtype)) {
        if (is_spec_dtype_we_lack(dname))
          throw Error(ErrorKind::Unsupported, path_, t + "dtype '" + dname + "' is not supported");
        fail(t + "unknown dtype '" + dname + "'");
      }
      uint64_t numel = 1;
      for (const auto& d : *sh) {
        uint64_t u;
        if (!json_to_u64(d, &u) || u > static_cast<uint64_t>(std::numeric_limits<int64_t>::max()))
          fail(t + "shape entries must be non-negative integers");
        if (__builtin_mul_overflow(numel, u, &numel)) fail(t + "shape overflows the element count");
        e.shape.push_back(static_cast<int64_t>(u));
      }
      uint64_t nbytes;
      if (__builtin_mul_overflow(numel, static_cast<uint64_t>(dtype_size(e.dtype)), &nbytes))
        fail(t + "shape overflows the byte count");
      if (off->size() != 2) fail(t + "data_offsets must have two entries");
      if (!json_to_u64((*off)[0], &e.begin) || !json_to_u64((*off)[1], &e.end))
        fail(t + "data_offsets must be non-negative integers");
      if (e.begin > e.end) fail(t + "data_offsets begin after they end");
      if (e.end > buffer_size)
        fail(t + "data_offsets out of bounds (end " + std::to_string(e.end) + " > buffer size " +
             std::to_string(buffer_size) + ")");
      if (e.end - e.begin != nbytes)
        fail(t + "data_offsets span " + std::to_string(e.end - e.begin) + " bytes but " + dname +
             " shape needs " + std::to_string(nbytes));
      entries_.emplace(name, std::move(e));
    }

    // As the reference implementation requires: tensors tile the buffer without overlaps or holes.
    std::vector<std::pair<const std::string*, const Entry*>> order;
    for (const auto& [n, e] : entries_) order.emplace_back(&n, &e);
    std::sort(order.begin(), order.end(), [](const auto& a, const auto& b) {
      return std::tie(a.second->begin, a.second->end) < std::tie(b.second->begin, b.second->end);
    });
    uint64_t pos = 0;
    for (const auto& [n, e] : order) {
      if (e->begin < pos) fail("tensor '" + *n + "': data_offsets overlap another tensor");
      if (e->begin > pos) fail("tensor '" + *n + "': hole in the data buffer before its data_offsets");
      pos = e->end;
    }
    if (pos != buffer_size)
      fail("data buffer has " + std::to_string(buffer_size - pos) + " trailing bytes not covered by any tensor");
  } catch (...) {
    ::munmap(const_cast<uint8_t*>(map_), map_size_);
    map_ = nullptr;
    throw;
  }
}

SafetensorsFile::~SafetensorsFile() {
  if (map_) ::munmap(const_cast<uint8_t*>(map_), map_size_);
}

std::vector<std::string> SafetensorsFile::names() const {
  std::vector<std::pair<const std::string*, const Entry*>> order;
  for (const auto& [n, e] : entries_) order.emplace_back(&n, &e);
  std::stable_sort(order.begin(), order.end(), [](const auto& a, const auto& b) {
    return std::tie(a.second->begin, a.second->end) < std::tie(b.second->begin, b.second->end);
  });
  std::vector<std::string> out;
  out.reserve(order.size());
  for (const auto& p : order) out.push_back(*p.first);
  return out;
}

bool SafetensorsFile::contains(const std::string& name) const { return entries_.count(name) != 0; }

TensorView SafetensorsFile::get(const std::string& name) const {
  auto it = entries_.find(name);
  if (it == entries_.end()) throw Error(ErrorKind::Mismatch, path_, "no tensor '" + name + "'");
  const Entry& e = it->second;
  return TensorView{e.dtype, e.shape, buffer_ + e.begin, static_cast<size_t>(e.end - e.begin)};
}

namespace {

std::vector<uint8_t> encode(const std::vector<std::pair<std::string, Tensor>>& tensors,
                            const std::map<std::string, std::string>& metadata, const std::string& where) {
  // Built by hand (linear in the tensor count) to keep the caller's order.
  std::string h = "{";
  bool first = true;
  auto key = [&](const std::string& k) {
    if (!first) h += ',';
    first = false;
    h += nlohmann::json(k).dump();
    h += ':';
  };
  try {
    if (!metadata.empty()) {
      nlohmann::json m = nlohmann::json::object();
      for (const auto& [k, v] : metadata) m[k] = v;
      key("__metadata__");
      h += m.dump();
    }
    std::set<std::string> seen;
    uint64_t offset = 0;
    for (const auto& [name, t] : tensors) {
      if (name == "__metadata__")
        throw Error(ErrorKind::InvalidInput, where, "a tensor cannot be named '__metadata__'");
      if (!seen.insert(name).second)
        throw Error(ErrorKind::InvalidInput, where, "duplicate tensor name '" + name + "'");
      size_t numel = 1;
      for (int64_t d : t.shape) {
        if (d < 0) throw Error(ErrorKind::InvalidInput, where, "tensor '" + name + "': negative dimension");
        numel *= static_cast<size_t>(d);
      }
      if (t.data.size() != numel * dtype_size(t.dtype))
        throw Error(ErrorKind::InvalidInput, where,
                    "tensor '" + name + "': " + std::to_string(t.data.size()) + " bytes for a shape needing " +
                        std::to_string(numel * dtype_size(t.dtype)));
      nlohmann::ordered_json e = nlohmann::ordered_json::object();
      e["dtype"] = dtype_name(t.dtype);
      e["shape"] = t.shape;
      e["data_offsets"] = {offset, offset + t.data.size()};
      key(name);
      h += e.dump();
      offset += t.data.size();
    }
  } catch (const nlohmann::json::exception& e) {
    throw Error(ErrorKind::InvalidInput, where, std::string("cannot encode header: ") + e.what());
  }
  h += '}';
  size_t total = 0;
  for (const auto& p : tensors) total += p.second.data.size();
  h.append((8 - h.size() % 8) % 8, ' ');
  std::vector<uint8_t> out;
  out.reserve(8 + h.size() + total);
  const uint64_t n = h.size();
  for (int i = 0; i < 8; ++i) out.push_back(static_cast<uint8_t>(n >> (8 * i)));
  out.insert(out.end(), h.begin(), h.end());
  for (const auto& [name, t] : tensors) out.insert(out.end(), t.data.begin(), t.data.end());
  return out;
}

}  // namespace

std::vector<uint8_t> safetensors_bytes(const std::vector<std::pair<std::string, Tensor>>& tensors,
                                       const std::map<std::string, std::string>& metadata) {
  return encode(tensors, metadata, "<safetensors>");
}

void write_safetensors(const std::string& path, const std::vector<std::pair<std::string, Tensor>>& tensors,
                       const std::map<std::string, std::string>& metadata) {
  write_file_atomic(path, encode(tensors, metadata, path));
}

}  // namespace solar
