// One fork/join per optimizer step over a flat list of work items drawn from every tensor.
#pragma once

#include <cstdint>

namespace fusedopt {
namespace cpu {

// The most threads set_num_threads accepts. A step is a memory-bound pass that a few threads per
// memory channel saturate, so past the core count more threads only add wake-ups and stacks (each
// worker reserves one, 8 MiB of address space by default: 4096 would reserve 32 GiB). A fixed
// number rather than a multiple of the core count, so a setting valid on one machine is valid on
// every machine; it is above the hardware threads of all but the largest servers, and there the
// default is capped to it.
constexpr int kMaxThreads = 1024;

int num_threads();
// 1 <= n <= kMaxThreads, else throws Error(ErrorKind::value) naming n and the limit; takes
// effect at the next step.
void set_num_threads(int n);

// Calls task(context, i) once for every i in [0, count), spread over the pool and the calling
// thread, and returns when all have finished. Workers sleep on a condition variable and the
// caller takes items itself, so a busy core delays a step by one item, not by a spin-wait.
void parallel_for(int64_t count, void (*task)(void* context, int64_t index), void* context);

// For tests: runs a parallel_for of count items of about 1 ms each and returns how many distinct
// threads ran them (1 when no worker took part), to show that the pool works, e.g. in a child
// after fork.
int threads_used_by_parallel_for(int64_t count);

}  // namespace cpu
}  // namespace fusedopt
