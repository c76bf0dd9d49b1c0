#include "solar/pipeline.hpp"

#include <atomic>
#include <algorithm>
#include <chrono>
#include <cmath>
#include <exception>
#include <map>
#include <mutex>
#include <optional>
#include <string_view>
#include <thread>

#include "budget_planner.hpp"
#include "solar/magnitude_coding.hpp"
#include "solar/error.hpp"

#ifndef SOLAR_VERSION
#define SOLAR_VERSION "0.0.0"
#endif

namespace solar {
namespace {

std::unique_ptr<LayerCodec> make_encoder(const CompressOptions& o) {
  if (o.mode == "paper") return make_paper_codec(o.paper);
  if (o.quantiser != "auto" && o.quantiser != "uniform" && o.quantiser != "dependent")
    throw Error(ErrorKind::InvalidInput, "compress", "unknown quantiser '" + o.quantiser + "' (available: auto, uniform, dependent)");
  const bool dependent = o.quantiser == "dependent" || (o.quantiser == "auto" && o.calibration != nullptr);
  if (o.mode == "spectral") return make_spectral_codec(false, dependent);
  if (o.mode == "spectral-w") return make_spectral_codec(true, dependent);
  throw Error(ErrorKind::InvalidInput, "compress", "unknown mode '" + o.mode + "' (available: paper, spectral, spectral-w)");
}

int worker_count(int requested, size_t jobs) {
  int n = requested > 0 ? requested : static_cast<int>(std::thread::hardware_concurrency());
  n = std::max(1, n);
  return static_cast<int>(std::min<size_t>(static_cast<size_t>(n), std::max<size_t>(jobs, 1)));
}

// Runs job(i) for i in [0, count) on `threads` workers; rethrows the lowest-index failure, so
// errors are as deterministic as the output.
template <class Job>
void parallel_for(size_t count, int threads, Job&& job) {
  std::vector<std::exception_ptr> errors(count);
  std::atomic<size_t> next{0};
  auto worker = [&] {
    for (size_t i; (i = next.fetch_add(1)) < count;) {
      try {
        job(i);
      } catch (...) {
        errors[i] = std::current_exception();
      }
    }
  };
  const int n = worker_count(threads, count);
  std::vector<std::thread> pool;
  for (int t = 1; t < n; ++t) pool.emplace_back(worker);
  worker();
  for (auto& t : pool) t.join();
  for (auto& e : errors)
    if (e) std::rethrow_exception(e);
}

Matrix to_matrix(const Tensor& t) {
  const std::vector<float> v = t.to_f32();
  return Matrix::from_f32(v.data(), t.shape.at(0), t.shape.at(1));
}

Tensor to_tensor(const Matrix& m, DType dtype) {
  return Tensor::from_f32(m.to_f32(), {m.rows, m.cols}, dtype);
}

std::string dims(int64_t a, int64_t b) { return std::to_string(a) + "x" + std::to_string(b); }

class Reporter {
 public:
  explicit Reporter(const Progress& p) : p_(p) {}
  void operator()(const std::string& msg) {
    if (!p_) return;
    std::lock_guard<std::mutex> lock(mu_);
    p_(msg);
  }

 private:
  const Progress& p_;
  std::mutex mu_;
};

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

// "[done/total] module", a progress line's start. Built by appending: GCC 12 misreads
// "literal" + std::string&& as an overlapping memcpy (-Wrestrict, its bug 105329).
std::string progress(size_t done, size_t total, const std::string& module) {
  std::string line = "[";
  line += std::to_string(done);
  line += '/';
  line += std::to_string(total);
  line += "] ";
  line += module;
  return line;
}

// Adds a share of the mean diagonal, so that directions the calibration never saw still count.
Matrix damped(Matrix s, double damping) {
  double mean = 0;
  for (int64_t i = 0; i < s.rows; ++i) mean += s(i, i);
  mean /= static_cast<double>(std::max<int64_t>(1, s.rows));
  for (int64_t i = 0; i < s.rows; ++i) s(i, i) += damping * mean + 1e-30;
  return s;
}

// A rows x cols calibration tensor, checked finite; nullopt when the file has none under `key`.
std::optional<Matrix> calibration_tensor(const WeightSource& calib, const std::string& key, int64_t rows, int64_t cols,
                                         const std::string& shape_note = "") {
  if (!calib.contains(key)) return std::nullopt;
  const TensorView v = calib.get(key);
  if (v.shape.size() != 2 || v.shape[0] != rows || v.shape[1] != cols)
    throw Error(ErrorKind::Mismatch, calib.describe(), "'" + key + "' must be " + dims(rows, cols) + shape_note);
  const std::vector<float> f = v.to_f32();
  Matrix m = Matrix::from_f32(f.data(), rows, cols);
  for (double x : m.data)
    if (!std::isfinite(x)) throw Error(ErrorKind::InvalidInput, calib.describe(), "'" + key + "' has NaN or Inf");
  return m;
}

std::optional<Matrix> calibration_matrix(const WeightSource& calib, const std::string& key, int64_t dim, bool required,
                                         double damping) {
  std::optional<Matrix> s = calibration_tensor(calib, key, dim, dim);
  if (!s) {
    if (required) throw Error(ErrorKind::Mismatch, calib.describe(), "no calibration tensor '" + key + "'");
    return std::nullopt;
  }
  return damped(std::move(*s), damping);
}

// The gradient moment of a module's outputs, when the calibration file has one.
std::optional<Matrix> output_weighting(const CompressOptions& o, const std::string& module, const LayerRecord& l) {
  if (!o.calibration) return std::nullopt;
  return calibration_matrix(*o.calibration, module + ".output_grad_moment", l.shape.m, false, o.calibration_damping);
}

// The mean loss gradient with respect to a LoRA module's B A (its "<module>.update_gradient",
// out x in, times PEFT's scaling), when the calibration file has one.
std::optional<Matrix> update_gradient(const CompressOptions& o, const std::string& module, const LayerRecord& l,
                                      double scaling) {
  if (!o.calibration) return std::nullopt;
  std::optional<Matrix> g = calibration_tensor(*o.calibration, module + kUpdateGradientSuffix, l.shape.m, l.shape.n, " (out x in)");
  if (g)
    for (double& x : g->data) x *= scaling;
  return g;
}

// The loss's second derivative along the adapter (every LoRA update scaled by 1 + t, at t = 0),
// which sets how first-order costs compare with the metric's errors; required with gradients.
std::optional<double> loss_curvature(const CompressOptions& o) {
  if (!o.calibration) return std::nullopt;
  const WeightSource& calib = *o.calibration;
  const std::string_view suffix = kUpdateGradientSuffix;
  const std::vector<std::string> names = calib.names();
  if (std::none_of(names.begin(), names.end(), [&](const std::string& n) { return n.size() > suffix.size() && n.ends_with(suffix); }))
    return std::nullopt;
  if (!calib.contains(kLossCurvatureKey))
    throw Error(ErrorKind::Mismatch, calib.describe(), "has update gradients but no '" + std::string(kLossCurvatureKey) + "'");
  const TensorView v = calib.get(kLossCurvatureKey);
  const std::vector<float> f = v.to_f32();
  if (f.size() != 1 || !(std::isfinite(f[0]) && f[0] > 0))
    throw Error(ErrorKind::InvalidInput, calib.describe(), "'" + std::string(kLossCurvatureKey) + "' must be one positive number");
  return f[0];
}

// The n x n matrix that weighs a layer's input side (see CompressOptions).
std::optional<Matrix> input_weighting(const CompressOptions& o, const WeightSource& base, const std::string& module,
                                      const LayerRecord& l, bool transpose) {
  Matrix s;
  if (o.calibration) {
    return calibration_matrix(*o.calibration, module + ".input_moment", l.shape.n, true, o.calibration_damping);
  } else if (o.proxy == "base-gram") {
    const std::string key = resolve_base_key(base, module);
    int64_t m = 0, n = 0;
    const std::vector<float> w = canonical_base(base, key, transpose, &m, &n);
    const Matrix wm = Matrix::from_f32(w.data(), m, n);
    s = matmul(wm, wm, true);
  } else if (o.proxy.empty()) {
    return std::nullopt;
  } else {
    throw Error(ErrorKind::InvalidInput, "compress", "unknown proxy '" + o.proxy + "' (available: base-gram)");
  }
  return damped(std::move(s), o.calibration_damping);
}

// A layer's Pareto-optimal points, the drop-the-layer point first (the planner's convention).
std::vector<Candidate> pareto_front(std::vector<Candidate> all) {
  if (all.empty()) return all;
  std::vector<Candidate> front{std::move(all[0])};
  for (size_t i : pareto_indices(all)) front.push_back(std::move(all[i]));
  return front;
}

// Adds each point's first-order cost to its distortion, in the metric's units. The metric D
// approximates the loss increase as c D / 2 with one scale c for the whole adapter, measured by
// the loss's curvature along it: scaling every LoRA update by 1 + t moves the loss by
// (c t^2 / 2) sum_l E_l, E_l the layer's whole update in the metric, so c = curvature / sum_l E_l.
void price_first_order(std::vector<std::vector<Candidate>>& candidates, const std::vector<double>& energies,
                       size_t lora_count, const std::optional<double>& curvature) {
  if (!curvature) return;
  double total = 0;
  for (size_t i = 0; i < lora_count && i < energies.size(); ++i) total += energies[i];
  if (!(total > 0)) return;
  const double per_loss = 2.0 * total / *curvature;  // metric units per unit of loss
  for (auto& layer : candidates)
    for (Candidate& c : layer) c.distortion += per_loss * c.first_order;
}

// Chooses every layer's operating point for a planned mode and fills the container: the chosen
// points' symbols, in layer order, form one stream stored as the first layer's blob (format v2).
// Points are priced by estimate (as if each began a fresh stream); only the chosen ones are
// built. A byte target covers the whole file: the payload budget is corrected by what the
// serialised file misses the target by, shrinking until it fits, then growing into the slack.
// Items past the layers (v7: DoRA magnitudes) are planned with them; `apply_extra(k, point)` puts
// the point of extra item k into the container.
void plan_and_fill(Container& c, const LayerCodec& codec, const std::vector<std::vector<Candidate>>& candidates,
                   const std::vector<double>& energies, const CompressOptions& o,
                   const std::function<std::vector<int32_t>(size_t, const Candidate&)>& symbols_of,
                   const std::function<void(size_t, const Candidate&)>& apply_extra) {
  const size_t count = c.layers.size(), items = candidates.size();
  if (count == 0) return;
  std::vector<std::optional<size_t>> have(count);
  std::vector<std::vector<int32_t>> symbols(count);
  std::vector<StreamLayer> stream_layers;
  for (const auto& l : c.layers) stream_layers.push_back({l.shape, stream_group(l.module)});
  auto assign = [&](const std::vector<size_t>& pick) {
    std::vector<size_t> todo;
    for (size_t i = 0; i < count; ++i)
      if (have[i] != pick[i]) todo.push_back(i);
    parallel_for(todo.size(), o.threads, [&](size_t t) {
      const size_t i = todo[t];
      symbols[i] = symbols_of(i, candidates[i][pick[i]]);
      have[i] = pick[i];
    });
    for (auto& l : c.layers) l.encoded = EncodedLayer{nlohmann::json::object(), {}};
    c.layers[0].encoded.blobs = {codec.write_stream(stream_layers, symbols)};
    for (size_t k = count; k < items; ++k) apply_extra(k - count, candidates[k][pick[k]]);
  };
  auto distortion_of = [&](const std::vector<size_t>& pick) {
    double d = 0;
    for (size_t i = 0; i < items; ++i) d += candidates[i][pick[i]].distortion;
    return d;
  };
  Budget budget;
  if (o.target_bytes) {
    const size_t target = *o.target_bytes;
    assign(std::vector<size_t>(items, 0));
    const size_t smallest = serialize_container(c).size();
    if (target < smallest)
      throw Error(ErrorKind::InvalidInput, "compress",
                  "--target-bytes " + std::to_string(target) + " is below the smallest file for this adapter (" + std::to_string(smallest) + " bytes)");
    const size_t overhead = smallest - c.layers.front().encoded.blobs.front().size();
    // Dropping every layer fits (checked above): the fallback any better plan replaces.
    std::vector<size_t> best(items, 0);
    double best_distortion = distortion_of(best);
    std::map<std::vector<size_t>, long> sizes{{best, static_cast<long>(smallest)}};  // plans tried -> file size
    auto estimate = [&](const std::vector<size_t>& pick) {
      long n = 0;
      for (size_t i = 0; i < items; ++i) n += static_cast<long>(candidates[i][pick[i]].bytes);
      return n;
    };
    long payload = static_cast<long>(target - overhead);
    for (int attempt = 0; attempt < 32 && payload > 0; ++attempt) {
      budget.payload_bytes = static_cast<size_t>(payload);
      std::vector<size_t> pick;
      try {
        pick = plan_budget(candidates, budget);
      } catch (const Error&) {
        break;  // below every plan's estimate
      }
      if (const auto seen = sizes.find(pick); seen != sizes.end()) {
        if (seen->second <= static_cast<long>(target)) break;  // more room changes nothing
        payload = std::min(payload, estimate(pick)) - 1;        // force a smaller plan
        continue;
      }
      assign(pick);
      const long size = static_cast<long>(serialize_container(c).size());
      sizes[pick] = size;
      if (const double d = distortion_of(pick); size <= static_cast<long>(target) && d < best_distortion) {
        best = pick;
        best_distortion = d;
      }
      if (size == static_cast<long>(target)) break;
      payload += static_cast<long>(target) - size;
    }
    assign(best);
    return;
  }
  const double e = o.target_error.value_or(kDefaultTargetError);
  if (!(e >= 0)) throw Error(ErrorKind::InvalidInput, "compress", "target error must be non-negative");
  double total = 0;
  for (double v : energies) total += v;
  budget.max_distortion = e * e * total;
  assign(plan_budget(candidates, budget));
}

// The base tensor `key` (m x n after the layer's transpose) must fit the layer's update.
void require_base_shape(const WeightSource& base, const LayerRecord& l, const std::string& key, int64_t m, int64_t n) {
  if (m != l.shape.m || n != l.shape.n)
    throw Error(ErrorKind::Mismatch, base.describe(),
                "module " + l.module + ": LoRA update is " + dims(l.shape.m, l.shape.n) + " (out x in) but base tensor '" + key +
                    "' is " + dims(m, n) + (l.transpose_base ? " after the fan_in_fan_out transpose" : ""));
}

// The canonical W a layer record names (its `base`, `transpose` and `fingerprint`), checked
// against the record; `user` says what needs it, for the error when the base lacks it.
std::vector<float> recorded_base(const WeightSource& base, const LayerRecord& l, const std::string& user) {
  std::string key = l.base_key;
  if (!base.contains(key)) {
    // The same weights may be named differently here than where the file was made (a checkpoint
    // without the model's wrapper prefix vs. the model's own state dict): look the module up as
    // compress does. The fingerprint check below still guards against another W.
    try {
      key = resolve_base_key(base, l.module);
    } catch (const Error&) {
      throw Error(ErrorKind::Mismatch, base.describe(), "no tensor '" + l.base_key + "' (needed by " + user + ")");
    }
  }
  int64_t m = 0, n = 0;
  std::vector<float> w = canonical_base(base, key, l.transpose_base, &m, &n);
  if (m != l.shape.m || n != l.shape.n)
    throw Error(ErrorKind::Mismatch, base.describe(), "tensor '" + key + "' is " + dims(m, n) + " but the file was built against " + dims(l.shape.m, l.shape.n));
  if (fingerprint_f32(w) != l.base_fingerprint)
    throw Error(ErrorKind::Mismatch, base.describe(), "tensor '" + key + "' differs from the base the file was built against (wrong base model?)");
  return w;
}

// A DoRA magnitude coded against its module's W (format v7): its residual from W's row norms,
// what a unit error in each row costs in the plan's metric, and its operating points.
struct MagnitudeItem {
  std::string key;
  size_t layer = 0;
  std::vector<double> norms, residual;
  std::vector<Candidate> candidates;
};

// The cost of a unit error in each row's magnitude. DoRA's weight is m_i V_i / ||V_i|| (V = W +
// scaling B A), so a magnitude error e_i moves row i by e_i along its unit direction, about W's:
// e_i^2 in Frobenius error of the weight (the layers' metric, scaling^2 |B A error|^2); with
// statistics, tr(G E S E^T) for E = diag(e) W^ gives G_ii (w^_i^T S w^_i) e_i^2 on its diagonal,
// whose cross terms a uniform quantiser's independent errors average away.
std::vector<double> magnitude_weights(const std::vector<float>& w, int64_t m, int64_t n, const std::vector<double>& norms,
                                      const std::optional<Matrix>& input_moment, const std::optional<Matrix>& output_moment) {
  std::vector<double> out(static_cast<size_t>(m), 1.0);
  if (input_moment) {
    Matrix unit = Matrix::from_f32(w.data(), m, n);
    for (int64_t i = 0; i < m; ++i) {
      const double norm = norms[static_cast<size_t>(i)];
      for (int64_t j = 0; j < n; ++j) unit(i, j) = norm > 0 ? unit(i, j) / norm : 0.0;
    }
    const Matrix us = matmul(unit, *input_moment);
    for (int64_t i = 0; i < m; ++i) {
      double d = 0;
      for (int64_t j = 0; j < n; ++j) d += us(i, j) * unit(i, j);
      if (norms[static_cast<size_t>(i)] > 0) out[static_cast<size_t>(i)] = d;
    }
  }
  if (output_moment)
    for (int64_t i = 0; i < m; ++i) out[static_cast<size_t>(i)] *= (*output_moment)(i, i);
  return out;
}

// The DoRA magnitudes to code against their module's W (v7), with their operating points; the
// others stay exact (with a warning when the base lacks their W). Sets the layer records' base.
std::vector<MagnitudeItem> magnitude_items(Container& c, const std::vector<LoraModule>& modules, size_t lora_count,
                                           const WeightSource& base, const CompressOptions& options, bool planned) {
  if (options.dora_magnitudes != "coded" && options.dora_magnitudes != "exact")
    throw Error(ErrorKind::InvalidInput, "compress", "unknown DoRA magnitude coding '" + options.dora_magnitudes + "' (available: coded, exact)");
  std::vector<MagnitudeItem> magnitudes;
  if (options.dora_magnitudes != "coded") return magnitudes;
  if (!planned) {
    const auto is_magnitude = [&](const auto& entry) { return !dora_magnitude_module(entry.first, c.key_prefix).empty(); };
    if (options.warn && std::any_of(c.passthrough.begin(), c.passthrough.end(), is_magnitude))
      options.warn("DoRA magnitudes stored exactly: mode " + options.mode + " does not plan them (the spectral modes code them against the base)");
    return magnitudes;
  }
  std::vector<std::string> exact_magnitudes;
  for (const auto& [key, t] : c.passthrough) {
    const std::string path = dora_magnitude_module(key, c.key_prefix);
    if (path.empty() || c.passthrough_layers.contains(key) || c.passthrough_int8.contains(key)) continue;
    size_t li = 0;
    while (li < lora_count && modules[li].path != path) ++li;
    if (li == lora_count || !is_float(t.dtype) || t.shape.size() != 1 || t.shape[0] != c.layers[li].shape.m) continue;
    const std::vector<float> m = t.to_f32();
    if (!std::all_of(m.begin(), m.end(), [](float x) { return std::isfinite(x); })) continue;
    LayerRecord& l = c.layers[li];
    std::string base_key;
    try {
      base_key = resolve_base_key(base, path);
    } catch (const Error&) {
      exact_magnitudes.push_back(key);
      continue;
    }
    int64_t rows = 0, cols = 0;
    const std::vector<float> w = canonical_base(base, base_key, l.transpose_base, &rows, &cols);
    require_base_shape(base, l, base_key, rows, cols);
    l.base_key = base_key;
    l.base_fingerprint = fingerprint_f32(w);
    MagnitudeItem item{key, li, row_norms(w, rows, cols), {}, {}};
    for (size_t i = 0; i < m.size(); ++i) item.residual.push_back(static_cast<double>(m[i]) - item.norms[i]);
    const std::optional<Matrix> sig = input_weighting(options, base, path, l, l.transpose_base);
    const std::optional<Matrix> gm = output_weighting(options, path, l);
    item.candidates = magnitude_candidates(item.residual, magnitude_weights(w, rows, cols, item.norms, sig, gm));
    magnitudes.push_back(std::move(item));
  }
  if (!exact_magnitudes.empty() && options.warn)
    options.warn(std::to_string(exact_magnitudes.size()) + " DoRA magnitude vector(s) stored exactly (e.g. " + exact_magnitudes.front() +
                 "): the base has no weight for their modules; give the base model to code them with the layers");
  return magnitudes;
}

}  // namespace

std::string version_string() { return SOLAR_VERSION; }

std::vector<float> canonical_base(const WeightSource& base, const std::string& key, bool transpose,
                                  int64_t* m, int64_t* n) {
  const TensorView v = base.get(key);
  if (v.shape.size() != 2 || !is_float(v.dtype))
    throw Error(ErrorKind::Mismatch, base.describe(), "tensor '" + key + "' is not a 2-D floating-point weight");
  std::vector<float> w = v.to_f32();
  int64_t rows = v.shape[0], cols = v.shape[1];
  if (transpose) {
    std::vector<float> t(w.size());
    for (int64_t i = 0; i < rows; ++i)
      for (int64_t j = 0; j < cols; ++j) t[static_cast<size_t>(j * rows + i)] = w[static_cast<size_t>(i * cols + j)];
    w.swap(t);
    std::swap(rows, cols);
  }
  for (float x : w)
    if (!std::isfinite(x)) throw Error(ErrorKind::InvalidInput, base.describe(), "tensor '" + key + "' contains NaN or Inf");
  *m = rows;
  *n = cols;
  return w;
}

Container compress_adapter(const PeftAdapter& adapter, const WeightSource& base, const CompressOptions& options) {
  pin_blas_single_thread();
  const std::unique_ptr<LayerCodec> codec = make_encoder(options);
  const bool metric_weighted = options.calibration != nullptr || !options.proxy.empty();
  const double balance = options.balance.value_or(metric_weighted ? 0.0 : kFrobeniusBalance);
  if (!(balance >= 0 && balance <= 4)) throw Error(ErrorKind::InvalidInput, "compress", "balance must be between 0 and 4");
  const bool transpose = adapter.fan_in_fan_out();
  Container c;
  c.seed = options.seed;
  c.producer = "solar " + version_string();
  c.peft_config = adapter.config;
  c.key_prefix = adapter.key_prefix;
  c.file_metadata = adapter.file_metadata;
  c.passthrough = adapter.passthrough;
  // The layers to code: the LoRA modules, then (format v6) the heads coded as layers.
  std::vector<LoraModule> modules = adapter.modules;
  const size_t lora_count = modules.size();
  if (options.passthrough == "int8" || options.passthrough == "spectral") {
    if (options.passthrough == "spectral" && options.mode != "spectral")
      throw Error(ErrorKind::InvalidInput, "compress", "--passthrough spectral needs mode spectral (not " + options.mode + ")");
    for (auto& [key, t] : c.passthrough) {
      std::optional<LoraModule> head;
      if (options.passthrough == "spectral") head = passthrough_as_layer(key, t, adapter.key_prefix);
      if (head) {
        // Statistics are per module: without them for this tensor its errors could not be
        // weighed against the LoRA layers', so it falls back to int8 rows (so with the base-gram
        // proxy, which has no W for a head).
        if (options.calibration ? options.calibration->contains(head->path + ".input_moment") : options.proxy.empty()) {
          c.passthrough_layers.emplace(key, modules.size());
          modules.push_back(std::move(*head));
          t.data.clear();  // restored from the stream (Container::passthrough_layers)
          continue;
        }
        if (options.warn)
          options.warn("no " + std::string(options.calibration ? "calibration statistics" : "base weight") + " for '" + head->path +
                       "' (" + key + "): stored as int8 rows instead of coded with the layers");
      }
      std::optional<Int8Rows> q = quantize_int8_rows(t);
      if (!q) continue;
      t = dequantize_int8_rows(*q, t.dtype, t.shape);  // what the receiver restores
      c.passthrough_int8.emplace(key, std::move(*q));
    }
  } else if (options.passthrough != "exact") {
    throw Error(ErrorKind::InvalidInput, "compress",
                "unknown passthrough coding '" + options.passthrough + "' (available: exact, int8, spectral)");
  }
  c.layers.resize(modules.size());

  // Resolve and check every module against the base before any heavy work.
  for (size_t i = 0; i < modules.size(); ++i) {
    const LoraModule& mod = modules[i];
    LayerRecord& l = c.layers[i];
    l.module = mod.path;
    l.shape = {mod.B.shape[0], mod.A.shape[1], mod.rank};
    l.a_dtype = mod.A.dtype;
    l.b_dtype = mod.B.dtype;
    l.mode = codec->mode();
    l.transpose_base = transpose && i < lora_count;
    if (!codec->needs_base() || i >= lora_count) continue;
    l.base_key = resolve_base_key(base, mod.path);
    const TensorView v = base.get(l.base_key);
    if (v.shape.size() != 2)
      throw Error(ErrorKind::Mismatch, base.describe(), "tensor '" + l.base_key + "' for module " + mod.path + " is not 2-D");
    require_base_shape(base, l, l.base_key, transpose ? v.shape[1] : v.shape[0], transpose ? v.shape[0] : v.shape[1]);
  }

  std::vector<MagnitudeItem> magnitudes = magnitude_items(c, modules, lora_count, base, options, codec->plans_budget());

  Reporter report(options.progress);
  Reporter warn_once(options.warn);
  const std::optional<double> curvature = loss_curvature(options);
  // A layer's context: its base weight (if the mode needs it), weighting and statistics. A planned
  // layer builds it twice (to list its points, then to rebuild the chosen one): keeping every
  // layer's W, statistics and factorisations between the passes would cost O(m² + n²) memory per
  // layer, which large adapters cannot afford.
  // `listing`: for candidates() (the rebuild of a chosen point needs no update gradient).
  auto context = [&](size_t i, bool listing) {
    const LoraModule& mod = modules[i];
    LayerRecord& l = c.layers[i];
    std::function<Matrix()> load;
    if (codec->needs_base()) {
      int64_t m = 0, n = 0;
      std::vector<float> w = canonical_base(base, l.base_key, transpose, &m, &n);
      l.base_fingerprint = fingerprint_f32(w);
      load = [w = std::move(w), m, n] { return Matrix::from_f32(w.data(), m, n); };
    }
    LayerContext ctx(options.seed, static_cast<uint32_t>(i), l.shape, std::move(load));
    ctx.weight = mod.scaling * mod.scaling;
    if (options.warn) ctx.warn = [&](const std::string& m) { warn_once(m); };
    if (codec->plans_budget()) {
      ctx.input_moment = input_weighting(options, base, mod.path, l, l.transpose_base);
      ctx.output_moment = output_weighting(options, mod.path, l);
      if (listing && i < lora_count) ctx.update_gradient = update_gradient(options, mod.path, l, mod.scaling);
    }
    return ctx;
  };
  auto factors = [&](size_t i) { return Factors{to_matrix(modules[i].A), to_matrix(modules[i].B)}; };

  std::atomic<size_t> done{0};
  std::vector<std::vector<Candidate>> candidates(c.layers.size());
  std::vector<double> energies(c.layers.size(), 0.0);
  parallel_for(c.layers.size(), options.threads, [&](size_t i) {
    const auto t0 = std::chrono::steady_clock::now();
    const LayerRecord& l = c.layers[i];
    const LayerContext ctx = context(i, true);
    const Factors f = factors(i);
    if (codec->plans_budget()) {
      // Pruned to the Pareto front once first-order costs are priced in (below).
      candidates[i] = codec->candidates(ctx, f);
      // Candidate 0 drops the layer: its distortion is the layer's whole update in the metric.
      energies[i] = candidates[i].empty() ? 0.0 : candidates[i].front().distortion;
    } else {
      c.layers[i].encoded = codec->encode(ctx, f);
    }
    report(progress(++done, c.layers.size(), l.module) + " (" + dims(l.shape.m, l.shape.n) + ", r=" + std::to_string(l.shape.r) +
           ") " + (codec->plans_budget() ? "analysed" : "encoded") + " in " + std::to_string(seconds_since(t0)).substr(0, 5) + " s");
  });
  if (codec->plans_budget()) {
    price_first_order(candidates, energies, lora_count, curvature);
    for (auto& layer : candidates) layer = pareto_front(std::move(layer));
    // A DoRA module's magnitude shares its layer's weight in the balance: their errors are one
    // update's, measured against both parts' energy.
    std::vector<double> module_energy = energies;
    for (const MagnitudeItem& item : magnitudes) module_energy[item.layer] += item.candidates.front().distortion;
    const std::vector<double> scales = balance_scales(module_energy, balance);
    for (size_t l = 0; l < candidates.size(); ++l) {
      for (Candidate& p : candidates[l]) p.distortion *= scales[l];
      energies[l] *= scales[l];
    }
    for (MagnitudeItem& item : magnitudes) {
      std::vector<Candidate> front = pareto_front(std::move(item.candidates));
      for (Candidate& p : front) p.distortion *= scales[item.layer];
      energies.push_back(front.front().distortion);
      candidates.push_back(std::move(front));
    }
    plan_and_fill(
        c, *codec, candidates, energies, options,
        [&](size_t i, const Candidate& pick) { return codec->candidate_symbols(context(i, false), factors(i), pick); },
        [&](size_t k, const Candidate& pick) {
          const MagnitudeItem& item = magnitudes[k];
          c.passthrough_magnitude[item.key] = magnitude_code(item.residual, pick, item.layer);
        });
    for (const MagnitudeItem& item : magnitudes)  // the container holds its tensors as restored
      for (auto& [key, t] : c.passthrough)
        if (key == item.key) t = restore_magnitude(item.norms, c.passthrough_magnitude.at(key), t.dtype, t.shape);
  }
  return c;
}

PeftAdapter decompress_container(const Container& c, const WeightSource& base, const DecompressOptions& options) {
  pin_blas_single_thread();
  PeftAdapter out;
  out.config = c.peft_config;
  out.key_prefix = c.key_prefix;
  out.file_metadata = c.file_metadata;
  out.passthrough = c.passthrough;
  // Format v6: layers that restore a passthrough tensor (by position in out.passthrough).
  std::vector<std::optional<size_t>> restores(c.layers.size());
  for (size_t p = 0; p < c.passthrough.size(); ++p)
    if (const auto it = c.passthrough_layers.find(c.passthrough[p].first); it != c.passthrough_layers.end()) restores.at(it->second) = p;
  std::vector<LoraModule> modules(c.layers.size());
  Reporter report(options.progress);
  // Format v2: the layers of a planned mode share one stream, stored as the blob of the mode's
  // first layer. Read it (sequentially: the models carry over) before the per-layer work.
  std::vector<std::optional<std::vector<int32_t>>> streamed(c.layers.size());
  for (ModeStream& s : read_streams(c))
    for (size_t k = 0; k < s.layers.size(); ++k) streamed[s.layers[k]] = std::move(s.symbols[k]);
  std::atomic<size_t> done{0};
  parallel_for(c.layers.size(), options.threads, [&](size_t i) {
    const LayerRecord& l = c.layers[i];
    const std::unique_ptr<LayerCodec> codec = make_decoder(l.mode, "layer " + l.module);
    std::function<Matrix()> load;
    if (codec->needs_base()) {
      std::vector<float> w = recorded_base(base, l, "module " + l.module);
      load = [w = std::move(w), m = l.shape.m, n = l.shape.n] { return Matrix::from_f32(w.data(), m, n); };
    }
    LayerContext ctx(c.seed, static_cast<uint32_t>(i), l.shape, std::move(load));
    Factors f = streamed[i] ? codec->decode_symbols(ctx, *streamed[i]) : codec->decode(ctx, l.encoded);
    if (f.A.rows != l.shape.r || f.A.cols != l.shape.n || f.B.rows != l.shape.m || f.B.cols != l.shape.r)
      throw Error(ErrorKind::Format, "layer " + l.module, "decoded factors have the wrong shape");
    if (restores[i]) {
      Tensor& t = out.passthrough[*restores[i]].second;
      t = layer_product(f.B, f.A, t.dtype, t.shape);
    } else {
      LoraModule& mod = modules[i];
      mod.path = l.module;
      mod.rank = l.shape.r;
      set_lora_scaling(out.config, mod, "peft_config");
      mod.A = to_tensor(f.A, l.a_dtype);
      mod.B = to_tensor(f.B, l.b_dtype);
    }
    report(progress(++done, c.layers.size(), l.module) + " restored");
  });
  for (size_t i = 0; i < modules.size(); ++i)
    if (!restores[i]) out.modules.push_back(std::move(modules[i]));
  // v7: DoRA magnitudes, from the row norms of their layer's W.
  for (auto& [key, t] : out.passthrough)
    if (const auto code = c.passthrough_magnitude.find(key); code != c.passthrough_magnitude.end()) {
      const LayerRecord& l = c.layers.at(code->second.layer);
      const std::vector<float> w = recorded_base(base, l, "the DoRA magnitude of module " + l.module);
      t = restore_magnitude(row_norms(w, l.shape.m, l.shape.n), code->second, t.dtype, t.shape);
    }
  return out;
}

double relative_delta_error(const Tensor& a, const Tensor& b, const Tensor& a2, const Tensor& b2) {
  const Matrix d1 = matmul(to_matrix(b), to_matrix(a));
  const Matrix d2 = matmul(to_matrix(b2), to_matrix(a2));
  if (d1.rows != d2.rows || d1.cols != d2.cols) throw Error(ErrorKind::Mismatch, "relative_delta_error", "shapes differ");
  long double num = 0, den = 0;
  for (size_t i = 0; i < d1.data.size(); ++i) {
    const long double e = static_cast<long double>(d1.data[i]) - d2.data[i];
    num += e * e;
    den += static_cast<long double>(d1.data[i]) * d1.data[i];
  }
  if (den == 0) return num == 0 ? 0.0 : INFINITY;
  return static_cast<double>(std::sqrt(num / den));
}

}  // namespace solar
