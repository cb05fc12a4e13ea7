// What every backend receives for one tensor of a step: raw addresses, a 64-bit size and the
// coefficients of its step. Built by the validator (csrc/core/validate.cpp) only after every
// buffer of the call has been checked.
#pragma once

#include <cstdint>

#include "math/coefficients.h"

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

// Many EWMA series in one float64 block: element t of series s is at
// x[s * series_stride + t * time_stride]; out has the same layout. For series side by side in
// memory the kernel keeps each series' running state in the three arrays (one entry per series),
// allocated by the caller: kernels allocate nothing.
struct EwmaBlock {
  const double* x;
  double* out;
  int64_t length;
  int64_t time_stride;
  int64_t series_stride;
  double* mean;
  double* old_weight;
  double* observations;
  EwmaCoefficients coefficients;
};

// Runs series [first, last) of a block over all its time steps.
using EwmaFn = void (*)(const EwmaBlock& block, int64_t first, int64_t last);

struct KernelTable {
  const char* isa;
  KernelFn sgd[kNumDtypes];
  KernelFn adagrad[kNumDtypes];
  KernelFn rmsprop[kNumDtypes];
  KernelFn adam[kNumDtypes];
  // The bandwidth ceiling of bench/: reads and writes the same buffers as a step, no math.
  KernelFn stream_add[kNumDtypes];
  EwmaFn ewma;
};

}  // namespace fusedopt
