#include "solar/dtype.hpp"

#include <bit>
#include <cstring>

#include "solar/error.hpp"

static_assert(std::endian::native == std::endian::little,
              "solar assumes a little-endian host (tensor bytes are stored little-endian)");

namespace solar {

std::string dtype_name(DType t) {
  switch (t) {
    case DType::F64: return "F64";
    case DType::F32: return "F32";
    case DType::F16: return "F16";
    case DType::BF16: return "BF16";
    case DType::I64: return "I64";
    case DType::I32: return "I32";
    case DType::I16: return "I16";
    case DType::I8: return "I8";
    case DType::U8: return "U8";
    case DType::BOOL: return "BOOL";
  }
  return "?";
}

DType parse_dtype(const std::string& name, const std::string& where) {
  static const struct { const char* name; DType t; } kTable[] = {
      {"F64", DType::F64}, {"F32", DType::F32}, {"F16", DType::F16}, {"BF16", DType::BF16},
      {"I64", DType::I64}, {"I32", DType::I32}, {"I16", DType::I16}, {"I8", DType::I8},
      {"U8", DType::U8},   {"BOOL", DType::BOOL},
  };
  for (const auto& e : kTable)
    if (name == e.name) return e.t;
  throw Error(ErrorKind::Unsupported, where, "unsupported dtype '" + name + "'");
}

size_t dtype_size(DType t) {
  switch (t) {
    case DType::F64: case DType::I64: return 8;
    case DType::F32: case DType::I32: return 4;
    case DType::F16: case DType::BF16: case DType::I16: return 2;
    case DType::I8: case DType::U8: case DType::BOOL: return 1;
  }
  return 0;
}

bool is_float(DType t) {
  return t == DType::F64 || t == DType::F32 || t == DType::F16 || t == DType::BF16;
}

float f16_to_f32(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1Fu;
  uint32_t mant = h & 0x3FFu;
  uint32_t bits;
  if (exp == 0x1F) {
    bits = sign | 0x7F800000u | (mant << 13);  // Inf, or NaN keeping its payload
  } else if (exp != 0) {
    bits = sign | ((exp + 112u) << 23) | (mant << 13);
  } else if (mant == 0) {
    bits = sign;
  } else {
    // Subnormal: normalise. value = mant * 2^-24.
    int e = -1;
    do {
      mant <<= 1;
      ++e;
    } while ((mant & 0x400u) == 0);
    mant &= 0x3FFu;
    bits = sign | (static_cast<uint32_t>(113 - 1 - e) << 23) | (mant << 13);
  }
  return std::bit_cast<float>(bits);
}

uint16_t f32_to_f16(float f) {
  const uint32_t x = std::bit_cast<uint32_t>(f);
  const uint16_t sign = static_cast<uint16_t>((x >> 16) & 0x8000u);
  const uint32_t exp = (x >> 23) & 0xFFu;
  const uint32_t mant = x & 0x7FFFFFu;
  if (exp == 0xFF) {
    if (mant == 0) return static_cast<uint16_t>(sign | 0x7C00u);
    return static_cast<uint16_t>(sign | 0x7E00u | (mant >> 13));  // quiet NaN, keep payload
  }
  const int e = static_cast<int>(exp) - 127 + 15;
  if (e >= 31) return static_cast<uint16_t>(sign | 0x7C00u);  // overflow -> Inf
  if (e <= 0) {
    // Result is subnormal (or zero). value / 2^-24 = m24 * 2^(exp - 126).
    if (exp == 0) return sign;  // f32 zero/subnormal: far below half the smallest f16 subnormal
    const uint32_t m24 = mant | 0x800000u;
    const int shift = 14 - e;  // 14 .. ; > 25 means below 2^-25 -> rounds to zero
    if (shift > 25) return sign;
    uint32_t half = m24 >> shift;
    const uint32_t rem = m24 & ((1u << shift) - 1u);
    const uint32_t halfway = 1u << (shift - 1);
    if (rem > halfway || (rem == halfway && (half & 1u))) ++half;  // may carry into exponent 1
    return static_cast<uint16_t>(sign | half);
  }
  uint32_t half = (static_cast<uint32_t>(e) << 10) | (mant >> 13);
  const uint32_t rem = mant & 0x1FFFu;
  if (rem > 0x1000u || (rem == 0x1000u && (half & 1u))) ++half;  // may carry up to Inf
  return static_cast<uint16_t>(sign | half);
}

float bf16_to_f32(uint16_t h) { return std::bit_cast<float>(static_cast<uint32_t>(h) << 16); }

uint16_t f32_to_bf16(float f) {
  const uint32_t x = std::bit_cast<uint32_t>(f);
  if ((x & 0x7F800000u) == 0x7F800000u && (x & 0x7FFFFFu) != 0)
    return static_cast<uint16_t>((x >> 16) | 0x0040u);  // quiet NaN
  const uint32_t rounding = 0x7FFFu + ((x >> 16) & 1u);
  return static_cast<uint16_t>((x + rounding) >> 16);
}

void to_f32(DType t, const uint8_t* src, size_t count, float* dst) {
  switch (t) {
    case DType::F32:
      if (count) std::memcpy(dst, src, count * 4);
      return;
    case DType::F64:
      for (size_t i = 0; i < count; ++i) {
        double d;
        std::memcpy(&d, src + 8 * i, 8);
        dst[i] = static_cast<float>(d);
      }
      return;
    case DType::F16:
      for (size_t i = 0; i < count; ++i) {
        uint16_t h;
        std::memcpy(&h, src + 2 * i, 2);
        dst[i] = f16_to_f32(h);
      }
      return;
    case DType::BF16:
      for (size_t i = 0; i < count; ++i) {
        uint16_t h;
        std::memcpy(&h, src + 2 * i, 2);
        dst[i] = bf16_to_f32(h);
      }
      return;
    default:
      throw Error(ErrorKind::Unsupported, "", "cannot convert " + dtype_name(t) + " to float32");
  }
}

void from_f32(DType t, const float* src, size_t count, uint8_t* dst) {
  switch (t) {
    case DType::F32:
      if (count) std::memcpy(dst, src, count * 4);
      return;
    case DType::F64:
      for (size_t i = 0; i < count; ++i) {
        const double d = src[i];
        std::memcpy(dst + 8 * i, &d, 8);
      }
      return;
    case DType::F16:
      for (size_t i = 0; i < count; ++i) {
        const uint16_t h = f32_to_f16(src[i]);
        std::memcpy(dst + 2 * i, &h, 2);
      }
      return;
    case DType::BF16:
      for (size_t i = 0; i < count; ++i) {
        const uint16_t h = f32_to_bf16(src[i]);
        std::memcpy(dst + 2 * i, &h, 2);
      }
      return;
    default:
      throw Error(ErrorKind::Unsupported, "", "cannot convert float32 to " + dtype_name(t));
  }
}

size_t Tensor::numel() const {
  size_t n = 1;
  for (int64_t d : shape) n *= static_cast<size_t>(d);
  return n;
}

std::vector<float> Tensor::to_f32() const {
  const size_t n = numel();
  if (data.size() != n * dtype_size(dtype))
    throw Error(ErrorKind::InvalidInput, "", "tensor holds " + std::to_string(data.size()) +
                                                 " bytes, its shape and dtype need " +
                                                 std::to_string(n * dtype_size(dtype)));
  std::vector<float> out(n);
  solar::to_f32(dtype, data.data(), n, out.data());
  return out;
}

Tensor Tensor::from_f32(const std::vector<float>& values, std::vector<int64_t> shape, DType dtype) {
  Tensor t;
  t.dtype = dtype;
  t.shape = std::move(shape);
  for (int64_t d : t.shape)
    if (d < 0) throw Error(ErrorKind::InvalidInput, "", "negative dimension in tensor shape");
  const size_t n = t.numel();
  if (values.size() != n)
    throw Error(ErrorKind::InvalidInput, "", std::to_string(values.size()) +
                                                 " values do not fill a tensor of " +
                                                 std::to_string(n) + " elements");
  if (!is_float(dtype))
    throw Error(ErrorKind::Unsupported, "", "cannot convert float32 to " + dtype_name(dtype));
  t.data.resize(n * dtype_size(dtype));
  solar::from_f32(dtype, values.data(), n, t.data.data());
  return t;
}

}  // namespace solar
