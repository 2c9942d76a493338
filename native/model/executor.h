// The executor of one process: it owns the backend, the frozen base in the backend's memory, the
// adapter pool, the paged KV cache and the step workspace (all sized once by the memory plan), and
// the single thread that runs all model work. Generation (continuous batching: every active sequence
// advances one token per step, each with its own adapter) and training micro-steps are interleaved on
// that thread, one generation step then one training micro-step; one-off tasks (logits, adapter
// saves) run between steps. Callbacks run on the executor thread; the binding forwards them to
// JavaScript.
//
// Admission: a sequence is admitted when the KV pool can hold its whole length (prompt + max_tokens),
// so an admitted sequence never runs out of cache; until then it waits in order. A request longer
// than the pool could ever hold, or arriving at a full queue, is refused at submit.
#pragma once
#include <atomic>
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

struct TrainingCallbacks {
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

  // Adapters (see AdapterPool): ids > 0; add refuses ADAPTER_POOL_FULL / RESOURCE_EXHAUSTED at once.
  int add_adapter(std::shared_ptr<LoraAdapter> adapter);
  void remove_adapter(int id);
  AdapterPool::Handle adapter(int id) const;  // throws NOT_FOUND
  int adapter_count() const { return pool_.count(); }

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
  // Copies an adapter's weights back to its host copy (before saving it).
  void sync_adapter(const AdapterPool::Handle& adapter) { pool_.sync_to_host(*adapter); }

  struct Stats {
    int active_sequences = 0, queued_sequences = 0;
    bool training = false;
    int64_t kv_blocks_used = 0, kv_blocks_total = 0;
    uint64_t kv_bytes_used = 0;
    uint64_t training_workspace_bytes = 0;
    std::shared_ptr<const TrainingMemoryPlan> training_plan;  // of the running job (null: none)
    int64_t graph_steps = 0, eager_steps = 0;  // decode steps replayed from captured graphs / run op by op
  };
  Stats stats() const;

 private:
  struct Sequence;
  struct TrainingJob;
  void run();
  void maintain_adapters();
  void admit();
  void generation_step();
  void training_step();
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
  std::deque<std::function<void(Executor&)>> tasks_;
  std::deque<std::shared_ptr<Sequence>> queued_;
  std::vector<std::shared_ptr<Sequence>> active_;       // executor-owned
  std::deque<std::shared_ptr<TrainingJob>> trainings_;  // front one runs; others wait in order
  std::map<uint64_t, std::shared_ptr<std::atomic<bool>>> cancel_flags_;
  std::atomic<int> active_count_{0};
  std::atomic<uint64_t> training_bytes_{0};
  std::shared_ptr<const TrainingMemoryPlan> training_plan_;  // guarded by mu_
  std::atomic<int64_t> graph_steps_{0}, eager_steps_{0};
  std::thread thread_;
};

}  // namespace ts
