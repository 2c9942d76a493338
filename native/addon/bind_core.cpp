// Registers the core part of the addon's JS surface: safetensors inspection/reading/writing, NF4
// quantization (exposed whole for tests), and the CUDA device probe. All calls are synchronous; they
// are meant for tools, tests and start-up checks, not the serving path.
#include <cstring>
#include <map>
#include <string>
#include <vector>

#include "addon/bindings.h"
#include "core/dtype.h"
#include "core/nf4.h"
#include "core/safetensors.h"
#include "cuda/device.h"

namespace ts::addon {

namespace {

[[noreturn]] void bad_argument(const char* fn, const std::string& what) {
  throw EngineError("INVALID_ARGUMENT", std::string(fn) + ": " + what);
}

std::string arg_string(const Napi::CallbackInfo& info, size_t i, const char* fn, const char* name) {
  if (info.Length() <= i || !info[i].IsString()) bad_argument(fn, std::string(name) + " must be a string");
  return info[i].As<Napi::String>().Utf8Value();
}

// A JS number that is an integer in [0, 2^53].
int64_t to_index(const Napi::Value& v, const char* fn, const std::string& name) {
  if (!v.IsNumber()) bad_argument(fn, name + " must be a number");
  double d = v.As<Napi::Number>().DoubleValue();
  if (!(d >= 0 && d <= 9007199254740992.0) || d != double(int64_t(d)))
    bad_argument(fn, name + " must be a non-negative integer");
  return int64_t(d);
}

Napi::Float32Array arg_f32(const Napi::Value& v, const char* fn, const std::string& name) {
  if (!v.IsTypedArray() || v.As<Napi::TypedArray>().TypedArrayType() != napi_float32_array)
    bad_argument(fn, name + " must be a Float32Array");
  return v.As<Napi::Float32Array>();
}

Napi::Float32Array new_f32(Napi::Env env, const float* src, size_t n) {
  Napi::Float32Array a = Napi::Float32Array::New(env, n);
  if (n) std::memcpy(a.Data(), src, n * sizeof(float));
  return a;
}

// safetensorsHeader(path) -> { tensors: [{ name, dtype, shape, begin, end }], metadata: {} }
Napi::Value SafetensorsHeader(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  return guard(env, [&]() -> Napi::Value {
    SafetensorsReader reader(arg_string(info, 0, "safetensorsHeader", "path"));
    Napi::Array tensors = Napi::Array::New(env, reader.tensors().size());
    for (size_t i = 0; i < reader.tensors().size(); i++) {
      const TensorInfo& t = reader.tensors()[i];
      Napi::Object o = Napi::Object::New(env);
      o.Set("name", t.name);
      o.Set("dtype", dtype_name(t.dtype));
      Napi::Array shape = Napi::Array::New(env, t.shape.size());
      for (size_t k = 0; k < t.shape.size(); k++) shape.Set(uint32_t(k), Napi::Number::New(env, double(t.shape[k])));
      o.Set("shape", shape);
      o.Set("begin", Napi::Number::New(env, double(t.begin)));  // exact: a readable file is < 2^53 bytes
      o.Set("end", Napi::Number::New(env, double(t.end)));
      tensors.Set(uint32_t(i), o);
    }
    Napi::Object metadata = Napi::Object::New(env);
    for (const auto& [k, v] : reader.metadata()) metadata.Set(k, v);
    Napi::Object out = Napi::Object::New(env);
    out.Set("tensors", tensors);
    out.Set("metadata", metadata);
    return out;
  });
}

// safetensorsReadF32(path, name) -> Float32Array (F32/F16/BF16/F64 tensors converted to float32)
Napi::Value SafetensorsReadF32(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  return guard(env, [&]() -> Napi::Value {
    SafetensorsReader reader(arg_string(info, 0, "safetensorsReadF32", "path"));
    std::string name = arg_string(info, 1, "safetensorsReadF32", "name");
    const TensorInfo* t = reader.find(name);
    if (!t) throw EngineError("NOT_FOUND", reader.path() + ": no tensor named '" + name + "'");
    Napi::Float32Array out = Napi::Float32Array::New(env, size_t(t->numel()));
    reader.read_f32(*t, out.Data());
    return out;
  });
}

// safetensorsWrite(path, [{ name, dtype: 'F32'|'BF16'|'F16', shape, data: Float32Array }], metadata?)
Napi::Value SafetensorsWrite(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  return guard(env, [&]() -> Napi::Value {
    const char* fn = "safetensorsWrite";
    std::string path = arg_string(info, 0, fn, "path");
    if (info.Length() < 2 || !info[1].IsArray()) bad_argument(fn, "tensors must be an array");
    Napi::Array list = info[1].As<Napi::Array>();
    std::vector<TensorDecl> decls;
    std::vector<Napi::Float32Array> data;  // (n tensors) the caller's arrays, read in fill below
    for (uint32_t i = 0; i < list.Length(); i++) {
      std::string at = "tensors[" + std::to_string(i) + "]";
      Napi::Value item = list.Get(i);
      if (!item.IsObject()) bad_argument(fn, at + " must be an object");
      Napi::Object o = item.As<Napi::Object>();
      TensorDecl d;
      if (!o.Get("name").IsString()) bad_argument(fn, at + ".name must be a string");
      d.name = o.Get("name").As<Napi::String>().Utf8Value();
      if (!o.Get("dtype").IsString()) bad_argument(fn, at + ".dtype must be a string");
      std::string dtype = o.Get("dtype").As<Napi::String>().Utf8Value();
      if (!dtype_from_name(dtype, &d.dtype) || (d.dtype != DType::F32 && d.dtype != DType::F16 && d.dtype != DType::BF16))
        bad_argument(fn, at + ".dtype must be 'F32', 'F16' or 'BF16', got '" + dtype + "'");
      if (!o.Get("shape").IsArray()) bad_argument(fn, at + ".shape must be an array");
      Napi::Array shape = o.Get("shape").As<Napi::Array>();
      double numel = 1;
      for (uint32_t k = 0; k < shape.Length(); k++) {
        d.shape.push_back(to_index(shape.Get(k), fn, at + ".shape[" + std::to_string(k) + "]"));
        numel *= double(d.shape.back());
      }
      Napi::Float32Array a = arg_f32(o.Get("data"), fn, at + ".data");
      if (double(a.ElementLength()) != numel)
        bad_argument(fn, at + ".data has " + std::to_string(a.ElementLength()) + " elements, shape needs " +
                             std::to_string(int64_t(numel)));
      decls.push_back(std::move(d));
      data.push_back(a);
    }
    std::map<std::string, std::string> metadata;
    if (info.Length() >= 3 && !info[2].IsUndefined() && !info[2].IsNull()) {
      if (!info[2].IsObject()) bad_argument(fn, "metadata must be an object of strings");
      Napi::Object m = info[2].As<Napi::Object>();
      Napi::Array keys = m.GetPropertyNames();
      for (uint32_t i = 0; i < keys.Length(); i++) {
        std::string key = keys.Get(i).ToString().Utf8Value();
        Napi::Value v = m.Get(key);
        if (!v.IsString()) bad_argument(fn, "metadata." + key + " must be a string");
        metadata[key] = v.As<Napi::String>().Utf8Value();
      }
    }
    write_safetensors(path, decls, metadata, [&](size_t i, std::vector<uint8_t>& bytes) {
      const size_t n = data[i].ElementLength();
      bytes.resize(n * dtype_size(decls[i].dtype));
      convert_from_f32(bytes.data(), data[i].Data(), decls[i].dtype, n);
    });
    return env.Undefined();
  });
}

// nf4Quantize(w: Float32Array, rows, cols) -> { codes, packed, absmax, absmaxQ, absmaxDq, dequantized,
//                                               absmaxMean, groupScales }
Napi::Value Nf4Quantize(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  return guard(env, [&]() -> Napi::Value {
    const char* fn = "nf4Quantize";
    if (info.Length() < 3) bad_argument(fn, "expected (w, rows, cols)");
    Napi::Float32Array w = arg_f32(info[0], fn, "w");
    int64_t rows = to_index(info[1], fn, "rows"), cols = to_index(info[2], fn, "cols");
    if (double(w.ElementLength()) != double(rows) * double(cols))
      bad_argument(fn, "w has " + std::to_string(w.ElementLength()) + " elements, rows * cols = " + std::to_string(rows * cols));

    std::vector<float> absmax;  // (nblocks)
    NF4Matrix m = nf4_quantize(w.Data(), rows, cols, &absmax);
    const size_t n = size_t(rows * cols), nblocks = size_t(m.nblocks());

    Napi::Uint8Array codes = Napi::Uint8Array::New(env, n);  // (rows*cols) one index per weight
    for (size_t i = 0; i < n; i++) codes[i] = (i & 1) ? (m.codes[i / 2] & 15) : (m.codes[i / 2] >> 4);
    Napi::Uint8Array packed = Napi::Uint8Array::New(env, m.codes.size());  // (rows*cols/2)
    if (!m.codes.empty()) std::memcpy(packed.Data(), m.codes.data(), m.codes.size());
    Napi::Int8Array absmax_q = Napi::Int8Array::New(env, nblocks);  // (nblocks)
    if (nblocks) std::memcpy(absmax_q.Data(), m.absmax_q.data(), nblocks);
    Napi::Float32Array absmax_dq = Napi::Float32Array::New(env, nblocks);  // (nblocks)
    for (size_t b = 0; b < nblocks; b++) absmax_dq[b] = nf4_block_absmax(m.view(), int64_t(b));
    Napi::Float32Array dequantized = Napi::Float32Array::New(env, n);  // (rows*cols)
    nf4_dequantize_rows(m.view(), 0, rows, dequantized.Data());

    Napi::Object out = Napi::Object::New(env);
    out.Set("codes", codes);
    out.Set("packed", packed);
    out.Set("absmax", new_f32(env, absmax.data(), nblocks));
    out.Set("absmaxQ", absmax_q);
    out.Set("absmaxDq", absmax_dq);
    out.Set("dequantized", dequantized);
    out.Set("absmaxMean", Napi::Number::New(env, double(m.absmax_mean)));
    out.Set("groupScales", new_f32(env, m.absmax_scale.data(), m.absmax_scale.size()));
    return out;
  });
}

// cudaProbe() -> { compiled, deviceCount, error, devices: [{ index, name, totalMemory, freeMemory,
//                  computeCapability, multiprocessors, kernelOk, error }] }
Napi::Value CudaProbeJs(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  return guard(env, [&]() -> Napi::Value {
    CudaProbe probe = cuda_probe();
    Napi::Array devices = Napi::Array::New(env, probe.devices.size());
    for (size_t i = 0; i < probe.devices.size(); i++) {
      const CudaDeviceInfo& d = probe.devices[i];
      Napi::Object o = Napi::Object::New(env);
      o.Set("index", d.index);
      o.Set("name", d.name);
      o.Set("totalMemory", Napi::Number::New(env, double(d.total_memory)));
      o.Set("freeMemory", Napi::Number::New(env, double(d.free_memory)));
      o.Set("computeCapability", std::to_string(d.cc_major) + "." + std::to_string(d.cc_minor));
      o.Set("multiprocessors", d.multiprocessors);
      o.Set("kernelOk", d.kernel_ok);
      o.Set("error", d.error);
      devices.Set(uint32_t(i), o);
    }
    Napi::Object out = Napi::Object::New(env);
    out.Set("compiled", probe.compiled);
    out.Set("deviceCount", probe.device_count);
    out.Set("error", probe.error);
    out.Set("devices", devices);
    return out;
  });
}

}  // namespace

void init_core(Napi::Env env, Napi::Object exports) {
  exports.Set("safetensorsHeader", Napi::Function::New(env, SafetensorsHeader, "safetensorsHeader"));
  exports.Set("safetensorsReadF32", Napi::Function::New(env, SafetensorsReadF32, "safetensorsReadF32"));
  exports.Set("safetensorsWrite", Napi::Function::New(env, SafetensorsWrite, "safetensorsWrite"));
  exports.Set("nf4Quantize", Napi::Function::New(env, Nf4Quantize, "nf4Quantize"));
  exports.Set("cudaProbe", Napi::Function::New(env, CudaProbeJs, "cudaProbe"));
}

}  // namespace ts::addon
