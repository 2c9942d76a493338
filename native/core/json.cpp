// Strict recursive-descent JSON parser and the UTF-8 validator it relies on (see json.h).
#include "core/json.h"

#include <charconv>
#include <cmath>
#include <system_error>

#include "core/error.h"

namespace ts {

const JsonValue* JsonValue::find(std::string_view key) const {
  if (type != Type::Object) return nullptr;
  for (const auto& m : members) {
    if (m.first == key) return &m.second;
  }
  return nullptr;
}

bool JsonValue::as_u64(uint64_t* out) const {
  if (type != Type::Number || text.empty()) return false;
  for (char c : text) {
    if (c < '0' || c > '9') return false;  // '-', '.', 'e' all disqualify
  }
  uint64_t v = 0;
  auto r = std::from_chars(text.data(), text.data() + text.size(), v);
  if (r.ec != std::errc() || r.ptr != text.data() + text.size()) return false;  // overflow
  *out = v;
  return true;
}

bool utf8_valid(const char* data, size_t size, size_t* bad_offset) {
  const auto* s = reinterpret_cast<const unsigned char*>(data);
  size_t i = 0;
  auto fail = [&](size_t at) {
    if (bad_offset) *bad_offset = at;
    return false;
  };
  while (i < size) {
    unsigned c = s[i];
    if (c < 0x80) {
      i++;
      continue;
    }
    size_t len;
    unsigned lo = 0x80, hi = 0xbf;  // allowed range of the second byte (Unicode table 3-7)
    if (c >= 0xc2 && c <= 0xdf) {
      len = 2;
    } else if (c >= 0xe0 && c <= 0xef) {
      len = 3;
      if (c == 0xe0) lo = 0xa0;       // no overlong 3-byte forms
      if (c == 0xed) hi = 0x9f;       // no UTF-16 surrogates U+D800..DFFF
    } else if (c >= 0xf0 && c <= 0xf4) {
      len = 4;
      if (c == 0xf0) lo = 0x90;       // no overlong 4-byte forms
      if (c == 0xf4) hi = 0x8f;       // nothing above U+10FFFF
    } else {
      return fail(i);                 // 0x80..0xc1 (continuation / overlong lead) or 0xf5..0xff
    }
    if (i + len > size) return fail(i);
    if (s[i + 1] < lo || s[i + 1] > hi) return fail(i + 1);
    for (size_t k = 2; k < len; k++) {
      if ((s[i + k] & 0xc0) != 0x80) return fail(i + k);
    }
    i += len;
  }
  return true;
}

namespace {

class Parser {
 public:
  Parser(std::string_view text, int max_depth) : s_(text), max_depth_(max_depth) {}

  JsonValue document() {
    size_t bad = 0;
    if (!utf8_valid(s_.data(), s_.size(), &bad)) fail("invalid UTF-8", bad);
    skip_ws();
    JsonValue v = value(0);
    skip_ws();
    if (pos_ != s_.size()) fail("unexpected trailing characters", pos_);
    return v;
  }

 private:
  std::string_view s_;
  size_t pos_ = 0;
  int max_depth_;

  [[noreturn]] void fail(const std::string& what, size_t at) const {
    throw EngineError("INVALID_JSON", what + " at byte " + std::to_string(at));
  }
  [[noreturn]] void unexpected() const {
    if (pos_ >= s_.size()) fail("unexpected end of input", pos_);
    unsigned char c = static_cast<unsigned char>(s_[pos_]);
    if (c >= 0x20 && c < 0x7f) fail(std::string("unexpected character '") + char(c) + "'", pos_);
    fail("unexpected byte 0x" + hex2(c), pos_);
  }
  static std::string hex2(unsigned char c) {
    const char* d = "0123456789abcdef";
    return std::string{d[c >> 4], d[c & 15]};
  }

  bool at_end() const { return pos_ >= s_.size(); }
  char peek() const { return at_end() ? '\0' : s_[pos_]; }

  void skip_ws() {
    while (!at_end()) {
      char c = s_[pos_];
      if (c != ' ' && c != '\t' && c != '\n' && c != '\r') break;
      pos_++;
    }
  }

  void expect_literal(const char* word) {
    size_t start = pos_;
    for (const char* p = word; *p; p++, pos_++) {
      if (at_end() || s_[pos_] != *p) {
        if (at_end()) fail("unexpected end of input", pos_);
        fail(std::string("invalid literal (expected '") + word + "')", start);
      }
    }
  }

  JsonValue value(int depth) {
    JsonValue v;
    switch (peek()) {
      case '{':
        if (depth + 1 > max_depth_) fail("nesting deeper than " + std::to_string(max_depth_), pos_);
        object(v, depth + 1);
        return v;
      case '[':
        if (depth + 1 > max_depth_) fail("nesting deeper than " + std::to_string(max_depth_), pos_);
        array(v, depth + 1);
        return v;
      case '"':
        v.type = JsonValue::Type::String;
        v.text = string();
        return v;
      case 't':
        expect_literal("true");
        v.type = JsonValue::Type::Bool;
        v.boolean = true;
        return v;
      case 'f':
        expect_literal("false");
        v.type = JsonValue::Type::Bool;
        return v;
      case 'n':
        expect_literal("null");
        return v;
      default:
        if (peek() == '-' || (peek() >= '0' && peek() <= '9')) {
          number(v);
          return v;
        }
        unexpected();
    }
  }

  void object(JsonValue& v, int depth) {
    v.type = JsonValue::Type::Object;
    pos_++;  // '{'
    skip_ws();
    if (peek() == '}') {
      pos_++;
      return;
    }
    for (;;) {
      skip_ws();
      if (peek() != '"') {
        if (at_end()) unexpected();
        fail("expected a string key", pos_);
      }
      std::string key = string();
      skip_ws();
      if (peek() != ':') {
        if (at_end()) unexpected();
        fail("expected ':'", pos_);
      }
      pos_++;
      skip_ws();
      v.members.emplace_back(std::move(key), value(depth));
      skip_ws();
      if (peek() == ',') {
        pos_++;
        continue;
      }
      if (peek() == '}') {
        pos_++;
        return;
      }
      if (at_end()) unexpected();
      fail("expected ',' or '}'", pos_);
    }
  }

  void array(JsonValue& v, int depth) {
    v.type = JsonValue::Type::Array;
    pos_++;  // '['
    skip_ws();
    if (peek() == ']') {
      pos_++;
      return;
    }
    for (;;) {
      skip_ws();
      v.items.push_back(value(depth));
      skip_ws();
      if (peek() == ',') {
        pos_++;
        continue;
      }
      if (peek() == ']') {
        pos_++;
        return;
      }
      if (at_end()) unexpected();
      fail("expected ',' or ']'", pos_);
    }
  }

  unsigned hex4() {
    if (pos_ + 4 > s_.size()) fail("truncated \\u escape", pos_);
    unsigned u = 0;
    for (int k = 0; k < 4; k++) {
      char c = s_[pos_ + k];
      unsigned d;
      if (c >= '0' && c <= '9') d = unsigned(c - '0');
      else if (c >= 'a' && c <= 'f') d = unsigned(c - 'a' + 10);
      else if (c >= 'A' && c <= 'F') d = unsigned(c - 'A' + 10);
      else fail("invalid hex digit in \\u escape", pos_ + k);
      u = u * 16 + d;
    }
    pos_ += 4;
    return u;
  }

  static void append_utf8(std::string& out, unsigned cp) {
    if (cp < 0x80) {
      out += char(cp);
    } else if (cp < 0x800) {
      out += char(0xc0 | (cp >> 6));
      out += char(0x80 | (cp & 0x3f));
    } else if (cp < 0x10000) {
      out += char(0xe0 | (cp >> 12));
      out += char(0x80 | ((cp >> 6) & 0x3f));
      out += char(0x80 | (cp & 0x3f));
    } else {
      out += char(0xf0 | (cp >> 18));
      out += char(0x80 | ((cp >> 12) & 0x3f));
      out += char(0x80 | ((cp >> 6) & 0x3f));
      out += char(0x80 | (cp & 0x3f));
    }
  }

  // Reads a string literal at pos_ (which is '"'); the input is already known to be valid UTF-8.
  std::string string() {
    size_t start = pos_;
    pos_++;  // opening quote
    std::string out;
    for (;;) {
      if (at_end()) fail("unterminated string", start);
      unsigned char c = static_cast<unsigned char>(s_[pos_]);
      if (c == '"') {
        pos_++;
        return out;
      }
      if (c < 0x20) fail("unescaped control character in string", pos_);
      if (c != '\\') {
        out += char(c);
        pos_++;
        continue;
      }
      size_t esc = pos_;
      pos_++;
      if (at_end()) fail("unterminated string", start);
      char e = s_[pos_++];
      switch (e) {
        case '"': out += '"'; break;
        case '\\': out += '\\'; break;
        case '/': out += '/'; break;
        case 'b': out += '\b'; break;
        case 'f': out += '\f'; break;
        case 'n': out += '\n'; break;
        case 'r': out += '\r'; break;
        case 't': out += '\t'; break;
        case 'u': {
          unsigned cp = hex4();
          if (cp >= 0xdc00 && cp <= 0xdfff) fail("lone low surrogate in \\u escape", esc);
          if (cp >= 0xd800 && cp <= 0xdbff) {
            // a high surrogate must be followed by an escaped low surrogate
            if (pos_ + 2 > s_.size() || s_[pos_] != '\\' || s_[pos_ + 1] != 'u')
              fail("lone high surrogate in \\u escape", esc);
            pos_ += 2;
            unsigned low = hex4();
            if (low < 0xdc00 || low > 0xdfff) fail("high surrogate not followed by a low surrogate", esc);
            cp = 0x10000 + ((cp - 0xd800) << 10) + (low - 0xdc00);
          }
          append_utf8(out, cp);
          break;
        }
        default:
          fail("invalid escape sequence", esc);
      }
    }
  }

  // number = [ "-" ] int [ frac ] [ exp ]; int = "0" / digit1-9 *digit
  void number(JsonValue& v) {
    size_t start = pos_;
    if (peek() == '-') pos_++;
    long magnitude = 0;  // decimal exponent of the leading significant digit (for underflow detection)
    bool nonzero_int = false;
    if (peek() == '0') {
      pos_++;
      if (peek() >= '0' && peek() <= '9') fail("leading zero in number", start);
    } else if (peek() >= '1' && peek() <= '9') {
      nonzero_int = true;
      while (peek() >= '0' && peek() <= '9') {
        pos_++;
        magnitude++;
      }
    } else {
      fail("invalid number", start);
    }
    bool any_nonzero = nonzero_int;
    if (peek() == '.') {
      pos_++;
      if (!(peek() >= '0' && peek() <= '9')) fail("expected a digit after '.'", pos_);
      while (peek() >= '0' && peek() <= '9') {
        if (!any_nonzero) {
          if (peek() == '0') magnitude--;
          else any_nonzero = true;
        }
        pos_++;
      }
    }
    long exponent = 0;
    if (peek() == 'e' || peek() == 'E') {
      pos_++;
      bool negative = false;
      if (peek() == '+' || peek() == '-') negative = s_[pos_++] == '-';
      if (!(peek() >= '0' && peek() <= '9')) fail("expected a digit in exponent", pos_);
      while (peek() >= '0' && peek() <= '9') {
        if (exponent < 100000) exponent = exponent * 10 + (s_[pos_] - '0');
        pos_++;
      }
      if (negative) exponent = -exponent;
    }
    v.type = JsonValue::Type::Number;
    v.text = std::string(s_.substr(start, pos_ - start));
    double d = 0;
    auto r = std::from_chars(v.text.data(), v.text.data() + v.text.size(), d);  // locale-independent
    if (r.ec == std::errc::result_out_of_range) {
      // Tiny magnitudes underflow to (signed) zero, as JSON.parse does; huge ones are an error.
      if (!any_nonzero || magnitude + exponent <= 0) d = v.text[0] == '-' ? -0.0 : 0.0;
      else fail("number out of range", start);
    } else if (r.ec != std::errc() || r.ptr != v.text.data() + v.text.size()) {
      fail("invalid number", start);
    }
    v.number = d;
  }
};

}  // namespace

JsonValue json_parse(std::string_view text, int max_depth) {
  return Parser(text, max_depth).document();
}

void json_append_string(std::string& out, std::string_view s) {
  static const char* hex = "0123456789abcdef";
  out += '"';
  for (char ch : s) {
    unsigned char c = static_cast<unsigned char>(ch);
    switch (c) {
      case '"': out += "\\\""; break;
      case '\\': out += "\\\\"; break;
      case '\n': out += "\\n"; break;
      case '\r': out += "\\r"; break;
      case '\t': out += "\\t"; break;
      case '\b': out += "\\b"; break;
      case '\f': out += "\\f"; break;
      default:
        if (c < 0x20) {
          out += "\\u00";
          out += hex[c >> 4];
          out += hex[c & 15];
        } else {
          out += ch;
        }
    }
  }
  out += '"';
}

}  // namespace ts
