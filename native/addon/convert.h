// JS → engine struct conversion shared by the binding files: the model config and the LoRA spec, as
// the TypeScript engine passes them (src/engine validates; these only check types so that a wrong
// call is an INVALID_ARGUMENT error instead of garbage numbers).
//
//   config: {H, I, L, NH, NKV, D, V, rmsEps, ropeTheta, ropeLlama3, ropeFactor, ropeLowFreqFactor,
//            ropeHighFreqFactor, ropeOriginalMaxPos, tied, maxPos}
//           H..V, rmsEps, ropeTheta are required; the rest default to LlamaConfig's values.
//   lora:   {r, alpha, dropout, rslora, targets: string[]}  PEFT module names (q_proj .. down_proj, or
//           "all-linear"); r, alpha and targets required, dropout 0 and rslora false by default.
#pragma once
#include <napi.h>

#include "model/config.h"
#include "model/lora.h"

namespace ts::addon {

// Both throw EngineError("INVALID_ARGUMENT", ...) naming the field; call them inside guard().
LlamaConfig config_from_js(Napi::Object obj);
LoraSpec lora_spec_from_js(Napi::Object obj);

}  // namespace ts::addon
