// int8-per-row coding of passthrough tensors (docs/FORMAT.md, "Passthrough coding").
#include "solar/passthrough_coding.hpp"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "solar/error.hpp"

namespace solar {
namespace {

size_t row_count(const std::vector<int64_t>& shape) { return shape.empty() ? 1 : static_cast<size_t>(shape[0]); }

// The values of a tensor either lossy passthrough coding takes: floating point, 2 or more
// dimensions, not empty, all finite; nullopt for any other.
std::optional<std::vector<float>> codable_values(const Tensor& t) {
  if (!is_float(t.dtype) || t.shape.size() < 2 || t.numel() == 0) return std::nullopt;
  std::vector<float> v = t.to_f32();
  if (!std::all_of(v.begin(), v.end(), [](float x) { return std::isfinite(x); })) return std::nullopt;
  return v;
}

}  // namespace

std::optional<Int8Rows> quantize_int8_rows(const Tensor& t) {
  const std::optional<std::vector<float>> values = codable_values(t);
  if (!values) return std::nullopt;
  const std::vector<float>& v = *values;
  const size_t rows = row_count(t.shape), cols = rows ? v.size() / rows : 0;
  Int8Rows q;
  q.scales.resize(rows);
  q.values.resize(v.size());
  for (size_t i = 0; i < rows; ++i) {
    const float* row = v.data() + i * cols;
    float peak = 0;
    for (size_t j = 0; j < cols; ++j) peak = std::max(peak, std::fabs(row[j]));
    const float s = peak / 127.0f;
    q.scales[i] = s;
    for (size_t j = 0; j < cols; ++j)
      q.values[i * cols + j] = s > 0 ? static_cast<int8_t>(std::clamp(std::lround(row[j] / s), -127L, 127L)) : 0;
  }
  return q;
}

Tensor dequantize_int8_rows(const Int8Rows& q, DType dtype, const std::vector<int64_t>& shape) {
  const size_t rows = q.scales.size(), cols = rows ? q.values.size() / rows : 0;
  std::vector<float> v(q.values.size());
  for (size_t i = 0; i < rows; ++i)
    for (size_t j = 0; j < cols; ++j) v[i * cols + j] = static_cast<float>(q.values[i * cols + j]) * q.scales[i];
  return Tensor::from_f32(v, shape, dtype);
}

std::vector<uint8_t> int8_rows_blob(const Int8Rows& q) {
  std::vector<uint8_t> out(4 * q.scales.size() + q.values.size());
  std::memcpy(out.data(), q.scales.data(), 4 * q.scales.size());  // little-endian host (container.cpp)
  std::memcpy(out.data() + 4 * q.scales.size(), q.values.data(), q.values.size());
  return out;
}

Int8Rows int8_rows_from_blob(const std::vector<uint8_t>& blob, const std::vector<int64_t>& shape, const std::string& where) {
  if (shape.size() < 2) throw Error(ErrorKind::Format, where, "int8 coding needs a tensor of at least 2 dimensions");
  uint64_t numel = 1;
  for (int64_t d : shape) numel *= static_cast<uint64_t>(d);
  const size_t rows = row_count(shape);
  if (blob.size() != 4 * rows + numel) throw Error(ErrorKind::Format, where, "int8 blob size does not match the tensor's shape");
  Int8Rows q;
  q.scales.resize(rows);
  q.values.resize(numel);
  std::memcpy(q.scales.data(), blob.data(), 4 * rows);
  std::memcpy(q.values.data(), blob.data() + 4 * rows, numel);
  for (float s : q.scales)
    if (!std::isfinite(s) || s < 0) throw Error(ErrorKind::Format, where, "int8 row scale is negative or not finite");
  if (std::any_of(q.values.begin(), q.values.end(), [](int8_t x) { return x == -128; }))
    throw Error(ErrorKind::Format, where, "int8 value -128 is outside -127..127");
  return q;
}

std::optional<LoraModule> passthrough_as_layer(const std::string& key, const Tensor& t, const std::string& key_prefix) {
  if (t.shape.size() < 2 || t.numel() == 0) return std::nullopt;
  const int64_t rows = static_cast<int64_t>(row_count(t.shape)), cols = static_cast<int64_t>(t.numel()) / rows;
  if (std::min(rows, cols) > kMaxLayerCodedRank) return std::nullopt;
  std::optional<std::vector<float>> values = codable_values(t);
  if (!values) return std::nullopt;
  LoraModule mod;
  mod.path = key.starts_with(key_prefix) ? key.substr(key_prefix.size()) : key;
  if (mod.path.ends_with(".weight")) mod.path.resize(mod.path.size() - 7);
  mod.rank = std::min(rows, cols);
  mod.alpha = static_cast<double>(mod.rank);
  mod.scaling = 1.0;
  const Tensor whole = Tensor::from_f32(*values, {rows, cols}, DType::F32);
  std::vector<float> eye(static_cast<size_t>(mod.rank * mod.rank), 0.0f);
  for (int64_t i = 0; i < mod.rank; ++i) eye[static_cast<size_t>(i * mod.rank + i)] = 1.0f;
  const Tensor identity = Tensor::from_f32(eye, {mod.rank, mod.rank}, DType::F32);
  mod.A = rows <= cols ? whole : identity;
  mod.B = rows <= cols ? identity : whole;
  return mod;
}

Tensor layer_product(const Matrix& b, const Matrix& a, DType dtype, const std::vector<int64_t>& shape) {
  const std::vector<float> bf = b.to_f32(), af = a.to_f32();
  const int64_t m = b.rows, k = b.cols, n = a.cols;
  std::vector<double> acc(static_cast<size_t>(m * n), 0.0);
  for (int64_t j = 0; j < k; ++j)  // j outermost: every element sums its products in increasing j
    for (int64_t i = 0; i < m; ++i) {
      const double bij = bf[static_cast<size_t>(i * k + j)];
      double* row = acc.data() + i * n;
      const float* arow = af.data() + j * n;
      for (int64_t c = 0; c < n; ++c) row[c] += bij * static_cast<double>(arow[c]);
    }
  std::vector<float> out(acc.size());
  for (size_t i = 0; i < acc.size(); ++i) out[i] = static_cast<float>(acc[i]);
  return Tensor::from_f32(out, shape, dtype);
}

}  // namespace solar
