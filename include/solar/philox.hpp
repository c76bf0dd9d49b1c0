// Portable, counter-based randomness for the seeded basis pool.
//
// Philox4x32-10 (Salmon et al., SC'11; the Random123 reference, pinned by its known-answer
// vectors in the tests). Every random number the codec uses is addressed by
//   key     = (seed low 32 bits, seed high 32 bits)
//   counter = (block, pool index, layer index, stream)
// so any member of the pool can be regenerated alone, in any order, by any implementation.
// The normal transform is Box-Muller computed in binary64 and rounded to binary32; see
// docs/FORMAT.md ("Randomness") for the exact definition.
#pragma once
#include <array>
#include <cstdint>

namespace solar {

using PhiloxCounter = std::array<uint32_t, 4>;
using PhiloxKey = std::array<uint32_t, 2>;

PhiloxCounter philox4x32_10(PhiloxCounter counter, PhiloxKey key);

// Streams (counter word 3). Factor 0 is A, 1 is B.
inline uint32_t noise_stream(int factor) { return 2u * static_cast<uint32_t>(factor); }
inline uint32_t index_stream(int factor) { return 2u * static_cast<uint32_t>(factor) + 1u; }

// Standard normals number `first` .. `first + count - 1` of the stream addressed by
// (seed, layer, member, stream): element e comes from block e / 4, lane e % 4, lanes (0,1) and
// (2,3) each forming one Box-Muller pair.
void philox_normals(uint64_t seed, uint32_t layer, uint32_t member, uint32_t stream,
                    uint64_t first, uint64_t count, float* out);

// `count` distinct indices in [0, bound), drawn in order from the uniform 32-bit words of the
// addressed stream: each word w gives floor(w * bound / 2^32); repeats are skipped.
void philox_distinct_indices(uint64_t seed, uint32_t layer, uint32_t member, uint32_t stream,
                             uint32_t bound, uint32_t count, uint32_t* out);

}  // namespace solar
