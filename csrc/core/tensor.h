// What every backend receives for one tensor of a step: raw addresses, a 64-bit size and the
// coefficients of its step. Built by the validator (csrc/core/validate.cpp) only after every
// buffer of the call has been checked.
#pragma once

#include <cstdint>

namespace fusedopt {

enum class Dtype : int { float32 = 0, float64 = 1 };
constexpr int kNumDtypes = 2;
constexpr int kMaxStates = 3;

struct TensorRef {
  void* param;
  void* grad;
  void* state[kMaxStates];  // null where the algorithm's configuration keeps no such state
  int64_t size;
  Dtype dtype;
  bool write_grad;           // PyTorch's fused grad_scale writes the unscaled gradient back
  const void* coefficients;  // the algorithm's *Coefficients struct for this tensor's step
};

// Updates elements [begin, end) of one tensor.
using KernelFn = void (*)(const TensorRef& tensor, int64_t begin, int64_t end);

struct KernelTable {
  const char* isa;
  KernelFn sgd[kNumDtypes];
  KernelFn adagrad[kNumDtypes];
  KernelFn rmsprop[kNumDtypes];
  KernelFn adam[kNumDtypes];
  // The bandwidth ceiling of bench/: reads and writes the same buffers as a step, no math.
  KernelFn stream_add[kNumDtypes];
};

}  // namespace fusedopt
