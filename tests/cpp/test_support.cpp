#include "test_support.hpp"

#include <stdlib.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <numbers>
#include <stdexcept>
#include <system_error>

namespace fs = std::filesystem;

namespace solar::test {
namespace {

uint64_t splitmix64(uint64_t& state) {
  uint64_t z = (state += 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

double unit(uint64_t& state) {  // (0, 1)
  return (static_cast<double>(splitmix64(state) >> 11) + 0.5) * (1.0 / 9007199254740992.0);
}

}  // namespace

TempDir::TempDir() {
  std::string templ = "/tmp/solar_test_XXXXXX";
  if (::mkdtemp(templ.data()) == nullptr) throw std::runtime_error("mkdtemp failed: " + std::string(std::strerror(errno)));
  path_ = templ;
}

TempDir::~TempDir() {
  std::error_code ec;
  fs::remove_all(path_, ec);
}

std::vector<std::string> TempDir::list(const std::string& sub) const {
  std::vector<std::string> out;
  const fs::path dir = sub.empty() ? fs::path(path_) : fs::path(path_) / sub;
  for (const auto& e : fs::directory_iterator(dir)) out.push_back(e.path().filename().string());
  std::sort(out.begin(), out.end());
  return out;
}

std::string shared_data_dir() {
  const std::string dir = std::string(SOLAR_SOURCE_DIR) + "/../shared/data";
  std::error_code ec;
  return fs::is_directory(dir, ec) ? dir : std::string();
}

std::vector<float> random_normals(size_t count, uint64_t seed, float stddev) {
  std::vector<float> out(count);
  uint64_t state = seed;
  for (size_t i = 0; i < count; i += 2) {
    const double u1 = unit(state), u2 = unit(state);
    const double rad = std::sqrt(-2.0 * std::log(u1));
    out[i] = static_cast<float>(stddev * rad * std::cos(2.0 * std::numbers::pi * u2));
    if (i + 1 < count) out[i + 1] = static_cast<float>(stddev * rad * std::sin(2.0 * std::numbers::pi * u2));
  }
  return out;
}

std::vector<float> random_uniform(size_t count, uint64_t seed, float lo, float hi) {
  std::vector<float> out(count);
  uint64_t state = seed;
  for (auto& v : out) v = static_cast<float>(lo + (hi - lo) * unit(state));
  return out;
}

Tensor random_tensor(std::vector<int64_t> shape, uint64_t seed, DType dtype, float stddev) {
  size_t n = 1;
  for (int64_t d : shape) n *= static_cast<size_t>(d);
  return Tensor::from_f32(random_normals(n, seed, stddev), std::move(shape), dtype);
}

Tensor random_bytes_tensor(std::vector<int64_t> shape, uint64_t seed, DType dtype) {
  Tensor t;
  t.dtype = dtype;
  t.shape = std::move(shape);
  t.data.resize(t.numel() * dtype_size(dtype));
  uint64_t state = seed;
  for (auto& b : t.data) b = static_cast<uint8_t>(splitmix64(state));
  return t;
}

void write_bytes(const std::string& path, const std::vector<uint8_t>& bytes) {
  std::ofstream f(path, std::ios::binary | std::ios::trunc);
  if (!f) throw std::runtime_error("cannot open " + path);
  f.write(reinterpret_cast<const char*>(bytes.data()), static_cast<std::streamsize>(bytes.size()));
  if (!f) throw std::runtime_error("cannot write " + path);
}

void write_text(const std::string& path, const std::string& text) {
  write_bytes(path, std::vector<uint8_t>(text.begin(), text.end()));
}

std::vector<uint8_t> read_bytes(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) throw std::runtime_error("cannot open " + path);
  return std::vector<uint8_t>(std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>());
}

}  // namespace solar::test
