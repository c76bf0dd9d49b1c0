// Adaptive binary range coding (the LZMA scheme: 11-bit probabilities, shift-5 adaptation,
// carry propagation through a cached byte), plus the integer binarisation solar's modes use.
// Integer-only, so every implementation decodes the same bits (docs/FORMAT.md, "Entropy coding").
#pragma once
#include <array>
#include <bit>
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace solar {

using Prob = uint16_t;
inline constexpr Prob kProbInit = 1024;  // p(bit = 0) = 1/2 in 11-bit fixed point
inline constexpr uint32_t kProbOne = 2048;   // probabilities are 11-bit
inline constexpr int kAdaptShift = 5;        // adaptation: p += (target - p) >> 5

// The one adaptation rule every coder (and the bit counter) applies after a modelled bit.
inline void adapt(Prob& p, int b) {
  p = b == 0 ? static_cast<Prob>(p + ((kProbOne - p) >> kAdaptShift)) : static_cast<Prob>(p - (p >> kAdaptShift));
}

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

// Counts what a RangeEncoder would spend, without producing bytes: the same probability
// updates, cost read from a table of -log2 p. Lets a codec price thousands of operating points
// and range-code only the one it keeps. Units: 1/kCostScale bit.
class BitCounter {
 public:
  static constexpr uint64_t kCostScale = 1024;
  BitCounter();
  void bit(Prob& p, int b) {  // inline: it is the inner loop of every codec's rate search
    cost_ += table_[b == 0 ? p : kProbOne - p];
    adapt(p, b);
  }
  void direct(uint32_t /*value*/, int nbits) { cost_ += static_cast<uint64_t>(nbits) * kCostScale; }
  // The bytes the encoder's output would take: information rounded up plus one for the coder's
  // precision and flush (measured: the stream is never longer than the information rounded up,
  // and one byte shorter in a fifth of streams; streams ending in long runs of zeros come out
  // shorter still, since finish() trims trailing zero bytes).
  size_t bytes() const { return bytes_for(cost_); }
  static size_t bytes_for(uint64_t cost) { return static_cast<size_t>((cost + 8 * kCostScale - 1) / (8 * kCostScale)) + 1; }
  uint64_t cost() const { return cost_; }

 private:
  const uint32_t* table_;
  uint64_t cost_ = 0;
};

// Adaptive model for signed integers: |v| is coded by its bit length (unary, contexts chosen by
// a running mean of recent magnitudes), the bit below the leading one with a context per length,
// the remaining bits and the sign as direct bits. |v| < 2^30. With `signed_value` false the
// value is known to be non-negative and no sign bit is coded (the caller guarantees it).
class IntModel {
 public:
  IntModel();
  void reset_run() { sum_ = 0; count_ = 0; }  // start of a new vector
  template <class Coder>  // RangeEncoder or BitCounter
  void encode(Coder& e, int32_t v, bool signed_value = true);
  int32_t decode(RangeDecoder& d, const std::string& where, bool signed_value = true);

 private:
  static constexpr int kMaxLen = 30, kClasses = 8;
  int context() const;
  void update(uint32_t mag);
  std::array<std::array<Prob, kMaxLen + 1>, kClasses> len_;
  std::array<Prob, kMaxLen + 1> mant_;  // the bit below the leading one, per length
  uint64_t sum_ = 0, count_ = 0;
};

template <class Coder>
void IntModel::encode(Coder& e, int32_t v, bool signed_value) {
  const uint32_t mag = static_cast<uint32_t>(v < 0 ? -static_cast<int64_t>(v) : v);
  const int len = static_cast<int>(std::bit_width(mag));  // 0 for zero
  auto& ctx = len_[static_cast<size_t>(context())];
  for (int i = 0; i < kMaxLen; ++i) {
    const int more = len > i ? 1 : 0;
    e.bit(ctx[static_cast<size_t>(i)], more);
    if (!more) break;
  }
  if (len >= 2) {
    e.bit(mant_[static_cast<size_t>(len)], static_cast<int>((mag >> (len - 2)) & 1u));
    if (len >= 3) e.direct(mag & ((1u << (len - 2)) - 1u), len - 2);
  }
  if (len >= 1 && signed_value) e.direct(v < 0 ? 1u : 0u, 1);
  update(mag);
}

}  // namespace solar
