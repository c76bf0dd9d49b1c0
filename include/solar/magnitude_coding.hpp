// DoRA magnitude vectors coded against the base (format v7, docs/FORMAT.md "DoRA magnitudes").
// DoRA trains a magnitude m (one per output row) that starts at the row norms of W; what it
// learns is m - ||W_i||. Stored exactly, the magnitudes outweigh a compressed adapter (the MiniLM
// r=8 DoRA fixture's are 18,432 B of F32, where its 99% file is 9 kB); coded as a residual from the
// row norms the receiver computes from its own W, with one uniform step chosen by the same plan
// as the layers, they cost a few bits a row.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "solar/codec.hpp"
#include "solar/dtype.hpp"

namespace solar {

// One coded magnitude vector: `layer` is the layer (its record names the base tensor, transpose
// and fingerprint) whose W predicts it; step code 0 codes no residual (m~ = row norms), else
// m~_i = norm_i + step(step_code) q_i.
struct MagnitudeCode {
  size_t layer = 0;
  int step_code = 0;
  std::vector<int32_t> q;  // one per row; empty when step_code is 0
};

// The module path of a DoRA magnitude key (`key_prefix + path + ".lora_magnitude_vector"`, or with
// a trailing ".weight" as older PEFT versions saved it), or "" when `key` is not one.
std::string dora_magnitude_module(const std::string& key, const std::string& key_prefix);

// ||W_i|| for each row of a row-major m x n float32 matrix: the sum of squares in binary64 over
// j = 0, 1, ..., n - 1 in that order, then its square root (binary64).
std::vector<double> row_norms(const std::vector<float>& w, int64_t m, int64_t n);

// The restored vector: float32(norm_i + step * q_i) computed in binary64, converted to `dtype`.
Tensor restore_magnitude(const std::vector<double>& norms, const MagnitudeCode& code, DType dtype,
                         const std::vector<int64_t>& shape);

// The blob: one range-coded stream, the step code as 8 direct bits, then (step code > 0) the m
// residual integers with a fresh IntModel. `where` names the tensor in errors.
std::vector<uint8_t> magnitude_blob(const MagnitudeCode& code);
MagnitudeCode magnitude_from_blob(const std::vector<uint8_t>& blob, size_t rows, size_t layer, const std::string& where);

// The operating points of a magnitude residual r = m - norms for the planner: candidate 0 codes no
// residual; the others a step code each (setting {step_code}). Distortion: sum_i w_i (r_i - r~_i)^2,
// `weights` w_i the cost of a unit error in row i's magnitude (1 for Frobenius error of the
// adapted weight; with calibration statistics G_ii * w^_i^T S w^_i, w^_i the unit row of W).
std::vector<Candidate> magnitude_candidates(const std::vector<double>& residual, const std::vector<double>& weights);
// The code of one of those points.
MagnitudeCode magnitude_code(const std::vector<double>& residual, const Candidate& point, size_t layer);

}  // namespace solar
