#include "solar/weights.hpp"

#include "solar/checkpoint.hpp"
#include "solar/error.hpp"
#include "test_support.hpp"

using namespace solar;

namespace {

// Keeps the tensors alive for the views.
struct Fixture {
  std::vector<Tensor> store;
  InMemoryWeights w{"<test weights>"};
  explicit Fixture(const std::vector<std::string>& names) {
    store.reserve(names.size());
    for (const auto& n : names) {
      store.push_back(test::random_tensor({2, 2}, store.size() + 1));
      const Tensor& t = store.back();
      w.add(n, TensorView{t.dtype, t.shape, t.data.data(), t.data.size()});
    }
  }
};

TEST(InMemoryWeights, NamesGetContains) {
  Fixture f({"b.weight", "a.weight"});
  EXPECT_EQ(f.w.names(), (std::vector<std::string>{"a.weight", "b.weight"}));
  EXPECT_TRUE(f.w.contains("a.weight"));
  EXPECT_EQ(f.w.get("b.weight").data, f.store[0].data.data());
  EXPECT_EQ(f.w.describe(), "<test weights>");
  EXPECT_SOLAR_ERROR(f.w.get("c.weight"), ErrorKind::Mismatch, "no tensor 'c.weight'");
  EXPECT_SOLAR_ERROR(f.w.get("c.weight"), ErrorKind::Mismatch, "<test weights>");
}

TEST(ResolveBaseKey, Exact) {
  Fixture f({"model.layers.0.q_proj.weight", "layers.0.q_proj.weight"});
  EXPECT_EQ(resolve_base_key(f.w, "model.layers.0.q_proj"), "model.layers.0.q_proj.weight");
  EXPECT_EQ(resolve_base_key(f.w, "layers.0.q_proj"), "layers.0.q_proj.weight");
}

TEST(ResolveBaseKey, LeadingWrapperStripped) {
  Fixture f({"encoder.layer.0.attention.self.query.weight", "embeddings.word_embeddings.weight"});
  EXPECT_EQ(resolve_base_key(f.w, "bert.encoder.layer.0.attention.self.query"),
            "encoder.layer.0.attention.self.query.weight");
  EXPECT_EQ(resolve_base_key(f.w, "base.bert.encoder.layer.0.attention.self.query"),
            "encoder.layer.0.attention.self.query.weight");
}

TEST(ResolveBaseKey, UniqueSuffixMatch) {
  Fixture f({"transformer.h.0.attn.c_attn.weight", "transformer.h.1.attn.c_attn.weight"});
  EXPECT_EQ(resolve_base_key(f.w, "h.0.attn.c_attn"), "transformer.h.0.attn.c_attn.weight");
}

TEST(ResolveBaseKey, AmbiguousSuffixIsMismatch) {
  Fixture f({"encoder.block.0.q.weight", "decoder.block.0.q.weight"});
  EXPECT_SOLAR_ERROR(resolve_base_key(f.w, "block.0.q"), ErrorKind::Mismatch, "ambiguous");
  EXPECT_SOLAR_ERROR(resolve_base_key(f.w, "block.0.q"), ErrorKind::Mismatch, "block.0.q");
}

TEST(ResolveBaseKey, NoneIsMismatchNamingModuleAndTriedKeys) {
  Fixture f({"layers.0.wq.weight"});
  try {
    resolve_base_key(f.w, "model.layers.0.wk");
    ADD_FAILURE();
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::Mismatch);
    const std::string w = e.what();
    EXPECT_NE(w.find("module 'model.layers.0.wk'"), std::string::npos) << w;
    EXPECT_NE(w.find("'model.layers.0.wk.weight'"), std::string::npos) << w;
    EXPECT_NE(w.find("'layers.0.wk.weight'"), std::string::npos) << w;
    EXPECT_NE(w.find("'.model.layers.0.wk.weight'"), std::string::npos) << w;
    EXPECT_NE(w.find("<test weights>"), std::string::npos) << w;
  }
}

TEST(ResolveBaseKey, RealCheckpointIfPresent) {
  const std::string dir = test::shared_data_dir();
  if (dir.empty()) GTEST_SKIP() << "shared data not found (../shared/data)";
  Checkpoint c(dir + "/models/stories260K/stories260K.safetensors");
  EXPECT_EQ(resolve_base_key(c, "layers.2.attention.wv"), "layers.2.attention.wv.weight");
  EXPECT_EQ(resolve_base_key(c, "model.layers.2.attention.wv"), "layers.2.attention.wv.weight");
}

}  // namespace
