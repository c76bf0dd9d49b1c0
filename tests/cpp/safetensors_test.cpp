#include "solar/safetensors.hpp"

#include <cstring>

#include <nlohmann/json.hpp>

#include "solar/error.hpp"
#include "test_support.hpp"

using namespace solar;
using solar::test::TempDir;

namespace {

// Raw safetensors bytes from a header string and a data buffer (no padding added).
std::vector<uint8_t> raw_file(const std::string& header, const std::vector<uint8_t>& data, uint64_t len_override = ~0ull) {
  const uint64_t n = len_override == ~0ull ? header.size() : len_override;
  std::vector<uint8_t> out(8 + header.size() + data.size());
  for (int i = 0; i < 8; ++i) out[i] = static_cast<uint8_t>(n >> (8 * i));
  if (!header.empty()) std::memcpy(out.data() + 8, header.data(), header.size());
  if (!data.empty()) std::memcpy(out.data() + 8 + header.size(), data.data(), data.size());
  return out;
}

// Writes `bytes` to a file in `t`, opens it, and expects a Format error naming the path and `needle`.
void expect_format_error(const TempDir& t, const std::vector<uint8_t>& bytes, const std::string& needle,
                         ErrorKind kind = ErrorKind::Format) {
  const std::string p = t.file("bad.safetensors");
  test::write_bytes(p, bytes);
  try {
    SafetensorsFile f(p);
    ADD_FAILURE() << "expected an error containing '" << needle << "'";
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), kind) << e.what();
    EXPECT_EQ(e.where(), p);
    EXPECT_NE(std::string(e.what()).find(p), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what() << " / wanted: " << needle;
  }
}

TEST(Safetensors, RoundTripKeepsOrderBytesAndMetadata) {
  TempDir t;
  std::vector<std::pair<std::string, Tensor>> tensors = {
      {"z.weight", test::random_tensor({3, 5}, 1, DType::F32)},
      {"a.weight", test::random_tensor({4}, 2, DType::BF16)},
      {"m.ids", test::random_bytes_tensor({2, 2}, 3, DType::I64)},
      {"empty", test::random_tensor({0, 7}, 4, DType::F16)},
      {"scalar", test::random_tensor({}, 5, DType::F64)},
      {"flags", test::random_bytes_tensor({3}, 6, DType::BOOL)},
  };
  const std::map<std::string, std::string> meta = {{"format", "pt"}, {"note", "ünïcode \"quoted\""}};
  const std::string p = t.file("x.safetensors");
  write_safetensors(p, tensors, meta);
  EXPECT_EQ(t.list(), std::vector<std::string>{"x.safetensors"});

  SafetensorsFile f(p);
  EXPECT_EQ(f.path(), p);
  EXPECT_EQ(f.metadata(), meta);
  std::vector<std::string> expect_names;
  for (const auto& [n, _] : tensors) expect_names.push_back(n);
  // names() is in offset order; the zero-size tensor shares its offset with the next one.
  auto names = f.names();
  ASSERT_EQ(names.size(), tensors.size());
  for (const auto& [n, tensor] : tensors) {
    ASSERT_TRUE(f.contains(n)) << n;
    TensorView v = f.get(n);
    EXPECT_EQ(v.dtype, tensor.dtype);
    EXPECT_EQ(v.shape, tensor.shape);
    EXPECT_EQ(v.numel(), tensor.numel());
    Tensor c = v.copy();
    EXPECT_EQ(c.data, tensor.data) << n;
  }
  EXPECT_EQ(names[0], "z.weight");
  EXPECT_EQ(names[1], "a.weight");
  EXPECT_EQ(names[2], "m.ids");
  EXPECT_EQ(f.get("a.weight").to_f32(), tensors[1].second.to_f32());
  EXPECT_FALSE(f.contains("nope"));
  EXPECT_SOLAR_ERROR(f.get("nope"), ErrorKind::Mismatch, "no tensor 'nope'");
}

TEST(Safetensors, BytesLayoutMatchesThePythonLibrary) {
  std::vector<std::pair<std::string, Tensor>> tensors = {{"w", Tensor::from_f32({1, 2}, {2}, DType::F32)}};
  const auto bytes = safetensors_bytes(tensors);
  uint64_t n = 0;
  for (int i = 0; i < 8; ++i) n |= static_cast<uint64_t>(bytes[i]) << (8 * i);
  EXPECT_EQ(n % 8, 0u);
  ASSERT_EQ(bytes.size(), 8 + n + 8);
  const std::string header(bytes.begin() + 8, bytes.begin() + 8 + static_cast<long>(n));
  // Compact JSON, padded with spaces to a multiple of 8 (as safetensors.torch.save_file writes).
  const std::string json = R"({"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})";
  EXPECT_EQ(header.substr(0, json.size()), json);
  EXPECT_EQ(header.find_first_not_of(' ', json.size()), std::string::npos);
  float v[2];
  std::memcpy(v, bytes.data() + 8 + n, 8);
  EXPECT_EQ(v[0], 1.0f);
  EXPECT_EQ(v[1], 2.0f);
}

TEST(Safetensors, EmptyTensorListRoundTrip) {
  TempDir t;
  write_safetensors(t.file("e.safetensors"), {});
  SafetensorsFile f(t.file("e.safetensors"));
  EXPECT_TRUE(f.names().empty());
  EXPECT_TRUE(f.metadata().empty());
}

TEST(Safetensors, WriterRefusesInconsistentTensors) {
  Tensor bad = Tensor::from_f32({1, 2, 3}, {3}, DType::F32);
  bad.data.pop_back();
  EXPECT_SOLAR_ERROR(safetensors_bytes({{"bad", bad}}), ErrorKind::InvalidInput, "bad");
  Tensor ok = Tensor::from_f32({1}, {1}, DType::F32);
  EXPECT_SOLAR_ERROR(safetensors_bytes({{"a", ok}, {"a", ok}}), ErrorKind::InvalidInput, "duplicate");
  EXPECT_SOLAR_ERROR(safetensors_bytes({{"__metadata__", ok}}), ErrorKind::InvalidInput, "__metadata__");
}

TEST(Safetensors, MissingFileIsIoError) {
  TempDir t;
  EXPECT_SOLAR_ERROR(SafetensorsFile f(t.file("missing.safetensors")), ErrorKind::Io, "missing.safetensors");
}

TEST(SafetensorsAbuse, EmptyFile) {
  TempDir t;
  expect_format_error(t, {}, "truncated header");
}

TEST(SafetensorsAbuse, ShortFile) {
  TempDir t;
  expect_format_error(t, {1, 2, 3}, "truncated header");
}

TEST(SafetensorsAbuse, HeaderLengthLargerThanFile) {
  TempDir t;
  expect_format_error(t, raw_file("{}", {}, 1000), "truncated header");
  expect_format_error(t, raw_file("{}", {}, ~0ull - 1), "truncated header");
}

TEST(SafetensorsAbuse, HeaderNotJson) {
  TempDir t;
  expect_format_error(t, raw_file("not json at all!", {}), "not valid JSON");
  expect_format_error(t, raw_file("{\"a\": ", {}), "not valid JSON");
  expect_format_error(t, raw_file("", {}), "JSON");
}

TEST(SafetensorsAbuse, HeaderNotObject) {
  TempDir t;
  expect_format_error(t, raw_file("[1, 2, 3]", {}), "not a JSON object");
  expect_format_error(t, raw_file(R"({"a": 5})", {}), "tensor 'a'");
}

TEST(SafetensorsAbuse, MissingFields) {
  TempDir t;
  expect_format_error(t, raw_file(R"({"a": {"shape": [1], "data_offsets": [0, 4]}})", std::vector<uint8_t>(4)), "dtype");
  expect_format_error(t, raw_file(R"({"a": {"dtype": "F32", "data_offsets": [0, 4]}})", std::vector<uint8_t>(4)), "shape");
  expect_format_error(t, raw_file(R"({"a": {"dtype": "F32", "shape": [1]}})", std::vector<uint8_t>(4)), "data_offsets");
  expect_format_error(t, raw_file(R"({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0]}})", std::vector<uint8_t>(4)),
                      "data_offsets");
}

TEST(SafetensorsAbuse, OffsetsOutOfBounds) {
  TempDir t;
  expect_format_error(t, raw_file(R"({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}})", std::vector<uint8_t>(4)),
                      "tensor 'a': data_offsets out of bounds");
  expect_format_error(
      t, raw_file(R"({"a": {"dtype": "F32", "shape": [1], "data_offsets": [18446744073709551612, 18446744073709551615]}})", {}),
      "tensor 'a'");
  expect_format_error(t, raw_file(R"({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 0]}})", std::vector<uint8_t>(4)),
                      "tensor 'a'");
  expect_format_error(t, raw_file(R"({"a": {"dtype": "F32", "shape": [1], "data_offsets": [-4, 0]}})", std::vector<uint8_t>(4)),
                      "tensor 'a'");
}

TEST(SafetensorsAbuse, SizeMismatchedOffsets) {
  TempDir t;
  expect_format_error(t, raw_file(R"({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}})", std::vector<uint8_t>(4)),
                      "tensor 'a'");
}

TEST(SafetensorsAbuse, OverlappingOffsets) {
  TempDir t;
  expect_format_error(t,
                      raw_file(R"({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},)"
                               R"( "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}})",
                               std::vector<uint8_t>(12)),
                      "overlap");
}

TEST(SafetensorsAbuse, HolesAndTrailingBytes) {
  TempDir t;
  expect_format_error(t, raw_file(R"({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}})", std::vector<uint8_t>(8)),
                      "hole");
  expect_format_error(t, raw_file(R"({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}})", std::vector<uint8_t>(8)),
                      "trailing");
}

TEST(SafetensorsAbuse, UnknownDtype) {
  TempDir t;
  expect_format_error(t, raw_file(R"({"a": {"dtype": "Q7", "shape": [1], "data_offsets": [0, 1]}})", std::vector<uint8_t>(1)),
                      "unknown dtype 'Q7'");
  // A dtype the safetensors spec defines but this version cannot handle is Unsupported.
  expect_format_error(t, raw_file(R"({"a": {"dtype": "F8_E4M3", "shape": [1], "data_offsets": [0, 1]}})", std::vector<uint8_t>(1)),
                      "F8_E4M3", ErrorKind::Unsupported);
}

TEST(SafetensorsAbuse, HugeShapeOverflow) {
  TempDir t;
  expect_format_error(
      t,
      raw_file(R"({"a": {"dtype": "F32", "shape": [4294967296, 4294967296, 4], "data_offsets": [0, 0]}})", {}),
      "overflow");
  expect_format_error(
      t, raw_file(R"({"a": {"dtype": "F64", "shape": [4611686018427387904], "data_offsets": [0, 0]}})", {}),
      "overflow");
  expect_format_error(t, raw_file(R"({"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 0]}})", {}), "shape");
  expect_format_error(t, raw_file(R"({"a": {"dtype": "F32", "shape": [1.5], "data_offsets": [0, 0]}})", {}), "shape");
}

TEST(SafetensorsAbuse, BadMetadata) {
  TempDir t;
  expect_format_error(t, raw_file(R"({"__metadata__": {"k": 1}})", {}), "__metadata__");
  expect_format_error(t, raw_file(R"({"__metadata__": [1]})", {}), "__metadata__");
}

TEST(SafetensorsAbuse, ZeroSizeTensorsAndSpacePaddingAreFine) {
  TempDir t;
  const std::string p = t.file("ok.safetensors");
  test::write_bytes(p, raw_file(R"({"a": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]},)"
                                R"( "b": {"dtype": "U8", "shape": [3], "data_offsets": [0, 3]}}     )",
                                {1, 2, 3}));
  SafetensorsFile f(p);
  EXPECT_EQ(f.get("a").nbytes, 0u);
  EXPECT_EQ(f.get("b").copy().data, (std::vector<uint8_t>{1, 2, 3}));
}

TEST(Safetensors, RealModelIfPresent) {
  const std::string dir = test::shared_data_dir();
  if (dir.empty()) GTEST_SKIP() << "shared data not found (../shared/data)";
  SafetensorsFile f(dir + "/models/stories260K/stories260K.safetensors");
  ASSERT_TRUE(f.contains("layers.0.attention.wq.weight"));
  TensorView v = f.get("layers.0.attention.wq.weight");
  EXPECT_EQ(v.shape, (std::vector<int64_t>{64, 64}));
  EXPECT_EQ(v.to_f32().size(), 64u * 64u);
}

}  // namespace
