// The CUDA backend as the host code sees it: no CUDA headers, so the bindings compile with the
// host compiler. kernels.cu implements the launches, runtime.cpp the device and stream handling.
// Every function throws std::runtime_error with the CUDA error's text when the runtime fails.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "core/step.h"
#include "cuda/launch_plan.h"

namespace fusedopt {
namespace cuda {

// Launches a validated step on `stream` (a cudaStream_t) of the current device: the flat kernel
// for a step with one tensor per dtype, the multi-tensor plan otherwise. Compiled in kernels.cu
// for every registered algorithm.
template <class A>
void launch_step(const PreparedStep<A>& step, void* stream);

// The number of usable devices, or 0 with the runtime's reason (never throws: no driver, no
// device and a driver older than the runtime are all ordinary answers on a CPU machine).
int device_count(std::string* reason);
// Throws std::runtime_error naming the problem unless a device is usable.
void require_device();

// The device holding `address`; throws std::invalid_argument (naming `what`) for host memory.
int device_of(const void* address, const std::string& what);

// A CUDA stream from its Python encoding (CUDA Array Interface and DLPack): 0 and 1 the legacy
// default stream, 2 the per-thread default stream, anything else a cudaStream_t.
void* stream_from_handle(uintptr_t handle);

// Makes `stream` wait for the work already queued on each of `producers`.
void wait_for_streams(void* stream, const std::vector<void*>& producers);
// Makes each of `consumers` wait for the work queued so far on `stream`: after a step launched on
// a stream of its own, the producers' next work (torch's next op, .cpu(), the caching allocator
// reusing a freed grad) comes after fusedopt's writes.
void signal_streams(void* stream, const std::vector<void*>& consumers);
// Whether fusedopt's kernels can run on `device` (an image for its compute capability, or PTX it
// can compile); the reason when not.
bool kernels_run_on(int device, std::string* reason);

// Makes `device` current until destroyed.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device);
  ~DeviceGuard();
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int previous_;
};

}  // namespace cuda
}  // namespace fusedopt
