// The LoRA training loop: epochs over shuffled examples, micro-batches with gradient accumulation,
// loss normalised over the whole accumulated batch, global-norm clipping, AdamW (torch semantics) and
// Hugging Face's LR schedules. It advances one micro-batch per call so the executor can interleave
// generation between micro-steps.
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "model/adapter_pool.h"
#include "model/llama.h"

namespace ts {

struct TrainExample {
  std::vector<int32_t> ids;     // (T)
  std::vector<int32_t> labels;  // (T) Hugging Face convention, -100 ignored
};

struct TrainHyper {
  double lr = 2e-4;  // double: reported back exactly as given
  float beta1 = 0.9f, beta2 = 0.999f, eps = 1e-8f;
  float weight_decay = 0.f;
  float max_grad_norm = 1.f;      // 0: no clipping
  std::string scheduler = "linear";  // constant | linear | cosine
  int warmup_steps = 0;
  int batch_size = 4;
  int grad_accum = 1;
  int epochs = 1;
  int64_t max_steps = 0;          // > 0 overrides epochs
  uint64_t seed = 42;
  bool shuffle = true;
  bool recompute = true;          // gradient checkpointing
  int32_t pad_id = 0;             // id written into padding positions (their labels are -100)
  int eval_every = 0;             // evaluate every N optimizer steps (and after the last) when eval examples exist
  int checkpoint_every = 0;       // write a checkpoint every N optimizer steps; 0: none
  std::string checkpoint_dir;     // checkpoints go to <checkpoint_dir>/checkpoint-<step>/adapter_model.safetensors
};

// Multiplier of the base LR after `step` optimizer steps (transformers' get_*_schedule_with_warmup).
double lr_multiplier(const std::string& scheduler, int64_t step, int64_t warmup, int64_t total);

struct StepReport {
  int64_t step = 0;       // optimizer steps done (1-based after the first)
  int64_t total_steps = 0;
  double epoch = 0;       // fractional epoch
  double loss = 0;        // mean token loss of the step's accumulated batch
  double grad_norm = 0;   // global norm before clipping
  double lr = 0;          // LR used by this step
  int64_t tokens = 0;     // non-padding tokens processed by this step
  int64_t targets = 0;    // trained (non-ignored) targets of this step
  double seconds = 0;     // wall time of this step
  bool has_eval = false;  // eval_loss was computed after this step
  double eval_loss = 0;   // mean token loss over the eval examples
  std::string checkpoint; // folder of the checkpoint written after this step, if any
};

class Trainer {
 public:
  // Plans and allocates the job's workspace for its longest batch before any work; a job that does not
  // fit the backend's free memory is refused with RESOURCE_EXHAUSTED naming the numbers.
  Trainer(LlamaModel& model, AdapterPool& pool, AdapterPool::Handle adapter, std::vector<TrainExample> examples,
          TrainHyper hyper, std::vector<TrainExample> eval_examples = {});
  ~Trainer();
  int64_t total_steps() const { return total_steps_; }
  bool done() const { return step_ >= total_steps_; }
  size_t workspace_bytes() const { return workspace_.bytes(); }
  // Runs one micro-batch; returns true (and fills *report) when it completed an optimizer step.
  bool micro_step(StepReport* report);

 private:
  void plan_step();  // picks the micro-batches of the next optimizer step
  TrainBatch make_batch(const std::vector<int64_t>& example_ids) const;
  void zero_grad();
  void optimizer_update(double lr, double* grad_norm);
  double evaluate();  // mean token loss over eval_examples_ (forward only)

  LlamaModel& model_;
  AdapterPool& pool_;
  AdapterPool::Handle adapter_;
  std::vector<TrainExample> examples_;
  std::vector<TrainExample> eval_examples_;
  TrainHyper hyper_;
  Buffer workspace_;               // the job's arena: every pass of this job is carved from it
  Arena arena_;
  Buffer norm_;                    // one double in backend memory: the squared gradient norm
  int64_t total_steps_ = 0;
  int64_t steps_per_epoch_ = 0;
  int64_t step_ = 0;
  int64_t epoch_ = 0;
  std::vector<int64_t> order_;     // example order of the current epoch
  int64_t cursor_ = 0;             // next micro-batch index within the epoch
  int64_t micro_batches_per_epoch_ = 0;
  // The optimizer step in progress.
  std::vector<std::vector<int64_t>> planned_;
  size_t planned_next_ = 0;
  int64_t planned_targets_ = 0;
  int64_t planned_tokens_ = 0;
  double step_loss_sum_ = 0;
  double step_started_ = 0;
  uint64_t micro_counter_ = 0;
};

}  // namespace ts
