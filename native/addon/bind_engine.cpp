// Registers the engine part of the addon's JS surface: loadModel() -> NativeEngine with adapters,
// training, generation and test passes. Long work runs on the engine's executor thread or a loader
// thread; results come back through JsChannel. JS (src/engine/native.ts) validates arguments; this
// file converts them.
#include <memory>
#include <thread>

#include "addon/bindings.h"
#include "addon/convert.h"
#include "addon/js_channel.h"
#include "core/thread_pool.h"
#include "cpu/gemm.h"
#include "model/engine.h"

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

TrainHyper hyper_from_js(const Napi::Object& h) {
  TrainHyper p;
  p.lr = num(h, "lr", p.lr);
  p.beta1 = (float)num(h, "beta1", p.beta1);
  p.beta2 = (float)num(h, "beta2", p.beta2);
  p.eps = (float)num(h, "eps", p.eps);
  p.weight_decay = (float)num(h, "weightDecay", p.weight_decay);
  p.max_grad_norm = (float)num(h, "maxGradNorm", p.max_grad_norm);
  if (h.Get("scheduler").IsString()) p.scheduler = h.Get("scheduler").As<Napi::String>().Utf8Value();
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
  p.checkpoint_every = (int)num(h, "checkpointEvery", p.checkpoint_every);
  if (h.Get("checkpointDir").IsString()) p.checkpoint_dir = h.Get("checkpointDir").As<Napi::String>().Utf8Value();
  return p;
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
  if (!r.checkpoint.empty()) o.Set("checkpoint", r.checkpoint);
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
                                       InstanceMethod("saveAdapter", &EngineWrap::save_adapter),
                                       InstanceMethod("removeAdapter", &EngineWrap::remove_adapter),
                                       InstanceMethod("adapterTensors", &EngineWrap::get_adapter_tensors),
                                       InstanceMethod("logits", &EngineWrap::logits),
                                       InstanceMethod("trainPass", &EngineWrap::train_pass),
                                       InstanceMethod("train", &EngineWrap::train),
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
    engine_.reset(info[0].As<Napi::External<Engine>>().Data());
  }

 private:
  Engine& engine(Napi::Env env) {
    if (!engine_) throw make_error(env, "FAILED_PRECONDITION", "the engine has been closed");
    return *engine_;
  }

  Napi::Value info(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    Engine& e = engine(env);
    const LlamaConfig& c = e.config();
    Napi::Object o = Napi::Object::New(env);
    o.Set("quant", e.weights().quant);
    o.Set("weightBytes", (double)e.weights().bytes());
    o.Set("device", "cpu");
    o.Set("gemmKernel", cpu::gemm_kernel_name());
    o.Set("threads", num_threads());
    o.Set("vocabSize", c.V);
    o.Set("numLayers", c.L);
    o.Set("maxActiveSequences", e.limits().max_active_sequences);
    o.Set("prefillChunk", e.limits().prefill_chunk);
    return o;
  }

  Napi::Value stats(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    Engine::Stats s = engine(env).stats();
    Napi::Object o = Napi::Object::New(env);
    o.Set("activeSequences", s.active_sequences);
    o.Set("queuedSequences", s.queued_sequences);
    o.Set("training", s.training);
    o.Set("kvBytes", (double)s.kv_bytes);
    o.Set("adapters", engine(env).adapter_count());
    return o;
  }

  // createAdapter(lora, seed) -> slot
  Napi::Value create_adapter(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    return guard(env, [&]() -> Napi::Value {
      Engine& e = engine(env);
      LoraSpec spec = lora_spec_from_js(info[0].As<Napi::Object>());
      uint64_t seed = (uint64_t)info[1].As<Napi::Number>().Int64Value();
      return Napi::Number::New(env, e.add_adapter(lora_create(e.config(), spec, seed)));
    });
  }

  // loadAdapter(lora, file) -> Promise<slot>; the file is read on its own thread.
  Napi::Value load_adapter(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    return guard(env, [&]() -> Napi::Value {
      Engine* e = &engine(env);
      LoraSpec spec = lora_spec_from_js(info[0].As<Napi::Object>());
      std::string file = info[1].As<Napi::String>().Utf8Value();
      auto ch = JsChannel::create(env, env.Undefined(), "tuneserve.loadAdapter");
      std::thread([e, spec, file, ch] {
        try {
          int slot = e->add_adapter(lora_load(e->config(), spec, file));
          ch->resolve([slot](Napi::Env env) { return Napi::Number::New(env, slot); });
        } catch (const EngineError& err) {
          ch->reject(err.code, err.what());
        } catch (const std::exception& err) {
          ch->reject("INTERNAL", err.what());
        }
      }).detach();
      return ch->promise();
    });
  }

  // Runs fn(model) on the executor; resolves with make(env) built from its result.
  template <typename Fn>
  Napi::Value on_executor(Napi::Env env, const char* name, Fn fn) {
    auto ch = JsChannel::create(env, env.Undefined(), name);
    engine(env).post([ch, fn](LlamaModel& model) {
      try {
        ch->resolve(fn(model));
      } catch (const EngineError& err) {
        ch->reject(err.code, err.what());
      } catch (const std::exception& err) {
        ch->reject("INTERNAL", err.what());
      }
    });
    return ch->promise();
  }

  // saveAdapter(slot, file) -> Promise<void>; runs between training steps so the weights are consistent.
  Napi::Value save_adapter(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    return guard(env, [&]() -> Napi::Value {
      auto adapter = engine(env).adapter(info[0].As<Napi::Number>().Int32Value());
      std::string file = info[1].As<Napi::String>().Utf8Value();
      return on_executor(env, "tuneserve.saveAdapter", [adapter, file](LlamaModel&) -> JsChannel::Make {
        lora_save(*adapter, file);
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

  // adapterTensors(slot, grads?) -> Promise<{peftKey: Float32Array}>
  Napi::Value get_adapter_tensors(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    return guard(env, [&]() -> Napi::Value {
      auto adapter = engine(env).adapter(info[0].As<Napi::Number>().Int32Value());
      bool grads = info.Length() > 1 && info[1].ToBoolean().Value();
      return on_executor(env, "tuneserve.adapterTensors", [adapter, grads](LlamaModel&) -> JsChannel::Make {
        auto copy = std::make_shared<LoraAdapter>(*adapter);
        return [copy, grads](Napi::Env env) { return adapter_tensors(env, *copy, grads); };
      });
    });
  }

  std::shared_ptr<LoraAdapter> slot_or_null(Napi::Env env, const Napi::Value& v) {
    int slot = v.IsNumber() ? v.As<Napi::Number>().Int32Value() : 0;
    return slot > 0 ? engine(env).adapter(slot) : nullptr;
  }

  // logits(ids: Int32Array, slot) -> Promise<Float32Array (T*V)>
  Napi::Value logits(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    return guard(env, [&]() -> Napi::Value {
      auto ids = to_ids(info[0], "ids");
      auto adapter = slot_or_null(env, info[1]);
      require(!ids.empty(), "INVALID_ARGUMENT", "ids must not be empty");
      return on_executor(env, "tuneserve.logits", [ids, adapter](LlamaModel& m) -> JsChannel::Make {
        auto out = std::make_shared<std::vector<float>>(ids.size() * (size_t)m.w.cfg.V);
        llama_logits(m, adapter.get(), ids.data(), (int)ids.size(), out->data());
        return [out](Napi::Env env) { return to_js(env, *out); };
      });
    });
  }

  // trainPass({B, T, ids, labels}, slot, {backward, recompute, lossScale, dropout, dropoutSeed, dropoutStep})
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
      auto adapter = slot_or_null(env, info[1]);
      Napi::Object o = info.Length() > 2 && info[2].IsObject() ? info[2].As<Napi::Object>() : Napi::Object::New(env);
      TrainPassOptions opt;
      opt.backward = flag(o, "backward", true) && adapter != nullptr;
      opt.recompute = flag(o, "recompute", true);
      opt.loss_scale = (float)num(o, "lossScale", 1.0);
      opt.dropout.p = (float)num(o, "dropout", 0.0);
      opt.dropout.seed = (uint64_t)num(o, "dropoutSeed", 0);
      opt.dropout.step = (uint64_t)num(o, "dropoutStep", 0);
      return on_executor(env, "tuneserve.trainPass", [batch, adapter, opt](LlamaModel& m) -> JsChannel::Make {
        if (adapter && opt.backward) {
          bool has_grads = false;  // enable_training() also resets AdamW moments: only on first use
          for (auto& layer : adapter->mods)
            for (auto& md : layer) has_grads |= !md.dA.empty();
          if (!has_grads) adapter->enable_training();
          adapter->zero_grad();
        }
        double loss = llama_train_pass(m, adapter.get(), batch, opt);
        std::shared_ptr<LoraAdapter> copy = opt.backward ? std::make_shared<LoraAdapter>(*adapter) : nullptr;
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

  // train({slot, examples: [{ids, labels}], evalExamples?, hyper}, onStep) -> {id, promise}
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
        }
        return out;
      };
      std::vector<TrainExample> examples = read_examples("examples");
      std::vector<TrainExample> eval_examples = read_examples("evalExamples");
      TrainHyper hyper = hyper_from_js(spec.Get("hyper").As<Napi::Object>());
      auto ch = JsChannel::create(env, info[1], "tuneserve.train");
      TrainingCallbacks cb;
      cb.on_step = [ch](const StepReport& r) { ch->emit([r](Napi::Env env) { return step_to_js(env, r); }); };
      cb.on_done = [ch](const StepReport& last, bool cancelled) {
        ch->resolve([last, cancelled](Napi::Env env) {
          Napi::Object o = step_to_js(env, last);
          o.Set("cancelled", cancelled);
          return o;
        });
      };
      cb.on_error = [ch](const std::string& code, const std::string& msg) { ch->reject(code, msg); };
      uint64_t id = engine(env).submit_training(adapter, std::move(examples), hyper, std::move(cb), std::move(eval_examples));
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
      req.adapter = slot_or_null(env, s.Get("slot"));
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

  std::unique_ptr<Engine> engine_;
};

Napi::FunctionReference EngineWrap::ctor;

// loadModel({config, files, quant, threads?, maxActiveSequences?, prefillChunk?}) -> Promise<NativeEngine>
Napi::Value load_model(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  return guard(env, [&]() -> Napi::Value {
    Napi::Object spec = info[0].As<Napi::Object>();
    LlamaConfig cfg = config_from_js(spec.Get("config").As<Napi::Object>());
    std::vector<std::string> files;
    Napi::Array fa = spec.Get("files").As<Napi::Array>();
    for (uint32_t i = 0; i < fa.Length(); i++) files.push_back(fa.Get(i).As<Napi::String>().Utf8Value());
    std::string quant = spec.Get("quant").IsString() ? spec.Get("quant").As<Napi::String>().Utf8Value() : "none";
    if (spec.Get("threads").IsNumber()) set_num_threads(spec.Get("threads").As<Napi::Number>().Int32Value());
    EngineLimits limits;
    limits.max_active_sequences = (int)num(spec, "maxActiveSequences", limits.max_active_sequences);
    limits.prefill_chunk = (int)num(spec, "prefillChunk", limits.prefill_chunk);
    auto ch = JsChannel::create(env, env.Undefined(), "tuneserve.loadModel");
    std::thread([cfg, files, quant, limits, ch] {
      try {
        auto* engine = new Engine(load_llama_weights(cfg, files, quant), limits);
        ch->resolve([engine](Napi::Env env) -> Napi::Value {
          return EngineWrap::ctor.New({Napi::External<Engine>::New(env, engine)});
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
