// JS Errors with a stable `code` property, made from engine failures.
#include "addon/bindings.h"

namespace ts::addon {

Napi::Error make_error(Napi::Env env, const std::string& code, const std::string& message) {
  Napi::Error err = Napi::Error::New(env, message);
  err.Value().Set("code", Napi::String::New(env, code));
  return err;
}

}  // namespace ts::addon
