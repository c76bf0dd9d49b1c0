#include "solar/range_coder.hpp"

#include <array>
#include <bit>
#include <cmath>

#include "solar/error.hpp"

namespace solar {
namespace {
constexpr int kBits = 11;
static_assert(kProbOne == 1u << kBits);
constexpr uint32_t kTop = 1u << 24;
}  // namespace

void RangeEncoder::shift_low() {
  if (static_cast<uint32_t>(low_) < 0xFF000000u || (low_ >> 32) != 0) {
    const auto carry = static_cast<uint8_t>(low_ >> 32);
    uint8_t temp = cache_;
    do {
      out_.push_back(static_cast<uint8_t>(temp + carry));
      temp = 0xFF;
    } while (--cache_size_ != 0);
    cache_ = static_cast<uint8_t>(low_ >> 24);
  }
  ++cache_size_;
  low_ = (low_ & 0x00FFFFFFu) << 8;
}

void RangeEncoder::bit(Prob& p, int b) {
  const uint32_t bound = (range_ >> kBits) * p;
  if (b == 0) {
    range_ = bound;
  } else {
    low_ += bound;
    range_ -= bound;
  }
  adapt(p, b);
  while (range_ < kTop) {
    range_ <<= 8;
    shift_low();
  }
}

void RangeEncoder::direct(uint32_t value, int nbits) {
  for (int i = nbits - 1; i >= 0; --i) {
    range_ >>= 1;
    if ((value >> i) & 1u) low_ += range_;
    while (range_ < kTop) {
      range_ <<= 8;
      shift_low();
    }
  }
}

namespace {
// -log2(p / 2^kBits) in 1/1024 bit for every 11-bit probability (rounded, so that the table, and
// hence every choice made from it, is the same wherever std::log2 is within an ulp).
const std::array<uint32_t, (1u << kBits) + 1>& cost_table() {
  static const auto table = [] {
    std::array<uint32_t, (1u << kBits) + 1> t{};
    for (uint32_t p = 1; p <= (1u << kBits); ++p)
      t[p] = static_cast<uint32_t>(std::lround(-std::log2(static_cast<double>(p) / (1u << kBits)) * BitCounter::kCostScale));
    t[0] = t[1];
    return t;
  }();
  return table;
}
}  // namespace

BitCounter::BitCounter() : table_(cost_table().data()) {}

std::vector<uint8_t> RangeEncoder::finish() {
  // Any value in [low, low + range) decodes the same. Take the one with the most trailing zero
  // bits: its last bytes are zeros, which are trimmed below (the decoder reads zeros past the
  // end), so the flush costs about one byte instead of three.
  for (int s = 32; s > 0; --s) {
    const uint64_t mask = (uint64_t{1} << s) - 1;
    const uint64_t v = (low_ + mask) & ~mask;
    if (v - low_ < range_) {
      low_ = v;
      break;
    }
  }
  for (int i = 0; i < 5; ++i) shift_low();
  // The first byte LZMA emits is always 0: drop it (the decoder starts from it implicitly).
  out_.erase(out_.begin());
  // Trailing zero bytes carry no information: the decoder reads zeros past the end.
  while (!out_.empty() && out_.back() == 0) out_.pop_back();
  return std::move(out_);
}

RangeDecoder::RangeDecoder(const uint8_t* data, size_t size) : data_(data), size_(size) {
  for (int i = 0; i < 4; ++i) code_ = (code_ << 8) | next();
}

int RangeDecoder::bit(Prob& p) {
  const uint32_t bound = (range_ >> kBits) * p;
  const int b = code_ < bound ? 0 : 1;
  if (b == 0) {
    range_ = bound;
  } else {
    code_ -= bound;
    range_ -= bound;
  }
  adapt(p, b);
  while (range_ < kTop) {
    range_ <<= 8;
    code_ = (code_ << 8) | next();
  }
  return b;
}

uint32_t RangeDecoder::direct(int nbits) {
  uint32_t v = 0;
  for (int i = 0; i < nbits; ++i) {
    range_ >>= 1;
    uint32_t b = 0;
    if (code_ >= range_) {
      code_ -= range_;
      b = 1;
    }
    v = (v << 1) | b;
    while (range_ < kTop) {
      range_ <<= 8;
      code_ = (code_ << 8) | next();
    }
  }
  return v;
}

// Length contexts start from a prior instead of 1/2: in context c (magnitudes around 2^(c-2)),
// stopping below length c - 1 is unlikely and going past c is unlikely. Saves the bytes each
// fresh model would spend learning that, which matters for small layers.
IntModel::IntModel() {
  for (size_t c = 0; c < len_.size(); ++c)
    for (size_t i = 0; i < len_[c].size(); ++i) {
      Prob p = kProbInit;  // p(stop here)
      if (c > 0) {
        const auto typical = static_cast<size_t>(c - 1);
        p = i + 1 < typical ? 256 : i + 1 == typical ? 640 : i == typical ? 1024 : 1600;
      }
      len_[c][i] = p;
    }
  mant_.fill(kProbInit);
}

// Context: bit length of the running mean of magnitudes in the current vector (0 at its start).
int IntModel::context() const {
  if (count_ == 0) return 0;
  const uint64_t mean = (2 * sum_ + count_) / (2 * count_);
  const int l = std::bit_width(mean) + 1;
  return l < kClasses ? l : kClasses - 1;
}

void IntModel::update(uint32_t mag) {
  sum_ += mag;
  ++count_;
}

int32_t IntModel::decode(RangeDecoder& d, const std::string& where, bool signed_value) {
  auto& ctx = len_[static_cast<size_t>(context())];
  int len = 0;
  while (len < kMaxLen && d.bit(ctx[static_cast<size_t>(len)])) ++len;
  uint32_t mag = 0;
  if (len >= 1) {
    mag = 1;
    if (len >= 2) {
      mag = (mag << 1) | static_cast<uint32_t>(d.bit(mant_[static_cast<size_t>(len)]));
      if (len >= 3) mag = (mag << (len - 2)) | d.direct(len - 2);
    }
  }
  const bool negative = len >= 1 && signed_value && d.direct(1);
  update(mag);
  return negative ? -static_cast<int32_t>(mag) : static_cast<int32_t>(mag);
}

}  // namespace solar
