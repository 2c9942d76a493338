// Trainer (trainer.h): data order, accumulation, clipping, AdamW and schedules.
#include "model/trainer.h"

#include <algorithm>
#include <chrono>
#include <cerrno>
#include <cmath>
#include <cstring>

#include "core/error.h"
#include "core/sampling.h"

#include <sys/stat.h>

namespace ts {

static void make_directory(const std::string& dir) {
  if (mkdir(dir.c_str(), 0755) != 0 && errno != EEXIST)
    throw EngineError("IO_ERROR", "cannot create checkpoint folder " + dir + ": " + std::strerror(errno));
}

static double now_seconds() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

double lr_multiplier(const std::string& scheduler, int64_t step, int64_t warmup, int64_t total) {
  if (step < warmup) return (double)step / (double)std::max<int64_t>(1, warmup);
  if (scheduler == "constant") return 1.0;
  double progress = (double)(step - warmup) / (double)std::max<int64_t>(1, total - warmup);
  if (scheduler == "linear") return std::max(0.0, (double)(total - step) / (double)std::max<int64_t>(1, total - warmup));
  if (scheduler == "cosine") return std::max(0.0, 0.5 * (1.0 + std::cos(M_PI * 0.5 * 2.0 * progress)));
  throw EngineError("INVALID_ARGUMENT", "unknown scheduler '" + scheduler + "' (constant, linear or cosine)");
}

Trainer::Trainer(LlamaModel& model, AdapterPool& pool, AdapterPool::Handle adapter, std::vector<TrainExample> examples,
                 TrainHyper hyper, std::vector<TrainExample> eval_examples)
    : model_(model),
      pool_(pool),
      adapter_(std::move(adapter)),
      examples_(std::move(examples)),
      eval_examples_(std::move(eval_examples)),
      hyper_(std::move(hyper)) {
  require(!examples_.empty(), "INVALID_DATASET", "the training set has no examples");
  require(hyper_.batch_size > 0 && hyper_.grad_accum > 0, "INVALID_ARGUMENT", "batch size and accumulation must be > 0");
  lr_multiplier(hyper_.scheduler, 0, 0, 1);  // validates the name
  int longest = 0;
  for (const auto* set : {&examples_, &eval_examples_})
    for (const auto& e : *set) {
      require(e.ids.size() == e.labels.size() && !e.ids.empty(), "INVALID_DATASET", "an example has mismatched ids/labels");
      longest = std::max(longest, int(e.ids.size()));
    }
  micro_batches_per_epoch_ = ((int64_t)examples_.size() + hyper_.batch_size - 1) / hyper_.batch_size;
  steps_per_epoch_ = (micro_batches_per_epoch_ + hyper_.grad_accum - 1) / hyper_.grad_accum;
  total_steps_ = hyper_.max_steps > 0 ? hyper_.max_steps : steps_per_epoch_ * std::max(1, hyper_.epochs);

  // The memory plan of the job: the workspace of its largest pass (a full batch of the longest row;
  // eval passes are forward-only, hence never larger).
  TrainPassOptions opt;
  opt.recompute = hyper_.recompute;
  opt.dropout.p = adapter_->host->spec.dropout;
  const int B = std::min<int64_t>(hyper_.batch_size, std::max(examples_.size(), eval_examples_.size()));
  const size_t need = plan_train_workspace(model_, B, longest, adapter_->host->spec.r, opt);
  const MemoryInfo mem = model_.be->memory_info();
  if (need > mem.free)
    throw EngineError("RESOURCE_EXHAUSTED",
                      "the training job needs a " + std::to_string(need >> 20) + " MiB workspace (batch " + std::to_string(B) +
                          " x " + std::to_string(longest) + " tokens, rank " + std::to_string(adapter_->host->spec.r) +
                          (hyper_.recompute ? ", recompute" : ", no recompute") + ") and " + device_name(model_.be->device()) +
                          " memory has " + std::to_string(mem.free >> 20) + " MiB free");
  workspace_ = Buffer(*model_.be, need);
  arena_ = Arena(workspace_.data(), workspace_.bytes(), model_.be->device(), "training");
  norm_ = Buffer(*model_.be, sizeof(double));
  pool_.begin_training(*adapter_);
  order_.resize(examples_.size());
  cursor_ = micro_batches_per_epoch_;  // forces a new epoch order on the first plan
  epoch_ = -1;
}

Trainer::~Trainer() { pool_.end_training(*adapter_); }

void Trainer::plan_step() {
  planned_.clear();
  planned_next_ = 0;
  planned_targets_ = 0;
  planned_tokens_ = 0;
  step_loss_sum_ = 0;
  if (cursor_ >= micro_batches_per_epoch_) {
    epoch_++;
    cursor_ = 0;
    for (size_t i = 0; i < order_.size(); i++) order_[i] = (int64_t)i;
    if (hyper_.shuffle) {  // Fisher-Yates with a stream seeded by (seed, epoch): reproducible
      SamplerRng rng(hyper_.seed * 7919 + (uint64_t)epoch_);
      for (size_t i = order_.size() - 1; i > 0; i--) std::swap(order_[i], order_[rng.next() % (i + 1)]);
    }
  }
  // An optimizer step never spans two epochs (as the Hugging Face Trainer).
  for (int a = 0; a < hyper_.grad_accum && cursor_ < micro_batches_per_epoch_; a++, cursor_++) {
    std::vector<int64_t> ids;
    for (int64_t i = cursor_ * hyper_.batch_size; i < std::min<int64_t>((cursor_ + 1) * hyper_.batch_size, order_.size()); i++)
      ids.push_back(order_[i]);
    for (int64_t e : ids) {
      const auto& ex = examples_[e];
      planned_tokens_ += (int64_t)ex.ids.size();
      for (size_t t = 1; t < ex.labels.size(); t++) planned_targets_ += ex.labels[t] != -100;
    }
    planned_.push_back(std::move(ids));
  }
  zero_grad();
  step_started_ = now_seconds();
}

// Stacks examples into one batch, right-padded with pad_id and label -100 (causal attention never
// looks at the padding, so no mask is needed).
static TrainBatch pad_batch(const std::vector<const TrainExample*>& rows, int32_t pad_id) {
  TrainBatch b;
  b.B = (int)rows.size();
  for (const TrainExample* e : rows) b.T = std::max<int>(b.T, (int)e->ids.size());
  b.ids.assign((size_t)b.B * b.T, pad_id);
  b.labels.assign((size_t)b.B * b.T, -100);
  for (int i = 0; i < b.B; i++) {
    std::copy(rows[i]->ids.begin(), rows[i]->ids.end(), b.ids.begin() + (size_t)i * b.T);
    std::copy(rows[i]->labels.begin(), rows[i]->labels.end(), b.labels.begin() + (size_t)i * b.T);
  }
  return b;
}

TrainBatch Trainer::make_batch(const std::vector<int64_t>& example_ids) const {
  std::vector<const TrainExample*> rows;
  for (int64_t e : example_ids) rows.push_back(&examples_[e]);
  return pad_batch(rows, hyper_.pad_id);
}

void Trainer::zero_grad() {
  Backend& be = *model_.be;
  for (const auto& layer : adapter_->tensors.mods)
    for (const auto& d : layer) {
      if (!d.A) continue;
      be.fill_zero(d.dA, size_t(d.view.r) * d.view.in * sizeof(float));
      be.fill_zero(d.dB, size_t(d.view.out) * d.view.r * sizeof(float));
    }
}

void Trainer::optimizer_update(double lr, double* grad_norm) {
  Backend& be = *model_.be;
  const auto& mods = adapter_->tensors.mods;
  // Global norm over every gradient, in parameter order (A then B of each module), one double sum.
  double* sq_dev = static_cast<double*>(norm_.data());
  be.fill_zero(sq_dev, sizeof(double));
  for (const auto& layer : mods)
    for (const auto& d : layer) {
      if (!d.A) continue;
      be.sum_squares(sq_dev, d.dA, int64_t(d.view.r) * d.view.in);
      be.sum_squares(sq_dev, d.dB, int64_t(d.view.out) * d.view.r);
    }
  double sq = 0;
  be.download(&sq, sq_dev, sizeof(double));
  double norm = std::sqrt(sq);
  *grad_norm = norm;
  // torch.nn.utils.clip_grad_norm_: coef = max_norm / (norm + 1e-6), applied when < 1.
  AdamWStep s;
  s.clip = 1.f;
  if (hyper_.max_grad_norm > 0) s.clip = (float)std::min(1.0, hyper_.max_grad_norm / (norm + 1e-6));
  const int64_t t = step_ + 1;
  const double bc1 = 1.0 - std::pow((double)hyper_.beta1, (double)t);
  const double bc2 = 1.0 - std::pow((double)hyper_.beta2, (double)t);
  s.beta1 = hyper_.beta1;
  s.beta2 = hyper_.beta2;
  s.eps = hyper_.eps;
  s.step_size = (float)(lr / bc1);
  s.sqrt_bc2 = (float)std::sqrt(bc2);
  s.decay = (float)(1.0 - lr * hyper_.weight_decay);
  for (const auto& layer : mods)
    for (const auto& d : layer) {
      if (!d.A) continue;
      be.adamw(d.A, d.dA, d.mA, d.vA, int64_t(d.view.r) * d.view.in, s);
      be.adamw(d.B, d.dB, d.mB, d.vB, int64_t(d.view.out) * d.view.r, s);
    }
}

bool Trainer::micro_step(StepReport* report) {
  require(!done(), "FAILED_PRECONDITION", "training already finished");
  if (planned_next_ >= planned_.size()) plan_step();
  TrainBatch batch = make_batch(planned_[planned_next_++]);
  TrainPassOptions opt;
  opt.recompute = hyper_.recompute;
  // Every micro-batch's gradient is scaled by 1/(targets of the whole accumulated batch), so the
  // accumulated gradient is that of the mean token loss over the step.
  opt.loss_scale = planned_targets_ > 0 ? 1.f / (float)planned_targets_ : 0.f;
  opt.dropout.p = adapter_->host->spec.dropout;
  opt.dropout.seed = hyper_.seed;
  opt.dropout.step = micro_counter_++;
  step_loss_sum_ += llama_train_pass(model_, &adapter_->tensors, batch, opt, arena_);
  if (planned_next_ < planned_.size()) return false;

  const double lr = hyper_.lr * lr_multiplier(hyper_.scheduler, step_, hyper_.warmup_steps, total_steps_);
  double grad_norm = 0;
  optimizer_update(lr, &grad_norm);
  step_++;
  report->step = step_;
  report->total_steps = total_steps_;
  report->epoch = (double)epoch_ + (double)cursor_ / (double)micro_batches_per_epoch_;
  report->loss = planned_targets_ > 0 ? step_loss_sum_ / (double)planned_targets_ : 0.0;
  report->grad_norm = grad_norm;
  report->lr = lr;
  report->tokens = planned_tokens_;
  report->targets = planned_targets_;
  report->seconds = now_seconds() - step_started_;
  if (!eval_examples_.empty() && (done() || (hyper_.eval_every > 0 && step_ % hyper_.eval_every == 0))) {
    report->has_eval = true;
    report->eval_loss = evaluate();
  }
  if (hyper_.checkpoint_every > 0 && step_ % hyper_.checkpoint_every == 0 && !hyper_.checkpoint_dir.empty()) {
    report->checkpoint = hyper_.checkpoint_dir + "/checkpoint-" + std::to_string(step_);
    make_directory(report->checkpoint);
    pool_.sync_to_host(*adapter_);
    lora_save(*adapter_->host, report->checkpoint + "/adapter_model.safetensors");
  }
  return true;
}

double Trainer::evaluate() {
  double sum = 0;
  int64_t targets = 0;
  for (size_t i = 0; i < eval_examples_.size(); i += hyper_.batch_size) {
    std::vector<const TrainExample*> rows;
    for (size_t j = i; j < std::min(eval_examples_.size(), i + (size_t)hyper_.batch_size); j++) rows.push_back(&eval_examples_[j]);
    TrainBatch b = pad_batch(rows, hyper_.pad_id);
    TrainPassOptions opt;
    opt.backward = false;
    sum += llama_train_pass(model_, &adapter_->tensors, b, opt, arena_);
    targets += b.count_targets();
  }
  return targets > 0 ? sum / (double)targets : 0.0;
}

}  // namespace ts
