// The CUDA launch plan: which block of which launch updates which chunk of which tensor. Plain
// host C++ (no CUDA headers), compiled by the host compiler into the core library, so the plan is
// unit-tested on machines without a GPU (tests/test_cuda.py) and the kernels read exactly the
// structure those tests check.
#pragma once

#include <cstdint>
#include <vector>

#include "core/tensor.h"

namespace fusedopt {
namespace cuda {

constexpr int kMaxOperands = 2 + kMaxStates;  // param, grad, states
// A block streams one chunk. 64K elements keep a block busy for many loads per thread while a
// 1e8-element tensor still spreads over ~1500 blocks, enough to fill every SM of an H200.
constexpr int64_t kChunkElements = int64_t{1} << 16;
// One launch updates up to this many tensors and chunks. The metadata travels by value as the
// kernel argument: CUDA 12.1+ allows 32764 bytes of kernel parameters on every architecture
// CUDA 13 supports, and 256 tensors per launch is 7x what torch's 4 KB metadata holds for Adam,
// so 10000 small tensors take 40 launches instead of ~280.
constexpr int kMaxTensorsPerLaunch = 256;
constexpr int kMaxBlocksPerLaunch = 1024;
// Distinct coefficient structs per launch: one per (param group, step count) pair met; a new one
// past this limit starts a new launch.
constexpr int kMaxCoefficientSetsPerLaunch = 4;
// 16-byte vector loads (float4, double2) need every pointer of a tensor on a 16-byte boundary.
constexpr uintptr_t kVectorBytes = 16;

enum TensorFlags : uint8_t { kVectorized = 1, kWriteGrad = 2 };

// What one launch reads, passed by value (the kernels add the coefficient structs next to it).
// The same chunk size on every launch keeps a vectorized tensor's chunks 16-byte aligned.
struct LaunchMetadata {
  void* addresses[kMaxOperands][kMaxTensorsPerLaunch];  // null where the tensor keeps no such state
  int64_t sizes[kMaxTensorsPerLaunch];
  uint8_t coefficient_set[kMaxTensorsPerLaunch];  // index into the launch's coefficient structs
  uint8_t flags[kMaxTensorsPerLaunch];            // TensorFlags
  uint16_t block_tensor[kMaxBlocksPerLaunch];     // slot each block updates
  int32_t block_chunk[kMaxBlocksPerLaunch];       // chunk of that tensor (64-bit element offsets)
  int32_t num_tensors;
  int32_t num_blocks;
};

// One tensor of a step as the plan sees it.
struct PlanTensor {
  void* addresses[kMaxOperands];
  int64_t size;
  int element_bytes;   // 4 (float32) or 8 (float64): one launch handles one dtype
  int coefficient_id;  // which of the step's coefficient structs this tensor reads
  bool write_grad;
};

struct LaunchBatch {
  LaunchMetadata metadata;
  int element_bytes;
  int num_coefficient_sets;
  int coefficient_ids[kMaxCoefficientSetsPerLaunch];  // step-wide id of each set
  int32_t tensor_index[kMaxTensorsPerLaunch];         // host only: the input tensor of each slot
};

// Every element of every non-empty tensor is covered by exactly one block of one launch; float32
// tensors come first, then float64. Empty tensors take no slot. A tensor whose chunks do not fit
// in the current launch continues in slot 0 of the next one.
std::vector<LaunchBatch> build_launch_plan(const std::vector<PlanTensor>& tensors);

// Tensor t of a validated step (csrc/core/step.h) as the plan sees it.
PlanTensor plan_tensor(const TensorRef& t, int coefficient_id);
// The plan's input for a validated step: coefficient_id[i] for tensor i.
std::vector<PlanTensor> plan_tensors(const std::vector<TensorRef>& tensors,
                                     const std::vector<int>& coefficient_id);

bool is_vectorizable(const PlanTensor& tensor);

}  // namespace cuda
}  // namespace fusedopt
