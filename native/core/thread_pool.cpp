// The process-wide thread pool behind parallel_for: persistent workers that spin briefly, then sleep,
// waiting for the next job; the calling thread works too and takes any chunk a worker is slow to claim.
//
// Protocol (one job at a time; callers from different threads queue on `call_mutex`):
//   job_generation  even = a published job id, odd = the caller is rewriting the job fields.
//   A worker that sees a new even generation registers in `active`, re-checks the generation (the job
//   may already have been replaced), then claims chunk indices with fetch_add on `next_chunk` until they
//   run out. The caller waits for `remaining` (chunks not yet finished) to reach 0 before returning, and
//   before rewriting the fields of the next job it marks the generation odd and waits for `active` == 0,
//   so no late worker can read fields that are being written.
#include "core/thread_pool.h"

#include <sched.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <fstream>
#include <mutex>
#include <thread>
#include <vector>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
static inline void cpu_relax() { _mm_pause(); }
#elif defined(__aarch64__)
static inline void cpu_relax() { asm volatile("yield"); }
#else
static inline void cpu_relax() {}
#endif

namespace ts {
namespace {

// How long an idle worker spins before it sleeps. Decoding issues hundreds of parallel_for calls per
// token with short serial gaps between them; a worker that is still spinning picks the next one up in
// well under a microsecond, while waking a sleeping one costs a futex round trip (~5-20 us).
constexpr auto SPIN_TIME = std::chrono::microseconds(200);

// Cores this process may use: the affinity mask, further capped by a cgroup CPU quota (a Kubernetes
// CPU limit, rounded up), never more than hardware_concurrency.
int detect_cores() {
  int n = (int)std::thread::hardware_concurrency();
  cpu_set_t set;
  CPU_ZERO(&set);
  if (sched_getaffinity(0, sizeof(set), &set) == 0) {
    int affinity = CPU_COUNT(&set);
    if (affinity > 0 && (n <= 0 || affinity < n)) n = affinity;
  }
  long long quota = -1, period = 0;
  std::ifstream cpu_max("/sys/fs/cgroup/cpu.max");  // cgroup v2: "max 100000" or "<quota> <period>"
  std::string quota_text;
  if (cpu_max >> quota_text >> period) {
    if (quota_text != "max") quota = std::atoll(quota_text.c_str());
  } else {  // cgroup v1: -1 means no limit
    std::ifstream q("/sys/fs/cgroup/cpu/cpu.cfs_quota_us"), p("/sys/fs/cgroup/cpu/cpu.cfs_period_us");
    if (!(q >> quota && p >> period)) quota = -1;
  }
  if (quota > 0 && period > 0) {
    int limit = (int)((quota + period - 1) / period);
    if (limit >= 1 && limit < n) n = limit;
  }
  return std::max(n, 1);
}

int default_threads() {
  if (const char* env = std::getenv("TUNESERVE_THREADS")) {
    int n = std::atoi(env);
    if (n > 0) return n;
  }
  return detect_cores();
}

thread_local bool tl_in_parallel = false;  // true on workers, and on a caller while it runs chunks

struct Pool {
  std::mutex call_mutex;  // one job at a time; also guards resizing
  std::vector<std::thread> workers;
  int threads = 1;  // workers + the caller

  std::atomic<uint64_t> job_generation{0};
  std::atomic<int> active{0};
  std::atomic<bool> stop{false};

  // The current job (written only while job_generation is odd and active == 0).
  const std::function<void(int64_t, int64_t)>* fn = nullptr;
  int64_t n = 0, chunks = 0;
  std::atomic<int64_t> next_chunk{0};
  std::atomic<int64_t> remaining{0};
  std::atomic<bool> failed{false};
  std::mutex error_mutex;
  std::exception_ptr error;

  // Sleeping workers.
  std::atomic<int> sleepers{0};
  std::mutex sleep_mutex;
  std::condition_variable wake;

  Pool() { start(default_threads()); }
  ~Pool() { stop_workers(); }

  void start(int count) {
    threads = std::max(count, 1);
    stop.store(false);
    for (int i = 1; i < threads; i++) workers.emplace_back([this] { worker_loop(); });
  }

  void stop_workers() {
    stop.store(true);
    {
      std::lock_guard<std::mutex> lock(sleep_mutex);
      wake.notify_all();
    }
    for (auto& t : workers) t.join();
    workers.clear();
  }

  // Chunk c covers [n*c/chunks, n*(c+1)/chunks): contiguous, sizes differ by at most one.
  void run_chunks() {
    for (;;) {
      int64_t c = next_chunk.fetch_add(1, std::memory_order_relaxed);
      if (c >= chunks) return;
      if (!failed.load(std::memory_order_relaxed)) {
        int64_t begin = n * c / chunks, end = n * (c + 1) / chunks;
        try {
          (*fn)(begin, end);
        } catch (...) {
          std::lock_guard<std::mutex> lock(error_mutex);
          if (!error) error = std::current_exception();
          failed.store(true, std::memory_order_relaxed);
        }
      }
      remaining.fetch_sub(1, std::memory_order_acq_rel);
    }
  }

  // Returns the next published (even) generation different from `seen`, or `seen` when stopping.
  uint64_t wait_for_job(uint64_t seen) {
    auto spin_start = std::chrono::steady_clock::now();
    for (int i = 0;; i++) {
      uint64_t g = job_generation.load(std::memory_order_acquire);
      if (g != seen && (g & 1) == 0) return g;
      if (stop.load(std::memory_order_relaxed)) return seen;
      cpu_relax();
      if ((i & 255) == 255 && std::chrono::steady_clock::now() - spin_start > SPIN_TIME) break;
    }
    std::unique_lock<std::mutex> lock(sleep_mutex);
    sleepers.fetch_add(1);  // seq_cst: pairs with the caller's generation store then sleepers load
    for (;;) {
      uint64_t g = job_generation.load();
      if ((g != seen && (g & 1) == 0) || stop.load()) break;
      wake.wait(lock);
    }
    sleepers.fetch_sub(1);
    uint64_t g = job_generation.load(std::memory_order_acquire);
    return stop.load() ? seen : g;
  }

  void worker_loop() {
    tl_in_parallel = true;  // a chunk that calls parallel_for runs the inner loop serially
    uint64_t seen = job_generation.load();
    for (;;) {
      uint64_t g = wait_for_job(seen);
      if (stop.load()) return;
      seen = g;
      active.fetch_add(1);  // seq_cst: a caller that then marks the generation odd will wait for us
      if (job_generation.load() == g) run_chunks();
      active.fetch_sub(1, std::memory_order_release);
    }
  }

  void run(int64_t total, int64_t chunk_count, const std::function<void(int64_t, int64_t)>& body) {
    std::lock_guard<std::mutex> call_lock(call_mutex);
    uint64_t g = job_generation.load(std::memory_order_relaxed);
    job_generation.store(g + 1);  // odd: fields being rewritten
    while (active.load(std::memory_order_acquire) != 0) cpu_relax();
    fn = &body;
    n = total;
    chunks = chunk_count;
    next_chunk.store(0, std::memory_order_relaxed);
    remaining.store(chunk_count, std::memory_order_relaxed);
    failed.store(false, std::memory_order_relaxed);
    error = nullptr;
    job_generation.store(g + 2);  // seq_cst publish
    if (sleepers.load() > 0) {
      std::lock_guard<std::mutex> lock(sleep_mutex);
      wake.notify_all();
    }
    tl_in_parallel = true;
    run_chunks();
    tl_in_parallel = false;
    // Chunks claimed by workers may still be running: wait, yielding if they take long (another
    // process may hold the core a worker needs).
    for (int i = 0; remaining.load(std::memory_order_acquire) != 0; i++) {
      if (i < 4096) cpu_relax();
      else std::this_thread::yield();
    }
    if (error) {
      std::exception_ptr e = error;
      error = nullptr;
      std::rethrow_exception(e);
    }
  }

  void resize(int count) {
    std::lock_guard<std::mutex> call_lock(call_mutex);
    if (count == threads) return;
    stop_workers();
    start(count);
  }
};

Pool& pool() {
  static Pool* p = new Pool();  // never destroyed: workers must not be joined during static teardown
  return *p;
}

}  // namespace

int num_threads() { return pool().threads; }

void set_num_threads(int n) { pool().resize(n > 0 ? n : default_threads()); }

void parallel_for(int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)>& fn) {
  if (n <= 0) return;
  grain = std::max<int64_t>(grain, 1);
  if (tl_in_parallel) {  // nested: run inline
    fn(0, n);
    return;
  }
  Pool& p = pool();
  int64_t chunks = std::min<int64_t>(p.threads, n / grain);
  if (chunks <= 1) {
    tl_in_parallel = true;  // keep the nesting rule the same as on the pool
    try {
      fn(0, n);
    } catch (...) {
      tl_in_parallel = false;
      throw;
    }
    tl_in_parallel = false;
    return;
  }
  p.run(n, chunks, fn);
}

}  // namespace ts
