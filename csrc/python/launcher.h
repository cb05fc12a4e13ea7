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

#include "core/error.h"
#include "core/step.h"

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

// What a GPU step cannot run, refused when its buffers are registered or described (by
// fusedopt.cuda, and by a TorchPlan given a launcher), before a front end changes anything:
// the per-tensor norms of an algorithm with reductions (LAMB) over 16-bit or 8-bit storage or
// master copies. (The launch would refuse it too, after a front end's own changes.)
inline bool stored_in_low_precision(const StepBuffers& b) {
  const auto low = [](const BufferInfo& x) {
    return x.present && x.dtype && *x.dtype != Dtype::float32 && *x.dtype != Dtype::float64;
  };
  for (const auto* list : {&b.params, &b.grads})
    for (const BufferInfo& x : *list)
      if (low(x)) return true;
  for (const auto& list : b.states)
    for (const BufferInfo& x : list)
      if (low(x)) return true;
  for (const BufferInfo& master : b.masters)
    if (master.present) return true;
  return false;
}

template <class A>
void refuse_low_precision_reductions(const StepBuffers& buffers) {
  if (A::reductions > 0 && stored_in_low_precision(buffers))
    throw Error(ErrorKind::value,
                std::string(A::name) +
                    " on the GPU takes float32 and float64 params and states only (no 16-bit or "
                    "8-bit storage, no master copies): its per-tensor norms are CPU-only there");
}

}  // namespace fusedopt
