// The `spectral` and `spectral-w` modes (docs/FORMAT.md, "Modes").
//
// B A = X Y^T with X = U sqrt(S), Y = V sqrt(S) from B A's own thin SVD (computed from the
// factors, never densely). One uniform step per layer quantises the first k columns of X; Y is
// then refitted by least squares to the quantised X (so it absorbs X's rounding error) and
// quantised with the same step. Integers are range-coded with adaptive contexts. A layer offers
// many (step, k) points; the pipeline picks one per layer to meet a global budget.
// `spectral-w` codes X and Y in the coordinates of W's singular vectors (U_W^T X, V_W^T Y).
#include <algorithm>
#include <bit>
#include <cmath>

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

bool quantize_columns(const Matrix& m, int64_t k, double step, const Matrix* rot, Coded& out, double dead_zone = 0.0) {
  const int64_t rows = m.rows;
  Matrix coords(rows, k);
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t j = 0; j < k; ++j) coords(i, j) = m(i, j);
  if (rot) coords = matmul(*rot, coords, /*trans_a=*/true);
  out.q.assign(static_cast<size_t>(rows * k), 0);
  Matrix deq(rows, k);
  for (int64_t j = 0; j < k; ++j)
    for (int64_t i = 0; i < rows; ++i) {
      const double v = coords(i, j) / step;
      if (!(std::fabs(v) < kMaxQuant)) return false;
      const int32_t q = round_dz(v, dead_zone);
      out.q[static_cast<size_t>(j * rows + i)] = q;
      deq(i, j) = q * step;
    }
  out.value = rot ? matmul(*rot, deq) : deq;
  return true;
}

// Upper Cholesky factor U of H^-1 (H^-1 = U^T U) for error-feedback quantisation.
Matrix inverse_cholesky_upper(const Matrix& h) {
  const int64_t n = h.rows;
  Matrix eye(n, n);
  for (int64_t i = 0; i < n; ++i) eye(i, i) = 1.0;
  Matrix inv = solve_spd(h, eye);
  // Symmetrise, then the lower Cholesky L of inv; U = L^T.
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < i; ++j) inv(i, j) = inv(j, i) = 0.5 * (inv(i, j) + inv(j, i));
  Matrix l(n, n);
  for (int64_t j = 0; j < n; ++j) {
    double d = inv(j, j);
    for (int64_t t = 0; t < j; ++t) d -= l(j, t) * l(j, t);
    const double ljj = std::sqrt(std::max(d, 1e-300));
    l(j, j) = ljj;
    for (int64_t i = j + 1; i < n; ++i) {
      double v = inv(i, j);
      for (int64_t t = 0; t < j; ++t) v -= l(i, t) * l(j, t);
      l(i, j) = v / ljj;
    }
  }
  return l.transposed();
}

// Like quantize_columns (no rotation), but each column's rounding errors are fed forward to the
// coordinates not yet quantised so as to minimise e^T H e (GPTQ, Frantar et al. 2022), where
// `hinv_u` is inverse_cholesky_upper(H).
bool quantize_columns_feedback(const Matrix& m, int64_t k, double step, const Matrix& hinv_u, Coded& out,
                               double dead_zone = 0.0) {
  const int64_t rows = m.rows;
  out.q.assign(static_cast<size_t>(rows * k), 0);
  out.value = Matrix(rows, k);
  std::vector<double> w(static_cast<size_t>(rows));
  for (int64_t j = 0; j < k; ++j) {
    for (int64_t i = 0; i < rows; ++i) w[static_cast<size_t>(i)] = m(i, j);
    for (int64_t i = 0; i < rows; ++i) {
      const double v = w[static_cast<size_t>(i)] / step;
      if (!(std::fabs(v) < kMaxQuant)) return false;
      const int32_t q = round_dz(v, dead_zone);
      out.q[static_cast<size_t>(j * rows + i)] = q;
      out.value(i, j) = q * step;
      const double err = (w[static_cast<size_t>(i)] - q * step) / hinv_u(i, i);
      for (int64_t t = i + 1; t < rows; ++t) w[static_cast<size_t>(t)] -= err * hinv_u(i, t);
    }
  }
  return true;
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
  Matrix root, inverse_root;
};

// M^1/2 and M^-1/2 of a symmetric positive definite matrix (eigendecomposition via the SVD).
SqrtPair sqrt_pair(const Matrix& m) {
  const Svd eig = full_svd(m);
  Matrix us = eig.U, ui = eig.U;
  for (int64_t t = 0; t < m.rows; ++t) {
    const double ev = std::max(eig.S[static_cast<size_t>(t)], 1e-300);
    for (int64_t i = 0; i < m.rows; ++i) {
      us(i, t) *= std::sqrt(ev);
      ui(i, t) /= std::sqrt(ev);
    }
  }
  return {matmul(us, eig.U, false, true), matmul(ui, eig.U, false, true)};
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

class SpectralCodec final : public LayerCodec {
 public:
  explicit SpectralCodec(bool rotate) : rotate_(rotate) {}
  std::string mode() const override { return rotate_ ? "spectral-w" : "spectral"; }
  bool needs_base() const override { return rotate_; }
  bool plans_budget() const override { return true; }

  std::vector<Candidate> candidates(const LayerContext& ctx, const Factors& f) const override {
    const LayerShape& s = ctx.shape();
    const Matrix* ru = rotate_ ? &ctx.svd().U : nullptr;
    const Matrix* rv = rotate_ ? &ctx.svd().V : nullptr;
    // Error metric: D = tr(G E S E^T) for E = B A - X~ Y~^T, with S the input second moment and G
    // the output-gradient second moment when calibrated (a Kronecker-factored Fisher: D
    // approximates twice the loss increase), identities otherwise (Frobenius).
    const Matrix* sig = ctx.input_moment ? &*ctx.input_moment : nullptr;
    const Matrix* gm = ctx.output_moment ? &*ctx.output_moment : nullptr;
    check_square(sig, s.n, "input");
    check_square(gm, s.m, "output");
    auto right = [&](const Matrix& y) { return sig ? matmul(*sig, y) : y; };  // S Y
    auto left = [&](const Matrix& x) { return gm ? matmul(*gm, x) : x; };     // G X

    // Components of B A optimal in that metric: SVD of (G^1/2 B)(A S^1/2), mapped back.
    Matrix x, y;
    const SqrtPair ls = sig ? sqrt_pair(*sig) : SqrtPair{}, lg = gm ? sqrt_pair(*gm) : SqrtPair{};
    if (s.m >= s.r && s.n >= s.r) {
      const Qr qb = thin_qr(gm ? matmul(lg.root, f.B) : f.B);
      const Qr qa = thin_qr((sig ? matmul(f.A, ls.root) : f.A).transposed());
      const Svd core = full_svd(matmul(qb.R, qa.R, false, true));
      x = matmul(qb.Q, core.U);
      y = matmul(qa.Q, core.V);
      for (int64_t j = 0; j < s.r; ++j) {
        const double sq = std::sqrt(core.S[static_cast<size_t>(j)]);
        for (int64_t i = 0; i < s.m; ++i) x(i, j) *= sq;
        for (int64_t i = 0; i < s.n; ++i) y(i, j) *= sq;
      }
      if (gm) x = matmul(lg.inverse_root, x);
      if (sig) y = matmul(ls.inverse_root, y);
    } else {  // rank above a dimension: code the factors as they are
      x = f.B;
      y = f.A.transposed();
    }

    // D = tr(B^T G B A S A^T) - 2 <B^T G X~, A S Y~> + tr(X~^T G X~ Y~^T S Y~).
    const Matrix gb = left(f.B);
    const Matrix as = sig ? matmul(f.A, *sig) : f.A;  // r x n
    const double energy = trace_product(matmul(f.B, gb, true), matmul(as, f.A, false, true));
    const double w = ctx.weight;
    std::vector<Candidate> out;
    out.push_back(make_candidate(s, 0, kStepBias, kStepBias, {}, {}, w * energy));  // drop the layer
    double rms = 0;
    for (double v : x.data) rms += v * v;
    rms = std::sqrt(rms / std::max<double>(1, static_cast<double>(x.data.size())));
    if (!(rms > 0)) return out;
    // A weighted side's errors count tr(M)/dim times as much: its step shrinks by the square root.
    const int y_offset = step_offset(sig, s.n) - step_offset(gm, s.m);
    // With statistics (and no rotation), rounding errors are shaped by them: GPTQ-style feedback.
    const bool feedback = !rotate_;
    const Matrix hx = (feedback && gm) ? inverse_cholesky_upper(*gm) : Matrix();
    const Matrix hy = (feedback && sig) ? inverse_cholesky_upper(*sig) : Matrix();
    auto quantize = [&](const Matrix& v, int64_t k, double step, const Matrix* rot, const Matrix& h, Coded& c, double dz) {
      return h.rows > 0 ? quantize_columns_feedback(v, k, step, h, c, dz) : quantize_columns(v, k, step, rot, c, dz);
    };
    const int t_top = std::clamp(static_cast<int>(std::ceil(std::log2(8 * rms) * kStepsPerOctave)) + kStepBias, 0, 255);
    for (int tx = t_top; tx >= std::max(0, t_top - 16 * kStepsPerOctave); tx -= 2) {
     const double step_x = step_of(tx);
     for (double dz : kDeadZones) {
      for (int64_t k = 1; k <= s.r; ++k) {
        Coded cx;
        if (!quantize(x, k, step_x, ru, hx, cx, dz)) continue;
        // Refit Y to the quantised X in the same metric: Y^T = (X~^T G X~)^-1 X~^T G B A.
        const Matrix gx = left(cx.value);
        const Matrix xgx = matmul(cx.value, gx, true);  // k x k
        const Matrix bgx = matmul(f.B, gx, true);       // r x k = B^T G X~
        const Matrix yk = solve_spd(xgx, matmul(f.A, bgx, true).transposed()).transposed();  // n x k
        for (int dy : {-2, 0, 2}) {
          const int ty = std::clamp(tx + y_offset + dy, 0, 255);
          Coded cy;
          if (!quantize(yk, k, step_of(ty), rv, hy, cy, dz)) continue;
          const double cross = frob_dot(bgx, matmul(as, cy.value));
          const double self = trace_product(xgx, matmul(cy.value, right(cy.value), true));
          const double d = std::max(0.0, energy - 2 * cross + self);
          out.push_back(make_candidate(s, k, tx, ty, cx.q, cy.q, w * d));
        }
      }
     }
    }
    return out;
  }

  EncodedLayer encode(const LayerContext& ctx, const Factors& f) const override {
    throw Error(ErrorKind::InvalidInput, mode(), "this mode is planned across layers; use compress_adapter");
  }

  Factors decode(const LayerContext& ctx, const EncodedLayer& e) const override {
    const std::string where = mode() + " layer " + std::to_string(ctx.layer_index());
    const LayerShape& s = ctx.shape();
    if (e.blobs.size() != 1) throw Error(ErrorKind::Format, where, "expected 1 blob");
    const auto& blob = e.blobs[0];
    RangeDecoder dec(blob.data(), blob.size());
    const auto k = static_cast<int64_t>(dec.direct(rank_bits(s.r)));
    if (k > s.r) throw Error(ErrorKind::Format, where, "more components than the rank");
    Factors f{Matrix(s.r, s.n), Matrix(s.m, s.r)};
    if (k == 0) return f;
    const int tx = static_cast<int>(dec.direct(kStepBits));
    const int ty = static_cast<int>(dec.direct(kStepBits));
    IntModel mx, my;
    std::vector<int32_t> qx(static_cast<size_t>(s.m * k)), qy(static_cast<size_t>(s.n * k));
    read_columns(dec, mx, qx, s.m, k, where);
    read_columns(dec, my, qy, s.n, k, where);
    const Matrix x = dequantize_columns(qx, s.m, k, step_of(tx), rotate_ ? &ctx.svd().U : nullptr);
    const Matrix y = dequantize_columns(qy, s.n, k, step_of(ty), rotate_ ? &ctx.svd().V : nullptr);
    for (int64_t j = 0; j < k; ++j) {
      for (int64_t i = 0; i < s.m; ++i) f.B(i, j) = x(i, j);
      for (int64_t i = 0; i < s.n; ++i) f.A(j, i) = y(i, j);
    }
    return f;
  }

 private:
  static void write_columns(RangeEncoder& e, IntModel& model, const std::vector<int32_t>& q, int64_t rows, int64_t k) {
    for (int64_t j = 0; j < k; ++j) {
      model.reset_run();
      for (int64_t i = 0; i < rows; ++i) model.encode(e, q[static_cast<size_t>(j * rows + i)]);
    }
  }
  static void read_columns(RangeDecoder& d, IntModel& model, std::vector<int32_t>& q, int64_t rows, int64_t k,
                           const std::string& where) {
    for (int64_t j = 0; j < k; ++j) {
      model.reset_run();
      for (int64_t i = 0; i < rows; ++i) q[static_cast<size_t>(j * rows + i)] = model.decode(d, where);
    }
  }
  static Candidate make_candidate(const LayerShape& s, int64_t k, int tx, int ty, const std::vector<int32_t>& qx,
                                  const std::vector<int32_t>& qy, double distortion) {
    RangeEncoder e;
    e.direct(static_cast<uint32_t>(k), rank_bits(s.r));
    if (k > 0) {
      e.direct(static_cast<uint32_t>(tx), kStepBits);
      e.direct(static_cast<uint32_t>(ty), kStepBits);
      IntModel mx, my;
      write_columns(e, mx, qx, s.m, k);
      write_columns(e, my, qy, s.n, k);
    }
    Candidate c;
    c.distortion = distortion;
    c.encoded.params = nlohmann::json::object();
    c.encoded.blobs = {e.finish()};
    return c;
  }

  bool rotate_;
};

}  // namespace

size_t Candidate::bytes() const {
  size_t n = 0;
  for (const auto& b : encoded.blobs) n += b.size();
  return n;
}

std::unique_ptr<LayerCodec> make_spectral_codec(bool rotate_to_base) {
  return std::make_unique<SpectralCodec>(rotate_to_base);
}

}  // namespace solar
