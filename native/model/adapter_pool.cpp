// AdapterPool (adapter_pool.h): slots, budget, placement in backend memory, the slot table.
#include "model/adapter_pool.h"

#include <algorithm>
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
}

AdapterPool::~AdapterPool() {
  // Entries still held elsewhere must not call back into a destroyed pool.
  std::lock_guard<std::mutex> lock(mu_);
  for (auto& [id, e] : entries_) e->pool = nullptr;
  for (auto& w : by_slot_)
    if (auto e = w.lock()) e->pool = nullptr;
}

int AdapterPool::add(std::shared_ptr<LoraAdapter> host) {
  require(host && host->L == cfg_.L, "ADAPTER_MISMATCH", "adapter does not fit this base model");
  const size_t bytes = adapter_bytes(*host);
  std::lock_guard<std::mutex> lock(mu_);
  require(!free_slots_.empty(), "ADAPTER_POOL_FULL",
          "all " + std::to_string(slots_) + " adapter slots of the engine are in use");
  if (budget_ > 0 && used_ + bytes > budget_)
    throw EngineError("RESOURCE_EXHAUSTED", "the adapter pool's memory (" + std::to_string(budget_) + " bytes, " +
                                                std::to_string(used_) + " in use) cannot hold another " +
                                                std::to_string(bytes) + " bytes");
  auto e = std::make_shared<Entry>();
  e->id = next_id_++;
  e->slot = free_slots_.back();
  free_slots_.pop_back();
  e->host = std::move(host);
  e->bytes = bytes;
  e->pool = this;
  used_ += bytes;
  by_slot_[size_t(e->slot)] = e;
  entries_[e->id] = e;
  table_dirty_ = true;
  return e->id;
}

void AdapterPool::remove(int id) {
  Handle e;  // dropped after the lock is released: ~Entry takes it again
  std::lock_guard<std::mutex> lock(mu_);
  auto it = entries_.find(id);
  if (it == entries_.end()) return;
  e = std::move(it->second);
  entries_.erase(it);
}

AdapterPool::Handle AdapterPool::get(int id) const {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = entries_.find(id);
  require(it != entries_.end(), "NOT_FOUND", "no adapter with id " + std::to_string(id));
  return it->second;
}

int AdapterPool::count() const {
  std::lock_guard<std::mutex> lock(mu_);
  return int(entries_.size());
}

size_t AdapterPool::used_bytes() const {
  std::lock_guard<std::mutex> lock(mu_);
  return used_;
}

void AdapterPool::release_slot(Entry& e) {
  std::lock_guard<std::mutex> lock(mu_);
  free_slots_.push_back(e.slot);
  used_ -= e.bytes;
  if (e.storage.bytes()) graveyard_.push_back(std::move(e.storage));
  if (e.training_storage.bytes()) graveyard_.push_back(std::move(e.training_storage));
  table_dirty_ = true;
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
  }
  e.placed = true;
}

void AdapterPool::maintain() {
  std::vector<Buffer> dead;
  std::vector<Handle> pending;
  bool rebuild = false;
  {
    std::lock_guard<std::mutex> lock(mu_);
    dead.swap(graveyard_);
    for (auto& [id, e] : entries_)
      if (!e->placed) pending.push_back(e);
    rebuild = table_dirty_ || !pending.empty();
    table_dirty_ = false;
  }
  dead.clear();  // frees device memory of released adapters, here on the executor thread
  for (Handle& e : pending) place(*e);
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

void AdapterPool::sync_to_host(Entry& e) {
  if (alias_host_ || !e.placed) return;
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
