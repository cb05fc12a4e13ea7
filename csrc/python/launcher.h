// A launch of a checked step, handed from fusedopt._cuda to fusedopt._core. fusedopt.torch's
// plans over CUDA tensors are _core's TorchPlan, whose per-step checks read torch's tensors
// without Python calls (its shim), and whose checked steps _cuda launches: _cuda's Launcher gives
// _core this entry in a capsule. The two modules are libraries of one build, but a mismatch must
// not run: the entry says what it takes (its layout's version, the algorithm, the sizes of the
// structs a step holds) and where it launches, and a plan refuses an entry that differs.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

namespace fusedopt {

struct LaunchEntry {
  static constexpr const char* kCapsuleName = "fusedopt.LaunchEntry";
  static constexpr uint32_t kVersion = 1;
  uint32_t version;                                      // kVersion
  const char* algorithm;                                 // A::name
  size_t prepared_size, tensor_size, coefficients_size;  // of PreparedStep<A>, TensorRef, ...
  bool emulated;   // fusedopt._cuda_emulated's: device memory is the host's
  int32_t device;  // the CUDA device it launches on
  void* launcher;
  // Launches `prepared` (a PreparedStep<A>); false, with `error` set, where it did not launch.
  bool (*launch)(void* launcher, const void* prepared, std::string* error);
};

}  // namespace fusedopt
