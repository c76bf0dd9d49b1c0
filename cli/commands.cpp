#include "commands.hpp"

#include <chrono>
#include <cmath>
#include <cstdio>
#include <iostream>

#include "solar/checkpoint.hpp"
#include "solar/container.hpp"
#include "solar/error.hpp"
#include "solar/io.hpp"
#include "solar/peft_adapter.hpp"
#include "solar/pipeline.hpp"

namespace solar::cli {
namespace {

Progress stderr_progress(bool quiet) {
  if (quiet) return {};
  return [](const std::string& msg) { std::fprintf(stderr, "%s\n", msg.c_str()); };
}

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

std::string human(size_t bytes) {
  char buf[64];
  if (bytes < 10 * 1024) std::snprintf(buf, sizeof buf, "%zu B", bytes);
  else if (bytes < 10 * 1024 * 1024) std::snprintf(buf, sizeof buf, "%.1f KiB", bytes / 1024.0);
  else std::snprintf(buf, sizeof buf, "%.1f MiB", bytes / 1048576.0);
  return buf;
}

}  // namespace

// The base checkpoint, or an empty source when none was given (modes that need no W).
static std::unique_ptr<WeightSource> open_base(const std::string& path) {
  if (path.empty()) return std::make_unique<InMemoryWeights>("<no --base given>");
  return std::make_unique<Checkpoint>(path);
}

int run_compress(const CompressArgs& a) {
  const auto t0 = std::chrono::steady_clock::now();
  const PeftAdapter adapter = read_peft_adapter(a.adapter);
  const std::unique_ptr<WeightSource> base_ptr = open_base(a.base);
  const WeightSource& base = *base_ptr;
  CompressOptions o;
  o.mode = a.mode;
  o.seed = a.seed;
  o.threads = a.threads;
  o.progress = stderr_progress(a.quiet);
  o.warn = [](const std::string& msg) { std::fprintf(stderr, "solar: warning: %s\n", msg.c_str()); };
  o.paper.pool_a = a.pool_a.value_or(a.pool.value_or(o.paper.pool_a));
  o.paper.pool_b = a.pool_b.value_or(a.pool.value_or(o.paper.pool_b));
  if (a.keep) o.paper.keep_a = o.paper.keep_b = *a.keep;
  o.paper.keep_fraction = a.keep_fraction.value_or(o.paper.keep_fraction);
  o.paper.bits = a.bits.value_or(o.paper.bits);
  o.paper.noise = a.noise.value_or(o.paper.noise);
  if (a.solver) o.paper.solver = paper_solver_from_name(*a.solver);
  o.target_bytes = a.target_bytes;
  o.target_error = a.target_error;
  o.balance = a.balance;
  o.proxy = a.proxy;
  o.calibration_damping = a.calib_damping.value_or(o.calibration_damping);
  o.quantiser = a.quantiser;
  o.passthrough = a.passthrough;
  o.dora_magnitudes = a.dora_magnitudes;
  std::unique_ptr<Checkpoint> calib;
  if (!a.calib.empty()) {
    calib = std::make_unique<Checkpoint>(a.calib);
    o.calibration = calib.get();
  }
  const Container c = compress_adapter(adapter, base, o);
  const std::vector<uint8_t> bytes = serialize_container(c);
  const double encode_s = seconds_since(t0);

  // Measure what the file really keeps before committing it to disk.
  double worst = 0, sum = 0;
  if (a.verify) {
    const PeftAdapter back = decompress_container(parse_container(bytes.data(), bytes.size(), a.out), base, {a.threads, {}});
    for (size_t i = 0; i < adapter.modules.size(); ++i) {
      const double e = relative_delta_error(adapter.modules[i].A, adapter.modules[i].B, back.modules[i].A, back.modules[i].B);
      worst = std::max(worst, e);
      sum += e;
    }
  }
  write_file_atomic(a.out, bytes);
  const SizeReport r = size_report(c, bytes);
  const std::string heads = c.passthrough_layers.empty() ? "" : " (and " + std::to_string(c.passthrough_layers.size()) + " head coded with them)";
  std::printf("wrote %s: %s (%zu bytes) for %zu layers%s; fp16 PEFT file %zu bytes -> %.2f%% of it (%.1fx smaller)\n",
              a.out.c_str(), human(bytes.size()).c_str(), bytes.size(), adapter.modules.size(), heads.c_str(), r.peft_fp16_bytes,
              100.0 * bytes.size() / std::max<size_t>(1, r.peft_fp16_bytes), r.peft_fp16_bytes / std::max(1.0, double(bytes.size())));
  if (a.verify && !adapter.modules.empty())
    std::printf("relative error of B A: mean %.4g, worst %.4g  (compress %.2f s)\n", sum / adapter.modules.size(), worst, encode_s);
  return 0;
}

int run_decompress(const DecompressArgs& a) {
  const Container c = read_container(a.file);
  const std::unique_ptr<WeightSource> base = open_base(a.base);
  const PeftAdapter adapter = decompress_container(c, *base, {a.threads, stderr_progress(a.quiet)});
  write_peft_adapter(a.out, adapter);
  std::printf("wrote %s: %zu LoRA modules, %zu other tensors\n", a.out.c_str(), adapter.modules.size(), adapter.passthrough.size());
  return 0;
}

int run_inspect(const InspectArgs& a) {
  const std::vector<uint8_t> bytes = read_file(a.file);
  const Container c = parse_container(bytes.data(), bytes.size(), a.file);
  const SizeReport r = size_report(c, bytes);
  if (a.json) {
    nlohmann::json j = r.to_json();
    j["file"] = a.file;
    j["producer"] = c.producer;
    j["seed"] = std::to_string(c.seed);
    std::cout << j.dump(2) << "\n";
    return 0;
  }
  std::printf("%s: solar format v%u, written by %s, seed %llu\n", a.file.c_str(), c.version, c.producer.c_str(),
              static_cast<unsigned long long>(c.seed));
  std::printf("%-48s %-10s %14s %-28s %12s\n", "module", "mode", "out x in, r", "params", "bytes");
  bool streamed = false;
  for (const auto& l : r.layers) {
    const std::string shape = std::to_string(l.shape.m) + "x" + std::to_string(l.shape.n) + ", " + std::to_string(l.shape.r);
    std::string params = l.params.dump(), size = std::to_string(l.payload_bytes);
    // v2: a streamed mode's layers share one range-coded stream (docs/FORMAT.md, "Shared streams"):
    // show what each layer kept and its share of the stream instead of the blob lengths.
    if (l.stream.is_object()) {
      streamed = true;
      params = "kept " + std::to_string(l.stream.value("components", 0)) + " of " + std::to_string(l.shape.r) + " components" +
               (l.stream.value("quantiser", "") == "dependent" ? ", DQ" : "");
      size = "~" + std::to_string(std::lround(l.stream.value("bytes", 0.0))) + " *";
    }
    if (params.size() > 28) params = params.substr(0, 25) + "...";
    std::printf("%-48s %-10s %14s %-28s %12s\n", l.module.c_str(), l.mode.c_str(), shape.c_str(), params.c_str(), size.c_str());
  }
  if (streamed) std::printf("* the layer's share of its mode's one range-coded stream (bits it cost as coded / 8)\n");
  std::printf("passthrough tensors: %zu (%zu bytes restored)", c.passthrough.size(), r.passthrough_raw_bytes);
  if (r.passthrough_int8_tensors) std::printf(", %zu stored as int8 rows", r.passthrough_int8_tensors);
  if (r.passthrough_layer_tensors) std::printf(", %zu coded as layers of the stream", r.passthrough_layer_tensors);
  if (r.passthrough_magnitude_tensors) std::printf(", %zu DoRA magnitudes coded against the base", r.passthrough_magnitude_tensors);
  std::printf("\n");
  for (const auto& m : r.magnitudes)
    std::printf("  DoRA magnitude of %-38s %s %8zu B\n", m.module.c_str(),
                m.step_code ? ("step 2^(" + std::to_string(m.step_code - 200) + "/8)").c_str() : "W's row norms  ", m.blob_bytes);
  std::printf("restoring needs the base model: %s\n", r.needs_base.empty() ? "no" : ("yes (" + r.needs_base + ")").c_str());
  std::printf("header+checksum %zu B, metadata %zu B (raw %zu), payload %zu B (raw %zu)\n", r.header_bytes, r.metadata_bytes,
              r.metadata_raw_bytes, r.payload_bytes, r.payload_raw_bytes);
  std::printf("total %zu bytes; as a PEFT file: fp32 %zu, fp16 %zu bytes; ratio to fp16 %.4f (%.1fx smaller)\n", r.file_bytes,
              r.peft_fp32_bytes, r.peft_fp16_bytes, static_cast<double>(r.file_bytes) / std::max<size_t>(1, r.peft_fp16_bytes),
              static_cast<double>(r.peft_fp16_bytes) / std::max<size_t>(1, r.file_bytes));
  return 0;
}

}  // namespace solar::cli
