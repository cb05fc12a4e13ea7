// What every backend receives for one tensor of a step: raw addresses and a 64-bit size, built by
// the validator (csrc/core/validate.cpp) only after every buffer of the call has been checked.
#pragma once

#include <cstdint>
#include <tuple>

#include "math/ewma.h"
#include "math/registry.h"

namespace fusedopt {

// The values are the C ABI's (fusedopt_dtype). float32 and float64 are computed in their own
// precision; the 16-bit formats are storage only, computed in float32 (csrc/math/rounding.h).
// blockwise8: a state quantized to 8-bit codes of bitsandbytes' dynamic map, one float32 absmax
// per block of kQuantBlock elements (states only; not in the C ABI).
enum class Dtype : int { float32 = 0, float64 = 1, bfloat16 = 2, float16 = 3, blockwise8 = 4 };
constexpr int kNumDtypes = 5;
constexpr int64_t kQuantBlock = 256;
// The blocks, and so the absmax values, of an 8-bit state of `size` elements.
// (Rounded up without size + 255, which overflows for a size a C caller may give before it is
// checked.)
constexpr int64_t quant_blocks(int64_t size) {
  return size / kQuantBlock + (size % kQuantBlock > 0);
}
constexpr int kNumComputeDtypes = 2;  // float32 and float64: the kernels' own types

constexpr int64_t dtype_size(Dtype d) {
  return d == Dtype::float64 ? 8 : d == Dtype::float32 ? 4 : d == Dtype::blockwise8 ? 1 : 2;
}
constexpr const char* dtype_name(Dtype d) {
  return d == Dtype::float32    ? "float32"
         : d == Dtype::float64  ? "float64"
         : d == Dtype::bfloat16 ? "bfloat16"
         : d == Dtype::float16  ? "float16"
                                : "uint8 (8-bit blockwise state)";
}

struct TensorRef {
  void* param;
  void* grad;
  void* state[kMaxStates];    // null where this tensor's configuration keeps no such state
  float* absmax[kMaxStates];  // a blockwise8 state's per-block scales (absmax), else null
  float* master;              // the float32 master copy of a 16-bit param, or null
  int64_t size;
  Dtype dtype;        // the param's and the grad's
  Dtype state_dtype;  // every state's
  bool write_grad;    // PyTorch's fused grad_scale writes the unscaled gradient back
  bool stochastic;    // 16-bit params and states are rounded stochastically, keyed by:
  uint64_t rounding_key;

  // Whether the tensor goes through the staged kernels (16-bit storage, float32 math) rather
  // than the kernels of its own dtype.
  bool staged() const {
    return master != nullptr || state_dtype != dtype ||
           (dtype != Dtype::float32 && dtype != Dtype::float64);
  }
};

// Updates elements [begin, end) of one tensor with the coefficients of its step.
template <class A>
using KernelFn = void (*)(const TensorRef& tensor, const typename A::Coefficients& coefficients,
                          int64_t begin, int64_t end);

// The first pass of an algorithm with per-tensor reductions: blocks [first_block, end_block) of
// kReductionBlock elements of one tensor, each adding A::reductions sums to partials[block * R +
// r]. The sum of a block depends on the block alone, never on how work is split among threads
// or on the ISA, so a tensor's sums (its blocks' partials added in order) are reproducible.
constexpr int64_t kReductionBlock = 4096;
template <class A>
using ReduceFn = void (*)(const TensorRef& tensor, const typename A::Coefficients& coefficients,
                          int64_t first_block, int64_t end_block, double* partials);

template <class A>
struct AlgorithmKernels {
  KernelFn<A> update[kNumComputeDtypes];
  ReduceFn<A> reduce[kNumComputeDtypes];  // null without reductions
  // Staged tensors: widened to float32 a chunk at a time, updated, rounded back.
  KernelFn<A> staged_update;
  ReduceFn<A> staged_reduce;  // null without reductions
};

// The bandwidth ceiling of bench/: reads and writes the same buffers as a step, no math.
using StreamAddFn = void (*)(const TensorRef& tensor, int64_t begin, int64_t end);

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

// One per-ISA compile of csrc/cpu/kernels.cpp: the kernels of every registered algorithm.
struct KernelTable {
  const char* isa;
  Algorithms::map<AlgorithmKernels> algorithms;
  StreamAddFn stream_add[kNumDtypes];
  EwmaFn ewma;
};

template <class A>
const AlgorithmKernels<A>& kernels_of(const KernelTable& table) {
  return std::get<AlgorithmKernels<A>>(table.algorithms);
}

}  // namespace fusedopt
