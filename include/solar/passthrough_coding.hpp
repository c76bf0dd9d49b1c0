// Lossy coding of passthrough tensors (format v4, docs/FORMAT.md "Passthrough coding"):
// `modules_to_save` heads and other tensors the LoRA codec does not touch can dwarf a compressed
// adapter (MiniLM's F32 classifier head, ~2.7 kB stored exactly, was 60-70% of its 90-95%-retention
// files), so they may be stored as int8 with one float32 scale per row instead of verbatim.
#pragma once
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "solar/dtype.hpp"
#include "solar/linalg.hpp"
#include "solar/peft_adapter.hpp"

namespace solar {

struct Int8Rows {
  std::vector<float> scales;   // one per row (the first dimension), max |row| / 127
  std::vector<int8_t> values;  // row-major, in -127..127
};

// The int8 codes of `t`, or nullopt where the coding does not apply: it takes floating-point
// tensors of at least 2 dimensions whose values are all finite. Vectors (biases, norms) stay
// exact: they are small, and a norm's error would scale a whole row. (DoRA magnitudes, whose error
// does the same, are coded against the base's row norms instead: magnitude_coding.hpp.)
std::optional<Int8Rows> quantize_int8_rows(const Tensor& t);
// value = float32(q) * scale (binary32), then converted to `dtype` (round to nearest even).
Tensor dequantize_int8_rows(const Int8Rows& q, DType dtype, const std::vector<int64_t>& shape);

// The blob: rows x float32 scale (little-endian), then the int8 values. `where` names the tensor.
std::vector<uint8_t> int8_rows_blob(const Int8Rows& q);
Int8Rows int8_rows_from_blob(const std::vector<uint8_t>& blob, const std::vector<int64_t>& shape, const std::string& where);

// Format v6, `--passthrough spectral`: a 2-D (or higher) head is coded as one more layer of the
// spectral stream, so the plan gives it bytes by the same error-per-byte rule as the LoRA layers
// (MiniLM's classifier head kept its whole effect at 2 bits a value, where int8 rows spend 8).
// Applies to finite floating-point tensors whose rows R = shape[0] and columns C = numel / R
// have min(R, C) <= kMaxLayerCodedRank: the layer's rank is min(R, C), and larger ones (embedding
// copies) are not low-rank updates.
inline constexpr int64_t kMaxLayerCodedRank = 64;  // python/solar/calibrate.py: MAX_HEAD_RANK
// The tensor as a LoRA module whose update B A is the tensor itself (R x C): A = the tensor and
// B = I when R <= C, else B = the tensor and A = I; scaling 1. Its path is the key without
// `key_prefix` and without a trailing ".weight" (`classifier` for a sequence classifier's head),
// which is where calibration statistics for it are looked up. nullopt for a tensor the rule
// above does not apply to.
std::optional<LoraModule> passthrough_as_layer(const std::string& key, const Tensor& t, const std::string& key_prefix);
// The restored tensor: B~ and A~ rounded to binary32, each element the sum over j in increasing
// order of their products in binary64, rounded to binary32, then converted to `dtype`.
Tensor layer_product(const Matrix& b, const Matrix& a, DType dtype, const std::vector<int64_t>& shape);

}  // namespace solar
