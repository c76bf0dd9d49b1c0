// Coefficient quantisation and selection masks (docs/FORMAT.md, "Coefficients" and "Masks").
#include <algorithm>
#include <cmath>
#include <cstring>

#include "solar/codec.hpp"
#include "solar/error.hpp"

namespace solar {
namespace {

void check_bits(int bits, const std::string& where) {
  if (bits != 32 && bits != 16 && bits != 8 && bits != 4)
    throw Error(ErrorKind::InvalidInput, where, "coefficient bits must be 32, 16, 8 or 4 (got " + std::to_string(bits) + ")");
}

void put_f32(std::vector<uint8_t>& out, size_t at, float v) {
  uint32_t u;
  std::memcpy(&u, &v, 4);
  for (int i = 0; i < 4; ++i) out[at + i] = static_cast<uint8_t>(u >> (8 * i));
}

float get_f32(const uint8_t* p) {
  uint32_t u = 0;
  for (int i = 0; i < 4; ++i) u |= static_cast<uint32_t>(p[i]) << (8 * i);
  float v;
  std::memcpy(&v, &u, 4);
  return v;
}

}  // namespace

size_t quantized_size(size_t count, int bits) {
  if (bits == 32) return 4 * count;
  if (count == 0) return 0;
  return 4 + (count * static_cast<size_t>(bits) + 7) / 8;
}

std::vector<uint8_t> quantize_coefficients(const std::vector<double>& c, int bits) {
  check_bits(bits, "quantize");
  std::vector<uint8_t> out(quantized_size(c.size(), bits), 0);
  if (c.empty()) return out;
  if (bits == 32) {
    for (size_t i = 0; i < c.size(); ++i) put_f32(out, 4 * i, static_cast<float>(c[i]));
    return out;
  }
  double max_abs = 0;
  for (double v : c) max_abs = std::max(max_abs, std::fabs(v));
  const int32_t qmax = (1 << (bits - 1)) - 1;
  const float scale = static_cast<float>(max_abs / qmax);
  put_f32(out, 0, scale);
  uint8_t* body = out.data() + 4;
  for (size_t i = 0; i < c.size(); ++i) {
    int32_t q = 0;
    if (scale > 0) q = static_cast<int32_t>(std::lround(c[i] / static_cast<double>(scale)));
    q = std::clamp(q, -qmax, qmax);
    if (bits == 16) {
      const auto u = static_cast<uint16_t>(static_cast<int16_t>(q));
      body[2 * i] = static_cast<uint8_t>(u);
      body[2 * i + 1] = static_cast<uint8_t>(u >> 8);
    } else if (bits == 8) {
      body[i] = static_cast<uint8_t>(static_cast<int8_t>(q));
    } else {
      const auto nib = static_cast<uint8_t>(q & 0xF);
      body[i / 2] |= (i % 2 == 0) ? nib : static_cast<uint8_t>(nib << 4);
    }
  }
  return out;
}

std::vector<double> dequantize_coefficients(const uint8_t* p, size_t nbytes, size_t count, int bits,
                                            const std::string& where) {
  check_bits(bits, where);
  if (nbytes != quantized_size(count, bits))
    throw Error(ErrorKind::Format, where, "coefficient block has " + std::to_string(nbytes) + " bytes, expected " +
                                              std::to_string(quantized_size(count, bits)));
  std::vector<double> c(count);
  if (count == 0) return c;
  if (bits == 32) {
    for (size_t i = 0; i < count; ++i) c[i] = get_f32(p + 4 * i);
  } else {
    const double scale = get_f32(p);
    if (!std::isfinite(scale)) throw Error(ErrorKind::Format, where, "non-finite coefficient scale");
    const uint8_t* body = p + 4;
    for (size_t i = 0; i < count; ++i) {
      int32_t q;
      if (bits == 16) {
        q = static_cast<int16_t>(static_cast<uint16_t>(body[2 * i] | (body[2 * i + 1] << 8)));
      } else if (bits == 8) {
        q = static_cast<int8_t>(body[i]);
      } else {
        const uint8_t nib = (i % 2 == 0) ? (body[i / 2] & 0xF) : (body[i / 2] >> 4);
        q = (nib & 0x8) ? static_cast<int32_t>(nib) - 16 : static_cast<int32_t>(nib);
      }
      c[i] = q * scale;
    }
  }
  for (double v : c)
    if (!std::isfinite(v)) throw Error(ErrorKind::Format, where, "non-finite coefficient");
  return c;
}

std::vector<uint8_t> pack_mask(const std::vector<uint32_t>& selected, size_t pool) {
  std::vector<uint8_t> m((pool + 7) / 8, 0);
  for (uint32_t i : selected) m[i / 8] |= static_cast<uint8_t>(1u << (i % 8));
  return m;
}

std::vector<uint32_t> unpack_mask(const uint8_t* p, size_t nbytes, size_t pool, const std::string& where) {
  if (nbytes != (pool + 7) / 8)
    throw Error(ErrorKind::Format, where, "selection mask has " + std::to_string(nbytes) + " bytes for a pool of " + std::to_string(pool));
  std::vector<uint32_t> sel;
  for (size_t i = 0; i < pool; ++i)
    if (p[i / 8] & (1u << (i % 8))) sel.push_back(static_cast<uint32_t>(i));
  // Padding bits past the pool must be zero: a set one means damage or a foreign writer.
  for (size_t i = pool; i < nbytes * 8; ++i)
    if (p[i / 8] & (1u << (i % 8))) throw Error(ErrorKind::Format, where, "selection mask has bits set past the pool");
  return sel;
}

}  // namespace solar
