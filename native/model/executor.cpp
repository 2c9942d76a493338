// Executor (executor.h): admission, the generation step over the paged cache, training micro-steps,
// and the thread that interleaves them.
#include "model/executor.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>

#include "core/error.h"
#include "model/llama.h"

namespace ts {

namespace {

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

// Training's share of the busy time is measured over roughly the last this many seconds.
constexpr double SHARE_WINDOW_SECONDS = 5.0;

LlamaModel place_model(Backend& be, std::shared_ptr<const LlamaWeights> weights) {
  LlamaModel m;
  m.be = &be;
  m.w = place_weights(be, std::move(weights));
  return m;
}

// Reserves the backend's scratch, then plans everything else in what is left.
MemoryPlan reserve_and_plan(Backend& be, const LlamaModel& m, const ExecutorOptions& o) {
  int64_t largest = 0;
  for (const auto& layer : m.w.layers)
    for (const LinearView& lin : layer.lin)
      if (lin.quantized) largest = std::max<int64_t>(largest, int64_t(lin.out) * lin.in);
  const size_t scratch = be.reserve_scratch(scratch_plan(m.cfg(), o, largest));
  const MemoryInfo mem = be.memory_info();
  MemoryPlan plan = plan_memory(m.cfg(), be.device(), be.compute_dtype(), o, mem.total, mem.free, m.w.bytes);
  plan.backend_scratch = scratch;
  return plan;
}

}  // namespace

struct Executor::Sequence {
  uint64_t id = 0;
  GenerationRequest req;
  GenerationCallbacks cb;
  std::shared_ptr<std::atomic<bool>> cancelled;
  std::vector<int32_t> blocks;   // KV blocks, position order (reserved for the whole length at admission)
  int64_t len = 0;               // positions written to the cache
  std::vector<int32_t> context;  // prompt + generated (for the repetition penalty)
  GenerationResult result;
  SamplerRng rng{0};
  bool started = false;
  int64_t prefilled = 0;         // prompt tokens already in the cache
  int32_t next_token = -1;       // sampled, not yet fed back
  bool holds_adapter = false;    // one of its adapter's users (released in finish)
  std::chrono::steady_clock::time_point started_at, decode_started;
};

struct Executor::TrainingJob {
  uint64_t id = 0;
  AdapterPool::Handle adapter;
  std::unique_ptr<Trainer> trainer;
  std::vector<TrainExample> examples, eval_examples, forgetting_examples;
  TrainHyper hyper;
  TrainingCallbacks cb;
  std::shared_ptr<std::atomic<bool>> cancelled;
  StepReport last;
  bool holds_adapter = false;
};

struct Executor::Warmup {
  uint64_t id = 0;
  AdapterPool::Handle adapter;
  std::function<void()> on_done;
  std::function<void(const std::string&, const std::string&)> on_error;
  std::shared_ptr<std::atomic<bool>> cancelled;
};

Executor::Executor(std::unique_ptr<Backend> backend, std::shared_ptr<const LlamaWeights> weights,
                   ExecutorOptions options)
    : backend_(std::move(backend)),
      model_(place_model(*backend_, std::move(weights))),
      options_(options),
      plan_(reserve_and_plan(*backend_, model_, options_)),
      pool_(*backend_, model_.cfg(), plan_.adapter_slots, plan_.adapter_budget),
      kv_(*backend_, model_.cfg(), plan_.kv_block_size, plan_.kv_blocks),
      workspace_(*backend_, plan_.workspace),
      arena_(workspace_.data(), workspace_.bytes(), backend_->device(), "inference step"),
      check_(*backend_, size_t(options_.max_active_sequences + 1) * sizeof(double)) {
  model_.backend_scratch = plan_.backend_scratch;  // training plans count it as resident
  model_.training_limit = options_.training_memory_bytes;
  // A captured step bakes the rotary table's address: size it for the longest sequence up front.
  if (options_.step_graphs && backend_->supports_graphs()) model_.ensure_rope(plan_.max_seq_len);
  pool_.set_on_change([this] { wake(); });
  thread_ = std::thread([this] { run(); });
}

Executor::~Executor() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_ = true;
  }
  cv_.notify_all();
  if (thread_.joinable()) thread_.join();
  pool_.stop_loader();  // its callback wakes this executor, whose mutex is destroyed before the pool
  for (auto& [bucket, graph] : graphs_) backend_->graph_destroy(graph);
}

void Executor::wake() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    epoch_++;
  }
  cv_.notify_all();
}

int Executor::add_adapter(std::shared_ptr<LoraAdapter> adapter, std::string file) {
  require(adapter && adapter->spec.r <= options_.max_lora_rank, "INVALID_ARGUMENT",
          "adapter rank " + std::to_string(adapter ? adapter->spec.r : 0) + " is above this engine's max_lora_rank " +
              std::to_string(options_.max_lora_rank));
  return pool_.add(std::move(adapter), std::move(file));
}

int Executor::add_adapter_file(const LoraSpec& spec, std::string file) {
  require(spec.r <= options_.max_lora_rank, "INVALID_ARGUMENT",
          "adapter rank " + std::to_string(spec.r) + " is above this engine's max_lora_rank " +
              std::to_string(options_.max_lora_rank));
  return pool_.add_file(spec, std::move(file));
}

void Executor::remove_adapter(int id) {
  pool_.remove(id);
  wake();
}

AdapterPool::Handle Executor::adapter(int id) const { return pool_.get(id); }

void Executor::pin_adapter(int id, bool pinned) {
  pool_.pin(id, pinned);
  wake();  // an unpinned adapter may be evicted for a waiter now
}

uint64_t Executor::warm_adapter(AdapterPool::Handle adapter, std::function<void()> on_done,
                                std::function<void(const std::string&, const std::string&)> on_error) {
  auto w = std::make_shared<Warmup>();
  w->adapter = std::move(adapter);
  w->on_done = std::move(on_done);
  w->on_error = std::move(on_error);
  w->cancelled = std::make_shared<std::atomic<bool>>(false);
  {
    std::lock_guard<std::mutex> lock(mu_);
    w->id = next_id_++;
    cancel_flags_[w->id] = w->cancelled;
    warming_.push_back(w);
    epoch_++;
  }
  cv_.notify_all();
  return w->id;
}

void Executor::set_policy(const ServingPolicy& policy) {
  require(policy.target_inter_token_ms >= 0, "INVALID_ARGUMENT", "the inter-token target must be >= 0 ms");
  require(policy.min_training_share >= 0 && policy.min_training_share <= 1, "INVALID_ARGUMENT",
          "the minimum training share must be in [0, 1]");
  std::lock_guard<std::mutex> lock(mu_);
  policy_ = policy;
}

ServingPolicy Executor::policy() const {
  std::lock_guard<std::mutex> lock(mu_);
  return policy_;
}

void Executor::sync_adapter(const AdapterPool::Handle& adapter) {
  pool_.load_now(adapter);
  if (!adapter->host)
    throw EngineError(adapter->failure_code.empty() ? "INTERNAL" : adapter->failure_code,
                      adapter->failure.empty() ? "the adapter has no host copy" : adapter->failure);
  pool_.sync_to_host(*adapter);
}

void Executor::post(std::function<void(Executor&)> fn) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    tasks_.push_back(std::move(fn));
    epoch_++;
  }
  cv_.notify_all();
}

uint64_t Executor::submit_generation(GenerationRequest req, GenerationCallbacks cb) {
  const LlamaConfig& c = model_.cfg();
  require(!req.prompt.empty(), "INVALID_ARGUMENT", "the prompt has no tokens");
  require(req.max_tokens >= 1, "INVALID_ARGUMENT", "max_tokens must be >= 1");
  for (int32_t id : req.prompt)
    require(id >= 0 && id < c.V, "INVALID_ARGUMENT", "prompt token id " + std::to_string(id) + " is outside the vocabulary");
  const int64_t length = (int64_t)req.prompt.size() + req.max_tokens;
  require(length <= c.max_pos, "INVALID_ARGUMENT", "prompt + max_tokens exceeds max_position_embeddings");
  require(length <= plan_.max_seq_len, "INVALID_ARGUMENT",
          "prompt + max_tokens = " + std::to_string(length) + " tokens exceeds this engine's max_seq_len " +
              std::to_string(plan_.max_seq_len));
  const int64_t blocks = KVPool::blocks_for(length, kv_.block_size());
  require(blocks <= kv_.usable_blocks(), "CAPACITY_EXCEEDED",
          "prompt + max_tokens = " + std::to_string(length) + " tokens needs " + std::to_string(blocks) +
              " KV-cache blocks; this engine's whole cache holds " + std::to_string(kv_.usable_blocks()) +
              " (a retry will not fit either: ask for fewer tokens)");
  auto s = std::make_shared<Sequence>();
  s->req = std::move(req);
  s->cb = std::move(cb);
  s->cancelled = std::make_shared<std::atomic<bool>>(false);
  s->rng = SamplerRng(s->req.sampling.seed);
  AdapterPool::Handle adapter = s->req.adapter;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if ((int)queued_.size() >= options_.max_queued)
      throw EngineError("RESOURCE_EXHAUSTED", "the generation queue is full (" + std::to_string(queued_.size()) +
                                                  " requests wait for KV-cache room or their adapter); retry later");
    s->id = next_id_++;
    cancel_flags_[s->id] = s->cancelled;
    queued_.push_back(s);
    epoch_++;
  }
  if (adapter) pool_.count_request(*adapter, int64_t(s->req.prompt.size()));
  cv_.notify_all();
  return s->id;
}

uint64_t Executor::submit_training(AdapterPool::Handle adapter, std::vector<TrainExample> examples, TrainHyper hyper,
                                   TrainingCallbacks cb, std::vector<TrainExample> eval_examples,
                                   std::vector<TrainExample> forgetting_examples) {
  auto j = std::make_shared<TrainingJob>();
  j->adapter = std::move(adapter);
  j->examples = std::move(examples);
  j->eval_examples = std::move(eval_examples);
  j->forgetting_examples = std::move(forgetting_examples);
  j->hyper = std::move(hyper);
  j->cb = std::move(cb);
  j->cancelled = std::make_shared<std::atomic<bool>>(false);
  {
    std::lock_guard<std::mutex> lock(mu_);
    j->id = next_id_++;
    cancel_flags_[j->id] = j->cancelled;
    trainings_.push_back(j);
    epoch_++;
  }
  cv_.notify_all();
  return j->id;
}

void Executor::cancel(uint64_t id) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = cancel_flags_.find(id);
    if (it != cancel_flags_.end()) it->second->store(true);
    epoch_++;
  }
  cv_.notify_all();
}

Executor::Stats Executor::stats() const {
  Stats s;
  {
    std::lock_guard<std::mutex> lock(mu_);
    s.queued_sequences = (int)queued_.size();
    s.training = !trainings_.empty();
    s.generation_step_ms = gen_ema_ * 1e3;
    s.training_step_ms = train_ema_ * 1e3;
    const double decay = std::exp(-seconds_since(window_at_) / SHARE_WINDOW_SECONDS);
    const double g = window_gen_ * decay, t = window_train_ * decay;
    s.training_share = g + t > 0 ? t / (g + t) : 0;
    s.generation_seconds = total_gen_;
    s.training_seconds = total_train_;
    s.micro_steps = micro_steps_;
    s.deferred_micro_steps = deferred_;
    s.training_plan = training_plan_;
  }
  s.waiting_for_adapter = waiting_for_adapter_.load();
  s.active_sequences = active_count_.load();
  s.kv_blocks_total = kv_.usable_blocks();
  s.kv_blocks_used = kv_.usable_blocks() - kv_.free_blocks();
  s.kv_bytes_used = uint64_t(s.kv_blocks_used) * plan_.kv_block_bytes;
  s.training_workspace_bytes = training_bytes_.load();
  s.graph_steps = graph_steps_.load();
  s.eager_steps = eager_steps_.load();
  return s;
}

void Executor::run() {
  bool idle = false;
  uint64_t seen = 0;
  for (;;) {
    std::deque<std::function<void(Executor&)>> tasks;
    {
      std::unique_lock<std::mutex> lock(mu_);
      // After a turn that could do nothing (every queued request waits for its adapter), sleep until
      // something changes rather than spin.
      cv_.wait(lock, [&] {
        if (stop_) return true;
        if (idle) return epoch_ != seen;
        return !tasks_.empty() || !queued_.empty() || !active_.empty() || !trainings_.empty() || !warming_.empty();
      });
      if (stop_) break;
      seen = epoch_;
      tasks.swap(tasks_);
    }
    maintain_adapters();  // after the swap: adapters added before a task was posted are placed first
    for (auto& t : tasks) {
      try {
        t(*this);  // tasks report their own errors through their callbacks
      } catch (const std::exception& e) {
        // Only a task that forgot to catch gets here; keep serving, but never silently.
        std::fprintf(stderr, "tuneserve engine: a queued task threw: %s\n", e.what());
      }
    }
    waiting_adapters_ = 0;
    bool progress = !tasks.empty();
    const auto t0 = std::chrono::steady_clock::now();
    const bool generated = generation_step();
    if (generated) account(false, seconds_since(t0));
    progress |= generated;
    if (training_allowed(!active_.empty()) && training_step()) progress = true;
    pool_.settle(waiting_adapters_);
    idle = !progress;
  }
  // Shutting down: everything still pending ends as cancelled.
  for (auto& s : active_) finish(*s, "cancelled");
  for (auto& s : queued_) finish(*s, "cancelled");
  for (auto& w : warming_)
    if (w->on_error) w->on_error("CANCELLED", "the engine is shutting down");
  for (auto& j : trainings_) {
    if (j->holds_adapter) pool_.release(*j->adapter);
    if (j->cb.on_done) j->cb.on_done(j->last, true);
  }
}

void Executor::account(bool training, double seconds) {
  std::lock_guard<std::mutex> lock(mu_);
  const auto now = std::chrono::steady_clock::now();
  const double decay = std::exp(-std::chrono::duration<double>(now - window_at_).count() / SHARE_WINDOW_SECONDS);
  window_at_ = now;
  window_gen_ *= decay;
  window_train_ *= decay;
  double& ema = training ? train_ema_ : gen_ema_;
  ema = ema == 0 ? seconds : 0.7 * ema + 0.3 * seconds;
  if (training) {
    window_train_ += seconds;
    total_train_ += seconds;
    since_step_.training_seconds += seconds;
  } else {
    window_gen_ += seconds;
    total_gen_ += seconds;
    since_step_.generation_seconds += seconds;
    since_step_.generation_steps++;
  }
}

bool Executor::training_allowed(bool generating) {
  std::lock_guard<std::mutex> lock(mu_);
  if (trainings_.empty()) return false;
  if (!generating || policy_.target_inter_token_ms <= 0) return true;
  if ((gen_ema_ + train_ema_) * 1e3 <= policy_.target_inter_token_ms) return true;
  const double decay = std::exp(-seconds_since(window_at_) / SHARE_WINDOW_SECONDS);
  const double g = window_gen_ * decay, t = window_train_ * decay;
  if (g + t <= 0 || t / (g + t) < policy_.min_training_share) return true;  // never starve the job
  deferred_++;
  since_step_.deferred_micro_steps++;
  return false;
}

void Executor::finish(Sequence& s, const char* reason) {
  s.result.finish_reason = reason;
  s.result.decode_seconds = s.decode_started.time_since_epoch().count() ? seconds_since(s.decode_started) : 0;
  kv_.release(&s.blocks);
  if (s.holds_adapter) pool_.release(*s.req.adapter);
  s.holds_adapter = false;
  s.req.adapter.reset();  // the adapter's slot may be freed now
  if (s.cb.on_done) s.cb.on_done(s.result);
}

void Executor::admit() {
  struct Failure {
    std::shared_ptr<Sequence> seq;
    std::shared_ptr<Warmup> warm;
    std::string code, message;
  };
  std::vector<std::shared_ptr<Sequence>> dropped;
  std::vector<std::shared_ptr<Warmup>> warmed, warm_cancelled;
  std::vector<Failure> failed;
  std::vector<const AdapterPool::Entry*> waiting;  // distinct adapters that found no slot
  int waiting_sequences = 0;
  // Placement can fail (device memory): that request fails, the executor goes on.
  auto acquire = [&](const AdapterPool::Handle& h, bool count, std::string* code, std::string* message) {
    try {
      return pool_.acquire(h, count, code, message);
    } catch (const EngineError& e) {
      *code = e.code;
      *message = e.what();
    } catch (const std::exception& e) {
      *code = "RESOURCE_EXHAUSTED";
      *message = std::string("placing the adapter failed: ") + e.what();
    }
    return AdapterPool::Acquire::FAILED;
  };
  auto note_waiting = [&](const AdapterPool::Entry* e) {
    if (std::find(waiting.begin(), waiting.end(), e) == waiting.end()) waiting.push_back(e);
  };
  pool_.begin_pass();
  {
    std::lock_guard<std::mutex> lock(mu_);
    // Requests cancelled while waiting leave the queue at once, wherever they stand.
    for (auto it = queued_.begin(); it != queued_.end();) {
      if ((*it)->cancelled->load()) {
        dropped.push_back(*it);
        cancel_flags_.erase((*it)->id);
        it = queued_.erase(it);
      } else {
        ++it;
      }
    }
    for (auto it = warming_.begin(); it != warming_.end();) {
      Warmup& w = **it;
      std::string code, message;
      AdapterPool::Acquire r = w.cancelled->load() ? AdapterPool::Acquire::FAILED
                                                   : acquire(w.adapter, false, &code, &message);
      if (r == AdapterPool::Acquire::READY) {
        pool_.release(*w.adapter);  // resident and most recently used; nothing holds it
        warmed.push_back(*it);
      } else if (r == AdapterPool::Acquire::FAILED) {
        if (w.cancelled->load()) warm_cancelled.push_back(*it);
        else failed.push_back({nullptr, *it, code, message});
      } else {
        if (r == AdapterPool::Acquire::WAIT) note_waiting(w.adapter.get());
        ++it;
        continue;
      }
      cancel_flags_.erase(w.id);
      it = warming_.erase(it);
    }
    // In order among the sequences whose adapter is ready: the first that does not fit in the KV cache
    // waits for room rather than being overtaken by smaller requests.
    for (auto it = queued_.begin(); it != queued_.end() && (int)active_.size() < options_.max_active_sequences;) {
      Sequence& s = **it;
      if (s.req.adapter && !s.holds_adapter) {
        std::string code, message;
        const AdapterPool::Acquire r = acquire(s.req.adapter, true, &code, &message);
        if (r == AdapterPool::Acquire::FAILED) {
          failed.push_back({*it, nullptr, code, message});
          cancel_flags_.erase(s.id);
          it = queued_.erase(it);
          continue;
        }
        if (r != AdapterPool::Acquire::READY) {
          if (r == AdapterPool::Acquire::WAIT) note_waiting(s.req.adapter.get());
          waiting_sequences++;
          ++it;
          continue;
        }
        s.holds_adapter = true;
      }
      const int64_t length = (int64_t)s.req.prompt.size() + s.req.max_tokens;
      if (!kv_.allocate(KVPool::blocks_for(length, kv_.block_size()), &s.blocks)) break;
      active_.push_back(*it);
      it = queued_.erase(it);
    }
    active_count_ = (int)active_.size();
  }
  waiting_adapters_ += int(waiting.size());
  waiting_for_adapter_ = waiting_sequences;
  for (auto& s : dropped) finish(*s, "cancelled");
  for (auto& w : warmed)
    if (w->on_done) w->on_done();
  for (auto& w : warm_cancelled)
    if (w->on_error) w->on_error("CANCELLED", "the load was cancelled");
  for (auto& f : failed) {
    if (f.warm) {
      if (f.warm->on_error) f.warm->on_error(f.code, f.message);
      continue;
    }
    // Only this request fails: its adapter could not be loaded.
    if (f.seq->cb.on_error) f.seq->cb.on_error(f.code, f.message);
    finish(*f.seq, "cancelled");
  }
}

void Executor::maintain_adapters() {
  try {
    pool_.maintain();
  } catch (const std::exception& e) {
    std::fprintf(stderr, "tuneserve engine: refreshing the adapter slot table failed: %s\n", e.what());
  }
}

bool Executor::generation_step() {
  admit();
  maintain_adapters();  // the slot table, after admission placed adapters
  if (active_.empty()) return false;
  // Build the step's rows: each sequence contributes a prompt chunk (prefill) or its last token.
  InferenceBatch batch;
  batch.max_blocks = plan_.max_blocks_per_sequence;
  std::vector<Sequence*> stepping;   // sequences that get a token this step
  std::vector<Sequence*> in_step;    // every sequence with rows in this step (its index = its row_seq)
  int64_t prefill_budget = options_.prefill_chunk;
  bool decode_only = true;
  for (auto& sp : active_) {
    Sequence& s = *sp;
    if (s.cancelled->load()) continue;  // finished below
    if (s.req.adapter && !s.req.adapter->placed) {  // cannot happen while it holds the adapter; fail alone
      if (s.cb.on_error) s.cb.on_error("INTERNAL", "the request's adapter lost its device slot");
      s.cancelled->store(true);
      continue;
    }
    const int64_t P = (int64_t)s.req.prompt.size();
    if (!s.started) {
      s.started = true;
      s.context = s.req.prompt;
      s.result.prompt_tokens = P;
      s.started_at = std::chrono::steady_clock::now();
    }
    const int64_t begin = batch.rows();
    const int32_t seq = (int32_t)in_step.size();
    bool wants_logits = true;
    if (s.prefilled < P) {
      if (prefill_budget <= 0) continue;  // wait for the next step
      decode_only = false;
      const int64_t n = std::min<int64_t>(P - s.prefilled, prefill_budget);
      prefill_budget -= n;
      for (int64_t i = 0; i < n; i++) {
        batch.tokens.push_back(s.req.prompt[s.prefilled + i]);
        batch.pos.push_back((int32_t)(s.prefilled + i));
        batch.row_seq.push_back(seq);
      }
      s.prefilled += n;
      s.len = s.prefilled;
      wants_logits = s.prefilled == P;  // more prompt to go: no logits yet
    } else {
      batch.tokens.push_back(s.next_token);
      batch.pos.push_back((int32_t)s.len);
      batch.row_seq.push_back(seq);
      s.len += 1;
    }
    in_step.push_back(&s);
    for (int b = 0; b < batch.max_blocks; b++)
      batch.block_tables.push_back(b < (int)s.blocks.size() ? s.blocks[b] : 0);
    if (s.req.adapter) batch.adapters.push_back({begin, batch.rows(), &s.req.adapter->tensors, s.req.adapter->slot});
    if (wants_logits) {
      batch.logit_rows.push_back((int32_t)batch.rows() - 1);
      stepping.push_back(&s);
    }
  }
  if (batch.rows() > 0) {
    bool failed = false;
    try {
      const Tensor logits = run_step(batch, decode_only);
      if (!stepping.empty()) {
        const std::vector<bool> bad = check_logits(logits, (int64_t)stepping.size());
        std::vector<SampleRow> rows(stepping.size());
        for (size_t i = 0; i < stepping.size(); i++)
          rows[i] = SampleRow{stepping[i]->req.sampling, &stepping[i]->context, &stepping[i]->rng};
        std::vector<int32_t> ids(stepping.size());
        backend_->sample(ids.data(), logits.rows_view(0, (int64_t)stepping.size()), rows.data());
        for (size_t i = 0; i < stepping.size(); i++) {
          Sequence& s = *stepping[i];
          if (bad[i]) {
            if (s.cb.on_error)
              s.cb.on_error("NUMERICAL_ERROR", "the model's logits for this request are not finite (NaN or infinity); "
                                               "its adapter's weights are the likely cause");
            s.cancelled->store(true);
            continue;
          }
          if (s.result.ids.empty()) {
            s.result.prefill_seconds = seconds_since(s.started_at);
            s.decode_started = std::chrono::steady_clock::now();
          }
          const int32_t tok = ids[i];
          s.result.ids.push_back(tok);
          s.context.push_back(tok);
          s.next_token = tok;
          if (s.req.adapter) pool_.count_tokens_out(*s.req.adapter, 1);
          if (s.cb.on_tokens) s.cb.on_tokens({tok});
        }
      }
    } catch (const EngineError& e) {
      // The step as a whole failed (a device error): no row of it can be trusted.
      failed = true;
      for (auto& sp : active_)
        if (sp->cb.on_error) sp->cb.on_error(e.code, e.what());
    }
    if (failed)
      for (auto& sp : active_) sp->cancelled->store(true);
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
  active_count_ = (int)active_.size();
  return batch.rows() > 0;
}

std::vector<bool> Executor::check_logits(const Tensor& logits, int64_t n) {
  // One squared sum over all rows (8 bytes back); only when it is not finite, one per row. A row of
  // finite logits cannot overflow it: |logit| would have to exceed ~1e17.
  std::vector<bool> bad(size_t(n), false);
  double* acc = static_cast<double*>(check_.data());
  const int64_t V = logits.cols, ld = logits.ld;
  float* x = logits.f32();
  if (logits.contiguous()) {
    double total = 0;
    backend_->fill_zero(acc, sizeof(double));
    backend_->sum_squares(acc, x, n * V);
    backend_->download(&total, acc, sizeof(double));
    if (std::isfinite(total)) return bad;
  }
  std::vector<double> sums(static_cast<size_t>(n));
  backend_->fill_zero(acc, size_t(n) * sizeof(double));
  for (int64_t i = 0; i < n; i++) backend_->sum_squares(acc + i, x + i * ld, V);
  backend_->download(sums.data(), acc, size_t(n) * sizeof(double));
  for (int64_t i = 0; i < n; i++)
    if (!std::isfinite(sums[size_t(i)])) {
      bad[size_t(i)] = true;
      backend_->fill_zero(x + i * ld, size_t(V) * sizeof(float));  // the sampler sees zeros, not NaN
    }
  return bad;
}

Tensor Executor::run_step(InferenceBatch& batch, bool decode_only) {
  const LlamaConfig& c = model_.cfg();
  const DType act = backend_->compute_dtype();
  const int64_t M = batch.rows(), S = batch.sequences(), n = (int64_t)batch.logit_rows.size();
  batch.slots = pool_.slots();
  arena_.reset();
  const bool graph = decode_only && options_.step_graphs && backend_->supports_graphs();
  if (!graph) {
    // The per-row LoRA form only when some row has an adapter (the CPU uses the host segments).
    batch.slot_modules = batch.adapters.empty() ? nullptr : pool_.slot_table();
    InferenceWorkspace ws = carve_inference(arena_, c, act, M, S, batch.max_blocks, n, options_.max_lora_rank);
    stage_inference(model_, batch, ws, kv_);
    run_inference(model_, batch, ws, kv_);
    eager_steps_++;
    return ws.logits;
  }
  // Decode only: one row, one sequence and one logit row per sequence. The step runs at the next
  // power-of-two bucket (padding rows are harmless, see stage_inference) so a few graphs cover every
  // batch size; the adapter of each row comes from the per-row slot mapping, part of the graph.
  int64_t bucket = 1;
  while (bucket < M) bucket *= 2;
  bucket = std::min<int64_t>(bucket, options_.max_active_sequences);
  batch.slot_modules = pool_.slot_table();
  InferenceWorkspace ws =
      carve_inference(arena_, c, act, bucket, bucket, batch.max_blocks, bucket, options_.max_lora_rank);
  stage_inference(model_, batch, ws, kv_);
  auto it = graphs_.find(bucket);
  if (it == graphs_.end()) {
    backend_->graph_begin_capture();
    try {
      run_inference(model_, batch, ws, kv_);
    } catch (...) {
      backend_->graph_end_capture();
      throw;
    }
    it = graphs_.emplace(bucket, backend_->graph_end_capture()).first;
  }
  backend_->graph_launch(it->second);
  graph_steps_++;
  return ws.logits;
}

bool Executor::training_step() {
  // Before a job's final callback: whoever it wakes sees no running job.
  auto clear_job = [this] {
    training_bytes_ = 0;
    std::lock_guard<std::mutex> lock(mu_);
    training_plan_.reset();
  };
  std::shared_ptr<TrainingJob> j;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (trainings_.empty()) return false;
    j = trainings_.front();
  }
  bool finished = false, cancelled = j->cancelled->load(), stepped = false;
  try {
    if (!cancelled && !j->holds_adapter) {
      // The adapter trains in a device slot, held until the job ends.
      std::string code, message;
      const AdapterPool::Acquire r = pool_.acquire(j->adapter, false, &code, &message);
      if (r == AdapterPool::Acquire::FAILED) throw EngineError(code, message);
      if (r != AdapterPool::Acquire::READY) {
        if (r == AdapterPool::Acquire::WAIT) waiting_adapters_++;
        return false;
      }
      j->holds_adapter = true;
      maintain_adapters();
    }
    if (!cancelled) {
      if (!j->trainer) {
        j->trainer = std::make_unique<Trainer>(model_, pool_, j->adapter, std::move(j->examples), j->hyper,
                                               std::move(j->eval_examples), std::move(j->forgetting_examples));
        training_bytes_ = j->trainer->workspace_bytes();
        j->last = j->trainer->resumed_report();  // what the job reports if it runs no step (resumed at its end)
        auto plan = std::make_shared<const TrainingMemoryPlan>(j->trainer->memory_plan());
        std::lock_guard<std::mutex> lock(mu_);
        training_plan_ = std::move(plan);
        since_step_ = ShareReport{};
      }
      StepReport report;
      stepped = true;
      const auto t0 = std::chrono::steady_clock::now();
      const bool step_done = !j->trainer->done() && j->trainer->micro_step(&report);  // resumed at its end: nothing to run
      account(true, seconds_since(t0));
      if (step_done) {
        j->last = report;
        ShareReport share;
        {
          std::lock_guard<std::mutex> lock(mu_);
          micro_steps_++;
          share = since_step_;
          since_step_ = ShareReport{};
        }
        const double busy = share.training_seconds + share.generation_seconds;
        share.share = busy > 0 ? share.training_seconds / busy : 1;
        if (j->cb.on_share) j->cb.on_share(share);
        if (j->cb.on_step) j->cb.on_step(report);
      } else {
        std::lock_guard<std::mutex> lock(mu_);
        micro_steps_++;
      }
      finished = j->trainer->done();
      if (finished) j->trainer->finish();
    }
    if (finished || cancelled) {
      // A cancelled job (or one stopped by a shutdown) keeps its place: a checkpoint of the last
      // completed step, which a resume continues from.
      if (cancelled && j->trainer) j->last.checkpoint = j->trainer->checkpoint_now();
      j->trainer.reset();  // ends the adapter's training state, frees the workspace
      pool_.sync_to_host(*j->adapter);
      pool_.drop_training_state(*j->adapter);  // it serves from here on (train-to-serve)
      clear_job();
      if (j->cb.on_done) j->cb.on_done(j->last, cancelled);
    }
  } catch (const EngineError& e) {
    finished = true;
    j->trainer.reset();
    clear_job();
    if (j->cb.on_error) j->cb.on_error(e.code, e.what());
  } catch (const std::bad_alloc&) {
    finished = true;
    j->trainer.reset();
    clear_job();
    if (j->cb.on_error) j->cb.on_error("RESOURCE_EXHAUSTED", "out of memory during training");
  } catch (const std::exception& e) {
    finished = true;
    j->trainer.reset();
    clear_job();
    if (j->cb.on_error) j->cb.on_error("INTERNAL", e.what());
  }
  if (finished || cancelled) {
    j->trainer.reset();
    if (j->holds_adapter) pool_.release(*j->adapter);
    j->holds_adapter = false;
    clear_job();
    std::lock_guard<std::mutex> lock(mu_);
    trainings_.pop_front();
    cancel_flags_.erase(j->id);
    epoch_++;
  }
  return stepped || finished || cancelled;
}

namespace {

// A probe's hold on an adapter's device slot (executor thread): read from disk and placed now, or
// RESOURCE_EXHAUSTED when no slot can be freed; released at the end of the probe.
class ProbeHold {
 public:
  ProbeHold(AdapterPool& pool, const AdapterPool::Handle& adapter) : pool_(pool), adapter_(adapter) {
    if (!adapter_) return;
    pool_.load_now(adapter_);
    std::string code, message;
    const AdapterPool::Acquire r = pool_.acquire(adapter_, false, &code, &message);
    if (r == AdapterPool::Acquire::FAILED) throw EngineError(code, message);
    require(r == AdapterPool::Acquire::READY, "RESOURCE_EXHAUSTED",
            "every adapter slot is in use by running requests; retry when the load is lower");
    held_ = true;
    pool_.maintain();
  }
  ~ProbeHold() {
    if (held_) pool_.release(*adapter_);
  }
  ProbeHold(const ProbeHold&) = delete;
  ProbeHold& operator=(const ProbeHold&) = delete;

 private:
  AdapterPool& pool_;
  const AdapterPool::Handle& adapter_;
  bool held_ = false;
};

}  // namespace

std::vector<float> Executor::logits(const std::vector<int32_t>& ids, const AdapterPool::Handle& adapter) {
  const LlamaConfig& c = model_.cfg();
  const int64_t T = (int64_t)ids.size();
  require(T > 0, "INVALID_ARGUMENT", "ids must not be empty");
  require(T <= c.max_pos, "INVALID_ARGUMENT", "the sequence is longer than max_position_embeddings");
  ProbeHold hold(pool_, adapter);
  InferenceBatch b;
  b.tokens = ids;
  b.pos.resize(T);
  b.row_seq.assign(T, 0);
  b.logit_rows.resize(T);
  for (int64_t t = 0; t < T; t++) b.pos[t] = b.logit_rows[t] = (int32_t)t;
  std::vector<int32_t> blocks;
  b.max_blocks = (int)KVPool::blocks_for(T, kv_.block_size());
  if (!kv_.allocate(b.max_blocks, &blocks))
    throw EngineError("RESOURCE_EXHAUSTED", "the KV cache has no room for a " + std::to_string(T) +
                                                "-token sequence now; retry when generation load is lower");
  std::vector<float> out;
  try {
    b.block_tables = blocks;
    if (adapter) {
      b.adapters.push_back({0, T, &adapter->tensors, adapter->slot});
      b.slot_modules = pool_.slot_table();
      b.slots = pool_.slots();
    }
    // Its own workspace: a probe's T rows of logits can exceed the step workspace's plan.
    const int rank = adapter ? adapter->spec.r : 0;
    Buffer mem(*backend_, plan_inference_workspace(c, backend_->compute_dtype(), T, 1, b.max_blocks, T, rank));
    Arena arena(mem.data(), mem.bytes(), backend_->device(), "logits probe");
    InferenceWorkspace ws = carve_inference(arena, c, backend_->compute_dtype(), T, 1, b.max_blocks, T, rank);
    stage_inference(model_, b, ws, kv_);
    run_inference(model_, b, ws, kv_);
    out.resize(size_t(T) * c.V);
    backend_->download(out.data(), ws.logits.data, out.size() * sizeof(float));
  } catch (...) {
    kv_.release(&blocks);
    throw;
  }
  kv_.release(&blocks);
  return out;
}

double Executor::train_pass(const AdapterPool::Handle& adapter, const TrainBatch& batch, const TrainPassOptions& opt) {
  ProbeHold hold(pool_, adapter);
  if (adapter && opt.backward) {
    if (!adapter->training) pool_.begin_training(*adapter);  // also resets the AdamW moments: first use only
    for (const auto& layer : adapter->tensors.mods)
      for (const auto& d : layer) {
        if (!d.A) continue;
        backend_->fill_zero(d.dA, size_t(d.view.r) * d.view.in * sizeof(float));
        backend_->fill_zero(d.dB, size_t(d.view.out) * d.view.r * sizeof(float));
      }
  }
  LoraSpec lora;
  lora.r = 0;
  if (adapter) lora = adapter->spec;
  Buffer mem(*backend_, plan_train_workspace(model_, batch.B, batch.T, lora, opt));
  Arena arena(mem.data(), mem.bytes(), backend_->device(), "training pass");
  const double loss = llama_train_pass(model_, adapter ? &adapter->tensors : nullptr, batch, opt, arena);
  if (adapter) pool_.sync_to_host(*adapter);
  return loss;
}

}  // namespace ts
