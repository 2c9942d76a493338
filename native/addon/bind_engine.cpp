// Registers the engine part of the addon's JS surface: loadModel() -> NativeEngine with adapters,
// training, generation and test passes over one Executor (native/model/executor.h) on the chosen
// backend. Long work runs on the executor thread or a loader thread; results come back through
// JsChannel. JS (src/engine/native.ts) validates arguments; this file converts them.
#include <memory>
#include <thread>

#include "addon/bindings.h"
#include "addon/convert.h"
#include "addon/js_channel.h"
#include "core/thread_pool.h"
#include "cpu/cpu_backend.h"
#include "cpu/gemm.h"
#include "cuda/cuda_backend.h"
#include "model/executor.h"

namespace ts::addon {

namespace {

std::vector<int32_t> to_ids(const Napi::Value& v, const char* what) {
  if (!v.IsTypedArray() || v.As<Napi::TypedArray>().TypedArrayType() != napi_int32_array)
    throw EngineError("INVALID_ARGUMENT", std::string(what) + " must be an Int32Array");
  auto a = v.As<Napi::Int32Array>();
  return std::vector<int32_t>(a.Data(), a.Data() + a.ElementLength());
}

Napi::Float32Array to_js(Napi::Env env, const std::vector<float>& v) {
  auto a = Napi::Float32Array::New(env, v.size());
  std::copy(v.begin(), v.end(), a.Data());
  return a;
}

Napi::Int32Array to_js(Napi::Env env, const std::vector<int32_t>& v) {
  auto a = Napi::Int32Array::New(env, v.size());
  std::copy(v.begin(), v.end(), a.Data());
  return a;
}

double num(const Napi::Object& o, const char* key, double fallback) {
  Napi::Value v = o.Get(key);
  return v.IsNumber() ? v.As<Napi::Number>().DoubleValue() : fallback;
}
bool flag(const Napi::Object& o, const char* key, bool fallback) {
  Napi::Value v = o.Get(key);
  return v.IsBoolean() ? v.As<Napi::Boolean>().Value() : fallback;
}

// PEFT-keyed copies of an adapter's A/B (or their gradients).
Napi::Object adapter_tensors(Napi::Env env, const LoraAdapter& a, bool grads) {
  Napi::Object out = Napi::Object::New(env);
  for (int l = 0; l < a.L; l++)
    for (int t = 0; t < NUM_TARGETS; t++) {
      if (!a.has(t)) continue;
      const LoraModule& m = a.mod(l, t);
      out.Set(peft_key(l, t, 'A'), to_js(env, grads ? m.dA : m.A));
      out.Set(peft_key(l, t, 'B'), to_js(env, grads ? m.dB : m.B));
    }
  return out;
}

std::string text(const Napi::Object& o, const char* key, const std::string& fallback) {
  Napi::Value v = o.Get(key);
  return v.IsString() ? v.As<Napi::String>().Utf8Value() : fallback;
}

TrainHyper hyper_from_js(const Napi::Object& h) {
  TrainHyper p;
  p.lr = num(h, "lr", p.lr);
  p.beta1 = (float)num(h, "beta1", p.beta1);
  p.beta2 = (float)num(h, "beta2", p.beta2);
  p.eps = (float)num(h, "eps", p.eps);
  p.weight_decay = (float)num(h, "weightDecay", p.weight_decay);
  p.max_grad_norm = (float)num(h, "maxGradNorm", p.max_grad_norm);
  p.scheduler = text(h, "scheduler", p.scheduler);
  p.warmup_steps = (int)num(h, "warmupSteps", p.warmup_steps);
  p.batch_size = (int)num(h, "batchSize", p.batch_size);
  p.grad_accum = (int)num(h, "gradAccum", p.grad_accum);
  p.epochs = (int)num(h, "epochs", p.epochs);
  p.max_steps = (int64_t)num(h, "maxSteps", (double)p.max_steps);
  p.seed = (uint64_t)num(h, "seed", (double)p.seed);
  p.shuffle = flag(h, "shuffle", p.shuffle);
  p.recompute = flag(h, "recompute", p.recompute);
  p.pad_id = (int32_t)num(h, "padId", p.pad_id);
  p.eval_every = (int)num(h, "evalEvery", p.eval_every);
  p.early_stopping_patience = (int)num(h, "earlyStoppingPatience", p.early_stopping_patience);
  p.early_stopping_min_delta = num(h, "earlyStoppingMinDelta", p.early_stopping_min_delta);
  p.keep_best = flag(h, "keepBest", p.keep_best);
  p.checkpoint_every = (int)num(h, "checkpointEvery", p.checkpoint_every);
  p.checkpoint_dir = text(h, "checkpointDir", p.checkpoint_dir);
  p.adapter_config_json = text(h, "adapterConfigJson", p.adapter_config_json);
  p.config_hash = text(h, "configHash", p.config_hash);
  p.data_hash = text(h, "dataHash", p.data_hash);
  p.resume_from = text(h, "resumeFrom", p.resume_from);
  p.nonfinite_policy = text(h, "nonfinitePolicy", p.nonfinite_policy);
  p.spike_factor = num(h, "spikeFactor", p.spike_factor);
  p.spike_policy = text(h, "spikePolicy", p.spike_policy);
  p.rollback_lr_factor = num(h, "rollbackLrFactor", p.rollback_lr_factor);
  p.max_interventions = (int)num(h, "maxInterventions", p.max_interventions);
  p.inject_nonfinite_step = (int64_t)num(h, "injectNonfiniteStep", 0);
  return p;
}

// {batchSize, seqLen, lora, recompute?} of a training memory plan.
TrainingShape shape_from_js(const Napi::Object& o) {
  TrainingShape s;
  s.B = (int)num(o, "batchSize", 0);
  s.T = (int)num(o, "seqLen", 0);
  require(o.Get("lora").IsObject(), "INVALID_ARGUMENT", "lora must be an object");
  s.lora = lora_spec_from_js(o.Get("lora").As<Napi::Object>());
  s.recompute = flag(o, "recompute", s.recompute);
  return s;
}

Napi::Object plan_to_js(Napi::Env env, const TrainingMemoryPlan& p) {
  Napi::Object o = Napi::Object::New(env);
  o.Set("batchSize", p.shape.B);
  o.Set("seqLen", p.shape.T);
  o.Set("rank", p.shape.lora.r);
  Napi::Array targets = Napi::Array::New(env);
  for (int t = 0; t < NUM_TARGETS; t++)
    if ((p.shape.lora.target_mask >> t) & 1u) targets.Set(targets.Length(), target_name(t));
  o.Set("targets", targets);
  o.Set("recompute", p.shape.recompute);
  o.Set("computeDtype", dtype_name(p.act));
  o.Set("baseBytes", (double)p.base);
  o.Set("backendScratchBytes", (double)p.backend_scratch);
  o.Set("dequantBufferBytes", (double)p.dequant_buffer);
  o.Set("adapterWeightsBytes", (double)p.adapter_weights);
  o.Set("adapterStateBytes", (double)p.adapter_state);
  o.Set("inputsBytes", (double)p.workspace.inputs);
  o.Set("savedActivationsBytes", (double)p.workspace.saved_activations);
  o.Set("layerWorkingSetBytes", (double)p.workspace.layer_working_set);
  o.Set("headBytes", (double)p.workspace.head);
  o.Set("headSharedBytes", (double)p.workspace.head_shared);
  o.Set("workspaceBytes", (double)p.workspace.total);
  o.Set("jobBytes", (double)p.job);
  o.Set("inUseBytes", (double)p.in_use);
  o.Set("freeBytes", (double)p.free);
  o.Set("peakBytes", (double)p.peak);
  o.Set("fits", p.fits());
  o.Set("description", p.describe());
  return o;
}

// planTrainingMemory({config, quant, device, computeDtype, batchSize, seqLen, lora, recompute?,
//                     backendScratchBytes?}) -> plan, from the config alone (no model, no device).
Napi::Value plan_training_memory_js(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  return guard(env, [&]() -> Napi::Value {
    Napi::Object spec = info[0].As<Napi::Object>();
    const LlamaConfig cfg = config_from_js(spec.Get("config").As<Napi::Object>());
    const std::string quant = text(spec, "quant", "nf4"), device = text(spec, "device", "cpu"),
                      dtype = text(spec, "computeDtype", "f32");
    require(device == "cpu" || device == "cuda", "INVALID_ARGUMENT", "device must be cpu or cuda, got " + device);
    require(dtype == "f32" || dtype == "bf16", "INVALID_ARGUMENT", "computeDtype must be f32 or bf16, got " + dtype);
    require(quant == "nf4" || quant == "none", "INVALID_ARGUMENT", "quant must be nf4 or none, got " + quant);
    const TrainingMemoryPlan p =
        plan_training_memory(cfg, device == "cuda" ? DeviceKind::CUDA : DeviceKind::CPU,
                             dtype == "bf16" ? DType::BF16 : DType::F32, quant, shape_from_js(spec),
                             (uint64_t)num(spec, "backendScratchBytes", 0));
    return plan_to_js(env, p);
  });
}

Napi::Object step_to_js(Napi::Env env, const StepReport& r) {
  Napi::Object o = Napi::Object::New(env);
  o.Set("step", (double)r.step);
  o.Set("totalSteps", (double)r.total_steps);
  o.Set("epoch", r.epoch);
  o.Set("loss", r.loss);
  o.Set("gradNorm", r.grad_norm);
  o.Set("lr", r.lr);
  o.Set("tokens", (double)r.tokens);
  o.Set("targets", (double)r.targets);
  o.Set("seconds", r.seconds);
  if (r.has_eval) o.Set("evalLoss", r.eval_loss);
  if (r.has_forgetting) {
    o.Set("forgettingLoss", r.forgetting_loss);
    o.Set("forgettingBaseLoss", r.forgetting_base_loss);
  }
  if (!r.checkpoint.empty()) o.Set("checkpoint", r.checkpoint);
  if (!r.guard_action.empty()) {
    o.Set("guardAction", r.guard_action);
    o.Set("guardReason", r.guard_reason);
    if (r.guard_action == "rollback") o.Set("rolledBackTo", (double)r.rolled_back_to);
  }
  if (r.stopped_early) o.Set("stoppedEarly", true);
  if (r.best_step > 0) {
    o.Set("bestStep", (double)r.best_step);
    o.Set("bestEvalLoss", r.best_eval_loss);
  }
  return o;
}

class EngineWrap : public Napi::ObjectWrap<EngineWrap> {
 public:
  static Napi::FunctionReference ctor;

  static void define(Napi::Env env, Napi::Object exports) {
    Napi::Function f = DefineClass(env, "NativeEngine",
                                   {
                                       InstanceMethod("info", &EngineWrap::info),
                                       InstanceMethod("stats", &EngineWrap::stats),
                                       InstanceMethod("createAdapter", &EngineWrap::create_adapter),
                                       InstanceMethod("loadAdapter", &EngineWrap::load_adapter),
                                       InstanceMethod("registerAdapter", &EngineWrap::register_adapter),
                                       InstanceMethod("setAdapterFile", &EngineWrap::set_adapter_file),
                                       InstanceMethod("warmAdapter", &EngineWrap::warm_adapter),
                                       InstanceMethod("pinAdapter", &EngineWrap::pin_adapter),
                                       InstanceMethod("adapterStats", &EngineWrap::adapter_stats),
                                       InstanceMethod("poolStats", &EngineWrap::pool_stats),
                                       InstanceMethod("setPolicy", &EngineWrap::set_policy),
                                       InstanceMethod("setHostBudget", &EngineWrap::set_host_budget),
                                       InstanceMethod("saveAdapter", &EngineWrap::save_adapter),
                                       InstanceMethod("removeAdapter", &EngineWrap::remove_adapter),
                                       InstanceMethod("adapterTensors", &EngineWrap::get_adapter_tensors),
                                       InstanceMethod("logits", &EngineWrap::logits),
                                       InstanceMethod("trainPass", &EngineWrap::train_pass),
                                       InstanceMethod("train", &EngineWrap::train),
                                       InstanceMethod("planTraining", &EngineWrap::plan_training),
                                       InstanceMethod("generate", &EngineWrap::generate),
                                       InstanceMethod("cancel", &EngineWrap::cancel),
                                       InstanceMethod("close", &EngineWrap::close),
                                   });
    ctor = Napi::Persistent(f);
    ctor.SuppressDestruct();
    exports.Set("NativeEngine", f);
  }

  explicit EngineWrap(const Napi::CallbackInfo& info) : Napi::ObjectWrap<EngineWrap>(info) {
    if (info.Length() < 1 || !info[0].IsExternal())
      throw make_error(info.Env(), "INVALID_ARGUMENT", "NativeEngine is created by loadModel()");
    engine_.reset(info[0].As<Napi::External<Executor>>().Data());
  }

 private:
  Executor& engine(Napi::Env env) {
    if (!engine_) throw make_error(env, "FAILED_PRECONDITION", "the engine has been closed");
    return *engine_;
  }

  Napi::Value info(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    Executor& e = engine(env);
    const LlamaConfig& c = e.config();
    const MemoryPlan& p = e.memory_plan();
    Napi::Object o = Napi::Object::New(env);
    o.Set("quant", e.weights().quant);
    o.Set("weightBytes", (double)e.weights().bytes);
    o.Set("device", device_name(e.backend().device()));
    o.Set("deviceDescription", e.backend().description());
    o.Set("computeDtype", dtype_name(e.backend().compute_dtype()));
    o.Set("gemmKernel", cpu::gemm_kernel_name());
    o.Set("threads", num_threads());
    o.Set("vocabSize", c.V);
    o.Set("numLayers", c.L);
    o.Set("maxActiveSequences", e.options().max_active_sequences);
    o.Set("prefillChunk", e.options().prefill_chunk);
    o.Set("maxSeqLen", p.max_seq_len);
    o.Set("stepGraphs", e.options().step_graphs && e.backend().supports_graphs());
    Napi::Object plan = Napi::Object::New(env);
    plan.Set("totalBytes", (double)p.total);
    plan.Set("freeBytesAtStart", (double)p.free_at_start);
    plan.Set("weightsBytes", (double)p.weights);
    plan.Set("backendScratchBytes", (double)p.backend_scratch);
    plan.Set("adapterSlots", p.adapter_slots);
    plan.Set("adapterPoolBytes", (double)p.adapter_pool);
    plan.Set("workspaceBytes", (double)p.workspace);
    plan.Set("kvBlockSize", p.kv_block_size);
    plan.Set("kvBlocks", (double)p.kv_blocks);
    plan.Set("kvBlockBytes", (double)p.kv_block_bytes);
    plan.Set("kvCacheBytes", (double)p.kv_cache);
    o.Set("memoryPlan", plan);
    return o;
  }

  Napi::Value stats(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    Executor& e = engine(env);
    Executor::Stats s = e.stats();
    const MemoryInfo mem = e.backend().memory_info();
    Napi::Object o = Napi::Object::New(env);
    o.Set("activeSequences", s.active_sequences);
    o.Set("queuedSequences", s.queued_sequences);
    o.Set("training", s.training);
    o.Set("kvBytes", (double)s.kv_bytes_used);
    o.Set("kvBlocksUsed", (double)s.kv_blocks_used);
    o.Set("kvBlocksTotal", (double)s.kv_blocks_total);
    o.Set("trainingWorkspaceBytes", (double)s.training_workspace_bytes);
    o.Set("graphSteps", (double)s.graph_steps);
    o.Set("eagerSteps", (double)s.eager_steps);
    o.Set("deviceTotalBytes", (double)mem.total);
    o.Set("deviceFreeBytes", (double)mem.free);
    o.Set("adapters", e.adapter_count());
    o.Set("waitingForAdapter", s.waiting_for_adapter);
    Napi::Object sched = Napi::Object::New(env);
    const ServingPolicy policy = e.policy();
    sched.Set("targetInterTokenMs", policy.target_inter_token_ms);
    sched.Set("minTrainingShare", policy.min_training_share);
    sched.Set("generationStepMs", s.generation_step_ms);
    sched.Set("trainingStepMs", s.training_step_ms);
    sched.Set("trainingShare", s.training_share);
    sched.Set("generationSeconds", s.generation_seconds);
    sched.Set("trainingSeconds", s.training_seconds);
    sched.Set("microSteps", (double)s.micro_steps);
    sched.Set("deferredMicroSteps", (double)s.deferred_micro_steps);
    o.Set("scheduler", sched);
    if (s.training_plan) o.Set("trainingPlan", plan_to_js(env, *s.training_plan));
    return o;
  }

  static Napi::Object stats_to_js(Napi::Env env, const AdapterStats& s) {
    Napi::Object o = Napi::Object::New(env);
    o.Set("requests", (double)s.requests);
    o.Set("tokensIn", (double)s.tokens_in);
    o.Set("tokensOut", (double)s.tokens_out);
    o.Set("hits", (double)s.hits);
    o.Set("hostHits", (double)s.host_hits);
    o.Set("loads", (double)s.loads);
    o.Set("loadSeconds", s.load_seconds);
    o.Set("lastLoadSeconds", s.last_load_seconds);
    o.Set("placements", (double)s.placements);
    o.Set("placeSeconds", s.place_seconds);
    o.Set("lastPlaceSeconds", s.last_place_seconds);
    o.Set("evictions", (double)s.evictions);
    o.Set("hostEvictions", (double)s.host_evictions);
    o.Set("loadFailures", (double)s.load_failures);
    return o;
  }

  static const char* tier_name(AdapterTier t) {
    return t == AdapterTier::DEVICE ? "device" : t == AdapterTier::HOST ? "host" : "disk";
  }

  // adapterStats() -> [{id, tier, pinned, loading, training, users, bytes, failureCode?, failure?, stats}]
  Napi::Value adapter_stats(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    return guard(env, [&]() -> Napi::Value {
      const auto entries = engine(env).pool().snapshot();
      Napi::Array out = Napi::Array::New(env, entries.size());
      for (size_t i = 0; i < entries.size(); i++) {
        const AdapterPool::Info& a = entries[i];
        Napi::Object o = Napi::Object::New(env);
        o.Set("id", a.id);
        o.Set("tier", tier_name(a.tier));
        o.Set("pinned", a.pinned);
        o.Set("loading", a.loading);
        o.Set("training", a.training);
        o.Set("users", a.users);
        o.Set("bytes", (double)a.bytes);
        if (!a.failure.empty()) {
          o.Set("failureCode", a.failure_code);
          o.Set("failure", a.failure);
        }
        o.Set("stats", stats_to_js(env, a.stats));
        out.Set(uint32_t(i), o);
      }
      return out;
    });
  }

  // poolStats() -> {slots, resident, pinned, adapters, loading, hostBytes, hostBudget, deviceBytes, deviceBudget, stats}
  Napi::Value pool_stats(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    return guard(env, [&]() -> Napi::Value {
      const AdapterPool::Totals t = engine(env).pool().totals();
      Napi::Object o = Napi::Object::New(env);
      o.Set("slots", t.slots);
      o.Set("resident", t.resident);
      o.Set("pinned", t.pinned);
      o.Set("adapters", t.adapters);
      o.Set("loading", t.loading);
      o.Set("hostBytes", (double)t.host_bytes);
      o.Set("hostBudget", (double)t.host_budget);
      o.Set("deviceBytes", (double)t.device_bytes);
      o.Set("deviceBudget", (double)t.device_budget);
      o.Set("stats", stats_to_js(env, t.stats));
      return o;
    });
  }

  // registerAdapter(lora, file) -> id: the disk tier; the file is read on first use, in the background.
  Napi::Value register_adapter(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    return guard(env, [&]() -> Napi::Value {
      LoraSpec spec = lora_spec_from_js(info[0].As<Napi::Object>());
      std::string file = info[1].As<Napi::String>().Utf8Value();
      return Napi::Number::New(env, engine(env).add_adapter_file(spec, file));
    });
  }

  // setAdapterFile(id, file): where a host copy made in memory can be read again after eviction.
  Napi::Value set_adapter_file(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    return guard(env, [&]() -> Napi::Value {
      engine(env).pool().set_file(info[0].As<Napi::Number>().Int32Value(), info[1].As<Napi::String>().Utf8Value());
      return env.Undefined();
    });
  }

  // warmAdapter(id) -> {id, promise}: resolves once the adapter holds a device slot.
  Napi::Value warm_adapter(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    return guard(env, [&]() -> Napi::Value {
      auto adapter = engine(env).adapter(info[0].As<Napi::Number>().Int32Value());
      auto ch = JsChannel::create(env, env.Undefined(), "tuneserve.warmAdapter");
      uint64_t id = engine(env).warm_adapter(
          adapter, [ch] { ch->resolve([](Napi::Env env) { return env.Undefined(); }); },
          [ch](const std::string& code, const std::string& msg) { ch->reject(code, msg); });
      Napi::Object r = Napi::Object::New(env);
      r.Set("id", (double)id);
      r.Set("promise", ch->promise());
      return r;
    });
  }

  Napi::Value pin_adapter(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    return guard(env, [&]() -> Napi::Value {
      engine(env).pin_adapter(info[0].As<Napi::Number>().Int32Value(), info[1].ToBoolean().Value());
      return env.Undefined();
    });
  }

  // setPolicy({targetInterTokenMs, minTrainingShare})
  Napi::Value set_policy(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    return guard(env, [&]() -> Napi::Value {
      Napi::Object o = info[0].As<Napi::Object>();
      ServingPolicy p = engine(env).policy();
      p.target_inter_token_ms = num(o, "targetInterTokenMs", p.target_inter_token_ms);
      p.min_training_share = num(o, "minTrainingShare", p.min_training_share);
      engine(env).set_policy(p);
      return env.Undefined();
    });
  }

  Napi::Value set_host_budget(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    return guard(env, [&]() -> Napi::Value {
      engine(env).pool().set_host_budget((size_t)info[0].As<Napi::Number>().DoubleValue());
      return env.Undefined();
    });
  }

  // planTraining({batchSize, seqLen, lora, recompute?}) -> the plan such a job would get now.
  Napi::Value plan_training(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    return guard(env, [&]() -> Napi::Value {
      return plan_to_js(env, engine(env).plan_training(shape_from_js(info[0].As<Napi::Object>())));
    });
  }

  // createAdapter(lora, seed) -> id
  Napi::Value create_adapter(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    return guard(env, [&]() -> Napi::Value {
      Executor& e = engine(env);
      LoraSpec spec = lora_spec_from_js(info[0].As<Napi::Object>());
      uint64_t seed = (uint64_t)info[1].As<Napi::Number>().Int64Value();
      return Napi::Number::New(env, e.add_adapter(lora_create(e.config(), spec, seed)));
    });
  }

  // loadAdapter(lora, file) -> Promise<id>; the file is read on its own thread.
  Napi::Value load_adapter(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    return guard(env, [&]() -> Napi::Value {
      Executor* e = &engine(env);
      LoraSpec spec = lora_spec_from_js(info[0].As<Napi::Object>());
      std::string file = info[1].As<Napi::String>().Utf8Value();
      auto ch = JsChannel::create(env, env.Undefined(), "tuneserve.loadAdapter");
      std::thread([e, spec, file, ch] {
        try {
          int id = e->add_adapter(lora_load(e->config(), spec, file), file);
          ch->resolve([id](Napi::Env env) { return Napi::Number::New(env, id); });
        } catch (const EngineError& err) {
          ch->reject(err.code, err.what());
        } catch (const std::exception& err) {
          ch->reject("INTERNAL", err.what());
        }
      }).detach();
      return ch->promise();
    });
  }

  // Runs fn(executor) on the executor thread; resolves with make(env) built from its result.
  template <typename Fn>
  Napi::Value on_executor(Napi::Env env, const char* name, Fn fn) {
    auto ch = JsChannel::create(env, env.Undefined(), name);
    engine(env).post([ch, fn](Executor& e) {
      try {
        ch->resolve(fn(e));
      } catch (const EngineError& err) {
        ch->reject(err.code, err.what());
      } catch (const std::exception& err) {
        ch->reject("INTERNAL", err.what());
      }
    });
    return ch->promise();
  }

  // saveAdapter(id, file) -> Promise<void>; runs between training steps so the weights are consistent.
  Napi::Value save_adapter(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    return guard(env, [&]() -> Napi::Value {
      auto adapter = engine(env).adapter(info[0].As<Napi::Number>().Int32Value());
      std::string file = info[1].As<Napi::String>().Utf8Value();
      return on_executor(env, "tuneserve.saveAdapter", [adapter, file](Executor& e) -> JsChannel::Make {
        e.sync_adapter(adapter);
        lora_save(*adapter->host, file);
        return [](Napi::Env env) { return env.Undefined(); };
      });
    });
  }

  Napi::Value remove_adapter(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    return guard(env, [&]() -> Napi::Value {
      engine(env).remove_adapter(info[0].As<Napi::Number>().Int32Value());
      return env.Undefined();
    });
  }

  // adapterTensors(id, grads?) -> Promise<{peftKey: Float32Array}>
  Napi::Value get_adapter_tensors(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    return guard(env, [&]() -> Napi::Value {
      auto adapter = engine(env).adapter(info[0].As<Napi::Number>().Int32Value());
      bool grads = info.Length() > 1 && info[1].ToBoolean().Value();
      return on_executor(env, "tuneserve.adapterTensors", [adapter, grads](Executor& e) -> JsChannel::Make {
        e.sync_adapter(adapter);
        auto copy = std::make_shared<LoraAdapter>(*adapter->host);
        return [copy, grads](Napi::Env env) { return adapter_tensors(env, *copy, grads); };
      });
    });
  }

  AdapterPool::Handle adapter_or_null(Napi::Env env, const Napi::Value& v) {
    int id = v.IsNumber() ? v.As<Napi::Number>().Int32Value() : 0;
    return id > 0 ? engine(env).adapter(id) : nullptr;
  }

  // logits(ids: Int32Array, id) -> Promise<Float32Array (T*V)>
  Napi::Value logits(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    return guard(env, [&]() -> Napi::Value {
      auto ids = to_ids(info[0], "ids");
      auto adapter = adapter_or_null(env, info[1]);
      require(!ids.empty(), "INVALID_ARGUMENT", "ids must not be empty");
      return on_executor(env, "tuneserve.logits", [ids, adapter](Executor& e) -> JsChannel::Make {
        auto out = std::make_shared<std::vector<float>>(e.logits(ids, adapter));
        return [out](Napi::Env env) { return to_js(env, *out); };
      });
    });
  }

  // trainPass({B, T, ids, labels, docStart?}, id, {backward, recompute, lossScale, dropout, dropoutSeed, dropoutStep})
  //   -> Promise<{loss, grads?: {peftKey: Float32Array}}>  (one pass, no optimizer step; for tests)
  Napi::Value train_pass(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    return guard(env, [&]() -> Napi::Value {
      Napi::Object b = info[0].As<Napi::Object>();
      TrainBatch batch;
      batch.B = b.Get("B").As<Napi::Number>().Int32Value();
      batch.T = b.Get("T").As<Napi::Number>().Int32Value();
      batch.ids = to_ids(b.Get("ids"), "ids");
      batch.labels = to_ids(b.Get("labels"), "labels");
      if (b.Has("docStart") && !b.Get("docStart").IsUndefined()) batch.doc_start = to_ids(b.Get("docStart"), "docStart");
      auto adapter = adapter_or_null(env, info[1]);
      Napi::Object o = info.Length() > 2 && info[2].IsObject() ? info[2].As<Napi::Object>() : Napi::Object::New(env);
      TrainPassOptions opt;
      opt.backward = flag(o, "backward", true) && adapter != nullptr;
      opt.recompute = flag(o, "recompute", true);
      opt.loss_scale = (float)num(o, "lossScale", 1.0);
      opt.dropout.p = (float)num(o, "dropout", 0.0);
      opt.dropout.seed = (uint64_t)num(o, "dropoutSeed", 0);
      opt.dropout.step = (uint64_t)num(o, "dropoutStep", 0);
      return on_executor(env, "tuneserve.trainPass", [batch, adapter, opt](Executor& e) -> JsChannel::Make {
        double loss = e.train_pass(adapter, batch, opt);
        std::shared_ptr<LoraAdapter> copy = opt.backward ? std::make_shared<LoraAdapter>(*adapter->host) : nullptr;
        int64_t targets = batch.count_targets();
        return [loss, copy, targets](Napi::Env env) {
          Napi::Object r = Napi::Object::New(env);
          r.Set("loss", loss);
          r.Set("targets", (double)targets);
          if (copy) r.Set("grads", adapter_tensors(env, *copy, true));
          return r;
        };
      });
    });
  }

  // train({slot, examples: [{ids, labels, docStart?}], evalExamples?, forgettingExamples?, hyper}, onStep) -> {id, promise}
  Napi::Value train(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    return guard(env, [&]() -> Napi::Value {
      Napi::Object spec = info[0].As<Napi::Object>();
      auto adapter = engine(env).adapter(spec.Get("slot").As<Napi::Number>().Int32Value());
      auto read_examples = [&](const char* key) {
        std::vector<TrainExample> out;
        if (!spec.Get(key).IsArray()) return out;
        Napi::Array rows = spec.Get(key).As<Napi::Array>();
        out.resize(rows.Length());
        for (uint32_t i = 0; i < rows.Length(); i++) {
          Napi::Object r = rows.Get(i).As<Napi::Object>();
          out[i].ids = to_ids(r.Get("ids"), "examples[].ids");
          out[i].labels = to_ids(r.Get("labels"), "examples[].labels");
          if (r.Has("docStart") && !r.Get("docStart").IsUndefined()) out[i].doc_start = to_ids(r.Get("docStart"), "examples[].docStart");
        }
        return out;
      };
      std::vector<TrainExample> examples = read_examples("examples");
      std::vector<TrainExample> eval_examples = read_examples("evalExamples");
      std::vector<TrainExample> forgetting_examples = read_examples("forgettingExamples");
      TrainHyper hyper = hyper_from_js(spec.Get("hyper").As<Napi::Object>());
      auto ch = JsChannel::create(env, info[1], "tuneserve.train");
      TrainingCallbacks cb;
      auto share = std::make_shared<ShareReport>();  // on_share then on_step, both on the executor thread
      cb.on_share = [share](const ShareReport& r) { *share = r; };
      cb.on_step = [ch, share](const StepReport& r) {
        ch->emit([r, s = *share](Napi::Env env) {
          Napi::Object o = step_to_js(env, r);
          Napi::Object sh = Napi::Object::New(env);
          sh.Set("trainingSeconds", s.training_seconds);
          sh.Set("generationSeconds", s.generation_seconds);
          sh.Set("share", s.share);
          sh.Set("generationSteps", (double)s.generation_steps);
          sh.Set("deferredMicroSteps", (double)s.deferred_micro_steps);
          o.Set("share", sh);
          return o;
        });
      };
      cb.on_done = [ch](const StepReport& last, bool cancelled) {
        ch->resolve([last, cancelled](Napi::Env env) {
          Napi::Object o = step_to_js(env, last);
          o.Set("cancelled", cancelled);
          return o;
        });
      };
      cb.on_error = [ch](const std::string& code, const std::string& msg) { ch->reject(code, msg); };
      uint64_t id = engine(env).submit_training(adapter, std::move(examples), hyper, std::move(cb), std::move(eval_examples),
                                                std::move(forgetting_examples));
      Napi::Object r = Napi::Object::New(env);
      r.Set("id", (double)id);
      r.Set("promise", ch->promise());
      return r;
    });
  }

  // generate({slot, promptIds, maxTokens, temperature, topK, topP, repetitionPenalty, seed, stopIds}, onTokens)
  //   -> {id, promise: Promise<{ids, finishReason, promptTokens, prefillSeconds, decodeSeconds}>}
  Napi::Value generate(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    return guard(env, [&]() -> Napi::Value {
      Napi::Object s = info[0].As<Napi::Object>();
      GenerationRequest req;
      req.adapter = adapter_or_null(env, s.Get("slot"));
      req.prompt = to_ids(s.Get("promptIds"), "promptIds");
      req.max_tokens = (int)num(s, "maxTokens", 128);
      req.sampling.temperature = (float)num(s, "temperature", 0);
      req.sampling.top_k = (int)num(s, "topK", 0);
      req.sampling.top_p = (float)num(s, "topP", 1);
      req.sampling.repetition_penalty = (float)num(s, "repetitionPenalty", 1);
      req.sampling.seed = (uint64_t)num(s, "seed", 0);
      if (s.Get("stopIds").IsArray()) {
        Napi::Array a = s.Get("stopIds").As<Napi::Array>();
        for (uint32_t i = 0; i < a.Length(); i++) req.stop_ids.push_back(a.Get(i).As<Napi::Number>().Int32Value());
      }
      auto ch = JsChannel::create(env, info[1], "tuneserve.generate");
      GenerationCallbacks cb;
      cb.on_tokens = [ch](const std::vector<int32_t>& ids) { ch->emit([ids](Napi::Env env) { return to_js(env, ids); }); };
      cb.on_done = [ch](const GenerationResult& r) {
        ch->resolve([r](Napi::Env env) {
          Napi::Object o = Napi::Object::New(env);
          o.Set("ids", to_js(env, r.ids));
          o.Set("finishReason", r.finish_reason);
          o.Set("promptTokens", (double)r.prompt_tokens);
          o.Set("prefillSeconds", r.prefill_seconds);
          o.Set("decodeSeconds", r.decode_seconds);
          return o;
        });
      };
      cb.on_error = [ch](const std::string& code, const std::string& msg) { ch->reject(code, msg); };
      uint64_t id = engine(env).submit_generation(std::move(req), std::move(cb));
      Napi::Object r = Napi::Object::New(env);
      r.Set("id", (double)id);
      r.Set("promise", ch->promise());
      return r;
    });
  }

  Napi::Value cancel(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    if (engine_) engine_->cancel((uint64_t)info[0].As<Napi::Number>().Int64Value());
    return env.Undefined();
  }

  // Stops the executor (pending work ends as cancelled) and frees the model. Idempotent.
  Napi::Value close(const Napi::CallbackInfo& info) {
    engine_.reset();
    return info.Env().Undefined();
  }

  std::unique_ptr<Executor> engine_;
};

Napi::FunctionReference EngineWrap::ctor;

// loadModel({config, files, quant, device, float32Compute?, threads?, maxActiveSequences?, prefillChunk?,
//            maxSeqLen?, adapterSlots?, maxLoraRank?, kvCacheBytes?, stepGraphs?, trainingMemoryBytes?})
//   -> Promise<NativeEngine>
// device: "cpu" or "cuda" (the caller resolved "auto"). The weights are read on a loader thread.
Napi::Value load_model(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  return guard(env, [&]() -> Napi::Value {
    Napi::Object spec = info[0].As<Napi::Object>();
    LlamaConfig cfg = config_from_js(spec.Get("config").As<Napi::Object>());
    std::vector<std::string> files;
    Napi::Array fa = spec.Get("files").As<Napi::Array>();
    for (uint32_t i = 0; i < fa.Length(); i++) files.push_back(fa.Get(i).As<Napi::String>().Utf8Value());
    std::string quant = spec.Get("quant").IsString() ? spec.Get("quant").As<Napi::String>().Utf8Value() : "none";
    std::string device = spec.Get("device").IsString() ? spec.Get("device").As<Napi::String>().Utf8Value() : "cpu";
    require(device == "cpu" || device == "cuda", "INVALID_ARGUMENT", "device must be cpu or cuda, got " + device);
    cuda::CudaBackendOptions cuda_options;
    cuda_options.float32_compute = flag(spec, "float32Compute", false);
    if (spec.Get("threads").IsNumber()) set_num_threads(spec.Get("threads").As<Napi::Number>().Int32Value());
    ExecutorOptions options;
    options.max_active_sequences = (int)num(spec, "maxActiveSequences", options.max_active_sequences);
    options.prefill_chunk = (int)num(spec, "prefillChunk", options.prefill_chunk);
    options.max_seq_len = (int)num(spec, "maxSeqLen", options.max_seq_len);
    options.adapter_slots = (int)num(spec, "adapterSlots", options.adapter_slots);
    options.max_lora_rank = (int)num(spec, "maxLoraRank", options.max_lora_rank);
    options.kv_cache_bytes = (uint64_t)num(spec, "kvCacheBytes", 0);
    options.step_graphs = flag(spec, "stepGraphs", options.step_graphs);
    options.training_memory_bytes = (uint64_t)num(spec, "trainingMemoryBytes", 0);
    auto ch = JsChannel::create(env, env.Undefined(), "tuneserve.loadModel");
    std::thread([cfg, files, quant, device, cuda_options, options, ch] {
      try {
        std::unique_ptr<Backend> backend =
            device == "cuda" ? cuda::make_cuda_backend(cuda_options) : cpu::make_cpu_backend();
        auto weights = std::make_shared<const LlamaWeights>(load_llama_weights(cfg, files, quant));
        auto* engine = new Executor(std::move(backend), std::move(weights), options);
        ch->resolve([engine](Napi::Env env) -> Napi::Value {
          return EngineWrap::ctor.New({Napi::External<Executor>::New(env, engine)});
        });
      } catch (const EngineError& err) {
        ch->reject(err.code, err.what());
      } catch (const std::bad_alloc&) {
        ch->reject("RESOURCE_EXHAUSTED", "not enough memory to load the model");
      } catch (const std::exception& err) {
        ch->reject("INTERNAL", err.what());
      }
    }).detach();
    return ch->promise();
  });
}

}  // namespace

void init_engine(Napi::Env env, Napi::Object exports) {
  EngineWrap::define(env, exports);
  exports.Set("loadModel", Napi::Function::New(env, load_model));
  exports.Set("planTrainingMemory", Napi::Function::New(env, plan_training_memory_js));
  exports.Set("lrMultiplier", Napi::Function::New(env, [](const Napi::CallbackInfo& info) -> Napi::Value {
                return guard(info.Env(), [&]() -> Napi::Value {
                  return Napi::Number::New(info.Env(), lr_multiplier(info[0].As<Napi::String>().Utf8Value(),
                                                                     info[1].As<Napi::Number>().Int64Value(),
                                                                     info[2].As<Napi::Number>().Int64Value(),
                                                                     info[3].As<Napi::Number>().Int64Value()));
                });
              }));
}

}  // namespace ts::addon
