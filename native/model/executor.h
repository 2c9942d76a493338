// The executor of one process: it owns the backend, the frozen base in the backend's memory, the
// adapter pool, the paged KV cache and the step workspace (all sized once by the memory plan), and
// the single thread that runs all model work. Generation (continuous batching: every active sequence
// advances one token per step, each with its own adapter) and training micro-steps are interleaved on
// that thread under a ServingPolicy; one-off tasks (logits, adapter saves) run between steps.
// Callbacks run on the executor thread; the binding forwards them to JavaScript.
//
// Admission: a sequence is admitted when its adapter holds a device slot and the KV pool can hold its
// whole length (prompt + max_tokens), so an admitted sequence never runs out of cache. A sequence whose
// adapter is still being read from disk, or waits for a slot to free up, stays queued without holding
// back the sequences behind it; among those whose adapter is ready, KV room is granted in order. A
// request longer than the pool could ever hold, or arriving at a full queue, is refused at submit.
//
// Isolation: a request whose adapter fails to load, or whose logits come out non-finite, fails alone
// (NUMERICAL_ERROR); the other rows of the step go on.
#pragma once
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "core/backend.h"
#include "model/adapter_pool.h"
#include "model/kv_cache.h"
#include "model/llama.h"
#include "model/memory_plan.h"
#include "model/trainer.h"

namespace ts {

struct GenerationRequest {
  AdapterPool::Handle adapter;    // null: base model
  std::vector<int32_t> prompt;    // (P) token ids, P >= 1
  int max_tokens = 128;
  SamplingParams sampling;
  std::vector<int32_t> stop_ids;  // generation ends after emitting one of these
};

struct GenerationResult {
  std::vector<int32_t> ids;            // generated ids (including a final stop id, if any)
  std::string finish_reason;           // "stop" | "length" | "cancelled"
  int64_t prompt_tokens = 0;
  double prefill_seconds = 0, decode_seconds = 0;
};

struct GenerationCallbacks {
  std::function<void(const std::vector<int32_t>& new_ids)> on_tokens;
  std::function<void(const GenerationResult&)> on_done;
  std::function<void(const std::string& code, const std::string& message)> on_error;
};

// How generation and training share the executor thread while both have work.
//   target_inter_token_ms = 0: one training micro-step after every generation step.
//   otherwise a micro-step runs after a generation step only when the measured generation step plus
//   micro-step (moving averages) fit in the target, or when training's share of the busy time over the
//   last seconds fell below min_training_share (so a job is never starved).
// With no generation active, training runs back to back.
struct ServingPolicy {
  double target_inter_token_ms = 0;
  double min_training_share = 0.1;
};

// What training got of the executor between two optimizer steps (or over the recent window).
struct ShareReport {
  double training_seconds = 0, generation_seconds = 0;
  double share = 1;              // training / (training + generation); 1 when nothing was generated
  int64_t generation_steps = 0;  // generation steps run in between
  int64_t deferred_micro_steps = 0;  // turns in which the policy held training back
};

struct TrainingCallbacks {
  std::function<void(const ShareReport&)> on_share;  // before each on_step
  std::function<void(const StepReport&)> on_step;
  std::function<void(const StepReport& last, bool cancelled)> on_done;
  std::function<void(const std::string& code, const std::string& message)> on_error;
};

class Executor {
 public:
  // Places the weights, plans memory and starts the thread. The host weights are dropped after they
  // were copied (kept when the backend aliases them).
  Executor(std::unique_ptr<Backend> backend, std::shared_ptr<const LlamaWeights> weights, ExecutorOptions options);
  ~Executor();  // stops the thread (pending work ends as cancelled)

  const LlamaConfig& config() const { return model_.cfg(); }
  const BackendWeights& weights() const { return model_.w; }
  const ExecutorOptions& options() const { return options_; }
  const MemoryPlan& memory_plan() const { return plan_; }
  // The memory plan a training job of `shape` would get now (any thread; the job makes its own at start).
  TrainingMemoryPlan plan_training(const TrainingShape& shape) const { return plan_training_memory(model_, shape); }
  Backend& backend() { return *backend_; }

  // Adapters (see AdapterPool): ids > 0. add_adapter puts an adapter in the host tier (file: where it
  // can be read again), add_adapter_file registers one in the disk tier without reading it.
  int add_adapter(std::shared_ptr<LoraAdapter> adapter, std::string file = "");
  int add_adapter_file(const LoraSpec& spec, std::string file);
  void remove_adapter(int id);
  AdapterPool::Handle adapter(int id) const;  // throws NOT_FOUND
  int adapter_count() const { return pool_.count(); }
  AdapterPool& pool() { return pool_; }
  const AdapterPool& pool() const { return pool_; }
  void pin_adapter(int id, bool pinned);
  // Brings an adapter into a device slot (reading its file first when needed) and calls on_done;
  // waits like a generation request does. Cancel with cancel(id).
  uint64_t warm_adapter(AdapterPool::Handle adapter, std::function<void()> on_done,
                        std::function<void(const std::string& code, const std::string& message)> on_error);

  void set_policy(const ServingPolicy& policy);
  ServingPolicy policy() const;

  // Runs fn on the executor thread between steps (for work that must not race training updates).
  void post(std::function<void(Executor&)> fn);

  uint64_t submit_generation(GenerationRequest req, GenerationCallbacks cb);
  // Queues a training job on `adapter` (trained in place). A job cancelled while it runs writes a
  // checkpoint of its last completed step first (when it has a checkpoint folder): on_done's report
  // names it.
  uint64_t submit_training(AdapterPool::Handle adapter, std::vector<TrainExample> examples, TrainHyper hyper,
                           TrainingCallbacks cb, std::vector<TrainExample> eval_examples = {},
                           std::vector<TrainExample> forgetting_examples = {});
  void cancel(uint64_t id);  // generation or training; takes effect at the next step boundary

  // ---- executor thread only (from a posted task) ----
  // Logits (T, V) of one sequence through the paged cache, no sampling (tests, fidelity probes).
  std::vector<float> logits(const std::vector<int32_t>& ids, const AdapterPool::Handle& adapter);
  // One training pass without an optimizer step (tests): loss sum; gradients are left in the adapter
  // (copied back to its host copy).
  double train_pass(const AdapterPool::Handle& adapter, const TrainBatch& batch, const TrainPassOptions& opt);
  // Copies an adapter's weights back to its host copy (before saving it), reading its file first when
  // it is only on disk.
  void sync_adapter(const AdapterPool::Handle& adapter);

  struct Stats {
    int active_sequences = 0, queued_sequences = 0;
    bool training = false;
    int64_t kv_blocks_used = 0, kv_blocks_total = 0;
    uint64_t kv_bytes_used = 0;
    uint64_t training_workspace_bytes = 0;
    std::shared_ptr<const TrainingMemoryPlan> training_plan;  // of the running job (null: none)
    int64_t graph_steps = 0, eager_steps = 0;  // decode steps replayed from captured graphs / run op by op
    int waiting_for_adapter = 0;               // queued sequences whose adapter is loading or has no slot yet
    // The scheduler: moving averages of a generation step and a training micro-step, training's share of
    // the busy time over the last seconds, totals since start.
    double generation_step_ms = 0, training_step_ms = 0, training_share = 0;
    double generation_seconds = 0, training_seconds = 0;
    int64_t micro_steps = 0, deferred_micro_steps = 0;
  };
  Stats stats() const;

 private:
  struct Sequence;
  struct TrainingJob;
  struct Warmup;
  void run();
  void wake();  // something changed that may let waiting work go on
  void maintain_adapters();
  void admit();
  bool generation_step();  // whether rows ran
  bool training_step();    // whether a micro-step ran
  bool training_allowed(bool generating);
  void account(bool training, double seconds);
  // Fails the rows whose logits are not finite (their request alone); zeroes those rows for the sampler.
  std::vector<bool> check_logits(const Tensor& logits, int64_t n);
  void finish(Sequence& s, const char* reason);
  // Runs one step's rows, eagerly or through the captured graph of its batch-size bucket; returns the
  // logits (float32) of batch.logit_rows, in order, as the first rows of a workspace tensor.
  Tensor run_step(InferenceBatch& batch, bool decode_only);

  std::unique_ptr<Backend> backend_;
  LlamaModel model_;
  ExecutorOptions options_;
  MemoryPlan plan_;
  AdapterPool pool_;
  KVPool kv_;
  Buffer workspace_;
  Arena arena_;
  std::map<int64_t, int> graphs_;        // decode bucket (rows) -> captured graph id
  mutable std::mutex mu_;
  std::condition_variable cv_;
  bool stop_ = false;
  uint64_t next_id_ = 1;
  uint64_t epoch_ = 0;  // bumped by every event that may unblock waiting work
  std::deque<std::function<void(Executor&)>> tasks_;
  std::deque<std::shared_ptr<Warmup>> warming_;
  std::deque<std::shared_ptr<Sequence>> queued_;
  std::vector<std::shared_ptr<Sequence>> active_;       // executor-owned
  std::deque<std::shared_ptr<TrainingJob>> trainings_;  // front one runs; others wait in order
  std::map<uint64_t, std::shared_ptr<std::atomic<bool>>> cancel_flags_;
  std::atomic<int> active_count_{0};
  std::atomic<uint64_t> training_bytes_{0};
  std::shared_ptr<const TrainingMemoryPlan> training_plan_;  // guarded by mu_
  std::atomic<int64_t> graph_steps_{0}, eager_steps_{0};
  std::atomic<int> waiting_for_adapter_{0};
  int waiting_adapters_ = 0;  // distinct adapters without a slot this turn (executor thread)
  Buffer check_;              // (max_active_sequences + 1) doubles: squared sums of logit rows
  // Scheduler state (executor thread; copied under mu_ for stats()).
  ServingPolicy policy_;
  double gen_ema_ = 0, train_ema_ = 0;
  double window_gen_ = 0, window_train_ = 0;
  std::chrono::steady_clock::time_point window_at_ = std::chrono::steady_clock::now();
  double total_gen_ = 0, total_train_ = 0;
  int64_t micro_steps_ = 0, deferred_ = 0;
  ShareReport since_step_;  // what training got since its last optimizer step
  std::thread thread_;
};

}  // namespace ts
