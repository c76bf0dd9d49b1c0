#include "solar/peft_adapter.hpp"

#include <cmath>
#include <filesystem>
#include <limits>

#include <nlohmann/json.hpp>

#include "solar/error.hpp"
#include "solar/safetensors.hpp"
#include "test_support.hpp"

using namespace solar;
using solar::test::TempDir;
using nlohmann::json;
namespace fs = std::filesystem;

namespace {

const std::string kPrefix = "base_model.model.";

json lora_config(int r = 4, double alpha = 8.0) {
  // What PEFT's LoraConfig.save_pretrained writes (abridged).
  return json{{"peft_type", "LORA"},
              {"task_type", "CAUSAL_LM"},
              {"r", r},
              {"lora_alpha", alpha},
              {"lora_dropout", 0.0},
              {"target_modules", {"wq", "wv"}},
              {"fan_in_fan_out", false},
              {"bias", "none"},
              {"use_rslora", false},
              {"rank_pattern", json::object()},
              {"alpha_pattern", json::object()},
              {"base_model_name_or_path", "stories260K"}};
}

// Tensors in the order PEFT's save_pretrained produces (sorted keys), with modules of given ranks.
std::vector<std::pair<std::string, Tensor>> lora_tensors(const std::vector<std::pair<std::string, int>>& modules,
                                                         int64_t in = 16, int64_t out = 12, DType dt = DType::F32,
                                                         const std::string& prefix = kPrefix) {
  std::vector<std::pair<std::string, Tensor>> v;
  uint64_t seed = 100;
  for (const auto& [path, r] : modules) {
    v.emplace_back(prefix + path + ".lora_A.weight", test::random_tensor({r, in}, seed++, dt));
    v.emplace_back(prefix + path + ".lora_B.weight", test::random_tensor({out, r}, seed++, dt, 0.01f));
  }
  return v;
}

// Writes an adapter directory by hand (the PEFT layout), not through write_peft_adapter.
void write_raw_adapter(const std::string& dir, const json& config,
                       const std::vector<std::pair<std::string, Tensor>>& tensors,
                       const std::map<std::string, std::string>& meta = {{"format", "pt"}}) {
  fs::create_directories(dir);
  test::write_text(dir + "/adapter_config.json", config.dump(2));
  test::write_bytes(dir + "/adapter_model.safetensors", safetensors_bytes(tensors, meta));
}

TEST(PeftAdapter, ReadsPeftLayout) {
  TempDir t;
  auto ts = lora_tensors({{"layers.1.attention.wq", 4}, {"layers.0.attention.wq", 4}, {"layers.0.attention.wv", 4}});
  write_raw_adapter(t.path(), lora_config(4, 8.0), ts);
  PeftAdapter a = read_peft_adapter(t.path());
  EXPECT_EQ(a.key_prefix, kPrefix);
  ASSERT_EQ(a.modules.size(), 3u);
  EXPECT_EQ(a.modules[0].path, "layers.0.attention.wq");
  EXPECT_EQ(a.modules[1].path, "layers.0.attention.wv");
  EXPECT_EQ(a.modules[2].path, "layers.1.attention.wq");
  for (const auto& m : a.modules) {
    EXPECT_EQ(m.rank, 4);
    EXPECT_EQ(m.alpha, 8.0);
    EXPECT_EQ(m.scaling, 2.0);
    EXPECT_EQ(m.A.shape, (std::vector<int64_t>{4, 16}));
    EXPECT_EQ(m.B.shape, (std::vector<int64_t>{12, 4}));
  }
  EXPECT_EQ(a.modules[2].A.data, ts[0].second.data);
  EXPECT_EQ(a.modules[2].B.data, ts[1].second.data);
  EXPECT_TRUE(a.passthrough.empty());
  EXPECT_EQ(a.file_metadata, (std::map<std::string, std::string>{{"format", "pt"}}));
  EXPECT_EQ(a.config["base_model_name_or_path"], "stories260K");
  EXPECT_FALSE(a.fan_in_fan_out());
}

TEST(PeftAdapter, WriteReadRoundTripIsByteExact) {
  TempDir t;
  auto ts = lora_tensors({{"h.0.attn.c_attn", 2}, {"h.1.attn.c_attn", 2}}, 8, 24, DType::BF16);
  // Passthrough tensors of all kinds, deliberately interleaved in file order.
  Tensor emb_a = test::random_bytes_tensor({2, 50}, 7, DType::F16);
  Tensor emb_b = test::random_bytes_tensor({30, 2}, 8, DType::F16);
  Tensor mag = test::random_bytes_tensor({24}, 9, DType::F32);
  Tensor head = test::random_bytes_tensor({5, 8}, 10, DType::F32);
  ts.insert(ts.begin() + 1, {kPrefix + "wte.lora_embedding_A", emb_a});
  ts.emplace_back(kPrefix + "wte.lora_embedding_B", emb_b);
  ts.emplace_back(kPrefix + "h.0.attn.c_attn.lora_magnitude_vector", mag);
  ts.emplace_back(kPrefix + "score.modules_to_save.weight", head);
  json cfg = lora_config(2, 4.0);
  cfg["fan_in_fan_out"] = true;
  PeftAdapter a = make_peft_adapter(cfg, ts, {{"format", "pt"}}, "<mem>");
  ASSERT_EQ(a.modules.size(), 2u);
  ASSERT_EQ(a.passthrough.size(), 4u);
  EXPECT_EQ(a.passthrough[0].first, kPrefix + "wte.lora_embedding_A");
  EXPECT_EQ(a.passthrough[3].first, kPrefix + "score.modules_to_save.weight");
  EXPECT_TRUE(a.fan_in_fan_out());

  const std::string dir = t.file("out/adapter");
  write_peft_adapter(dir, a);
  EXPECT_EQ(t.list("out"), std::vector<std::string>{"adapter"});
  EXPECT_EQ(t.list("out/adapter"), (std::vector<std::string>{"adapter_config.json", "adapter_model.safetensors"}));
  EXPECT_EQ(json::parse(test::read_bytes(dir + "/adapter_config.json")), cfg);

  PeftAdapter b = read_peft_adapter(dir);
  EXPECT_EQ(b.config, a.config);
  EXPECT_EQ(b.key_prefix, a.key_prefix);
  EXPECT_EQ(b.file_metadata, a.file_metadata);
  ASSERT_EQ(b.modules.size(), a.modules.size());
  for (size_t i = 0; i < a.modules.size(); ++i) {
    EXPECT_EQ(b.modules[i].path, a.modules[i].path);
    EXPECT_EQ(b.modules[i].A.dtype, DType::BF16);
    EXPECT_EQ(b.modules[i].A.data, a.modules[i].A.data);
    EXPECT_EQ(b.modules[i].B.data, a.modules[i].B.data);
    EXPECT_EQ(b.modules[i].scaling, 2.0);
  }
  ASSERT_EQ(b.passthrough.size(), a.passthrough.size());
  for (size_t i = 0; i < a.passthrough.size(); ++i) {
    EXPECT_EQ(b.passthrough[i].first, a.passthrough[i].first);
    EXPECT_EQ(b.passthrough[i].second.dtype, a.passthrough[i].second.dtype);
    EXPECT_EQ(b.passthrough[i].second.shape, a.passthrough[i].second.shape);
    EXPECT_EQ(b.passthrough[i].second.data, a.passthrough[i].second.data);
  }
  // Writing again over the existing directory replaces it; a second read gives identical bytes.
  write_peft_adapter(dir, b);
  EXPECT_EQ(test::read_bytes(dir + "/adapter_model.safetensors"),
            safetensors_bytes(peft_tensors(a), a.file_metadata));
}

TEST(PeftAdapter, PeftTensorsOrder) {
  auto ts = lora_tensors({{"b", 1}, {"a", 1}});
  ts.insert(ts.begin(), {"extra", test::random_tensor({3}, 1)});
  PeftAdapter a = make_peft_adapter(lora_config(1, 1), ts, {}, "<mem>");
  auto out = peft_tensors(a);
  ASSERT_EQ(out.size(), 5u);
  EXPECT_EQ(out[0].first, kPrefix + "a.lora_A.weight");
  EXPECT_EQ(out[1].first, kPrefix + "a.lora_B.weight");
  EXPECT_EQ(out[2].first, kPrefix + "b.lora_A.weight");
  EXPECT_EQ(out[3].first, kPrefix + "b.lora_B.weight");
  EXPECT_EQ(out[4].first, "extra");
}

TEST(PeftAdapter, KeysWithoutThePeftPrefix) {
  auto ts = lora_tensors({{"layers.0.wq", 2}}, 4, 4, DType::F32, "");
  PeftAdapter a = make_peft_adapter(lora_config(2, 2), ts, {}, "<mem>");
  EXPECT_EQ(a.key_prefix, "");
  ASSERT_EQ(a.modules.size(), 1u);
  EXPECT_EQ(a.modules[0].path, "layers.0.wq");
  EXPECT_EQ(peft_tensors(a)[0].first, "layers.0.wq.lora_A.weight");
}

TEST(PeftAdapter, RankPatternAlphaPatternAndRslora) {
  json cfg = lora_config(4, 8.0);
  cfg["rank_pattern"] = {{"wv", 2}, {"layers\\.1\\.attention\\.wq", 8}};
  cfg["alpha_pattern"] = {{"layers.0.attention.wq", 3.0}};
  auto ts = lora_tensors({{"layers.0.attention.wq", 4}, {"layers.0.attention.wv", 2}, {"layers.1.attention.wq", 8},
                          {"layers.1.attention.wv", 2}});
  PeftAdapter a = make_peft_adapter(cfg, ts, {}, "<mem>");
  ASSERT_EQ(a.modules.size(), 4u);
  EXPECT_EQ(a.modules[0].rank, 4);
  EXPECT_EQ(a.modules[0].alpha, 3.0);
  EXPECT_DOUBLE_EQ(a.modules[0].scaling, 0.75);
  EXPECT_EQ(a.modules[1].rank, 2);
  EXPECT_DOUBLE_EQ(a.modules[1].scaling, 4.0);
  EXPECT_EQ(a.modules[2].rank, 8);
  EXPECT_DOUBLE_EQ(a.modules[2].scaling, 1.0);
  EXPECT_DOUBLE_EQ(a.modules[3].scaling, 4.0);

  cfg["use_rslora"] = true;
  PeftAdapter r = make_peft_adapter(cfg, ts, {}, "<mem>");
  EXPECT_DOUBLE_EQ(r.modules[0].scaling, 3.0 / 2.0);
  EXPECT_DOUBLE_EQ(r.modules[1].scaling, 8.0 / std::sqrt(2.0));
  EXPECT_DOUBLE_EQ(r.modules[2].scaling, 8.0 / std::sqrt(8.0));
}

TEST(PeftAdapter, RankDisagreeingWithConfigIsMismatch) {
  auto ts = lora_tensors({{"layers.0.wq", 4}});
  EXPECT_SOLAR_ERROR(make_peft_adapter(lora_config(8), ts, {}, "<mem>"), ErrorKind::Mismatch, "layers.0.wq");
  json cfg = lora_config(4);
  cfg["rank_pattern"] = {{"wq", 16}};
  EXPECT_SOLAR_ERROR(make_peft_adapter(cfg, ts, {}, "<mem>"), ErrorKind::Mismatch, "rank 16");
}

// Expected values were checked against peft 0.21.2's peft.utils.other.get_pattern_key.
TEST(MatchPattern, MirrorsPeftGetPatternKey) {
  const json p = {{"q_proj", 1},                   // plain name: matches the last component(s)
                  {"layers.0.self_attn.v_proj", 2},  // dotted suffix
                  {"^model.layers.1.*k_proj", 3},    // anchored regex
                  {"mlp\\.(up|down)_proj", 4}};      // regex alternatives
  auto val = [&](const std::string& path) -> int {
    const json* m = match_pattern(p, path);
    return m ? m->get<int>() : 0;
  };
  EXPECT_EQ(val("q_proj"), 1);
  EXPECT_EQ(val("model.layers.3.self_attn.q_proj"), 1);
  EXPECT_EQ(val("model.layers.3.self_attn.xq_proj"), 0);  // must end at a component boundary
  EXPECT_EQ(val("model.layers.0.self_attn.v_proj"), 2);
  EXPECT_EQ(val("model.layers.10.self_attn.v_proj"), 0);
  EXPECT_EQ(val("model.layers.1.self_attn.k_proj"), 3);  // "^" holds when the optional prefix is empty
  EXPECT_EQ(val("x.model.layers.1.k_proj"), 0);          // ... and only then
  EXPECT_EQ(val("model.layers.2.mlp.up_proj"), 4);
  EXPECT_EQ(val("model.layers.2.mlp.gate_proj"), 0);
  EXPECT_EQ(val("model.layers.2.mlp.up_proj.extra"), 0);
  EXPECT_EQ(match_pattern(json::object(), "a"), nullptr);
  EXPECT_EQ(match_pattern(json(nullptr), "a"), nullptr);
  // A key that is not a valid ECMAScript regex falls back to literal matching.
  const json bad = {{"a(b", 5}};
  EXPECT_NE(match_pattern(bad, "x.a(b"), nullptr);
  EXPECT_EQ(match_pattern(bad, "x.ab"), nullptr);
}

TEST(MatchPattern, FirstKeyInFileOrderWins) {
  // Python's dict keeps file order; both keys match "layers.0.wq", the first one written wins.
  TempDir t;
  auto ts = lora_tensors({{"layers.0.wq", 2}});
  fs::create_directories(t.path());
  test::write_text(t.file("adapter_config.json"),
                   R"({"peft_type": "LORA", "r": 8, "lora_alpha": 8,
                       "rank_pattern": {"wq": 2, "layers.0.wq": 4}})");
  test::write_bytes(t.file("adapter_model.safetensors"), safetensors_bytes(ts));
  PeftAdapter a = read_peft_adapter(t.path());
  EXPECT_EQ(a.modules[0].rank, 2);
  EXPECT_DOUBLE_EQ(a.modules[0].scaling, 4.0);
}

TEST(PeftAdapter, NanOrInfIsInvalidInputNamingFileAndKey) {
  TempDir t;
  auto ts = lora_tensors({{"layers.0.wq", 2}});
  std::vector<float> a = ts[0].second.to_f32();
  a[5] = std::numeric_limits<float>::quiet_NaN();
  ts[0].second = Tensor::from_f32(a, ts[0].second.shape, DType::F32);
  write_raw_adapter(t.path(), lora_config(2), ts);
  EXPECT_SOLAR_ERROR(read_peft_adapter(t.path()), ErrorKind::InvalidInput, "adapter_model.safetensors");
  EXPECT_SOLAR_ERROR(read_peft_adapter(t.path()), ErrorKind::InvalidInput, kPrefix + "layers.0.wq.lora_A.weight");

  auto ts2 = lora_tensors({{"layers.0.wq", 2}}, 16, 12, DType::F16);
  std::vector<float> b = ts2[1].second.to_f32();
  b[0] = -std::numeric_limits<float>::infinity();
  ts2[1].second = Tensor::from_f32(b, ts2[1].second.shape, DType::F16);
  EXPECT_SOLAR_ERROR(make_peft_adapter(lora_config(2), ts2, {}, "<mem>"), ErrorKind::InvalidInput, "lora_B");
}

TEST(PeftAdapter, MissingFactorIsError) {
  auto ts = lora_tensors({{"layers.0.wq", 2}, {"layers.0.wk", 2}});
  ts.pop_back();  // drop layers.0.wk's B
  try {
    make_peft_adapter(lora_config(2), ts, {}, "<mem>");
    ADD_FAILURE();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("layers.0.wk.lora_B.weight"), std::string::npos) << e.what();
  }
  auto ts2 = lora_tensors({{"layers.0.wq", 2}});
  ts2.erase(ts2.begin());  // only B
  EXPECT_THROW(make_peft_adapter(lora_config(2), ts2, {}, "<mem>"), Error);
}

TEST(PeftAdapter, ShapeAndDtypeChecks) {
  auto ts = lora_tensors({{"m", 2}});
  ts[1].second = test::random_tensor({12, 3}, 1);  // B rank 3 vs A rank 2
  EXPECT_SOLAR_ERROR(make_peft_adapter(lora_config(2), ts, {}, "<mem>"), ErrorKind::Format, "ranks differ");
  ts = lora_tensors({{"m", 2}});
  ts[0].second = test::random_tensor({2, 4, 4}, 1);
  EXPECT_SOLAR_ERROR(make_peft_adapter(lora_config(2), ts, {}, "<mem>"), ErrorKind::Format, "2-D");
  ts = lora_tensors({{"m", 2}});
  ts[0].second = test::random_bytes_tensor({2, 16}, 1, DType::I32);
  EXPECT_SOLAR_ERROR(make_peft_adapter(lora_config(2), ts, {}, "<mem>"), ErrorKind::Unsupported, "I32");
}

TEST(PeftAdapter, ConfigProblems) {
  TempDir t;
  auto ts = lora_tensors({{"m", 2}});
  json cfg = lora_config(2);
  cfg["peft_type"] = "IA3";
  EXPECT_SOLAR_ERROR(make_peft_adapter(cfg, ts, {}, "<mem>"), ErrorKind::Unsupported, "IA3");
  EXPECT_SOLAR_ERROR(make_peft_adapter(json::array(), ts, {}, "<mem>"), ErrorKind::Format, "<mem>");

  // Missing directory / config.
  EXPECT_SOLAR_ERROR(read_peft_adapter(t.file("nope")), ErrorKind::Io, "nope");
  fs::create_directories(t.file("a"));
  EXPECT_SOLAR_ERROR(read_peft_adapter(t.file("a")), ErrorKind::Io, "adapter_config.json");
  // Config not JSON.
  test::write_text(t.file("a/adapter_config.json"), "{nope");
  EXPECT_SOLAR_ERROR(read_peft_adapter(t.file("a")), ErrorKind::Format, "adapter_config.json");
  test::write_text(t.file("a/adapter_config.json"), "[1]");
  EXPECT_SOLAR_ERROR(read_peft_adapter(t.file("a")), ErrorKind::Format, "adapter_config.json");
  // No weights; then only a pickle.
  test::write_text(t.file("a/adapter_config.json"), lora_config(2).dump());
  EXPECT_SOLAR_ERROR(read_peft_adapter(t.file("a")), ErrorKind::Io, "adapter_model.safetensors");
  test::write_text(t.file("a/adapter_model.bin"), "PK\x03\x04");
  EXPECT_SOLAR_ERROR(read_peft_adapter(t.file("a")), ErrorKind::Unsupported, "safe_serialization=True");
  // A corrupt safetensors file is a Format error naming it.
  test::write_text(t.file("a/adapter_model.safetensors"), "garbage");
  EXPECT_SOLAR_ERROR(read_peft_adapter(t.file("a")), ErrorKind::Format, "adapter_model.safetensors");
}

}  // namespace
