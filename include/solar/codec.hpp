// Per-layer codecs. A codec turns one LoRA layer (A, B, and, if it needs it, the base weight W)
// into a small parameter object plus byte blobs, and back. The container stores both; the
// codec defines what the blobs mean (docs/FORMAT.md, "Modes").
#pragma once
#include <cmath>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "solar/linalg.hpp"

namespace solar {

struct LayerShape {
  int64_t m = 0;  // out features
  int64_t n = 0;  // in features
  int64_t r = 0;  // LoRA rank
};

// A step code t in 0..255 means the quantiser step 2^((t - 200) / 8) (docs/FORMAT.md): the
// spectral stream's steps and (v7) DoRA magnitude residuals' alike.
inline double step_of_code(int t) { return std::exp2(static_cast<double>(t - 200) / 8); }

// A layer as a shared stream sees it: its shape and its group, the last dot-separated component
// of its module path ("model.layers.3.self_attn.q_proj" -> "q_proj"). Since format v5 a layer's
// step codes are predicted from the last coded layer of its group (docs/FORMAT.md).
struct StreamLayer {
  LayerShape shape;
  std::string group;
};
std::string stream_group(const std::string& module);

// What a codec sees of one layer. The base weight and its canonical SVD are computed on demand
// (only modes that use W pay for it) and cached for the lifetime of the context.
class LayerContext {
 public:
  LayerContext(uint64_t seed, uint32_t layer_index, LayerShape shape,
               std::function<Matrix()> load_base);
  uint64_t seed() const { return seed_; }
  uint32_t layer_index() const { return layer_index_; }
  const LayerShape& shape() const { return shape_; }
  const Matrix& base() const;  // W, m x n
  const Svd& svd() const;      // full canonical SVD of W

  // How much this layer's errors count when a budget is planned across layers (e.g. PEFT's
  // scaling squared), and optionally calibration statistics with which errors are measured in
  // the layer's outputs (input moment) and in the loss (output-gradient moment too).
  double weight = 1.0;
  std::optional<Matrix> input_moment;   // n x n, E[x x^T] of the layer's inputs
  std::optional<Matrix> output_moment;  // m x m, E[g g^T] of the loss gradient at its outputs
  // m x n, the mean loss gradient with respect to B A (PEFT's scaling times dL/dW) at the adapted
  // model: dropping a component the loss still pulls on costs loss to first order.
  std::optional<Matrix> update_gradient;
  std::function<void(const std::string&)> warn;  // settings that work but are known to go badly

 private:
  uint64_t seed_;
  uint32_t layer_index_;
  LayerShape shape_;
  std::function<Matrix()> load_base_;
  mutable std::optional<Matrix> base_;
  mutable std::optional<Svd> svd_;
};

struct Factors {
  Matrix A;  // r x n
  Matrix B;  // m x r
};

struct EncodedLayer {
  nlohmann::json params;                    // mode-specific, small
  std::vector<std::vector<uint8_t>> blobs;  // mode-specific, in the order the mode defines
};

// One operating point of a layer: what it loses (weighted squared error of B A), what it costs
// (estimated bytes in the stream), and the codec's own settings from which candidate_symbols
// rebuilds it exactly. Points are cheap to list; only the chosen one is ever encoded.
struct Candidate {
  double distortion = 0;
  size_t bytes = 0;
  std::vector<int32_t> setting;
  // With an update gradient: the loss the point's dropped components cost to first order (never
  // negative). The pipeline converts it into the metric's units once all layers are listed.
  double first_order = 0;
};

class LayerCodec {
 public:
  virtual ~LayerCodec() = default;
  virtual std::string mode() const = 0;
  virtual bool needs_base() const = 0;
  // Modes whose budget is planned across layers list each layer's operating points instead of
  // encoding at fixed settings; the pipeline picks one point per layer. The first candidate
  // drops the layer (its distortion is the whole update measured in the mode's metric).
  // Since format v2 such a mode codes all its layers into one range-coded stream (adaptive
  // models carried from layer to layer, one flush), as a list of integer symbols per layer.
  virtual bool plans_budget() const { return false; }
  virtual std::vector<Candidate> candidates(const LayerContext&, const Factors&) const { return {}; }
  // The symbols of one of candidates()'s points (given the same context and factors).
  virtual std::vector<int32_t> candidate_symbols(const LayerContext& ctx, const Factors& f, const Candidate& c) const;
  // Writes the current syntax (format v5's, which v6 keeps).
  virtual std::vector<uint8_t> write_stream(const std::vector<StreamLayer>& layers,
                                            const std::vector<std::vector<int32_t>>& symbols) const;
  // `version`: the container's format version (a stream's syntax may differ between versions).
  virtual std::vector<std::vector<int32_t>> read_stream(const std::vector<StreamLayer>& layers, const std::vector<uint8_t>& stream,
                                                        const std::string& where, uint32_t version) const;
  virtual Factors decode_symbols(const LayerContext& ctx, const std::vector<int32_t>& symbols) const;
  // What each layer of a stream holds, for `solar inspect`: {"components": kept, "quantiser":
  // "uniform" or "dependent", "bytes": its share of the stream (bits it cost as coded, / 8)}, one
  // object per layer.
  virtual std::vector<nlohmann::json> stream_summary(const std::vector<StreamLayer>& layers,
                                                     const std::vector<std::vector<int32_t>>& symbols, uint32_t version) const;
  virtual EncodedLayer encode(const LayerContext& ctx, const Factors& f) const = 0;
  // Validates params and blob sizes against the shape before using them; throws Format.
  virtual Factors decode(const LayerContext& ctx, const EncodedLayer& e) const = 0;
};

// How paper mode picks its k coefficients. The file format (and the decoder) is the same for all.
enum class PaperSolver {
  Paper,  // as published: least squares over the whole pool, keep the k largest |coefficients|
  Refit,  // repaired: the same support, coefficients refitted by least squares on it
  Omp,    // repaired: orthogonal matching pursuit (greedy support, refit after each pick)
};

// Settings of the paper's method (SOLAR, Sec. 2 and App. D).
struct PaperOptions {
  int64_t pool_a = 1000, pool_b = 1000;  // N_A, N_B
  std::optional<int64_t> keep_a, keep_b;  // k_A, k_B; unset -> keep_fraction * N
  double keep_fraction = 0.3;
  int bits = 8;        // 32, 16, 8 or 4
  double noise = 1.0;  // sigma of the Gaussian perturbation
  PaperSolver solver = PaperSolver::Paper;
};

// The solver spelled "paper", "refit" or "omp" (as the CLI and the Python API take it); throws
// InvalidInput for anything else.
PaperSolver paper_solver_from_name(const std::string& name);

std::unique_ptr<LayerCodec> make_paper_codec(const PaperOptions& options);

// The `spectral` mode (docs/FORMAT.md): B A's own singular components, a uniform quantiser with
// one step per layer, an error-compensating refit of the right factor, adaptive range coding.
// Needs no base weight. `rotate_to_base` codes the components in W's singular basis instead
// (mode `spectral-w`), which tests the paper's premise with a good coder.
// `dependent` also offers dependent (trellis-coded) quantisation to the plan (format v3).
std::unique_ptr<LayerCodec> make_spectral_codec(bool rotate_to_base = false, bool dependent = true);
// The codec that decodes layers of `mode` (options come from each layer's params).
std::unique_ptr<LayerCodec> make_decoder(const std::string& mode, const std::string& where);

// Coefficient quantisation shared by modes: 32 -> float32; 16/8/4 -> symmetric uniform integers
// with one float32 scale (max|c| / (2^(bits-1) - 1)) stored first. 4-bit values are packed two
// per byte, low nibble first, two's complement.
std::vector<uint8_t> quantize_coefficients(const std::vector<double>& c, int bits);
std::vector<double> dequantize_coefficients(const uint8_t* p, size_t nbytes, size_t count, int bits,
                                            const std::string& where);
size_t quantized_size(size_t count, int bits);

// Selection masks: bit i of the pool lives in byte i / 8, bit i % 8 (LSB first).
std::vector<uint8_t> pack_mask(const std::vector<uint32_t>& selected, size_t pool);
std::vector<uint32_t> unpack_mask(const uint8_t* p, size_t nbytes, size_t pool, const std::string& where);

}  // namespace solar
