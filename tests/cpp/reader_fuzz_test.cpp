// Structured mutation of the files users hand us: safetensors headers (checkpoints, adapters,
// calibration statistics) and PEFT adapter directories. Every mutant must be read or refused
// with a solar::Error; any other exception, a crash or (under scripts/sanitize.sh) a memory
// error fails. Seeded, so a failure names a reproducible mutant.
#include <cstring>
#include <filesystem>
#include <random>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include <gtest/gtest.h>

#include "solar/container.hpp"
#include "solar/io.hpp"
#include "solar/peft_adapter.hpp"
#include "solar/pipeline.hpp"
#include "solar/safetensors.hpp"
#include "test_support.hpp"

namespace solar {
namespace {

const std::string kFixtures = SOLAR_SOURCE_DIR "/tests/fixtures";

struct SafetensorsParts {
  nlohmann::ordered_json header;
  std::vector<uint8_t> data;
};

SafetensorsParts split(const std::vector<uint8_t>& bytes) {
  uint64_t n = 0;
  for (int i = 0; i < 8; ++i) n |= static_cast<uint64_t>(bytes[i]) << (8 * i);
  SafetensorsParts p;
  p.header = nlohmann::ordered_json::parse(bytes.begin() + 8, bytes.begin() + 8 + static_cast<ptrdiff_t>(n));
  p.data.assign(bytes.begin() + 8 + static_cast<ptrdiff_t>(n), bytes.end());
  return p;
}

std::vector<uint8_t> join(const std::string& header, const std::vector<uint8_t>& data, uint64_t declared) {
  std::vector<uint8_t> out(8 + header.size() + data.size());
  for (int i = 0; i < 8; ++i) out[i] = static_cast<uint8_t>(declared >> (8 * i));
  std::memcpy(out.data() + 8, header.data(), header.size());
  if (!data.empty()) std::memcpy(out.data() + 8 + header.size(), data.data(), data.size());
  return out;
}

// A mutant of a safetensors file: its header JSON changed, its declared header length off, or its
// data cut or grown.
std::vector<uint8_t> mutant(const SafetensorsParts& original, std::mt19937_64& rng) {
  SafetensorsParts p = original;
  const int kind = static_cast<int>(rng() % 5);
  if (kind <= 2) {
    for (int i = 0; i <= kind; ++i) test::mutate_json(p.header, rng);
  } else if (kind == 3) {
    const size_t cut = 1 + rng() % 64;
    if (rng() % 2 && p.data.size() > cut) p.data.resize(p.data.size() - cut);
    else p.data.resize(p.data.size() + cut, static_cast<uint8_t>(rng()));
  }
  const std::string header = p.header.dump();
  const int64_t skew = kind == 4 ? static_cast<int64_t>(rng() % 17) - 8 : 0;
  return join(header, p.data, static_cast<uint64_t>(static_cast<int64_t>(header.size()) + skew));
}

// Reads everything a file offers, as the pipeline would.
void read_all(const std::string& path) {
  SafetensorsFile f(path);
  for (const auto& name : f.names()) {
    const TensorView v = f.get(name);
    const Tensor t = v.copy();
    if (is_float(t.dtype)) (void)t.to_f32();
  }
}

TEST(ReaderFuzz, MutatedSafetensorsFilesAreReadOrRefused) {
  const test::TempDir dir;
  // Files with every dtype family, besides two real ones.
  const std::string mixed = dir.file("mixed.safetensors");
  write_safetensors(mixed, {{"f16", test::random_bytes_tensor({3, 5}, 1, DType::F16)},
                            {"bf16", test::random_bytes_tensor({4}, 2, DType::BF16)},
                            {"ids", test::random_bytes_tensor({2, 2}, 3, DType::I64)},
                            {"mask", test::random_bytes_tensor({3}, 4, DType::BOOL)},
                            {"w", test::random_tensor({6, 4}, 5)}},
                    {{"format", "pt"}});
  uint64_t seed = 1;
  for (const std::string& source : {mixed, kFixtures + "/stories260k_lora_r4/adapter_model.safetensors",
                                    kFixtures + "/golden_v1_base.safetensors"}) {
    SCOPED_TRACE(source);
    const SafetensorsParts parts = split(test::read_bytes(source));
    std::mt19937_64 rng(seed++);
    size_t read = 0, refused = 0;
    for (int i = 0; i < 500; ++i) {
      const std::string path = dir.file("m.safetensors");
      test::write_bytes(path, mutant(parts, rng));
      try {
        read_all(path);
        ++read;
      } catch (const Error& e) {
        ++refused;
        EXPECT_NE(std::string(e.what()).find(path), std::string::npos) << e.what();  // names the file
      } catch (const std::exception& e) {
        ADD_FAILURE() << "mutant " << i << ": not a solar::Error but " << e.what();
      }
    }
    EXPECT_GT(refused, 50u);
    EXPECT_GT(read, 5u);  // some mutants are still valid files: the fuzzer reaches past the checks
  }
}

// A PEFT adapter directory with its adapter_config.json or its tensors' header mutated: read, and
// when it reads, compressed and restored, or refused with a solar::Error.
TEST(ReaderFuzz, MutatedAdapterDirectoriesAreReadOrRefused) {
  const std::string fixture = kFixtures + "/stories260k_lora_r4";
  const nlohmann::ordered_json config = nlohmann::ordered_json::parse(read_text_file(fixture + "/adapter_config.json"));
  const auto model = test::read_bytes(fixture + "/adapter_model.safetensors");
  const SafetensorsParts parts = split(model);
  const test::TempDir dir;
  const std::string ad = dir.file("adapter");
  std::filesystem::create_directory(ad);
  std::mt19937_64 rng(7);
  size_t compressed = 0, refused = 0;
  for (int i = 0; i < 100; ++i) {
    nlohmann::ordered_json cfg = config;
    const bool mutate_config = rng() % 3 != 0;
    if (mutate_config) test::mutate_json(cfg, rng);
    test::write_text(ad + "/adapter_config.json", cfg.dump(2));
    test::write_bytes(ad + "/adapter_model.safetensors", mutate_config ? model : mutant(parts, rng));
    try {
      const PeftAdapter a = read_peft_adapter(ad);
      CompressOptions o;
      o.mode = "spectral";
      o.target_error = 0.3;
      o.threads = 1;
      const auto bytes = serialize_container(compress_adapter(a, InMemoryWeights(), o));
      const PeftAdapter back = decompress_container(parse_container(bytes.data(), bytes.size(), "f.solar"), InMemoryWeights());
      EXPECT_EQ(back.modules.size(), a.modules.size());
      ++compressed;
    } catch (const Error&) {
      ++refused;
    } catch (const std::exception& e) {
      ADD_FAILURE() << "mutant " << i << ": not a solar::Error but " << e.what();
    }
  }
  EXPECT_GT(refused, 10u);
  EXPECT_GT(compressed, 10u);
}

}  // namespace
}  // namespace solar
