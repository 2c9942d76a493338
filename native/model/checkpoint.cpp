// Training checkpoints (checkpoint.h): the folder's files, written under a temporary name and
// published whole.
#include "model/checkpoint.h"

#include <unistd.h>

#include <cmath>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <sstream>

#include "core/durable_fs.h"
#include "core/error.h"
#include "core/json.h"
#include "core/safetensors.h"

namespace ts {

namespace {

std::string number(double v) {
  char buf[64];
  std::snprintf(buf, sizeof buf, "%.17g", v);  // round-trips every double exactly
  return buf;
}

std::string state_json(const TrainerState& s) {
  std::string o = "{\n";
  o += "  \"format\": " + std::to_string(TrainerState::FORMAT) + ",\n";
  o += "  \"step\": " + std::to_string(s.position.step) + ",\n";
  o += "  \"epoch\": " + std::to_string(s.position.epoch) + ",\n";
  o += "  \"cursor\": " + std::to_string(s.position.cursor) + ",\n";
  o += "  \"micro_counter\": " + std::to_string(s.position.micro_counter) + ",\n";
  o += "  \"total_steps\": " + std::to_string(s.total_steps) + ",\n";
  o += "  \"examples\": " + std::to_string(s.examples) + ",\n";
  o += "  \"lr_scale\": " + number(s.lr_scale) + ",\n";
  o += "  \"interventions\": " + std::to_string(s.interventions) + ",\n";
  o += "  \"recent_losses\": [";
  for (size_t i = 0; i < s.recent_losses.size(); i++) o += (i ? ", " : "") + number(s.recent_losses[i]);
  o += "],\n";
  o += "  \"best_eval_loss\": " + number(s.best_eval_loss) + ",\n";
  o += "  \"best_step\": " + std::to_string(s.best_step) + ",\n";
  o += "  \"evals_since_best\": " + std::to_string(s.evals_since_best) + ",\n";
  o += "  \"last_loss\": " + number(s.last_loss) + ",\n";
  o += "  \"last_eval_loss\": " + number(s.last_eval_loss) + ",\n";
  o += "  \"config_hash\": ";
  json_append_string(o, s.config_hash);
  o += ",\n  \"data_hash\": ";
  json_append_string(o, s.data_hash);
  o += "\n}\n";
  return o;
}

template <typename Fn>
void for_each_module(const LoraAdapter& a, Fn fn) {
  for (int l = 0; l < a.L; l++)
    for (int t = 0; t < NUM_TARGETS; t++)
      if (a.has(t)) fn(l, t, a.mod(l, t));
}

}  // namespace

void write_checkpoint(const std::string& dir, const LoraAdapter& a, const TrainerState& state,
                      const std::string& adapter_config_json) {
  const std::string tmp = parent_dir(dir) + "/." + dir.substr(parent_dir(dir).size() + 1) + ".tmp-" +
                          std::to_string(::getpid());
  make_dir(parent_dir(dir));
  remove_tree(tmp);
  make_dir(tmp);
  try {
    lora_save(a, tmp + "/adapter_model.safetensors");
    std::vector<TensorDecl> decls;
    std::vector<const std::vector<float>*> data;
    for_each_module(a, [&](int l, int t, const LoraModule& m) {
      require(m.mA.size() == m.A.size() && m.mB.size() == m.B.size(), "INTERNAL", "checkpoint: moments missing");
      for (char which : {'A', 'B'}) {
        const std::vector<int64_t> shape = which == 'A' ? std::vector<int64_t>{m.r, m.in} : std::vector<int64_t>{m.out, m.r};
        decls.push_back({peft_key(l, t, which) + ".exp_avg", DType::F32, shape});
        data.push_back(which == 'A' ? &m.mA : &m.mB);
        decls.push_back({peft_key(l, t, which) + ".exp_avg_sq", DType::F32, shape});
        data.push_back(which == 'A' ? &m.vA : &m.vB);
      }
    });
    write_safetensors(tmp + "/optimizer.safetensors", decls, {{"format", "pt"}}, [&](size_t i, std::vector<uint8_t>& b) {
      b.resize(data[i]->size() * sizeof(float));
      std::memcpy(b.data(), data[i]->data(), b.size());
    });
    write_file_durable(tmp + "/trainer_state.json", state_json(state));
    if (!adapter_config_json.empty()) write_file_durable(tmp + "/adapter_config.json", adapter_config_json);
    publish_dir(tmp, dir);
  } catch (...) {
    remove_tree(tmp);
    throw;
  }
}

TrainerState read_trainer_state(const std::string& dir) {
  const std::string path = dir + "/trainer_state.json";
  std::ifstream in(path, std::ios::binary);
  require(in.good(), "INVALID_CHECKPOINT", path + " is missing: not a checkpoint folder");
  std::stringstream buf;
  buf << in.rdbuf();
  JsonValue v;
  try {
    v = json_parse(buf.str());
  } catch (const EngineError& e) {
    throw EngineError("INVALID_CHECKPOINT", path + ": " + e.what());
  }
  auto num = [&](const char* key) {
    const JsonValue* f = v.find(key);
    require(f && f->is_number(), "INVALID_CHECKPOINT", path + ": \"" + key + "\" is missing or not a number");
    return f->number;
  };
  auto str = [&](const char* key) {
    const JsonValue* f = v.find(key);
    require(f && f->is_string(), "INVALID_CHECKPOINT", path + ": \"" + key + "\" is missing or not a string");
    return f->text;
  };
  require(v.is_object() && num("format") == TrainerState::FORMAT, "INVALID_CHECKPOINT",
          path + ": unknown format (this engine reads format " + std::to_string(TrainerState::FORMAT) + ")");
  TrainerState s;
  s.position.step = int64_t(num("step"));
  s.position.epoch = int64_t(num("epoch"));
  s.position.cursor = int64_t(num("cursor"));
  s.position.micro_counter = uint64_t(num("micro_counter"));
  s.total_steps = int64_t(num("total_steps"));
  s.examples = int64_t(num("examples"));
  s.lr_scale = num("lr_scale");
  s.interventions = int(num("interventions"));
  const JsonValue* losses = v.find("recent_losses");
  require(losses && losses->is_array(), "INVALID_CHECKPOINT", path + ": \"recent_losses\" is missing");
  for (const JsonValue& x : losses->items) {
    require(x.is_number(), "INVALID_CHECKPOINT", path + ": \"recent_losses\" holds a non-number");
    s.recent_losses.push_back(x.number);
  }
  s.best_eval_loss = num("best_eval_loss");
  s.best_step = int64_t(num("best_step"));
  s.evals_since_best = int(num("evals_since_best"));
  // Checkpoints written before these two fields: the spike window's newest loss, no evaluation known.
  const JsonValue* last_loss = v.find("last_loss");
  const JsonValue* last_eval = v.find("last_eval_loss");
  require(!last_loss || last_loss->is_number(), "INVALID_CHECKPOINT", path + ": \"last_loss\" is not a number");
  require(!last_eval || last_eval->is_number(), "INVALID_CHECKPOINT", path + ": \"last_eval_loss\" is not a number");
  s.last_loss = last_loss ? last_loss->number : s.recent_losses.empty() ? 0 : s.recent_losses.back();
  s.last_eval_loss = last_eval ? last_eval->number : -1;
  s.config_hash = str("config_hash");
  s.data_hash = str("data_hash");
  return s;
}

void read_moments(const std::string& dir, LoraAdapter& a) {
  const std::string path = dir + "/optimizer.safetensors";
  SafetensorsReader reader(path);
  for (int l = 0; l < a.L; l++)
    for (int t = 0; t < NUM_TARGETS; t++) {
      if (!a.has(t)) continue;
      LoraModule& m = a.mod(l, t);
      for (char which : {'A', 'B'}) {
        for (const char* kind : {".exp_avg", ".exp_avg_sq"}) {
          const std::string key = peft_key(l, t, which) + kind;
          const TensorInfo* info = reader.find(key);
          require(info != nullptr, "INVALID_CHECKPOINT", path + ": " + key + " is missing");
          std::vector<float>& dst = std::strcmp(kind, ".exp_avg") == 0 ? (which == 'A' ? m.mA : m.mB)
                                                                        : (which == 'A' ? m.vA : m.vB);
          require(info->numel() == int64_t(dst.size()), "INVALID_CHECKPOINT",
                  path + ": " + key + " does not have the adapter's shape");
          reader.read_f32(*info, dst.data());
        }
      }
    }
}

}  // namespace ts
