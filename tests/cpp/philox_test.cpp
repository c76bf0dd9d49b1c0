#include "solar/philox.hpp"

#include <fstream>
#include <sstream>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

namespace solar {
namespace {

nlohmann::json golden() {
  std::ifstream in(SOLAR_SOURCE_DIR "/tests/fixtures/philox_golden.json");
  std::stringstream ss;
  ss << in.rdbuf();
  return nlohmann::json::parse(ss.str());
}

// Random123 tests/kat_vectors, "philox4x32 10" lines.
TEST(Philox, KnownAnswerVectors) {
  EXPECT_EQ(philox4x32_10({0, 0, 0, 0}, {0, 0}), (PhiloxCounter{0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8}));
  EXPECT_EQ(philox4x32_10({~0u, ~0u, ~0u, ~0u}, {~0u, ~0u}), (PhiloxCounter{0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd}));
  EXPECT_EQ(philox4x32_10({0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344}, {0xa4093822, 0x299f31d0}),
            (PhiloxCounter{0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1}));
}

// The golden file is also checked by an independent Python implementation of the spec
// (tests/python/test_philox_portable.py), so both agree with docs/FORMAT.md.
TEST(Philox, NormalsMatchGolden) {
  const nlohmann::json g = golden();  // held: a range-for over golden()["..."] would use a dead temporary
  ASSERT_FALSE(g["normals"].empty());
  for (const auto& c : g["normals"]) {
    const auto& expected = c["values"];
    std::vector<float> got(expected.size());
    philox_normals(std::stoull(c["seed"].get<std::string>()), c["layer"], c["member"], c["stream"], c["first"], got.size(), got.data());
    for (size_t i = 0; i < got.size(); ++i) EXPECT_EQ(got[i], expected[i].get<float>()) << c.dump() << " at " << i;
  }
}

TEST(Philox, IndicesMatchGolden) {
  const nlohmann::json g = golden();
  ASSERT_FALSE(g["indices"].empty());
  for (const auto& c : g["indices"]) {
    const auto expected = c["values"].get<std::vector<uint32_t>>();
    std::vector<uint32_t> got(expected.size());
    philox_distinct_indices(std::stoull(c["seed"].get<std::string>()), c["layer"], c["member"], c["stream"], c["bound"],
                            static_cast<uint32_t>(got.size()), got.data());
    EXPECT_EQ(got, expected) << c.dump();
  }
}

TEST(Philox, AnySliceOfAStreamEqualsTheWholeStream) {
  std::vector<float> whole(37), part(13);
  philox_normals(99, 1, 2, 0, 0, whole.size(), whole.data());
  philox_normals(99, 1, 2, 0, 19, part.size(), part.data());
  for (size_t i = 0; i < part.size(); ++i) EXPECT_EQ(part[i], whole[19 + i]);
}

TEST(Philox, NormalsHaveUnitMoments) {
  std::vector<float> z(200000);
  philox_normals(5, 0, 0, 0, 0, z.size(), z.data());
  double s = 0, s2 = 0;
  for (float v : z) { s += v; s2 += double(v) * v; }
  EXPECT_NEAR(s / z.size(), 0.0, 0.01);
  EXPECT_NEAR(s2 / z.size(), 1.0, 0.01);
}

TEST(Philox, DistinctIndicesAreDistinctAndInRange) {
  std::vector<uint32_t> idx(50);
  philox_distinct_indices(3, 4, 5, 1, 60, 50, idx.data());
  std::vector<bool> seen(60, false);
  for (uint32_t i : idx) {
    ASSERT_LT(i, 60u);
    EXPECT_FALSE(seen[i]);
    seen[i] = true;
  }
  EXPECT_THROW(philox_distinct_indices(3, 4, 5, 1, 4, 5, idx.data()), std::invalid_argument);
}

}  // namespace
}  // namespace solar
