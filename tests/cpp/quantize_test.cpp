#include <cmath>

#include <gtest/gtest.h>

#include "solar/codec.hpp"
#include "test_support.hpp"

namespace solar {
namespace {

TEST(Quantize, Float32IsExactForFloatValues) {
  const std::vector<double> c = {1.5, -0.25, 3.0517578125e-05, 12345.0};
  const auto bytes = quantize_coefficients(c, 32);
  EXPECT_EQ(bytes.size(), 16u);
  EXPECT_EQ(dequantize_coefficients(bytes.data(), bytes.size(), 4, 32, "t"), c);
}

TEST(Quantize, IntegerModesStayWithinHalfAStep) {
  std::vector<double> c;
  for (int i = 0; i < 101; ++i) c.push_back(std::sin(0.3 * i) * 7.0);
  for (int bits : {16, 8, 4}) {
    const auto bytes = quantize_coefficients(c, bits);
    EXPECT_EQ(bytes.size(), quantized_size(c.size(), bits));
    const auto back = dequantize_coefficients(bytes.data(), bytes.size(), c.size(), bits, "t");
    double max_abs = 0;
    for (double v : c) max_abs = std::max(max_abs, std::fabs(v));
    const double step = max_abs / ((1 << (bits - 1)) - 1);
    for (size_t i = 0; i < c.size(); ++i) EXPECT_LE(std::fabs(back[i] - c[i]), 0.5 * step * (1 + 1e-6)) << bits;
  }
}

TEST(Quantize, FourBitLayoutIsLowNibbleFirst) {
  // scale = 7/7 = 1: values 1 and -2 pack into one byte 0xE1.
  const auto bytes = quantize_coefficients({1.0, -2.0, 7.0}, 4);
  ASSERT_EQ(bytes.size(), 4u + 2u);
  EXPECT_EQ(bytes[4], 0xE1);
  EXPECT_EQ(bytes[5], 0x07);
}

TEST(Quantize, AllZeroCoefficientsRoundTrip) {
  const auto bytes = quantize_coefficients({0.0, 0.0}, 8);
  EXPECT_EQ(dequantize_coefficients(bytes.data(), bytes.size(), 2, 8, "t"), (std::vector<double>{0.0, 0.0}));
}

TEST(Quantize, WrongSizesAndBitsAreFormatErrors) {
  const auto bytes = quantize_coefficients({1.0, 2.0}, 8);
  EXPECT_SOLAR_ERROR(dequantize_coefficients(bytes.data(), bytes.size() - 1, 2, 8, "blk"), ErrorKind::Format, "blk");
  EXPECT_THROW(quantize_coefficients({1.0}, 5), Error);
}

TEST(Masks, RoundTripAndRejectStrayBits) {
  const std::vector<uint32_t> sel = {0, 3, 8, 12};
  const auto m = pack_mask(sel, 13);
  ASSERT_EQ(m.size(), 2u);
  EXPECT_EQ(m[0], 0x09);
  EXPECT_EQ(unpack_mask(m.data(), m.size(), 13, "t"), sel);
  auto bad = m;
  bad[1] |= 0x80;  // bit 15, past a pool of 13
  EXPECT_SOLAR_ERROR(unpack_mask(bad.data(), bad.size(), 13, "mask"), ErrorKind::Format, "past the pool");
}

}  // namespace
}  // namespace solar
