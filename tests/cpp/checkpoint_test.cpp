#include "solar/checkpoint.hpp"

#include <filesystem>

#include <nlohmann/json.hpp>

#include "solar/error.hpp"
#include "test_support.hpp"

using namespace solar;
using solar::test::TempDir;
namespace fs = std::filesystem;

namespace {

std::vector<std::pair<std::string, Tensor>> some_tensors(uint64_t seed, const std::string& stem) {
  return {{stem + ".q.weight", test::random_tensor({4, 3}, seed, DType::F32)},
          {stem + ".k.weight", test::random_tensor({4, 3}, seed + 1, DType::BF16)}};
}

void expect_same(const Checkpoint& c, const std::vector<std::pair<std::string, Tensor>>& tensors) {
  for (const auto& [n, t] : tensors) {
    ASSERT_TRUE(c.contains(n)) << n;
    EXPECT_EQ(c.get(n).copy().data, t.data) << n;
    EXPECT_EQ(c.get(n).shape, t.shape) << n;
  }
}

TEST(Checkpoint, SingleFile) {
  TempDir t;
  auto ts = some_tensors(1, "layer0");
  write_safetensors(t.file("w.safetensors"), ts);
  Checkpoint c(t.file("w.safetensors"));
  EXPECT_EQ(c.path(), t.file("w.safetensors"));
  EXPECT_EQ(c.describe(), t.file("w.safetensors"));
  EXPECT_EQ(c.names(), (std::vector<std::string>{"layer0.k.weight", "layer0.q.weight"}));
  expect_same(c, ts);
  EXPECT_EQ(c.file_of("layer0.q.weight"), t.file("w.safetensors"));
  EXPECT_FALSE(c.contains("nope"));
  try {
    c.get("nope");
    ADD_FAILURE();
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::Mismatch);
    EXPECT_EQ(e.where(), t.file("w.safetensors"));
    EXPECT_NE(std::string(e.what()).find("no tensor 'nope'"), std::string::npos);
  }
  EXPECT_SOLAR_ERROR(c.file_of("nope"), ErrorKind::Mismatch, "nope");
}

TEST(Checkpoint, DirectoryWithModelSafetensors) {
  TempDir t;
  auto ts = some_tensors(2, "h");
  write_safetensors(t.file("model.safetensors"), ts);
  write_safetensors(t.file("other.safetensors"), some_tensors(9, "zzz"));  // ignored
  test::write_text(t.file("config.json"), "{}");
  Checkpoint c(t.path());
  EXPECT_EQ(c.names().size(), 2u);
  expect_same(c, ts);
}

TEST(Checkpoint, DirectoryWithOneOtherSafetensorsFile) {
  TempDir t;
  auto ts = some_tensors(3, "h");
  write_safetensors(t.file("pytorch_model.safetensors"), ts);
  Checkpoint c(t.path());
  expect_same(c, ts);
}

TEST(Checkpoint, DirectoryWithoutWeights) {
  TempDir t;
  test::write_text(t.file("config.json"), "{}");
  EXPECT_SOLAR_ERROR(Checkpoint c(t.path()), ErrorKind::Io,
                     "no model.safetensors or model.safetensors.index.json in directory");
  write_safetensors(t.file("a.safetensors"), some_tensors(1, "a"));
  write_safetensors(t.file("b.safetensors"), some_tensors(1, "b"));
  EXPECT_SOLAR_ERROR(Checkpoint c(t.path()), ErrorKind::Io, "no model.safetensors");
}

TEST(Checkpoint, MissingPath) {
  TempDir t;
  EXPECT_SOLAR_ERROR(Checkpoint c(t.file("nowhere")), ErrorKind::Io, t.file("nowhere"));
}

TEST(Checkpoint, ShardedIndex) {
  TempDir t;
  auto s1 = some_tensors(4, "layers.0");
  auto s2 = some_tensors(5, "layers.1");
  write_safetensors(t.file("model-00001-of-00002.safetensors"), s1);
  write_safetensors(t.file("model-00002-of-00002.safetensors"), s2);
  nlohmann::json index = {{"metadata", {{"total_size", 96}}}, {"weight_map", nlohmann::json::object()}};
  for (const auto& [n, _] : s1) index["weight_map"][n] = "model-00001-of-00002.safetensors";
  for (const auto& [n, _] : s2) index["weight_map"][n] = "model-00002-of-00002.safetensors";
  test::write_text(t.file("model.safetensors.index.json"), index.dump(2));
  Checkpoint c(t.path());
  EXPECT_EQ(c.names().size(), 4u);
  expect_same(c, s1);
  expect_same(c, s2);
  EXPECT_EQ(fs::path(c.file_of("layers.1.q.weight")).filename(), "model-00002-of-00002.safetensors");
  EXPECT_EQ(fs::path(c.file_of("layers.0.k.weight")).filename(), "model-00001-of-00002.safetensors");
}

TEST(Checkpoint, IndexReferencingMissingTensor) {
  TempDir t;
  write_safetensors(t.file("model-00001-of-00001.safetensors"), some_tensors(6, "a"));
  nlohmann::json index = {{"weight_map",
                           {{"a.q.weight", "model-00001-of-00001.safetensors"},
                            {"a.ghost.weight", "model-00001-of-00001.safetensors"}}}};
  test::write_text(t.file("model.safetensors.index.json"), index.dump());
  EXPECT_SOLAR_ERROR(Checkpoint c(t.path()), ErrorKind::Format, "a.ghost.weight");
}

TEST(Checkpoint, IndexReferencingMissingShard) {
  TempDir t;
  nlohmann::json index = {{"weight_map", {{"a.q.weight", "model-00009.safetensors"}}}};
  test::write_text(t.file("model.safetensors.index.json"), index.dump());
  EXPECT_SOLAR_ERROR(Checkpoint c(t.path()), ErrorKind::Io, "model-00009.safetensors");
}

TEST(Checkpoint, MalformedIndex) {
  TempDir t;
  test::write_text(t.file("model.safetensors.index.json"), "{\"weight_map\": [");
  EXPECT_SOLAR_ERROR(Checkpoint c(t.path()), ErrorKind::Format, "model.safetensors.index.json");
  test::write_text(t.file("model.safetensors.index.json"), "{\"metadata\": {}}");
  EXPECT_SOLAR_ERROR(Checkpoint c(t.path()), ErrorKind::Format, "weight_map");
}

TEST(Checkpoint, RealModelIfPresent) {
  const std::string dir = test::shared_data_dir();
  if (dir.empty()) GTEST_SKIP() << "shared data not found (../shared/data)";
  Checkpoint c(dir + "/models/stories260K");
  EXPECT_TRUE(c.contains("layers.4.feed_forward.w2.weight"));
  EXPECT_TRUE(c.contains("tok_embeddings.weight"));
}

}  // namespace
