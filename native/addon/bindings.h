// The addon's registration functions and the shared helpers every binding file uses.
#pragma once
#include <napi.h>

#include <functional>
#include <string>

#include "core/error.h"

namespace ts::addon {

void init_core(Napi::Env env, Napi::Object exports);     // bind_core.cpp: safetensors, NF4, device info
void init_kernels(Napi::Env env, Napi::Object exports);  // bind_kernels.cpp: matrix-product checks
void init_engine(Napi::Env env, Napi::Object exports);   // bind_engine.cpp: the model, train, generate
void init_tools(Napi::Env env, Napi::Object exports);    // bind_tools.cpp: merge, sampler checks

// Creates a JS Error carrying `code` (an EngineError's code, or INTERNAL for anything else).
Napi::Error make_error(Napi::Env env, const std::string& code, const std::string& message);

// Runs fn, turning a thrown EngineError / std::exception into a thrown JS Error with a `code`.
template <typename F>
auto guard(Napi::Env env, F&& fn) -> decltype(fn()) {
  try {
    return fn();
  } catch (const EngineError& e) {
    throw make_error(env, e.code, e.what());
  } catch (const Napi::Error&) {
    throw;
  } catch (const std::exception& e) {
    throw make_error(env, "INTERNAL", e.what());
  }
}

}  // namespace ts::addon
