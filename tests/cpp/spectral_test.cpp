// The spectral modes end to end on stories260K adapters.
#include <algorithm>
#include <array>
#include <cmath>
#include <map>
#include <optional>

#include <gtest/gtest.h>

#include "adapter_factory.hpp"
#include "solar/codec.hpp"
#include "solar/container.hpp"
#include "solar/pipeline.hpp"
#include "test_support.hpp"

namespace solar {
namespace {

Matrix to_dense(const LoraModule& m) {
  return matmul(Matrix::from_f32(m.B.to_f32().data(), m.B.shape[0], m.B.shape[1]),
                Matrix::from_f32(m.A.to_f32().data(), m.A.shape[0], m.A.shape[1]));
}

class Spectral : public ::testing::Test {
 protected:
  void SetUp() override {
    const std::string path = test::stories_checkpoint();
    if (path.empty()) GTEST_SKIP() << "../shared/data is absent: stories260K tests need it";
    base_ = std::make_unique<Checkpoint>(path);
    adapter_ = test::stories_adapter(*base_, 4, {"wq", "wv"});
  }
  // The error the planner's target bounds: sqrt(sum_l v_l D_l / sum_l v_l E_l), D_l = ||dW - dW~||^2,
  // E_l = ||dW||^2, v_l = E_l^-balance (all scalings are equal here). Balance 0: the aggregate
  // relative error; 1: the root mean square of the layers' relative errors.
  double aggregate_error(const PeftAdapter& back, double balance = kFrobeniusBalance) const {
    double num = 0, den = 0;
    for (size_t i = 0; i < adapter_.modules.size(); ++i) {
      const auto& m = adapter_.modules[i];
      const Matrix d = matmul(Matrix::from_f32(m.B.to_f32().data(), m.B.shape[0], m.B.shape[1]),
                              Matrix::from_f32(m.A.to_f32().data(), m.A.shape[0], m.A.shape[1]));
      const double e = relative_delta_error(m.A, m.B, back.modules[i].A, back.modules[i].B);
      const double n2 = frobenius_norm(d) * frobenius_norm(d);
      const double v = std::pow(n2, -balance);
      num += v * e * e * n2;
      den += v * n2;
    }
    return std::sqrt(num / den);
  }
  std::unique_ptr<Checkpoint> base_;
  PeftAdapter adapter_;
};

TEST_F(Spectral, MeetsTheErrorTargetAndNeedsNoBase) {
  InMemoryWeights none("<none>");
  for (const std::optional<double> balance : {std::optional<double>{}, std::optional<double>{0.0}, std::optional<double>{0.5}}) {
    double prev_bytes = 1e18;
    for (double target : {0.01, 0.05, 0.2}) {
      CompressOptions o;
      o.mode = "spectral";
      o.target_error = target;
      o.balance = balance;
      const Container c = compress_adapter(adapter_, none, o);
      const auto bytes = serialize_container(c);
      const PeftAdapter back = decompress_container(parse_container(bytes.data(), bytes.size(), "m"), none);
      const double err = aggregate_error(back, balance.value_or(kFrobeniusBalance));
      EXPECT_LE(err, target * 1.0001) << target;
      EXPECT_GT(err, target * 0.3) << "a looser target should not cost the bytes of a tighter one";
      EXPECT_LT(static_cast<double>(bytes.size()), prev_bytes);
      prev_bytes = static_cast<double>(bytes.size());
    }
  }
}

// Dependent (trellis-coded) quantisation: the encoder's search and the decoder's state machine
// agree (the decoded error still meets the target it was planned for), and offering it to the
// plan gives smaller files than the uniform quantiser alone at the same error. ("auto", the
// default, offers it only with calibration statistics: none here, so it must equal "uniform".)
TEST_F(Spectral, DependentQuantisationIsSmallerAtTheSameError) {
  InMemoryWeights none("<none>");
  for (double target : {0.1, 0.3}) {
    size_t sizes[3] = {0, 0, 0};
    int dependent_layers = 0;
    for (int auto_q = 0; auto_q < 3; ++auto_q) {
      CompressOptions o;
      o.mode = "spectral";
      o.target_error = target;
      o.quantiser = auto_q == 1 ? "dependent" : auto_q == 2 ? "auto" : "uniform";
      const Container c = compress_adapter(adapter_, none, o);
      const auto bytes = serialize_container(c);
      const Container back_c = parse_container(bytes.data(), bytes.size(), "dq");
      const PeftAdapter back = decompress_container(back_c, none);
      EXPECT_LE(aggregate_error(back), target * 1.0001) << o.quantiser << " " << target;
      sizes[auto_q] = bytes.size();
      const std::vector<ModeStream> streams = read_streams(back_c);
      for (const auto& sym : streams.at(0).symbols) {
        const bool dq = sym.size() > 3 && sym[3] == 1;
        if (auto_q != 1) EXPECT_FALSE(dq) << o.quantiser << ": uniform only";
        dependent_layers += dq;
      }
    }
    EXPECT_GT(dependent_layers, 0) << target;
    EXPECT_LT(sizes[1], sizes[0]) << "dependent " << sizes[1] << " B, uniform " << sizes[0] << " B at " << target;
    EXPECT_EQ(sizes[2], sizes[0]) << "auto without statistics is uniform";
  }
  CompressOptions bad;
  bad.mode = "spectral";
  bad.quantiser = "lattice";
  EXPECT_THROW(compress_adapter(adapter_, none, bad), Error);
}

TEST_F(Spectral, BalanceSharesTheErrorBetweenLayers) {
  // Scale half the layers' updates down 10x: by absolute error (balance 0) they are nearly
  // dropped; by relative error (balance 1) they keep about the others' relative error.
  PeftAdapter mixed = adapter_;
  for (size_t i = 0; i < mixed.modules.size(); i += 2) {
    std::vector<float> b = mixed.modules[i].B.to_f32();
    for (float& x : b) x *= 0.1f;
    mixed.modules[i].B = Tensor::from_f32(b, mixed.modules[i].B.shape, mixed.modules[i].B.dtype);
  }
  InMemoryWeights none("<none>");
  auto errors = [&](double balance) {  // worst relative error of the small layers, of the large ones
    CompressOptions o;
    o.mode = "spectral";
    o.target_error = 0.1;
    o.balance = balance;
    const auto bytes = serialize_container(compress_adapter(mixed, none, o));
    const PeftAdapter back = decompress_container(parse_container(bytes.data(), bytes.size(), "m"), none);
    std::array<double, 2> worst{0, 0};
    for (size_t i = 0; i < mixed.modules.size(); ++i) {
      const auto& m = mixed.modules[i];
      worst[i % 2] = std::max(worst[i % 2], relative_delta_error(m.A, m.B, back.modules[i].A, back.modules[i].B));
    }
    return worst;
  };
  const auto absolute = errors(0.0), relative = errors(1.0);
  EXPECT_GT(absolute[0], 0.5) << "by absolute error the small layers are hardly coded";
  EXPECT_LT(relative[0], 0.3);
  EXPECT_LT(relative[1], 0.3);
  EXPECT_GT(relative[1], absolute[1]) << "their bytes come from the large layers";
}

TEST_F(Spectral, ByteBudgetIsNeverExceeded) {
  InMemoryWeights none("<none>");
  double prev_err = 0;
  for (size_t budget : {6000u, 3000u, 1500u, 800u}) {
    CompressOptions o;
    o.mode = "spectral";
    o.target_bytes = budget;
    const auto bytes = serialize_container(compress_adapter(adapter_, none, o));
    EXPECT_LE(bytes.size(), budget);
    EXPECT_GT(bytes.size(), budget * 8 / 10) << "the budget should be used";
    const double err = aggregate_error(decompress_container(parse_container(bytes.data(), bytes.size(), "m"), none));
    EXPECT_GT(err, prev_err);
    prev_err = err;
  }
  // Near the smallest possible file: every budget either fits or is refused as below it, and
  // once one fits every larger one does.
  bool fitted = false;
  for (size_t budget = 60; budget < 400; budget += 7) {
    CompressOptions o;
    o.mode = "spectral";
    o.target_bytes = budget;
    try {
      EXPECT_LE(serialize_container(compress_adapter(adapter_, none, o)).size(), budget);
      fitted = true;
    } catch (const Error& e) {
      EXPECT_FALSE(fitted) << budget << ": " << e.what();
      EXPECT_NE(std::string(e.what()).find("smallest file"), std::string::npos) << e.what();
    }
  }
  EXPECT_TRUE(fitted);
  CompressOptions tiny;
  tiny.mode = "spectral";
  tiny.target_bytes = 20;
  EXPECT_SOLAR_ERROR(compress_adapter(adapter_, none, tiny), ErrorKind::InvalidInput, "smallest file");
}

TEST_F(Spectral, OutputIsByteIdenticalWhateverTheThreadCount) {
  std::vector<std::vector<uint8_t>> outs;
  for (int threads : {1, 2, 4}) {
    CompressOptions o;
    o.mode = "spectral-w";
    o.target_error = 0.05;
    o.threads = threads;
    outs.push_back(serialize_container(compress_adapter(adapter_, *base_, o)));
  }
  EXPECT_EQ(outs[0], outs[1]);
  EXPECT_EQ(outs[0], outs[2]);
  const PeftAdapter back = decompress_container(parse_container(outs[0].data(), outs[0].size(), "m"), *base_);
  EXPECT_LE(aggregate_error(back), 0.05 * 1.0001);
}

TEST_F(Spectral, CalibrationSpendsBytesWhereInputsAreLarge) {
  // Inputs that live almost entirely in the first 8 of 64 dimensions: errors elsewhere are cheap.
  std::vector<double> scale(64);
  for (int i = 0; i < 64; ++i) scale[static_cast<size_t>(i)] = i < 8 ? 1.0 : 1e-4;
  InMemoryWeights calib("<calib>");
  std::vector<float> s(64 * 64, 0.0f);
  for (int i = 0; i < 64; ++i) s[static_cast<size_t>(i * 64 + i)] = static_cast<float>(scale[static_cast<size_t>(i)]);
  const Tensor moment = Tensor::from_f32(s, {64, 64}, DType::F32);
  for (const auto& m : adapter_.modules)
    calib.add(m.path + ".input_moment", TensorView{moment.dtype, moment.shape, moment.data.data(), moment.data.size()});
  // Output error E x for inputs of that covariance: sum_ij E_ij^2 scale_j.
  auto weighted_error = [&](const PeftAdapter& back) {
    double total = 0;
    for (size_t k = 0; k < adapter_.modules.size(); ++k) {
      auto dense = [](const LoraModule& m) {
        return matmul(Matrix::from_f32(m.B.to_f32().data(), m.B.shape[0], m.B.shape[1]),
                      Matrix::from_f32(m.A.to_f32().data(), m.A.shape[0], m.A.shape[1]));
      };
      const Matrix d1 = dense(adapter_.modules[k]), d2 = dense(back.modules[k]);
      for (int64_t i = 0; i < d1.rows; ++i)
        for (int64_t j = 0; j < d1.cols; ++j) total += (d1(i, j) - d2(i, j)) * (d1(i, j) - d2(i, j)) * scale[static_cast<size_t>(j)];
    }
    return total;
  };
  InMemoryWeights none("<none>");
  CompressOptions plain, weighted;
  plain.mode = weighted.mode = "spectral";
  plain.target_bytes = weighted.target_bytes = 2000;
  weighted.calibration = &calib;
  const Container a = compress_adapter(adapter_, none, plain), b = compress_adapter(adapter_, none, weighted);
  const double ea = weighted_error(decompress_container(a, none)), eb = weighted_error(decompress_container(b, none));
  // Only X, the rank and the step pair adapt today (Y keeps a uniform grid), so the gain is modest.
  EXPECT_LT(eb, 0.85 * ea) << "calibrated " << eb << " vs plain " << ea;
  // A missing statistic is named.
  InMemoryWeights empty("calib.safetensors");
  weighted.calibration = &empty;
  EXPECT_SOLAR_ERROR(compress_adapter(adapter_, none, weighted), ErrorKind::Mismatch, "input_moment");
}

// A calibration file with update gradients: at the same budget, the plan keeps the components the
// loss pulls on (here the gradient points along every component but each layer's first, so
// dropping them costs first-order loss the plain metric does not see). Malformed first-order
// entries are refused, naming the file and the tensor.
TEST_F(Spectral, FirstOrderStatisticsKeepTheComponentsTheLossPullsOn) {
  std::map<int64_t, Tensor> identities;
  auto identity = [&](int64_t dim) -> const Tensor& {
    if (!identities.count(dim)) {
      std::vector<float> eye(static_cast<size_t>(dim * dim), 0.0f);
      for (int64_t i = 0; i < dim; ++i) eye[static_cast<size_t>(i * (dim + 1))] = 1.0f;
      identities.emplace(dim, Tensor::from_f32(eye, {dim, dim}, DType::F32));
    }
    return identities.at(dim);
  };
  auto view = [](const Tensor& t) { return TensorView{t.dtype, t.shape, t.data.data(), t.data.size()}; };
  auto add_moments = [&](InMemoryWeights& w, const LoraModule& m) {
    w.add(m.path + ".input_moment", view(identity(m.A.shape[1])));
    w.add(m.path + ".output_grad_moment", view(identity(m.B.shape[0])));
  };
  std::vector<Tensor> gradients;  // -(B A - its rank-1 part): pulls on components 2.. of each layer
  double energy = 0;
  for (const auto& m : adapter_.modules) {
    const Matrix ba = matmul(Matrix::from_f32(m.B.to_f32().data(), m.B.shape[0], m.B.shape[1]),
                             Matrix::from_f32(m.A.to_f32().data(), m.A.shape[0], m.A.shape[1]));
    const Svd svd = full_svd(ba);
    std::vector<float> g(ba.data.size());
    for (int64_t i = 0; i < ba.rows; ++i)
      for (int64_t j = 0; j < ba.cols; ++j)
        g[static_cast<size_t>(i * ba.cols + j)] =
            static_cast<float>(-(ba(i, j) - svd.U(i, 0) * svd.S[0] * svd.V(j, 0)) / m.scaling);
    gradients.push_back(Tensor::from_f32(g, {ba.rows, ba.cols}, DType::F32));
    energy += m.scaling * m.scaling * frobenius_norm(ba) * frobenius_norm(ba);
  }
  // Curvature sum_l E_l / 5: one unit of loss weighs ten units of the metric, so dropping a
  // component costs 11 times its energy.
  const Tensor curvature = Tensor::from_f32({static_cast<float>(energy / 500)}, {1}, DType::F32);
  InMemoryWeights plain("<moments>"), first("first.safetensors");
  for (size_t i = 0; i < adapter_.modules.size(); ++i) {
    add_moments(plain, adapter_.modules[i]);
    add_moments(first, adapter_.modules[i]);
    first.add(adapter_.modules[i].path + ".update_gradient", view(gradients[i]));
  }
  first.add(kLossCurvatureKey, view(curvature));
  InMemoryWeights none("<none>");
  CompressOptions o;
  o.mode = "spectral";
  o.target_bytes = 1200;
  // The restored adapter's first-order loss, sum_l <dL/dW_l, scaling_l (B~ A~ - B A)_l>, and the
  // components it keeps (B~'s non-zero columns).
  struct Outcome {
    double loss = 0;
    int kept = 0;
  };
  auto outcome = [&](const CompressOptions& opts) {
    const PeftAdapter back = decompress_container(compress_adapter(adapter_, none, opts), none);
    Outcome out;
    for (size_t i = 0; i < adapter_.modules.size(); ++i) {
      const auto& m = adapter_.modules[i];
      const Matrix d = to_dense(m), b = to_dense(back.modules[i]);
      const std::vector<float> g = gradients[i].to_f32();
      for (size_t j = 0; j < d.data.size(); ++j) out.loss += g[j] * m.scaling * (b.data[j] - d.data[j]);
      const Matrix bm = Matrix::from_f32(back.modules[i].B.to_f32().data(), m.B.shape[0], m.B.shape[1]);
      for (int64_t c = 0; c < bm.cols; ++c) {
        bool used = false;
        for (int64_t r = 0; r < bm.rows; ++r) used = used || bm(r, c) != 0;
        out.kept += used;
      }
    }
    return out;
  };
  o.calibration = &plain;
  const Outcome without = outcome(o);
  o.calibration = &first;
  const Outcome with = outcome(o);
  const int all = static_cast<int>(adapter_.modules.size()) * 4;
  EXPECT_LT(without.kept, all) << "the budget is loose enough to keep everything anyway";
  EXPECT_EQ(with.kept, all);
  EXPECT_GT(without.loss, 0);
  // What remains is the rounding of the kept components (not priced to first order).
  EXPECT_LT(with.loss, 0.95 * without.loss) << "first-order loss with gradients " << with.loss << ", without " << without.loss;

  InMemoryWeights missing("nocurv.safetensors");
  for (size_t i = 0; i < adapter_.modules.size(); ++i) {
    add_moments(missing, adapter_.modules[i]);
    missing.add(adapter_.modules[i].path + ".update_gradient", view(gradients[i]));
  }
  o.calibration = &missing;
  EXPECT_SOLAR_ERROR(compress_adapter(adapter_, none, o), ErrorKind::Mismatch, "nocurv.safetensors");
  EXPECT_SOLAR_ERROR(compress_adapter(adapter_, none, o), ErrorKind::Mismatch, kLossCurvatureKey);
  const Tensor zero = Tensor::from_f32({0.0f}, {1}, DType::F32);
  missing.add(kLossCurvatureKey, view(zero));
  EXPECT_SOLAR_ERROR(compress_adapter(adapter_, none, o), ErrorKind::InvalidInput, "one positive number");
  missing.add(kLossCurvatureKey, view(curvature));
  const LoraModule& wv = adapter_.modules[1];
  missing.add(wv.path + ".update_gradient", view(identity(wv.A.shape[1])));
  EXPECT_SOLAR_ERROR(compress_adapter(adapter_, none, o), ErrorKind::Mismatch,
                     "update_gradient' must be " + std::to_string(wv.B.shape[0]) + "x" + std::to_string(wv.A.shape[1]));
}

// With statistics, every operating point's distortion (what the planner trusts) is the layer's
// error in the metric, tr(G E S E^T) for E = B A - B~ A~, of the layer decode_symbols rebuilds
// from it, at high rates and at low ones. `spectral` gets Y~^T S Y~ from its error feedback's
// rounding errors (no n x n product); `spectral-w`, which has no feedback, prices only Y's rows
// that are not zero at low rates. Returns how many points were checked on each of those paths.
struct DistortionPaths {
  int checked = 0, dependent = 0, uniform = 0, sparse = 0;
};
DistortionPaths check_point_distortions(bool rotate, int64_t m = 40, int64_t n = 56, int64_t r = 6, size_t stride = 7) {
  auto random = [](int64_t rows, int64_t cols, uint64_t seed) {
    const auto v = test::random_normals(static_cast<size_t>(rows * cols), seed);
    return Matrix::from_f32(v.data(), rows, cols);
  };
  auto moment = [&](int64_t dim, uint64_t seed) {  // a few loud channels, as in transformers
    Matrix z = random(dim, 2 * dim, seed);
    for (int64_t j = 0; j < z.cols; ++j) {
      z(3, j) *= 12;
      z(dim / 2, j) *= 5;
    }
    return matmul(z, z, false, true);
  };
  Factors f{random(r, n, 1), random(m, r, 2)};
  for (int64_t j = 0; j < r; ++j)  // a decaying spectrum, as a trained update has
    for (int64_t i = 0; i < n; ++i) f.A(j, i) *= std::pow(0.5, static_cast<double>(j));
  LayerContext ctx(0, 0, LayerShape{m, n, r}, [&] { return random(m, n, 5); });
  ctx.weight = 0.7;
  ctx.input_moment = moment(n, 3);
  ctx.output_moment = moment(m, 4);
  const auto codec = make_spectral_codec(rotate, /*dependent=*/true);
  const std::vector<Candidate> points = codec->candidates(ctx, f);
  EXPECT_GT(points.size(), 100u);
  EXPECT_EQ(points[0].setting[0], 0);  // the first point drops the layer: its distortion is the whole update's
  DistortionPaths seen;
  for (size_t c = 0; c < points.size(); c += stride) {
    const std::vector<int32_t> sym = codec->candidate_symbols(ctx, f, points[c]);
    const Factors back = codec->decode_symbols(ctx, sym);
    // E = B A - B~ A~ = P Q with P = [B, -B~] and Q = [A; A~], so tr(G E S E^T) = tr((P^T G P)(Q S Q^T)).
    Matrix pm(m, 2 * r), qm(2 * r, n);
    for (int64_t j = 0; j < r; ++j) {
      for (int64_t i = 0; i < m; ++i) pm(i, j) = f.B(i, j), pm(i, r + j) = -back.B(i, j);
      for (int64_t i = 0; i < n; ++i) qm(j, i) = f.A(j, i), qm(r + j, i) = back.A(j, i);
    }
    const Matrix pgp = matmul(pm, matmul(*ctx.output_moment, pm), true);
    const Matrix qsq = matmul(qm, matmul(*ctx.input_moment, qm, false, true));
    double metric = 0;
    for (size_t i = 0; i < pgp.data.size(); ++i) metric += pgp.data[i] * qsq.data[i];  // both symmetric
    // The codec gets it as energy - 2 cross + self: exact up to rounding of the whole energy.
    EXPECT_NEAR(points[c].distortion, ctx.weight * metric, 1e-12 * points[0].distortion) << "point " << c;
    // The points are priced in batches (many quantisations side by side) and rebuilt one at a
    // time: the rebuilt integers must cost what was priced, as the first layer of a stream.
    const double bytes = codec->stream_summary({StreamLayer{ctx.shape(), ""}}, {sym}, kFormatVersion)[0]["bytes"].get<double>();
    EXPECT_EQ(static_cast<size_t>(std::ceil(bytes)) + 1, points[c].bytes) << "point " << c;  // as BitCounter::bytes_for
    ++seen.checked;
    if (sym[0] > 0) {
      ++(points[c].setting[3] == 2 ? seen.dependent : seen.uniform);  // variants: 2 dead zones, then dependent
      int64_t rows = 0;  // Y's rows with any non-zero integer
      const int64_t k = sym[0];
      for (int64_t i = 0; i < n; ++i) {
        bool any = false;
        for (int64_t j = 0; j < k; ++j) any = any || sym[static_cast<size_t>(4 + m * k + j * n + i)] != 0;
        rows += any;
      }
      seen.sparse += 2 * rows <= n;
    }
  }
  return seen;
}

TEST(SpectralCalibrated, PointDistortionIsTheDecodedErrorInTheMetric) {
  const DistortionPaths fed_back = check_point_distortions(false);
  EXPECT_GT(fed_back.checked, 15);
  EXPECT_GT(fed_back.uniform, 3) << "no uniform point with error feedback was checked";
  EXPECT_GT(fed_back.dependent, 3) << "no trellis point with error feedback was checked";
  const DistortionPaths rotated = check_point_distortions(true);
  EXPECT_GT(rotated.checked, 15);
  EXPECT_GT(rotated.sparse, 3) << "no low-rate point exercised the sparse pricing";
}

// Columns of 1024 rows or more take the trellis search's blocked error feedback (rows in blocks,
// the rows after a block updated in one product): the same check on a layer of 1100 x 1090 (a last
// block shorter than the others on both sides).
TEST(SpectralCalibrated, BlockedFeedbackPointDistortionIsTheDecodedErrorInTheMetric) {
  const DistortionPaths seen = check_point_distortions(false, 1100, 1090, 3, 23);
  EXPECT_GT(seen.checked, 15);
  EXPECT_GT(seen.dependent, 3) << "no trellis point with blocked error feedback was checked";
}

// With an update gradient, a point's first-order cost is what dropping the components it does not
// keep costs the loss to first order, -<dL/d(B A), B A - T_k>, T_k the metric's best rank-k part
// of B A (computed here from the whitened SVD, not as the codec does), clamped at zero; a point
// keeping every component costs nothing, and without a gradient no point does.
TEST(SpectralCalibrated, FirstOrderCostIsTheGradientsPullOnTheDroppedComponents) {
  const int64_t m = 40, n = 56, r = 6;
  auto random = [](int64_t rows, int64_t cols, uint64_t seed) {
    const auto v = test::random_normals(static_cast<size_t>(rows * cols), seed);
    return Matrix::from_f32(v.data(), rows, cols);
  };
  auto moment = [&](int64_t dim, uint64_t seed) {
    const Matrix z = random(dim, 2 * dim, seed);
    return matmul(z, z, false, true);
  };
  auto power = [](const Matrix& a, double p) {  // a^p of a symmetric positive definite matrix
    const SymmetricEigen e = symmetric_eigen(a);
    Matrix scaled = e.V;
    for (int64_t j = 0; j < scaled.cols; ++j)
      for (int64_t i = 0; i < scaled.rows; ++i) scaled(i, j) *= std::pow(e.values[static_cast<size_t>(j)], p);
    return matmul(scaled, e.V, false, true);
  };
  Factors f{random(r, n, 1), random(m, r, 2)};
  for (int64_t j = 0; j < r; ++j)
    for (int64_t i = 0; i < n; ++i) f.A(j, i) *= std::pow(0.6, static_cast<double>(j));
  LayerContext ctx(0, 0, LayerShape{m, n, r}, {});
  ctx.input_moment = moment(n, 3);
  ctx.output_moment = moment(m, 4);
  const auto codec = make_spectral_codec(false, true);
  for (const Candidate& c : codec->candidates(ctx, f)) EXPECT_EQ(c.first_order, 0.0);

  ctx.update_gradient = random(m, n, 7);
  const Matrix ba = matmul(f.B, f.A);
  const Matrix gh = power(*ctx.output_moment, 0.5), sh = power(*ctx.input_moment, 0.5);
  const Svd w = full_svd(matmul(matmul(gh, ba), sh));
  const Matrix gih = power(*ctx.output_moment, -0.5), sih = power(*ctx.input_moment, -0.5);
  std::vector<double> expected(static_cast<size_t>(r) + 1);
  for (int64_t k = 0; k <= r; ++k) {
    Matrix core(m, n);  // the whitened update's components k.. (what T_k leaves out)
    for (int64_t c = k; c < r; ++c)
      for (int64_t i = 0; i < m; ++i)
        for (int64_t j = 0; j < n; ++j) core(i, j) += w.U(i, c) * w.S[static_cast<size_t>(c)] * w.V(j, c);
    const Matrix dropped = matmul(matmul(gih, core), sih);
    double pull = 0;
    for (size_t i = 0; i < dropped.data.size(); ++i) pull += ctx.update_gradient->data[i] * dropped.data[i];
    expected[static_cast<size_t>(k)] = std::max(0.0, -pull);
  }
  double scale = 0;
  for (double v : expected) scale = std::max(scale, v);
  ASSERT_GT(scale, 0) << "the test's gradient pulls on no dropped component";
  const std::vector<Candidate> points = codec->candidates(ctx, f);
  for (const Candidate& c : points)
    EXPECT_NEAR(c.first_order, expected[static_cast<size_t>(c.setting[0])], 1e-9 * scale) << "k = " << c.setting[0];
  EXPECT_EQ(expected[static_cast<size_t>(r)], 0.0);
  // The opposite gradient: every cost flips sign, so the clamped ones and only they change.
  for (double& v : ctx.update_gradient->data) v = -v;
  const std::vector<Candidate> flipped = codec->candidates(ctx, f);
  ASSERT_EQ(flipped.size(), points.size());
  int both_zero = 0;
  for (size_t i = 0; i < points.size(); ++i) both_zero += points[i].first_order == 0 && flipped[i].first_order == 0;
  EXPECT_EQ(both_zero, static_cast<int>(std::count_if(points.begin(), points.end(), [&](const Candidate& c) { return c.setting[0] == r; })));
}

// Format v5's stream syntax on hand-made symbols: layers of two interleaved groups whose step
// codes differ; the group prediction makes the stream shorter than one prediction chain would, it
// round-trips, and a component whose leading X integer is negative is refused (its sign is not
// coded, so the encoder must normalise it first).
TEST(SpectralStream, StepsArePredictedWithinTheirGroup) {
  const LayerShape shape{8, 6, 2};
  std::vector<std::vector<int32_t>> symbols;
  for (int layer = 0; layer < 12; ++layer) {
    const bool q = layer % 2 == 0;
    std::vector<int32_t> s{1, q ? 230 : 205, q ? 120 : 131, 0};
    for (int i = 0; i < 8; ++i) s.push_back((i * 7 + layer) % 5 - 1 + (i == 0 ? 2 : 0));  // X: leads with a positive integer
    for (int i = 0; i < 6; ++i) s.push_back((i * 3 + layer) % 4 - 2);
    symbols.push_back(s);
  }
  std::vector<StreamLayer> grouped, single;
  for (int layer = 0; layer < 12; ++layer) {
    grouped.push_back({shape, stream_group("model.layers." + std::to_string(layer / 2) + (layer % 2 ? ".v_proj" : ".q_proj"))});
    single.push_back({shape, "proj"});
  }
  EXPECT_EQ(grouped[1].group, "v_proj");
  EXPECT_EQ(stream_group("lm_head"), "lm_head");
  const auto codec = make_spectral_codec();
  const std::vector<uint8_t> a = codec->write_stream(grouped, symbols), b = codec->write_stream(single, symbols);
  EXPECT_LT(a.size() + 5, b.size()) << "grouped " << a.size() << " vs one chain " << b.size();
  EXPECT_EQ(codec->read_stream(grouped, a, "grouped", 5), symbols);
  EXPECT_EQ(codec->read_stream(single, b, "single", 5), symbols);
  // Read with the wrong groups, the same bytes give other step codes (or an error).
  try {
    EXPECT_NE(codec->read_stream(single, a, "mismatch", 5), symbols);
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::Format);
  }
  symbols[3][4] = -std::abs(symbols[3][4]) - 1;
  EXPECT_SOLAR_ERROR(codec->write_stream(grouped, symbols), ErrorKind::InvalidInput, "first non-zero");
}

}  // namespace
}  // namespace solar
