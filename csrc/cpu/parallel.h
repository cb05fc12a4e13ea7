// One fork/join per optimizer step over a flat list of work items drawn from every tensor.
#pragma once

#include <cstdint>

namespace fusedopt {
namespace cpu {

int num_threads();
// n >= 1; takes effect at the next step.
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
