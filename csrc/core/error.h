// Errors raised by the core before anything is written. The Python bindings map them to
// TypeError and ValueError; the C ABI to status codes.
#pragma once

#include <stdexcept>
#include <string>

namespace fusedopt {

enum class ErrorKind { type, value };

struct Error : std::invalid_argument {
  ErrorKind kind;
  Error(ErrorKind k, const std::string& message) : std::invalid_argument(message), kind(k) {}
};

}  // namespace fusedopt
