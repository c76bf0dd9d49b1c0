// The `paper` mode: SOLAR exactly as the paper describes it (Sec. 2.2, App. D).
//
//   W = U S V^T (full, canonical SVD);  A_proj = A V (r x n);  B_proj = U^T B (m x r)
//   pool member i of A: r distinct columns of V, laid out as rows, plus noise * N(0,1)
//   pool member j of B: r distinct columns of U, as columns,   plus noise * N(0,1)
//   coefficients: least squares of the projected factor on its whole pool (minimum norm when
//   the pool is larger than the factor), then the top-k by magnitude, kept without refitting.
//   A~ = (sum_i a_i M_A^i) V^T,  B~ = U (sum_j b_j M_B^j).
// Blobs: mask_A, coefficients_A, mask_B, coefficients_B.
#include <algorithm>
#include <cmath>
#include <numeric>
#include <tuple>

#include "solar/codec.hpp"
#include "solar/error.hpp"
#include "solar/philox.hpp"

namespace solar {
namespace {

constexpr int kFactorA = 0, kFactorB = 1;
constexpr double kMaxPoolBytes = 8.0 * (1ull << 30);

// Shape of a projected factor and the basis its pool draws from.
struct FactorGeometry {
  int factor;
  int64_t rows, cols;  // of the projected factor
  int64_t bound;       // number of basis vectors to choose from
};

FactorGeometry geometry(int factor, const LayerShape& s) {
  if (factor == kFactorA) return {kFactorA, s.r, s.n, s.n};
  return {kFactorB, s.m, s.r, s.m};
}

// Pool member `member` of a factor, row-major, in double precision.
void pool_member(const LayerContext& ctx, const FactorGeometry& g, double noise, uint32_t member,
                 std::vector<uint32_t>& idx, std::vector<float>& z, double* out) {
  const Svd& svd = ctx.svd();
  const auto r = static_cast<uint32_t>(ctx.shape().r);
  idx.resize(r);
  philox_distinct_indices(ctx.seed(), ctx.layer_index(), member, index_stream(g.factor),
                          static_cast<uint32_t>(g.bound), r, idx.data());
  const size_t len = static_cast<size_t>(g.rows * g.cols);
  z.resize(len);
  philox_normals(ctx.seed(), ctx.layer_index(), member, noise_stream(g.factor), 0, len, z.data());
  if (g.factor == kFactorA) {
    for (int64_t a = 0; a < g.rows; ++a)
      for (int64_t c = 0; c < g.cols; ++c)
        out[a * g.cols + c] = svd.V(c, idx[static_cast<size_t>(a)]) + noise * static_cast<double>(z[static_cast<size_t>(a * g.cols + c)]);
  } else {
    for (int64_t p = 0; p < g.rows; ++p)
      for (int64_t b = 0; b < g.cols; ++b)
        out[p * g.cols + b] = svd.U(p, idx[static_cast<size_t>(b)]) + noise * static_cast<double>(z[static_cast<size_t>(p * g.cols + b)]);
  }
}

struct FactorCode {
  std::vector<uint8_t> mask, coefficients;
};

// Least squares restricted to the members in `support` (columns of the column-major pool d).
std::vector<double> refit(const std::vector<double>& d, int64_t len, const std::vector<uint32_t>& support,
                          const std::vector<double>& target) {
  std::vector<double> sub(static_cast<size_t>(len) * support.size());
  for (size_t j = 0; j < support.size(); ++j)
    std::copy_n(d.begin() + static_cast<ptrdiff_t>(support[j]) * len, len, sub.begin() + static_cast<ptrdiff_t>(j) * len);
  return lstsq_min_norm_col_major(len, static_cast<int64_t>(support.size()), std::move(sub), target);
}

// Orthogonal matching pursuit: k greedy picks of the member most correlated with the residual,
// refitting on the support after each (Pati et al. 1993).
std::vector<uint32_t> omp_support(const std::vector<double>& d, int64_t len, int64_t pool, int64_t keep,
                                  const std::vector<double>& target) {
  std::vector<double> norms(static_cast<size_t>(pool));
  for (int64_t i = 0; i < pool; ++i) {
    double s = 0;
    for (int64_t e = 0; e < len; ++e) s += d[static_cast<size_t>(i * len + e)] * d[static_cast<size_t>(i * len + e)];
    norms[static_cast<size_t>(i)] = std::sqrt(std::max(s, 1e-300));
  }
  std::vector<uint32_t> support;
  std::vector<bool> used(static_cast<size_t>(pool), false);
  std::vector<double> residual = target;
  for (int64_t step = 0; step < keep; ++step) {
    int64_t best = -1;
    double best_score = -1;
    for (int64_t i = 0; i < pool; ++i) {
      if (used[static_cast<size_t>(i)]) continue;
      double c = 0;
      for (int64_t e = 0; e < len; ++e) c += d[static_cast<size_t>(i * len + e)] * residual[static_cast<size_t>(e)];
      const double score = std::fabs(c) / norms[static_cast<size_t>(i)];
      if (score > best_score) { best_score = score; best = i; }
    }
    used[static_cast<size_t>(best)] = true;
    support.push_back(static_cast<uint32_t>(best));
    const std::vector<double> coef = refit(d, len, support, target);
    residual = target;
    for (size_t j = 0; j < support.size(); ++j)
      for (int64_t e = 0; e < len; ++e) residual[static_cast<size_t>(e)] -= coef[j] * d[static_cast<size_t>(support[j] * len + e)];
  }
  return support;
}

FactorCode encode_factor(const LayerContext& ctx, const FactorGeometry& g, const Matrix& target,
                         int64_t pool, int64_t keep, int bits, double noise, PaperSolver solver) {
  const int64_t len = g.rows * g.cols;
  if (static_cast<double>(len) * static_cast<double>(pool) * 8.0 > kMaxPoolBytes)
    throw Error(ErrorKind::InvalidInput, "paper mode",
                "pool of " + std::to_string(pool) + " members of " + std::to_string(len) +
                    " entries needs more than 8 GiB; use a smaller --pool");
  std::vector<double> d(static_cast<size_t>(len * pool));
  std::vector<uint32_t> idx;
  std::vector<float> z;
  for (int64_t i = 0; i < pool; ++i)
    pool_member(ctx, g, noise, static_cast<uint32_t>(i), idx, z, d.data() + i * len);
  std::vector<uint32_t> kept;
  std::vector<double> values;
  if (solver == PaperSolver::Omp) {
    kept = omp_support(d, len, pool, keep, target.data);
    std::sort(kept.begin(), kept.end());
    values = refit(d, len, kept, target.data);
  } else {
    // The paper: least squares over the whole pool, then the k largest coefficients.
    const std::vector<double> coef = lstsq_min_norm_col_major(len, pool, solver == PaperSolver::Refit ? d : std::move(d), target.data);
    std::vector<uint32_t> order(static_cast<size_t>(pool));
    std::iota(order.begin(), order.end(), 0u);
    std::stable_sort(order.begin(), order.end(), [&](uint32_t a, uint32_t b) { return std::fabs(coef[a]) > std::fabs(coef[b]); });
    kept.assign(order.begin(), order.begin() + keep);
    std::sort(kept.begin(), kept.end());
    if (solver == PaperSolver::Refit) {
      values = refit(d, len, kept, target.data);  // repaired: refit on the kept support
    } else {
      for (uint32_t i : kept) values.push_back(coef[i]);
    }
  }
  return {pack_mask(kept, static_cast<size_t>(pool)), quantize_coefficients(values, bits)};
}

Matrix decode_factor(const LayerContext& ctx, const FactorGeometry& g, const std::vector<uint32_t>& members,
                     const std::vector<double>& coef, double noise) {
  Matrix proj(g.rows, g.cols);
  std::vector<double> m(static_cast<size_t>(g.rows * g.cols));
  std::vector<uint32_t> idx;
  std::vector<float> z;
  for (size_t t = 0; t < members.size(); ++t) {
    pool_member(ctx, g, noise, members[t], idx, z, m.data());
    for (size_t e = 0; e < m.size(); ++e) proj.data[e] += coef[t] * m[e];
  }
  return proj;
}

void check_supported(const LayerShape& s, const std::string& where) {
  if (s.r > s.n || s.r > s.m)
    throw Error(ErrorKind::Unsupported, where, "paper mode needs the LoRA rank (" + std::to_string(s.r) +
                                                   ") to be at most min(in, out) = " + std::to_string(std::min(s.m, s.n)));
}

class PaperCodec final : public LayerCodec {
 public:
  explicit PaperCodec(PaperOptions o) : o_(std::move(o)) {}
  std::string mode() const override { return "paper"; }
  bool needs_base() const override { return true; }

  EncodedLayer encode(const LayerContext& ctx, const Factors& f) const override {
    const LayerShape& s = ctx.shape();
    check_supported(s, "paper mode");
    const int64_t na = o_.pool_a, nb = o_.pool_b;
    if (na < 1 || nb < 1 || na > (1 << 24) || nb > (1 << 24))
      throw Error(ErrorKind::InvalidInput, "paper mode", "pool size must be between 1 and 16777216");
    if (!(o_.keep_fraction >= 0.0 && o_.keep_fraction <= 1.0))
      throw Error(ErrorKind::InvalidInput, "paper mode", "keep fraction must be within [0, 1]");
    const int64_t ka = o_.keep_a.value_or(std::llround(o_.keep_fraction * static_cast<double>(na)));
    const int64_t kb = o_.keep_b.value_or(std::llround(o_.keep_fraction * static_cast<double>(nb)));
    if (ka < 0 || ka > na || kb < 0 || kb > nb)
      throw Error(ErrorKind::InvalidInput, "paper mode", "keep must be between 0 and the pool size");
    if (!std::isfinite(o_.noise) || o_.noise < 0)
      throw Error(ErrorKind::InvalidInput, "paper mode", "noise must be a finite non-negative number");
    for (const auto& [pool, keep, len, name] : {std::tuple{na, ka, s.r * s.n, "A"}, std::tuple{nb, kb, s.m * s.r, "B"}}) {
      // A pool about the size of the factor makes the least-squares system square and
      // ill-conditioned: huge cancelling coefficients that top-k then breaks (error x10^4 seen).
      if (ctx.warn && o_.solver == PaperSolver::Paper && keep < pool && std::abs(pool - len) * 10 <= len)
        ctx.warn("paper mode, layer " + std::to_string(ctx.layer_index()) + ": pool " + std::to_string(pool) + " is within 10% of factor " +
                 name + "'s " + std::to_string(len) + " entries; the least squares is ill-conditioned and top-k will wreck it (use --solver refit or another --pool)");
    }
    const Svd& svd = ctx.svd();
    const Matrix a_proj = matmul(f.A, svd.V);                 // r x n
    const Matrix b_proj = matmul(svd.U, f.B, /*trans_a=*/true);  // m x r
    FactorCode ca = encode_factor(ctx, geometry(kFactorA, s), a_proj, na, ka, o_.bits, o_.noise, o_.solver);
    FactorCode cb = encode_factor(ctx, geometry(kFactorB, s), b_proj, nb, kb, o_.bits, o_.noise, o_.solver);
    EncodedLayer e;
    e.params = {{"pool", {na, nb}}, {"keep", {ka, kb}}, {"bits", o_.bits}, {"noise", o_.noise}};
    e.blobs = {std::move(ca.mask), std::move(ca.coefficients), std::move(cb.mask), std::move(cb.coefficients)};
    return e;
  }

  Factors decode(const LayerContext& ctx, const EncodedLayer& e) const override {
    const std::string where = "paper layer " + std::to_string(ctx.layer_index());
    const LayerShape& s = ctx.shape();
    check_supported(s, where);
    int64_t pool[2], keep[2];
    int bits = 0;
    double noise = 0;
    try {
      for (int f = 0; f < 2; ++f) {
        pool[f] = e.params.at("pool").at(f).get<int64_t>();
        keep[f] = e.params.at("keep").at(f).get<int64_t>();
      }
      bits = e.params.at("bits").get<int>();
      noise = e.params.at("noise").get<double>();
    } catch (const nlohmann::json::exception& ex) {
      throw Error(ErrorKind::Format, where, std::string("bad parameters: ") + ex.what());
    }
    if (e.blobs.size() != 4) throw Error(ErrorKind::Format, where, "expected 4 blobs");
    if (!std::isfinite(noise) || noise < 0) throw Error(ErrorKind::Format, where, "bad noise");
    Matrix out[2];
    for (int f = 0; f < 2; ++f) {
      if (pool[f] < 1 || pool[f] > (1 << 24) || keep[f] < 0 || keep[f] > pool[f])
        throw Error(ErrorKind::Format, where, "pool or keep out of range");
      const auto& mask = e.blobs[static_cast<size_t>(2 * f)];
      const auto& cblob = e.blobs[static_cast<size_t>(2 * f + 1)];
      std::vector<uint32_t> members = unpack_mask(mask.data(), mask.size(), static_cast<size_t>(pool[f]), where);
      if (static_cast<int64_t>(members.size()) != keep[f])
        throw Error(ErrorKind::Format, where, "selection mask holds " + std::to_string(members.size()) + " members, expected " + std::to_string(keep[f]));
      std::vector<double> coef = dequantize_coefficients(cblob.data(), cblob.size(), members.size(), bits, where);
      out[f] = decode_factor(ctx, geometry(f, s), members, coef, noise);
    }
    const Svd& svd = ctx.svd();
    Factors fac;
    fac.A = matmul(out[0], svd.V, false, /*trans_b=*/true);  // r x n
    fac.B = matmul(svd.U, out[1]);                             // m x r
    return fac;
  }

 private:
  PaperOptions o_;
};

}  // namespace

PaperSolver paper_solver_from_name(const std::string& name) {
  if (name == "paper") return PaperSolver::Paper;
  if (name == "refit") return PaperSolver::Refit;
  if (name == "omp") return PaperSolver::Omp;
  throw Error(ErrorKind::InvalidInput, "compress", "solver must be paper, refit or omp");
}

std::unique_ptr<LayerCodec> make_paper_codec(const PaperOptions& options) {
  return std::make_unique<PaperCodec>(options);
}

}  // namespace solar
