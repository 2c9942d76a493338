// The one error type of the engine. Every failure that can reach JavaScript is an EngineError whose
// `code` is stable (UPPER_SNAKE_CASE) so callers can branch on it; the message says what and where.
#pragma once
#include <stdexcept>
#include <string>

namespace ts {

struct EngineError : std::runtime_error {
  std::string code;  // e.g. INVALID_SAFETENSORS, INVALID_CONFIG, ADAPTER_MISMATCH, IO_ERROR, CANCELLED
  EngineError(std::string code_, const std::string& message)
      : std::runtime_error(message), code(std::move(code_)) {}
};

// Throws EngineError(code, message) when `cond` is false.
inline void require(bool cond, const char* code, const std::string& message) {
  if (!cond) throw EngineError(code, message);
}

}  // namespace ts
