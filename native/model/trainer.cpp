// Trainer (trainer.h): data order, accumulation, clipping, AdamW and schedules; checkpoints and resume,
// the guard, evaluation, early stopping and the forgetting check.
#include "model/trainer.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>

#include "core/durable_fs.h"
#include "core/error.h"
#include "core/sampling.h"

namespace ts {

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

namespace {

constexpr size_t SPIKE_WINDOW = 8;  // steps whose mean loss a spike is measured against

// Stacks examples into one batch, right-padded with pad_id and label -100 (causal attention never
// looks at the padding, so no mask is needed). When any example is packed, the batch carries
// doc_start for every row: unpacked examples are one document, padding continues the last one.
TrainBatch pad_batch(const std::vector<const TrainExample*>& rows, int32_t pad_id) {
  TrainBatch b;
  b.B = (int)rows.size();
  bool packed = false;
  for (const TrainExample* e : rows) {
    b.T = std::max<int>(b.T, (int)e->ids.size());
    packed = packed || !e->doc_start.empty();
  }
  b.ids.assign((size_t)b.B * b.T, pad_id);
  b.labels.assign((size_t)b.B * b.T, -100);
  if (packed) b.doc_start.assign((size_t)b.B * b.T, 0);
  for (int i = 0; i < b.B; i++) {
    const TrainExample& e = *rows[i];
    std::copy(e.ids.begin(), e.ids.end(), b.ids.begin() + (size_t)i * b.T);
    std::copy(e.labels.begin(), e.labels.end(), b.labels.begin() + (size_t)i * b.T);
    if (packed && !e.doc_start.empty()) {
      int32_t* row = b.doc_start.data() + (size_t)i * b.T;
      std::copy(e.doc_start.begin(), e.doc_start.end(), row);
      std::fill(row + e.doc_start.size(), row + b.T, e.doc_start.back());
    }
  }
  return b;
}

// Targets an example trains: labels other than -100 after position 0, except a packed document's
// first token (no row of the document before predicts it).
int64_t example_targets(const TrainExample& e) {
  int64_t n = 0;
  for (size_t t = 1; t < e.labels.size(); t++) n += e.labels[t] != -100 && (e.doc_start.empty() || e.doc_start[t] != (int32_t)t);
  return n;
}

void check_policy(const std::string& p, const char* field) {
  require(p == "fail" || p == "skip" || p == "rollback", "INVALID_ARGUMENT",
          std::string(field) + " must be fail, skip or rollback, got '" + p + "'");
}

}  // namespace

Trainer::Trainer(LlamaModel& model, AdapterPool& pool, AdapterPool::Handle adapter, std::vector<TrainExample> examples,
                 TrainHyper hyper, std::vector<TrainExample> eval_examples,
                 std::vector<TrainExample> forgetting_examples)
    : model_(model),
      pool_(pool),
      adapter_(std::move(adapter)),
      examples_(std::move(examples)),
      eval_examples_(std::move(eval_examples)),
      forgetting_examples_(std::move(forgetting_examples)),
      hyper_(std::move(hyper)) {
  require(!examples_.empty(), "INVALID_DATASET", "the training set has no examples");
  require(hyper_.batch_size > 0 && hyper_.grad_accum > 0, "INVALID_ARGUMENT", "batch size and accumulation must be > 0");
  lr_multiplier(hyper_.scheduler, 0, 0, 1);  // validates the name
  check_policy(hyper_.nonfinite_policy, "nonfinite_policy");
  check_policy(hyper_.spike_policy, "spike_policy");
  int longest = 0;
  for (const auto* set : {&examples_, &eval_examples_, &forgetting_examples_})
    for (const auto& e : *set) {
      require(e.ids.size() == e.labels.size() && !e.ids.empty(), "INVALID_DATASET", "an example has mismatched ids/labels");
      require(e.doc_start.empty() || e.doc_start.size() == e.ids.size(), "INVALID_DATASET",
              "a packed example's doc_start must have one entry per token");
      longest = std::max(longest, int(e.ids.size()));
    }
  micro_batches_per_epoch_ = ((int64_t)examples_.size() + hyper_.batch_size - 1) / hyper_.batch_size;
  steps_per_epoch_ = (micro_batches_per_epoch_ + hyper_.grad_accum - 1) / hyper_.grad_accum;
  total_steps_ = hyper_.max_steps > 0 ? hyper_.max_steps : steps_per_epoch_ * std::max(1, hyper_.epochs);

  // The memory plan of the job, for its largest pass (a full batch of the longest row; eval passes are
  // forward-only, hence never larger).
  const size_t widest = std::max({examples_.size(), eval_examples_.size(), forgetting_examples_.size()});
  TrainingShape shape;
  shape.B = int(std::min<int64_t>(hyper_.batch_size, int64_t(widest)));
  shape.T = longest;
  shape.lora = adapter_->host->spec;
  shape.recompute = hyper_.recompute;
  plan_ = plan_training_memory(model_, shape);
  require_fits(plan_);
  workspace_ = Buffer(*model_.be, plan_.workspace.total);
  arena_ = Arena(workspace_.data(), workspace_.bytes(), model_.be->device(), "training");
  norm_ = Buffer(*model_.be, sizeof(double));
  pool_.begin_training(*adapter_);
  order_.resize(examples_.size());
  cursor_ = micro_batches_per_epoch_;  // forces a new epoch order on the first plan
  epoch_ = -1;
  if (!hyper_.resume_from.empty()) {
    const TrainerState st = read_trainer_state(hyper_.resume_from);
    require(st.config_hash == hyper_.config_hash, "CHECKPOINT_MISMATCH",
            "the checkpoint " + hyper_.resume_from + " was made with another training configuration");
    require(st.data_hash == hyper_.data_hash, "CHECKPOINT_MISMATCH",
            "the checkpoint " + hyper_.resume_from + " was made on another dataset");
    require(st.examples == int64_t(examples_.size()) && st.total_steps == total_steps_, "CHECKPOINT_MISMATCH",
            "the checkpoint " + hyper_.resume_from + " was made for " + std::to_string(st.examples) + " examples and " +
                std::to_string(st.total_steps) + " steps; this job has " + std::to_string(examples_.size()) + " and " +
                std::to_string(total_steps_));
    read_moments(hyper_.resume_from, *adapter_->host);
    restore(*adapter_->host);
    step_ = st.position.step;
    epoch_ = st.position.epoch;
    cursor_ = st.position.cursor;
    micro_counter_ = st.position.micro_counter;
    if (epoch_ >= 0 && cursor_ < micro_batches_per_epoch_) reorder(epoch_);
    lr_scale_ = st.lr_scale;
    interventions_ = st.interventions;
    recent_losses_ = st.recent_losses;
    best_eval_ = st.best_eval_loss;
    last_loss_ = st.last_loss;
    last_eval_ = st.last_eval_loss;
    best_step_ = st.best_step;
    evals_since_best_ = st.evals_since_best;
  }
  if (!forgetting_examples_.empty()) forgetting_base_ = evaluate(forgetting_examples_, false);
  take_snapshot();
}

Trainer::~Trainer() { pool_.end_training(*adapter_); }

void Trainer::reorder(int64_t epoch) {
  for (size_t i = 0; i < order_.size(); i++) order_[i] = (int64_t)i;
  if (!hyper_.shuffle) return;
  // Fisher-Yates with a stream seeded by (seed, epoch): the order of an epoch is a function of both.
  SamplerRng rng(hyper_.seed * 7919 + (uint64_t)epoch);
  for (size_t i = order_.size() - 1; i > 0; i--) std::swap(order_[i], order_[rng.next() % (i + 1)]);
}

TrainerPosition Trainer::position() const {
  const bool mid_step = planned_next_ > 0 && planned_next_ < planned_.size();
  return mid_step ? step_start_ : TrainerPosition{step_, epoch_, cursor_, micro_counter_};
}

void Trainer::plan_step() {
  step_start_ = TrainerPosition{step_, epoch_, cursor_, micro_counter_};
  planned_.clear();
  planned_next_ = 0;
  planned_targets_ = 0;
  planned_tokens_ = 0;
  step_loss_sum_ = 0;
  if (cursor_ >= micro_batches_per_epoch_) {
    epoch_++;
    cursor_ = 0;
    reorder(epoch_);
  }
  // An optimizer step never spans two epochs (as the Hugging Face Trainer).
  for (int a = 0; a < hyper_.grad_accum && cursor_ < micro_batches_per_epoch_; a++, cursor_++) {
    std::vector<int64_t> ids;
    for (int64_t i = cursor_ * hyper_.batch_size; i < std::min<int64_t>((cursor_ + 1) * hyper_.batch_size, order_.size()); i++)
      ids.push_back(order_[i]);
    for (int64_t e : ids) {
      const auto& ex = examples_[e];
      planned_tokens_ += (int64_t)ex.ids.size();
      planned_targets_ += example_targets(ex);
    }
    planned_.push_back(std::move(ids));
  }
  zero_grad();
  step_started_ = now_seconds();
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

double Trainer::gradient_norm() {
  Backend& be = *model_.be;
  // Global norm over every gradient, in parameter order (A then B of each module), one double sum.
  double* sq_dev = static_cast<double*>(norm_.data());
  be.fill_zero(sq_dev, sizeof(double));
  for (const auto& layer : adapter_->tensors.mods)
    for (const auto& d : layer) {
      if (!d.A) continue;
      be.sum_squares(sq_dev, d.dA, int64_t(d.view.r) * d.view.in);
      be.sum_squares(sq_dev, d.dB, int64_t(d.view.out) * d.view.r);
    }
  double sq = 0;
  be.download(&sq, sq_dev, sizeof(double));
  return std::sqrt(sq);
}

void Trainer::optimizer_update(double lr, double norm) {
  Backend& be = *model_.be;
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
  for (const auto& layer : adapter_->tensors.mods)
    for (const auto& d : layer) {
      if (!d.A) continue;
      be.adamw(d.A, d.dA, d.mA, d.vA, int64_t(d.view.r) * d.view.in, s);
      be.adamw(d.B, d.dB, d.mB, d.vB, int64_t(d.view.out) * d.view.r, s);
    }
}

void Trainer::capture(LoraAdapter* into) {
  Backend& be = *model_.be;
  for (int l = 0; l < into->L; l++)
    for (int t = 0; t < NUM_TARGETS; t++) {
      if (!into->has(t)) continue;
      LoraModule& m = into->mod(l, t);
      const AdapterTensors::Module& d = adapter_->tensors.mod(l, t);
      be.download(m.A.data(), d.A, m.A.size() * sizeof(float));
      be.download(m.B.data(), d.B, m.B.size() * sizeof(float));
      m.mA.resize(m.A.size());
      m.vA.resize(m.A.size());
      m.mB.resize(m.B.size());
      m.vB.resize(m.B.size());
      be.download(m.mA.data(), d.mA, m.A.size() * sizeof(float));
      be.download(m.vA.data(), d.vA, m.A.size() * sizeof(float));
      be.download(m.mB.data(), d.mB, m.B.size() * sizeof(float));
      be.download(m.vB.data(), d.vB, m.B.size() * sizeof(float));
    }
}

void Trainer::restore(const LoraAdapter& from) {
  Backend& be = *model_.be;
  auto put = [&](float* dst, const std::vector<float>& src) {
    if (dst != src.data()) be.upload(dst, src.data(), src.size() * sizeof(float));  // aliased on the CPU
  };
  for (int l = 0; l < from.L; l++)
    for (int t = 0; t < NUM_TARGETS; t++) {
      if (!from.has(t)) continue;
      const LoraModule& m = from.mod(l, t);
      const AdapterTensors::Module& d = adapter_->tensors.mod(l, t);
      put(d.A, m.A);
      put(d.B, m.B);
      if (!m.mA.empty()) {
        put(d.mA, m.mA);
        put(d.vA, m.vA);
        put(d.mB, m.mB);
        put(d.vB, m.vB);
      }
    }
}

StepReport Trainer::resumed_report() const {
  StepReport r;
  r.step = step_;
  r.total_steps = total_steps_;
  r.epoch = epoch_ < 0 ? 0 : (double)epoch_ + (double)cursor_ / (double)micro_batches_per_epoch_;
  r.loss = last_loss_;
  r.has_eval = last_eval_ >= 0;
  r.eval_loss = r.has_eval ? last_eval_ : 0;
  r.best_step = best_step_;
  r.best_eval_loss = best_eval_ < 0 ? 0 : best_eval_;
  return r;
}

TrainerState Trainer::state_at(const TrainerPosition& p) const {
  TrainerState s;
  s.position = p;
  s.total_steps = total_steps_;
  s.examples = int64_t(examples_.size());
  s.lr_scale = lr_scale_;
  s.interventions = interventions_;
  s.recent_losses = recent_losses_;
  s.best_eval_loss = best_eval_;
  s.best_step = best_step_;
  s.evals_since_best = evals_since_best_;
  s.last_loss = last_loss_;
  s.last_eval_loss = last_eval_;
  s.config_hash = hyper_.config_hash;
  s.data_hash = hyper_.data_hash;
  return s;
}

void Trainer::take_snapshot() {
  auto snap = std::make_unique<Snapshot>(Snapshot{*adapter_->host, state_at(position())});
  capture(&snap->weights);
  last_good_ = std::move(snap);
}

std::string Trainer::write_checkpoint(const TrainerPosition& p) {
  if (hyper_.checkpoint_dir.empty()) return "";
  LoraAdapter copy = *adapter_->host;
  capture(&copy);
  const std::string dir = hyper_.checkpoint_dir + "/checkpoint-" + std::to_string(p.step);
  ts::write_checkpoint(dir, copy, state_at(p), hyper_.adapter_config_json);
  return dir;
}

std::string Trainer::checkpoint_now() { return write_checkpoint(position()); }

void Trainer::rollback(StepReport* report, const std::string& reason) {
  restore(last_good_->weights);
  const TrainerState& st = last_good_->state;
  step_ = st.position.step;
  epoch_ = st.position.epoch;
  cursor_ = st.position.cursor;
  micro_counter_ = st.position.micro_counter;
  if (epoch_ >= 0 && cursor_ < micro_batches_per_epoch_) reorder(epoch_);
  recent_losses_ = st.recent_losses;
  last_loss_ = st.last_loss;
  last_eval_ = st.last_eval_loss;
  lr_scale_ *= hyper_.rollback_lr_factor;
  planned_.clear();
  planned_next_ = 0;
  report->guard_action = "rollback";
  report->guard_reason = reason;
  report->rolled_back_to = step_;
  // The state rolled back to stays the one to return to, now with the lower LR.
  last_good_->state.lr_scale = lr_scale_;
}

void Trainer::finish() {
  if (hyper_.keep_best && best_weights_) restore(*best_weights_);
}

void Trainer::poison_gradient() {
  const float nan = std::nanf("");
  for (const auto& layer : adapter_->tensors.mods)
    for (const auto& d : layer)
      if (d.A) {
        model_.be->upload(d.dA, &nan, sizeof nan);
        return;
      }
}

double Trainer::evaluate(const std::vector<TrainExample>& set, bool with_adapter) {
  double sum = 0;
  int64_t targets = 0;
  for (size_t i = 0; i < set.size(); i += hyper_.batch_size) {
    std::vector<const TrainExample*> rows;
    for (size_t j = i; j < std::min(set.size(), i + (size_t)hyper_.batch_size); j++) rows.push_back(&set[j]);
    TrainBatch b = pad_batch(rows, hyper_.pad_id);
    TrainPassOptions opt;
    opt.backward = false;
    sum += llama_train_pass(model_, with_adapter ? &adapter_->tensors : nullptr, b, opt, arena_);
    targets += b.count_targets();
  }
  return targets > 0 ? sum / (double)targets : 0.0;
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

  *report = StepReport();
  const double loss = planned_targets_ > 0 ? step_loss_sum_ / (double)planned_targets_ : 0.0;
  if (hyper_.inject_nonfinite_step > 0 && step_ + 1 == hyper_.inject_nonfinite_step && !injected_) {
    injected_ = true;  // once: a rollback replays this step without the fault
    poison_gradient();
  }
  const double grad_norm = gradient_norm();
  // The guard: a non-finite loss or gradient, or a loss spike, is handled by its policy.
  std::string problem, policy;
  if (!std::isfinite(grad_norm) || !std::isfinite(loss)) {
    problem = !std::isfinite(loss) ? "non-finite loss" : "non-finite gradient norm";
    policy = hyper_.nonfinite_policy;
  } else if (hyper_.spike_factor > 0 && recent_losses_.size() >= SPIKE_WINDOW) {
    double mean = 0;
    for (double l : recent_losses_) mean += l;
    mean /= double(recent_losses_.size());
    if (loss > hyper_.spike_factor * mean) {
      char buf[160];
      std::snprintf(buf, sizeof buf, "loss spike: %.4g is above %.3g x the mean %.4g of the last %zu steps", loss,
                    hyper_.spike_factor, mean, recent_losses_.size());
      problem = buf;
      policy = hyper_.spike_policy;
    }
  }
  report->total_steps = total_steps_;
  report->tokens = planned_tokens_;
  report->targets = planned_targets_;
  report->loss = loss;
  report->grad_norm = grad_norm;
  if (!problem.empty()) {
    if (policy == "fail") throw EngineError("TRAINING_DIVERGED", problem + " at step " + std::to_string(step_ + 1));
    if (++interventions_ > hyper_.max_interventions)
      throw EngineError("TRAINING_DIVERGED", problem + " at step " + std::to_string(step_ + 1) + ", after " +
                                                 std::to_string(hyper_.max_interventions) + " interventions");
    if (policy == "rollback") {
      const int64_t failed_step = step_ + 1;
      rollback(report, problem);
      report->step = failed_step;  // the step that went wrong; training continues after rolled_back_to
      report->lr = hyper_.lr * lr_scale_;
      report->seconds = now_seconds() - step_started_;
      return true;
    }
    report->guard_action = "skip";  // the batch is dropped: no update, the schedule moves on
    report->guard_reason = problem;
    zero_grad();
    step_++;
  } else {
    const double lr = hyper_.lr * lr_scale_ * lr_multiplier(hyper_.scheduler, step_, hyper_.warmup_steps, total_steps_);
    optimizer_update(lr, grad_norm);
    step_++;
    report->lr = lr;
    recent_losses_.push_back(loss);
    if (recent_losses_.size() > SPIKE_WINDOW) recent_losses_.erase(recent_losses_.begin());
  }
  report->step = step_;
  last_loss_ = loss;
  report->epoch = (double)epoch_ + (double)cursor_ / (double)micro_batches_per_epoch_;
  report->seconds = now_seconds() - step_started_;
  const bool eval_now = hyper_.eval_every > 0 ? step_ % hyper_.eval_every == 0 || step_ >= total_steps_
                                              : step_ >= total_steps_;
  if (eval_now && !eval_examples_.empty()) {
    report->has_eval = true;
    report->eval_loss = evaluate(eval_examples_, true);
    last_eval_ = report->eval_loss;
    if (best_eval_ < 0 || report->eval_loss < best_eval_ - hyper_.early_stopping_min_delta) {
      best_eval_ = report->eval_loss;
      best_step_ = step_;
      evals_since_best_ = 0;
      if (hyper_.keep_best) {
        best_weights_ = std::make_unique<LoraAdapter>(*adapter_->host);
        capture(best_weights_.get());
      }
    } else if (++evals_since_best_ >= hyper_.early_stopping_patience && hyper_.early_stopping_patience > 0) {
      stopped_early_ = true;
      report->stopped_early = true;
    }
  }
  if (eval_now && !forgetting_examples_.empty()) {
    report->has_forgetting = true;
    report->forgetting_loss = evaluate(forgetting_examples_, true);
    report->forgetting_base_loss = forgetting_base_;
  }
  report->best_step = best_step_;
  report->best_eval_loss = best_eval_ < 0 ? 0 : best_eval_;
  if (hyper_.checkpoint_every > 0 && step_ % hyper_.checkpoint_every == 0 && !hyper_.checkpoint_dir.empty()) {
    report->checkpoint = write_checkpoint(position());
    take_snapshot();
  }
  return true;
}

}  // namespace ts
