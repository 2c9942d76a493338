// A training checkpoint: everything a resumed job needs to continue exactly where the checkpoint was
// taken, in one folder written atomically (core/durable_fs.h):
//   adapter_model.safetensors   A and B (PEFT key names): with adapter_config.json a PEFT folder as is
//   adapter_config.json         as the job's TypeScript side wrote it
//   optimizer.safetensors       AdamW moments: "<PEFT key>.exp_avg" and ".exp_avg_sq", float32
//   trainer_state.json          the data position, the schedule, the guard and evaluation state, and
//                               the hashes of the job's config and dataset (a resume must match them)
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "model/lora.h"

namespace ts {

// Where training stands between two optimizer steps.
struct TrainerPosition {
  int64_t step = 0;            // optimizer steps done
  int64_t epoch = -1;          // epoch of `cursor` (-1 before the first)
  int64_t cursor = 0;          // next micro-batch of that epoch
  uint64_t micro_counter = 0;  // micro-batches run so far (keys the dropout masks)
};

struct TrainerState {
  static constexpr int FORMAT = 1;
  TrainerPosition position;
  int64_t total_steps = 0;
  int64_t examples = 0;               // training examples of the job (a resume must have as many)
  double lr_scale = 1.0;              // multiplier the guard's rollbacks applied to the LR
  int interventions = 0;              // guard interventions so far
  std::vector<double> recent_losses;  // the last steps' losses (the spike guard's window)
  double best_eval_loss = -1;         // -1: no evaluation yet
  int64_t best_step = 0;
  int evals_since_best = 0;
  // The step the position ends: its loss and the job's latest evaluation (-1: none yet). A job resumed
  // at its last step, or stopped before its first new step, reports these.
  double last_loss = 0;
  double last_eval_loss = -1;
  std::string config_hash, data_hash;
};

// Writes `dir` (replacing a folder already there) from the host adapter `a`, whose A, B and AdamW
// moments are current. `adapter_config_json` may be empty (no adapter_config.json written).
void write_checkpoint(const std::string& dir, const LoraAdapter& a, const TrainerState& state,
                      const std::string& adapter_config_json);
// Reads trainer_state.json of a checkpoint folder; INVALID_CHECKPOINT naming the problem.
TrainerState read_trainer_state(const std::string& dir);
// Reads optimizer.safetensors into the moments of `a` (which has training enabled).
void read_moments(const std::string& dir, LoraAdapter& a);

}  // namespace ts
