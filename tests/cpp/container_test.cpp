#include "solar/container.hpp"

#include <algorithm>
#include <cmath>
#include <limits>
#include <cstdlib>
#include <tuple>

#include <xxhash.h>

#include <gtest/gtest.h>

#include "solar/checkpoint.hpp"
#include "solar/magnitude_coding.hpp"
#include "solar/philox.hpp"
#include "solar/pipeline.hpp"
#include "solar/safetensors.hpp"
#include "test_support.hpp"

namespace solar {
namespace {

const std::string kGolden = SOLAR_SOURCE_DIR "/tests/fixtures/golden_v1";
const std::string kGoldenV2 = SOLAR_SOURCE_DIR "/tests/fixtures/golden_v2";
const std::string kGoldenV3 = SOLAR_SOURCE_DIR "/tests/fixtures/golden_v3";
const std::string kGoldenV4 = SOLAR_SOURCE_DIR "/tests/fixtures/golden_v4";
const std::string kGoldenV5 = SOLAR_SOURCE_DIR "/tests/fixtures/golden_v5";
const std::string kGoldenV6 = SOLAR_SOURCE_DIR "/tests/fixtures/golden_v6";
const std::string kGoldenV7 = SOLAR_SOURCE_DIR "/tests/fixtures/golden_v7";
// A golden `<stem>_spectral.solar` parsed as a reader would, errors named by its file name.
Container parse_golden_spectral(const std::string& stem) {
  const auto bytes = test::read_bytes(stem + "_spectral.solar");
  return parse_container(bytes.data(), bytes.size(), stem.substr(stem.rfind('/') + 1) + "_spectral.solar");
}
// A serialised container labelled with another version byte, its checksum made valid again:
// what a reader must refuse on content, not on corruption.
std::vector<uint8_t> relabelled(std::vector<uint8_t> bytes, uint8_t version) {
  bytes[4] = version;
  const uint32_t sum = XXH32(bytes.data(), bytes.size() - kTrailerSize, 0);
  for (int i = 0; i < 4; ++i) bytes[bytes.size() - 4 + i] = static_cast<uint8_t>(sum >> (8 * i));
  return bytes;
}
std::vector<uint8_t> bytes_of(const std::string& stem) { return test::read_bytes(stem + "_spectral.solar"); }
// Pinned in docs/FORMAT.md: changing the dictionary is a format change.
constexpr uint32_t kDictionaryXxh32 = 0x383e7759u;

// A rows x cols tensor of portable Philox normals (seed, layer, member), as the golden files use.
Tensor philox_tensor(uint64_t seed, uint32_t layer, uint32_t member, int64_t rows, int64_t cols, DType dtype) {
  std::vector<float> v(static_cast<size_t>(rows * cols));
  philox_normals(seed, layer, member, 0, 0, v.size(), v.data());
  return Tensor::from_f32(v, {rows, cols}, dtype);
}

// The golden container: a rank-2 LoRA on one 24 x 16 layer whose base weight comes from the
// portable Philox stream (seed 2024), plus an F16 passthrough tensor.
Tensor golden_base() { return philox_tensor(2024, 0, 0, 24, 16, DType::F32); }

PeftAdapter golden_adapter() {
  nlohmann::json cfg = {{"peft_type", "LORA"}, {"r", 2}, {"lora_alpha", 4}, {"target_modules", {"proj"}}};
  std::vector<std::pair<std::string, Tensor>> t;
  t.emplace_back("base_model.model.golden.proj.lora_A.weight", philox_tensor(2025, 0, 0, 2, 16, DType::F32));
  t.emplace_back("base_model.model.golden.proj.lora_B.weight", philox_tensor(2025, 0, 1, 24, 2, DType::F16));
  t.emplace_back("base_model.model.head.weight", Tensor::from_f32({1, -2, 3.5f, 0.25f, 8, -0.5f}, {2, 3}, DType::F16));
  return make_peft_adapter(cfg, std::move(t), {{"format", "pt"}}, "golden");
}

Container small_container() {
  InMemoryWeights base;
  static const Tensor w = golden_base();
  base.add("golden.proj.weight", TensorView{w.dtype, w.shape, w.data.data(), w.data.size()});
  CompressOptions o;
  o.seed = 77;
  o.paper.pool_a = o.paper.pool_b = 40;
  o.paper.keep_a = 12;
  o.paper.keep_b = 9;
  o.paper.bits = 8;
  o.threads = 1;
  return compress_adapter(golden_adapter(), base, o);
}

TEST(Container, RoundTripPreservesEverything) {
  const Container c = small_container();
  const auto bytes = serialize_container(c);
  const Container back = parse_container(bytes.data(), bytes.size(), "mem");
  EXPECT_EQ(back.seed, 77u);
  EXPECT_EQ(back.peft_config, c.peft_config);
  ASSERT_EQ(back.layers.size(), 1u);
  EXPECT_EQ(back.layers[0].module, "golden.proj");
  EXPECT_EQ(back.layers[0].base_key, "golden.proj.weight");
  EXPECT_EQ(back.layers[0].b_dtype, DType::F16);
  EXPECT_EQ(back.layers[0].encoded.blobs, c.layers[0].encoded.blobs);
  EXPECT_EQ(back.layers[0].encoded.params, c.layers[0].encoded.params);
  EXPECT_EQ(back.layers[0].base_fingerprint, c.layers[0].base_fingerprint);
  ASSERT_EQ(back.passthrough.size(), 1u);
  EXPECT_EQ(back.passthrough[0].second.data, c.passthrough[0].second.data);
  EXPECT_EQ(serialize_container(back), bytes);
}

TEST(Container, EveryTruncationFailsCleanly) {
  const auto bytes = serialize_container(small_container());
  for (size_t len = 0; len < bytes.size(); ++len) {
    try {
      parse_container(bytes.data(), len, "cut.solar");
      ADD_FAILURE() << "accepted a file cut to " << len << " bytes";
    } catch (const Error& e) {
      EXPECT_TRUE(e.kind() == ErrorKind::Format || e.kind() == ErrorKind::Corrupt) << e.what();
      EXPECT_NE(std::string(e.what()).find("cut.solar"), std::string::npos);
    }
  }
}

TEST(Container, EveryBitFlipIsDetected) {
  const auto bytes = serialize_container(small_container());
  for (size_t i = 0; i < bytes.size(); ++i) {
    for (int bit : {0, 5}) {
      auto bad = bytes;
      bad[i] ^= static_cast<uint8_t>(1u << bit);
      try {
        parse_container(bad.data(), bad.size(), "flip.solar");
        ADD_FAILURE() << "accepted a flipped bit at byte " << i;
      } catch (const Error& e) {
        EXPECT_NE(e.kind(), ErrorKind::Io) << e.what();
      }
    }
  }
}

TEST(Container, HeaderAbuseIsRejectedBeforeAllocation) {
  const Container c = small_container();
  auto bytes = serialize_container(c);
  const ContainerHeader h = parse_container_header(bytes.data(), bytes.size(), "x");
  // Rebuild the file with forged size fields (and a valid checksum, so only the bounds stop it).
  auto forged = [&](uint64_t meta_stored, uint64_t meta_raw) {
    std::vector<uint8_t> b(bytes.begin(), bytes.begin() + 6);
    for (uint64_t v : {meta_stored, meta_raw, h.payload_stored, h.payload_raw}) {
      for (; v >= 0x80; v >>= 7) b.push_back(static_cast<uint8_t>(v | 0x80));
      b.push_back(static_cast<uint8_t>(v));
    }
    b.insert(b.end(), bytes.begin() + static_cast<ptrdiff_t>(h.header_bytes), bytes.end() - kTrailerSize);
    const uint32_t sum = XXH32(b.data(), b.size(), 0);
    for (int i = 0; i < 4; ++i) b.push_back(static_cast<uint8_t>(sum >> (8 * i)));
    return b;
  };
  const auto huge = forged(h.metadata_stored, 1ull << 62);
  EXPECT_SOLAR_ERROR(parse_container(huge.data(), huge.size(), "h.solar"), ErrorKind::Format, "limits");
  const auto long_meta = forged(1ull << 40, h.metadata_raw);
  EXPECT_SOLAR_ERROR(parse_container(long_meta.data(), long_meta.size(), "h.solar"), ErrorKind::Format, "truncated");
  for (uint8_t version : {uint8_t{0}, uint8_t{8}, uint8_t{255}}) {
    auto other = bytes;
    other[4] = version;
    EXPECT_SOLAR_ERROR(parse_container(other.data(), other.size(), "v.solar"), ErrorKind::Unsupported,
                       "version " + std::to_string(version));
  }
  auto magic = bytes;
  magic[1] = 'X';
  EXPECT_SOLAR_ERROR(parse_container(magic.data(), magic.size(), "m.solar"), ErrorKind::Format, "magic");
}

// Format v1 is pinned by a file written by an earlier build: it must keep loading and decoding
// to the same adapter.
TEST(Container, MetadataDictionaryIsTheSpecFile) {
  const auto spec = test::read_bytes(SOLAR_SOURCE_DIR "/docs/metadata-dictionary-v1.txt");
  EXPECT_EQ(std::string(spec.begin(), spec.end()), metadata_dictionary_v1());
  EXPECT_EQ(XXH32(spec.data(), spec.size(), 0), 0u + kDictionaryXxh32);
}

TEST(Container, GoldenV1FileStillDecodes) {
  const auto bytes = test::read_bytes(kGolden + ".solar");
  const Container c = parse_container(bytes.data(), bytes.size(), "golden_v1.solar");
  EXPECT_EQ(c.seed, 77u);
  ASSERT_EQ(c.layers.size(), 1u);
  EXPECT_EQ(c.layers[0].mode, "paper");
  EXPECT_EQ(c.layers[0].encoded.params["pool"], nlohmann::json({40, 40}));
  const Checkpoint base(kGolden + "_base.safetensors");
  const PeftAdapter restored = decompress_container(c, base);
  const SafetensorsFile expected(kGolden + "_expected.safetensors");
  ASSERT_EQ(restored.modules.size(), 1u);
  const auto a = restored.modules[0].A.to_f32(), ea = expected.get("A").to_f32();
  const auto b = restored.modules[0].B.to_f32(), eb = expected.get("B").to_f32();
  ASSERT_EQ(a.size(), ea.size());
  for (size_t i = 0; i < a.size(); ++i) EXPECT_NEAR(a[i], ea[i], 1e-5);
  for (size_t i = 0; i < b.size(); ++i) EXPECT_NEAR(b[i], eb[i], 2e-3);  // B is stored as F16
  const PeftAdapter original = golden_adapter();
  ASSERT_EQ(restored.passthrough.size(), 1u);
  EXPECT_EQ(restored.passthrough[0].first, original.passthrough[0].first);
  EXPECT_EQ(restored.passthrough[0].second.data, original.passthrough[0].second.data);
}

// The spectral mode's stream (range coder, integer model, step codes) pinned the same way; its
// decoder does no floating-point factorisation, so the restored factors must match exactly.
TEST(Container, GoldenV1SpectralFileStillDecodes) {
  const Container c = parse_golden_spectral(kGolden);
  ASSERT_EQ(c.layers.size(), 1u);
  EXPECT_EQ(c.layers[0].mode, "spectral");
  const PeftAdapter restored = decompress_container(c, InMemoryWeights("<none>"));
  const SafetensorsFile expected(kGolden + "_spectral_expected.safetensors");
  EXPECT_EQ(restored.modules[0].A.data, expected.get("A").copy().data);
  EXPECT_EQ(restored.modules[0].B.data, expected.get("B").copy().data);
}

// Two spectral layers (24 x 16, r = 2 and 12 x 16, r = 3): in v2 they share one stream.
PeftAdapter golden_adapter_v2() {
  nlohmann::json cfg = {{"peft_type", "LORA"}, {"r", 2}, {"lora_alpha", 4}, {"rank_pattern", {{"down", 3}}},
                        {"target_modules", {"up", "down"}}};
  std::vector<std::pair<std::string, Tensor>> t;
  t.emplace_back("base_model.model.mlp.up.lora_A.weight", philox_tensor(2026, 0, 0, 2, 16, DType::F32));
  t.emplace_back("base_model.model.mlp.up.lora_B.weight", philox_tensor(2026, 0, 1, 24, 2, DType::F32));
  t.emplace_back("base_model.model.mlp.down.lora_A.weight", philox_tensor(2026, 1, 0, 3, 16, DType::F32));
  t.emplace_back("base_model.model.mlp.down.lora_B.weight", philox_tensor(2026, 1, 1, 12, 3, DType::F32));
  t.emplace_back("base_model.model.head.weight", Tensor::from_f32({1, -2, 3.5f, 0.25f, 8, -0.5f}, {2, 3}, DType::F32));
  return make_peft_adapter(cfg, std::move(t), {{"format", "pt"}}, "golden v2");
}

Container spectral_container_v2() {
  CompressOptions o;
  o.mode = "spectral";
  o.target_error = 0.03;
  o.threads = 1;
  return compress_adapter(golden_adapter_v2(), InMemoryWeights("<none>"), o);
}

// The golden files' layers, restored, against the factors an earlier build wrote.
void expect_golden_factors(const PeftAdapter& restored, const std::string& expected_path, size_t layers = 2) {
  const SafetensorsFile expected(expected_path);
  ASSERT_EQ(restored.modules.size(), layers);
  for (size_t i = 0; i < layers; ++i) {
    EXPECT_EQ(restored.modules[i].A.data, expected.get("A" + std::to_string(i)).copy().data) << i;
    EXPECT_EQ(restored.modules[i].B.data, expected.get("B" + std::to_string(i)).copy().data) << i;
  }
}

TEST(Container, GoldenV2SpectralStreamStillDecodes) {
  const Container c = parse_golden_spectral(kGoldenV2);
  EXPECT_EQ(c.version, 2u);
  ASSERT_EQ(c.layers.size(), 2u);
  EXPECT_EQ(c.layers[0].encoded.blobs.size(), 1u);  // the shared stream
  EXPECT_TRUE(c.layers[1].encoded.blobs.empty());
  const PeftAdapter restored = decompress_container(c, InMemoryWeights("<none>"));
  expect_golden_factors(restored, kGoldenV2 + "_spectral_expected.safetensors");
  // The passthrough tensor, stored as byte planes, comes back byte-exactly.
  const PeftAdapter original = golden_adapter_v2();
  ASSERT_EQ(restored.passthrough.size(), 1u);
  EXPECT_EQ(restored.passthrough[0].second.data, original.passthrough[0].second.data);
  const auto& pass = c.passthrough[0].second.data;
  EXPECT_EQ(pass, original.passthrough[0].second.data);
}

// Formats v3 and v4: two layers at a target where one of them takes dependent quantisation
// (how the v3 golden file was written, from golden_adapter_v2 with exact passthrough).
Container dependent_spectral_container(const PeftAdapter& adapter, const std::string& passthrough) {
  CompressOptions o;
  o.mode = "spectral";
  o.target_error = 0.2;
  o.quantiser = "dependent";
  o.passthrough = passthrough;
  o.threads = 1;
  return compress_adapter(adapter, InMemoryWeights("<none>"), o);
}

TEST(Container, GoldenV3DependentQuantisationStillDecodes) {
  const Container c = parse_golden_spectral(kGoldenV3);
  EXPECT_EQ(c.version, 3u);
  const std::vector<std::vector<int32_t>> symbols = read_streams(c).at(0).symbols;
  ASSERT_EQ(symbols.size(), 2u);
  bool dependent = false;
  for (const auto& s : symbols) dependent = dependent || (s.size() > 3 && s[3] == 1);
  EXPECT_TRUE(dependent) << "the golden file must exercise dependent quantisation";
  const PeftAdapter restored = decompress_container(c, InMemoryWeights("<none>"));
  expect_golden_factors(restored, kGoldenV3 + "_spectral_expected.safetensors");
}

// The levels of dependent quantisation, written from docs/FORMAT.md alone: a layer's restored B
// columns are step(tx) times these levels of its integers.
TEST(Container, DependentQuantisationLevelsFollowTheSpec) {
  const Container c = parse_golden_spectral(kGoldenV3);
  const std::vector<std::vector<int32_t>> symbols = read_streams(c).at(0).symbols;
  const PeftAdapter restored = decompress_container(c, InMemoryWeights("<none>"));
  const int next[4][2] = {{0, 2}, {2, 0}, {1, 3}, {3, 1}};
  int checked = 0;
  for (size_t l = 0; l < symbols.size(); ++l) {
    const auto& s = symbols[l];
    if (s.size() < 4 || s[3] != 1) continue;
    const int64_t k = s[0], m = c.layers[l].shape.m, r = c.layers[l].shape.r;
    const double step = std::exp2((s[1] - 200) / 8.0);
    const std::vector<float> b = restored.modules[l].B.to_f32();  // m x r, row-major
    for (int64_t j = 0; j < k; ++j) {
      int state = 0;
      for (int64_t i = 0; i < m; ++i) {
        const int32_t q = s[static_cast<size_t>(4 + j * m + i)];
        const double level = state < 2 ? 2.0 * q : 2.0 * q - (q > 0) + (q < 0);
        EXPECT_FLOAT_EQ(b[static_cast<size_t>(i * r + j)], static_cast<float>(level * step)) << l << " " << i << " " << j;
        state = next[state][q & 1];
        ++checked;
      }
    }
  }
  EXPECT_GT(checked, 0);
}

TEST(Container, SizeReportSharesTheStreamBetweenItsLayers) {
  const auto bytes = test::read_bytes(kGoldenV2 + "_spectral.solar");
  const Container c = parse_container(bytes.data(), bytes.size(), "golden_v2_spectral.solar");
  const SizeReport r = size_report(c, bytes);
  ASSERT_EQ(r.layers.size(), 2u);
  const std::vector<std::vector<int32_t>> symbols = read_streams(c).at(0).symbols;
  double total = 0;
  for (size_t i = 0; i < 2; ++i) {
    ASSERT_TRUE(r.layers[i].stream.is_object()) << i;
    EXPECT_EQ(r.layers[i].stream["components"].get<int>(), symbols[i][0]) << "k is the layer's first symbol";
    EXPECT_GT(r.layers[i].stream["bytes"].get<double>(), 0.0);
    total += r.layers[i].stream["bytes"].get<double>();
  }
  // Shares of one stream: they add up to its length, within the coder's flush.
  EXPECT_NEAR(total, static_cast<double>(c.layers[0].encoded.blobs[0].size()), 4.0);
  // v1 files and unstreamed modes have no stream to share.
  const auto v1 = test::read_bytes(kGolden + "_spectral.solar");
  for (const auto& l : size_report(parse_container(v1.data(), v1.size(), "v1"), v1).layers) EXPECT_TRUE(l.stream.is_null());
}

TEST(Container, OldVersionRoundTripsByteExactly) {
  for (const std::string name : {"", "_spectral"}) {
    const auto bytes = test::read_bytes(kGolden + name + ".solar");
    const Container c = parse_container(bytes.data(), bytes.size(), "golden_v1" + name);
    EXPECT_EQ(c.version, 1u);
    EXPECT_EQ(serialize_container(c), bytes) << name;
  }
}

TEST(Container, StreamLayoutIsChecked) {
  Container c = spectral_container_v2();
  c.layers[1].encoded.blobs = {{1, 2, 3}};  // a streamed layer with a blob of its own
  const auto bytes = serialize_container(c);
  const Container back = parse_container(bytes.data(), bytes.size(), "s.solar");
  EXPECT_SOLAR_ERROR(decompress_container(back, InMemoryWeights("<none>")), ErrorKind::Format, "blobs of its own");
}

// A stream that passes the checksum but is garbage (a buggy or hostile writer) decodes to some
// adapter or fails with a Format error naming the layer; it never reads out of bounds.
// Replaces `good`'s stream by 200 junk streams; each decodes to finite tensors or fails with a
// Format error. Returns how many failed.
size_t garbage_stream_errors(const Container& good) {
  size_t errors = 0;
  for (uint64_t seed = 0; seed < 200; ++seed) {
    Container c = good;
    std::vector<float> noise(1 + seed % 40);
    philox_normals(seed, 7, 0, 0, 0, noise.size(), noise.data());
    std::vector<uint8_t> junk(noise.size());
    for (size_t i = 0; i < junk.size(); ++i) junk[i] = static_cast<uint8_t>(static_cast<int>(noise[i] * 1000.0f) & 0xFF);
    c.layers[0].encoded.blobs = {junk};
    const auto bytes = serialize_container(c);
    try {
      const PeftAdapter a = decompress_container(parse_container(bytes.data(), bytes.size(), "g.solar"), InMemoryWeights("<none>"));
      for (const auto& m : a.modules)
        for (float v : m.B.to_f32()) EXPECT_TRUE(std::isfinite(v));
      for (const auto& [key, t] : a.passthrough) {
        EXPECT_EQ(t.data.size(), static_cast<size_t>(t.numel()) * dtype_size(t.dtype)) << key;
        for (float v : t.to_f32()) EXPECT_TRUE(std::isfinite(v)) << key;
      }
    } catch (const Error& e) {
      EXPECT_EQ(e.kind(), ErrorKind::Format) << e.what();
      ++errors;
    }
  }
  return errors;
}

TEST(Container, GarbageStreamFailsCleanly) {
  EXPECT_GT(garbage_stream_errors(spectral_container_v2()), 0u);  // the step-code and count checks do fire
}

// Format v4: the v2 adapter with a 2-D head and a bias, the head coded as int8 rows.
PeftAdapter golden_adapter_v4() {
  PeftAdapter a = golden_adapter_v2();
  a.passthrough.clear();
  a.passthrough.emplace_back("base_model.model.head.weight", philox_tensor(2027, 0, 0, 3, 5, DType::F32));
  a.passthrough.emplace_back("base_model.model.head.bias", philox_tensor(2027, 0, 1, 1, 3, DType::F16));
  a.passthrough.back().second.shape = {3};
  return a;
}

Container spectral_container_v4() { return dependent_spectral_container(golden_adapter_v4(), "int8"); }

TEST(Container, GoldenV4Int8PassthroughStillDecodes) {
  const auto bytes = test::read_bytes(kGoldenV4 + "_spectral.solar");
  const Container c = parse_container(bytes.data(), bytes.size(), "golden_v4_spectral.solar");
  EXPECT_EQ(c.version, 4u);
  ASSERT_EQ(c.passthrough_int8.size(), 1u);
  EXPECT_EQ(c.passthrough_int8.begin()->first, "base_model.model.head.weight");
  const PeftAdapter restored = decompress_container(c, InMemoryWeights("<none>"));
  expect_golden_factors(restored, kGoldenV4 + "_spectral_expected.safetensors");
  const SafetensorsFile expected(kGoldenV4 + "_spectral_expected.safetensors");
  ASSERT_EQ(restored.passthrough.size(), 2u);
  EXPECT_EQ(restored.passthrough[0].second.data, expected.get("P0").copy().data);
  EXPECT_EQ(restored.passthrough[1].second.data, golden_adapter_v4().passthrough[1].second.data);  // the vector: exact
  EXPECT_EQ(serialize_container(c), bytes);  // the codes are kept, not re-derived
}

TEST(Container, Int8PassthroughIsWithinHalfAStepOfEveryValue) {
  const PeftAdapter original = golden_adapter_v4();
  const Container c = spectral_container_v4();
  const auto bytes = serialize_container(c);
  const Container back = parse_container(bytes.data(), bytes.size(), "p.solar");
  const std::vector<float> x = original.passthrough[0].second.to_f32(), y = back.passthrough[0].second.to_f32();
  const Int8Rows& q = back.passthrough_int8.at("base_model.model.head.weight");
  ASSERT_EQ(q.scales.size(), 3u);
  for (size_t i = 0; i < x.size(); ++i) {
    const float s = q.scales[i / 5];
    EXPECT_LE(std::fabs(x[i] - y[i]), 0.5f * s * (1 + 1e-6f)) << i;
    EXPECT_GT(s, 0);
  }
  // Each row's largest value sits on the grid's end.
  for (size_t r = 0; r < 3; ++r) {
    int peak = 0;
    for (size_t j = 0; j < 5; ++j) peak = std::max(peak, std::abs(int{q.values[r * 5 + j]}));
    EXPECT_EQ(peak, 127) << r;
  }
  EXPECT_EQ(back.passthrough[1].second.data, original.passthrough[1].second.data);
  EXPECT_EQ(serialize_container(back), bytes);
}

TEST(Container, Int8PassthroughNeedsVersion4) {
  Container c = spectral_container_v4();
  c.version = 3;
  EXPECT_SOLAR_ERROR(serialize_container(c), ErrorKind::InvalidInput, "version 4");
  // A v4 file relabelled v3 (valid checksum) is refused by the reader too.
  c.version = 4;
  const auto bytes = relabelled(serialize_container(c), 3);
  EXPECT_SOLAR_ERROR(parse_container(bytes.data(), bytes.size(), "v3.solar"), ErrorKind::Format, "version 4");
}

TEST(Container, BadInt8PassthroughCodesAreRejected) {
  const Container good = spectral_container_v4();
  const std::string key = "base_model.model.head.weight";
  auto parse_with = [&](auto mutate) {
    Container c = good;
    mutate(c.passthrough_int8.at(key));
    const auto bytes = serialize_container(c);
    return parse_container(bytes.data(), bytes.size(), "q.solar");
  };
  EXPECT_SOLAR_ERROR(parse_with([](Int8Rows& q) { q.values[2] = -128; }), ErrorKind::Format, "-128");
  EXPECT_SOLAR_ERROR(parse_with([](Int8Rows& q) { q.scales[1] = -1; }), ErrorKind::Format, "scale");
  EXPECT_SOLAR_ERROR(parse_with([](Int8Rows& q) { q.scales[0] = std::nanf(""); }), ErrorKind::Format, "scale");
  EXPECT_SOLAR_ERROR(parse_with([](Int8Rows& q) { q.values.pop_back(); }), ErrorKind::Format, "head.weight");
}

TEST(Container, Int8PassthroughLeavesVectorsAndNonFiniteTensorsExact) {
  PeftAdapter a = golden_adapter_v4();
  std::vector<float> v = a.passthrough[0].second.to_f32();
  v[4] = std::numeric_limits<float>::infinity();
  a.passthrough[0].second = Tensor::from_f32(v, {3, 5}, DType::F32);
  CompressOptions o;
  o.mode = "spectral";
  o.passthrough = "int8";
  const Container c = compress_adapter(a, InMemoryWeights("<none>"), o);
  EXPECT_TRUE(c.passthrough_int8.empty());
  o.passthrough = "int4";
  EXPECT_SOLAR_ERROR(compress_adapter(a, InMemoryWeights("<none>"), o), ErrorKind::InvalidInput, "passthrough");
}

// Format v5: four layers in two groups ("q" and "v"), the last one too small to keep (k = 0),
// one trellis-coded layer, and the v4 head and bias.
PeftAdapter golden_adapter_v5() {
  nlohmann::json cfg = {{"peft_type", "LORA"}, {"r", 2}, {"lora_alpha", 4}, {"rank_pattern", {{"v", 3}}}, {"target_modules", {"q", "v"}}};
  std::vector<std::pair<std::string, Tensor>> t;
  for (uint32_t layer = 0; layer < 2; ++layer)
    for (const auto& [name, m, r] : {std::tuple{"q", 24, 2}, std::tuple{"v", 12, 3}}) {
      const std::string prefix = "base_model.model.layers." + std::to_string(layer) + ".attn." + name;
      const uint32_t index = 2 * layer + (name[0] == 'v' ? 1 : 0);
      t.emplace_back(prefix + ".lora_A.weight", philox_tensor(2028, index, 0, r, 16, DType::F32));
      Tensor b = philox_tensor(2028, index, 1, m, r, DType::F32);
      if (index == 3) b = Tensor::from_f32([&] { auto v = b.to_f32(); for (float& x : v) x *= 1e-4f; return v; }(), b.shape, DType::F32);
      t.emplace_back(prefix + ".lora_B.weight", std::move(b));
    }
  const PeftAdapter v4 = golden_adapter_v4();
  for (const auto& p : v4.passthrough) t.push_back(p);
  return make_peft_adapter(cfg, std::move(t), {{"format", "pt"}}, "golden v5");
}

Container spectral_container_v5() { return dependent_spectral_container(golden_adapter_v5(), "int8"); }

TEST(Container, GoldenV5StreamStillDecodes) {
  const auto bytes = test::read_bytes(kGoldenV5 + "_spectral.solar");
  const Container c = parse_container(bytes.data(), bytes.size(), "golden_v5_spectral.solar");
  EXPECT_EQ(c.version, 5u);
  // What the file must exercise: a dropped layer, a trellis-coded one, a step predicted from its
  // group, and the metadata as a zstd frame without its magic number.
  const std::vector<std::vector<int32_t>> symbols = read_streams(c).at(0).symbols;
  ASSERT_EQ(symbols.size(), 4u);
  EXPECT_EQ(symbols[3], std::vector<int32_t>{0});
  EXPECT_GE(symbols[0][3] + symbols[1][3] + symbols[2][3], 1) << "no trellis-coded layer";
  EXPECT_EQ(stream_group(c.layers[2].module), stream_group(c.layers[0].module));  // "q": predicted from layer 0
  const ContainerHeader h = parse_container_header(bytes.data(), bytes.size(), "v5");
  EXPECT_EQ(h.flags & 3u, 3u);
  EXPECT_NE(std::vector<uint8_t>(bytes.begin() + static_cast<ptrdiff_t>(h.header_bytes), bytes.begin() + static_cast<ptrdiff_t>(h.header_bytes) + 4),
            (std::vector<uint8_t>{0x28, 0xB5, 0x2F, 0xFD}));
  const PeftAdapter restored = decompress_container(c, InMemoryWeights("<none>"));
  expect_golden_factors(restored, kGoldenV5 + "_spectral_expected.safetensors", 4);
  const SafetensorsFile expected(kGoldenV5 + "_spectral_expected.safetensors");
  EXPECT_EQ(restored.passthrough[0].second.data, expected.get("P0").copy().data);
  EXPECT_EQ(serialize_container(c), bytes);
}

// v5 stream syntax: every kept component's X column starts with a positive integer (its sign is
// not coded), and the restored product B A is what the unnormalised symbols would give.
TEST(Container, V5ComponentsStartPositive) {
  const Container c = spectral_container_v5();
  const std::vector<std::vector<int32_t>> symbols = read_streams(c).at(0).symbols;
  int columns = 0;
  for (size_t l = 0; l < symbols.size(); ++l) {
    const auto& s = symbols[l];
    const int64_t k = s[0], m = c.layers[l].shape.m;
    for (int64_t j = 0; j < k; ++j) {
      const auto col = s.begin() + 4 + j * m;
      const auto lead = std::find_if(col, col + m, [](int32_t v) { return v != 0; });
      ASSERT_NE(lead, col + m);
      EXPECT_GT(*lead, 0) << l << " " << j;
      ++columns;
    }
  }
  EXPECT_GE(columns, 3);
}

// Since v5 a compressed payload is a zstd frame without its magic number too; it round-trips.
TEST(Container, V5PayloadFrameIsMagicless) {
  PeftAdapter a = golden_adapter_v2();
  a.passthrough.emplace_back("base_model.model.zeros.weight", Tensor::from_f32(std::vector<float>(4096, 0.0f), {64, 64}, DType::F32));
  CompressOptions o;
  o.mode = "spectral";
  o.threads = 1;
  const Container c = compress_adapter(a, InMemoryWeights("<none>"), o);
  const auto bytes = serialize_container(c);
  const ContainerHeader h = parse_container_header(bytes.data(), bytes.size(), "z");
  ASSERT_TRUE(h.flags & 4u) << "the payload should compress";
  const auto pay = bytes.begin() + static_cast<ptrdiff_t>(h.header_bytes + h.metadata_stored);
  EXPECT_NE(std::vector<uint8_t>(pay, pay + 4), (std::vector<uint8_t>{0x28, 0xB5, 0x2F, 0xFD}));
  const Container back = parse_container(bytes.data(), bytes.size(), "z.solar");
  EXPECT_EQ(back.passthrough.back().second.data, a.passthrough.back().second.data);
  EXPECT_EQ(serialize_container(back), bytes);
}

// Format v6: the v5 adapter with its 3 x 5 head coded as a fifth layer of the stream.
Container spectral_container_v6() { return dependent_spectral_container(golden_adapter_v5(), "spectral"); }

TEST(Container, GoldenV6HeadLayerStillDecodes) {
  const Container c = parse_golden_spectral(kGoldenV6);
  EXPECT_EQ(c.version, 6u);
  ASSERT_EQ(c.layers.size(), 5u);
  ASSERT_EQ(c.passthrough_layers.size(), 1u);
  EXPECT_EQ(c.passthrough_layers.at("base_model.model.head.weight"), 4u);
  EXPECT_EQ(c.layers[4].module, "head");
  EXPECT_TRUE(c.passthrough_int8.empty());
  EXPECT_GE(read_streams(c).at(0).symbols.at(4).at(0), 1) << "the head must keep a component";
  const PeftAdapter restored = decompress_container(c, InMemoryWeights("<none>"));
  expect_golden_factors(restored, kGoldenV6 + "_spectral_expected.safetensors", 4);
  const SafetensorsFile expected(kGoldenV6 + "_spectral_expected.safetensors");
  ASSERT_EQ(restored.passthrough.size(), 2u);
  EXPECT_EQ(restored.passthrough[0].second.data, expected.get("P0").copy().data);
  EXPECT_EQ(restored.passthrough[1].second.data, golden_adapter_v5().passthrough[1].second.data);  // the vector: exact
  EXPECT_EQ(serialize_container(c), bytes_of(kGoldenV6));
}

// The head is the product of its layer's restored factors, as the spec defines it, and near the
// original; the restored adapter has the original's LoRA modules and tensors, nothing more.
TEST(Container, HeadLayerRestoresTheProductOfItsFactors) {
  const PeftAdapter original = golden_adapter_v5();
  const Container c = spectral_container_v6();
  const auto bytes = serialize_container(c);
  const Container back = parse_container(bytes.data(), bytes.size(), "h.solar");
  EXPECT_TRUE(back.passthrough[0].second.data.empty());  // restored by decompress, not by the parser
  const PeftAdapter restored = decompress_container(back, InMemoryWeights("<none>"));
  ASSERT_EQ(restored.modules.size(), 4u);
  for (size_t i = 0; i < 4; ++i) EXPECT_EQ(restored.modules[i].path, original.modules[i].path);
  ASSERT_EQ(restored.passthrough.size(), 2u);
  const Tensor& head = restored.passthrough[0].second;
  EXPECT_EQ(head.dtype, DType::F32);
  EXPECT_EQ(head.shape, (std::vector<int64_t>{3, 5}));
  // The layer's factors, decoded on their own, multiplied in binary64 in order of j.
  const ModeStream s = std::move(read_streams(back).at(0));
  const LayerContext ctx(back.seed, 4, back.layers[4].shape, nullptr);
  const Factors f = s.codec->decode_symbols(ctx, s.symbols[4]);
  const std::vector<float> bf = f.B.to_f32(), af = f.A.to_f32(), got = head.to_f32(), want = original.passthrough[0].second.to_f32();
  double err = 0, norm = 0;
  for (int64_t i = 0; i < 3; ++i)
    for (int64_t col = 0; col < 5; ++col) {
      double acc = 0;
      for (int64_t j = 0; j < f.B.cols; ++j) acc += static_cast<double>(bf[i * f.B.cols + j]) * af[j * 5 + col];
      EXPECT_EQ(got[i * 5 + col], static_cast<float>(acc)) << i << "," << col;
      err += std::pow(got[i * 5 + col] - want[i * 5 + col], 2);
      norm += std::pow(want[i * 5 + col], 2);
    }
  EXPECT_LT(std::sqrt(err / norm), 0.5);  // planned at a relative error of 0.2 overall
  EXPECT_EQ(restored.passthrough[1].second.data, original.passthrough[1].second.data);
  const SizeReport r = size_report(back, bytes);
  EXPECT_EQ(r.passthrough_layer_tensors, 1u);
  EXPECT_EQ(r.passthrough_raw_bytes, 3u * 5u * 4u + 3u * 2u);
  size_t lora = 0;
  for (const auto& m : original.modules) lora += static_cast<size_t>(m.rank * (m.A.shape[1] + m.B.shape[0]));
  EXPECT_EQ(r.lora_params, lora);  // the head is not counted as a LoRA module
  EXPECT_EQ(serialize_container(back), bytes);
}

TEST(Container, BadHeadLayerReferencesAreRejected) {
  const Container good = spectral_container_v6();
  const std::string key = "base_model.model.head.weight";
  auto parse_with = [&](auto mutate) {
    Container c = good;
    mutate(c);
    const auto bytes = serialize_container(c);
    return parse_container(bytes.data(), bytes.size(), "bad.solar");
  };
  EXPECT_SOLAR_ERROR(parse_with([&](Container& c) { c.passthrough_layers[key] = 9; }), ErrorKind::Format, "layer 9 does not exist");
  EXPECT_SOLAR_ERROR(parse_with([&](Container& c) { c.passthrough[0].second.shape = {5, 3}; }), ErrorKind::Format, "shape");
  EXPECT_SOLAR_ERROR(parse_with([&](Container& c) { c.passthrough[0].second.dtype = DType::I32; }), ErrorKind::Format, "shape");
  EXPECT_SOLAR_ERROR(parse_with([&](Container& c) { c.layers[4].mode = "paper"; }), ErrorKind::Format, "mode spectral");
  EXPECT_SOLAR_ERROR(parse_with([&](Container& c) {
                       c.passthrough.emplace_back("base_model.model.twin.weight", c.passthrough[0].second);
                       c.passthrough_layers["base_model.model.twin.weight"] = 4;
                     }),
                     ErrorKind::Format, "already codes");
  EXPECT_SOLAR_ERROR(parse_with([&](Container& c) { c.passthrough.push_back(c.passthrough[1]); }), ErrorKind::Format, "listed twice");
  // Older versions cannot say it: the writer refuses, and so does a reader of a relabelled file.
  Container c = good;
  c.version = 5;
  EXPECT_SOLAR_ERROR(serialize_container(c), ErrorKind::InvalidInput, "version 6");
  const auto bytes = relabelled(serialize_container(good), 5);
  EXPECT_SOLAR_ERROR(parse_container(bytes.data(), bytes.size(), "v5.solar"), ErrorKind::Format, "version 6");
}

// A v6 file written by hand: uncompressed metadata `meta` and payload, valid sizes and checksum.
std::vector<uint8_t> handmade_v6(const nlohmann::json& meta, const std::vector<uint8_t>& payload) {
  const std::string text = meta.dump();
  std::vector<uint8_t> out{0x89, 'S', 'L', 'R', 6, 0};
  for (uint64_t v : {uint64_t{text.size()}, uint64_t{text.size()}, uint64_t{payload.size()}, uint64_t{payload.size()}}) {
    for (; v >= 0x80; v >>= 7) out.push_back(static_cast<uint8_t>(v | 0x80));
    out.push_back(static_cast<uint8_t>(v));
  }
  out.insert(out.end(), text.begin(), text.end());
  out.insert(out.end(), payload.begin(), payload.end());
  const uint32_t sum = XXH32(out.data(), out.size(), 0);
  for (int i = 0; i < 4; ++i) out.push_back(static_cast<uint8_t>(sum >> (8 * i)));
  return out;
}

// What only a hand-written file can say: a layer-coded entry with a blob, or without its layer.
TEST(Container, HandmadeHeadEntriesAreChecked) {
  nlohmann::json meta = {{"producer", "test"}, {"seed", "0"}, {"peft_config", nlohmann::json::object()},
                         {"key_prefix", "base_model.model."}, {"file_metadata", nlohmann::json::object()},
                         {"layers", {{{"module", "head"}, {"shape", {2, 3, 2}}, {"mode", "spectral"}, {"blobs", {1}}}}}};
  const nlohmann::json entry = {{"key", "base_model.model.head.weight"}, {"dtype", "F32"}, {"shape", {2, 3}}, {"coding", "layer"}};
  auto parse = [&](const nlohmann::json& e) {
    meta["passthrough"] = {e};
    const auto bytes = handmade_v6(meta, {0});
    return parse_container(bytes.data(), bytes.size(), "hand.solar");
  };
  nlohmann::json ok = entry;
  ok["layer"] = 0;
  EXPECT_EQ(parse(ok).passthrough_layers.at("base_model.model.head.weight"), 0u);  // the helper makes valid files
  nlohmann::json with_blob = ok;
  with_blob["blob"] = 0;
  EXPECT_SOLAR_ERROR(parse(with_blob), ErrorKind::Format, "has no blob");
  EXPECT_SOLAR_ERROR(parse(entry), ErrorKind::Format, "'layer'");
  nlohmann::json negative = entry;
  negative["layer"] = -1;
  EXPECT_SOLAR_ERROR(parse(negative), ErrorKind::Format, "'layer'");
}

// A junk stream whose last layer restores a head: the head comes back whole and finite, or the
// file fails with a Format error.
TEST(Container, GarbageStreamWithAHeadLayerFailsCleanly) {
  EXPECT_GT(garbage_stream_errors(spectral_container_v6()), 0u);
}

// What `--passthrough spectral` codes as a layer, and what it leaves to int8 rows or exact.
TEST(Container, SpectralPassthroughChoosesWhatItCodes) {
  PeftAdapter a = golden_adapter_v5();
  a.passthrough.emplace_back("base_model.model.wide.weight", philox_tensor(2029, 0, 0, 70, 80, DType::F32));  // rank 70 > 64
  CompressOptions o;
  o.mode = "spectral";
  o.passthrough = "spectral";
  o.threads = 1;
  // A tall F16 tensor of 3 dimensions (R = 70 > C = 3 x 2: B is the tensor, A = I).
  Tensor tall = philox_tensor(2029, 0, 1, 70, 6, DType::F16);
  tall.shape = {70, 3, 2};
  a.passthrough.emplace_back("base_model.model.tall.weight", tall);
  o.target_error = 0.02;
  const Container c = compress_adapter(a, InMemoryWeights("<none>"), o);
  EXPECT_EQ(c.passthrough_layers.size(), 2u);
  EXPECT_TRUE(c.passthrough_layers.contains("base_model.model.head.weight"));
  EXPECT_TRUE(c.passthrough_int8.contains("base_model.model.wide.weight"));
  ASSERT_EQ(c.layers.size(), 6u);
  EXPECT_EQ(c.layers[5].module, "tall");
  EXPECT_EQ(c.layers[5].shape.m, 70);
  EXPECT_EQ(c.layers[5].shape.n, 6);
  EXPECT_EQ(c.layers[5].shape.r, 6);
  const auto bytes = serialize_container(c);
  const PeftAdapter back = decompress_container(parse_container(bytes.data(), bytes.size(), "t.solar"), InMemoryWeights("<none>"));
  const Tensor& got = back.passthrough.back().second;
  EXPECT_EQ(got.dtype, DType::F16);
  EXPECT_EQ(got.shape, tall.shape);
  const std::vector<float> x = tall.to_f32(), y = got.to_f32();
  double err = 0, norm = 0;
  for (size_t i = 0; i < x.size(); ++i) {
    err += std::pow(x[i] - y[i], 2);
    norm += std::pow(x[i], 2);
  }
  EXPECT_LT(std::sqrt(err / norm), 0.1);  // planned at a relative error of 0.02 overall
  // Calibration statistics without the head's: it falls back to int8 rows, with a warning.
  InMemoryWeights stats("stats.safetensors");
  std::vector<Tensor> keep;
  keep.reserve(a.modules.size());  // the views point into these
  for (const auto& m : a.modules) {
    const int64_t n = m.A.shape[1];
    std::vector<float> eye(static_cast<size_t>(n * n), 0.0f);
    for (int64_t i = 0; i < n; ++i) eye[static_cast<size_t>(i * n + i)] = 1.0f;
    keep.push_back(Tensor::from_f32(eye, {n, n}, DType::F32));
    stats.add(m.path + ".input_moment", TensorView{keep.back().dtype, keep.back().shape, keep.back().data.data(), keep.back().data.size()});
  }
  std::string warned;
  o.calibration = &stats;
  o.warn = [&](const std::string& m) { warned += m; };
  const Container cal = compress_adapter(a, InMemoryWeights("<none>"), o);
  EXPECT_TRUE(cal.passthrough_layers.empty());
  EXPECT_TRUE(cal.passthrough_int8.contains("base_model.model.head.weight"));
  EXPECT_NE(warned.find("'head'"), std::string::npos) << warned;
  o.calibration = nullptr;
  o.mode = "paper";
  EXPECT_SOLAR_ERROR(compress_adapter(a, InMemoryWeights("<none>"), o), ErrorKind::InvalidInput, "needs mode spectral");
}

// This build (v7) writes the v6 writer's golden file again, but for the version byte: an adapter
// without DoRA magnitudes is coded as before, plan included.
TEST(Container, V7WithoutMagnitudesIsV6ButForTheVersionByte) {
  const Container c = spectral_container_v6();
  EXPECT_EQ(c.version, 7u);
  EXPECT_EQ(serialize_container(c), relabelled(bytes_of(kGoldenV6), 7));
}

// What restoring a file reads, as inspect reports it.
TEST(Container, SizeReportSaysWhenRestoringNeedsTheBase) {
  const auto needs = [](const std::string& file) {
    const auto bytes = test::read_bytes(SOLAR_SOURCE_DIR "/tests/fixtures/" + file);
    return size_report(parse_container(bytes.data(), bytes.size(), file), bytes).needs_base;
  };
  EXPECT_EQ(needs("golden_v6_spectral.solar"), "");
  EXPECT_EQ(needs("golden_v1.solar"), "paper layers");
  EXPECT_EQ(needs("golden_v7_spectral.solar"), "DoRA magnitudes");
}

// Format v7: the v6 adapter with DoRA magnitudes on two layers, against a base of Philox
// weights (seed 2029): layers.0.attn.q's moved by training-sized amounts (coded with a residual),
// in BF16; layers.1.attn.v's left at W's row norms (step code 0).
std::vector<std::pair<std::string, Tensor>> golden_base_v7_tensors() {
  std::vector<std::pair<std::string, Tensor>> t;
  for (uint32_t layer = 0; layer < 2; ++layer)
    for (const auto& [name, m] : {std::pair{"q", 24}, std::pair{"v", 12}})
      t.emplace_back("layers." + std::to_string(layer) + ".attn." + name + ".weight",
                     philox_tensor(2029, 2 * layer + (name[0] == 'v' ? 1u : 0u), 0, m, 16, DType::F32));
  return t;
}

PeftAdapter golden_adapter_v7() {
  PeftAdapter a = golden_adapter_v5();
  const auto base = golden_base_v7_tensors();
  const auto norms = [&](size_t i) { return row_norms(base[i].second.to_f32(), base[i].second.shape[0], 16); };
  std::vector<double> q = norms(0);
  std::vector<float> moved(24), noise(24);
  philox_normals(2030, 0, 0, 0, 0, noise.size(), noise.data());
  for (size_t i = 0; i < moved.size(); ++i) moved[i] = static_cast<float>(q[i] * (1.0 + 0.2 * noise[i]));
  a.passthrough.emplace_back("base_model.model.layers.0.attn.q.lora_magnitude_vector", Tensor::from_f32(moved, {24}, DType::BF16));
  std::vector<float> at_init;
  for (double x : norms(3)) at_init.push_back(static_cast<float>(x));
  a.passthrough.emplace_back("base_model.model.layers.1.attn.v.lora_magnitude_vector", Tensor::from_f32(at_init, {12}, DType::F32));
  return a;
}

Container spectral_container_v7(const WeightSource& base) {
  CompressOptions o;
  o.mode = "spectral";
  o.target_error = 0.03;  // the q magnitude's residual is 0.5% of its module's energy
  o.quantiser = "dependent";
  o.passthrough = "spectral";
  o.threads = 1;
  return compress_adapter(golden_adapter_v7(), base, o);
}

TEST(Container, GoldenV7MagnitudesStillDecode) {
  const Container c = parse_golden_spectral(kGoldenV7);
  EXPECT_EQ(c.version, 7u);
  ASSERT_EQ(c.passthrough_magnitude.size(), 2u);
  const MagnitudeCode& q0 = c.passthrough_magnitude.at("base_model.model.layers.0.attn.q.lora_magnitude_vector");
  const MagnitudeCode& v1 = c.passthrough_magnitude.at("base_model.model.layers.1.attn.v.lora_magnitude_vector");
  EXPECT_GT(q0.step_code, 0);
  EXPECT_EQ(v1.step_code, 0);
  EXPECT_EQ(c.layers[q0.layer].module, "layers.0.attn.q");
  EXPECT_EQ(c.layers[v1.layer].module, "layers.1.attn.v");
  EXPECT_EQ(c.passthrough_layers.size(), 1u);  // the v6 head, still a layer of the stream
  const Checkpoint base(kGoldenV7 + "_base.safetensors");
  const PeftAdapter restored = decompress_container(c, base);
  expect_golden_factors(restored, kGoldenV7 + "_spectral_expected.safetensors", 4);
  const SafetensorsFile expected(kGoldenV7 + "_spectral_expected.safetensors");
  ASSERT_EQ(restored.passthrough.size(), 4u);
  EXPECT_EQ(restored.passthrough[0].second.data, expected.get("P0").copy().data);
  EXPECT_EQ(restored.passthrough[2].second.data, expected.get("M0").copy().data);
  EXPECT_EQ(restored.passthrough[3].second.data, expected.get("M1").copy().data);
  EXPECT_EQ(restored.passthrough[2].second.dtype, DType::BF16);
  EXPECT_EQ(serialize_container(c), bytes_of(kGoldenV7));
  // The magnitudes need the base: none, or another one, is refused by name.
  EXPECT_SOLAR_ERROR(decompress_container(c, InMemoryWeights("<none>")), ErrorKind::Mismatch,
                     "needed by the DoRA magnitude of module layers.0.attn.q");
  auto other = golden_base_v7_tensors();
  other[0].second = philox_tensor(7, 0, 0, 24, 16, DType::F32);
  InMemoryWeights wrong("wrong base");
  for (const auto& [k, t] : other) wrong.add(k, TensorView{t.dtype, t.shape, t.data.data(), t.data.size()});
  EXPECT_SOLAR_ERROR(decompress_container(c, wrong), ErrorKind::Mismatch, "differs from the base");
}

// A coded magnitude lands within half a step of the original, costs less than the exact vector,
// and its layer's record names the W it was coded against.
TEST(Container, DoraMagnitudesCodedAgainstTheBase) {
  const auto tensors = golden_base_v7_tensors();
  InMemoryWeights base("base");
  for (const auto& [k, t] : tensors) base.add(k, TensorView{t.dtype, t.shape, t.data.data(), t.data.size()});
  const PeftAdapter a = golden_adapter_v7();
  CompressOptions o;
  o.mode = "spectral";
  o.target_error = 0.01;
  o.threads = 1;
  const Container c = compress_adapter(a, base, o);
  const auto bytes = serialize_container(c);
  const PeftAdapter back = decompress_container(parse_container(bytes.data(), bytes.size(), "c"), base);
  const MagnitudeCode& code = c.passthrough_magnitude.at(a.passthrough[2].first);
  ASSERT_GT(code.step_code, 0);
  const std::vector<float> want = a.passthrough[2].second.to_f32(), got = back.passthrough[2].second.to_f32();
  for (size_t i = 0; i < want.size(); ++i) EXPECT_LE(std::fabs(got[i] - want[i]), 0.5 * step_of_code(code.step_code) * (1 + 1e-6)) << i;
  EXPECT_EQ(c.layers[code.layer].base_key, "layers.0.attn.q.weight");
  EXPECT_NE(c.layers[code.layer].base_fingerprint, 0u);
  // The same file with the magnitudes verbatim is larger; without a base they stay verbatim.
  o.dora_magnitudes = "exact";
  const Container exact = compress_adapter(a, base, o);
  EXPECT_TRUE(exact.passthrough_magnitude.empty());
  EXPECT_GT(serialize_container(exact).size(), bytes.size());
  o.dora_magnitudes = "coded";
  std::string warned;
  o.warn = [&](const std::string& m) { warned += m; };
  const Container no_base = compress_adapter(a, InMemoryWeights("<none>"), o);
  EXPECT_TRUE(no_base.passthrough_magnitude.empty());
  EXPECT_NE(warned.find("2 DoRA magnitude vector(s) stored exactly"), std::string::npos) << warned;
  o.dora_magnitudes = "fp8";
  EXPECT_SOLAR_ERROR(compress_adapter(a, base, o), ErrorKind::InvalidInput, "unknown DoRA magnitude coding");
  // The paper's mode plans no budget: its magnitudes stay exact, and it says so.
  o.dora_magnitudes = "coded";
  o.mode = "paper";
  o.paper.pool_a = o.paper.pool_b = 40;
  warned.clear();
  EXPECT_TRUE(compress_adapter(a, base, o).passthrough_magnitude.empty());
  EXPECT_NE(warned.find("mode paper does not plan them"), std::string::npos) << warned;
}

// A tighter target spends more on the magnitude: its error falls as the plan's does.
TEST(Container, DoraMagnitudeStepFollowsTheTarget) {
  const auto tensors = golden_base_v7_tensors();
  InMemoryWeights base("base");
  for (const auto& [k, t] : tensors) base.add(k, TensorView{t.dtype, t.shape, t.data.data(), t.data.size()});
  const PeftAdapter a = golden_adapter_v7();
  const std::string key = a.passthrough[2].first;
  int previous = 256;
  for (double target : {0.3, 0.1, 0.03, 0.01}) {
    CompressOptions o;
    o.mode = "spectral";
    o.target_error = target;
    o.threads = 1;
    const int t = compress_adapter(a, base, o).passthrough_magnitude.at(key).step_code;
    if (t > 0) EXPECT_LT(t, previous) << target;
    previous = t > 0 ? t : previous;
  }
  EXPECT_LT(previous, 256) << "no target coded the residual";
}

// Malformed v7 entries are refused with the tensor named.
TEST(Container, MalformedMagnitudeEntriesAreRefused) {
  const auto bytes = bytes_of(kGoldenV7);
  const Container c = parse_container(bytes.data(), bytes.size(), "v7");
  Container older = c;
  older.version = 6;
  EXPECT_SOLAR_ERROR(serialize_container(older), ErrorKind::InvalidInput, "need format version 7");
  EXPECT_SOLAR_ERROR(parse_container(relabelled(bytes, 6).data(), bytes.size(), "v6"), ErrorKind::Format,
                     "'magnitude' needs format version 7");
  Container twice = c;
  twice.passthrough.push_back({"base_model.model.copy.lora_magnitude_vector", c.passthrough[3].second});
  twice.passthrough_magnitude["base_model.model.copy.lora_magnitude_vector"] = c.passthrough_magnitude.at(c.passthrough[3].first);
  const auto twice_bytes = serialize_container(twice);
  EXPECT_SOLAR_ERROR(parse_container(twice_bytes.data(), twice_bytes.size(), "t"), ErrorKind::Format, "already predicts magnitude");
  Container no_base = c;
  for (auto& l : no_base.layers) l.base_key.clear();
  const auto nb = serialize_container(no_base);
  EXPECT_SOLAR_ERROR(parse_container(nb.data(), nb.size(), "nb"), ErrorKind::Format, "names no base weight");
}

// Run with --gtest_also_run_disabled_tests --gtest_filter='*Regenerate*' only when the format
// version changes. The v1 to v6 files are frozen (this build writes v7).
TEST(Container, DISABLED_RegenerateGoldenFiles) {
  const auto tensors = golden_base_v7_tensors();
  write_safetensors(kGoldenV7 + "_base.safetensors", tensors);
  const Checkpoint base(kGoldenV7 + "_base.safetensors");
  const Container c = spectral_container_v7(base);
  write_container(kGoldenV7 + "_spectral.solar", c);
  const PeftAdapter r = decompress_container(c, base);
  std::vector<std::pair<std::string, Tensor>> t;
  for (size_t i = 0; i < r.modules.size(); ++i) {
    t.emplace_back("A" + std::to_string(i), r.modules[i].A);
    t.emplace_back("B" + std::to_string(i), r.modules[i].B);
  }
  t.emplace_back("P0", r.passthrough[0].second);
  t.emplace_back("M0", r.passthrough[2].second);
  t.emplace_back("M1", r.passthrough[3].second);
  write_safetensors(kGoldenV7 + "_spectral_expected.safetensors", t);
}

}  // namespace
}  // namespace solar
