#include "solar/linalg.hpp"

#include <cmath>

#include <gtest/gtest.h>

#include "test_support.hpp"

namespace solar {
namespace {

Matrix random_matrix(int64_t r, int64_t c, uint64_t seed) {
  const auto v = test::random_normals(static_cast<size_t>(r * c), seed);
  return Matrix::from_f32(v.data(), r, c);
}

double max_abs_diff(const Matrix& a, const Matrix& b) {
  double d = 0;
  for (size_t i = 0; i < a.data.size(); ++i) d = std::max(d, std::fabs(a.data[i] - b.data[i]));
  return d;
}

void expect_orthonormal(const Matrix& q) {
  ASSERT_EQ(q.rows, q.cols);
  const Matrix g = matmul(q, q, true, false);
  for (int64_t i = 0; i < g.rows; ++i)
    for (int64_t j = 0; j < g.cols; ++j) EXPECT_NEAR(g(i, j), i == j ? 1.0 : 0.0, 1e-10);
}

TEST(Linalg, MatmulAgreesWithNaiveProduct) {
  const Matrix a = random_matrix(5, 7, 1), b = random_matrix(7, 3, 2);
  const Matrix c = matmul(a, b);
  for (int64_t i = 0; i < 5; ++i)
    for (int64_t j = 0; j < 3; ++j) {
      double s = 0;
      for (int64_t k = 0; k < 7; ++k) s += a(i, k) * b(k, j);
      EXPECT_NEAR(c(i, j), s, 1e-12);
    }
  EXPECT_LT(max_abs_diff(matmul(a.transposed(), b, true, false), c), 1e-12);
  EXPECT_LT(max_abs_diff(matmul(a, b.transposed(), false, true), c), 1e-12);
}

class SvdShapes : public ::testing::TestWithParam<std::pair<int, int>> {};

TEST_P(SvdShapes, FullCanonicalSvdReconstructs) {
  const auto [m, n] = GetParam();
  const Matrix w = random_matrix(m, n, 7);
  const Svd s = full_svd(w);
  ASSERT_EQ(s.U.rows, m);
  ASSERT_EQ(s.V.rows, n);
  expect_orthonormal(s.U);
  expect_orthonormal(s.V);
  const int64_t q = std::min(m, n);
  Matrix us(m, n);
  for (int64_t i = 0; i < m; ++i)
    for (int64_t j = 0; j < q; ++j) us(i, j) = s.U(i, j) * s.S[static_cast<size_t>(j)];
  EXPECT_LT(max_abs_diff(matmul(us, s.V, false, true), w), 1e-10);
  for (int64_t j = 0; j < m; ++j) {  // canonical sign: largest-magnitude entry positive
    int64_t best = 0;
    for (int64_t i = 1; i < m; ++i)
      if (std::fabs(s.U(i, j)) > std::fabs(s.U(best, j))) best = i;
    EXPECT_GT(s.U(best, j), 0.0);
  }
}

INSTANTIATE_TEST_SUITE_P(Shapes, SvdShapes, ::testing::Values(std::pair{8, 8}, std::pair{12, 5}, std::pair{5, 12}));

TEST(Linalg, SvdIsInvariantToTheSignOfTheInput) {
  // Negating W flips every singular pair; canonicalisation must give the same U and opposite V.
  const Matrix w = random_matrix(6, 9, 3);
  Matrix neg = w;
  for (double& v : neg.data) v = -v;
  const Svd a = full_svd(w), b = full_svd(neg);
  for (int64_t i = 0; i < 6; ++i)
    for (int64_t j = 0; j < 6; ++j) EXPECT_NEAR(a.U(i, j), b.U(i, j), 1e-10);
}

TEST(Linalg, InverseCholeskyFactorsTheInverse) {
  for (int64_t n : {1, 7, 40}) {
    const Matrix z = random_matrix(n, 2 * n, 21);
    Matrix h = matmul(z, z, false, true);  // SPD
    const Matrix u = inverse_cholesky_upper(h);
    for (int64_t i = 0; i < n; ++i)
      for (int64_t j = 0; j < i; ++j) EXPECT_EQ(u(i, j), 0.0);  // upper triangular
    const Matrix id = matmul(matmul(u, u, true), h);              // U^T U H = I
    for (int64_t i = 0; i < n; ++i)
      for (int64_t j = 0; j < n; ++j) EXPECT_NEAR(id(i, j), i == j ? 1.0 : 0.0, 1e-9) << n;
  }
  Matrix indefinite(2, 2);
  indefinite(0, 0) = 1;
  indefinite(1, 1) = -1;
  EXPECT_SOLAR_ERROR(inverse_cholesky_upper(indefinite), ErrorKind::InvalidInput, "positive definite");
}

TEST(Linalg, CholeskyFactorsAndBackSubstitutionSolves) {
  for (int64_t n : {1, 7, 40}) {
    const Matrix z = random_matrix(n, 2 * n, 23);
    const Matrix h = matmul(z, z, false, true);  // SPD
    const Matrix r = cholesky_upper(h);
    for (int64_t i = 0; i < n; ++i)
      for (int64_t j = 0; j < i; ++j) EXPECT_EQ(r(i, j), 0.0);  // upper triangular
    EXPECT_LT(max_abs_diff(matmul(r, r, true), h), 1e-9 * n) << n;  // R^T R = H
    const Matrix b = random_matrix(n, 3, 24);
    EXPECT_LT(max_abs_diff(matmul(r, solve_upper(r, b)), b), 1e-9) << n;  // R X = B
  }
  Matrix indefinite(2, 2);
  indefinite(0, 0) = 1;
  indefinite(1, 1) = -1;
  EXPECT_SOLAR_ERROR(cholesky_upper(indefinite), ErrorKind::InvalidInput, "positive definite");
}

TEST(Linalg, SymmetricEigenRebuildsTheMatrix) {
  for (int64_t n : {1, 6, 33}) {
    const Matrix z = random_matrix(n, n + 3, 31);
    const Matrix a = matmul(z, z, false, true);  // symmetric
    const SymmetricEigen e = symmetric_eigen(a);
    ASSERT_EQ(e.values.size(), static_cast<size_t>(n));
    for (size_t t = 1; t < e.values.size(); ++t) EXPECT_LE(e.values[t - 1], e.values[t]);  // ascending
    expect_orthonormal(e.V);
    Matrix vd = e.V;
    for (int64_t i = 0; i < n; ++i)
      for (int64_t t = 0; t < n; ++t) vd(i, t) *= e.values[static_cast<size_t>(t)];
    EXPECT_LT(max_abs_diff(matmul(vd, e.V, false, true), a), 1e-9 * (1 + frobenius_norm(a))) << n;
  }
  EXPECT_THROW(symmetric_eigen(Matrix(2, 3)), std::invalid_argument);
}

TEST(Linalg, LeastSquaresOverdeterminedMatchesNormalEquations) {
  const Matrix d = random_matrix(20, 4, 11);
  std::vector<double> t(20);
  for (int i = 0; i < 20; ++i) t[static_cast<size_t>(i)] = std::sin(i);
  const auto x = lstsq_min_norm(d, t);
  // Residual is orthogonal to the columns.
  for (int64_t j = 0; j < 4; ++j) {
    double g = 0;
    for (int64_t i = 0; i < 20; ++i) {
      double r = t[static_cast<size_t>(i)];
      for (int64_t k = 0; k < 4; ++k) r -= d(i, k) * x[static_cast<size_t>(k)];
      g += d(i, j) * r;
    }
    EXPECT_NEAR(g, 0.0, 1e-10);
  }
}

TEST(Linalg, LeastSquaresUnderdeterminedIsExactAndMinimumNorm) {
  const Matrix d = random_matrix(4, 10, 12);
  const std::vector<double> t = {1, -2, 3, 0.5};
  const auto x = lstsq_min_norm(d, t);
  for (int64_t i = 0; i < 4; ++i) {
    double s = 0;
    for (int64_t k = 0; k < 10; ++k) s += d(i, k) * x[static_cast<size_t>(k)];
    EXPECT_NEAR(s, t[static_cast<size_t>(i)], 1e-10);
  }
  // Minimum norm: x lies in the row space of D, i.e. x = D^T y for some y.
  const auto y = lstsq_min_norm(d.transposed(), x);
  for (int64_t k = 0; k < 10; ++k) {
    double s = 0;
    for (int64_t i = 0; i < 4; ++i) s += d(i, k) * y[static_cast<size_t>(i)];
    EXPECT_NEAR(s, x[static_cast<size_t>(k)], 1e-10);
  }
}

// A block read in place multiplies as its copy does, bit for bit (the GPTQ feedback relies on it
// to keep the files of the copying version), transposed or not; a block past the edge is refused.
Matrix leading(const Matrix& m, int64_t rows, int64_t cols) {
  Matrix out(rows, cols);
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t j = 0; j < cols; ++j) out(i, j) = m(i, j);
  return out;
}

TEST(Linalg, BlockMatmulEqualsMatmulOfTheCopiedBlock) {
  const Matrix h = random_matrix(9, 11, 21), e = random_matrix(3, 4, 22);
  Matrix copy(3, 6);
  for (int64_t i = 0; i < 3; ++i)
    for (int64_t j = 0; j < 6; ++j) copy(i, j) = h(2 + i, 5 + j);
  const Matrix in_place = matmul(block(h, 2, 5, 3, 6), block(e), /*trans_a=*/true);
  const Matrix expected = matmul(copy, e, /*trans_a=*/true);
  ASSERT_EQ(in_place.rows, 6);
  ASSERT_EQ(in_place.cols, 4);
  EXPECT_EQ(in_place.data, expected.data);
  EXPECT_EQ(matmul(block(h, 2, 5, 3, 6), block(h, 0, 0, 6, 2)).data, matmul(copy, leading(h, 6, 2)).data);
  EXPECT_THROW(block(h, 7, 0, 3, 1), std::invalid_argument);
  EXPECT_THROW(block(h, 0, 6, 1, 6), std::invalid_argument);
}

}  // namespace
}  // namespace solar
