#include "solar/dtype.hpp"

#include <bit>
#include <cmath>
#include <cstring>
#include <limits>

#include "solar/error.hpp"
#include "test_support.hpp"

using namespace solar;

namespace {

float fbits(uint32_t b) { return std::bit_cast<float>(b); }
uint32_t bitsf(float f) { return std::bit_cast<uint32_t>(f); }

TEST(DType, NamesSizesAndParse) {
  for (DType t : {DType::F64, DType::F32, DType::F16, DType::BF16, DType::I64, DType::I32, DType::I16, DType::I8,
                  DType::U8, DType::BOOL})
    EXPECT_EQ(parse_dtype(dtype_name(t), "x"), t);
  EXPECT_EQ(dtype_name(DType::BF16), "BF16");
  EXPECT_EQ(dtype_size(DType::F64), 8u);
  EXPECT_EQ(dtype_size(DType::F32), 4u);
  EXPECT_EQ(dtype_size(DType::BF16), 2u);
  EXPECT_EQ(dtype_size(DType::BOOL), 1u);
  EXPECT_TRUE(is_float(DType::F16));
  EXPECT_FALSE(is_float(DType::I32));
  EXPECT_SOLAR_ERROR(parse_dtype("F8_E4M3", "somewhere"), ErrorKind::Unsupported, "somewhere");
  EXPECT_SOLAR_ERROR(parse_dtype("f32", "w"), ErrorKind::Unsupported, "f32");
}

TEST(DType, ErrorKindNames) {
  EXPECT_STREQ(to_string(ErrorKind::Io), "io");
  EXPECT_STREQ(to_string(ErrorKind::Format), "format");
  EXPECT_STREQ(to_string(ErrorKind::Corrupt), "corrupt");
  EXPECT_STREQ(to_string(ErrorKind::Mismatch), "mismatch");
  EXPECT_STREQ(to_string(ErrorKind::InvalidInput), "invalid-input");
  EXPECT_STREQ(to_string(ErrorKind::Unsupported), "unsupported");
  Error e(ErrorKind::Format, "file.bin", "bad");
  EXPECT_STREQ(e.what(), "file.bin: bad");
  EXPECT_EQ(e.where(), "file.bin");
}

TEST(F16, GoldenBitPatterns) {
  EXPECT_EQ(f32_to_f16(0.0f), 0x0000);
  EXPECT_EQ(f32_to_f16(-0.0f), 0x8000);
  EXPECT_EQ(f32_to_f16(1.0f), 0x3C00);
  EXPECT_EQ(f32_to_f16(-2.0f), 0xC000);
  EXPECT_EQ(f32_to_f16(0.5f), 0x3800);
  EXPECT_EQ(f32_to_f16(65504.0f), 0x7BFF);                        // largest finite
  EXPECT_EQ(f32_to_f16(6.103515625e-05f), 0x0400);                // smallest normal 2^-14
  EXPECT_EQ(f32_to_f16(5.9604644775390625e-08f), 0x0001);         // smallest subnormal 2^-24
  EXPECT_EQ(f32_to_f16(6.097555160522461e-05f), 0x03FF);          // largest subnormal
  EXPECT_EQ(f32_to_f16(std::numeric_limits<float>::infinity()), 0x7C00);
  EXPECT_EQ(f32_to_f16(-std::numeric_limits<float>::infinity()), 0xFC00);
  EXPECT_EQ(f32_to_f16(1e10f), 0x7C00);                           // overflow -> Inf
  EXPECT_EQ(f32_to_f16(1e-10f), 0x0000);                          // underflow -> 0
  EXPECT_EQ(f32_to_f16(-1e-10f), 0x8000);
  EXPECT_EQ(f32_to_f16(0.333333343f), 0x3555);
  const uint16_t nan = f32_to_f16(std::numeric_limits<float>::quiet_NaN());
  EXPECT_EQ(nan & 0x7C00, 0x7C00);
  EXPECT_NE(nan & 0x03FF, 0);
  // A signalling NaN whose payload lives only in the low bits must stay a NaN.
  const uint16_t snan = f32_to_f16(fbits(0x7F800001u));
  EXPECT_EQ(snan & 0x7C00, 0x7C00);
  EXPECT_NE(snan & 0x03FF, 0);
}

TEST(F16, RoundingTiesToEvenAndOverflowBoundary) {
  // 1 + 2^-11 is halfway between 1 and 1 + 2^-10: ties to even -> 1.0.
  EXPECT_EQ(f32_to_f16(1.0f + std::ldexp(1.0f, -11)), 0x3C00);
  // 1 + 3*2^-11 is halfway between 1+2^-10 (odd) and 1+2^-9 (even) -> 0x3C02.
  EXPECT_EQ(f32_to_f16(1.0f + 3 * std::ldexp(1.0f, -11)), 0x3C02);
  // Just above the tie rounds up.
  EXPECT_EQ(f32_to_f16(std::nextafter(1.0f + std::ldexp(1.0f, -11), 2.0f)), 0x3C01);
  // 65519 rounds down to 65504; 65520 (the tie) rounds to even -> Inf.
  EXPECT_EQ(f32_to_f16(65519.0f), 0x7BFF);
  EXPECT_EQ(f32_to_f16(65520.0f), 0x7C00);
  // Subnormal ties: 2^-25 (half the smallest subnormal) -> 0; 3*2^-25 -> 2*2^-24 (even).
  EXPECT_EQ(f32_to_f16(std::ldexp(1.0f, -25)), 0x0000);
  EXPECT_EQ(f32_to_f16(std::nextafter(std::ldexp(1.0f, -25), 1.0f)), 0x0001);
  EXPECT_EQ(f32_to_f16(3 * std::ldexp(1.0f, -25)), 0x0002);
  EXPECT_EQ(f32_to_f16(5 * std::ldexp(1.0f, -25)), 0x0002);
  // Largest subnormal + half ulp rounds up into the smallest normal.
  EXPECT_EQ(f32_to_f16(std::ldexp(1.0f, -14) - std::ldexp(1.0f, -25)), 0x0400);
}

TEST(F16, DecodeGolden) {
  EXPECT_EQ(f16_to_f32(0x3C00), 1.0f);
  EXPECT_EQ(f16_to_f32(0x7BFF), 65504.0f);
  EXPECT_EQ(f16_to_f32(0x0001), std::ldexp(1.0f, -24));
  EXPECT_EQ(f16_to_f32(0x03FF), std::ldexp(1023.0f, -24));
  EXPECT_EQ(f16_to_f32(0x0400), std::ldexp(1.0f, -14));
  EXPECT_EQ(bitsf(f16_to_f32(0x8000)), 0x80000000u);
  EXPECT_TRUE(std::isinf(f16_to_f32(0x7C00)));
  EXPECT_TRUE(std::isinf(f16_to_f32(0xFC00)) && f16_to_f32(0xFC00) < 0);
  EXPECT_TRUE(std::isnan(f16_to_f32(0x7E00)));
  EXPECT_TRUE(std::isnan(f16_to_f32(0x7C01)));
}

TEST(F16, EveryHalfRoundTripsExactly) {
  for (uint32_t h = 0; h <= 0xFFFF; ++h) {
    const float f = f16_to_f32(static_cast<uint16_t>(h));
    if (std::isnan(f)) {
      EXPECT_TRUE(std::isnan(f16_to_f32(f32_to_f16(f)))) << h;
      continue;
    }
    ASSERT_EQ(f32_to_f16(f), h) << "half 0x" << std::hex << h;
  }
}

TEST(F16, MatchesNearestOnRandomFloats) {
  // Against a brute-force reference: the nearest representable half (ties to the even code).
  const auto vals = test::random_normals(20000, 42, 3000.0f);
  auto nearest = [](float f) {
    uint16_t best = 0;
    double best_err = INFINITY;
    // Search the neighbourhood given by the implementation; verify no code is strictly closer
    // and ties go to even.
    const uint16_t c = f32_to_f16(f);
    for (int d = -2; d <= 2; ++d) {
      const int cand = (c & 0x7FFF) + d;
      if (cand < 0 || cand > 0x7BFF) continue;
      const uint16_t code = static_cast<uint16_t>((c & 0x8000) | cand);
      const double err = std::fabs(static_cast<double>(f16_to_f32(code)) - f);
      if (err < best_err || (err == best_err && (code & 1) == 0)) {
        best_err = err;
        best = code;
      }
    }
    return best;
  };
  for (float v : vals) {
    if (std::fabs(v) < 65504.0f) {
      EXPECT_EQ(f32_to_f16(v), nearest(v)) << v;
    }
  }
}

TEST(BF16, GoldenAndRounding) {
  EXPECT_EQ(f32_to_bf16(1.0f), 0x3F80);
  EXPECT_EQ(f32_to_bf16(-2.0f), 0xC000);
  EXPECT_EQ(f32_to_bf16(0.0f), 0x0000);
  EXPECT_EQ(f32_to_bf16(-0.0f), 0x8000);
  EXPECT_EQ(f32_to_bf16(std::numeric_limits<float>::infinity()), 0x7F80);
  EXPECT_EQ(f32_to_bf16(std::numeric_limits<float>::max()), 0x7F80);  // rounds up to Inf
  EXPECT_EQ(f32_to_bf16(fbits(0x7F7F7FFFu)), 0x7F7F);                 // just below the tie
  EXPECT_EQ(f32_to_bf16(fbits(0x3F808000u)), 0x3F80);  // tie, even below
  EXPECT_EQ(f32_to_bf16(fbits(0x3F818000u)), 0x3F82);  // tie, odd below -> up
  EXPECT_EQ(f32_to_bf16(fbits(0x3F808001u)), 0x3F81);  // above tie
  EXPECT_EQ(f32_to_bf16(fbits(0x00000001u)), 0x0000);  // f32 subnormal
  EXPECT_EQ(f32_to_bf16(fbits(0x00018000u)), 0x0002);  // subnormal tie -> even
  const uint16_t snan = f32_to_bf16(fbits(0x7F800001u));  // payload only in dropped bits
  EXPECT_TRUE(std::isnan(bf16_to_f32(snan)));
  EXPECT_TRUE(std::isnan(bf16_to_f32(f32_to_bf16(-std::numeric_limits<float>::quiet_NaN()))));
  EXPECT_EQ(bf16_to_f32(0x3F80), 1.0f);
  EXPECT_EQ(bf16_to_f32(0x0001), fbits(0x00010000u));
}

TEST(BF16, EveryBf16RoundTripsExactly) {
  for (uint32_t h = 0; h <= 0xFFFF; ++h) {
    const float f = bf16_to_f32(static_cast<uint16_t>(h));
    if (std::isnan(f)) continue;
    ASSERT_EQ(f32_to_bf16(f), h) << std::hex << h;
  }
}

TEST(DType, BulkConversions) {
  const std::vector<float> src = {0.0f, 1.0f, -1.5f, 65504.0f, 1e-7f, 3.14159f};
  for (DType t : {DType::F32, DType::F64, DType::F16, DType::BF16}) {
    std::vector<uint8_t> bytes(src.size() * dtype_size(t));
    from_f32(t, src.data(), src.size(), bytes.data());
    std::vector<float> back(src.size());
    to_f32(t, bytes.data(), src.size(), back.data());
    for (size_t i = 0; i < src.size(); ++i) {
      float expect = src[i];
      if (t == DType::F16) expect = f16_to_f32(f32_to_f16(src[i]));
      if (t == DType::BF16) expect = bf16_to_f32(f32_to_bf16(src[i]));
      EXPECT_EQ(back[i], expect) << dtype_name(t) << " " << i;
    }
  }
  // Little-endian layout.
  uint8_t two[2];
  const float one = 1.0f;
  from_f32(DType::F16, &one, 1, two);
  EXPECT_EQ(two[0], 0x00);
  EXPECT_EQ(two[1], 0x3C);
  std::vector<float> out(1);
  EXPECT_SOLAR_ERROR(to_f32(DType::I32, two, 0, out.data()), ErrorKind::Unsupported, "I32");
}

TEST(DType, TensorMethods) {
  Tensor t = Tensor::from_f32({1, 2, 3, 4, 5, 6}, {2, 3}, DType::BF16);
  EXPECT_EQ(t.numel(), 6u);
  EXPECT_EQ(t.data.size(), 12u);
  EXPECT_EQ(t.to_f32(), (std::vector<float>{1, 2, 3, 4, 5, 6}));
  Tensor scalar = Tensor::from_f32({7}, {}, DType::F32);
  EXPECT_EQ(scalar.numel(), 1u);
  Tensor empty = Tensor::from_f32({}, {0, 5}, DType::F16);
  EXPECT_EQ(empty.numel(), 0u);
  EXPECT_TRUE(empty.data.empty());
  EXPECT_TRUE(empty.to_f32().empty());
  EXPECT_SOLAR_ERROR(Tensor::from_f32({1, 2, 3}, {2, 2}, DType::F32), ErrorKind::InvalidInput, "");
  EXPECT_SOLAR_ERROR(Tensor::from_f32({1}, {1}, DType::I8), ErrorKind::Unsupported, "I8");
  Tensor bad = t;
  bad.data.pop_back();
  EXPECT_SOLAR_ERROR(bad.to_f32(), ErrorKind::InvalidInput, "bytes");
}

}  // namespace
