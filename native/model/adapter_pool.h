// Adapters in three tiers: disk (a PEFT safetensors file, nothing in memory), host (the float32 A/B in
// host memory, a tier of configurable size) and device (one of a fixed number of slots in the
// backend's memory). The slot table (L, NUM_TARGETS, slots) of LoraModuleView in backend memory lets a
// step apply a different adapter to every row from one small per-row mapping (what a captured decode
// graph replays).
//
// Movement between tiers:
//   disk -> host    a loader thread reads the file in the background (the executor keeps stepping);
//   host -> device  acquire() on the executor thread takes a free slot, or evicts the least recently
//                   used idle adapter, and places the adapter there (a copy on CUDA, an alias on the CPU);
//   device -> host  eviction: only adapters with no users (sequences, training jobs, probes), not
//                   pinned and not training; when a waiter finds no idle slot, settle() marks busy
//                   ones as draining (no new users) so that one frees up;
//   host -> disk    trim in settle(): least recently used idle host copies that have a file and that no
//                   waiter asked for, while the host tier is over its budget.
// Pinned adapters are never evicted from either tier. Every adapter keeps counters (requests, tokens,
// hits, loads and their time, evictions).
//
// On the CPU backend the device tensors alias the host LoraAdapter (nothing is copied, training updates
// the host adapter in place); on CUDA they are device copies, synced back by sync_to_host().
#pragma once
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
#include "model/config.h"
#include "model/lora.h"

namespace ts {

enum class AdapterTier : int { DISK = 0, HOST = 1, DEVICE = 2 };

// Counters of one adapter, kept for as long as the pool knows it.
struct AdapterStats {
  uint64_t requests = 0;                   // generation requests submitted with it
  uint64_t tokens_in = 0, tokens_out = 0;  // their prompt tokens, and tokens generated
  uint64_t hits = 0;                       // acquisitions that found it in a device slot
  uint64_t host_hits = 0;                  // acquisitions that placed it from the host tier (no file read)
  uint64_t loads = 0;                      // reads of its file into the host tier
  double load_seconds = 0, last_load_seconds = 0;
  uint64_t placements = 0;                 // host -> device copies (aliases on the CPU)
  double place_seconds = 0, last_place_seconds = 0;
  uint64_t evictions = 0;                  // its device slot given to another adapter
  uint64_t host_evictions = 0;             // its host copy dropped (host tier over budget)
  uint64_t load_failures = 0;
};

class AdapterPool {
 public:
  struct Entry {
    int id = 0;
    LoraSpec spec;
    std::string file;                  // where the host copy can be read again; "" = only in memory
    std::shared_ptr<LoraAdapter> host; // null in the disk tier
    int slot = -1;
    AdapterTensors tensors;            // valid while placed
    bool placed = false;
    bool training = false;             // tensors carry gradients and moments
    size_t bytes = 0;                  // A and B, float32
    Buffer storage;                    // device copy of A and B (empty when aliased)
    Buffer training_storage;           // device gradients and moments (empty when aliased)
    // Under the pool's lock:
    bool loading = false;
    std::string failure_code, failure;  // a failed load; sticky, as the file of a version never changes
    int users = 0;                      // sequences, jobs and probes holding its slot (executor thread)
    bool pinned = false, draining = false;
    bool wanted = false;                // a waiter asked for it this pass: the host tier keeps it
    bool fresh = false;                 // just read from its file: its next placement is no host hit
    uint64_t last_used = 0;
    AdapterStats stats;
    AdapterPool* pool = nullptr;
    ~Entry();
  };
  using Handle = std::shared_ptr<Entry>;

  enum class Acquire { READY, LOADING, WAIT, FAILED };

  struct Info {
    int id = 0;
    AdapterTier tier = AdapterTier::DISK;
    bool pinned = false, loading = false, training = false;
    int users = 0;
    size_t bytes = 0;
    std::string failure_code, failure;
    AdapterStats stats;
  };
  struct Totals {
    int slots = 0, resident = 0, pinned = 0, adapters = 0, loading = 0;
    size_t host_bytes = 0, host_budget = 0, device_bytes = 0, device_budget = 0;
    AdapterStats stats;  // summed over every adapter the pool has known (removed ones included)
  };

  // slots > 0; budget_bytes = 0: no device byte limit (the CPU backend, which copies nothing).
  AdapterPool(Backend& backend, const LlamaConfig& cfg, int slots, size_t budget_bytes);
  ~AdapterPool();

  // ---- any thread ----
  int add(std::shared_ptr<LoraAdapter> host, std::string file = "");  // host tier; returns the id (> 0)
  int add_file(const LoraSpec& spec, std::string file);               // disk tier: nothing is read yet
  void set_file(int id, std::string file);                            // the host copy is now reloadable
  void remove(int id);          // forgotten; holders keep it (and its slot) until they let go
  Handle get(int id) const;     // throws NOT_FOUND
  void pin(int id, bool pinned);  // FAILED_PRECONDITION when it would pin every slot
  void set_host_budget(size_t bytes);  // 0: no limit
  int count() const;
  int slots() const { return slots_; }
  size_t budget_bytes() const { return budget_; }
  size_t used_bytes() const;
  size_t table_bytes() const { return table_.bytes(); }
  std::vector<Info> snapshot() const;
  Totals totals() const;
  void count_request(Entry& e, int64_t prompt_tokens);
  void count_tokens_out(Entry& e, int64_t tokens);
  // Called (on the loader thread) when a load finished; the executor wakes up to use it.
  void set_on_change(std::function<void()> fn);
  void stop_loader();  // joins the loader thread (idempotent)

  // ---- executor thread ----
  // READY: placed in a device slot, with one more user (release() it). LOADING: its file is being
  // read. WAIT: no slot can be freed now (every one is busy, pinned or training). FAILED: its load
  // failed, or it can never fit; *code / *message say why.
  // `count`: a generation's acquisition, counted as a hit (found in a slot) or a host hit.
  Acquire acquire(const Handle& e, bool count, std::string* code, std::string* message);
  void release(Entry& e);
  // Starts an admission pass: the adapters waiters want are marked again by acquire().
  void begin_pass();
  // Reads the file of an adapter in the disk tier now (probes and tests that cannot wait).
  void load_now(const Handle& e);
  // End of a turn: `waiting` distinct adapters could not get a slot, so mark as many busy ones draining;
  // trim the host tier to its budget.
  void settle(int waiting);
  // Frees released device memory, refreshes the slot table.
  void maintain();
  const LoraModuleView* slot_table() const { return static_cast<const LoraModuleView*>(table_.data()); }

  // Gives a placed adapter zeroed gradients and AdamW moments (and, on the CPU, re-points its views at
  // the host vectors); ends that state, keeping A and B.
  void begin_training(Entry& e);
  void end_training(Entry& e);
  // Drops the host copy's gradients and moments (a trained adapter that now only serves).
  void drop_training_state(Entry& e);
  // Copies A and B (and gradients, when training) back into the host adapter.
  void sync_to_host(Entry& e);

 private:
  void place(Entry& e);
  void evict_locked(Entry& e);
  void point_at_host(Entry& e);
  void release_slot(Entry& e);  // from ~Entry, any thread
  std::vector<Handle> residents_locked() const;  // what the slots hold (drop outside the lock)
  // A read finished: `host` joins the host tier, counted as a load of `seconds`.
  void install_host_locked(Entry& e, std::shared_ptr<LoraAdapter> host, double seconds);
  Entry* lru_idle_locked(const std::vector<Handle>& residents) const;
  void loader();

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
  size_t used_ = 0;                             // device bytes of placed adapters (copies only)
  size_t host_bytes_ = 0, host_budget_ = 0;
  AdapterStats retired_;                        // counters of removed adapters
  int next_id_ = 1;
  uint64_t tick_ = 0;
  bool table_dirty_ = true;
  // The loader thread and its queue.
  std::deque<Handle> load_queue_;
  std::condition_variable load_cv_;
  bool stop_loading_ = false;
  std::function<void()> on_change_;
  std::thread loader_;
};

}  // namespace ts
