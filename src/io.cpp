#include "solar/io.hpp"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <system_error>

#include "solar/error.hpp"

namespace fs = std::filesystem;

namespace solar {
namespace {

[[noreturn]] void io_error(const std::string& where, const std::string& what, int err) {
  throw Error(ErrorKind::Io, where, what + ": " + std::strerror(err));
}

class Fd {
 public:
  explicit Fd(int fd) : fd_(fd) {}
  ~Fd() { close_noexcept(); }
  Fd(const Fd&) = delete;
  Fd& operator=(const Fd&) = delete;
  int get() const { return fd_; }
  void close_noexcept() noexcept {
    if (fd_ >= 0) ::close(fd_);
    fd_ = -1;
  }
  // Closes and reports a failure (close can report delayed write errors).
  int close_checked() noexcept {
    int rc = 0;
    if (fd_ >= 0) rc = ::close(fd_);
    fd_ = -1;
    return rc;
  }

 private:
  int fd_;
};

// Strips trailing slashes so "out/" and "out" name the same directory.
std::string normalize(const std::string& path) {
  std::string p = path;
  while (p.size() > 1 && p.back() == '/') p.pop_back();
  return p;
}

std::string parent_of(const std::string& path) {
  fs::path parent = fs::path(path).parent_path();
  return parent.empty() ? std::string(".") : parent.string();
}

std::string base_of(const std::string& path) { return fs::path(path).filename().string(); }

void fsync_dir_noexcept(const std::string& dir) noexcept {
  int fd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd >= 0) {
    (void)::fsync(fd);
    ::close(fd);
  }
}

std::string make_temp_dir_in(const std::string& parent, const std::string& stem, const std::string& where) {
  std::string templ = parent + "/." + stem + "XXXXXX";
  std::vector<char> buf(templ.begin(), templ.end());
  buf.push_back('\0');
  if (::mkdtemp(buf.data()) == nullptr) io_error(where, "cannot create temporary directory in '" + parent + "'", errno);
  return std::string(buf.data());
}

}  // namespace

std::vector<uint8_t> read_file(const std::string& path) {
  Fd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
  if (fd.get() < 0) io_error(path, "cannot open", errno);
  struct stat st {};
  if (::fstat(fd.get(), &st) != 0) io_error(path, "cannot stat", errno);
  if (S_ISDIR(st.st_mode)) throw Error(ErrorKind::Io, path, "cannot read: is a directory");
  std::vector<uint8_t> out;
  if (S_ISREG(st.st_mode) && st.st_size > 0) out.reserve(static_cast<size_t>(st.st_size));
  uint8_t buf[1 << 16];
  for (;;) {
    ssize_t n = ::read(fd.get(), buf, sizeof buf);
    if (n < 0) {
      if (errno == EINTR) continue;
      io_error(path, "cannot read", errno);
    }
    if (n == 0) break;
    out.insert(out.end(), buf, buf + n);
  }
  return out;
}

std::string read_text_file(const std::string& path) {
  std::vector<uint8_t> bytes = read_file(path);
  return std::string(bytes.begin(), bytes.end());
}

void write_file_atomic(const std::string& path_in, const uint8_t* data, size_t size) {
  const std::string path = normalize(path_in);
  const std::string parent = parent_of(path);
  std::string templ = parent + "/." + base_of(path) + ".tmp.XXXXXX";
  std::vector<char> buf(templ.begin(), templ.end());
  buf.push_back('\0');
  Fd fd(::mkostemp(buf.data(), O_CLOEXEC));
  if (fd.get() < 0) io_error(path, "cannot create temporary file in '" + parent + "'", errno);
  const std::string tmp(buf.data());
  try {
    if (::fchmod(fd.get(), 0644) != 0) io_error(path, "cannot set permissions", errno);
    size_t done = 0;
    while (done < size) {
      ssize_t n = ::write(fd.get(), data + done, size - done);
      if (n < 0) {
        if (errno == EINTR) continue;
        io_error(path, "cannot write", errno);
      }
      done += static_cast<size_t>(n);
    }
    if (::fsync(fd.get()) != 0) io_error(path, "cannot sync", errno);
    if (fd.close_checked() != 0) io_error(path, "cannot close", errno);
    struct stat st {};
    if (::stat(path.c_str(), &st) == 0 && S_ISDIR(st.st_mode))
      throw Error(ErrorKind::Io, path, "cannot write: is a directory");
    if (::rename(tmp.c_str(), path.c_str()) != 0) io_error(path, "cannot rename temporary file into place", errno);
  } catch (...) {
    fd.close_noexcept();
    ::unlink(tmp.c_str());
    throw;
  }
  fsync_dir_noexcept(parent);
}

std::string make_temp_dir_beside(const std::string& path_in) {
  const std::string path = normalize(path_in);
  const std::string parent = parent_of(path);
  std::error_code ec;
  fs::create_directories(parent, ec);
  if (ec) throw Error(ErrorKind::Io, path, "cannot create parent directory '" + parent + "': " + ec.message());
  return make_temp_dir_in(parent, base_of(path) + ".tmp.", path);
}

void commit_temp_dir(const std::string& tmp, const std::string& path_in) {
  const std::string path = normalize(path_in);
  const std::string parent = parent_of(path);
  struct stat st {};
  if (::lstat(path.c_str(), &st) != 0) {
    if (errno != ENOENT) io_error(path, "cannot stat", errno);
    if (::rename(tmp.c_str(), path.c_str()) != 0) io_error(path, "cannot rename temporary directory into place", errno);
    fsync_dir_noexcept(parent);
    return;
  }
  if (!S_ISDIR(st.st_mode))
    throw Error(ErrorKind::Io, path, "exists and is not a directory; refusing to replace it");
  // Move the old directory aside (onto a fresh empty directory, which rename may replace),
  // move the new one in, then delete the old one.
  const std::string old = make_temp_dir_in(parent, base_of(path) + ".old.", path);
  if (::rename(path.c_str(), old.c_str()) != 0) {
    int err = errno;
    ::rmdir(old.c_str());
    io_error(path, "cannot move the existing directory aside", err);
  }
  if (::rename(tmp.c_str(), path.c_str()) != 0) {
    int err = errno;
    (void)::rename(old.c_str(), path.c_str());  // put the original back
    io_error(path, "cannot rename temporary directory into place", err);
  }
  fsync_dir_noexcept(parent);
  remove_tree_noexcept(old);
}

void remove_tree_noexcept(const std::string& path) noexcept {
  try {
    std::error_code ec;
    fs::remove_all(path, ec);
  } catch (...) {
  }
}

}  // namespace solar
