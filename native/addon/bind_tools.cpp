// Registers the tools part of the addon's JS surface:
//   sampleToken(logits: Float32Array, params: {temperature, topK, topP, repetitionPenalty, seed},
//               context: Int32Array, draws: number) -> Int32Array
//   mergeAdapter(spec, onProgress?) -> {promise: Promise<MergeResult>, cancel(): void}
// The merge runs on its own thread (file I/O bound; it must block neither the event loop nor the
// engine's executor). Progress goes out through a thread-safe function, coalesced so at most one
// event waits in the queue; the promise settles on the main thread in the function's finalizer.
#include <unistd.h>

#include <atomic>
#include <cmath>
#include <memory>
#include <mutex>
#include <thread>

#include "addon/bindings.h"
#include "addon/convert.h"
#include "model/lora.h"
#include "model/merge.h"
#include "cpu/cpu_backend.h"
#include "cpu/sampler.h"

namespace ts::addon {

namespace {

// ---- sampleToken ---------------------------------------------------------------------------------

uint64_t seed_from_js(const Napi::Value& v) {
  if (v.IsUndefined() || v.IsNull()) return 0;
  if (v.IsBigInt()) {
    bool lossless = false;
    uint64_t seed = v.As<Napi::BigInt>().Uint64Value(&lossless);
    require(lossless, "INVALID_ARGUMENT", "params.seed must fit in 64 unsigned bits");
    return seed;
  }
  require(v.IsNumber(), "INVALID_ARGUMENT", "params.seed must be a number or a bigint");
  double d = v.As<Napi::Number>().DoubleValue();
  require(d >= 0 && d == std::floor(d) && d <= 9007199254740991.0, "INVALID_ARGUMENT",
          "params.seed must be a non-negative safe integer");
  return uint64_t(d);
}

float float_param(const Napi::Object& params, const char* key, float fallback) {
  Napi::Value v = params.Get(key);
  if (v.IsUndefined() || v.IsNull()) return fallback;
  require(v.IsNumber(), "INVALID_ARGUMENT", std::string("params.") + key + " must be a number");
  return v.As<Napi::Number>().FloatValue();
}

Napi::Value SampleToken(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  return guard(env, [&]() -> Napi::Value {
    require(info.Length() >= 4, "INVALID_ARGUMENT", "sampleToken(logits, params, context, draws) takes 4 arguments");
    require(info[0].IsTypedArray() && info[0].As<Napi::TypedArray>().TypedArrayType() == napi_float32_array,
            "INVALID_ARGUMENT", "sampleToken: logits must be a Float32Array");
    require(info[1].IsObject(), "INVALID_ARGUMENT", "sampleToken: params must be an object");
    require(info[2].IsTypedArray() && info[2].As<Napi::TypedArray>().TypedArrayType() == napi_int32_array,
            "INVALID_ARGUMENT", "sampleToken: context must be an Int32Array");
    require(info[3].IsNumber(), "INVALID_ARGUMENT", "sampleToken: draws must be a number");
    Napi::Float32Array logits = info[0].As<Napi::Float32Array>();
    Napi::Object params_js = info[1].As<Napi::Object>();
    Napi::Int32Array context_js = info[2].As<Napi::Int32Array>();
    const double draws_d = info[3].As<Napi::Number>().DoubleValue();
    require(draws_d >= 0 && draws_d == std::floor(draws_d) && draws_d <= 1e8, "INVALID_ARGUMENT",
            "sampleToken: draws must be an integer in [0, 1e8]");
    require(logits.ElementLength() > 0 && logits.ElementLength() <= size_t(INT32_MAX), "INVALID_ARGUMENT",
            "sampleToken: logits must hold 1 .. 2^31-1 values");

    SamplingParams params;
    params.temperature = float_param(params_js, "temperature", params.temperature);
    params.top_p = float_param(params_js, "topP", params.top_p);
    params.repetition_penalty = float_param(params_js, "repetitionPenalty", params.repetition_penalty);
    const float top_k = float_param(params_js, "topK", 0.f);
    require(top_k >= 0 && top_k == std::floor(top_k), "INVALID_ARGUMENT", "params.topK must be a non-negative integer");
    params.top_k = top_k > float(INT32_MAX) ? INT32_MAX : int(top_k);
    params.seed = seed_from_js(params_js.Get("seed"));

    const int V = int(logits.ElementLength());
    const std::vector<int32_t> context(context_js.Data(), context_js.Data() + context_js.ElementLength());
    const size_t draws = size_t(draws_d);
    std::vector<int32_t> out(draws);
    std::vector<float> work(V);
    SamplerRng rng(params.seed);  // one stream for all draws
    for (size_t i = 0; i < draws; i++) {
      std::copy(logits.Data(), logits.Data() + V, work.begin());  // each draw sees the same distribution
      out[i] = cpu::sample_token(work.data(), V, params, context, cpu::UniformSource{&rng, 0.0});
    }
    Napi::Int32Array result = Napi::Int32Array::New(env, draws);
    std::copy(out.begin(), out.end(), result.Data());
    return result;
  });
}

// ---- mergeAdapter --------------------------------------------------------------------------------

// The baton: plain C++ inputs and outputs; only the main thread touches the JS handles in it.
struct MergeJob {
  LlamaConfig cfg;
  LoraSpec lora;
  std::string adapter_file;
  MergeSpec merge;  // adapter filled in on the worker, after loading
  std::atomic<bool> cancel{false};

  // Progress coalescing: the worker overwrites `latest`; a queued call is in flight while `pending`.
  std::mutex mu;
  MergeProgress latest;
  bool pending = false;

  bool ok = false;
  std::string error_code, error_message;
  MergeResult result;

  std::thread worker;
  Napi::ThreadSafeFunction tsfn;
  Napi::Promise::Deferred deferred;
  Napi::Reference<Napi::Value> callback_error;  // what onProgress threw, if it did

  explicit MergeJob(Napi::Env env) : deferred(Napi::Promise::Deferred::New(env)) {}
};

std::string string_field(const Napi::Object& obj, const char* key) {
  Napi::Value v = obj.Get(key);
  require(v.IsString(), "INVALID_ARGUMENT", std::string("spec.") + key + " must be a string");
  return v.As<Napi::String>().Utf8Value();
}

Napi::Object object_field(const Napi::Object& obj, const char* key) {
  Napi::Value v = obj.Get(key);
  require(v.IsObject(), "INVALID_ARGUMENT", std::string("spec.") + key + " must be an object");
  return v.As<Napi::Object>();
}

void read_merge_spec(MergeJob& job, const Napi::Object& spec) {
  job.cfg = config_from_js(object_field(spec, "config"));
  job.lora = lora_spec_from_js(object_field(spec, "lora"));
  job.adapter_file = string_field(spec, "adapterFile");
  job.merge.cfg = job.cfg;
  job.merge.out_dir = string_field(spec, "outDir");
  Napi::Value shards = spec.Get("shards");
  require(shards.IsArray(), "INVALID_ARGUMENT", "spec.shards must be an array of file paths");
  Napi::Array list = shards.As<Napi::Array>();
  for (uint32_t i = 0; i < list.Length(); i++) {
    Napi::Value v = list.Get(i);
    require(v.IsString(), "INVALID_ARGUMENT", "spec.shards[" + std::to_string(i) + "] must be a string");
    job.merge.shards.push_back(v.As<Napi::String>().Utf8Value());
  }
  const std::string dtype = string_field(spec, "dtype");
  if (dtype == "bf16") job.merge.dtype = DType::BF16;
  else if (dtype == "f16") job.merge.dtype = DType::F16;
  else if (dtype == "f32") job.merge.dtype = DType::F32;
  else throw EngineError("INVALID_ARGUMENT", "spec.dtype must be 'bf16', 'f16' or 'f32', got '" + dtype + "'");
  const std::string into = string_field(spec, "into");
  require(into == "original" || into == "dequantized", "INVALID_ARGUMENT",
          "spec.into must be 'original' or 'dequantized', got '" + into + "'");
  job.merge.into_dequantized = into == "dequantized";
}

Napi::Object result_to_js(Napi::Env env, const MergeResult& r) {
  Napi::Object out = Napi::Object::New(env);
  Napi::Array files = Napi::Array::New(env, r.files.size());
  for (size_t i = 0; i < r.files.size(); i++) files.Set(uint32_t(i), r.files[i]);
  out.Set("files", files);
  out.Set("bytes", Napi::Number::New(env, double(r.bytes)));
  out.Set("tensors", Napi::Number::New(env, double(r.tensors)));
  out.Set("mergedTensors", Napi::Number::New(env, double(r.merged_tensors)));
  Napi::Object map = Napi::Object::New(env);
  for (const auto& [name, file] : r.weight_map) map.Set(name, file);
  out.Set("weightMap", map);
  return out;
}

// Main thread: deliver the newest progress (the ones it replaced are dropped on purpose).
void deliver_progress(const std::shared_ptr<MergeJob>& job, Napi::Env env, Napi::Function on_progress) {
  MergeProgress p;
  {
    std::lock_guard<std::mutex> lock(job->mu);
    p = job->latest;
    job->pending = false;
  }
  if (!job->callback_error.IsEmpty() || on_progress.IsEmpty()) return;
  try {
    Napi::Object event = Napi::Object::New(env);
    event.Set("tensor", p.tensor);
    event.Set("index", Napi::Number::New(env, double(p.index)));
    event.Set("total", Napi::Number::New(env, double(p.total)));
    event.Set("merged", Napi::Boolean::New(env, p.merged));
    on_progress.Call({event});
  } catch (const Napi::Error& e) {
    // A throwing progress callback stops the merge; the promise rejects with what it threw.
    job->callback_error = Napi::Reference<Napi::Value>::New(e.Value(), 1);
    job->cancel = true;
  }
}

// Main thread, once the worker has released the function: settle the promise.
void finish(const std::shared_ptr<MergeJob>& job, Napi::Env env) {
  job->cancel = true;  // normally a no-op (the worker is done); on environment teardown it stops the worker
  if (job->worker.joinable()) job->worker.join();
  try {
    Napi::HandleScope scope(env);
    if (!job->callback_error.IsEmpty()) {
      // The worker may have committed before the throw was seen: a rejected merge leaves no shard.
      if (job->ok)
        for (const std::string& file : job->result.files) ::unlink((job->merge.out_dir + "/" + file).c_str());
      job->deferred.Reject(job->callback_error.Value());
      job->callback_error.Reset();
    } else if (job->ok) {
      job->deferred.Resolve(result_to_js(env, job->result));
    } else {
      job->deferred.Reject(make_error(env, job->error_code, job->error_message).Value());
    }
  } catch (const Napi::Error&) {
    // The environment is going away; nobody is left to observe the promise.
  }
}

void run_merge(const std::shared_ptr<MergeJob>& job) {
  try {
    if (job->cancel) throw EngineError("CANCELLED", "merge cancelled");
    std::shared_ptr<LoraAdapter> adapter = lora_load(job->cfg, job->lora, job->adapter_file);
    job->merge.adapter = adapter.get();
    std::unique_ptr<Backend> host = cpu::make_cpu_backend();  // the merge streams host tensors
    job->merge.host = host.get();
    auto on_progress = [&job](const MergeProgress& p) {
      std::lock_guard<std::mutex> lock(job->mu);
      job->latest = p;
      if (job->pending) return;  // the queued call will pick up this newer value
      job->pending = true;
      std::shared_ptr<MergeJob> keep = job;
      napi_status status =
          job->tsfn.NonBlockingCall([keep](Napi::Env env, Napi::Function fn) { deliver_progress(keep, env, fn); });
      if (status != napi_ok) job->pending = false;  // closing: progress is best effort
    };
    job->result = merge_adapter(job->merge, on_progress, [&job] { return job->cancel.load(); });
    job->merge.adapter = nullptr;
    job->merge.host = nullptr;
    job->ok = true;
  } catch (const EngineError& e) {
    job->error_code = e.code;
    job->error_message = e.what();
  } catch (const std::exception& e) {
    job->error_code = "INTERNAL";
    job->error_message = std::string("merge failed: ") + e.what();
  } catch (...) {
    job->error_code = "INTERNAL";
    job->error_message = "merge failed with an unknown error";
  }
  job->tsfn.Release();
}

Napi::Value MergeAdapter(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  return guard(env, [&]() -> Napi::Value {
    require(info.Length() >= 1 && info[0].IsObject(), "INVALID_ARGUMENT", "mergeAdapter(spec, onProgress): spec must be an object");
    require(info.Length() < 2 || info[1].IsFunction() || info[1].IsUndefined() || info[1].IsNull(), "INVALID_ARGUMENT",
            "mergeAdapter: onProgress must be a function");
    auto job = std::make_shared<MergeJob>(env);
    read_merge_spec(*job, info[0].As<Napi::Object>());

    Napi::Function on_progress = info.Length() >= 2 && info[1].IsFunction()
                                     ? info[1].As<Napi::Function>()
                                     : Napi::Function::New(env, [](const Napi::CallbackInfo&) {});
    job->tsfn = Napi::ThreadSafeFunction::New(env, on_progress, "tuneserve.mergeAdapter", 0, 1,
                                              [job](Napi::Env finalize_env) { finish(job, finalize_env); });
    try {
      job->worker = std::thread(run_merge, job);
    } catch (const std::system_error& e) {
      job->error_code = "INTERNAL";
      job->error_message = std::string("mergeAdapter: cannot start a thread: ") + e.what();
      job->tsfn.Release();  // settles the promise (rejected) through the finalizer
    }

    Napi::Object handle = Napi::Object::New(env);
    handle.Set("promise", job->deferred.Promise());
    std::weak_ptr<MergeJob> weak = job;  // cancel() must not keep a finished job alive
    handle.Set("cancel", Napi::Function::New(env, [weak](const Napi::CallbackInfo& ci) {
                 if (auto j = weak.lock()) j->cancel = true;
                 return ci.Env().Undefined();
               }));
    return handle;
  });
}

}  // namespace

void init_tools(Napi::Env env, Napi::Object exports) {
  exports.Set("sampleToken", Napi::Function::New(env, SampleToken, "sampleToken"));
  exports.Set("mergeAdapter", Napi::Function::New(env, MergeAdapter, "mergeAdapter"));
}

}  // namespace ts::addon
