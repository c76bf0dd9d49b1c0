// The C interface against the C++ one it wraps: same tensors, same bytes, and every failure a
// status plus a message instead of an exception. (tests/c/c_api_test.c checks the header from C.)
#include "solar/solar.h"

#include <cstring>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "solar/checkpoint.hpp"
#include "solar/container.hpp"
#include "solar/peft_adapter.hpp"
#include "solar/pipeline.hpp"
#include "solar/safetensors.hpp"
#include "adapter_factory.hpp"
#include "test_support.hpp"

namespace solar {
namespace {

const std::string kFixtures = SOLAR_SOURCE_DIR "/tests/fixtures";
const std::string kStories = kFixtures + "/stories260k_lora_r4";

struct Err {
  char text[512] = "untouched";
  std::string str() const { return text; }
};

// The tensors of a C adapter, as (key, tensor) pairs.
std::vector<std::pair<std::string, Tensor>> tensors_of(const solar_adapter* a) {
  std::vector<std::pair<std::string, Tensor>> out;
  for (size_t i = 0; i < solar_adapter_tensor_count(a); ++i) {
    solar_tensor t;
    EXPECT_EQ(solar_adapter_tensor(a, i, &t), SOLAR_OK);
    Tensor copy;
    copy.dtype = parse_dtype(t.dtype, t.name);
    copy.shape.assign(t.shape, t.shape + t.ndim);
    copy.data.assign(static_cast<const uint8_t*>(t.data), static_cast<const uint8_t*>(t.data) + t.nbytes);
    out.emplace_back(t.name, std::move(copy));
  }
  return out;
}

// The bytes solar_compress gives for `dir` (params NULL: the defaults); empty, with a test
// failure naming the message, when it fails.
std::vector<uint8_t> c_compress(const std::string& dir, const solar_weights* base, const solar_compress_params* params) {
  uint8_t* out = nullptr;
  size_t size = 0;
  Err err;
  const solar_status status = solar_compress(dir.c_str(), base, params, &out, &size, err.text, sizeof err.text);
  if (status != SOLAR_OK) {
    ADD_FAILURE() << "solar_compress: " << solar_status_name(status) << ": " << err.str();
    return {};
  }
  std::vector<uint8_t> bytes(out, out + size);
  solar_free(out);
  return bytes;
}

// The same through the C++ pipeline, mode spectral.
std::vector<uint8_t> core_compress(const PeftAdapter& adapter, const WeightSource& base, CompressOptions o) {
  o.mode = "spectral";
  return serialize_container(compress_adapter(adapter, base, o));
}

void expect_same_tensors(const std::vector<std::pair<std::string, Tensor>>& got,
                         const std::vector<std::pair<std::string, Tensor>>& want) {
  ASSERT_EQ(got.size(), want.size());
  for (size_t i = 0; i < got.size(); ++i) {
    EXPECT_EQ(got[i].first, want[i].first);
    EXPECT_EQ(got[i].second.dtype, want[i].second.dtype) << got[i].first;
    EXPECT_EQ(got[i].second.shape, want[i].second.shape) << got[i].first;
    EXPECT_EQ(got[i].second.data, want[i].second.data) << got[i].first;
  }
}

TEST(CApi, RestoresASpectralFileWithoutBaseAsTheCppPathDoes) {
  const auto bytes = test::read_bytes(kFixtures + "/golden_v6_spectral.solar");
  solar_adapter* a = nullptr;
  Err err;
  ASSERT_EQ(solar_restore(bytes.data(), bytes.size(), nullptr, 1, &a, err.text, sizeof err.text), SOLAR_OK) << err.str();
  EXPECT_EQ(err.str(), "untouched");  // success leaves the message alone
  const PeftAdapter want = decompress_container(parse_container(bytes.data(), bytes.size(), "g"), InMemoryWeights());
  expect_same_tensors(tensors_of(a), peft_tensors(want));
  EXPECT_EQ(std::string(solar_adapter_config_json(a)), want.config.dump(2));
  solar_adapter_free(a);
}

// The paper mode needs W: from a checkpoint on disk and from caller-held memory alike.
TEST(CApi, RestoresAgainstABaseOnDiskOrInMemory) {
  const auto bytes = test::read_bytes(kFixtures + "/golden_v1.solar");
  const std::string base_path = kFixtures + "/golden_v1_base.safetensors";
  const Checkpoint ckpt(base_path);
  const auto want = peft_tensors(decompress_container(parse_container(bytes.data(), bytes.size(), "g"), ckpt));
  Err err;

  solar_weights* disk = nullptr;
  ASSERT_EQ(solar_weights_open(base_path.c_str(), &disk, err.text, sizeof err.text), SOLAR_OK) << err.str();
  solar_adapter* a = nullptr;
  ASSERT_EQ(solar_restore(bytes.data(), bytes.size(), disk, 0, &a, err.text, sizeof err.text), SOLAR_OK) << err.str();
  expect_same_tensors(tensors_of(a), want);
  solar_adapter_free(a);
  solar_weights_free(disk);

  solar_weights* mem = nullptr;
  ASSERT_EQ(solar_weights_new("runtime weights", &mem, err.text, sizeof err.text), SOLAR_OK);
  std::vector<std::vector<uint8_t>> held;  // the caller's memory, alive while `mem` is used
  for (const auto& name : ckpt.names()) {
    const TensorView v = ckpt.get(name);
    held.emplace_back(v.data, v.data + v.nbytes);
    ASSERT_EQ(solar_weights_add(mem, name.c_str(), dtype_name(v.dtype).c_str(), v.shape.data(), v.shape.size(),
                                held.back().data(), v.nbytes, err.text, sizeof err.text),
              SOLAR_OK) << err.str();
  }
  ASSERT_EQ(solar_restore(bytes.data(), bytes.size(), mem, 1, &a, err.text, sizeof err.text), SOLAR_OK) << err.str();
  expect_same_tensors(tensors_of(a), want);
  solar_adapter_free(a);

  // One element of W changed: the file was built against another base, and the message says so.
  held[0][0] ^= 1;
  a = nullptr;
  EXPECT_EQ(solar_restore(bytes.data(), bytes.size(), mem, 1, &a, err.text, sizeof err.text), SOLAR_ERROR_MISMATCH);
  EXPECT_EQ(a, nullptr);
  EXPECT_NE(err.str().find("runtime weights"), std::string::npos) << err.str();
  solar_weights_free(mem);
}

TEST(CApi, DamagedBytesGetTheirStatusAndNoAdapter) {
  auto bytes = test::read_bytes(kFixtures + "/golden_v6_spectral.solar");
  solar_adapter* a = nullptr;
  Err err;
  EXPECT_EQ(solar_restore(bytes.data(), bytes.size() - 1, nullptr, 1, &a, err.text, sizeof err.text), SOLAR_ERROR_FORMAT);
  EXPECT_NE(err.str().find("<.solar bytes>"), std::string::npos) << err.str();
  bytes[bytes.size() / 2] ^= 0x10;
  EXPECT_EQ(solar_restore(bytes.data(), bytes.size(), nullptr, 1, &a, err.text, sizeof err.text), SOLAR_ERROR_CORRUPT);
  EXPECT_EQ(solar_restore(nullptr, 0, nullptr, 1, &a, err.text, sizeof err.text), SOLAR_ERROR_FORMAT);
  EXPECT_EQ(a, nullptr);
}

// The bytes of `solar compress --mode spectral --target-bytes 1500`, and they restore.
TEST(CApi, CompressGivesTheCoreBytesWithinTheBudget) {
  solar_compress_params p = solar_compress_default_params();
  p.target_bytes = 1500;
  p.threads = 2;
  Err err;
  const std::vector<uint8_t> bytes = c_compress(kStories, nullptr, &p);
  CompressOptions o;
  o.target_bytes = 1500;
  EXPECT_EQ(bytes, core_compress(read_peft_adapter(kStories), InMemoryWeights(), o));
  EXPECT_LE(bytes.size(), 1500u);

  solar_adapter* a = nullptr;
  ASSERT_EQ(solar_restore(bytes.data(), bytes.size(), nullptr, 0, &a, err.text, sizeof err.text), SOLAR_OK) << err.str();
  EXPECT_EQ(solar_adapter_tensor_count(a), 20u);  // 10 modules, A and B

  // Saved, it is a PEFT directory whose tensors are the ones handed out.
  const test::TempDir dir;
  const std::string target = dir.file("restored");
  ASSERT_EQ(solar_adapter_save(a, target.c_str(), err.text, sizeof err.text), SOLAR_OK) << err.str();
  expect_same_tensors(tensors_of(a), peft_tensors(read_peft_adapter(target)));
  solar_adapter_free(a);

  // params = NULL is the default (target error 0.05), the same as the CLI's spectral default.
  o.target_bytes.reset();
  EXPECT_EQ(c_compress(kStories, nullptr, nullptr), core_compress(read_peft_adapter(kStories), InMemoryWeights(), o));
}

// DoRA: with a base the default codes the magnitudes against it (the C++ path's bytes), and the
// file then needs the base to restore; "exact" keeps them verbatim.
TEST(CApi, DoraMagnitudesAreCodedWithABase) {
  const std::string dora = kFixtures + "/stories260k_dora_r4", ckpt = test::stories_checkpoint();
  if (ckpt.empty()) GTEST_SKIP() << "../shared/data is absent";
  Err err;
  solar_weights* base = nullptr;
  ASSERT_EQ(solar_weights_open(ckpt.c_str(), &base, err.text, sizeof err.text), SOLAR_OK) << err.str();
  solar_compress_params p = solar_compress_default_params();
  p.target_bytes = 2500;
  const std::vector<uint8_t> bytes = c_compress(dora, base, &p);
  CompressOptions o;
  o.mode = "spectral";
  o.target_bytes = 2500;
  const Checkpoint ck(ckpt);
  const Container c = compress_adapter(read_peft_adapter(dora), ck, o);
  EXPECT_EQ(c.passthrough_magnitude.size(), 10u);
  EXPECT_EQ(bytes, serialize_container(c));
  solar_adapter* a = nullptr;
  EXPECT_EQ(solar_restore(bytes.data(), bytes.size(), nullptr, 1, &a, err.text, sizeof err.text), SOLAR_ERROR_MISMATCH);
  EXPECT_NE(err.str().find("DoRA magnitude"), std::string::npos) << err.str();
  ASSERT_EQ(solar_restore(bytes.data(), bytes.size(), base, 1, &a, err.text, sizeof err.text), SOLAR_OK) << err.str();
  EXPECT_EQ(solar_adapter_tensor_count(a), 30u);  // 10 modules' A, B and magnitude
  solar_adapter_free(a);
  p.dora_magnitudes = "exact";
  const std::vector<uint8_t> exact = c_compress(dora, base, &p);
  ASSERT_EQ(solar_restore(exact.data(), exact.size(), nullptr, 1, &a, err.text, sizeof err.text), SOLAR_OK) << err.str();
  solar_adapter_free(a);
  solar_weights_free(base);
}

// A runtime applying the update itself gets PEFT's scaling per module, patterns and rsLoRA included.
TEST(CApi, ModulesCarryPeftsScaling) {
  const PeftAdapter fixture = read_peft_adapter(kStories);
  nlohmann::json cfg = fixture.config;
  cfg["alpha_pattern"] = {{"wv", 2.0}};
  cfg["use_rslora"] = true;
  const PeftAdapter patterned = make_peft_adapter(cfg, peft_tensors(fixture), fixture.file_metadata, "<patterned>");
  const test::TempDir dir;
  write_peft_adapter(dir.file("adapter"), patterned);
  uint8_t* out = nullptr;
  size_t size = 0;
  Err err;
  ASSERT_EQ(solar_compress(dir.file("adapter").c_str(), nullptr, nullptr, &out, &size, err.text, sizeof err.text), SOLAR_OK)
      << err.str();
  solar_adapter* a = nullptr;
  ASSERT_EQ(solar_restore(out, size, nullptr, 1, &a, err.text, sizeof err.text), SOLAR_OK) << err.str();
  solar_free(out);
  ASSERT_EQ(solar_adapter_module_count(a), patterned.modules.size());
  for (size_t i = 0; i < patterned.modules.size(); ++i) {
    const LoraModule& want = patterned.modules[i];
    solar_lora_module m;
    ASSERT_EQ(solar_adapter_module(a, i, &m), SOLAR_OK);
    EXPECT_EQ(std::string(m.path), want.path);
    EXPECT_EQ(m.rank, want.rank);
    EXPECT_DOUBLE_EQ(m.scaling, want.path.ends_with("wv") ? 2.0 / 2.0 : 8.0 / 2.0) << want.path;  // alpha / sqrt(4)
    EXPECT_EQ(std::string(m.a.name), "base_model.model." + want.path + ".lora_A.weight");
    EXPECT_EQ(std::string(m.b.name), "base_model.model." + want.path + ".lora_B.weight");
    EXPECT_EQ(m.a.shape[0], want.rank);
    EXPECT_EQ(m.b.shape[1], want.rank);
  }
  solar_lora_module m;
  EXPECT_EQ(solar_adapter_module(a, patterned.modules.size(), &m), SOLAR_ERROR_INVALID_INPUT);
  EXPECT_EQ(solar_adapter_module_count(nullptr), 0u);
  solar_adapter_free(a);
}

// Input second moments handed over as caller-held weights change the file exactly as the C++
// option does.
TEST(CApi, CalibrationStatisticsComeAsWeights) {
  const PeftAdapter adapter = read_peft_adapter(kStories);
  InMemoryWeights want_stats("stats");
  solar_weights* calib = nullptr;
  Err err;
  ASSERT_EQ(solar_weights_new("stats", &calib, err.text, sizeof err.text), SOLAR_OK);
  std::vector<std::string> names;
  std::vector<std::vector<float>> moments;
  for (const auto& m : adapter.modules) {
    const int64_t n = m.A.shape[1], samples = 2 * n;
    const auto x = test::random_normals(static_cast<size_t>(n * samples), moments.size() + 1);
    std::vector<float> s(static_cast<size_t>(n * n), 0.0f);  // E[x x^T] of correlated inputs
    for (int64_t i = 0; i < n; ++i)
      for (int64_t j = 0; j < n; ++j)
        for (int64_t k = 0; k < samples; ++k)
          s[i * n + j] += (x[i * samples + k] + x[((i + 1) % n) * samples + k]) *
                          (x[j * samples + k] + x[((j + 1) % n) * samples + k]) / samples;
    names.push_back(m.path + ".input_moment");
    moments.push_back(std::move(s));
  }
  for (size_t i = 0; i < names.size(); ++i) {
    const int64_t n = adapter.modules[i].A.shape[1];
    const int64_t shape[2] = {n, n};
    const auto* data = reinterpret_cast<const uint8_t*>(moments[i].data());
    want_stats.add(names[i], TensorView{DType::F32, {n, n}, data, moments[i].size() * 4});
    ASSERT_EQ(solar_weights_add(calib, names[i].c_str(), "F32", shape, 2, data, moments[i].size() * 4, err.text,
                                sizeof err.text),
              SOLAR_OK) << err.str();
  }
  solar_compress_params p = solar_compress_default_params();
  p.target_error = 0.3;
  p.calibration = calib;
  CompressOptions o;
  o.target_error = 0.3;
  o.calibration = &want_stats;
  const auto want = core_compress(adapter, InMemoryWeights(), o);
  EXPECT_EQ(c_compress(kStories, nullptr, &p), want);
  o.calibration = nullptr;
  EXPECT_NE(want, core_compress(adapter, InMemoryWeights(), o));  // the statistics count
  solar_weights_free(calib);
}

TEST(CApi, BadArgumentsAreStatusesWithMessages) {
  Err err;
  uint8_t* out = nullptr;
  size_t size = 0;
  EXPECT_EQ(solar_compress("/no/such/adapter", nullptr, nullptr, &out, &size, err.text, sizeof err.text), SOLAR_ERROR_IO);
  EXPECT_NE(err.str().find("/no/such/adapter"), std::string::npos) << err.str();
  EXPECT_EQ(out, nullptr);

  solar_compress_params p = solar_compress_default_params();
  p.mode = "lossless-please";
  EXPECT_EQ(solar_compress(kStories.c_str(), nullptr, &p, &out, &size, err.text, sizeof err.text), SOLAR_ERROR_INVALID_INPUT);
  EXPECT_NE(err.str().find("lossless-please"), std::string::npos) << err.str();
  p = solar_compress_default_params();
  p.threads = -1;
  EXPECT_EQ(solar_compress(kStories.c_str(), nullptr, &p, &out, &size, err.text, sizeof err.text), SOLAR_ERROR_INVALID_INPUT);
  EXPECT_EQ(solar_compress(nullptr, nullptr, nullptr, &out, &size, err.text, sizeof err.text), SOLAR_ERROR_INVALID_INPUT);

  solar_weights* w = nullptr;
  EXPECT_EQ(solar_weights_open("/no/such.safetensors", &w, err.text, sizeof err.text), SOLAR_ERROR_IO);
  EXPECT_EQ(w, nullptr);
  ASSERT_EQ(solar_weights_new(nullptr, &w, nullptr, 0), SOLAR_OK);
  const float values[6] = {1, 2, 3, 4, 5, 6};
  const int64_t shape[2] = {2, 3};
  EXPECT_EQ(solar_weights_add(w, "x", "F32", shape, 2, values, 20, err.text, sizeof err.text), SOLAR_ERROR_INVALID_INPUT);
  EXPECT_NE(err.str().find("need 24"), std::string::npos) << err.str();
  EXPECT_EQ(solar_weights_add(w, "x", "F8_E9", shape, 2, values, 24, err.text, sizeof err.text), SOLAR_ERROR_UNSUPPORTED);
  EXPECT_EQ(solar_weights_add(w, "x", "F32", shape, 2, values, 24, err.text, sizeof err.text), SOLAR_OK);
  solar_weights_free(w);

  solar_weights* disk = nullptr;
  ASSERT_EQ(solar_weights_open((kFixtures + "/golden_v1_base.safetensors").c_str(), &disk, nullptr, 0), SOLAR_OK);
  EXPECT_EQ(solar_weights_add(disk, "x", "F32", shape, 2, values, 24, err.text, sizeof err.text), SOLAR_ERROR_INVALID_INPUT);
  solar_weights_free(disk);

  // Messages are cut to the buffer and always terminated; a NULL buffer is fine.
  char tiny[8];
  std::memset(tiny, 'x', sizeof tiny);
  EXPECT_EQ(solar_weights_open("/no/such.safetensors", &w, tiny, sizeof tiny), SOLAR_ERROR_IO);
  EXPECT_EQ(std::strlen(tiny), 7u);
  EXPECT_EQ(solar_weights_open("/no/such.safetensors", &w, nullptr, 0), SOLAR_ERROR_IO);

  solar_tensor t;
  EXPECT_EQ(solar_adapter_tensor(nullptr, 0, &t), SOLAR_ERROR_INVALID_INPUT);
  EXPECT_EQ(solar_adapter_tensor_count(nullptr), 0u);
  EXPECT_STREQ(solar_status_name(SOLAR_ERROR_CORRUPT), "SOLAR_ERROR_CORRUPT");
  EXPECT_STREQ(solar_status_name(static_cast<solar_status>(99)), "unknown status");
  EXPECT_EQ(std::string(solar_version()), version_string());

  // A failed save leaves nothing behind.
  const auto bytes = test::read_bytes(kFixtures + "/golden_v6_spectral.solar");
  solar_adapter* a = nullptr;
  ASSERT_EQ(solar_restore(bytes.data(), bytes.size(), nullptr, 1, &a, nullptr, 0), SOLAR_OK);
  EXPECT_EQ(solar_adapter_tensor(a, solar_adapter_tensor_count(a), &t), SOLAR_ERROR_INVALID_INPUT);
  const test::TempDir dir;
  const std::string blocked = dir.file("file") + "/restored";
  test::write_text(dir.file("file"), "not a directory");
  EXPECT_EQ(solar_adapter_save(a, blocked.c_str(), err.text, sizeof err.text), SOLAR_ERROR_IO);
  EXPECT_EQ(dir.list(), std::vector<std::string>{"file"});
  solar_adapter_free(a);
}

}  // namespace
}  // namespace solar
