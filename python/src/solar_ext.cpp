// solar._ext: the Python binding of the C++ core. Thin on purpose: every algorithm, format and
// validation lives in solar_core; this file only moves bytes between Python and the core.
//
//  * Base weights held by Python (a torch/numpy state dict) are wrapped without copying as
//    TensorViews in an InMemoryWeights; the Base object keeps the arrays alive.
//  * The GIL is released while the core compresses, restores, reads or writes.
//  * solar::Error becomes the Python exception class registered for its ErrorKind
//    (solar/errors.py registers them at import), with the core's message unchanged.
#include <array>
#include <cstring>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/map.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include "solar/checkpoint.hpp"
#include "solar/container.hpp"
#include "solar/error.hpp"
#include "solar/io.hpp"
#include "solar/peft_adapter.hpp"
#include "solar/philox.hpp"
#include "solar/pipeline.hpp"
#include "solar/weights.hpp"

namespace nb = nanobind;
using namespace nb::literals;

namespace {

// ---- errors -------------------------------------------------------------------------------

constexpr size_t kKinds = 6;
// Exception classes by ErrorKind, set once by solar.errors; intentionally never released
// (they live as long as the interpreter).
std::array<PyObject*, kKinds> g_error_classes{};

size_t kind_index(solar::ErrorKind k) { return static_cast<size_t>(k); }

void raise_solar_error(const solar::Error& e) {
  PyObject* cls = g_error_classes[kind_index(e.kind())];
  PyObject* msg = PyUnicode_DecodeUTF8(e.what(), static_cast<Py_ssize_t>(std::strlen(e.what())), "replace");
  if (!cls || !msg) {
    Py_XDECREF(msg);
    PyErr_SetString(PyExc_RuntimeError, e.what());
    return;
  }
  PyObject* inst = PyObject_CallOneArg(cls, msg);
  Py_DECREF(msg);
  if (!inst) return;  // the constructor raised; let that propagate
  PyObject* kind = PyUnicode_FromString(solar::to_string(e.kind()));
  PyObject* where = PyUnicode_DecodeUTF8(e.where().data(), static_cast<Py_ssize_t>(e.where().size()), "replace");
  if (kind) PyObject_SetAttrString(inst, "kind", kind);
  if (where) PyObject_SetAttrString(inst, "where", where);
  Py_XDECREF(kind);
  Py_XDECREF(where);
  PyErr_Clear();  // attribute failures are not worth masking the real error
  PyErr_SetObject(cls, inst);
  Py_DECREF(inst);
}

void register_errors(nb::dict classes) {
  const std::array<std::pair<const char*, solar::ErrorKind>, kKinds> kinds{{
      {"io", solar::ErrorKind::Io},
      {"format", solar::ErrorKind::Format},
      {"corrupt", solar::ErrorKind::Corrupt},
      {"mismatch", solar::ErrorKind::Mismatch},
      {"invalid-input", solar::ErrorKind::InvalidInput},
      {"unsupported", solar::ErrorKind::Unsupported},
  }};
  for (const auto& [name, kind] : kinds) {
    if (!classes.contains(name)) throw std::invalid_argument(std::string("missing error class for '") + name + "'");
    nb::handle cls = classes[name];
    if (!PyType_Check(cls.ptr()) || !PyType_IsSubtype(reinterpret_cast<PyTypeObject*>(cls.ptr()),
                                                      reinterpret_cast<PyTypeObject*>(PyExc_Exception)))
      throw std::invalid_argument(std::string("error class for '") + name + "' is not an Exception type");
    PyObject*& slot = g_error_classes[kind_index(kind)];
    Py_XDECREF(slot);
    slot = cls.inc_ref().ptr();
  }
}

// ---- tensors ------------------------------------------------------------------------------

// Any C-contiguous CPU array; its element type is given separately (bf16 travels as int16).
using AnyArray = nb::ndarray<nb::ro, nb::c_contig, nb::device::cpu>;

std::vector<int64_t> shape_of(const AnyArray& a) {
  std::vector<int64_t> s(a.ndim());
  for (size_t i = 0; i < a.ndim(); ++i) s[i] = a.shape(i);
  return s;
}

// A Python array viewed as a tensor of `dtype_name`; checks that the byte sizes agree.
solar::TensorView view_of(const std::string& name, const std::string& dtype_name, const AnyArray& a,
                          const std::string& where) {
  const std::string tensor = where + ": tensor '" + name + "'";
  return solar::checked_view(solar::parse_dtype(dtype_name, tensor), shape_of(a), static_cast<const uint8_t*>(a.data()),
                             a.nbytes(), tensor);
}

// (name, dtype, array) triples from Python; the arrays stay referenced by the returned vector.
struct Borrowed {
  std::string name, dtype;
  AnyArray array;
};

std::vector<Borrowed> borrow(nb::handle seq) {
  std::vector<Borrowed> out;
  for (nb::handle item : seq) {
    nb::tuple t = nb::cast<nb::tuple>(item);
    if (t.size() != 3) throw std::invalid_argument("expected (name, dtype, array) triples");
    out.push_back({nb::cast<std::string>(t[0]), nb::cast<std::string>(t[1]), nb::cast<AnyArray>(t[2], false)});
  }
  return out;
}

// A core-owned byte buffer handed to Python without a copy (numpy uint8, freed with the array).
nb::ndarray<nb::numpy, uint8_t, nb::ndim<1>> give_bytes(std::vector<uint8_t>&& data) {
  auto* owned = new std::vector<uint8_t>(std::move(data));
  nb::capsule owner(owned, [](void* p) noexcept { delete static_cast<std::vector<uint8_t>*>(p); });
  return nb::ndarray<nb::numpy, uint8_t, nb::ndim<1>>(owned->data(), {owned->size()}, owner);
}

nb::list tensors_to_python(std::vector<std::pair<std::string, solar::Tensor>>&& tensors) {
  nb::list out;
  for (auto& [name, t] : tensors) {
    nb::list shape;
    for (int64_t d : t.shape) shape.append(d);
    out.append(nb::make_tuple(name, solar::dtype_name(t.dtype), nb::tuple(shape), give_bytes(std::move(t.data))));
  }
  return out;
}

// ---- wrapped objects ----------------------------------------------------------------------

// Where base weights come from: a checkpoint on disk, or arrays Python holds.
struct Base {
  std::unique_ptr<solar::WeightSource> source;
  std::vector<Borrowed> keep_alive;  // arrays the InMemoryWeights views point into

  static Base checkpoint(const std::string& path) {
    Base b;
    nb::gil_scoped_release nogil;
    b.source = std::make_unique<solar::Checkpoint>(path);
    return b;
  }
  static Base in_memory(nb::handle tensors, const std::string& label) {
    Base b;
    b.keep_alive = borrow(tensors);
    auto w = std::make_unique<solar::InMemoryWeights>(label);
    for (const Borrowed& t : b.keep_alive) w->add(t.name, view_of(t.name, t.dtype, t.array, label));
    b.source = std::move(w);
    return b;
  }
};

// A PEFT adapter as the core parsed it (tensors copied into core memory: adapters are small).
struct Adapter {
  solar::PeftAdapter adapter;

  static Adapter from_dir(const std::string& dir) {
    Adapter a;
    nb::gil_scoped_release nogil;
    a.adapter = solar::read_peft_adapter(dir);
    return a;
  }
  static Adapter from_tensors(const std::string& config_json, nb::handle tensors,
                              std::map<std::string, std::string> metadata, const std::string& where) {
    nlohmann::ordered_json config;  // its key order kept, as from a file
    try {
      config = nlohmann::ordered_json::parse(config_json);
    } catch (const nlohmann::json::exception& e) {
      throw solar::Error(solar::ErrorKind::Format, where, std::string("adapter config is not valid JSON: ") + e.what());
    }
    std::vector<std::pair<std::string, solar::Tensor>> owned;
    for (const Borrowed& t : borrow(tensors)) owned.emplace_back(t.name, view_of(t.name, t.dtype, t.array, where).copy());
    Adapter a;
    a.adapter = solar::make_peft_adapter(std::move(config), std::move(owned), std::move(metadata), where);
    return a;
  }
};

// A parsed container and its serialized bytes (what was written, or what was read).
struct Compressed {
  solar::Container container;
  std::vector<uint8_t> bytes;

  static Compressed from_bytes(nb::bytes data, const std::string& where) {
    Compressed c;
    const auto* p = reinterpret_cast<const uint8_t*>(data.c_str());
    c.bytes.assign(p, p + data.size());
    nb::gil_scoped_release nogil;
    c.container = solar::parse_container(c.bytes.data(), c.bytes.size(), where);
    return c;
  }
  static Compressed from_file(const std::string& path) {
    Compressed c;
    nb::gil_scoped_release nogil;
    c.bytes = solar::read_file(path);
    c.container = solar::parse_container(c.bytes.data(), c.bytes.size(), path);
    return c;
  }

  std::string layers_json() const {
    nlohmann::json out = nlohmann::json::array();
    for (const solar::LayerRecord& l : container.layers) {
      size_t payload = 0;
      for (const auto& b : l.encoded.blobs) payload += b.size();
      out.push_back({{"module", l.module},
                     {"base_key", l.base_key},
                     {"transpose_base", l.transpose_base},
                     {"shape", {l.shape.m, l.shape.n, l.shape.r}},
                     {"a_dtype", solar::dtype_name(l.a_dtype)},
                     {"b_dtype", solar::dtype_name(l.b_dtype)},
                     {"base_fingerprint", l.base_fingerprint},
                     {"mode", l.mode},
                     {"params", l.encoded.params},
                     {"payload_bytes", payload}});
    }
    return out.dump();
  }
};

// Options left as None keep the core's defaults (PaperOptions, CompressOptions), as in the CLI.
Compressed compress(const Adapter& adapter, const Base& base, const std::string& mode, std::optional<int64_t> pool_a,
                    std::optional<int64_t> pool_b, std::optional<int64_t> keep, std::optional<double> keep_fraction,
                    std::optional<int> bits, uint64_t seed, std::optional<double> noise, int threads,
                    std::optional<size_t> target_bytes, std::optional<double> target_error, const Base* calibration,
                    const std::string& proxy, std::optional<std::string> solver, std::optional<double> calibration_damping,
                    std::optional<double> balance, const std::string& quantiser, const std::string& passthrough,
                    const std::string& dora_magnitudes) {
  solar::CompressOptions o;
  o.passthrough = passthrough;
  o.dora_magnitudes = dora_magnitudes;
  o.balance = balance;
  o.quantiser = quantiser;
  o.calibration_damping = calibration_damping.value_or(o.calibration_damping);
  if (solver) o.paper.solver = solar::paper_solver_from_name(*solver);
  o.target_bytes = target_bytes;
  o.target_error = target_error;
  o.calibration = calibration ? calibration->source.get() : nullptr;
  o.proxy = proxy;
  o.mode = mode;
  o.seed = seed;
  o.threads = threads;
  o.paper.pool_a = pool_a.value_or(o.paper.pool_a);
  o.paper.pool_b = pool_b.value_or(o.paper.pool_b);
  if (keep) o.paper.keep_a = o.paper.keep_b = *keep;
  o.paper.keep_fraction = keep_fraction.value_or(o.paper.keep_fraction);
  o.paper.bits = bits.value_or(o.paper.bits);
  o.paper.noise = noise.value_or(o.paper.noise);
  Compressed c;
  nb::gil_scoped_release nogil;
  c.container = solar::compress_adapter(adapter.adapter, *base.source, o);
  c.bytes = solar::serialize_container(c.container);
  return c;
}

nb::tuple decompress(const Compressed& c, const Base& base, int threads) {
  std::vector<std::pair<std::string, solar::Tensor>> tensors;
  std::string config;
  {
    nb::gil_scoped_release nogil;
    const solar::PeftAdapter a = solar::decompress_container(c.container, *base.source, {threads, {}});
    tensors = solar::peft_tensors(a);
    config = a.config.dump();
  }
  nb::dict meta;
  for (const auto& [k, v] : c.container.file_metadata) meta[k.c_str()] = v;
  return nb::make_tuple(config, tensors_to_python(std::move(tensors)), meta);
}

void restore_to_dir(const Compressed& c, const Base& base, const std::string& out_dir, int threads) {
  nb::gil_scoped_release nogil;
  solar::write_peft_adapter(out_dir, solar::decompress_container(c.container, *base.source, {threads, {}}));
}

}  // namespace

NB_MODULE(_ext, m) {
  m.doc() = "Binding of the solar C++ core (use the `solar` package, not this module).";
  m.attr("__version__") = solar::version_string();
  m.attr("FORMAT_VERSION") = solar::kFormatVersion;

  nb::register_exception_translator([](const std::exception_ptr& p, void*) {
    try {
      std::rethrow_exception(p);
    } catch (const solar::Error& e) {
      raise_solar_error(e);
    }
  });
  m.def("_register_errors", &register_errors, "classes"_a,
        "Sets the exception class raised for each error kind (called by solar.errors).");

  nb::class_<Base>(m, "Base", "Base model weights: a checkpoint on disk, or arrays held by Python.")
      .def_static("checkpoint", &Base::checkpoint, "path"_a,
                  "A .safetensors file, a directory with model.safetensors, or a sharded checkpoint directory.")
      .def_static("in_memory", &Base::in_memory, "tensors"_a, "label"_a,
                  "(name, dtype, array) triples; the arrays are viewed, not copied, and kept alive.")
      .def_prop_ro("names", [](const Base& b) { return b.source->names(); })
      .def("describe", [](const Base& b) { return b.source->describe(); });

  nb::class_<Adapter>(m, "Adapter", "A PEFT LoRA adapter parsed and validated by the core.")
      .def_static("from_dir", &Adapter::from_dir, "dir"_a)
      .def_static("from_tensors", &Adapter::from_tensors, "config_json"_a, "tensors"_a, "metadata"_a, "where"_a)
      .def_prop_ro("modules", [](const Adapter& a) {
        std::vector<std::string> out;
        for (const auto& mod : a.adapter.modules) out.push_back(mod.path);
        return out;
      })
      .def_prop_ro("key_prefix", [](const Adapter& a) { return a.adapter.key_prefix; })
      .def("tensors", [](const Adapter& a) { return tensors_to_python(solar::peft_tensors(a.adapter)); });

  nb::class_<Compressed>(m, "Compressed", "A parsed .solar container and its bytes.")
      .def_static("from_bytes", &Compressed::from_bytes, "data"_a, "where"_a)
      .def_static("from_file", &Compressed::from_file, "path"_a)
      .def("to_bytes", [](const Compressed& c) { return nb::bytes(c.bytes.data(), c.bytes.size()); })
      .def_prop_ro("nbytes", [](const Compressed& c) { return c.bytes.size(); })
      .def("save", [](const Compressed& c, const std::string& path) {
        nb::gil_scoped_release nogil;
        solar::write_file_atomic(path, c.bytes);
      }, "path"_a)
      .def("report_json", [](const Compressed& c) { return solar::size_report(c.container, c.bytes).to_json().dump(); })
      .def("layers_json", &Compressed::layers_json)
      .def("peft_config_json", [](const Compressed& c) { return c.container.peft_config.dump(); })
      .def_prop_ro("seed", [](const Compressed& c) { return c.container.seed; })
      .def_prop_ro("producer", [](const Compressed& c) { return c.container.producer; })
      .def_prop_ro("key_prefix", [](const Compressed& c) { return c.container.key_prefix; })
      .def("stream_symbols", [](const Compressed& c) { return solar::stream_symbols(c.container); },
           "The integers of the shared streams, one list per layer (empty for layers outside them).")
      .def("with_stream_symbols", [](const Compressed& c, const std::vector<std::vector<int32_t>>& symbols) {
        Compressed out;
        nb::gil_scoped_release nogil;
        out.container = solar::with_stream_symbols(c.container, symbols);
        out.bytes = solar::serialize_container(out.container);
        return out;
      }, "symbols"_a, "A new container whose streams are re-coded from these symbols.");

  m.def("compress", &compress, "adapter"_a, "base"_a, "mode"_a, "pool_a"_a.none(), "pool_b"_a.none(), "keep"_a.none(),
        "keep_fraction"_a.none(), "bits"_a.none(), "seed"_a, "noise"_a.none(), "threads"_a, "target_bytes"_a.none(),
        "target_error"_a.none(), "calibration"_a.none(), "proxy"_a, "solver"_a.none(), "calibration_damping"_a.none(),
        "balance"_a.none(), "quantiser"_a, "passthrough"_a, "dora_magnitudes"_a);
  m.def("decompress", &decompress, "compressed"_a, "base"_a, "threads"_a,
        "Returns (config_json, [(key, dtype, shape, uint8 array)], file_metadata).");
  m.def("restore_to_dir", &restore_to_dir, "compressed"_a, "base"_a, "out_dir"_a, "threads"_a);

  m.def("step_of_code", &solar::step_of_code, "t"_a, "The quantiser step a step code 0..255 means (docs/FORMAT.md).");
  m.def("_philox_normals", [](uint64_t seed, uint32_t layer, uint32_t member, uint32_t stream, uint64_t first,
                              uint64_t count) {
    std::vector<float> out(count);
    solar::philox_normals(seed, layer, member, stream, first, count, out.data());
    return out;
  }, "seed"_a, "layer"_a, "member"_a, "stream"_a, "first"_a, "count"_a, "Test hook: the core's Philox normals.");
  m.def("_philox_indices", [](uint64_t seed, uint32_t layer, uint32_t member, uint32_t stream, uint32_t bound,
                              uint32_t count) {
    if (count > bound) throw std::invalid_argument("count must not exceed bound");
    std::vector<uint32_t> out(count);
    solar::philox_distinct_indices(seed, layer, member, stream, bound, count, out.data());
    return out;
  }, "seed"_a, "layer"_a, "member"_a, "stream"_a, "bound"_a, "count"_a, "Test hook: the core's Philox indices.");
}
