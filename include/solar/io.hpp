// Small file helpers: whole-file reads and atomic writes (temp file + fsync + rename),
// so that a failed run never leaves a half-written output behind.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

namespace solar {

std::vector<uint8_t> read_file(const std::string& path);
std::string read_text_file(const std::string& path);
void write_file_atomic(const std::string& path, const uint8_t* data, size_t size);
inline void write_file_atomic(const std::string& path, const std::vector<uint8_t>& bytes) {
  write_file_atomic(path, bytes.data(), bytes.size());
}

// Writes a directory atomically: `fill` populates a fresh temporary sibling directory,
// which then replaces `path` (an existing directory at `path` is replaced only on success).
template <class Fill>
void write_dir_atomic(const std::string& path, Fill&& fill);
std::string make_temp_dir_beside(const std::string& path);
void commit_temp_dir(const std::string& tmp, const std::string& path);
void remove_tree_noexcept(const std::string& path) noexcept;

template <class Fill>
void write_dir_atomic(const std::string& path, Fill&& fill) {
  std::string tmp = make_temp_dir_beside(path);
  try {
    fill(tmp);
    commit_temp_dir(tmp, path);
  } catch (...) {
    remove_tree_noexcept(tmp);
    throw;
  }
}

}  // namespace solar
