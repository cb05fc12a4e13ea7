// The runtime side of csrc/cuda/backend.h for fusedopt._cuda_emulated (csrc/cuda/emulation.h):
// one device, device 0, whose memory is the host's; streams are handles with nothing queued on
// them, since an emulated launch has finished when it returns.
#include <string>

#include "cuda/backend.h"

namespace fusedopt {
namespace cuda {

int device_count(std::string*) { return 1; }
void require_device() {}
int device_of(const void*, const std::string&) { return 0; }
void* stream_from_handle(uintptr_t handle) { return reinterpret_cast<void*>(handle); }
void wait_for_streams(void*, const std::vector<void*>&) {}
void signal_streams(void*, const std::vector<void*>&) {}
bool kernels_run_on(int, std::string*) { return true; }
void synchronize_device() noexcept {}
DeviceGuard::DeviceGuard(int device) : previous_(device) {}
DeviceGuard::~DeviceGuard() = default;

}  // namespace cuda
}  // namespace fusedopt
