#include "solar/error.hpp"

namespace solar {

const char* to_string(ErrorKind kind) noexcept {
  switch (kind) {
    case ErrorKind::Io: return "io";
    case ErrorKind::Format: return "format";
    case ErrorKind::Corrupt: return "corrupt";
    case ErrorKind::Mismatch: return "mismatch";
    case ErrorKind::InvalidInput: return "invalid-input";
    case ErrorKind::Unsupported: return "unsupported";
  }
  return "unknown";
}

}  // namespace solar
