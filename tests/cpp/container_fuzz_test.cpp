// Structured mutation of valid files: the metadata's JSON and the payload are changed, then the
// file is rebuilt with consistent sizes and a valid checksum, so that only the parser's and the
// decoders' own checks stand between the bytes and the memory. Every mutant must decode or be
// refused with a solar::Error; any other exception, a crash or (under scripts/sanitize.sh) a
// memory error fails. Seeded, so a failure names a reproducible mutant.
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>
#include <zstd.h>
#include <xxhash.h>

#include <gtest/gtest.h>

#include "solar/checkpoint.hpp"
#include "solar/container.hpp"
#include "solar/peft_adapter.hpp"
#include "solar/pipeline.hpp"
#include "test_support.hpp"

namespace solar {
namespace {

const std::string kFixtures = SOLAR_SOURCE_DIR "/tests/fixtures";

struct Parts {
  uint8_t version = 0;
  std::string metadata;          // the JSON text, decompressed
  std::vector<uint8_t> payload;  // decompressed
};

std::vector<uint8_t> unzstd(const uint8_t* data, size_t size, size_t raw, bool magicless, const std::string* dict) {
  std::vector<uint8_t> frame;
  if (magicless) frame = {0x28, 0xB5, 0x2F, 0xFD};
  frame.insert(frame.end(), data, data + size);
  std::vector<uint8_t> out(raw);
  ZSTD_DCtx* ctx = ZSTD_createDCtx();
  const size_t n = dict ? ZSTD_decompress_usingDict(ctx, out.data(), raw, frame.data(), frame.size(), dict->data(), dict->size())
                        : ZSTD_decompressDCtx(ctx, out.data(), raw, frame.data(), frame.size());
  ZSTD_freeDCtx(ctx);
  if (ZSTD_isError(n) || n != raw) throw std::runtime_error("test: cannot decompress a fixture's part");
  return out;
}

// A valid file taken apart (docs/FORMAT.md, "Layout").
Parts split(const std::vector<uint8_t>& bytes) {
  const ContainerHeader h = parse_container_header(bytes.data(), bytes.size(), "fixture");
  const uint8_t* meta = bytes.data() + h.header_bytes;
  const uint8_t* payload = meta + h.metadata_stored;
  const bool magicless = h.version >= 5;
  Parts p;
  p.version = static_cast<uint8_t>(h.version);
  const std::vector<uint8_t> m = (h.flags & 1)
      ? unzstd(meta, h.metadata_stored, h.metadata_raw, magicless, (h.flags & 2) ? &metadata_dictionary_v1() : nullptr)
      : std::vector<uint8_t>(meta, meta + h.metadata_stored);
  p.metadata.assign(m.begin(), m.end());
  p.payload = (h.flags & 4) ? unzstd(payload, h.payload_stored, h.payload_raw, magicless, nullptr)
                            : std::vector<uint8_t>(payload, payload + h.payload_stored);
  return p;
}

void put_leb(std::vector<uint8_t>& out, uint64_t v) {
  for (; v >= 0x80; v >>= 7) out.push_back(static_cast<uint8_t>(v | 0x80));
  out.push_back(static_cast<uint8_t>(v));
}

// Both parts stored uncompressed (flags 0), sizes and checksum consistent.
std::vector<uint8_t> assemble(const Parts& p) {
  std::vector<uint8_t> b = {0x89, 'S', 'L', 'R', p.version, 0};
  put_leb(b, p.metadata.size());
  put_leb(b, p.metadata.size());
  put_leb(b, p.payload.size());
  put_leb(b, p.payload.size());
  b.insert(b.end(), p.metadata.begin(), p.metadata.end());
  b.insert(b.end(), p.payload.begin(), p.payload.end());
  const uint32_t sum = XXH32(b.data(), b.size(), 0);
  for (int i = 0; i < 4; ++i) b.push_back(static_cast<uint8_t>(sum >> (8 * i)));
  return b;
}

Parts mutant(const Parts& original, std::mt19937_64& rng) {
  Parts p = original;
  const int kind = static_cast<int>(rng() % 4);
  if (kind <= 1) {  // metadata: one or two values
    nlohmann::json j = nlohmann::json::parse(p.metadata);
    for (int i = 0; i <= kind; ++i) test::mutate_json(j, rng);
    p.metadata = j.dump();
  } else if (kind == 2 && !p.payload.empty()) {  // payload bytes
    for (int i = 0, n = 1 + static_cast<int>(rng() % 4); i < n; ++i)
      p.payload[rng() % p.payload.size()] = static_cast<uint8_t>(rng());
  } else {  // payload cut or grown
    const size_t cut = 1 + rng() % 16;
    if (rng() % 2 && p.payload.size() > cut) p.payload.resize(p.payload.size() - cut);
    else p.payload.resize(p.payload.size() + cut, static_cast<uint8_t>(rng()));
  }
  return p;
}

struct Outcome {
  size_t decoded = 0, refused = 0;
};

// Mutates `bytes` n times; every mutant must decode or throw solar::Error.
Outcome fuzz(const std::vector<uint8_t>& bytes, const WeightSource& base, uint64_t seed, int n) {
  const Parts original = split(bytes);
  // The reassembled, uncompressed file is itself valid and decodes to the same adapter.
  const auto plain = assemble(original);
  const Container a = parse_container(bytes.data(), bytes.size(), "a");
  const Container b = parse_container(plain.data(), plain.size(), "b");
  EXPECT_EQ(peft_tensors(decompress_container(a, base)).size(), peft_tensors(decompress_container(b, base)).size());

  Outcome out;
  std::mt19937_64 rng(seed);
  for (int i = 0; i < n; ++i) {
    const auto m = assemble(mutant(original, rng));
    try {
      const Container c = parse_container(m.data(), m.size(), "mutant.solar");
      decompress_container(c, base, {1, {}});
      ++out.decoded;
    } catch (const Error&) {
      ++out.refused;
    } catch (const std::exception& e) {
      ADD_FAILURE() << "mutant " << i << " (seed " << seed << "): not a solar::Error but " << e.what();
    }
  }
  return out;
}

TEST(ContainerFuzz, MutatedGoldenFilesDecodeOrAreRefused) {
  const Checkpoint base(kFixtures + "/golden_v1_base.safetensors");
  uint64_t seed = 1;
  for (const char* name : {"golden_v1.solar", "golden_v1_spectral.solar", "golden_v3_spectral.solar",
                           "golden_v4_spectral.solar", "golden_v5_spectral.solar", "golden_v6_spectral.solar"}) {
    SCOPED_TRACE(name);
    const Outcome o = fuzz(test::read_bytes(kFixtures + "/" + name), base, seed++, 400);
    EXPECT_GT(o.refused, 0u);  // the checks do fire, and many mutants still decode (about a third)
    EXPECT_GT(o.decoded, 40u);
    EXPECT_EQ(o.decoded + o.refused, 400u);
  }
}

// v7: DoRA magnitudes coded against their layers' W; mutants decode against the golden base.
TEST(ContainerFuzz, MutatedDoraMagnitudeFileDecodesOrIsRefused) {
  const Checkpoint base(kFixtures + "/golden_v7_base.safetensors");
  const Outcome o = fuzz(test::read_bytes(kFixtures + "/golden_v7_spectral.solar"), base, 77, 400);
  EXPECT_GT(o.refused, 0u);
  EXPECT_GT(o.decoded, 40u);
  EXPECT_EQ(o.decoded + o.refused, 400u);
}

// A real adapter's file: the stories260K fixture compressed with both quantisers in the stream.
TEST(ContainerFuzz, MutatedRealFileDecodesOrIsRefused) {
  CompressOptions o;
  o.mode = "spectral";
  o.quantiser = "dependent";
  o.target_bytes = 1500;
  const auto bytes = serialize_container(
      compress_adapter(read_peft_adapter(kFixtures + "/stories260k_lora_r4"), InMemoryWeights(), o));
  const Outcome out = fuzz(bytes, InMemoryWeights("<none>"), 99, 600);
  EXPECT_GT(out.refused, 0u);
}

}  // namespace
}  // namespace solar
