// The CUDA kernels on the CPU: what csrc/cuda/kernels.cu and multi_tensor.cuh use of CUDA C++ and
// of the runtime, for the host compiler, so that the module fusedopt._cuda_emulated runs the very
// kernel source of the GPU build (its indexing, chunking, vector loads, reductions and launches)
// on host memory, and tests compare it bit for bit with the CPU backend on machines without a GPU
// (tests/test_cuda_emulated.py). Force-included (-include) before kernels.cu; never by the nvcc
// build.
//
// A launch runs its blocks one after another. A kernel declared without __syncthreads runs each
// block's threads one after another on the calling thread; one that synchronizes (launched with
// FUSEDOPT_LAUNCH_SYNCING) runs each block's threads as fibers that meet at every __syncthreads
// (BlockFibers), so shared memory is read only after the writes before the barrier, as on a GPU.
// Within a phase the threads' order is not the GPU's: a kernel whose result depends on it has a
// race on the GPU too. __syncthreads in a kernel launched as not synchronizing aborts. What it
// cannot show: races between blocks (they run in turn), a read of shared memory before any
// write (static arrays start zeroed and keep the last block's values), launch limits, timing.
#pragma once

#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <mutex>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline __attribute__((always_inline))
#define __launch_bounds__(threads)
#define __grid_constant__
// Shared memory is per block; blocks run one at a time, so one static array serves them all.
#define __shared__ static

struct float4 {
  float x, y, z, w;
} __attribute__((aligned(16)));
struct double2 {
  double x, y;
} __attribute__((aligned(16)));

namespace fusedopt {
namespace cuda {
namespace emulation {

struct Index3 {
  unsigned x = 0, y = 0, z = 0;
};

// The current emulated thread's indices.
inline thread_local Index3 thread_index, block_index, block_dim, grid_dim;

// The threads of a synchronizing block, as fibers (ucontext) on the launching thread: each runs
// until it reaches __syncthreads or returns, then the next one does; a phase ends when every
// thread has reached the barrier, and the next begins. Switching fibers costs well under a
// microsecond, where waking 512 OS threads at a std::barrier cost about 1.7 ms a block (the
// emulated tests spent 35 of their 36 s in the kernel's system calls). Each fiber has its own
// stack, with a guard page below it. One set serves every launch (they run one at a time).
class BlockFibers {
 public:
  static constexpr size_t kStackBytes = 256 << 10;

  static BlockFibers& get() {
    static BlockFibers fibers;  // used under launch()'s lock
    return fibers;
  }
  static BlockFibers*& running() {  // the block whose threads run now, or null
    static thread_local BlockFibers* block = nullptr;
    return block;
  }

  // Runs `run` as threads [0, threads) of block `block` of a launch of `blocks` blocks.
  void run_block(unsigned block, unsigned blocks, unsigned threads,
                 const std::function<void()>& run) {
    reserve(threads);
    run_ = &run;
    for (unsigned t = 0; t < threads; ++t) {
      Fiber& f = fibers_[t];
      getcontext(&f.context);
      f.context.uc_stack.ss_sp = f.stack;
      f.context.uc_stack.ss_size = kStackBytes;
      f.context.uc_link = &scheduler_;  // a returning thread comes back here
      makecontext(&f.context, &BlockFibers::entry, 0);
      f.finished = false;
    }
    running() = this;
    unsigned remaining = threads;
    while (remaining > 0) {  // one phase: every unfinished thread runs to a barrier or its end
      unsigned at_barrier = 0;
      for (unsigned t = 0; t < threads; ++t) {
        Fiber& f = fibers_[t];
        if (f.finished) continue;
        current_ = t;
        thread_index = Index3{t, 0, 0};
        block_index = Index3{block, 0, 0};
        block_dim = Index3{threads, 1, 1};
        grid_dim = Index3{blocks, 1, 1};
        swapcontext(&scheduler_, &f.context);
        if (f.finished)
          --remaining;
        else
          ++at_barrier;
      }
      if (at_barrier > 0 && at_barrier != remaining) {
        std::fprintf(stderr,
                     "fusedopt CUDA emulation: threads of a block returned while others wait at "
                     "__syncthreads\n");
        std::abort();
      }
    }
    running() = nullptr;
  }

  // __syncthreads in the running fiber: back to the scheduler until the next phase.
  void sync() { swapcontext(&fibers_[current_].context, &scheduler_); }

 private:
  struct Fiber {
    ucontext_t context;
    char* stack;
    bool finished;
  };

  static void entry() {
    BlockFibers& self = *running();
    (*self.run_)();
    self.fibers_[self.current_].finished = true;  // uc_link returns to the scheduler
  }

  void reserve(unsigned threads) {
    if (fibers_.size() >= threads) return;
    const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
    const size_t stride = kStackBytes + page;
    for (unsigned t = static_cast<unsigned>(fibers_.size()); t < threads; ++t) {
      void* memory =
          mmap(nullptr, stride, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
      if (memory == MAP_FAILED || mprotect(memory, page, PROT_NONE) != 0) {
        std::fprintf(stderr, "fusedopt CUDA emulation: no memory for a thread's stack\n");
        std::abort();
      }
      fibers_.push_back(Fiber{{}, static_cast<char*>(memory) + page, true});  // kept for life
    }
  }

  std::vector<Fiber> fibers_;
  ucontext_t scheduler_;
  const std::function<void()>* run_ = nullptr;
  unsigned current_ = 0;
};

inline void sync_threads() {
  BlockFibers* block = BlockFibers::running();
  if (!block) {
    std::fprintf(stderr,
                 "fusedopt CUDA emulation: __syncthreads in a kernel launched without "
                 "FUSEDOPT_LAUNCH_SYNCING\n");
    std::abort();
  }
  block->sync();
}

// A kernel's launch: `run()` is the kernel with its arguments bound, called once per thread.
// One launch at a time in the process: its blocks' shared memory (static arrays) is one.
inline void launch(unsigned blocks, unsigned threads, bool synchronizing,
                   const std::function<void()>& run) {
  static std::mutex one_at_a_time;
  const std::lock_guard<std::mutex> lock(one_at_a_time);
  for (unsigned b = 0; b < blocks; ++b) {
    if (synchronizing) {
      BlockFibers::get().run_block(b, blocks, threads, run);
      continue;
    }
    for (unsigned t = 0; t < threads; ++t) {
      thread_index = Index3{t, 0, 0};
      block_index = Index3{b, 0, 0};
      block_dim = Index3{threads, 1, 1};
      grid_dim = Index3{blocks, 1, 1};
      run();
    }
  }
}

// FUSEDOPT_LAUNCH(blocks, threads, stream, kernel)(arguments...): the kernel's arguments are
// copied once, as a launch copies them into the parameter space.
template <class Kernel>
struct Launcher {
  Kernel kernel;  // a function pointer
  unsigned blocks, threads;
  bool synchronizing;
  template <class... Arguments>
  void operator()(const Arguments&... arguments) const {
    launch(blocks, threads, synchronizing, [&] { kernel(arguments...); });
  }
};
template <class Kernel>
Launcher<Kernel> launcher(Kernel kernel, unsigned blocks, unsigned threads, bool synchronizing) {
  return {kernel, blocks, threads, synchronizing};
}

}  // namespace emulation
}  // namespace cuda
}  // namespace fusedopt

#define threadIdx (::fusedopt::cuda::emulation::thread_index)
#define blockIdx (::fusedopt::cuda::emulation::block_index)
#define blockDim (::fusedopt::cuda::emulation::block_dim)
#define gridDim (::fusedopt::cuda::emulation::grid_dim)
#define __syncthreads() (::fusedopt::cuda::emulation::sync_threads())

// The kernel comes last, so that the commas of its template arguments need no parentheses.
#define FUSEDOPT_LAUNCH(blocks, threads, stream, ...) \
  ::fusedopt::cuda::emulation::launcher(__VA_ARGS__, blocks, threads, false)
#define FUSEDOPT_LAUNCH_SYNCING(blocks, threads, stream, ...) \
  ::fusedopt::cuda::emulation::launcher(__VA_ARGS__, blocks, threads, true)

// ---- The runtime's calls that kernels.cu makes, over host memory -------------------------------
typedef int cudaError_t;
constexpr cudaError_t cudaSuccess = 0;
typedef void* cudaStream_t;
enum cudaMemcpyKind { cudaMemcpyHostToDevice = 1 };
inline cudaError_t cudaGetLastError() { return cudaSuccess; }
inline const char* cudaGetErrorString(cudaError_t) { return "emulated CUDA error"; }
inline cudaError_t cudaMallocAsync(void** pointer, size_t bytes, cudaStream_t) {
  *pointer = std::malloc(bytes ? bytes : 1);
  return *pointer ? cudaSuccess : 2;  // cudaErrorMemoryAllocation
}
inline cudaError_t cudaFreeAsync(void* pointer, cudaStream_t) {
  std::free(pointer);
  return cudaSuccess;
}
typedef void* cudaEvent_t;
constexpr unsigned cudaEventDisableTiming = 2, cudaHostAllocPortable = 1;
inline cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}
inline cudaError_t cudaHostAlloc(void** pointer, size_t bytes, unsigned) {
  return cudaMallocAsync(pointer, bytes, nullptr);
}
inline cudaError_t cudaFreeHost(void* pointer) { return cudaFreeAsync(pointer, nullptr); }
// An emulated launch or copy has finished when its call returns: events have nothing to wait for.
inline cudaError_t cudaEventCreateWithFlags(cudaEvent_t* event, unsigned) {
  static char an_event;
  *event = &an_event;
  return cudaSuccess;
}
inline cudaError_t cudaEventRecord(cudaEvent_t, cudaStream_t) { return cudaSuccess; }
inline cudaError_t cudaEventSynchronize(cudaEvent_t) { return cudaSuccess; }
inline cudaError_t cudaEventQuery(cudaEvent_t) { return cudaSuccess; }
inline cudaError_t cudaStreamSynchronize(cudaStream_t) { return cudaSuccess; }
inline cudaError_t cudaEventDestroy(cudaEvent_t) { return cudaSuccess; }
inline cudaError_t cudaStreamWaitEvent(cudaStream_t, cudaEvent_t, unsigned) { return cudaSuccess; }
inline cudaError_t cudaFree(void* pointer) { return cudaFreeAsync(pointer, nullptr); }
inline cudaError_t cudaMemcpyAsync(void* to, const void* from, size_t bytes, cudaMemcpyKind,
                                   cudaStream_t) {
  std::memcpy(to, from, bytes);
  return cudaSuccess;
}
