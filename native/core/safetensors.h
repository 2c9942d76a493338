// safetensors reader and writer (https://huggingface.co/docs/safetensors). The reader validates the
// whole header the way the reference implementation does before any tensor is touched, and reads
// tensors with pread, so a multi-gigabyte shard is never held in memory at once.
#pragma once
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "core/dtype.h"

namespace ts {

struct TensorInfo {
  std::string name;
  DType dtype;
  std::vector<int64_t> shape;
  uint64_t begin = 0, end = 0;  // byte offsets relative to the data section
  int64_t numel() const;
};

class SafetensorsReader {
 public:
  // Opens and validates `path`. Throws EngineError("INVALID_SAFETENSORS", "<path>: <problem>") on:
  // file < 8 bytes, header length > 100,000,000 or past the end, non-UTF-8/non-JSON header, duplicate
  // names, unknown dtype, offsets not contiguous from 0 or end < begin, shape*dtype size overflowing
  // or != end-begin, data not ending exactly at the end of the file. IO_ERROR when it cannot be read.
  explicit SafetensorsReader(const std::string& path);
  ~SafetensorsReader();
  SafetensorsReader(const SafetensorsReader&) = delete;
  SafetensorsReader& operator=(const SafetensorsReader&) = delete;

  const std::string& path() const { return path_; }
  const std::vector<TensorInfo>& tensors() const { return tensors_; }  // in file (offset) order
  const TensorInfo* find(const std::string& name) const;              // nullptr when absent
  const std::map<std::string, std::string>& metadata() const { return metadata_; }

  // Reads the raw bytes of a tensor (size end-begin) into dst.
  void read_raw(const TensorInfo& t, void* dst) const;
  // Reads a tensor converted to float32 into dst (numel floats). F32/F16/BF16/F64 only.
  void read_f32(const TensorInfo& t, float* dst) const;
  std::vector<float> read_f32(const std::string& name) const;  // throws if absent

 private:
  std::string path_;
  int fd_ = -1;
  uint64_t data_start_ = 0;
  std::vector<TensorInfo> tensors_;
  std::map<std::string, size_t> index_;
  std::map<std::string, std::string> metadata_;
};

// Streaming writer: the caller declares every tensor (name, dtype, shape) up front, then supplies
// each tensor's bytes in declaration order through `fill`. The file is written to "<path>.tmp-<pid>-<n>",
// fsync'ed and renamed over `path`, so a crash never leaves a half-written file at `path`.
struct TensorDecl {
  std::string name;
  DType dtype;
  std::vector<int64_t> shape;
};
void write_safetensors(const std::string& path, const std::vector<TensorDecl>& decls,
                       const std::map<std::string, std::string>& metadata,
                       const std::function<void(size_t index, std::vector<uint8_t>& bytes)>& fill);

}  // namespace ts
