// safetensors reader (validating, pread-based) and atomic streaming writer. The checks and their order
// follow the reference implementation (huggingface/safetensors, Metadata::validate) so that a file
// accepted here loads everywhere else and vice versa.
#include "core/safetensors.h"

#include <errno.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <set>

#include "core/error.h"
#include "core/json.h"

namespace ts {

namespace {

constexpr uint64_t MAX_HEADER_BYTES = 100000000;  // the reference reader's limit

[[noreturn]] void invalid(const std::string& path, const std::string& problem) {
  throw EngineError("INVALID_SAFETENSORS", path + ": " + problem);
}

[[noreturn]] void io_error(const std::string& path, const std::string& what, int err) {
  throw EngineError("IO_ERROR", path + ": " + what + ": " + std::strerror(err));
}

// Reads exactly n bytes at `offset`; retries short reads and EINTR.
void pread_all(int fd, const std::string& path, void* dst, size_t n, uint64_t offset) {
  auto* p = static_cast<uint8_t*>(dst);
  while (n > 0) {
    size_t chunk = std::min<size_t>(n, size_t(1) << 30);  // Linux caps a single read near 2 GiB
    ssize_t got = ::pread(fd, p, chunk, off_t(offset));
    if (got < 0) {
      if (errno == EINTR) continue;
      io_error(path, "read failed", errno);
    }
    if (got == 0) throw EngineError("IO_ERROR", path + ": unexpected end of file (was it truncated while open?)");
    p += got;
    n -= size_t(got);
    offset += uint64_t(got);
  }
}

void write_all(int fd, const std::string& path, const void* src, size_t n) {
  const auto* p = static_cast<const uint8_t*>(src);
  while (n > 0) {
    size_t chunk = std::min<size_t>(n, size_t(1) << 30);
    ssize_t put = ::write(fd, p, chunk);
    if (put < 0) {
      if (errno == EINTR) continue;
      io_error(path, "write failed", errno);
    }
    p += put;
    n -= size_t(put);
  }
}

std::string shape_string(const std::vector<int64_t>& shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); i++) s += (i ? "," : "") + std::to_string(shape[i]);
  return s + "]";
}

std::string quoted(const std::string& name) { return "'" + name + "'"; }

// numel * dtype size with overflow detection; false when it does not fit in uint64.
bool byte_size(const std::vector<int64_t>& shape, DType dtype, uint64_t* out) {
  uint64_t n = 1;
  for (int64_t d : shape) {
    if (d < 0 || __builtin_mul_overflow(n, uint64_t(d), &n)) return false;
  }
  return !__builtin_mul_overflow(n, uint64_t(dtype_size(dtype)), out);
}

}  // namespace

int64_t TensorInfo::numel() const {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

SafetensorsReader::SafetensorsReader(const std::string& path) : path_(path) {
  fd_ = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd_ < 0) io_error(path, "cannot open", errno);
  try {
    struct stat st;
    if (::fstat(fd_, &st) != 0) io_error(path, "cannot stat", errno);
    if (!S_ISREG(st.st_mode)) throw EngineError("IO_ERROR", path + ": not a regular file");
    const uint64_t file_size = uint64_t(st.st_size);

    if (file_size < 8) invalid(path, "file is " + std::to_string(file_size) + " bytes, shorter than the 8-byte header length");
    uint8_t prefix[8];
    pread_all(fd_, path, prefix, 8, 0);
    uint64_t n = 0;
    for (int i = 7; i >= 0; i--) n = (n << 8) | prefix[i];  // little-endian u64
    if (n > MAX_HEADER_BYTES)
      invalid(path, "header length " + std::to_string(n) + " exceeds the limit of " + std::to_string(MAX_HEADER_BYTES) + " bytes");
    if (8 + n > file_size)
      invalid(path, "header length " + std::to_string(n) + " runs past the end of the file (" + std::to_string(file_size) + " bytes)");
    data_start_ = 8 + n;

    std::string header(n, '\0');
    pread_all(fd_, path, header.data(), n, 8);
    size_t bad = 0;
    if (!utf8_valid(header.data(), header.size(), &bad))
      invalid(path, "header is not valid UTF-8 (bad byte at header offset " + std::to_string(bad) + ")");
    JsonValue root;
    try {
      root = json_parse(header, 16);  // a valid header nests 3 deep
    } catch (const EngineError& e) {
      invalid(path, std::string("header is not valid JSON: ") + e.what());
    }
    if (!root.is_object()) invalid(path, "header is not a JSON object");

    bool seen_metadata = false;
    for (const auto& [name, entry] : root.members) {
      if (name == "__metadata__") {
        if (seen_metadata) invalid(path, "duplicate name '__metadata__'");
        seen_metadata = true;
        if (!entry.is_object()) invalid(path, "__metadata__ must be a map of strings to strings");
        for (const auto& [key, value] : entry.members) {
          if (!value.is_string())
            invalid(path, "__metadata__ must be a map of strings to strings (value of " + quoted(key) + " is not a string)");
          if (!metadata_.emplace(key, value.text).second) invalid(path, "duplicate __metadata__ key " + quoted(key));
        }
        continue;
      }
      if (index_.count(name)) invalid(path, "duplicate tensor name " + quoted(name));
      if (!entry.is_object()) invalid(path, "tensor " + quoted(name) + ": entry is not a JSON object");
      // json_parse keeps repeated keys; the reference refuses a repeated field ("dtype" twice).
      std::set<std::string> fields;
      for (const auto& member : entry.members)
        if (!fields.insert(member.first).second) invalid(path, "tensor " + quoted(name) + ": duplicate key " + quoted(member.first));

      TensorInfo t;
      t.name = name;
      const JsonValue* dtype = entry.find("dtype");
      if (!dtype || !dtype->is_string()) invalid(path, "tensor " + quoted(name) + ": missing or non-string \"dtype\"");
      if (!dtype_from_name(dtype->text, &t.dtype))
        invalid(path, "tensor " + quoted(name) + ": unknown dtype " + quoted(dtype->text));

      const JsonValue* shape = entry.find("shape");
      if (!shape || !shape->is_array()) invalid(path, "tensor " + quoted(name) + ": missing or non-array \"shape\"");
      for (const JsonValue& d : shape->items) {
        uint64_t v = 0;
        if (!d.as_u64(&v)) invalid(path, "tensor " + quoted(name) + ": shape entries must be non-negative integers");
        if (v > uint64_t(INT64_MAX)) invalid(path, "tensor " + quoted(name) + ": shape overflows (dimension " + d.text + ")");
        t.shape.push_back(int64_t(v));
      }

      const JsonValue* offsets = entry.find("data_offsets");
      if (!offsets || !offsets->is_array() || offsets->items.size() != 2 || !offsets->items[0].as_u64(&t.begin) ||
          !offsets->items[1].as_u64(&t.end))
        invalid(path, "tensor " + quoted(name) + ": \"data_offsets\" must be two non-negative integers [begin, end]");

      index_.emplace(name, tensors_.size());
      tensors_.push_back(std::move(t));
    }

    // Offsets must tile [0, data size) in file order: sort by (begin, end) as the reference does.
    std::stable_sort(tensors_.begin(), tensors_.end(), [](const TensorInfo& a, const TensorInfo& b) {
      return a.begin != b.begin ? a.begin < b.begin : a.end < b.end;
    });
    uint64_t expected = 0;
    for (size_t i = 0; i < tensors_.size(); i++) {
      const TensorInfo& t = tensors_[i];
      index_[t.name] = i;
      if (t.end < t.begin)
        invalid(path, "tensor " + quoted(t.name) + ": data_offsets end " + std::to_string(t.end) + " < begin " + std::to_string(t.begin));
      if (t.begin != expected)
        invalid(path, "tensor " + quoted(t.name) + ": data_offsets not contiguous (begins at " + std::to_string(t.begin) +
                          ", previous tensor ends at " + std::to_string(expected) + ")");
      expected = t.end;
      uint64_t bytes = 0;
      if (!byte_size(t.shape, t.dtype, &bytes))
        invalid(path, "tensor " + quoted(t.name) + ": shape " + shape_string(t.shape) + " x " + dtype_name(t.dtype) + " size overflows");
      if (bytes != t.end - t.begin)
        invalid(path, "tensor " + quoted(t.name) + ": shape " + shape_string(t.shape) + " of " + dtype_name(t.dtype) + " needs " +
                          std::to_string(bytes) + " bytes but data_offsets span " + std::to_string(t.end - t.begin));
    }
    const uint64_t data_size = file_size - data_start_;
    if (expected > data_size)
      invalid(path, "file is truncated: the data section needs " + std::to_string(expected) + " bytes but only " +
                        std::to_string(data_size) + " follow the header");
    if (expected < data_size)
      invalid(path, std::to_string(data_size - expected) + " trailing bytes after the last tensor (data ends at " +
                        std::to_string(expected) + ", data section is " + std::to_string(data_size) + " bytes)");
  } catch (...) {
    ::close(fd_);
    fd_ = -1;
    throw;
  }
}

SafetensorsReader::~SafetensorsReader() {
  if (fd_ >= 0) ::close(fd_);
}

const TensorInfo* SafetensorsReader::find(const std::string& name) const {
  auto it = index_.find(name);
  return it == index_.end() ? nullptr : &tensors_[it->second];
}

void SafetensorsReader::read_raw(const TensorInfo& t, void* dst) const {
  pread_all(fd_, path_, dst, size_t(t.end - t.begin), data_start_ + t.begin);
}

void SafetensorsReader::read_f32(const TensorInfo& t, float* dst) const {
  if (t.dtype != DType::F32 && t.dtype != DType::F16 && t.dtype != DType::BF16 && t.dtype != DType::F64)
    throw EngineError("UNSUPPORTED", path_ + ": tensor " + quoted(t.name) + " has dtype " + dtype_name(t.dtype) +
                                               ", not a float type");
  const size_t n = size_t(t.numel());
  if (t.dtype == DType::F32) {
    pread_all(fd_, path_, dst, n * 4, data_start_ + t.begin);
    return;
  }
  // Convert in bounded chunks so a large bf16 tensor never needs a second full-size buffer.
  const size_t elem = dtype_size(t.dtype);
  const size_t chunk = size_t(1) << 20;  // elements
  std::vector<uint8_t> buf(std::min(n, chunk) * elem);
  for (size_t i = 0; i < n; i += chunk) {
    size_t m = std::min(chunk, n - i);
    pread_all(fd_, path_, buf.data(), m * elem, data_start_ + t.begin + i * elem);
    convert_to_f32(dst + i, buf.data(), t.dtype, m);
  }
}

std::vector<float> SafetensorsReader::read_f32(const std::string& name) const {
  const TensorInfo* t = find(name);
  if (!t) throw EngineError("NOT_FOUND", path_ + ": no tensor named " + quoted(name));
  std::vector<float> out(size_t(t->numel()));
  read_f32(*t, out.data());
  return out;
}

void write_safetensors(const std::string& path, const std::vector<TensorDecl>& decls,
                       const std::map<std::string, std::string>& metadata,
                       const std::function<void(size_t index, std::vector<uint8_t>& bytes)>& fill) {
  // Validate everything the reader would reject before a byte is written.
  auto bad = [&](const std::string& problem) { throw EngineError("INVALID_ARGUMENT", path + ": " + problem); };
  std::vector<uint64_t> sizes(decls.size());  // (n tensors) byte size of each tensor
  std::set<std::string> names;
  for (size_t i = 0; i < decls.size(); i++) {
    const TensorDecl& d = decls[i];
    if (d.name == "__metadata__") bad("'__metadata__' is reserved and cannot name a tensor");
    if (!utf8_valid(d.name.data(), d.name.size())) bad("tensor name is not valid UTF-8");
    if (!names.insert(d.name).second) bad("duplicate tensor name " + quoted(d.name));
    if (!byte_size(d.shape, d.dtype, &sizes[i])) bad("tensor " + quoted(d.name) + ": invalid or overflowing shape " + shape_string(d.shape));
  }
  for (const auto& [k, v] : metadata) {
    if (!utf8_valid(k.data(), k.size()) || !utf8_valid(v.data(), v.size())) bad("metadata is not valid UTF-8");
  }

  // Header: metadata first, then tensors in declaration order with contiguous offsets.
  std::string header = "{";
  bool first = true;
  if (!metadata.empty()) {
    header += "\"__metadata__\":{";
    bool first_meta = true;
    for (const auto& [k, v] : metadata) {
      if (!first_meta) header += ',';
      first_meta = false;
      json_append_string(header, k);
      header += ':';
      json_append_string(header, v);
    }
    header += '}';
    first = false;
  }
  uint64_t offset = 0;
  for (size_t i = 0; i < decls.size(); i++) {
    if (!first) header += ',';
    first = false;
    json_append_string(header, decls[i].name);
    header += ":{\"dtype\":\"";
    header += dtype_name(decls[i].dtype);
    header += "\",\"shape\":";
    header += shape_string(decls[i].shape);
    header += ",\"data_offsets\":[" + std::to_string(offset) + "," + std::to_string(offset + sizes[i]) + "]}";
    offset += sizes[i];
  }
  header += '}';
  // Pad with spaces so the data section starts 8-byte aligned (8-byte prefix + multiple of 8).
  header.append((8 - header.size() % 8) % 8, ' ');
  if (header.size() > MAX_HEADER_BYTES) bad("header would exceed " + std::to_string(MAX_HEADER_BYTES) + " bytes");

  // A per-process counter keeps concurrent writes of one path from sharing a temp file.
  static std::atomic<uint64_t> counter{0};
  const std::string tmp = path + ".tmp-" + std::to_string(::getpid()) + "-" + std::to_string(counter++);
  int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) io_error(tmp, "cannot create", errno);
  try {
    uint8_t prefix[8];
    uint64_t n = header.size();
    for (int i = 0; i < 8; i++) prefix[i] = uint8_t(n >> (8 * i));
    write_all(fd, tmp, prefix, 8);
    write_all(fd, tmp, header.data(), header.size());
    std::vector<uint8_t> bytes;
    for (size_t i = 0; i < decls.size(); i++) {
      bytes.clear();
      fill(i, bytes);
      if (bytes.size() != sizes[i])
        bad("tensor " + quoted(decls[i].name) + ": got " + std::to_string(bytes.size()) + " bytes, expected " + std::to_string(sizes[i]));
      write_all(fd, tmp, bytes.data(), bytes.size());
    }
    if (::fsync(fd) != 0) io_error(tmp, "fsync failed", errno);
    int rc = ::close(fd);
    fd = -1;
    if (rc != 0) io_error(tmp, "close failed", errno);
    if (::rename(tmp.c_str(), path.c_str()) != 0) io_error(path, "rename from " + tmp + " failed", errno);
  } catch (...) {
    if (fd >= 0) ::close(fd);
    ::unlink(tmp.c_str());
    throw;
  }
  // Make the rename itself durable; a failure here leaves a complete file, so it is not fatal.
  std::string dir = path.find('/') == std::string::npos ? "." : path.substr(0, path.rfind('/'));
  if (dir.empty()) dir = "/";
  int dfd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dfd >= 0) {
    ::fsync(dfd);
    ::close(dfd);
  }
}

}  // namespace ts
