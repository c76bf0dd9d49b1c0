#include <cmath>

#include <gtest/gtest.h>

#include "solar/codec.hpp"
#include "test_support.hpp"

namespace solar {
namespace {

Matrix random_matrix(int64_t r, int64_t c, uint64_t seed, float sd = 1.0f) {
  const auto v = test::random_normals(static_cast<size_t>(r * c), seed, sd);
  return Matrix::from_f32(v.data(), r, c);
}

double rel_err(const Factors& a, const Factors& b) {
  const Matrix d1 = matmul(a.B, a.A), d2 = matmul(b.B, b.A);
  double num = 0, den = 0;
  for (size_t i = 0; i < d1.data.size(); ++i) {
    num += (d1.data[i] - d2.data[i]) * (d1.data[i] - d2.data[i]);
    den += d1.data[i] * d1.data[i];
  }
  return std::sqrt(num / den);
}

struct Layer {
  LayerShape shape;
  Matrix w;
  Factors f;
};

Layer make_layer(int64_t m, int64_t n, int64_t r, uint64_t seed) {
  return {{m, n, r}, random_matrix(m, n, seed), {random_matrix(r, n, seed + 1, 0.1f), random_matrix(m, r, seed + 2, 0.1f)}};
}

LayerContext ctx_for(const Layer& l, uint64_t seed = 9, uint32_t index = 0) {
  return LayerContext(seed, index, l.shape, [w = l.w] { return w; });
}

TEST(PaperCodec, PoolLargerThanTheFactorIsLossless) {
  for (auto [m, n] : {std::pair{24, 16}, std::pair{16, 24}}) {
    const Layer l = make_layer(m, n, 3, 100);
    PaperOptions o;
    o.pool_a = o.pool_b = 2 * 3 * std::max(m, n);
    o.keep_fraction = 1.0;
    o.bits = 32;
    const auto codec = make_paper_codec(o);
    const EncodedLayer e = codec->encode(ctx_for(l), l.f);
    const Factors back = make_decoder("paper", "t")->decode(ctx_for(l), e);
    EXPECT_LT(rel_err(l.f, back), 1e-5) << m << "x" << n;
  }
}

TEST(PaperCodec, BlobSizesFollowTheBudget) {
  const Layer l = make_layer(20, 20, 2, 7);
  PaperOptions o;
  o.pool_a = 100;
  o.pool_b = 60;
  o.keep_a = 30;
  o.keep_b = 10;
  o.bits = 4;
  const EncodedLayer e = make_paper_codec(o)->encode(ctx_for(l), l.f);
  ASSERT_EQ(e.blobs.size(), 4u);
  EXPECT_EQ(e.blobs[0].size(), 13u);  // ceil(100 / 8)
  EXPECT_EQ(e.blobs[1].size(), 4u + 15u);  // scale + 30 nibbles
  EXPECT_EQ(e.blobs[2].size(), 8u);
  EXPECT_EQ(e.blobs[3].size(), 4u + 5u);
  EXPECT_EQ(e.params["keep"], nlohmann::json({30, 10}));
}

TEST(PaperCodec, MoreCoefficientsNeverHurtMuch) {
  // The paper's Theorem 1: error falls as k grows (with the same pool).
  const Layer l = make_layer(32, 32, 4, 21);
  double prev = 1e9;
  for (int64_t k : {20, 100, 300, 600}) {
    PaperOptions o;
    o.pool_a = o.pool_b = 600;
    o.keep_a = o.keep_b = k;
    o.bits = 32;
    const EncodedLayer e = make_paper_codec(o)->encode(ctx_for(l), l.f);
    const double err = rel_err(l.f, make_decoder("paper", "t")->decode(ctx_for(l), e));
    EXPECT_LT(err, prev * 1.05) << k;
    prev = err;
  }
  EXPECT_LT(prev, 1e-4);  // k = N = 600 > 4 * 32: exact
}

TEST(PaperCodec, DecodingWithAnotherSeedGivesSomethingElse) {
  const Layer l = make_layer(16, 16, 2, 5);
  PaperOptions o;
  o.pool_a = o.pool_b = 80;
  o.keep_fraction = 1.0;
  o.bits = 32;
  const EncodedLayer e = make_paper_codec(o)->encode(ctx_for(l, 1), l.f);
  EXPECT_LT(rel_err(l.f, make_decoder("paper", "t")->decode(ctx_for(l, 1), e)), 1e-5);
  EXPECT_GT(rel_err(l.f, make_decoder("paper", "t")->decode(ctx_for(l, 2), e)), 0.5);
}

TEST(PaperCodec, RejectsImpossibleSettingsAndDamagedBlobs) {
  const Layer l = make_layer(8, 8, 2, 5);
  PaperOptions o;
  o.pool_a = o.pool_b = 10;
  o.keep_a = 11;
  EXPECT_SOLAR_ERROR(make_paper_codec(o)->encode(ctx_for(l), l.f), ErrorKind::InvalidInput, "keep");
  o.keep_a = 5;
  EncodedLayer e = make_paper_codec(o)->encode(ctx_for(l), l.f);
  EncodedLayer bad = e;
  bad.blobs[0][0] ^= 0x01;  // one member more or less than keep
  EXPECT_SOLAR_ERROR(make_decoder("paper", "t")->decode(ctx_for(l), bad), ErrorKind::Format, "mask");
  bad = e;
  bad.params["pool"][0] = 1 << 30;
  EXPECT_SOLAR_ERROR(make_decoder("paper", "t")->decode(ctx_for(l), bad), ErrorKind::Format, "range");
  const Layer tall = make_layer(3, 8, 4, 5);  // rank above min(out, in)
  EXPECT_SOLAR_ERROR(make_paper_codec(o)->encode(ctx_for(tall), tall.f), ErrorKind::Unsupported, "rank");
}

}  // namespace
}  // namespace solar

namespace solar {
namespace {

TEST(PaperCodec, RepairedSolversBeatThePublishedOneAtTheSameBytes) {
  const Layer l = make_layer(24, 24, 3, 31);
  double err[3];
  size_t bytes[3];
  int i = 0;
  for (PaperSolver solver : {PaperSolver::Paper, PaperSolver::Refit, PaperSolver::Omp}) {
    PaperOptions o;
    o.pool_a = o.pool_b = 200;
    o.keep_a = o.keep_b = 40;
    o.bits = 32;
    o.solver = solver;
    const EncodedLayer e = make_paper_codec(o)->encode(ctx_for(l), l.f);
    bytes[i] = e.blobs[0].size() + e.blobs[1].size() + e.blobs[2].size() + e.blobs[3].size();
    err[i++] = rel_err(l.f, make_decoder("paper", "t")->decode(ctx_for(l), e));  // one decoder for all
  }
  EXPECT_EQ(bytes[0], bytes[1]);
  EXPECT_EQ(bytes[0], bytes[2]);
  EXPECT_LT(err[1], err[0]);
  EXPECT_LT(err[2], err[0]);
}

TEST(PaperCodec, WarnsWhenThePoolMakesTheSystemSquare) {
  const Layer l = make_layer(16, 16, 2, 3);  // factors of 32 entries
  PaperOptions o;
  o.pool_a = o.pool_b = 32;
  o.keep_a = o.keep_b = 10;
  std::vector<std::string> warnings;
  LayerContext ctx = ctx_for(l);
  ctx.warn = [&](const std::string& w) { warnings.push_back(w); };
  make_paper_codec(o)->encode(ctx, l.f);
  ASSERT_EQ(warnings.size(), 2u);
  EXPECT_NE(warnings[0].find("ill-conditioned"), std::string::npos);
  o.solver = PaperSolver::Refit;  // the repaired solver is not hurt by it
  warnings.clear();
  make_paper_codec(o)->encode(ctx, l.f);
  EXPECT_TRUE(warnings.empty());
}

}  // namespace
}  // namespace solar
