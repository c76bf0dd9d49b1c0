#include "solar/io.hpp"

#include <sys/stat.h>

#include <filesystem>
#include <stdexcept>

#include "solar/error.hpp"
#include "test_support.hpp"

namespace fs = std::filesystem;
using solar::ErrorKind;
using solar::test::TempDir;

namespace {

std::vector<uint8_t> bytes_of(const std::string& s) { return std::vector<uint8_t>(s.begin(), s.end()); }

TEST(Io, ReadMissingFileIsIoErrorNamingThePath) {
  TempDir t;
  const std::string p = t.file("nope.bin");
  EXPECT_SOLAR_ERROR(solar::read_file(p), ErrorKind::Io, p);
  try {
    solar::read_file(p);
  } catch (const solar::Error& e) {
    EXPECT_EQ(e.where(), p);
    EXPECT_NE(std::string(e.what()).find("No such file"), std::string::npos) << e.what();
  }
}

TEST(Io, ReadDirectoryIsIoError) {
  TempDir t;
  EXPECT_SOLAR_ERROR(solar::read_file(t.path()), ErrorKind::Io, t.path());
}

TEST(Io, WriteAndReadBack) {
  TempDir t;
  const std::string p = t.file("a.bin");
  std::vector<uint8_t> data(100000);
  for (size_t i = 0; i < data.size(); ++i) data[i] = static_cast<uint8_t>(i * 7);
  solar::write_file_atomic(p, data);
  EXPECT_EQ(solar::read_file(p), data);
  EXPECT_EQ(t.list(), std::vector<std::string>{"a.bin"});
  struct stat st {};
  ASSERT_EQ(::stat(p.c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 0777, 0644u);
}

TEST(Io, EmptyFileRoundTrip) {
  TempDir t;
  const std::string p = t.file("empty");
  solar::write_file_atomic(p, std::vector<uint8_t>{});
  EXPECT_TRUE(solar::read_file(p).empty());
  EXPECT_EQ(solar::read_text_file(p), "");
}

TEST(Io, OverwriteReplacesContentAndLeavesNoTemp) {
  TempDir t;
  const std::string p = t.file("x.txt");
  solar::write_file_atomic(p, bytes_of("first version, long"));
  solar::write_file_atomic(p, bytes_of("second"));
  EXPECT_EQ(solar::read_text_file(p), "second");
  EXPECT_EQ(t.list(), std::vector<std::string>{"x.txt"});
}

TEST(Io, FailedWriteLeavesNoTempAndKeepsOldFile) {
  TempDir t;
  // The target is a directory: the rename cannot succeed.
  fs::create_directory(t.file("target"));
  EXPECT_SOLAR_ERROR(solar::write_file_atomic(t.file("target"), bytes_of("data")), ErrorKind::Io, "target");
  EXPECT_EQ(t.list(), std::vector<std::string>{"target"});
  EXPECT_TRUE(fs::is_directory(t.file("target")));
}

TEST(Io, WriteIntoMissingDirectoryIsIoError) {
  TempDir t;
  const std::string p = t.file("missing/sub/file.bin");
  EXPECT_SOLAR_ERROR(solar::write_file_atomic(p, bytes_of("x")), ErrorKind::Io, p);
  EXPECT_TRUE(t.list().empty());
}

TEST(Io, WriteDirAtomicCreatesNewDirectory) {
  TempDir t;
  const std::string out = t.file("out");
  solar::write_dir_atomic(out, [](const std::string& tmp) {
    solar::write_file_atomic(tmp + "/a.txt", bytes_of("A"));
    solar::write_file_atomic(tmp + "/b.txt", bytes_of("B"));
  });
  EXPECT_EQ(t.list(), std::vector<std::string>{"out"});
  EXPECT_EQ(t.list("out"), (std::vector<std::string>{"a.txt", "b.txt"}));
  EXPECT_EQ(solar::read_text_file(out + "/a.txt"), "A");
}

TEST(Io, WriteDirAtomicReplacesExistingDirectory) {
  TempDir t;
  const std::string out = t.file("out");
  fs::create_directory(out);
  solar::test::write_text(out + "/old.txt", "old");
  solar::write_dir_atomic(out + "/", [](const std::string& tmp) {  // trailing slash is fine
    solar::write_file_atomic(tmp + "/new.txt", bytes_of("new"));
  });
  EXPECT_EQ(t.list(), std::vector<std::string>{"out"});
  EXPECT_EQ(t.list("out"), std::vector<std::string>{"new.txt"});
}

TEST(Io, WriteDirAtomicFailureKeepsOldDirectoryAndLeavesNoTemp) {
  TempDir t;
  const std::string out = t.file("out");
  fs::create_directory(out);
  solar::test::write_text(out + "/old.txt", "old");
  EXPECT_THROW(solar::write_dir_atomic(out,
                                       [](const std::string& tmp) {
                                         solar::write_file_atomic(tmp + "/partial.txt", bytes_of("p"));
                                         throw std::runtime_error("fill failed");
                                       }),
               std::runtime_error);
  EXPECT_EQ(t.list(), std::vector<std::string>{"out"});
  EXPECT_EQ(t.list("out"), std::vector<std::string>{"old.txt"});
  EXPECT_EQ(solar::read_text_file(out + "/old.txt"), "old");
}

TEST(Io, WriteDirAtomicOverNonDirectoryIsIoError) {
  TempDir t;
  const std::string out = t.file("out");
  solar::test::write_text(out, "i am a file");
  EXPECT_SOLAR_ERROR(solar::write_dir_atomic(out,
                                             [](const std::string& tmp) {
                                               solar::write_file_atomic(tmp + "/a.txt", bytes_of("A"));
                                             }),
                     ErrorKind::Io, "not a directory");
  EXPECT_EQ(t.list(), std::vector<std::string>{"out"});
  EXPECT_EQ(solar::read_text_file(out), "i am a file");
}

TEST(Io, MakeTempDirBesideCreatesMissingParents) {
  TempDir t;
  const std::string out = t.file("a/b/out");
  const std::string tmp = solar::make_temp_dir_beside(out);
  EXPECT_EQ(fs::path(tmp).parent_path(), fs::path(t.file("a/b")));
  EXPECT_TRUE(fs::is_directory(tmp));
  solar::commit_temp_dir(tmp, out);
  EXPECT_TRUE(fs::is_directory(out));
  EXPECT_EQ(t.list("a/b"), std::vector<std::string>{"out"});
}

TEST(Io, RemoveTreeNoexceptIgnoresMissing) {
  TempDir t;
  solar::remove_tree_noexcept(t.file("does/not/exist"));
  fs::create_directories(t.file("d/e"));
  solar::test::write_text(t.file("d/e/f"), "x");
  solar::remove_tree_noexcept(t.file("d"));
  EXPECT_TRUE(t.list().empty());
}

}  // namespace
