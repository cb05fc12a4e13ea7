// The tables that the table kernel (csrc/cuda/staged.cuh) reads from device memory: one record
// per tensor, one per block (a chunk of a tensor), and per coefficient struct the keys of its
// stochastic rounding. Plain host C++ (no CUDA headers): the bindings hold a registered plan's
// tables (backend.h RegisteredTables) and kernels.cu builds and copies them.
#pragma once

#include <cstdint>
#include <vector>

#include "core/tensor.h"
#include "cuda/launch_plan.h"

namespace fusedopt {
namespace cuda {

// How a tensor is updated: its own dtype's math (float32, float64; 16-byte vector loads where
// kVectorized), or widened to float32 and rounded back (16-bit storage, masters, 8-bit states).
enum TableKind : uint8_t { kPlainFloat = 0, kPlainDouble = 1, kStaged = 2 };
// TensorFlags (kVectorized, kWriteGrad) and:
constexpr uint8_t kStochastic = 4;

struct TableTensor {
  void* param;
  void* grad;
  void* state[kMaxStates];    // null where the tensor keeps no such state
  float* absmax[kMaxStates];  // an 8-bit state's per-block scales
  float* master;              // the float32 master of a 16-bit param, or null
  int64_t size;
  int32_t coefficient_set;  // index into the step's coefficient structs (and their keys)
  uint8_t kind;             // TableKind
  uint8_t dtype;            // Dtype of the param and the grad
  uint8_t state_dtype;      // Dtype of every state
  uint8_t flags;            // TensorFlags | kStochastic
};

struct TableBlock {
  int32_t tensor;
  int32_t chunk;  // of kChunkElements elements (a multiple of kQuantBlock: whole 8-bit blocks)
};
static_assert(kChunkElements % kQuantBlock == 0, "a chunk holds whole blocks of 8-bit state");

// Stochastic rounding's keys for the tensors of one coefficient struct, which share a step:
// role 0 the param, 1 + k state k (csrc/math/rounding.h).
struct SetKeys {
  uint64_t role_key[1 + kMaxStates];
};

// Tensor i of a validated step as the table kernel reads it.
TableTensor table_tensor(const TensorRef& t, int coefficient_set);
// Its blocks appended (none for an empty tensor), as `tensor`, its index in the table.
void append_blocks(const TableTensor& t, int32_t tensor, std::vector<TableBlock>& blocks);
// The keys of each coefficient struct, from the tensors that read it.
std::vector<SetKeys> set_keys(const std::vector<TensorRef>& tensors,
                              const std::vector<int>& coefficient_of, size_t num_sets);

}  // namespace cuda
}  // namespace fusedopt
