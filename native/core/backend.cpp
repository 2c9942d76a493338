// Tensor views, Buffer and Arena (backend.h): the backend-independent pieces of the interface.
#include "core/backend.h"

#include <algorithm>

#include "core/error.h"

namespace ts {

float* Tensor::f32() const {
  require(dtype == DType::F32, "INTERNAL", std::string("tensor is ") + dtype_name(dtype) + ", float32 was expected");
  return static_cast<float*>(data);
}

Tensor Tensor::rows_view(int64_t begin, int64_t end) const {
  require(begin >= 0 && begin <= end && end <= rows, "INTERNAL", "tensor row range out of bounds");
  Tensor t = *this;
  t.data = data ? static_cast<char*>(data) + size_t(begin * ld) * dtype_size(dtype) : nullptr;
  t.rows = end - begin;
  return t;
}

Tensor make_tensor(void* data, DType dtype, int64_t rows, int64_t cols, DeviceKind device) {
  Tensor t;
  t.data = data;
  t.dtype = dtype;
  t.rows = rows;
  t.cols = cols;
  t.ld = cols;
  t.device = device;
  return t;
}

Buffer::Buffer(Backend& backend, size_t bytes) : backend_(&backend), data_(backend.allocate(bytes)), bytes_(bytes) {}

Buffer::~Buffer() {
  if (backend_ && data_) backend_->release(data_);
}

Buffer::Buffer(Buffer&& o) noexcept : backend_(o.backend_), data_(o.data_), bytes_(o.bytes_) {
  o.backend_ = nullptr;
  o.data_ = nullptr;
  o.bytes_ = 0;
}

Buffer& Buffer::operator=(Buffer&& o) noexcept {
  if (this != &o) {
    if (backend_ && data_) backend_->release(data_);
    backend_ = o.backend_;
    data_ = o.data_;
    bytes_ = o.bytes_;
    o.backend_ = nullptr;
    o.data_ = nullptr;
    o.bytes_ = 0;
  }
  return *this;
}

Arena Arena::measuring(DeviceKind device) {
  Arena a;
  a.measuring_ = true;
  a.capacity_ = SIZE_MAX;
  a.device_ = device;
  a.name_ = "measuring";
  return a;
}

Arena::Arena(void* base, size_t capacity, DeviceKind device, std::string name)
    : base_(static_cast<char*>(base)), capacity_(capacity), device_(device), name_(std::move(name)) {}

void Arena::seek(size_t used) {
  require(used <= capacity_, "RESOURCE_EXHAUSTED",
          "the " + name_ + " workspace (" + std::to_string(capacity_) + " bytes) is too small: " + std::to_string(used) +
              " bytes were asked for (the memory plan did not cover this pass)");
  used_ = used;
  peak_ = std::max(peak_, used_);
}

void* Arena::take_bytes(size_t bytes) {
  const size_t begin = (used_ + ALIGN - 1) / ALIGN * ALIGN;
  if (begin > capacity_ || bytes > capacity_ - begin)
    throw EngineError("RESOURCE_EXHAUSTED", "the " + name_ + " workspace (" + std::to_string(capacity_) +
                                                " bytes) is too small: " + std::to_string(begin + bytes) +
                                                " bytes were asked for (the memory plan did not cover this pass)");
  used_ = begin + bytes;
  peak_ = std::max(peak_, used_);
  return measuring_ ? nullptr : base_ + begin;
}

Tensor Arena::take(int64_t rows, int64_t cols, DType dtype) {
  require(rows >= 0 && cols >= 0, "INTERNAL", "arena: negative shape");
  return make_tensor(take_bytes(size_t(rows * cols) * dtype_size(dtype)), dtype, rows, cols, device_);
}

}  // namespace ts
