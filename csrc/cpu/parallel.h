// The thread pool: a step's kernels in one fork/join over a flat list of work items drawn from
// every tensor, and, over many tensors, its per-tensor checks before them (all_slices).
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <string>

namespace fusedopt {
namespace cpu {

// The most threads set_num_threads accepts. A step is a memory-bound pass that a few threads per
// memory channel saturate, so past the core count more threads only add wake-ups and stacks (each
// worker reserves one, 8 MiB of address space by default: 4096 would reserve 32 GiB). A fixed
// number rather than a multiple of the core count, so a setting valid on one machine is valid on
// every machine; it is above the hardware threads of all but the largest servers, and there the
// default is capped to it.
constexpr int kMaxThreads = 1024;

// The CPU time the cgroups listed in `self_cgroup` (a file as /proc/self/cgroup) may use, under the
// cgroup file systems mounted at `root` (as /sys/fs/cgroup), in CPUs rounded up; 0 for no limit.
// The default thread count is at most this, for the process's own; tests give it a tree of their
// own.
int cgroup_cpu_limit(const std::string& self_cgroup, const std::string& root);

int num_threads();
// 1 <= n <= kMaxThreads, else throws Error(ErrorKind::value) naming n and the limit; takes
// effect at the next step.
void set_num_threads(int n);

// Calls task(context, i) once for every i in [0, count), spread over the pool and the calling
// thread, and returns when all have finished. Workers sleep on a condition variable (unless a
// StayAwake is held) and the caller takes items itself, so a busy core delays a step by one
// item, not by a spin-wait.
void parallel_for(int64_t count, void (*task)(void* context, int64_t index), void* context);

// Keeps the pool's workers awake for the jobs of one step, from construction to destruction:
// a sleeping worker takes about 100 us to wake on a virtual machine (measured on the AMD Zen 5
// KVM guest), a step over many tensors runs several short jobs (its checks, then its kernels),
// and the worker joined each one late. Waiting, a worker yields its core to any thread that
// wants it, spins at most 1 ms for a job, and sleeps again as soon as no step keeps it awake:
// never between steps. `parallel`: whether the step will use the pool at all.
class StayAwake {
 public:
  explicit StayAwake(bool parallel);
  ~StayAwake();
  StayAwake(const StayAwake&) = delete;
  StayAwake& operator=(const StayAwake&) = delete;

 private:
  bool engaged_;
};

// Holds off fork() while a step writes the caller's memory, from construction to destruction:
// pthread_atfork's prepare handler waits for every step in progress on another thread to end (and
// keeps new ones from starting until the fork is done), so a child never sees a param or state
// half-updated. Held for the whole of a step's writes (both passes of a two-pass algorithm, the
// step counts and scalars it advances), whether or not the step uses the pool. A nested one, and
// a fork by the thread that holds one, never wait. Taken only where the step waits for nothing a
// forking thread may hold: with the GIL released (the forking thread holds it, and would wait
// for a step that waits for it). A C ABI plan's lock is taken after it, so that no thread holds
// that lock across a fork (a Python plan's lock is the fork handler's: made anew in the child).
// Costs a step an atomic increment and a load on entry, a decrement and a load on exit (a nested
// one: a thread-local count).
class StepInProgress {
 public:
  StepInProgress();
  ~StepInProgress();
  StepInProgress(const StepInProgress&) = delete;
  StepInProgress& operator=(const StepInProgress&) = delete;
};

// Whether check(begin, end) holds for every slice of `slice` indices of [0, count): the checks a
// step makes per tensor before it writes anything (ten thousand tensors take a millisecond on
// one thread), on the pool's threads when count spans two slices or more. A slice stops at its
// first false; the others are skipped once one has failed. A slice that throws counts as false
// (an exception must not leave a pool thread): the caller runs its checks again on its own
// thread to raise the error.
template <class Check>
bool all_slices(size_t count, size_t slice, Check&& check) {
  auto holds = [&check](size_t begin, size_t end) {
    try {
      return static_cast<bool>(check(begin, end));
    } catch (...) {
      return false;
    }
  };
  if (count < 2 * slice || num_threads() < 2) return holds(size_t{0}, count);
  struct Context {
    decltype(holds)& check;
    size_t count, slice;
    std::atomic<bool> failed{false};
  } context{holds, count, slice};
  parallel_for(
      static_cast<int64_t>((count + slice - 1) / slice),
      [](void* opaque, int64_t index) {
        auto& c = *static_cast<Context*>(opaque);
        const size_t begin = static_cast<size_t>(index) * c.slice;
        if (!c.failed.load(std::memory_order_relaxed) &&
            !c.check(begin, begin + c.slice < c.count ? begin + c.slice : c.count))
          c.failed.store(true, std::memory_order_relaxed);
      },
      &context);
  return !context.failed.load();
}

// For tests: runs a parallel_for of count items of about 1 ms each and returns how many distinct
// threads ran them (1 when no worker took part), to show that the pool works, e.g. in a child
// after fork.
int threads_used_by_parallel_for(int64_t count);

}  // namespace cpu
}  // namespace fusedopt
