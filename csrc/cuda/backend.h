// The CUDA backend as the host code sees it: no CUDA headers, so the bindings compile with the
// host compiler. kernels.cu implements the launches, runtime.cpp the device and stream handling.
// Every function throws std::runtime_error with the CUDA error's text when the runtime fails.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "core/step.h"
#include "cuda/launch_plan.h"
#include "cuda/tables.h"

namespace fusedopt {
namespace cuda {

// Launches a validated step on `stream` (a cudaStream_t) of the current device: the flat kernel
// for a step with one tensor per dtype, the multi-tensor plan otherwise. Compiled in kernels.cu
// for every registered algorithm.
template <class A>
void launch_step(const PreparedStep<A>& step, void* stream);

// A registered plan's tables (csrc/cuda/tables.h), kept in device memory from one step to the
// next: a step copies only the records that changed (a grad's address, a flag) and its
// coefficient structs, then updates every tensor in one launch of the table kernel (LAMB: its
// three launches, as launch_step). Steps come one at a time (the plan's lock).
class RegisteredTables {
 public:
  RegisteredTables() = default;
  ~RegisteredTables();
  RegisteredTables(const RegisteredTables&) = delete;
  RegisteredTables& operator=(const RegisteredTables&) = delete;

  // On `stream` (a cudaStream_t) of the current device.
  template <class A>
  void launch(const PreparedStep<A>& step, void* stream);

 private:
  std::vector<TableTensor> tensors_;  // as on the device
  std::vector<TableBlock> blocks_;
  size_t layout_coefficient_bytes_ = 0, layout_sets_ = 0;  // the room the layout keeps
  void* device_ = nullptr;                                 // the tables (TableLayout)
  int device_id_ = 0;
  void* done_ = nullptr;  // a cudaEvent_t recorded after the last launch
};

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

// Waits for all work on the current device; never throws (a fallback where an ordering failed).
void synchronize_device() noexcept;

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
