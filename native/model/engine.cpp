// Engine (engine.h): adapter slots and the executor thread that interleaves generation and training.
#include "model/engine.h"

#include <algorithm>
#include <chrono>
#include <cstdio>

#include "core/error.h"

namespace ts {

static double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

struct Engine::Sequence {
  uint64_t id = 0;
  GenerationRequest req;
  GenerationCallbacks cb;
  std::shared_ptr<std::atomic<bool>> cancelled;
  KVCache cache;
  std::vector<int32_t> context;  // prompt + generated (for the repetition penalty)
  GenerationResult result;
  SamplerRng rng{0};
  int64_t prefilled = 0;         // prompt tokens already in the cache
  int32_t next_token = -1;       // sampled, not yet fed back
  std::chrono::steady_clock::time_point started, decode_started;
};

struct Engine::TrainingJob {
  uint64_t id = 0;
  std::shared_ptr<LoraAdapter> adapter;
  std::unique_ptr<Trainer> trainer;
  std::vector<TrainExample> examples, eval_examples;
  TrainHyper hyper;
  TrainingCallbacks cb;
  std::shared_ptr<std::atomic<bool>> cancelled;
  StepReport last;
};

Engine::Engine(LlamaWeights weights, EngineLimits limits) : limits_(limits) {
  model_.w = std::move(weights);
  thread_ = std::thread([this] { run(); });
}

Engine::~Engine() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_ = true;
  }
  cv_.notify_all();
  if (thread_.joinable()) thread_.join();
}

int Engine::add_adapter(std::shared_ptr<LoraAdapter> adapter) {
  require(adapter && adapter->L == model_.w.cfg.L, "ADAPTER_MISMATCH", "adapter does not fit this base model");
  std::lock_guard<std::mutex> lock(mu_);
  int slot = next_slot_++;
  slots_[slot] = std::move(adapter);
  return slot;
}

void Engine::remove_adapter(int slot) {
  std::lock_guard<std::mutex> lock(mu_);
  slots_.erase(slot);
}

std::shared_ptr<LoraAdapter> Engine::adapter(int slot) const {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = slots_.find(slot);
  require(it != slots_.end(), "NOT_FOUND", "no adapter in slot " + std::to_string(slot));
  return it->second;
}

int Engine::adapter_count() const {
  std::lock_guard<std::mutex> lock(mu_);
  return (int)slots_.size();
}

void Engine::post(std::function<void(LlamaModel&)> fn) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    tasks_.push_back(std::move(fn));
  }
  cv_.notify_all();
}

uint64_t Engine::submit_generation(GenerationRequest req, GenerationCallbacks cb) {
  const LlamaConfig& c = model_.w.cfg;
  require(!req.prompt.empty(), "INVALID_ARGUMENT", "the prompt has no tokens");
  require(req.max_tokens >= 1, "INVALID_ARGUMENT", "max_tokens must be >= 1");
  for (int32_t id : req.prompt)
    require(id >= 0 && id < c.V, "INVALID_ARGUMENT", "prompt token id " + std::to_string(id) + " is outside the vocabulary");
  require((int64_t)req.prompt.size() + req.max_tokens <= c.max_pos, "INVALID_ARGUMENT",
          "prompt + max_tokens exceeds max_position_embeddings");
  auto s = std::make_shared<Sequence>();
  s->req = std::move(req);
  s->cb = std::move(cb);
  s->cancelled = std::make_shared<std::atomic<bool>>(false);
  s->rng = SamplerRng(s->req.sampling.seed);
  {
    std::lock_guard<std::mutex> lock(mu_);
    s->id = next_id_++;
    cancel_flags_[s->id] = s->cancelled;
    queued_.push_back(s);
  }
  cv_.notify_all();
  return s->id;
}

uint64_t Engine::submit_training(std::shared_ptr<LoraAdapter> adapter, std::vector<TrainExample> examples,
                                 TrainHyper hyper, TrainingCallbacks cb, std::vector<TrainExample> eval_examples) {
  auto j = std::make_shared<TrainingJob>();
  j->adapter = std::move(adapter);
  j->examples = std::move(examples);
  j->eval_examples = std::move(eval_examples);
  j->hyper = std::move(hyper);
  j->cb = std::move(cb);
  j->cancelled = std::make_shared<std::atomic<bool>>(false);
  {
    std::lock_guard<std::mutex> lock(mu_);
    j->id = next_id_++;
    cancel_flags_[j->id] = j->cancelled;
    trainings_.push_back(j);
  }
  cv_.notify_all();
  return j->id;
}

void Engine::cancel(uint64_t id) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = cancel_flags_.find(id);
    if (it != cancel_flags_.end()) it->second->store(true);
  }
  cv_.notify_all();
}

Engine::Stats Engine::stats() const {
  std::lock_guard<std::mutex> lock(mu_);
  Stats s;
  s.active_sequences = (int)active_.size();
  s.queued_sequences = (int)queued_.size();
  s.training = !trainings_.empty();
  s.kv_bytes = kv_bytes_.load();
  return s;
}

void Engine::run() {
  for (;;) {
    std::deque<std::function<void(LlamaModel&)>> tasks;
    {
      std::unique_lock<std::mutex> lock(mu_);
      cv_.wait(lock, [&] { return stop_ || !tasks_.empty() || !queued_.empty() || !active_.empty() || !trainings_.empty(); });
      if (stop_) break;
      tasks.swap(tasks_);
    }
    for (auto& t : tasks) {
      try {
        t(model_);  // tasks report their own errors through their callbacks
      } catch (const std::exception& e) {
        // Only a task that forgot to catch gets here; keep serving, but never silently.
        std::fprintf(stderr, "tuneserve engine: a queued task threw: %s\n", e.what());
      }
    }
    generation_step();
    training_step();
  }
  // Shutting down: everything still pending ends as cancelled.
  for (auto& s : active_) {
    s->result.finish_reason = "cancelled";
    if (s->cb.on_done) s->cb.on_done(s->result);
  }
  for (auto& s : queued_) {
    s->result.finish_reason = "cancelled";
    if (s->cb.on_done) s->cb.on_done(s->result);
  }
  for (auto& j : trainings_)
    if (j->cb.on_done) j->cb.on_done(j->last, true);
}

void Engine::generation_step() {
  // Admit queued sequences up to the limit.
  {
    std::lock_guard<std::mutex> lock(mu_);
    while (!queued_.empty() && (int)active_.size() < limits_.max_active_sequences) {
      active_.push_back(queued_.front());
      queued_.pop_front();
    }
  }
  if (active_.empty()) return;
  auto finish = [&](Sequence& s, const char* reason) {
    s.result.finish_reason = reason;
    s.result.decode_seconds = s.decode_started.time_since_epoch().count() ? seconds_since(s.decode_started) : 0;
    kv_bytes_ -= (int64_t)s.cache.bytes();
    s.cache = KVCache();
    if (s.cb.on_done) s.cb.on_done(s.result);
  };
  // Build the step's rows: each sequence contributes a prompt chunk (prefill) or its last token.
  std::vector<InferenceRow> rows;
  std::vector<LoraSegment> segments;
  std::vector<int64_t> logit_rows;
  std::vector<Sequence*> stepping;
  int64_t prefill_budget = limits_.prefill_chunk;
  for (auto& sp : active_) {
    Sequence& s = *sp;
    if (s.cancelled->load()) continue;  // finished below
    const int64_t P = (int64_t)s.req.prompt.size();
    int64_t begin = (int64_t)rows.size();
    if (s.prefilled == 0 && s.cache.cap == 0) {
      try {
        s.cache.init(model_.w.cfg, P + s.req.max_tokens);
      } catch (const std::bad_alloc&) {
        if (s.cb.on_error) s.cb.on_error("RESOURCE_EXHAUSTED", "not enough memory for the KV cache of this request");
        s.cancelled->store(true);
        continue;
      }
      kv_bytes_ += (int64_t)s.cache.bytes();
      s.context = s.req.prompt;
      s.result.prompt_tokens = P;
      s.started = std::chrono::steady_clock::now();
    }
    if (s.prefilled < P) {
      if (prefill_budget <= 0) continue;  // wait for the next step
      int64_t n = std::min<int64_t>(P - s.prefilled, prefill_budget);
      prefill_budget -= n;
      for (int64_t i = 0; i < n; i++) rows.push_back({&s.cache, (int32_t)(s.prefilled + i), s.req.prompt[s.prefilled + i]});
      s.prefilled += n;
      if (s.prefilled < P) {
        segments.push_back({begin, (int64_t)rows.size(), s.req.adapter.get()});
        continue;  // more prompt to go: no logits yet
      }
    } else {
      rows.push_back({&s.cache, (int32_t)s.cache.len, s.next_token});
    }
    segments.push_back({begin, (int64_t)rows.size(), s.req.adapter.get()});
    logit_rows.push_back((int64_t)rows.size() - 1);
    stepping.push_back(&s);
  }
  if (!rows.empty()) {
    const int V = model_.w.cfg.V;
    std::vector<float> logits(logit_rows.size() * (size_t)V);
    try {
      llama_infer(model_, rows, segments, logit_rows, logits.data());
    } catch (const EngineError& e) {
      for (auto& sp : active_)
        if (sp->cb.on_error) sp->cb.on_error(e.code, e.what());
      for (auto& sp : active_) sp->cancelled->store(true);
      stepping.clear();
    }
    for (size_t i = 0; i < stepping.size(); i++) {
      Sequence& s = *stepping[i];
      if (s.result.ids.empty()) {
        s.result.prefill_seconds = seconds_since(s.started);
        s.decode_started = std::chrono::steady_clock::now();
      }
      int32_t tok = sample_token(logits.data() + i * (size_t)V, V, s.req.sampling, s.context, s.rng);
      s.result.ids.push_back(tok);
      s.context.push_back(tok);
      s.next_token = tok;
      if (s.cb.on_tokens) s.cb.on_tokens({tok});
    }
  }
  // Retire finished sequences.
  std::vector<std::shared_ptr<Sequence>> still;
  for (auto& sp : active_) {
    Sequence& s = *sp;
    bool stopped = !s.result.ids.empty() &&
                   std::find(s.req.stop_ids.begin(), s.req.stop_ids.end(), s.result.ids.back()) != s.req.stop_ids.end();
    if (s.cancelled->load()) finish(s, "cancelled");
    else if (stopped) finish(s, "stop");
    else if ((int)s.result.ids.size() >= s.req.max_tokens) finish(s, "length");
    else {
      still.push_back(sp);
      continue;
    }
    std::lock_guard<std::mutex> lock(mu_);
    cancel_flags_.erase(s.id);
  }
  active_.swap(still);
}

void Engine::training_step() {
  std::shared_ptr<TrainingJob> j;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (trainings_.empty()) return;
    j = trainings_.front();
  }
  bool finished = false, cancelled = j->cancelled->load();
  try {
    if (!cancelled) {
      if (!j->trainer) j->trainer = std::make_unique<Trainer>(model_, j->adapter, std::move(j->examples), j->hyper,
                                                         std::move(j->eval_examples));
      StepReport report;
      if (j->trainer->micro_step(&report)) {
        j->last = report;
        if (j->cb.on_step) j->cb.on_step(report);
      }
      finished = j->trainer->done();
    }
    if (finished || cancelled)
      if (j->cb.on_done) j->cb.on_done(j->last, cancelled);
  } catch (const EngineError& e) {
    finished = true;
    if (j->cb.on_error) j->cb.on_error(e.code, e.what());
  } catch (const std::bad_alloc&) {
    finished = true;
    if (j->cb.on_error) j->cb.on_error("RESOURCE_EXHAUSTED", "out of memory during training");
  } catch (const std::exception& e) {
    finished = true;
    if (j->cb.on_error) j->cb.on_error("INTERNAL", e.what());
  }
  if (finished || cancelled) {
    std::lock_guard<std::mutex> lock(mu_);
    trainings_.pop_front();
    cancel_flags_.erase(j->id);
  }
}

}  // namespace ts
