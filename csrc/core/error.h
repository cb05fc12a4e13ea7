// Errors raised by the core before anything is written. The Python bindings map them to
// TypeError and ValueError; the C ABI to status codes.
#pragma once

#include <cstdio>
#include <stdexcept>
#include <string>

namespace fusedopt {

enum class ErrorKind { type, value };

struct Error : std::invalid_argument {
  ErrorKind kind;
  Error(ErrorKind k, const std::string& message) : std::invalid_argument(message), kind(k) {}
};

// An invalid hyperparameter: `field` is its name in the algorithm's options (csrc/math) and
// `rule` what it must satisfy, so a front end that spells the name its own way (Keras'
// `beta_1`, torch's `betas[0]`) can say so in its own words.
struct OptionError : Error {
  std::string field, rule;
  OptionError(const std::string& field_name, double value, const std::string& rule_text)
      : Error(ErrorKind::value,
              "Invalid " + field_name + ": " + format(value) + " (" + rule_text + ")"),
        field(field_name),
        rule(rule_text) {}

 private:
  static std::string format(double value) {
    char text[32];
    std::snprintf(text, sizeof text, "%g", value);
    return text;
  }
};

}  // namespace fusedopt
