// Module entry of the native addon: each bind_*.cpp registers one area of the engine's JS surface.
// The surface is typed once, in src/engine/native.ts.
#include <napi.h>

#include "addon/bindings.h"

static Napi::Object Init(Napi::Env env, Napi::Object exports) {
  ts::addon::init_core(env, exports);
  ts::addon::init_kernels(env, exports);
  ts::addon::init_engine(env, exports);
  ts::addon::init_tools(env, exports);
  return exports;
}

NODE_API_MODULE(tuneserve_native, Init)
