// Devices, pointers and streams through the CUDA runtime, linked statically: the module loads on
// a machine with no driver, and every question here then has an ordinary answer or a clear error.
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#include "cuda/backend.h"

namespace fusedopt {
namespace cuda {
namespace {

void check(cudaError_t error, const char* call) {
  if (error != cudaSuccess)
    throw std::runtime_error(std::string("fusedopt.cuda: ") + call +
                             " failed: " + cudaGetErrorString(error));
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
  return count;
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
