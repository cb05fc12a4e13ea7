// Devices, pointers and streams through the CUDA runtime, linked statically: the module loads on
// a machine with no driver, and every question here then has an ordinary answer or a clear error.
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#include "cuda/backend.h"

namespace fusedopt {
namespace cuda {
namespace {

// A failed call also sets the runtime's last error: cleared here, so that it does not surface at
// the next, valid step's launch check as if that launch had failed.
void check(cudaError_t error, const char* call) {
  if (error != cudaSuccess) {
    cudaGetLastError();
    throw std::runtime_error(std::string("fusedopt.cuda: ") + call +
                             " failed: " + cudaGetErrorString(error));
  }
}

}  // namespace

int device_count(std::string* reason) {
  int count = 0;
  const cudaError_t error = cudaGetDeviceCount(&count);
  if (error != cudaSuccess) {
    cudaGetLastError();  // clear it, so it does not surface at the next launch check
    if (reason) {
      *reason = cudaGetErrorString(error);
      // What a machine without a GPU reports: say it in a user's words.
      if (error == cudaErrorInsufficientDriver)
        *reason = "no NVIDIA driver is loaded, or it is older than CUDA " +
                  std::to_string(CUDART_VERSION / 1000) + " needs (" + *reason + ")";
    }
    return 0;
  }
  if (count == 0 && reason) *reason = "no CUDA device was found";
  // A device counts when fusedopt's kernels can run on it: a GPU older than the build's images
  // (sm_75 with the default 80-real;90-real;90-virtual) would otherwise fail at its first launch.
  int usable = 0;
  for (int device = 0; device < count; ++device)
    if (kernels_run_on(device, usable == 0 ? reason : nullptr)) ++usable;
  return usable;
}

void require_device() {
  std::string reason;
  if (device_count(&reason) == 0)
    throw std::runtime_error("fusedopt.cuda: no usable CUDA device (" + reason +
                             "); use NumPy arrays for the CPU backend");
}

int device_of(const void* address, const std::string& what) {
  cudaPointerAttributes attributes{};
  const cudaError_t error = cudaPointerGetAttributes(&attributes, address);
  if (error != cudaSuccess) {
    cudaGetLastError();
    throw std::invalid_argument(what + " is not CUDA memory (" + cudaGetErrorString(error) + ")");
  }
  if (attributes.type != cudaMemoryTypeDevice && attributes.type != cudaMemoryTypeManaged)
    throw std::invalid_argument(what + " is in host memory, not on a CUDA device");
  return attributes.device;
}

void* stream_from_handle(uintptr_t handle) {
  if (handle == 0 || handle == 1) return cudaStreamLegacy;
  if (handle == 2) return cudaStreamPerThread;
  return reinterpret_cast<void*>(handle);
}

void wait_for_streams(void* stream, const std::vector<void*>& producers) {
  for (void* producer : producers) {
    if (producer == stream) continue;
    cudaEvent_t ready;
    check(cudaEventCreateWithFlags(&ready, cudaEventDisableTiming), "cudaEventCreateWithFlags");
    // The event's resources are released once the wait completes, so it can go at once.
    const cudaError_t recorded = cudaEventRecord(ready, static_cast<cudaStream_t>(producer));
    const cudaError_t waited =
        recorded == cudaSuccess ? cudaStreamWaitEvent(static_cast<cudaStream_t>(stream), ready, 0)
                                : recorded;
    cudaEventDestroy(ready);
    check(waited, "ordering after the producer's stream (cudaEventRecord/cudaStreamWaitEvent)");
  }
}

void signal_streams(void* stream, const std::vector<void*>& consumers) {
  for (void* consumer : consumers) {
    if (consumer == stream) continue;
    cudaEvent_t done;
    check(cudaEventCreateWithFlags(&done, cudaEventDisableTiming), "cudaEventCreateWithFlags");
    const cudaError_t recorded = cudaEventRecord(done, static_cast<cudaStream_t>(stream));
    const cudaError_t waited =
        recorded == cudaSuccess ? cudaStreamWaitEvent(static_cast<cudaStream_t>(consumer), done, 0)
                                : recorded;
    cudaEventDestroy(done);
    check(waited, "ordering the producers' streams after the step (cudaStreamWaitEvent)");
  }
}

void synchronize_device() noexcept {
  cudaDeviceSynchronize();
  cudaGetLastError();
}

DeviceGuard::DeviceGuard(int device) : previous_(-1) {
  check(cudaGetDevice(&previous_), "cudaGetDevice");
  if (previous_ != device) check(cudaSetDevice(device), "cudaSetDevice");
}

DeviceGuard::~DeviceGuard() {
  int current = -1;
  if (cudaGetDevice(&current) == cudaSuccess && current != previous_) cudaSetDevice(previous_);
}

}  // namespace cuda
}  // namespace fusedopt
