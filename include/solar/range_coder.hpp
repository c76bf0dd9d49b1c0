// Adaptive binary range coding (the LZMA scheme: 11-bit probabilities, shift-5 adaptation,
// carry propagation through a cached byte), plus the integer binarisation solar's modes use.
// Integer-only, so every implementation decodes the same bits (docs/FORMAT.md, "Entropy coding").
#pragma once
#include <array>
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace solar {

using Prob = uint16_t;
inline constexpr Prob kProbInit = 1024;  // p(bit = 0) = 1/2 in 11-bit fixed point

class RangeEncoder {
 public:
  void bit(Prob& p, int b);
  void direct(uint32_t value, int nbits);  // equiprobable bits, most significant first
  std::vector<uint8_t> finish();           // flushes; the encoder is spent afterwards

 private:
  void shift_low();
  uint64_t low_ = 0;
  uint32_t range_ = 0xFFFFFFFFu;
  uint8_t cache_ = 0;
  uint64_t cache_size_ = 1;
  std::vector<uint8_t> out_;
};

class RangeDecoder {
 public:
  // Reads past the end as zero bytes (the encoder trims trailing zeros). Damaged input decodes
  // to wrong values, never out of bounds; the container checksum catches damage first.
  RangeDecoder(const uint8_t* data, size_t size);
  int bit(Prob& p);
  uint32_t direct(int nbits);

 private:
  uint8_t next() { return pos_ < size_ ? data_[pos_++] : (++pos_, 0); }
  const uint8_t* data_;
  size_t size_, pos_ = 0;
  uint32_t range_ = 0xFFFFFFFFu, code_ = 0;
};

// Adaptive model for signed integers: |v| is coded by its bit length (unary, contexts chosen by
// a running mean of recent magnitudes), the bit below the leading one with a context per length,
// the remaining bits and the sign as direct bits. |v| < 2^30.
class IntModel {
 public:
  IntModel();
  void reset_run() { sum_ = 0; count_ = 0; }  // start of a new vector
  void encode(RangeEncoder& e, int32_t v);
  int32_t decode(RangeDecoder& d, const std::string& where);

 private:
  static constexpr int kMaxLen = 30, kClasses = 8;
  int context() const;
  void update(uint32_t mag);
  std::array<std::array<Prob, kMaxLen + 1>, kClasses> len_;
  std::array<std::array<Prob, 2>, kMaxLen + 1> mant_;
  uint64_t sum_ = 0, count_ = 0;
};

}  // namespace solar
