// The CUDA kernels on the CPU: what csrc/cuda/kernels.cu and multi_tensor.cuh use of CUDA C++ and
// of the runtime, for the host compiler, so that the module fusedopt._cuda_emulated runs the very
// kernel source of the GPU build (its indexing, chunking, vector loads, reductions and launches)
// on host memory, and tests compare it bit for bit with the CPU backend on machines without a GPU
// (tests/test_cuda_emulated.py). Force-included (-include) before kernels.cu; never by the nvcc
// build.
//
// A launch runs its blocks one after another. A kernel declared without __syncthreads runs each
// block's threads one after another on the calling thread; one that synchronizes (launched with
// FUSEDOPT_LAUNCH_SYNCING) runs each block on blockDim.x threads of its own that meet at every
// __syncthreads, so shared memory is read only after the writes before the barrier, as on a GPU.
// Within a phase the threads' order is not the GPU's: a kernel whose result depends on it has a
// race on the GPU too. __syncthreads in a kernel launched as not synchronizing aborts. What it
// cannot show: races between blocks (they run in turn), a read of shared memory before any
// write (static arrays start zeroed and keep the last block's values), launch limits, timing.
#pragma once

#include <unistd.h>

#include <algorithm>
#include <barrier>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <mutex>
#include <thread>
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

// Each emulated thread's own indices.
inline thread_local Index3 thread_index, block_index, block_dim, grid_dim;
inline thread_local std::barrier<>* block_barrier = nullptr;  // null: a non-synchronizing launch

inline void sync_threads() {
  if (!block_barrier) {
    std::fprintf(stderr,
                 "fusedopt CUDA emulation: __syncthreads in a kernel launched without "
                 "FUSEDOPT_LAUNCH_SYNCING\n");
    std::abort();
  }
  block_barrier->arrive_and_wait();
}

// The threads that run the blocks of synchronizing launches: started once (thread creation cost
// more than the kernels, 512 per block), each taking its thread index in every block, and meeting
// the launching thread at a start and a finish barrier per block. Never destroyed: they wait at
// the start barrier until the process ends. A child forked while it exists makes its own.
class BlockThreads {
 public:
  static BlockThreads& get(unsigned threads) {
    static BlockThreads* pool = nullptr;
    static pid_t owner = 0;
    if (!pool || owner != getpid() || pool->size_ < threads) {
      pool = new BlockThreads(std::max(threads, 512u));  // a smaller one's threads just wait
      owner = getpid();
    }
    return *pool;
  }

  // Runs `run` as threads [0, threads) of block `block` of a launch of `blocks` blocks.
  void run_block(unsigned block, unsigned blocks, unsigned threads,
                 const std::function<void()>& run) {
    job_ = {&run, block, blocks, threads};
    std::barrier<> block_barrier(threads);
    job_barrier_ = &block_barrier;
    start_.arrive_and_wait();
    finish_.arrive_and_wait();
  }

 private:
  struct Job {
    const std::function<void()>* run = nullptr;
    unsigned block = 0, blocks = 0, threads = 0;
  };

  explicit BlockThreads(unsigned size) : size_(size), start_(size + 1), finish_(size + 1) {
    for (unsigned t = 0; t < size; ++t) std::thread([this, t] { work(t); }).detach();
  }

  [[noreturn]] void work(unsigned t) {
    for (;;) {
      start_.arrive_and_wait();  // the job is published before it
      if (t < job_.threads) {
        thread_index = Index3{t, 0, 0};
        block_index = Index3{job_.block, 0, 0};
        block_dim = Index3{job_.threads, 1, 1};
        grid_dim = Index3{job_.blocks, 1, 1};
        block_barrier = job_barrier_;
        (*job_.run)();
        block_barrier = nullptr;
      }
      finish_.arrive_and_wait();
    }
  }

  unsigned size_;
  std::barrier<> start_, finish_;
  Job job_;
  std::barrier<>* job_barrier_ = nullptr;
};

// A kernel's launch: `run()` is the kernel with its arguments bound, called once per thread.
// One launch at a time in the process: its blocks' shared memory (static arrays) is one.
inline void launch(unsigned blocks, unsigned threads, bool synchronizing,
                   const std::function<void()>& run) {
  static std::mutex one_at_a_time;
  const std::lock_guard<std::mutex> lock(one_at_a_time);
  for (unsigned b = 0; b < blocks; ++b) {
    if (synchronizing) {
      BlockThreads::get(threads).run_block(b, blocks, threads, run);
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
