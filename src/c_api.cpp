// The C interface (include/solar/solar.h): opaque handles over the C++ core, with every
// exception turned into a status and a message at this boundary.
#include "solar/solar.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <new>
#include <string>
#include <utility>
#include <vector>

#include "solar/checkpoint.hpp"
#include "solar/container.hpp"
#include "solar/error.hpp"
#include "solar/peft_adapter.hpp"
#include "solar/pipeline.hpp"
#include "solar/weights.hpp"

struct solar_weights {
  std::unique_ptr<solar::WeightSource> source;
  solar::InMemoryWeights* in_memory = nullptr;  // set when `source` is one (solar_weights_new)
};

struct solar_adapter {
  std::string config_json;
  solar::PeftAdapter adapter;
  std::vector<std::pair<std::string, const solar::Tensor*>> tensors;  // into `adapter`, PEFT key order
  std::vector<std::string> dtype_names;
};

namespace {

solar_status status_of(solar::ErrorKind kind) {
  switch (kind) {
    case solar::ErrorKind::Io: return SOLAR_ERROR_IO;
    case solar::ErrorKind::Format: return SOLAR_ERROR_FORMAT;
    case solar::ErrorKind::Corrupt: return SOLAR_ERROR_CORRUPT;
    case solar::ErrorKind::Mismatch: return SOLAR_ERROR_MISMATCH;
    case solar::ErrorKind::InvalidInput: return SOLAR_ERROR_INVALID_INPUT;
    case solar::ErrorKind::Unsupported: return SOLAR_ERROR_UNSUPPORTED;
  }
  return SOLAR_ERROR_INTERNAL;
}

void write_message(char* err, size_t err_size, const char* message) {
  if (!err || err_size == 0) return;
  const size_t n = std::min(err_size - 1, std::strlen(message));
  std::memcpy(err, message, n);
  err[n] = '\0';
}

// Runs `body` and maps whatever it throws to a status and a message.
template <class Body>
solar_status guarded(char* err, size_t err_size, Body&& body) noexcept {
  try {
    body();
    return SOLAR_OK;
  } catch (const solar::Error& e) {
    write_message(err, err_size, e.what());
    return status_of(e.kind());
  } catch (const std::bad_alloc&) {
    write_message(err, err_size, "out of memory");
  } catch (const std::exception& e) {
    write_message(err, err_size, e.what());
  } catch (...) {
    write_message(err, err_size, "unknown error");
  }
  return SOLAR_ERROR_INTERNAL;
}

void require(bool ok, const char* function, const char* what) {
  if (!ok) throw solar::Error(solar::ErrorKind::InvalidInput, function, what);
}

// The base to decode or encode against: the caller's, or an empty set (modes that need no W).
const solar::WeightSource& base_or_empty(const solar_weights* base, const solar::InMemoryWeights& empty) {
  return base ? *base->source : static_cast<const solar::WeightSource&>(empty);
}

}  // namespace

extern "C" {

const char* solar_version(void) {
  static const std::string version = solar::version_string();
  return version.c_str();
}

const char* solar_status_name(solar_status status) {
  switch (status) {
    case SOLAR_OK: return "SOLAR_OK";
    case SOLAR_ERROR_IO: return "SOLAR_ERROR_IO";
    case SOLAR_ERROR_FORMAT: return "SOLAR_ERROR_FORMAT";
    case SOLAR_ERROR_CORRUPT: return "SOLAR_ERROR_CORRUPT";
    case SOLAR_ERROR_MISMATCH: return "SOLAR_ERROR_MISMATCH";
    case SOLAR_ERROR_INVALID_INPUT: return "SOLAR_ERROR_INVALID_INPUT";
    case SOLAR_ERROR_UNSUPPORTED: return "SOLAR_ERROR_UNSUPPORTED";
    case SOLAR_ERROR_INTERNAL: return "SOLAR_ERROR_INTERNAL";
  }
  return "unknown status";
}

solar_status solar_weights_open(const char* path, solar_weights** out, char* err, size_t err_size) {
  return guarded(err, err_size, [&] {
    require(path && out, "solar_weights_open", "path and out must not be NULL");
    auto w = std::make_unique<solar_weights>();
    w->source = std::make_unique<solar::Checkpoint>(path);
    *out = w.release();
  });
}

solar_status solar_weights_new(const char* label, solar_weights** out, char* err, size_t err_size) {
  return guarded(err, err_size, [&] {
    require(out, "solar_weights_new", "out must not be NULL");
    auto w = std::make_unique<solar_weights>();
    auto mem = label ? std::make_unique<solar::InMemoryWeights>(label) : std::make_unique<solar::InMemoryWeights>();
    w->in_memory = mem.get();
    w->source = std::move(mem);
    *out = w.release();
  });
}

solar_status solar_weights_add(solar_weights* weights, const char* name, const char* dtype,
                               const int64_t* shape, size_t ndim, const void* data, size_t nbytes,
                               char* err, size_t err_size) {
  return guarded(err, err_size, [&] {
    require(weights && name && dtype && (shape || ndim == 0) && (data || nbytes == 0), "solar_weights_add",
            "weights, name, dtype, shape and data must not be NULL");
    const std::string where = weights->source->describe() + ": tensor '" + name + "'";
    if (!weights->in_memory)
      throw solar::Error(solar::ErrorKind::InvalidInput, where, "cannot add to weights opened from a file");
    weights->in_memory->add(name, solar::checked_view(solar::parse_dtype(dtype, where), std::vector<int64_t>(shape, shape + ndim),
                                                      static_cast<const uint8_t*>(data), nbytes, where));
  });
}

void solar_weights_free(solar_weights* weights) { delete weights; }

solar_status solar_restore(const void* data, size_t size, const solar_weights* base, int threads,
                           solar_adapter** out, char* err, size_t err_size) {
  return guarded(err, err_size, [&] {
    require((data || size == 0) && out, "solar_restore", "data and out must not be NULL");
    require(threads >= 0, "solar_restore", "threads must be 0 (every core) or more");
    const solar::Container c = solar::parse_container(static_cast<const uint8_t*>(data), size, "<.solar bytes>");
    const solar::InMemoryWeights empty("<no base given>");
    auto a = std::make_unique<solar_adapter>();
    a->adapter = solar::decompress_container(c, base_or_empty(base, empty), {threads, {}});
    a->config_json = a->adapter.config.dump(2);
    a->tensors = solar::peft_tensor_refs(a->adapter);
    for (const auto& [key, t] : a->tensors) a->dtype_names.push_back(solar::dtype_name(t->dtype));
    *out = a.release();
  });
}

size_t solar_adapter_tensor_count(const solar_adapter* adapter) { return adapter ? adapter->tensors.size() : 0; }

solar_status solar_adapter_tensor(const solar_adapter* adapter, size_t index, solar_tensor* out) {
  if (!adapter || !out || index >= adapter->tensors.size()) return SOLAR_ERROR_INVALID_INPUT;
  const auto& [key, t] = adapter->tensors[index];
  *out = solar_tensor{key.c_str(), adapter->dtype_names[index].c_str(), t->shape.size(), t->shape.data(),
                      t->data.data(), t->data.size()};
  return SOLAR_OK;
}

size_t solar_adapter_module_count(const solar_adapter* adapter) { return adapter ? adapter->adapter.modules.size() : 0; }

solar_status solar_adapter_module(const solar_adapter* adapter, size_t index, solar_lora_module* out) {
  if (!adapter || !out || index >= adapter->adapter.modules.size()) return SOLAR_ERROR_INVALID_INPUT;
  const solar::LoraModule& m = adapter->adapter.modules[index];
  // peft_tensor_refs lists each module's A then B first, in module order.
  if (solar_adapter_tensor(adapter, 2 * index, &out->a) != SOLAR_OK ||
      solar_adapter_tensor(adapter, 2 * index + 1, &out->b) != SOLAR_OK)
    return SOLAR_ERROR_INTERNAL;
  out->path = m.path.c_str();
  out->rank = m.rank;
  out->scaling = m.scaling;
  return SOLAR_OK;
}

const char* solar_adapter_config_json(const solar_adapter* adapter) {
  return adapter ? adapter->config_json.c_str() : nullptr;
}

solar_status solar_adapter_save(const solar_adapter* adapter, const char* dir, char* err, size_t err_size) {
  return guarded(err, err_size, [&] {
    require(adapter && dir, "solar_adapter_save", "adapter and dir must not be NULL");
    solar::write_peft_adapter(dir, adapter->adapter);
  });
}

void solar_adapter_free(solar_adapter* adapter) { delete adapter; }

solar_compress_params solar_compress_default_params(void) {
  solar_compress_params p{};
  p.mode = "spectral";
  p.target_bytes = 0;
  p.target_error = 0.0;
  p.calibration = nullptr;
  p.quantiser = "auto";
  p.passthrough = "exact";
  p.balance = -1.0;
  p.seed = 0;
  p.threads = 0;
  p.dora_magnitudes = "coded";
  return p;
}

solar_status solar_compress(const char* adapter_dir, const solar_weights* base,
                            const solar_compress_params* params, uint8_t** out, size_t* out_size,
                            char* err, size_t err_size) {
  return guarded(err, err_size, [&] {
    require(adapter_dir && out && out_size, "solar_compress", "adapter_dir, out and out_size must not be NULL");
    const solar_compress_params p = params ? *params : solar_compress_default_params();
    require(p.threads >= 0, "solar_compress", "threads must be 0 (every core) or more");
    solar::CompressOptions o;
    o.mode = p.mode ? p.mode : "spectral";
    o.quantiser = p.quantiser ? p.quantiser : "auto";
    o.passthrough = p.passthrough ? p.passthrough : "exact";
    o.dora_magnitudes = p.dora_magnitudes ? p.dora_magnitudes : "coded";
    if (p.target_bytes > 0) o.target_bytes = p.target_bytes;
    if (p.target_error > 0) o.target_error = p.target_error;
    if (p.balance >= 0) o.balance = p.balance;
    if (p.calibration) o.calibration = p.calibration->source.get();
    o.seed = p.seed;
    o.threads = p.threads;
    const solar::PeftAdapter adapter = solar::read_peft_adapter(adapter_dir);
    const solar::InMemoryWeights empty("<no base given>");
    const std::vector<uint8_t> bytes =
        solar::serialize_container(solar::compress_adapter(adapter, base_or_empty(base, empty), o));
    auto* buffer = static_cast<uint8_t*>(std::malloc(std::max<size_t>(1, bytes.size())));
    if (!buffer) throw std::bad_alloc();
    std::memcpy(buffer, bytes.data(), bytes.size());
    *out = buffer;
    *out_size = bytes.size();
  });
}

void solar_free(void* buffer) { std::free(buffer); }

}  // extern "C"
