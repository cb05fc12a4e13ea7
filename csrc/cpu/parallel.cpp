#include "cpu/parallel.h"

#include <pthread.h>
#include <sched.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <condition_variable>
#include <cstdlib>
#include <fstream>
#include <mutex>
#include <sstream>
#include <string>
#include <system_error>
#include <thread>
#include <vector>

#include "core/error.h"

namespace fusedopt {
namespace cpu {
namespace {

// The first line of a small file, or "" when it cannot be read.
std::string first_line(const std::string& path) {
  std::ifstream file(path);
  std::string line;
  std::getline(file, line);
  return line;
}

// Calls visit(group) for a cgroup path ("/a/b") and every group above it ("/a", "").
template <class Visit>
void for_group_and_parents(std::string group, Visit&& visit) {
  if (group == "/") group.clear();
  for (;;) {
    visit(group);
    if (group.empty()) return;
    const size_t slash = group.rfind('/');
    group.erase(slash == std::string::npos ? 0 : slash);
  }
}

}  // namespace

// The smallest quota of the process's group and the groups above it, cgroup v2 (`cpu.max`: "max
// 100000" or "150000 100000") or v1 (`cpu.cfs_quota_us`, -1 for none, over `cpu.cfs_period_us`);
// 0 where no file can be read, as on a system without cgroups. The groups above reach the
// hierarchy's root, which is a container's own group where the container sees its hierarchy
// mounted at the root.
int cgroup_cpu_limit(const std::string& self_cgroup, const std::string& root) {
  int limit = 0;
  const auto consider = [&limit](int64_t quota, int64_t period) {
    if (quota <= 0 || period <= 0) return;
    const int cpus =
        static_cast<int>(std::min<int64_t>((quota + period - 1) / period, kMaxThreads));
    limit = limit == 0 ? cpus : std::min(limit, cpus);
  };
  std::ifstream groups(self_cgroup);
  for (std::string line; std::getline(groups, line);) {
    // "hierarchy:controllers:path": "0::/path" for v2, "4:cpu,cpuacct:/path" for v1.
    const size_t first = line.find(':'), second = line.find(':', first + 1);
    if (first == std::string::npos || second == std::string::npos) continue;
    const std::string controllers = line.substr(first + 1, second - first - 1);
    const std::string group = line.substr(second + 1);
    if (controllers.empty()) {
      for_group_and_parents(group, [&](const std::string& g) {
        std::istringstream max(first_line(root + g + "/cpu.max"));
        std::string quota;
        int64_t period = 0;
        if (max >> quota >> period && quota != "max") consider(std::atoll(quota.c_str()), period);
      });
    } else if (("," + controllers + ",").find(",cpu,") != std::string::npos) {
      for (const std::string& mount : {root + "/cpu", root + "/" + controllers}) {
        for_group_and_parents(group, [&](const std::string& g) {
          const std::string quota = first_line(mount + g + "/cpu.cfs_quota_us");
          const std::string period = first_line(mount + g + "/cpu.cfs_period_us");
          if (!quota.empty() && !period.empty())
            consider(std::atoll(quota.c_str()), std::atoll(period.c_str()));
        });
      }
    }
  }
  return limit;
}

namespace {

// The CPUs this process may use: those its affinity mask allows (taskset, a cpuset, a container's
// CPUs) and no more than its cgroups' CPU quota, rather than every CPU of the host, so that a
// container granted two CPUs of a 64-core host steps with two threads, not 64 that take turns in
// its quota.
int available_cpus() {
  unsigned count = std::thread::hardware_concurrency();
#if defined(__linux__)
  cpu_set_t allowed;
  if (sched_getaffinity(0, sizeof(allowed), &allowed) == 0) count = CPU_COUNT(&allowed);
  if (const int limit = cgroup_cpu_limit("/proc/self/cgroup", "/sys/fs/cgroup"); limit > 0)
    count = std::min(count, static_cast<unsigned>(limit));
#endif
  return count == 0 ? 1 : static_cast<int>(std::min<unsigned>(count, kMaxThreads));
}

// FUSEDOPT_NUM_THREADS when it is an integer in [1, kMaxThreads], else the CPUs available to the
// process (capped at kMaxThreads). An invalid value ("abc", "4x", "0", "100000") is ignored rather
// than refused: this runs when the library loads, where nothing can report an error, and a tuning
// variable should not stop a program.
int default_num_threads() {
  if (const char* env = std::getenv("FUSEDOPT_NUM_THREADS"); env && *env) {
    char* end = nullptr;
    errno = 0;
    const long n = std::strtol(env, &end, 10);
    if (errno == 0 && *end == '\0' && n >= 1 && n <= kMaxThreads) return static_cast<int>(n);
  }
  return available_cpus();
}

// Steps in progress that keep the workers awake (StayAwake), and how many such requests were
// made, so that a worker answers each one once.
std::atomic<int> awake_steps{0};
std::atomic<uint64_t> awake_requests{0};
// This thread's StayAwake guards, for a child forked by this thread (from Python code that a
// step ran, e.g. a finalizer), where they are the only ones.
thread_local int awake_steps_of_this_thread = 0;
// The longest a worker spins for the next job of a step before it sleeps again.
constexpr auto kLongestSpin = std::chrono::milliseconds(1);

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
      generation_.fetch_add(1, std::memory_order_release);
    }
    wake_.notify_all();
    drain();
    // Closing the job before waiting means a worker that wakes late finds nothing to join, so the
    // caller waits only for workers already inside an item.
    std::unique_lock<std::mutex> lock(mutex_);
    open_ = false;
    done_.wait(lock, [this] { return active_ == 0; });
  }

  // Wakes sleeping workers to wait for a step's jobs awake.
  void wake() {
    { std::lock_guard<std::mutex> lock(mutex_); }  // a worker between its check and its sleep
    wake_.notify_all();
  }

 private:
  void drain() {
    for (int64_t i = next_.fetch_add(1, std::memory_order_relaxed); i < count_;
         i = next_.fetch_add(1, std::memory_order_relaxed))
      task_(context_, i);
  }

  // While a step keeps the workers awake, waits for its next job (a generation after `seen`)
  // spinning, yielding the core to any other thread that wants it, for at most kLongestSpin.
  void spin_for_job(uint64_t seen) const {
    const auto start = std::chrono::steady_clock::now();
    while (awake_steps.load(std::memory_order_relaxed) > 0 &&
           generation_.load(std::memory_order_acquire) == seen &&
           std::chrono::steady_clock::now() - start < kLongestSpin)
      std::this_thread::yield();
  }

  void worker_loop() {
    uint64_t seen = 0;
    uint64_t answered = awake_requests.load();
    std::unique_lock<std::mutex> lock(mutex_);
    for (;;) {
      wake_.wait(lock, [&] {
        return stopping_ || (open_ && generation_.load() != seen) ||
               awake_requests.load() != answered;
      });
      if (stopping_) return;
      if (!open_ || generation_.load() == seen) {  // woken to wait for a step's job awake
        answered = awake_requests.load();
        seen = generation_.load();  // a job that closed before this worker woke: wait for the next
        lock.unlock();
        spin_for_job(seen);
        lock.lock();
        continue;
      }
      seen = generation_.load();
      ++active_;
      lock.unlock();
      drain();
      lock.lock();
      if (--active_ == 0) done_.notify_one();
      lock.unlock();
      spin_for_job(seen);  // the step's next job, if it has one, comes within microseconds
      lock.lock();
    }
  }

  const int requested_workers_;
  std::vector<std::thread> workers_;
  std::mutex mutex_;
  std::condition_variable wake_;
  std::condition_variable done_;
  bool stopping_ = false;
  bool open_ = false;
  std::atomic<uint64_t> generation_{0};  // changed under mutex_, read by spinning workers
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

// The threads in a step (StepInProgress), each counted once however deeply its steps nest, and
// the forks being prepared (a count: two threads may fork at once, and the first one done must
// not let steps start under the second). A step counts itself in and then looks for a fork; a
// fork counts itself in and then counts the steps: with both sequentially consistent, either the
// step sees the fork (and steps aside until it is done) or the fork sees the step (and waits).
std::atomic<int> threads_in_step{0};
std::atomic<int> forks_pending{0};
thread_local int steps_of_this_thread = 0;
// Guards the waits on both sides; held by the forking thread from its prepare handler until
// after fork() returns, so that the child's copy is held by no thread but its own.
std::mutex fork_mutex;
// Signalled when a step ends while a fork waits, and when the fork is done. A pointer: the child
// replaces it, its copy of the parent's possibly listing waiters that do not exist there (leaked,
// as the pool is).
std::condition_variable* fork_signal = new std::condition_variable;

// Whether the forking thread may go on: no thread but itself is in a step.
bool only_this_thread_in_step() {
  return threads_in_step.load() == (steps_of_this_thread > 0 ? 1 : 0);
}

void leave_step() {
  threads_in_step.fetch_sub(1);
  if (forks_pending.load() > 0) {
    std::lock_guard<std::mutex> lock(fork_mutex);
    fork_signal->notify_all();
  }
}

// fork() copies only the thread that calls it, and the memory as it is at that instant.
// prepare first waits for every step in progress on another thread to end, new ones waiting
// meanwhile (README: "the fork waits for that step to finish"): without this a child forked while
// a step ran on the calling thread (one thread, a small step, or the pool busy with another
// thread's step) inherited params and states half-updated. Steps do not wait on anything the
// forking thread may hold: they hold StepInProgress with the GIL released, and the workers need
// only the pool's own mutex. prepare then takes pool_mutex: without it a child forked while
// another thread of the parent was inside parallel_for inherited pool_mutex locked, with no
// thread left to unlock it, and ran every step of its life on one thread (try_to_lock always
// failed). The parent then releases both and lets the waiting steps go; the child releases them
// too (the forking thread, the child's only thread, holds them), counts only its own step, if
// any, and drops the parent's pool, whose workers do not exist there: the object is leaked, since
// destroying it would join threads that are not there and its own mutex may have been held by
// one of them. The child's next large step starts a fresh pool.
void prepare_fork() {
  std::unique_lock<std::mutex> lock(fork_mutex);
  forks_pending.fetch_add(1);
  fork_signal->wait(lock, only_this_thread_in_step);
  lock.release();  // held across fork(), released by the handlers below
  pool_mutex.lock();
}
void resume_in_parent() {
  pool_mutex.unlock();
  forks_pending.fetch_sub(1);
  fork_signal->notify_all();
  fork_mutex.unlock();
}
void reset_in_child() {
  pool = nullptr;
  pool_pid = getpid();
  // Steps of other threads may have held a StayAwake across the fork: in the child only the
  // forking thread's own guards remain, and their destructors will lower the count.
  awake_steps.store(awake_steps_of_this_thread);
  pool_mutex.unlock();
  threads_in_step.store(steps_of_this_thread > 0 ? 1 : 0);
  forks_pending.store(0);  // another thread's fork in the parent has no thread here
  fork_signal = new std::condition_variable;
  fork_mutex.unlock();
}
[[maybe_unused]] const int fork_handlers_registered =
    pthread_atfork(prepare_fork, resume_in_parent, reset_in_child);

}  // namespace

int num_threads() { return requested_threads.load(); }

void set_num_threads(int n) {
  if (n < 1 || n > kMaxThreads)
    throw Error(ErrorKind::value, "n must be between 1 and " + std::to_string(kMaxThreads) +
                                      " (the thread limit), got " + std::to_string(n));
  requested_threads.store(n);
}

void parallel_for(int64_t count, void (*task)(void*, int64_t), void* context) {
  const int threads = requested_threads.load();
  std::unique_lock<std::mutex> lock(pool_mutex, std::try_to_lock);
  // One thread asked for, one item, or another Python thread's step holding the pool: run here.
  if (threads <= 1 || count <= 1 || !lock.owns_lock()) {
    for (int64_t i = 0; i < count; ++i) task(context, i);
    return;
  }
  if (pool_pid != getpid()) {
    // Only a child made without the fork handlers (a raw clone) gets here; the parent's pool, if
    // any, has no threads in this process: leak it.
    pool = nullptr;
    pool_pid = getpid();
  }
  if (!pool || pool->requested_workers() != threads - 1) {
    delete pool;
    pool = new ThreadPool(threads - 1);
  }
  pool->run(count, task, context);
}

StayAwake::StayAwake(bool parallel) : engaged_(parallel && requested_threads.load() > 1) {
  if (!engaged_) return;
  awake_steps.fetch_add(1);
  ++awake_steps_of_this_thread;
  awake_requests.fetch_add(1);
  std::unique_lock<std::mutex> lock(pool_mutex, std::try_to_lock);
  if (lock.owns_lock() && pool && pool_pid == getpid()) pool->wake();
}

StayAwake::~StayAwake() {
  if (!engaged_) return;
  awake_steps.fetch_sub(1);
  --awake_steps_of_this_thread;
}

StepInProgress::StepInProgress() {
  // Nested (a plan's step inside the C ABI's, run_step inside a plan's): the outer one counts
  // this thread, and a fork may be waiting for it.
  if (steps_of_this_thread > 0) {
    ++steps_of_this_thread;
    return;
  }
  for (;;) {
    threads_in_step.fetch_add(1);
    if (forks_pending.load() == 0) break;
    // A fork is being prepared: step aside until it is done.
    leave_step();
    std::unique_lock<std::mutex> lock(fork_mutex);
    fork_signal->wait(lock, [] { return forks_pending.load() == 0; });
  }
  ++steps_of_this_thread;
}

StepInProgress::~StepInProgress() {
  if (--steps_of_this_thread == 0) leave_step();
}

int threads_used_by_parallel_for(int64_t count) {
  std::vector<std::thread::id> ran_on(count > 0 ? count : 0);
  parallel_for(
      count,
      [](void* context, int64_t i) {
        // Long enough that the workers wake and take items before the caller has run them all.
        std::this_thread::sleep_for(std::chrono::milliseconds(1));
        (*static_cast<std::vector<std::thread::id>*>(context))[i] = std::this_thread::get_id();
      },
      &ran_on);
  std::sort(ran_on.begin(), ran_on.end());
  return static_cast<int>(std::unique(ran_on.begin(), ran_on.end()) - ran_on.begin());
}

}  // namespace cpu
}  // namespace fusedopt
