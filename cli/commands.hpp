// The solar subcommands. Each returns the process exit code; errors propagate as solar::Error
// and are printed by main as one line naming the file and the problem.
#pragma once
#include <cstdint>
#include <optional>
#include <string>

namespace solar::cli {

struct CompressArgs {
  std::string base, adapter, out;
  std::string mode;  // empty: paper if a paper-only option was given, else spectral
  // Unset options keep the core's defaults (PaperOptions, CompressOptions).
  std::optional<int64_t> pool, pool_a, pool_b;
  std::optional<int64_t> keep;
  std::optional<double> keep_fraction;
  std::optional<int> bits;
  uint64_t seed = 0;
  std::optional<double> noise;
  std::optional<std::string> solver;
  std::optional<size_t> target_bytes;
  std::optional<double> target_error, balance;
  std::string calib, proxy;
  std::optional<double> calib_damping;
  std::string quantiser = "auto";
  std::string passthrough = "exact";
  std::string dora_magnitudes = "coded";
  int threads = 0;
  bool verify = true;
  bool quiet = false;
};

struct DecompressArgs {
  std::string file, base, out;
  int threads = 0;
  bool quiet = false;
};

struct InspectArgs {
  std::string file;
  bool json = false;
};

int run_compress(const CompressArgs& a);
int run_decompress(const DecompressArgs& a);
int run_inspect(const InspectArgs& a);

}  // namespace solar::cli
