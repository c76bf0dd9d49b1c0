// Typed errors. Every error names the file (or object) it concerns and the problem,
// so the CLI can print one line and the Python binding can map kinds to exceptions.
#pragma once
#include <stdexcept>
#include <string>

namespace solar {

enum class ErrorKind {
  Io,            // a file is missing, unreadable or unwritable
  Format,        // a file is not what it claims to be (bad magic, malformed header, out of bounds)
  Corrupt,       // a checksum does not match: the bytes were damaged
  Mismatch,      // inputs disagree (wrong base model, shape mismatch, missing module)
  InvalidInput,  // values or options the codec refuses (NaN/Inf, impossible budget)
  Unsupported,   // a valid input this version cannot handle (unknown dtype, newer format)
};

const char* to_string(ErrorKind kind) noexcept;

class Error : public std::runtime_error {
 public:
  Error(ErrorKind kind, std::string where, const std::string& what)
      : std::runtime_error(where.empty() ? what : where + ": " + what),
        kind_(kind), where_(std::move(where)) {}
  ErrorKind kind() const noexcept { return kind_; }
  // The file or object the error is about (may be empty).
  const std::string& where() const noexcept { return where_; }

 private:
  ErrorKind kind_;
  std::string where_;
};

}  // namespace solar
