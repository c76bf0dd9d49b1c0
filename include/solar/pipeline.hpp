// The two jobs: compress a PEFT adapter against its base, and restore it.
//   read -> plan budget -> compress layer by layer -> container
//   container -> regenerate bases -> restore -> PEFT adapter
#pragma once
#include <functional>
#include <optional>
#include <string>

#include "solar/codec.hpp"
#include "solar/container.hpp"
#include "solar/peft_adapter.hpp"
#include "solar/weights.hpp"

namespace solar {

using Progress = std::function<void(const std::string& message)>;

struct CompressOptions {
  std::string mode = "paper";  // paper | spectral | spectral-w
  PaperOptions paper;
  // Budget of the planned modes (spectral*): at most this many bytes for the whole file, or at
  // most this relative error sqrt(sum_l v_l D_l / sum_l v_l E_l), where D_l is layer l's error
  // and E_l its whole update, both in the mode's metric (Frobenius of scaling_l (B A)_l without
  // statistics; D_l also counts what dropped components cost to first order when the statistics
  // carry update gradients), and v_l = E_l^-balance. With neither, target_error = kDefaultTargetError.
  std::optional<size_t> target_bytes;
  std::optional<double> target_error;
  // How the budget is shared between layers (0 to 4): 0 counts errors as they are, so layers
  // with large updates get most of the bytes; 1 counts every layer's *relative* error the same.
  // Unset: 1 with the plain Frobenius metric (a small update is not a less important one: on
  // stories260K the value projections move 4x less than the queries and matter as much), 0 with
  // calibration statistics or a proxy, whose metric already weighs each layer by its effect.
  std::optional<double> balance;
  // Output-aware coding (spectral modes): per-module input second moments E[x x^T] (n x n),
  // named "<module path>.input_moment", e.g. from solar.calibrate(). Errors are then measured in
  // the layer's outputs (in the loss, with "<module path>.output_grad_moment" too; optional
  // first-order entries as docs/FORMAT.md, "Calibration statistics", describes). Without them,
  // `proxy` = "base-gram" weighs errors by W^T W instead (data-free); "" measures plain Frobenius
  // error.
  const WeightSource* calibration = nullptr;
  std::string proxy;
  // Added to each statistic's diagonal, as a share of its mean diagonal: how much directions the
  // calibration data did not exercise still count.
  double calibration_damping = 0.1;
  // Spectral modes: "dependent" prices both the uniform quantiser and dependent (trellis-coded)
  // quantisation and lets the plan pick per layer; "uniform" only the former. "auto": dependent
  // with calibration statistics, uniform without. (On tuning splits dependent quantisation paid
  // with K-FAC statistics, but without them its smaller Frobenius error bought less retention
  // than the uniform quantiser's on MiniLM: bench/quantiser_check.py.)
  std::string quantiser = "auto";
  // Passthrough tensors (modules_to_save heads, ...): "exact" stores them verbatim; "int8" stores
  // every floating-point one of 2 or more dimensions as int8 with a float32 scale per row
  // (format v4), vectors staying exact. Any mode.
  std::string passthrough = "exact";
  // DoRA magnitude vectors ("<module>.lora_magnitude_vector"): "coded" (format v7; planned modes,
  // when the base has the module's W: the residual from W's row norms, one step per vector chosen
  // by the plan with the layers, so the receiver needs the base too) or "exact" (verbatim, as
  // other passthrough vectors). Without a base they stay exact, with a warning.
  std::string dora_magnitudes = "coded";
  uint64_t seed = 0;
  int threads = 0;  // 0: hardware concurrency. The output does not depend on it.
  Progress progress;
  Progress warn;  // settings that work but are known to go badly
};

inline constexpr double kDefaultTargetError = 0.05;
inline constexpr double kFrobeniusBalance = 1.0;  // balance's default without statistics or proxy
// Optional first-order calibration entries: "<module>" + kUpdateGradientSuffix per LoRA module,
// and then this scalar too (the loss's second derivative along the adapter; solar.calibrate
// writes both).
inline constexpr const char* kUpdateGradientSuffix = ".update_gradient";
inline constexpr const char* kLossCurvatureKey = "solar.loss_curvature";

Container compress_adapter(const PeftAdapter& adapter, const WeightSource& base,
                           const CompressOptions& options);

struct DecompressOptions {
  int threads = 0;
  Progress progress;
};

PeftAdapter decompress_container(const Container& container, const WeightSource& base,
                                 const DecompressOptions& options = {});

// The canonical base weight W (m x n, out x in) for a layer, transposed if stored in x out.
std::vector<float> canonical_base(const WeightSource& base, const std::string& key, bool transpose,
                                  int64_t* m, int64_t* n);

// ||B A - B~ A~||_F / ||B A||_F for one module (0 when both are zero).
double relative_delta_error(const Tensor& a, const Tensor& b, const Tensor& a2, const Tensor& b2);

std::string version_string();

}  // namespace solar
