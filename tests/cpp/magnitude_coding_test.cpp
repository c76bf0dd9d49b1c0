// DoRA magnitude coding (format v7): keys, row norms, the blob, and the operating points.
#include "solar/magnitude_coding.hpp"

#include <cmath>

#include <gtest/gtest.h>

#include "solar/philox.hpp"
#include "test_support.hpp"

namespace solar {
namespace {

TEST(MagnitudeCoding, KeysNameTheirModule) {
  const std::string p = "base_model.model.";
  EXPECT_EQ(dora_magnitude_module(p + "layers.0.q.lora_magnitude_vector", p), "layers.0.q");
  EXPECT_EQ(dora_magnitude_module(p + "layers.0.q.lora_magnitude_vector.weight", p), "layers.0.q");  // older PEFT
  EXPECT_EQ(dora_magnitude_module(p + "layers.0.q.lora_A.weight", p), "");
  EXPECT_EQ(dora_magnitude_module(p + ".lora_magnitude_vector", p), "");  // names no module
  EXPECT_EQ(dora_magnitude_module("other.layers.0.q.lora_magnitude_vector", p), "");
}

TEST(MagnitudeCoding, RowNormsSumInBinary64InOrder) {
  const std::vector<float> w = {3, 4, 0, 1e-30f, 1e-30f, 1};
  const std::vector<double> n = row_norms(w, 2, 3);
  EXPECT_EQ(n[0], 5.0);
  EXPECT_EQ(n[1], std::sqrt(2.0 * double(1e-30f) * double(1e-30f) + 1.0));
}

// Every step code's blob decodes to its integers; the restored vector is within half a step.
TEST(MagnitudeCoding, BlobRoundTripsAndRestoresWithinHalfAStep) {
  std::vector<float> noise(300);
  philox_normals(5, 0, 0, 0, 0, noise.size(), noise.data());
  std::vector<double> norms, residual, weights(noise.size(), 1.0);
  for (size_t i = 0; i < noise.size(); ++i) {
    norms.push_back(1.0 + 0.01 * static_cast<double>(i));
    residual.push_back(0.05 * noise[i]);
  }
  const std::vector<Candidate> points = magnitude_candidates(residual, weights);
  ASSERT_GT(points.size(), 50u);
  EXPECT_EQ(points[0].setting, std::vector<int32_t>{0});
  for (const Candidate& c : points) {
    const MagnitudeCode code = magnitude_code(residual, c, 3);
    const std::vector<uint8_t> blob = magnitude_blob(code);
    EXPECT_LE(blob.size(), c.bytes + 1) << c.setting[0];  // the estimate holds (one byte of slack, as the stream's)
    const MagnitudeCode back = magnitude_from_blob(blob, residual.size(), 3, "t");
    EXPECT_EQ(back.step_code, code.step_code);
    EXPECT_EQ(back.q, code.q);
    const Tensor t = restore_magnitude(norms, back, DType::F32, {static_cast<int64_t>(norms.size())});
    const std::vector<float> v = t.to_f32();
    double d = 0;
    for (size_t i = 0; i < v.size(); ++i) {
      const double kept = back.step_code ? step_of_code(back.step_code) * back.q[i] : 0.0;
      d += (residual[i] - kept) * (residual[i] - kept);
      const double err = static_cast<double>(v[i]) - (norms[i] + residual[i]);
      if (back.step_code > 0) EXPECT_LE(std::fabs(err), 0.5 * step_of_code(back.step_code) + 1e-6);
    }
    EXPECT_NEAR(d, c.distortion, 1e-9 + 1e-6 * c.distortion) << c.setting[0];  // the point's price is its error
  }
}

// Finer steps cost more and lose less: along the list, bytes rise and distortion falls.
TEST(MagnitudeCoding, PointsTradeBytesForError) {
  std::vector<double> residual, weights;
  for (int i = 0; i < 200; ++i) {
    residual.push_back(std::sin(0.37 * i) * 0.1);
    weights.push_back(1.0 + (i % 7));
  }
  const std::vector<Candidate> points = magnitude_candidates(residual, weights);
  ASSERT_GT(points.size(), 10u);
  EXPECT_GT(points.back().bytes, 4 * points[1].bytes);
  EXPECT_LT(points.back().distortion, 1e-6 * points.front().distortion);
  double energy = 0;
  for (size_t i = 0; i < residual.size(); ++i) energy += weights[i] * residual[i] * residual[i];
  EXPECT_DOUBLE_EQ(points.front().distortion, energy);  // no residual: its whole weighted energy
  EXPECT_EQ(magnitude_candidates(std::vector<double>(5, 0.0), std::vector<double>(5, 1.0)).size(), 1u);
  EXPECT_SOLAR_ERROR(magnitude_candidates(residual, {1.0}), ErrorKind::InvalidInput, "one weight per row");
}

// Damaged blobs decode to wrong values or are refused, never out of bounds.
TEST(MagnitudeCoding, GarbageBlobsAreBounded) {
  uint64_t refused = 0;
  for (uint32_t seed = 0; seed < 200; ++seed) {
    std::vector<float> r(16);
    philox_normals(seed, 1, 0, 0, 0, r.size(), r.data());
    std::vector<uint8_t> blob;
    for (float x : r) blob.push_back(static_cast<uint8_t>(static_cast<int>(std::fabs(x) * 97) & 0xFF));
    try {
      const MagnitudeCode c = magnitude_from_blob(blob, 40, 0, "g");
      EXPECT_TRUE(c.step_code == 0 ? c.q.empty() : c.q.size() == 40u);
    } catch (const Error& e) {
      EXPECT_EQ(e.kind(), ErrorKind::Format);
      ++refused;
    }
  }
  EXPECT_LT(refused, 200u);
}

}  // namespace
}  // namespace solar
