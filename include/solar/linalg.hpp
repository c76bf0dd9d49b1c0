// Dense linear algebra on row-major double matrices, backed by LAPACK/BLAS.
// All calls run single-threaded inside BLAS so results do not depend on the thread count;
// solar parallelises across layers instead.
#pragma once
#include <cstddef>
#include <cstdint>
#include <vector>

namespace solar {

struct Matrix {
  int64_t rows = 0, cols = 0;
  std::vector<double> data;  // row-major
  Matrix() = default;
  Matrix(int64_t r, int64_t c) : rows(r), cols(c), data(static_cast<size_t>(r * c), 0.0) {}
  double& operator()(int64_t i, int64_t j) { return data[static_cast<size_t>(i * cols + j)]; }
  double operator()(int64_t i, int64_t j) const { return data[static_cast<size_t>(i * cols + j)]; }
  Matrix transposed() const;
  static Matrix from_f32(const float* p, int64_t rows, int64_t cols);
  std::vector<float> to_f32() const;
};

// A read-only rows x cols block of a row-major matrix, its rows `stride` values apart: lets
// matmul read a block in place instead of copying it out first.
struct MatrixBlock {
  const double* data = nullptr;
  int64_t rows = 0, cols = 0, stride = 0;
};
MatrixBlock block(const Matrix& m, int64_t row0, int64_t col0, int64_t rows, int64_t cols);
inline MatrixBlock block(const Matrix& m) { return block(m, 0, 0, m.rows, m.cols); }

Matrix matmul(const Matrix& a, const Matrix& b, bool trans_a = false, bool trans_b = false);
Matrix matmul(const MatrixBlock& a, const MatrixBlock& b, bool trans_a = false, bool trans_b = false);
// Rows row0.. of c minus op(a) op(b), in place (BLAS with beta = 1, no temporary for the
// product); each entry is c - (a b) as `c -= matmul(a, b)` would compute it.
void matmul_subtract(const MatrixBlock& a, const MatrixBlock& b, Matrix& c, int64_t row0, bool trans_a = false, bool trans_b = false);
double frobenius_norm(const Matrix& a);

// Full SVD W = U diag(S) V^T with square U (m x m) and V (n x n), canonicalised:
// singular vectors of the thin part get the sign that makes the largest-magnitude entry of each
// left singular vector positive (ties: the lowest index); the null-space completion comes from
// the Householder QR of the thin factor (unique for a given thin factor), with the same sign rule.
struct Svd {
  Matrix U, V;
  std::vector<double> S;  // min(m, n) values, descending
};
Svd full_svd(const Matrix& w);

// Eigendecomposition of a symmetric matrix, a = V diag(values) V^T (LAPACK dsyevd; only the
// lower triangle is read): values ascending, V's columns the orthonormal eigenvectors, signs as
// LAPACK leaves them (callers use V only in sign-invariant products such as V f(values) V^T).
struct SymmetricEigen {
  Matrix V;
  std::vector<double> values;
};
SymmetricEigen symmetric_eigen(const Matrix& a);

// Thin QR of a (rows x cols, rows >= cols): a = Q R, Q rows x cols with orthonormal columns,
// R cols x cols upper triangular (Householder, LAPACK dgeqrf/dorgqr).
struct Qr {
  Matrix Q, R;
};
Qr thin_qr(const Matrix& a);

// Solves the symmetric positive (semi)definite system G x = b for several right-hand sides
// (the columns of b); near-singular G is regularised by 1e-12 * trace(G).
Matrix solve_spd(const Matrix& g, const Matrix& b);

// The upper triangular R with H = R^T R, for a symmetric positive definite H (LAPACK dpotrf; the
// same regularisation and error as inverse_cholesky_upper).
Matrix cholesky_upper(const Matrix& h);

// Solves R X = B for an upper triangular R with non-zero diagonal (back substitution).
Matrix solve_upper(const Matrix& r, const Matrix& b);

// The upper triangular U with H^-1 = U^T U, for a symmetric positive definite H (LAPACK dpotrf,
// dpotri, dpotrf: the factor GPTQ-style error feedback needs). Throws InvalidInput if H is not
// positive definite even after a tiny diagonal regularisation.
Matrix inverse_cholesky_upper(const Matrix& h);

// Both factors from one factorisation of H: r = cholesky_upper(H), inverse_u = inverse_cholesky_upper(H).
struct CholeskyFactors {
  Matrix r, inverse_u;
};
CholeskyFactors cholesky_factors(const Matrix& h);

// Minimum-norm least squares: argmin ||D x - t||, smallest ||x|| among minimisers (LAPACK gelsd).
// D is rows x cols (row-major). rcond < 0 uses machine precision.
std::vector<double> lstsq_min_norm(const Matrix& d, const std::vector<double>& t, double rcond = -1.0);
// Same, with D given column-major (each column contiguous) and consumed.
std::vector<double> lstsq_min_norm_col_major(int64_t rows, int64_t cols, std::vector<double> d,
                                             const std::vector<double>& t, double rcond = -1.0);

// Forces single-threaded BLAS for the calling process (no-op for non-OpenBLAS builds).
void pin_blas_single_thread();

}  // namespace solar
