// The `spectral` and `spectral-w` modes (docs/FORMAT.md, "Modes").
//
// B A = X Y^T with X = U sqrt(S) from B A's own thin SVD (computed from the factors, never
// densely). One uniform step per layer quantises the first k columns of X; Y is then refitted by
// least squares to the quantised X (so it absorbs X's rounding error) and quantised with its own
// step. Integers are range-coded with adaptive contexts. A layer offers many (step, k) points;
// the pipeline picks one per layer to meet a global budget.
// `spectral-w` codes X and Y in the coordinates of W's singular vectors (U_W^T X, V_W^T Y).
#include <algorithm>
#include <map>
#include <numeric>
#include <bit>
#include <cmath>

#include "budget_planner.hpp"
#include "solar/codec.hpp"
#include "solar/error.hpp"
#include "solar/range_coder.hpp"

namespace solar {
namespace {

constexpr int kStepBits = 8;
constexpr int kStepBias = 200, kStepsPerOctave = 8;  // step = 2^((t - 200) / 8)
constexpr double kMaxQuant = 1 << 29;
constexpr double kDeadZones[] = {0.0, 0.2};  // rounding offsets tried for every step

double step_of(int t) { return std::exp2(static_cast<double>(t - kStepBias) / kStepsPerOctave); }

int rank_bits(int64_t r) { return std::bit_width(static_cast<uint64_t>(r)); }

// Columns of a matrix as quantised integers (column-major order of the stream).
struct Coded {
  std::vector<int32_t> q;  // rows * k, column by column
  Matrix value;            // rows x k, dequantised, in original coordinates
};

// Quantises the first k columns of `m` (rows x >=k), after rotating by R^T when R is given.
// Rounds v to an integer, toward zero by `dead_zone` (0: nearest; larger values trade a little
// distortion for many more zeros, which the entropy coder makes cheap).
int32_t round_dz(double v, double dead_zone) {
  const double a = std::floor(std::fabs(v) + 0.5 - dead_zone);
  const auto q = static_cast<int32_t>(std::max(0.0, a));
  return v < 0 ? -q : q;
}

// Returns how many leading columns could be quantised (all k unless a value overflows).
int64_t quantize_columns(const Matrix& m, int64_t k, double step, const Matrix* rot, Coded& out, double dead_zone = 0.0) {
  const int64_t rows = m.rows;
  Matrix coords(rows, k);
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t j = 0; j < k; ++j) coords(i, j) = m(i, j);
  if (rot) coords = matmul(*rot, coords, /*trans_a=*/true);
  out.q.assign(static_cast<size_t>(rows * k), 0);
  Matrix deq(rows, k);
  int64_t ok = k;
  for (int64_t j = 0; j < k && ok == k; ++j)
    for (int64_t i = 0; i < rows; ++i) {
      const double v = coords(i, j) / step;
      if (!(std::fabs(v) < kMaxQuant)) {
        ok = j;  // this column and the ones after it stay zero
        for (int64_t t = 0; t < i; ++t) deq(t, j) = 0;
        break;
      }
      const int32_t q = round_dz(v, dead_zone);
      out.q[static_cast<size_t>(j * rows + i)] = q;
      deq(i, j) = q * step;
    }
  out.value = rot ? matmul(*rot, deq) : deq;
  return ok;
}

// Like quantize_columns (no rotation), but each column's rounding errors are fed forward to the
// coordinates not yet quantised so as to minimise e^T H e (GPTQ, Frantar et al. 2022), where
// `hinv_u` is inverse_cholesky_upper(H). As in GPTQ, rows go in blocks: feedback inside a block
// is applied row by row, to the rows after it in one matrix product. Columns stay independent.
int64_t quantize_columns_feedback(const Matrix& m, int64_t k, double step, const Matrix& hinv_u, Coded& out,
                                  double dead_zone = 0.0) {
  constexpr int64_t kBlock = 32;
  const int64_t rows = m.rows;
  Matrix w(rows, k);
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t j = 0; j < k; ++j) w(i, j) = m(i, j);
  out.q.assign(static_cast<size_t>(rows * k), 0);
  out.value = Matrix(rows, k);
  int64_t ok = k;
  for (int64_t b0 = 0; b0 < rows; b0 += kBlock) {
    const int64_t b1 = std::min(rows, b0 + kBlock);
    Matrix err(b1 - b0, k);
    for (int64_t i = b0; i < b1; ++i) {
      for (int64_t j = 0; j < k; ++j) {
        const double v = w(i, j) / step;
        if (!(std::fabs(v) < kMaxQuant)) {
          ok = std::min(ok, j);  // this column (and, for the caller, the ones after it) is lost
          continue;
        }
        const int32_t q = round_dz(v, dead_zone);
        out.q[static_cast<size_t>(j * rows + i)] = q;
        out.value(i, j) = q * step;
        const double e = (w(i, j) - q * step) / hinv_u(i, i);
        err(i - b0, j) = e;
        for (int64_t t = i + 1; t < b1; ++t) w(t, j) -= e * hinv_u(i, t);
      }
    }
    if (b1 < rows) {
      Matrix h(b1 - b0, rows - b1);
      for (int64_t i = b0; i < b1; ++i)
        for (int64_t t = b1; t < rows; ++t) h(i - b0, t - b1) = hinv_u(i, t);
      const Matrix update = matmul(h, err, /*trans_a=*/true);  // (rows - b1) x k
      for (int64_t t = b1; t < rows; ++t)
        for (int64_t j = 0; j < k; ++j) w(t, j) -= update(t - b1, j);
    }
  }
  for (int64_t j = ok; j < k; ++j)  // lost columns are left out entirely
    for (int64_t i = 0; i < rows; ++i) {
      out.q[static_cast<size_t>(j * rows + i)] = 0;
      out.value(i, j) = 0;
    }
  return ok;
}

Matrix dequantize_columns(const std::vector<int32_t>& q, int64_t rows, int64_t k, double step, const Matrix* rot) {
  Matrix deq(rows, k);
  for (int64_t j = 0; j < k; ++j)
    for (int64_t i = 0; i < rows; ++i) deq(i, j) = q[static_cast<size_t>(j * rows + i)] * step;
  return rot ? matmul(*rot, deq) : deq;
}

double frob_dot(const Matrix& a, const Matrix& b) {  // sum of a .* b, same shapes
  double s = 0;
  for (size_t i = 0; i < a.data.size(); ++i) s += a.data[i] * b.data[i];
  return s;
}

double trace_product(const Matrix& a, const Matrix& b) {  // tr(a b), a p x q, b q x p
  double s = 0;
  for (int64_t i = 0; i < a.rows; ++i)
    for (int64_t j = 0; j < a.cols; ++j) s += a(i, j) * b(j, i);
  return s;
}

struct SqrtPair {
  Matrix root, inverse_root;  // inverse_root only when asked for
};

// M^1/2 and, if asked, M^-1/2 of a symmetric positive definite matrix (eigendecomposition via
// the SVD).
SqrtPair sqrt_pair(const Matrix& m, bool with_inverse) {
  const Svd eig = full_svd(m);
  Matrix us = eig.U, ui = eig.U;
  for (int64_t t = 0; t < m.rows; ++t) {
    const double root = std::sqrt(std::max(eig.S[static_cast<size_t>(t)], 1e-300));
    for (int64_t i = 0; i < m.rows; ++i) {
      us(i, t) *= root;
      ui(i, t) /= root;
    }
  }
  return {matmul(us, eig.U, false, true), with_inverse ? matmul(ui, eig.U, false, true) : Matrix()};
}

void check_square(const Matrix* m, int64_t dim, const char* which) {
  if (m && (m->rows != dim || m->cols != dim))
    throw Error(ErrorKind::Mismatch, "calibration", std::string(which) + " moment is " + std::to_string(m->rows) + "x" +
                                                        std::to_string(m->cols) + " but the layer needs " + std::to_string(dim) + "x" + std::to_string(dim));
}

// Step-code offset that scales a side's step by sqrt(dim / tr(M)).
int step_offset(const Matrix* m, int64_t dim) {
  if (!m) return 0;
  double tr = 0;
  for (int64_t i = 0; i < dim; ++i) tr += (*m)(i, i);
  if (!(tr > 0)) return 0;
  return static_cast<int>(std::lround(0.5 * std::log2(static_cast<double>(dim) / tr) * kStepsPerOctave));
}

// Everything a layer's operating points share: the components to code, the metric, and the
// error-feedback factors. Built once per layer by candidates() and again by candidate_symbols().
struct LayerSetup {
  const Factors* f = nullptr;
  const Matrix* sig = nullptr;  // input moment S (n x n) or null
  const Matrix* gm = nullptr;   // output-gradient moment G (m x m) or null
  const Matrix* ru = nullptr;   // rotations into W's singular bases (spectral-w) or null
  const Matrix* rv = nullptr;
  Matrix x;                     // components to code: B A = X Y^T (Y is refitted, never coded as is)
  Matrix as;                    // A S (r x n)
  Matrix hx, hy;                // inverse Cholesky factors for error feedback (empty: none)
  double energy = 0;            // the whole update in the metric
  double rms = 0;               // rms of X's entries
  int y_offset = 0;             // Y's step code relative to X's
  Matrix left(const Matrix& v) const { return gm ? matmul(*gm, v) : v; }   // G V
  Matrix right(const Matrix& v) const { return sig ? matmul(*sig, v) : v; }  // S V
};

// One operating point: (k components, X step code tx, Y step code ty, dead-zone index).
struct Point {
  int64_t k;
  int tx, ty, dz;
};

class SpectralCodec final : public LayerCodec {
 public:
  explicit SpectralCodec(bool rotate) : rotate_(rotate) {}
  std::string mode() const override { return rotate_ ? "spectral-w" : "spectral"; }
  bool needs_base() const override { return rotate_; }
  bool plans_budget() const override { return true; }

  std::vector<Candidate> candidates(const LayerContext& ctx, const Factors& f) const override {
    const LayerShape& s = ctx.shape();
    const LayerSetup u = setup(ctx, f);
    const double w = ctx.weight;
    std::vector<Candidate> out;
    out.push_back({w * u.energy, BitCounter::bytes_for(header_cost(s, 0, 0, 0)), {0, kStepBias, kStepBias, 0}});  // drop the layer
    if (!(u.rms > 0)) return out;
    const int t_top = std::clamp(static_cast<int>(std::ceil(std::log2(8 * u.rms) * kStepsPerOctave)) + kStepBias, 0, 255);
    // Prices the points (tx, dead zone dz, k in ks, Y step code tx + offset + dy for dy in dys).
    auto price = [&](int tx, int dz, const std::vector<int64_t>& ks, const std::vector<int>& dys) {
      // Columns are quantised independently (feedback stays within a column), so X's first k
      // columns are a prefix of all of them, and so are their bit costs.
      Coded all;
      const int64_t ok = quantize_side(u.x, s.r, step_of(tx), u.ru, u.hx, dz, all);
      const std::vector<uint64_t> x_cost = column_costs(all.q.data(), s.m, ok);
      for (int64_t k : ks) {
        if (k > ok) continue;
        const Coded cx = prefix(all, s.m, k);
        const Refit fit = refit(u, cx);
        for (int dy : dys) {
          const int ty = std::clamp(tx + u.y_offset + dy, 0, 255);
          Coded cy;
          if (!quantize_y(u, fit, k, ty, dz, cy)) continue;
          const uint64_t bits = header_cost(s, k, tx, ty) + x_cost[static_cast<size_t>(k)] + column_costs(cy.q.data(), s.n, k).back();
          out.push_back({w * distortion(u, fit, cy), BitCounter::bytes_for(bits), {static_cast<int32_t>(k), tx, ty, dz}});
        }
      }
    };
    // Coarse to fine: every step and every k with plain rounding and Y's default step, then the
    // dead-zone and Y-step variants only where those points reach the layer's Pareto front.
    std::vector<int64_t> all_k(static_cast<size_t>(s.r));
    std::iota(all_k.begin(), all_k.end(), int64_t{1});
    for (int tx = t_top; tx >= std::max(0, t_top - 16 * kStepsPerOctave); tx -= 2) price(tx, 0, all_k, {0});
    std::map<int, std::vector<int64_t>> refine;  // tx -> the ks of its points on the front
    for (size_t i : pareto_indices(out)) refine[out[i].setting[1]].push_back(out[i].setting[0]);
    for (auto& [tx, ks] : refine) {
      std::sort(ks.begin(), ks.end());
      price(tx, 0, ks, {-2, 2});
      for (int dz = 1; dz < static_cast<int>(std::size(kDeadZones)); ++dz) price(tx, dz, ks, {-2, 0, 2});
    }
    return out;
  }

  std::vector<int32_t> candidate_symbols(const LayerContext& ctx, const Factors& f, const Candidate& c) const override {
    const LayerShape& s = ctx.shape();
    const std::string where = mode() + " layer " + std::to_string(ctx.layer_index());
    if (c.setting.size() != 4) throw Error(ErrorKind::InvalidInput, where, "not an operating point of this mode");
    const Point p{c.setting[0], c.setting[1], c.setting[2], c.setting[3]};
    if (p.k < 0 || p.k > s.r || p.dz < 0 || p.dz >= static_cast<int>(std::size(kDeadZones)))
      throw Error(ErrorKind::InvalidInput, where, "not an operating point of this layer");
    if (p.k == 0) return {0};
    const LayerSetup u = setup(ctx, f);
    Coded all;  // exactly as candidates() computed it: all r columns, then the prefix
    if (quantize_side(u.x, s.r, step_of(p.tx), u.ru, u.hx, p.dz, all) < p.k)
      throw Error(ErrorKind::InvalidInput, where, "operating point cannot be rebuilt");
    const Coded cx = prefix(all, s.m, p.k);
    const Refit fit = refit(u, cx);
    Coded cy;
    if (!quantize_y(u, fit, p.k, p.ty, p.dz, cy)) throw Error(ErrorKind::InvalidInput, where, "operating point cannot be rebuilt");
    return symbols_of(p.k, p.tx, p.ty, cx.q, cy.q);
  }

  std::vector<uint8_t> write_stream(const std::vector<LayerShape>& shapes, const std::vector<std::vector<int32_t>>& symbols) const override {
    if (shapes.size() != symbols.size()) throw Error(ErrorKind::InvalidInput, mode(), "one symbol list per layer");
    RangeEncoder e;
    StreamModels models;
    for (size_t i = 0; i < shapes.size(); ++i) put_layer(e, models, shapes[i], symbols[i]);
    return e.finish();
  }

  std::vector<std::vector<int32_t>> read_stream(const std::vector<LayerShape>& shapes, const std::vector<uint8_t>& stream,
                                                const std::string& where) const override {
    RangeDecoder d(stream.data(), stream.size());
    StreamModels models;
    std::vector<std::vector<int32_t>> out;
    for (size_t i = 0; i < shapes.size(); ++i) out.push_back(get_layer(d, models, shapes[i], where + " (stream layer " + std::to_string(i) + ")"));
    return out;
  }

  std::vector<nlohmann::json> stream_summary(const std::vector<LayerShape>& shapes,
                                             const std::vector<std::vector<int32_t>>& symbols) const override {
    if (shapes.size() != symbols.size()) throw Error(ErrorKind::InvalidInput, mode(), "one symbol list per layer");
    BitCounter e;  // the stream's own coding, layer after layer: each layer's cost given the ones before
    StreamModels models;
    std::vector<nlohmann::json> out;
    for (size_t i = 0; i < shapes.size(); ++i) {
      const uint64_t before = e.cost();
      put_layer(e, models, shapes[i], symbols[i]);
      out.push_back({{"components", symbols[i].empty() ? 0 : symbols[i][0]},
                     {"bytes", static_cast<double>(e.cost() - before) / (8.0 * BitCounter::kCostScale)}});
    }
    return out;
  }

  Factors decode_symbols(const LayerContext& ctx, const std::vector<int32_t>& sym) const override {
    const std::string where = mode() + " layer " + std::to_string(ctx.layer_index());
    const LayerShape& s = ctx.shape();
    Factors f{Matrix(s.r, s.n), Matrix(s.m, s.r)};
    if (sym.empty() || sym[0] < 0 || sym[0] > s.r) throw Error(ErrorKind::Format, where, "bad component count");
    const int64_t k = sym[0];
    if (k == 0) return f;
    if (sym.size() != static_cast<size_t>(3 + (s.m + s.n) * k)) throw Error(ErrorKind::Format, where, "wrong number of symbols");
    const std::vector<int32_t> qx(sym.begin() + 3, sym.begin() + 3 + s.m * k), qy(sym.begin() + 3 + s.m * k, sym.end());
    const Matrix x = dequantize_columns(qx, s.m, k, step_of(sym[1]), rotate_ ? &ctx.svd().U : nullptr);
    const Matrix y = dequantize_columns(qy, s.n, k, step_of(sym[2]), rotate_ ? &ctx.svd().V : nullptr);
    for (int64_t j = 0; j < k; ++j) {
      for (int64_t i = 0; i < s.m; ++i) f.B(i, j) = x(i, j);
      for (int64_t i = 0; i < s.n; ++i) f.A(j, i) = y(i, j);
    }
    return f;
  }

  EncodedLayer encode(const LayerContext& ctx, const Factors& f) const override {
    throw Error(ErrorKind::InvalidInput, mode(), "this mode is planned across layers; use compress_adapter");
  }

  // Format v1: one blob per layer, fresh models (the v2 stream's layer syntax, minus sharing).
  Factors decode(const LayerContext& ctx, const EncodedLayer& e) const override {
    const std::string where = mode() + " layer " + std::to_string(ctx.layer_index());
    const LayerShape& s = ctx.shape();
    if (e.blobs.size() != 1) throw Error(ErrorKind::Format, where, "expected 1 blob");
    const auto& blob = e.blobs[0];
    RangeDecoder dec(blob.data(), blob.size());
    const auto k = static_cast<int64_t>(dec.direct(rank_bits(s.r)));
    if (k > s.r) throw Error(ErrorKind::Format, where, "more components than the rank");
    if (k == 0) return decode_symbols(ctx, {0});
    const int tx = static_cast<int>(dec.direct(kStepBits));
    const int ty = static_cast<int>(dec.direct(kStepBits));
    IntModel mx, my;
    std::vector<int32_t> sym{static_cast<int32_t>(k), tx, ty};
    get_columns(dec, mx, sym, s.m, k, where);
    get_columns(dec, my, sym, s.n, k, where);
    return decode_symbols(ctx, sym);
  }

 private:
  // Appends k columns of `rows` integers, each a new run of `model` (put_columns' inverse).
  static void get_columns(RangeDecoder& d, IntModel& model, std::vector<int32_t>& out, int64_t rows, int64_t k,
                          const std::string& where) {
    out.reserve(out.size() + static_cast<size_t>(rows * k));
    for (int64_t j = 0; j < k; ++j) {
      model.reset_run();
      for (int64_t i = 0; i < rows; ++i) out.push_back(model.decode(d, where));
    }
  }
  static std::vector<int32_t> symbols_of(int64_t k, int tx, int ty, const std::vector<int32_t>& qx, const std::vector<int32_t>& qy) {
    std::vector<int32_t> sym{static_cast<int32_t>(k), tx, ty};
    sym.insert(sym.end(), qx.begin(), qx.end());
    sym.insert(sym.end(), qy.begin(), qy.end());
    return sym;
  }

  // Adaptive state carried through a v2 stream from one layer to the next.
  struct StreamModels {
    IntModel step_change, step_gap, x, y;
    int previous_tx = kStepBias;
  };

  // One layer of a v2 stream: k (bit_width(r) direct bits); if k > 0, tx - previous tx and
  // ty - tx (signed integers, their own models), then X's k columns and Y's k columns.
  template <class Coder>
  static void put_header(Coder& e, StreamModels& m, const LayerShape& s, int64_t k, int tx, int ty) {
    e.direct(static_cast<uint32_t>(k), rank_bits(s.r));
    if (k == 0) return;
    m.step_change.encode(e, tx - m.previous_tx);
    m.step_gap.encode(e, ty - tx);
    m.previous_tx = tx;
  }
  template <class Coder>
  static void put_columns(Coder& e, IntModel& model, const int32_t* q, int64_t rows, int64_t k) {
    for (int64_t j = 0; j < k; ++j) {
      model.reset_run();
      for (int64_t i = 0; i < rows; ++i) model.encode(e, q[j * rows + i]);
    }
  }
  template <class Coder>
  static void put_layer(Coder& e, StreamModels& m, const LayerShape& s, int64_t k, int tx, int ty, const int32_t* qx,
                        const int32_t* qy) {
    put_header(e, m, s, k, tx, ty);
    if (k == 0) return;
    put_columns(e, m.x, qx, s.m, k);
    put_columns(e, m.y, qy, s.n, k);
  }
  template <class Coder>
  static void put_layer(Coder& e, StreamModels& m, const LayerShape& s, const std::vector<int32_t>& sym) {
    const int64_t k = sym.empty() ? -1 : sym[0];
    if (k < 0 || k > s.r || sym.size() != static_cast<size_t>(k == 0 ? 1 : 3 + (s.m + s.n) * k))
      throw Error(ErrorKind::InvalidInput, "spectral stream", "symbols do not match the layer's shape");
    put_layer(e, m, s, k, k ? sym[1] : 0, k ? sym[2] : 0, sym.data() + 3, sym.data() + 3 + s.m * k);
  }
  static std::vector<int32_t> get_layer(RangeDecoder& d, StreamModels& m, const LayerShape& s, const std::string& where) {
    const auto k = static_cast<int64_t>(d.direct(rank_bits(s.r)));
    if (k > s.r) throw Error(ErrorKind::Format, where, "more components than the rank");
    if (k == 0) return {0};
    const int64_t tx = m.previous_tx + static_cast<int64_t>(m.step_change.decode(d, where));
    const int64_t ty = tx + m.step_gap.decode(d, where);
    if (tx < 0 || tx > 255 || ty < 0 || ty > 255) throw Error(ErrorKind::Format, where, "step code out of range");
    m.previous_tx = static_cast<int>(tx);
    std::vector<int32_t> sym{static_cast<int32_t>(k), static_cast<int32_t>(tx), static_cast<int32_t>(ty)};
    get_columns(d, m.x, sym, s.m, k, where);
    get_columns(d, m.y, sym, s.n, k, where);
    return sym;
  }
  // What a point costs as a layer of a fresh stream (an estimate: in a real stream the models
  // have learned from the layers before it, so it is usually a little cheaper). The header, X
  // and Y use separate models, so their costs add up; X's cost after each column serves every k.
  static uint64_t header_cost(const LayerShape& s, int64_t k, int tx, int ty) {
    BitCounter e;
    StreamModels m;
    put_header(e, m, s, k, tx, ty);
    return e.cost();
  }
  static std::vector<uint64_t> column_costs(const int32_t* q, int64_t rows, int64_t k) {  // [0, after 1, ..., after k]
    BitCounter e;
    IntModel model;
    std::vector<uint64_t> out{0};
    for (int64_t j = 0; j < k; ++j) {
      model.reset_run();
      for (int64_t i = 0; i < rows; ++i) model.encode(e, q[j * rows + i]);
      out.push_back(e.cost());
    }
    return out;
  }

  struct Refit {
    Matrix gx, xgx, bgx, yk;  // G X~, X~^T G X~, B^T G X~, refitted Y (n x k)
  };

  LayerSetup setup(const LayerContext& ctx, const Factors& f) const {
    const LayerShape& s = ctx.shape();
    LayerSetup u;
    u.f = &f;
    u.ru = rotate_ ? &ctx.svd().U : nullptr;
    u.rv = rotate_ ? &ctx.svd().V : nullptr;
    // Error metric: D = tr(G E S E^T) for E = B A - X~ Y~^T, with S the input second moment and G
    // the output-gradient second moment when calibrated (a Kronecker-factored Fisher: D
    // approximates twice the loss increase), identities otherwise (Frobenius).
    u.sig = ctx.input_moment ? &*ctx.input_moment : nullptr;
    u.gm = ctx.output_moment ? &*ctx.output_moment : nullptr;
    check_square(u.sig, s.n, "input");
    check_square(u.gm, s.m, "output");

    // Components of B A optimal in that metric: SVD of (G^1/2 B)(A S^1/2), X mapped back.
    if (s.m >= s.r && s.n >= s.r) {
      const SqrtPair lg = u.gm ? sqrt_pair(*u.gm, true) : SqrtPair{};
      const Qr qb = thin_qr(u.gm ? matmul(lg.root, f.B) : f.B);
      const Qr qa = thin_qr((u.sig ? matmul(f.A, sqrt_pair(*u.sig, false).root) : f.A).transposed());
      const Svd core = full_svd(matmul(qb.R, qa.R, false, true));
      u.x = matmul(qb.Q, core.U);
      for (int64_t j = 0; j < s.r; ++j) {
        const double sq = std::sqrt(core.S[static_cast<size_t>(j)]);
        for (int64_t i = 0; i < s.m; ++i) u.x(i, j) *= sq;
      }
      if (u.gm) u.x = matmul(lg.inverse_root, u.x);
    } else {  // rank above a dimension: code the factors as they are
      u.x = f.B;
    }
    // D = tr(B^T G B A S A^T) - 2 <B^T G X~, A S Y~> + tr(X~^T G X~ Y~^T S Y~).
    u.as = u.sig ? matmul(f.A, *u.sig) : f.A;  // r x n
    u.energy = trace_product(matmul(f.B, u.left(f.B), true), matmul(u.as, f.A, false, true));
    for (double v : u.x.data) u.rms += v * v;
    u.rms = std::sqrt(u.rms / std::max<double>(1, static_cast<double>(u.x.data.size())));
    // A weighted side's errors count tr(M)/dim times as much: its step shrinks by the square root.
    u.y_offset = step_offset(u.sig, s.n) - step_offset(u.gm, s.m);
    // With statistics (and no rotation), rounding errors are shaped by them: GPTQ-style feedback.
    if (!rotate_ && u.gm) u.hx = inverse_cholesky_upper(*u.gm);
    if (!rotate_ && u.sig) u.hy = inverse_cholesky_upper(*u.sig);
    return u;
  }

  static int64_t quantize_side(const Matrix& v, int64_t k, double step, const Matrix* rot, const Matrix& h, int dz, Coded& c) {
    const double dead_zone = kDeadZones[dz];
    return h.rows > 0 ? quantize_columns_feedback(v, k, step, h, c, dead_zone) : quantize_columns(v, k, step, rot, c, dead_zone);
  }

  static Coded prefix(const Coded& all, int64_t rows, int64_t k) {
    Coded c;
    c.q.assign(all.q.begin(), all.q.begin() + rows * k);
    c.value = Matrix(rows, k);
    for (int64_t i = 0; i < rows; ++i)
      for (int64_t j = 0; j < k; ++j) c.value(i, j) = all.value(i, j);
    return c;
  }

  // Refits Y to the quantised X in the metric: Y^T = (X~^T G X~)^-1 X~^T G B A.
  static Refit refit(const LayerSetup& u, const Coded& cx) {
    Refit fit;
    fit.gx = u.left(cx.value);
    fit.xgx = matmul(cx.value, fit.gx, true);  // k x k
    fit.bgx = matmul(u.f->B, fit.gx, true);    // r x k = B^T G X~
    fit.yk = solve_spd(fit.xgx, matmul(u.f->A, fit.bgx, true).transposed()).transposed();  // n x k
    return fit;
  }

  static bool quantize_y(const LayerSetup& u, const Refit& fit, int64_t k, int ty, int dz, Coded& cy) {
    return quantize_side(fit.yk, k, step_of(ty), u.rv, u.hy, dz, cy) == k;
  }

  static double distortion(const LayerSetup& u, const Refit& fit, const Coded& cy) {
    const double cross = frob_dot(fit.bgx, matmul(u.as, cy.value));
    const double self = trace_product(fit.xgx, matmul(cy.value, u.right(cy.value), true));
    return std::max(0.0, u.energy - 2 * cross + self);
  }

  bool rotate_;
};

}  // namespace

std::unique_ptr<LayerCodec> make_spectral_codec(bool rotate_to_base) {
  return std::make_unique<SpectralCodec>(rotate_to_base);
}

}  // namespace solar
