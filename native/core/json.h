// A small strict JSON parser (RFC 8259) for safetensors headers and other small documents.
// Strict: valid UTF-8 only, no trailing garbage, no comments, no leading zeros, no lone surrogates,
// bounded nesting. Failures throw EngineError("INVALID_JSON", "<problem> at byte <offset>").
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace ts {

struct JsonValue {
  enum class Type { Null, Bool, Number, String, Array, Object };

  Type type = Type::Null;
  bool boolean = false;
  double number = 0;        // Number: the value as a double (nearest)
  std::string text;         // String: the decoded UTF-8 text; Number: the literal as written
  std::vector<JsonValue> items;                              // Array elements
  std::vector<std::pair<std::string, JsonValue>> members;    // Object members in document order;
                                                             // duplicate keys are kept (callers decide)

  bool is_null() const { return type == Type::Null; }
  bool is_bool() const { return type == Type::Bool; }
  bool is_number() const { return type == Type::Number; }
  bool is_string() const { return type == Type::String; }
  bool is_array() const { return type == Type::Array; }
  bool is_object() const { return type == Type::Object; }

  // The first member named `key`, or nullptr (Object only; nullptr for other types).
  const JsonValue* find(std::string_view key) const;
  // True when this is a Number written as a non-negative integer (no fraction, no exponent, no
  // minus sign) that fits in uint64; stores it exactly, without going through double.
  bool as_u64(uint64_t* out) const;
};

// Parses a whole document. `max_depth` bounds the nesting of arrays/objects (a top-level scalar is
// depth 0, a top-level object 1).
JsonValue json_parse(std::string_view text, int max_depth = 64);

// True when [data, data+size) is well-formed UTF-8 (no overlong forms, no surrogates, <= U+10FFFF).
// On failure, stores the offset of the first bad byte in *bad_offset when given.
bool utf8_valid(const char* data, size_t size, size_t* bad_offset = nullptr);

// Appends `s` to `out` as a JSON string literal (quotes, escapes for '"', '\\' and control chars;
// other UTF-8 passes through unchanged).
void json_append_string(std::string& out, std::string_view s);

}  // namespace ts
