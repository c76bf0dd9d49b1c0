// The `spectral` and `spectral-w` modes (docs/FORMAT.md, "Modes").
//
// B A = X Y^T with X = U sqrt(S) from B A's own thin SVD (computed from the factors, never
// densely). One uniform step per layer quantises the first k columns of X; Y is then refitted by
// least squares to the quantised X (so it absorbs X's rounding error) and quantised with its own
// step. Integers are range-coded with adaptive contexts. A layer offers many (step, k) points;
// the pipeline picks one per layer to meet a global budget.
// `spectral-w` codes X and Y in the coordinates of W's singular vectors (U_W^T X, V_W^T Y).
#include <algorithm>
#include <array>
#include <limits>
#include <map>
#include <numeric>
#include <bit>
#include <cmath>
#include <functional>
#include <optional>
#include <utility>

#include "budget_planner.hpp"
#include "solar/codec.hpp"
#include "solar/error.hpp"
#include "solar/range_coder.hpp"

namespace solar {
namespace {

constexpr int kStepBits = 8;
constexpr int kStepBias = 200, kStepsPerOctave = 8;  // step = 2^((t - 200) / 8)
constexpr double kMaxQuant = 1 << 29;
constexpr double kDeadZones[] = {0.0, 0.2};  // rounding offsets tried for every step (uniform quantiser)
// Quantiser variants of an operating point: 0 and 1 are the uniform quantiser with the dead
// zones above; 2 is dependent (trellis-coded) quantisation with rate weight kDqLambda.
constexpr int kUniformVariants = 2, kVariants = 3;
// The trellis search prices a bit at kDqLambda step^2 (about the slope of the quantiser's own
// rate-distortion curve there); tuned on stories260K and SmolLM2 (0.1 to 0.6 within 2%).
constexpr double kDqLambda = 0.35;
constexpr int kDqStepOffsets[] = {-8, -6, -4};  // DQ steps tried around a uniform front point
// The trellis search's error feedback goes in blocks of kDqBlock rows for columns of at least
// kDqBlockedRows rows (below that: one block, the row-by-row order).
constexpr int64_t kDqBlock = 64, kDqBlockedRows = 1024;

static_assert(kStepBias == 200 && kStepsPerOctave == 8, "step codes as step_of_code (codec.hpp) reads them");
double step_of(int t) { return step_of_code(t); }

int rank_bits(int64_t r) { return std::bit_width(static_cast<uint64_t>(r)); }

// Columns of a matrix as quantised integers (column-major order of the stream).
struct Coded {
  std::vector<int32_t> q;  // rows * k, column by column
  Matrix value;            // rows x k, dequantised, in original coordinates
  // With error feedback: the weighted rounding errors e (rows x k) that the feedback spread. For
  // the inverse Cholesky factor U of the metric H (H^-1 = U^T U), target - value = U^T e, so
  // (target - value)^T H (target - value) = e^T e: the metric's error without an n x n product.
  Matrix err;
};

void zero_column(Coded& c, int64_t j) {
  const int64_t rows = c.value.rows;
  std::fill_n(c.q.begin() + j * rows, rows, 0);
  for (int64_t i = 0; i < rows; ++i) c.value(i, j) = 0;
  if (c.err.rows == rows)
    for (int64_t i = 0; i < rows; ++i) c.err(i, j) = 0;
}

// Columns c0..c0+k of `c`.
Coded columns_of(const Coded& c, int64_t c0, int64_t k) {
  const int64_t rows = c.value.rows;
  Coded out;
  out.q.assign(c.q.begin() + c0 * rows, c.q.begin() + (c0 + k) * rows);
  out.value = Matrix(rows, k);
  if (c.err.rows == rows) out.err = Matrix(rows, k);
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t j = 0; j < k; ++j) {
      out.value(i, j) = c.value(i, c0 + j);
      if (c.err.rows == rows) out.err(i, j) = c.err(i, c0 + j);
    }
  return out;
}

// Quantises the first k columns of `m` (rows x >=k), after rotating by R^T when R is given.
// Rounds v to an integer, toward zero by `dead_zone` (0: nearest; larger values trade a little
// distortion for many more zeros, which the entropy coder makes cheap).
int32_t round_dz(double v, double dead_zone) {
  const double a = std::floor(std::fabs(v) + 0.5 - dead_zone);
  const auto q = static_cast<int32_t>(std::max(0.0, a));
  return v < 0 ? -q : q;
}

// Dependent quantisation (docs/FORMAT.md, "Dependent quantisation"): a 4-state machine driven
// by the parity of each integer chooses between two interleaved quantisers, Q0 (even multiples
// of the step) and Q1 (odd multiples and zero); the encoder picks the integers by a Viterbi
// search over the trellis. At the same rate it lands nearer the target than one uniform grid
// (a trellis-coded quantiser's granular gain, ~1 dB at 2 bits per value).
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && !defined(__APPLE__)
#define SOLAR_CLONE_AVX2 __attribute__((target_clones("avx2", "default")))
#else
#define SOLAR_CLONE_AVX2
#endif
constexpr int kDqNext[4][2] = {{0, 2}, {2, 0}, {1, 3}, {3, 1}};
int dq_next(int state, int32_t q) { return kDqNext[state][q & 1]; }
double dq_level(int32_t q, int state) {  // in units of the step
  return state < 2 ? 2.0 * q : 2.0 * q - (q > 0 ? 1 : 0) + (q < 0 ? 1 : 0);
}

// Estimated bits of an integer of quantiser class c (0: Q0, 1: Q1) for a column whose values
// (in steps) have rms sigma: -log2 of a Gaussian's mass in the integer's cell (sign included).
// Only guides the search; the stream's adaptive coder sets what is actually spent.
struct DqRate {
  static constexpr int kTable = 48;  // magnitudes priced from a table; larger ones by formula
  double scale;                      // 1 / (sigma sqrt 2)
  std::array<std::array<double, kTable>, 2> table;
  explicit DqRate(double sigma) : scale(1.0 / (std::max(sigma, 0.05) * std::sqrt(2.0))) {
    for (int c = 0; c < 2; ++c)
      for (int a = 0; a < kTable; ++a) table[c][a] = exact(c, a);
  }
  double operator()(int c, int32_t q) const {
    const int64_t a = q < 0 ? -static_cast<int64_t>(q) : q;
    return a < kTable ? table[c][static_cast<size_t>(a)] : exact(c, static_cast<double>(a));
  }
  double exact(int c, double a) const {
    // The cell of the level: halfway to the neighbouring levels of the same quantiser.
    double lo, hi;
    if (c == 0) {
      lo = a == 0 ? 0.0 : 2 * a - 1;
      hi = 2 * a + 1;
    } else {
      lo = a == 0 ? 0.0 : (a == 1 ? 0.5 : 2 * a - 2);
      hi = a == 0 ? 0.5 : 2 * a;
    }
    const double mass = std::erfc(lo * scale) - std::erfc(hi * scale);  // P(lo < |v| < hi)
    return -std::log2(std::max(a == 0 ? mass : 0.5 * mass, 1e-12));
  }
};

// Viterbi search for one column of `rows` targets (in original units). With `hinv_u` (the inverse
// Cholesky factor of the metric H, as in GPTQ) every surviving path carries its own targets,
// corrected by the weighted errors it has made (error feedback along the trellis); the path cost
// is then sum ((w_i - level_i) / hinv_u(i, i))^2, the error in the metric. Cost = distortion /
// (step^2 * mean weight) + kDqLambda * estimated bits. With feedback, the chosen path's weighted
// errors are kept too (see Coded::err).
//
// With feedback, rows go in blocks, as GPTQ's: each state keeps its targets for the block's rows
// only, the state its survivor path entered the block in, and the errors that path made there;
// at the block's end the rows after it take those errors in one product for all the layer's
// columns (dq_columns runs them in lockstep) instead of one pass per row and state.
// Columns shorter than kDqBlockedRows are one block: the row-by-row order of the first trellis
// encoder, so such layers' files are as they were.
struct DqColumn {
  std::vector<double> target;
  double step = 1, norm = 1;
  const Matrix* hinv_u = nullptr;
  DqRate rate{1.0};
  std::array<double, 4> cost{};
  std::vector<std::array<int8_t, 4>> from;
  std::vector<std::array<int32_t, 4>> pick;
  std::vector<std::array<double, 4>> errs;
  std::array<std::vector<double>, 4> base;  // per state: every row's target as of the block's start
  std::array<std::vector<double>, 4> w, w_next, path, path_next;  // per state, the block's rows
  std::array<int, 4> origin{0, 1, 2, 3}, origin_next{};
};

// False if a value overflows.
bool dq_init(DqColumn& c, std::vector<double> target, double step, const Matrix* hinv_u) {
  const auto rows = static_cast<int64_t>(target.size());
  double sum_sq = 0, mean_w = 0;
  for (int64_t i = 0; i < rows; ++i) {
    const double v = target[static_cast<size_t>(i)];
    if (!(std::fabs(v / step) < kMaxQuant / 4)) return false;
    sum_sq += v * v;
    const double h = hinv_u ? (*hinv_u)(i, i) : 1.0;
    mean_w += 1.0 / (h * h);
  }
  mean_w /= static_cast<double>(std::max<int64_t>(rows, 1));
  c.rate = DqRate(std::sqrt(sum_sq / static_cast<double>(std::max<int64_t>(rows, 1))) / step);
  c.norm = 1.0 / (step * step * mean_w);
  c.step = step;
  c.hinv_u = hinv_u;
  constexpr double kInf = std::numeric_limits<double>::infinity();
  c.cost = {0, kInf, kInf, kInf};
  c.from.resize(static_cast<size_t>(rows));
  c.pick.resize(static_cast<size_t>(rows));
  c.errs.resize(hinv_u ? static_cast<size_t>(rows) : 0);
  if (hinv_u)
    for (int s = 0; s < 4; ++s) c.base[s] = target;
  c.target = std::move(target);
  return true;
}

// The trellis over rows [b0, b1) (every row when there is no feedback). Cloned for AVX2 (picked
// at run time): the per-state feedback loops are most of a calibrated layer's time. Not FMA: the
// clone rounds exactly as the portable code does.
SOLAR_CLONE_AVX2
void dq_run_block(DqColumn& c, int64_t b0, int64_t b1) {
  constexpr double kInf = std::numeric_limits<double>::infinity();
  const auto rows = static_cast<int64_t>(c.target.size());
  const int64_t len = b1 - b0;
  const Matrix* hinv_u = c.hinv_u;
  if (hinv_u)
    for (int s = 0; s < 4; ++s) {
      if (c.base[s].empty())  // a state no path reached by the block's start
        c.w[s].assign(static_cast<size_t>(len), 0.0);
      else
        c.w[s].assign(c.base[s].begin() + b0, c.base[s].begin() + b1);
      c.w_next[s].resize(static_cast<size_t>(len));
      c.path[s].assign(static_cast<size_t>(len), 0.0);
      c.path_next[s].resize(static_cast<size_t>(len));
      c.origin[s] = s;
    }
  const double step = c.step;
  for (int64_t i = b0; i < b1; ++i) {
    const int64_t li = i - b0;  // row within the block
    std::array<double, 4> next_cost{kInf, kInf, kInf, kInf};
    std::array<double, 4> next_err{0, 0, 0, 0};
    const double h = hinv_u ? (*hinv_u)(i, i) : 1.0;
    for (int s = 0; s < 4; ++s) {
      if (c.cost[s] == kInf) continue;
      const double t = (hinv_u ? c.w[s][static_cast<size_t>(li)] : c.target[static_cast<size_t>(i)]) / step;
      const int cls = s >> 1;
      int32_t cands[5];
      int nc = 0;
      cands[nc++] = 0;
      const double sgn = t < 0 ? -1.0 : 1.0;
      const double u = cls == 0 ? std::fabs(t) / 2 : (std::fabs(t) + 1) / 2;
      for (double a : {std::floor(u), std::floor(u) + 1}) {
        if (a < 1) continue;
        cands[nc++] = static_cast<int32_t>(sgn * a);
      }
      for (int j = 0; j < nc; ++j) {
        const int32_t qv = cands[j];
        const double e = (t - dq_level(qv, s)) * step / h;  // weighted error, as GPTQ's err
        const double total = c.cost[s] + e * e * c.norm + kDqLambda * c.rate(cls, qv);
        const int ns = dq_next(s, qv);
        if (total < next_cost[ns]) {
          next_cost[ns] = total;
          next_err[ns] = e;
          c.from[static_cast<size_t>(i)][ns] = static_cast<int8_t>(s);
          c.pick[static_cast<size_t>(i)][ns] = qv;
        }
      }
    }
    if (hinv_u) {
      for (int ns = 0; ns < 4; ++ns) {
        if (next_cost[ns] == kInf) continue;
        const int fs = c.from[static_cast<size_t>(i)][ns];
        const double* __restrict src = c.w[fs].data();
        double* __restrict dst = c.w_next[ns].data();
        const double* __restrict hrow = hinv_u->data.data() + i * rows + b0;
        const double e = next_err[ns];
        for (int64_t t = li + 1; t < len; ++t) dst[t] = src[t] - e * hrow[t];
        if (len < rows) {  // more than one block: the path's history within the block
          std::copy_n(c.path[fs].begin(), li, c.path_next[ns].begin());
          c.path_next[ns][static_cast<size_t>(li)] = e;
          c.origin_next[ns] = c.origin[fs];
        }
      }
      std::swap(c.w, c.w_next);
      std::swap(c.path, c.path_next);
      std::swap(c.origin, c.origin_next);
      c.errs[static_cast<size_t>(i)] = next_err;
    }
    c.cost = next_cost;
  }
}

// Columns c0..c0+3 of e (block rows x 4 per column): each state's path errors within the block.
void dq_block_errors(const DqColumn& c, Matrix& e, int64_t c0) {
  for (int s = 0; s < 4; ++s)
    if (c.cost[s] != std::numeric_limits<double>::infinity())
      for (int64_t j = 0; j < e.rows; ++j) e(j, c0 + s) = c.path[s][static_cast<size_t>(j)];
}

// The rows from b1 on: the base of the state each path entered the block in, minus
// U[b0:b1, b1:]^T times its errors (`update`'s columns c0..c0+3).
void dq_apply_block(DqColumn& c, const Matrix& update, int64_t c0, int64_t b1) {
  const auto rows = static_cast<int64_t>(c.target.size());
  std::array<std::vector<double>, 4> next_base;
  for (int s = 0; s < 4; ++s) {
    if (c.cost[s] == std::numeric_limits<double>::infinity()) continue;
    next_base[s].assign(static_cast<size_t>(rows), 0.0);
    const std::vector<double>& from_base = c.base[c.origin[s]];
    for (int64_t t = b1; t < rows; ++t) next_base[s][static_cast<size_t>(t)] = from_base[static_cast<size_t>(t)] - update(t - b1, c0 + s);
  }
  c.base = std::move(next_base);
}

// The cheapest path's integers, their values (in original units) and, with feedback, its errors.
void dq_finish(const DqColumn& c, int32_t* q_out, double* value_out, double* err_out) {
  const auto rows = static_cast<int64_t>(c.target.size());
  int s = static_cast<int>(std::min_element(c.cost.begin(), c.cost.end()) - c.cost.begin());
  for (int64_t i = rows - 1; i >= 0; --i) {
    q_out[i] = c.pick[static_cast<size_t>(i)][s];
    if (c.hinv_u) err_out[i] = c.errs[static_cast<size_t>(i)][s];
    s = c.from[static_cast<size_t>(i)][s];
  }
  int state = 0;
  for (int64_t i = 0; i < rows; ++i) {
    value_out[i] = dq_level(q_out[i], state) * c.step;
    state = dq_next(state, q_out[i]);
  }
}

// The top-left rows x cols block of `m`.
Matrix leading_block(const Matrix& m, int64_t rows, int64_t cols) {
  Matrix b(rows, cols);
  for (int64_t i = 0; i < rows; ++i) std::copy_n(m.data.begin() + i * m.cols, cols, b.data.begin() + i * cols);
  return b;
}

// The columns of every matrix of `ms` (all with the same rows), side by side.
Matrix side_by_side(const std::vector<const Matrix*>& ms) {
  int64_t width = 0;
  for (const Matrix* m : ms) width += m->cols;
  Matrix out(ms.empty() ? 0 : ms.front()->rows, width);
  for (int64_t c0 = 0; const Matrix* m : ms) {
    for (int64_t i = 0; i < out.rows; ++i) std::copy_n(m->data.begin() + i * m->cols, m->cols, out.data.begin() + i * width + c0);
    c0 += m->cols;
  }
  return out;
}

// Columns c0..c0+k of `m`.
Matrix column_block(const Matrix& m, int64_t c0, int64_t k) {
  Matrix b(m.rows, k);
  for (int64_t i = 0; i < m.rows; ++i) std::copy_n(m.data.begin() + i * m.cols + c0, k, b.data.begin() + i * k);
  return b;
}

// The first k columns of `m`, rotated by R^T when R is given: what a side's integers quantise.
Matrix leading_coords(const Matrix& m, int64_t k, const Matrix* rot) {
  const Matrix coords = leading_block(m, m.rows, k);
  return rot ? matmul(*rot, coords, /*trans_a=*/true) : coords;
}

// Dependent quantisation of every column of `coords` (column j at steps[j]), each its own trellis
// starting in state 0, the columns in lockstep block by block (DqColumn). `lost[j]` is set for a
// column with a value too large to quantise; it is then left at zero. With `prefix`, the columns
// after the first lost one are lost too and never run (a side's columns are used as a prefix).
void dq_columns(const Matrix& coords, const std::vector<double>& steps, const Matrix* hinv_u, Coded& out, std::vector<char>& lost,
                bool prefix) {
  const int64_t rows = coords.rows, k = coords.cols;
  out.q.assign(static_cast<size_t>(rows * k), 0);
  out.value = Matrix(rows, k);
  if (hinv_u) out.err = Matrix(rows, k);
  lost.assign(static_cast<size_t>(k), 0);
  std::vector<DqColumn> cols(static_cast<size_t>(k));
  std::vector<int64_t> live;  // the columns that run
  for (int64_t j = 0; j < k; ++j) {
    std::vector<double> col(static_cast<size_t>(rows));
    for (int64_t i = 0; i < rows; ++i) col[static_cast<size_t>(i)] = coords(i, j);
    if (dq_init(cols[static_cast<size_t>(j)], std::move(col), steps[static_cast<size_t>(j)], hinv_u)) {
      live.push_back(j);
      continue;
    }
    lost[static_cast<size_t>(j)] = 1;
    if (prefix) {
      std::fill(lost.begin() + j, lost.end(), 1);
      break;
    }
  }
  const auto nl = static_cast<int64_t>(live.size());
  const int64_t block_rows = hinv_u && rows >= kDqBlockedRows ? kDqBlock : rows;
  for (int64_t b0 = 0; b0 < rows && nl > 0; b0 += block_rows) {
    const int64_t b1 = std::min(rows, b0 + block_rows);
    for (int64_t j : live) dq_run_block(cols[static_cast<size_t>(j)], b0, b1);
    if (hinv_u && b1 < rows) {
      Matrix e(b1 - b0, 4 * nl);
      for (int64_t l = 0; l < nl; ++l) dq_block_errors(cols[static_cast<size_t>(live[static_cast<size_t>(l)])], e, 4 * l);
      const Matrix update = matmul(block(*hinv_u, b0, b1, b1 - b0, rows - b1), block(e), /*trans_a=*/true);  // (rows - b1) x 4 nl
      for (int64_t l = 0; l < nl; ++l) dq_apply_block(cols[static_cast<size_t>(live[static_cast<size_t>(l)])], update, 4 * l, b1);
    }
  }
  std::vector<double> val(static_cast<size_t>(rows)), err(static_cast<size_t>(rows));
  for (int64_t j : live) {
    dq_finish(cols[static_cast<size_t>(j)], out.q.data() + j * rows, val.data(), err.data());
    for (int64_t i = 0; i < rows; ++i) out.value(i, j) = val[static_cast<size_t>(i)];
    if (hinv_u)
      for (int64_t i = 0; i < rows; ++i) out.err(i, j) = err[static_cast<size_t>(i)];
  }
}

// How many leading columns have no lost column before them.
int64_t leading_kept(const std::vector<char>& lost) {
  return std::find(lost.begin(), lost.end(), 1) - lost.begin();
}

// Dependent quantisation of the first k columns of `m` (rotated by R^T when R is given).
// Returns how many leading columns it could quantise.
int64_t quantize_columns_dq(const Matrix& m, int64_t k, double step, const Matrix* rot, const Matrix* hinv_u, Coded& out) {
  std::vector<char> lost;
  dq_columns(leading_coords(m, k, rot), std::vector<double>(static_cast<size_t>(k), step), hinv_u, out, lost, /*prefix=*/true);
  if (rot) out.value = matmul(*rot, out.value);
  return leading_kept(lost);
}

// Returns how many leading columns could be quantised (all k unless a value overflows).
int64_t quantize_columns(const Matrix& m, int64_t k, double step, const Matrix* rot, Coded& out, double dead_zone = 0.0) {
  const int64_t rows = m.rows;
  const Matrix coords = leading_coords(m, k, rot);
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
// is applied row by row, to the rows after it in one matrix product. Columns stay independent:
// every column of `w` (consumed; column j at steps[j]) is quantised as it would be alone.
// `lost[j]` is set for a column with a value too large to quantise; it is then left at zero.
void feedback_columns(Matrix w, const std::vector<double>& steps, const Matrix& hinv_u, Coded& out, double dead_zone,
                      std::vector<char>& lost) {
  constexpr int64_t kBlock = 32;
  const int64_t rows = w.rows, k = w.cols;
  out.q.assign(static_cast<size_t>(rows * k), 0);
  out.value = Matrix(rows, k);
  out.err = Matrix(rows, k);
  lost.assign(static_cast<size_t>(k), 0);
  for (int64_t b0 = 0; b0 < rows; b0 += kBlock) {
    const int64_t b1 = std::min(rows, b0 + kBlock);
    Matrix err(b1 - b0, k);
    for (int64_t i = b0; i < b1; ++i) {
      double* e = &err(i - b0, 0);
      for (int64_t j = 0; j < k; ++j) {
        const double step = steps[static_cast<size_t>(j)];
        const double v = w(i, j) / step;
        if (!(std::fabs(v) < kMaxQuant)) {
          lost[static_cast<size_t>(j)] = 1;
          continue;
        }
        const int32_t q = round_dz(v, dead_zone);
        out.q[static_cast<size_t>(j * rows + i)] = q;
        out.value(i, j) = q * step;
        e[j] = (w(i, j) - q * step) / hinv_u(i, i);
        out.err(i, j) = e[j];
      }
      for (int64_t t = i + 1; t < b1; ++t) {  // the block's later rows, all columns (rows are contiguous)
        const double h = hinv_u(i, t);
        double* wt = &w(t, 0);
        for (int64_t j = 0; j < k; ++j) wt[j] -= e[j] * h;
      }
    }
    // The rows after the block take H[b0:b1, b1:]^T err at once (the block of H read in place).
    if (b1 < rows) matmul_subtract(block(hinv_u, b0, b1, b1 - b0, rows - b1), block(err), w, b1, /*trans_a=*/true);
  }
  for (int64_t j = 0; j < k; ++j)  // lost columns are left out entirely
    if (lost[static_cast<size_t>(j)]) zero_column(out, j);
}

// feedback_columns on the first k columns of `m`; returns how many leading columns it could
// quantise (the ones after a lost column are zeroed too: a side's columns are used as a prefix).
int64_t quantize_columns_feedback(const Matrix& m, int64_t k, double step, const Matrix& hinv_u, Coded& out,
                                  double dead_zone = 0.0) {
  std::vector<char> lost;
  feedback_columns(leading_block(m, m.rows, k), std::vector<double>(static_cast<size_t>(k), step), hinv_u, out, dead_zone, lost);
  const int64_t ok = leading_kept(lost);
  for (int64_t j = ok; j < k; ++j) zero_column(out, j);
  return ok;
}

Matrix dequantize_columns(const std::vector<int32_t>& q, int64_t rows, int64_t k, double step, const Matrix* rot, bool dependent) {
  Matrix deq(rows, k);
  for (int64_t j = 0; j < k; ++j) {
    int state = 0;
    for (int64_t i = 0; i < rows; ++i) {
      const int32_t v = q[static_cast<size_t>(j * rows + i)];
      if (dependent) {
        deq(i, j) = dq_level(v, state) * step;
        state = dq_next(state, v);
      } else {
        deq(i, j) = v * step;
      }
    }
  }
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

// One side's quantisation in a batch: all columns of `target` at `step`.
struct SideJob {
  const Matrix* target;
  double step;
};
struct SideCoded {
  Coded coded;
  int64_t ok;  // leading columns quantised (the ones after are zero), as quantize_side returns
};

// Operating points priced together: X step code tx, k in ks, Y step code tx + offset + dy for dy in dys.
struct Sweep {
  int tx;
  std::vector<int64_t> ks;
  std::vector<int> dys;
  int ty(const LayerSetup& u, int dy) const { return std::clamp(tx + u.y_offset + dy, 0, 255); }
};
// Y's columns, and target values, priced in one batch: wide enough for BLAS's peak, narrow
// enough for a block of rows to stay in cache (at n = 384, batches of thousands of columns ran
// slower than one k at a time), and at most some 100 MB of a batch's matrices at large n.
constexpr int64_t kBatchColumns = 512;
constexpr int64_t kBatchValues = int64_t{1} << 21;

// One operating point: (k components, X step code tx, Y step code ty, quantiser variant).
struct Point {
  int64_t k;
  int tx, ty, variant;  // variant: uniform with kDeadZones[variant], or (last) dependent
};

class SpectralCodec final : public LayerCodec {
 public:
  SpectralCodec(bool rotate, bool dependent) : rotate_(rotate), dependent_(dependent) {}
  std::string mode() const override { return rotate_ ? "spectral-w" : "spectral"; }
  bool needs_base() const override { return rotate_; }
  bool plans_budget() const override { return true; }

  std::vector<Candidate> candidates(const LayerContext& ctx, const Factors& f) const override {
    const LayerShape& s = ctx.shape();
    const LayerSetup u = setup(ctx, f);
    const double w = ctx.weight;
    const std::vector<double> dropped = dropped_cost(ctx, u);
    std::vector<Candidate> out;
    out.push_back({w * u.energy, BitCounter::bytes_for(header_cost(s, 0, 0, 0, 0)), {0, kStepBias, kStepBias, 0},
                   dropped[0]});  // drop the layer
    if (!(u.rms > 0)) return out;
    const int t_top = std::clamp(static_cast<int>(std::ceil(std::log2(8 * u.rms) * kStepsPerOctave)) + kStepBias, 0, 255);
    // Prices each sweep's points (X step code tx, k in ks, Y step code tx + offset + dy for dy in
    // dys), all with one quantiser variant; returns them sweep by sweep, in the order (k, dy).
    // Sweeps go in batches, each side's quantisations of a batch in one quantize_jobs call: up to
    // kBatchColumns of Y's columns with the uniform quantiser; one sweep at a time with the
    // trellis, whose columns each carry four paths' targets (wider batches ran slower).
    auto price = [&](int variant, const std::vector<Sweep>& sweeps) {
      std::vector<std::vector<Candidate>> points(sweeps.size());
      const int64_t batch_columns = is_dependent(variant) ? 0 : kBatchColumns;
      auto y_columns = [&](const Sweep& sw) {
        int64_t c = 0;
        for (int64_t k : sw.ks) c += k;
        return c * static_cast<int64_t>(sw.dys.size());
      };
      for (size_t b0 = 0; b0 < sweeps.size();) {
        size_t b1 = b0 + 1;  // this batch: sweeps [b0, b1)
        for (int64_t width = y_columns(sweeps[b0]); b1 < sweeps.size(); ++b1) {
          width += y_columns(sweeps[b1]);
          if (width > batch_columns || width * s.n > kBatchValues) break;
        }
        // Columns are quantised independently (feedback stays within a column), so X's first k
        // columns are a prefix of all of them, and so are their bit costs: a sweep quantises only
        // the columns its largest k needs.
        std::vector<Matrix> x_heads;
        x_heads.reserve(b1 - b0);
        std::vector<SideJob> x_jobs;
        for (size_t b = b0; b < b1; ++b) {
          const int64_t k_max = *std::max_element(sweeps[b].ks.begin(), sweeps[b].ks.end());
          const Matrix* x = &u.x;
          if (k_max < s.r) x = &x_heads.emplace_back(leading_block(u.x, s.m, k_max));
          x_jobs.push_back({x, step_of(sweeps[b].tx)});
        }
        const std::vector<SideCoded> xs = quantize_jobs(x_jobs, u.ru, u.hx, variant);
        std::vector<const Matrix*> x_values;
        for (const SideCoded& x : xs) x_values.push_back(&x.coded.value);
        const std::vector<RefitBasis> bases = refit_bases(u, x_values);
        std::vector<std::vector<uint64_t>> x_costs;
        std::vector<std::vector<Refit>> fits;  // [sweep][k]; y_jobs point into them
        fits.reserve(b1 - b0);
        std::vector<SideJob> y_jobs;
        for (size_t b = b0; b < b1; ++b) {
          const Sweep& sw = sweeps[b];
          const SideCoded& x = xs[b - b0];
          x_costs.push_back(column_costs(x.coded.q.data(), s.m, x.ok, is_dependent(variant), true));
          fits.emplace_back();
          for (int64_t k : sw.ks)
            if (k <= x.ok) fits.back().push_back(refit(u, bases[b - b0], k));
          for (const Refit& fit : fits.back())
            for (int dy : sw.dys) y_jobs.push_back({&fit.yk, step_of(sw.ty(u, dy))});
        }
        const std::vector<SideCoded> ys = quantize_jobs(y_jobs, u.rv, u.hy, variant);
        size_t j = 0;
        for (size_t b = b0; b < b1; ++b) {
          const Sweep& sw = sweeps[b];
          for (const Refit& fit : fits[b - b0]) {
            const int64_t k = fit.yk.cols;
            for (int dy : sw.dys) {
              const SideCoded& y = ys[j++];
              if (y.ok != k) continue;
              const int ty = sw.ty(u, dy);
              const uint64_t bits = header_cost(s, k, sw.tx, ty, variant) + x_costs[b - b0][static_cast<size_t>(k)] +
                                    column_costs(y.coded.q.data(), s.n, k, is_dependent(variant), false).back();
              points[b].push_back({w * distortion(u, fit, y.coded), BitCounter::bytes_for(bits),
                                   {static_cast<int32_t>(k), sw.tx, ty, variant}, dropped[static_cast<size_t>(k)]});
            }
          }
        }
        b0 = b1;
      }
      return points;
    };
    auto append = [&](const std::vector<Candidate>& points) { out.insert(out.end(), points.begin(), points.end()); };
    // Coarse to fine: every step and every k with plain rounding and Y's default step, then the
    // dead-zone and Y-step variants only where those points reach the layer's Pareto front.
    std::vector<int64_t> all_k(static_cast<size_t>(s.r));
    std::iota(all_k.begin(), all_k.end(), int64_t{1});
    std::vector<Sweep> coarse;
    for (int tx = t_top; tx >= std::max(0, t_top - 16 * kStepsPerOctave); tx -= 2) coarse.push_back({tx, all_k, {0}});
    for (const auto& points : price(0, coarse)) append(points);
    std::map<int, std::vector<int64_t>> refine;  // tx -> the ks of its points on the front
    for (size_t i : pareto_indices(out)) refine[out[i].setting[1]].push_back(out[i].setting[0]);
    std::vector<std::vector<std::vector<Candidate>>> refined;  // [variant][tx of refine]
    for (int variant = 0; variant < kUniformVariants; ++variant) {
      std::vector<Sweep> sweeps;
      for (auto& [tx, ks] : refine) {
        std::sort(ks.begin(), ks.end());
        sweeps.push_back({tx, ks, variant == 0 ? std::vector<int>{-2, 2} : std::vector<int>{-2, 0, 2}});
      }
      refined.push_back(price(variant, sweeps));
    }
    for (size_t i = 0; i < refine.size(); ++i)
      for (const auto& by_variant : refined) append(by_variant[i]);
    // Dependent quantisation: its two interleaved grids are each twice as coarse as its step, so
    // it is tried half an octave to an octave finer than the uniform front points.
    std::map<int, std::vector<int64_t>> dq_refine;
    if (dependent_)
      for (const auto& [tx, ks] : refine)
      for (int off : kDqStepOffsets)
        for (int64_t k : ks) dq_refine[tx + off].push_back(k);
    std::vector<Sweep> dq_sweeps;
    for (auto& [tx, ks] : dq_refine) {
      if (tx < 0 || tx > 255) continue;
      std::sort(ks.begin(), ks.end());
      ks.erase(std::unique(ks.begin(), ks.end()), ks.end());
      dq_sweeps.push_back({tx, ks, {0}});
    }
    for (const auto& points : price(kVariants - 1, dq_sweeps)) append(points);
    return out;
  }

  std::vector<int32_t> candidate_symbols(const LayerContext& ctx, const Factors& f, const Candidate& c) const override {
    const LayerShape& s = ctx.shape();
    const std::string where = mode() + " layer " + std::to_string(ctx.layer_index());
    if (c.setting.size() != 4) throw Error(ErrorKind::InvalidInput, where, "not an operating point of this mode");
    const Point p{c.setting[0], c.setting[1], c.setting[2], c.setting[3]};
    if (p.k < 0 || p.k > s.r || p.variant < 0 || p.variant >= kVariants)
      throw Error(ErrorKind::InvalidInput, where, "not an operating point of this layer");
    if (p.k == 0) return {0};
    const LayerSetup u = setup(ctx, f);
    Coded all;  // as candidates() computed it: X's first k columns (columns are independent)
    if (quantize_side(u.x, p.k, step_of(p.tx), u.ru, u.hx, p.variant, all) < p.k)
      throw Error(ErrorKind::InvalidInput, where, "operating point cannot be rebuilt");
    const Refit fit = refit(u, refit_bases(u, {&all.value})[0], p.k);
    Coded cy;
    if (!quantize_y(u, fit, p.k, p.ty, p.variant, cy)) throw Error(ErrorKind::InvalidInput, where, "operating point cannot be rebuilt");
    return symbols_of(s, p.k, p.tx, p.ty, is_dependent(p.variant), {all.q.begin(), all.q.begin() + s.m * p.k}, cy.q);
  }

  std::vector<uint8_t> write_stream(const std::vector<StreamLayer>& layers, const std::vector<std::vector<int32_t>>& symbols) const override {
    if (layers.size() != symbols.size()) throw Error(ErrorKind::InvalidInput, mode(), "one symbol list per layer");
    RangeEncoder e;
    StreamModels models;  // the current syntax (v5)
    for (size_t i = 0; i < layers.size(); ++i) put_layer(e, models, layers[i], symbols[i]);
    return e.finish();
  }

  std::vector<std::vector<int32_t>> read_stream(const std::vector<StreamLayer>& layers, const std::vector<uint8_t>& stream,
                                                const std::string& where, uint32_t version) const override {
    RangeDecoder d(stream.data(), stream.size());
    StreamModels models;
    models.version = version;
    std::vector<std::vector<int32_t>> out;
    for (size_t i = 0; i < layers.size(); ++i) out.push_back(get_layer(d, models, layers[i], where + " (stream layer " + std::to_string(i) + ")"));
    return out;
  }

  std::vector<nlohmann::json> stream_summary(const std::vector<StreamLayer>& layers,
                                             const std::vector<std::vector<int32_t>>& symbols, uint32_t version) const override {
    if (layers.size() != symbols.size()) throw Error(ErrorKind::InvalidInput, mode(), "one symbol list per layer");
    BitCounter e;  // the stream's own coding, layer after layer: each layer's cost given the ones before
    StreamModels models;
    models.version = version;
    std::vector<nlohmann::json> out;
    for (size_t i = 0; i < layers.size(); ++i) {
      const uint64_t before = e.cost();
      put_layer(e, models, layers[i], symbols[i]);
      out.push_back({{"components", symbols[i].empty() ? 0 : symbols[i][0]},
                     {"quantiser", symbols[i].size() > 3 && symbols[i][3] ? "dependent" : "uniform"},
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
    if (sym.size() != static_cast<size_t>(kHead + (s.m + s.n) * k)) throw Error(ErrorKind::Format, where, "wrong number of symbols");
    const bool dependent = sym[3] != 0;
    const std::vector<int32_t> qx(sym.begin() + kHead, sym.begin() + kHead + s.m * k), qy(sym.begin() + kHead + s.m * k, sym.end());
    const Matrix x = dequantize_columns(qx, s.m, k, step_of(sym[1]), rotate_ ? &ctx.svd().U : nullptr, dependent);
    const Matrix y = dequantize_columns(qy, s.n, k, step_of(sym[2]), rotate_ ? &ctx.svd().V : nullptr, dependent);
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
    std::vector<int32_t> sym{static_cast<int32_t>(k), tx, ty, 0};
    get_columns(dec, mx, mx, false, false, sym, s.m, k, where);
    get_columns(dec, my, my, false, false, sym, s.n, k, where);
    return decode_symbols(ctx, sym);
  }

 private:
  // A layer's symbols: [k] when k = 0, else [k, tx, ty, dependent, X's k columns, Y's k columns].
  static constexpr size_t kHead = 4;
  static bool is_dependent(int variant) { return variant >= kUniformVariants; }

  // Appends k columns of `rows` integers, each a new run of its models (put_columns' inverse).
  // With dependent quantisation, each integer uses the model of its trellis state's quantiser.
  // `positive_lead` (v5, X's columns): each column's first non-zero integer is positive and has
  // no sign bit.
  static void get_columns(RangeDecoder& d, IntModel& m0, IntModel& m1, bool dependent, bool positive_lead, std::vector<int32_t>& out,
                          int64_t rows, int64_t k, const std::string& where) {
    out.reserve(out.size() + static_cast<size_t>(rows * k));
    for (int64_t j = 0; j < k; ++j) {
      m0.reset_run();
      m1.reset_run();
      int state = 0;
      bool lead = positive_lead;
      for (int64_t i = 0; i < rows; ++i) {
        const int32_t v = (dependent && state >= 2 ? m1 : m0).decode(d, where, !lead);
        if (v != 0) lead = false;
        if (dependent) state = dq_next(state, v);
        out.push_back(v);
      }
    }
  }
  // A layer's components have no intrinsic sign (negating column j of X and of Y keeps X Y^T,
  // and both quantisers are odd-symmetric), so v5 fixes it: X's first non-zero integer in each
  // column is positive, and its sign bit is not coded.
  static const int32_t* first_nonzero(const int32_t* col, int64_t rows) {  // col + rows if none
    return std::find_if(col, col + rows, [](int32_t v) { return v != 0; });
  }
  static void normalise_signs(std::vector<int32_t>& qx, std::vector<int32_t>& qy, int64_t m, int64_t n, int64_t k) {
    for (int64_t j = 0; j < k; ++j) {
      int32_t* col = qx.data() + j * m;
      const int32_t* lead = first_nonzero(col, m);
      if (lead == col + m || *lead > 0) continue;
      std::transform(col, col + m, col, std::negate<>());
      std::transform(qy.begin() + j * n, qy.begin() + (j + 1) * n, qy.begin() + j * n, std::negate<>());
    }
  }
  static std::vector<int32_t> symbols_of(const LayerShape& s, int64_t k, int tx, int ty, bool dependent, std::vector<int32_t> qx,
                                         std::vector<int32_t> qy) {
    normalise_signs(qx, qy, s.m, s.n, k);
    std::vector<int32_t> sym{static_cast<int32_t>(k), tx, ty, dependent ? 1 : 0};
    sym.insert(sym.end(), qx.begin(), qx.end());
    sym.insert(sym.end(), qy.begin(), qy.end());
    return sym;
  }

  // Adaptive state carried through a stream from one layer to the next.
  struct StreamModels {
    uint32_t version = 5;            // stream syntax: 2 has no quantiser flag (and no Q1 models)
    IntModel step_change, step_gap, x, y;
    IntModel x1, y1;                 // v3: integers of the Q1 quantiser of dependent quantisation
    Prob dependent = kProbInit;      // v3: the layer's quantiser flag
    int previous_tx = kStepBias;     // v2 to v4
    // v5: k as a bit tree (one per bit width), steps predicted from the layer's group.
    std::map<int, std::vector<Prob>> k_tree;
    std::map<std::string, std::pair<int, int>> group_steps;  // group -> its last coded (tx, ty)
    std::optional<std::pair<int, int>> last_steps;           // the last coded layer's (tx, ty)
    std::vector<Prob>& tree(int bits) {
      auto& t = k_tree[bits];
      if (t.empty()) t.assign(size_t{1} << bits, kProbInit);
      return t;
    }
    // The (tx, ty) a v5 layer's steps are coded against; ty's is tx itself when no layer was coded before.
    std::pair<int, std::optional<int>> predicted_steps(const std::string& group) const {
      if (const auto it = group_steps.find(group); it != group_steps.end()) return {it->second.first, it->second.second};
      if (last_steps) return {last_steps->first, last_steps->second};
      return {kStepBias, std::nullopt};
    }
    void coded(const std::string& group, int tx, int ty) {
      group_steps[group] = {tx, ty};
      last_steps = std::pair{tx, ty};
      previous_tx = tx;
    }
  };

  // One layer of a stream. v2 to v4: k (bit_width(r) direct bits); if k > 0, tx - previous tx and
  // ty - tx (signed integers, their own models), in v3 and v4 the quantiser flag (a modelled
  // bit). v5: k through a bit tree of adaptive bits; tx and ty minus their predictions (the last
  // coded layer of the same group, else the last coded layer, else 200 and tx); the quantiser
  // flag. Then X's k columns and Y's k columns.
  template <class Coder>
  static void put_header(Coder& e, StreamModels& m, const StreamLayer& l, int64_t k, int tx, int ty, bool dependent) {
    if (m.version >= 5) {
      put_tree(e, m.tree(rank_bits(l.shape.r)), rank_bits(l.shape.r), static_cast<uint32_t>(k));
    } else {
      e.direct(static_cast<uint32_t>(k), rank_bits(l.shape.r));
    }
    if (k == 0) return;
    if (m.version >= 5) {
      const auto [ptx, pty] = m.predicted_steps(l.group);
      m.step_change.encode(e, tx - ptx);
      m.step_gap.encode(e, ty - pty.value_or(tx));
    } else {
      m.step_change.encode(e, tx - m.previous_tx);
      m.step_gap.encode(e, ty - tx);
    }
    m.coded(l.group, tx, ty);
    if (m.version >= 3) e.bit(m.dependent, dependent ? 1 : 0);
  }
  // `bits` bits of v, most significant first, each with the probability of its tree node.
  template <class Coder>
  static void put_tree(Coder& e, std::vector<Prob>& tree, int bits, uint32_t v) {
    size_t node = 1;
    for (int i = bits - 1; i >= 0; --i) {
      const int b = static_cast<int>((v >> i) & 1u);
      e.bit(tree[node], b);
      node = 2 * node + static_cast<size_t>(b);
    }
  }
  static uint32_t get_tree(RangeDecoder& d, std::vector<Prob>& tree, int bits) {
    size_t node = 1;
    for (int i = 0; i < bits; ++i) node = 2 * node + static_cast<size_t>(d.bit(tree[node]));
    return static_cast<uint32_t>(node - (size_t{1} << bits));
  }
  // With `positive_lead` the sign of each column's first non-zero integer is left out (put_layer
  // has checked that it is positive; a cost estimate needs no check: the sign costs nothing).
  template <class Coder>
  static void put_columns(Coder& e, IntModel& m0, IntModel& m1, bool dependent, bool positive_lead, const int32_t* q, int64_t rows,
                          int64_t k) {
    for (int64_t j = 0; j < k; ++j) {
      m0.reset_run();
      m1.reset_run();
      int state = 0;
      bool lead = positive_lead;
      for (int64_t i = 0; i < rows; ++i) {
        const int32_t v = q[j * rows + i];
        (dependent && state >= 2 ? m1 : m0).encode(e, v, !lead);
        if (v != 0) lead = false;
        if (dependent) state = dq_next(state, v);
      }
    }
  }
  template <class Coder>
  static void put_layer(Coder& e, StreamModels& m, const StreamLayer& l, const std::vector<int32_t>& sym) {
    const LayerShape& s = l.shape;
    const int64_t k = sym.empty() ? -1 : sym[0];
    if (k < 0 || k > s.r || sym.size() != static_cast<size_t>(k == 0 ? 1 : kHead + (s.m + s.n) * k))
      throw Error(ErrorKind::InvalidInput, "spectral stream", "symbols do not match the layer's shape");
    if (k == 0) return put_header(e, m, l, 0, 0, 0, false);
    // Symbols may come from a caller (with_stream_symbols), not only from this encoder: refuse
    // what no decoder reads back rather than code it wrongly.
    if (sym[1] < 0 || sym[1] > 255 || sym[2] < 0 || sym[2] > 255 || (sym[3] != 0 && sym[3] != 1))
      throw Error(ErrorKind::InvalidInput, "spectral stream", "step codes must be 0 to 255 and the quantiser flag 0 or 1");
    for (size_t i = kHead; i < sym.size(); ++i)
      if (sym[i] <= -(1 << 30) || sym[i] >= (1 << 30))
        throw Error(ErrorKind::InvalidInput, "spectral stream", "an integer is out of the coder's range (|v| < 2^30)");
    const bool dependent = sym[3] != 0;
    if (dependent && m.version < 3) throw Error(ErrorKind::InvalidInput, "spectral stream", "format v2 has no dependent quantisation");
    const bool positive_lead = m.version >= 5;
    if (positive_lead)
      for (int64_t j = 0; j < k; ++j) {
        const int32_t* col = sym.data() + kHead + j * s.m;
        const int32_t* lead = first_nonzero(col, s.m);
        if (lead != col + s.m && *lead < 0)
          throw Error(ErrorKind::InvalidInput, "spectral stream", "a column's first non-zero integer must be positive");
      }
    put_header(e, m, l, k, sym[1], sym[2], dependent);
    put_columns(e, m.x, m.x1, dependent, positive_lead, sym.data() + kHead, s.m, k);
    put_columns(e, m.y, m.y1, dependent, false, sym.data() + kHead + s.m * k, s.n, k);
  }
  static std::vector<int32_t> get_layer(RangeDecoder& d, StreamModels& m, const StreamLayer& l, const std::string& where) {
    const LayerShape& s = l.shape;
    const int bits = rank_bits(s.r);
    const auto k = static_cast<int64_t>(m.version >= 5 ? get_tree(d, m.tree(bits), bits) : d.direct(bits));
    if (k > s.r) throw Error(ErrorKind::Format, where, "more components than the rank");
    if (k == 0) return {0};
    const auto [ptx, pty] = m.version >= 5 ? m.predicted_steps(l.group) : std::pair{m.previous_tx, std::optional<int>{}};
    const int64_t tx = ptx + static_cast<int64_t>(m.step_change.decode(d, where));
    if (tx < 0 || tx > 255) throw Error(ErrorKind::Format, where, "step code out of range");
    const int64_t ty = pty.value_or(static_cast<int>(tx)) + static_cast<int64_t>(m.step_gap.decode(d, where));
    if (ty < 0 || ty > 255) throw Error(ErrorKind::Format, where, "step code out of range");
    m.coded(l.group, static_cast<int>(tx), static_cast<int>(ty));
    const bool dependent = m.version >= 3 && d.bit(m.dependent) == 1;
    std::vector<int32_t> sym{static_cast<int32_t>(k), static_cast<int32_t>(tx), static_cast<int32_t>(ty), dependent ? 1 : 0};
    get_columns(d, m.x, m.x1, dependent, m.version >= 5, sym, s.m, k, where);
    get_columns(d, m.y, m.y1, dependent, false, sym, s.n, k, where);
    return sym;
  }
  // What a point costs as a layer of a fresh stream (an estimate: in a real stream the models
  // have learned from the layers before it, so it is usually a little cheaper). The header, X
  // and Y use separate models, so their costs add up; X's cost after each column serves every k.
  static uint64_t header_cost(const LayerShape& s, int64_t k, int tx, int ty, int variant) {
    BitCounter e;
    StreamModels m;
    put_header(e, m, StreamLayer{s, ""}, k, tx, ty, is_dependent(variant));
    return e.cost();
  }
  // [0, after 1, ..., after k]; X's columns (`positive_lead`) cost one sign bit less, whatever
  // their sign before normalise_signs.
  static std::vector<uint64_t> column_costs(const int32_t* q, int64_t rows, int64_t k, bool dependent, bool positive_lead) {
    BitCounter e;
    IntModel m0, m1;
    std::vector<uint64_t> out{0};
    for (int64_t j = 0; j < k; ++j) {
      put_columns(e, m0, m1, dependent, positive_lead, q + j * rows, rows, 1);
      out.push_back(e.cost());
    }
    return out;
  }

  struct Refit {
    Matrix xgx, bgx, yk;  // X~^T G X~, B^T G X~, refitted Y (n x k)
    Matrix sy;            // S Y (n x k), when Y's rounding errors are fed back in S
  };
  struct RefitBasis {     // the same products for all of X~'s columns
    Matrix xgx, bgx;      // X~^T G X~ (c x c) and B^T G X~ (r x c), X~ of c columns
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

    // Components of B A optimal in that metric: SVD of (G^1/2 B)(A S^1/2), X mapped back. With
    // the Cholesky factors G = Rg^T Rg and S = Rs^T Rs instead of the square roots (which differ
    // from them by orthogonal factors: G^1/2 = Q Rg), (Rg B)(A Rs^T) has the same singular values
    // and, mapped back by Rg^-1, the same components, for a fraction of an eigendecomposition's
    // cost (n = 4096: 0.7 s against 14-16 s per side).
    // With statistics (and no rotation), rounding errors are shaped by them: GPTQ-style feedback,
    // whose inverse Cholesky factors come from the same factorisation.
    const bool components = s.m >= s.r && s.n >= s.r;
    auto factor = [&](const Matrix* m, Matrix& inverse_u) {
      if (!m) return Matrix();
      if (rotate_) return components ? cholesky_upper(*m) : Matrix();
      CholeskyFactors c = cholesky_factors(*m);
      inverse_u = std::move(c.inverse_u);
      return std::move(c.r);
    };
    const Matrix rg = factor(u.gm, u.hx), rs = factor(u.sig, u.hy);
    if (components) {
      const Qr qb = thin_qr(u.gm ? matmul(rg, f.B) : f.B);
      const Qr qa = thin_qr((u.sig ? matmul(f.A, rs, false, true) : f.A).transposed());
      const Svd core = full_svd(matmul(qb.R, qa.R, false, true));
      u.x = matmul(qb.Q, core.U);
      for (int64_t j = 0; j < s.r; ++j) {
        const double sq = std::sqrt(core.S[static_cast<size_t>(j)]);
        for (int64_t i = 0; i < s.m; ++i) u.x(i, j) *= sq;
      }
      if (u.gm) u.x = solve_upper(rg, u.x);
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
    return u;
  }

  // [k]: the loss that dropping components k.. costs to first order, -<dL/d(B A), x_i y_i^T>
  // summed over them (y_i = (B A)^T G x_i / x_i^T G x_i, the component's right factor), clamped
  // at zero: a drop the calibration data says would help is not trusted to. All zero without an
  // update gradient, or when the factors are coded as they are.
  std::vector<double> dropped_cost(const LayerContext& ctx, const LayerSetup& u) const {
    const LayerShape& s = ctx.shape();
    std::vector<double> rest(static_cast<size_t>(s.r) + 1, 0.0);
    if (!ctx.update_gradient || !(s.m >= s.r && s.n >= s.r)) return rest;
    const Matrix& grad = *ctx.update_gradient;
    if (grad.rows != s.m || grad.cols != s.n)
      throw Error(ErrorKind::Mismatch, mode() + " layer " + std::to_string(ctx.layer_index()),
                  "update gradient must be " + std::to_string(s.m) + "x" + std::to_string(s.n));
    const Matrix gx = u.left(u.x);                                           // G X, m x r
    const Matrix wt_gx = matmul(u.f->A, matmul(u.f->B, gx, true), true);     // (B A)^T G X, n x r
    const Matrix grad_x = matmul(grad, u.x, true);                           // dL^T X, n x r
    for (int64_t i = s.r - 1; i >= 0; --i) {
      double norm = 0, pull = 0;
      for (int64_t a = 0; a < s.m; ++a) norm += u.x(a, i) * gx(a, i);
      for (int64_t b = 0; b < s.n; ++b) pull += grad_x(b, i) * wt_gx(b, i);
      rest[static_cast<size_t>(i)] = rest[static_cast<size_t>(i) + 1] - (norm > 0 ? pull / norm : 0.0);
    }
    for (double& v : rest) v = std::max(0.0, v);
    return rest;
  }

  static int64_t quantize_side(const Matrix& v, int64_t k, double step, const Matrix* rot, const Matrix& h, int variant, Coded& c) {
    if (is_dependent(variant)) return quantize_columns_dq(v, k, step, rot, h.rows > 0 ? &h : nullptr, c);
    const double dead_zone = kDeadZones[variant];
    return h.rows > 0 ? quantize_columns_feedback(v, k, step, h, c, dead_zone) : quantize_columns(v, k, step, rot, c, dead_zone);
  }

  // The products a refit needs, for all of X~'s columns at once (each k takes a leading block:
  // one m x m product per X step instead of one per k).
  // The products a refit needs, for all of each X~'s columns at once (each k takes a leading
  // block: one m x m product per X step instead of one per k), with G X~ for all the X~ of a batch
  // in one product (G read once, not once per X step: at m = 4096 that pass, not the arithmetic,
  // was the refits' cost).
  static std::vector<RefitBasis> refit_bases(const LayerSetup& u, const std::vector<const Matrix*>& xs) {
    const Matrix gx = u.left(side_by_side(xs));   // m x (all X~'s columns)
    const Matrix bgx = matmul(u.f->B, gx, true);  // r x (all X~'s columns)
    std::vector<RefitBasis> out;
    for (int64_t c0 = 0; const Matrix* x : xs) {
      out.push_back({matmul(block(*x), block(gx, 0, c0, gx.rows, x->cols), true), column_block(bgx, c0, x->cols)});
      c0 += x->cols;
    }
    return out;
  }
  // Refits Y to X~'s first k columns in the metric: Y^T = (X~^T G X~)^-1 X~^T G B A.
  static Refit refit(const LayerSetup& u, const RefitBasis& basis, int64_t k) {
    Refit fit;
    fit.xgx = leading_block(basis.xgx, k, k);
    fit.bgx = leading_block(basis.bgx, basis.bgx.rows, k);
    fit.yk = solve_spd(fit.xgx, matmul(u.f->A, fit.bgx, true).transposed()).transposed();  // n x k
    // Y = A^T M with M = B^T G X~ (X~^T G X~)^-1, so S Y = (A S)^T M: n r k instead of n^2 k.
    if (u.sig && u.hy.rows > 0) fit.sy = matmul(u.as, solve_spd(fit.xgx, fit.bgx.transposed()), true, true);
    return fit;
  }

  static bool quantize_y(const LayerSetup& u, const Refit& fit, int64_t k, int ty, int variant, Coded& cy) {
    return quantize_side(fit.yk, k, step_of(ty), u.rv, u.hy, variant, cy) == k;
  }

  // Each job as quantize_side(*job.target, its columns, job.step, rot, h, variant) codes it. With
  // error feedback, the jobs go side by side in one call: columns are quantised independently, so
  // each comes out as it would alone, but the feedback's block products become one wide product
  // each and the metric's factor is read (and packed by BLAS) once for all of them: at n = 4096
  // the narrow products of one job at a time ran far below BLAS's peak.
  static std::vector<SideCoded> quantize_jobs(const std::vector<SideJob>& jobs, const Matrix* rot, const Matrix& h, int variant) {
    std::vector<SideCoded> out(jobs.size());
    if (h.rows == 0) {
      for (size_t g = 0; g < jobs.size(); ++g)
        out[g].ok = quantize_side(*jobs[g].target, jobs[g].target->cols, jobs[g].step, rot, h, variant, out[g].coded);
      return out;
    }
    std::vector<const Matrix*> targets;
    std::vector<double> steps;  // one per column
    for (const SideJob& j : jobs) {
      targets.push_back(j.target);
      steps.insert(steps.end(), static_cast<size_t>(j.target->cols), j.step);
    }
    Matrix side = side_by_side(targets);
    Coded all;
    std::vector<char> lost;
    if (is_dependent(variant))
      dq_columns(side, steps, &h, all, lost, /*prefix=*/false);
    else
      feedback_columns(std::move(side), steps, h, all, kDeadZones[variant], lost);
    int64_t c0 = 0;
    for (size_t g = 0; g < jobs.size(); ++g) {
      const int64_t k = jobs[g].target->cols;
      out[g].coded = columns_of(all, c0, k);
      out[g].ok = leading_kept({lost.begin() + c0, lost.begin() + c0 + k});
      for (int64_t j = out[g].ok; j < k; ++j) zero_column(out[g].coded, j);
      c0 += k;
    }
    return out;
  }

  // Y~^T S Y~ (k x k; S = identity when null). At low rates most of Y~'s rows are zero: the
  // product then only needs S on the rows that are not, instead of a whole n x n pass.
  static Matrix quadratic_form(const Matrix* sig, const Matrix& y) {
    if (!sig) return matmul(y, y, true);
    std::vector<int64_t> rows;
    for (int64_t i = 0; i < y.rows; ++i)
      for (int64_t j = 0; j < y.cols; ++j)
        if (y(i, j) != 0) {
          rows.push_back(i);
          break;
        }
    const auto nz = static_cast<int64_t>(rows.size());
    if (2 * nz > y.rows) return matmul(y, matmul(*sig, y), true);
    Matrix ys(nz, y.cols), ss(nz, nz);
    for (int64_t a = 0; a < nz; ++a) {
      for (int64_t j = 0; j < y.cols; ++j) ys(a, j) = y(rows[static_cast<size_t>(a)], j);
      for (int64_t b = 0; b < nz; ++b) ss(a, b) = (*sig)(rows[static_cast<size_t>(a)], rows[static_cast<size_t>(b)]);
    }
    return matmul(ys, matmul(ss, ys), true);
  }

  // Y~^T S Y~ from the feedback's errors (Coded::err): with D = Y - Y~ = U^T e,
  // Y~^T S Y~ = Y~^T (S Y) - (S Y)^T D + e^T e, all n k^2.
  static Matrix quadratic_form_fed_back(const Refit& fit, const Coded& cy) {
    const int64_t n = cy.value.rows, k = cy.value.cols;
    Matrix q(k, k);
    std::vector<double> d(static_cast<size_t>(k));  // row i of D
    for (int64_t i = 0; i < n; ++i) {
      for (int64_t b = 0; b < k; ++b) d[static_cast<size_t>(b)] = fit.yk(i, b) - cy.value(i, b);
      for (int64_t a = 0; a < k; ++a) {
        const double va = cy.value(i, a), sa = fit.sy(i, a), ea = cy.err(i, a);
        for (int64_t b = 0; b < k; ++b) q(a, b) += va * fit.sy(i, b) - sa * d[static_cast<size_t>(b)] + ea * cy.err(i, b);
      }
    }
    return q;
  }

  static double distortion(const LayerSetup& u, const Refit& fit, const Coded& cy) {
    const double cross = frob_dot(fit.bgx, matmul(u.as, cy.value));
    const bool fed_back = fit.sy.rows > 0 && cy.err.rows == cy.value.rows && cy.err.cols == cy.value.cols;
    const double self = trace_product(fit.xgx, fed_back ? quadratic_form_fed_back(fit, cy) : quadratic_form(u.sig, cy.value));
    return std::max(0.0, u.energy - 2 * cross + self);
  }

  bool rotate_;
  bool dependent_;  // offer dependent quantisation to the plan
};

}  // namespace

std::unique_ptr<LayerCodec> make_spectral_codec(bool rotate_to_base, bool dependent) {
  return std::make_unique<SpectralCodec>(rotate_to_base, dependent);
}

}  // namespace solar
