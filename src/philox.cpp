#include "solar/philox.hpp"

#include <cmath>
#include <numbers>
#include <stdexcept>

namespace solar {
namespace {

constexpr uint32_t kM0 = 0xD2511F53u, kM1 = 0xCD9E8D57u;
constexpr uint32_t kW0 = 0x9E3779B9u, kW1 = 0xBB67AE85u;

inline void mulhilo(uint32_t a, uint32_t b, uint32_t& hi, uint32_t& lo) {
  const uint64_t p = static_cast<uint64_t>(a) * b;
  hi = static_cast<uint32_t>(p >> 32);
  lo = static_cast<uint32_t>(p);
}

inline PhiloxKey key_of(uint64_t seed) {
  return {static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32)};
}

// One Box-Muller pair from two uniform words: u1 in (0, 1], u2 in [0, 1).
inline void box_muller(uint32_t x0, uint32_t x1, float& z0, float& z1) {
  constexpr double kTwoPow32 = 4294967296.0;
  const double u1 = (static_cast<double>(x0) + 1.0) / kTwoPow32;
  const double u2 = static_cast<double>(x1) / kTwoPow32;
  const double radius = std::sqrt(-2.0 * std::log(u1));
  const double angle = 2.0 * std::numbers::pi * u2;
  z0 = static_cast<float>(radius * std::cos(angle));
  z1 = static_cast<float>(radius * std::sin(angle));
}

}  // namespace

PhiloxCounter philox4x32_10(PhiloxCounter c, PhiloxKey k) {
  for (int round = 0; round < 10; ++round) {
    if (round > 0) {
      k[0] += kW0;
      k[1] += kW1;
    }
    uint32_t hi0, lo0, hi1, lo1;
    mulhilo(kM0, c[0], hi0, lo0);
    mulhilo(kM1, c[2], hi1, lo1);
    c = {hi1 ^ c[1] ^ k[0], lo1, hi0 ^ c[3] ^ k[1], lo0};
  }
  return c;
}

void philox_normals(uint64_t seed, uint32_t layer, uint32_t member, uint32_t stream,
                    uint64_t first, uint64_t count, float* out) {
  const PhiloxKey key = key_of(seed);
  uint64_t e = first;
  const uint64_t end = first + count;
  while (e < end) {
    const uint64_t block = e / 4;
    // Block index occupies counter word 0; streams longer than 2^34 normals are not addressable.
    const PhiloxCounter r = philox4x32_10({static_cast<uint32_t>(block), member, layer, stream}, key);
    float z[4];
    box_muller(r[0], r[1], z[0], z[1]);
    box_muller(r[2], r[3], z[2], z[3]);
    for (uint64_t lane = e % 4; lane < 4 && e < end; ++lane, ++e) *out++ = z[lane];
  }
}

void philox_distinct_indices(uint64_t seed, uint32_t layer, uint32_t member, uint32_t stream,
                             uint32_t bound, uint32_t count, uint32_t* out) {
  if (count > bound) throw std::invalid_argument("philox_distinct_indices: count exceeds bound");
  const PhiloxKey key = key_of(seed);
  uint32_t produced = 0;
  for (uint32_t block = 0; produced < count; ++block) {
    const PhiloxCounter r = philox4x32_10({block, member, layer, stream}, key);
    for (int lane = 0; lane < 4 && produced < count; ++lane) {
      const auto idx = static_cast<uint32_t>((static_cast<uint64_t>(r[lane]) * bound) >> 32);
      bool seen = false;
      for (uint32_t j = 0; j < produced; ++j) seen = seen || out[j] == idx;
      if (!seen) out[produced++] = idx;
    }
  }
}

}  // namespace solar
