// DoRA magnitudes coded as residuals from the base's row norms (docs/FORMAT.md, "DoRA magnitudes").
#include "solar/magnitude_coding.hpp"

#include <algorithm>
#include <cmath>

#include "solar/error.hpp"
#include "solar/range_coder.hpp"

namespace solar {
namespace {

constexpr const char* kMagnitudeSuffixes[] = {".lora_magnitude_vector", ".lora_magnitude_vector.weight"};
constexpr int kStepCodeBits = 8;
constexpr double kMaxLevel = 1 << 24;  // finer steps than this many levels a row are not offered
constexpr int kOctavesOffered = 14;   // how far below the coarsest useful step the points go (8 codes an octave)

template <class Coder>
void code_magnitude(Coder& e, const MagnitudeCode& code) {
  e.direct(static_cast<uint32_t>(code.step_code), kStepCodeBits);
  if (code.step_code == 0) return;
  IntModel model;
  for (int32_t v : code.q) model.encode(e, v);
}

}  // namespace

std::string dora_magnitude_module(const std::string& key, const std::string& key_prefix) {
  if (!key.starts_with(key_prefix)) return "";
  for (const char* suffix : kMagnitudeSuffixes) {
    const std::string s = suffix;
    if (key.size() > key_prefix.size() + s.size() && key.ends_with(s))
      return key.substr(key_prefix.size(), key.size() - key_prefix.size() - s.size());
  }
  return "";
}

std::vector<double> row_norms(const std::vector<float>& w, int64_t m, int64_t n) {
  std::vector<double> out(static_cast<size_t>(m));
  for (int64_t i = 0; i < m; ++i) {
    double s = 0;
    const float* row = w.data() + i * n;
    for (int64_t j = 0; j < n; ++j) s += static_cast<double>(row[j]) * static_cast<double>(row[j]);
    out[static_cast<size_t>(i)] = std::sqrt(s);
  }
  return out;
}

Tensor restore_magnitude(const std::vector<double>& norms, const MagnitudeCode& code, DType dtype,
                         const std::vector<int64_t>& shape) {
  std::vector<float> v(norms.size());
  const double step = step_of_code(code.step_code);
  for (size_t i = 0; i < norms.size(); ++i)
    v[i] = static_cast<float>(code.step_code == 0 ? norms[i] : norms[i] + step * static_cast<double>(code.q[i]));
  return Tensor::from_f32(v, shape, dtype);
}

std::vector<uint8_t> magnitude_blob(const MagnitudeCode& code) {
  RangeEncoder e;
  code_magnitude(e, code);
  return e.finish();
}

MagnitudeCode magnitude_from_blob(const std::vector<uint8_t>& blob, size_t rows, size_t layer, const std::string& where) {
  RangeDecoder d(blob.data(), blob.size());
  MagnitudeCode code;
  code.layer = layer;
  code.step_code = static_cast<int>(d.direct(kStepCodeBits));
  if (code.step_code == 0) return code;
  IntModel model;
  code.q.resize(rows);
  for (int32_t& v : code.q) {
    v = model.decode(d, where);
    if (std::fabs(static_cast<double>(v)) > kMaxLevel) throw Error(ErrorKind::Format, where, "magnitude residual out of range");
  }
  return code;
}

std::vector<Candidate> magnitude_candidates(const std::vector<double>& residual, const std::vector<double>& weights) {
  if (residual.size() != weights.size()) throw Error(ErrorKind::InvalidInput, "magnitude", "one weight per row");
  double energy = 0, peak = 0;
  for (size_t i = 0; i < residual.size(); ++i) {
    energy += weights[i] * residual[i] * residual[i];
    peak = std::max(peak, std::fabs(residual[i]));
  }
  std::vector<Candidate> out;
  BitCounter none;
  code_magnitude(none, MagnitudeCode{});
  out.push_back({energy, none.bytes(), {0}});
  if (!(peak > 0) || !std::isfinite(energy)) return out;
  // From the step that rounds every residual to zero but the largest, down kOctavesOffered octaves.
  const int top = std::clamp(static_cast<int>(std::ceil(8 * std::log2(2 * peak))) + 200, 1, 255);
  for (int t = top; t >= std::max(1, top - 8 * kOctavesOffered); --t) {
    if (peak / step_of_code(t) > kMaxLevel) break;
    Candidate c{0, 0, {t}};
    const MagnitudeCode code = magnitude_code(residual, c, 0);
    const double step = step_of_code(t);
    for (size_t i = 0; i < residual.size(); ++i) {
      const double e = residual[i] - step * static_cast<double>(code.q[i]);
      c.distortion += weights[i] * e * e;
    }
    BitCounter bits;
    code_magnitude(bits, code);
    c.bytes = bits.bytes();
    out.push_back(std::move(c));
  }
  return out;
}

MagnitudeCode magnitude_code(const std::vector<double>& residual, const Candidate& point, size_t layer) {
  MagnitudeCode code;
  code.layer = layer;
  code.step_code = point.setting.at(0);
  if (code.step_code == 0) return code;
  const double step = step_of_code(code.step_code);
  code.q.reserve(residual.size());
  for (double r : residual) code.q.push_back(static_cast<int32_t>(std::lround(r / step)));  // half away from zero
  return code;
}

}  // namespace solar
