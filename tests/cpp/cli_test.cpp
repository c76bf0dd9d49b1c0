// The solar command line as a script would use it: exit codes, one-line errors, no partial output.
#include <sys/wait.h>

#include <array>
#include <cmath>
#include <cstdio>
#include <filesystem>

#include <gtest/gtest.h>

#include "adapter_factory.hpp"
#include "solar/container.hpp"
#include "solar/pipeline.hpp"

namespace solar {
namespace {

struct CliResult {
  int code;
  std::string out, err;
};

CliResult run(const std::string& args, const test::TempDir& dir) {
  const std::string err_file = dir.file("stderr.txt");
  const std::string cmd = std::string(SOLAR_CLI_PATH) + " " + args + " 2>" + err_file;
  FILE* p = popen(cmd.c_str(), "r");
  std::string out;
  std::array<char, 4096> buf{};
  size_t n;
  while ((n = fread(buf.data(), 1, buf.size(), p)) > 0) out.append(buf.data(), n);
  const int status = pclose(p);
  const auto e = test::read_bytes(err_file);
  return {WIFEXITED(status) ? WEXITSTATUS(status) : -1, out, std::string(e.begin(), e.end())};
}

class Cli : public ::testing::Test {
 protected:
  void SetUp() override {
    base_ = test::stories_checkpoint();
    if (base_.empty()) GTEST_SKIP() << "../shared/data is absent: CLI tests use stories260K";
    const Checkpoint ck(base_);
    write_peft_adapter(dir_.file("adapter"), test::stories_adapter(ck, 4, {"wq", "wv"}, 1, DType::F32, 2));
  }
  test::TempDir dir_;
  std::string base_;
};

TEST_F(Cli, CompressInspectDecompressRoundTrip) {
  const CliResult c = run("compress --base " + base_ + " --adapter " + dir_.file("adapter") + " --out " + dir_.file("a.solar") +
                        " --pool 512 --keep-fraction 1 --bits 32 --seed 5 -q",
                    dir_);
  ASSERT_EQ(c.code, 0) << c.err;
  EXPECT_NE(c.out.find("relative error"), std::string::npos) << c.out;
  const CliResult i = run("inspect " + dir_.file("a.solar") + " --json", dir_);
  ASSERT_EQ(i.code, 0) << i.err;
  const auto j = nlohmann::json::parse(i.out);
  EXPECT_EQ(j["file_bytes"].get<size_t>(), std::filesystem::file_size(dir_.file("a.solar")));
  EXPECT_EQ(j["layers"].size(), 4u);
  const CliResult d = run("decompress " + dir_.file("a.solar") + " --base " + base_ + " --out " + dir_.file("restored") + " -q", dir_);
  ASSERT_EQ(d.code, 0) << d.err;
  const PeftAdapter a = read_peft_adapter(dir_.file("adapter")), b = read_peft_adapter(dir_.file("restored"));
  ASSERT_EQ(a.modules.size(), b.modules.size());
  for (size_t k = 0; k < a.modules.size(); ++k)
    EXPECT_LT(relative_delta_error(a.modules[k].A, a.modules[k].B, b.modules[k].A, b.modules[k].B), 1e-4);
  EXPECT_EQ(a.config, b.config);
}

TEST_F(Cli, ErrorsAreOneLineNamingTheFileAndLeaveNothingBehind) {
  // Adapter directory missing.
  CliResult r = run("compress --base " + base_ + " --adapter " + dir_.file("nope") + " --out " + dir_.file("x.solar"), dir_);
  EXPECT_NE(r.code, 0);
  EXPECT_NE(r.err.find(dir_.file("nope")), std::string::npos) << r.err;
  EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << r.err;
  // Base that lacks the modules: no output file may appear.
  test::write_bytes(dir_.file("empty.safetensors"), safetensors_bytes({{"x", Tensor::from_f32({1}, {1}, DType::F32)}}));
  r = run("compress --mode paper --base " + dir_.file("empty.safetensors") + " --adapter " + dir_.file("adapter") + " --out " + dir_.file("x.solar") + " -q", dir_);
  EXPECT_NE(r.code, 0);
  EXPECT_NE(r.err.find("layers.0.attention.wq"), std::string::npos) << r.err;
  EXPECT_FALSE(std::filesystem::exists(dir_.file("x.solar")));
  // A truncated container.
  ASSERT_EQ(run("compress --base " + base_ + " --adapter " + dir_.file("adapter") + " --out " + dir_.file("ok.solar") + " --pool 50 -q", dir_).code, 0);
  auto bytes = test::read_bytes(dir_.file("ok.solar"));
  bytes.resize(bytes.size() / 2);
  test::write_bytes(dir_.file("cut.solar"), bytes);
  r = run("decompress " + dir_.file("cut.solar") + " --base " + base_ + " --out " + dir_.file("out"), dir_);
  EXPECT_EQ(r.code, 1);
  EXPECT_NE(r.err.find("cut.solar"), std::string::npos) << r.err;
  EXPECT_FALSE(std::filesystem::exists(dir_.file("out")));
  // A bad option is a usage error.
  r = run("compress --base a --adapter b --out c --bits 7", dir_);
  EXPECT_NE(r.code, 0);
  EXPECT_NE(r.code, 1);
}

TEST_F(Cli, NonFiniteAdapterIsRefused) {
  PeftAdapter a = read_peft_adapter(dir_.file("adapter"));
  auto v = a.modules[1].B.to_f32();
  v[3] = std::nanf("");
  a.modules[1].B = Tensor::from_f32(v, a.modules[1].B.shape, a.modules[1].B.dtype);
  write_peft_adapter(dir_.file("nan"), a);
  const CliResult r = run("compress --base " + base_ + " --adapter " + dir_.file("nan") + " --out " + dir_.file("n.solar"), dir_);
  EXPECT_EQ(r.code, 1);
  EXPECT_NE(r.err.find("NaN"), std::string::npos) << r.err;
  EXPECT_FALSE(std::filesystem::exists(dir_.file("n.solar")));
}

TEST_F(Cli, PassthroughInt8CodesHeadsAndInspectSaysSo) {
  PeftAdapter a = read_peft_adapter(dir_.file("adapter"));
  a.passthrough.emplace_back("base_model.model.score.weight", test::random_tensor({4, 64}, 9));
  write_peft_adapter(dir_.file("headed"), a);
  const std::string common = "compress --adapter " + dir_.file("headed") + " -q --target-error 0.05 --out ";
  ASSERT_EQ(run(common + dir_.file("e.solar"), dir_).code, 0);
  ASSERT_EQ(run(common + dir_.file("q.solar") + " --passthrough int8", dir_).code, 0);
  EXPECT_LT(std::filesystem::file_size(dir_.file("q.solar")) + 500, std::filesystem::file_size(dir_.file("e.solar")));
  const CliResult i = run("inspect " + dir_.file("q.solar"), dir_);
  ASSERT_EQ(i.code, 0) << i.err;
  EXPECT_NE(i.out.find("solar format v7"), std::string::npos) << i.out;
  EXPECT_NE(i.out.find("1 stored as int8 rows"), std::string::npos) << i.out;
  // --passthrough spectral: the head becomes a layer of the stream, and comes back in its place.
  const CliResult s = run(common + dir_.file("s.solar") + " --passthrough spectral", dir_);
  ASSERT_EQ(s.code, 0) << s.err;
  EXPECT_NE(s.out.find("for 4 layers (and 1 head coded with them)"), std::string::npos) << s.out;
  EXPECT_NE(run("inspect " + dir_.file("s.solar"), dir_).out.find("1 coded as layers of the stream"), std::string::npos);
  ASSERT_EQ(run("decompress " + dir_.file("s.solar") + " --out " + dir_.file("sr") + " -q", dir_).code, 0);
  const PeftAdapter back = read_peft_adapter(dir_.file("sr"));
  ASSERT_EQ(back.modules.size(), a.modules.size());
  ASSERT_EQ(back.passthrough.size(), 1u);
  EXPECT_EQ(back.passthrough[0].first, "base_model.model.score.weight");
  EXPECT_EQ(back.passthrough[0].second.shape, a.passthrough[0].second.shape);
  const CliResult bad = run(common + dir_.file("x.solar") + " --passthrough int4", dir_);
  EXPECT_NE(bad.code, 0);
  EXPECT_FALSE(std::filesystem::exists(dir_.file("x.solar")));
}

TEST_F(Cli, DefaultIsSpectralAndPaperOptionsImplyPaper) {
  ASSERT_EQ(run("compress --adapter " + dir_.file("adapter") + " --out " + dir_.file("d.solar") + " -q", dir_).code, 0);
  ASSERT_EQ(run("compress --base " + base_ + " --adapter " + dir_.file("adapter") + " --out " + dir_.file("p.solar") + " --pool 60 -q", dir_).code, 0);
  EXPECT_EQ(read_container(dir_.file("d.solar")).layers[0].mode, "spectral");
  EXPECT_EQ(read_container(dir_.file("p.solar")).layers[0].mode, "paper");
  // A spectral file restores without a base.
  ASSERT_EQ(run("decompress " + dir_.file("d.solar") + " --out " + dir_.file("dr") + " -q", dir_).code, 0);
  const PeftAdapter a = read_peft_adapter(dir_.file("adapter")), b = read_peft_adapter(dir_.file("dr"));
  for (size_t k = 0; k < a.modules.size(); ++k)
    EXPECT_LT(relative_delta_error(a.modules[k].A, a.modules[k].B, b.modules[k].A, b.modules[k].B), 0.1);
}

// The real DoRA fixture: magnitudes coded against --base, shown by inspect, needing the base to
// come back; without --base at compress they stay exact, with a warning.
TEST_F(Cli, DoraMagnitudesAreCodedAgainstTheBase) {
  const std::string dora = std::string(SOLAR_SOURCE_DIR) + "/tests/fixtures/stories260k_dora_r4";
  const CliResult c = run("compress --base " + base_ + " --adapter " + dora + " --out " + dir_.file("d.solar") + " --target-bytes 2500", dir_);
  ASSERT_EQ(c.code, 0) << c.err;
  EXPECT_LE(std::filesystem::file_size(dir_.file("d.solar")), 2500u);
  const CliResult i = run("inspect " + dir_.file("d.solar"), dir_);
  ASSERT_EQ(i.code, 0) << i.err;
  EXPECT_NE(i.out.find("10 DoRA magnitudes coded against the base"), std::string::npos) << i.out;
  EXPECT_NE(i.out.find("DoRA magnitude of layers.4.attention.wv"), std::string::npos) << i.out;
  EXPECT_NE(i.out.find("restoring needs the base model: yes (DoRA magnitudes)"), std::string::npos) << i.out;
  const CliResult no_base = run("decompress " + dir_.file("d.solar") + " --out " + dir_.file("r") + " -q", dir_);
  EXPECT_EQ(no_base.code, 1);
  EXPECT_NE(no_base.err.find("needed by the DoRA magnitude of module layers.0.attention.wq"), std::string::npos) << no_base.err;
  EXPECT_FALSE(std::filesystem::exists(dir_.file("r")));
  const CliResult d = run("decompress " + dir_.file("d.solar") + " --base " + base_ + " --out " + dir_.file("r") + " -q", dir_);
  ASSERT_EQ(d.code, 0) << d.err;
  const PeftAdapter original = read_peft_adapter(dora), restored = read_peft_adapter(dir_.file("r"));
  ASSERT_EQ(restored.passthrough.size(), 10u);
  for (size_t k = 0; k < 10; ++k) {
    const std::vector<float> a = original.passthrough[k].second.to_f32(), b = restored.passthrough[k].second.to_f32();
    double num = 0, den = 0;
    for (size_t j = 0; j < a.size(); ++j) {
      num += (a[j] - b[j]) * (a[j] - b[j]);
      den += a[j] * a[j];
    }
    EXPECT_LT(std::sqrt(num / den), 0.05) << original.passthrough[k].first;
  }
  const CliResult free = run("compress --adapter " + dora + " --out " + dir_.file("f.solar") + " -q", dir_);
  ASSERT_EQ(free.code, 0) << free.err;
  EXPECT_NE(free.err.find("10 DoRA magnitude vector(s) stored exactly"), std::string::npos) << free.err;
}

}  // namespace
}  // namespace solar
