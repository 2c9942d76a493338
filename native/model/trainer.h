// The LoRA training loop: epochs over shuffled examples, micro-batches with gradient accumulation,
// loss normalised over the whole accumulated batch, global-norm clipping, AdamW (torch semantics) and
// Hugging Face's LR schedules. It advances one micro-batch per call so the executor can interleave
// generation between micro-steps. Around that loop, what makes a job trustworthy:
//   - checkpoints (model/checkpoint.h) every N steps and on request (cancel, shutdown), and resume from
//     one that continues exactly: the data order is a function of (seed, epoch), the dropout masks of
//     the micro-batch counter, everything else is in the checkpoint;
//   - a guard against non-finite gradients and loss spikes, with a policy: fail, skip the batch, or
//     roll back to the last good state (the last checkpoint, or the start) and lower the LR;
//   - evaluation every N steps with early stopping, keeping the best adapter, and the forgetting
//     check: a general-text set scored with the base at the start and with the adapter at each
//     evaluation.
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "model/adapter_pool.h"
#include "model/checkpoint.h"
#include "model/llama.h"
#include "model/memory_plan.h"

namespace ts {

struct TrainExample {
  std::vector<int32_t> ids;        // (T)
  std::vector<int32_t> labels;     // (T) Hugging Face convention, -100 ignored
  std::vector<int32_t> doc_start;  // (T) when several documents are packed (see TrainBatch); else empty
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
  // Evaluation: every N optimizer steps (and after the last) when eval examples exist.
  int eval_every = 0;
  int early_stopping_patience = 0;   // stop after this many evaluations without improvement; 0: never
  double early_stopping_min_delta = 0;  // an improvement must lower the eval loss by more than this
  bool keep_best = false;            // end with the weights of the best evaluation instead of the last
  // Checkpoints: <checkpoint_dir>/checkpoint-<step> every N optimizer steps (0: only on request).
  int checkpoint_every = 0;
  std::string checkpoint_dir;
  std::string adapter_config_json;   // written into every checkpoint (makes it a PEFT folder)
  std::string config_hash, data_hash;  // recorded in checkpoints; a resume must present the same
  std::string resume_from;           // a checkpoint folder to continue from ("" : a fresh start)
  // The guard.
  std::string nonfinite_policy = "rollback";  // fail | skip | rollback
  double spike_factor = 0;           // a loss above spike_factor × the mean of the last 8 steps is a spike; 0: off
  std::string spike_policy = "skip";  // fail | skip | rollback
  double rollback_lr_factor = 0.5;   // each rollback multiplies the LR by this
  int max_interventions = 8;         // more than this many fail the job
  int64_t inject_nonfinite_step = 0;  // fault injection for tests: poison the gradients of this step once
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
  bool has_forgetting = false;    // the forgetting set was scored after this step
  double forgetting_loss = 0;     // its mean token loss with the adapter
  double forgetting_base_loss = 0;  // ... and with the base alone (scored once, at the start)
  std::string checkpoint; // folder of the checkpoint written after this step, if any
  std::string guard_action;  // "", "skip" or "rollback": the guard intervened on step `step`
  std::string guard_reason;
  int64_t rolled_back_to = 0;  // after a rollback: the step training continues from
  bool stopped_early = false;  // early stopping ended the job after this step
  int64_t best_step = 0;       // the step of the best evaluation so far (0: none)
  double best_eval_loss = 0;
};

class Trainer {
 public:
  // Plans the job's memory for its longest batch (model/memory_plan.h) and allocates its workspace
  // before any work; a job that does not fit the backend's free memory is refused with
  // RESOURCE_EXHAUSTED naming the numbers. With
  // hyper.resume_from, continues from that checkpoint (its adapter weights must already be the ones
  // in `adapter`).
  Trainer(LlamaModel& model, AdapterPool& pool, AdapterPool::Handle adapter, std::vector<TrainExample> examples,
          TrainHyper hyper, std::vector<TrainExample> eval_examples = {},
          std::vector<TrainExample> forgetting_examples = {});
  ~Trainer();
  int64_t total_steps() const { return total_steps_; }
  bool done() const { return step_ >= total_steps_ || stopped_early_; }
  size_t workspace_bytes() const { return workspace_.bytes(); }
  const TrainingMemoryPlan& memory_plan() const { return plan_; }
  // The last completed step as the trainer knows it without running one (step, loss, latest
  // evaluation, best): what a job reports when it resumed at its end or stops before a new step.
  StepReport resumed_report() const;
  // Runs one micro-batch; returns true (and fills *report) when it completed an optimizer step.
  bool micro_step(StepReport* report);
  // Writes a checkpoint of the last completed step (a micro-step in progress is discarded: a resume
  // redoes that step). Returns its folder, or "" when no checkpoint folder was configured.
  std::string checkpoint_now();
  // At the end of a completed job: with keep_best, puts the best evaluation's weights in the adapter.
  void finish();

 private:
  struct Snapshot {
    LoraAdapter weights;  // A, B and the AdamW moments (host copies)
    TrainerState state;
  };

  void plan_step();  // picks the micro-batches of the next optimizer step
  void reorder(int64_t epoch);
  TrainBatch make_batch(const std::vector<int64_t>& example_ids) const;
  void zero_grad();
  double gradient_norm();
  void optimizer_update(double lr, double grad_norm);
  double evaluate(const std::vector<TrainExample>& set, bool with_adapter);
  // Host copies of the adapter's A, B and moments; and the reverse.
  void capture(LoraAdapter* into);
  void restore(const LoraAdapter& from);
  TrainerState state_at(const TrainerPosition& p) const;
  void take_snapshot();
  void rollback(StepReport* report, const std::string& reason);
  void poison_gradient();  // fault injection (hyper.inject_nonfinite_step)
  std::string write_checkpoint(const TrainerPosition& p);
  TrainerPosition position() const;  // of the last completed step

  LlamaModel& model_;
  AdapterPool& pool_;
  AdapterPool::Handle adapter_;
  std::vector<TrainExample> examples_;
  std::vector<TrainExample> eval_examples_;
  std::vector<TrainExample> forgetting_examples_;
  TrainHyper hyper_;
  TrainingMemoryPlan plan_;
  Buffer workspace_;               // the job's arena: every pass of this job is carved from it
  Arena arena_;
  Buffer norm_;                    // one double in backend memory: the squared gradient norm
  int64_t total_steps_ = 0;
  int64_t steps_per_epoch_ = 0;
  int64_t micro_batches_per_epoch_ = 0;
  // Position (see TrainerPosition); step_start_ is the position before the step in progress.
  int64_t step_ = 0;
  int64_t epoch_ = -1;
  int64_t cursor_ = 0;
  uint64_t micro_counter_ = 0;
  TrainerPosition step_start_;
  std::vector<int64_t> order_;     // example order of the current epoch
  // The optimizer step in progress.
  std::vector<std::vector<int64_t>> planned_;
  size_t planned_next_ = 0;
  int64_t planned_targets_ = 0;
  int64_t planned_tokens_ = 0;
  double step_loss_sum_ = 0;
  double step_started_ = 0;
  // Guard, evaluation and forgetting state.
  double lr_scale_ = 1.0;
  int interventions_ = 0;
  bool injected_ = false;
  std::vector<double> recent_losses_;
  std::unique_ptr<Snapshot> last_good_;  // what a rollback returns to
  double best_eval_ = -1;
  double last_loss_ = 0;    // loss of the last completed step
  double last_eval_ = -1;   // the latest evaluation's loss (-1: none)
  int64_t best_step_ = 0;
  int evals_since_best_ = 0;
  std::unique_ptr<LoraAdapter> best_weights_;  // with keep_best: the weights of the best evaluation (host)
  bool stopped_early_ = false;
  double forgetting_base_ = -1;
};

}  // namespace ts
