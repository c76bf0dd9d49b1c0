// Shared helpers for the C++ tests.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

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
