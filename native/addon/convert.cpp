// JS model config / LoRA spec → LlamaConfig / LoraSpec (see convert.h for the field names).
#include "addon/convert.h"

#include <cmath>
#include <string>

#include "core/error.h"

namespace ts::addon {

namespace {

double number_field(const Napi::Object& obj, const char* where, const char* key, bool required, double fallback) {
  Napi::Value v = obj.Get(key);
  if (v.IsUndefined() || v.IsNull()) {
    require(!required, "INVALID_ARGUMENT", std::string(where) + "." + key + " is required");
    return fallback;
  }
  require(v.IsNumber() && std::isfinite(v.As<Napi::Number>().DoubleValue()), "INVALID_ARGUMENT",
          std::string(where) + "." + key + " must be a finite number");
  return v.As<Napi::Number>().DoubleValue();
}

int int_field(const Napi::Object& obj, const char* where, const char* key, bool required, int fallback) {
  double d = number_field(obj, where, key, required, fallback);
  require(d == std::floor(d) && d >= 0 && d <= 2147483647.0, "INVALID_ARGUMENT",
          std::string(where) + "." + key + " must be a non-negative integer");
  return int(d);
}

bool bool_field(const Napi::Object& obj, const char* where, const char* key, bool fallback) {
  Napi::Value v = obj.Get(key);
  if (v.IsUndefined() || v.IsNull()) return fallback;
  require(v.IsBoolean(), "INVALID_ARGUMENT", std::string(where) + "." + key + " must be a boolean");
  return v.As<Napi::Boolean>().Value();
}

}  // namespace

LlamaConfig config_from_js(Napi::Object obj) {
  const char* w = "config";
  LlamaConfig c;
  c.H = int_field(obj, w, "H", true, 0);
  c.I = int_field(obj, w, "I", true, 0);
  c.L = int_field(obj, w, "L", true, 0);
  c.NH = int_field(obj, w, "NH", true, 0);
  c.NKV = int_field(obj, w, "NKV", true, 0);
  c.D = int_field(obj, w, "D", true, 0);
  c.V = int_field(obj, w, "V", true, 0);
  c.rms_eps = float(number_field(obj, w, "rmsEps", true, 0));
  c.rope_theta = float(number_field(obj, w, "ropeTheta", true, 0));
  c.rope_llama3 = bool_field(obj, w, "ropeLlama3", c.rope_llama3);
  c.rope_factor = float(number_field(obj, w, "ropeFactor", false, c.rope_factor));
  c.rope_low_freq_factor = float(number_field(obj, w, "ropeLowFreqFactor", false, c.rope_low_freq_factor));
  c.rope_high_freq_factor = float(number_field(obj, w, "ropeHighFreqFactor", false, c.rope_high_freq_factor));
  c.rope_original_max_pos = int_field(obj, w, "ropeOriginalMaxPos", false, c.rope_original_max_pos);
  c.tied = bool_field(obj, w, "tied", c.tied);
  c.max_pos = int_field(obj, w, "maxPos", false, c.max_pos);
  return c;
}

LoraSpec lora_spec_from_js(Napi::Object obj) {
  const char* w = "lora";
  LoraSpec s;
  s.r = int_field(obj, w, "r", true, 0);
  s.alpha = float(number_field(obj, w, "alpha", true, 0));
  s.dropout = float(number_field(obj, w, "dropout", false, 0));
  s.rslora = bool_field(obj, w, "rslora", false);
  Napi::Value targets = obj.Get("targets");
  require(targets.IsArray(), "INVALID_ARGUMENT", "lora.targets must be an array of module names");
  Napi::Array list = targets.As<Napi::Array>();
  for (uint32_t i = 0; i < list.Length(); i++) {
    Napi::Value v = list.Get(i);
    require(v.IsString(), "INVALID_ARGUMENT", "lora.targets[" + std::to_string(i) + "] must be a string");
    const std::string name = v.As<Napi::String>().Utf8Value();
    if (name == "all-linear") {
      s.target_mask |= (1u << NUM_TARGETS) - 1;
      continue;
    }
    int found = -1;
    for (int t = 0; t < NUM_TARGETS; t++)
      if (name == target_name(t)) found = t;
    require(found >= 0, "INVALID_ARGUMENT",
            "lora.targets[" + std::to_string(i) + "]: unknown module '" + name +
                "' (expected q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj or all-linear)");
    s.target_mask |= 1u << found;
  }
  require(s.target_mask != 0, "INVALID_ARGUMENT", "lora.targets must name at least one module");
  return s;
}

}  // namespace ts::addon
