// Seeded fuzzing of the native readers that take bytes from disk: the safetensors reader
// (core/safetensors.h, every rule of the reference reader) and the JSON parser under it (core/json.h).
// Built with -DTS_SANITIZE=on (AddressSanitizer + UndefinedBehaviorSanitizer, no recovery), so a memory
// or UB error aborts the run with a report; test/reliability/native-fuzz.test.ts runs it.
//
// Every case is a file made from a valid one by one structural mutation (a rule of the format broken
// on purpose, or an edge the format allows) and sometimes random byte damage on top. Each case must
// end in acceptance or an EngineError with a code; anything else (another exception type, a crash, a
// case slower than --slow-ms) is a failure. Cases whose verdict is known (a valid file, or one that
// breaks a reference rule with nothing else touched) must get that verdict. Accepted files are read
// back whole (every tensor raw, the float ones converted).
//
//   fuzz-readers --cases N --seed S [--target safetensors|json|all] [--case I] [--emit DIR] [--slow-ms MS]
//
// --emit DIR writes each safetensors case to DIR/<index>-<accept|reject|any>.safetensors instead of only
// testing it, so the TypeScript reader can be run on the very same files. --case I replays one case.
// Output: one "FAIL ..." line per failure, then per target
//   TARGET <name> cases=<n> accepted=<n> rejected=<n> failures=<n> slowest_ms=<x> codes=<CODE:n,...>
// and the exit status is 1 when anything failed.
#include <sys/stat.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <map>
#include <string>
#include <vector>

#include "core/counter_rng.h"
#include "core/error.h"
#include "core/json.h"
#include "core/safetensors.h"

using namespace ts;

namespace {

// Deterministic per (seed, target, case): any case replays alone with --case.
struct Rng {
  uint64_t state;
  Rng(uint64_t seed, uint64_t target, uint64_t index)
      : state(splitmix64_hash(splitmix64_hash(seed ^ (target << 56)) ^ index)) {}
  uint64_t next() { return state = splitmix64_hash(state); }
  uint64_t below(uint64_t n) { return n == 0 ? 0 : next() % n; }
  bool chance(unsigned percent) { return below(100) < percent; }
  template <class T>
  const T& pick(const std::vector<T>& v) { return v[below(v.size())]; }
};

enum class Expect { Accept, Reject, Any };
const char* expect_name(Expect e) { return e == Expect::Accept ? "accept" : e == Expect::Reject ? "reject" : "any"; }

struct Stats {
  uint64_t cases = 0, accepted = 0, rejected = 0, failures = 0;
  double slowest_ms = 0;
  std::map<std::string, uint64_t> codes;
};

// ---- safetensors cases ------------------------------------------------------------------------------

struct Entry {
  std::string key;    // the JSON key literal, quotes included (raw bytes allowed)
  std::string value;  // the JSON value text
};

struct Case {
  std::vector<Entry> entries;  // header members in order
  std::string data;            // the data section
  std::string header_override; // when non-empty: the header text used instead of entries
  bool has_length_override = false;
  uint64_t length_override = 0;
  std::string padding = "";    // appended to the header text (counted in its length)
  size_t truncate_to = SIZE_MAX;  // file bytes kept
  bool truncate_data = false;     // cut the file somewhere inside the data section
  std::string trailing;        // bytes after the data section
  Expect expect = Expect::Accept;
  std::string what = "valid";
};

const std::vector<std::string> kDtypes = {"F32", "F16", "BF16", "F64", "I64", "I32", "I16", "I8", "U8", "BOOL",
                                           "U64", "U32", "U16", "F8_E4M3", "F8_E5M2"};

size_t dtype_bytes(const std::string& d) {
  if (d == "F64" || d == "I64" || d == "U64") return 8;
  if (d == "F32" || d == "I32" || d == "U32") return 4;
  if (d == "F16" || d == "BF16" || d == "I16" || d == "U16") return 2;
  return 1;
}

std::string json_string(const std::string& s) {
  std::string out;
  json_append_string(out, s);
  return out;
}

std::string tensor_value(const std::string& dtype, const std::vector<uint64_t>& shape, uint64_t begin, uint64_t end) {
  std::string v = "{\"dtype\":\"" + dtype + "\",\"shape\":[";
  for (size_t i = 0; i < shape.size(); i++) v += (i ? "," : "") + std::to_string(shape[i]);
  return v + "],\"data_offsets\":[" + std::to_string(begin) + "," + std::to_string(end) + "]}";
}

const std::vector<std::string> kNames = {
    "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight", "model.embed_tokens.weight", "lm_head.weight",
    "w", "", "x.y", "名前", "emoji😀", "tab\tname", "quote\"name", "back\\slash", "model.norm.weight"};

// A valid file: 0-6 tensors with contiguous offsets in a random member order, optional metadata.
Case valid_case(Rng& rng) {
  Case c;
  int n = int(rng.below(7));
  struct T { std::string name, dtype; std::vector<uint64_t> shape; uint64_t bytes; };
  std::vector<T> ts;
  for (int i = 0; i < n; i++) {
    T t;
    t.name = rng.pick(kNames) + (rng.chance(70) ? "." + std::to_string(i) : "");
    bool dup = false;
    for (const T& o : ts) dup |= o.name == t.name;
    if (dup) t.name += "#" + std::to_string(i);
    t.dtype = rng.pick(kDtypes);
    size_t rank = rng.below(4);
    uint64_t numel = 1;
    for (size_t k = 0; k < rank; k++) {
      uint64_t d = rng.chance(10) ? 0 : 1 + rng.below(6);
      t.shape.push_back(d);
      numel *= d;
    }
    t.bytes = numel * dtype_bytes(t.dtype);
    ts.push_back(t);
  }
  uint64_t offset = 0;
  std::vector<Entry> tensors;
  for (const T& t : ts) {
    tensors.push_back({json_string(t.name), tensor_value(t.dtype, t.shape, offset, offset + t.bytes)});
    for (uint64_t b = 0; b < t.bytes; b++) c.data += char(rng.next() & 0xff);
    offset += t.bytes;
  }
  // Members in any order: the offsets, not the header order, define the layout.
  for (size_t i = tensors.size(); i > 1; i--) std::swap(tensors[i - 1], tensors[rng.below(i)]);
  if (rng.chance(40)) {
    std::string meta = "{\"format\":\"pt\"";
    if (rng.chance(30)) meta += ",\"note\":" + json_string("ünïcode \"quoted\" \\ \n");
    tensors.insert(tensors.begin() + rng.below(tensors.size() + 1), Entry{"\"__metadata__\"", meta + "}"});
  }
  c.entries = tensors;
  if (rng.chance(50)) c.padding = std::string(rng.below(8), ' ');
  return c;
}

// Index of a random tensor entry (not __metadata__), or -1.
int tensor_index(Rng& rng, const Case& c) {
  std::vector<int> idx;
  for (size_t i = 0; i < c.entries.size(); i++)
    if (c.entries[i].key != "\"__metadata__\"") idx.push_back(int(i));
  return idx.empty() ? -1 : idx[rng.below(idx.size())];
}

// Replaces the text of one field of an entry value, e.g. field "shape" with "[-1]".
void set_field(Entry& e, const std::string& field, const std::string& text) {
  std::string key = "\"" + field + "\":";
  size_t at = e.value.find(key);
  if (at == std::string::npos) return;
  size_t start = at + key.size(), end = start;
  if (e.value[start] == '[') end = e.value.find(']', start) + 1;
  else if (e.value[start] == '"') end = e.value.find('"', start + 1) + 1;
  else while (end < e.value.size() && e.value[end] != ',' && e.value[end] != '}') end++;
  e.value.replace(start, end - start, text);
}

void remove_field(Entry& e, const std::string& field) {
  std::string key = "\"" + field + "\":";
  size_t at = e.value.find(key);
  if (at == std::string::npos) return;
  Entry tmp = e;
  set_field(tmp, field, "0");  // normalise the value to one character so the span is easy to cut
  at = tmp.value.find(key);
  size_t end = at + key.size() + 1;
  if (tmp.value[end] == ',') end++;
  else if (at > 0 && tmp.value[at - 1] == ',') at--;
  e.value = tmp.value.erase(at, end - at);
}

std::string deep(size_t levels) { return std::string(levels, '[') + std::string(levels, ']'); }

// Applies one structural mutation; sets what was done and the verdict it calls for.
void mutate(Rng& rng, Case& c) {
  int t = tensor_index(rng, c);
  const int kinds = 25;
  int kind = int(rng.below(kinds));
  auto reject = [&](const std::string& what) { c.expect = Expect::Reject; c.what = what; };
  auto accept = [&](const std::string& what) { c.expect = Expect::Accept; c.what = what; };
  switch (kind) {
    case 0: accept("valid"); return;
    case 1: {  // header length prefix lies
      std::vector<uint64_t> lies = {0, 1, 7, 100000001ull, ~0ull, 1ull << 63, 100000000ull, uint64_t(1) << 32};
      c.has_length_override = true;
      c.length_override = rng.chance(70) ? rng.pick(lies) : rng.next();
      reject("header length " + std::to_string(c.length_override));
      return;
    }
    case 2:
      if (c.data.empty()) { c.trailing = "x"; reject("trailing byte"); return; }
      c.truncate_data = true;
      reject("data section truncated");
      return;
    case 3: c.trailing = std::string(1 + rng.below(16), char(rng.next())); reject("trailing bytes after the data"); return;
    case 4:
      if (t < 0) break;
      set_field(c.entries[t], "dtype", rng.pick(std::vector<std::string>{"\"F31\"", "\"\"", "5", "null", "\"f32\"", "\"F32 \"", "[\"F32\"]"}));
      reject("unknown or non-string dtype");
      return;
    case 5:
      if (t < 0) break;
      set_field(c.entries[t], "shape", rng.pick(std::vector<std::string>{
          "[-1]", "[1.5]", "[1.0]", "[1e0]", "[\"3\"]", "[[1]]", "[null]", "[18446744073709551616]", "[-0]",
          "[4294967296,4294967296,4294967296]", "[9223372036854775808]", "[18446744073709551615,2]", "{}", "3"}));
      reject("bad shape");
      return;
    case 6:
      if (t < 0) break;
      set_field(c.entries[t], "data_offsets", rng.pick(std::vector<std::string>{
          "[0]", "[0,0,0]", "[]", "[-1,0]", "[0.0,4]", "\"0,4\"", "[0,18446744073709551615]", "[18446744073709551616,0]",
          "[null,null]", "[0,4e0]", "{}"}));
      c.expect = Expect::Reject;
      c.what = "malformed data_offsets";
      return;
    case 7: {  // offsets reversed, shifted (gap or overlap), or running past the end
      if (t < 0) break;
      std::string v = c.entries[t].value;
      size_t at = v.find("\"data_offsets\":[") + 16;
      uint64_t b = std::strtoull(v.c_str() + at, nullptr, 10);
      uint64_t e = std::strtoull(v.c_str() + v.find(',', at) + 1, nullptr, 10);
      int how = int(rng.below(4));
      std::string text = how == 0 ? "[" + std::to_string(e) + "," + std::to_string(b) + "]"
                       : how == 1 ? "[" + std::to_string(b + 1) + "," + std::to_string(e + 1) + "]"
                       : how == 2 ? (b > 0 ? "[" + std::to_string(b - 1) + "," + std::to_string(e - 1) + "]" : "[0," + std::to_string(e + 1) + "]")
                                  : "[" + std::to_string(b) + "," + std::to_string(e + 1000) + "]";
      set_field(c.entries[t], "data_offsets", text);
      // A zero-sized tensor may move to where another one starts or ends and still tile the data.
      if (b == e && how != 3) { c.expect = Expect::Any; c.what = "zero-sized tensor moved"; return; }
      reject(how == 0 ? "offsets reversed" : how == 1 ? "gap before a tensor" : how == 2 ? "overlapping tensors" : "offsets past the end");
      return;
    }
    case 8: {  // duplicate tensor name
      if (t < 0) break;
      Entry copy = c.entries[t];
      c.entries.insert(c.entries.begin() + rng.below(c.entries.size() + 1), copy);
      reject("duplicate tensor name");
      return;
    }
    case 9: {
      int how = int(rng.below(4));
      if (how == 0) c.entries.push_back({"\"__metadata__\"", "{\"a\":\"b\"}"}), c.entries.push_back({"\"__metadata__\"", "{}"});
      if (how == 1) c.entries.push_back({"\"__metadata__\"", rng.pick(std::vector<std::string>{"[]", "\"x\"", "1", "null"})});
      if (how == 2) c.entries.push_back({"\"__metadata__\"", rng.pick(std::vector<std::string>{"{\"a\":1}", "{\"a\":null}", "{\"a\":{}}", "{\"a\":[\"b\"]}"})});
      if (how == 3) { c.entries.push_back({"\"__metadata__\"", "{\"a\":\"b\",\"a\":\"c\"}"}); c.expect = Expect::Any; c.what = "duplicate metadata key"; return; }
      reject("bad __metadata__");
      return;
    }
    case 10:
      c.header_override = rng.pick(std::vector<std::string>{"[]", "\"x\"", "1", "null", "true", "[{}]"});
      reject("header is not an object");
      return;
    case 11: {  // invalid UTF-8 in a key or a metadata value
      std::string bad = rng.pick(std::vector<std::string>{"\xff", "\xc0\x80", "\xed\xa0\x80", "\xe2\x82", "\xf4\x90\x80\x80", "\x80"});
      // A zero-sized tensor or a metadata entry: legal but for the bytes.
      if (rng.chance(50)) c.entries.push_back({"\"bad" + bad + "\"", tensor_value("U8", {0}, 0, 0)});
      else c.entries.push_back({"\"__metadata__\"", "{\"k\":\"v" + bad + "\"}"});
      reject("invalid UTF-8");
      return;
    }
    case 12: {  // JSON syntax damage
      int how = int(rng.below(9));
      std::string h = "{";
      for (size_t i = 0; i < c.entries.size(); i++) h += (i ? "," : "") + c.entries[i].key + ":" + c.entries[i].value;
      h += "}";
      if (how == 0) h.insert(h.size() - 1, ",");
      if (how == 1) h.pop_back();
      if (how == 2) h += "x";
      if (how == 3) h.insert(1, "/*c*/");
      if (how == 4) h = "{'a':1}";
      if (how == 5) h.insert(h.size() - 1, std::string(c.entries.empty() ? "" : ",") + "\"ctl\x01\":{}");
      if (how == 6) h.insert(h.size() - 1, std::string(c.entries.empty() ? "" : ",") + "\"\\ud800\":{}");
      if (how == 7) h.insert(h.size() - 1, std::string(c.entries.empty() ? "" : ",") + "\"n\":01");
      if (how == 8) h.insert(h.size() - 1, std::string(c.entries.empty() ? "" : ",") + "\"n\":NaN");
      c.header_override = h;
      reject("JSON syntax error");
      return;
    }
    case 13: {  // deep nesting
      size_t levels = rng.chance(50) ? 10 + rng.below(20) : 1000 + rng.below(200000);
      c.entries.push_back({"\"deep\"", deep(levels)});
      reject("deeply nested value");
      return;
    }
    case 14:
      if (t < 0) break;
      if (rng.chance(25)) c.entries[t].value = rng.pick(std::vector<std::string>{"[]", "1", "\"x\"", "null"});
      else remove_field(c.entries[t], rng.pick(std::vector<std::string>{"dtype", "shape", "data_offsets"}));
      reject("entry missing a field or not an object");
      return;
    case 15: {  // shape and dtype no longer match the offsets' size
      if (t < 0) break;
      std::string v = c.entries[t].value;
      std::string dtype = v.substr(v.find("\"dtype\":\"") + 9, v.find('"', v.find("\"dtype\":\"") + 9) - v.find("\"dtype\":\"") - 9);
      size_t at = v.find("\"data_offsets\":[") + 16;
      uint64_t b = std::strtoull(v.c_str() + at, nullptr, 10);
      uint64_t e = std::strtoull(v.c_str() + v.find(',', at) + 1, nullptr, 10);
      uint64_t elems = (e - b) / dtype_bytes(dtype);
      set_field(c.entries[t], "shape", "[" + std::to_string(elems + 1) + "]");
      reject("shape x dtype != offsets");
      return;
    }
    case 16:  // a large but legal header (padding); whitespace of every JSON kind
      c.padding = std::string(rng.chance(50) ? 1 + rng.below(64) : 1000000 + rng.below(1000000), rng.pick(std::vector<char>{' ', '\t', '\n', '\r'}));
      accept("long whitespace padding");
      return;
    case 17:
      c.padding = std::string(1 + rng.below(8), '\0');
      reject("NUL padding");
      return;
    case 18:  // empty header
      c.entries.clear();
      c.data.clear();
      if (rng.chance(50)) { c.trailing = "z"; reject("empty header, trailing data"); return; }
      accept("empty header");
      return;
    case 19:  // unknown fields inside an entry are ignored (as serde does)
      if (t < 0) break;
      c.entries[t].value.insert(c.entries[t].value.size() - 1, ",\"extra\":[1,{\"x\":null}]");
      accept("extra field in an entry");
      return;
    case 20:  // random bytes as the header
      c.header_override.clear();
      for (size_t i = 0, n = 1 + rng.below(200); i < n; i++) c.header_override += char(rng.next());
      c.expect = Expect::Any;
      c.what = "random header bytes";
      return;
    case 21: {  // huge dimensions: overflowing, or not matching the offsets
      if (t < 0) break;
      std::string shape = rng.pick(std::vector<std::string>{"[4294967296,4294967296]", "[9223372036854775807,2]",
                                                            "[0,18446744073709551615]", "[3037000500,3037000500]"});
      set_field(c.entries[t], "shape", shape);
      // A zero dimension makes the product 0 before it can overflow (the reference folds the same way):
      // legal when the tensor's offsets span 0 bytes.
      if (shape == "[0,18446744073709551615]") { c.expect = Expect::Any; c.what = "huge shape with a zero dimension"; return; }
      reject("overflowing or oversized shape");
      return;
    }
    case 22:  // file shorter than 8 bytes
      c.truncate_to = rng.below(8);
      c.data.clear();
      c.entries.clear();
      reject("file shorter than 8 bytes");
      return;
    case 23:  // a field written twice (the reference refuses it; a lenient parser keeps one of them)
      if (t < 0) break;
      c.entries[t].value.insert(c.entries[t].value.size() - 1, rng.chance(50) ? ",\"dtype\":\"U8\"" : ",\"shape\":[0]");
      reject("repeated field in an entry");
      return;
    default:  // escaped names: the same name written two ways is a duplicate
      c.entries.push_back({"\"\\u0077\"", tensor_value("U8", {}, 0, 0)});
      c.entries.push_back({"\"w\"", tensor_value("U8", {0}, 0, 0)});
      reject("duplicate name via an escape");
      return;
  }
  accept("valid (mutation not applicable)");
}

std::string file_bytes(Rng& rng, Case& c) {
  std::string header = c.header_override;
  if (header.empty()) {
    header = "{";
    for (size_t i = 0; i < c.entries.size(); i++) header += (i ? "," : "") + c.entries[i].key + ":" + c.entries[i].value;
    header += "}";
  }
  header += c.padding;
  uint64_t n = c.has_length_override ? c.length_override : header.size();
  if (c.has_length_override && n == header.size()) c.expect = Expect::Any;  // the "lie" happens to be true
  std::string out(8, '\0');
  for (int i = 0; i < 8; i++) out[i] = char((n >> (8 * i)) & 0xff);
  out += header + c.data + c.trailing;
  if (c.truncate_data) out.resize(8 + header.size() + rng.below(c.data.size()));
  else if (c.truncate_to != SIZE_MAX && c.truncate_to < out.size()) out.resize(c.truncate_to);
  return out;
}

// Random byte damage on top of a case (then its verdict is unknown).
void damage(Rng& rng, std::string& bytes, Case& c) {
  int edits = 1 + int(rng.below(4));
  for (int i = 0; i < edits && !bytes.empty(); i++) {
    size_t at = rng.below(bytes.size());
    switch (rng.below(4)) {
      case 0: bytes[at] = char(rng.next()); break;
      case 1: bytes.insert(at, 1, char(rng.next())); break;
      case 2: bytes.erase(at, 1); break;
      default: bytes[at] ^= char(1u << rng.below(8)); break;
    }
  }
  c.expect = Expect::Any;
  c.what += " + byte damage";
}

void write_file(const std::string& path, const std::string& bytes) {
  FILE* f = std::fopen(path.c_str(), "wb");
  if (!f || std::fwrite(bytes.data(), 1, bytes.size(), f) != bytes.size() || std::fclose(f) != 0) {
    std::fprintf(stderr, "cannot write %s\n", path.c_str());
    std::exit(2);
  }
}

// Opens and reads back a file; returns "" on acceptance or the error code. Throws what is not an EngineError.
std::string read_whole(const std::string& path, std::string* problem) {
  try {
    SafetensorsReader reader(path);
    uint64_t expected = 0;
    for (const TensorInfo& t : reader.tensors()) {
      if (t.begin != expected || t.end < t.begin) *problem = "accepted a file whose offsets do not tile the data";
      expected = t.end;
      if (reader.find(t.name) != &t) *problem = "find() does not return the tensor it lists";
      std::vector<uint8_t> raw(t.end - t.begin);
      reader.read_raw(t, raw.data());
      if (t.dtype == DType::F32 || t.dtype == DType::F16 || t.dtype == DType::BF16 || t.dtype == DType::F64) {
        std::vector<float> values(size_t(t.numel()));
        reader.read_f32(t, values.data());
      }
    }
    return "";
  } catch (const EngineError& e) {
    if (e.code.empty() || std::strlen(e.what()) == 0) *problem = "an error without a code or message";
    return e.code;
  }
}

// ---- JSON cases ------------------------------------------------------------------------------------

const std::vector<std::string> kJsonSeeds = {
    "{\"peft_type\":\"LORA\",\"r\":16,\"lora_alpha\":32,\"target_modules\":[\"q_proj\",\"v_proj\"],\"lora_dropout\":0.05}",
    "{\"hidden_size\":4096,\"rope_scaling\":{\"factor\":8.0,\"rope_type\":\"llama3\"},\"eos_token_id\":[128001,128008,128009]}",
    "[1,-2,3.5e-7,1E+300,0,-0.0,true,false,null,\"\\u00e9\\ud83d\\ude00\\n\\t\\\"\"]",
    "{\"a\":{\"b\":{\"c\":[[[]]]}},\"\":\"\",\"x\":\"\\u0000\"}",
    "\"just a string\"", "12345678901234567890123", "{\"step\":12,\"loss\":1.25,\"rng\":[1,2,3,4]}"};

std::string json_case(Rng& rng) {
  std::string s = rng.pick(kJsonSeeds);
  int edits = int(rng.below(5));
  const std::vector<std::string> tokens = {"{", "}", "[", "]", ",", ":", "\"", "\\", "\\u", "\\ud800", "\\udc00", "e", "E", "-", "+",
                                           ".", "0", "00", "1e999", "-1e-999", "true", "nul", "\xff", "\xc3", "\xe2\x82\xac", " ", "\n", "\x01"};
  for (int i = 0; i < edits; i++) {
    size_t at = rng.below(s.size() + 1);
    switch (rng.below(4)) {
      case 0: s.insert(at, rng.pick(tokens)); break;
      case 1: if (!s.empty()) s.erase(at < s.size() ? at : s.size() - 1, 1 + rng.below(3)); break;
      case 2: if (!s.empty()) s[at < s.size() ? at : s.size() - 1] = char(rng.next()); break;
      default: s.insert(at, rng.chance(50) ? deep(rng.below(100)) : std::string(rng.below(40), rng.chance(50) ? '[' : '{')); break;
    }
  }
  return s;
}

// ---- the driver ------------------------------------------------------------------------------------

double ms_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
}

void fail(Stats& s, const char* target, uint64_t index, const std::string& what) {
  s.failures++;
  std::printf("FAIL %s case %llu: %s\n", target, (unsigned long long)index, what.c_str());
  std::fflush(stdout);
}

void run_safetensors(uint64_t seed, uint64_t first, uint64_t count, const std::string& dir, const std::string& emit,
                     double slow_ms, Stats& s) {
  for (uint64_t i = first; i < first + count; i++) {
    Rng rng(seed, 1, i);
    Case c = valid_case(rng);
    mutate(rng, c);
    std::string bytes = file_bytes(rng, c);
    if (rng.chance(15)) damage(rng, bytes, c);
    const std::string path = emit.empty() ? dir + "/case.safetensors"
                                          : emit + "/" + std::to_string(i) + "-" + expect_name(c.expect) + ".safetensors";
    write_file(path, bytes);
    auto t0 = std::chrono::steady_clock::now();
    std::string problem;
    std::string code;
    try {
      code = read_whole(path, &problem);
    } catch (const std::exception& e) {
      fail(s, "safetensors", i, std::string("threw a non-EngineError: ") + e.what() + " (" + c.what + ")");
      continue;
    }
    double ms = ms_since(t0);
    s.cases++;
    s.slowest_ms = std::max(s.slowest_ms, ms);
    if (code.empty()) s.accepted++;
    else s.rejected++, s.codes[code]++;
    if (!problem.empty()) fail(s, "safetensors", i, problem + " (" + c.what + ")");
    if (c.expect == Expect::Accept && !code.empty()) fail(s, "safetensors", i, "a valid file was refused with " + code + " (" + c.what + ")");
    if (c.expect == Expect::Reject && code.empty()) fail(s, "safetensors", i, "an invalid file was accepted (" + c.what + ")");
    if (ms > slow_ms) fail(s, "safetensors", i, "took " + std::to_string(ms) + " ms (" + c.what + ")");
  }
}

void run_json(uint64_t seed, uint64_t first, uint64_t count, double slow_ms, Stats& s) {
  for (uint64_t i = first; i < first + count; i++) {
    Rng rng(seed, 2, i);
    std::string doc = json_case(rng);
    auto t0 = std::chrono::steady_clock::now();
    try {
      JsonValue v = json_parse(doc, int(1 + rng.below(64)));
      s.accepted++;
      // What parsed must serialise back to valid UTF-8 (the parser promises decoded UTF-8 strings).
      if (v.is_string() && !utf8_valid(v.text.data(), v.text.size())) fail(s, "json", i, "a parsed string is not valid UTF-8");
    } catch (const EngineError& e) {
      s.rejected++;
      s.codes[e.code]++;
    } catch (const std::exception& e) {
      fail(s, "json", i, std::string("threw a non-EngineError: ") + e.what());
    }
    s.cases++;
    double ms = ms_since(t0);
    s.slowest_ms = std::max(s.slowest_ms, ms);
    if (ms > slow_ms) fail(s, "json", i, "took " + std::to_string(ms) + " ms");
  }
}

void report(const char* name, const Stats& s) {
  std::string codes;
  for (const auto& [k, v] : s.codes) codes += (codes.empty() ? "" : ",") + k + ":" + std::to_string(v);
  std::printf("TARGET %s cases=%llu accepted=%llu rejected=%llu failures=%llu slowest_ms=%.1f codes=%s\n", name,
              (unsigned long long)s.cases, (unsigned long long)s.accepted, (unsigned long long)s.rejected,
              (unsigned long long)s.failures, s.slowest_ms, codes.c_str());
}

}  // namespace

int main(int argc, char** argv) {
  uint64_t cases = 1000, seed = 1, only = UINT64_MAX;
  std::string target = "all", emit;
  double slow_ms = 2000;
  for (int i = 1; i + 1 < argc; i += 2) {
    std::string a = argv[i], v = argv[i + 1];
    if (a == "--cases") cases = std::strtoull(v.c_str(), nullptr, 10);
    else if (a == "--seed") seed = std::strtoull(v.c_str(), nullptr, 10);
    else if (a == "--case") only = std::strtoull(v.c_str(), nullptr, 10);
    else if (a == "--target") target = v;
    else if (a == "--emit") emit = v;
    else if (a == "--slow-ms") slow_ms = std::strtod(v.c_str(), nullptr);
    else { std::fprintf(stderr, "unknown option %s\n", a.c_str()); return 2; }
  }
  char tmpl[] = "/tmp/fuzz-readers-XXXXXX";
  if (!mkdtemp(tmpl)) { std::perror("mkdtemp"); return 2; }
  const std::string dir = tmpl;
  const uint64_t first = only == UINT64_MAX ? 0 : only, count = only == UINT64_MAX ? cases : 1;
  uint64_t failures = 0;
  if (target == "all" || target == "safetensors") {
    Stats s;
    run_safetensors(seed, first, count, dir, emit, slow_ms, s);
    report("safetensors", s);
    failures += s.failures;
  }
  if (target == "all" || target == "json") {
    Stats s;
    run_json(seed, first, count, slow_ms, s);
    report("json", s);
    failures += s.failures;
  }
  ::unlink((dir + "/case.safetensors").c_str());
  ::rmdir(dir.c_str());
  return failures == 0 ? 0 : 1;
}
