// solar: compress PEFT LoRA adapters against their base model, and restore them.
#include <cstdio>
#include <exception>

#include <CLI/CLI.hpp>

#include "commands.hpp"
#include "solar/error.hpp"
#include "solar/pipeline.hpp"

int main(int argc, char** argv) {
  using namespace solar::cli;
  CLI::App app{"solar " + solar::version_string() + ": make fine-tuned adapters small enough to ship"};
  app.require_subcommand(1);
  app.set_version_flag("--version", solar::version_string());

  CompressArgs ca;
  auto* c = app.add_subcommand("compress", "compress a PEFT LoRA adapter into a .solar file");
  c->add_option("--base", ca.base, "base checkpoint: a .safetensors file or a directory (sharded ok); needed by paper and spectral-w");
  c->add_option("--adapter", ca.adapter, "PEFT adapter directory (adapter_config.json + adapter_model.safetensors)")->required();
  c->add_option("--out", ca.out, "output .solar file")->required();
  c->add_option("--mode", ca.mode,
                "codec: spectral (the default), paper (the SOLAR paper, faithful; implied by --pool/--keep/--bits/...), spectral-w")
      ->check(CLI::IsMember({"paper", "spectral", "spectral-w"}));
  auto* tb = c->add_option("--target-bytes", ca.target_bytes, "spectral modes: the whole file is at most this many bytes");
  auto* te = c->add_option("--target-error", ca.target_error, "spectral modes: relative error of the updates (default 0.05)")
                 ->check(CLI::Range(0.0, 1.0));
  tb->excludes(te);
  c->add_option("--balance", ca.balance,
                "spectral modes: how the budget is shared between layers, 0 = by absolute error, 1 = by each layer's relative "
                "error (default 1; 0 with --calib or --proxy)")
      ->check(CLI::Range(0.0, 4.0));
  c->add_option("--calib", ca.calib,
                "spectral modes: calibration statistics (safetensors of <module>.input_moment, optionally .output_grad_moment\n"
                "and first-order entries; from solar.calibrate, see docs/FORMAT.md)");
  c->add_option("--calib-damping", ca.calib_damping, "share of the mean diagonal added to calibration statistics (default 0.1)")
      ->check(CLI::NonNegativeNumber);
  c->add_option("--quantiser", ca.quantiser,
                "spectral modes: dependent (uniform or trellis-coded, chosen per layer), uniform, or auto (the default: "
                "dependent with --calib, uniform without)")
      ->check(CLI::IsMember({"auto", "uniform", "dependent"}));
  c->add_option("--passthrough", ca.passthrough,
                "tensors besides the LoRA factors (modules_to_save heads, ...): exact (the default); int8 (int8 with a "
                "scale per row for every float tensor of 2+ dimensions; vectors stay exact); or spectral (mode spectral: "
                "heads whose smaller side is at most 64 coded as layers of the stream, their bytes planned with the LoRA "
                "layers; other tensors as with int8)")
      ->check(CLI::IsMember({"exact", "int8", "spectral"}));
  c->add_option("--dora-magnitudes", ca.dora_magnitudes,
                "DoRA magnitude vectors: coded (the default, spectral modes with --base: the residual from W's row norms, "
                "its bytes planned with the layers; the receiver then needs the base too) or exact")
      ->check(CLI::IsMember({"coded", "exact"}));
  c->add_option("--proxy", ca.proxy, "spectral modes without --calib: base-gram weighs errors by W^T W (data-free)")
      ->check(CLI::IsMember({"", "base-gram"}));
  c->add_option("--pool", ca.pool, "pool size N per factor (N_A = N_B)")->check(CLI::Range(int64_t{1}, int64_t{1} << 24));
  c->add_option("--pool-a", ca.pool_a, "pool size N_A (overrides --pool)");
  c->add_option("--pool-b", ca.pool_b, "pool size N_B (overrides --pool)");
  auto* keep = c->add_option("--keep", ca.keep, "coefficients kept per factor (k_A = k_B = K)");
  auto* frac = c->add_option("--keep-fraction", ca.keep_fraction, "fraction of the pool kept (default 0.3)")->check(CLI::Range(0.0, 1.0));
  keep->excludes(frac);
  c->add_option("--bits", ca.bits, "coefficient bits")->check(CLI::IsMember({32, 16, 8, 4}));
  c->add_option("--seed", ca.seed, "seed of the basis pool");
  c->add_option("--noise", ca.noise, "sigma of the Gaussian perturbation of the basis")->check(CLI::NonNegativeNumber);
  c->add_option("--solver", ca.solver, "paper mode's coefficient choice: paper (as published), refit, omp (repaired variants)")
      ->check(CLI::IsMember({"paper", "refit", "omp"}));
  c->add_option("--threads", ca.threads, "worker threads (0: all cores); output does not depend on it");
  c->add_flag("!--no-verify", ca.verify, "skip decoding the result to report its error");
  c->add_flag("-q,--quiet", ca.quiet, "no progress on stderr");

  DecompressArgs da;
  auto* d = app.add_subcommand("decompress", "restore a PEFT adapter directory from a .solar file");
  d->add_option("file", da.file, ".solar file")->required();
  d->add_option("--base", da.base, "the base checkpoint the file was built against (modes that use W)");
  d->add_option("--out", da.out, "output PEFT adapter directory")->required();
  d->add_option("--threads", da.threads, "worker threads (0: all cores)");
  d->add_flag("-q,--quiet", da.quiet, "no progress on stderr");

  InspectArgs ia;
  auto* i = app.add_subcommand("inspect", "show what a .solar file holds and what each part costs");
  i->add_option("file", ia.file, ".solar file")->required();
  i->add_flag("--json", ia.json, "machine-readable output");

  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  }
  try {
    if (*c && ca.mode.empty()) {
      bool paper_option = false;
      for (const char* name : {"--pool", "--pool-a", "--pool-b", "--keep", "--keep-fraction", "--bits", "--noise", "--solver"})
        paper_option = paper_option || c->get_option(name)->count() > 0;
      ca.mode = paper_option ? "paper" : "spectral";
    }
    if (*c) return run_compress(ca);
    if (*d) return run_decompress(da);
    if (*i) return run_inspect(ia);
  } catch (const solar::Error& e) {
    std::fprintf(stderr, "solar: error: %s\n", e.what());
    return 1;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "solar: internal error: %s\n", e.what());
    return 3;
  }
  return 2;
}
