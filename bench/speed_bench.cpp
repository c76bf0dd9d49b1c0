// Speed of solar's per-layer numerical kernels at realistic shapes, next to a same-run dgemm
// measurement used as the "LAPACK peak" reference. Everything runs single-threaded (solar pins
// BLAS to one thread and parallelises across layers).
//
//   speed_bench [--benchmark_format=json] [--quick]
//
// Kernels (the pieces of paper mode's per-layer cost):
//   svd/n           solar::full_svd of an n x n W (dgesdd + canonicalisation)
//   pool/n/r/N      philox_normals for N pool members of r*n entries (one factor's pool)
//   lstsq/n/r/N     solar::lstsq_min_norm_col_major of the (r*n) x N pool (dgelsd)
//   topk/N          the stable sort by |coefficient| that picks the kept members
//   dgemm/n         n x n x n dgemm, the reference peak
//   spectral/n/r/c  the spectral mode's analysis of one n x n layer of rank r (every operating
//                   point priced): c = 0 data-free, c = 1 calibrated (K-FAC moments, GPTQ feedback)
// Counters: GFLOPs = flop model / CPU time (models in the context: flop_model_*), and the
// start-up dgemm peak (also CPU time) to divide by. bench/speed.py turns this into tables.
#include <benchmark/benchmark.h>

#include <algorithm>
#include <ctime>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "solar/codec.hpp"
#include "solar/linalg.hpp"
#include "solar/philox.hpp"

extern "C" void dgemm_(const char* ta, const char* tb, const int* m, const int* n, const int* k,
                       const double* alpha, const double* a, const int* lda, const double* b,
                       const int* ldb, const double* beta, double* c, const int* ldc);

namespace {

double g_peak_gflops = 0;  // measured once at start-up (best of a few 1024^3 dgemms)
bool g_quick = false;

std::vector<double> random_vec(size_t n, uint64_t seed) {
  std::mt19937_64 g(seed);
  std::normal_distribution<double> d;
  std::vector<double> v(n);
  for (auto& x : v) x = d(g);
  return v;
}

// Process CPU time: like Google Benchmark's default rates, robust to other jobs on the machine.
double cpu_seconds() {
  timespec ts{};
  clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
  return static_cast<double>(ts.tv_sec) + 1e-9 * static_cast<double>(ts.tv_nsec);
}

double time_dgemm(int n, int reps) {
  std::vector<double> a = random_vec(static_cast<size_t>(n) * n, 1), b = random_vec(static_cast<size_t>(n) * n, 2),
                      c(static_cast<size_t>(n) * n);
  const double one = 1, zero = 0;
  double best = 1e30;
  for (int i = 0; i < reps; ++i) {
    const double t0 = cpu_seconds();
    dgemm_("N", "N", &n, &n, &n, &one, a.data(), &n, b.data(), &n, &zero, c.data(), &n);
    best = std::min(best, cpu_seconds() - t0);
  }
  return best;
}

void set_flops(benchmark::State& st, double flops) {
  st.counters["GFLOPs"] = benchmark::Counter(flops * 1e-9 * static_cast<double>(st.iterations()),
                                             benchmark::Counter::kIsRate);
  st.counters["flops_per_call"] = flops;
  st.counters["dgemm_peak_GFLOPs"] = g_peak_gflops;
}

// Golub & Van Loan (Table 8.6.1): SVD with U and V of an m x n matrix, m >= n: 4m^2 n + 8 m n^2 + 9 n^3.
double svd_flops(double m, double n) { return 4 * m * m * n + 8 * m * n * n + 9 * n * n * n; }
// dgelsd model: orthogonal reduction to the p x p problem (2 q p^2) + its SVD-based solve (~4 p^3),
// p = min(rows, cols), q = max.
double lstsq_flops(double rows, double cols) {
  const double p = std::min(rows, cols), q = std::max(rows, cols);
  return 2 * q * p * p + 4 * p * p * p;
}

void BM_dgemm(benchmark::State& st) {
  const int n = static_cast<int>(st.range(0));
  std::vector<double> a = random_vec(static_cast<size_t>(n) * n, 1), b = random_vec(static_cast<size_t>(n) * n, 2),
                      c(static_cast<size_t>(n) * n);
  const double one = 1, zero = 0;
  for (auto _ : st) {
    dgemm_("N", "N", &n, &n, &n, &one, a.data(), &n, b.data(), &n, &zero, c.data(), &n);
    benchmark::DoNotOptimize(c.data());
  }
  set_flops(st, 2.0 * n * n * n);
}

void BM_full_svd(benchmark::State& st) {
  const int64_t n = st.range(0);
  solar::Matrix w(n, n);
  w.data = random_vec(static_cast<size_t>(n * n), 3);
  for (auto _ : st) {
    solar::Svd s = solar::full_svd(w);
    benchmark::DoNotOptimize(s.S.data());
  }
  set_flops(st, svd_flops(static_cast<double>(n), static_cast<double>(n)));
}

void BM_pool(benchmark::State& st) {
  const int64_t n = st.range(0), r = st.range(1), pool = st.range(2);
  const uint64_t len = static_cast<uint64_t>(r * n);
  std::vector<float> z(len * static_cast<uint64_t>(pool));
  for (auto _ : st) {
    for (int64_t i = 0; i < pool; ++i)
      solar::philox_normals(42, 0, static_cast<uint32_t>(i), 0, 0, len, z.data() + static_cast<uint64_t>(i) * len);
    benchmark::DoNotOptimize(z.data());
  }
  st.counters["Mnormals_per_s"] =
      benchmark::Counter(1e-6 * static_cast<double>(len) * static_cast<double>(pool) * static_cast<double>(st.iterations()),
                         benchmark::Counter::kIsRate);
}

void BM_lstsq(benchmark::State& st) {
  const int64_t n = st.range(0), r = st.range(1), pool = st.range(2);
  const int64_t rows = r * n;
  const std::vector<double> d = random_vec(static_cast<size_t>(rows * pool), 4);
  const std::vector<double> t = random_vec(static_cast<size_t>(rows), 5);
  for (auto _ : st) {
    std::vector<double> x = solar::lstsq_min_norm_col_major(rows, pool, d, t);  // copies d, as the codec hands it over
    benchmark::DoNotOptimize(x.data());
  }
  set_flops(st, lstsq_flops(static_cast<double>(rows), static_cast<double>(pool)));
}

void BM_topk(benchmark::State& st) {
  const int64_t pool = st.range(0);
  const std::vector<double> coef = random_vec(static_cast<size_t>(pool), 6);
  const int64_t keep = pool * 3 / 10;
  std::vector<uint32_t> order(static_cast<size_t>(pool));
  for (auto _ : st) {  // exactly the paper codec's selection: stable sort by |c|, keep, re-sort
    std::iota(order.begin(), order.end(), 0u);
    std::stable_sort(order.begin(), order.end(),
                     [&](uint32_t a, uint32_t b) { return std::fabs(coef[a]) > std::fabs(coef[b]); });
    std::vector<uint32_t> kept(order.begin(), order.begin() + keep);
    std::sort(kept.begin(), kept.end());
    benchmark::DoNotOptimize(kept.data());
  }
  st.counters["Melems_per_s"] = benchmark::Counter(1e-6 * static_cast<double>(pool) * static_cast<double>(st.iterations()),
                                                   benchmark::Counter::kIsRate);
}

solar::Matrix random_matrix(int64_t rows, int64_t cols, uint64_t seed, double scale) {
  const std::vector<double> v = random_vec(static_cast<size_t>(rows * cols), seed);
  solar::Matrix m(rows, cols);
  for (size_t i = 0; i < v.size(); ++i) m.data[i] = scale * v[i];
  return m;
}

// A random SPD second moment with a decaying spectrum, like a layer's input statistics.
solar::Matrix random_moment(int64_t n, uint64_t seed) {
  const solar::Matrix z = random_matrix(n, 2 * n, seed, 1.0);
  solar::Matrix m = solar::matmul(z, z, false, true);
  for (int64_t i = 0; i < n; ++i) m(i, i) += 0.1 * static_cast<double>(n);
  return m;
}

void BM_spectral(benchmark::State& st) {
  const int64_t n = st.range(0), r = st.range(1);
  const bool calibrated = st.range(2) != 0;
  // As the CLI's default --quantiser auto: the trellis quantiser is priced only with statistics.
  const auto codec = solar::make_spectral_codec(false, /*dependent=*/calibrated);
  solar::LayerContext ctx(0, 0, {n, n, r}, nullptr);
  if (calibrated) {
    ctx.input_moment = random_moment(n, 5);
    ctx.output_moment = random_moment(n, 6);
  }
  const solar::Factors f{random_matrix(r, n, 3, 0.02), random_matrix(n, r, 4, 0.02)};
  size_t points = 0;
  for (auto _ : st) {
    const auto c = codec->candidates(ctx, f);
    points = c.size();
    benchmark::DoNotOptimize(c.data());
  }
  st.counters["points"] = static_cast<double>(points);
  st.counters["dgemm_peak_GFLOPs"] = g_peak_gflops;
}

constexpr double kMaxLstsqFlops = 1.5e11;  // larger cases take minutes per call on one core

void register_all() {
  const std::vector<int64_t> ns = g_quick ? std::vector<int64_t>{576} : std::vector<int64_t>{576, 768, 2048};
  const std::vector<int64_t> ranks = g_quick ? std::vector<int64_t>{4} : std::vector<int64_t>{1, 4, 8};
  const std::vector<int64_t> pools = g_quick ? std::vector<int64_t>{1000} : std::vector<int64_t>{100, 1000, 4000};
  for (int64_t n : {512, 1024}) benchmark::RegisterBenchmark("dgemm", BM_dgemm)->Arg(n)->Unit(benchmark::kMillisecond)->MinTime(0.3);
  for (int64_t n : ns)
    benchmark::RegisterBenchmark("full_svd", BM_full_svd)->Arg(n)->Unit(benchmark::kMillisecond)->Iterations(n >= 2048 ? 1 : 3);
  for (int64_t n : ns)
    for (int64_t r : ranks)
      for (int64_t p : pools) {
        benchmark::RegisterBenchmark("pool", BM_pool)->Args({n, r, p})->Unit(benchmark::kMillisecond)->MinTime(0.1);
        if (lstsq_flops(static_cast<double>(r * n), static_cast<double>(p)) <= kMaxLstsqFlops)
          benchmark::RegisterBenchmark("lstsq", BM_lstsq)->Args({n, r, p})->Unit(benchmark::kMillisecond)->Iterations(1);
      }
  for (int64_t p : {100, 1000, 4000, 100000})
    benchmark::RegisterBenchmark("topk", BM_topk)->Arg(p)->Unit(benchmark::kMicrosecond)->MinTime(0.1);
  for (int64_t n : g_quick ? std::vector<int64_t>{384} : std::vector<int64_t>{384, 1024})
    for (int64_t r : {8, 16})
      for (int64_t c : {0, 1})
        if (!(g_quick && r == 16))
          benchmark::RegisterBenchmark("spectral", BM_spectral)->Args({n, r, c})->Unit(benchmark::kMillisecond)->Iterations(1);
  // A 7B-class model's projection (4096 x 4096, rank 16): how the analysis scales to the layers
  // most LoRAs are trained on.
  if (!g_quick)
    for (int64_t c : {0, 1})
      benchmark::RegisterBenchmark("spectral", BM_spectral)->Args({4096, 16, c})->Unit(benchmark::kMillisecond)->Iterations(1);
}

}  // namespace

int main(int argc, char** argv) {
  std::vector<char*> args;
  for (int i = 0; i < argc; ++i) {
    if (std::strcmp(argv[i], "--quick") == 0) g_quick = true;
    else args.push_back(argv[i]);
  }
  int ac = static_cast<int>(args.size());
  solar::pin_blas_single_thread();
  const int n = 1024;
  g_peak_gflops = 2.0 * n * n * n / time_dgemm(n, 5) * 1e-9;
  benchmark::AddCustomContext("dgemm_peak_GFLOPs_1024", std::to_string(g_peak_gflops));
  benchmark::AddCustomContext("blas_threads", "1");
  benchmark::AddCustomContext("flop_model_svd", "4m^2n+8mn^2+9n^3 (Golub-Van Loan, U and V)");
  benchmark::AddCustomContext("flop_model_lstsq", "2*max*min^2+4*min^3 (dgelsd model)");
  register_all();
  benchmark::Initialize(&ac, args.data());
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
