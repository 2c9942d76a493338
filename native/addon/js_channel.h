// A bridge from engine threads to JavaScript: events go to a JS callback and the outcome settles a
// promise, all on the main thread through one thread-safe function. Engine threads hand over closures
// that build JS values (`Make`), so only the main thread ever touches napi values.
#pragma once
#include <napi.h>

#include <atomic>
#include <functional>
#include <memory>
#include <string>

#include "addon/bindings.h"

namespace ts::addon {

class JsChannel : public std::enable_shared_from_this<JsChannel> {
 public:
  using Make = std::function<Napi::Value(Napi::Env)>;

  // onEvent may be undefined (no events). The promise is `promise()`.
  static std::shared_ptr<JsChannel> create(Napi::Env env, Napi::Value on_event, const char* name) {
    auto ch = std::shared_ptr<JsChannel>(new JsChannel(env));
    Napi::Function fn = on_event.IsFunction() ? on_event.As<Napi::Function>()
                                              : Napi::Function::New(env, [](const Napi::CallbackInfo&) {});
    ch->tsfn_ = Napi::ThreadSafeFunction::New(env, fn, name, 0, 1);
    return ch;
  }

  Napi::Promise promise() const { return deferred_.Promise(); }

  // From any thread: calls the JS callback with make(env).
  void emit(Make make) {
    if (settled_.load()) return;
    auto* m = new Make(std::move(make));
    if (tsfn_.NonBlockingCall(m, [](Napi::Env env, Napi::Function cb, Make* mk) {
          Napi::HandleScope scope(env);
          try {
            cb.Call({(*mk)(env)});
          } catch (const Napi::Error& e) {
            // A throwing JS listener must not take the engine down; report it on the console.
            fprintf(stderr, "tuneserve: event listener threw: %s\n", e.Message().c_str());
          }
          delete mk;
        }) != napi_ok)
      delete m;
  }

  // From any thread, once: resolves with make(env) (or rejects) and releases the channel.
  void resolve(Make make) { settle(std::move(make), "", ""); }
  void reject(const std::string& code, const std::string& message) { settle(nullptr, code, message); }

 private:
  explicit JsChannel(Napi::Env env) : deferred_(Napi::Promise::Deferred::New(env)) {}

  void settle(Make make, std::string code, std::string message) {
    if (settled_.exchange(true)) return;
    struct Outcome {
      std::shared_ptr<JsChannel> self;
      Make make;
      std::string code, message;
    };
    auto* o = new Outcome{shared_from_this(), std::move(make), std::move(code), std::move(message)};
    tsfn_.BlockingCall(o, [](Napi::Env env, Napi::Function, Outcome* out) {
      Napi::HandleScope scope(env);
      if (out->make) {
        try {
          out->self->deferred_.Resolve(out->make(env));
        } catch (const Napi::Error& e) {
          out->self->deferred_.Reject(e.Value());
        }
      } else {
        out->self->deferred_.Reject(make_error(env, out->code, out->message).Value());
      }
      delete out;
    });
    tsfn_.Release();
  }

  Napi::Promise::Deferred deferred_;
  Napi::ThreadSafeFunction tsfn_;
  std::atomic<bool> settled_{false};
};

}  // namespace ts::addon
