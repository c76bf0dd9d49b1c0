// Shared helpers for the C++ tests.
#pragma once
#include <cstdint>
#include <iterator>
#include <random>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include <gtest/gtest.h>

#include "solar/dtype.hpp"
#include "solar/error.hpp"

namespace solar::test {

// A fresh directory under /tmp, removed (recursively) when the object goes away.
class TempDir {
 public:
  TempDir();
  ~TempDir();
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  const std::string& path() const { return path_; }
  // path() + "/" + name
  std::string file(const std::string& name) const { return path_ + "/" + name; }
  // Names of the entries directly inside `dir` (default: this directory), sorted.
  std::vector<std::string> list(const std::string& sub = "") const;

 private:
  std::string path_;
};

// SOLAR_SOURCE_DIR "/../shared/data" if that directory exists, else "" (tests then GTEST_SKIP).
std::string shared_data_dir();

// Deterministic pseudo-random values (splitmix64 + Box-Muller), independent of the platform's <random>.
std::vector<float> random_normals(size_t count, uint64_t seed, float stddev = 1.0f);
std::vector<float> random_uniform(size_t count, uint64_t seed, float lo = -1.0f, float hi = 1.0f);
// A tensor of the given shape filled with N(0, stddev^2), converted to `dtype` (a float dtype).
Tensor random_tensor(std::vector<int64_t> shape, uint64_t seed, DType dtype = DType::F32, float stddev = 1.0f);
// A tensor of the given dtype and shape with random bytes (any dtype; for byte-exact round trips).
Tensor random_bytes_tensor(std::vector<int64_t> shape, uint64_t seed, DType dtype);

// One random mutation of one value of `j` (never the root itself), for structured fuzzing of
// JSON-described inputs: numbers pushed to edges and off by one, strings and types swapped,
// array elements dropped, added or swapped, object members dropped.
template <class Json>
void mutate_json(Json& j, std::mt19937_64& rng) {
  std::vector<typename Json::json_pointer> all;
  auto collect = [&](auto&& self, const Json& v, const typename Json::json_pointer& at) -> void {
    all.push_back(at);
    if (v.is_object())
      for (auto it = v.begin(); it != v.end(); ++it) self(self, it.value(), at / it.key());
    else if (v.is_array())
      for (size_t i = 0; i < v.size(); ++i) self(self, v[i], at / i);
  };
  collect(collect, j, typename Json::json_pointer());
  if (all.size() < 2) return;
  Json& v = j[all[1 + rng() % (all.size() - 1)]];
  auto pick = [&](size_t n) { return static_cast<size_t>(rng() % n); };
  if (v.is_number()) {
    const double x = v.template get<double>();
    const Json choices[] = {0, -1, 1, x + 1, x - 1, 2 * x, 1ll << 31, 1ll << 40, -(1ll << 40), 1e300, 0.5, "7"};
    v = choices[pick(std::size(choices))];
  } else if (v.is_string()) {
    const Json choices[] = {"", "paper", "spectral", "F16", "BF16", "I64", "LORA", "x", std::string(300, 'a'), 3};
    v = choices[pick(std::size(choices))];
  } else if (v.is_array()) {
    switch (pick(4)) {
      case 0: if (!v.empty()) v.erase(v.size() - 1); break;
      case 1: v.push_back(v.empty() ? Json(1) : v[0]); break;
      case 2: v = Json::object(); break;
      default: if (v.size() > 1) std::swap(v[0], v[v.size() - 1]); break;
    }
  } else if (v.is_object()) {
    if (!v.empty() && pick(3) != 0) {
      auto it = v.begin();
      std::advance(it, static_cast<long>(pick(v.size())));
      v.erase(it);
    } else {
      v = pick(2) ? Json::array() : Json();
    }
  } else {
    const Json choices[] = {0, "", Json::array(), true};
    v = choices[pick(std::size(choices))];
  }
}

void write_bytes(const std::string& path, const std::vector<uint8_t>& bytes);
void write_text(const std::string& path, const std::string& text);
std::vector<uint8_t> read_bytes(const std::string& path);

}  // namespace solar::test

// EXPECT that `stmt` throws solar::Error of `kind` whose what() contains `needle`.
#define EXPECT_SOLAR_ERROR(stmt_, kind_, needle_)                                                   \
  do {                                                                                           \
    try {                                                                                        \
      stmt_;                                                                                      \
      ADD_FAILURE() << "expected solar::Error (" << ::solar::to_string(kind_) << ") from " #stmt_; \
    } catch (const ::solar::Error& e_) {                                                         \
      EXPECT_EQ(e_.kind(), kind_) << "what(): " << e_.what();                                     \
      EXPECT_NE(std::string(e_.what()).find(needle_), std::string::npos)                          \
          << "what(): " << e_.what() << "\nexpected to contain: " << (needle_);                   \
    }                                                                                            \
  } while (0)
