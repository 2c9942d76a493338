// Adapters resident in the backend's memory. A fixed number of slots, each holding one adapter's A/B
// (float32); the slot table (L, NUM_TARGETS, slots) of LoraModuleView in backend memory lets a step
// apply a different adapter to every row from one small per-row mapping (what a captured decode graph
// replays). Adding takes a slot and budget at once, under the pool's lock, so a full pool is refused
// immediately (ADAPTER_POOL_FULL); the upload itself, and everything else that touches backend memory,
// happens in maintain() on the executor thread. Requests hold a Handle: an adapter removed while a
// request still decodes with it keeps its slot until that request ends.
//
// On the CPU backend the tensors alias the host LoraAdapter (nothing is copied, training updates the
// host adapter in place); on CUDA they are device copies, synced back to the host by sync_to_host().
#pragma once
#include <map>
#include <memory>
#include <mutex>
#include <vector>

#include "core/backend.h"
#include "model/config.h"
#include "model/lora.h"

namespace ts {

class AdapterPool {
 public:
  struct Entry {
    int id = 0, slot = -1;
    std::shared_ptr<LoraAdapter> host;
    AdapterTensors tensors;      // valid once placed
    bool placed = false;
    bool training = false;       // tensors carry gradients and moments
    size_t bytes = 0;            // A and B, float32
    Buffer storage;              // device copy of A and B (empty when aliased)
    Buffer training_storage;     // device gradients and moments (empty when aliased)
    AdapterPool* pool = nullptr;
    ~Entry();
  };
  using Handle = std::shared_ptr<Entry>;

  // slots > 0; budget_bytes = 0: no byte limit (the CPU backend, which copies nothing).
  AdapterPool(Backend& backend, const LlamaConfig& cfg, int slots, size_t budget_bytes);
  ~AdapterPool();

  int add(std::shared_ptr<LoraAdapter> host);  // returns the adapter's id (> 0)
  void remove(int id);
  Handle get(int id) const;                    // throws NOT_FOUND
  int count() const;
  int slots() const { return slots_; }
  size_t budget_bytes() const { return budget_; }
  size_t used_bytes() const;
  size_t table_bytes() const { return table_.bytes(); }

  // Executor thread: uploads new adapters, frees released ones, refreshes the slot table.
  void maintain();
  const LoraModuleView* slot_table() const { return static_cast<const LoraModuleView*>(table_.data()); }

  // Executor thread. Gives a placed adapter zeroed gradients and AdamW moments (and, on the CPU,
  // re-points its views at the host vectors); ends that state, keeping A and B.
  void begin_training(Entry& e);
  void end_training(Entry& e);
  // Executor thread: copies A and B (and gradients, when training) back into the host adapter.
  void sync_to_host(Entry& e);

 private:
  void place(Entry& e);
  void point_at_host(Entry& e);
  void release_slot(Entry& e);  // from ~Entry, any thread

  Backend& be_;
  LlamaConfig cfg_;
  int slots_;
  size_t budget_;
  bool alias_host_;
  Buffer table_;
  mutable std::mutex mu_;
  std::map<int, Handle> entries_;
  std::vector<int> free_slots_;
  std::vector<std::weak_ptr<Entry>> by_slot_;   // (slots) what each slot holds
  std::vector<Buffer> graveyard_;               // released device memory, freed by maintain()
  size_t used_ = 0;
  int next_id_ = 1;
  bool table_dirty_ = true;
};

}  // namespace ts
