// AdapterPool (adapter_pool.h): the three tiers, the loader thread, LRU slots and the slot table.
#include "model/adapter_pool.h"

#include <algorithm>
#include <chrono>
#include <cstring>

#include "core/error.h"

namespace ts {

namespace {

// Float32 elements of a module's A and B.
int64_t a_size(const LoraModule& m) { return int64_t(m.A.size()); }
int64_t b_size(const LoraModule& m) { return int64_t(m.B.size()); }

size_t adapter_bytes(const LoraAdapter& a) {
  size_t n = 0;
  for (const auto& layer : a.mods)
    for (const auto& m : layer) n += size_t(a_size(m) + b_size(m)) * sizeof(float);
  return n;
}

// A and B of a spec, without allocating them (for adapters still on disk).
size_t spec_bytes(const LlamaConfig& cfg, const LoraSpec& spec) {
  size_t n = 0;
  for (int t = 0; t < NUM_TARGETS; t++) {
    if (!((spec.target_mask >> t) & 1u)) continue;
    int out = 0, in = 0;
    target_shape(cfg, t, &out, &in);
    n += size_t(spec.r) * size_t(in + out) * sizeof(float);
  }
  return n * size_t(cfg.L);
}

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

void add_stats(AdapterStats& to, const AdapterStats& s) {
  to.requests += s.requests;
  to.tokens_in += s.tokens_in;
  to.tokens_out += s.tokens_out;
  to.hits += s.hits;
  to.host_hits += s.host_hits;
  to.loads += s.loads;
  to.load_seconds += s.load_seconds;
  to.placements += s.placements;
  to.place_seconds += s.place_seconds;
  to.evictions += s.evictions;
  to.host_evictions += s.host_evictions;
  to.load_failures += s.load_failures;
}

}  // namespace

AdapterPool::Entry::~Entry() {
  if (pool) pool->release_slot(*this);
}

AdapterPool::AdapterPool(Backend& backend, const LlamaConfig& cfg, int slots, size_t budget_bytes)
    : be_(backend), cfg_(cfg), slots_(slots), budget_(budget_bytes),
      alias_host_(backend.device() == DeviceKind::CPU) {
  require(slots > 0, "INVALID_ARGUMENT", "the adapter pool needs at least one slot");
  table_ = Buffer(be_, size_t(cfg.L) * NUM_TARGETS * size_t(slots) * sizeof(LoraModuleView));
  by_slot_.resize(size_t(slots));
  for (int s = slots - 1; s >= 0; s--) free_slots_.push_back(s);  // slot 0 is handed out first
  loader_ = std::thread([this] { loader(); });
}

AdapterPool::~AdapterPool() {
  stop_loader();
  // Entries still held elsewhere must not call back into a destroyed pool.
  std::lock_guard<std::mutex> lock(mu_);
  for (auto& [id, e] : entries_) e->pool = nullptr;
  for (auto& w : by_slot_)
    if (auto e = w.lock()) e->pool = nullptr;
}

void AdapterPool::stop_loader() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_loading_ = true;
  }
  load_cv_.notify_all();
  if (loader_.joinable()) loader_.join();
}

void AdapterPool::set_on_change(std::function<void()> fn) {
  std::lock_guard<std::mutex> lock(mu_);
  on_change_ = std::move(fn);
}

int AdapterPool::add(std::shared_ptr<LoraAdapter> host, std::string file) {
  require(host && host->L == cfg_.L, "ADAPTER_MISMATCH", "adapter does not fit this base model");
  auto e = std::make_shared<Entry>();
  e->spec = host->spec;
  e->bytes = adapter_bytes(*host);
  e->host = std::move(host);
  e->file = std::move(file);
  e->pool = this;
  std::lock_guard<std::mutex> lock(mu_);
  e->id = next_id_++;
  e->last_used = ++tick_;
  host_bytes_ += e->bytes;
  entries_[e->id] = e;
  return e->id;
}

int AdapterPool::add_file(const LoraSpec& spec, std::string file) {
  require(!file.empty(), "INVALID_ARGUMENT", "an adapter in the disk tier needs its file");
  auto e = std::make_shared<Entry>();
  e->spec = spec;
  e->bytes = spec_bytes(cfg_, spec);
  e->file = std::move(file);
  e->pool = this;
  std::lock_guard<std::mutex> lock(mu_);
  e->id = next_id_++;
  e->last_used = ++tick_;
  entries_[e->id] = e;
  return e->id;
}

void AdapterPool::set_file(int id, std::string file) {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = entries_.find(id);
  require(it != entries_.end(), "NOT_FOUND", "no adapter with id " + std::to_string(id));
  it->second->file = std::move(file);
}

void AdapterPool::remove(int id) {
  Handle e;  // dropped after the lock is released: ~Entry takes it again
  std::lock_guard<std::mutex> lock(mu_);
  auto it = entries_.find(id);
  if (it == entries_.end()) return;
  e = std::move(it->second);
  entries_.erase(it);
  e->pinned = false;
  e->draining = false;
}

AdapterPool::Handle AdapterPool::get(int id) const {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = entries_.find(id);
  require(it != entries_.end(), "NOT_FOUND", "no adapter with id " + std::to_string(id));
  return it->second;
}

void AdapterPool::pin(int id, bool pinned) {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = entries_.find(id);
  require(it != entries_.end(), "NOT_FOUND", "no adapter with id " + std::to_string(id));
  Entry& e = *it->second;
  if (pinned && !e.pinned) {
    int count = 0;
    for (const auto& [other, o] : entries_) count += o->pinned;
    // One slot always stays unpinned, so a request for any other adapter can still be served.
    require(count + 1 < slots_, "FAILED_PRECONDITION",
            "pinning it would pin " + std::to_string(count + 1) + " of the pool's " + std::to_string(slots_) +
                " slots; at least one must stay free for other adapters");
  }
  e.pinned = pinned;
  if (pinned) e.draining = false;
}

void AdapterPool::set_host_budget(size_t bytes) {
  std::lock_guard<std::mutex> lock(mu_);
  host_budget_ = bytes;
}

int AdapterPool::count() const {
  std::lock_guard<std::mutex> lock(mu_);
  return int(entries_.size());
}

size_t AdapterPool::used_bytes() const {
  std::lock_guard<std::mutex> lock(mu_);
  return used_;
}

std::vector<AdapterPool::Info> AdapterPool::snapshot() const {
  std::lock_guard<std::mutex> lock(mu_);
  std::vector<Info> out;
  out.reserve(entries_.size());
  for (const auto& [id, e] : entries_) {
    Info i;
    i.id = id;
    i.tier = e->placed ? AdapterTier::DEVICE : e->host ? AdapterTier::HOST : AdapterTier::DISK;
    i.pinned = e->pinned;
    i.loading = e->loading;
    i.training = e->training;
    i.users = e->users;
    i.bytes = e->bytes;
    i.failure_code = e->failure_code;
    i.failure = e->failure;
    i.stats = e->stats;
    out.push_back(std::move(i));
  }
  return out;
}

AdapterPool::Totals AdapterPool::totals() const {
  std::vector<Handle> keep;  // declared before the lock: a last handle's ~Entry takes it
  std::lock_guard<std::mutex> lock(mu_);
  Totals t;
  t.slots = slots_;
  t.adapters = int(entries_.size());
  t.host_bytes = host_bytes_;
  t.host_budget = host_budget_;
  t.device_bytes = used_;
  t.device_budget = budget_;
  t.stats = retired_;
  for (const auto& [id, e] : entries_) {
    t.pinned += e->pinned;
    t.loading += e->loading;
    add_stats(t.stats, e->stats);
  }
  keep = residents_locked();
  t.resident = int(keep.size());
  return t;
}

void AdapterPool::count_request(Entry& e, int64_t prompt_tokens) {
  std::lock_guard<std::mutex> lock(mu_);
  e.stats.requests++;
  e.stats.tokens_in += uint64_t(prompt_tokens);
}

void AdapterPool::count_tokens_out(Entry& e, int64_t tokens) {
  std::lock_guard<std::mutex> lock(mu_);
  e.stats.tokens_out += uint64_t(tokens);
}

void AdapterPool::release_slot(Entry& e) {
  std::lock_guard<std::mutex> lock(mu_);
  add_stats(retired_, e.stats);
  if (e.host) host_bytes_ -= e.bytes;
  if (e.slot < 0) return;
  by_slot_[size_t(e.slot)].reset();
  free_slots_.push_back(e.slot);
  if (e.storage.bytes()) used_ -= e.bytes;
  if (e.storage.bytes()) graveyard_.push_back(std::move(e.storage));
  if (e.training_storage.bytes()) graveyard_.push_back(std::move(e.training_storage));
  e.slot = -1;
  table_dirty_ = true;
}

// ---------------------------------------------------------------------------------- the loader

void AdapterPool::loader() {
  for (;;) {
    Handle e;
    std::deque<Handle> abandoned;  // declared before the lock: dropped after it is released
    {
      std::unique_lock<std::mutex> lock(mu_);
      load_cv_.wait(lock, [&] { return stop_loading_ || !load_queue_.empty(); });
      if (stop_loading_) {
        for (auto& q : load_queue_) q->loading = false;
        abandoned.swap(load_queue_);
      } else {
        e = std::move(load_queue_.front());
        load_queue_.pop_front();
      }
    }
    if (!e) return;
    const auto t0 = std::chrono::steady_clock::now();
    std::shared_ptr<LoraAdapter> host;
    std::string code, message;
    try {
      host = lora_load(cfg_, e->spec, e->file);
    } catch (const EngineError& err) {
      code = err.code;
      message = err.what();
    } catch (const std::bad_alloc&) {
      code = "RESOURCE_EXHAUSTED";
      message = "not enough host memory to load the adapter";
    } catch (const std::exception& err) {
      code = "INTERNAL";
      message = err.what();
    }
    const double dt = seconds_since(t0);
    std::function<void()> notify;
    {
      std::lock_guard<std::mutex> lock(mu_);
      e->loading = false;
      if (host) {
        install_host_locked(*e, std::move(host), dt);
      } else {
        e->failure_code = code;
        e->failure = message;
        e->stats.load_failures++;
      }
      notify = on_change_;
    }
    e.reset();  // before the callback: the last handle of a removed adapter takes the lock
    if (notify) notify();
  }
}

void AdapterPool::load_now(const Handle& e) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (e->host || !e->failure.empty()) return;
  }
  const auto t0 = std::chrono::steady_clock::now();
  auto host = lora_load(cfg_, e->spec, e->file);  // throws: the caller reports it
  const double dt = seconds_since(t0);
  std::lock_guard<std::mutex> lock(mu_);
  if (e->host) return;  // the loader finished first
  install_host_locked(*e, std::move(host), dt);
}

void AdapterPool::install_host_locked(Entry& e, std::shared_ptr<LoraAdapter> host, double seconds) {
  e.bytes = adapter_bytes(*host);
  e.host = std::move(host);
  e.fresh = true;
  host_bytes_ += e.bytes;
  e.stats.loads++;
  e.stats.load_seconds += seconds;
  e.stats.last_load_seconds = seconds;
}

// ---------------------------------------------------------------------------------- slots

std::vector<AdapterPool::Handle> AdapterPool::residents_locked() const {
  std::vector<Handle> out;
  for (const auto& w : by_slot_)
    if (auto e = w.lock(); e && e->placed) out.push_back(std::move(e));
  return out;
}

AdapterPool::Entry* AdapterPool::lru_idle_locked(const std::vector<Handle>& residents) const {
  Entry* best = nullptr;
  for (const Handle& e : residents) {
    if (!e->placed || e->users > 0 || e->pinned || e->training) continue;
    if (!best || e->last_used < best->last_used) best = e.get();
  }
  return best;
}

void AdapterPool::evict_locked(Entry& e) {
  e.placed = false;
  e.draining = false;
  e.tensors = AdapterTensors{};
  e.stats.evictions++;
  if (e.storage.bytes()) {
    used_ -= e.bytes;
    graveyard_.push_back(std::move(e.storage));
  }
  by_slot_[size_t(e.slot)].reset();
  free_slots_.push_back(e.slot);
  e.slot = -1;
  table_dirty_ = true;
}

AdapterPool::Acquire AdapterPool::acquire(const Handle& hp, bool count, std::string* code, std::string* message) {
  Entry& e = *hp;
  std::vector<Handle> residents;  // declared before the lock: a last handle's ~Entry takes it
  std::lock_guard<std::mutex> lock(mu_);
  if (!e.failure.empty()) {
    *code = e.failure_code;
    *message = e.failure;
    return Acquire::FAILED;
  }
  e.wanted = true;
  if (e.placed) {
    if (e.draining) return Acquire::WAIT;  // its slot is promised to a waiter
    e.wanted = false;
    e.users++;
    e.last_used = ++tick_;
    if (count) e.stats.hits++;
    return Acquire::READY;
  }
  if (!e.host) {
    if (!e.loading) {
      e.loading = true;
      load_queue_.push_back(hp);
      load_cv_.notify_one();
    }
    return Acquire::LOADING;
  }
  if (budget_ > 0 && e.bytes > budget_) {
    *code = "RESOURCE_EXHAUSTED";
    *message = "the adapter (" + std::to_string(e.bytes) + " bytes) is larger than the whole adapter pool (" +
               std::to_string(budget_) + " bytes)";
    return Acquire::FAILED;
  }
  // A slot (and, on CUDA, room in the byte budget): free ones first, then the least recently used
  // idle adapter's.
  residents = residents_locked();
  while (free_slots_.empty() || (budget_ > 0 && used_ + (alias_host_ ? 0 : e.bytes) > budget_)) {
    Entry* victim = lru_idle_locked(residents);
    if (!victim) return Acquire::WAIT;
    evict_locked(*victim);
  }
  const auto t0 = std::chrono::steady_clock::now();
  e.slot = free_slots_.back();
  free_slots_.pop_back();
  try {
    place(e);
  } catch (...) {
    free_slots_.push_back(e.slot);
    e.slot = -1;
    throw;
  }
  by_slot_[size_t(e.slot)] = hp;
  const double dt = seconds_since(t0);
  e.stats.placements++;
  e.stats.place_seconds += dt;
  e.stats.last_place_seconds = dt;
  if (count && !e.fresh) e.stats.host_hits++;
  e.fresh = false;
  e.wanted = false;
  e.users++;
  e.last_used = ++tick_;
  table_dirty_ = true;
  return Acquire::READY;
}

void AdapterPool::begin_pass() {
  std::lock_guard<std::mutex> lock(mu_);
  for (auto& [id, e] : entries_) e->wanted = false;
}

void AdapterPool::release(Entry& e) {
  std::lock_guard<std::mutex> lock(mu_);
  if (e.users > 0) e.users--;
  e.last_used = ++tick_;
}

void AdapterPool::settle(int waiting) {
  std::vector<Handle> keep;  // declared before the lock: a last handle's ~Entry takes it
  std::vector<std::shared_ptr<LoraAdapter>> dropped;  // freed outside the lock
  std::lock_guard<std::mutex> lock(mu_);
  // Here, at the end of a turn, `wanted` marks every adapter a waiter asked for this turn.
  // The host tier over its budget: drop the least recently used idle copies that can be read again.
  while (host_budget_ > 0 && host_bytes_ > host_budget_) {
    Entry* victim = nullptr;
    for (const auto& [id, e] : entries_) {
      if (!e->host || e->placed || e->users > 0 || e->loading || e->pinned || e->training || e->wanted ||
          e->file.empty())
        continue;
      if (!victim || e->last_used < victim->last_used) victim = e.get();
    }
    if (!victim) break;
    dropped.push_back(std::move(victim->host));
    host_bytes_ -= victim->bytes;
    victim->stats.host_evictions++;
  }
  keep = residents_locked();
  std::vector<Entry*> resident;
  int draining = 0;
  for (const Handle& e : keep) {
    resident.push_back(e.get());
    draining += e->draining;
  }
  // Oldest use first: those are the ones to drain; undraining starts from the newest.
  std::sort(resident.begin(), resident.end(), [](Entry* a, Entry* b) { return a->last_used < b->last_used; });
  for (Entry* e : resident) {
    if (draining >= waiting) break;
    if (e->draining || e->pinned || e->training || e->users == 0) continue;
    e->draining = true;
    draining++;
  }
  for (auto it = resident.rbegin(); it != resident.rend() && draining > waiting; ++it)
    if ((*it)->draining) {
      (*it)->draining = false;
      draining--;
    }
}

void AdapterPool::point_at_host(Entry& e) {
  LoraAdapter& a = *e.host;
  e.tensors.L = a.L;
  e.tensors.mods.assign(size_t(a.L), {});
  for (int l = 0; l < a.L; l++)
    for (int t = 0; t < NUM_TARGETS; t++) {
      if (!a.has(t)) continue;
      LoraModule& m = a.mod(l, t);
      AdapterTensors::Module& d = e.tensors.mods[l][t];
      d.A = m.A.data();
      d.B = m.B.data();
      d.view = LoraModuleView{m.r, m.in, m.out, a.scaling, d.A, d.B};
      if (e.training) {
        d.dA = m.dA.data();
        d.dB = m.dB.data();
        d.mA = m.mA.data();
        d.vA = m.vA.data();
        d.mB = m.mB.data();
        d.vB = m.vB.data();
      }
    }
}

void AdapterPool::place(Entry& e) {
  if (alias_host_) {
    point_at_host(e);
  } else {
    LoraAdapter& a = *e.host;
    e.storage = Buffer(be_, e.bytes);
    char* p = static_cast<char*>(e.storage.data());
    e.tensors.L = a.L;
    e.tensors.mods.assign(size_t(a.L), {});
    for (int l = 0; l < a.L; l++)
      for (int t = 0; t < NUM_TARGETS; t++) {
        if (!a.has(t)) continue;
        const LoraModule& m = a.mod(l, t);
        AdapterTensors::Module& d = e.tensors.mods[l][t];
        d.A = reinterpret_cast<float*>(p);
        p += a_size(m) * sizeof(float);
        d.B = reinterpret_cast<float*>(p);
        p += b_size(m) * sizeof(float);
        be_.upload(d.A, m.A.data(), a_size(m) * sizeof(float));
        be_.upload(d.B, m.B.data(), b_size(m) * sizeof(float));
        d.view = LoraModuleView{m.r, m.in, m.out, a.scaling, d.A, d.B};
      }
    used_ += e.bytes;
  }
  e.placed = true;
}

void AdapterPool::maintain() {
  std::vector<Buffer> dead;
  bool rebuild = false;
  {
    std::lock_guard<std::mutex> lock(mu_);
    dead.swap(graveyard_);
    rebuild = table_dirty_;
    table_dirty_ = false;
  }
  dead.clear();  // frees device memory of released adapters, here on the executor thread
  if (!rebuild) return;
  // Handles are taken under the lock but used (and dropped) outside it: dropping the last one of an
  // adapter runs ~Entry, which takes the lock.
  std::vector<Handle> held(static_cast<size_t>(slots_));
  {
    std::lock_guard<std::mutex> lock(mu_);
    for (int s = 0; s < slots_; s++) held[size_t(s)] = by_slot_[size_t(s)].lock();
  }
  std::vector<LoraModuleView> table(size_t(cfg_.L) * NUM_TARGETS * size_t(slots_));
  for (int s = 0; s < slots_; s++) {
    const Handle& e = held[size_t(s)];
    if (!e || !e->placed) continue;
    for (int l = 0; l < cfg_.L; l++)
      for (int t = 0; t < NUM_TARGETS; t++)
        table[(size_t(l) * NUM_TARGETS + t) * slots_ + s] = e->tensors.mods[l][t].view;
  }
  be_.upload(table_.data(), table.data(), table.size() * sizeof(LoraModuleView));
}

// ---------------------------------------------------------------------------------- training

void AdapterPool::begin_training(Entry& e) {
  require(e.placed, "INTERNAL", "adapter not placed before training");
  e.host->enable_training();
  e.training = true;
  if (alias_host_) {
    point_at_host(e);
    return;
  }
  // Gradients and the two moments of A and B: 3 x the adapter's bytes, zeroed.
  e.training_storage = Buffer(be_, 3 * e.bytes);
  be_.fill_zero(e.training_storage.data(), 3 * e.bytes);
  float* p = static_cast<float*>(e.training_storage.data());
  for (int l = 0; l < e.tensors.L; l++)
    for (int t = 0; t < NUM_TARGETS; t++) {
      AdapterTensors::Module& d = e.tensors.mods[l][t];
      if (!d.A) continue;
      const int64_t na = int64_t(d.view.r) * d.view.in, nb = int64_t(d.view.out) * d.view.r;
      d.dA = p, p += na;
      d.dB = p, p += nb;
      d.mA = p, p += na;
      d.vA = p, p += na;
      d.mB = p, p += nb;
      d.vB = p, p += nb;
    }
}

void AdapterPool::end_training(Entry& e) {
  e.training = false;
  for (auto& layer : e.tensors.mods)
    for (auto& d : layer) d.dA = d.dB = d.mA = d.vA = d.mB = d.vB = nullptr;
  if (!alias_host_) e.training_storage = Buffer();
}

void AdapterPool::drop_training_state(Entry& e) {
  if (e.training || !e.host) return;
  for (auto& layer : e.host->mods)
    for (auto& m : layer)
      for (auto* v : {&m.dA, &m.dB, &m.mA, &m.vA, &m.mB, &m.vB}) std::vector<float>().swap(*v);
}

void AdapterPool::sync_to_host(Entry& e) {
  if (alias_host_ || !e.placed) return;  // an adapter out of its slot: the host copy is the whole truth
  LoraAdapter& a = *e.host;
  for (int l = 0; l < a.L; l++)
    for (int t = 0; t < NUM_TARGETS; t++) {
      if (!a.has(t)) continue;
      LoraModule& m = a.mod(l, t);
      const AdapterTensors::Module& d = e.tensors.mods[l][t];
      be_.download(m.A.data(), d.A, m.A.size() * sizeof(float));
      be_.download(m.B.data(), d.B, m.B.size() * sizeof(float));
      if (e.training && !m.dA.empty()) {
        be_.download(m.dA.data(), d.dA, m.dA.size() * sizeof(float));
        be_.download(m.dB.data(), d.dB, m.dB.size() * sizeof(float));
      }
    }
}

}  // namespace ts
