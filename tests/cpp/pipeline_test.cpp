// End-to-end compress/decompress on the real stories260K checkpoint.
#include "solar/pipeline.hpp"

#include <cmath>
#include <filesystem>

#include <gtest/gtest.h>

#include "adapter_factory.hpp"
#include "solar/io.hpp"

namespace solar {
namespace {

class Stories : public ::testing::Test {
 protected:
  void SetUp() override {
    path_ = test::stories_checkpoint();
    if (path_.empty()) GTEST_SKIP() << "../shared/data is absent: stories260K tests need it";
    base_ = std::make_unique<Checkpoint>(path_);
  }
  std::string path_;
  std::unique_ptr<Checkpoint> base_;
};

double worst_error(const PeftAdapter& a, const PeftAdapter& b) {
  double worst = 0;
  for (size_t i = 0; i < a.modules.size(); ++i)
    worst = std::max(worst, relative_delta_error(a.modules[i].A, a.modules[i].B, b.modules[i].A, b.modules[i].B));
  return worst;
}

TEST_F(Stories, LosslessSettingIsLossless) {
  // wq is 64x64, wv 32x64: with r = 4 the larger factor has 256 entries; a pool twice that,
  // all kept at 32 bits, must reproduce B A.
  const PeftAdapter adapter = test::stories_adapter(*base_, 4, {"wq", "wv"});
  CompressOptions o;
  o.paper.pool_a = o.paper.pool_b = 512;
  o.paper.keep_fraction = 1.0;
  o.paper.bits = 32;
  o.seed = 3;
  const Container c = compress_adapter(adapter, *base_, o);
  const auto bytes = serialize_container(c);
  const PeftAdapter back = decompress_container(parse_container(bytes.data(), bytes.size(), "mem"), *base_);
  ASSERT_EQ(back.modules.size(), 10u);
  EXPECT_LT(worst_error(adapter, back), 1e-4);
  EXPECT_EQ(back.config, adapter.config);
}

TEST_F(Stories, PaperBudgetReportsRealBytesAndError) {
  const PeftAdapter adapter = test::stories_adapter(*base_, 4, {"wq", "wv"});
  CompressOptions o;
  o.paper.pool_a = o.paper.pool_b = 100;
  o.paper.keep_fraction = 0.3;
  o.paper.bits = 8;
  const Container c = compress_adapter(adapter, *base_, o);
  const auto bytes = serialize_container(c);
  const SizeReport r = size_report(c, bytes);
  EXPECT_EQ(r.file_bytes, bytes.size());
  EXPECT_EQ(r.header_bytes + r.metadata_bytes + r.payload_bytes, bytes.size());
  EXPECT_LT(r.file_bytes, r.peft_fp16_bytes);
  const PeftAdapter back = decompress_container(c, *base_);
  const double err = worst_error(adapter, back);
  // 30 of 100 coefficients for a 256-entry factor cannot be exact; the error is reported, not hidden.
  EXPECT_GT(err, 0.1);
  EXPECT_TRUE(std::isfinite(err));
}

TEST_F(Stories, OutputIsByteIdenticalWhateverTheThreadCount) {
  const PeftAdapter adapter = test::stories_adapter(*base_, 2, {"wq", "wk", "wv"});
  std::vector<std::vector<uint8_t>> outs;
  for (int threads : {1, 2, 3}) {
    CompressOptions o;
    o.paper.pool_a = o.paper.pool_b = 150;
    o.seed = 11;
    o.threads = threads;
    outs.push_back(serialize_container(compress_adapter(adapter, *base_, o)));
  }
  EXPECT_EQ(outs[0], outs[1]);
  EXPECT_EQ(outs[0], outs[2]);
}

TEST_F(Stories, DecodingAgainstAnotherBaseFailsLoudly) {
  const PeftAdapter adapter = test::stories_adapter(*base_, 2, {"wq"}, 1, DType::F32, 2);
  CompressOptions o;
  o.paper.pool_a = o.paper.pool_b = 50;
  const Container c = compress_adapter(adapter, *base_, o);
  // A copy of the checkpoint with one weight nudged by one float32 ulp.
  test::TempDir dir;
  std::vector<std::pair<std::string, Tensor>> tensors;
  for (const auto& name : base_->names()) {
    Tensor t = base_->get(name).copy();
    if (name == "layers.1.attention.wq.weight") {
      auto v = t.to_f32();
      v[5] = std::nextafter(v[5], 1e9f);
      t = Tensor::from_f32(v, t.shape, t.dtype);
    }
    tensors.emplace_back(name, std::move(t));
  }
  write_safetensors(dir.file("other.safetensors"), tensors);
  const Checkpoint other(dir.file("other.safetensors"));
  EXPECT_SOLAR_ERROR(decompress_container(c, other), ErrorKind::Mismatch, "layers.1.attention.wq.weight");
}

TEST_F(Stories, DecodingFindsTheSameWeightsUnderOtherNames) {
  // Compressed against the checkpoint, restored against the model's own state dict, whose keys
  // carry a wrapper prefix (e.g. "model."): the module is looked up as compress does, and the
  // fingerprint still decides whether it is the same W.
  const PeftAdapter adapter = test::stories_adapter(*base_, 2, {"wq"}, 1, DType::F32, 2);
  CompressOptions o;
  o.paper.pool_a = o.paper.pool_b = 50;
  const Container c = compress_adapter(adapter, *base_, o);
  const PeftAdapter expected = decompress_container(c, *base_);
  InMemoryWeights renamed("<renamed>");
  for (const auto& name : base_->names()) renamed.add("model." + name, base_->get(name));
  const PeftAdapter back = decompress_container(c, renamed);
  ASSERT_EQ(back.modules.size(), expected.modules.size());
  for (size_t i = 0; i < back.modules.size(); ++i) {
    EXPECT_EQ(back.modules[i].A.data, expected.modules[i].A.data);
    EXPECT_EQ(back.modules[i].B.data, expected.modules[i].B.data);
  }
  // Under another name *and* different: refused, naming the tensor it compared.
  std::vector<float> nudged = base_->get("layers.1.attention.wq.weight").to_f32();
  nudged[5] = std::nextafter(nudged[5], 1e9f);
  InMemoryWeights other("<other>");
  for (const auto& name : base_->names())
    if (name != "layers.1.attention.wq.weight") other.add("model." + name, base_->get(name));
  const TensorView w = base_->get("layers.1.attention.wq.weight");
  other.add("model.layers.1.attention.wq.weight",
            TensorView{DType::F32, w.shape, reinterpret_cast<const uint8_t*>(nudged.data()), nudged.size() * 4});
  EXPECT_SOLAR_ERROR(decompress_container(c, other), ErrorKind::Mismatch, "model.layers.1.attention.wq.weight");
  // Absent altogether: the message names the key the file recorded.
  InMemoryWeights empty("<empty>");
  EXPECT_SOLAR_ERROR(decompress_container(c, empty), ErrorKind::Mismatch, "layers.0.attention.wq.weight");
}

TEST_F(Stories, ModulesMissingFromTheBaseAreNamed) {
  PeftAdapter adapter = test::stories_adapter(*base_, 2, {"wq"}, 1, DType::F32, 1);
  adapter.modules[0].path = "layers.9.attention.wq";
  EXPECT_SOLAR_ERROR(compress_adapter(adapter, *base_, {}), ErrorKind::Mismatch, "layers.9.attention.wq");
}

TEST_F(Stories, ShapeMismatchIsNamed) {
  PeftAdapter adapter = test::stories_adapter(*base_, 2, {"wq"}, 1, DType::F32, 1);
  adapter.modules[0].path = "layers.0.attention.wv";  // 32 x 64, LoRA is 64 x 64
  EXPECT_SOLAR_ERROR(compress_adapter(adapter, *base_, {}), ErrorKind::Mismatch, "64x64");
}

TEST_F(Stories, HalfPrecisionAdaptersRestoreInTheirDtype) {
  const PeftAdapter adapter = test::stories_adapter(*base_, 4, {"wv"}, 5, DType::BF16, 2);
  CompressOptions o;
  o.paper.pool_a = o.paper.pool_b = 600;
  o.paper.keep_fraction = 1.0;
  o.paper.bits = 32;
  const PeftAdapter back = decompress_container(compress_adapter(adapter, *base_, o), *base_);
  EXPECT_EQ(back.modules[0].A.dtype, DType::BF16);
  EXPECT_LT(worst_error(adapter, back), 1e-2);  // bf16 rounding of the restored factors
}

TEST_F(Stories, RealTrainedAdapterRoundTrips) {
  const std::string dir = SOLAR_SOURCE_DIR "/tests/fixtures/stories260k_lora_r4";
  const PeftAdapter adapter = read_peft_adapter(dir);
  ASSERT_FALSE(adapter.modules.empty());
  CompressOptions o;
  o.paper.pool_a = o.paper.pool_b = 600;
  o.paper.keep_fraction = 1.0;
  o.paper.bits = 32;
  const PeftAdapter back = decompress_container(compress_adapter(adapter, *base_, o), *base_);
  EXPECT_LT(worst_error(adapter, back), 1e-4);
}

// An encoder that chooses the integers itself (solar.polish) re-codes the stream from them: the
// same symbols give the same bytes, a changed integer decodes as changed, and symbols that break
// the syntax are refused, naming the problem.
TEST(Pipeline, StreamsAreReCodedFromGivenSymbols) {
  const PeftAdapter adapter = read_peft_adapter(SOLAR_SOURCE_DIR "/tests/fixtures/stories260k_lora_r4");
  CompressOptions o;
  o.mode = "spectral";
  o.target_bytes = 1500;
  const Container c = compress_adapter(adapter, InMemoryWeights(), o);
  const std::vector<uint8_t> bytes = serialize_container(c);
  std::vector<std::vector<int32_t>> sym = stream_symbols(c);
  ASSERT_EQ(sym.size(), c.layers.size());
  EXPECT_EQ(serialize_container(with_stream_symbols(c, sym)), bytes);

  // Layer 0's first X integer (symbols: k, tx, ty, D, X column by column, then Y): one step more.
  ASSERT_GT(sym[0].size(), 4u);
  ASSERT_EQ(sym[0][3], 0) << "a uniform-quantiser layer: its level is its integer";
  const int64_t m = c.layers[0].shape.m;
  size_t at = 4;
  while (at < 4 + static_cast<size_t>(m) && sym[0][at] == 0) ++at;  // the column's leading integer, positive
  ASSERT_LT(at, 4u + static_cast<size_t>(m));
  const std::vector<std::vector<int32_t>> before = sym;
  sym[0][at] += 1;
  const Container changed = with_stream_symbols(c, sym);
  const auto changed_bytes = serialize_container(changed);
  const Container parsed = parse_container(changed_bytes.data(), changed_bytes.size(), "mem");
  EXPECT_EQ(stream_symbols(parsed), sym);
  const PeftAdapter a = decompress_container(c, InMemoryWeights());
  const PeftAdapter b = decompress_container(parsed, InMemoryWeights());
  const std::vector<float> b0 = a.modules[0].B.to_f32(), b1 = b.modules[0].B.to_f32();
  const double step = std::pow(2.0, (sym[0][1] - 200) / 8.0);
  const size_t row = at - 4;  // B~[:, 0] = step(tx) X[:, 0]; B is m x r, row-major
  EXPECT_NEAR(b1[row * c.layers[0].shape.r] - b0[row * c.layers[0].shape.r], step, 1e-6 * std::max(1.0, step));
  for (size_t i = 1; i < a.modules.size(); ++i) EXPECT_EQ(a.modules[i].A.data, b.modules[i].A.data);

  auto refused = [&](std::vector<std::vector<int32_t>> s, const std::string& what) {
    EXPECT_SOLAR_ERROR(with_stream_symbols(c, s), ErrorKind::InvalidInput, what);
  };
  auto s = before;
  s[0][at] = -s[0][at];  // the leading integer's sign is not coded: it must be positive
  refused(s, "first non-zero integer must be positive");
  s = before;
  s[0].pop_back();
  refused(s, "do not match the layer's shape");
  s = before;
  s[0][1] = 256;
  refused(s, "step codes");
  s = before;
  s[0].back() = 1 << 30;
  refused(s, "out of the coder's range");
  s = before;
  s.pop_back();
  refused(s, "symbol lists for");
  Container old = c;
  old.version = 6;
  EXPECT_SOLAR_ERROR(with_stream_symbols(old, before), ErrorKind::InvalidInput, "version 6");
}

// PEFT takes the first rank_pattern / alpha_pattern key that matches, in the file's order; a
// hand-written config whose keys are not sorted must come back in its own order, or the restored
// adapter would scale its modules differently (here layers.0's wq: alpha 2 by "wq", not 5).
TEST(Pipeline, AdapterConfigKeepsItsKeyOrderThroughTheFile) {
  const std::string fixture = SOLAR_SOURCE_DIR "/tests/fixtures/stories260k_lora_r4";
  const test::TempDir dir;
  std::filesystem::create_directory(dir.file("in"));
  std::filesystem::copy_file(fixture + "/adapter_model.safetensors", dir.file("in/adapter_model.safetensors"));
  nlohmann::ordered_json cfg = nlohmann::ordered_json::parse(read_text_file(fixture + "/adapter_config.json"));
  cfg["alpha_pattern"] = nlohmann::ordered_json::parse(R"({"wq": 2, "layers.0.attention.wq": 5})");
  test::write_text(dir.file("in/adapter_config.json"), cfg.dump(2));
  const PeftAdapter original = read_peft_adapter(dir.file("in"));
  ASSERT_EQ(original.modules[0].path, "layers.0.attention.wq");
  EXPECT_DOUBLE_EQ(original.modules[0].scaling, 2.0 / 4);

  CompressOptions o;
  o.mode = "spectral";
  const auto bytes = serialize_container(compress_adapter(original, InMemoryWeights(), o));
  const PeftAdapter back = decompress_container(parse_container(bytes.data(), bytes.size(), "o.solar"), InMemoryWeights());
  EXPECT_EQ(back.config.dump(), original.config.dump());  // same keys, same order
  for (size_t i = 0; i < back.modules.size(); ++i) {
    EXPECT_EQ(back.modules[i].alpha, original.modules[i].alpha) << back.modules[i].path;
    EXPECT_EQ(back.modules[i].scaling, original.modules[i].scaling) << back.modules[i].path;
  }
  write_peft_adapter(dir.file("out"), back);
  const PeftAdapter reread = read_peft_adapter(dir.file("out"));
  EXPECT_DOUBLE_EQ(reread.modules[0].scaling, 2.0 / 4);
  const std::string text = read_text_file(dir.file("out/adapter_config.json"));
  EXPECT_LT(text.find("\"wq\": 2"), text.find("\"layers.0.attention.wq\": 5")) << text;
}

}  // namespace
}  // namespace solar
