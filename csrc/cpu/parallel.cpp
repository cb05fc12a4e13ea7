#include "cpu/parallel.h"

#include <unistd.h>

#include <atomic>
#include <condition_variable>
#include <cstdlib>
#include <mutex>
#include <system_error>
#include <thread>
#include <vector>

namespace fusedopt {
namespace cpu {
namespace {

int default_num_threads() {
  if (const char* env = std::getenv("FUSEDOPT_NUM_THREADS"); env && *env) {
    const int n = std::atoi(env);
    if (n >= 1) return n;
  }
  const unsigned hardware = std::thread::hardware_concurrency();
  return hardware == 0 ? 1 : static_cast<int>(hardware);
}

class ThreadPool {
 public:
  // Starts as many of the requested workers as the system allows: where it refuses a thread
  // (a process limit, address space) the pool runs with those it has, and the caller's thread
  // always takes part, so a step never fails or waits for a thread that does not exist.
  explicit ThreadPool(int requested_workers) : requested_workers_(requested_workers) {
    try {
      for (int i = 0; i < requested_workers; ++i) workers_.emplace_back([this] { worker_loop(); });
    } catch (const std::exception&) {
    }
  }

  ~ThreadPool() {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      stopping_ = true;
    }
    wake_.notify_all();
    for (std::thread& worker : workers_) worker.join();
  }

  int requested_workers() const { return requested_workers_; }

  void run(int64_t count, void (*task)(void*, int64_t), void* context) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      count_ = count;
      task_ = task;
      context_ = context;
      next_.store(0, std::memory_order_relaxed);
      open_ = true;
      ++generation_;
    }
    wake_.notify_all();
    drain();
    // Closing the job before waiting means a worker that wakes late finds nothing to join, so the
    // caller waits only for workers already inside an item.
    std::unique_lock<std::mutex> lock(mutex_);
    open_ = false;
    done_.wait(lock, [this] { return active_ == 0; });
  }

 private:
  void drain() {
    for (int64_t i = next_.fetch_add(1, std::memory_order_relaxed); i < count_;
         i = next_.fetch_add(1, std::memory_order_relaxed))
      task_(context_, i);
  }

  void worker_loop() {
    uint64_t seen = 0;
    std::unique_lock<std::mutex> lock(mutex_);
    for (;;) {
      wake_.wait(lock, [&] { return stopping_ || (open_ && generation_ != seen); });
      if (stopping_) return;
      seen = generation_;
      ++active_;
      lock.unlock();
      drain();
      lock.lock();
      if (--active_ == 0) done_.notify_one();
    }
  }

  const int requested_workers_;
  std::vector<std::thread> workers_;
  std::mutex mutex_;
  std::condition_variable wake_;
  std::condition_variable done_;
  bool stopping_ = false;
  bool open_ = false;
  uint64_t generation_ = 0;
  int active_ = 0;
  int64_t count_ = 0;
  void (*task_)(void*, int64_t) = nullptr;
  void* context_ = nullptr;
  std::atomic<int64_t> next_{0};
};

std::mutex pool_mutex;       // guards the pool's creation, replacement and use
ThreadPool* pool = nullptr;  // owned; replaced by set_num_threads
pid_t pool_pid = 0;          // a forked child has none of its parent's threads
std::atomic<int> requested_threads{default_num_threads()};

}  // namespace

int num_threads() { return requested_threads.load(); }

void set_num_threads(int n) { requested_threads.store(n < 1 ? 1 : n); }

void parallel_for(int64_t count, void (*task)(void*, int64_t), void* context) {
  const int threads = requested_threads.load();
  std::unique_lock<std::mutex> lock(pool_mutex, std::try_to_lock);
  // One thread asked for, one item, or another Python thread's step holding the pool: run here.
  if (threads <= 1 || count <= 1 || !lock.owns_lock()) {
    for (int64_t i = 0; i < count; ++i) task(context, i);
    return;
  }
  if (pool_pid != getpid()) {
    pool = nullptr;  // the parent's pool, if any, has no threads in this process: leak it
    pool_pid = getpid();
  }
  if (!pool || pool->requested_workers() != threads - 1) {
    delete pool;
    pool = new ThreadPool(threads - 1);
  }
  pool->run(count, task, context);
}

}  // namespace cpu
}  // namespace fusedopt
