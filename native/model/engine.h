// The engine of one process: the frozen base, the adapter slots, and the single executor thread that
// runs all model work. Generation (continuous batching: every active sequence advances one token per
// step, each with its own adapter) and training micro-steps are interleaved on that thread, one
// generation step then one training micro-step; one-off tasks (logits, adapter saves) run between
// steps. Callbacks run on the executor thread; the binding forwards them to JavaScript.
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

#include "model/llama.h"
#include "model/sampler.h"
#include "model/trainer.h"

namespace ts {

struct GenerationRequest {
  std::shared_ptr<const LoraAdapter> adapter;  // null: base model
  std::vector<int32_t> prompt;                 // (P) token ids, P >= 1
  int max_tokens = 128;
  SamplingParams sampling;
  std::vector<int32_t> stop_ids;               // generation ends after emitting one of these
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

struct EngineLimits {
  int max_active_sequences = 16;   // sequences decoded together; more wait in the queue
  int prefill_chunk = 512;         // prompt rows processed per step (bounds a step's latency)
};

class Engine {
 public:
  Engine(LlamaWeights weights, EngineLimits limits);
  ~Engine();  // stops the executor (pending work is cancelled)

  const LlamaConfig& config() const { return model_.w.cfg; }
  const LlamaWeights& weights() const { return model_.w; }
  const EngineLimits& limits() const { return limits_; }

  // Adapter slots. Slots hold shared pointers, so work in flight keeps an adapter alive after removal.
  int add_adapter(std::shared_ptr<LoraAdapter> adapter);
  void remove_adapter(int slot);
  std::shared_ptr<LoraAdapter> adapter(int slot) const;  // throws NOT_FOUND
  int adapter_count() const;

  // Runs fn on the executor thread between steps (for work that must not race training updates).
  void post(std::function<void(LlamaModel&)> fn);

  uint64_t submit_generation(GenerationRequest req, GenerationCallbacks cb);
  uint64_t submit_training(std::shared_ptr<LoraAdapter> adapter, std::vector<TrainExample> examples, TrainHyper hyper,
                           TrainingCallbacks cb, std::vector<TrainExample> eval_examples = {});
  void cancel(uint64_t id);  // generation or training; takes effect at the next step boundary

  struct Stats {
    int active_sequences = 0, queued_sequences = 0;
    bool training = false;
    int64_t kv_bytes = 0;
  };
  Stats stats() const;

 private:
  struct Sequence;
  struct TrainingJob;
  void run();
  void generation_step();
  void training_step();

  LlamaModel model_;
  EngineLimits limits_;
  mutable std::mutex mu_;
  std::condition_variable cv_;
  bool stop_ = false;
  std::map<int, std::shared_ptr<LoraAdapter>> slots_;
  int next_slot_ = 1;
  uint64_t next_id_ = 1;
  std::deque<std::function<void(LlamaModel&)>> tasks_;
  std::deque<std::shared_ptr<Sequence>> queued_;
  std::vector<std::shared_ptr<Sequence>> active_;  // executor-owned
  std::deque<std::shared_ptr<TrainingJob>> trainings_;  // front one runs; others wait in order
  std::map<uint64_t, std::shared_ptr<std::atomic<bool>>> cancel_flags_;
  std::atomic<int64_t> kv_bytes_{0};
  std::thread thread_;
};

}  // namespace ts
