#include "solar/range_coder.hpp"

#include <cmath>

#include <gtest/gtest.h>

#include "test_support.hpp"

namespace solar {
namespace {

std::vector<int32_t> gaussian_ints(size_t n, double sd, uint64_t seed) {
  const auto z = test::random_normals(n, seed);
  std::vector<int32_t> q(n);
  for (size_t i = 0; i < n; ++i) q[i] = static_cast<int32_t>(std::lround(z[i] * sd));
  return q;
}

template <class Coder>  // RangeEncoder or BitCounter
void code_all(Coder& e, const std::vector<int32_t>& v, size_t run) {
  IntModel m;
  for (size_t i = 0; i < v.size(); ++i) {
    if (i % run == 0) m.reset_run();
    m.encode(e, v[i]);
  }
}

std::vector<uint8_t> encode(const std::vector<int32_t>& v, size_t run) {
  RangeEncoder e;
  code_all(e, v, run);
  return e.finish();
}

std::vector<int32_t> decode(const std::vector<uint8_t>& b, size_t n, size_t run) {
  RangeDecoder d(b.data(), b.size());
  IntModel m;
  std::vector<int32_t> v(n);
  for (size_t i = 0; i < n; ++i) {
    if (i % run == 0) m.reset_run();
    v[i] = m.decode(d, "t");
  }
  return v;
}

TEST(RangeCoder, IntegersRoundTripAtEveryScale) {
  for (double sd : {0.0, 0.3, 2.0, 40.0, 5000.0, 3e8}) {
    const auto v = gaussian_ints(3000, sd, 7);
    EXPECT_EQ(decode(encode(v, 384), v.size(), 384), v) << sd;
  }
  const std::vector<int32_t> edges = {0, 1, -1, (1 << 29), -(1 << 29), 12345, -7};
  EXPECT_EQ(decode(encode(edges, 3), edges.size(), 3), edges);
}

TEST(RangeCoder, DirectBitsAndAdaptiveBitsInterleave) {
  RangeEncoder e;
  Prob p = kProbInit;
  for (int i = 0; i < 500; ++i) {
    e.direct(static_cast<uint32_t>(i * 2654435761u) >> 20, 12);
    e.bit(p, i % 7 == 0);
  }
  const auto b = e.finish();
  RangeDecoder d(b.data(), b.size());
  Prob q = kProbInit;
  for (int i = 0; i < 500; ++i) {
    ASSERT_EQ(d.direct(12), static_cast<uint32_t>(i * 2654435761u) >> 20);
    ASSERT_EQ(d.bit(q), i % 7 == 0 ? 1 : 0);
  }
}

TEST(RangeCoder, GaussianIntegersCostCloseToTheirEntropy) {
  // A rounded N(0, 8^2) has entropy ~ log2(8 sqrt(2 pi e)) = 5.05 bits.
  const auto v = gaussian_ints(20000, 8.0, 3);
  const double bits = 8.0 * static_cast<double>(encode(v, 20000).size()) / static_cast<double>(v.size());
  EXPECT_LT(bits, 5.05 + 0.25);
  EXPECT_GT(bits, 5.05 - 0.1);
}

size_t counted(const std::vector<int32_t>& v, size_t run) {
  BitCounter c;
  code_all(c, v, run);
  return c.bytes();
}

// Codecs price operating points with BitCounter and range-code only the chosen one; a byte
// budget is then checked on the real size, but the plan is only as good as the estimate.
TEST(RangeCoder, BitCounterPredictsTheEncodedSize) {
  size_t checked = 0;
  for (double sd : {0.0, 0.2, 0.7, 2.0, 9.0, 300.0})
    for (size_t n : {1, 5, 64, 700, 5000})
      for (uint64_t seed : {1, 2, 3}) {
        const auto v = gaussian_ints(n, sd, seed);
        const auto actual = static_cast<long>(encode(v, 64).size());
        const auto predicted = static_cast<long>(counted(v, 64));
        // Never more than a byte under (a byte budget is planned on it), and within three bytes
        // unless the stream ends in a long run of zeros, which the encoder trims for free (the
        // flush itself ends in up to three zero bytes).
        EXPECT_LE(actual, predicted + 1) << "sd " << sd << " n " << n << " seed " << seed;
        // The flush picks the value of the final interval with the most trailing zero bytes:
        // the stream is no longer than its information rounded up to whole bytes.
        EXPECT_LE(actual, predicted - 1) << "sd " << sd << " n " << n << " seed " << seed;
        if (sd >= 0.7 && n >= 64) EXPECT_LE(std::labs(predicted - actual), 3) << "sd " << sd << " n " << n << " seed " << seed;
        ++checked;
      }
  EXPECT_EQ(checked, 90u);
}

}  // namespace
}  // namespace solar
