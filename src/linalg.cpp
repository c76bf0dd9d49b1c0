#include "solar/linalg.hpp"

#include <algorithm>
#include <climits>
#include <cmath>
#include <stdexcept>
#include <string>
#include <utility>

#include "lapack.hpp"
#include "solar/error.hpp"

namespace solar {
namespace {

int checked_int(int64_t v, const char* what) {
  if (v < 0 || v > INT_MAX) throw Error(ErrorKind::Unsupported, "linalg", std::string(what) + " exceeds LAPACK's 32-bit index range");
  return static_cast<int>(v);
}

void lapack_check(int info, const char* routine) {
  if (info != 0)
    throw Error(ErrorKind::InvalidInput, "linalg", std::string(routine) + " failed (info = " + std::to_string(info) + ")");
}

// Column-major copy of a row-major matrix is its row-major transpose.
std::vector<double> to_col_major(const Matrix& a) { return a.transposed().data; }

Matrix from_col_major(const double* p, int64_t rows, int64_t cols) {
  Matrix m(rows, cols);
  for (int64_t j = 0; j < cols; ++j)
    for (int64_t i = 0; i < rows; ++i) m(i, j) = p[j * rows + i];
  return m;
}

// Flips column j of `u` (and of `v`, if given) so that its largest-magnitude entry is positive.
void canonical_sign(Matrix& u, Matrix* v, int64_t j) {
  int64_t best = 0;
  double best_abs = -1.0;
  for (int64_t i = 0; i < u.rows; ++i) {
    const double a = std::fabs(u(i, j));
    if (a > best_abs) { best_abs = a; best = i; }
  }
  if (u(best, j) < 0) {
    for (int64_t i = 0; i < u.rows; ++i) u(i, j) = -u(i, j);
    if (v)
      for (int64_t i = 0; i < v->rows; ++i) (*v)(i, j) = -(*v)(i, j);
  }
}

// Householder QR of a (rows x cols, rows >= cols; LAPACK dgeqrf + dorgqr): returns the first
// q_cols columns of Q (cols <= q_cols <= rows) and, if asked, the cols x cols R.
Matrix householder_q(const Matrix& a_in, int64_t q_cols, Matrix* r) {
  const int64_t rows = a_in.rows, cols = a_in.cols;
  const int m = checked_int(rows, "rows"), n = checked_int(cols, "cols"), nq = checked_int(q_cols, "q cols");
  std::vector<double> a = to_col_major(a_in);
  a.resize(static_cast<size_t>(rows * q_cols), 0.0);
  std::vector<double> tau(static_cast<size_t>(cols));
  int info = 0, lwork = -1;
  double wq = 0;
  dgeqrf_(&m, &n, a.data(), &m, tau.data(), &wq, &lwork, &info);
  lwork = std::max(1, static_cast<int>(wq));
  std::vector<double> work(static_cast<size_t>(lwork));
  dgeqrf_(&m, &n, a.data(), &m, tau.data(), work.data(), &lwork, &info);
  lapack_check(info, "dgeqrf");
  if (r) {
    *r = Matrix(cols, cols);
    for (int64_t j = 0; j < cols; ++j)
      for (int64_t i = 0; i <= j; ++i) (*r)(i, j) = a[static_cast<size_t>(j * rows + i)];
  }
  lwork = -1;
  dorgqr_(&m, &nq, &n, a.data(), &m, tau.data(), &wq, &lwork, &info);
  lwork = std::max(1, static_cast<int>(wq));
  work.assign(static_cast<size_t>(lwork), 0.0);
  dorgqr_(&m, &nq, &n, a.data(), &m, tau.data(), work.data(), &lwork, &info);
  lapack_check(info, "dorgqr");
  return from_col_major(a.data(), rows, q_cols);
}

// Completes the orthonormal columns of `thin` (rows x k) to a square orthonormal basis using the
// Householder QR of `thin`: the trailing columns of Q span the orthogonal complement.
Matrix complete_basis(const Matrix& thin) {
  const int64_t rows = thin.rows, k = thin.cols;
  Matrix full(rows, rows);
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t j = 0; j < k; ++j) full(i, j) = thin(i, j);
  if (k == rows) return full;
  const Matrix q = householder_q(thin, rows, nullptr);
  for (int64_t j = k; j < rows; ++j) {
    for (int64_t i = 0; i < rows; ++i) full(i, j) = q(i, j);
    canonical_sign(full, nullptr, j);
  }
  return full;
}

}  // namespace

Matrix Matrix::transposed() const {
  Matrix t(cols, rows);
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t j = 0; j < cols; ++j) t(j, i) = (*this)(i, j);
  return t;
}

Matrix Matrix::from_f32(const float* p, int64_t rows, int64_t cols) {
  Matrix m(rows, cols);
  for (size_t i = 0; i < m.data.size(); ++i) m.data[i] = p[i];
  return m;
}

std::vector<float> Matrix::to_f32() const {
  std::vector<float> out(data.size());
  for (size_t i = 0; i < data.size(); ++i) out[i] = static_cast<float>(data[i]);
  return out;
}

MatrixBlock block(const Matrix& m, int64_t row0, int64_t col0, int64_t rows, int64_t cols) {
  if (row0 < 0 || col0 < 0 || rows < 0 || cols < 0 || row0 + rows > m.rows || col0 + cols > m.cols)
    throw std::invalid_argument("block: out of the matrix");
  return {m.data.data() + row0 * m.cols + col0, rows, cols, m.cols};
}

Matrix matmul(const Matrix& a, const Matrix& b, bool trans_a, bool trans_b) {
  return matmul(block(a), block(b), trans_a, trans_b);
}

namespace {

// The rows x cols shape of op(A) op(B); throws if the inner dimensions differ.
std::pair<int64_t, int64_t> product_shape(const MatrixBlock& a, const MatrixBlock& b, bool trans_a, bool trans_b, int64_t* inner,
                                          const char* what) {
  *inner = trans_a ? a.rows : a.cols;
  if (*inner != (trans_b ? b.cols : b.rows)) throw std::invalid_argument(std::string(what) + ": inner dimensions differ");
  return {trans_a ? a.cols : a.rows, trans_b ? b.rows : b.cols};
}

// Row-major C = alpha op(A) op(B) + beta C (C: rows x cols, its rows ldc values apart), as the
// column-major C^T = alpha op(B)^T op(A)^T + beta C^T.
void gemm(const MatrixBlock& a, const MatrixBlock& b, bool trans_a, bool trans_b, int64_t rows, int64_t cols, int64_t inner,
          double alpha, double beta, double* c, int64_t ldc) {
  if (rows == 0 || cols == 0 || inner == 0) return;
  const char tb = trans_b ? 'T' : 'N', ta = trans_a ? 'T' : 'N';
  const int M = checked_int(cols, "cols"), N = checked_int(rows, "rows"), K = checked_int(inner, "inner");
  const int ldb = checked_int(b.stride, "ldb"), lda = checked_int(a.stride, "lda"), ldc_ = checked_int(ldc, "ldc");
  dgemm_(&tb, &ta, &M, &N, &K, &alpha, b.data, &ldb, a.data, &lda, &beta, c, &ldc_);
}

}  // namespace

Matrix matmul(const MatrixBlock& a, const MatrixBlock& b, bool trans_a, bool trans_b) {
  int64_t k = 0;
  const auto [m, n] = product_shape(a, b, trans_a, trans_b, &k, "matmul");
  Matrix c(m, n);
  gemm(a, b, trans_a, trans_b, m, n, k, 1.0, 0.0, c.data.data(), n);
  return c;
}

void matmul_subtract(const MatrixBlock& a, const MatrixBlock& b, Matrix& c, int64_t row0, bool trans_a, bool trans_b) {
  int64_t k = 0;
  const auto [m, n] = product_shape(a, b, trans_a, trans_b, &k, "matmul_subtract");
  if (n != c.cols || row0 < 0 || row0 + m > c.rows) throw std::invalid_argument("matmul_subtract: the product does not fit c");
  gemm(a, b, trans_a, trans_b, m, n, k, -1.0, 1.0, c.data.data() + row0 * c.cols, c.cols);
}

double frobenius_norm(const Matrix& a) {
  long double s = 0;
  for (double v : a.data) s += static_cast<long double>(v) * v;
  return static_cast<double>(std::sqrt(s));
}

Svd full_svd(const Matrix& w) {
  const int64_t m = w.rows, n = w.cols, q = std::min(m, n);
  Svd out;
  if (q == 0) throw Error(ErrorKind::InvalidInput, "linalg", "SVD of an empty matrix");
  const int M = checked_int(m, "rows"), N = checked_int(n, "cols"), Q = checked_int(q, "rank");
  std::vector<double> a = to_col_major(w);
  std::vector<double> s(static_cast<size_t>(q)), u(static_cast<size_t>(m * q)), vt(static_cast<size_t>(q * n));
  std::vector<int> iwork(static_cast<size_t>(8 * q));
  int info = 0, lwork = -1;
  double wq = 0;
  const char jobz = 'S';
  dgesdd_(&jobz, &M, &N, a.data(), &M, s.data(), u.data(), &M, vt.data(), &Q, &wq, &lwork, iwork.data(), &info);
  lwork = std::max(1, static_cast<int>(wq));
  std::vector<double> work(static_cast<size_t>(lwork));
  dgesdd_(&jobz, &M, &N, a.data(), &M, s.data(), u.data(), &M, vt.data(), &Q, work.data(), &lwork, iwork.data(), &info);
  lapack_check(info, "dgesdd");
  Matrix u_thin = from_col_major(u.data(), m, q);
  Matrix v_thin = from_col_major(vt.data(), q, n).transposed();  // n x q
  for (int64_t j = 0; j < q; ++j) canonical_sign(u_thin, &v_thin, j);
  out.U = complete_basis(u_thin);
  out.V = complete_basis(v_thin);
  out.S = std::move(s);
  return out;
}

SymmetricEigen symmetric_eigen(const Matrix& a) {
  if (a.rows != a.cols) throw std::invalid_argument("symmetric_eigen needs a square matrix");
  SymmetricEigen out;
  out.values.assign(static_cast<size_t>(a.rows), 0.0);
  if (a.rows == 0) return out;
  const int N = checked_int(a.rows, "rows");
  // Row-major a is column-major a^T = a; dsyevd overwrites it with the eigenvectors as columns.
  std::vector<double> v = a.data;
  int info = 0, lwork = -1, liwork = -1, iwq = 0;
  double wq = 0;
  const char jobz = 'V', uplo = 'L';
  dsyevd_(&jobz, &uplo, &N, v.data(), &N, out.values.data(), &wq, &lwork, &iwq, &liwork, &info);
  lwork = std::max(1, static_cast<int>(wq));
  liwork = std::max(1, iwq);
  std::vector<double> work(static_cast<size_t>(lwork));
  std::vector<int> iwork(static_cast<size_t>(liwork));
  dsyevd_(&jobz, &uplo, &N, v.data(), &N, out.values.data(), work.data(), &lwork, iwork.data(), &liwork, &info);
  lapack_check(info, "dsyevd");
  out.V = from_col_major(v.data(), a.rows, a.rows);
  return out;
}

std::vector<double> lstsq_min_norm(const Matrix& d, const std::vector<double>& t, double rcond) {
  return lstsq_min_norm_col_major(d.rows, d.cols, to_col_major(d), t, rcond);
}

std::vector<double> lstsq_min_norm_col_major(int64_t rows, int64_t cols, std::vector<double> a,
                                             const std::vector<double>& t, double rcond) {
  if (static_cast<int64_t>(t.size()) != rows || static_cast<int64_t>(a.size()) != rows * cols)
    throw std::invalid_argument("lstsq: size mismatch");
  if (cols == 0) return {};
  const int M = checked_int(rows, "rows"), N = checked_int(cols, "cols");
  const int ldb = std::max(M, N), nrhs = 1;
  std::vector<double> b(static_cast<size_t>(ldb), 0.0);
  std::copy(t.begin(), t.end(), b.begin());
  std::vector<double> s(static_cast<size_t>(std::min(M, N)));
  int rank = 0, info = 0, lwork = -1;
  double wq = 0;
  int iwq = 0;
  dgelsd_(&M, &N, &nrhs, a.data(), &M, b.data(), &ldb, s.data(), &rcond, &rank, &wq, &lwork, &iwq, &info);
  lwork = std::max(1, static_cast<int>(wq));
  std::vector<double> work(static_cast<size_t>(lwork));
  std::vector<int> iwork(static_cast<size_t>(std::max(1, iwq)));
  dgelsd_(&M, &N, &nrhs, a.data(), &M, b.data(), &ldb, s.data(), &rcond, &rank, work.data(), &lwork, iwork.data(), &info);
  lapack_check(info, "dgelsd");
  b.resize(static_cast<size_t>(cols));
  return b;
}

void pin_blas_single_thread() {
  if (openblas_set_num_threads) openblas_set_num_threads(1);
}

Qr thin_qr(const Matrix& a) {
  if (a.rows < a.cols) throw std::invalid_argument("thin_qr needs rows >= cols");
  Qr out{Matrix(a.rows, a.cols), Matrix(a.cols, a.cols)};
  if (a.cols == 0) return out;
  out.Q = householder_q(a, a.cols, &out.R);
  return out;
}

namespace {

// The upper triangle (column-major, n x n) of H's Cholesky factor R (H = R^T R), or with
// `inverse` of U with H^-1 = U^T U (dpotrf, dpotri, dpotrf). A factorisation that fails is retried
// with a tiny diagonal regularisation (1e-10, 1e-8, 1e-6 of the mean diagonal). With `first_r`,
// the R of the first factorisation that succeeded is kept there too (what upper_factor(h, false)
// returns), so that both factors cost one dpotrf of H.
std::vector<double> upper_factor(const Matrix& h, bool inverse, std::vector<double>* first_r = nullptr) {
  const int64_t n64 = h.rows;
  const int n = checked_int(n64, "rows");
  double tr = 0;
  for (int64_t i = 0; i < n64; ++i) tr += h(i, i);
  // The buffer is symmetric, so row- and column-major read the same; LAPACK works column-major.
  for (int attempt = 0; attempt < 4; ++attempt) {
    std::vector<double> a = h.data;
    const double jitter = attempt == 0 ? 0.0 : tr / static_cast<double>(n) * std::pow(10.0, -12 + 2 * attempt);
    for (int64_t i = 0; i < n64; ++i) a[static_cast<size_t>(i * n64 + i)] += jitter;
    int info = 0;
    dpotrf_("U", &n, a.data(), &n, &info);  // H = R^T R
    if (info != 0) continue;
    if (!inverse) return a;
    if (first_r && first_r->empty()) *first_r = a;
    dpotri_("U", &n, a.data(), &n, &info);  // upper triangle of H^-1
    if (info != 0) continue;
    for (int64_t j = 0; j < n64; ++j)
      for (int64_t i = 0; i < j; ++i) a[static_cast<size_t>(j + i * n64)] = a[static_cast<size_t>(i + j * n64)];
    dpotrf_("U", &n, a.data(), &n, &info);  // H^-1 = U^T U
    if (info != 0) continue;
    return a;
  }
  throw Error(ErrorKind::InvalidInput, "calibration", "a second-moment matrix is not positive definite (raise the damping)");
}

Matrix upper_triangle(const std::vector<double>& col_major, int64_t n) {
  Matrix u(n, n);
  for (int64_t j = 0; j < n; ++j)
    for (int64_t i = 0; i <= j; ++i) u(i, j) = col_major[static_cast<size_t>(i + j * n)];
  return u;
}

}  // namespace

Matrix cholesky_upper(const Matrix& h) {
  if (h.cols != h.rows) throw std::invalid_argument("cholesky_upper: shapes");
  return h.rows == 0 ? Matrix() : upper_triangle(upper_factor(h, false), h.rows);
}

Matrix inverse_cholesky_upper(const Matrix& h) {
  if (h.cols != h.rows) throw std::invalid_argument("inverse_cholesky_upper: shapes");
  return h.rows == 0 ? Matrix() : upper_triangle(upper_factor(h, true), h.rows);
}

CholeskyFactors cholesky_factors(const Matrix& h) {
  if (h.cols != h.rows) throw std::invalid_argument("cholesky_factors: shapes");
  if (h.rows == 0) return {};
  std::vector<double> r;
  const std::vector<double> u = upper_factor(h, true, &r);
  return {upper_triangle(r, h.rows), upper_triangle(u, h.rows)};
}

Matrix solve_upper(const Matrix& r, const Matrix& b) {
  if (r.rows != r.cols || b.rows != r.rows) throw std::invalid_argument("solve_upper: shapes");
  Matrix x = b;
  for (int64_t i = r.rows - 1; i >= 0; --i) {
    for (int64_t t = i + 1; t < r.rows; ++t) {
      const double rit = r(i, t);
      if (rit != 0)
        for (int64_t j = 0; j < b.cols; ++j) x(i, j) -= rit * x(t, j);
    }
    for (int64_t j = 0; j < b.cols; ++j) x(i, j) /= r(i, i);
  }
  return x;
}

Matrix solve_spd(const Matrix& g, const Matrix& b) {
  const int64_t k = g.rows;
  if (g.cols != k || b.rows != k) throw std::invalid_argument("solve_spd: shapes");
  double tr = 0;
  for (int64_t i = 0; i < k; ++i) tr += g(i, i);
  // Gaussian elimination with partial pivoting on the regularised system (k is a LoRA rank).
  Matrix a = g, x = b;
  for (int64_t i = 0; i < k; ++i) a(i, i) += 1e-12 * tr + 1e-300;
  for (int64_t c = 0; c < k; ++c) {
    int64_t p = c;
    for (int64_t r = c + 1; r < k; ++r)
      if (std::fabs(a(r, c)) > std::fabs(a(p, c))) p = r;
    if (p != c) {
      for (int64_t j = 0; j < k; ++j) std::swap(a(c, j), a(p, j));
      for (int64_t j = 0; j < x.cols; ++j) std::swap(x(c, j), x(p, j));
    }
    const double piv = a(c, c);
    if (piv == 0) continue;
    for (int64_t r = c + 1; r < k; ++r) {
      const double f = a(r, c) / piv;
      if (f == 0) continue;
      for (int64_t j = c; j < k; ++j) a(r, j) -= f * a(c, j);
      for (int64_t j = 0; j < x.cols; ++j) x(r, j) -= f * x(c, j);
    }
  }
  for (int64_t c = k - 1; c >= 0; --c) {
    for (int64_t j = 0; j < x.cols; ++j) {
      double s = x(c, j);
      for (int64_t t = c + 1; t < k; ++t) s -= a(c, t) * x(t, j);
      x(c, j) = a(c, c) != 0 ? s / a(c, c) : 0.0;
    }
  }
  return x;
}

}  // namespace solar
